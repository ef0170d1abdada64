"""How results look: rich tables on a terminal, wide unwrapped text in logs and pipes, JSON
where a machine reads them."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def console() -> Any:
    """rich's console; in logs and pipes wide (COLUMNS where it is set) and unwrapped, so
    nothing is cut or folded."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) >= 40 else 250,
                   soft_wrap=True)


def dump_json(data: Any, *, compact: bool = False) -> None:
    """compact for large documents (a plan lists thousands of rejected wheels): the C encoder
    only runs without indent."""
    sys.stdout.write(json.dumps(data, indent=None if compact else 2) + "\n")
