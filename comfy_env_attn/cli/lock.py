"""lock, bench and launch-args: read what verification proved."""

from __future__ import annotations

import argparse
from pathlib import Path

from comfy_env_attn import lockfile
from comfy_env_attn.cli.commands import locate
from comfy_env_attn.cli.install import verify_options
from comfy_env_attn.cli.output import console, dump_json
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.progress import log
from comfy_env_attn.facts.installed import installed_backends, read_installed
from comfy_env_attn.facts.probe import probe_gpus, probe_interpreter, system_from
from comfy_env_attn.verify.run import verify


def cmd_lock(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    system = system_from(target, probe_gpus())
    path = Path(args.file) if args.file else lockfile.lock_path(target.prefix)
    doc = lockfile.read(path)
    tool = doc["tool"]["comfy-env-attn"]
    stale = lockfile.lock_status(doc, target, system)
    if args.json:
        dump_json({"path": str(path), "fresh": not stale, "stale": stale,
                   "auto": tool.get("auto", []), "backends": tool.get("backends", {})})
    else:
        from rich.table import Table

        t = Table(title=str(path))
        for col in ("backend", "status", "version", "speed vs SDPA", "note"):
            t.add_column(col)
        for name, info in tool.get("backends", {}).items():
            t.add_row(name, info.get("status", ""), info.get("version", ""),
                      f"{info['speed_vs_sdpa']:.2f}x" if "speed_vs_sdpa" in info else "",
                      info.get("error", "")[:80])
        console().print(t)
        print(f"auto order: {', '.join(tool.get('auto', []))}")
        print("fingerprint: fresh" if not stale else
              "fingerprint: STALE: " + "; ".join(stale) + " (run: comfy-env-attn verify)")
    return 0 if not stale else 1


def cmd_bench(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    installed = read_installed(target.site_dirs)
    names = bk.parse_list(args.backends) if args.backends else installed_backends(installed)
    results = verify(target.executable, names, verify_options(args), progress=log)
    base = {lockfile.shape_key(b["shape"]): b for b in results["sdpa"].bench if "tflops" in b}
    from rich.table import Table

    t = Table(title="attention throughput (TFLOP/s, 4*B*H*N^2*D per call; ratio to SDPA)")
    t.add_column("shape")
    for n in results:
        t.add_column(n, justify="right")
    for key in base:
        cells = []
        for r in results.values():
            b = next((x for x in r.bench if lockfile.shape_key(x["shape"]) == key), None)
            if b is None or "tflops" not in b:
                cells.append("failed" if not r.passed else (b or {}).get("error", "-")[:20])
            else:
                ratio = b["tflops"] / base[key]["tflops"]
                cells.append(f"{b['tflops']:.3g} ({ratio:.2f}x)")
        t.add_row(key, *cells)
    console().print(t)
    return 0


LAUNCH_FLAGS = {"sage": "--use-sage-attention", "flash": "--use-flash-attention",
                "sdpa": "--use-pytorch-cross-attention"}


def cmd_launch_args(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    system = system_from(target, probe_gpus())
    doc = lockfile.read(lockfile.lock_path(target.prefix))
    stale = lockfile.lock_status(doc, target, system)
    if stale:
        raise AttnError("the lock is stale (" + "; ".join(stale) + "): run comfy-env-attn "
                        "verify first")
    tool = doc["tool"]["comfy-env-attn"]
    order = tool.get("exact" if args.exact else "auto", [])
    for name in order:
        if name in LAUNCH_FLAGS:
            print(LAUNCH_FLAGS[name])
            skipped = order[:order.index(name)]
            if skipped:
                log(f"{', '.join(skipped)} ranked higher but ComfyUI has no launch flag for "
                    "them: use the Attention Backend node for per-shape choice")
            return 0
        if name == "xformers":
            print("")  # ComfyUI uses xformers by default when it imports
            log("xformers: ComfyUI uses it by default when installed (no flag)")
            return 0
    print(LAUNCH_FLAGS["sdpa"])
    return 0


COMMANDS = {"lock": cmd_lock, "bench": cmd_bench, "launch-args": cmd_launch_args}
