"""The one streaming download (install.edges.download) through both callers, over real HTTP
on loopback: a wheel (edges.fetch_wheel) and a build's source archive (build._download).
Whatever goes wrong, each caller says it its own way and no .part file is left."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import RawServer

from comfy_env_attn.candidates.sources import Candidate
from comfy_env_attn.core.errors import InstallError
from comfy_env_attn.install import build
from comfy_env_attn.install.build import BuildError
from comfy_env_attn.install.edges import Unreachable, fetch_wheel

NAME = "sageattention-2.2.0-py3-none-any.whl"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMFY_ENV_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def parts(tmp_path: Path) -> list[Path]:
    return list(tmp_path.rglob("*.part"))


class Meter:
    """edges.DownloadMeter, recording."""

    def __init__(self) -> None:
        self.started: tuple[str, int | None] | None = None
        self.advanced = 0
        self.finished: tuple[int, bool] | None = None

    def start(self, name: str, total: int | None) -> None:
        self.started = (name, total)

    def advance(self, n: int) -> None:
        self.advanced += n

    def finish(self, got: int, seconds: float, ok: bool) -> None:
        self.finished = (got, ok)


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    made: list[RawServer] = []

    def make(head: str, body: bytes = b"", **kw: float) -> RawServer:
        made.append(RawServer(head, body, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def get_wheel(url: str, tmp_path: Path, sha256: str | None = None) -> Path:
    return fetch_wheel(Candidate(NAME, url, "index:test", sha256=sha256), lambda _: None).path


def get_source(url: str, tmp_path: Path, sha256: str | None = None) -> Path:
    dest = tmp_path / "sources" / "x" / "c_sage-2.2.0.tar.gz"
    assert build._download(url, dest, lambda _: None) == hashlib.sha256(
        dest.read_bytes()).hexdigest()
    return dest


CALLERS = pytest.mark.parametrize("get", [get_wheel, get_source], ids=["wheel", "source"])


# -- what goes right ---------------------------------------------------------------------

def test_a_wheel_is_streamed_to_a_folder_named_by_its_hash_then_reused(
        http_server, cache: Path, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    url = http_server.add(f"/f/{NAME}", data, "application/octet-stream")
    meter = Meter()
    got = fetch_wheel(Candidate(NAME, url, "index:test", sha256=sha.upper()), lambda _: None,
                      meter=meter)
    assert got.path == cache / "wheels" / sha / NAME and got.path.read_bytes() == data
    assert (got.sha256, got.hash_source) == (sha, "index")
    assert meter.started == (NAME, len(data)) and meter.advanced == len(data)
    assert meter.finished == (len(data), True)
    # the same wheel again (its hash given in either case) is the file already there
    again = fetch_wheel(Candidate(NAME, url, "index:test", sha256=sha), lambda _: None)
    assert again.path == got.path and http_server.hits.count(f"/f/{NAME}") == 1
    # without a hash from its source: computed, and the log line instead of a meter
    lines: list[str] = []
    plain = fetch_wheel(Candidate(NAME, url, "index:test"), lines.append)
    assert (plain.path, plain.sha256, plain.hash_source) == (got.path, sha, "computed")
    assert lines == [f"downloading {NAME} (0.3 MB)"]
    assert not parts(tmp_path)


def test_a_source_archive_lands_where_it_is_asked_with_its_hash(http_server,
                                                               tmp_path: Path) -> None:
    data = os.urandom(50_000)
    url = http_server.add("/archive/c_sage-2.2.0.tar.gz", data, "application/gzip")
    dest = tmp_path / "sources" / "x" / "c_sage-2.2.0.tar.gz"
    lines: list[str] = []
    assert build._download(url, dest, lines.append) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data and lines == [f"downloading {url} (0.1 MB)"]
    assert not parts(tmp_path)


def test_the_part_files_of_killed_downloads_are_removed_by_the_next(http_server,
                                                                   tmp_path: Path) -> None:
    """A download killed midway leaves `<pid>.*.part` beside where it was going; the next
    fetch of a wheel removes those whose process is gone, and leaves a live process's
    alone (a build's source download calls the same clean_partials on sources/)."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    wheels = tmp_path / "cache" / "wheels"
    killed = wheels / "old" / f"{dead}.abc.part"
    live = wheels / "old" / f"{os.getpid()}.def.part"
    for f in (killed, live):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")
    url = http_server.add(f"/files/{NAME}", b"x" * 100, "application/octet-stream")
    fetch_wheel(Candidate(NAME, url, "index:test"), lambda _: None)
    assert parts(tmp_path) == [live]


@CALLERS
def test_the_file_is_what_the_server_holds_even_labelled_gzip(get, raw_server,
                                                             tmp_path: Path) -> None:
    """A .tar.gz served with `Content-Encoding: gzip` (a common server setting): decoding it
    would save a .tar whose hash is no longer the published one; asked for identity, a
    server does not compress what it sends."""
    data = gzip.compress(os.urandom(20_000))
    srv = raw_server("HTTP/1.1 200 OK\nContent-Encoding: gzip\n"
                     f"Content-Length: {len(data)}\nConnection: close\n", data)
    path = get(f"{srv.url}/f/{NAME}", tmp_path, hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    assert "accept-encoding: identity" in srv.requests[0]


# -- what goes wrong ---------------------------------------------------------------------

def test_a_source_that_answers_404_is_one_line(http_server, tmp_path: Path) -> None:
    url = http_server.url + "/archive/missing.tar.gz"
    with pytest.raises(BuildError) as e:
        get_source(url, tmp_path)
    assert str(e.value) == f"download of {url} failed: HTTP 404"
    assert not parts(tmp_path)


@CALLERS
def test_a_body_cut_off_short_of_its_length_is_refused(get, raw_server,
                                                      tmp_path: Path) -> None:
    srv = raw_server("HTTP/1.1 200 OK\nContent-Length: 100000\nConnection: close\n",
                     b"x" * 40_000)
    url = f"{srv.url}/f/{NAME}"
    with pytest.raises(InstallError) as e:
        get(url, tmp_path)
    if get is get_wheel:
        assert str(e.value).startswith(f"download of {NAME} from {url} failed: "
                                       "RemoteProtocolError")
    else:
        assert type(e.value) is BuildError
        assert str(e.value).startswith(f"cannot download {url}: RemoteProtocolError")
        assert str(e.value).endswith("carry the source and pass --source FILE")
    assert not parts(tmp_path) and not list((tmp_path / "cache").rglob(NAME))


@CALLERS
def test_a_trickling_server_fails_in_bounded_time(get, raw_server, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_RATE_GRACE", "0.5")
    monkeypatch.setenv("COMFY_ENV_ATTN_MIN_RATE", "1000")
    srv = raw_server("HTTP/1.1 200 OK\nContent-Length: 10000000\n", b"<", trickle=0.1)
    url = f"{srv.url}/f/{NAME}"
    with pytest.raises(InstallError) as e:
        get(url, tmp_path)
    what = NAME if get is get_wheel else url
    assert str(e.value).startswith(f"the download of {what} is too slow: ")
    assert type(e.value) is (InstallError if get is get_wheel else BuildError)
    assert not parts(tmp_path)


@CALLERS
def test_an_unreachable_host_says_what_to_carry(get, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:9/f/{NAME}"
    with pytest.raises(InstallError) as e:
        get(url, tmp_path)
    if get is get_wheel:
        assert type(e.value) is Unreachable
        assert str(e.value).startswith(f"cannot reach 127.0.0.1:9 to download {NAME} "
                                       "(ConnectError")
    else:
        assert type(e.value) is BuildError
        assert str(e.value).startswith(f"cannot download {url}: ConnectError")
    assert not parts(tmp_path)


@CALLERS
def test_a_file_that_cannot_be_saved_is_one_line(get, http_server, cache: Path,
                                                 tmp_path: Path) -> None:
    data = os.urandom(10_000)
    url = http_server.add(f"/f/{NAME}", data, "application/octet-stream")
    # the place the file goes is taken by a folder: os.replace fails as on a full disk
    (cache / "wheels" / hashlib.sha256(data).hexdigest() / NAME).mkdir(parents=True)
    (tmp_path / "sources" / "x" / "c_sage-2.2.0.tar.gz").mkdir(parents=True)
    with pytest.raises(InstallError) as e:
        get(url, tmp_path)
    what = NAME if get is get_wheel else url
    assert str(e.value).startswith(f"cannot save {what} to ")
    assert str(e.value).endswith("(disk full?)")
    assert not parts(tmp_path)


def test_an_index_hash_does_not_choose_the_folder(http_server, cache: Path) -> None:
    data = os.urandom(1_000)
    url = http_server.add(f"/f/{NAME}", data, "application/octet-stream")
    with pytest.raises(InstallError, match=f"hash mismatch for {NAME}: its source says sha256 "
                                           r"\.\./\.\./escape"):
        fetch_wheel(Candidate(NAME, url, "index:test", sha256="../../escape"), lambda _: None)
    assert not (cache / "wheels" / ".." / ".." / "escape").exists()
