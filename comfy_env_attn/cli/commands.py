"""The commands: gather facts at the edges, call the pure deciders, print the results."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from comfy_env_attn.candidates.sources import Sources
from comfy_env_attn.cli import planning, target_named
from comfy_env_attn.cli.output import console, dump_json
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import AttnError, UsageError
from comfy_env_attn.core.progress import log, name_target
from comfy_env_attn.facts.locate import find_python_auto
from comfy_env_attn.facts.probe import GpuFacts, Target, probe, probe_interpreter, system_from
from comfy_env_attn.facts.system import System, load_profile
from comfy_env_attn.resolve import Pin, Plan


def locate(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The target interpreter and how it was found; a script followed to the interpreter it
    runs (a pyenv shim) is said."""
    exe, how = find_python_auto(python=getattr(args, "python", None),
                                comfyui=getattr(args, "comfyui", None),
                                use_workspace=getattr(args, "comfy_cli", False))
    # the steps given name it so (--python: as ever, unless it is the running Python)
    name_target(exe, ("--comfyui", args.comfyui) if getattr(args, "comfyui", None) else
                ("--comfy-cli",) if getattr(args, "comfy_cli", False) else ())
    for line in how[1:]:
        log(line)
    return exe, how


def probe_target(args: argparse.Namespace, *, use_cache: bool = True) -> tuple[Target, System]:
    exe, _how = locate(args)
    target, system, _gpus = probe(exe, use_cache=use_cache)
    return target, system


def sources_from(args: argparse.Namespace) -> Sources:
    return planning.sources_from(args)


def make_plan(system: System, args: argparse.Namespace,
              backends: list[str] | None = None, pins: dict[str, Pin] | None = None) -> Plan:
    names = backends if backends is not None else bk.parse_list(getattr(args, "backends", None))
    return planning.make_plan(planning.Request(system, names, pins or {}), sources_from(args))


# -- probe --------------------------------------------------------------------------------

def cmd_probe(args: argparse.Namespace) -> int:
    target, system = probe_target(args, use_cache=not args.no_cache)
    if args.toml:
        import tomli_w

        # where it came from, as comments: a table here would take in every key a user
        # appends (the GPU's, for a profile written without it) and hide it from the loader
        head = [f"# A System profile: comfy-env-attn probe --toml, "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, of {target.executable}"
                " (GPU facts from NVML, else nvidia-smi)."]
        if system.absent:
            head.append("# Not found here:")
            head += [f"#   {k}: {' '.join(str(v).split())}" for k, v in system.absent.items()]
        sys.stdout.write("\n".join(head) + "\n" + tomli_w.dumps(system.to_dict()))
        return 0
    if args.json:
        dump_json({"schema": 1, "command": "probe", "system": system.to_dict(),
                   "absent": system.absent,
                   "executable": target.executable, "prefix": str(target.prefix),
                   "is_venv": target.is_venv, "environment": target.kind,
                   "cached": target.cached})
        return 0
    from rich.table import Table

    t = Table(title=f"Target: {target.executable}", show_header=False)
    t.add_column("fact", style="bold")
    t.add_column("value")
    d = system.to_dict()
    said: dict[str, str] = {}  # a reason already given -> the fact it was given for
    for key in ("python", "platform", "arch", "glibc", "torch", "torch_cuda", "cxx11abi",
                "driver", "driver_cuda", "gpus", "gpu_names"):
        value = d.get(key)
        shown = ", ".join(value) if isinstance(value, list) else value
        if value is None:
            why = system.absent.get(key) or system.absent.get(
                {"gpu_names": "gpus"}.get(key, key.split("_")[0]), "unknown")
            # one NVML failure leaves the driver, its CUDA and the GPUs unknown: said once
            shown = f"[dim]absent: {f'as {said[why]}' if why in said else why}[/dim]"
            said.setdefault(why, key)
        t.add_row(key, str(shown))
    t.add_row("environment", {"venv": "venv", "conda": "conda env",
                              "embedded": "embeddable Python (e.g. ComfyUI portable)",
                              "system": "system interpreter"}[target.kind])
    console().print(t)
    return 0


# -- plan ---------------------------------------------------------------------------------

def _system_for(args: argparse.Namespace) -> System:
    if getattr(args, "system", None):
        return load_profile(args.system)
    return probe_target(args)[1]


