"""Diagnose a target: what is installed against what fits, each problem with its consequence
and one next step. Pure: the CLI gathers the facts and prints the result."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from comfy_env_attn import __version__, lockfile
from comfy_env_attn.core.backends import BACKENDS, BY_DIST
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.lockmodel import ToolTable, tool_table
from comfy_env_attn.core.progress import log, tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.installed import (
    Installed,
    installed_backends,
    read_installed,
    torch_file_problems,
)
from comfy_env_attn.facts.node import comfyui_root, find_nodes, node_finding
from comfy_env_attn.facts.probe import Target, cache_dir, no_torch
from comfy_env_attn.facts.system import System
from comfy_env_attn.install.build import build_hint
from comfy_env_attn.install.installer import recover
from comfy_env_attn.install.journal import Journal, target_lock
from comfy_env_attn.resolve import Plan, Reason, installed_reasons

CONSEQUENCE = {
    "torch": "importing it fails with 'undefined symbol'",
    "cuda": "importing it fails (CUDA runtime mismatch: 'undefined symbol' or a missing "
            "libcudart)",
    "driver": "its kernels fail with 'CUDA driver version is insufficient'",
    "cxx11abi": "importing it fails with 'undefined symbol' (C++ ABI mismatch)",
    "gpu": "its kernels fail with 'no kernel image is available for execution on the device'",
    "python": "this interpreter cannot import it",
    "platform": "this interpreter cannot import it",
    "label": "its torch and CUDA are unknown: it may fail to import",
}


@dataclass(frozen=True)
class Finding:
    """One thing doctor found, how bad it is and what to do next."""
    severity: str  # "problem", "ok" or "info"
    subject: str
    message: str
    next_step: str | None = None
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "subject": self.subject,
                               "message": self.message}
        if self.next_step:
            out["next"] = self.next_step
        if self.reasons:
            out["reasons"] = list(self.reasons)
        return out


@dataclass(frozen=True)
class Diagnosis:
    """What doctor found about one target."""
    system: System
    findings: tuple[Finding, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        return not any(f.severity == "problem" for f in self.findings)


def _consequence(reasons: list[Reason], system: System) -> str:
    seen: list[str] = []
    for r in reasons:
        # with a CPU build of torch there is no CUDA runtime to mismatch and no GPU to
        # have a kernel for: the kernels cannot run at all (SageAttention 1.x stops earlier
        # still, at its triton import)
        c = "its CUDA kernels cannot run on a CPU build of torch" \
            if r.kind in ("cuda", "driver", "gpu") and system.torch is not None \
            and system.torch_cuda is None else CONSEQUENCE.get(r.kind)
        if c and c not in seen:
            seen.append(c)
    return "; ".join(seen) or "it may not work"


def diagnose(system: System, installed: dict[str, Installed], plan: Plan,
             *, python: str, cores: int | None = None,
             proven: Mapping[str, str] | None = None) -> Diagnosis:
    """`proven`: the backends a fresh lock verified on this target, each with what its
    checks showed. Such a backend ran here whatever its wheel's label says: a label that
    does not fit is then worth a note, not a predicted failure."""
    proven = proven or {}
    out: list[Finding] = []
    if system.torch is None:
        out.append(Finding("problem", "torch", *no_torch(python)))
    elif system.gpus and system.torch_cuda is None:
        out.append(Finding("problem", "torch",
                           f"torch {system.torch} is a CPU build but GPU sm "
                           f"{', '.join(system.gpus)} is present: ComfyUI runs on the CPU and "
                           "no CUDA backend can load",
                           "install a CUDA build of torch (https://pytorch.org/get-started/)"))
    if system.torch_cuda_tuple and system.driver_cuda_tuple and \
            system.torch_cuda_tuple[0] > system.driver_cuda_tuple[0]:
        out.append(Finding("problem", "driver",
                           f"torch uses CUDA {system.torch_cuda}; driver {system.driver} "
                           f"supports CUDA {system.driver_cuda} at most: every CUDA call fails",
                           f"update the NVIDIA driver to one for CUDA "
                           f"{system.torch_cuda_tuple[0]}.x"))
    if not system.gpus and system.absent.get("gpus"):
        out.append(Finding("info", "gpu", f"no NVIDIA GPU visible ({system.absent['gpus']}): "
                           "only SDPA can run"))
    for dist, backend_name in BY_DIST.items():
        backend = BACKENDS[backend_name]
        bp = plan.get(backend_name)
        fix = tool_command("install", "--backends", backend_name, python=python)
        inst = installed.get(dist)
        if inst is None:
            if bp is not None and bp.selected is not None:
                out.append(Finding("info", backend_name,
                                   f"{backend.title} is not installed; "
                                   f"{bp.selected.filename} fits this machine",
                                   f"Run: {fix}"))
            hint = None if bp is None else build_hint(
                backend_name, system, cores or os.cpu_count() or 1,
                selected=bp.selected.filename.split("-")[1] if bp.selected else None)
            if hint:
                out.append(Finding("info", backend_name, hint,
                                   "Run: " + tool_command("install", "--build", "--backends",
                                                          backend_name, python=python)))
            continue
        reasons = installed_reasons(dist, inst.version, inst.tags, inst.requires_torch, system)
        reasons = [r for r in reasons if r.kind != "yanked"]
        if not reasons:
            out.append(Finding("ok", backend_name,
                               f"{dist} {inst.version} is installed and fits this machine"))
            continue
        head = reasons[0].text
        if backend_name in proven:
            out.append(Finding("info", backend_name,
                               f"{dist} {inst.version}: {head}, yet the lock proves it works "
                               f"here ({proven[backend_name]})", None,
                               tuple(r.text for r in reasons)))
            continue
        msg = f"{dist} {inst.version}: {head}: {_consequence(reasons, system)}"
        if bp is not None and bp.selected is not None:
            step = f"Run: {fix} (selects {bp.selected.filename})"
        else:
            step = ("Run: " + tool_command("uninstall", "--backends", backend_name,
                                           python=python) + " (no wheel fits "
                    "this machine; ComfyUI then uses PyTorch attention)")
        out.append(Finding("problem", backend_name, msg, step,
                           tuple(r.text for r in reasons)))
    if "xformers" in installed and "flash-attn-4" in installed and \
            "flash-attn" not in installed:
        out.append(Finding("info", "xformers", "xformers and flash-attn-4 are both installed: "
                           "flash-attn-4's 'flash_attn' namespace makes xformers look for "
                           "flash_attn.flash_attn_interface, and xformers 0.0.35 then fails to "
                           "import (seen on an H100)",
                           "Run: " + tool_command("verify", python=python)))
    if "flash-attn" in installed and "flash-attn-4" in installed:
        out.append(Finding("info", "flash4", "flash-attn and flash-attn-4 both install the "
                           "'flash_attn' package: reinstalling flash-attn can remove "
                           "flash_attn/cute"))
    return Diagnosis(system, tuple(out))


def doctor_findings(target: Target, system: System, comfyui: str | None = None,
                    proven: dict[str, str] | None = None) -> list[Any]:
    """An interrupted install undone, the node in ComfyUI (with comfyui), and whether the
    lock still describes this target; into `proven`, the backends a fresh lock verified
    (for diagnose), each with its checks' count."""
    found: list[Any] = []
    # the command that proves this target again (a system interpreter needs --yes to change)
    yes = () if target.is_dedicated else ("--yes",)
    verify = "Run: " + tool_command("verify", *yes, python=target.executable)
    root = comfyui_root(Path(comfyui)) if comfyui else None
    if root is not None:
        mine = read_installed(target.site_dirs).get("comfy-env-attn")
        severity, said, step = node_finding(root, find_nodes(root), tool=__version__,
                                            installed=mine.version if mine else None,
                                            python=target.executable)
        found.append(Finding(severity, "node", said, step))
    journal = Journal(target.prefix)
    # a kill just after the journal went leaves its backups, one during its first write
    # journal.tmp: recover removes them too
    if journal.anything_left():
        try:
            with target_lock(target.prefix, log):
                done = recover(target)
        except AttnError as e:  # an unreadable journal, a read-only target
            found.append(Finding("problem", "install", str(e)))
        else:
            if done:
                found.append(Finding("info", "install", f"an interrupted {done.action} was found "
                                     f"and {done.verb}: " + "; ".join(done)))
    modified = torch_file_problems(target.site_dirs, cache=cache_dir())
    if modified:
        found.append(Finding("problem", "torch", "torch's files do not match its RECORD: "
                             + "; ".join(modified[:8]) + (" ..." if len(modified) > 8 else ""),
                             "Reinstall it from where it came: pip install --force-reinstall "
                             "--no-deps torch==<its version>"))
    path = lockfile.lock_path(target.prefix)
    if not path.exists():
        if installed_backends(read_installed(target.site_dirs)):
            found.append(Finding("info", "lock", f"no lock at {path}: the dispatcher cannot "
                                 "trust the installed backends", verify))
        else:  # the dispatcher says so at every start until there is one; with no torch,
            #     install would refuse, and the torch finding says what to do first
            found.append(Finding("info", "lock", f"no lock at {path}: the dispatcher uses "
                                 "PyTorch SDPA and warns that it has no lock",
                                 "Run: " + tool_command("install", *yes,
                                                        python=target.executable)
                                 + " (it writes one, SDPA alone when no other backend fits)"
                                 if target.facts.get("torch") else None))
        return found
    try:
        doc = lockfile.read(path)
        stale = lockfile.stale(doc, target.executable)
    except AttnError as e:
        return [*found, Finding("problem", "lock", str(e), verify)]
    if stale:
        found.append(Finding("problem", "lock", "the lock is stale: " + "; ".join(stale) +
                             ": the dispatcher falls back to SDPA", verify))
    else:
        tool = tool_table(doc)
        if proven is not None:
            proven.update({n: f"verified, {sum(c.passed for c in b.checks)}/{len(b.checks)} "
                              "checks passed" for n, b in tool.verified().items()})
        found.append(Finding("info", "lock", f"lock {path} is fresh; auto order: "
                             f"{', '.join(tool.auto)}"))
        found += [Finding("info", "dispatch", line) for line in dispatch_preview(tool)]
    return found


