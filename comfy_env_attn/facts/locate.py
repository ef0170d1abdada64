"""Find ComfyUI's Python: --python, --comfyui DIR, the environment, comfy-cli's workspace.

Platform decisions take `os_name` ("linux", "windows", "macos") so tests can drive the
Windows layout on Linux.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from comfy_env_attn.core.errors import ProbeError


def current_os() -> str:
    if sys.platform.startswith("win"):
        return "windows"
    return "macos" if sys.platform == "darwin" else "linux"


def env_python(prefix: Path, os_name: str) -> list[Path]:
    """Where a venv or conda prefix keeps its interpreter."""
    if os_name == "windows":
        return [prefix / "Scripts" / "python.exe", prefix / "python.exe"]
    return [prefix / "bin" / "python3", prefix / "bin" / "python"]


def comfy_cli_config(os_name: str, home: Path, env: Mapping[str, str]) -> Path:
    if os_name == "windows":
        base = Path(env.get("LOCALAPPDATA", str(home / "AppData" / "Local")))
        return base / "comfy-cli" / "config.ini"
    if os_name == "macos":
        return home / "Library" / "Application Support" / "comfy-cli" / "config.ini"
    return Path(env.get("XDG_CONFIG_HOME", str(home / ".config"))) / "comfy-cli" / "config.ini"


def is_comfyui_dir(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_candidates(root: Path, os_name: str) -> list[Path]:
    """Interpreters that may run the ComfyUI in root (or the portable folder around it)."""
    out: list[Path] = []
    # Windows portable: ComfyUI_windows_portable/{python_embeded,ComfyUI}
    for base in (root, root.parent):
        out.append(base / "python_embeded" / "python.exe")
        if os_name != "windows":
            out.append(base / "python_embeded" / "python")
    for venv in (".venv", "venv"):
        out += env_python(root / venv, os_name)
        if (root / "ComfyUI").is_dir():
            out += env_python(root / "ComfyUI" / venv, os_name)
    return out


def find_python(*, python: str | None = None, comfyui: str | None = None,
                os_name: str | None = None, env: Mapping[str, str] | None = None,
                home: Path | None = None) -> tuple[str, list[str]]:
    """(interpreter path, how it was found). ProbeError listing every place tried."""
    os_name = os_name or current_os()
    env = os.environ if env is None else env
    home = home or Path.home()
    if python:
        p = Path(python)
        if p.is_dir():  # a venv folder given as --python
            for c in env_python(p, os_name):
                if c.is_file():
                    return str(c), [f"--python {python}"]
            raise ProbeError(f"--python {python} is a folder with no interpreter; tried: "
                             + ", ".join(str(c) for c in env_python(p, os_name)))
        if not p.exists():
            raise ProbeError(f"--python {python}: no such file")
        return str(p), [f"--python {python}"]
    tried: list[str] = []
    if comfyui:
        root = Path(comfyui)
        if not root.is_dir():
            raise ProbeError(f"--comfyui {comfyui}: no such folder")
        for c in comfyui_candidates(root, os_name):
            if c.is_file():
                return str(c), [f"--comfyui {comfyui}: {c}"]
            tried.append(str(c))
        for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
            if env.get(var):
                for c in env_python(Path(env[var]), os_name):
                    if c.is_file():
                        return str(c), [f"${var}: {c}"]
                    tried.append(f"${var}: {c}")
            else:
                tried.append(f"${var} (not set)")
        looks = "" if is_comfyui_dir(root) or is_comfyui_dir(root / "ComfyUI") else \
            " (it does not look like a ComfyUI folder: no main.py and comfy/)"
        raise ProbeError(f"no Python found for ComfyUI in {comfyui}{looks}; tried: "
                         + ", ".join(tried))
    return sys.executable, ["the current environment"]


def comfy_cli_workspace(os_name: str | None = None, env: Mapping[str, str] | None = None,
                        home: Path | None = None) -> Path | None:
    """comfy-cli's configured workspace (default_workspace, then recent_workspace)."""
    os_name = os_name or current_os()
    env = os.environ if env is None else env
    cfg = comfy_cli_config(os_name, home or Path.home(), env)
    if not cfg.is_file():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read(cfg, encoding="utf-8")
    except configparser.Error:
        return None
    for key in ("default_workspace", "recent_workspace"):
        value = parser.defaults().get(key)
        if value and Path(value).is_dir():
            return Path(value)
    return None


def find_python_auto(*, python: str | None = None, comfyui: str | None = None,
                     os_name: str | None = None, env: Mapping[str, str] | None = None,
                     home: Path | None = None, use_workspace: bool = False
                     ) -> tuple[str, list[str]]:
    """find_python, and with use_workspace and no flags, comfy-cli's workspace first."""
    if not python and not comfyui and use_workspace:
        ws = comfy_cli_workspace(os_name, env, home)
        if ws is not None:
            return find_python(comfyui=str(ws), os_name=os_name, env=env, home=home)
    return find_python(python=python, comfyui=comfyui, os_name=os_name, env=env, home=home)
