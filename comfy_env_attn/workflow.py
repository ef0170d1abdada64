"""install, verify, lock, bench: execute a plan with uv, prove it, record it."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from comfy_env_attn import backends as bk
from comfy_env_attn import lock as lockmod
from comfy_env_attn.commands import console, locate, log, make_plan
from comfy_env_attn.errors import AttnError, InstallError, UsageError
from comfy_env_attn.index import Candidate, project_of
from comfy_env_attn.install import (
    Fetched,
    Unreachable,
    check_requirements,
    constraint_file,
    fetch_metadata,
    fetch_wheel,
    requirements,
    run_uv,
    uv_index_args,
    wheel_metadata,
)
from comfy_env_attn.installed import TORCH_FAMILY, Installed, read_installed, torch_family
from comfy_env_attn.journal import Journal, target_lock
from comfy_env_attn.probe import Target, probe_gpus, probe_interpreter, system_from
from comfy_env_attn.system import System, load_profile
from comfy_env_attn.verify import Options, Result, verify

MAX_ALTERNATIVES = 8  # fitting wheels tried per backend when one cannot be had


@dataclass
class Row:
    backend: str
    wheel: str = ""
    installed: str = ""
    verified: str = ""
    note: str = ""


@dataclass
class Outcome:
    rows: dict[str, Row] = field(default_factory=dict)
    ok: bool = True

    def row(self, backend: str) -> Row:
        return self.rows.setdefault(backend, Row(backend))


def own_sites(target: Target) -> list[str]:
    return [p for p in dict.fromkeys([target.facts.get("purelib"), target.facts.get("platlib")])
            if p]


def torch_snapshot(installed: dict[str, Installed]) -> dict[str, Any]:
    out = {}
    for name in TORCH_FAMILY:
        inst = installed.get(name)
        if inst:
            out[name] = (inst.version, inst.location, lockmod.record_sha256(inst.dist_info))
    return out


def uninstaller(target: Target) -> Any:
    def uninstall(name: str) -> None:
        if name in read_installed(own_sites(target)):
            run_uv(["pip", "uninstall", "--python", target.executable, name], log)

    return uninstall


def recover(target: Target) -> list[str]:
    """Undo an install that was killed midway (called with the target lock held)."""
    j = Journal(target.prefix)
    if not j.exists():
        return []
    j.load()
    log(f"found an interrupted install (pid {j.meta.get('pid')}, state "
        f"{j.meta.get('state')}): undoing it")
    done = j.rollback(uninstaller(target))
    for d in done:
        log(f"  {d}")
    return done


def requested_backends(args: argparse.Namespace) -> list[str]:
    if getattr(args, "config", None):
        from comfy_env_attn.config import read_cuda_config

        cfg = read_cuda_config(args.config)
        if cfg.left_to_comfy_env:
            log(f"left to comfy-env (not attention packages): "
                f"{', '.join(cfg.left_to_comfy_env)}")
        if not cfg.backends:
            raise UsageError(f"{args.config} names no attention package; known: "
                             f"{', '.join(bk.BY_DIST)}")
        if args.backends:
            return [b for b in bk.parse_list(args.backends) if b in cfg.backends]
        return cfg.backends
    return bk.parse_list(args.backends)


# -- install ------------------------------------------------------------------------------

def cmd_install(args: argparse.Namespace) -> int:
    exe, _how = locate(args)
    target = probe_interpreter(exe)
    system = load_profile(args.system) if args.system else system_from(target, probe_gpus())
    if not target.is_dedicated and not args.yes:
        raise InstallError(f"{exe} is not a virtual environment, conda env or embeddable "
                           f"Python (it is the system interpreter at {target.prefix}): "
                           "refusing to change it; pass --yes to install there anyway")
    out = Outcome()
    if args.from_lock:
        doc = lockmod.read(Path(args.from_lock))
        chosen = [(w.backend, [Candidate(w.filename, w.url, f"lock:{args.from_lock}",
                                         sha256=w.sha256)]) for w in lockmod.wheels_of(doc)]
    else:
        plan = make_plan(system, args, requested_backends(args))
        chosen = []
        for bp in plan.backends:
            if bp.builtin:
                continue
            if bp.selected is None:
                out.row(bp.backend).note = f"no wheel: {bp.reason}"
                if args.backends or args.config:
                    out.ok = False  # asked for by name: not having it is a failure
            else:
                alts = [bp.selected] + [r.candidate for r in bp.rejected
                                        if r.reasons and r.reasons[0].kind == "ranked"]
                chosen.append((bp.backend, alts))
        for w in plan.warnings:
            log(f"warning: {w}")
    chosen.sort(key=lambda t: t[0] == "flash4")  # flash-attn before flash-attn-4
    if args.dry_run:
        from comfy_env_attn.commands import print_plan

        if not args.from_lock:
            print_plan(plan)
        for b, alts in chosen:
            print(f"would install {b}: {alts[0].filename} from {alts[0].url}"
                  + (f" ({len(alts) - 1} fitting alternatives if it cannot be had)"
                     if len(alts) > 1 else ""))
        return 0
    with target_lock(target.prefix, log):
        recover(target)
        target = probe_interpreter(exe)
        run_install(args, target, chosen, out)
    print_summary(out, target)
    return 0 if out.ok else 1


def run_install(args: argparse.Namespace, target: Target,
                chosen: list[tuple[str, list[Candidate]]], out: Outcome) -> None:
    installed = read_installed(target.site_dirs)
    markers = target.facts.get("markers") or {}
    before_torch = torch_snapshot(installed)
    family = torch_family(installed)
    ready: list[tuple[str, Fetched]] = []
    deps: dict[str, list[str]] = {}
    # 1. read metadata and fetch, before anything changes; a wheel that cannot be had
    #    (unreachable source, hash mismatch, needs another torch) gives way to the next
    #    fitting one in the plan's ranking
    dead_hosts: set[str] = set()
    for backend, alternatives in chosen:
        row = out.row(backend)
        failures: list[str] = []
        for c in alternatives[:MAX_ALTERNATIVES]:
            host = urlsplit(c.url).netloc
            if host and host in dead_hosts:
                failures.append(f"{c.filename}: skipped, {host} is unreachable")
                continue
            got = _obtain(c, installed, markers)
            if isinstance(got, Unreachable):
                dead_hosts.add(host)
                got = str(got)
            if isinstance(got, str):
                failures.append(got)
                log(f"{backend}: {got}")
                continue
            fetched, missing = got
            row.wheel = c.filename
            dist = bk.BACKENDS[backend].dist
            have = installed.get(dist)
            if have is not None and have.version == _version_of(c.filename) and \
                    have.location in own_sites(target):
                row.installed = f"already {have.version}"
            ready.append((backend, fetched))
            deps[backend] = missing
            break
        else:
            row.wheel = alternatives[0].filename if alternatives else ""
            row.installed = "refused" if any("would replace" in f for f in failures) \
                else "none"
            row.note = " | ".join(failures)
            out.ok = False
    to_install = [(b, f) for b, f in ready if not out.row(b).installed.startswith("already")]
    if not to_install and not ready:
        return
    journal = Journal(target.prefix)
    touched = [bk.BACKENDS[b].dist for b, _ in to_install]
    dep_names = sorted({_req_name(d) for b, _ in to_install for d in deps[b]})
    journal.begin(touched + dep_names, installed, own_sites(target),
                  {"python": target.executable, "backends": [b for b, _ in to_install]})
    uninstall = uninstaller(target)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if to_install:
                _uv_install(target, to_install, Path(tmp))
            missing = sorted({d for b, _ in to_install for d in deps[b]})
            if missing:
                _install_deps(args, target, missing, family, journal, Path(tmp))
        for b, f in to_install:
            out.row(b).installed = _version_of(f.candidate.filename)
        after = read_installed(target.site_dirs)
        if torch_snapshot(after) != before_torch:
            raise InstallError("torch, torchvision or torchaudio changed during the install: "
                               "restoring the target")
        journal.set_state("verifying")
        results = _verify_all(args, target, after, out)
        failed = [b for b, _ in to_install if b in results and not results[b].passed]
        for b in failed:
            if args.keep_failed:
                out.row(b).note = "kept despite failing (--keep-failed)"
                continue
            dist = bk.BACKENDS[b].dist
            journal.restore(dist, uninstall)
            out.row(b).installed += " -> rolled back"
        if failed:
            out.ok = False
            after = read_installed(target.site_dirs)
            results = {k: v for k, v in results.items()
                       if k not in failed or args.keep_failed}
        write_lock(target, after, results, [f for _, f in ready])
        journal.finish()
    except (AttnError, KeyboardInterrupt, OSError) as e:
        done = journal.rollback(uninstall)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise InstallError(f"{e}\nthe target was restored: {'; '.join(done)}") from None


def _install_deps(args: argparse.Namespace, target: Target, missing: list[str],
                  family: dict[str, str], journal: Journal, tmp: Path) -> None:
    """Install requirements round by round with --no-deps: uv does not see a venv's
    system-site-packages torch as installed and would fetch another one; here every
    requirement is checked against what the target really has, torch's family first."""
    constraint = constraint_file(family, tmp)
    markers = target.facts.get("markers") or {}
    for _round in range(12):
        names = sorted({_req_name(d) for d in missing})
        installed = read_installed(target.site_dirs)
        for n in names:
            journal.add(n, installed, own_sites(target))
        run_uv(["pip", "install", "--python", target.executable, "--no-deps", "--only-binary",
                ":all:", "--constraint", str(constraint),
                *uv_index_args(args.index_url, args.find_links), *missing], log)
        installed = read_installed(target.site_dirs)
        missing = []
        for n in names:
            inst = installed.get(n)
            if inst is None:
                continue
            needs = check_requirements(n, list(inst.requires), installed, markers)
            if needs.refused:
                raise InstallError(needs.refused[0])
            missing += needs.missing
        missing = sorted(set(missing))
        if not missing:
            return
    raise InstallError(f"requirements still missing after 12 rounds: {', '.join(missing)}")


