"""Nothing is lost: one install per target at a time, and a journal that can undo it.

Before the target changes, the files of every distribution the install will touch are
copied aside (beside the lock, in <prefix>/.comfy-env-attn/). A run that fails restores
them; a run that was killed is found by the next install, verify or doctor, which undoes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from comfy_env_attn.core.errors import InstallError
from comfy_env_attn.facts.installed import Installed


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
    d.mkdir(parents=True, exist_ok=True)
    path = d / "install.lock"
    with open(path, "a+", encoding="utf-8") as f:
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


@dataclass
class Touched:
    name: str
    before: str | None  # version installed in the target's own site dir, None if absent
    backup: str | None  # folder holding its files, relative paths kept
    files: list[str]  # relative to site
    site: str


class Journal:
    """The record of one install in progress."""

    def __init__(self, prefix: Path) -> None:
        self.dir = state_dir(prefix)
        self.path = self.dir / "journal.json"
        self.backup_root = self.dir / "backup"
        self.touched: dict[str, Touched] = {}
        self.meta: dict[str, Any] = {}

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Journal:
        doc = json.loads(self.path.read_text(encoding="utf-8"))
        self.meta = doc.get("meta", {})
        self.touched = {k: Touched(**v) for k, v in doc.get("touched", {}).items()}
        return self

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "touched": {k: vars(v) for k, v in self.touched.items()}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def begin(self, names: list[str], installed: dict[str, Installed], own_sites: list[str],
              meta: dict[str, Any]) -> None:
        """Back up each distribution about to change, then write the journal."""
        self.meta = {**meta, "pid": os.getpid(), "started": time.time(), "state": "installing"}
        for name in names:
            self.add(name, installed, own_sites)
        self.save()

    def add(self, name: str, installed: dict[str, Installed], own_sites: list[str]) -> None:
        if name in self.touched:
            return
        inst = installed.get(name)
        if inst is None or inst.location not in own_sites:
            self.touched[name] = Touched(name, None, None, [], own_sites[0])
            self.save()
            return
        files = record_files(inst)
        dest = self.backup_root / name
        if dest.exists():
            shutil.rmtree(dest)
        for rel in files:
            src = Path(inst.location) / rel
            if src.is_file():
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copy2(src, out)
                except OSError as e:
                    raise InstallError(f"cannot back up {src} before changing it: {e}; "
                                       "nothing was changed") from None
        self.touched[name] = Touched(name, inst.version, str(dest), files, inst.location)
        self.save()

    def set_state(self, state: str) -> None:
        self.meta["state"] = state
        self.save()

    def restore(self, name: str, uninstall: Callable[[str], None]) -> str:
        """Put one distribution back as it was; returns what was done."""
        t = self.touched.get(name)
        if t is None:
            return f"{name}: nothing recorded"
        uninstall(name)
        if t.backup is None:
            return f"{name}: removed (it was not installed before)"
        for rel in t.files:
            src = Path(t.backup) / rel
            if src.is_file():
                out = Path(t.site) / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
        return f"{name}: restored {t.before}"

    def rollback(self, uninstall: Callable[[str], None]) -> list[str]:
        done = [self.restore(name, uninstall) for name in list(self.touched)]
        self.finish()
        return done

    def finish(self) -> None:
        shutil.rmtree(self.backup_root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.touched = {}


def record_files(inst: Installed) -> list[str]:
    """Paths (relative to the site dir) that a distribution's RECORD lists."""
    if not inst.dist_info:
        return []
    record = Path(inst.dist_info) / "RECORD"
    out: list[str] = []
    try:
        text = record.read_text(encoding="utf-8")
    except OSError:
        return []
    for line in text.splitlines():
        path = line.rsplit(",", 2)[0] if line.count(",") >= 2 else line
        if path and not path.startswith(("/", "..")):
            out.append(path.strip('"'))
    return out
