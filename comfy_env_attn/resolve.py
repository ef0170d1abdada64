"""Decide which wheel fits a System: a pure function of (System, candidates, request).

Every candidate passed over carries all its reasons, each naming both sides
("built for torch 2.8, target has torch 2.9.1"). The rules are FACTS.md section 4.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field, replace
from functools import lru_cache
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.version import InvalidVersion, Version

from comfy_env_attn.candidates.sources import Candidate, project_of
from comfy_env_attn.candidates.wheelname import (
    InvalidWheelName,
    Label,
    WheelName,
    bounded_version,
    parse_wheel_name,
)
from comfy_env_attn.core.backends import BACKENDS, BY_DIST, Backend, normalize_dist, primaries
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.system import DRIVER_MIN, System, cc_tuple, driver_short_of

PLAN_SCHEMA = 1

@dataclass(frozen=True)
class Reason:
    """Why a candidate was rejected or ranked lower, with the kind of rule."""
    kind: str  # filename, python, platform, torch, cuda, driver, cxx11abi, gpu, yanked, label,
    #            pin, ranked
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Pin:
    """The versions a request allows for one backend, e.g. from comfy-env.toml."""

    specifier: str  # PEP 440 specifiers: ">=2.2", "==2.8.3"; "" for any version
    written: str  # as the user wrote it, for messages: "sageattention>=2.2 (comfy-env.toml)"

    def reason(self, w: WheelName) -> Reason | None:
        """Why this wheel's version is not allowed, or None."""
        if not self.specifier:
            return None
        version = bounded_version(w.raw_version) or w.version
        try:
            ok = SpecifierSet(self.specifier).contains(version, prereleases=True)
        except InvalidSpecifier:
            return None
        return None if ok else Reason("pin", f"version {w.raw_version} does not satisfy "
                                             f"{self.written}")


@dataclass(frozen=True)
class Rejected:
    """A candidate the resolver turned down, with every reason."""
    candidate: Candidate
    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class BackendPlan:
    """What the resolver chose for one backend, what it rejected, and notes."""
    backend: str
    package: str
    selected: Candidate | None
    rejected: tuple[Rejected, ...] = ()
    reason: str | None = None
    notes: tuple[str, ...] = ()
    builtin: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, "package": self.package or "torch"}
        if self.builtin:
            out["selected"] = {"builtin": True, "filename": None, "url": None, "sha256": None,
                               "source": "torch"}
        elif self.selected is not None:
            out["selected"] = self.selected.to_json()
        else:
            out["selected"] = None
        out["rejected"] = [{"filename": r.candidate.filename, "source": r.candidate.source,
                            "reasons": [x.text for x in r.reasons],
                            "kinds": sorted({x.kind for x in r.reasons})}
                           for r in self.rejected]
        if self.reason:
            out["reason"] = self.reason
        if self.notes:
            out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True)
class Plan:
    """The resolver's answer for a System: one BackendPlan per backend."""
    system: System
    backends: tuple[BackendPlan, ...]
    warnings: tuple[str, ...] = field(default=())

    def get(self, backend: str) -> BackendPlan | None:
        return next((b for b in self.backends if b.backend == backend), None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": PLAN_SCHEMA, "system": self.system.to_dict(),
                               "backends": [b.to_json() for b in self.backends]}
        if self.system.absent:
            out["absent"] = dict(self.system.absent)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


# -- the target's wheel tags --------------------------------------------------------------

