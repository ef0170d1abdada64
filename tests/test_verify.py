"""Verification's fallbacks, with the real script in a real interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from comfy_env_attn.core.process import pid_alive
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


def test_masks_are_proven_at_a_length_no_multiple_of_8(tmp_path: Path) -> None:
    """Text is 77 tokens, and a bias of such a length must be padded to 8 in memory for
    xformers (the adapter does): the mask checks use such a length, so that a padding gone
    wrong fails verification, not a user's run. Proven against a stand-in as strict as the
    real kernels about that alignment."""
    from wheels import installed_xformers

    from comfy_env_attn.verify._target import inputs

    for device in ("cpu", "cuda"):
        for variant in ("mask_bool", "mask_additive"):
            x = inputs(variant, 64, device, 0)
            assert x["k"].shape[-2] % 8 and x["mask"].shape[-1] == x["k"].shape[-2]
    site = installed_xformers(tmp_path / "site")
    r = verify(sys.executable, ["xformers"], Options(
        shapes=[[1, 2, 128, 64]], head_dims=(64,), device="cpu",
        env={"PYTHONPATH": str(site)}))["xformers"]
    checks = {(c["variant"], c["dtype"]): c["passed"] for c in r.data["checks"]}
    assert checks[("mask_bool", "bfloat16")] and checks[("mask_additive", "float32")], checks
    assert r.passed


def test_a_python_that_cannot_start_fails_each_backend_with_the_reason(tmp_path: Path) -> None:
    res = verify(str(tmp_path / "no-python"), ["sage"], Options(shapes=[[1, 2, 64, 32]]))
    assert not res["sdpa"].passed and not res["sage"].passed
    assert "cannot run" in (res["sage"].error or "")


_INTERRUPTED = """
import signal, sys
from comfy_env_attn.verify.run import Options, verify
def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, interrupt)  # as the command line does
print("started", flush=True)
try:
    verify(sys.argv[1], ["sage", "flash"], Options(shapes=[[1, 2, 64, 32]], parallel=3))
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def _sigterm_while_verifying(tmp_path: Path, body: str, pids: Path, least: int
                             ) -> tuple[str, float]:
    """verify() in a process of its own, a shell script standing in for the target's Python
    (`body`, which appends pids to `pids`), sent SIGTERM once `least` pids are written: what
    it printed, and how long it took to end after the signal."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(fake)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    deadline = time.monotonic() + 30
    while (not pids.exists() or len(pids.read_text().split()) < least) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids.read_text().split()) >= least
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out, time.monotonic() - t0


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for Python")
def test_an_interrupted_verification_stops_its_processes_and_ends_at_once(
        tmp_path: Path) -> None:
    """SIGTERM while verification processes run (a stand-in Python that sleeps, and starts a
    process of its own, as Triton's compilers do): the command ends at once, and leaves none
    of them running, where it waited for each to end by itself."""
    pids = tmp_path / "pids"
    # three stand-ins at least, each with a sleep of its own
    out, took = _sigterm_while_verifying(
        tmp_path, f"sleep 300 &\necho $$ $! >> {pids}\nwait\n", pids, 6)
    started = [int(p) for p in pids.read_text().split()]
    assert out == "interrupted\n" and took < 10
    deadline = time.monotonic() + 10  # killed at once; reaped by init when it comes to them
    while [p for p in started if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in started if pid_alive(p)] == []


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for Python")
def test_a_timed_out_verification_is_not_held_by_a_process_it_left_behind(
        tmp_path: Path) -> None:
    """A verification process that times out, having started one that left its group (a
    compile server) and holds its output open: the run still ends soon after its limit."""
    from comfy_env_attn.verify.run import DRAIN_S, _run

    fake = tmp_path / "python"
    left = tmp_path / "left.pid"
    fake.write_text(f"#!/bin/sh\nsetsid sleep 30 &\necho $! > {left}\nsleep 30\n")
    fake.chmod(0o755)
    t0 = time.monotonic()
    r = _run(str(fake), {"backend": "sdpa"}, Options(timeout=1))
    assert r == "no answer within 1 s (killed)"
    assert time.monotonic() - t0 < 1 + DRAIN_S + 3
    os.kill(int(left.read_text()), signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for Python")
def test_an_interrupted_verification_is_not_held_by_a_process_that_left_its_group(
        tmp_path: Path) -> None:
    """SIGTERM while the stand-ins run, each having started a process of its own session
    that holds their output open (a compile server): the command still ends within the
    stop's grace and the drain, not at the verification's time limit."""
    left = tmp_path / "left"
    try:
        out, took = _sigterm_while_verifying(
            tmp_path, f"setsid sleep 300 &\necho $! >> {left}\nexec sleep 300\n", left, 3)
        assert out == "interrupted\n" and took < 10
    finally:
        for pid in left.read_text().split() if left.exists() else []:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
