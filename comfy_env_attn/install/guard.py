"""What a wheel would write, checked before anything is installed. Pure.

The wheel's own zip directory decides (not its RECORD, which it may fill with anything):
each entry is mapped to the path it would take in the target, and refused when that path
belongs to another installed distribution, when it lands inside a package another
distribution owns (torch/, sympy/, nvidia/cudnn/, ...), when it would hide or be hidden by
another's module or package of the same import name at any depth (six/ over six.py,
ns/mod/ over ns/mod.py in a namespace package, and the reverse), when a script or data file
would replace a file already there (bin/pip, bin/activate), when it is a .pth file (code run
at every start), or when it is not a plain relative path. Where the target's file system
folds case (Windows; macOS as it formats volumes), names are compared so: `Torch/` there is
torch's own folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import field

from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.installed import (
    Installed,
    Reach,
    could_own,
    is_whole_folder,
    module_key,
    real,
)
from comfy_env_attn.facts.installed import norm as norm  # guard.norm: the same one form

# Top-level names that several distributions legitimately share, packages inside included:
# flash-attn-4 adds flash_attn/cute/ inside flash-attn's flash_attn/. New files only:
# overwriting a file another one owns is refused like any other.
SHARED_TOPS: dict[str, frozenset[str]] = {
    "flash_attn": frozenset({"flash-attn", "flash-attn-4"}),
    # flash-attn-4's CUTLASS DSL comes in parts that add files to each other's packages
    # (libs-cu12 puts its compiled module in libs-base's cutlass/_mlir/_mlir_libs/)
    "nvidia_cutlass_dsl": frozenset({"nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base",
                                     "nvidia-cutlass-dsl-libs-core",
                                     "nvidia-cutlass-dsl-libs-cu12",
                                     "nvidia-cutlass-dsl-libs-cu13"}),
}

# .pth files a backend or a requirement of one is known to ship, by distribution, file name
# and exact text: Python runs a .pth's import lines at every start, so one is accepted only
# as it was read here. nvidia-cutlass-dsl (flash-attn-4 needs it) puts its dsl_packages
# folder first on sys.path.
KNOWN_PTH: dict[str, dict[str, str]] = {
    "nvidia-cutlass-dsl": {
        "nvidia_cutlass_dsl_packages.pth":
            "import sys, os, nvidia_cutlass_dsl; sys.path.insert(0, "
            "os.path.join(nvidia_cutlass_dsl.__path__[0], 'dsl_packages'))",
    },
}

# Modules Python imports by itself at every start (the site module), like a .pth file.
_STARTUP_MODULES = frozenset({"sitecustomize", "usercustomize"})

# Shared by every distribution that ships top-level modules: only exact files count.
_COMMON_TOPS = frozenset({"__pycache__"})

_DATA_KEYS = ("purelib", "platlib", "scripts", "data", "headers")


@dataclass(frozen=True)
class Layout:
    """Where a wheel's parts land in the target (absolute, normalised paths)."""

    site: str  # purelib
    scripts: str
    data: str  # the prefix
    headers: str  # include/site/pythonX.Y (the dist's own folder is added per wheel)
    platlib: str = ""  # where it differs from purelib (lib64 on some distributions)
    exe: str = ""  # what an entry-point script's file name ends with (".exe" on Windows)


