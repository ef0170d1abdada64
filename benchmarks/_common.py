"""Helpers for the benchmark scripts: run a command several times, report the median."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
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
