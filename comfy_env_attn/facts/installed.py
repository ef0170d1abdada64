"""What is installed in the target, read from metadata (dist-info) without importing it.

Names and versions come from the .dist-info folder names (a target has hundreds of
distributions; parsing every METADATA costs half a second); requirements and tags are read
only for the distributions a caller asks about. What a distribution owns comes from its
RECORD, or for a legacy .egg-info (no RECORD) from its installed-files.txt or top_level.txt.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from packaging.markers import InvalidMarker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, parse_tag
from packaging.utils import canonicalize_name

from comfy_env_attn.core.fingerprint import metadata_headers
from comfy_env_attn.core.paths import answer_file, write_cache
from comfy_env_attn.core.records import dataclass

# Never replaced by an install: the constraint pins them and a wheel needing others is refused.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")

_DIST_INFO = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)\.dist-info$")


@dataclass
class Installed:
    """One installed distribution, found as importlib.metadata finds it."""
    name: str  # canonical
    version: str
    location: str  # the site dir holding it
    dist_info: str  # path of its .dist-info (or .egg-info) folder
    _meta: dict[str, list[str]] | None = field(default=None, repr=False, compare=False)
    # what its ownership is read from, as read once (mentions): an install asks it of every
    # distribution twice, for the guard and for the files an upgrade must leave
    _owning: bytes | None = field(default=None, repr=False, compare=False)

    def _headers(self) -> dict[str, list[str]]:
        if self._meta is None:
            meta: dict[str, list[str]] = {}
            for fname in ("METADATA", "PKG-INFO"):
                p = Path(self.dist_info, fname)
                if p.is_file():
                    for k, v in metadata_headers(p.read_text(encoding="utf-8",
                                                             errors="replace")):
                        meta.setdefault(k.lower(), []).append(v)
                    break
            self._meta = meta
        return self._meta

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self._headers().get("requires-dist", []))

    @property
    def tags(self) -> frozenset[Tag]:
        tags: set[Tag] = set()
        try:
            text = Path(self.dist_info, "WHEEL").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return frozenset()
        for line in text.splitlines():
            if line.startswith("Tag:"):
                try:
                    tags |= parse_tag(line.split(":", 1)[1].strip())
                except ValueError:
                    pass
        return frozenset(tags)

    @property
    def requires_torch(self) -> str | None:
        for r in self.requires:
            try:
                req = Requirement(r)
            except InvalidRequirement:
                continue
            if canonicalize_name(req.name) == "torch" and req.marker is None:
                return str(req.specifier) or None
        return None


def _from_folder(site: str, entry: str) -> Installed | None:
    path = os.path.join(site, entry)
    m = _DIST_INFO.match(entry)
    if m is not None:
        return Installed(str(canonicalize_name(m["name"])), m["version"], site, path)
    # An .egg-info that is a file (distutils' install_egg_info: PKG-INFO alone) is left out:
    # it names neither files nor top-level names, so nothing it owns could be learned; the
    # guard still refuses replacing any file already there that no distribution lists.
    if entry.endswith((".dist-info", ".egg-info")) and os.path.isdir(path):
        inst = Installed("", "", site, path)
        headers = inst._headers()
        name, version = headers.get("name", [""])[0], headers.get("version", [""])[0]
        if name:
            inst.name, inst.version = str(canonicalize_name(name)), version
            return inst
    return None


def read_installed(site_dirs: Iterable[str]) -> dict[str, Installed]:
    """Canonical name -> Installed, first site dir wins (as import does)."""
    out: dict[str, Installed] = {}
    for site in site_dirs:
        try:
            entries = sorted(os.listdir(site))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".dist-info", ".egg-info")):
                continue
            inst = _from_folder(site, entry)
            if inst is not None and inst.name not in out:
                out[inst.name] = inst
    return out


def torch_family(installed: dict[str, Installed]) -> dict[str, str]:
    """torch, torchvision, torchaudio versions as installed (the constraint that pins them)."""
    return {n: installed[n].version for n in TORCH_FAMILY if n in installed}


def installed_backends(installed: dict[str, Installed]) -> list[str]:
    """The attention backends whose distributions are installed, in the registry's order:
    one per distribution (core.backends.primary), the backend that installs it. Its
    variants (sage_fp16 of sageattention) are verified and locked with it by verify(),
    like plugins: their failure never fails an install or rolls the package back."""
    from comfy_env_attn.core.backends import BACKENDS, primary

    return [b.name for b in BACKENDS.values()
            if b.dist and b.dist in installed and primary(b.name) == b.name]


# -- what a distribution owns (its RECORD), and whether the files still match it ----------

_DRIVE = re.compile(r"^[A-Za-z]:")


def site_path(path: str) -> str:
    """A path as a RECORD or installed-files.txt line writes it, in the one form the guard
    compares: '/'-separated (a RECORD made on Windows has '\\'), without '.' or empty parts
    and without a trailing '/' ('./a/b.py', 'a/./b.py', 'a//b.py' are all 'a/b.py'),
    'a/../b' folded; the leading '..' of a script or data file outside the site dir kept."""
    p = path.replace("\\", "/")
    if "//" in p or "/." in p or p.startswith(".") or p.endswith("/"):
        p = posixpath.normpath(p)
    return p


def _is_absolute(rel: str) -> bool:
    return rel.startswith("/") or _DRIVE.match(rel) is not None  # C:/... from Windows


def is_whole_folder(rel: str) -> bool:
    """Whether a path from record_paths is a folder owned as a whole ('legacy/'), not a file."""
    return rel.endswith("/")


def norm(path: str) -> str:
    """A path in the one form paths are compared in (normalised; case-folded on Windows)."""
    return os.path.normcase(os.path.normpath(path))


def real(path: str) -> str:
    """norm, once the links on the way are followed (a venv's lib64 -> lib, a linked folder,
    a junction): one place reached by two paths compares equal."""
    return norm(os.path.realpath(path))


def is_egg(inst: Installed) -> bool:
    """Whether it is installed as a legacy .egg-info (no RECORD: its files are listed
    incompletely, or not at all)."""
    return inst.dist_info.endswith(".egg-info")


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _record(inst: Installed) -> tuple[tuple[str, str, str], ...]:
    """The lines of the distribution's RECORD, paths as site_path gives them."""
    if not inst.dist_info:
        return ()
    record = os.path.join(inst.dist_info, "RECORD")
    key = _stat_key(record)
    # one install reads torch's RECORD (20,000 lines) several times: parse it once per
    # version of the file
    if key is None:
        return ()
    try:
        return _parse_record(record, *key)
    except (OSError, UnicodeDecodeError):  # not kept: read again when asked again
        return ()


