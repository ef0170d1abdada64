"""Progress and log lines: stderr, one line each, flushed (results go to stdout)."""

from __future__ import annotations

import os
import sys

QUIET = False  # --quiet: no progress lines (errors still reach stderr through the CLI)


def log(msg: str) -> None:
    if not QUIET:
        print(msg, file=sys.stderr, flush=True)


def notice(msg: str) -> None:
    """A line that --quiet does not silence: the environment changed beyond what the command
    was asked to do (an interrupted install found, and finished or undone)."""
    print(msg, file=sys.stderr, flush=True)


def tool_command() -> str:
    """The command that runs this tool, as the next steps messages give write it: where this
    process is the `comfy-env-attn` console script, that name (it ran for whoever typed it);
    else the running Python with `-m comfy_env_attn`, which has the tool (`python -m`, as the
    README has ComfyUI's Python run it, and ComfyUI's own process, whose dispatcher warns):
    the console script may not be on PATH there (a venv not activated, python_embeded)."""
    script = (sys.argv[0] if sys.argv else "").replace("\\", "/").rsplit("/", 1)[-1]
    if os.path.splitext(script)[0].lower() in ("comfy-env-attn", "comfy-env-attn-script"):
        return "comfy-env-attn"
    exe = sys.executable or "python"
    return (f'"{exe}"' if any(c in exe for c in " &()'") else exe) + " -m comfy_env_attn"
