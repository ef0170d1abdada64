"""What starts before the command's own imports, in other processes: the target's probe
(facts.probe reads the answer, or this module's cache of it) and uv's own query of the target;
and in a thread, NVML's answer about the GPUs. The standard library alone (and pynvml, in that
thread), so that all three start within milliseconds of this tool."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from comfy_env_attn.core.paths import cache_dir

CACHE_SCHEMA = 5
_SCRIPT = Path(__file__).with_name("_interp_probe.py")


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _cache_file(kind: str, path: str) -> Path:
    """Where facts of one file or folder are cached: `interp` an interpreter's, `torch` a
    torch install's (shared by the venvs that see it)."""
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:20]
    return cache_dir() / f"{kind}-{key}.json"


def _cached(exe: str) -> dict[str, Any] | None:
    """The cached facts of this interpreter while none of their witnesses changed."""
    try:
        doc = json.loads(_cache_file("interp", exe).read_text(encoding="utf-8"))
        if doc.get("schema") == CACHE_SCHEMA and doc.get("executable") == exe and \
                doc.get("witnesses") == {p: _stat(p) for p in doc.get("witnesses", {})}:
            facts: dict[str, Any] = doc["facts"]
            return facts
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    return None


# fast probes started early (start_probe) and not yet read: executable -> process
_PENDING: dict[str, subprocess.Popen[str]] = {}


def _start(executable: str, import_torch: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "COMFY_ENV_ATTN_PROBE_NO_IMPORT": "0" if import_torch else "1"}
    return subprocess.Popen([executable, str(_SCRIPT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def start_probe(executable: str) -> None:
    """Start the target's fast probe in the background when its cache cannot answer, so
    that starting the target's Python overlaps this tool's own imports (the CLI calls this
    first). Whatever goes wrong here is left for the real probe to report."""
    exe = os.path.abspath(executable)
    if exe in _PENDING or not os.path.isfile(exe) or _cached(exe) is not None:
        return
    try:
        _PENDING[exe] = _start(exe, import_torch=False)
    except OSError:
        return
    _reap_at_exit()


def _reap_at_exit() -> None:
    """Processes started here and never waited for are stopped when this tool exits."""
    if not _REAPING:
        _REAPING.append(True)
        atexit.register(_reap)


_REAPING: list[bool] = []


def _reap() -> None:
    for probe in _PENDING.values():
        probe.kill()
        probe.wait()
    for uv in _UV_WARMING.values():
        _kill_group(uv)
        uv.wait()
    _PENDING.clear()
    _UV_WARMING.clear()


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started in a session of its own, and what it started (uv runs the
    interpreter it queries); on Windows, the process alone."""
    if os.name == "nt" or proc.poll() is not None:
        proc.kill()
        return
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        proc.kill()


# -- uv --------------------------------------------------------------------------------------

_UV: list[str | None] = []  # the binary, once looked for


def uv_binary() -> str | None:
    """The uv binary: the `uv` package's, then $UV, then PATH (as pypa/build finds it);
    None where there is none. Looked for once a process."""
    if not _UV:
        found: str | None = None
        try:
            from uv import find_uv_bin

            found = str(find_uv_bin())
        except (ImportError, FileNotFoundError):
            env = os.environ.get("UV")
            found = env if env and os.path.isfile(env) else shutil.which("uv")
        _UV.append(found)
    return _UV[0]


# uv's query of a target started early (warm_uv): executable -> process
_UV_WARMING: dict[str, subprocess.Popen[bytes]] = {}


def warm_uv(executable: str) -> None:
    """Have uv learn the target interpreter now, beside this tool's imports, for a command
    that is about to run `uv pip ... --python EXE`. Before uv installs anything it runs the
    interpreter to query it, about 60 ms of the 90 a small install takes, and caches the
    answer (keyed by the interpreter's path and mtime): `uv python find EXE` fills that
    cache, and the install's own uv call then skips the query. Nothing depends on it:
    whatever goes wrong leaves uv to query as it always does."""
    exe = os.path.abspath(executable)
    uv = uv_binary()
    if uv is None or exe in _UV_WARMING or not os.path.isfile(exe):
        return
    try:
        _UV_WARMING[exe] = subprocess.Popen(
            [uv, "python", "find", "--no-project", "--no-python-downloads", "--offline",
             "--quiet", exe], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=os.name != "nt")
    except OSError:
        return
    _reap_at_exit()


def uv_warmed(executable: str) -> None:
    """Let uv's early query of this interpreter finish: it is the query uv would otherwise
    make again, and stopping it midway would only repeat it (a target slow to start was
    probed before this, with a time limit). Interrupted meanwhile, it is stopped at exit."""
    exe = os.path.abspath(executable)
    proc = _UV_WARMING.get(exe)
    if proc is not None:
        proc.wait()
        del _UV_WARMING[exe]


# -- GPUs ------------------------------------------------------------------------------------

def _visible(indices: list[int]) -> list[int]:
    """Apply CUDA_VISIBLE_DEVICES when it lists integer indices (NVML ignores it)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or not env.strip():
        return indices if env is None else []
    picked: list[int] = []
    for part in env.split(","):
        part = part.strip()
        if not part.isdigit():
            return indices  # UUIDs or MIG names: keep all
        if int(part) in indices:
            picked.append(int(part))
    return picked


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml() -> dict[str, Any]:
    """The driver and the visible GPUs as NVML reports them, as facts.probe.GpuFacts'
    fields; what it cannot tell, in `absent`, with the reason."""
    try:
        import pynvml
    except ImportError as e:
        return {"absent": {"gpus": f"pynvml is not importable ({e})"}}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return {"absent": {"gpus": f"NVML: {e}", "driver": f"NVML: {e}"}}
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            driver_cuda: str | None = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:
            driver_cuda = None
        gpus: list[str] = []
        names: list[str] = []
        for i in _visible(list(range(int(pynvml.nvmlDeviceGetCount())))):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(f"{major}.{minor}")
            names.append(_text(pynvml.nvmlDeviceGetName(h)))
        return {"driver": driver, "driver_cuda": driver_cuda, "gpus": tuple(gpus),
                "names": tuple(names), "source": "nvml",
                "absent": {} if gpus else {"gpus": "NVML found no visible GPU"}}
    except Exception as e:
        return {"absent": {"gpus": f"NVML query failed: {e}"}}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# NVML's answer read early (start_gpu_probe): "thread" while it runs, then "facts"
_GPUS: dict[str, Any] = {}


def start_gpu_probe() -> None:
    """Ask NVML in a thread now, for a command that will want the GPUs: its start-up (75-135
    ms on an H100 machine) runs in C with the GIL released, beside this tool's imports."""
    if "thread" in _GPUS:
        return
    thread = threading.Thread(target=lambda: _GPUS.__setitem__("facts", _nvml()),
                              name="nvml", daemon=True)
    _GPUS.update(thread=thread, visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    thread.start()


def nvml_facts() -> dict[str, Any]:
    """NVML's answer: the early one, once, while CUDA_VISIBLE_DEVICES is as it was read
    under; else asked now."""
    thread = _GPUS.pop("thread", None)
    visible = _GPUS.pop("visible", None)
    if thread is not None:
        thread.join()
        facts: dict[str, Any] | None = _GPUS.pop("facts", None)
        if facts is not None and visible == os.environ.get("CUDA_VISIBLE_DEVICES"):
            return facts
    return _nvml()
