"""The System profile: the facts about a target machine that decide which wheel fits.

`probe` fills one in; `--system FILE` reads one from TOML (DESIGN.md). Pure apart from
load_profile, which reads a file.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from comfy_env_attn.core.errors import AttnError, ProfileError
from comfy_env_attn.core.paths import parse_toml, readable_file
from comfy_env_attn.core.records import dataclass

PLATFORMS = ("linux", "windows", "macos")
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "x86_64": "x86_64",
                 "aarch64": "aarch64"}


@dataclass(frozen=True)
class System:
    """The machine a plan is for: Python, platform, torch, CUDA, driver and GPUs."""
    python: str
    platform: str
    arch: str = "x86_64"
    glibc: str | None = None
    free_threaded: bool = False
    torch: str | None = None
    torch_cuda: str | None = None
    cxx11abi: bool | None = None
    driver: str | None = None
    driver_cuda: str | None = None
    gpus: tuple[str, ...] = ()
    gpu_names: tuple[str, ...] = ()
    # Facts that could not be learned, with the reason: {"gpus": "NVML: ..."}.
    absent: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def python_tuple(self) -> tuple[int, int]:
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    @property
    def torch_minor(self) -> tuple[int, int] | None:
        return _minor(self.torch)

    @property
    def torch_public(self) -> str | None:
        return None if self.torch is None else self.torch.split("+")[0]

    @property
    def torch_cuda_tuple(self) -> tuple[int, int] | None:
        return _minor(self.torch_cuda)

    @property
    def glibc_tuple(self) -> tuple[int, int] | None:
        return _minor(self.glibc)

    @property
    def driver_cuda_tuple(self) -> tuple[int, int] | None:
        return _minor(self.driver_cuda)

    @property
    def gpu_ccs(self) -> tuple[tuple[int, int], ...]:
        return tuple(cc_tuple(g) for g in self.gpus)

    def describe(self) -> str:
        """One line: 'Python 3.12.3 on linux x86_64, torch 2.8.0+cu128 (CUDA 12.8), GPU sm 8.9'."""
        torch = "no torch" if self.torch is None else (
            f"torch {self.torch}" + (f" (CUDA {self.torch_cuda})" if self.torch_cuda
                                     else " (CPU build)"))
        gpus = ", ".join(f"sm {g}" for g in self.gpus) or "no NVIDIA GPU"
        return f"Python {self.python} on {self.platform} {self.arch}, {torch}, {gpus}"

    def to_dict(self) -> dict[str, Any]:
        """The flat TOML/JSON structure of DESIGN.md (absent facts left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "absent":
                continue
            value = getattr(self, f.name)
            if value is None or value == () or (f.name == "free_threaded" and not value):
                continue
            if f.name == "arch" and self.platform == "windows" and value == "x86_64":
                value = "amd64"
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _minor(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.match(r"^(\d+)\.(\d+)", text)
    return None if m is None else (int(m[1]), int(m[2]))


def cc_tuple(text: str) -> tuple[int, int]:
    """'8.9' -> (8, 9); '90' -> (9, 0); '12.0' -> (12, 0)."""
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major), int(minor.rstrip("a").rstrip("f") or 0)
    digits = text.rstrip("af")
    return int(digits[:-1]), int(digits[-1])


# Lowest driver for each CUDA major (FACTS.md section 4).
DRIVER_MIN = {
    (12, "linux"): "525.60.13", (12, "windows"): "528.33",
    (13, "linux"): "580", (13, "windows"): "580",
    (11, "linux"): "450.80.02", (11, "windows"): "452.39",
}


def driver_short_of(driver: str, major: int, platform: str) -> str | None:
    """The lowest driver that runs CUDA `major` on this platform, where `driver` is older
    than it; None where it is not (or no floor is known)."""
    floor = DRIVER_MIN.get((major, platform))
    return floor if floor and _numbers(driver) < _numbers(floor) else None


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


_STR_KEYS = ("python", "platform", "arch", "glibc", "torch", "torch_cuda", "driver",
             "driver_cuda")
_KNOWN = {f.name for f in fields(System)} - {"absent"}


def normalize_platform(value: str) -> str:
    v = value.strip().lower()
    aliases = {"win32": "windows", "win": "windows", "darwin": "macos", "mac": "macos",
               "osx": "macos", "linux2": "linux"}
    v = aliases.get(v, v)
    if v not in PLATFORMS:
        raise ProfileError(f"platform {value!r} is not one of {', '.join(PLATFORMS)}")
    return v


def normalize_arch(value: str) -> str:
    v = value.strip().lower()
    if v not in _ARCH_ALIASES:
        raise ProfileError(f"arch {value!r} is not one of x86_64, aarch64, amd64, arm64")
    return _ARCH_ALIASES[v]


def from_dict(data: dict[str, Any], *, where: str = "profile") -> System:
    """A System from the flat profile structure; ProfileError naming the bad key."""
    unknown = sorted(set(data) - _KNOWN - {"provenance"})
    buried = sorted(set(data.get("provenance") or ()) & _KNOWN) \
        if isinstance(data.get("provenance"), dict) else []
    if buried:  # older probe --toml ended with [provenance]: keys appended land in it
        raise ProfileError(f"{where}: {buried[0]!r} is inside the [provenance] table, where it "
                           "is not read: move it above [provenance] (TOML puts every key after "
                           "a table header in that table)")
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                           f"{', '.join(sorted(_KNOWN))}")
    for key in ("python", "platform"):
        if key not in data:
            raise ProfileError(f"{where}: missing required key {key!r} (a profile is written "
                               "on the machine it describes: comfy-env-attn probe --toml > "
                               "FILE)")
    kwargs: dict[str, Any] = {}
    for key in _STR_KEYS:
        if key in data:
            value = data[key]
            if not isinstance(value, str):
                raise ProfileError(f"{where}: {key} must be a string, got {value!r}")
            kwargs[key] = value
    try:
        kwargs["platform"] = normalize_platform(kwargs["platform"])
        if "arch" in kwargs:
            kwargs["arch"] = normalize_arch(kwargs["arch"])
    except ProfileError as e:  # named like every other fault of the file
        raise ProfileError(f"{where}: {e}") from None
    for key in ("cxx11abi", "free_threaded"):
        if key in data:
            if not isinstance(data[key], bool):
                raise ProfileError(f"{where}: {key} must be true or false, got {data[key]!r}")
            kwargs[key] = data[key]
    for key in ("gpus", "gpu_names"):
        if key in data:
            value = data[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProfileError(f"{where}: {key} must be a list of strings, got {value!r}")
            kwargs[key] = tuple(value)
    for g in kwargs.get("gpus", ()):
        m = re.match(r"^(\d{1,2})\.(\d)[af]?$", g)
        if m is None or not MIN_SM_MAJOR <= int(m[1]) <= MAX_SM_MAJOR:
            raise ProfileError(f"{where}: GPU compute capability {g!r} must look like '8.9', "
                               f"major {MIN_SM_MAJOR} to {MAX_SM_MAJOR}")
    for key, (pattern, example) in _SHAPES.items():
        if key in kwargs and not re.match(pattern, kwargs[key]):
            raise ProfileError(f"{where}: {key} must look like {example!r}, "
                               f"got {kwargs[key][:80]!r}")
    driver, dcuda = kwargs.get("driver"), _minor(kwargs.get("driver_cuda"))
    if driver and dcuda and (floor := driver_short_of(driver, dcuda[0], kwargs["platform"])):
        raise ProfileError(f"{where}: driver {driver} cannot run CUDA {kwargs['driver_cuda']} "
                           f"(CUDA {dcuda[0]}.x needs driver >= {floor}), yet driver_cuda says "
                           "it does: give both from the same machine (`probe --toml` writes "
                           "them; nvidia-smi shows them as 'Driver Version' and 'CUDA Version')")
    if kwargs.get("torch_cuda") and kwargs.get("torch", "").endswith("+cpu"):
        raise ProfileError(f"{where}: torch {kwargs['torch']} is a CPU build, yet torch_cuda "
                           f"is {kwargs['torch_cuda']}: leave torch_cuda out for a CPU build, "
                           "or give the CUDA build's version (e.g. '2.8.0+cu128')")
    return System(**kwargs)


# What each string fact must look like. Bounded on purpose: a profile with
# python = "3.100000" or glibc = "2.1000000" made the tag generator loop a million times.
MIN_SM_MAJOR, MAX_SM_MAJOR = 1, 15
_SHAPES = {
    "python": (r"^3\.\d{1,2}(\.\d{1,3})?$", "3.12.3"),
    "glibc": (r"^2\.\d{1,2}$", "2.35"),
    "torch": (r"^\d{1,3}\.\d{1,3}(\.\d{1,3})?((a|b|rc|\.dev|\.post)\d{1,10}){0,3}"
              r"(\+[A-Za-z0-9]{1,20}(\.[A-Za-z0-9]{1,20}){0,3})?$", "2.8.0+cu128"),
    "torch_cuda": (r"^\d{1,2}\.\d{1,2}$", "12.8"),
    "driver_cuda": (r"^\d{1,2}\.\d{1,2}$", "12.8"),
    "driver": (r"^\d{1,4}(\.\d{1,4}){0,3}$", "570.124.06"),
}


# The interpreter's own facts a profile can contradict (disagreements), by name.
INTERPRETER_FACTS = ("python", "platform", "arch", "free_threaded", "torch", "glibc",
                     "cxx11abi")


def disagreements(profile: System, target: System,
                  only: Collection[str] = INTERPRETER_FACTS) -> list[str]:
    """Where a profile contradicts the interpreter it is applied to, each naming both sides
    (GPU facts aside: the profile may describe the machine's GPUs better than a probe);
    `only` these facts."""
    out: list[str] = []
    if "python" in only and profile.python_tuple != target.python_tuple:
        out.append(f"Python {profile.python}, the target runs {target.python}")
    for key in ("platform", "arch"):
        if key in only and getattr(profile, key) != getattr(target, key):
            out.append(f"{key} {getattr(profile, key)}, the target is {getattr(target, key)}")
    if "free_threaded" in only and profile.free_threaded != target.free_threaded:
        out.append(f"free-threaded {profile.free_threaded}, the target "
                   f"{'is' if target.free_threaded else 'is not'}")
    if "torch" in only and profile.torch is not None and \
            profile.torch_public != target.torch_public:
        out.append(f"torch {profile.torch}, the target has "
                   + (f"torch {target.torch}" if target.torch else "no torch"))
    pg, tg = profile.glibc_tuple, target.glibc_tuple
    if "glibc" in only and pg and tg and pg > tg:
        out.append(f"glibc {profile.glibc}, the target has {target.glibc} (wheels built for the "
                   "newer one do not load)")
    if "cxx11abi" in only and None not in (profile.cxx11abi, target.cxx11abi) and \
            profile.cxx11abi != target.cxx11abi:
        out.append(f"cxx11abi {profile.cxx11abi}, the target's torch has {target.cxx11abi}")
    return out


def toml_error(where: str, text: str, e: Exception) -> str:
    """'FILE: malformed TOML: MSG (at line L, column C)', with the position even for errors
    tomllib places 'at end of document'."""
    msg = str(e)
    if "line" not in msg:
        lines = text.splitlines() or [""]
        msg = msg.replace("(at end of document)", "").strip()
        msg += f" (at end of document: line {len(lines)}, column {len(lines[-1]) + 1})"
    return f"{where}: malformed TOML: {msg}"


def read_toml(path: str | Path, *, what: str,
              error: type[AttnError] = ProfileError) -> dict[str, Any]:
    """A TOML file as a dict; `error` naming the file (and line and column) otherwise. Not
    a regular file (a FIFO would block the read, a device would never end): refused."""
    p = Path(path)
    try:
        readable_file(p)
    except ValueError as e:
        raise error(f"{what} {e}") from None
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(p)!r} is not UTF-8 text (byte {e.start}: "
                    f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None
    try:
        doc = parse_toml(text)
    except ValueError as e:  # the TOML error
        raise error(toml_error(str(p), text, e)) from None
    except RecursionError:
        raise error(f"{what} {str(p)!r} nests tables or arrays deeper than TOML can be "
                    "read here") from None
    return doc


def load_profile(path: str | Path) -> System:
    return from_dict(read_toml(path, what="System profile"), where=str(path))


def marker_env(system: System) -> dict[str, str]:
    """PEP 508 marker variables of a (possibly described) target."""
    sys_platform = {"linux": "linux", "windows": "win32", "macos": "darwin"}[system.platform]
    return {"sys_platform": sys_platform,
            "platform_system": {"linux": "Linux", "windows": "Windows",
                                "macos": "Darwin"}[system.platform],
            "os_name": "nt" if system.platform == "windows" else "posix",
            "platform_machine": ("AMD64" if system.arch == "x86_64" else "ARM64")
            if system.platform == "windows" else system.arch,
            "python_version": "%d.%d" % system.python_tuple,
            "python_full_version": system.python,
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "extra": ""}
