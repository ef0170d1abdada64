"""Progress where work is long: a rich bar per download (bytes, rate, time left) and uv's own
progress on a terminal; one summary line each when stderr is a log or a pipe; nothing with
--quiet. Always on stderr: stdout carries the results."""

from __future__ import annotations

import sys

from comfy_env_attn.core import progress as core_progress
from comfy_env_attn.core.progress import log

TYPE_CHECKING = False  # typing loads after what starts first (cli._start_probe)
if TYPE_CHECKING:
    from typing import Any


def set_quiet(quiet: bool) -> None:
    core_progress.QUIET = quiet


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def uv_passthrough() -> bool:
    """uv's own progress bars go to a terminal; in logs, pipes and --quiet they would be
    noise (and uv draws none there)."""
    return stderr_is_terminal() and not core_progress.QUIET


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class DownloadProgress:
    """install.edges.DownloadMeter: a bar per download on a terminal, a line at the start
    and a summary line at the end otherwise."""

    def __init__(self, *, terminal: bool | None = None) -> None:
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self._bar: Any = None
        self._task: Any = None
        self._name = ""
        self._last = 0.0

    def start(self, name: str, total: int | None) -> None:
        self._name = name
        if core_progress.QUIET:
            return
        if not self.terminal:
            log(f"downloading {name}" + (f" ({_mb(total)})" if total else ""))
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                             console=Console(stderr=True), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(_short(name), total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def finish(self, got: int, seconds: float, ok: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if core_progress.QUIET or self.terminal or not ok:
            return
        rate = got / seconds if seconds > 0 else 0.0
        log(f"downloaded {self._name}: {_mb(got)} in {seconds:.1f} s ({_mb(rate)}/s)")


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[:width - 25] + "..." + name[-22:]
