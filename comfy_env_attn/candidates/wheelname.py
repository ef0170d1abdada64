"""Wheel filenames and the local-label conventions of CUDA wheel builders.

Labels seen in the field (FACTS.md section 3):
    cu128torch2.8                 Comfy-Org, comfy-forge, mjun0812
    cu12torch2.8cxx11abiTRUE      flash-attn official releases (CUDA major only)
    cu128torch2.8.0.post3         woct0rdho Windows builds
    cu130torch2.10.0andhigher.post6   stable-ABI build: torch >= 2.10
    cu128torch2.8gitabcdef0       mjun0812 FlashAttention 3
parse_label and format_label are each other's inverse.
"""

from __future__ import annotations

import re
from functools import lru_cache

from packaging.tags import Tag, parse_tag
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from comfy_env_attn.core.records import dataclass


class InvalidWheelName(ValueError):
    pass


@dataclass(frozen=True)
class Label:
    """What a local version label says about the build."""

    cuda: str | None = None  # digits as written: "128", "12", "130"
    torch: str | None = None  # as written: "2.8", "2.8.0", "2.10.0"
    andhigher: bool = False
    cxx11abi: bool | None = None
    git: str | None = None
    post: int | None = None

    @property
    def cuda_version(self) -> tuple[int, int | None] | None:
        """(major, minor); minor None when the label gives the major only (cu12)."""
        if self.cuda is None:
            return None
        return cuda_from_digits(self.cuda)

    @property
    def torch_minor(self) -> tuple[int, int] | None:
        if self.torch is None:
            return None
        parts = self.torch.split(".")
        return int(parts[0]), int(parts[1])


_LABEL_RE = re.compile(
    r"^(?:cu(?P<cuda>\d{2,4}))?"
    r"(?:torch(?P<torch>\d+\.\d+(?:\.\d+)?))?"
    r"(?P<andhigher>andhigher)?"
    r"(?:cxx11abi(?P<abi>TRUE|FALSE))?"
    r"(?:git(?P<git>[0-9a-f]{4,40}))?"
    r"(?:\.post(?P<post>\d+))?$"
)


def cuda_from_digits(digits: str) -> tuple[int, int | None]:
    """"128" -> (12, 8); "12" -> (12, None); "118" -> (11, 8); "1210" -> (12, 10)."""
    if len(digits) <= 2:
        return int(digits), None
    return int(digits[:2]), int(digits[2:])


_LOCAL_RE = re.compile(r"^[a-zA-Z0-9]+(?:[._-][a-zA-Z0-9]+)*$")


# Longer versions or longer digit runs are not versions any installer publishes; bounding them
# keeps parsing cheap and away from int()'s 4300-digit ValueError.
_MAX_VERSION_LEN = 64
_LONG_DIGITS = re.compile(r"\d{16}")


def bounded_version(text: str) -> Version | None:
    """The Version of `text`, or None when it is not one or is implausibly long."""
    if len(text) > _MAX_VERSION_LEN or _LONG_DIGITS.search(text):
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


@lru_cache(maxsize=4096)
def _public_version(text: str) -> Version | None:
    v = bounded_version(text)
    return None if v is None or v.local else v


@lru_cache(maxsize=1024)
def _parse_tag(text: str) -> frozenset[Tag]:
    return parse_tag(text)  # a few dozen distinct tag strings across thousands of wheels


@lru_cache(maxsize=4096)
def parse_label(text: str) -> Label | None:
    """The Label of a local version string, or None when it follows no known convention."""
    if not text:
        return None
    m = _LABEL_RE.match(text)
    if m is None or (m["cuda"] is None and m["torch"] is None):
        return None
    abi = m["abi"]
    return Label(
        cuda=m["cuda"],
        torch=m["torch"],
        andhigher=m["andhigher"] is not None,
        cxx11abi=None if abi is None else abi == "TRUE",
        git=m["git"],
        post=None if m["post"] is None else int(m["post"]),
    )


def format_label(label: Label) -> str:
    out = ""
    if label.cuda is not None:
        out += f"cu{label.cuda}"
    if label.torch is not None:
        out += f"torch{label.torch}"
    if label.andhigher:
        out += "andhigher"
    if label.cxx11abi is not None:
        out += "cxx11abiTRUE" if label.cxx11abi else "cxx11abiFALSE"
    if label.git is not None:
        out += f"git{label.git}"
    if label.post is not None:
        out += f".post{label.post}"
    return out


MAX_FILENAME = 255  # one path component on every file system the tool runs on
_FILENAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]*\.whl$")


def safe_wheel_filename(filename: str) -> str:
    """`filename` when it is one valid wheel file name (no folder, no traversal, only wheel
    filename characters); InvalidWheelName otherwise. Every name from an index or a lock
    passes here before it names a file on disk."""
    parse_wheel_name(filename)
    return filename


@dataclass(frozen=True)
class WheelName:
    """A wheel filename, parsed (safe_wheel_filename checks it first)."""
    filename: str
    project: str  # canonical (PEP 503) name
    version: Version  # the public version (local labels are in `label`)
    raw_version: str  # as written, case kept (packaging lowercases the local label)
    local: str  # raw local label, "" when none
    label: Label | None
    build: str
    tags: frozenset[Tag]


def parse_wheel_name(filename: str) -> WheelName:
    """Parse a wheel filename; InvalidWheelName quoting the name when it is not one."""
    if not filename.endswith(".whl"):
        raise InvalidWheelName(f"not a wheel filename (no .whl suffix): {filename!r}")
    if len(filename) > MAX_FILENAME or not _FILENAME_CHARS.match(filename):
        raise InvalidWheelName(f"invalid wheel filename (not one file name of letters, digits "
                               f"and ._+!-): {filename[:300]!r}")
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        raise InvalidWheelName(
            f"invalid wheel filename (wrong number of parts): {filename!r}")
    name, raw_version = parts[0], parts[1]
    build = parts[2] if len(parts) == 6 else ""
    if build and not re.match(r"^\d[A-Za-z0-9_]*$", build):
        raise InvalidWheelName(f"invalid build tag {build!r} in wheel filename: {filename!r}")
    if not re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?$", name):
        raise InvalidWheelName(f"invalid project name in wheel filename: {filename!r}")
    public, _, local = raw_version.partition("+")
    version = _public_version(public)
    if version is None or (local and not _LOCAL_RE.match(local)):
        raise InvalidWheelName(
            f"invalid version {raw_version!r} in wheel filename: {filename!r}")
    try:
        tags = _parse_tag("-".join(parts[-3:]))
    except ValueError:
        raise InvalidWheelName(f"invalid tags in wheel filename: {filename!r}") from None
    return WheelName(
        filename=filename,
        project=str(canonicalize_name(name)),
        version=version,
        raw_version=raw_version,
        local=local,
        label=parse_label(local),
        build=build,
        tags=tags,
    )
