"""Whether a process still runs: what a killed run left behind (a download's .part file, a
build folder) carries its pid, and is removed only once that process is gone. Standard
library only."""

from __future__ import annotations

import os
from collections.abc import Callable
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
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows; the decision is tested through a fake
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        kernel32.OpenProcess.restype = ctypes.c_void_p
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
