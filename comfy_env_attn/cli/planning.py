"""What the user asks for (--backends, or the environments of a comfy-env.toml) and the plan
for it: the resolver's answer, checked against the PEP 658 metadata of the remote wheels it
would choose, so that no plan picks a wheel the install would then refuse."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import field, replace
from typing import TYPE_CHECKING

from packaging.markers import InvalidMarker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from comfy_env_attn.candidates.sources import EMBEDDED, Candidate, Sources, gather
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.process import parallel
from comfy_env_attn.core.progress import log, tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.system import INTERPRETER_FACTS, System, disagreements, marker_env
from comfy_env_attn.resolve import Pin, Plan, resolve

if TYPE_CHECKING:  # loaded with --config only
    from comfy_env_attn.facts.config import ComfyEnvConfig, Environment, Wanted

# Rounds of reading metadata: each round reads the wheels the plan would now choose, so a
# backend whose newest releases all need another torch (xformers pins torch exactly, one
# release per torch) takes one round per release it passes over.
METADATA_ROUNDS = 12
METADATA_AHEAD = 4


@dataclass(frozen=True)
class Request:
    """One plan to make: these backends (with their pins) for this system."""

    system: System
    backends: list[str]
    pins: Mapping[str, Pin] = field(default_factory=dict)
    env: Environment | None = None


def sources_from(args: argparse.Namespace) -> Sources:
    return Sources(index_urls=tuple(args.index_url), find_links=tuple(args.find_links),
                   embedded=not args.no_embedded_index, pypi=args.pypi)


def load_config(args: argparse.Namespace) -> ComfyEnvConfig | None:
    """The --config file; None without --config."""
    if not getattr(args, "config", None):
        if getattr(args, "env", None):
            from comfy_env_attn.core.errors import UsageError

            raise UsageError("--env picks an environment of a comfy-env.toml: give --config")
        return None
    from comfy_env_attn.facts.config import read_config

    return read_config(args.config)


def requests(args: argparse.Namespace, cfg: ComfyEnvConfig | None, base: System
             ) -> list[Request]:
    """The plans to make: one for --backends, or one per environment of the config (only
    --env's) that asks for an attention package; --backends then narrows each."""
    narrowed = bk.parse_list(args.backends) if getattr(args, "backends", None) else None
    if cfg is None:
        return [Request(base, narrowed if narrowed is not None else bk.parse_list(None))]
    out = []
    envs = cfg.pick(getattr(args, "env", None))
    for env in envs:
        system = env.system_for(base)
        wanted, _marked, _narrowed = _sorted_out(env, system, narrowed)
        if wanted:
            out.append(Request(system, [w.backend for w in wanted],
                               {w.backend: Pin(w.specifier, f"{w.written} ({env.table} of "
                                                            f"{cfg.path.name})")
                                for w in wanted}, env))
    if out and cfg.left_to_comfy_env:  # once, whatever the number of environments
        log(f"left to comfy-env (not attention packages): {', '.join(cfg.left_to_comfy_env)}")
    return out


def _sorted_out(env: Environment, system: System, narrowed: list[str] | None
                ) -> tuple[list[Wanted], list[Wanted], list[Wanted]]:
    """An environment's packages: (those planned, those its marker leaves out on this
    system, those --backends leaves out)."""
    marked = [w for w in env.wanted if not w.applies(system)]
    left = [w for w in env.wanted if w.applies(system)
            and narrowed is not None and w.backend not in narrowed]
    return [w for w in env.wanted if w not in marked and w not in left], marked, left


def nothing_to_do(args: argparse.Namespace, cfg: ComfyEnvConfig, base: System) -> str:
    """One line for a config that gives `requests` nothing to plan, saying why: it asks for
    no attention package, or what it asks for is left out on this target by a marker or by
    --backends."""
    narrowed = bk.parse_list(args.backends) if getattr(args, "backends", None) else None
    envs = cfg.pick(getattr(args, "env", None))
    why = []
    for env in envs:
        _wanted, marked, left = (
            [w.written for w in ws] for ws in _sorted_out(env, env.system_for(base), narrowed))
        if marked:
            why.append(f"{env.name}: {', '.join(marked)} (the marker leaves it out on this "
                       "target)")
        if left:
            why.append(f"{env.name} asks for {', '.join(left)}, which --backends "
                       f"{args.backends} leaves out")
    if not why:
        return cfg.nothing_to_do(envs)
    return f"{cfg.path}: nothing to do: {'; '.join(why)}"


def make_plan(request: Request, sources: Sources) -> Plan:
    names = request.backends
    projects = list(dict.fromkeys(bk.BACKENDS[n].dist for n in names if bk.BACKENDS[n].dist))
    return checked_plan(request.system, gather(sources, projects), names, request.pins)


def torch_requirement(metadata: str, system: System) -> str | None:
    """The torch specifiers a wheel's metadata requires on that system ("" for any torch),
    None when it does not require torch."""
    from comfy_env_attn.install.edges import requirements

    env = marker_env(system)
    specs: list[str] | None = None
    for text in requirements(metadata):
        try:
            req = Requirement(text)
            if canonicalize_name(req.name) != "torch":
                continue
            if req.marker is not None and not req.marker.evaluate(env):
                continue
        except (InvalidRequirement, InvalidMarker, UndefinedEnvironmentName):
            continue
        specs = (specs or []) + ([str(req.specifier)] if str(req.specifier) else [])
    return None if specs is None else ",".join(specs)


def checked_plan(system: System, candidates: Sequence[Candidate], names: Sequence[str],
                 pins: Mapping[str, Pin] | None = None,
                 fetch: Callable[[Candidate], str | None] | None = None) -> Plan:
    """resolve(), then the metadata of each remote wheel it chose whose torch requirement is
    not known yet (PEP 658, or a few range requests into the wheel; kept on disk), until
    every chosen wheel's is: the install refuses a wheel that would replace torch, so the
    plan never picks one."""
    if fetch is None:
        from comfy_env_attn.install.edges import remote_metadata

        fetch = remote_metadata
    cands = list(candidates)
    read: set[tuple[str, str]] = set()
    plan = resolve(system, cands, names, pins=pins)
    for _ in range(METADATA_ROUNDS):
        # the chosen wheel and the next few in the ranking, in parallel: a round per
        # release passed over would be slower
        todo = [c for b in plan.backends if b.selected is not None
                for c in [b.selected, *[r.candidate for r in b.rejected
                                        if r.reasons[0].kind == "ranked"]][:METADATA_AHEAD]
                if c.requires_torch is None and (c.filename, c.url) not in read
                and not c.source.startswith(EMBEDDED)  # it records what it knows
                and (c.metadata_url or c.url.startswith(("http:", "https:")))]
        if not todo:
            break
        metas = parallel(fetch, todo, 8)
        learned: dict[tuple[str, str], Candidate] = {}
        for c, meta in zip(todo, metas, strict=True):
            read.add((c.filename, c.url))
            spec = torch_requirement(meta, system) if meta is not None else None
            if spec:
                learned[(c.filename, c.url)] = replace(c, requires_torch=spec)
        if not learned:
            break
        cands = [learned.get((c.filename, c.url), c) for c in cands]
        plan = resolve(system, cands, names, pins=pins)
    return plan


# -- a System profile against the real target ---------------------------------------------

def profile_disagreements(profile: System, real: System,
                          only: Collection[str] = INTERPRETER_FACTS, *, cuda: bool = True
                          ) -> list[str]:
    """Where a profile contradicts the target: disagreements() (`only` those facts) plus
    torch's CUDA (unless `cuda` is False)."""
    found = disagreements(profile, real, only)
    if cuda and profile.torch_cuda is not None and profile.torch_cuda != real.torch_cuda and \
            real.torch is not None:
        found.append(f"torch's CUDA {profile.torch_cuda}, the target's torch "
                     + (f"uses CUDA {real.torch_cuda}" if real.torch_cuda
                        else "is a CPU build"))
    return found


# -- no GPU: said once ------------------------------------------------------------------------

def no_gpu_hint() -> str:
    """What to do without a GPU here: the probe's command written as this tool was run."""
    return ("to plan or install for a GPU machine from here, give its profile: --system FILE "
            f"(written there by `{tool_command('probe', '--toml')}`)")


def no_gpu_reason(plan: Plan) -> str | None:
    """Why no GPU is seen, when none is and a backend has no wheel for that: plan and
    install say it once, with no_gpu_hint() (each backend's reason says only that the target
    has none: resolve.gpu_reasons)."""
    why = None if plan.system.gpus else plan.system.absent.get("gpus")
    if why and any(not b.builtin and b.selected is None for b in plan.backends):
        return why
    return None
