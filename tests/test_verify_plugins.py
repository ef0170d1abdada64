"""`verify --include taylor`: the shipped approximate plugin, which verification leaves out
unless asked, proven, timed and locked through the real command line in a real venv, kept
by the next verify, and then used by the dispatcher by name or with approximate=True."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import cli, venv_python

from comfy_env_attn import lockfile
from comfy_env_attn.core.lockmodel import tool_table

torch = pytest.importorskip("torch")
TORCH_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])

# taylor's head dim 256 cross-attention checks alone take minutes on a CPU
FAST = {"COMFY_ENV_ATTN_VERIFY_HEAD_DIMS": "64"}
SHAPES = ["--shapes", "1x2x128x64"]


@pytest.fixture(scope="module")
def taylor_lock(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A venv verified with --include taylor, then once more without it."""
    from conftest import make_venv

    venv = make_venv(tmp_path_factory.mktemp("taylor") / "venv", torch=True)
    py = str(venv_python(venv))
    first = cli("verify", "--python", py, "--include", "taylor", *SHAPES, "--json", env=FAST)
    assert first.returncode == 0, first.stdout + first.stderr
    again = cli("verify", "--python", py, *SHAPES, "--json", env=FAST)
    assert again.returncode == 0, again.stdout + again.stderr
    return venv / lockfile.LOCK_NAME, json.loads(first.stdout), json.loads(again.stdout)


def test_verify_include_taylor_proves_times_and_locks_it(taylor_lock) -> None:
    from test_workflow import check

    lock, first, again = taylor_lock
    for doc in (first, again):
        check(doc, "outcome")
        assert doc["command"] == "verify" and doc["ok"] is True
        rows = {b["backend"]: b for b in doc["backends"]}
        assert list(rows) == ["sdpa", "taylor"]
        assert rows["taylor"]["action"] == "included"  # the second time: kept from the lock
        assert rows["taylor"]["verification"]["passed"] is True
        assert {c["head_dim"] for c in rows["taylor"]["verification"]["checks"]} == {64}
    table = tool_table(lockfile.read(lock))
    taylor = table.backends["taylor"]
    assert taylor.verified and taylor.approximate and taylor.shipped
    assert taylor.proven("plain", 64, "bfloat16") and taylor.proven("scale", 64, "float32")
    assert [b.label() for b in taylor.bench] == ["1x2x128x64"] and taylor.bench[0].timed
    assert "taylor" in table.verified()  # its code is the adapters' digest's
    assert "taylor" not in table.auto and "taylor" not in table.exact


def test_the_dispatcher_uses_it_by_name_or_when_approximate(taylor_lock, monkeypatch) -> None:
    import torch.nn.functional as F

    from comfy_env_attn.runtime import dispatch

    lock, _, _ = taylor_lock
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    monkeypatch.setenv("COMFY_ENV_ATTN_SETTLE", "0")
    for var in ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM"):
        monkeypatch.delenv(var, raising=False)
    dispatch._reset_for_tests()
    try:
        g = torch.Generator().manual_seed(0)
        # 64 tokens: under taylor's min_tokens it answers with exact attention, which the
        # quality monitor accepts (at 128 random tokens its cosine is 0.72: demoted)
        q, k, v = (torch.randn(1, 2, 64, 64, generator=g) for _ in range(3))
        dispatch.set_backend("auto")
        _, over = dispatch.passed_over(q, k)
        assert "approximate" in dict(over)["taylor"][0]
        dispatch.set_backend("auto", approximate=True)
        order, over = dispatch.passed_over(q, k)
        assert "taylor" in order and "taylor" not in dict(over)
        label = dispatch.set_backend("taylor")
        assert label.startswith("Taylor attention (approximate)") and ", verified" in label
        out = dispatch.dispatch_attention(q, k, v)
        assert dispatch._ROUTES and next(iter(dispatch._ROUTES.values()))[0] == "taylor"
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=0.1,
                                   rtol=0.1)
    finally:
        dispatch._reset_for_tests()


def test_include_takes_only_what_verification_leaves_out() -> None:
    r = cli("verify", "--python", sys.executable, "--include", "sage")
    assert r.returncode == 2
    assert "--include sage: sage is verified whenever its package is installed" in r.stderr
    assert "taylor" in r.stderr
    r = cli("verify", "--python", sys.executable, "--include", "nope")
    assert r.returncode == 2 and "unknown backend 'nope'" in r.stderr
    r = cli("verify", "--python", sys.executable, env={
        "COMFY_ENV_ATTN_VERIFY_HEAD_DIMS": "65"})
    assert r.returncode == 2 and "COMFY_ENV_ATTN_VERIFY_HEAD_DIMS='65'" in r.stderr


def test_install_proves_a_locked_plugin_again_and_keeps_it(tmp_path: Path) -> None:
    """A later install rewrites the lock: the shipped plugin an earlier verify --include put
    there is proven again, not dropped (installer.locked_plugins, the rule verify uses)."""
    from conftest import make_venv, write_gpu_profile
    from wheels import SAGE_OK, build_wheel

    venv = make_venv(tmp_path / "venv", torch=True)
    py = str(venv_python(venv))
    r = cli("verify", "--python", py, "--include", "taylor", *SHAPES, env=FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    folder = tmp_path / "wheels"
    build_wheel(folder, "sageattention", f"2.2.0+cu128torch{TORCH_MINOR}",
                {"sageattention/__init__.py": SAGE_OK}, requires=["torch>=2.0"])
    r = cli("install", "--python", py, "--system", str(write_gpu_profile(tmp_path)),
            "--find-links", str(folder), "--no-embedded-index", "--backends", "sage",
            *SHAPES, "--json", env=FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {b["backend"]: b for b in json.loads(r.stdout)["backends"]}
    assert rows["taylor"]["action"] == "included"
    assert rows["taylor"]["verification"]["passed"] is True
    table = tool_table(lockfile.read(venv / lockfile.LOCK_NAME))
    assert table.backends["taylor"].verified and table.backends["sage"].verified
