"""The Attention Backend node's choices are honest: what the lock verified comes first and is
marked, the rest is marked as not verified here; choosing one of those logs one line naming
what runs instead, and the node's label output says what will run."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_dispatch import fake_sage, sage_record, write_lock

from comfy_env_attn.core.backends import BACKENDS
from comfy_env_attn.runtime import comfyui
from comfy_env_attn.runtime.comfyui import AttentionBackend, choices, parse_choice


class Patcher:
    """What the node uses of ComfyUI's ModelPatcher: clone() and model_options."""

    def __init__(self) -> None:
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def clone(self) -> Patcher:
        other = Patcher()
        other.model_options = copy.deepcopy(self.model_options)
        return other


@pytest.fixture
def fresh(fresh, monkeypatch, tmp_path):  # conftest's, without a lock or an applied node
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "no-lock.toml"))
    comfyui._applied[0] = None
    yield
    comfyui._applied[0] = None


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and "not verified on this machine" in r.getMessage()]


def test_without_a_lock_only_auto_and_sdpa_are_unmarked_as_unverified(fresh) -> None:
    got = choices()
    assert got[:4] == ["auto", "auto (exact)", "auto (safe)", "sdpa (always available)"]
    assert got[4:] == [f"{n} (not verified here)" for n in BACKENDS if n != "sdpa"]
    assert "sage (not verified here)" in got and "flash (not verified here)" in got


def test_a_choice_that_is_not_verified_says_so_once_and_names_what_runs(fresh,
                                                                       caplog) -> None:
    model = Patcher()
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        out, label = AttentionBackend().apply(model, "flash (not verified here)")
    said = warnings(caplog)
    assert len(said) == 1, said
    assert said[0].startswith("comfy-env-attn: flash is not verified on this machine (there "
                              "is no fresh lock") and "uses PyTorch SDPA (sdpa)" in said[0]
    assert label == "FlashAttention 2: not verified on this machine; using PyTorch SDPA"
    assert model.model_options == {"transformer_options": {}}  # the input is kept
    assert callable(out.model_options["transformer_options"]["optimized_attention_override"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        _, label = AttentionBackend().apply(model, "auto")
    assert warnings(caplog) == [] and label == "auto: PyTorch SDPA (no verified lock)"


def test_what_the_lock_verified_comes_first_and_runs(fresh, tmp_path, monkeypatch,
                                                      caplog) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path)))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(write_lock(
        tmp_path / "l.toml", sage=sage_record(), sage_dir=tmp_path)))
    got = choices()
    assert got[:5] == ["auto", "auto (exact)", "auto (safe)", "sdpa (verified)",
                       "sage (verified)"]
    assert "flash (not verified here)" in got[5:]
    assert [c for c in got[5:] if parse_choice(c)[0] in ("sage", "sdpa")] == []
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        _, label = AttentionBackend().apply(Patcher(), "sage (verified)")
    assert warnings(caplog) == []
    assert label.startswith("SageAttention 2.2.0, verified"), label
    _, label = AttentionBackend().apply(Patcher(), "auto (exact)")
    assert label.startswith("auto (exact): PyTorch SDPA"), label  # sage is quantized
    _, label = AttentionBackend().apply(Patcher(), "auto (safe)")
    assert label.startswith("auto (safe): PyTorch SDPA"), label  # sage's P.V is fp8
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        _, label = AttentionBackend().apply(Patcher(), "xformers (not verified here)")
    (said,) = warnings(caplog)
    assert "xformers is not verified on this machine (the lock does not list it as " \
        "verified); the Attention Backend node uses PyTorch SDPA (sdpa) instead" in said
    assert label.endswith("not verified on this machine; using PyTorch SDPA"), label


def test_the_model_comes_first_then_the_label() -> None:
    assert AttentionBackend.RETURN_TYPES == ("MODEL", "STRING")
    assert AttentionBackend.RETURN_NAMES == ("model", "label")


@pytest.mark.parametrize("choice, parsed", [
    ("auto", ("auto", "")), ("auto (exact)", ("auto", "exact")),
    ("auto (safe)", ("auto", "safe")), ("sage_safe", ("sage_fp16", "")),
    ("sage (verified)", ("sage", "")), ("sage (not verified here)", ("sage", "")),
    ("sage", ("sage", "")), ("fa4", ("flash4", "")), ("Flash (verified)", ("flash", "")),
])
def test_a_workflow_saved_elsewhere_still_validates(choice: str,
                                                    parsed: tuple[str, str]) -> None:
    assert parse_choice(choice) == parsed
    assert AttentionBackend.VALIDATE_INPUTS(choice) is True


def test_an_unknown_backend_fails_validation_with_the_valid_names() -> None:
    msg = AttentionBackend.VALIDATE_INPUTS("warp (verified)")
    assert isinstance(msg, str) and "unknown backend 'warp (verified)'" in msg and "sage" in msg
