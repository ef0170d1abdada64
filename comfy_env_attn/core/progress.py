"""Progress and log lines: stderr, one line each, flushed (results go to stdout)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
