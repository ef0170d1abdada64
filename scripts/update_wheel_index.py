"""Rebuild wheel_index/*.json from the curated lists in scripts/index_sources and PyPI.

    python scripts/update_wheel_index.py                    # everything (needs PyPI)
    python scripts/update_wheel_index.py --offline          # the curated lists; pypi.json as
                                                            # last listed, in today's format
    python scripts/update_wheel_index.py --offline --check  # exit 1 unless the committed
                                                            # files are what this script writes

Each file is a document to trust and reproduce, like a lock: a header with its schema, this
generator's sha256, the source's pin (release tag or listing date) and where each stored fact
came from; entries in PEP 691's vocabulary (`hashes`, `requires-python`, `size`, `yanked`);
entries generated from a naming pattern rather than seen in a listing say so
(`generated-from`), and the resolver ranks them after observed ones. Facts read from a
filename (torch, CUDA, Python, platform) are not stored: the resolver parses them.

For xformers it reads each wheel's xformers/cpp_lib.json through HTTP range requests, to
record the torch, CUDA and SM archs it was really built with.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from packaging.requirements import Requirement
from packaging.version import Version

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "scripts" / "index_sources"
OUT = ROOT / "wheel_index"
SCHEMA = 2
SCRIPT = "scripts/update_wheel_index.py"

Entry = dict[str, Any]

# entry keys, in the order they are written; v1 names (before schema 2) on the right
KEYS = ("filename", "url", "hashes", "size", "requires-python", "requires-torch", "built-torch",
        "cuda", "sm", "yanked")
V1_NAMES = {"requires_python": "requires-python", "requires_torch": "requires-torch",
            "built_torch": "built-torch"}


@dataclass(frozen=True)
class IndexFile:
    name: str  # wheel_index/<name>.json
    source: str
    note: str
    pin: str  # release tag or listing date of what was read
    facts_from: Mapping[str, str]  # stored fact -> where it came from
    wheels: list[Entry]
    defaults: Entry = field(default_factory=dict)
    generated_from: str | None = None  # entries made from a naming pattern, not a listing

    def render(self) -> str:
        doc: dict[str, Any] = {
            "schema": SCHEMA, "source": self.source, "note": self.note,
            "generator": {"script": SCRIPT, "sha256": generator_sha256()},
            "pin": self.pin, "facts-from": dict(self.facts_from)}
        if self.generated_from:
            doc["generated-from"] = self.generated_from
        doc["defaults"] = normalize(self.defaults)
        doc["wheels"] = [normalize(w) for w in self.wheels]
        return json.dumps(doc, indent=0) + "\n"


def generator_sha256() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def normalize(entry: Mapping[str, Any]) -> Entry:
    """One entry in schema 2's vocabulary and key order (a schema 1 entry is renamed)."""
    e = {V1_NAMES.get(k, k): v for k, v in entry.items()}
    if "sha256" in e:
        e["hashes"] = {"sha256": e.pop("sha256")}
    unknown = set(e) - set(KEYS)
    if unknown:
        raise ValueError(f"{e.get('filename')}: unknown keys {sorted(unknown)}")
    return {k: e[k] for k in KEYS if k in e}


def pin_of(list_file: Path) -> str:
    """The `# pin: ...` line of a curated list."""
    for line in list_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("# pin:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{list_file} has no '# pin: ...' line")


def entries(list_file: Path) -> list[str]:
    return [ln.strip() for ln in list_file.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.startswith("#")]


# -- PyPI (online) ----------------------------------------------------------------------------

class RangeFile(io.RawIOBase):
    def __init__(self, client: httpx.Client, url: str, size: int) -> None:
        self.client, self.url, self.size, self.pos = client, url, size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.size + off
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        r = self.client.get(self.url, headers={"Range": f"bytes={self.pos}-{self.pos + n - 1}"})
        r.raise_for_status()
        data = r.content[:n]
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def xformers_build(client: httpx.Client, url: str, size: int) -> Entry:
    try:
        with zipfile.ZipFile(io.BufferedReader(RangeFile(client, url, size), 1 << 16)) as z:
            info = json.loads(z.read("xformers/cpp_lib.json"))
    except Exception as e:
        print(f"  no cpp_lib.json in {url}: {e}", file=sys.stderr)
        return {}
    v = info.get("version", {})
    cuda = v.get("cuda")
    out: Entry = {}
    if v.get("torch"):
        out["built-torch"] = v["torch"]
    if cuda:
        out["cuda"] = f"{cuda // 100}.{cuda % 100}"
    archs = (info.get("env") or {}).get("TORCH_CUDA_ARCH_LIST")
    if archs:
        out["sm"] = archs.replace(";", " ").split()
    return out


