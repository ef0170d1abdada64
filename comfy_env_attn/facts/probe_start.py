"""What starts before the command's own imports, in other processes: the target's probe
(facts.probe reads the answer, or this module's cache of it) and uv's own query of the target;
and in a thread, NVML's answer about the GPUs. The standard library alone, and at import
only what starting them needs (the rest where it is used), so that all three start within
milliseconds of this tool."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading

from comfy_env_attn.core.process import own_group, stop_tree
from comfy_env_attn.core.progress import same_interpreter

TYPE_CHECKING = False  # typing loads after what starts first (cli._start_probe)
if TYPE_CHECKING:
    from typing import Any

CACHE_SCHEMA = 5
_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_interp_probe.py")


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _cached(exe: str) -> dict[str, Any] | None:
    """The cached facts of this interpreter while none of their witnesses changed."""
    import json

    from comfy_env_attn.core.paths import answer_file

    try:
        doc = json.loads(answer_file("interp", exe).read_text(encoding="utf-8"))
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
    return subprocess.Popen([executable, _SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


_COMMAND: list[bool] = []  # set by the command line's own process (running_as_command)


def running_as_command() -> None:
    """This process is the command line's own (cli.entry): its sys.path is the one Python
    gave it, so that the running interpreter's facts may be read here (in_process). A process
    that calls cli.main itself (a test, an embedder) may have changed sys.path."""
    _COMMAND[:] = [True]


def in_process(executable: str) -> bool:
    """Whether the target is the interpreter running this command, started as a plain one
    would be: then the fast probe runs here (_interp_probe.facts), and the target's Python
    is not started again (as ComfyUI portable's README usage, `python_embeded\\python.exe -m
    comfy_env_attn install`, runs it). Not under -I, -S, -s, -E or -P, which change sys.path
    from what the target sees, nor in a process that did not start as the command. A ._pth
    file beside the interpreter (python_embeded's) sets those for every start of it: then
    they are how it starts."""
    if not _COMMAND or not same_interpreter(executable, sys.executable):
        return False
    flags = sys.flags
    if not (flags.isolated or flags.no_site or flags.no_user_site or flags.ignore_environment
            or getattr(flags, "safe_path", False)):
        return True
    exe_dir = os.path.dirname(sys.executable) or "."
    stem = os.path.splitext(os.path.basename(sys.executable))[0]
    # the names CPython reads: the interpreter's, and its DLL's on Windows (python312._pth)
    names = (f"{stem}._pth", "python%d%d._pth" % sys.version_info[:2])
    return any(os.path.isfile(os.path.join(exe_dir, n)) for n in names)


def start_probe(executable: str) -> None:
    """Start the target's fast probe in the background when its cache cannot answer, so
    that starting the target's Python overlaps this tool's own imports (the CLI calls this
    first). Whatever goes wrong here is left for the real probe to report."""
    exe = os.path.abspath(executable)
    if exe in _PENDING or not os.path.isfile(exe) or in_process(exe) or \
            _cached(exe) is not None:
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
        stop_tree(uv)
    _PENDING.clear()
    _UV_WARMING.clear()


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
            import shutil

            env = os.environ.get("UV")
            found = env if env and os.path.isfile(env) else shutil.which("uv")
        _UV.append(found)
    return _UV[0]


# uv's query of a target started early (warm_uv): executable -> process
_UV_WARMING: dict[str, subprocess.Popen[bytes]] = {}


def warm_uv(executable: str) -> None:
    """Have uv learn the target interpreter now, beside this tool's imports, for a command
    that is about to run `uv pip ... --python EXE`. Before uv installs anything it runs the
    interpreter to query it (most of uv's time in a small install: installer._uv_install
    has the figures) and caches the answer, keyed by the interpreter's path and mtime:
    `uv python find EXE` fills that cache, and the install's own uv call then skips the
    query. Nothing depends on it:
    whatever goes wrong leaves uv to query as it always does."""
    exe = os.path.abspath(executable)
    uv = uv_binary()
    if uv is None or exe in _UV_WARMING or not os.path.isfile(exe):
        return
    try:
        _UV_WARMING[exe] = subprocess.Popen(
            [uv, "python", "find", "--no-project", "--no-python-downloads", "--offline",
             "--quiet", exe], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, **own_group())
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


def _nvml_library() -> Any:
    """NVML, the driver's own library, where the driver puts it: libnvidia-ml.so.1 on Linux;
    on Windows nvml.dll in System32 (DCH drivers), else in NVSMI."""
    import ctypes

    if os.name != "nt":
        return ctypes.CDLL("libnvidia-ml.so.1")
    places = [os.path.join(os.environ.get("WINDIR", r"C:\Windows"), "System32", "nvml.dll"),
              os.path.join(os.environ.get("PROGRAMFILES", r"C:\Program Files"),
                           "NVIDIA Corporation", "NVSMI", "nvml.dll")]
    for place in places:
        if os.path.isfile(place):
            return ctypes.CDLL(place)
    raise OSError(f"nvml.dll is in neither {places[0]} nor {places[1]}")


class _NvmlError(Exception):
    pass


def _nvml() -> dict[str, Any]:
    """The driver and the visible GPUs as NVML reports them, as facts.probe.GpuFacts'
    fields; what it cannot tell, in `absent`, with the reason. NVML's C API through ctypes:
    eight calls, where loading pynvml's bindings of all of NVML took 114 ms on the H100
    machine (NVML's own start-up, 15 ms)."""
    import ctypes

    try:
        lib = _nvml_library()
    except OSError as e:
        return {"absent": {"gpus": f"NVML not found: {e}", "driver": f"NVML not found: {e}"}}

    def call(fn: str, *args: Any) -> None:
        ret = getattr(lib, fn)(*args)
        if ret != 0:
            lib.nvmlErrorString.restype = ctypes.c_char_p
            text = lib.nvmlErrorString(ret) or b""
            raise _NvmlError(f"{fn}: {text.decode(errors='replace') or 'error'} ({ret})")

    def text(fn: str, *args: Any) -> str:
        buf = ctypes.create_string_buffer(256)
        call(fn, *args, buf, ctypes.c_uint(len(buf)))
        return buf.value.decode(errors="replace")

    try:
        call("nvmlInit_v2")
    except (_NvmlError, AttributeError) as e:  # no driver loaded, no GPU, an old library
        return {"absent": {"gpus": f"NVML: {e}", "driver": f"NVML: {e}"}}
    try:
        driver = text("nvmlSystemGetDriverVersion")
        version = ctypes.c_int()
        try:
            call("nvmlSystemGetCudaDriverVersion", ctypes.byref(version))
            v = version.value
            driver_cuda: str | None = f"{v // 1000}.{(v % 1000) // 10}"
        except (_NvmlError, AttributeError):
            driver_cuda = None
        count = ctypes.c_uint()
        call("nvmlDeviceGetCount_v2", ctypes.byref(count))
        gpus: list[str] = []
        names: list[str] = []
        for i in _visible(list(range(count.value))):
            handle = ctypes.c_void_p()
            call("nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(i), ctypes.byref(handle))
            major, minor = ctypes.c_int(), ctypes.c_int()
            call("nvmlDeviceGetCudaComputeCapability", handle, ctypes.byref(major),
                 ctypes.byref(minor))
            gpus.append(f"{major.value}.{minor.value}")
            names.append(text("nvmlDeviceGetName", handle))
        return {"driver": driver, "driver_cuda": driver_cuda, "gpus": tuple(gpus),
                "names": tuple(names), "source": "nvml",
                "absent": {} if gpus else {"gpus": "NVML found no visible GPU"}}
    except (_NvmlError, AttributeError) as e:
        return {"absent": {"gpus": f"NVML query failed: {e}"}}
    finally:
        lib.nvmlShutdown()


# NVML's answer read early (start_gpu_probe): the thread, the box it answers into, and the
# CUDA_VISIBLE_DEVICES it read under
_GPUS: dict[str, Any] = {}
NVML_TIMEOUT_S = 30.0  # a driver in a bad state can hang NVML: then it is a reason, not a hang


def start_gpu_probe() -> None:
    """Ask NVML in a thread now, for a command that will want the GPUs: its start-up runs in
    C with the GIL released, beside this tool's imports."""
    if "thread" in _GPUS:
        return
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(facts=_nvml()), name="nvml",
                              daemon=True)
    _GPUS.update(thread=thread, box=box, visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    thread.start()


def nvml_facts() -> dict[str, Any]:
    """NVML's answer: the early one, once, while CUDA_VISIBLE_DEVICES is as it was read
    under; else asked now. One that does not come within NVML_TIMEOUT_S is a reason (the
    caller asks nvidia-smi next, with its own limit)."""
    if _GPUS and _GPUS["visible"] != os.environ.get("CUDA_VISIBLE_DEVICES"):
        _GPUS.clear()  # that thread answers into its own box, read by no one
    start_gpu_probe()
    thread, box = _GPUS["thread"], _GPUS["box"]
    _GPUS.clear()
    thread.join(NVML_TIMEOUT_S)
    if "facts" in box:
        facts: dict[str, Any] = box["facts"]
        return facts
    why = f"NVML did not answer within {NVML_TIMEOUT_S:g} s" if thread.is_alive() else \
        "NVML failed without a reason"
    return {"absent": {"gpus": why, "driver": why}}
