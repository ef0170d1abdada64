"""`comfy-env-attn cache [info|clean] [--wheelhouse] [--json]`: what the tool keeps in its
cache folder (core.paths.cache_dir), and removing it.

Nothing there is needed by an installed backend, the lock or ComfyUI: downloads are fetched
again, probe answers asked again. The wheelhouse is the exception worth keeping (wheels
compiled here for this GPU, minutes each): `clean` leaves it unless `--wheelhouse` is given,
and never removes one COMFY_ENV_ATTN_WHEELHOUSE puts elsewhere (the user's own folder, kept
out of the other parts too). It refuses a cache folder that is the home folder or a
filesystem root. clean removes only entries named as the tool writes them (_OURS; in the
wheelhouse, a wheel's folder with its build.json), never a link's target, and not what a
running install or build still uses (a download's `<pid>.*.part`, a finished download's
`<pid>.inuse` mark, a build's `<pid>.<backend>-*` folder and the logs written since it
started, their process alive).
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
from dataclasses import field
from pathlib import Path
from typing import Any

from comfy_env_attn.candidates.wheelhouse import RECORD_NAME, wheelhouse_dir
from comfy_env_attn.cli.output import console, dump_json
from comfy_env_attn.core.errors import AttnError, UsageError
from comfy_env_attn.core.paths import ANSWER_KEY_HEX, ANSWER_KINDS, CACHE_PARTS, cache_dir
from comfy_env_attn.core.process import pid_alive
from comfy_env_attn.core.progress import log
from comfy_env_attn.core.records import dataclass


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
    # an answer, or what a killed write of one left (core.paths.replace_file: .NAME.PID.tmp)
    "probes": re.compile(r"\.?(?:" + "|".join(ANSWER_KINDS) + rf")-[0-9a-f]{{{ANSWER_KEY_HEX}}}"
                         r"\.json(?:\.\d+\.tmp)?"),
    "sources": re.compile(r"[0-9a-fA-F]{64}"),
    "build": re.compile(r"\d{1,10}\.[a-z0-9_]+-[a-z0-9_]{8}"),
    "build logs": re.compile(r".+\.log"),
}


def _children(folder: Path) -> list[Path]:
    """A folder's entries, sorted; none where it cannot be listed (nothing there is then
    counted or removed)."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _holds_record(entry: Path) -> bool:
    """A wheelhouse entry the tool wrote: a folder (not a link) holding its build.json."""
    try:
        return not _is_link(entry) and (entry / RECORD_NAME).is_file()
    except OSError:  # a folder that cannot be searched
        return False


def _wheelhouse_entries(wheelhouse: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(each <dist>/<entry>/ holding a build.json, the folders above them, anything else)."""
    entries: list[Path] = []
    folders: list[Path] = []
    foreign: list[Path] = []
    if not wheelhouse.is_dir():
        return entries, folders, foreign
    for dist in _children(wheelhouse):
        if _is_link(dist) or not dist.is_dir():
            foreign.append(dist)
            continue
        folders.append(dist)
        for entry in _children(dist):
            (entries if _holds_record(entry) else foreign).append(entry)
    return entries, [*folders, wheelhouse], foreign


def parts(root: Path, wheelhouse: Path) -> list[Part]:
    """The cache folder's parts as they are now, the wheelhouse last."""
    found: list[Part] = []
    for name, (spec, what) in CACHE_PARTS.items():
        part = Part(name, what, [str(root / w.rstrip("/")) for w in spec.split()], [])
        if spec.endswith("/"):
            folder = root / spec.rstrip("/")
            if not _is_link(folder) and folder.is_dir():
                part.folders.append(folder)
                for child in _children(folder):
                    (part.paths if _OURS[name].fullmatch(child.name)
                     else part.foreign).append(child)
        else:
            part.paths = sorted(p for p in root.glob("*-*.json*")
                                if _OURS[name].fullmatch(p.name)) if root.is_dir() else []
        found.append(part)
    inside = _same(wheelhouse, default_wheelhouse(root)) and not _is_link(wheelhouse)
    for part in found:  # a wheelhouse of the user's own inside a part is not the part's
        part.foreign += [e for e in part.paths if _is_within(wheelhouse, e)
                         or _is_within(e, wheelhouse)]
        part.paths = [e for e in part.paths if e not in part.foreign]
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


def _is_link(path: Path | str) -> bool:
    """A symbolic link, or on Windows any reparse point (a junction, which is_symlink does
    not report): its target lies elsewhere, so it is never entered."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode) or bool(
        getattr(st, "st_file_attributes", 0) & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0))


def default_wheelhouse(root: Path) -> Path:
    """Where the wheelhouse is unless COMFY_ENV_ATTN_WHEELHOUSE says otherwise."""
    return root / "wheelhouse"


def _forms(path: Path) -> set[str]:
    """A path as given and as it really is (links and short names resolved), compared in
    the platform's case."""
    return {os.path.normcase(os.path.abspath(path)), os.path.normcase(os.path.realpath(path))}


def _same(a: Path, b: Path) -> bool:
    return bool(_forms(a) & _forms(b))


def _is_within(path: Path, root: Path) -> bool:
    """Whether path is root or lies in it, either as given or as it really is."""
    for p in _forms(path):
        for r in _forms(root):
            try:
                Path(p).relative_to(r)
            except ValueError:
                continue
            return True
    return False


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
    """The pid a leftover's name gives (`<pid>.…`, or a temporary file's `….<pid>.tmp`)
    while that process runs, else None."""
    head = name.split(".", 1)[0]
    if name.endswith(".tmp"):
        head = name.rsplit(".", 2)[-2]
    if not (head.isascii() and head.isdigit()) or len(head) > 10:
        return None  # no pid: another process's name (a pid fits in 32 bits)
    return int(head) if pid_alive(int(head)) else None


def _writable(func: Callable[..., Any], path: str, exc: Any) -> None:
    """rmtree's retry for a read-only file or folder (Windows will not delete a read-only
    file; a git checkout's objects are read-only): make it, and the folder it is removed
    from, writable (a folder also searchable), then remove it again. Only a removal is
    retried; nothing reached through a link, a file with other hard links (its mode is
    theirs too) or the cache folder itself is changed; anything else is raised as it came."""
    if func not in (os.unlink, os.remove, os.rmdir):
        raise exc[1] if isinstance(exc, tuple) else exc
    for p in (os.path.dirname(path), path):
        with contextlib.suppress(OSError):
            st = os.lstat(p)
            if _is_link(p) or _same(Path(p), cache_dir()) or (
                    not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1):
                continue
            add = stat.S_IWRITE | (stat.S_IEXEC | stat.S_IREAD if stat.S_ISDIR(st.st_mode)
                                   else 0)
            os.chmod(p, st.st_mode | add)
    func(path)


def _remove(path: Path) -> None:
    if not _is_link(path) and path.is_dir():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=_writable)
        else:
            shutil.rmtree(path, onerror=_writable)
    else:
        try:
            path.unlink()
        except PermissionError as e:
            _writable(os.unlink, str(path), e)