# Typical calls: (label, [B, H, N, D], key/value length)
PREVIEW_CALLS = (("Flux 1024x1024", [1, 24, 4608, 128], 4608), ("SDXL", [2, 10, 4096, 64], 4096),
                 ("SDXL cross-attention", [2, 10, 4096, 64], 77),
                 ("SD 1.5 head dim 80", [2, 8, 1024, 80], 1024),
                 ("video", [1, 40, 32760, 128], 32760))


def dispatch_preview(tool: ToolTable) -> list[str]:
    """What `auto` would pick for typical calls, and why (the dispatcher's own rule)."""
    from comfy_env_attn.core.backends import Call
    from comfy_env_attn.core.choose import choose, close_call
    from comfy_env_attn.core.settings import settle_margin

    dtype = "bfloat16" if tool.fingerprint.device == "cuda" else "float32"
    margin = settle_margin()
    out = []
    for label, shape, kv in PREVIEW_CALLS:
        call = Call(dtype=dtype, head_dim=shape[3], q_len=shape[2], kv_len=kv,
                    q_heads=shape[1], kv_heads=shape[1], device=tool.fingerprint.device)
        c = choose(tool.verified(), call)
        best = c.order[0]
        rest = ", ".join(c.names[1:])
        close = close_call(c.order, margin)
        over = "; ".join(f"{n} passed over: {why[0]}" for n, why in c.passed_over)
        out.append(f"auto for {label} {shape} kv {kv} {dtype}: {best.name} ({best.why})"
                   + (f"; then {rest}" if rest else "")
                   + (f"; {' and '.join(close)} are within {margin:.0%}: timed on the real "
                      "input at first use" if close else "")
                   + (f" [{over}]" if over else ""))
    return out