@functools.lru_cache(maxsize=512)
def _parse_record(record: str, _mtime: int, _size: int, _ino: int
                  ) -> tuple[tuple[str, str, str], ...]:
    text = Path(record).read_text(encoding="utf-8")
    rows = ((site_path(path), digest, size) for path, digest, size in record_rows(text))
    return tuple(row for row in rows if row[0] != ".")


def record_rows(text: str) -> Iterator[tuple[str, str, str]]:
    """(path as written, hash, size) for each line of a RECORD's text."""
    for row in csv.reader(text.splitlines()):
        if row and row[0]:
            yield row[0], row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else ""


def _egg_text(inst: Installed, name: str) -> str | None:
    try:
        return Path(inst.dist_info, name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _egg_files(inst: Installed) -> tuple[str, ...] | None:
    """The files an .egg-info's installed-files.txt lists (pip and `setup.py install
    --record` write it), relative to the site dir: its lines are relative to the .egg-info
    folder itself ('../legacy/__init__.py', 'PKG-INFO'). None without one."""
    path = os.path.join(inst.dist_info, "installed-files.txt")
    key = _stat_key(path)
    return None if key is None else _parse_installed_files(path, *key)


@functools.lru_cache(maxsize=64)
def _parse_installed_files(path: str, _mtime: int, _size: int, _ino: int
                           ) -> tuple[str, ...] | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    folder = os.path.basename(os.path.dirname(path))
    out: list[str] = []
    for line in text.splitlines():
        rel = site_path(line.strip())
        if rel and not _is_absolute(rel):
            rel = site_path(f"{folder}/{rel}")
        if rel and rel not in (".", folder):  # './' is the .egg-info folder itself
            out.append(rel)
    return tuple(out)


def _egg_tops(inst: Installed) -> list[str]:
    """What the site dir holds of the top-level names an .egg-info's top_level.txt gives:
    module files (legacy_mod.py, legacy_mod.cpython-311-x86_64-linux-gnu.so) as themselves,
    a package as its folder owned whole ('legacy/'; also a name of which nothing is there:
    the name is still the distribution's). A pkg_resources namespace (namespace_packages.txt)
    is shared by design and is left out."""
    spaces = set((_egg_text(inst, "namespace_packages.txt") or "").split())
    try:
        entries = sorted(os.listdir(inst.location))
    except OSError:
        entries = []
    out: list[str] = []
    for name in dict.fromkeys((_egg_text(inst, "top_level.txt") or "").split()):
        if not name.isidentifier() or name in spaces:
            continue
        files = [e for e in entries if e != name and module_key(e) == name
                 and os.path.isfile(os.path.join(inst.location, e))]
        out += files
        if not files or os.path.isdir(os.path.join(inst.location, name)):
            out.append(f"{name}/")
    return out


def record_lines(inst: Installed) -> list[tuple[str, str, str]]:
    """(path relative to the site dir, as site_path gives it; hash as written; size) for each
    file the distribution lists: its RECORD's lines, or an .egg-info's installed-files.txt
    (no hash, no size)."""
    if not inst.dist_info:
        return []
    if is_egg(inst):
        return [(p, "", "") for p in _egg_files(inst) or ()]
    return list(_record(inst))


def record_paths(inst: Installed) -> list[str]:
    """Every path a distribution owns, relative to its site dir (scripts and data files
    outside it start with '..'). An .egg-info without installed-files.txt names only its
    top-level modules and packages: what the site dir holds of them, each package as a
    folder owned whole, with a trailing '/' (is_whole_folder; its files are not known)."""
    if is_egg(inst) and _egg_files(inst) is None:
        return _egg_tops(inst)
    return [p for p, _, _ in record_lines(inst) if not _is_absolute(p)]


_OWNERSHIP_FILES = {".dist-info": ("RECORD",),
                    ".egg-info": ("installed-files.txt", "top_level.txt")}


def mentions(inst: Installed, toks: set[str], *, fold: bool = False) -> bool:
    """Whether what a distribution's ownership is read from (RECORD; an .egg-info's
    installed-files.txt and top_level.txt) contains one of these strings at all: a cheap
    test before record_paths parses it. With `fold`, case-insensitively (Windows): the
    tokens are given lower-case."""
    if not inst.dist_info or not toks:
        return False
    if inst._owning is None:
        data = b""
        for name in _OWNERSHIP_FILES[".egg-info" if is_egg(inst) else ".dist-info"]:
            try:
                data += Path(inst.dist_info, name).read_bytes() + b"\n"
            except OSError:
                pass
        inst._owning = data
    data = inst._owning
    if fold:
        data = data.lower()
    return any(t.encode("utf-8") in data for t in toks)


_EXT_MODULE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\.(?:[^/]*\.)?(?:py|pyc|so|pyd)$")


def module_key(top: str) -> str:
    """The name a top-level site entry is imported as: torch/, torch.py and
    torch.cpython-312-x86_64-linux-gnu.so all hide or replace `torch`."""
    m = _EXT_MODULE.match(top)
    return m.group(1) if m else top


# A requirement whose marker is one `extra == "name"` and nothing else (fsspec, sympy and
# jinja2 list some two hundred of them): not needed unless that extra is asked for, which
# costs no Requirement parse to tell. Not a URL requirement (`x @ file:///a;extra=="x"`:
# the ";" may be the URL's).
_ONLY_AN_EXTRA = re.compile(r"""^[^;@]*;\s*extra\s*==\s*(["'])[^"']+\1\s*$""")


def protected(installed: dict[str, Installed], markers: dict[str, str]) -> dict[str, str]:
    """torch, torchvision, torchaudio and everything they require, transitively, as
    installed: name -> version. None of these may change during an install.

    Kept in the cache (answer_file "closure", by the first of the family's .dist-info)
    while it would come out the same: the same markers, each distribution it went through
    the same folder with the same metadata, each name it looked for and did not find still
    absent. Parsing the requirements of torch's closure took 6 ms of an install on the H100
    machine, before uv starts."""
    family = [n for n in TORCH_FAMILY if n in installed]
    if not family:
        return {}
    cache = answer_file("closure", installed[family[0]].dist_info)
    try:
        doc = json.loads(cache.read_text(encoding="utf-8"))
        if doc.get("schema") == CLOSURE_SCHEMA and doc.get("markers") == markers and \
                all(name not in installed for name in doc["absent"]) and \
                all(name in installed and installed[name].dist_info == where and
                    _metadata_stats(installed[name]) == stats
                    for name, (where, stats) in doc["members"].items()):
            return {str(k): str(v) for k, v in doc["closure"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    env = {**markers, "extra": ""}
    out: dict[str, str] = {}
    absent = {n for n in TORCH_FAMILY if n not in installed}
    todo = list(family)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = installed[name].version
        for text in installed[name].requires:
            if _ONLY_AN_EXTRA.match(text):
                continue  # false with no extra asked: most of torch's closure's lines
            try:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
            except (InvalidRequirement, InvalidMarker, UndefinedEnvironmentName):
                continue
            dep = str(canonicalize_name(req.name))
            if dep not in installed:
                absent.add(dep)
            elif dep not in out:
                todo.append(dep)
    closure = dict(sorted(out.items()))
    write_cache(cache, json.dumps({
        "schema": CLOSURE_SCHEMA, "markers": markers, "closure": closure,
        "members": {n: [installed[n].dist_info, _metadata_stats(installed[n])] for n in out},
        "absent": sorted(absent)}))
    return closure


CLOSURE_SCHEMA = 1


def _metadata_stats(inst: Installed) -> list[list[int] | None]:
    """What Installed.requires reads its lines from (METADATA, else PKG-INFO), as stats."""
    return [None if (k := _stat_key(os.path.join(inst.dist_info, name))) is None else list(k)
            for name in ("METADATA", "PKG-INFO")]


Stat = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode: any write changes one


def stat_of(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def is_bytecode(rel: str) -> bool:
    """Bytecode: Python rewrites it when it is stale, so it may differ from RECORD."""
    return rel.endswith((".pyc", ".pyo")) or "__pycache__/" in rel


def owned_files(inst: Installed) -> Iterator[tuple[str, str]]:
    """(path relative to the site dir, '/'-separated; absolute path, norm) of each file the
    distribution owns: each path record_paths gives, and each file now inside a folder it
    owns whole (is_whole_folder: an .egg-info that names its package, not its files). The
    one answer to "does this distribution own that file?", wherever it is asked."""
    for rel in record_paths(inst):
        if not is_whole_folder(rel):
            yield rel, norm(os.path.join(inst.location, rel))
            continue
        for root, _dirs, files in os.walk(os.path.join(inst.location, rel)):
            for name in files:
                path = os.path.join(root, name)
                yield os.path.relpath(path, inst.location).replace(os.sep, "/"), norm(path)


def shared_files(installed: Mapping[str, Installed], names: Collection[str], *,
                 fold: bool = False) -> set[str]:
    """The files these distributions own (owned_files) that another installed distribution
    owns too, absolute (norm): removing them (an uninstall; uv replacing an old version)
    must leave these. Only the others that could own one of those files are read
    (could_own: from the index, else whether their ownership files mention the top-level
    name of one, or its file name outside the site dir or in the __pycache__ every
    distribution shares; `fold` on Windows)."""
    listed: set[str] = set()
    toks: set[str] = set()
    for name in names:
        inst = installed.get(name)
        for rel, path in owned_files(inst) if inst is not None else ():
            listed.add(path)
            top = rel.split("/", 1)[0]
            tok = rel.rsplit("/", 1)[-1] if top in ("..", "__pycache__") else module_key(top)
            toks.add(tok.lower() if fold else tok)
    if not listed:  # nothing to share (an install that replaces nothing)
        return set()
    reach = Reach(frozenset(), frozenset(listed), fold)
    return {path for n, inst in installed.items()
            if n not in names and could_own(inst, reach, toks)
            for _rel, path in owned_files(inst) if path in listed}


# -- which distributions could own what a wheel writes, without reading every RECORD --------

@dataclass(frozen=True)
class Reach:
    """What an install or removal touches, as the distributions that could own part of it
    are looked for (could_own): the module keys of the top-level names it puts in a site
    dir (a distribution with a top-level name of the same key could be hidden by it, or
    hide it: guard.problems), and every file, absolute (norm). `fold`: compared
    case-insensitively (Windows)."""
    keys: frozenset[str]
    dests: frozenset[str]
    fold: bool = False


def could_own(inst: Installed, reach: Reach, toks: set[str]) -> bool:
    """Whether the distribution could own part of `reach`: one of its files, or a
    top-level name of one of its keys. From the index of what each RECORD reaches (its
    paths' first parts inside the site dir, its paths outside it), kept in the cache while
    the RECORD is unchanged: then no RECORD is read, where an environment with torch has
    some 200 of them (20 ms on the H100 machine). A distribution the index lacks, or an
    .egg-info, is asked as before: whether its ownership files contain one of `toks` at all
    (mentions), a superset of the same answer."""
    tops = _index_lookup(inst)
    if tops is None:
        return mentions(inst, toks, fold=reach.fold)
    firsts, outside = tops
    f = str.lower if reach.fold else str
    base = f(norm(inst.location)) + os.sep
    near = {d[len(base):].split(os.sep, 1)[0] for d in map(f, reach.dests)
            if d.startswith(base)}
    keys = {f(k) for k in reach.keys}
    if any(f(t) in near or f(module_key(t)) in keys for t in firsts):
        return True
    dests = {f(d) for d in reach.dests}
    return any(f(o) in dests for o in outside)


def reach_of(inst: Installed) -> tuple[list[str], list[str]]:
    """What a distribution's RECORD reaches (record_paths): the first part of each path in
    its site dir, and each path outside it, absolute (norm): all could_own compares."""
    firsts: set[str] = set()
    outside: set[str] = set()
    for rel in record_paths(inst):
        top = rel.split("/", 1)[0]
        if top == "..":
            outside.add(norm(os.path.join(inst.location, rel)))
        elif top:
            firsts.add(top)
    return sorted(firsts), sorted(outside)


OWNERS_SCHEMA = 1
# the index as read from the cache, one document a site dir: location -> {.dist-info folder
# name: {"record": its RECORD's stat, "firsts": [...], "outside": [...]}}
_INDEX: dict[str, dict[str, Any]] = {}


def _index_doc(location: str) -> dict[str, Any]:
    doc = _INDEX.get(location)
    if doc is None:
        doc = {}
        try:
            read = json.loads(answer_file("owners", location).read_text(encoding="utf-8"))
            if read.get("schema") == OWNERS_SCHEMA and read.get("location") == location \
                    and isinstance(read.get("dists"), dict):
                doc = read["dists"]
        except (OSError, ValueError, AttributeError):
            pass
        _INDEX[location] = doc
    return doc


def _index_lookup(inst: Installed) -> tuple[list[str], list[str]] | None:
    """The index's entry for this distribution while its RECORD is as it was then."""
    if not inst.dist_info or is_egg(inst):
        return None
    return _entry_reach(_index_doc(inst.location).get(os.path.basename(inst.dist_info)),
                        _stat_key(os.path.join(inst.dist_info, "RECORD")))


def _entry_reach(entry: Any, key: tuple[int, int, int] | None
                 ) -> tuple[list[str], list[str]] | None:
    """An index entry's (firsts, outside) where it was made from the RECORD of this stat."""
    if key is None or not isinstance(entry, dict) or entry.get("record") != list(key):
        return None
    firsts, outside = entry.get("firsts"), entry.get("outside")
    if not (isinstance(firsts, list) and isinstance(outside, list)
            and all(isinstance(p, str) for p in [*firsts, *outside])):
        return None  # not as this writes it: read the RECORD
    return firsts, outside


def index_in_background(installed: Iterable[Installed]) -> threading.Thread:
    """Add what the index lacks of these distributions, and save it, in a thread: for a
    caller about to wait on something else (uv installing), who joins it before going on.
    Only an index that cannot be written is passed over: it is a cache."""
    thread = threading.Thread(target=_index_missing, args=(list(installed),),
                              name="owners-index", daemon=True)
    thread.start()
    return thread


def _index_missing(installed: list[Installed]) -> None:
    by_site: dict[str, list[Installed]] = {}
    for inst in installed:
        if inst.dist_info and not is_egg(inst):
            by_site.setdefault(inst.location, []).append(inst)
    for location, insts in by_site.items():
        doc = _index_doc(location)
        fresh: dict[str, Any] = {}
        for inst in insts:
            name = os.path.basename(inst.dist_info)
            record = os.path.join(inst.dist_info, "RECORD")
            key = _stat_key(record)
            if key is None:
                continue
            if _entry_reach(doc.get(name), key) is None:  # the RECORD stat just taken
                firsts, outside = reach_of(inst)
                # uv runs beside this, removing old versions: a RECORD gone or replaced while
                # it was read is left out (restored later with the same stat, an entry read
                # from nothing would pass it over for good); a RECORD lists itself at least
                if not firsts or _stat_key(record) != key:
                    continue
                fresh[name] = {"record": list(key), "firsts": firsts, "outside": outside}
            else:
                fresh[name] = doc[name]
        if fresh != doc:  # new entries, or ones of distributions gone
            _INDEX[location] = fresh
            write_cache(answer_file("owners", location),
                        json.dumps({"schema": OWNERS_SCHEMA, "location": location,
                                    "dists": fresh}))


def file_stats(insts: Iterable[Installed]) -> dict[str, Stat | None]:
    """The stat of every file the distributions own (owned_files: what their RECORDs list,
    and each file in a folder one owns whole; a folder's own stat changes with every file
    Python writes in it), bytecode aside."""
    out: dict[str, Stat | None] = {}
    for inst in insts:
        for rel, path in owned_files(inst):
            if not is_bytecode(rel):
                out[path] = stat_of(path)
    return out


def changed_files(before: dict[str, Stat | None], after: dict[str, Stat | None]) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def record_hash(path: str, algorithm: str = "sha256") -> str | None:
    """A file's hash as a RECORD line writes it ('sha256=<urlsafe base64, unpadded>');
    None when the file cannot be read or the algorithm is unknown."""
    try:
        h = hashlib.new(algorithm)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, ValueError):
        return None
    return f"{algorithm}=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def record_problems(inst: Installed, *, cache: Path | None = None) -> list[str]:
    """The files of a distribution that differ from its RECORD (missing, or another sha256),
    relative to its site dir. With `cache`, files whose stat is unchanged since they last
    matched are not hashed again (torch is ~700 MB: 3 s to hash)."""
    lines = _record(inst)  # an .egg-info has no hashes to check: it is reported as such
    if not lines:
        return [f"{Path(inst.dist_info).name}/RECORD is missing or unreadable"]
    record_id = hashlib.sha256(Path(inst.dist_info, "RECORD").read_bytes()).hexdigest()
    seen: dict[str, list[int]] = {}
    cfile = None
    if cache is not None:
        cfile = answer_file("files", inst.dist_info, cache)
        try:
            doc = json.loads(cfile.read_text(encoding="utf-8"))
            if doc.get("record") == record_id and isinstance(doc.get("ok"), dict):
                seen = doc["ok"]
        except (OSError, ValueError):
            pass
    bad: list[str] = []
    ok: dict[str, list[int]] = {}
    for rel, digest, _size in lines:
        if not digest.startswith("sha256=") or is_bytecode(rel):
            continue  # RECORD itself, a file the installer wrote (INSTALLER), bytecode
        path = os.path.join(inst.location, rel)
        st = stat_of(path)
        if st is None:
            bad.append(f"{rel} (missing)")
            continue
        if seen.get(rel) == list(st):
            ok[rel] = list(st)
            continue
        if record_hash(path) != digest:
            bad.append(f"{rel} (modified)")
        else:
            ok[rel] = list(st)
    if cfile is not None and ok != seen:
        write_cache(cfile, json.dumps({"record": record_id, "ok": ok}))
    return bad


def shadowing(installed: dict[str, Installed], site_dirs: list[str], names: Iterable[str]
              ) -> list[str]:
    """Top-level packages of these distributions that a site dir earlier on sys.path also
    holds: Python imports the earlier one (a torch/ in the venv hides the real torch)."""
    out: list[str] = []
    for name in names:
        inst = installed.get(name)
        if inst is None or inst.location not in site_dirs:
            continue
        tops = {p.split("/", 1)[0] for p in record_paths(inst) if not p.startswith("..")}
        tops = {t for t in tops if t and not t.endswith((".dist-info", ".egg-info", ".pth"))
                and t != "__pycache__"}
        for site in site_dirs[:site_dirs.index(inst.location)]:
            for top in sorted(tops):
                stem = top[:-3] if top.endswith(".py") else top
                for shadow in (stem, f"{stem}.py"):
                    if os.path.exists(os.path.join(site, shadow)):
                        out.append(f"{os.path.join(site, shadow)} hides {name}'s {top}")
    return out


def torch_file_problems(site_dirs: list[str], *, cache: Path | None = None) -> list[str]:
    """What is wrong with the files of torch, torchvision and torchaudio: each file checked
    against its RECORD hash, and no package of theirs hidden by an earlier site dir."""
    installed = read_installed(site_dirs)
    out: list[str] = []
    for name in TORCH_FAMILY:
        inst = installed.get(name)
        if inst is not None:
            out += [f"{name} {inst.version}: {p}" for p in record_problems(inst, cache=cache)]
    out += shadowing(installed, site_dirs, TORCH_FAMILY)
    return out
