"""The digests a lock's fingerprint holds, standard library only: the dispatcher (inside
ComfyUI, runtime/live.py) and the command line (a lock written without verification, which
need not start the target's torch to learn them) compute them with this one code.

Which distribution of a name counts is the one `importlib.metadata.distribution(name)`
returns for the same path list: its path finder (MetadataPathFinder: FastPath and Lookup in
importlib/metadata/__init__.py, the same in Python 3.10 to 3.13), reproduced here because
importing importlib.metadata costs a start more than the whole search. Matched exactly:

- path entries in order, the first match wins; an entry "" is the current folder;
- a folder's children in `os.listdir` order (not sorted: of two `foo-*.dist-info` left by
  a broken install, the one the folder lists first);
- a child is a candidate when its name, lower-cased, ends in `.dist-info` or `.egg-info`,
  a folder or a file alike (a legacy `foo-1.0-py3.11.egg-info` file holds PKG-INFO's text
  itself); its name is the part before the first "-", compared normalised
  (`[-_.]+` as "_", lower case: `flash-attn` is `flash_attn-2.8.3.dist-info`);
- an entry whose base name ends in `.egg` (`foo-1.0-py3.11.egg`, a folder or a zip) also
  offers its `EGG-INFO` child (any case), after all of its `*.dist-info`/`*.egg-info`,
  named by that base name: the part before the first "-", compared by importlib's legacy
  rule (lower case, "-" as "_", dots kept: `foo.bar` is not `foo_bar-1.0-py3.11.egg`);
- an entry that is a file is read as a zip (an `.egg` zip, or any zip on sys.path such as
  ComfyUI portable's python311.zip): its top-level names in the order of the archive's
  central directory, as zipfile lists them; entries inside a zip (`a.zip/sub`) are not
  searched, by either.

The version is METADATA's Version field, else PKG-INFO's, else that of the candidate itself
when it is a file (importlib's `read_text('METADATA') or read_text('PKG-INFO') or
read_text('')`: an empty file counts as absent). Not matched: distributions offered by other
finders on sys.meta_path (none by default); importlib's per-process cache of a folder's
listing (kept until the folder's mtime changes; this code lists again every time); a
missing Version (importlib: None, here "") and undecodable METADATA (importlib raises, here
replaced characters).

The digest (files_digest) reads a RECORD; an .egg-info folder has none, and its digest is
of its own files and those it names (_egg_digest). An egg and a legacy egg-info file have
neither (None; the lock keeps "", lockmodel.LockedDist.same_files): for those only the
version tells a change. A dist-info in a zip is digested from the zip's directory: its
RECORD and each listed file's size and CRC-32.

Speed (the search runs at every ComfyUI start): a folder costs one listdir and a string test
per child; a zip file costs one read of its central directory, which is searched for
"-info" (which every candidate's name holds) before zipfile parses it: a zip of the
standard library ahead of site-packages (ComfyUI portable's python311.zip) costs 0.15 ms
once a process, then a stat while its size and mtime stay."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from comfy_env_attn.core.backends import SHIPPED_PLUGINS

_PACKAGE = Path(__file__).resolve().parent.parent


class InZip(NamedTuple):
    """A distribution's metadata inside a zip file on the path (an `.egg` zip, or a zip of
    a site): the archive as the path names it, and the metadata's top-level name in it
    (`foo-1.0.dist-info`, `EGG-INFO`)."""

    archive: str
    member: str


Meta = Path | InZip
"""Where a distribution's metadata is: a folder (or a legacy egg-info file), or in a zip."""


def dist_facts(dist: str, path: Sequence[str] | None = None
               ) -> tuple[str, str | None] | None:
    """(version, digest of its files) of an installed distribution, None when absent: the
    one `importlib.metadata` finds first on `path` (default: this process's sys.path).

    The digest covers its RECORD and, for each file RECORD lists, the path, size and
    modification time on disk: a file edited in place or overwritten by another
    distribution changes it, at the cost of one stat per file (no file is read), cheap
    enough for every ComfyUI start. In a zip: each file's size and CRC-32 from the zip's
    directory. None: no RECORD (an egg, an egg-info)."""
    return dists_facts([dist], path)[dist]


