"""`comfy-env-attn node install | remove --comfyui DIR`: the Attention Backend node in a
ComfyUI's custom_nodes/.

install writes one file, custom_nodes/comfy_env_attn/__init__.py, a copy (never a link) of
the loader that imports the node from comfy-env-attn installed in ComfyUI's Python. remove
takes away that file and the folder if nothing else is in it; it never deletes a folder
it did not place.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from comfy_env_attn import __version__
from comfy_env_attn.cli.output import console
from comfy_env_attn.core.errors import AttnError, UsageError
from comfy_env_attn.core.paths import replace_file
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.facts.locate import comfy_cli_workspace, folder_problem
from comfy_env_attn.facts.node import (
    comfyui_root,
    find_nodes,
    loader_text,
    node_file,
    placed_version,
)


def comfyui_folder(args: argparse.Namespace) -> Path:
    """The ComfyUI folder of --comfyui DIR (or its ComfyUI/) or of comfy-cli's workspace."""
    if args.comfyui:
        given, label = Path(args.comfyui), f"--comfyui {args.comfyui}"
    elif args.comfy_cli:
        given = comfy_cli_workspace()
        label = f"comfy-cli's workspace {given}"
    else:
        raise UsageError("comfy-env-attn node: name the ComfyUI folder with --comfyui DIR "
                         "(or --comfy-cli)")
    problem = folder_problem(given)
    if problem:  # a path that cannot be used is a failure (1), as for every command
        raise AttnError(f"{label}: {problem}")
    root = comfyui_root(Path(os.path.abspath(given)))  # absolute, links kept
    if root is None:
        raise AttnError(f"{given} is not a ComfyUI folder (no main.py and comfy/ in it or "
                        "in its ComfyUI/)")
    return root


def _placed_text(file: Path) -> str | None:
    """The loader text at file if `node install` placed it; None if there is no file.
    AttnError for anything else there: it is someone else's, and stays."""
    if file.parent.is_symlink() or file.is_symlink():
        raise AttnError(f"{file.parent} is a link; remove it yourself, then run this again")
    if not file.exists():
        if file.parent.exists() and any(file.parent.iterdir()):
            raise AttnError(f"{file.parent} exists and holds another node's files; it stays")
        return None
    text = file.read_text(encoding="utf-8", errors="replace")
    if placed_version(text) is None:
        raise AttnError(f"{file} was not placed by comfy-env-attn node install; it stays")
    return text


def install_node(comfyui: Path, version: str = __version__) -> str:
    """Place the loader; idempotent. Returns what happened, as a sentence."""
    file = Path(node_file(comfyui))
    text = loader_text(version)
    old = _placed_text(file)
    if old == text:
        return f"the node is already in {file.parent} (comfy-env-attn {version})"
    file.parent.mkdir(parents=True, exist_ok=True)
    replace_file(file, text, newline="\n")
    shutil.rmtree(file.parent / "__pycache__", ignore_errors=True)  # the old loader's bytecode
    verb = "updated" if old is not None else "placed"
    return f"{verb} the node in {file.parent} (comfy-env-attn {version})"


def remove_node(comfyui: Path) -> str:
    file = Path(node_file(comfyui))
    if _placed_text(file) is None:
        return f"the node is not in {file.parent}; nothing removed"
    file.unlink()
    shutil.rmtree(file.parent / "__pycache__", ignore_errors=True)
    try:
        file.parent.rmdir()
    except OSError:  # files of someone else's beside it: they stay
        return f"removed {file}; {file.parent} holds other files and stays"
    return f"removed the node from {file.parent}"


def cmd_node(args: argparse.Namespace) -> int:
    comfyui = comfyui_folder(args)
    con = console()
    if args.node_command == "remove":
        con.print(remove_node(comfyui), highlight=False)
        others = find_nodes(comfyui)
        for n in others:
            con.print(f"note: ComfyUI still loads the node from {n.folder} (a copy of the "
                      "repository; delete that folder to remove it)", highlight=False)
        return 0
    clones = [n for n in find_nodes(comfyui) if n.placed is None]
    if clones:
        con.print(f"the node is already in {clones[0].folder} (a copy of the repository); "
                  "nothing placed", highlight=False)
        return 0
    con.print(install_node(comfyui), highlight=False)
    con.print("Restart ComfyUI; the node is Attention Backend (comfy-env-attn), under "
              "advanced/attention. It imports comfy-env-attn from ComfyUI's Python: "
              f"`{tool_command('doctor', '--comfyui', str(comfyui))}` checks that.",
              highlight=False)
    return 0

