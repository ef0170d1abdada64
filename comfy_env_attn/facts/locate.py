"""Find ComfyUI's Python: --python, --comfyui DIR, the environment, comfy-cli's workspace.

Platform decisions take `os_name` ("linux", "windows", "macos") so tests can drive the
Windows layout on Linux.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from comfy_env_attn.core.errors import ProbeError


def current_os() -> str:
    if sys.platform.startswith("win"):
        return "windows"
    return "macos" if sys.platform == "darwin" else "linux"


def folds_case(os_name: str) -> bool:
    """Whether file names that differ only in case name one file where this OS keeps
    environments: NTFS (Windows) and APFS or HFS+ as macOS formats them. A wheel's
    `Torch/_C/__init__.py` lands in torch's own folder there, so the guard compares names
    case-insensitively (on a case-sensitive volume, that refuses only a wheel whose names
    differ from another distribution's in case alone)."""
    return os_name in ("windows", "macos")


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
            # a bare name (`python3`, `python3.12`) is a command on PATH, as uv reads it
            bare = not any(sep in python for sep in ("/", "\\"))
            found = on_path(python, env.get("PATH", ""), os_name,
                            env.get("PATHEXT", "")) if bare else None
            if found is None:
                raise ProbeError(f"--python {python}: no such file"
                                 + (", and no command of that name on PATH" if bare else ""))
            return followed(found, f"--python {python}: {found} on PATH", env)
        return followed(str(p), f"--python {python}", env)
    if comfyui:
        return comfyui_python(Path(comfyui), f"--comfyui {comfyui}", os_name, env)
    return sys.executable, ["the current environment"]


def on_path(name: str, path: str, os_name: str, pathext: str = "") -> str | None:
    """The command `name` on PATH: the first folder holding it as an executable file (on
    Windows under a PATHEXT extension, and never the current folder, which shutil.which
    puts first there on Python 3.11). In WindowsApps, python.exe and python3.exe are passed
    over: without the Store's Python they are the stubs that open the Store and print
    "Python was not found"; the versioned aliases (python3.12.exe) are real ones."""
    windows = os_name == "windows"
    exts = [""]
    if windows and not any(name.lower().endswith(e) for e in (".exe", ".bat", ".cmd")):
        exts = [e.lower() for e in (pathext or ".COM;.EXE;.BAT;.CMD").split(";") if e]
    for folder in path.split(";" if windows else os.pathsep):
        if not folder or folder == ".":
            continue
        apps = windows and folder.replace("/", "\\").lower().rstrip("\\").endswith(
            "\\microsoft\\windowsapps")
        for ext in exts:
            if apps and (name + ext).lower() in ("python.exe", "python3.exe"):
                continue
            candidate = os.path.join(folder, name + ext)
            if os.path.isfile(candidate) and (windows or os.access(candidate, os.X_OK)):
                return candidate
    return None


# The first bytes of an interpreter that is a program (ELF, PE, Mach-O, fat Mach-O), not a
# script: what followed() need not run to know what it is
_NATIVE = (b"\x7fELF", b"MZ", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
FOLLOW_TIMEOUT_S = 30.0


def is_shim(exe: str) -> bool:
    """Whether a --python path is a version manager's shim: a script in a folder named
    `shims` (pyenv, pyenv-win, asdf, mise), which runs whichever interpreter is selected
    when it starts."""
    return os.path.basename(os.path.dirname(os.path.abspath(exe))).lower() == "shims"


def followed(exe: str, how: str, env: Mapping[str, str] | None = None
             ) -> tuple[str, list[str]]:
    """The interpreter a --python path runs. A version manager's shim (is_shim) may run
    another interpreter each time it is started (PYENV_VERSION, a .python-version): the
    target is the one it runs now, read from its sys.executable, so that the probe, its
    cache, the journal and uv all name the same interpreter. Any other script is the
    target as given, never started here: a wrapper may set up the environment its
    interpreter needs (it is probed through itself), and a launcher (ComfyUI's
    run_nvidia_gpu.bat) would start far more than Python. A shim that does not answer is
    kept as given: the probe then reports why. `env`: the environment it is started with
    (the shim reads its selection there)."""
    if not is_shim(exe):
        return exe, [how]
    try:
        with open(exe, "rb") as f:
            head = f.read(4)
    except OSError:
        return exe, [how]
    if head.startswith(_NATIVE):
        return exe, [how]
    key = (os.path.abspath(exe), tuple(sorted((os.environ if env is None else env).items())))
    if key not in _FOLLOWED:  # asked once a process (the early probe asks first)
        _FOLLOWED[key] = _run_script(exe, env)
    real = _FOLLOWED[key]
    return (real, [how, f"{exe} is a script that runs {real}"]) if real else (exe, [how])


_FOLLOWED: dict[tuple[str, tuple[tuple[str, str], ...]], str | None] = {}


def _run_script(exe: str, env: Mapping[str, str] | None) -> str | None:
    """The sys.executable a shim started as Python reports, None if it does not answer
    within FOLLOW_TIMEOUT_S (then it is stopped with all it started)."""
    import subprocess

    from comfy_env_attn.core.process import own_group, stop_tree

    try:
        proc = subprocess.Popen([exe, "-c", "import sys; sys.stdout.write(sys.executable or '')"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True,
                                env=None if env is None else dict(env), **own_group())
    except OSError:
        return None
    try:
        out, _ = proc.communicate(timeout=FOLLOW_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # nothing it started is left running
        stop_tree(proc)
        return None
    except BaseException:  # Ctrl-C: likewise, and the interruption goes on
        stop_tree(proc)
        raise
    real = str(out or "").strip()
    if proc.returncode != 0 or not real or not os.path.isfile(real) or \
            os.path.abspath(real) == os.path.abspath(exe):
        return None
    return real


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def folder_problem(root: Path) -> str | None:
    """Why a folder given as ComfyUI's cannot be it ("no such folder", a file), or None."""
    if root.is_dir():
        return None
    return ("a file, not a folder: give ComfyUI's folder (the one holding main.py)"
            if root.exists() else "no such folder")


def comfyui_python(root: Path, label: str, os_name: str, env: Mapping[str, str]
                   ) -> tuple[str, list[str]]:
    """The interpreter of the ComfyUI in root. An active $VIRTUAL_ENV or $CONDA_PREFIX counts
    only where it lies inside root (ComfyUI's own environment under another name): one that
    lies elsewhere is the environment of whatever runs this tool, not ComfyUI's.
    ProbeError listing every place tried."""
    problem = folder_problem(root)
    if problem:
        raise ProbeError(f"{label}: {problem}")
    tried: list[str] = []
    for c in comfyui_candidates(root, os_name):
        if c.is_file():
            return str(c), [f"{label}: {c}"]
        tried.append(str(c))
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        value = env.get(var)
        if not value:
            tried.append(f"${var} (not set)")
        elif not _inside(Path(value), root):
            tried.append(f"${var}={value} (not inside {root})")
        else:
            for c in env_python(Path(value), os_name):
                if c.is_file():
                    return str(c), [f"{label}: ${var} {c}"]
                tried.append(f"${var}: {c}")
    looks = "" if is_comfyui_dir(root) or is_comfyui_dir(root / "ComfyUI") else \
        " (it does not look like a ComfyUI folder: no main.py and comfy/)"
    hint = "; if ComfyUI runs in the active environment, name it with --python" \
        if any("(not inside" in t for t in tried) else ""
    raise ProbeError(f"no Python found for ComfyUI in {root}{looks}; tried: "
                     + ", ".join(tried) + hint)


def comfy_cli_workspace(os_name: str | None = None, env: Mapping[str, str] | None = None,
                        home: Path | None = None) -> Path:
    """comfy-cli's configured workspace (default_workspace, then recent_workspace).
    ProbeError saying what was tried when there is none."""
    os_name = os_name or current_os()
    env = os.environ if env is None else env
    cfg = comfy_cli_config(os_name, home or Path.home(), env)
    if not cfg.is_file():
        raise ProbeError(f"--comfy-cli: no comfy-cli configuration; tried: {cfg} (no such file)")
    import configparser  # here: every start locates the target, few through comfy-cli

    parser = configparser.ConfigParser()
    try:
        parser.read(cfg, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ProbeError(f"--comfy-cli: {cfg} cannot be read: {e}") from None
    tried: list[str] = []
    for key in ("default_workspace", "recent_workspace"):
        value = parser.defaults().get(key)
        if value and Path(value).is_dir():
            return Path(value)
        tried.append(f"{key} = {value} (no such folder)" if value else f"{key} (not set)")
    raise ProbeError(f"--comfy-cli: {cfg} names no workspace folder; tried: "
                     + ", ".join(tried))


def find_python_auto(*, python: str | None = None, comfyui: str | None = None,
                     os_name: str | None = None, env: Mapping[str, str] | None = None,
                     home: Path | None = None, use_workspace: bool = False
                     ) -> tuple[str, list[str]]:
    """find_python, or with use_workspace and no other flag, the Python of comfy-cli's
    workspace; never the running Python in its place."""
    if not python and not comfyui and use_workspace:
        os_name = os_name or current_os()
        env = os.environ if env is None else env
        ws = comfy_cli_workspace(os_name, env, home)
        return comfyui_python(ws, f"--comfy-cli workspace {ws}", os_name, env)
    return find_python(python=python, comfyui=comfyui, os_name=os_name, env=env, home=home)