def profile_warnings(args: argparse.Namespace, profile: System) -> list[str]:
    """Where --system contradicts the real target (nothing when it cannot be probed, or
    when no target was named: `plan --system FILE` alone describes another machine, and the
    Python running this tool is no target of it)."""
    if not target_named(args):
        return []
    try:
        exe, _how = locate(args)
        real = system_from(probe_interpreter(exe), GpuFacts())
    except AttnError:
        return []
    return [f"the profile {args.system} says {f} (resolving for the profile, not for {exe})"
            for f in planning.profile_disagreements(profile, real)]


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = planning.load_config(args)
    base = _system_for(args)
    requests = planning.requests(args, cfg, base)
    if cfg is not None and not requests:
        line = planning.nothing_to_do(args, cfg, base)
        if args.json:
            from comfy_env_attn.resolve import PLAN_SCHEMA

            dump_json({"schema": PLAN_SCHEMA, "environments": [], "nothing_to_do": line})
        else:
            print(line)
        return 0
    warnings = profile_warnings(args, base) if args.system else []
    plans = [planning.make_plan(req, sources_from(args)) for req in requests]
    if args.json:
        docs = [dict(replace(p, warnings=(*warnings, *p.warnings)).to_json(),
                     **({"env": r.env.name} if r.env else {}))
                for p, r in zip(plans, requests, strict=True)]
        dump_json(docs[0] if len(docs) == 1 else {"schema": docs[0]["schema"],
                                                   "environments": docs}, compact=True)
        return 0
    from rich.markup import escape

    for plan, req in zip(plans, requests, strict=True):
        if req.env is not None:
            console().print(f"[bold]Environment[/bold] {escape(req.env.describe())}",
                            highlight=False)
        print_plan(plan, verbose=args.verbose)
    for w in warnings:
        console().print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    return 0


def wheel_columns(filename: str) -> tuple[str, str, str]:
    """(version, local build label, Python and platform), compact: what a table has room
    for. The full name goes in -v and --json."""
    from comfy_env_attn.candidates.wheelname import InvalidWheelName, parse_wheel_name

    try:
        w = parse_wheel_name(filename)
    except InvalidWheelName:
        return filename, "", ""
    pys = sorted({t.interpreter for t in w.tags})
    abi3 = any(t.abi == "abi3" for t in w.tags)
    py = ",".join(pys) + ("+ (abi3)" if abi3 else "")
    plats = sorted({t.platform for t in w.tags})
    return (str(w.version) + (f" build {w.build}" if w.build else ""), w.local or "-",
            f"{py} {_platform_text(plats)}")