def _obtain(c: Candidate, installed: dict[str, Installed], markers: dict[str, str]
            ) -> tuple[Fetched, list[str]] | str | Unreachable:
    """(the wheel on disk, requirements to add) or why this candidate cannot be used."""
    meta = fetch_metadata(c)
    if meta is not None:
        needs = check_requirements(c.filename, requirements(meta), installed, markers)
        if needs.refused:
            return needs.refused[0]
    try:
        fetched = fetch_wheel(c, log)
        needs = check_requirements(c.filename, requirements(wheel_metadata(fetched.path)),
                                   installed, markers)
    except Unreachable as e:
        return e
    except InstallError as e:
        return str(e)
    if needs.refused:
        return needs.refused[0]
    return fetched, needs.missing


def _uv_install(target: Target, items: list[tuple[str, Fetched]], tmp: Path) -> None:
    req = tmp / "attention.txt"
    req.write_text("".join(f"{bk.BACKENDS[b].dist} @ {f.path.resolve().as_uri()} "
                           f"--hash=sha256:{f.sha256}\n" for b, f in items), encoding="utf-8")
    names = [bk.BACKENDS[b].dist for b, _ in items]
    args = ["pip", "install", "--python", target.executable, "--no-deps", "--offline",
            "--no-index", "--require-hashes", "--only-binary", ":all:", "-r", str(req)]
    for n in names:
        args += ["--reinstall-package", n]
    run_uv(args, log)


