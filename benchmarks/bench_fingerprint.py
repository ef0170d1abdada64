"""What the lock's file fingerprint costs at every ComfyUI start: live_facts() over backends
whose dist-info lists as many files as the real wheels (sageattention 2.2.0: 40, the
flash-attn-4 4.0.0b36 wheel: 90, xformers 0.0.35: 1,000), against importing the dispatcher.

    python benchmarks/bench_fingerprint.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_env_attn.core.fingerprint import files_digest

SIZES = {"sageattention": 40, "flash_attn_4": 90, "xformers": 1000}


def fake(root: Path, name: str, files: int) -> Path:
    pkg = root / name
    pkg.mkdir()
    rows = []
    for i in range(files):
        (pkg / f"m{i}.py").write_text("x = 1\n")
        rows.append(f"{name}/m{i}.py,sha256=AAAA,6")
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    return info  # what files_digest reads: the dist-info folder


def main() -> None:
    root = Path(tempfile.mkdtemp())
    dists = {n: fake(root, n, k) for n, k in SIZES.items()}
    for name, d in dists.items():
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            files_digest(d)
            times.append(time.perf_counter() - t0)
        print(f"{name:14} {SIZES[name]:5} files: {statistics.median(times) * 1e3:.2f} ms")
    t0 = time.perf_counter()
    for d in dists.values():
        files_digest(d)
    print(f"all three: {(time.perf_counter() - t0) * 1e3:.2f} ms per ComfyUI start")


if __name__ == "__main__":
    main()