def dists_facts(dists: Iterable[str], path: Sequence[str] | None = None
                ) -> dict[str, tuple[str, str | None] | None]:
    """dist_facts of each of these distributions, each folder on the path listed once."""
    found = find_metadata_dirs(dists, sys.path if path is None else path)
    return {d: None if meta is None else (metadata_version(meta), files_digest(meta))
            for d, meta in found.items()}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


_INFO = (".dist-info", ".egg-info")


def find_metadata_dir(dist: str, path: Sequence[str]) -> Meta | None:
    """The metadata of this distribution that importlib.metadata finds first on `path`
    (the rules: this module's docstring): a `<name>-<version>.dist-info` or `.egg-info`
    folder (or egg-info file), an egg's `EGG-INFO`, or either of these in a zip."""
    return find_metadata_dirs([dist], path)[dist]


def find_metadata_dirs(dists: Iterable[str], path: Sequence[str]) -> dict[str, Meta | None]:
    """find_metadata_dir of each of these distributions, each entry of the path listed once
    (the dispatcher asks for every backend's at each ComfyUI start)."""
    # name -> (its normal form, a dist-info's stem is compared with; an egg's file name)
    wanted = {d: (_normal(d), d.lower().replace("-", "_")) for d in dists}
    found: dict[str, Meta | None] = {}
    for entry in path:
        todo = [d for d in wanted if d not in found]
        if not todo:
            break
        archive: str | None = None
        try:
            names: Sequence[str] = os.listdir(entry or ".")
        except (OSError, TypeError, ValueError):
            zipped = _zip_children(entry)
            if not zipped:
                continue
            archive, names = entry, zipped
        first: dict[str, str] = {}  # a dist-info's normal stem -> the first of that stem
        egg_info: str | None = None  # an egg's EGG-INFO, after every dist-info of the folder
        for name in names:
            low = name.lower()
            if low.endswith(_INFO):
                stem = low.rpartition(".")[0].partition("-")[0]
                # the common case first: a name already normal ("flash_attn")
                first.setdefault(_normal(stem) if "." in stem or "__" in stem else stem, name)
            elif egg_info is None and low == "egg-info":
                egg_info = name
        base = os.path.basename(entry).lower()  # an egg of this name: its EGG-INFO counts
        for d in todo:
            want, legacy = wanted[d]
            meta = first.get(want)
            if meta is None and egg_info is not None and base.endswith(".egg") and \
                    base.rpartition(".")[0].partition("-")[0].replace("-", "_") == legacy:
                meta = egg_info
            if meta is not None:
                found[d] = Path(entry or ".", meta) if archive is None else InZip(archive, meta)
    return {d: found.get(d) for d in wanted}


_ZIP_CHILDREN: dict[tuple[str, int, int], list[str]] = {}
"""Each zip's top-level names ([] for one with no metadata), by (path, size, mtime_ns):
read once a process while the file stays, as importlib caches a path entry."""


def _zip_children(entry: str) -> list[str]:
    """The top-level names in a zip file, in the order zipfile lists them; [] for what is
    no zip, or holds no name with "-info" (the cheap test most zips end at)."""
    try:
        st = os.stat(entry)
    except (OSError, TypeError, ValueError):
        return []
    key = (entry, st.st_size, st.st_mtime_ns)
    if key not in _ZIP_CHILDREN:
        _ZIP_CHILDREN[key] = _read_zip_children(entry)
    return _ZIP_CHILDREN[key]


