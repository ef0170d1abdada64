"""Install orchestration: fetch the chosen wheels, install them with uv, verify them in the
target, record what passed in the lock; undo everything on failure."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from comfy_env_attn import lockfile
from comfy_env_attn.candidates.sources import Candidate
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import AttnError, InstallError
from comfy_env_attn.core.progress import log
from comfy_env_attn.facts.installed import (
    TORCH_FAMILY,
    Installed,
    installed_backends,
    read_installed,
    torch_family,
)
from comfy_env_attn.facts.probe import Target
from comfy_env_attn.install.edges import (
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
from comfy_env_attn.install.journal import Journal
from comfy_env_attn.verify.run import Options, Result, verify

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
            out[name] = (inst.version, inst.location, lockfile.record_sha256(inst.dist_info))
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



@dataclass(frozen=True)
class InstallOptions:
    index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    keep_failed: bool = False
    verify: Options | None = field(default_factory=Options)  # None: --no-verify


def run_install(target: Target, chosen: list[tuple[str, list[Candidate]]], out: Outcome,
                opts: InstallOptions) -> None:
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
                _install_deps(opts, target, missing, family, journal, Path(tmp))
        for b, f in to_install:
            out.row(b).installed = _version_of(f.candidate.filename)
        after = read_installed(target.site_dirs)
        if torch_snapshot(after) != before_torch:
            raise InstallError("torch, torchvision or torchaudio changed during the install: "
                               "restoring the target")
        journal.set_state("verifying")
        results = verify_installed(target, after, out, opts.verify)
        failed = [b for b, _ in to_install if b in results and not results[b].passed]
        for b in failed:
            if opts.keep_failed:
                out.row(b).note = "kept despite failing (--keep-failed)"
                continue
            dist = bk.BACKENDS[b].dist
            journal.restore(dist, uninstall)
            out.row(b).installed += " -> rolled back"
        if failed:
            out.ok = False
            after = read_installed(target.site_dirs)
            results = {k: v for k, v in results.items()
                       if k not in failed or opts.keep_failed}
        lockfile.write_lock(target, after, results, [f for _, f in ready])
        journal.finish()
    except (AttnError, KeyboardInterrupt, OSError) as e:
        done = journal.rollback(uninstall)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise InstallError(f"{e}\nthe target was restored: {'; '.join(done)}") from None


def _install_deps(opts: InstallOptions, target: Target, missing: list[str],
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
                *uv_index_args(list(opts.index_urls), list(opts.find_links)), *missing], log)
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


def verify_installed(target: Target, installed: dict[str, Installed], out: Outcome,
                     opts: Options | None) -> dict[str, Result]:
    """Verify every installed backend (opts None: skip, the lock marks them unverified)."""
    names = installed_backends(installed)
    if opts is None:
        for n in names:
            out.row(n).verified = "skipped (--no-verify)"
        return {}
    results = verify(target.executable, names, opts, progress=log)
    for n, r in results.items():
        out.row(n).verified = r.summary()
        if not r.passed and n in names:
            out.ok = False
    if not results["sdpa"].passed:
        raise InstallError(f"the SDPA baseline itself failed in {target.executable}: "
                           f"{results['sdpa'].error}")
    return results




def reverify(target: Target, opts: Options) -> tuple[Outcome, bool]:
    """Verify what is installed and rewrite the lock (call with the target lock held)."""
    recover(target)
    installed = read_installed(target.site_dirs)
    out = Outcome()
    results = verify_installed(target, installed, out, opts)
    lockfile.write_lock(target, installed, results, [])
    return out, all(results[n].passed for n in installed_backends(installed))