def _version_of(filename: str) -> str:
    return filename.split("-")[1]


def _req_name(text: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(Requirement(text).name))


# -- verify and lock ----------------------------------------------------------------------

def installed_backends(installed: dict[str, Installed]) -> list[str]:
    return [b.name for b in bk.BACKENDS.values() if b.dist and b.dist in installed]


def _options(args: argparse.Namespace) -> Options:
    shapes = None
    if getattr(args, "shapes", None):
        try:
            shapes = [[int(x) for x in s.lower().split("x")] for s in args.shapes.split(",")]
        except ValueError:
            raise UsageError(f"--shapes {args.shapes!r}: give BxHxNxD,... e.g. "
                             "1x24x4608x128") from None
        if any(len(s) != 4 for s in shapes):
            raise UsageError(f"--shapes {args.shapes!r}: each shape needs 4 numbers")
    return Options(device=getattr(args, "device", None), shapes=shapes,
                   timeout=getattr(args, "timeout", None) or Options().timeout)


def _verify_all(args: argparse.Namespace, target: Target, installed: dict[str, Installed],
                out: Outcome) -> dict[str, Result]:
    names = installed_backends(installed)
    if getattr(args, "no_verify", False):
        for n in names:
            out.row(n).verified = "skipped (--no-verify)"
        return {}
    results = verify(target.executable, names, _options(args), progress=log)
    for n, r in results.items():
        out.row(n).verified = r.summary()
        if not r.passed and n in names:
            out.ok = False
    if not results["sdpa"].passed:
        raise InstallError(f"the SDPA baseline itself failed in {target.executable}: "
                           f"{results['sdpa'].error}")
    return results


