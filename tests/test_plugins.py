"""Backends from outside: a plugin shipped through the entry point group is found by
verification in the target, proven like the built-in backends, locked, and chosen by the
same rule; approximate ones only when asked for, and watched by the quality monitor."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from wheels import installed_plugin

from comfy_env_attn import lockfile
from comfy_env_attn.core.lockmodel import tool_table
from comfy_env_attn.runtime import dispatch
from comfy_env_attn.verify.run import Options, verify

PLUGIN = '''
import torch
import torch.nn.functional as F
from comfy_env_attn import register_backend
from comfy_env_attn.core.backends import ALL_DTYPES, Capabilities
CALLS = []

def rough(q, k, v, mask, causal, scale):
    """Right for inputs like verification's; wrong once |q| grows (an approximation that
    breaks down out of its range)."""
    CALLS.append(q.shape)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    if q.abs().max() > 20:
        out = out * 0.3
    return out.to(q.dtype)

def register():
    register_backend("rough", rough, approximate={approximate}, dist="rough-attn",
                     title="Rough attention",
                     capabilities=Capabilities(ALL_DTYPES, (64,), causal=False, cross=False,
                                               gqa=False),
                     max_abs=0.1, min_cosine=0.99)
'''


def plugin_dir(root: Path, *, approximate: bool) -> Path:
    """A package `rough_attn` and its dist-info with the entry point, as pip leaves them."""
    return installed_plugin(root, "rough_attn", PLUGIN.format(approximate=approximate))


@pytest.fixture(scope="module")
def approximate_plugin(tmp_path_factory) -> tuple[Path, Path]:
    folder = plugin_dir(tmp_path_factory.mktemp("plugin") / "site", approximate=True)
    results = verify(sys.executable, [], Options(shapes=[[1, 2, 128, 64]],
                                                 env={"PYTHONPATH": str(folder)}))
    assert "rough" in results, "verification did not find the entry point"
    lock = folder.parent / "pylock.toml"
    lockfile.write(lock, lockfile.build([], lockfile.tool_table_from(
        results, python=sys.executable)))
    return folder, lock


def test_a_plugin_from_an_entry_point_is_verified_and_locked(approximate_plugin) -> None:
    _, lock = approximate_plugin
    table = tool_table(lockfile.read(lock))
    rough = table.backends["rough"]
    assert rough.verified and rough.approximate and rough.title == "Rough attention"
    assert {c.variant for c in rough.checks} == {"plain", "scale"}  # what it claims
    assert {c.head_dim for c in rough.checks} == {64}
    assert table.fingerprint.backends["rough"].dist == "rough-attn"
    assert "rough" not in table.auto and "rough" not in table.exact  # approximate


def test_approximate_only_when_asked_and_watched(approximate_plugin, monkeypatch, fresh,
                                                 caplog) -> None:
    folder, lock = approximate_plugin
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    monkeypatch.setenv("COMFY_ENV_ATTN_SETTLE", "0")
    monkeypatch.setenv("COMFY_ENV_ATTN_MONITOR_EVERY", "1")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=g) for _ in range(3))
    dispatch.set_backend("auto")
    dispatch.dispatch_attention(q, k, v)
    import rough_attn

    assert rough_attn.CALLS == []  # auto never picks an approximate backend by itself
    _, over = dispatch.passed_over(q, k)
    assert "approximate" in dict(over)["rough"][0], (dispatch.get_backend(), over)
    dispatch.set_backend("auto", exact=True, approximate=True)
    dispatch.dispatch_attention(q, k, v)
    assert rough_attn.CALLS == []  # exact wins
    dispatch.set_backend("rough")  # by name: yes
    out = dispatch.dispatch_attention(q, k, v)
    assert len(rough_attn.CALLS) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    # out of its range: the quality monitor sees it, says so once, and moves on
    big = q * 30
    with caplog.at_level(logging.INFO, "comfy_env_attn"):
        bad = dispatch.dispatch_attention(big, k, v)
        outs = [dispatch.dispatch_attention(big, k, v) for _ in range(3)]
    assert len(rough_attn.CALLS) == 2  # the monitored call, then never again
    assert not torch.allclose(bad, F.scaled_dot_product_attention(big, k, v), atol=1e-3)
    torch.testing.assert_close(outs[-1], F.scaled_dot_product_attention(big, k, v))
    failed = [r.message for r in caplog.records if "failed its quality check" in r.message]
    assert len(failed) == 1 and "cosine" in failed[0]
    assert "demoted after failing: rough (quality check" in dispatch.get_backend()
    dispatch.dispatch_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # another kind
    # of call (bfloat16) is still served
    assert len(rough_attn.CALLS) == 3


def test_a_broken_plugin_is_reported_once_and_left_out(tmp_path, monkeypatch, fresh,
                                                       caplog) -> None:
    folder = plugin_dir(tmp_path / "site", approximate=True)
    (folder / "rough_attn.py").write_text("raise RuntimeError('plugin bug')\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        for _ in range(3):
            dispatch.set_backend("auto")
    said = [r.message for r in caplog.records if "plugin rough" in r.message]
    assert len(said) == 1 and "RuntimeError: plugin bug" in said[0]


def test_register_backend_refuses_what_it_cannot_prove() -> None:
    from comfy_env_attn import register_backend

    with pytest.raises(ValueError, match="built-in"):
        register_backend("sage", lambda *a: None)
    # a shipped plugin's name: a lock trusts that code through the fingerprint, not yours
    with pytest.raises(ValueError, match="ships with comfy-env-attn"):
        register_backend("taylor", lambda *a: None, approximate=True, max_abs=1.0,
                         min_cosine=0.0)
    with pytest.raises(ValueError, match="accuracy limits"):
        register_backend("fuzzy", lambda *a: None, approximate=True)
    with pytest.raises(ValueError, match="lowercase"):
        register_backend("Bad Name", lambda *a: None)
