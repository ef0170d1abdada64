"""Nothing is lost: one install per target at a time, and a journal that can undo it.

Write-ahead, in this order: the journal says what is about to change ("backing-up"), the files
of every distribution the install will touch are copied aside (beside the lock, in
<prefix>/.comfy-env-attn/), the journal says "installing", the target changes, then
"verifying", "locking" (with the hash of the lock it replaces) and "committed". Only after
"committed" is anything deleted: the journal first, then the backups.

A run that fails restores from the backups; a run that was killed is found by the next
install, verify or doctor (`recover`): before "installing" nothing had changed and it only
cleans up; from "installing" to "locking" it restores; at "locking" it restores unless the
new lock is already in place; after "committed" it keeps the new state and finishes the
cleanup. Restoring is idempotent, so a recovery that is itself killed can run again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, field
from pathlib import Path
from typing import IO, Any

from comfy_env_attn.core.errors import InstallError
from comfy_env_attn.core.paths import readable_file, replace_file
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.installed import (
    Installed,
    norm,
    read_installed,
    real,
    record_lines,
    site_path,
)

CRASH_ENV = "COMFY_ENV_ATTN_TEST_CRASH_AT"
_FIRED: set[str] = set()


def crash_point(step: str) -> None:
    """Fault injection for the tests: COMFY_ENV_ATTN_TEST_CRASH_AT=step[:how][,step[:how]]
    stops the process at that step, how being kill (SIGKILL, the default), int (SIGINT, as
    Ctrl-C) or enospc (the write there fails: disk full). Unset outside the tests."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    hows = [how for at, _, how in (s.partition(":") for s in spec.split(",")) if at == step]
    if not hows or step in _FIRED:
        return
    _FIRED.add(step)  # once per process, as one Ctrl-C: not again while cleaning up
    how = hows[0]
    if how == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    sig = signal.SIGINT if how == "int" else getattr(signal, "SIGKILL", signal.SIGTERM)
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the signal arrives; SIGINT raises KeyboardInterrupt in this frame


UV_WORK_PREFIX = "uv-"  # the folder of an install's requirements file for uv, in self.dir


class JournalError(InstallError):
    """The journal of an interrupted install cannot be read."""


def state_dir(prefix: Path) -> Path:
    return prefix / ".comfy-env-attn"


