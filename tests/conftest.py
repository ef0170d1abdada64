"""Shared fixtures: a loopback HTTP server, System profiles, one venv with the CPU torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from comfy_env_attn.facts.system import System

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Route:
    body: bytes
    content_type: str = "text/html"
    status: int = 200


@dataclass
class Server:
    url: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    def add(self, path: str, body: str | bytes, content_type: str = "text/html",
            status: int = 200) -> str:
        data = body.encode() if isinstance(body, str) else body
        self.routes[path] = Route(data, content_type, status)
        return self.url + path

    def add_file(self, path: str, file: Path) -> str:
        return self.add(path, file.read_bytes(), "application/octet-stream")


@pytest.fixture
def http_server() -> Iterator[Server]:
    """A real HTTP server on 127.0.0.1 serving the routes a test adds."""
    routes: dict[str, Route] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            path = self.path.split("?")[0]
            route = routes.get(path)
            if route is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            rng = self.headers.get("Range")
            body = route.body
            if rng and rng.startswith("bytes=") and route.status == 200:
                a, b = rng[6:].split("-")  # "a-b", "a-" or the last b bytes, "-b"
                size = len(body)
                first = size - int(b) if a == "" else int(a)
                last = size - 1 if a == "" or b == "" else min(int(b), size - 1)
                first = max(first, 0)
                body = body[first: last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    srv = Server(f"http://127.0.0.1:{server.server_address[1]}", routes, hits)
    try:
        yield srv
    finally:
        server.shutdown()
        server.server_close()


def make_system(**kw: object) -> System:
    base: dict[str, object] = dict(
        python="3.12.3", platform="linux", arch="x86_64", glibc="2.35",
        torch="2.8.0+cu128", torch_cuda="12.8", cxx11abi=True,
        driver="570.124.06", driver_cuda="12.8", gpus=("8.9",))
    base.update(kw)
    return System(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def uv_bin() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_site(venv: Path) -> Path:
    """site-packages of a venv made from this interpreter."""
    if os.name == "nt":
        return venv / "Lib" / "site-packages"
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def make_venv(path: Path, *, torch: bool) -> Path:
    """A fresh venv of this interpreter, made by uv in milliseconds. With torch, it sees the
    torch this interpreter runs (no copy): a .pth file names the folder that holds it.

    Not --system-site-packages: that shows the base interpreter's packages, and when the runner
    is itself a venv (as the README's set-up makes it), its base has no torch or another one.
    The tests and benchmarks/bench_install.py make their venvs here.
    """
    from uv import find_uv_bin

    subprocess.run([find_uv_bin(), "venv", "--quiet", "--python", sys.executable, str(path)],
                   check=True)
    if torch:
        import torch as running_torch

        holder = Path(running_torch.__file__).resolve().parent.parent
        (venv_site(path) / "_running_torch.pth").write_text(f"{holder}\n")
    return path


@pytest.fixture(scope="session")
def torch_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv for the whole session that sees this interpreter's CPU torch."""
    pytest.importorskip("torch")
    return make_venv(tmp_path_factory.mktemp("venv") / "venv", torch=True)


@pytest.fixture
def plain_venv(tmp_path: Path) -> Path:
    """A fresh venv without torch."""
    return make_venv(tmp_path / "plain", torch=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_CACHE_DIR",
                       str(tmp_path_factory.getbasetemp() / "probe-cache"))


def as_from_a_terminal() -> None:
    """A child's Ctrl-C and SIGHUP as a terminal delivers them, also where the suite runs
    with them ignored (nohup; a background job of a shell without job control), which the
    tool rightly leaves ignored: for Popen's preexec_fn."""
    import signal

    for name in ("SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


TERMINAL: dict[str, Any] = {} if os.name == "nt" else {"preexec_fn": as_from_a_terminal}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "comfy_env_attn", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT, **TERMINAL)


def have_uv() -> bool:
    return shutil.which("uv") is not None


def write_gpu_profile(folder: Path, *, glibc: str = "2.36", gpu: str = "8.9") -> Path:
    """A System profile of a Linux GPU machine with this interpreter's Python and torch's
    version, built for CUDA 12.8: the target the install tests resolve for."""
    import torch

    p = folder / "gpu.toml"
    p.write_text(f'python = "{sys.version.split()[0]}"\nplatform = "linux"\narch = "x86_64"\n'
                 f'glibc = "{glibc}"\ntorch = "{torch.__version__.split("+")[0]}+cu128"\n'
                 'torch_cuda = "12.8"\ncxx11abi = true\ndriver = "570.124.06"\n'
                 f'driver_cuda = "12.8"\ngpus = ["{gpu}"]\n')
    return p


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A fresh venv that sees this interpreter's torch (no torch copy: made in milliseconds)."""
    return make_venv(tmp_path / "venv", torch=True)


# The dispatcher's settings come from these variables; a test sets what it needs.
DISPATCH_ENV = ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM",
                "COMFY_ENV_ATTN_UNVERIFIED", "COMFY_ENV_ATTN_SETTLE_MARGIN")
FAKE_BACKEND_MODULES = ("sageattention", "rough_attn", "packed_attn")  # the tests' fakes


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The dispatcher as a new process has it (no settings, routes or overrides); the fake
    backend modules a test imported are forgotten after it."""
    from comfy_env_attn.runtime import dispatch

    dispatch._reset_for_tests()
    for var in DISPATCH_ENV:
        monkeypatch.delenv(var, raising=False)
    yield
    dispatch._reset_for_tests()
    for name in FAKE_BACKEND_MODULES:
        sys.modules.pop(name, None)
