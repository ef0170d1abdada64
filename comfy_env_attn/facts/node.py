"""The Attention Backend node in a ComfyUI folder: the loader file ComfyUI imports from
custom_nodes/, where copies of it are, and what doctor says about them.

One loader serves both ways the node arrives: the repository's root `__init__.py` (a git
clone, the Comfy Registry, ComfyUI-Manager) and the file `comfy-env-attn node install`
places in custom_nodes/comfy_env_attn/. Only its first line differs.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.locate import is_comfyui_dir

NODE_DIR = "comfy_env_attn"  # the folder `node install` places in custom_nodes/
MARK = "# comfy-env-attn node loader"
REPO_HEADER = "# comfy-env-attn as a ComfyUI custom node (a copy of its repository).\n"
_PLACED = re.compile(r"^# placed by comfy-env-attn (?P<version>\S+) ", re.M)
_VERSION = re.compile(r'^__version__ = "(?P<version>[^"]+)"', re.M)

LOADER_BODY = f'''{MARK}: ComfyUI imports this file from custom_nodes/. The node
# comes from comfy-env-attn installed in ComfyUI's Python; in a copy of the repository (git
# clone, Comfy Registry) the package beside this file serves when none is installed. Without
# either, no node is loaded and one line says how to install it: never an import error.
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

NODE_CLASS_MAPPINGS: dict[str, Any] = {{}}
# comfy-env-attn is not on PyPI yet: the name alone finds nothing there
_PYPI = " (not on PyPI yet: until it is, give pip a clone of its repository in its place)"
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {{}}


def _installed() -> bool:
    # an empty folder an uninstall left behind imports as a namespace package: not an install
    spec = importlib.util.find_spec("{NODE_DIR}")
    return spec is not None and spec.origin is not None


def _load() -> None:
    here = Path(__file__).resolve().parent
    if not _installed() and (here / "{NODE_DIR}" / "runtime" / "comfyui.py").is_file():
        sys.path.append(str(here))
    if not _installed():
        print("comfy-env-attn: the Attention Backend node is not loaded: comfy-env-attn is not "
              "installed in this Python. Install it (torch is left alone): "
              f'"{{sys.executable}}" -m pip install comfy-env-attn{{_PYPI}}', file=sys.stderr)
        return
    from {NODE_DIR}.runtime import comfyui

    NODE_CLASS_MAPPINGS.update(comfyui.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(comfyui.NODE_DISPLAY_NAME_MAPPINGS)


try:
    _load()
except Exception as e:  # a broken or old install: say so; ComfyUI's start goes on
    print(f"comfy-env-attn: the Attention Backend node is not loaded ({{type(e).__name__}}: "
          f"{{e}}). Reinstall it (torch is left alone): "
          f'"{{sys.executable}}" -m pip install --upgrade comfy-env-attn{{_PYPI}}',
          file=sys.stderr)
'''


def _this_tool(version: str) -> str:
    """What pip installs to get the code running here: its folder where it runs from one
    (a clone, an editable install; not on PyPI yet), else the release of its version."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / NODE_DIR / "__init__.py").is_file():
        return f'"{root}"'
    return f"comfy-env-attn=={version}"


def loader_text(version: str | None) -> str:
    """The loader: stamped with the version that placed it, or (None) the repository's."""
    if version is None:
        return REPO_HEADER + LOADER_BODY
    return (f"# placed by comfy-env-attn {version} (comfy-env-attn node install); "
            "`comfy-env-attn node remove` takes it away.\n" + LOADER_BODY)


def comfyui_root(path: Path) -> Path | None:
    """The ComfyUI folder `path` names: itself, or ComfyUI/ inside it (Windows portable's
    ComfyUI_windows_portable)."""
    return next((p for p in (path, path / "ComfyUI") if is_comfyui_dir(p)), None)


def node_file(comfyui: PurePath) -> PurePath:
    """Where `node install` places the loader (PurePath: the same rule for Windows paths)."""
    return comfyui / "custom_nodes" / NODE_DIR / "__init__.py"


@dataclass(frozen=True)
class NodeCopy:
    """A folder in custom_nodes/ whose __init__.py is this project's loader."""

    folder: Path
    placed: str | None  # the version whose `node install` placed it; None: the repository
    package: str | None  # the version of the comfy_env_attn package beside it, if any


def placed_version(text: str) -> str | None:
    m = _PLACED.search(text)
    return m["version"] if m else None


def find_nodes(comfyui: Path) -> list[NodeCopy]:
    """Every copy of the loader ComfyUI would import from custom_nodes/ (folders ending in
    .disabled are skipped, as ComfyUI and ComfyUI-Manager skip them)."""
    custom = comfyui / "custom_nodes"
    out: list[NodeCopy] = []
    try:
        entries = sorted(custom.iterdir())
    except OSError:
        return out
    for entry in entries:
        if entry.name.endswith(".disabled") or entry.name == "__pycache__":
            continue
        try:
            text = (entry / "__init__.py").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if MARK not in text:
            continue
        package = None
        try:
            m = _VERSION.search((entry / NODE_DIR / "__init__.py").read_text(encoding="utf-8"))
            package = m["version"] if m else None
        except (OSError, UnicodeDecodeError):
            pass
        out.append(NodeCopy(entry, placed_version(text), package))
    return out


def node_finding(comfyui: Path, nodes: list[NodeCopy], *, tool: str, installed: str | None,
                 python: str) -> tuple[str, str, str | None]:
    """(severity, message, next step) for doctor: whether the node is in this ComfyUI and
    whether the code it runs is this tool's version. The loader imports comfy-env-attn
    installed in ComfyUI's Python (`installed`), else the package of a repository copy; the
    lock this tool writes covers this tool's code, so the versions must be one."""
    install = tool_command("node", "install", "--comfyui", str(comfyui))
    pip = f'"{python}" -m pip install {_this_tool(tool)}'
    if not nodes:
        return ("info", f"the Attention Backend node is not in {comfyui / 'custom_nodes'}",
                f"Run: {install} (or start ComfyUI with the flag `"
                f"{tool_command('launch-args', '--comfyui', str(comfyui))}` prints)")
    problems: list[str] = []
    notes: list[str] = []
    for n in nodes:
        runs = installed or (n.package if n.placed is None else None)
        if runs is None:
            problems.append(f"{n.folder} loads no node: comfy-env-attn is not installed in "
                            "ComfyUI's Python")
        elif runs != tool:
            problems.append(f"{n.folder} runs comfy-env-attn {runs}, this tool is {tool}")
        if n.placed is not None and n.placed != tool:
            notes.append(f"{n.folder} was placed by comfy-env-attn {n.placed}")
    if len(nodes) > 1:
        notes.append("ComfyUI loads the node from each of " + ", ".join(str(n.folder)
                                                                      for n in nodes))
    if problems:
        return ("problem", "; ".join(problems + notes) + ": the lock this tool writes is "
                "checked against the node's code, so both must be one version",
                f"Run: {pip}" + (f", then {install}" if notes else ""))
    where = ", ".join(f"{n.folder} ({'placed' if n.placed else 'a copy of the repository'})"
                      for n in nodes)
    if notes:
        return ("info", f"the Attention Backend node is in {where}; " + "; ".join(notes),
                f"Run: {install}" if any(n.placed for n in nodes) else None)
    return ("ok", f"the Attention Backend node is in {where} and runs comfy-env-attn "
            f"{tool}, this tool's version", None)
