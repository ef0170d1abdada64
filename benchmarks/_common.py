"""Helpers for the benchmark scripts: run a command several times, report the median."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "comfy_env_attn"]


# Measure as an installed tool runs: with its bytecode cached (pip writes .pyc files).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: Sequence[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None
          ) -> float:
    """Seconds the command took; SystemExit with the tail of its output when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd,
                       env=ENV if env is None else env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    return dt


def alternating(runs: int, who: Sequence[str], run: Callable[[str, int], float]
                ) -> dict[str, list[float]]:
    """`run(name, i)`'s seconds for each name, `runs` rounds; the names alternate within a
    round and the order turns each round, so that a machine slowing down or speeding up
    during the bench weighs on all alike (on a shared 2-core machine the medians of
    separate benches can differ by 0.1 s)."""
    times: dict[str, list[float]] = {n: [] for n in who}
    for i in range(runs):
        for name in (list(who) if i % 2 == 0 else list(who)[::-1]):
            times[name].append(run(name, i))
    return times


def median_seconds(cmd: Sequence[str], runs: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        timed(cmd)
    return statistics.median(timed(cmd) for _ in range(runs))


def serve(directory: Path, rate: float | None = None) -> tuple[str, ThreadingHTTPServer]:
    """A static file server on loopback; `rate` (bytes/s) paces every response, as a real
    connection would (loopback alone moves a 60 MB wheel in a few hundredths of a second)."""
    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, *args: object) -> None:
            pass

        def copyfile(self, source, outputfile):  # type: ignore[no-untyped-def]
            if rate is None:
                return super().copyfile(source, outputfile)
            t0, sent = time.perf_counter(), 0
            while chunk := source.read(256 * 1024):
                outputfile.write(chunk)
                sent += len(chunk)
                ahead = sent / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            return None

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
            pass  # a client that hangs up early (uv, once it has what it needs) is no news

    srv = Server(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", srv


def library_bytes() -> Path:
    """torch's largest shared library (libtorch_cuda.so on a GPU machine, libtorch_cpu.so
    here), found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torch is not importable: no shared library to pad a wheel with")
    lib = Path(next(iter(spec.submodule_search_locations)), "lib")
    return max((f for f in lib.iterdir() if ".so" in f.name or f.suffix in (".dll", ".dylib")),
               key=lambda f: f.stat().st_size)


def test_wheel(folder: Path, *, labelled: bool = False) -> Path:
    """`folder`, holding tests/wheels.py's working sageattention 2.2.0 tagged for this
    interpreter: what the GPU benchmarks install where no SageAttention was built. With
    `labelled`, its version carries the local label of tests' GPU profile
    (`+cu128torch<torch's minor>`), for a plan made with --system off a GPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from wheels import SAGE_OK, build_wheel

    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    version = f"2.2.0+cu128torch{minor}" if labelled else "2.2.0"
    tag = "cp{0}{1}-cp{0}{1}-linux_x86_64".format(*sys.version_info[:2])
    build_wheel(folder, "sageattention", version, {"sageattention/__init__.py": SAGE_OK},
                requires=["torch>=2.0"], tag=tag)
    return folder


def padded_wheel(wheel: Path, mb: float, out_dir: Path) -> Path:
    """A copy of `wheel` in `out_dir`, grown to about `mb` MB (1e6 bytes) by one more file of
    compiled code, deflated as wheels ship it: the leading bytes of torch's largest shared
    library, whatever they inflate to. A CUDA wheel's bulk is such libraries, which uv
    inflates as it installs; a stored payload (bench_install's `--payload random`) only has
    it copy bytes, the cheapest case for uv and so the hardest for the ratio. RECORD lists
    the new file with its hash, so the wheel installs and checks as any other."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
        names = src.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        top = next(n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n
                   and ".data/" not in n)
        for info in src.infolist():
            if info.filename != record:
                dst.writestr(info, src.read(info))
        name, digest, size = f"{top}/_padding.so", hashlib.sha256(), 0
        target = int(mb * 1e6) - 64 * 1024  # RECORD and the central directory come after
        info = zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with library_bytes().open("rb") as lib, dst.open(info, "w", force_zip64=True) as f:
            while dst.fp is not None and dst.fp.tell() < target and \
                    (chunk := lib.read(1 << 20)):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        line = (f"{name},sha256="
                f"{base64.urlsafe_b64encode(digest.digest()).rstrip(b'=').decode()},{size}")
        dst.writestr(record, src.read(record).decode().rstrip("\n") + "\n" + line + "\n")
    return out


def rotated_ms(fns: dict[str, Callable[[], object]], rounds: int = 12, calls: int = 10,
               warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each function: `rounds` rounds of `calls` back-to-back calls,
    the order rotated each round so that no function always runs first. CUDA events on a
    GPU (the kernels' time, the host's included when it is the bottleneck); the wall clock
    on a CPU."""
    import torch

    cuda = torch.cuda.is_available()
    for f in fns.values():
        for _ in range(warmup):
            f()
    if cuda:
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(calls):
                    fns[n]()
                e.record()
                e.synchronize()
                samples[n].append(s.elapsed_time(e) / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fns[n]()
                samples[n].append((time.perf_counter() - t0) * 1e3 / calls)
    return {n: sorted(t)[len(t) // 2] for n, t in samples.items()}
