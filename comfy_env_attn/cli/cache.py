"""`comfy-env-attn cache [info|clean] [--wheelhouse] [--json]`: what the tool keeps in its
cache folder (core.paths.cache_dir), and removing it.

Nothing there is needed by an installed backend, the lock or ComfyUI: downloads are fetched
again, probe answers asked again. The wheelhouse is the exception worth keeping (wheels
compiled here for this GPU, minutes each): `clean` leaves it unless `--wheelhouse` is given,
and never removes a wheelhouse outside the cache folder (COMFY_ENV_ATTN_WHEELHOUSE names the
user's own folder). clean removes only entries named as the tool writes them (_OURS; in the
wheelhouse, a wheel's folder with its build.json), never a link's target, and not what a
running install or build still uses (a download's `<pid>.*.part`, a build's
`<pid>.<backend>-*` folder, its process alive).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_env_attn.candidates.wheelhouse import RECORD_NAME, wheelhouse_dir
from comfy_env_attn.cli.output import console, dump_json
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.paths import ANSWER_KINDS, CACHE_PARTS, cache_dir
from comfy_env_attn.core.process import pid_alive
from comfy_env_attn.core.progress import log


@dataclass
class Part:
    """One part of the cache: the entries of it there now (each a file or folder the tool
    wrote), and what clean removed and kept of it."""
    name: str
    what: str
    where: list[str]  # its folders, or the patterns of its file names, absolute
    paths: list[Path]  # its entries there now
    folders: list[Path] = field(default_factory=list)  # removed by clean once empty
    foreign: list[Path] = field(default_factory=list)  # in its folders, not the tool's
    files: int = 0
    bytes: int = 0
    removed: int = 0  # bytes
    kept: list[str] = field(default_factory=list)  # why something stays

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "where": self.where,
                "files": self.files, "bytes": self.bytes, "removed_bytes": self.removed,
                "kept": self.kept}


# What the tool itself writes in each folder part (a download's <sha256>/ or unhashed/, a
# source's <sha256>/, <sha256>.METADATA, a build's [<pid>.]<backend>-XXXXXXXX/ from mkdtemp,
# <dist>-<version>-<stamp>.log) and the probe answers' names (core.paths.answer_file): clean
# removes these and nothing else, so that a cache folder set to one that holds other things
# (COMFY_ENV_ATTN_CACHE_DIR=$HOME, with a ~/build of its own) loses none of them.
_OURS: dict[str, re.Pattern[str]] = {
    "downloads": re.compile(r"[0-9a-fA-F]{64}|unhashed"),
    "metadata": re.compile(r"[0-9a-fA-F]{64}\.METADATA"),
    "probes": re.compile("(?:" + "|".join(ANSWER_KINDS) + r")-[0-9a-f]{20}\.json"),
    "sources": re.compile(r"[0-9a-fA-F]{64}"),
    "build": re.compile(r"(?:\d+\.)?[a-z0-9_]+-[a-z0-9_]{8}"),
    "build logs": re.compile(r".+\.log"),
}


def _wheelhouse_entries(wheelhouse: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(each <dist>/<entry>/ holding a build.json, the folders above them, anything else)."""
    entries: list[Path] = []
    folders: list[Path] = []
    foreign: list[Path] = []
    if not wheelhouse.is_dir():
        return entries, folders, foreign
    for dist in sorted(wheelhouse.iterdir()):
        if not dist.is_dir() or dist.is_symlink():
            foreign.append(dist)
            continue
        folders.append(dist)
        for entry in sorted(dist.iterdir()):
            (entries if (entry / RECORD_NAME).is_file() and not entry.is_symlink()
             else foreign).append(entry)
    return entries, [*folders, wheelhouse], foreign


def parts(root: Path, wheelhouse: Path) -> list[Part]:
    """The cache folder's parts as they are now, the wheelhouse last."""
    found: list[Part] = []
    for name, (spec, what) in CACHE_PARTS.items():
        part = Part(name, what, [str(root / w.rstrip("/")) for w in spec.split()], [])
        if spec.endswith("/"):
            folder = root / spec.rstrip("/")
            if folder.is_dir() and not folder.is_symlink():
                part.folders.append(folder)
                for child in sorted(folder.iterdir()):
                    (part.paths if _OURS[name].fullmatch(child.name)
                     else part.foreign).append(child)
        else:
            part.paths = sorted(p for p in root.glob("*-*.json")
                                if _OURS[name].fullmatch(p.name)) if root.is_dir() else []
        found.append(part)
    inside = _is_within(wheelhouse, root)
    entries, folders, foreign = _wheelhouse_entries(wheelhouse)
    found.append(Part("wheelhouse", "wheels built here for this machine's GPU (kept unless "
                      "--wheelhouse)" if inside else "wheels built here for this machine's "
                      "GPU, in a folder of your own (COMFY_ENV_ATTN_WHEELHOUSE): never "
                      "removed", [str(wheelhouse)], entries, folders, foreign))
    for part in found:
        for path in part.paths:
            for _f, size in _files(path):
                part.files += 1
                part.bytes += size
    return found