@dataclass(frozen=True)
class Owners:
    """Who owns what in the target, from what the installed distributions list
    (facts.installed.record_paths: RECORD, or an .egg-info's installed-files.txt or
    top_level.txt)."""

    files: Mapping[str, str]  # absolute normalised path -> distribution
    # module files in any site dir by the name they are imported as, '/'-separated
    # ("six" for six.py, "ns/mod" for ns/mod.py or ns/mod.cpython-311-x86_64-linux-gnu.so;
    # bytecode in __pycache__ aside) -> distributions
    modules: Mapping[str, frozenset[str]]
    versions: Mapping[str, str] = field(default_factory=dict)  # distribution -> version
    # site folders ("a", "a/b", ...) -> the distributions with files in them, and the folders
    # that are regular packages (someone ships their __init__.py); the others are namespace
    # packages, which distributions share by design (nvidia/, nvidia_cutlass_dsl/)
    folders: Mapping[str, frozenset[str]] = field(default_factory=dict)
    packages: frozenset[str] = frozenset()
    # folders owned whole (absolute normalised path -> distribution): an .egg-info that
    # names its top-level packages but not their files
    wholes: Mapping[str, str] = field(default_factory=dict)
    # every path and name above lower-cased, and compared so (facts.locate.folds_case)
    fold: bool = False

    def key(self, path: str) -> str:
        """A path or name in the form this index keeps and compares it in."""
        return path.lower() if self.fold else path

    def describe(self, dist: str) -> str:
        v = self.versions.get(dist)
        return f"{dist} {v}" if v else dist

    def describe_all(self, dists: Iterable[str]) -> str:
        return ", ".join(self.describe(d) for d in sorted(dists))

    def whole_owner(self, dest: str) -> str | None:
        """The distribution owning a folder that holds this path as a whole, if any."""
        dest = self.key(dest)
        return next((d for f, d in self.wholes.items() if dest.startswith(f + os.sep)), None)

    def claim(self, dist: str, version: str, entries: Iterable[Entry]) -> Owners:
        """These owners plus the files of a wheel about to be installed in the same run (two
        wheels of one run may not overwrite each other either)."""
        files = dict(self.files)
        acc = _Acc(self, fold=self.fold)
        for e in entries:
            files.setdefault(self.key(e.dest), dist)
            if e.kind == "site":
                acc.add(dist, e.rel)
        return Owners(files, acc.modules_frozen(), {**self.versions, dist: version},
                      acc.folders_frozen(), frozenset(acc.packages), self.wholes, self.fold)


# What a module file's name ends with (module_key): only such a file can be imported.
_MODULE_ENDS = (".py", ".pyc", ".so", ".pyd")


class _Acc:
    """Modules, folders and packages being collected (build_owners, Owners.claim)."""

    def __init__(self, base: Owners | None = None, *, fold: bool = False) -> None:
        self.fold = fold
        self.modules = {k: set(v) for k, v in (base.modules if base else {}).items()}
        self.folders = {k: set(v) for k, v in (base.folders if base else {}).items()}
        self.packages = set(base.packages if base else ())

    def add(self, dist: str, rel: str) -> None:
        if self.fold:
            rel = rel.lower()
        parts = rel.split("/")
        top = parts[0]
        if not top or top in ("..", ".") or top.endswith(".pth"):
            return
        leaf = parts[-1]
        if leaf.endswith(_MODULE_ENDS) and (len(parts) < 2 or parts[-2] != "__pycache__"):
            key = module_key(leaf)
            if key != leaf:
                self.modules.setdefault(rel[:len(rel) - len(leaf)] + key, set()).add(dist)
        for d in range(1, len(parts)):  # every folder holding the file
            self.folders.setdefault("/".join(parts[:d]), set()).add(dist)
        # a folder owned whole ("legacy/": its files are not known) counts as a package:
        # nothing may be added to it
        if len(parts) >= 2 and parts[-1] in ("__init__.py", ""):
            self.packages.add("/".join(parts[:-1]))

    def modules_frozen(self) -> dict[str, frozenset[str]]:
        return {k: frozenset(v) for k, v in self.modules.items()}

    def folders_frozen(self) -> dict[str, frozenset[str]]:
        return {k: frozenset(v) for k, v in self.folders.items()}


def build_owners(records: Iterable[tuple[str, str, str, Iterable[str]]], *,
                 fold: bool = False) -> Owners:
    """Owners from (distribution, version, site dir, paths relative to the site dir as
    facts.installed.record_paths gives them: '/'-separated and normalised; one ending in
    '/' is a folder owned whole, whose files are not known). `fold`: the target's file
    system compares names case-insensitively (facts.locate.folds_case)."""
    key = str.lower if fold else str
    files: dict[str, str] = {}
    acc = _Acc(fold=fold)
    versions: dict[str, str] = {}
    wholes: dict[str, str] = {}
    for dist, version, site, paths in records:
        versions.setdefault(dist, version)
        base = norm(site) + os.sep
        for rel in paths:
            acc.add(dist, rel)
            if is_whole_folder(rel):
                wholes.setdefault(key(norm(os.path.join(site, rel))), dist)
                continue
            # most RECORD paths are already plain: join them without normpath (70,000 of
            # them in an environment with torch; this was most of an install's own time)
            files.setdefault(key(base + rel if _is_plain(rel)
                                 else norm(os.path.join(site, rel))), dist)
    return Owners(files, acc.modules_frozen(), versions, acc.folders_frozen(),
                  frozenset(acc.packages), wholes, fold)


