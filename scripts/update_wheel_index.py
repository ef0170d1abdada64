"""Rebuild wheel_index/*.json from the curated lists in scripts/index_sources and PyPI.

    python scripts/update_wheel_index.py            # everything (needs PyPI)
    python scripts/update_wheel_index.py --offline  # only the curated lists

For xformers it reads each wheel's xformers/cpp_lib.json through HTTP range requests,
to record the torch, CUDA and SM archs it was really built with.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import zipfile
from pathlib import Path
from urllib.parse import quote

import httpx
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "scripts" / "index_sources"
OUT = ROOT / "wheel_index"


def write(name: str, source: str, note: str, wheels: list[dict], defaults: dict | None = None):
    doc = {"source": source, "note": note, "defaults": defaults or {}, "wheels": wheels}
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=0, sort_keys=False) + "\n")
    print(f"{name}: {len(wheels)} wheels", file=sys.stderr)


class RangeFile(io.RawIOBase):
    def __init__(self, client: httpx.Client, url: str, size: int):
        self.client, self.url, self.size, self.pos = client, url, size, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.size + off
        return self.pos

    def readinto(self, b):
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        r = self.client.get(self.url, headers={"Range": f"bytes={self.pos}-{self.pos + n - 1}"})
        r.raise_for_status()
        data = r.content[:n]
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def xformers_build(client: httpx.Client, url: str, size: int) -> dict:
    try:
        with zipfile.ZipFile(io.BufferedReader(RangeFile(client, url, size), 1 << 16)) as z:
            info = json.loads(z.read("xformers/cpp_lib.json"))
    except Exception as e:
        print(f"  no cpp_lib.json in {url}: {e}", file=sys.stderr)
        return {}
    v = info.get("version", {})
    cuda = v.get("cuda")
    out = {}
    if v.get("torch"):
        out["built_torch"] = v["torch"]
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
    for _ in range(4):
        r = client.get(url + ".metadata")
        if r.status_code == 200:
            break
    else:
        print(f"  no metadata for {url}: HTTP {r.status_code}", file=sys.stderr)
        return None
    reqs = [line.split(":", 1)[1].strip() for line in r.text.splitlines()
            if line.startswith("Requires-Dist:")]
    return torch_spec(reqs)


def pypi(client: httpx.Client) -> list[dict]:
    wheels = []
    keep = {
        "sageattention": lambda v: v.major >= 1,
        "xformers": lambda v: v >= Version("0.0.28") and not v.is_devrelease,
        "flash-attn-4": lambda v: True,
        "flash-attn-3": lambda v: True,
    }
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    for project, wanted in keep.items():
        doc = client.get(f"https://pypi.org/simple/{project}/", headers=accept).json()
        for f in doc["files"]:
            name = f["filename"]
            if not name.endswith(".whl") or not wanted(Version(name.split("-")[1])):
                continue
            w = {"filename": name, "url": f["url"], "sha256": f["hashes"]["sha256"],
                 "size": f["size"]}
            spec = metadata_torch(client, f["url"])  # mirrors may drop core-metadata keys
            if spec:
                w["requires_torch"] = spec
            if f.get("requires-python"):
                w["requires_python"] = f["requires-python"]
            if f.get("yanked"):
                w["yanked"] = f["yanked"] if isinstance(f["yanked"], str) else "yanked"
            if project == "xformers":
                w.update(xformers_build(client, f["url"], f["size"]))
            wheels.append(w)
    return wheels


def comfy_forge() -> list[dict]:
    wheels = []
    for line in (SRC / "comfy_forge.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        filename, sha = line.split()
        project = filename.split("-")[0]
        tag = {"sageattention": "sageattention-latest", "sageattn3": "sageattn3-latest",
               "flash_attn": "flash_attn-latest"}[project]
        cu = re.search(r"\+cu(\d+)", filename)[1]
        if project == "sageattention":
            sm = ["8.0", "8.6", "8.9", "9.0+PTX"] if cu in ("124", "126") else \
                ["8.0", "8.6", "8.9", "9.0", "12.0+PTX"]
        elif project == "sageattn3":
            sm = ["10.0", "12.0+PTX"]
        else:
            sm = ["8.0", "9.0+PTX"] if cu in ("124", "126") else ["8.0", "9.0", "10.0", "12.0+PTX"]
        if "aarch64" in filename and project == "sageattention":
            sm = ["8.0", "9.0", "12.0+PTX"]
        wheels.append({"filename": filename, "sha256": sha, "sm": sm,
                       "url": "https://github.com/Comfy-Forge/cuda-wheels/releases/download/"
                              f"{tag}/{quote(filename)}"})
    return wheels


def url_list(name: str) -> list[dict]:
    out = []
    for line in (SRC / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append({"filename": line.rsplit("/", 1)[1], "url": line})
    return out


def dao_ailab() -> list[dict]:
    # Release v2.8.3 of Dao-AILab/flash-attention: torch 2.4-2.8, both C++ ABIs, cp39-cp313.
    out = []
    for torch in ("2.4", "2.5", "2.6", "2.7", "2.8"):
        for abi in ("TRUE", "FALSE"):
            for py in ("39", "310", "311", "312", "313"):
                f = f"flash_attn-2.8.3+cu12torch{torch}cxx11abi{abi}-cp{py}-cp{py}-linux_x86_64.whl"
                out.append({"filename": f, "url": "https://github.com/Dao-AILab/flash-attention/"
                                                  f"releases/download/v2.8.3/{quote(f)}"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--offline", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    write("comfy_forge", "Comfy-Forge/cuda-wheels",
          "comfy-env's CUDA wheel index; sha256 from its PEP 503 pages, SM archs from its "
          "packages/*/arch_override.yml", comfy_forge())
    write("mjun0812", "mjun0812/flash-attention-prebuild-wheels",
          "prebuilt flash-attn and flash-attn-3 wheels listed in the project's doc/packages.md",
          url_list("mjun0812_urls.txt"))
    write("woct0rdho", "woct0rdho/SageAttention", "Windows SageAttention 2 builds",
          url_list("woct0rdho.txt"), {"sm": ["8.0", "8.6", "8.9", "9.0", "12.0+PTX"]})
    write("dao_ailab", "Dao-AILab/flash-attention",
          "official flash-attn releases (Linux x86_64 only); CUDA major only in the label",
          dao_ailab(), {"sm": ["8.0", "9.0+PTX"]})
    if not args.offline:
        with httpx.Client(timeout=60, follow_redirects=True) as client:
            write("pypi", "PyPI", "sageattention 1.x (Triton), xformers releases with their "
                  "torch pins and real build facts, flash-attn-4, flash-attn-3", pypi(client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
