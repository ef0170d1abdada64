"""lock, bench and launch-args: read what verification proved."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from comfy_env_attn import lockfile
from comfy_env_attn.cli.commands import locate
from comfy_env_attn.cli.install import verify_options
from comfy_env_attn.cli.output import console, dump_json
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.lockmodel import not_proven, tool_table
from comfy_env_attn.core.progress import log, tool_command
from comfy_env_attn.facts.installed import installed_backends, read_installed
from comfy_env_attn.facts.probe import probe_interpreter
from comfy_env_attn.verify.run import Result, baseline_failure, one_line, verify


def cmd_lock(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    path = Path(args.file) if args.file else lockfile.lock_path(target.prefix)
    if not args.file and not path.exists():
        raise AttnError(f"no lock at {path}: run "
                        f"{tool_command('install', python=target.executable)} (or verify, "
                        "for backends installed otherwise)")
    from comfy_env_attn.install.journal import Journal

    if Journal(target.prefix).exists():  # what the lock says may be about to change
        log(f"an install or uninstall in {target.prefix} was interrupted and is still to be "
            "finished or undone: the next install, verify, uninstall or doctor does it (or "
            "it is running now)")
    doc = lockfile.read(path)
    tool = tool_table(doc)
    stale = lockfile.stale(doc, target.executable)
    if args.json:
        dump_json({"schema": 1, "command": "lock", "path": str(path), "fresh": not stale,
                   "stale": stale,
                   "auto": list(tool.auto),
                   "backends": {n: b.to_dict() for n, b in tool.backends.items()}})
    else:
        from rich.table import Table

        t = Table(title=str(path))
        for col in ("backend", "status", "version", "checks passed", "speed vs SDPA", "note"):
            t.add_column(col, overflow="fold")
        # a backend not verified has no version of its own in the tool table: its wheel's
        wheel_versions = {w.backend: w.version for w in lockfile.wheels_of(doc)}
        for name, rec in tool.backends.items():
            passed = sum(c.passed for c in rec.checks)
            version = rec.version or wheel_versions.get(bk.primary(name), "")
            absent = bk.not_in_package(name, rec.stage)
            missing = not_proven((c.variant, c.head_dim, c.dtype, c.passed)
                                 for c in rec.checks) if rec.verified else ""
            unchecked = name == "sdpa" and not rec.checks  # PyTorch's own, never run here
            t.add_row(name, "n/a" if absent else "builtin" if unchecked else rec.status,
                      version, f"{passed}/{len(rec.checks)}" if rec.checks else "",
                      f"{rec.speed_vs_sdpa:.2f}x" if rec.speed_vs_sdpa is not None else "",
                      f"not in this package ({rec.error})" if absent else rec.error or
                      (f"not proven, to SDPA: {missing}" if missing else "") or
                      ("PyTorch's own, not checked here" if unchecked else ""))
        console().print(t)
        print(f"auto order: {', '.join(tool.auto)}")
        print("fingerprint: fresh" if not stale else
              "fingerprint: STALE: " + "; ".join(stale)
              + f" (run: {tool_command('verify', python=target.executable)})")
    return 0 if not stale else 1


def cmd_bench(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    installed = read_installed(target.site_dirs)
    here = installed_backends(installed)
    names = bk.parse_list(args.backends) if args.backends else here
    absent = [b for b in names if bk.BACKENDS[b].dist and bk.BACKENDS[b].dist not in installed]
    if absent:  # said at once, not after starting the target to find the import failing
        packages = ",".join(bk.primaries(absent))
        raise AttnError(f"{', '.join(absent)}: not installed in {target.executable}, and bench "
                        "times what is installed; "
                        + tool_command("install", "--backends", packages,
                                       python=target.executable) + " puts it in")
    if not [b for b in names if bk.BACKENDS[b].dist]:
        # SDPA alone: nothing to time it against, so nothing to start the target for
        only = ("nothing to compare: bench times the backends that pass verification "
                "against each other, and " + (
                    f"--backends names only sdpa (PyTorch's own); installed here: "
                    f"{', '.join(here)}" if args.backends and here else
                    f"only sdpa (PyTorch's own) is in {target.executable}; install a backend "
                    f"first ({tool_command('plan', python=target.executable)} shows which "
                    "fit)"))
        if getattr(args, "json", False):
            dump_json({"schema": 1, "command": "bench", "python": target.executable,
                       "device": None, "backends": {}, "shapes": [], "note": only})
        else:
            print(only)
        return 0
    opts = verify_options(args)
    results = verify(target.executable, names, opts, progress=log)
    if not results["sdpa"].passed:  # the reference every ratio is to
        raise AttnError(baseline_failure(target.executable, results["sdpa"], opts.device))
    base = {_label(b): b for b in results["sdpa"].bench if "tflops" in b}
    note = None if base else nothing_to_compare(results, target.executable)
    if getattr(args, "json", False):
        dump_json({**bench_json(target.executable, results, base),
                   **({"note": note} if note else {})})
        return 0
    if note:
        print(note)
        return 0
    from rich.table import Table

    t = Table(title="attention throughput (TFLOP/s, 4*B*H*N^2*D per call; ratio to SDPA)")
    t.add_column("shape")
    for n in results:
        t.add_column(n, justify="right")
    for key in base:
        cells = []
        for r in results.values():
            b = next((x for x in r.bench if _label(x) == key), None)
            if b is None or "tflops" not in b:
                cells.append("n/a" if r.absent else "failed" if not r.passed else
                             (b or {}).get("error", "-")[:20])
            else:
                ratio = b["tflops"] / base[key]["tflops"]
                cells.append(f"{b['tflops']:.3g} ({ratio:.2f}x)")
        t.add_row(key, *cells)
    console().print(t)
    return 0


def nothing_to_compare(results: dict[str, Result], python: str) -> str:
    """Why bench has no table: it times the backends that pass verification against each
    other, and fewer than two did (in the target `python`)."""
    passed = [n for n, r in results.items() if r.passed]
    failed = [f"{n} ({one_line(r.error) or 'failed'})" for n, r in results.items()
              if not r.passed and not r.absent]
    return ("nothing to compare: bench times the backends that pass verification against "
            "each other, and " + (f"only {', '.join(passed)}" if passed else "none")
            + " passed here"
            + (f"; failed: {'; '.join(failed)}" if failed else
               f"; install a backend first ({tool_command('plan', python=python)} shows "
               "which fit)"))


def bench_json(python: str, results: dict[str, Result], base: dict[str, dict[str, Any]]
               ) -> dict[str, Any]:
    """bench --json (docs/json.md): each shape SDPA was timed at, each backend's time there
    and its ratio to SDPA, or why it has none."""
    shapes = []
    for key, ref in base.items():
        cells: dict[str, Any] = {}
        for name, r in results.items():
            b = next((x for x in r.bench if _label(x) == key), None)
            if b is not None and "tflops" in b:
                cells[name] = {"ms": b.get("ms"), "tflops": b["tflops"],
                               "vs_sdpa": b["tflops"] / ref["tflops"]}
            else:
                cells[name] = {"error": (b or {}).get("error") or
                               ("not in this package" if r.absent else
                                "failed verification" if not r.passed else "not timed")}
        shapes.append({"shape": ref["shape"], "kv_len": ref.get("kv_len"),
                       "dtype": ref.get("dtype"), "results": cells})
    return {"schema": 1, "command": "bench", "python": python,
            "device": (results["sdpa"].data.get("device") or {}).get("type"),
            "backends": {n: {"passed": r.passed, "error": r.error,
                             "version": r.data.get("version")} for n, r in results.items()},
            "shapes": shapes}


def _label(row: dict[str, Any]) -> str:
    shape = "x".join(str(x) for x in row["shape"])
    return f"{shape} kv{row['kv_len']}" if row.get("kv_len") else shape


LAUNCH_FLAGS = {"sage": "--use-sage-attention", "flash": "--use-flash-attention",
                "sdpa": "--use-pytorch-cross-attention"}


def cmd_launch_args(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    doc = lockfile.read(lockfile.lock_path(target.prefix), python=target.executable)
    stale = lockfile.stale(doc, target.executable)
    if stale:
        raise AttnError("the lock is stale (" + "; ".join(stale) + "): run "
                        f"{tool_command('verify', python=target.executable)} first")
    tool = tool_table(doc)
    order = tool.exact if args.exact else tool.auto
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
