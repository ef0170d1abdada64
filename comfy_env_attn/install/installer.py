"""Install orchestration: fetch the chosen wheels, install them with uv, verify them in the
target, record what passed in the lock; undo everything on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import field, replace
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from comfy_env_attn import lockfile
from comfy_env_attn.candidates.sources import Candidate, filename_of, project_of
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import AttnError, InstallError
from comfy_env_attn.core.fingerprint import adapters_sha256, dists_facts, files_digest
from comfy_env_attn.core.lockmodel import Live, tool_table
from comfy_env_attn.core.progress import log, notice
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.installed import (
    Installed,
    Stat,
    changed_files,
    file_stats,
    index_in_background,
    installed_backends,
    is_bytecode,
    is_egg,
    owned_files,
    protected,
    read_installed,
    real,
    record_hash,
    record_lines,
    record_paths,
    record_rows,
    shadowing,
    shared_files,
    site_path,
    stat_of,
)
from comfy_env_attn.facts.locate import current_os, folds_case
from comfy_env_attn.facts.probe import Target
from comfy_env_attn.install import guard
from comfy_env_attn.install.edges import (
    DownloadMeter,
    Fetched,
    FileDigest,
    Needs,
    Unreachable,
    check_requirements,
    constraint_file,
    fetch_metadata,
    fetch_wheel,
    offline_args,
    requested_extras,
    requirements,
    root_is_purelib,
    run_uv,
    satisfies,
    uv_compile,
    uv_index_args,
    wheel_bomb,
    wheel_directory,
    wheel_member,
    wheel_metadata,
)
from comfy_env_attn.install.journal import (
    UV_WORK_PREFIX,
    Journal,
    crash_point,
    file_sha256,
    keep_foreign,
)
from comfy_env_attn.verify.run import Options, Result, baseline_failure, verify

MAX_ALTERNATIVES = 8  # fitting wheels tried per backend when one cannot be had


@dataclass
class Row:
    """What one run did for one backend: text for the summary table, and the same as data
    for --json (docs/json.md)."""

    backend: str
    wheel: str = ""
    installed: str = ""
    verified: str = ""
    note: str = ""
    # installed, already, refused, unavailable, no-wheel, rolled-back, kept, removed, absent
    action: str = ""
    version: str | None = None  # what the target has of it after the run
    candidate: Candidate | None = None
    fetched: Fetched | None = None  # the wheel as it was fetched (its sha256)
    result: Result | None = None  # its verification
    asked: bool = True  # named (--backends, the config): its having no wheel is a failure


@dataclass
class Outcome:
    """What install did, row by row, whether all went well, and the lock it wrote."""
    rows: dict[str, Row] = field(default_factory=dict)
    ok: bool = True
    lock: Path | None = None  # the lock written

    def row(self, backend: str) -> Row:
        return self.rows.setdefault(backend, Row(backend))

    def why_not_ok(self) -> str:
        """One line saying why the run is a failure (exit 1), from the rows that failed."""
        failed = [f"{r.backend} ({r.note or r.action})" for r in self.rows.values()
                  if r.action in ("refused", "unavailable", "rolled-back") or
                  (r.action == "no-wheel" and r.asked)]
        return "not done as asked: " + ("; ".join(failed) if failed else
                                         "see the rows above")


def own_sites(target: Target) -> list[str]:
    return [p for p in dict.fromkeys([target.facts.get("purelib"), target.facts.get("platlib")])
            if p]


def uninstaller(target: Target, *, passthrough: bool = False) -> Callable[[str], None]:
    """Uninstall one distribution from the target's own site-packages with uv; one that uv
    cannot uninstall because a kill left its .dist-info half written or half removed (a
    RECORD cut short, or gone), or that uv does not see at all for that reason, is removed
    here as far as its RECORD goes, so that a rollback can always put the old one back."""
    def uninstall(name: str) -> None:
        if name in read_installed(own_sites(target)):
            try:
                run_uv(["pip", "uninstall", "--python", target.executable, name], log,
                       passthrough=passthrough)
            except InstallError as e:
                if not any(p.suffix == ".dist-info" for p in _leftovers(target, name)):
                    raise
                log(f"uv could not uninstall {name} ({_uv_reason(str(e))}): removing the "
                    "files its RECORD lists, and its .dist-info")
        for folder in _leftovers(target, name):  # what uv could not remove, or not see
            if folder.suffix == ".dist-info":
                _remove_recorded(target, folder)
            else:  # .data: uv unpacking, killed midway
                shutil.rmtree(folder, ignore_errors=True)

    return uninstall


def _leftovers(target: Target, name: str) -> list[Path]:
    """The .dist-info folders of `name` in the target's own site-packages, and its .data
    folders (which an installer empties and removes once it has moved their files): one
    scan of each site folder."""
    out = []
    for site in own_sites(target):
        with contextlib.suppress(OSError):
            for entry in os.scandir(site):
                # <name>-<version><suffix>: the name is all before the last "-" (a
                # version has none), so that bar's never matches bar-baz's
                stem, dot, suffix = entry.name.rpartition(".")
                if dot and suffix in ("dist-info", "data") and "-" in stem and \
                        canonicalize_name(stem.rsplit("-", 1)[0]) == name and \
                        entry.is_dir(follow_symlinks=False):
                    out.append(Path(entry.path))
    return out


def _remove_recorded(target: Target, info: Path) -> None:
    """Remove the files a (perhaps cut short) RECORD in `info` lists, within the target's
    prefix and never one of torch's closure, then the folder itself."""
    try:
        text = (info / "RECORD").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    # compared once links are followed: a RECORD line may reach a file through lib64
    prefix, own = real(str(target.prefix)), real(str(info))
    keep = {real(p) for p in protected_files(target)}
    site = str(info.parent)
    for rel, _h, _s in record_rows(text):
        path = real(os.path.join(site, site_path(rel)))
        if path.startswith(prefix + os.sep) and path not in keep and \
                not path.startswith(own + os.sep):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                os.unlink(path)
    shutil.rmtree(info, ignore_errors=True)


def protected_files(target: Target) -> set[str]:
    """Files of torch's family and of everything it requires, as installed now (owned_files:
    a folder an .egg-info owns whole included): a rollback never deletes them."""
    installed = read_installed(target.site_dirs)
    names = protected(installed, target.facts.get("markers") or {})
    return {path for n in names for _rel, path in owned_files(installed[n])}


def _clean_lock_temps(target: Target) -> None:
    lock = lockfile.lock_path(target.prefix)
    for tmp in lock.parent.glob(f".{lock.name}.*.tmp"):
        pid = tmp.name[len(lock.name) + 2:-4]
        if pid.isdigit() and int(pid) != os.getpid():
            tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Recovery:
    """What recovering an interrupted install did."""

    verb: str = ""  # "finished" (it had committed) or "undone"
    lines: tuple[str, ...] = ()
    action: str = "install"  # what was interrupted: "install" or "uninstall"

    def __bool__(self) -> bool:
        return bool(self.lines)

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)

    def to_json(self) -> dict[str, Any] | None:
        return {"interrupted": self.action, "verb": self.verb, "done": list(self.lines)} \
            if self.verb else None


