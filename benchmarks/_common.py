"""Helpers for the benchmark scripts: run a command several times, report the median."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "comfy_env_attn"]


# Measure as an installed tool runs: with its bytecode cached (pip writes .pyc files).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def median_seconds(cmd: Sequence[str], runs: int = 7, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-400:]}")
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


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