def tokens(entries: Iterable[Entry]) -> set[str]:
    """Strings that whatever lists one of these destinations as a distribution's (its
    RECORD; an .egg-info's installed-files.txt or top_level.txt) must contain: the
    importable name of each top-level site entry, the file name of each other entry. Which
    installed distributions could own something the wheel writes is decided from these
    (facts.installed.mentions) without reading every RECORD in full."""
    out: set[str] = set()
    for e in entries:
        if e.kind == "site":
            out.add(module_key(e.rel.split("/", 1)[0]))
        else:
            out.add(e.rel.rsplit("/", 1)[-1])
    return out


def candidates(installed: Iterable[Installed], entries: list[Entry], fold: bool
               ) -> list[Installed]:
    """The installed distributions that could own, hide or be hidden by one of these
    destinations (facts.installed.could_own): the only ones whose RECORDs build_owners needs
    for problems() to answer as it would from all of them."""
    toks = {t.lower() if fold else t for t in tokens(entries)}
    reach = Reach(frozenset(module_key(e.rel.split("/", 1)[0]) for e in entries
                            if e.kind == "site"),
                  frozenset(e.dest for e in entries), fold)
    return [i for i in installed if could_own(i, reach, toks)]


def _is_plain(rel: str) -> bool:
    """Whether normpath would leave site + "/" + rel as it is (POSIX; on Windows normcase
    changes every path)."""
    return os.name != "nt" and bool(rel) and not rel.startswith(("/", "./", "../")) \
        and rel not in (".", "..") and "//" not in rel \
        and "/./" not in rel and "/../" not in rel and not rel.endswith(("/", "/.", "/.."))


@dataclass(frozen=True)
class Entry:
    """One file a wheel would write, and where in the target it would go."""
    name: str  # as listed in the zip
    dest: str  # absolute normalised path in the target
    kind: str  # "site", "scripts", "data" or "headers"
    rel: str  # relative to the site dir (site entries) or to the kind's folder


_BAD_PART = re.compile(r"^\.\.?$")


def _plain(name: str) -> str | None:
    """Why a zip entry is not a plain relative path, or None."""
    if "\\" in name or "\x00" in name:
        return "has a backslash or NUL in its name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if any(_BAD_PART.match(p) for p in name.split("/")):
        return "has a '.' or '..' component"
    return None


def destinations(wheel: str, dist_dir: str, names: Iterable[str], layout: Layout,
                 *, dist: str, purelib: bool = True) -> tuple[list[Entry], list[str]]:
    """Where each file of the wheel goes, and the entries refused outright.

    `dist_dir` is the wheel's "<name>-<version>" prefix of its .dist-info and .data;
    `purelib` its WHEEL's Root-Is-Purelib."""
    entries: list[Entry] = []
    refused: list[str] = []
    data_dir = f"{dist_dir}.data/"
    plat = layout.platlib or layout.site
    root = layout.site if purelib else plat
    for name in names:
        if name.endswith("/"):
            continue  # a folder entry: nothing is written for it
        why = _plain(name)
        if why:
            refused.append(f"{wheel}: the entry {name!r} {why}")
            continue
        if not name.startswith(data_dir):
            entries.append(Entry(name, norm(os.path.join(root, name)), "site", name))
            continue
        key, _, rest = name[len(data_dir):].partition("/")
        if key not in _DATA_KEYS or not rest:
            refused.append(f"{wheel}: {name} is in an unknown .data folder")
        elif key in ("purelib", "platlib"):
            base = layout.site if key == "purelib" else plat
            entries.append(Entry(name, norm(os.path.join(base, rest)), "site", rest))
        else:
            base = {"scripts": layout.scripts, "data": layout.data,
                    "headers": os.path.join(layout.headers, dist)}[key]
            dest = norm(os.path.join(base, rest))
            # a data file that lands in site-packages is a site file, with the site rules;
            # also through a link on its way there (a venv's lib64 -> lib)
            rel = _within(dest, (layout.site, plat))
            if rel is not None:
                entries.append(Entry(name, norm(os.path.join(rel[0], rel[1])), "site",
                                     rel[1].replace(os.sep, "/")))
            else:
                entries.append(Entry(name, dest, key, rest))
    return entries, refused


