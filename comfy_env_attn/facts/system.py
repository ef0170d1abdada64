"""The System profile: the facts about a target machine that decide which wheel fits.

`probe` fills one in; `--system FILE` reads one from TOML (DESIGN.md). Pure apart from
load_profile, which reads a file.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from comfy_env_attn.core.errors import AttnError, ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PLATFORMS = ("linux", "windows", "macos")
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "x86_64": "x86_64",
                 "aarch64": "aarch64"}


@dataclass(frozen=True)
class System:
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
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                           f"{', '.join(sorted(_KNOWN))}")
    for key in ("python", "platform"):
        if key not in data:
            raise ProfileError(f"{where}: missing required key {key!r}")
    kwargs: dict[str, Any] = {}
    for key in _STR_KEYS:
        if key in data:
            value = data[key]
            if not isinstance(value, str):
                raise ProfileError(f"{where}: {key} must be a string, got {value!r}")
            kwargs[key] = value
    if not re.match(r"^3\.\d+(\.\d+)?$", kwargs["python"]):
        raise ProfileError(f"{where}: python must look like '3.12' or '3.12.3', "
                           f"got {kwargs['python']!r}")
    kwargs["platform"] = normalize_platform(kwargs["platform"])
    if "arch" in kwargs:
        kwargs["arch"] = normalize_arch(kwargs["arch"])
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
        if not re.match(r"^\d{1,2}\.\d+[af]?$", g):
            raise ProfileError(f"{where}: GPU compute capability {g!r} must look like '8.9'")
    for key in ("torch_cuda", "driver_cuda"):
        if key in kwargs and not re.match(r"^\d+\.\d+", kwargs[key]):
            raise ProfileError(f"{where}: {key} must look like '12.8', got {kwargs[key]!r}")
    return System(**kwargs)


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
    """A TOML file as a dict; `error` naming the file (and line and column) otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror}") from None
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(toml_error(str(p), text, e)) from None
    return doc


def load_profile(path: str | Path) -> System:
    return from_dict(read_toml(path, what="System profile"), where=str(path))

