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


# How the command line named its target where not by --python (name_target).
_NAMED: list[tuple[str, tuple[str, ...]]] = []


def name_target(python: str, words: tuple[str, ...]) -> None:
    """The command line named the target interpreter `python` with these words
    (`--comfyui DIR`, `--comfy-cli`): each step given about it names it so, and a pasted
    step reaches the same ComfyUI by the words the user typed."""
    _NAMED[:] = [(python, words)]


def tool_command(*args: str, python: str | None = None) -> str:
    """The command line that runs this tool with these arguments, as the next steps messages
    give write it, ready to paste: where this process is the `comfy-env-attn` console script,
    that name where it is the one on PATH, else its path (`.venv/bin/comfy-env-attn` run
    from a venv that is not activated); else the running Python with `-m comfy_env_attn`,
    which has the tool (`python -m`, as the README has ComfyUI's Python run it, and
    ComfyUI's own process, whose dispatcher warns): the console script may not be on PATH
    there (a venv not activated, python_embeded). `python`: the target, named with --python
    unless it is the Python that runs the tool, or as the command line named it
    (name_target). Each word quoted where a shell would split it."""
    argv0 = sys.argv[0] if sys.argv else ""
    script = argv0.replace("\\", "/").rsplit("/", 1)[-1]
    words = [*args]
    exe = sys.executable or "python"
    if os.path.splitext(script)[0].lower() in ("comfy-env-attn", "comfy-env-attn-script"):
        head = ["comfy-env-attn" if _on_path(argv0) else os.path.abspath(argv0)]
    else:
        head = [exe, "-m", "comfy_env_attn"]
    named = next((w for p, w in _NAMED if python and same_interpreter(python, p)), None)
    if named:
        words += named
    elif python and not same_interpreter(python, exe):
        words += ["--python", python]
    return " ".join(_quoted(w) for w in [*head, *words])


def _on_path(script: str) -> bool:
    """Whether `comfy-env-attn` typed alone runs this console script (run by its path, from
    a venv that is not activated, it may not: then the hint gives that path)."""
    import shutil

    found = shutil.which("comfy-env-attn")
    try:
        return found is not None and os.path.samefile(found, script)
    except OSError:
        return False


def _quoted(word: str) -> str:
    """A word as a POSIX shell, cmd.exe and PowerShell all read it back: in double quotes
    where it holds a space or a character they treat specially."""
    if word and not any(c in word for c in " \t\"'&|;<>()$`!*?[]{}#~%^"):
        return word
    return '"' + word.replace('"', '\\"') + '"'


def same_interpreter(a: str, b: str) -> bool:
    """Whether two paths start the same interpreter in the same environment: the same file,
    or two names in one folder for one binary (a venv's python and python3, links to the
    base interpreter: Python finds its environment from the folder it was started from)."""
    a, b = os.path.abspath(a), os.path.abspath(b)
    if os.path.normcase(a) == os.path.normcase(b):
        return True
    return os.path.normcase(os.path.dirname(a)) == os.path.normcase(os.path.dirname(b)) and \
        os.path.realpath(a) == os.path.realpath(b)