def torch_spec(requires: list[str] | None) -> str | None:
    for r in requires or []:
        req = Requirement(r)
        if req.name == "torch" and req.marker is None:
            return str(req.specifier) or None
    return None


def metadata_torch(client: httpx.Client, url: str) -> str | None:
    status = 0
    for _ in range(4):
        r = client.get(url + ".metadata")
        status = r.status_code
        if status == 200:
            break
    else:
        print(f"  no metadata for {url}: HTTP {status}", file=sys.stderr)
        return None
    reqs = [line.split(":", 1)[1].strip() for line in r.text.splitlines()
            if line.startswith("Requires-Dist:")]
    return torch_spec(reqs)


PYPI_KEEP: dict[str, Callable[[Version], bool]] = {
    "sageattention": lambda v: v.major >= 1,
    "xformers": lambda v: v >= Version("0.0.28") and not v.is_devrelease,
    "flash-attn-4": lambda v: True,
    "flash-attn-3": lambda v: True,
}


def pypi(client: httpx.Client) -> list[Entry]:
    wheels: list[Entry] = []
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    for project, wanted in PYPI_KEEP.items():
        doc = client.get(f"https://pypi.org/simple/{project}/", headers=accept).json()
        for f in doc["files"]:
            name = f["filename"]
            if not name.endswith(".whl") or not wanted(Version(name.split("-")[1])):
                continue
            w: Entry = {"filename": name, "url": f["url"],
                        "hashes": {"sha256": f["hashes"]["sha256"]}, "size": f["size"]}
            spec = metadata_torch(client, f["url"])  # mirrors may drop core-metadata keys
            if spec:
                w["requires-torch"] = spec
            if f.get("requires-python"):
                w["requires-python"] = f["requires-python"]
            if f.get("yanked"):
                w["yanked"] = f["yanked"] if isinstance(f["yanked"], str) else "yanked"
            if project == "xformers":
                w.update(xformers_build(client, f["url"], f["size"]))
            wheels.append(w)
    return wheels


PYPI_FACTS = {"hashes": "PyPI's PEP 691 pages", "size": "PyPI's PEP 691 pages",
              "requires-python": "PyPI's PEP 691 pages", "yanked": "PyPI's PEP 691 pages",
              "requires-torch": "the wheel's METADATA (PEP 658)",
              "built-torch": "xformers/cpp_lib.json inside the wheel",
              "cuda": "xformers/cpp_lib.json inside the wheel",
              "sm": "xformers/cpp_lib.json inside the wheel"}
PYPI_NOTE = ("sageattention 1.x (Triton), xformers releases with their torch pins and real "
             "build facts, flash-attn-4, flash-attn-3")


def pypi_file(wheels: list[Entry], pin: str) -> IndexFile:
    return IndexFile("pypi", "PyPI", PYPI_NOTE, pin, PYPI_FACTS, wheels)


def pypi_as_listed() -> IndexFile:
    """pypi.json as it was last listed (offline): its entries and pin, in today's format."""
    doc = json.loads((OUT / "pypi.json").read_text(encoding="utf-8"))
    pin = doc.get("pin") or "PyPI simple API, listed 2026-11-23"  # schema 1 had no pin
    return pypi_file(list(doc["wheels"]), pin)


# -- the curated lists (offline) --------------------------------------------------------------