def _within(dest: str, dirs: tuple[str, ...]) -> tuple[str, str] | None:
    """(the folder of `dirs` that `dest` lands in, the path below it), as written or once
    the links on the way are followed (the folders that exist: a layout of another machine
    has none); None when it lands in none of them."""
    for d in dirs:
        if dest.startswith(d + os.sep):
            return d, dest[len(d) + 1:]
    followed = real(dest)
    for d in dirs:
        rd = real(d)
        if followed.startswith(rd + os.sep):
            return d, followed[len(rd) + 1:]
    return None


def script_entries(wheel: str, dist_dir: str, entry_points: str, layout: Layout
                   ) -> tuple[list[Entry], list[str]]:
    """The launchers an installer writes into the scripts folder for the wheel's
    console_scripts and gui_scripts (entry_points.txt): files it writes although the zip
    does not list them (a script named pip would replace bin/pip)."""
    if not entry_points.strip():
        return [], []
    import configparser  # only for a wheel that has entry points

    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    source = f"{dist_dir}.dist-info/entry_points.txt"
    try:
        parser.read_string(entry_points, source=source)
    except configparser.Error as e:
        return [], [f"{wheel}: {source} cannot be read ({str(e).splitlines()[0]})"]
    entries: list[Entry] = []
    refused: list[str] = []
    for group in ("console_scripts", "gui_scripts"):
        if not parser.has_section(group):
            continue
        for script in parser.options(group):
            name = f"{source} [{group}] {script}"
            if not script or _plain(script) or "/" in script:
                refused.append(f"{wheel}: the script {script!r} in {source} is not a plain "
                               "file name")
                continue
            entries.append(Entry(name, norm(os.path.join(layout.scripts, script + layout.exe)),
                                 "scripts", script + layout.exe))
    return entries, refused


def problems(wheel: str, dist: str, dist_dir: str, entries: Iterable[Entry], owners: Owners,
             existing: Iterable[str], *, replacing: Iterable[str] = (),
             pth: Mapping[str, str] | None = None) -> list[str]:
    """Every reason this wheel may not be installed, each naming the wheel, the path and
    its owner. `dist` is the wheel's distribution (canonical); `replacing` the
    distributions it may overwrite (itself, always); `existing` the destinations that are
    already files in the target; `pth` the text of each .pth entry (by entry name)."""
    pth = pth or {}
    entries = list(entries)
    k = owners.key  # names as the owners keep them: lower-cased where case does not count
    own_packages = {k(e.rel).rsplit("/", 1)[0] for e in entries
                    if e.kind == "site" and k(e.rel).endswith("/__init__.py")}
    own_sources = {k(e.rel) for e in entries if e.kind == "site" and k(e.rel).endswith(".py")}
    mine = {dist, *replacing}
    there = {k(p) for p in existing}
    out: list[str] = []
    refused: set[str] = set()  # folders (and files) already refused: one line for each
    for e in entries:
        owner = owners.files.get(k(e.dest))
        if owner is None and k(e.dest) in there:
            owner = owners.whole_owner(e.dest)
        if owner is not None and owner not in mine:
            out.append(f"{wheel}: {e.name} would overwrite {e.dest}, which belongs to "
                       f"{owners.describe(owner)}")
            continue
        if owner is None and k(e.dest) in there:
            where = "" if e.kind == "site" else " (part of the environment)"
            out.append(f"{wheel}: {e.name} would replace {e.dest}, which is already there "
                       f"and belongs to no distribution{where}")
            continue
        if e.kind != "site":
            continue
        rel = k(e.rel)
        top = rel.split("/", 1)[0]
        if top == rel and module_key(top) in _STARTUP_MODULES:
            out.append(f"{wheel}: {e.name} is {module_key(top)}, run at every start of Python")
            continue
        if top == rel and top.endswith(".pth"):
            known = KNOWN_PTH.get(dist, {}).get(top)
            if known is None:
                out.append(f"{wheel}: {e.name} is a .pth file, run at every start of Python; "
                           f"{dist} is not known to ship one")
            elif pth.get(e.name, "").strip() != known:
                out.append(f"{wheel}: {e.name} is a .pth file, run at every start of Python, "
                           f"and its text is not the one {dist} is known to ship")
            continue
        if top.endswith((".dist-info", ".egg-info")) and top != k(f"{dist_dir}.dist-info"):
            out.append(f"{wheel}: {e.name} is metadata of another distribution ({top})")
            continue
        source = _bytecode_source(rel)
        if source is not None and source not in own_sources:
            out.append(f"{wheel}: {e.name} is bytecode of {source}, which it does not ship: "
                       "Python could run it in place of that module")
            continue
        if top in _COMMON_TOPS:
            continue
        parts = rel.split("/")
        if refused and any("/".join(parts[:d]) in refused for d in range(1, len(parts) + 1)):
            continue
        shared = SHARED_TOPS.get(module_key(top))
        if shared and dist in shared and _named(owners, module_key(top)) - mine <= shared:
            # a family that shares its packages, and import names, by design: flash-attn-4's
            # libs-cu12 puts _cutlass_ir.cu12.*.so beside libs-base's _cutlass_ir/ package
            continue
        found = _in_the_way(parts, owners, mine, own_packages)
        if found is not None:
            where, why = found
            out.append(f"{wheel}: {e.name} {why}")
            refused.add(where)
    return out


