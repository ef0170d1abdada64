"""Run inside the TARGET interpreter (standard library only; it need not have this package).

Prints one JSON object: the interpreter's facts, torch's version/CUDA/ABI, site dirs.
torch is read from its version.py first, then imported for the C++ ABI flag. Where the
target is the interpreter running this tool, the command line calls `facts` itself
(probe_start.in_process says when).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

TYPE_CHECKING = False  # typing itself is not imported: 5 ms of every probe's start
if TYPE_CHECKING:
    from typing import Any


def _import_path() -> list[str]:
    """sys.path as the target's Python starts, without the folder of what started this one:
    Python puts this script's folder (or, in process, the command's own: its entry point's
    folder, or the current one for `python -m`) first, unless it runs isolated (-I, or a
    ._pth file beside the interpreter, as ComfyUI portable's python_embeded has) or with
    -P / PYTHONSAFEPATH. Then the first entry is the target's own."""
    own_first = not (sys.flags.isolated or getattr(sys.flags, "safe_path", False))
    return [p for p in (sys.path[1:] if own_first else sys.path) if p]


def _find_torch(path: list[str]) -> Any:
    """torch's spec as an import would find it with `path` as sys.path: the path finder on
    `path`, any other finder (an editable install's) as it is; sys.path itself untouched."""
    import importlib.machinery

    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec("torch", path)
        else:
            find = getattr(finder, "find_spec", None)
            spec = find("torch", None) if find is not None else None
        if spec is not None:
            return spec
    return None


def _torch_facts(out: dict[str, Any], path: list[str], import_torch: bool) -> None:
    out.update(torch=None, torch_cuda=None, torch_hip=None, cxx11abi=None)

    try:
        spec = _find_torch(path)
    except (ImportError, ValueError) as e:
        out["torch_error"] = "%s: %s" % (type(e).__name__, e)
        return
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = list(spec.submodule_search_locations)[0]
    out["torch_dir"] = pkg
    version_py = os.path.join(pkg, "version.py")
    ns: dict[str, Any] = {}
    try:
        with open(version_py, encoding="utf-8") as f:
            src = f.read()
        for line in src.splitlines():
            line = line.strip()
            for key in ("__version__", "cuda", "git_version", "hip"):
                if line.startswith(key + " ") or line.startswith(key + ":") or \
                        line.startswith(key + "="):
                    value = line.split("=", 1)[1].strip() if "=" in line else ""
                    if value and value[0] in "'\"":
                        ns[key] = value.strip("'\"")
                    elif value == "None":
                        ns[key] = None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        out["torch_error"] = "cannot read %s: %s" % (version_py, e)
        return
    out["torch"] = ns.get("__version__")
    out["torch_cuda"] = ns.get("cuda")
    out["torch_hip"] = ns.get("hip")
    if not import_torch:
        return  # the caller knows the rest from its cache, or asks again
    try:
        import torch

        out["cxx11abi"] = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
    except Exception as e:  # a broken torch is a fact, not a crash
        out["torch_error"] = "import torch failed: %s: %s" % (type(e).__name__, e)


def facts(import_torch: bool) -> dict[str, Any]:
    plat = sys.platform
    plat = "windows" if plat.startswith("win") else "macos" if plat == "darwin" else \
        "linux" if plat.startswith("linux") else plat
    glibc = None
    if plat == "linux":
        try:
            v = os.confstr("CS_GNU_LIBC_VERSION")
            if v and v.startswith("glibc "):
                glibc = v.split()[1]
        except (ValueError, OSError, AttributeError):
            pass
        if glibc is None:
            lib, ver = platform.libc_ver()
            glibc = ver if lib == "glibc" and ver else None
    paths = sysconfig.get_paths()
    path = _import_path()
    out = {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "implementation": sys.implementation.name,
        "platform": plat,
        "arch": platform.machine().lower(),
        "glibc": glibc,
        "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "base_prefix": getattr(sys, "base_prefix", sys.prefix),
        "is_venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix),
        # a Windows embeddable Python (ComfyUI portable's python_embeded) has a ._pth file
        "pth_files": sorted(f for f in os.listdir(os.path.dirname(sys.executable) or ".")
                            if f.endswith("._pth")),
        "conda_env": os.path.isdir(os.path.join(sys.prefix, "conda-meta")),
        "purelib": paths.get("purelib"),
        "platlib": paths.get("platlib"),
        "scripts": paths.get("scripts"),  # where a wheel's .data/scripts land
        "data": paths.get("data"),
        "sys_path": path,
    }
    impl = sys.implementation
    iv = "%d.%d.%d" % impl.version[:3]
    out["markers"] = {
        "implementation_name": impl.name, "implementation_version": iv,
        "os_name": os.name, "platform_machine": platform.machine(),
        "platform_release": platform.release(), "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": "%d.%d" % sys.version_info[:2], "sys_platform": sys.platform,
    }
    _torch_facts(out, path, import_torch)
    return out


def main() -> None:
    import json

    out = facts(import_torch=os.environ.get("COMFY_ENV_ATTN_PROBE_NO_IMPORT") != "1")
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
