"""Progress and log lines: stderr, one line each, flushed (results go to stdout)."""

from __future__ import annotations

import sys

QUIET = False  # --quiet: no progress lines (errors still reach stderr through the CLI)


def log(msg: str) -> None:
    if not QUIET:
        print(msg, file=sys.stderr, flush=True)


def notice(msg: str) -> None:
    """A line that --quiet does not silence: the environment changed beyond what the command
    was asked to do (an interrupted install found, and finished or undone)."""
    print(msg, file=sys.stderr, flush=True)
