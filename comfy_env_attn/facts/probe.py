"""Learn the target: its interpreter (one small script run there) and the GPUs (NVML).

Nothing here raises for a missing GPU or NVML: the fact is absent, with the reason.
The tool's own process never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import field
from pathlib import Path
from typing import Any

from comfy_env_attn.core.errors import ProbeError
from comfy_env_attn.core.paths import answer_file, write_cache
from comfy_env_attn.core.paths import cache_dir as cache_dir  # re-exported: callers import it here
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.probe_start import (
    _PENDING,
    _SCRIPT,
    CACHE_SCHEMA,
    _cached,
    _start,
    _stat,
    _visible,
    in_process,
    nvml_facts,
)
from comfy_env_attn.facts.system import System, normalize_arch

PROBE_TIMEOUT_S = 120  # seconds the target's probe may take; read at each call (tests lower it)


@dataclass(frozen=True)
class GpuFacts:
    """The driver and GPUs, as nvidia-smi or NVML reported them, and what could not be read."""
    driver: str | None = None
    driver_cuda: str | None = None
    gpus: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    source: str = ""
    absent: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """The interpreter the tool installs into, with the facts the probe script reported."""

    executable: str
    facts: dict[str, Any]
    cached: bool = False

    @property
    def prefix(self) -> Path:
        return Path(self.facts["prefix"])

    @property
    def is_venv(self) -> bool:
        return bool(self.facts.get("is_venv"))

    @property
    def kind(self) -> str:
        return environment_kind(self.facts)

    @property
    def is_dedicated(self) -> bool:
        """An environment of its own (safe to change): a venv, a conda env, or an
        embeddable Python such as ComfyUI portable's python_embeded; not a system Python."""
        return self.kind != "system"

    @property
    def site_dirs(self) -> list[str]:
        """Where installed distributions are found: sys.path entries that are directories."""
        seen: list[str] = []
        for p in [self.facts.get("purelib"), self.facts.get("platlib"),
                  *self.facts.get("sys_path", [])]:
            if p and p not in seen and os.path.isdir(p):
                seen.append(p)
        return seen

    @property
    def import_path(self) -> list[str]:
        """The target's sys.path as its Python starts (the probe script's folder aside), in
        order, zips included: where importlib.metadata, and so the lock's fingerprint, finds
        a distribution first."""
        path = self.facts.get("sys_path")
        return list(path) if path else self.site_dirs


def no_torch(python: str) -> tuple[str, str]:
    """(what is wrong, what to do) where the target has no torch: doctor's problem, and why
    install refuses before it chooses a wheel (every wheel is chosen for the target's torch
    and verified against it)."""
    return (f"torch is not installed in {python}: ComfyUI cannot start and no attention "
            "backend can work", "install ComfyUI's requirements (torch first) into that Python")


def environment_kind(facts: dict[str, Any]) -> str:
    """venv, conda, embedded (a ._pth file beside the interpreter) or system."""
    if facts.get("is_venv"):
        return "venv"
    if facts.get("conda_env"):
        return "conda"
    if facts.get("pth_files"):
        return "embedded"
    return "system"


# -- GPUs ---------------------------------------------------------------------------------

def probe_gpus_nvml() -> GpuFacts:
    """What NVML says (probe_start._nvml), read in the background from the start where the
    command line asked for it (probe_start.start_gpu_probe)."""
    return GpuFacts(**nvml_facts())


def parse_nvidia_smi(query_csv: str, header: str) -> GpuFacts:
    """Facts from `nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader`
    and the banner of plain `nvidia-smi` (for 'CUDA Version: 13.0')."""
    gpus, names, driver = [], [], None
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and re.match(r"^\d+\.\d+$", parts[1]):
            names.append(parts[0])
            gpus.append(parts[1])
            driver = parts[2]
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", header)
    keep = _visible(list(range(len(gpus))))
    return GpuFacts(driver, m[1] if m else None, tuple(gpus[i] for i in keep),
                    tuple(names[i] for i in keep), "nvidia-smi",
                    {} if gpus else {"gpus": "nvidia-smi listed no GPU"})


