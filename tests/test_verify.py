"""Verification's fallbacks, with the real script in a real interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from comfy_env_attn.verify.run import Options, verify

pytest.importorskip("torch")


def test_backends_are_timed_alone_when_the_joint_timing_process_fails(tmp_path: Path) -> None:
    from test_dispatch import fake_sage

    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/sh
case "$2" in *'"bench"'*)
  if [ ! -e {tmp_path}/crashed ]; then touch {tmp_path}/crashed; echo 'Segmentation fault' >&2; exit 139; fi;;
esac
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    logs: list[str] = []
    env = {"PYTHONPATH": str(fake_sage(tmp_path / "fakes"))}
    res = verify(str(wrapper), ["sage"], Options(shapes=[[1, 2, 64, 64]], head_dims=(64,),
                                                 env=env), progress=logs.append)
    assert res["sdpa"].passed and res["sage"].passed
    for name in ("sdpa", "sage"):
        (b,) = res[name].bench
        assert b["shape"] == [1, 2, 64, 64] and b["tflops"] > 0
    assert any("timing each alone" in line for line in logs)


def test_a_python_that_cannot_start_fails_each_backend_with_the_reason(tmp_path: Path) -> None:
    res = verify(str(tmp_path / "no-python"), ["sage"], Options(shapes=[[1, 2, 64, 32]]))
    assert not res["sdpa"].passed and not res["sage"].passed
    assert "cannot run" in (res["sage"].error or "")