def _platform_text(plats: list[str]) -> str:
    import re

    if plats == ["any"]:
        return "any platform"
    glibc = [(int(m[1]), int(m[2]), m[3]) for p in plats
             if (m := re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", p))]
    legacy = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
    for p in plats:
        head, _, arch = p.partition("_")
        if head in legacy:
            glibc.append((*legacy[head], arch))
    if glibc:
        low = min(glibc)
        return f"linux {low[2]}, glibc >= {low[0]}.{low[1]}"
    return ", ".join(p.replace("_", " ", 1) for p in plats)


def print_plan(plan: Plan, *, verbose: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    from comfy_env_attn.core import progress as core_progress
    from comfy_env_attn.resolve import rule_counts

    con = console()
    con.print(f"[bold]Plan for[/bold] {escape(plan.system.describe())}", highlight=False)
    t = Table(show_lines=False, caption="passed over: the wheels rejected, counted by rule "
                                        "(a wheel may fail several)", caption_justify="left")
    t.add_column("backend", style="bold")
    # on a narrow terminal a long version, label or source wraps rather than being cut
    t.add_column("version / why none", overflow="fold")
    t.add_column("build", overflow="fold")
    t.add_column("python, platform", overflow="fold")
    t.add_column("source", overflow="fold")
    t.add_column("passed over", justify="right")
    no_gpu = planning.no_gpu_reason(plan)
    for b in plan.backends:
        if b.builtin:
            t.add_row(b.backend, "built into torch" if not b.reason else escape(b.reason), "",
                      "", "torch", "")
            continue
        counts = rule_counts(b.rejected, 3)
        summary = f"{len(b.rejected)}" + (f" ({counts})" if counts else "")
        if b.selected:
            t.add_row(b.backend, *map(escape, wheel_columns(b.selected.filename)),
                      escape(b.selected.source), summary)
        else:
            t.add_row(b.backend, f"[red]none[/red]: {escape(b.reason or '')}", "", "", "",
                      summary)
    con.print(t)
    if no_gpu:
        con.print(f"[yellow]no NVIDIA GPU seen[/yellow]: {escape(no_gpu)}; "
                  f"{escape(planning.no_gpu_hint())}", highlight=False)
    for b in plan.backends:
        for n in b.notes:
            con.print(f"[yellow]note[/yellow] {b.backend}: {escape(n)}", highlight=False)
    for w in plan.warnings:
        con.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    if verbose:
        for b in plan.backends:
            if b.selected is not None:
                con.print(f"{b.backend}: selected {b.selected.filename} ({b.selected.url})",
                          markup=False, highlight=False)
        for b in plan.backends:
            for r in b.rejected:
                con.print(f"{b.backend}: {r.candidate.filename}", markup=False)
                for x in r.reasons:
                    con.print(f"    - {x.text}", markup=False)
    elif not core_progress.QUIET and (any(b.rejected for b in plan.backends) or
                                      any(b.selected for b in plan.backends)):  # -q: results
        con.print("[dim]-v gives each selected wheel's full name and every rejected wheel "
                  "with its reasons; --json gives them all[/dim]")


# -- doctor -------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from comfy_env_attn.doctor import Diagnosis, diagnose
    from comfy_env_attn.facts.installed import read_installed

    target, system = probe_target(args)
    from comfy_env_attn.doctor import doctor_findings

    proven: dict[str, str] = {}
    extra = doctor_findings(target, system, comfyui=getattr(args, "comfyui", None),
                            proven=proven)
    plan = make_plan(system, args)
    installed = read_installed(target.site_dirs)
    diag = diagnose(system, installed, plan, python=target.executable, proven=proven)
    findings = list(diag.findings) + extra
    diag = Diagnosis(system, tuple(findings))
    if args.json:
        dump_json({"schema": 1, "command": "doctor", "healthy": diag.healthy,
                   "python": target.executable,
                   "system": system.to_dict(), "absent": system.absent,
                   "findings": [f.to_json() for f in diag.findings]})
    else:
        print_diagnosis(diag, target)
    return 0 if diag.healthy else 1


def print_diagnosis(diag: Any, target: Target) -> None:
    from rich.markup import escape

    con = console()
    con.print(f"[bold]Target[/bold] {escape(target.executable)}")
    con.print(f"        {escape(diag.system.describe())}")
    for f in diag.findings:
        mark = {"problem": "[red]PROBLEM[/red]", "ok": "[green]ok[/green]  "}.get(
            f.severity, "[blue]info[/blue] ")
        # messages quote TOML tables ([tool.comfy-env-attn]): never read as rich markup
        con.print(f"{mark} [bold]{escape(f.subject)}[/bold]: {escape(f.message)}",
                  highlight=False)
        if f.next_step:
            con.print(f"        next: {escape(f.next_step)}", highlight=False)
    con.print("[green]healthy[/green]" if diag.healthy
                  else "[red]problems found[/red] (exit 1)")


# -- verify -------------------------------------------------------------------------------

def included(text: str | None) -> list[str]:
    """--include: the backends verification leaves out unless asked (shipped plugins)."""
    from comfy_env_attn.verify.run import SHIPPED_PLUGINS

    out: list[str] = []
    for part in (text or "").split(","):
        name = part.strip().lower()
        if not name or name in out:
            continue
        if name not in SHIPPED_PLUGINS:
            try:
                known = f"{bk.canonical(name)} is verified whenever its package is installed"
            except UsageError:
                known = f"unknown backend {name!r}"
            raise UsageError(f"--include {name}: {known}; --include names what verification "
                             f"leaves out unless asked: {', '.join(sorted(SHIPPED_PLUGINS))}")
        out.append(name)
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    """Prove what is installed (each backend's variants too) and rewrite the lock; plus the
    backends --include names, and those a previous --include put in the lock
    (installer.locked_plugins)."""
    from comfy_env_attn.cli.install import (
        install_json,
        print_summary,
        refuse_shared,
        verify_options,
    )
    from comfy_env_attn.core.progress import log, tool_command
    from comfy_env_attn.install.installer import recover, reverify
    from comfy_env_attn.install.journal import target_lock

    asked = included(getattr(args, "include", None))
    opts = replace(verify_options(args), include=tuple(asked))
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    refuse_shared(exe, target, args)  # it rewrites the lock in the target's prefix
    with target_lock(target.prefix, log):
        recovered = recover(target)
        target = probe_interpreter(exe)
        out, ok = reverify(target, opts)
    for name in asked:  # named now: its failure is the command's (a locked one's is not)
        row = out.row(name)
        ok = ok and row.result is not None and row.result.passed
    out.ok = ok
    if getattr(args, "json", False):
        dump_json(install_json(out, target.executable, command="verify",
                               recovered=recovered))
    else:
        print_summary(out, target)
    if not ok:  # what failed, what that means, and the way out, as doctor gives it
        failed = [b for b, row in out.rows.items() if row.result is not None and
                  not row.result.passed and not row.result.absent]  # n/a: no failure
        step = "" if not failed else "; to take them out, run: " + tool_command(
            "uninstall", "--backends", ",".join(bk.primaries(failed)), python=exe)
        print(f"ERROR verification failed: {', '.join(failed) or 'see the rows above'} "
              f"(the lock sends none of their calls there: PyTorch's SDPA runs them){step}",
              file=sys.stderr)
    return 0 if ok else 1


COMMANDS = {"probe": cmd_probe, "plan": cmd_plan, "doctor": cmd_doctor, "verify": cmd_verify}


def handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The function of a command, its module imported: the install machinery, the source
    build and the node's setup load only for the commands that use them."""
    if command in COMMANDS:
        return COMMANDS[command]
    if command == "build":
        from comfy_env_attn.cli.build import cmd_build

        return cmd_build
    if command == "node":
        from comfy_env_attn.cli.node import cmd_node

        return cmd_node
    if command == "cache":
        from comfy_env_attn.cli.cache import cmd_cache

        return cmd_cache
    if command in ("install", "uninstall"):
        from comfy_env_attn.cli import install

        return install.COMMANDS[command]
    from comfy_env_attn.cli import lock

    return lock.COMMANDS[command]
