"""Processes this tool starts and stops, and whether one still runs: what a killed run left
behind (a download's .part file, a build folder) carries its pid, and is removed only once
that process is gone. Standard library only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

TYPE_CHECKING = False  # typing loads after what starts first (cli._start_probe)
if TYPE_CHECKING:
    from typing import Any

# Windows: OpenProcess's right to ask for an exit code, GetExitCodeProcess's answer for a
# process that has not exited, and the error for another user's process
_QUERY_LIMITED_INFORMATION = 0x1000
_STILL_ACTIVE = 259
_ERROR_ACCESS_DENIED = 5


def pid_alive(pid: int) -> bool:
    """Whether the process `pid` runs; another user's counts as running. Not `os.kill(pid,
    0)` on Windows: signal 0 is CTRL_C_EVENT there, which goes to every process of the
    console instead of asking about one."""
    if not 0 < pid < 2**31:  # no pid (a name's digits may say anything)
        return False
    if os.name == "nt":  # pragma: no cover - Windows; the decision is tested through a fake
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        kernel32.OpenProcess.restype = ctypes.c_void_p
        kernel32.OpenProcess.argtypes = (ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32)
        kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
        return alive_on_windows(pid, kernel32, ctypes.get_last_error)  # type: ignore[attr-defined]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def alive_on_windows(pid: int, kernel32: Any, last_error: Callable[[], int]) -> bool:
    """Windows' answer, from kernel32's OpenProcess and GetExitCodeProcess: no handle is a
    process that is gone, unless access was denied (it runs, as another user); a handle
    whose exit code is STILL_ACTIVE is a process that runs."""
    import ctypes

    handle = kernel32.OpenProcess(_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return bool(last_error() == _ERROR_ACCESS_DENIED)
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # it cannot be told: keep what it may still use
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


# -- process trees ---------------------------------------------------------------------------

def own_group() -> dict[str, Any]:
    """Popen's arguments for a process that stop_tree can stop with all it starts: a
    session of its own on POSIX; on Windows nothing (taskkill /T follows the parent links)."""
    return {} if os.name == "nt" else {"start_new_session": True}


def _taskkill(pid: int) -> Sequence[str]:
    root = os.environ.get("SYSTEMROOT") or os.environ.get("WINDIR") or r"C:\Windows"
    return [os.path.join(root, "System32", "taskkill.exe"), "/T", "/F", "/PID", str(pid)]


def stop_tree(proc: subprocess.Popen[Any], *, grace: float = 0.0,
              run: Callable[..., Any] = subprocess.run) -> None:
    """Stop a process started with own_group() and every process it started (uv runs the
    interpreter it queries; a build runs ninja and the compilers), then reap it: stop_trees
    with one."""
    stop_trees([proc], grace=grace, run=run)


def stop_trees(procs: Sequence[subprocess.Popen[Any]], *, grace: float = 0.0,
               run: Callable[..., Any] = subprocess.run) -> None:
    """Stop processes started with own_group(), each with every process it started, then
    reap them. POSIX: SIGTERM to every group, SIGKILL after `grace` s (at once without one),
    each group signalled before any is waited for, so that one slow to die holds no other
    running. Windows: taskkill /T /F, which ends the whole tree (proc.kill() would end the
    parent alone, leaving its children running and their files locked). `run` runs taskkill
    (a test's stand-in). An interrupt (Ctrl-C, SIGTERM) meanwhile cuts the grace short and
    keeps no process from being signalled; it is raised once all are reaped, or at once if
    another comes while they are (a process stuck in a driver may never be reaped)."""
    again: BaseException | None = None

    def signal_all(send: Callable[[subprocess.Popen[Any]], None]) -> None:
        nonlocal again
        for proc in procs:
            while True:
                try:
                    send(proc)
                    break
                except KeyboardInterrupt as e:  # the signal still goes out, then this one
                    again = again or e

    if os.name == "nt":
        def taskkill(proc: subprocess.Popen[Any]) -> None:
            if proc.poll() is None:
                try:
                    run(_taskkill(proc.pid), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=30, check=False)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                if proc.poll() is None:
                    proc.kill()

        signal_all(taskkill)
    else:
        if grace:
            signal_all(lambda proc: _signal_group(proc, signal.SIGTERM))
            deadline = time.monotonic() + grace
            try:
                for proc in procs:
                    if again is not None:
                        break
                    try:
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
            except KeyboardInterrupt as e:  # a second Ctrl-C or SIGTERM: stop them now
                again = again or e
        # what the SIGTERM left of each group, if any
        signal_all(lambda proc: _signal_group(proc, signal.SIGKILL))
    for proc in procs:
        while True:
            try:
                proc.wait()
                break
            except KeyboardInterrupt as e:
                if again is not None:
                    raise e from None  # interrupted again while reaping: leave them
                again = e
    if again is not None:
        raise again


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except OSError:  # the group is gone: no process of it is left
        if proc.poll() is None:
            proc.kill()


# -- threads ---------------------------------------------------------------------------------

def parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """fn over items, in up to `workers` threads; the results in the items' order, or the
    first failure in that order raised. One item runs here, without a thread.

    The threads are daemons, and the waiting is done in short steps, so that an interrupt
    (Ctrl-C; SIGTERM and SIGHUP, which the command line turns into one) ends the command
    at once. concurrent.futures' threads are joined at exit: a read from a server that
    trickles a byte every few seconds held an interrupted `plan` for 30 s, until its rate
    floor failed it. Interrupted, the workers take no further item, and what each is doing
    is abandoned at exit, so this is only for reads from servers (a cache file they write
    goes through core.paths.replace_file: a temporary file at worst, never half a file)."""
    import threading

    if len(items) <= 1:
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    failures: dict[int, BaseException] = {}
    todo = list(range(len(items)))
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # handed to the waiting thread
                failures[i] = e
            finally:
                finished.release()

    for _ in range(min(workers, len(items))):
        threading.Thread(target=work, name="parallel", daemon=True).start()
    try:
        for _ in items:
            while not finished.acquire(timeout=0.2):  # steps: Windows wakes for Ctrl-C only so
                pass
    except BaseException:  # interrupted: the workers take no further item
        with lock:
            todo.clear()
        raise
    if failures:
        raise failures[min(failures)]
    return results
