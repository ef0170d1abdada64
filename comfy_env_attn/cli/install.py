"""install and verify: the commands; the work is in install.installer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from comfy_env_attn import lockfile
from comfy_env_attn.candidates.sources import Candidate
from comfy_env_attn.cli import planning
from comfy_env_attn.cli.commands import locate
from comfy_env_attn.cli.output import console, dump_json
from comfy_env_attn.cli.progress import DownloadProgress, uv_passthrough
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import InstallError, UsageError
from comfy_env_attn.core.progress import log, tool_command
from comfy_env_attn.facts.probe import (
    GpuFacts,
    Target,
    no_torch,
    probe_gpus,
    probe_interpreter,
    system_from,
)
from comfy_env_attn.facts.system import disagreements, load_profile
from comfy_env_attn.install.installer import (
    InstallOptions,
    Outcome,
    Recovery,
    Row,
    recover,
    run_install,
    run_uninstall,
    uninstall_targets,
)
from comfy_env_attn.install.journal import target_lock
from comfy_env_attn.resolve import Plan
from comfy_env_attn.verify.run import Options, Result


def cmd_install(args: argparse.Namespace) -> int:
    given = [o for o, on in (("--config", args.config), ("--system", args.system),
                             ("--build", args.build), ("--source", args.source),
                             ("--env", args.env)) if on]
    if args.from_lock and given:  # each of those chooses wheels anew; the lock has chosen
        raise UsageError(f"--from-lock installs exactly what the lock records: {given[0]} "
                         "would choose anew; give one or the other")
    if args.source and not args.build:
        raise UsageError("--source names what --build compiles: add --build")
    if args.from_lock and not Path(args.from_lock).is_file():
        raise InstallError(f"--from-lock {args.from_lock}: " + (
            "a folder, not a lock file" if Path(args.from_lock).is_dir() else "no such file")
            + " (give the pylock.comfy-env-attn.toml of the machine to reproduce)")
    exe, _how = locate(args)
    target = probe_interpreter(exe)
    base = load_profile(args.system) if args.system else system_from(target, probe_gpus())
    refusals: list[str] = []  # why the install would stop

    def refuse(why: list[str]) -> None:
        """Stop now; a dry run goes on to show its plan, and says it after it."""
        if why and not args.dry_run:
            raise InstallError(why[0])
        refusals.extend(why)

    refuse([] if shared_ok(target, args) else [shared_refusal(exe, target)])
    # no torch: nothing to choose wheels for or verify them against, unless --force says to
    # go on (a profile or the config describes the machine the wheels are for); said after
    # the description's own disagreements, the likelier mistake where there is one
    torchless = [] if target.facts.get("torch") or getattr(args, "force", False) else \
        ["; ".join(no_torch(target.executable)) + " (--force installs anyway)"]
    out = Outcome()
    plan = None
    unbuildable: dict[str, str] = {}  # install --build: why it cannot build these
    would_build: dict[str, str] = {}  # install --dry-run --build: what it would build
    brought: list[lockfile.LockedWheel] = []  # --from-lock: its requirements, for a dry run
    if args.from_lock:
        refuse(torchless)
        doc = lockfile.read(Path(args.from_lock))
        chosen = []
        for lw in lockfile.wheels_of(doc):
            if lw.brought_by:  # a backend's requirement: resolved again, as the backend's
                brought.append(lw)
                continue
            if lw.backend not in bk.BACKENDS or not bk.BACKENDS[lw.backend].dist:
                raise InstallError(f"{args.from_lock} locks {lw.name} {lw.version}, which is "
                                   f"not an attention backend ({', '.join(bk.BY_DIST)}): "
                                   "refusing the lock; install never changes torch")
            chosen.append((lw.backend, [Candidate(lw.filename, lw.url,
                                                  f"lock:{args.from_lock}",
                                                  sha256=lw.sha256)]))
        if not chosen:
            log(f"{args.from_lock} records no backend (only what an uninstall left): "
                "nothing to install from it")
        if args.backends:  # those of the lock's backends alone
            named = bk.parse_list(args.backends)
            locked = [c for c, _ in chosen]
            unlocked = [b for b in named if bk.BACKENDS[b].dist and
                        bk.primary(b) not in locked]
            if unlocked:
                raise UsageError(f"--backends {args.backends}: {args.from_lock} locks no "
                                 f"wheel of {', '.join(unlocked)} (it locks "
                                 f"{', '.join(locked) or 'none'})")
            wanted = bk.primaries(named)
            chosen = [(c, alts) for c, alts in chosen if c in wanted]
    else:
        cfg = planning.load_config(args)
        reqs = planning.requests(args, cfg, base)
        if cfg is not None and not reqs:
            line = planning.nothing_to_do(args, cfg, base)
            if args.json:
                dump_json(install_json(Outcome(), target.executable, nothing_to_do=line))
            else:
                print(line)
            return 0
        if len(reqs) > 1:
            raise UsageError(f"{args.config} has several environments that ask for attention "
                             f"packages ({', '.join(r.env.name for r in reqs if r.env)}); "
                             "they are different interpreters: pick one with --env NAME")
        req = reqs[0]
        described, refused = _check_described(args, exe, target, req)
        refuse(refused + torchless)  # before any index is read or anything built
        plan = planning.make_plan(req, planning.sources_from(args))
        if args.build:
            from comfy_env_attn.cli.build import build_missing

            built = build_missing(args, target, req.system, plan,
                                  lambda: planning.make_plan(req, planning.sources_from(args)))
            plan, unbuildable, would_build = built.plan, built.unbuildable, built.would_build
        chosen = []
        no_gpu = planning.no_gpu_reason(plan)
        if no_gpu and not args.dry_run:  # --dry-run's table says it
            log(f"no NVIDIA GPU seen: {no_gpu}; {planning.no_gpu_hint()}")
        for bp in plan.backends:
            if bp.builtin:
                continue
            if bp.backend in would_build:  # --dry-run --build: built, it will have one
                out.row(bp.backend).note = would_build[bp.backend]
                out.row(bp.backend).action = "would-build"
            elif bp.selected is None:
                out.row(bp.backend).note = "; ".join(
                    [f"no wheel: {bp.reason or ''}", *([unbuildable[bp.backend]]
                                                       if bp.backend in unbuildable else [])])
                out.row(bp.backend).action = "no-wheel"
                out.row(bp.backend).asked = bool(args.backends or args.config)
                if out.row(bp.backend).asked:
                    out.ok = False  # asked for by name: not having it is a failure
            else:
                alts = [bp.selected] + [r.candidate for r in bp.rejected
                                        if r.reasons and r.reasons[0].kind == "ranked"]
                chosen.append((bp.backend, alts))
        for w in [*described, *plan.warnings]:
            log(f"warning: {w}")
    chosen.sort(key=lambda t: t[0] == "flash4")  # flash-attn before flash-attn-4
    if refusals:  # only a dry run gets here with any: its plan, then why it stops (ERROR)
        out.ok = False

    def say_failure() -> None:  # the ERROR line, beside a --json document too (docs/json.md)
        if refusals:  # the reasons themselves, -q or not
            print(f"ERROR install would refuse: {'; and '.join(refusals)}", file=sys.stderr)
        elif not out.ok:
            print(f"ERROR {out.why_not_ok()}", file=sys.stderr)

    if plan is not None and not args.json and (args.dry_run or args.verbose):
        from comfy_env_attn.cli.commands import print_plan

        print_plan(plan, verbose=args.verbose)  # with -v, every wheel passed over and why
    if args.dry_run:
        if args.json:
            for b, alts in chosen:
                row = out.row(b)
                row.action, row.wheel, row.candidate = "would-install", alts[0].filename, alts[0]
            doc = install_json(out, target.executable, plan=plan, dry_run=True)
            dump_json({**doc, **({"refused": refusals} if refusals else {})})
            say_failure()
            return 0 if out.ok else 1
        for b, alts in chosen:
            print(f"would install {b}: {alts[0].filename} from {alts[0].url}"
                  + (f" ({len(alts) - 1} fitting alternatives if it cannot be had)"
                     if len(alts) > 1 else ""))
        for b, what in would_build.items():  # then install the wheel built
            print(f"{b}: {what}, then install it")
        for lw in brought:  # --from-lock: what came with them, resolved again as they need
            if set(lw.brought_by) & {b for b, _ in chosen}:
                print(f"and {lw.name} (the lock records {lw.version}, brought by "
                      f"{', '.join(lw.brought_by)}), which the install resolves again as "
                      "they require")
        say_failure()
        return 0 if out.ok else 1
    with target_lock(target.prefix, log):
        recovered = recover(target)
        target = probe_interpreter(exe)
        run_install(target, chosen, out, install_options(args))
    if args.json:
        dump_json(install_json(out, target.executable, plan=plan, recovered=recovered))
    else:
        print_summary(out, target)
    say_failure()
    return 0 if out.ok else 1


def shared_ok(target: Target, args: argparse.Namespace) -> bool:
    """Whether this target may be changed: an environment of its own (a venv, a conda env,
    an embeddable Python) or one the user said yes to."""
    return target.is_dedicated or bool(getattr(args, "yes", False))


def shared_refusal(exe: str, target: Target) -> str:
    return (f"{exe} is not a virtual environment, conda env or embeddable Python (it is the "
            f"system interpreter at {target.prefix}): refusing to change it; pass --yes to "
            "change it anyway")


def refuse_shared(exe: str, target: Target, args: argparse.Namespace) -> None:
    """The one rule for install, uninstall and verify (which writes the lock): a shared
    interpreter is changed only with --yes."""
    if not shared_ok(target, args):
        raise InstallError(shared_refusal(exe, target))


def _check_described(args: argparse.Namespace, exe: str, target: Target,
                     req: planning.Request) -> tuple[list[str], list[str]]:
    """A System profile, or an environment of the config with explicit versions, describes
    the machine the wheels are chosen for: where it contradicts the target interpreter,
    the install is refused (unless --force); torch's CUDA alone is a warning. Returns (the
    warnings, the refusal)."""
    env = req.env if req.env is not None and req.env.explicit else None
    if not args.system and env is None:
        return [], []
    real = system_from(target, GpuFacts())
    found = disagreements(req.system, real)
    what = " and ".join(x for x in (f"the profile {args.system}" if args.system else "",
                                    f"environment {env.describe()} of {args.config}"
                                    if env else "") if x)
    refused = []
    if found and not args.force:
        hint = (" (comfy-env builds that environment itself: pass --python with its "
                "interpreter)" if env else "")
        refused.append(f"{what} does not describe {exe}: it says {'; '.join(found)}. Wheels "
                       f"chosen for it may not work there{hint}: pass --force to install "
                       "them anyway")
    warnings = [f"{what} says {f}" for f in planning.profile_disagreements(req.system, real)
                if not (refused and f in found)]  # a refusal's own are not said twice
    if req.system.torch_cuda and real.torch and not real.torch_cuda and not args.no_verify:
        warnings.append(
            "verification runs here, on a CPU build of torch, where a CUDA backend's kernels "
            "cannot run: to install for the GPU machine the profile describes, pass "
            "--no-verify, then verify there (" + tool_command("verify") + ")")
    return warnings, refused


def install_options(args: argparse.Namespace) -> InstallOptions:
    return InstallOptions(index_urls=tuple(args.index_url), find_links=tuple(args.find_links),
                          keep_failed=args.keep_failed, pypi=args.pypi,
                          verify=None if args.no_verify else verify_options(args),
                          meter=DownloadProgress(), uv_passthrough=uv_passthrough())


def verify_options(args: argparse.Namespace) -> Options:
    """--device, --shapes and --timeout, each checked as the command line was read."""
    return Options(device=getattr(args, "device", None), shapes=getattr(args, "shapes", None),
                   timeout=getattr(args, "timeout", None) or Options().timeout)


# -- --json (docs/json.md) ------------------------------------------------------------------

JSON_SCHEMA = 1


def verification_json(r: Result) -> dict[str, Any]:
    """What verification showed for one backend, as the lock records it."""
    return {"passed": r.passed, "summary": r.summary(), "error": r.error,
            "version": r.data.get("version"),
            "checks": [{k: c.get(k) for k in ("variant", "head_dim", "dtype", "passed",
                                              "max_abs", "cosine", "error")}
                       for c in r.checks],
            "bench": [{k: b.get(k) for k in ("shape", "kv_len", "dtype", "ms", "tflops",
                                             "error")}
                      for b in r.bench]}


def row_json(r: Row) -> dict[str, Any]:
    c = r.candidate
    return {"backend": r.backend,
            "action": r.action or ("builtin" if r.backend == "sdpa" else "none"),
            "wheel": r.wheel or None, "url": c.url if c is not None else None,
            "sha256": r.fetched.sha256 if r.fetched is not None else
                      c.sha256 if c is not None else None,
            "version": r.version,
            "verification": verification_json(r.result) if r.result is not None else None,
            "note": r.note or None}


def install_json(out: Outcome, python: str, *, command: str = "install",
                 plan: Plan | None = None, dry_run: bool = False,
                 nothing_to_do: str | None = None,
                 recovered: Recovery | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": JSON_SCHEMA, "command": command, "python": python,
                           "ok": out.ok, "lock": str(out.lock) if out.lock else None,
                           "backends": [row_json(r) for r in out.rows.values()],
                           "recovered": recovered.to_json() if recovered else None}
    if command == "install":
        doc["dry_run"] = dry_run
        doc["plan"] = plan.to_json() if plan is not None else None
    if nothing_to_do is not None:
        doc["nothing_to_do"] = nothing_to_do
    return doc


def cmd_uninstall(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    refuse_shared(exe, target, args)
    out = Outcome()
    with target_lock(target.prefix, log):
        recovered = recover(target)
        target = probe_interpreter(exe)
        names = uninstall_targets(target, _packages_named(args.backends) if args.backends
                                  else None)
        run_uninstall(target, names, out, passthrough=uv_passthrough(),
                      with_requirements=args.with_requirements,
                      named=args.backends is not None)
    if args.json:
        dump_json(install_json(out, target.executable, command="uninstall",
                               recovered=recovered))
    elif not out.rows:
        print(f"comfy-env-attn: nothing to remove in {target.executable} (the lock records "
              "no backend)")
    else:
        print_summary(out, target)
    return 0


def _packages_named(text: str) -> list[str]:
    """The backends uninstall --backends names, each of which is a package to remove: a
    variant (sage_fp16, a kernel inside sage's package) is a UsageError, not a silent
    removal of its primary."""
    for part in text.split(","):
        if part.strip():
            name = bk.canonical(part)
            if bk.primary(name) != name:
                raise UsageError(
                    f"{name} is a kernel inside {bk.BACKENDS[name].dist}, the package of "
                    f"{bk.primary(name)}: uninstall removes packages, and `--backends "
                    f"{bk.primary(name)}` removes both (to stop using {name} alone, choose "
                    "another backend with set_backend or the node)")
    return bk.parse_list(text)


def print_summary(out: Outcome, target: Target) -> None:
    import sys

    if not sys.stdout.isatty():  # logs and pipes: one line per backend, nothing folded
        print(f"comfy-env-attn: {target.executable}")
        for r in out.rows.values():
            said = r.installed if r.action == "removed" else f"installed {r.installed}"
            parts = [f"wheel {r.wheel}" if r.wheel else "", said if r.installed else "",
                     f"verification {r.verified}" if r.verified else "",
                     r.note]
            print(f"{r.backend}: " + "; ".join(p for p in parts if p))
        return
    from rich.table import Table

    t = Table(title=f"comfy-env-attn: {target.executable}")
    for col in ("backend", "wheel", "installed", "verification", "note"):
        t.add_column(col, overflow="fold")
    for r in out.rows.values():
        t.add_row(r.backend, r.wheel, r.installed, r.verified, r.note)
    console().print(t)


COMMANDS = {"install": cmd_install, "uninstall": cmd_uninstall}