def _lock_file(f: IO[str], blocking: bool) -> bool:
    if sys.platform.startswith("win"):
        import msvcrt

        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def target_lock(prefix: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Exclusive per target; a second install waits and says so."""
    d = state_dir(prefix)
    path = d / "install.lock"
    _refuse_links(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        # never through a link (O_NOFOLLOW where there is one; _refuse_links elsewhere)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        f = os.fdopen(fd, "a+", encoding="utf-8")  # held across the yield
    except OSError as e:
        if os.path.isdir(d) and not os.path.isfile(path) and os.path.exists(path):
            raise InstallError(f"{path} is not a file: the folder {d} holds only this "
                               "tool's own files; remove it to go on") from None
        raise InstallError(f"cannot write to {d}: {e.strerror or e}; the target is "
                           "read-only or not yours: nothing was changed") from None
    with f:
        if not _lock_file(f, blocking=False):
            f.seek(0)
            holder = f.read().strip() or "another process"
            log(f"waiting for another comfy-env-attn run on {prefix} ({holder}) to finish ...")
            _lock_file(f, blocking=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()


def _refuse_links(d: Path) -> None:
    """The state folder and what the tool keeps in it are its own files and folders: one
    that is a link (to torch's __init__.py, say) would have the tool truncate, write or
    delete where it points. InstallError naming it, before anything is opened."""
    for p in (d, d / "install.lock", d / "journal.json", d / "journal.tmp", d / "backup"):
        if os.path.islink(p):
            raise InstallError(f"{p} is a link ({os.readlink(p)}): the folder {d} holds only "
                               "this tool's own files, which it never writes through a "
                               "link; remove the link to go on (nothing was changed)")
    if d.exists() and not d.is_dir():
        raise InstallError(f"{d} is not a folder: it holds this tool's own files; remove it "
                           "to go on (nothing was changed)")


@dataclass
class Touched:
    """A distribution an install changes: its version before and where its files are kept."""
    name: str
    before: str | None  # version installed in the target's own site dir, None if absent
    backup: str | None  # folder holding its files, file i of `files` as <backup>/<i>
    files: list[str]  # relative to site; scripts and data files start with '..'
    site: str
    # what the new wheel writes, as `files` (the guard's destinations): none of it was
    # there before but what `files` backs up, so a rollback removes what is left of it
    # where uv could not (a kill before it wrote the new RECORD)
    adds: list[str] = field(default_factory=list)


STATES = ("backing-up", "installing", "verifying", "locking", "committed")
_DIST_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,198}[a-z0-9])?$")


def _touched(key: str, v: Any) -> Touched:
    """One entry of a journal, its types checked (a journal is read after a kill, and may
    be anything)."""
    t = Touched(**dict(v))
    if not (t.name == key and isinstance(key, str) and _DIST_NAME.match(key)):
        raise ValueError(f"entry {str(key)[:60]!r} is not a distribution's name")
    if not isinstance(t.site, str) or not all(isinstance(x, str | None) for x in
                                               (t.before, t.backup)):
        raise ValueError(f"entry {key}: site, before and backup must be strings")
    for what in (t.files, t.adds):
        if not isinstance(what, list) or not all(isinstance(f, str) for f in what):
            raise ValueError(f"entry {key}: files and adds must be lists of paths")
    return t


@dataclass
class Journal:
    """The record of one install in progress."""

    prefix: Path
    touched: dict[str, Touched] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    on_disk: bool = False  # written since begin (begin itself writes nothing)

    @property
    def dir(self) -> Path:
        return state_dir(self.prefix)

    @property
    def path(self) -> Path:
        return self.dir / "journal.json"

    @property
    def backup_root(self) -> Path:
        return self.dir / "backup"

    @property
    def tmp_path(self) -> Path:  # the journal being written, renamed over `path` once whole
        return self.dir / "journal.tmp"

    def _uv_work(self) -> list[Path]:
        """The folders of uv's requirements files (UV_WORK_PREFIX) runs left here."""
        d = self.dir
        return [w for w in d.glob(UV_WORK_PREFIX + "*") if w.is_dir() and not w.is_symlink()] \
            if d.is_dir() else []

    @property
    def state(self) -> str:
        return str(self.meta.get("state", ""))

    def exists(self) -> bool:
        return self.path.exists()

    def load(self, own_sites: Collection[str] = (), protected: Collection[str] = ()
             ) -> Journal:
        """Read the journal, and check that it can only touch what an install of this
        target touches (`own_sites`: the target's own site-packages; `protected`: torch's
        closure, which no install changes): JournalError otherwise, with nothing done. A
        journal copied with its environment (a moved ComfyUI folder) is followed in the
        new folder, never in the old one (_moved)."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            self.meta = dict(doc["meta"])
            self.touched = {k: _touched(k, v) for k, v in dict(doc["touched"]).items()}
            self.on_disk = True
            if self.state not in STATES:
                raise ValueError(f"unknown state {self.state!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise JournalError(
                f"the journal of an interrupted install, {self.path}, cannot be read "
                f"({type(e).__name__}: {str(e)[:120]}), so what that install changed is "
                f"unknown. {self._to_go_on()}") from None
        if own_sites:
            self._moved()
            why = self._foreign(own_sites, protected)
            if why:
                raise JournalError(
                    f"the journal of an interrupted install, {self.path}, {why}: it is not "
                    f"this environment's to follow (an edited journal, or one an older "
                    f"version wrote in an environment since moved), so nothing was done. "
                    f"{self._to_go_on()}")
        return self

    def _to_go_on(self) -> str:
        """What a user does with a journal that cannot be followed."""
        return (f"The files that install replaced are kept in {self.backup_root}. Check the "
                f"target ({tool_command()} doctor; reinstall a backend that is broken), then "
                f"delete {self.path} and {self.backup_root} to go on")

    def _moved(self) -> None:
        """A journal copied with its environment (a ComfyUI folder moved or copied while an
        install ran) names the old folder: its paths below the prefix it records are moved
        to this one, the environment it was copied with, and then checked as any others.
        The old folder is never touched."""
        old = self.meta.get("prefix")
        if not isinstance(old, str) or not old:
            return
        before, now = real(old), real(str(self.prefix))
        if before == now:
            return

        def moved(path: str) -> str:
            followed = real(path)
            if followed.startswith(before + os.sep):
                return os.path.join(now, os.path.relpath(followed, before))
            return path  # not below the old prefix: _foreign judges it as it is

        for t in self.touched.values():
            t.site = moved(t.site)
            if t.backup is not None:
                t.backup = moved(t.backup)
        self.meta["prefix"] = str(self.prefix)

    def _foreign(self, own_sites: Collection[str], protected: Collection[str]) -> str | None:
        """Why the journal names what no install of this target touches (None: it does
        not). Folders are compared once their links are followed: one environment reached
        by two paths (a linked folder, a Windows junction) is the same."""
        sites = {real(s) for s in own_sites}
        prefix = real(str(self.prefix))
        for name, t in self.touched.items():
            if name in protected:
                return (f"names {name}, which is torch or a package torch needs: no install "
                        "changes those")
            site = real(t.site)
            if site not in sites:
                return f"names {t.site} for {name}, not this environment's site-packages"
            if t.backup is not None and real(t.backup) != real(str(self.backup_root / name)):
                return f"keeps {name}'s files in {t.backup}, not in {self.backup_root}"
            for rel in (*t.files, *t.adds):  # within the prefix, as written below the site
                path = os.path.normpath(os.path.join(site, rel))
                if os.path.isabs(rel) or not norm(path).startswith(prefix + os.sep):
                    return f"lists {rel!r} for {name}, outside the environment {self.prefix}"
        return None

    def save(self) -> None:
        doc = {"meta": self.meta, "touched": {k: asdict(v) for k, v in self.touched.items()}}
        tmp = self.tmp_path
        try:
            crash_point(f"save-{self.state}")
            self.dir.mkdir(parents=True, exist_ok=True)
            replace_file(self.path, json.dumps(doc, indent=1), durable=True, tmp=tmp)
            self.on_disk = True
        except OSError as e:
            raise InstallError(f"cannot write the install journal {self.path}: "
                               f"{e.strerror or e} (disk full or read-only?)") from None

    def begin(self, meta: dict[str, Any]) -> None:
        """What is about to change. Written at the first backup, or else with the state
        that comes before anything changes ("installing", "uninstalling"): until then a kill
        leaves nothing to undo, and the backups no journal points to are removed by the
        next run (clean_leftovers). A fresh install writes its journal once, not once per
        distribution: each write is forced to disk, a few ms on the way to uv."""
        self.meta = {**meta, "pid": os.getpid(), "started": time.time(),
                     "prefix": str(self.prefix), "state": "backing-up"}
        self.touched = {}
        self.on_disk = False

    def add(self, name: str, installed: dict[str, Installed], own_sites: list[str],
            adds: Iterable[str] = ()) -> None:
        """Copy one distribution's files aside, then record it (never the other way), with
        `adds`, the absolute paths its new wheel writes. One the target lacks (nothing to
        copy) is written with the next state."""
        if name in self.touched:
            return
        inst = installed.get(name)
        if inst is None or inst.location not in own_sites:
            site = own_sites[0]
            self.touched[name] = Touched(name, None, None, [], site, _relative(adds, site))
            return
        if not self.on_disk:  # the journal is on disk before its first backup begins
            self.save()
        files = [p for p, _, _ in record_lines(inst) if not os.path.isabs(p)]
        files += _bytecode_of(inst.location, files)
        dest = self.backup_root / name
        try:
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for i, rel in enumerate(files):
                src = Path(inst.location, rel)
                if src.is_file():
                    shutil.copy2(src, dest / str(i))
        except OSError as e:
            raise InstallError(f"cannot back up {name} ({e.filename}) before changing it: "
                               f"{e.strerror or e}") from None
        self.touched[name] = Touched(name, inst.version, str(dest), files, inst.location,
                                     _relative(adds, inst.location))
        self.save()

    def set_state(self, state: str, **meta: Any) -> None:
        """The journal on disk says `state` (and `meta`), or, where it cannot be written,
        keeps saying what it did: a rollback then goes by what is on disk (a fresh install
        whose first write failed had changed nothing)."""
        before = dict(self.meta)
        self.meta.update(meta, state=state)
        try:
            self.save()
        except BaseException:
            self.meta = before
            raise

    def restore(self, name: str, uninstall: Callable[[str], None],
                foreign: Collection[str] = ()) -> str:
        """Put one distribution back as it was; returns what was done. `foreign`: files
        (absolute, facts.installed.norm) that belong to other distributions (as
        facts.installed.owned_files tells, a folder owned whole included): never deleted,
        even when the distribution being undone lists them in its RECORD."""
        t = self.touched.get(name)
        if t is None:
            return f"{name}: nothing recorded"
        kept = _unlist(t.site, name, foreign)
        uninstall(name)
        backed_up = {norm(os.path.join(t.site, rel)) for rel in t.files}
        for rel in t.adds:  # what uv wrote and could not remove (no RECORD to go by)
            path = norm(os.path.join(t.site, rel))
            if path not in backed_up and path not in foreign:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError,
                                         NotADirectoryError, PermissionError):
                    os.unlink(path)
        if t.backup is None:
            out = f"{name}: removed (it was not installed before)"
        else:
            for i, rel in enumerate(t.files):
                src = Path(t.backup, str(i))
                if src.is_file():
                    target = Path(os.path.normpath(os.path.join(t.site, rel)))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # a new file in place of what is there, never written into it: uv
                    # installs by hard-linking from its cache, and a file a kill left there
                    # may be a link to the cache's copy of the wheel being undone (a kill
                    # in between: the next recovery copies it again, from the same backup)
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
                    shutil.copy2(src, target)
            out = f"{name}: restored {t.before}"
        if kept:
            out += (f"; left {len(kept)} file(s) of other distributions it had overwritten "
                    f"in place ({kept[0]})")
        return out

    def rollback(self, uninstall: Callable[[str], None], foreign: Collection[str] = ()
                 ) -> list[str]:
        """Undo the install; after "committed" there is nothing to undo, only cleanup."""
        if self.state == "committed":
            names = ", ".join(self.touched) or "nothing"
            self.finish()
            return [f"{names}: kept (the install had completed)"]
        if self.state == "backing-up" or not self.touched:
            self.finish()
            return ["nothing had been changed yet"]
        done = []
        for name in list(self.touched):
            done.append(self.restore(name, uninstall, foreign))
            crash_point("restoring")
        self.finish()
        return done

    def commit(self) -> None:
        """The new state is final: from here on recovery keeps it."""
        self.set_state("committed")
        crash_point("committed")
        self.finish()

    def finish(self) -> None:
        """Forget the install: the journal first, then the backups it points to."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.on_disk = False
        crash_point("journal-removed")
        shutil.rmtree(self.backup_root, ignore_errors=True)
        self.touched = {}

    def anything_left(self) -> bool:
        """Whether a run left anything for `installer.recover`: the journal, or what
        clean_leftovers removes."""
        return self.exists() or self.backup_root.exists() or self.tmp_path.exists() \
            or bool(self._uv_work())

    def clean_leftovers(self) -> list[str]:
        """Remove what a killed run can leave besides the journal: journal.tmp, uv's
        requirements folder (UV_WORK_PREFIX), and backups that no journal points to (a run
        killed while backing up, or while finishing)."""
        out = []
        if self.tmp_path.exists():
            self.tmp_path.unlink(missing_ok=True)
            out.append(str(self.tmp_path))
        for work in self._uv_work():
            shutil.rmtree(work, ignore_errors=True)
            out.append(str(work))
        if not self.exists() and self.backup_root.exists():
            shutil.rmtree(self.backup_root, ignore_errors=True)
            out.append(str(self.backup_root))
        return out


def _relative(paths: Iterable[str], site: str) -> list[str]:
    """Absolute paths as a journal's entries hold them: relative to the site folder (a
    script or data file starts with '..')."""
    return [os.path.relpath(p, site) for p in paths]


def _bytecode_of(site: str, files: list[str]) -> list[str]:
    """The compiled bytecode Python wrote beside a distribution's modules (__pycache__/
    <module>.<tag>.pyc), which its RECORD does not list and an uninstall removes with it:
    backed up too, so that a rollback leaves the environment byte for byte as it was."""
    listed = set(files)
    modules: dict[str, set[str]] = {}  # folder -> its modules' names
    for rel in files:
        if rel.endswith(".py"):
            folder, _, module = rel.rpartition("/")
            modules.setdefault(folder, set()).add(module[:-3])
    out = []
    for folder, names in modules.items():
        with contextlib.suppress(OSError):
            for entry in os.scandir(os.path.join(site, folder, "__pycache__")):
                pyc = f"{folder}/__pycache__/{entry.name}" if folder else \
                    f"__pycache__/{entry.name}"
                if entry.name.endswith(".pyc") and entry.name.split(".")[0] in names and \
                        pyc not in listed and entry.is_file(follow_symlinks=False):
                    out.append(pyc)
    return sorted(out)


def keep_foreign(site: str, name: str, foreign: Collection[str]) -> list[str]:
    """Before uninstalling `name` (or uv replacing it): drop from its RECORD the files that
    belong to others (`foreign`, absolute, facts.installed.norm: see Journal.restore), so
    that uninstalling it leaves them; returns those files."""
    return _unlist(site, name, foreign)


def _unlist(site: str, name: str, foreign: Collection[str]) -> list[str]:
    """Drop from `name`'s RECORD in `site` the files in `foreign`, so that uninstalling it
    leaves them; returns those files."""
    if not foreign:
        return []
    inst = read_installed([site]).get(name)
    if inst is None or inst.location != site:
        return []
    record = Path(inst.dist_info, "RECORD")
    try:
        lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return []
    keep, kept = [], []
    for line in lines:
        rel = line.rsplit(",", 2)[0].strip('"') if line.count(",") >= 2 else line.strip()
        # in the form owned_files gives ('./a', 'a\\b' from a RECORD made on Windows)
        path = norm(os.path.join(site, site_path(rel)))
        if path in foreign:
            kept.append(rel)
        else:
            keep.append(line)
    if kept:
        replace_file(record, "".join(keep), durable=True)
    return kept


def file_sha256(path: Path) -> str | None:
    """The file's sha256; None where there is none, or no regular file (a FIFO in the lock's
    place would block the read)."""
    try:
        readable_file(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return None
