"""How long `plan --json` and a warm `probe` take.

    python benchmarks/bench_plan.py [--runs 7]

(a) plan --json for a System file against the embedded index (goal < 0.3 s)
(b) plan --json against a loopback find-links page of 3,000+ real-looking candidates
    (the mjun0812 URL list plus sageattention variants; goal < 1 s)
(c) probe --json with a warm cache, as a ratio to `python -c "import torch"` in the same
    interpreter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import CLI, ROOT, median_seconds, serve

SYSTEM = """python = "3.12.3"
platform = "linux"
arch = "x86_64"
glibc = "2.35"
torch = "2.8.0+cu128"
torch_cuda = "12.8"
cxx11abi = true
driver = "570.124.06"
driver_cuda = "12.8"
gpus = ["8.9"]
"""


def find_links_page(directory: Path) -> int:
    urls = (ROOT / "scripts/index_sources/mjun0812_urls.txt").read_text().split()
    for cu in ("124", "126", "128", "129", "130"):
        for torch in ("2.5", "2.6", "2.7", "2.8", "2.9", "2.10", "2.11"):
            for py in ("310", "311", "312", "313"):
                for plat in ("manylinux_2_28_x86_64", "win_amd64"):
                    urls.append(f"https://example.invalid/sage/sageattention-2.2.0%2Bcu{cu}"
                                f"torch{torch}-cp{py}-cp{py}-{plat}.whl")
    links = "\n".join(f'<a href="{u}">{u.rsplit("/", 1)[1]}</a><br>' for u in urls)
    (directory / "links.html").write_text(f"<html><body>{links}</body></html>")
    return len(urls)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "system.toml").write_text(SYSTEM)
        n = find_links_page(d)
        base, srv = serve(d)
        try:
            a = median_seconds([*CLI, "plan", "--json", "--system", str(d / "system.toml")],
                               args.runs)
            b = median_seconds([*CLI, "plan", "--json", "--system", str(d / "system.toml"),
                                "--no-embedded-index", "--find-links", f"{base}/links.html"],
                               args.runs)
        finally:
            srv.shutdown()
    probe = median_seconds([*CLI, "probe", "--json"], args.runs, warmup=2)
    torch = median_seconds([sys.executable, "-c", "import torch"], args.runs)
    print(f"plan --json, embedded index:          median {a:.3f} s  (goal < 0.3 s)")
    print(f"plan --json, find-links {n} wheels:  median {b:.3f} s  (goal < 1 s)")
    print(f"probe --json, warm cache:             median {probe:.3f} s")
    print(f"python -c 'import torch':             median {torch:.3f} s")
    print(f"ratio probe / import torch:           {probe / torch:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