def probe_gpus_smi() -> GpuFacts:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return GpuFacts(absent={"gpus": "nvidia-smi not found on PATH"})
    try:
        q = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        banner = subprocess.run([exe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return GpuFacts(absent={"gpus": f"nvidia-smi failed: {e}"})
    if q.returncode != 0:
        return GpuFacts(absent={"gpus": f"nvidia-smi exited {q.returncode}: "
                                        f"{(q.stderr or q.stdout).strip()[:200]}"})
    return parse_nvidia_smi(q.stdout, banner.stdout)


def probe_gpus() -> GpuFacts:
    facts = probe_gpus_nvml()
    if facts.gpus:
        return facts
    smi = probe_gpus_smi()
    if smi.gpus:
        return smi
    reasons = "; ".join(r for r in (facts.absent.get("gpus"), smi.absent.get("gpus")) if r)
    return GpuFacts(absent={"gpus": reasons or "no NVIDIA GPU found",
                            "driver": reasons or "no NVIDIA driver found"})


# -- the interpreter ----------------------------------------------------------------------

def _witnesses(executable: str, facts: dict[str, Any]) -> dict[str, list[int] | None]:
    """Files whose change invalidates cached facts: the interpreter, torch's version.py and
    the site directories (installing or removing a distribution changes their mtime)."""
    paths = [executable, str(_SCRIPT)]
    if facts.get("torch_dir"):
        paths.append(os.path.join(facts["torch_dir"], "version.py"))
    for key in ("purelib", "platlib"):
        if facts.get(key):
            paths.append(facts[key])
    for p in facts.get("sys_path", []):
        if "site-packages" in p or "dist-packages" in p:
            paths.append(p)
    return {p: _stat(p) for p in dict.fromkeys(paths)}


def _run_script(executable: str, *, import_torch: bool) -> dict[str, Any]:
    if not import_torch and in_process(executable):
        from comfy_env_attn.facts import _interp_probe

        here = _interp_probe.facts(import_torch=False)
        here["executable"] = os.path.abspath(executable)  # python3 where this runs as python
        return _checked(executable, here, "")
    timeout = PROBE_TIMEOUT_S
    proc = None if import_torch else _PENDING.pop(executable, None)
    try:
        if proc is None:
            proc = _start(executable, import_torch)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # the timeout, or Ctrl-C / SIGINT: no probe left running
            proc.kill()
            proc.wait()  # not communicate(): a child it started may hold the pipes open
            raise
        r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    except FileNotFoundError:
        raise ProbeError(f"Python {executable!r} does not exist") from None
    except PermissionError:
        raise ProbeError(f"Python {executable!r} is not executable") from None
    except OSError as e:
        raise ProbeError(f"Python {executable!r} does not run: {e}") from None
    except subprocess.TimeoutExpired:
        raise ProbeError(f"Python {executable!r} did not answer within {timeout} s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ProbeError(f"Python {executable!r} failed the probe (exit {r.returncode}): "
                         f"{tail[0]}")
    try:
        facts: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise ProbeError(f"{executable!r} is not a Python this tool can probe: it printed "
                         f"{r.stdout[:80]!r}") from None
    return _checked(executable, facts, r.stdout)


def _checked(executable: str, facts: Any, printed: str) -> dict[str, Any]:
    """The probe's answer, if it is one."""
    if not isinstance(facts, dict):
        raise ProbeError(f"{executable!r} is not a Python this tool can probe: it printed "
                         f"{printed[:80]!r}")
    if facts.get("implementation") != "cpython":
        raise ProbeError(f"{executable!r} is {str(facts.get('implementation'))[:40]}, "
                         "not CPython")
    bad = [k for k, kind in _REQUIRED.items() if not isinstance(facts.get(k), kind)]
    if "python" not in bad and not re.match(r"^\d\.\d{1,2}\.\d{1,3}$", facts["python"]):
        bad.append("a Python version")
    if "sys_path" not in bad and not all(isinstance(x, str) for x in facts["sys_path"]):
        bad.append("sys_path strings")
    if bad:
        raise ProbeError(f"{executable!r} answered the probe without {', '.join(bad)}: not a "
                         "Python this tool can probe")
    return facts


# What every probe answer carries; a partial answer (a fake or broken interpreter) is refused
# here rather than failing later on a missing key.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "python": str, "platform": str, "arch": str, "prefix": str, "purelib": str,
    "platlib": str, "sys_path": list, "markers": dict, "executable": str,
}


def _interpreter_facts(exe: str, use_cache: bool) -> dict[str, Any]:
    """Two steps: a fast pass that reads torch's version.py, then `import torch` (seconds)
    only for what that cannot tell (the C++ ABI flag, whether it imports), cached per torch
    install so that venvs sharing one torch import it once."""
    facts = _run_script(exe, import_torch=False)
    torch_dir = facts.get("torch_dir")
    if not torch_dir:
        return facts
    witness = _stat(os.path.join(torch_dir, "version.py"))
    tfile = answer_file("torch", torch_dir)
    if use_cache:
        try:
            doc = json.loads(tfile.read_text(encoding="utf-8"))
            if doc.get("witness") == witness and doc.get("torch") == facts.get("torch"):
                facts.update(doc["facts"])
                return facts
        except (OSError, ValueError, KeyError):
            pass
    full = _run_script(exe, import_torch=True)
    keys = ("cxx11abi", "torch", "torch_cuda", "torch_error")
    tfacts = {k: full.get(k) for k in keys}
    facts.update(tfacts)
    if use_cache and not full.get("torch_error"):
        write_cache(tfile, json.dumps({"witness": witness, "torch": full.get("torch"),
                                       "facts": tfacts}))
    return facts


def probe_interpreter(executable: str, *, use_cache: bool = True) -> Target:
    """The target's facts; cached per interpreter until it, torch or its site dirs change."""
    exe = os.path.abspath(executable)
    if use_cache:
        facts = _cached(exe)
        if facts is not None:
            return Target(exe, facts, cached=True)
    facts = _interpreter_facts(exe, use_cache)
    if use_cache:
        write_cache(answer_file("interp", exe), json.dumps({
            "schema": CACHE_SCHEMA, "executable": exe, "facts": facts,
            "witnesses": _witnesses(exe, facts)}))
    return Target(exe, facts)


def system_from(target: Target, gpus: GpuFacts) -> System:
    f = target.facts
    absent = dict(gpus.absent)
    if f.get("torch") is None:
        absent["torch"] = f.get("torch_error") or "torch is not installed in the target"
    elif f.get("torch_cuda") is None:
        absent["torch_cuda"] = f"torch {f['torch']} is a CPU build (torch.version.cuda is None)"
    if f.get("torch") is not None and f.get("cxx11abi") is None and f.get("platform") == "linux":
        absent["cxx11abi"] = f.get("torch_error") or "not read"
    try:
        arch = normalize_arch(f.get("arch") or "x86_64")
    except Exception:
        arch = f.get("arch") or "x86_64"
    return System(
        python=f["python"], platform=f["platform"], arch=arch, glibc=f.get("glibc"),
        free_threaded=bool(f.get("free_threaded")), torch=f.get("torch"),
        torch_cuda=f.get("torch_cuda"), cxx11abi=f.get("cxx11abi"), driver=gpus.driver,
        driver_cuda=gpus.driver_cuda, gpus=gpus.gpus, gpu_names=gpus.names, absent=absent,
    )


def probe(executable: str, *, use_cache: bool = True) -> tuple[Target, System, GpuFacts]:
    target = probe_interpreter(executable, use_cache=use_cache)
    gpus = probe_gpus()
    return target, system_from(target, gpus), gpus