def clean(part: Part, *, building_since: float | None = None,
          keep: Path | None = None) -> list[str]:
    """Remove the part's entries but what a live process uses (`building_since`: when the
    oldest build still running started; a log written since may be its log), then its
    folders left empty; the errors, one per path."""
    errors: list[str] = []
    for entry in part.paths:
        # a download's or a source's <hash>/<pid>.*.part, a finished download's
        # <hash>/<pid>.inuse; a build's <pid>.<backend>-*/; a probe answer's .NAME.<pid>.tmp
        busy = [_in_use(entry.name)] if part.name in ("build", "probes") else [
            _in_use(f.name) for f, _ in _files(entry) if f.name.endswith((".part", ".inuse"))]
        pid = next((b for b in busy if b is not None), None)
        if pid is not None:
            part.kept.append(f"{entry} (in use by process {pid})")
            continue
        if part.name == "build logs" and building_since is not None and \
                _mtime(entry) >= building_since:
            part.kept.append(f"{entry} (a build is running)")
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
                         f"not named as comfy-env-attn names its own ({part.foreign[0]}"
                         + (", ..." if len(part.foreign) > 1 else "") + ")")
    for folder in part.folders:
        if keep is not None and (_is_within(folder, keep) or _is_within(keep, folder)):
            continue  # the user's wheelhouse, or what holds it, stays even empty
        with contextlib.suppress(OSError):
            if not any(folder.iterdir()):
                folder.rmdir()
    return errors


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _building_since(found: list[Part]) -> float | None:
    """When the oldest build folder of a running process was made, None if none runs."""
    times = [_mtime(e) for p in found if p.name == "build" for e in p.paths
             if _in_use(e.name) is not None]
    return min(times) - 1.0 if times else None


def _refusal(root: Path) -> str | None:
    """Why a folder may not be cleaned as the cache: the home folder or a filesystem root
    (COMFY_ENV_ATTN_CACHE_DIR set to one), where other programs' files share the names."""
    home = Path.home()
    if _same(root, home) or _same(root, Path(Path(os.path.abspath(root)).anchor or "/")):
        return (f"the cache folder is {root} (COMFY_ENV_ATTN_CACHE_DIR): refusing to clean "
                "your home folder or a filesystem root; give the cache a folder of its own")
    return None


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
    try:
        found = parts(root, wheelhouse)
    except OSError as e:
        raise AttnError(f"cannot read the cache folder {root}: {e.strerror or e}") from None
    errors: list[str] = []
    if args.cache_command == "clean":
        why = _refusal(root)
        if why:
            raise UsageError(why)
        ours = _same(wheelhouse, default_wheelhouse(root)) and not _is_link(wheelhouse)
        since = _building_since(found)
        for part in found:
            if part.name == "wheelhouse" and not (args.wheelhouse and ours):
                if part.paths or part.foreign:
                    part.kept = [f"{wheelhouse} ("
                                 + ("--wheelhouse removes it" if ours
                                    else "a folder of your own: remove it yourself") + ")"]
                continue
            errors += clean(part, building_since=since, keep=None if ours else wheelhouse)
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
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(str(root)))
    cols = ("part", "files before", "size before", "removed", "what") if cleaned else \
        ("part", "files", "size", "what")
    for col in cols:
        t.add_column(col, justify="left" if col in ("part", "what") else "right")
    for p in found:
        note = escape(p.what + "".join(f"; kept: {k}" for k in p.kept))
        t.add_row(p.name, str(p.files), _size(p.bytes),
                  *([_size(p.removed)] if cleaned else []), note)
    console().print(t)
    if cleaned:
        total = sum(p.removed for p in found)
        console().print(f"removed {_size(total)}")
