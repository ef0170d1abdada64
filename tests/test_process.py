"""core.process: whether a pid runs, and stopping a process with all it started, on POSIX
for real and on Windows through stand-ins for kernel32 and taskkill."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from comfy_env_attn.core import process
from comfy_env_attn.core.process import alive_on_windows, own_group, pid_alive, stop_tree


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_pid_alive_on_this_system() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0) and not pid_alive(-1)


class _Kernel32:
    """kernel32's three calls as Windows answers them, for one process table: pid -> exit
    code (259 while running); `denied` are other users' processes."""

    def __init__(self, procs: dict[int, int], denied: set[int] = frozenset()) -> None:
        self.procs, self.denied, self.error, self.open = procs, denied, 0, 0

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
        assert access == 0x1000 and inherit is False
        if pid in self.denied:
            self.error = 5
            return 0
        if pid not in self.procs:
            self.error = 87  # ERROR_INVALID_PARAMETER: no such process
            return 0
        self.open += 1
        return 1000 + pid

    def GetExitCodeProcess(self, handle: int, code: object) -> int:
        ctypes.cast(code, ctypes.POINTER(ctypes.c_ulong)).contents.value = \
            self.procs[handle - 1000]
        return 1

    def CloseHandle(self, handle: int) -> int:
        self.open -= 1
        return 1


def test_pid_alive_on_windows_asks_the_kernel_not_a_signal() -> None:
    k = _Kernel32({10: 259, 11: 0}, denied={12})
    assert alive_on_windows(10, k, lambda: k.error)  # running
    assert not alive_on_windows(11, k, lambda: k.error)  # exited, its handle still held
    assert alive_on_windows(12, k, lambda: k.error)  # another user's
    assert not alive_on_windows(13, k, lambda: k.error)  # gone
    assert k.open == 0  # every handle closed



_TREE = """
import signal, subprocess, sys, time
if len(sys.argv) > 2:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(60)
"""


def _tree(tmp_path: Path, *, ignore_term: bool = False
          ) -> tuple[subprocess.Popen[bytes], int]:
    """A process that started a child of its own, in a group of its own (own_group); with
    ignore_term, both ignore SIGTERM (the child inherits it)."""
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", _TREE, str(pid_file),
                             *(["ignore"] if ignore_term else [])], **own_group())
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc, int(pid_file.read_text())


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        try:  # a zombie whose parent is gone waits for init to reap it
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return True


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here, also where the suite runs with SIGINT ignored
    (a background job of a shell without job control inherits it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
@pytest.mark.parametrize("grace", [0.0, 5.0])
def test_stop_tree_stops_the_process_and_what_it_started(tmp_path: Path, grace: float) -> None:
    proc, child = _tree(tmp_path)
    stop_tree(proc, grace=grace)
    assert proc.returncode == (-signal.SIGTERM if grace else -signal.SIGKILL)
    assert _gone(child), "the child outlived its parent"
    stop_tree(proc)  # again, the group gone: no error


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_a_second_interrupt_during_the_grace_ends_the_tree_at_once(tmp_path: Path, sigint_raises: None) -> None:
    """A build given 10 s to stop after SIGTERM, and Ctrl-C pressed again meanwhile: the
    group is killed now (no compiler left running), then the interruption goes on."""
    import threading

    proc, child = _tree(tmp_path, ignore_term=True)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stop_tree(proc, grace=10)
    assert time.monotonic() - start < 5
    assert proc.returncode == -signal.SIGKILL and _gone(child)


def test_stop_tree_on_windows_ends_the_tree_with_taskkill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows, stop_tree asks taskkill /T /F for the process id; the stand-in does here
    what taskkill does there (ends the tree)."""
    proc, child = _tree(tmp_path)
    asked: list[list[str]] = []

    def taskkill(cmd: list[str], **kw: Any) -> None:
        asked.append(cmd)
        os.killpg(int(cmd[-1]), signal.SIGKILL)

    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setenv("SYSTEMROOT", r"D:\\Win")
    stop_tree(proc, run=taskkill)
    monkeypatch.undo()
    assert asked == [[os.path.join(r"D:\\Win", "System32", "taskkill.exe"), "/T", "/F",
                      "/PID", str(proc.pid)]]
    assert proc.returncode is not None and _gone(child)
    asked.clear()
    monkeypatch.setattr(os, "name", "nt")
    stop_tree(proc, run=taskkill)  # already ended: taskkill is not asked again
    monkeypatch.undo()
    assert asked == []


def test_windows_popen_arguments_start_no_session() -> None:
    assert own_group() == {"start_new_session": True}
    assert process.os is os


def test_parallel_keeps_the_order_and_raises_the_first_failure_in_it() -> None:
    import threading

    from comfy_env_attn.core.process import parallel

    seen: set[str] = set()

    def slow_first(i: int) -> int:
        time.sleep(0.05 * (5 - i))  # the later items finish first
        seen.add(threading.current_thread().name)
        return i * 10

    assert parallel(slow_first, list(range(5)), 3) == [0, 10, 20, 30, 40]
    assert seen == {"parallel"}
    assert parallel(lambda i: threading.current_thread().name, ["one"], 4) == \
        [threading.current_thread().name]  # one item: no thread
    assert parallel(str, [], 4) == []

    def fail(i: int) -> int:
        if i in (1, 3):
            time.sleep(0.05 if i == 1 else 0)
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 1"):  # the first in order, not in time
        parallel(fail, list(range(5)), 5)


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_stop_trees_signals_every_group_before_waiting_and_a_second_interrupt_stops_them_all(
        tmp_path: Path, sigint_raises: None) -> None:
    """Three trees that ignore SIGTERM, a 10 s grace, and Ctrl-C again after 0.5 s: all three
    are killed with their children, none left to the first one's wait."""
    import threading

    from comfy_env_attn.core.process import stop_trees

    for i in range(3):
        (tmp_path / str(i)).mkdir()
    trees = [_tree(tmp_path / str(i), ignore_term=True) for i in range(3)]
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stop_trees([proc for proc, _ in trees], grace=10)
    assert time.monotonic() - start < 5
    for proc, child in trees:
        assert proc.returncode == -signal.SIGKILL and _gone(child)


@pytest.mark.skipif(os.name == "nt", reason="SIGINT sent to this process")
def test_parallel_interrupted_takes_no_further_item(sigint_raises: None) -> None:
    import threading

    from comfy_env_attn.core.process import parallel

    started: list[int] = []

    def slow(i: int) -> int:
        started.append(i)
        time.sleep(0.3)
        return i

    threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        parallel(slow, list(range(20)), 2)
    time.sleep(1.0)  # what a worker had begun ends; no other begins
    assert len(started) <= 6, started


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_a_second_interrupt_while_reaping_leaves_the_process(tmp_path: Path, sigint_raises: None) -> None:
    """A process that is never reaped (stuck in a driver): the first interrupt waits on, a
    second one gives up on it, where every Ctrl-C was swallowed."""
    import threading

    from comfy_env_attn.core.process import stop_trees

    proc, child = _tree(tmp_path)
    real_wait = proc.wait

    def stuck(timeout: float | None = None) -> int:
        if timeout is None:
            while True:
                time.sleep(0.05)
        return real_wait(timeout)

    proc.wait = stuck  # type: ignore[method-assign]
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stop_trees([proc])
    assert 0.6 < time.monotonic() - t0 < 5
    assert real_wait(timeout=10) == -signal.SIGKILL and _gone(child)