def _is_within(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        return False
    return True


def _files(path: Path) -> Iterator[tuple[Path, int]]:
    """Each file under `path` (itself, if a file) and its size; links are not followed."""
    try:
        st = path.lstat()
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield path, st.st_size
        return
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                yield Path(root, name), os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue


def _in_use(name: str) -> int | None:
    """The pid a leftover's name gives (`<pid>.…`) while that process runs, else None."""
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() and pid_alive(int(head)) else None


def _writable(func: Callable[..., Any], path: str, _exc: Any) -> None:
    """rmtree's retry for a read-only file or folder (Windows will not delete a read-only
    file; a git checkout's objects are read-only): make it and its folder writable, again."""
    for p in (os.path.dirname(path), path):
        try:
            os.chmod(p, os.stat(p).st_mode | stat.S_IWRITE | stat.S_IREAD | stat.S_IEXEC)
        except OSError:
            pass
    func(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=_writable)
        else:
            shutil.rmtree(path, onerror=_writable)
    else:
        try:
            path.unlink()
        except PermissionError:
            _writable(os.unlink, str(path), None)


def clean(part: Part) -> list[str]:
    """Remove the part's entries but what a live process uses, then its folders left empty;
    the errors, one per path."""
    errors: list[str] = []
    for entry in part.paths:
        # a download's or a source's <hash>/<pid>.*.part; a build's <pid>.<backend>-*/
        busy = [_in_use(entry.name)] if part.name == "build" else [
            _in_use(f.name) for f, _ in _files(entry) if f.name.endswith(".part")]
        pid = next((b for b in busy if b is not None), None)
        if pid is not None:
            part.kept.append(f"{entry} (in use by process {pid})")
            continue
        size = sum(s for _, s in _files(entry))
        try:
            _remove(entry)
        except OSError as e:
            errors.append(f"{entry}: {e.strerror or e}")
            continue
        part.removed += size
    if part.foreign:
        part.kept.append(f"{len(part.foreign)} entr{'y' if len(part.foreign) == 1 else 'ies'} "
                         f"comfy-env-attn did not write ({part.foreign[0]}"
                         + (", ..." if len(part.foreign) > 1 else "") + ")")
    for folder in part.folders:
        with contextlib.suppress(OSError):
            if not any(folder.iterdir()):
                folder.rmdir()
    return errors


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < scale * 1000 or unit == "GB":
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def cmd_cache(args: argparse.Namespace) -> int:
    root = cache_dir()
    wheelhouse = wheelhouse_dir()
    found = parts(root, wheelhouse)
    errors: list[str] = []
    if args.cache_command == "clean":
        for part in found:
            if part.name == "wheelhouse" and not (args.wheelhouse and
                                                  _is_within(wheelhouse, root)):
                if part.paths or part.foreign:
                    part.kept = [f"{wheelhouse} ("
                                 + ("--wheelhouse removes it" if _is_within(wheelhouse, root)
                                    else "a folder of your own: remove it yourself") + ")"]
                continue
            errors += clean(part)
        for line in errors:
            log(f"cannot remove {line}")
    if args.json:
        dump_json({"schema": 1, "command": "cache", "folder": str(root),
                   "cleaned": args.cache_command == "clean",
                   "parts": [p.as_json() for p in found], "errors": errors})
    else:
        _table(root, found, cleaned=args.cache_command == "clean")
    if errors:
        raise AttnError(f"{len(errors)} path(s) in {root} could not be removed: {errors[0]}")
    return 0


def _table(root: Path, found: list[Part], *, cleaned: bool) -> None:
    from rich.table import Table

    t = Table(title=str(root))
    for col in ("part", "files", "size", *(["removed"] if cleaned else []), "what"):
        t.add_column(col, justify="right" if col in ("files", "size", "removed") else "left")
    for p in found:
        note = p.what + "".join(f"; kept: {k}" for k in p.kept)
        t.add_row(p.name, str(p.files), _size(p.bytes),
                  *([_size(p.removed)] if cleaned else []), note)
    console().print(t)
    if cleaned:
        total = sum(p.removed for p in found)
        console().print(f"removed {_size(total)}")