def comfy_forge() -> IndexFile:
    src = SRC / "comfy_forge.txt"
    wheels: list[Entry] = []
    for line in entries(src):
        filename, sha = line.split()
        project = filename.split("-")[0]
        tag = {"sageattention": "sageattention-latest", "sageattn3": "sageattn3-latest",
               "flash_attn": "flash_attn-latest"}[project]
        m = re.search(r"\+cu(\d+)", filename)
        cu = m[1] if m else ""
        if project == "sageattention":
            sm = ["8.0", "8.6", "8.9", "9.0+PTX"] if cu in ("124", "126") else \
                ["8.0", "8.6", "8.9", "9.0", "12.0+PTX"]
        elif project == "sageattn3":
            sm = ["10.0", "12.0+PTX"]
        else:
            sm = ["8.0", "9.0+PTX"] if cu in ("124", "126") else ["8.0", "9.0", "10.0", "12.0+PTX"]
        if "aarch64" in filename and project == "sageattention":
            sm = ["8.0", "9.0", "12.0+PTX"]
        wheels.append({"filename": filename, "hashes": {"sha256": sha}, "sm": sm,
                       "url": "https://github.com/Comfy-Forge/cuda-wheels/releases/download/"
                              f"{tag}/{quote(filename)}"})
    return IndexFile(
        "comfy_forge", "Comfy-Forge/cuda-wheels", "comfy-env's CUDA wheel index; sha256 from "
        "its PEP 503 pages, SM archs from its packages/*/arch_override.yml", pin_of(src),
        {"hashes": "its PEP 503 pages (#sha256= on each link)",
         "sm": "a rule in this script, per package and CUDA version, from the project's "
               "packages/*/arch_override.yml"}, wheels)


def url_list(list_file: Path) -> list[Entry]:
    return [{"filename": url.rsplit("/", 1)[1], "url": url} for url in entries(list_file)]


def mjun0812() -> IndexFile:
    src = SRC / "mjun0812_urls.txt"
    return IndexFile(
        "mjun0812", "mjun0812/flash-attention-prebuild-wheels", "prebuilt flash-attn and "
        "flash-attn-3 wheels listed in the project's doc/packages.md", pin_of(src), {},
        url_list(src))


def woct0rdho() -> IndexFile:
    src = SRC / "woct0rdho.txt"
    return IndexFile(
        "woct0rdho", "woct0rdho/SageAttention", "Windows SageAttention 2 builds", pin_of(src),
        {"sm": "a rule in this script (the same arch list for every build), not read from "
               "the wheels"}, url_list(src), {"sm": ["8.0", "8.6", "8.9", "9.0", "12.0+PTX"]})


DAO_RELEASE = "v2.8.3"


def dao_ailab() -> IndexFile:
    # Release v2.8.3 of Dao-AILab/flash-attention: torch 2.4-2.8, both C++ ABIs, cp39-cp313.
    out: list[Entry] = []
    for torch in ("2.4", "2.5", "2.6", "2.7", "2.8"):
        for abi in ("TRUE", "FALSE"):
            for py in ("39", "310", "311", "312", "313"):
                f = f"flash_attn-2.8.3+cu12torch{torch}cxx11abi{abi}-cp{py}-cp{py}-linux_x86_64.whl"
                out.append({"filename": f, "url": "https://github.com/Dao-AILab/flash-attention/"
                                                  f"releases/download/{DAO_RELEASE}/{quote(f)}"})
    return IndexFile(
        "dao_ailab", "Dao-AILab/flash-attention", "official flash-attn releases (Linux x86_64 "
        "only); CUDA major only in the label", f"release {DAO_RELEASE}",
        {"sm": "a rule in this script (flash-attn's setup.py builds sm 8.0 and 9.0 by default)"},
        out, {"sm": ["8.0", "9.0+PTX"]},
        generated_from=f"the asset naming pattern of release {DAO_RELEASE} (torch 2.4 to 2.8, "
                       "both C++ ABIs, cp39 to cp313), not a listing: ranked after observed "
                       "wheels; a name the release lacks fails at download")


def offline_files() -> list[IndexFile]:
    return [comfy_forge(), mjun0812(), woct0rdho(), dao_ailab(), pypi_as_listed()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--offline", action="store_true",
                    help="the curated lists only; pypi.json as last listed")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when a committed file differs")
    args = ap.parse_args(argv)
    files = offline_files()
    if not args.offline:
        import httpx

        with httpx.Client(timeout=60, follow_redirects=True) as client:
            listed = time.strftime("%Y-%m-%d", time.gmtime())
            files[-1] = pypi_file(pypi(client), f"PyPI simple API, listed {listed}")
    differ = []
    for f in files:
        path = OUT / f"{f.name}.json"
        text = f.render()
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                differ.append(path.name)
            continue
        OUT.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{f.name}: {len(f.wheels)} wheels", file=sys.stderr)
    if differ:
        print(f"not what {SCRIPT} writes: {', '.join(differ)}; run it (--offline) and commit "
              "the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