def _bytecode_source(rel: str) -> str | None:
    """The module file a `__pycache__/<name>.<tag>[.opt-N].pyc` is the bytecode of
    ('a/__pycache__/b.cpython-311.pyc' -> 'a/b.py'), None for any other path. Python runs
    such bytecode instead of that source when it is newer, or unchecked (PEP 552): a wheel
    may ship it only beside its own source."""
    parts = rel.split("/")
    if len(parts) < 2 or parts[-2] != "__pycache__" or not parts[-1].endswith(".pyc"):
        return None
    return "/".join([*parts[:-2], parts[-1].split(".", 1)[0] + ".py"])


def _named(owners: Owners, name: str) -> frozenset[str]:
    """The distributions with something imported as this name ('/'-separated): a folder of
    it (a package, or a namespace portion) or a module file."""
    return owners.folders.get(name, frozenset()) | owners.modules.get(name, frozenset())


def _in_the_way(parts: list[str], owners: Owners, mine: set[str], own_packages: set[str]
                ) -> tuple[str, str] | None:
    """(where, why) a site file of the wheel (its path's parts) may not go in, walking from
    the top folder down, or None. At each step, a name of other distributions: a folder
    would hide their module of its name (a package is imported before a module, a/b/c/
    over a/b/c.py), a module file would take the import name of their package, namespace
    folder or other module (a/b/c.py beside a/b/c/ or a/b/c.*.so). Then a folder they have
    files in that is a regular package (an __init__.py, theirs or this wheel's) may not be
    gone into; the walk ends at a folder nobody else is in (the rest is this wheel's own).
    Namespace packages are shared by design: new files only, overwriting is refused file by
    file."""
    path = ""
    for d, name in enumerate(parts, 1):
        parent, path = path, f"{path}/{name}" if path else name
        key = module_key(name)
        if key != name:  # a module file (or a folder named like one)
            named = f"{parent}/{key}" if parent else key
            who = _named(owners, named) - mine
            if who:
                return path, (f"would be imported as {named.replace('/', '.')}, which "
                              f"belongs to {owners.describe_all(who)}")
        elif d < len(parts):
            who = owners.modules.get(path, frozenset()) - mine
            if who:  # theirs is a module file (foo.py, foo.*.so): a foo/ folder hides it
                return path, (f"would make {path}/ a package that hides the module "
                              f"{path.replace('/', '.')} of {owners.describe_all(who)}")
        if d == len(parts):
            return None
        others = owners.folders.get(path, frozenset()) - mine
        if not others:
            return None  # nobody else is in here: the rest is this wheel's own
        if path in owners.packages or path in own_packages:
            return path, f"would go into {path}, which belongs to {owners.describe_all(others)}"
    return None
