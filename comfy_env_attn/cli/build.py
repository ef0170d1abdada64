"""build, and install --build: compile a backend for this machine when no wheel fits; the work
is in install.build."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import field, replace
from typing import Any

from comfy_env_attn.candidates.wheelhouse import wheelhouse_dir
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import UsageError
from comfy_env_attn.core.progress import log
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.probe import (
    GpuFacts,
    Target,
    probe_gpus,
    probe_interpreter,
    system_from,
)
from comfy_env_attn.facts.system import System, disagreements, load_profile
from comfy_env_attn.install.build import (
    BuildError,
    Plan,
    Recipe,
    build,
    load_recipes,
    plan_build,
    wants_build,
)
from comfy_env_attn.resolve import Plan as WheelPlan


def _recipes_for(backends: list[str]) -> list[Recipe]:
    recipes = load_recipes()
    missing = [b for b in backends if b not in recipes]
    if missing:
        raise UsageError(f"no source is pinned for {', '.join(missing)}; "
                         f"buildable: {', '.join(recipes)}")
    return [recipes[b] for b in backends]


def _against_the_target(args: argparse.Namespace, target: Target, system: System,
                        recipes: list[Recipe]) -> None:
    """A build compiles against the target's own torch and Python, and its wheel is labelled
    with the profile's (install.build.build_label), for later plans to match: where a
    profile (--system) says otherwise, the wheel would claim a torch it was not built for
    (`undefined symbol` where it is installed by that claim). Refused unless --force, and
    then each disagreement is a warning. torch's CUDA counts where a build compiles CUDA;
    its C++ ABI is the target torch's whatever the profile says (a warning); a newer glibc
    in the profile is the usual case of an older build machine, and no fault, an older one
    a warning (a wheel built here may not load there)."""
    if not args.system:
        return
    from comfy_env_attn.cli.planning import profile_disagreements

    real = system_from(target, GpuFacts())
    found = profile_disagreements(system, real, _LABELLED, cuda=any(r.cuda for r in recipes))
    for f in disagreements(system, real, ("cxx11abi",)):
        log(f"warning: the profile {args.system} says {f}: the build compiles with the "
            "target torch's")
    if found and not args.force:
        raise BuildError(f"the profile {args.system} does not describe {target.executable}: it "
                         f"says {'; '.join(found)}. A build compiles against the target's own "
                         "torch and Python, and its wheel would be labelled with the "
                         "profile's: build with the interpreter the profile was written for, "
                         "or pass --force to build anyway")
    for f in found:
        log(f"warning: the profile {args.system} says {f}: --force, so the profile's torch "
            "and Python stand for the target's in the checks and the wheel's label, while the "
            "build compiles against the target's own")
    pg, tg = system.glibc_tuple, real.glibc_tuple
    if pg and tg and pg < tg:  # a wheel built here may need the newer one
        log(f"warning: the profile {args.system} says glibc {system.glibc}; this machine has "
            f"{real.glibc}: a wheel built here may not load there (build on the older one)")


# What a built wheel's tags and label are taken from: the target's, which a profile must match
_LABELLED = ("python", "platform", "arch", "free_threaded", "torch")


def _plans(target: Target, system: System, recipes: list[Recipe], source: str | None
           ) -> list[Plan]:
    """Every build checked before any starts: one error naming every problem."""
    if source and len(recipes) != 1:
        raise UsageError(f"--source names one source; {len(recipes)} backends would be built "
                         f"({', '.join(r.backend for r in recipes)})")
    plans: list[Plan] = []
    errors: list[str] = []
    for r in recipes:
        if source and r.needs_checkout:
            r = replace(r, needs_checkout=None)  # the checkout is given
        try:
            plans.append(plan_build(target, system, r))
        except BuildError as e:
            errors.append(str(e))
    if errors:
        raise BuildError("\n".join(errors))
    return plans


@dataclass
class BuildMissing:
    """What install --build did: the plan afterwards, and for the backends it could not
    build, why; for a dry run, what it would build (backend -> the build)."""
    plan: WheelPlan
    unbuildable: dict[str, str] = field(default_factory=dict)
    would_build: dict[str, str] = field(default_factory=dict)


def build_missing(args: argparse.Namespace, target: Target, system: System,
                  plan: WheelPlan, replan: Callable[[], WheelPlan]) -> BuildMissing:
    """install --build: build the requested backends that have no fitting wheel, then plan
    again with `replan` (the plan reads the wheelhouse, where the new wheels are)."""
    if not (args.backends or getattr(args, "config", None)):
        raise UsageError("--build compiles from source: name the backends to build, e.g. "
                         "--backends sage")
    recipes = load_recipes()
    todo: list[Recipe] = []
    out = BuildMissing(plan)
    for bp in plan.backends:
        if bp.builtin:
            continue
        name = bp.selected.filename if bp.selected else None
        selected = name.split("-")[1] if name else None
        r = recipes.get(bp.backend)
        if r is None:
            if selected is None:
                out.unbuildable[bp.backend] = (f"--build: no source is pinned for "
                                               f"{bp.backend}; buildable: {', '.join(recipes)}")
                log(out.unbuildable[bp.backend])
        elif args.source or wants_build(r, selected):
            if selected and args.source and not wants_build(r, selected):
                log(f"--build: {bp.backend}: --source given: building it here instead of "
                    f"{name}")
            elif selected:
                log(f"--build: {bp.backend}: the plan selects {name}, an "
                    f"older major line than the source ({r.dist} {r.version}): building it")
            todo.append(r)
    if not todo:
        if not out.unbuildable:
            log("--build: every requested backend has a fitting wheel; nothing to build")
        return out
    _against_the_target(args, target, system, todo)
    plans = _plans(target, system, todo, args.source)
    for p in plans:
        if args.dry_run:  # install --json prints its document on stdout: this is a log line
            out.would_build[p.recipe.backend] = (f"would build {p.describe()} from "
                                                 f"{args.source or p.recipe.url}")
            log(f"{p.recipe.backend}: {out.would_build[p.recipe.backend]}")
            continue
        build(target, system, p, wheelhouse_dir(), source=args.source, log=log)
    if not args.dry_run:
        out.plan = replan()
    return out


def cmd_build(args: argparse.Namespace) -> int:
    exe = _target_exe(args)
    target = probe_interpreter(exe)
    system = load_profile(args.system) if args.system else system_from(target, probe_gpus())
    named = bk.parse_list(args.backends)
    backends = [b for b in named if b != "sdpa"]
    if not backends:  # sdpa alone
        raise UsageError("--backends sdpa: SDPA is PyTorch's own, there is nothing to build; "
                         f"buildable: {', '.join(load_recipes())}")
    recipes = _recipes_for(backends)
    _against_the_target(args, target, system, recipes)
    plans = _plans(target, system, recipes, args.source)
    builds: list[dict[str, Any]] = []  # --json (docs/json.md)
    for p in plans:
        source = args.source or p.recipe.url
        if args.dry_run:
            line = f"would build {p.recipe.backend}: {p.describe()} from {source}"
            if args.json:  # stdout is the document's
                log(line)
            else:
                print(line)
            builds.append({"backend": p.recipe.backend, "build": p.describe(),
                           "source": source, "wheel": None, "record": None})
            continue
        b = build(target, system, p, wheelhouse_dir(), source=args.source, log=log)
        builds.append({"backend": p.recipe.backend, "build": p.describe(), "source": source,
                       "wheel": str(b.wheel), "record": b.record.to_dict()})
        if not args.json:
            print(f"{p.recipe.backend}: {b.wheel} ({b.record.seconds:.0f} s)")
    if args.json:
        print(json.dumps({"schema": 1, "command": "build", "python": target.executable,
                          "dry_run": bool(args.dry_run), "builds": builds}, indent=2))
    return 0


def _target_exe(args: argparse.Namespace) -> str:
    from comfy_env_attn.cli.commands import locate

    return locate(args)[0]


COMMANDS = {"build": cmd_build}