def _read_zip_children(entry: str) -> list[str]:
    try:
        with open(entry, "rb") as f:
            if not _may_hold_metadata(f):
                return []
            import zipfile

            with zipfile.ZipFile(f) as zf:
                return list(dict.fromkeys(n.split("/", 1)[0] for n in zf.namelist()))
    except Exception:  # importlib's FastPath too: whatever fails to read holds nothing
        return []


_EOCD, _EOCD64, _LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


def _may_hold_metadata(f: BinaryIO) -> bool:
    """False only when `f` is a zip whose central directory holds no "-info" (any case):
    no `*.dist-info`, `*.egg-info` or `EGG-INFO` in it. Finds the directory as zipfile
    does (its end record: at the very end, else the last one in the last 64 KiB; a zip64
    end record before it; the directory right before those, whatever data precedes the
    zip); anything not understood is left to zipfile (True)."""
    size = f.seek(0, os.SEEK_END)
    if size < 22:
        return True
    f.seek(size - 22)
    tail = f.read(22)
    at = size - 22
    if not (tail.startswith(_EOCD) and tail.endswith(b"\0\0")):  # no comment
        start = max(0, size - 22 - 0xFFFF)
        f.seek(start)
        tail = f.read()
        found = tail.rfind(_EOCD)
        if found < 0 or len(tail) - found < 22:
            return True
        at = start + found
        tail = tail[found:found + 22]
    cd_size, end = int.from_bytes(tail[12:16], "little"), at
    if at >= 20 + 56:
        f.seek(at - 20)
        if f.read(4) == _LOCATOR64:
            f.seek(at - 20 - 56)
            rec = f.read(56)
            if not rec.startswith(_EOCD64):
                return True
            cd_size, end = int.from_bytes(rec[40:48], "little"), at - 20 - 56
    if cd_size > end:
        return True
    f.seek(end - cd_size)
    directory = f.read(cd_size)
    return len(directory) != cd_size or b"-info" in directory.lower()


def metadata_version(meta: Meta) -> str:
    """The Version field of a dist-info's METADATA (an egg-info's PKG-INFO, a legacy
    egg-info file's own text), as importlib.metadata reads it (email's header rules:
    metadata_headers)."""
    for file in ("METADATA", "PKG-INFO", ""):
        text = _read_text(meta, file)
        if text:  # importlib: read_text(...) or the next; an empty file is no metadata
            for key, value in metadata_headers(text):
                if key.lower() == "version":
                    return value
            return ""
    return ""


def _read_text(meta: Meta, file: str) -> str | None:
    """A metadata file's text (`file` "": the metadata itself, when it is a file)."""
    if isinstance(meta, Path):
        try:
            return (meta / file).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    if not file:
        return None  # a member of a zip is read as a folder (zipfile.Path) only
    try:
        import zipfile

        with zipfile.ZipFile(meta.archive) as zf:
            return zf.read(f"{meta.member}/{file}").decode("utf-8", errors="replace")
    except Exception:
        return None


def metadata_headers(text: str) -> list[tuple[str, str]]:
    """The header fields of a METADATA file (RFC 822 style, up to the first empty line; a
    line starting with whitespace, blank or not, continues the field before it), in order. What
    email.parser's HeaderParser returns for these files, without importing the email
    package at every start."""
    out: list[tuple[str, str]] = []
    for line in _LINE_BREAK.split(text):  # not splitlines(): \f or \u2028 break no line
        if not line:
            break
        if line[0] in " \t" and out:
            name, value = out[-1]
            out[-1] = (name, f"{value}\n{line}")
            continue
        m = _HEADER.match(line)
        if m is None:
            break  # neither a field nor its continuation: the headers have ended
        out.append((m[1], m[2].strip()))
    return out


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_HEADER = re.compile(r"([\x21-\x39\x3b-\x7e]+):(.*)", re.S)


