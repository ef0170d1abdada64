"""Verification's fallbacks, with the real script in a real interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from comfy_env_attn.verify.run import Options, verify

pytest.importorskip("torch")


def test_backends_are_timed_alone_when_the_joint_timing_process_fails(tmp_path: Path) -> None:
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/sh
case "$2" in *'"backends"'*) echo 'Segmentation fault' >&2; exit 139;; esac
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    logs: list[str] = []
    res = verify(str(wrapper), [], Options(shapes=[[1, 2, 64, 32]]), progress=logs.append)
    assert res["sdpa"].passed
    (b,) = res["sdpa"].bench
    assert b["shape"] == [1, 2, 64, 32] and b["tflops"] > 0
    assert any("timing sdpa alone" in line for line in logs)


def test_a_python_that_cannot_start_fails_each_backend_with_the_reason(tmp_path: Path) -> None:
    res = verify(str(tmp_path / "no-python"), ["sage"], Options(shapes=[[1, 2, 64, 32]]))
    assert not res["sdpa"].passed and not res["sage"].passed
    assert "cannot run" in (res["sage"].error or "")