def _locking(journal: Journal, target: Target) -> None:
    """The run is about to replace the lock: the journal records which file (the lock's
    path depends on COMFY_ENV_ATTN_LOCK, which a later run may not have) and its sha256."""
    path = lockfile.lock_path(target.prefix)
    journal.set_state("locking", lock=str(path), lock_before=file_sha256(path))


def _lock_replaced(journal: Journal, target: Target) -> bool:
    """Whether a run stopped at "locking" had already put its new lock in place (then it
    had finished, and is kept): the file it was replacing no longer has its old sha256."""
    if journal.state != "locking":
        return False
    recorded = journal.meta.get("lock")
    path = Path(recorded) if isinstance(recorded, str) else lockfile.lock_path(target.prefix)
    return file_sha256(path) != journal.meta.get("lock_before")


def recover(target: Target) -> Recovery:
    """Finish or undo an install that was killed midway (call with the target lock held):
    JournalError when its journal cannot be read."""
    j = Journal(target.prefix)
    left = j.clean_leftovers()
    _clean_lock_temps(target)
    if not j.exists():
        if left:
            notice(f"removed what an interrupted run left behind: {', '.join(left)}")
        return Recovery()
    installed = read_installed(target.site_dirs)
    j.load(own_sites(target), protected(installed, target.facts.get("markers") or {}))
    state = j.state
    if _lock_replaced(j, target):
        j.meta["state"] = "committed"  # the new lock was in place: the install had finished
    verb = "finished" if j.state == "committed" else "undone"
    action = j.meta.get("action", "install")
    notice(f"found an interrupted {action} (pid {j.meta.get('pid')}, state {state}): {verb}")
    done = j.rollback(uninstaller(target), protected_files(target))
    for d in done:
        notice(f"  {d}")
    return Recovery(verb, tuple(done), str(action))


@dataclass(frozen=True)
class InstallOptions:
    """How install fetches, verifies and reports (the command line's flags)."""
    index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    keep_failed: bool = False
    verify: Options | None = field(default_factory=Options)  # None: --no-verify
    pypi: bool = False  # --pypi: PyPI is one of the sources
    meter: DownloadMeter | None = None  # download progress
    uv_passthrough: bool = False  # uv's own progress to our stderr (a terminal)


@dataclass(frozen=True)
class Failure:
    """Why one candidate wheel cannot be used."""

    text: str
    refused: bool = False  # by a rule (it would change torch, another package, ...)
    unreachable: bool = False  # its host cannot be reached: skip that host
    skipped_on: str = ""  # not tried: the host, found unreachable for an earlier wheel