def fingerprint(target: Target, installed: dict[str, Installed],
                results: dict[str, Result]) -> dict[str, Any]:
    sdpa = results.get("sdpa")
    device = (sdpa.data.get("device") if sdpa else None) or {}
    fp: dict[str, Any] = {
        "python": target.facts.get("python"),
        "torch": sdpa.data.get("torch") if sdpa else target.facts.get("torch"),
        "torch_cuda": sdpa.data.get("torch_cuda") if sdpa else target.facts.get("torch_cuda"),
        "device": device.get("type", "unverified"),
        "device_name": device.get("name"),
        "capability": device.get("capability"),
        "backends": {},
    }
    for name in installed_backends(installed):
        inst = installed[bk.BACKENDS[name].dist]
        fp["backends"][name] = {"dist": inst.name, "version": inst.version,
                                "record_sha256": lockmod.record_sha256(inst.dist_info)}
    return fp


def backend_entries(installed: dict[str, Installed], results: dict[str, Result]
                    ) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in ["sdpa", *installed_backends(installed)]:
        b = bk.BACKENDS[name]
        r = results.get(name)
        entry: dict[str, Any] = {"title": b.title, "quantized": b.quantized}
        if r is None:
            entry["status"] = "unverified"
        else:
            entry["status"] = "verified" if r.passed else "failed"
            entry["error"] = r.error
            entry["stage"] = r.data.get("stage")
            entry["version"] = r.data.get("version")
            entry["import_s"] = r.data.get("import_s")
            entry["checks"] = [{k: c.get(k) for k in ("head_dim", "dtype", "passed", "required",
                                                     "max_abs", "cosine", "finite", "error")}
                               for c in r.data.get("checks", [])]
            entry["bench"] = [{k: x.get(k) for k in ("shape", "dtype", "ms", "tflops",
                                                     "first_call_ms", "error")}
                              for x in r.data.get("bench", [])]
        out[name] = entry
    if not results:  # --no-verify: SDPA, built into torch, stays the trusted fallback
        out["sdpa"]["status"] = "verified"
    return out