def _platforms(system: System) -> list[str]:
    arch = system.arch
    if system.platform == "windows":
        return ["win_arm64" if arch == "aarch64" else "win_amd64"]
    if system.platform == "macos":
        mac_arch = "arm64" if arch == "aarch64" else "x86_64"
        out = []
        for major in range(15, 10, -1):
            out += [f"macosx_{major}_0_{mac_arch}", f"macosx_{major}_0_universal2"]
        for minor in range(16, 8, -1):
            out += [f"macosx_10_{minor}_{mac_arch}", f"macosx_10_{minor}_universal2"]
        return out
    out = []
    glibc = _glibc(system)
    top = glibc[1] if glibc else 99  # unknown glibc: do not filter on it
    for minor in range(top, 4, -1):
        out.append(f"manylinux_2_{minor}_{arch}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
        if legacy and arch in ("x86_64", "aarch64", "i686"):
            out.append(f"{legacy}_{arch}")
    out.append(f"linux_{arch}")
    return out


def _glibc(system: System) -> tuple[int, int] | None:
    if not system.glibc:
        return None
    m = re.match(r"^(\d+)\.(\d+)", system.glibc)
    return None if m is None else (int(m[1]), int(m[2]))


@dataclass(frozen=True)
class TargetTags:
    """The wheel tags a target accepts, ranked, as pip ranks them."""
    ranks: dict[Tag, int]  # tag -> rank, lower is better
    interp_abis: frozenset[tuple[str, str]]
    platforms: frozenset[str]


@lru_cache(maxsize=32)
def _target_tags(python: tuple[int, int], free_threaded: bool, platform: str, arch: str,
                 glibc: str | None) -> TargetTags:
    platforms = _platforms(System(python="3", platform=platform, arch=arch, glibc=glibc))
    abi = f"cp{python[0]}{python[1]}{'t' if free_threaded else ''}"
    tags = list(cpython_tags(python, [abi], list(platforms)))
    tags += list(compatible_tags(python, f"cp{python[0]}{python[1]}", list(platforms)))
    ranks: dict[Tag, int] = {}
    for i, t in enumerate(tags):
        ranks.setdefault(t, i)
    return TargetTags(ranks, frozenset((t.interpreter, t.abi) for t in ranks),
                      frozenset(t.platform for t in ranks))


def target_tags(system: System) -> TargetTags:
    """The target interpreter's wheel tags, ranked."""
    return _target_tags(system.python_tuple, system.free_threaded, system.platform, system.arch,
                        system.glibc)


# -- the checks ---------------------------------------------------------------------------

def _describe_platform(plat: str) -> str:
    if plat == "any":
        return "any platform"
    if plat.startswith("win"):
        return f"windows {plat.split('_', 1)[1]}"
    if plat.startswith("macosx"):
        return f"macos {plat.rsplit('_', 1)[-1]}"
    m = re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", plat)
    if m:
        return f"linux {m[3]} with glibc >= {m[1]}.{m[2]}"
    legacy = {"manylinux2014": "2.17", "manylinux2010": "2.12", "manylinux1": "2.5"}
    for k, v in legacy.items():
        if plat.startswith(k + "_"):
            return f"linux {plat[len(k) + 1:]} with glibc >= {v}"
    if plat.startswith("linux_"):
        return f"linux {plat[6:]}"
    return plat


def _plat_os_arch(plat: str) -> tuple[str, str]:
    d = _describe_platform(plat).split(" with ")[0].split(" ")
    arch = d[1] if len(d) > 1 else ""
    return d[0], {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def _check_tags(w: WheelName | _Tags, system: System) -> tuple[list[Reason], int]:
    reasons, rank = _check_tagset(w.tags, system)
    return list(reasons), rank


@lru_cache(maxsize=512)
def _check_tagset(tags: frozenset[Tag], system: System) -> tuple[tuple[Reason, ...], int]:
    """Cached: thousands of wheels share a few dozen tag sets."""
    w = _Tags(tags, "-".join(sorted(str(t) for t in tags)))
    tt = target_tags(system)
    fits = [tt.ranks[t] for t in w.tags if t in tt.ranks]
    if fits:
        return (), min(fits)
    reasons: list[Reason] = []
    interp_abis = tt.interp_abis
    plats = tt.platforms
    wheel_ia = sorted({f"{t.interpreter}-{t.abi}" for t in w.tags})
    target_py = f"Python {system.python}" + (" (free-threaded)" if system.free_threaded else "")
    if not any((t.interpreter, t.abi) in interp_abis for t in w.tags):
        if any(t.abi.endswith("t") and t.abi.startswith("cp") for t in w.tags) and \
                not system.free_threaded:
            what = "a free-threaded CPython"
        else:
            what = "CPython " + ", ".join(_py_of(ia) for ia in wheel_ia)
        reasons.append(Reason("python", f"built for {what} ({', '.join(wheel_ia)}); "
                                        f"target is {target_py}"))
    wheel_plats = sorted({t.platform for t in w.tags})
    if not any(p in plats for p in wheel_plats):
        target_os = f"{system.platform} {system.arch}"
        same_os_arch = [p for p in wheel_plats
                        if _plat_os_arch(p) == (system.platform, system.arch)]
        if same_os_arch and system.platform == "linux":
            need = min(_describe_platform(p).split(">= ")[-1] for p in same_os_arch)
            reasons.append(Reason("platform", f"needs glibc >= {need} "
                                              f"({'.'.join(same_os_arch)}); target has glibc "
                                              f"{system.glibc}"))
        else:
            built = "; ".join(sorted({_describe_platform(p).split(" with ")[0]
                                      for p in wheel_plats}))
            reasons.append(Reason("platform", f"built for {built} ({'.'.join(wheel_plats)}); "
                                              f"target is {target_os}"))
    if not reasons:
        reasons.append(Reason("python", f"no tag of {w.filename} fits {target_py} on "
                                        f"{system.platform} {system.arch}"))
    return tuple(reasons), 1 << 30


@dataclass(frozen=True)
class _Tags:
    """The parts of a wheel name the rules read."""

    tags: frozenset[Tag]
    filename: str
    label: Label | None = None
    local: str = ""


def _py_of(interp_abi: str) -> str:
    interp = interp_abi.split("-")[0]
    m = re.match(r"^(?:cp|py)(\d)(\d*)$", interp)
    if not m:
        return interp
    ver = f"{m[1]}.{m[2]}" if m[2] else m[1]
    return ver + ("+" if "abi3" in interp_abi else "")


def _wheel_cuda(w: WheelName | _Tags, c: Candidate) -> tuple[int, int | None] | None:
    if w.label is not None and w.label.cuda_version is not None:
        return w.label.cuda_version
    if c.cuda:
        m = re.match(r"^(\d+)(?:\.(\d+))?", c.cuda)
        if m:
            return int(m[1]), None if m[2] is None else int(m[2])
    return None


def _fmt_cuda(v: tuple[int, int | None]) -> str:
    return f"{v[0]}.{v[1]}" if v[1] is not None else f"{v[0]}.x"


def _minor_of(text: str) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", text)
    return None if m is None else (int(m[1]), int(m[2]))


def _sm_runs(entry: str, cc: tuple[int, int]) -> bool:
    """Whether code compiled for one TORCH_CUDA_ARCH_LIST entry runs on a GPU of cc."""
    ptx = entry.endswith("+PTX")
    base = entry.removesuffix("+PTX")
    arch_specific = base.endswith(("a", "f"))
    e = cc_tuple(base)
    if e == cc:
        return True
    if arch_specific:
        # sm_90a runs on 9.0 only; sm_100f on the 10.x family.
        return base.endswith("f") and e[0] == cc[0] and e[1] <= cc[1]
    if ptx and e <= cc:
        return True
    return e[0] == cc[0] and e[1] <= cc[1]


def check(c: Candidate, w: WheelName, system: System, backend: Backend) -> tuple[list[Reason], int]:
    """All the reasons a parsed candidate does not fit, and its tag rank."""
    key = _CheckKey(w.tags, w.local, w.label, c.yanked, c.requires_python, c.requires_torch,
                    c.cuda, c.built_torch, c.sm)
    reasons, rank = _check_cached(key, system, backend)
    return list(reasons), rank


@dataclass(frozen=True)
class _CheckKey:
    """What the rules read: thousands of wheels share a few hundred of these."""

    tags: frozenset[Tag]
    local: str
    label: Label | None
    yanked: str | None
    requires_python: str | None
    requires_torch: str | None
    cuda: str | None
    built_torch: str | None
    sm: tuple[str, ...] | None


@lru_cache(maxsize=4096)
def _check_cached(k: _CheckKey, system: System, backend: Backend
                  ) -> tuple[tuple[Reason, ...], int]:
    c = Candidate(filename="", url="", source="", yanked=k.yanked,
                  requires_python=k.requires_python, requires_torch=k.requires_torch,
                  cuda=k.cuda, built_torch=k.built_torch, sm=k.sm)
    w = _Tags(k.tags, "", k.label, k.local)
    reasons, rank = _check_tags(w, system)
    if c.yanked:
        reasons.append(Reason("yanked", f"yanked from its index: {c.yanked}"))
    if c.requires_python:
        try:
            if not SpecifierSet(c.requires_python).contains(system.python, prereleases=True):
                reasons.append(Reason("python", f"requires Python {c.requires_python}; target "
                                                f"is Python {system.python}"))
        except InvalidSpecifier:
            pass
    label = w.label
    target_torch = system.torch_minor
    torch_desc = f"torch {system.torch}" if system.torch else "no torch installed"
    # torch: compiled against libtorch -> same major.minor (or >= for stable-ABI builds)
    if label is not None and label.torch_minor is not None:
        want = label.torch_minor
        if target_torch is None:
            reasons.append(Reason("torch", f"built for torch {label.torch}; target has no torch "
                                           f"installed"))
        elif label.andhigher:
            if target_torch < want:
                reasons.append(Reason("torch", f"built for torch >= {want[0]}.{want[1]} (stable "
                                               f"ABI), target has {torch_desc}"))
        elif target_torch != want:
            reasons.append(Reason("torch", f"built for torch {want[0]}.{want[1]}, target has "
                                           f"{torch_desc}"))
    elif backend.needs_torch_abi and c.built_torch and target_torch is not None and \
            not (c.requires_torch and c.requires_torch.lstrip().startswith(">")):
        # No label, but the build records its torch: a libtorch build needs that minor.
        built = _minor_of(c.built_torch)
        if built is not None and built != target_torch:
            reasons.append(Reason("torch", f"built against torch {c.built_torch} (recorded in "
                                           f"the wheel), target has {torch_desc}"))
    if w.local and label is None:
        reasons.append(Reason("label", f"local version label {w.local!r} follows no known "
                                       f"convention: its torch and CUDA are unknown"))
    if c.requires_torch:
        try:
            spec = SpecifierSet(c.requires_torch)
            if system.torch is None:
                reasons.append(Reason("torch", f"requires torch{c.requires_torch} (its "
                                               f"metadata); target has no torch installed"))
            elif not spec.contains(Version(system.torch_public or "0"), prereleases=True):
                reasons.append(Reason("torch", f"requires torch{c.requires_torch} (its "
                                               f"metadata), target has {torch_desc}: installing "
                                               f"it would replace torch"))
        except (InvalidSpecifier, InvalidVersion):
            pass
    # CUDA
    wcuda = _wheel_cuda(w, c)
    tcuda = system.torch_cuda_tuple
    needs_cuda = backend.min_sm is not None
    if wcuda is not None or needs_cuda:
        if system.torch is not None and tcuda is None:
            what = f"built for CUDA {_fmt_cuda(wcuda)}" if wcuda else "needs a CUDA build of torch"
            reasons.append(Reason("cuda", f"{what}; target's torch {system.torch} is a CPU build "
                                          f"(torch.version.cuda is None)"))
        elif wcuda is not None and tcuda is not None:
            if wcuda[0] != tcuda[0]:
                reasons.append(Reason("cuda", f"built for CUDA {_fmt_cuda(wcuda)}, target's torch "
                                              f"uses CUDA {system.torch_cuda}"))
            elif wcuda[1] is not None and wcuda[1] > tcuda[1]:
                reasons.append(Reason("cuda", f"built for CUDA {_fmt_cuda(wcuda)}, newer than "
                                              f"target torch's CUDA {system.torch_cuda}"))
    if backend.min_cuda is not None:
        have: tuple[int, int | None] | None = wcuda or tcuda
        if have is not None and (have[0], have[1] or 0) < backend.min_cuda and \
                (have[1] is not None):
            need = f"{backend.min_cuda[0]}.{backend.min_cuda[1]}"
            reasons.append(Reason("cuda", f"{backend.title} needs CUDA >= {need}; this build "
                                          f"uses CUDA {_fmt_cuda(have)}"))
    major = wcuda[0] if wcuda else (tcuda[0] if tcuda else None)
    if major is not None and needs_cuda:
        dcuda = system.driver_cuda_tuple
        floor = DRIVER_MIN.get((major, system.platform))
        if dcuda is not None and dcuda[0] < major:
            reasons.append(Reason("driver", f"needs a driver for CUDA {major}.x"
                                            f"{f' (>= {floor})' if floor else ''}; driver "
                                            f"{system.driver or '?'} supports CUDA "
                                            f"{system.driver_cuda}"))
        elif system.driver and driver_short_of(system.driver, major, system.platform):
            reasons.append(Reason("driver", f"CUDA {major}.x needs driver >= {floor}; target has "
                                            f"driver {system.driver}"))
    # cxx11 ABI
    if label is not None and label.cxx11abi is not None and system.cxx11abi is not None and \
            label.cxx11abi != system.cxx11abi:
        reasons.append(Reason("cxx11abi", f"built with cxx11abi={str(label.cxx11abi).upper()}, "
                                          f"target torch has cxx11abi="
                                          f"{str(system.cxx11abi).upper()}"))
    # GPU
    reasons += gpu_reasons(backend, system, c.sm)
    return tuple(reasons), rank


def gpu_reasons(backend: Backend, system: System, sm: Sequence[str] | None) -> list[Reason]:
    if backend.min_sm is None:
        return []
    if not system.gpus:  # why none is seen (system.absent) is said once, by the caller
        return [Reason("gpu", f"{backend.title} needs an NVIDIA GPU; target has none")]
    out: list[Reason] = []
    for g in system.gpus:
        cc = cc_tuple(g)
        if not backend.runs_on_sm(cc):
            out.append(Reason("gpu", f"{backend.title} has no kernels for sm {g} "
                                     f"({backend.support_text()}); target GPU is sm {g}"))
        elif sm is not None and not any(_sm_runs(e, cc) for e in sm):
            out.append(Reason("gpu", f"compiled for sm {', '.join(sm)}; target GPU sm {g} is "
                                     f"not among them (\"no kernel image is available\")"))
    return out


# What each place of _sort_key's key says of the wheel that ranks higher, in its order
_RANK_WHY = ("it was seen in a listing (this one's name was made from a pattern)",
             "a final release", "a newer version", "a closer CUDA minor",
             "built for this exact torch", "a later post build",
             "a more specific platform tag", "its source publishes its hash")


def _sort_key(c: Candidate, w: WheelName, rank: int, system: System) -> tuple[Any, ...]:
    wcuda = _wheel_cuda(w, c)
    cuda_minor = -1 if wcuda is None or wcuda[1] is None else wcuda[1]
    exact_torch = 1 if (w.label is not None and w.label.torch and not w.label.andhigher) else 0
    post = w.label.post if w.label is not None and w.label.post is not None else 0
    # a wheel seen in a listing before one whose name was generated from a pattern; a final
    # release before any pre-release or dev build, as pip and uv choose
    return (c.generated is None, not w.version.is_prerelease, w.version, cuda_minor,
            exact_torch, post, -rank, c.sha256 is not None)


_FACTS = ("requires_torch", "cuda", "built_torch", "sm", "requires_python")


def merge_facts(first: Candidate, other: Candidate) -> Candidate:
    """first, with the build facts it lacks taken from another listing of the same file
    (only when their hashes do not contradict each other: then they are not the same file)."""
    if first.sha256 and other.sha256 and first.sha256.lower() != other.sha256.lower():
        return first
    fill = {f: getattr(other, f) for f in _FACTS
            if getattr(first, f) is None and getattr(other, f) is not None}
    if not first.sha256 and other.sha256:
        fill["sha256"] = other.sha256
    if first.generated and not other.generated:
        fill["generated"] = None  # a listing has it: observed after all
    return replace(first, **fill) if fill else first


def resolve(system: System, candidates: Iterable[Candidate],
            backends: Sequence[str], *, pins: Mapping[str, Pin] | None = None) -> Plan:
    """The Plan: for each requested backend the best fitting wheel and why the others lost,
    one row per distribution (a variant, such as sage_fp16, is its primary's row);
    `pins` (backend -> Pin) narrows the versions a backend may have."""
    by_file: dict[str, Candidate] = {}
    for c in candidates:
        first = by_file.get(c.filename)
        # the same file from a second source: the first source's URL wins, and what the
        # other source knows about the build (its torch, CUDA, SM archs) is kept
        by_file[c.filename] = c if first is None else merge_facts(first, c)
    by_project: dict[str, list[Candidate]] = {}
    for c in by_file.values():
        by_project.setdefault(project_of(c.filename), []).append(c)
    plans = [BackendPlan("sdpa", "", None, builtin=True,
                         reason=None if system.torch else "torch is not installed in the target")]
    warnings: list[str] = []
    for name in primaries(backends):  # a variant: its package's row
        if name == "sdpa":
            continue
        backend = BACKENDS[name]
        pin = (pins or {}).get(name)
        rejected: list[Rejected] = []
        fitting: list[tuple[tuple[Any, ...], Candidate, WheelName]] = []
        for c in by_project.get(normalize_dist(backend.dist), []):
            try:
                w = parse_wheel_name(c.filename)
            except InvalidWheelName as e:
                rejected.append(Rejected(c, (Reason("filename", str(e)),)))
                continue
            reasons, rank = check(c, w, system, backend)
            pinned = pin.reason(w) if pin is not None else None
            if pinned is not None:
                reasons.append(pinned)
            if reasons:
                rejected.append(Rejected(c, tuple(reasons)))
            else:
                fitting.append((_sort_key(c, w, rank, system), c, w))
        fitting.sort(key=lambda t: t[0], reverse=True)
        notes: list[str] = []
        selected = fitting[0][1] if fitting else None
        for key, c, _w in fitting[1:]:
            assert selected is not None
            why = next((w for w, a, b in zip(_RANK_WHY, fitting[0][0], key, strict=True)
                        if a != b), "listed first")
            rejected.append(Rejected(c, (Reason(
                "ranked", f"fits, but {selected.filename} ranks higher: {why}"),)))
        if selected is not None and selected.built_torch and system.torch_minor and \
                selected.built_torch.split("+")[0].rsplit(".", 1)[0] != \
                f"{system.torch_minor[0]}.{system.torch_minor[1]}":
            notes.append(f"{selected.filename} was built against torch {selected.built_torch}; "
                         f"target has torch {system.torch}: verification decides whether it works")
        if selected is not None and selected.sha256 is None:
            how = "as it downloads" if selected.url.startswith(("http:", "https:")) else \
                "from its file"
            notes.append(f"its source publishes no sha256: it is hashed {how} and that hash "
                         "is locked")
        if selected is not None and selected.generated:
            notes.append(f"{selected.filename} was not seen in a listing: its name comes from "
                         f"{selected.generated}")
        if selected is not None:
            older = older_line_note(system, backend, fitting[0][2], rejected)
            if older:
                notes.append(older)
        reason = None if selected else _nothing_fits(system, backend, rejected, pin)
        plans.append(BackendPlan(name, backend.dist, selected, tuple(rejected), reason,
                                 tuple(notes)))
    chosen = {p.backend for p in plans if p.selected is not None}
    if {"flash", "flash4"} <= chosen:
        warnings.append("flash-attn and flash-attn-4 share the top-level 'flash_attn' package: "
                        "install flash-attn first, then flash-attn-4 (install does this)")
    return Plan(system, tuple(plans), tuple(warnings))


def _where(system: System) -> str:
    torch = (f"torch {'.'.join(map(str, system.torch_minor))}" if system.torch_minor
             else "no torch")
    cuda = f" + CUDA {system.torch_cuda}" if system.torch_cuda else ""
    return f"{torch}{cuda} on {system.platform} {system.arch}, Python {system.python}"


def older_line_note(system: System, backend: Backend, chosen: WheelName,
                    rejected: Sequence[Rejected]) -> str | None:
    """A note when the chosen wheel is of an older major line than wheels that exist but do
    not fit (SageAttention 1.x, Triton kernels, where no 2.x wheel fits): which newer one is
    there and, in one line, why it was passed over. Wheels a pin excludes do not count."""
    newer: list[tuple[Version, Rejected]] = []
    for r in rejected:
        if any(x.kind in ("pin", "ranked", "filename") for x in r.reasons):
            continue
        try:
            w = parse_wheel_name(r.candidate.filename)
        except InvalidWheelName:
            continue
        if w.version.major > chosen.version.major:
            newer.append((w.version, r))
    if not newer:
        return None
    top = max(v for v, _ in newer)
    of_top = [r for v, r in newer if v == top]
    closest = min(of_top, key=lambda r: len(r.reasons))
    return (f"{backend.title} {chosen.raw_version} is the older {chosen.version.major}.x line: "
            f"no {top.major}.x wheel fits. {backend.title} {top}: no wheel for {_where(system)}"
            f" ({len(of_top)} built; closest, {closest.candidate.filename}: "
            f"{'; '.join(x.text for x in closest.reasons)})")


def _nothing_fits(system: System, backend: Backend, rejected: list[Rejected],
                  pin: Pin | None = None) -> str:
    where = _where(system)
    if len(rejected) == 1:  # one candidate: its own reasons say it best
        r = rejected[0]
        return f"{r.candidate.filename}: {'; '.join(x.text for x in r.reasons)}"
    if pin is not None and pin.specifier:
        if not rejected:
            return f"no {backend.dist} wheel in the sources searched satisfies {pin.written}"
        return (f"no {backend.dist} wheel satisfies {pin.written} for {where}: "
                f"{len(rejected)} candidates rejected (reasons: {rule_counts(rejected, 4)})")
    if not rejected:
        return f"no {backend.dist} wheel in the sources searched (for {where})"
    if backend.min_sm is not None and not system.gpus:
        # every wheel fails for that first: say it rather than count the rest
        return gpu_reasons(backend, system, None)[0].text
    gpu_only = [r for r in rejected if all(x.kind == "gpu" for x in r.reasons)]
    if gpu_only and len(gpu_only) == len(rejected):
        return gpu_only[0].reasons[0].text
    return (f"no {backend.dist} wheel for {where}: {len(rejected)} candidates rejected "
            f"(reasons: {rule_counts(rejected, 4)}){_closest(rejected)}")


def _closest(rejected: list[Rejected]) -> str:
    """'; closest, FILE: its reasons': the wheel that fails the fewest kinds of rule (the
    first in the plan's order among equals). The counts name the common rules; this one
    names the rule that stands between the user and a wheel (a driver too old, say), which
    may be rare among thousands of wheels."""
    if not rejected:
        return ""
    best = min(rejected, key=lambda r: len({x.kind for x in r.reasons}))
    return f"; closest, {best.candidate.filename}: {'; '.join(x.text for x in best.reasons)}"


def rule_counts(rejected: Iterable[Rejected], top: int) -> str:
    """"torch 67, cuda 40": how many wheels each kind of rule passed over (a wheel that
    fails two rules of one kind counts once there), the `top` most common kinds; a tie in
    the kinds' names' order, the same in every run (a set's order is not)."""
    kinds = Counter(k for r in rejected for k in {x.kind for x in r.reasons})
    ranked = sorted(kinds.items(), key=lambda kn: (-kn[1], kn[0]))[:top]
    return ", ".join(f"{k} {n}" for k, n in ranked)


def installed_reasons(dist_name: str, version: str, tags: Iterable[Tag],
                      requires_torch: str | None, system: System) -> list[Reason]:
    """The same rules applied to a distribution already installed (for doctor)."""
    backend = BACKENDS[BY_DIST[normalize_dist(dist_name)]]
    tagset = frozenset(tags)
    label_text = version.split("+", 1)[1] if "+" in version else ""
    from comfy_env_attn.candidates.wheelname import parse_label

    w = WheelName(filename=f"{dist_name}-{version}", project=normalize_dist(dist_name),
                  version=Version(version.split("+")[0]), raw_version=version, local=label_text,
                  label=parse_label(label_text), build="", tags=tagset)
    c = Candidate(filename=w.filename, url="", source="installed", requires_torch=requires_torch)
    reasons, _ = check(c, w, system, backend) if tagset else (_no_tag_check(c, w, system,
                                                                             backend), 0)
    return reasons


def _no_tag_check(c: Candidate, w: WheelName, system: System, backend: Backend) -> list[Reason]:
    reasons, _ = check(c, w, system, backend)
    return [r for r in reasons if r.kind not in ("python", "platform")]