class _Context:
    """The target's facts one install run needs, gathered once."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.installed = read_installed(target.site_dirs)
        self.markers: dict[str, str] = target.facts.get("markers") or {}
        self.protect = protected(self.installed, self.markers)
        # the wheels this run will install, as the guard saw them: two wheels of one run
        # may not overwrite each other, and uv may write nothing else
        self.claims: dict[str, tuple[str, list[guard.Entry]]] = {}
        # and what each wheel's RECORD says its files in the site dir hash to, its
        # .dist-info aside (uv writes files of its own there): dist -> {destination: the
        # hashes its lines give}, for _unexpected_files to compare with what uv installed
        self.hashes: dict[str, dict[str, set[str]]] = {}

    @contextlib.contextmanager
    def attempt(self, *, keep: bool = True) -> Iterator[None]:
        """Requirements resolved on trial: what their wheels claimed is forgotten again when
        the attempt fails (or, keep False, in any case: a trial only to learn something),
        so that a later one sees the target as it is."""
        claims, hashes = dict(self.claims), dict(self.hashes)
        try:
            yield
        except BaseException:
            self.claims, self.hashes = claims, hashes
            raise
        if not keep:
            self.claims, self.hashes = claims, hashes

    def forget(self, dist: str) -> None:
        """A wheel passed over: it claims nothing."""
        self.claims.pop(dist, None)
        self.hashes.pop(dist, None)

    def owners(self, entries: list[guard.Entry]) -> guard.Owners:
        """Who owns what among the installed distributions that could own one of these
        destinations (could_own): only their RECORDs are parsed (an environment with torch
        has some 70,000 RECORD lines, nearly all irrelevant)."""
        owners = guard.build_owners(
            ((i.name, i.version, i.location, record_paths(i))
             for i in guard.candidates(self.installed.values(), entries, self.folds_case)),
            fold=self.folds_case)
        for dist, (version, claimed) in self.claims.items():
            owners = owners.claim(dist, version, claimed)
        return owners

    @property
    def _windows(self) -> bool:
        return str(self.target.facts.get("platform", "")).startswith("win") or os.name == "nt"

    @property
    def folds_case(self) -> bool:
        """Whether the target's file names compare case-insensitively: as its platform says
        (a profile's) or as this machine's does, whichever folds (the files are here)."""
        return folds_case(str(self.target.facts.get("platform", ""))) or \
            folds_case(current_os())

    @property
    def layout(self) -> guard.Layout:
        f = self.target.facts
        prefix = str(self.target.prefix)
        py = ".".join(str(f.get("python", "3")).split(".")[:2])
        return guard.Layout(
            site=guard.norm(f["purelib"]),
            platlib=guard.norm(f.get("platlib") or f["purelib"]),
            scripts=guard.norm(f.get("scripts") or os.path.join(
                prefix, "Scripts" if self._windows else "bin")),
            data=guard.norm(f.get("data") or prefix),
            headers=guard.norm(os.path.join(prefix, "include", "site", f"python{py}")),
            exe=".exe" if self._windows else "")

    def check(self, filename: str, reqs: list[str], extras: frozenset[str] = frozenset()
              ) -> Needs:
        """The wheel's requirements against the target as it will be: what this run
        replaces (the wheel's own distribution, the wheels chosen so far) does not answer
        for them with its old version (`dep[fast]` from dep 2.0 is not met by dep 1.0)."""
        going = {project_of(filename), *self.claims}
        have = {n: i for n, i in self.installed.items() if n not in going}
        return check_requirements(filename, reqs, have, self.markers, self.protect, extras)

    def inspect(self, fetched: Fetched, dist: str) -> list[str]:
        """Why this wheel may not go in (guard.py), from its own zip directory and the
        launchers its entry points would add."""
        name = fetched.candidate.filename
        have = self.installed.get(dist)
        if have is not None and is_egg(have):
            # the journal backs up what a distribution lists as its own; an .egg-info lists
            # its files incompletely or not at all, so a rollback could not put it back
            return [f"{name} would replace {dist} {have.version}, installed as a legacy "
                    f".egg-info ({have.dist_info}) whose files cannot all be backed up and "
                    f"restored; uninstall it first (python -m pip uninstall {dist})"]
        try:
            directory = wheel_directory(fetched.path)  # read once, for both checks below
        except InstallError as e:
            return [str(e)]
        bomb = wheel_bomb(fetched.path, directory)
        if bomb:
            return [bomb]
        names = [i.filename for i in directory]
        infos = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        own = sorted(i for i in infos if project_of(i) == dist)
        if not own:
            return [f"{name} has no .dist-info folder for {dist}: not a {dist} wheel"]
        dist_dir = own[0][:-len(".dist-info")]
        layout = self.layout
        entries, refused = guard.destinations(name, dist_dir, names, layout, dist=dist,
                                              purelib=root_is_purelib(fetched.path, dist_dir))
        scripts, bad_scripts = guard.script_entries(
            name, dist_dir, wheel_member(fetched.path, f"{dist_dir}.dist-info/entry_points.txt"),
            layout)
        entries += scripts
        existing = [e.dest for e in entries if os.path.lexists(e.dest)]
        pth = {e.name: wheel_member(fetched.path, e.name) for e in entries
               if e.kind == "site" and "/" not in e.rel and e.rel.endswith(".pth")}
        found = refused + bad_scripts + guard.problems(name, dist, dist_dir, entries,
                                                       self.owners(entries), existing, pth=pth)
        if not found:
            self.claims[dist] = (_version_of(name), entries)
            listed: dict[str, set[str]] = {}
            for path, digest, _size in record_rows(
                    wheel_member(fetched.path, f"{dist_dir}.dist-info/RECORD")):
                if digest:
                    listed.setdefault(site_path(path), set()).add(digest)
            info = f"{dist_dir}.dist-info/"
            self.hashes[dist] = {e.dest: listed[site_path(e.name)] for e in entries
                                 if e.kind == "site" and not e.name.startswith(info)
                                 and site_path(e.name) in listed}
        return found

    def protected_state(self, installed: dict[str, Installed]) -> dict[str, Stat | None]:
        return file_stats(installed[n] for n in self.protect if n in installed)


def _pick_wheels(chosen: list[tuple[str, list[Candidate]]], ctx: _Context, out: Outcome,
                 opts: InstallOptions, passed: Mapping[str, dict[str, str]],
                 obtained: dict[str, Failure | tuple[Fetched, list[str]]]
                 ) -> tuple[list[tuple[str, Fetched]], dict[str, list[str]]]:
    """1. read metadata, fetch and inspect, before anything changes; a wheel that cannot be
    had (unreachable source, hash mismatch, needs another torch, would overwrite another
    package, or `passed`: its requirements cannot be had) gives way to the next fitting one
    in the plan's ranking. `obtained`: what was fetched for a candidate, kept across
    calls. (the wheels ready, each backend's requirements the target lacks)"""
    installed, target = ctx.installed, ctx.target
    ready: list[tuple[str, Fetched]] = []
    deps: dict[str, list[str]] = {}
    dead_hosts: set[str] = set()
    for backend, alternatives in chosen:
        row = out.row(backend)
        failures: list[Failure] = []
        for c in alternatives[:MAX_ALTERNATIVES]:
            host = urlsplit(c.url).netloc
            if c.filename in passed.get(backend, {}):
                failures.append(Failure(f"{c.filename}: {passed[backend][c.filename]}"))
                continue
            if host and host in dead_hosts:
                failures.append(Failure(f"{c.filename}: skipped, {host} is unreachable",
                                        skipped_on=host))
                continue
            got = obtained.get(c.filename)
            if got is None:
                got = obtained[c.filename] = _obtain(c, backend, ctx, opts.meter)
            if isinstance(got, Failure):
                if got.unreachable:
                    dead_hosts.add(host)
                failures.append(got)
                log(f"{backend}: {got.text}")
                continue
            fetched, missing = got
            row.wheel, row.candidate, row.fetched = c.filename, c, fetched
            dist = bk.BACKENDS[backend].dist
            have = installed.get(dist)
            if have is not None and have.version == _version_of(c.filename) and \
                    have.location in own_sites(target):
                row.installed = f"already {have.version}"
                row.action, row.version = "already", have.version
            ready.append((backend, fetched))
            deps[backend] = missing
            # the fitting wheels before it, and why (once: a later round picks again)
            for text in _failure_texts(failures, prefix="passed over "):
                if text not in row.note:
                    row.note = _joined(row.note, text)
            break
        else:
            row.wheel = alternatives[0].filename if alternatives else ""
            row.candidate = alternatives[0] if alternatives else None
            row.fetched = None
            row.installed = "refused" if any(f.refused for f in failures) else "none"
            row.action = "refused" if any(f.refused for f in failures) else "unavailable"
            row.note = " | ".join(_failure_texts(failures))
            out.ok = False
    return ready, deps


def _failure_texts(failures: list[Failure], prefix: str = "") -> list[str]:
    """Each failure's text (after `prefix`), those not tried because their host was found
    unreachable for an earlier wheel counted once per host (the earlier wheel's failure
    says why)."""
    skipped: dict[str, int] = {}
    for f in failures:
        if f.skipped_on:
            skipped[f.skipped_on] = skipped.get(f.skipped_on, 0) + 1
    return [prefix + f.text for f in failures if not f.skipped_on] + [
        f"{n} more fitting wheel{'s' if n > 1 else ''} on {host} not tried ({host} was "
        "unreachable for an earlier wheel)"
        for host, n in skipped.items()]


def _unmet_backends(opts: InstallOptions, ctx: _Context, to_install: list[tuple[str, Fetched]],
                    deps: Mapping[str, list[str]], dists: set[str]) -> dict[str, str]:
    """Each backend of the run whose own requirements cannot be had, tried alone (after
    all of them together failed), with uv's reason."""
    out: dict[str, str] = {}
    for b, _f in to_install:
        own = sorted(d for d in deps.get(b, []) if _req_name(d) not in dists)
        if not own:
            continue
        with ctx.attempt(keep=False):
            try:
                _requirements(opts, ctx, own, {})
            except Unreachable:
                raise  # the network, not the wheel: no other wheel would do better
            except (AttnError, OSError) as e:
                out[b] = _uv_reason(str(e))
    return out


def _uv_reason(text: str) -> str:
    """uv's own words from a failed run's message, on one line: its "Because ..." sentence
    when it gives one (after the line saying which uv command failed)."""
    lines = [ln.strip(" ×╰─▶│") for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("$ ")]
    body = lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines
    because = next((ln[ln.index("Because"):] for ln in body if "Because" in ln), None)
    said = because or " ".join(body)
    return (said[:400] + " ...") if len(said) > 400 else said


def run_install(target: Target, chosen: list[tuple[str, list[Candidate]]], out: Outcome,
                opts: InstallOptions) -> None:
    ctx = _Context(target)
    installed = ctx.installed
    passed: dict[str, dict[str, str]] = {}  # backend -> wheel -> why its requirements fail
    obtained: dict[str, Failure | tuple[Fetched, list[str]]] = {}
    while True:
        ready, deps = _pick_wheels(chosen, ctx, out, opts, passed, obtained)
        to_install = [(b, f) for b, f in ready if out.row(b).action != "already"]
        if not to_install:
            # nothing to change: still verify what is there and write the lock (SDPA alone
            # when nothing fits), so that the dispatcher finds one; unless nothing is
            # verified either and the lock records what is installed: what it proved still
            # stands (marking it unverified would take its backends from the dispatcher)
            lock = lockfile.lock_path(target.prefix)
            if opts.verify is None and _lock_records(lock, installed):
                verify_installed(target, installed, out, None)
                for row in out.rows.values():
                    if row.verified:
                        row.verified = "as the lock records it (nothing installed, --no-verify)"
                log(f"nothing installed: the lock {lock} is kept as it was (`verify` proves "
                    "what is there again)")
                return
            results = verify_installed(target, installed, out, opts.verify)
            out.lock = _write_lock(target, installed, results, [f for _, f in ready])
            return
        # a backend's requirement on a backend of this run (itself with extras, say) is this
        # run's wheel, not one for uv to resolve again
        dists = {bk.BACKENDS[b].dist for b, _ in to_install}
        missing = sorted({d for b, _ in to_install for d in deps[b]
                          if _req_name(d) not in dists})
        extra: list[tuple[str, Fetched]] = []
        brought: dict[str, list[str]] = {}  # what each of them needs that the target lacked
        if not missing:
            break
        try:
            with ctx.attempt():
                extra = _requirements(opts, ctx, missing, brought)
            break
        except Unreachable as e:
            raise InstallError(f"{e}\nnothing was installed") from None
        except (AttnError, OSError) as e:
            # a wheel whose requirements cannot be had gives way to the next fitting one,
            # as one that cannot be had itself does
            unmet = _unmet_backends(opts, ctx, to_install, deps, dists)
            if not unmet:  # each alone resolves: together they conflict
                raise InstallError(f"{e}\nnothing was installed") from None
            for name, why in unmet.items():
                wheel = out.row(name).wheel
                passed.setdefault(name, {})[wheel] = f"its requirements cannot be had ({why})"
                ctx.forget(bk.BACKENDS[name].dist)
                alternatives = next(alts for b, alts in chosen if b == name)
                more = any(c.filename not in passed[name]
                           for c in alternatives[:MAX_ALTERNATIVES])
                log(f"{name}: {wheel}: its requirements cannot be had ({why}); " +
                    ("trying the next fitting wheel" if more else
                     f"no other wheel fits: nothing was installed for {name}"))
    journal = Journal(target.prefix)
    touched = [bk.BACKENDS[b].dist for b, _ in to_install]
    dep_names = [name for name, _ in extra]
    journal.begin({"python": target.executable, "backends": [b for b, _ in to_install]})
    uninstall = uninstaller(target, passthrough=opts.uv_passthrough)
    try:
        for name in touched + dep_names:  # with what its wheel writes, as the guard saw it
            journal.add(name, installed, own_sites(target),
                        [e.dest for e in ctx.claims.get(name, ("", []))[1]])
        journal.set_state("installing")
        # uv removes the files the old versions' RECORDs list: not those others own
        replaced = [n for n in touched + dep_names
                    if n in installed and installed[n].location in own_sites(target)]
        foreign = shared_files(installed, replaced, fold=ctx.folds_case)
        for name in replaced:
            kept = keep_foreign(installed[name].location, name, foreign)
            if kept:
                log(f"{name}: leaving {len(kept)} file(s) other distributions own ({kept[0]})")
        crash_point("backed-up")
        # beside the journal: a run killed with uv leaves it where the next run clears it
        with tempfile.TemporaryDirectory(dir=journal.dir, prefix=UV_WORK_PREFIX) as tmp:
            _uv_install(target, [(bk.BACKENDS[b].dist, f) for b, f in to_install] + extra,
                        Path(tmp), installed, passthrough=opts.uv_passthrough)
            crash_point("installed")
        for b, f in to_install:
            row = out.row(b)
            row.installed = row.version = _version_of(f.candidate.filename)
            row.action = "installed"
        after = read_installed(target.site_dirs)
        _check_untouched(ctx, None, after, touched + dep_names)
        journal.set_state("verifying")
        crash_point("verifying")
        results = verify_installed(target, after, out, opts.verify)
        failed = [b for b, _ in to_install if b in results and not results[b].passed]
        for b in failed:
            if opts.keep_failed:
                out.row(b).note = "kept despite failing (--keep-failed)"
                out.row(b).action = "kept"
                continue
            journal.restore(bk.BACKENDS[b].dist, uninstall, protected_files(target))
            out.row(b).installed += " -> rolled back"
            out.row(b).action = "rolled-back"
            before = journal.touched.get(bk.BACKENDS[b].dist)
            out.row(b).version = before.before if before is not None else None
        if failed and not opts.keep_failed:
            kept = [b for b, _ in to_install if b not in failed]
            for name in _orphaned(extra, brought, [d for b in failed for d in deps.get(b, [])],
                                  [d for b in kept for d in deps.get(b, [])]):
                log(f"{journal.restore(name, uninstall, protected_files(target))} (it came "
                    f"with {', '.join(failed)}, which was rolled back)")
        live = None
        if failed:
            out.ok = False
            after = read_installed(target.site_dirs)
            if not opts.keep_failed:  # what was rolled back, its variants too, is not locked
                results = {k: v for k, v in results.items() if bk.primary(k) not in failed}
                ready = [(b, f) for b, f in ready if b not in failed]
                live = _files_now(results, target, [bk.BACKENDS[b].dist for b in failed])
        crash_point("verified")
        _locking(journal, target)
        crash_point("locking")
        staying = [b for b, _ in to_install if opts.keep_failed or b not in failed]
        out.lock = _write_lock(target, after, results, [f for _, f in ready], live=live,
                               brought=_brought_by(extra, brought, deps, staying,
                                                   installed))
        crash_point("locked")
        journal.commit()
    except BaseException as e:  # anything at all, a bug included: the target goes back
        _put_back(journal, target, uninstall, e, "install")


def _put_back(journal: Journal, target: Target, uninstall: Callable[[str], None],
              e: BaseException, what: str) -> NoReturn:
    """An install's or uninstall's end when anything at all went wrong midway, a bug
    included: the journal puts the target back (or keeps a run whose new lock is in place),
    then `e` goes on: an error of the target's or the user's as an InstallError saying what
    became of the target, an interrupt or a bug as itself, after a line saying so (a bug's
    traceback is the report). A rollback that itself fails during an interrupt leaves the
    journal to the next run, and the interrupt goes on."""
    if isinstance(e, KeyboardInterrupt):
        log("interrupted: putting the target back as it was ...")
    try:
        if _lock_replaced(journal, target):
            journal.meta["state"] = "committed"  # the new lock is in place: keep it
        done = journal.rollback(uninstall, protected_files(target))
    except BaseException:
        if isinstance(e, KeyboardInterrupt):
            raise e from None
        raise
    if isinstance(e, KeyboardInterrupt) or not isinstance(e, AttnError | OSError):
        log(_restored_line(journal, done))
        raise e
    if journal.meta.get("state") == "committed":
        raise InstallError(f"{e}\nthe {what} itself had completed and was kept") from None
    raise InstallError(f"{e}\nthe target was restored: {'; '.join(done)}") from None


def _restored_line(journal: Journal, done: list[str]) -> str:
    """What an interrupted run says once it has put the target back (or kept a run that had
    completed)."""
    if journal.meta.get("state") == "committed":
        return "the run itself had completed and was kept"
    return "the target was restored" + (f": {'; '.join(done)}" if done else " (nothing had "
                                        "changed)")


def _lock_records(path: Path, installed: dict[str, Installed]) -> bool:
    """Whether the lock reads, and records the backends' distributions installed now, each
    at its installed version, and no other (a run killed before it locked leaves another
    version installed than the lock names): its [[packages]] (what install put in) and the
    distributions its fingerprint saw (what verify proved, however it was installed: a
    `verify` after `pip install` locks no package). A fingerprinted distribution must also
    have the files it had (the same version rebuilt and reinstalled has others)."""
    try:
        doc = lockfile.read(path)
        wheels = lockfile.wheels_of(doc)
        seen = tool_table(doc).fingerprint.backends.values()
    except AttnError:
        return False
    dists = {bk.BACKENDS[b].dist for b in installed_backends(installed)}
    locked = {(canonicalize_name(w.name), w.version) for w in wheels
              if canonicalize_name(w.name) in bk.BY_DIST}
    locked |= {(canonicalize_name(d.dist), d.version) for d in seen}
    return locked == {(d, installed[d].version) for d in dists} and all(
        d.same_files(files_digest(Path(installed[canonicalize_name(d.dist)].dist_info)))
        for d in seen)


def _check_untouched(ctx: _Context, before: dict[str, Stat | None] | None,
                     after: dict[str, Installed], new: list[str]) -> None:
    """InstallError when torch, its family or anything it requires changed (a version
    replaced or moved; with `before`, a file written or a package hidden by a new one earlier
    on sys.path), or when a backend just installed wrote anything its wheel did not show the
    guard."""
    site_dirs = ctx.target.site_dirs
    problems = [f"{n} is now {after[n].version if n in after else 'gone'} "
                f"(was {v}{'' if n not in after else ' at ' + ctx.installed[n].location})"
                for n, v in ctx.protect.items()
                if n not in after or after[n].version != v
                or after[n].location != ctx.installed[n].location]
    if before is not None:
        problems += [f"{p} changed" for p in changed_files(before, ctx.protected_state(after))]
        problems += shadowing(after, site_dirs, ctx.protect)
    if problems:
        raise InstallError("the install changed torch or a package torch needs: "
                           + "; ".join(dict.fromkeys(problems[:8]))
                           + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    for dist in new:
        inst = after.get(dist)
        bad = _unexpected_files(ctx, dist, inst) if inst is not None else \
            [f"{dist} is not installed"]
        if bad:
            raise InstallError(f"{dist} as installed does not match what its wheel showed: "
                               + "; ".join(bad[:5]))


def _unexpected_files(ctx: _Context, dist: str, inst: Installed) -> list[str]:
    """What uv's RECORD of a new distribution lists beyond the destinations the guard
    approved (and the installer's own files in its .dist-info), and listed files that are
    missing or of another size; then the files the inspected wheel's RECORD gives a hash
    for: each must be installed with that hash (uv copies those lines, so another hash
    means other bytes, say from uv's cache of an earlier file at that path and mtime; a
    line uv left without one, the file is hashed here). The wheel's bytes were hashed as
    they arrived: no second hash of every file."""
    claimed = ctx.claims.get(dist)
    expected = ctx.hashes.get(dist, {})
    stale = f"from uv's cache? `uv cache clean {dist}` clears it"
    approved = {e.dest for e in claimed[1]} if claimed else set()
    tops = {e.rel.split("/", 1)[0] for e in claimed[1] if e.kind == "site"} if claimed \
        else set()
    info = guard.norm(inst.dist_info) + os.sep
    out: list[str] = []
    listed: set[str] = set()
    for rel, digest, size in record_lines(inst):
        path = guard.norm(os.path.join(inst.location, rel))
        listed.add(path)
        if path not in approved and not path.startswith(info) and \
                not (is_bytecode(rel) and rel.split("/", 1)[0] in tops):
            out.append(f"{rel} (not in the wheel)")
            continue
        st = stat_of(path)
        if st is None:
            out.append(f"{rel} (missing)")
        elif size.isdigit() and int(size) != st[0]:
            out.append(f"{rel} (size {st[0]}, RECORD says {size})")
        elif path in expected:
            # a line uv left without a hash: the file's own, in the wheel RECORD's algorithm
            got = digest or record_hash(path, min(expected[path]).partition("=")[0].lower())
            if got not in expected[path]:
                out.append(f"{rel} (hash {got or 'unreadable'}, the inspected wheel's RECORD "
                           f"says {min(expected[path])}: other bytes, {stale})")
    out += [f"{os.path.relpath(p, inst.location)} (in the wheel, not installed: {stale})"
            for p in sorted(expected.keys() - listed)]
    return out


def _requirements(opts: InstallOptions, ctx: _Context, missing: list[str],
                  brought: dict[str, list[str]]) -> list[tuple[str, Fetched]]:
    """The wheels that satisfy what the backends require and the target lacks, each fetched,
    hash-checked, its own requirements checked and its files inspected by the guard, before
    anything is installed. uv resolves each round (`uv pip compile --no-deps` to a PEP 751
    lock: the wheel URL and sha256 it would install); round by round, because uv does not see
    a venv's system-site-packages torch as installed and would fetch another one. Every
    requirement is checked against what the target really has, torch's closure first, and
    against the wheels already chosen."""
    target = ctx.target
    chosen: dict[str, tuple[str, Fetched]] = {}  # name -> (version, wheel)
    checked: dict[str, frozenset[str]] = {}  # name -> the extras its wheel was checked with
    with tempfile.TemporaryDirectory() as tmp:
        constraint = constraint_file(ctx.protect, Path(tmp))
        offline = offline_args(opts.index_urls, opts.find_links, pypi=opts.pypi, log=log)
        for _round in range(12):
            if not missing:
                return [(name, f) for name, (_v, f) in chosen.items()]
            pinned = uv_compile(target.executable, missing, [
                "--only-binary", ":all:", "--constraint", str(constraint),
                *uv_index_args(list(opts.index_urls), list(opts.find_links)), *offline], log)
            asked: dict[str, list[str]] = {}  # what this round asks of each name
            for text in missing:
                asked.setdefault(_req_name(text), []).append(text)
            needed: list[str] = []
            for name, version, url, sha in pinned:
                if name in chosen:  # asked for again, and the version chosen does not fit
                    texts = ", ".join(asked.get(name, []))
                    raise InstallError(f"the backends' requirements conflict: {texts} does "
                                       f"not fit {name} {chosen[name][0]}, chosen for another "
                                       "requirement")
                c = Candidate(filename=filename_of(url), url=url,
                              source=_source_of(url, opts.find_links), sha256=sha)
                fetched = fetch_wheel(c, log, meter=opts.meter)
                extras = frozenset(x for r in asked.get(name, [])
                                   for x in requested_extras(Requirement(r)))
                also = _requirement_needs(ctx, fetched, extras)
                brought.setdefault(name, []).extend(also)
                problems = ctx.inspect(fetched, name)
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise InstallError(f"{problems[0]}{more}: refusing this requirement of "
                                       "the backends")
                chosen[name] = (version, fetched)
                checked[name] = extras
                needed += also
            missing = _unmet(needed, chosen, checked, ctx, brought)
    raise InstallError(f"requirements still missing after 12 rounds: {', '.join(missing)}")


def _unmet(needed: list[str], chosen: dict[str, tuple[str, Fetched]],
           checked: dict[str, frozenset[str]], ctx: _Context,
           brought: dict[str, list[str]]) -> list[str]:
    """What the next round must resolve: the requirements no wheel chosen so far satisfies.
    One that a chosen wheel satisfies but with extras it was not checked with brings that
    wheel's requirements for them (`foo[fast]` after a plain `foo`)."""
    out: set[str] = set()
    todo = list(needed)
    while todo:
        text = todo.pop()
        req = Requirement(text)
        name = str(canonicalize_name(req.name))
        if name not in chosen or not satisfies(chosen[name][0], str(req.specifier)):
            out.add(text)
            continue
        extras = checked[name] | requested_extras(req)
        if extras == checked[name]:
            continue
        checked[name] = extras
        more = _requirement_needs(ctx, chosen[name][1], extras)
        brought.setdefault(name, []).extend(more)
        todo += more
    return sorted(out)


def _requirement_needs(ctx: _Context, fetched: Fetched, extras: frozenset[str]) -> list[str]:
    """What a wheel chosen for the backends' requirements needs in turn, asked with these
    extras; InstallError when one of those would change torch's closure."""
    needs = ctx.check(fetched.candidate.filename, requirements(wheel_metadata(fetched.path)),
                      extras)
    if needs.refused:
        raise InstallError(f"{needs.refused[0]} (a requirement of the backends)")
    return needs.missing


def _source_of(url: str, find_links: tuple[str, ...]) -> str:
    """How fetch_wheel judges the link uv resolved: a local file is accepted only inside a
    local --find-links folder; anything else counts as an index's link."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = os.path.realpath(unquote(parts.path))
        for f in find_links:
            if urlsplit(f).scheme in ("", "file") and os.path.isdir(f) and \
                    path.startswith(os.path.realpath(f) + os.sep):
                return f"find-links:{f}"
    return "index:uv"


def _obtain(c: Candidate, backend: str, ctx: _Context, meter: DownloadMeter | None = None
            ) -> tuple[Fetched, list[str]] | Failure:
    """(the wheel on disk, requirements to add) or why this candidate cannot be used."""
    dist = bk.BACKENDS[backend].dist
    if project_of(c.filename) != dist:
        return Failure(f"{c.filename} is not a {dist} wheel ({backend} is {dist})",
                       refused=True)
    meta = fetch_metadata(c)
    if meta is not None:
        needs = ctx.check(c.filename, requirements(meta))
        if needs.refused:
            return Failure(needs.refused[0], refused=True)
    try:
        fetched = fetch_wheel(c, log, meter=meter)
        needs = ctx.check(c.filename, requirements(wheel_metadata(fetched.path)))
        if needs.refused:
            return Failure(needs.refused[0], refused=True)
        problems = ctx.inspect(fetched, dist)
    except Unreachable as e:
        return Failure(str(e), unreachable=True)
    except InstallError as e:
        return Failure(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Failure(f"{problems[0]}{more}: refusing to install it", refused=True)
    return fetched, needs.missing


def _uv_install(target: Target, items: list[tuple[str, Fetched]], tmp: Path,
                installed: Mapping[str, Installed], *, passthrough: bool = False) -> None:
    """One uv run for every wheel, each from its file on disk, nothing resolved or fetched
    by uv. Each wheel is hashed once: by us, as it downloaded (or once on disk), and checked
    against its source's hash before it got here; uv is not asked to hash it again.

    `--reinstall-package` only for a distribution the target has (uv would keep that
    one). It also makes uv refresh its cache, its query of the interpreter included: 90 ms
    of a small install's 120 (or 35 with that query answered from uv's cache, which
    facts.probe_start.warm_uv filled meanwhile). Without it, uv may take the wheel's files
    from its cache of that path and mtime: _unexpected_files then compares what uv
    installed with the wheel's RECORD, hash by hash."""
    req = tmp / "attention.txt"
    req.write_text("".join(f"{dist} @ {f.path.resolve().as_uri()}\n" for dist, f in items),
                   encoding="utf-8")
    args = ["pip", "install", "--python", target.executable, "--no-deps", "--offline",
            "--no-index", "--only-binary", ":all:", "-r", str(req)]
    for dist, _f in items:
        if dist in installed:
            args += ["--reinstall-package", dist]
    indexing: list[threading.Thread] = []
    # for the next install's guard; not what uv replaces (whose RECORD it may be deleting:
    # on Windows a file open here can make that fail, and the entry would be stale)
    replaced = {dist for dist, _f in items}
    kept = [inst for name, inst in installed.items() if name not in replaced]

    def meanwhile() -> None:  # while uv works; all optional: uv goes on whatever befalls
        with contextlib.suppress(Exception):
            for _dist, f in items:  # the lock's hashes (a local wheel's is not yet known)
                if isinstance(f.digest, FileDigest):
                    f.digest.start()
        with contextlib.suppress(Exception):
            lockfile.load_in_background()
        with contextlib.suppress(Exception):
            indexing.append(index_in_background(kept))

    try:
        run_uv(args, log, passthrough=passthrough, meanwhile=meanwhile)
    finally:
        for thread in indexing:
            thread.join()


def _version_of(filename: str) -> str:
    return filename.split("-")[1]


def _orphaned(extra: list[tuple[str, Fetched]], brought: Mapping[str, list[str]],
              failed_needs: list[str], kept_needs: list[str]) -> list[str]:
    """The requirements this run installed that the rolled-back backends brought and no
    kept backend reaches. `brought`: what each wheel of the run needed that the target
    lacked, as the run resolved it (through an installed distribution's extras too); the
    backends' own needs are the roots (markers aside: one a marker might leave out
    counts)."""
    needs = _needs(extra, brought)
    theirs, kept = _reach(needs, failed_needs), _reach(needs, kept_needs)
    return [name for name, _ in extra if name in theirs and name not in kept]


def _brought_by(extra: list[tuple[str, Fetched]], brought: Mapping[str, list[str]],
                deps: Mapping[str, list[str]], backends: list[str],
                before: Collection[str]) -> dict[str, tuple[Fetched, tuple[str, ...]]]:
    """Each requirement this run installed new (not one it upgraded: that was the target's
    before), its wheel and the backends (of these) whose own needs reach it, as `_orphaned`
    judges reach: what the lock records, for uninstall to take out again."""
    needs = _needs(extra, brought)
    reached = {b: _reach(needs, deps.get(b, [])) for b in backends}
    out = {name: (f, tuple(b for b in backends if name in reached[b])) for name, f in extra
           if name not in before}
    return {name: v for name, v in out.items() if v[1]}


def _needs(extra: list[tuple[str, Fetched]], brought: Mapping[str, list[str]]
           ) -> dict[str, list[str]]:
    return {name: [_req_name(r) for r in brought.get(name, [])] for name, _ in extra}


def _reach(needs: Mapping[str, list[str]], roots: list[str]) -> set[str]:
    todo, seen = [_req_name(r) for r in roots], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += needs.get(name, [])
    return seen


def _names(requirements: Iterable[str]) -> list[str]:
    """The names of these requirements, those that do not parse left out."""
    out = []
    for r in requirements:
        with contextlib.suppress(InvalidRequirement):
            out.append(_req_name(r))
    return out


def _req_name(text: str) -> str:
    return str(canonicalize_name(Requirement(text).name))


# -- verify and lock ----------------------------------------------------------------------


def locked_plugins(target: Target) -> list[str]:
    """The shipped plugins the target's lock records: proven once on request (`verify
    --include`), then proven again by every verify and install, never dropped silently."""
    from comfy_env_attn.core.lockmodel import tool_table
    from comfy_env_attn.verify.run import SHIPPED_PLUGINS

    try:
        names = tool_table(lockfile.read(lockfile.lock_path(target.prefix))).backends
    except AttnError:
        return []
    return [n for n in names if n in SHIPPED_PLUGINS]


def verify_installed(target: Target, installed: dict[str, Installed], out: Outcome,
                     opts: Options | None) -> dict[str, Result]:
    """Verify every installed backend (opts None: skip, the lock marks them unverified)."""
    names = installed_backends(installed)
    for n in names:
        row = out.row(n)
        have = installed[bk.BACKENDS[n].dist].version
        if not row.action:
            row.action, row.version = "present", have
        elif row.action in ("unavailable", "refused", "no-wheel"):
            # what is verified below is what was there, not the wheel this run wanted
            row.version = have
            row.installed = f"kept {have}: what was there (the wheel chosen was not installed)"
    if opts is None:
        for n in names:
            out.row(n).verified = "skipped (--no-verify)"
        return {}
    # shipped plugins an earlier `verify --include` put in the lock are proven again
    locked = [n for n in locked_plugins(target) if n not in opts.include]
    if locked:
        opts = replace(opts, include=(*opts.include, *locked))
    results = verify(target.executable, names, opts, progress=log)
    for n, r in results.items():
        out.row(n).verified = r.summary()
        out.row(n).result = r
        if n in opts.include and not out.row(n).action:
            out.row(n).action = "included"
        if not r.passed and n in names:
            out.ok = False
    if not results["sdpa"].passed:
        raise InstallError(baseline_failure(target.executable, results["sdpa"], opts.device))
    return results


def _write_lock(target: Target, installed: dict[str, Installed], results: dict[str, Result],
                fetched: list[Fetched], *, live: Live | None = None,
                brought: Mapping[str, tuple[Fetched, tuple[str, ...]]] | None = None) -> Path:
    """The lock; when nothing was verified, with the target's facts learned here, from its
    files, rather than by starting its torch (seconds, most of an install's own time)."""
    return lockfile.write_lock(target, installed, results, fetched,
                               live=live or (None if results else static_live(target)),
                               brought=brought)


def _files_now(results: dict[str, Result], target: Target, dists: list[str]) -> Live | None:
    """Verification's facts with these distributions' files as they are now (after a
    rollback put an older version back, or removed them)."""
    sdpa = results.get("sdpa")
    data = sdpa.data.get("live") if sdpa is not None else None
    if not data:
        return None
    live = Live.from_dict(data)
    return replace(live, dists={**live.dists,
                                **dists_facts(dists, target.import_path)})


def static_live(target: Target) -> Live:
    """What the fingerprint of a lock written without verification holds: torch's version and
    CUDA (the probe read them), the adapters' digest and each backend's files."""
    f = target.facts
    return Live(torch=f.get("torch"), torch_cuda=f.get("torch_cuda"), device="unverified",
                capability=None, adapters_sha256=adapters_sha256(),
                dists=dists_facts((b.dist for b in bk.BACKENDS.values() if b.dist),
                                  target.import_path))


def reverify(target: Target, opts: Options) -> tuple[Outcome, bool]:
    """Verify what is installed and rewrite the lock (call with the target lock held)."""
    recover(target)
    installed = read_installed(target.site_dirs)
    out = Outcome()
    results = verify_installed(target, installed, out, opts)
    out.lock = _write_lock(target, installed, results, [])
    return out, all(results[n].passed for n in installed_backends(installed))


# -- uninstall ------------------------------------------------------------------------------

def uninstall_targets(target: Target, backends: list[str] | None) -> list[str]:
    """What `uninstall` removes: the backends named, or else those the lock records as
    installed by this tool."""
    if backends is not None:
        return backends
    path = lockfile.lock_path(target.prefix)
    try:
        doc = lockfile.read(path, python=target.executable)
    except AttnError as e:
        raise InstallError(f"cannot tell what comfy-env-attn installed ({e}): name the "
                           "backends to remove with --backends") from None
    return list(dict.fromkeys(w.backend for w in lockfile.wheels_of(doc)
                              if w.backend in bk.BACKENDS))


def run_uninstall(target: Target, backends: list[str], out: Outcome, *,
                  passthrough: bool = False, with_requirements: bool = False,
                  named: bool = False) -> None:
    """Remove these backends' distributions from the target's own site-packages, journalled
    like an install (a failure or a kill midway puts them back), never a file of torch,
    its closure or another distribution; then rewrite the lock without them.
    `with_requirements`: the requirements they alone brought go too, and those an earlier
    uninstall left of backends already gone (the lock keeps them, brought-by intact): of
    every such backend, or (`named`: the command line named the backends) of those named."""
    ctx = _Context(target)
    installed, own = ctx.installed, own_sites(target)
    gone = [b for b in _gone_backends(target, installed) if not named or b in backends] \
        if with_requirements else []
    remove: list[str] = []
    for b in backends:
        row = out.row(b)
        dist = bk.BACKENDS[b].dist
        inst = installed.get(dist) if dist else None
        if not dist:
            row.action, row.note = "builtin", "part of torch: nothing to remove"
        elif inst is None:
            row.action, row.note = "absent", "not installed"
        elif inst.location not in own:
            row.action, row.version = "absent", inst.version
            row.note = f"installed outside the target's own site-packages ({inst.location}): " \
                       "left alone"
        else:
            row.version, row.installed = inst.version, inst.version
            remove.append(b)
    before_files = ctx.protected_state(installed)
    dists = [bk.BACKENDS[b].dist for b in remove]
    for b in gone:
        if b not in backends:
            out.row(b).action, out.row(b).note = "absent", "uninstalled before"
    reqs, released = _requirements_to_remove(ctx, remove, dists, own, out, gone)
    if not (remove or reqs):
        return
    orphans: set[str] = set()  # left, and kept in the lock for a later --with-requirements
    if not with_requirements:  # ComfyUI and custom nodes import packages they never declare
        for d, by in reqs.items():
            for b in by:
                out.row(b).note = _joined(out.row(b).note, f"left {d} "
                                          f"{installed[d].version}, which came with it "
                                          "(`uninstall --with-requirements` takes it out, "
                                          "now or later)")
        orphans, reqs = set(reqs), {}
        released -= orphans
    every = dists + list(reqs)
    # files any other distribution (torch's closure included) owns: never deleted
    foreign = protected_files(target) | shared_files(installed, every, fold=ctx.folds_case)
    journal = Journal(target.prefix)
    journal.begin({"python": target.executable, "backends": remove, "action": "uninstall"})
    uninstall = uninstaller(target, passthrough=passthrough)
    try:
        for d in every:
            journal.add(d, installed, own)
        journal.set_state("installing")
        for b, d in zip(remove, dists, strict=True):
            kept = keep_foreign(installed[d].location, d, foreign)
            uninstall(d)
            row = out.row(b)
            row.action, row.version = "removed", None
            row.installed = f"removed ({d} {installed[d].version})"
            if kept:
                row.note = _joined(row.note, f"left {len(kept)} file(s) other distributions "
                                             f"own ({kept[0]})")
            crash_point("uninstalling")
        for d, by in reqs.items():
            keep_foreign(installed[d].location, d, foreign)
            uninstall(d)
            for b in by:
                out.row(b).note = _joined(out.row(b).note, f"also removed {d} "
                                          f"{installed[d].version}, which came with it")
        after = read_installed(target.site_dirs)
        _check_untouched(ctx, before_files, after, [])
        _locking(journal, target)
        crash_point("locking")
        out.lock = _lock_without(target, remove, after, released, orphans)
        journal.commit()
    except BaseException as e:  # anything at all, a bug included: the target goes back
        _put_back(journal, target, uninstall, e, "uninstall")


def _gone_backends(target: Target, installed: Mapping[str, Installed]) -> list[str]:
    """The backends the lock names as having brought a requirement that are no longer
    installed: an uninstall without --with-requirements left what they brought."""
    try:
        wheels = lockfile.wheels_of(lockfile.read(lockfile.lock_path(target.prefix)))
    except AttnError:
        return []
    named = dict.fromkeys(b for w in wheels for b in w.brought_by if b in bk.BACKENDS)
    return [b for b in named if bk.BACKENDS[b].dist and bk.BACKENDS[b].dist not in installed]


def _requirements_to_remove(ctx: _Context, remove: list[str], dists: list[str],
                            own: Collection[str], out: Outcome, gone: Collection[str] = ()
                            ) -> tuple[dict[str, list[str]], set[str]]:
    """(the requirements an install put in for these backends, the lock's brought-by, that go
    with them: distribution -> the backends of `remove` that brought it; every requirement
    the lock records for them alone, which leaves the lock whether removed or not). One
    stays, with its reason in those backends' notes, when a backend that stays brought it
    too, when it is no longer at the version the lock records (changed since), installed
    elsewhere than the target's own site-packages, in torch's closure, or required by any
    distribution that stays (markers aside: one a marker might leave out keeps it).
    `gone`: backends uninstalled before, whose requirements the lock still records as theirs
    (their own requirements can no longer be read: the lock's record, at its version, and
    the rules above decide)."""
    try:
        wheels = lockfile.wheels_of(lockfile.read(lockfile.lock_path(ctx.target.prefix)))
    except AttnError:
        return {}, set()  # no lock, or unreadable: it cannot say what came with them
    installed, leaving = ctx.installed, set(remove) | set(gone)
    requires = {name: _names(inst.requires) for name, inst in installed.items()}
    # what the leaving backends require as installed, through the distributions installed:
    # a lock that names anything else as theirs (edited, or corrupt) takes nothing with it
    reach = _reach(requires, dists)
    found: dict[str, list[str]] = {}
    released = {str(canonicalize_name(w.name)) for w in wheels
                if w.brought_by and set(w.brought_by) <= leaving}
    for w in wheels:
        d = str(canonicalize_name(w.name))
        inst = installed.get(d)
        by = [b for b in w.brought_by if b in leaving]
        if not by or inst is None or d in dists:
            continue
        why = None
        if d in bk.BY_DIST or d == "comfy-env-attn":  # never a requirement to take along
            why = "it is an attention backend itself (uninstall --backends names those)" \
                if d in bk.BY_DIST else "it is comfy-env-attn itself"
        elif set(w.brought_by) - leaving:
            why = f"{', '.join(sorted(set(w.brought_by) - leaving))} brought it too"
        elif inst.version != w.version:
            why = f"it is {inst.version} now; the lock recorded {w.version}"
        elif d not in reach and not set(by) <= set(gone):
            why = f"the lock says it came with {', '.join(by)}, which does not require it"
        elif inst.location not in own or d in ctx.protect:
            why = "torch needs it" if d in ctx.protect else f"it is installed in {inst.location}"
        if why:
            for b in by:
                out.row(b).note = _joined(out.row(b).note, f"left {d} {inst.version}: {why}")
        else:
            found[d] = by
    while True:  # what stays must still have what it requires
        gone = set(dists) | set(found)
        needed: dict[str, str] = {}
        for name, names in requires.items():
            if name not in gone:
                for r in names:
                    needed.setdefault(r, name)
        still = [d for d in found if d in needed]
        if not still:
            return found, released
        for d in still:
            for b in found.pop(d):
                out.row(b).note = _joined(out.row(b).note, f"left {d} "
                                          f"{installed[d].version}: {needed[d]} requires it")


def _joined(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _lock_without(target: Target, removed: list[str], after: dict[str, Installed],
                  requirements: Collection[str] = (), orphans: Collection[str] = ()
                  ) -> Path | None:
    """The target's lock rewritten without these backends: their packages, records and
    fingerprint entries go, and the packages of the requirements they alone brought
    (`requirements`); those left installed (`orphans`) stay, still brought by them, for a
    later `uninstall --with-requirements`; the rest (and what verification proved of it)
    stays."""
    import time

    from comfy_env_attn.core.backends import normalize_dist
    from comfy_env_attn.core.lockmodel import tool_table

    path = lockfile.lock_path(target.prefix)
    if not path.exists():
        return None
    try:
        doc = lockfile.read(path)
        tool = tool_table(doc)
    except AttnError as e:  # unreadable: what is installed now, unverified
        log(f"the lock {path} could not be read ({e}): writing a new one")
        return _write_lock(target, after, {}, [])
    gone = {bk.BACKENDS[b].dist for b in removed} | set(requirements)
    doc["packages"] = [p for p in doc.get("packages", [])
                       if normalize_dist(str(p.get("name", ""))) not in gone]
    for p in doc["packages"]:  # a requirement another backend brought too is that one's now
        own = (p.get("tool") or {}).get("comfy-env-attn")
        if normalize_dist(str(p.get("name", ""))) in orphans:
            continue
        if isinstance(own, dict) and isinstance(own.get("brought-by"), list):
            own["brought-by"] = [b for b in own["brought-by"] if b not in removed]
    tool = replace(tool,
                   backends={n: r for n, r in tool.backends.items()
                             if bk.primary(n) not in removed},
                   fingerprint=replace(tool.fingerprint, backends={
                       n: d for n, d in tool.fingerprint.backends.items()
                       if bk.primary(n) not in removed}),
                   auto=tuple(n for n in tool.auto if bk.primary(n) not in removed),
                   exact=tuple(n for n in tool.exact if bk.primary(n) not in removed),
                   written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    doc["tool"]["comfy-env-attn"] = tool.to_dict()
    lockfile.write(path, doc)
    log(f"wrote {path}")
    return path