def files_digest(meta: Meta) -> str | None:
    """The digest of a dist-info folder's RECORD and the files it lists; of an .egg-info
    folder, _egg_digest's (None: neither)."""
    if not isinstance(meta, Path):
        return _zip_digest(meta)
    try:
        record = (meta / "RECORD").read_text(encoding="utf-8")
    except OSError:
        return _egg_digest(meta) if meta.name.endswith(".egg-info") else None
    h = hashlib.sha256(record.encode())
    for row in csv.reader(record.splitlines()):
        if not row or row[0].endswith(".pyc"):
            continue  # bytecode is rewritten by Python itself
        try:
            st = os.stat(meta.parent / row[0])
            h.update(f"{row[0]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{row[0]}|missing\n".encode())
    return h.hexdigest()


_EGG_FILES_MAX = 20000  # a source tree of that many files under one package is no install


def _egg_digest(meta: Path) -> str | None:
    """An .egg-info folder (`setup.py install`, or `develop` in a source tree: the usual way
    a backend is built from source) has no RECORD: the digest of its own files and of each
    file it installed (installed-files.txt, relative to it), else of its top-level packages
    and modules beside it (top_level.txt), bytecode aside, each by path, size and mtime. An
    extension rebuilt in place changes it. None where it is no folder or lists too much."""
    try:
        own = sorted(p for p in meta.iterdir() if p.is_file())
    except OSError:
        return None
    files: list[Path] = []
    try:
        listed = (meta / "installed-files.txt").read_text(encoding="utf-8").splitlines()
        files = [meta / line.strip() for line in listed if line.strip()]
    except OSError:
        try:
            tops = (meta / "top_level.txt").read_text(encoding="utf-8").split()
        except OSError:
            tops = []
        for top in tops:
            if (meta.parent / top).is_dir():
                for root, dirs, names in os.walk(meta.parent / top):
                    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                    files += [Path(root, n) for n in sorted(names)]
                    if len(files) > _EGG_FILES_MAX:
                        return None
            else:  # a module: top.py, top.cpython-312-x86_64-linux-gnu.so, top.pyd
                files += sorted(p for p in meta.parent.glob(f"{top}.*")
                                if p.is_file() and p.suffix in (".py", ".so", ".pyd"))
    h = hashlib.sha256(b"egg-info\n")
    for p in [*own, *files]:
        if p.suffix == ".pyc":
            continue  # bytecode is rewritten by Python itself
        rel = os.path.relpath(p, meta.parent).replace(os.sep, "/")
        try:
            st = p.stat()
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}|missing\n".encode())
    return h.hexdigest()


def _zip_digest(meta: InZip) -> str | None:
    """files_digest of a dist-info in a zip: RECORD, and each file's size and CRC-32 as the
    zip's directory has them (paths relative to the zip's top, as importlib's locate_file;
    a path out of the zip counts as missing)."""
    try:
        import zipfile

        with zipfile.ZipFile(meta.archive) as zf:
            record = zf.read(f"{meta.member}/RECORD").decode("utf-8")
            h = hashlib.sha256(record.encode())
            for row in csv.reader(record.splitlines()):
                if not row or row[0].endswith(".pyc"):
                    continue
                try:
                    info = zf.getinfo(row[0])
                    h.update(f"{row[0]}|{info.file_size}|{info.CRC}\n".encode())
                except KeyError:
                    h.update(f"{row[0]}|missing\n".encode())
    except Exception:  # no RECORD, or no zip to read any more
        return None
    return h.hexdigest()


def adapters_sha256() -> str:
    """The code verification proves: the adapters, the capability claims they read, and the
    plugins that ship with comfy-env-attn."""
    h = hashlib.sha256()
    for p in (_PACKAGE / "runtime" / "adapters.py", _PACKAGE / "core" / "backends.py",
              _PACKAGE / "runtime" / "plugins.py",  # the plugin machinery
              *(_PACKAGE / "runtime" / f"{n}.py" for n in SHIPPED_PLUGINS)):
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()