def write_lock(target: Target, installed: dict[str, Installed], results: dict[str, Result],
               fetched: list[Fetched]) -> Path:
    path = lockmod.lock_path(target.prefix)
    previous: list[lockmod.LockedWheel] = []
    with contextlib.suppress(AttnError):
        previous = lockmod.wheels_of(lockmod.read(path))
    wheels: dict[str, lockmod.LockedWheel] = {}
    for w in previous:
        inst = installed.get(bk.normalize_dist(w.name))
        if inst is not None and inst.version == w.version:
            wheels[inst.name] = w
    for f in fetched:
        dist = project_of(f.candidate.filename)
        inst = installed.get(dist)
        if inst is not None and inst.version == _version_of(f.candidate.filename):
            wheels[dist] = lockmod.LockedWheel(bk.BY_DIST[dist], dist, inst.version,
                                               f.candidate.filename, f.candidate.url, f.sha256)
    doc = lockmod.build(list(wheels.values()), fingerprint(target, installed, results),
                        backend_entries(installed, results), python=target.executable)
    lockmod.write(path, doc)
    log(f"wrote {path}")
    return path


def cmd_verify(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    with target_lock(target.prefix, log):
        recover(target)
        target = probe_interpreter(exe)
        installed = read_installed(target.site_dirs)
        out = Outcome()
        results = _verify_all(args, target, installed, out)
        names = installed_backends(installed)
        write_lock(target, installed, results, [])
    print_summary(out, target)
    return 0 if all(results[n].passed for n in names) else 1


# -- lock (show and check) and bench -------------------------------------------------------

def lock_status(doc: dict[str, Any], target: Target, system: System) -> list[str]:
    """Why the lock does not describe the live target (empty when it does)."""
    tool = doc["tool"]["comfy-env-attn"]
    fp = tool.get("fingerprint", {})
    stale: list[str] = []
    if fp.get("torch") != target.facts.get("torch"):
        stale.append(f"torch is {target.facts.get('torch')}, the lock verified "
                     f"{fp.get('torch')}")
    if fp.get("device") == "cuda" and fp.get("capability") not in system.gpus:
        stale.append(f"verified on GPU sm {fp.get('capability')}, this machine has "
                     f"{', '.join(system.gpus) or 'no GPU'}")
    installed = read_installed(target.site_dirs)
    for info in fp.get("backends", {}).values():
        inst = installed.get(info["dist"])
        if inst is None:
            stale.append(f"{info['dist']} {info['version']} is no longer installed")
        elif inst.version != info["version"]:
            stale.append(f"{info['dist']} is {inst.version}, the lock verified {info['version']}")
        elif lockmod.record_sha256(inst.dist_info) != info.get("record_sha256"):
            stale.append(f"{info['dist']} {inst.version} files changed since verification")
    for name in installed_backends(installed):
        if name not in fp.get("backends", {}):
            stale.append(f"{bk.BACKENDS[name].dist} is installed but not in the lock")
    return stale


def cmd_lock(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    system = system_from(target, probe_gpus())
    path = Path(args.file) if args.file else lockmod.lock_path(target.prefix)
    doc = lockmod.read(path)
    tool = doc["tool"]["comfy-env-attn"]
    stale = lock_status(doc, target, system)
    if args.json:
        from comfy_env_attn.cli import dump_json

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
    results = verify(target.executable, names, _options(args), progress=log)
    base = {lockmod.shape_key(b["shape"]): b for b in results["sdpa"].bench if "tflops" in b}
    from rich.table import Table

    t = Table(title="attention throughput (TFLOP/s, 4*B*H*N^2*D per call; ratio to SDPA)")
    t.add_column("shape")
    for n in results:
        t.add_column(n, justify="right")
    for key in base:
        cells = []
        for r in results.values():
            b = next((x for x in r.bench if lockmod.shape_key(x["shape"]) == key), None)
            if b is None or "tflops" not in b:
                cells.append("failed" if not r.passed else (b or {}).get("error", "-")[:20])
            else:
                ratio = b["tflops"] / base[key]["tflops"]
                cells.append(f"{b['tflops']:.3g} ({ratio:.2f}x)")
        t.add_row(key, *cells)
    console().print(t)
    return 0


def doctor_findings(target: Target, system: System) -> list[Any]:
    """An interrupted install undone, and whether the lock still describes this target."""
    from comfy_env_attn.doctor import Finding

    found: list[Any] = []
    if Journal(target.prefix).exists():
        with target_lock(target.prefix, log):
            done = recover(target)
        if done:
            found.append(Finding("info", "install", "an interrupted install was found and "
                                 "undone: " + "; ".join(done)))
    path = lockmod.lock_path(target.prefix)
    if not path.exists():
        if installed_backends(read_installed(target.site_dirs)):
            found.append(Finding("info", "lock", f"no lock at {path}: the dispatcher cannot "
                                 "trust the installed backends", "Run: comfy-env-attn verify"))
        return found
    try:
        doc = lockmod.read(path)
    except AttnError as e:
        return [*found, Finding("problem", "lock", str(e), "Run: comfy-env-attn verify")]
    stale = lock_status(doc, target, system)
    if stale:
        found.append(Finding("problem", "lock", "the lock is stale: " + "; ".join(stale) +
                             ": the dispatcher falls back to SDPA",
                             "Run: comfy-env-attn verify"))
    else:
        tool = doc["tool"]["comfy-env-attn"]
        found.append(Finding("info", "lock", f"lock {path} is fresh; auto order: "
                             f"{', '.join(tool.get('auto', []))}"))
        found += [Finding("info", "dispatch", line) for line in dispatch_preview(tool)]
    return found


PREVIEW_SHAPES = {"Flux 1024x1024": [1, 24, 4608, 128], "SDXL": [2, 10, 4096, 64],
                  "video": [1, 40, 32760, 128]}


def dispatch_preview(tool: dict[str, Any]) -> list[str]:
    """What `auto` would pick for typical inputs, and why (the dispatcher's own rule)."""
    from comfy_env_attn.choose import close_call, ranked
    from comfy_env_attn.dispatch_settings import SETTLE_MARGIN

    dtype = "bfloat16" if tool.get("fingerprint", {}).get("device") == "cuda" else "float32"
    out = []
    for label, shape in PREVIEW_SHAPES.items():
        rows = ranked(tool.get("backends", {}), shape[3], dtype, shape[2])
        best, _, why = rows[0]
        rest = ", ".join(n for n, _, _ in rows[1:])
        close = close_call(rows, SETTLE_MARGIN)
        out.append(f"auto for {label} {shape} {dtype}: {best} ({why})"
                   + (f"; then {rest}" if rest else "")
                   + (f"; {' and '.join(close)} are within {SETTLE_MARGIN:.0%}: timed on "
                      "the real input at first use" if close else ""))
    return out


LAUNCH_FLAGS = {"sage": "--use-sage-attention", "flash": "--use-flash-attention",
                "sdpa": "--use-pytorch-cross-attention"}


def cmd_launch_args(args: argparse.Namespace) -> int:
    exe, _ = locate(args)
    target = probe_interpreter(exe)
    system = system_from(target, probe_gpus())
    doc = lockmod.read(lockmod.lock_path(target.prefix))
    stale = lock_status(doc, target, system)
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


def print_summary(out: Outcome, target: Target) -> None:
    import sys

    from rich.table import Table

    if not sys.stdout.isatty():  # logs and pipes: one line per backend, nothing folded
        print(f"comfy-env-attn: {target.executable}")
        for r in out.rows.values():
            parts = [f"wheel {r.wheel}" if r.wheel else "", f"installed {r.installed}"
                     if r.installed else "", f"verification {r.verified}" if r.verified else "",
                     r.note]
            print(f"{r.backend}: " + "; ".join(p for p in parts if p))
        return
    t = Table(title=f"comfy-env-attn: {target.executable}")
    for col in ("backend", "wheel", "installed", "verification", "note"):
        t.add_column(col, overflow="fold")
    for r in out.rows.values():
        t.add_row(r.backend, r.wheel, r.installed, r.verified, r.note)
    console().print(t)


COMMANDS = {"install": cmd_install, "verify": cmd_verify, "lock": cmd_lock, "bench": cmd_bench,
            "launch-args": cmd_launch_args}
