"""The edges of installing: uv, downloads with hash checks, and wheel metadata.

Torch is never replaced: a wheel whose requirements need another torch, torchvision or
torchaudio, or another version of anything those require (sympy, triton, nvidia-*, ...), is
refused before anything is installed; everything else goes through uv under a constraint
that pins the target's current versions of all of them.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import re
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from packaging.markers import InvalidMarker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion

from comfy_env_attn.candidates.sources import (
    PYPI_SIMPLE,
    Candidate,
    Limits,
    is_sha256,
    limits_from_env,
    read_bounded,
)
from comfy_env_attn.candidates.wheelname import (
    InvalidWheelName,
    bounded_version,
    safe_wheel_filename,
)
from comfy_env_attn.core.backends import normalize_dist
from comfy_env_attn.core.errors import InstallError
from comfy_env_attn.core.paths import cache_part, parse_toml, write_cache
from comfy_env_attn.core.process import pid_alive
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.installed import TORCH_FAMILY, Installed
from comfy_env_attn.facts.probe_start import uv_binary, uv_warmed

# -- uv -----------------------------------------------------------------------------------

def find_uv() -> str:
    """The uv binary (facts.probe_start.uv_binary says where it is looked for)."""
    found = uv_binary()
    if found is None:
        raise InstallError("uv not found: install it with `python -m pip install uv` (or set $UV)")
    return found


def run_uv(args: Sequence[str], log: Callable[[str], None], *, uv: str | None = None,
           passthrough: bool = False, meanwhile: Callable[[], None] | None = None) -> str:
    """Run uv. passthrough: its own progress and messages go straight to our stderr (a
    terminal); otherwise they are captured and summarised in one line, and replayed when it
    fails. meanwhile: called once uv has started, for work to do while it runs (started
    before it, a thread's imports would hold back uv's start)."""
    exe = uv or find_uv()
    cmd = [exe, *args]
    if "--python" in args[:-1]:
        uv_warmed(args[args.index("--python") + 1])
    log("$ " + " ".join(_short(a) for a in cmd))
    what = f"uv {args[0]} {args[1] if len(args) > 1 else ''}".strip()
    if passthrough:
        code, out, _ = _run_while(cmd, meanwhile, stdout=subprocess.PIPE)
        if code != 0:
            raise InstallError(f"{what} failed (exit {code}): its messages are above")
        return out
    code, out, err = _run_while(cmd, meanwhile, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "UV_NO_PROGRESS": "1"})
    if code != 0:
        lines = (err or out).strip().splitlines()
        raise InstallError(f"{what} failed (exit {code}):\n  " + "\n  ".join(lines[-15:]))
    summary = uv_summary(err)
    if summary:
        log(f"uv: {summary}")
    return err + out


def _run_while(cmd: list[str], meanwhile: Callable[[], None] | None, **how: Any
               ) -> tuple[int, str, str]:
    """subprocess.run's (exit code, stdout, stderr), with `meanwhile` called once the
    process has started; an exception anywhere stops the process, as subprocess.run does.
    uv writes UTF-8 whatever the locale (Windows' cp1252 included): read as such."""
    with subprocess.Popen(cmd, encoding="utf-8", errors="replace", **how) as proc:
        try:
            if meanwhile is not None:
                meanwhile()
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, out or "", err or ""


def uv_compile(python: str, requirements: Sequence[str], args: Sequence[str],
               log: Callable[[str], None]) -> list[tuple[str, str, str, str | None]]:
    """What uv would install for these requirements alone (no dependencies) into this
    interpreter: (canonical name, version, wheel URL, sha256 or None) per package, from the
    PEP 751 lock `uv pip compile --format pylock.toml` writes. Nothing is installed."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "requirements.in")
        src.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
        out = Path(tmp, "pylock.toml")
        run_uv(["pip", "compile", str(src), "--format", "pylock.toml", "--no-deps",
                "--no-header", "--quiet", "--python", python, "-o", str(out), *args], log)
        try:
            doc = parse_toml(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InstallError(f"uv pip compile wrote no readable lock ({e})") from None
    pins: list[tuple[str, str, str, str | None]] = []
    for pkg in doc.get("packages", []):
        name, version = str(pkg.get("name", "")), str(pkg.get("version", ""))
        wheels = [w for w in pkg.get("wheels", []) if isinstance(w, dict) and w.get("url")]
        if not name or not wheels:
            raise InstallError(f"uv resolved {name or 'a requirement'} {version} to no wheel "
                               "(a source distribution is never built here)")
        w = wheels[0]
        sha = w.get("hashes", {}).get("sha256") if isinstance(w.get("hashes"), dict) else None
        pins.append((normalize_dist(name), version, str(w["url"]), sha))
    return pins


_UV_STEP = re.compile(r"^(Resolved|Prepared|Installed|Uninstalled|Audited|Built|Downloaded) ")
_UV_CHANGE = re.compile(r"^ ([-+~]) (\S+)")


def uv_summary(stderr: str) -> str:
    """uv's messages in one line: 'Prepared 1 package in 3ms, Installed 1 package in 2ms:
    + sageattention==2.2.0'."""
    steps = [ln.strip() for ln in stderr.splitlines() if _UV_STEP.match(ln)]
    changes = [f"{m[1]} {m[2]}" for ln in stderr.splitlines() if (m := _UV_CHANGE.match(ln))]
    return ", ".join(steps) + (": " + ", ".join(changes) if changes else "")


def _short(a: str) -> str:
    return a if len(a) < 120 else a[:60] + "..." + a[-50:]


# -- downloads ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetched:
    """A wheel on local disk and its sha256 (or the hashing of it still under way)."""
    candidate: Candidate
    path: Path
    digest: str | FileDigest  # the sha256, or the hashing of a local file still under way
    hash_source: str  # "index" when the source published it, "computed" otherwise

    @property
    def sha256(self) -> str:
        return self.digest if isinstance(self.digest, str) else self.digest.value()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FileDigest:
    """The sha256 of a local wheel whose source published none, computed in a thread once
    uv has started (start(), from the install's `meanwhile`), or at the first value():
    nothing is checked against it, only the lock records it, and uv reads the same file
    either way, so computing it earlier would prove nothing more. Before uv starts it would
    only compete with the install's own work for the interpreter and the cores (5-10 ms of
    a 60 MB wheel's install on 2 cores)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._result: str | OSError = OSError("not hashed")
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def start(self) -> None:
        """Hash in a thread from now on (hashlib lets go of the GIL on large buffers)."""
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._result = sha256_file(self.path)
        except OSError as e:
            self._result = e

    def value(self) -> str:
        self.start()
        assert self._thread is not None
        self._thread.join()
        if isinstance(self._result, OSError):
            raise InstallError(f"cannot read {self.path} to hash it: {self._result}")
        return self._result


class DownloadMeter(Protocol):
    """Where a download reports its progress (a progress bar on a terminal, a summary line
    otherwise)."""

    def start(self, name: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self, got: int, seconds: float, ok: bool) -> None: ...


def fetch_wheel(c: Candidate, log: Callable[[str], None], *, limits: Limits | None = None,
                meter: DownloadMeter | None = None) -> Fetched:
    """The wheel on local disk, its sha256 checked against the source's (or computed)."""
    try:
        safe_wheel_filename(c.filename)
    except InvalidWheelName as e:
        raise InstallError(f"refusing a wheel from {c.source}: {e}") from None
    parts = urlsplit(c.url)
    dest_dir = cache_part("downloads")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InstallError(f"cannot create the download folder {dest_dir}: {e}") from None
    clean_partials(dest_dir)
    if parts.scheme in ("", "file"):
        if c.source.startswith(("index:", "find-links:http:", "find-links:https:")):
            raise InstallError(f"{c.filename}: {c.source} links a local file ({c.url}); a "
                               "remote index may not: refusing it")
        path = Path(unquote(parts.path) if parts.scheme == "file" else c.url)
        if not path.is_file():
            raise InstallError(f"{c.filename}: " + (f"{path} is a folder, not a wheel file"
                                                    if path.is_dir() else f"no such file {path}"))
        if not c.sha256:
            return Fetched(c, path, FileDigest(path), "computed")
        sha = sha256_file(path)
    elif parts.scheme in ("http", "https"):
        path, sha = _download(c, dest_dir, log, limits or limits_from_env(), meter)
    else:
        raise InstallError(f"{c.filename}: cannot fetch {parts.scheme}: URLs ({c.url[:120]})")
    if c.sha256 and sha != c.sha256.lower():
        raise InstallError(f"hash mismatch for {c.filename}: its source says sha256 "
                           f"{c.sha256}, the file has {sha}; refusing to install it")
    return Fetched(c, path, sha, "index" if c.sha256 else "computed")


_IN_USE: list[Path] = []


def mark_in_use(folder: Path) -> None:
    """`<pid>.inuse` in a downloaded wheel's folder for as long as this process runs: uv may
    still read the wheel, and `cache clean` (cli.cache) leaves a folder alone while the
    process its marker names is alive. A killed process's marker names no live process."""
    mark = folder / f"{os.getpid()}.inuse"
    if mark in _IN_USE:
        return
    try:
        mark.touch()
    except OSError:
        return  # a read-only cache: nothing to protect it from either
    if not _IN_USE:
        atexit.register(unmark_in_use)
    _IN_USE.append(mark)


def unmark_in_use() -> None:
    while _IN_USE:
        _IN_USE.pop().unlink(missing_ok=True)


def clean_partials(dest_dir: Path) -> None:
    """Remove the .part files (and .inuse marks), one folder down, of downloads whose process
    is gone (killed midway): wheels/<hash>/ and sources/<hash>/ alike."""
    for part in [*dest_dir.glob("*/*.part"), *dest_dir.glob("*/*.inuse")]:
        pid = part.name.split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            part.unlink(missing_ok=True)


def _download(c: Candidate, dest_dir: Path, log: Callable[[str], None], limits: Limits,
              meter: DownloadMeter | None = None) -> tuple[Path, str]:
    import httpx

    # the source's hash names a folder only when it is one: an index's `#sha256=../..`
    # must not choose where files go
    sha = c.sha256.lower() if is_sha256(c.sha256) else None
    cached = dest_dir / (sha or "unhashed") / c.filename
    if sha and cached.is_file() and sha256_file(cached) == sha:
        mark_in_use(cached.parent)
        return cached, sha
    try:
        got = download(c.url, c.filename, part_dir=cached.parent,
                       to=lambda digest: dest_dir / digest / c.filename, log=log, limits=limits,
                       meter=meter)
        mark_in_use(got[0].parent)
        return got
    except httpx.HTTPError as e:
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            raise Unreachable(f"cannot reach {urlsplit(c.url).netloc} to download "
                              f"{c.filename} ({type(e).__name__}: {e}); on an offline "
                              "machine, carry the wheels and pass --find-links FOLDER") from None
        raise InstallError(f"download of {c.filename} from {c.url} failed: "
                           f"{type(e).__name__}: {e}") from None


# pip's choice too: a server that compresses what it sends, or labels a .tar.gz as
# gzip-encoded, would otherwise hand over bytes other than the file its hash is of
_AS_STORED = {"Accept-Encoding": "identity"}


def download(url: str, name: str, *, part_dir: Path, to: Callable[[str], Path],
             log: Callable[[str], None], limits: Limits,
             error: type[InstallError] = InstallError,
             meter: DownloadMeter | None = None) -> tuple[Path, str]:
    """Stream `url` into a `<pid>.*.part` file in `part_dir` (what clean_partials knows
    for a killed run's), hashing it as it comes, then move it to `to(its sha256)` on the same
    filesystem. `name` is what messages call it. The limits bound it (read_bounded); a bad
    status, a cut-off body or a file that cannot be written is `error`; httpx's own errors
    are left to the caller, which knows what to advise. No .part is left after a failure."""
    from comfy_env_attn.candidates.sources import http_client

    tmp: Path | None = None
    try:
        part_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=part_dir, prefix=f"{os.getpid()}.", suffix=".part")
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        started = time.monotonic()
        client = http_client(tls=url.startswith("https:"))
        with os.fdopen(fd, "wb") as out, \
                client.stream("GET", url, headers=_AS_STORED, timeout=limits.timeout) as r:
            if r.status_code != 200:
                where = "" if name == url else f"{url} answered "
                raise error(f"download of {name} failed: {where}HTTP {r.status_code}")
            expected = int(r.headers.get("content-length", "0") or 0)
            if meter is None:
                log(f"downloading {name}" + (f" ({expected / 1e6:.1f} MB)" if expected else ""))
            else:
                meter.start(name, expected or None)

            def sink(chunk: bytes) -> None:
                out.write(chunk)
                h.update(chunk)
                if meter is not None:
                    meter.advance(len(chunk))

            got, done = 0, False
            try:
                got = read_bounded(r, sink, what=f"the download of {name}", limits=limits,
                                   deadline=limits.download_deadline, started=started,
                                   error=error, raw=True)
                done = True
            finally:
                if meter is not None:
                    meter.finish(got, time.monotonic() - started, done)
        if expected and got != expected:
            raise error(f"download of {name} was cut off: got {got} of {expected} bytes")
        sha = h.hexdigest()
        final = to(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return final, sha
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise error(f"cannot save {name} to {part_dir}: {e.strerror or e} (disk full?)") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


class Unreachable(InstallError):
    """The wheel's host cannot be reached: other wheels on that host are skipped."""


# -- metadata -----------------------------------------------------------------------------

def wheel_directory(path: Path) -> list[zipfile.ZipInfo]:
    """A wheel's zip directory: what it will really write, and how large."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InstallError(f"{path.name} is not a valid wheel ({e})") from None


def wheel_listing(path: Path) -> list[str]:
    """The names in a wheel's zip directory."""
    return [i.filename for i in wheel_directory(path)]


# What a wheel may unpack to. The largest real attention wheels (flash-attn, xformers, for
# every SM) inflate to about 1.5 GB, their libraries at most about 5 times their deflated
# size; a file that inflates 100 times beyond 64 MB, or a wheel beyond 16 GB, is a
# decompression bomb, which would fill the disk as uv unpacks it.
UNPACKED_MAX_BYTES = 16 * 10**9
RATIO_MAX, RATIO_FROM_BYTES = 100, 64 * 10**6
TEXT_MEMBER_MAX_BYTES = 64 * 10**6  # RECORD, entry_points.txt, a .pth: read whole


def wheel_bomb(path: Path, infos: list[zipfile.ZipInfo] | None = None) -> str | None:
    """Why the wheel's zip directory (`infos`, read here if not given) says it would unpack
    to far more than any wheel does (None: it does not)."""
    if infos is None:
        try:
            infos = wheel_directory(path)
        except InstallError as e:
            return str(e)
    total = sum(i.file_size for i in infos)
    if total > UNPACKED_MAX_BYTES:
        return (f"{path.name} would unpack to {total / 1e9:.0f} GB (more than "
                f"{UNPACKED_MAX_BYTES // 10**9} GB): a decompression bomb, not a wheel")
    for i in infos:
        if i.file_size > RATIO_FROM_BYTES and i.file_size > RATIO_MAX * max(i.compress_size, 1):
            return (f"{path.name}: {i.filename} would inflate {i.compress_size} bytes to "
                    f"{i.file_size / 1e6:.0f} MB, over {RATIO_MAX} times: a decompression "
                    "bomb")
    return None


def _read_member(z: zipfile.ZipFile, name: str, max_bytes: int, wheel: str) -> str:
    """One member as text, never more than max_bytes read whatever its header says."""
    if z.getinfo(name).file_size > max_bytes:
        raise InstallError(f"{wheel}: {name} is {z.getinfo(name).file_size / 1e6:.0f} MB, "
                           f"more than any such file ({max_bytes // 10**6 or 1} MB at most)")
    with z.open(name) as f:  # zipfile stops at the stated size, and checks the CRC there
        data = f.read(max_bytes)
    return data.decode("utf-8", errors="replace")


def wheel_member(path: Path, name: str) -> str:
    """One file of a wheel as text; "" when the wheel has none by that name."""
    try:
        with zipfile.ZipFile(path) as z:
            return _read_member(z, name, TEXT_MEMBER_MAX_BYTES, path.name)
    except KeyError:
        return ""
    except (zipfile.BadZipFile, OSError) as e:
        raise InstallError(f"{path.name} is not a valid wheel ({e})") from None


def root_is_purelib(path: Path, dist_dir: str) -> bool:
    """The wheel's WHEEL file says where its root goes: purelib (the default) or platlib."""
    try:
        with zipfile.ZipFile(path) as z:
            text = z.read(f"{dist_dir}.dist-info/WHEEL").decode("utf-8", errors="replace")
    except (KeyError, zipfile.BadZipFile, OSError):
        return True
    return not re.search(r"(?mi)^Root-Is-Purelib:\s*false\s*$", text)


def wheel_metadata(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
            if name is None:
                raise InstallError(f"{path.name} has no .dist-info/METADATA: not a wheel")
            return _read_member(z, name, METADATA_MAX_BYTES, path.name)
    except zipfile.BadZipFile:
        raise InstallError(f"{path.name} is not a valid wheel (bad zip)") from None


METADATA_MAX_BYTES = 1 << 20


def _metadata_cache(c: Candidate) -> Path | None:
    """Where a wheel's metadata is kept between runs: only for a wheel whose source gives its
    sha256 (that file's metadata never changes)."""
    if not is_sha256(c.sha256):
        return None
    return cache_part("metadata") / f"{c.sha256.lower()}.METADATA"


def _read_cached(cached: Path | None) -> str | None:
    if cached is None:
        return None
    try:
        return cached.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _write_cached(cached: Path | None, text: str) -> None:
    if cached is not None:
        write_cache(cached, text)


def fetch_metadata(c: Candidate, limits: Limits | None = None) -> str | None:
    """PEP 658 metadata where the index serves it (small, before the big download); None
    when it cannot be had (the wheel's own METADATA is read after the download anyway).
    Kept on disk by the wheel's sha256: plan and install read it once."""
    if not c.metadata_url or urlsplit(c.metadata_url).scheme not in ("http", "https"):
        return None
    cached = _metadata_cache(c)
    hit = _read_cached(cached)
    if hit is not None:
        return hit
    text = _fetch_metadata(c, limits)
    if text is not None:
        _write_cached(cached, text)
    return text


def _fetch_metadata(c: Candidate, limits: Limits | None) -> str | None:
    assert c.metadata_url is not None
    import httpx

    from comfy_env_attn.candidates.sources import http_client

    lim = limits or limits_from_env()
    body = bytearray()
    try:
        client = http_client(tls=c.metadata_url.startswith("https:"))
        with client.stream("GET", c.metadata_url, timeout=lim.timeout) as r:
            if r.status_code != 200:
                return None
            read_bounded(r, body.extend, what=f"the metadata of {c.filename}", limits=lim,
                         deadline=lim.index_deadline, started=time.monotonic(),
                         max_bytes=METADATA_MAX_BYTES, error=InstallError)
    except (httpx.HTTPError, InstallError):
        return None
    return body.decode("utf-8", errors="replace")


def remote_metadata(c: Candidate, limits: Limits | None = None) -> str | None:
    """A remote wheel's METADATA without downloading it: PEP 658 where the index serves it,
    otherwise read out of the wheel's zip directory with a few HTTP range requests (indexes
    that do not advertise PEP 658, GitHub releases). None when neither works."""
    if c.metadata_url:
        return fetch_metadata(c, limits)
    if urlsplit(c.url).scheme not in ("http", "https"):
        return None
    cached = _metadata_cache(c)
    hit = _read_cached(cached)
    if hit is not None:
        return hit
    import httpx

    lim = limits or limits_from_env()
    try:
        with zipfile.ZipFile(_RangeFile(c.url, lim)) as z:
            name = next((n for n in z.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
            if name is None or z.getinfo(name).file_size > METADATA_MAX_BYTES:
                return None
            text = z.read(name).decode("utf-8", errors="replace")
    except (httpx.HTTPError, zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    _write_cached(cached, text)
    return text


class _RangeFile(io.RawIOBase):
    """A remote file read through HTTP range requests in 64 kB blocks, for zipfile: a wheel's
    directory and its METADATA are a few blocks at most (at most 64 blocks are read)."""

    BLOCK = 1 << 16
    MAX_BLOCKS = 64

    def __init__(self, url: str, limits: Limits) -> None:
        from comfy_env_attn.candidates.sources import http_client

        self.url, self.limits = url, limits
        self.client = http_client(tls=url.startswith("https:"))
        self.blocks: dict[int, bytes] = {}
        self.pos = 0
        # the last block first: it holds the zip directory and tells the size
        data, total = self._get(f"bytes=-{self.BLOCK}")
        self.size = total
        self.blocks[total - len(data)] = data

    def _get(self, rng: str) -> tuple[bytes, int]:
        if len(self.blocks) >= self.MAX_BLOCKS:
            raise OSError("reading the wheel's directory needs too many range requests")
        body = bytearray()
        # streamed and bounded: a server that ignores Range (a whole wheel) or trickles
        # must not stall the plan
        with self.client.stream("GET", self.url, headers={"Range": rng},
                                timeout=self.limits.timeout) as r:
            m = re.match(r"^bytes (\d+)-(\d+)/(\d+)$", r.headers.get("content-range", ""))
            if r.status_code != 206 or m is None:
                raise OSError(f"no range reads from {urlsplit(self.url).netloc} (HTTP "
                              f"{r.status_code})")
            try:
                read_bounded(r, body.extend, what=f"a range of {self.url}", limits=self.limits,
                             deadline=self.limits.index_deadline, started=time.monotonic(),
                             max_bytes=2 * self.BLOCK, error=InstallError)
            except InstallError as e:
                raise OSError(str(e)) from None
        return bytes(body), int(m[3])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), max(0, self.size - self.pos))
        done = 0
        while done < n:
            at = self.pos + done
            got = self._at(at, n - done)
            view[done:done + len(got)] = got
            done += len(got)
        self.pos += n
        return n

    def _at(self, at: int, want: int) -> bytes:
        for start, data in self.blocks.items():
            if start <= at < start + len(data):
                return data[at - start:at - start + want]
        start = at - at % self.BLOCK
        data, _ = self._get(f"bytes={start}-{min(self.size, start + self.BLOCK) - 1}")
        self.blocks[start] = data
        return data[at - start:at - start + want]


def requirements(metadata: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]


@dataclass(frozen=True)
class Needs:
    """What a wheel's requirements ask of the target: refusals, and what uv must add."""
    refused: list[str]  # reasons this wheel cannot go in without replacing a protected one
    missing: list[str]  # other requirements the target lacks (installed through uv)


def check_requirements(filename: str, reqs: list[str], installed: dict[str, Installed],
                       markers: dict[str, str], protect: Mapping[str, str] | None = None,
                       extras: frozenset[str] = frozenset()) -> Needs:
    """Each requirement against the target: one that would change torch, torchvision,
    torchaudio or anything they require (`protect`, name -> version) is refused. `extras`:
    the extras the distribution was asked for (`foo[fast]`), whose requirements count too.
    A requirement with extras that an installed distribution satisfies brings that
    distribution's requirements for those extras, checked the same way."""
    refused: list[str] = []
    missing: list[str] = []
    guarded = set(TORCH_FAMILY) | set(protect or {})
    # (whose requirement, its text, the extras its distribution was asked for)
    todo = [(filename, text, extras) for text in reqs]
    expanded: set[tuple[str, str]] = set()  # (installed distribution, extra) already added
    while todo:
        who, text, asked = todo.pop(0)
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        try:
            if req.marker is not None and not any(
                    req.marker.evaluate({**markers, "extra": x}) for x in ("", *sorted(asked))):
                continue
        except (InvalidMarker, UndefinedEnvironmentName):
            continue
        name = str(canonicalize_name(req.name))
        have = installed.get(name)
        ok = have is not None and satisfies(have.version, str(req.specifier))
        if ok and have is not None:
            new = sorted(x for x in requested_extras(req) if (name, x) not in expanded)
            expanded.update((name, x) for x in new)
            todo += [(f"{name} {have.version}", r, frozenset(new))
                     for r in have.requires if new and _for_extras(r)]
        req.marker = None  # evaluated here, with the extras asked for: uv would not know
        if name in guarded:
            if not ok:
                now = f"has {name} {have.version}" if have else f"has no {name}"
                why = "" if name in TORCH_FAMILY else ", which torch needs"
                refused.append(f"{who} requires {req}; the target {now}: installing it "
                               f"would replace {name}{why}")
        elif not ok:
            missing.append(str(req))
    return Needs(refused, missing)


def requested_extras(req: Requirement) -> frozenset[str]:
    """The extras a requirement asks for, normalised as markers compare them (PEP 685)."""
    return frozenset(str(canonicalize_name(x)) for x in req.extras)


def _for_extras(text: str) -> bool:
    """Whether a requirement is one of an extra's (its marker names `extra`): the others
    are the distribution's own, which its installation already answered for."""
    return "extra" in text.partition(";")[2]


def satisfies(version: str, spec: str) -> bool:
    """Whether a version as installed or chosen is in the specifier (prereleases too)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    v = bounded_version(version)
    if v is None:
        return False
    try:
        return SpecifierSet(spec).contains(v, prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def uv_index_args(index_urls: Sequence[str], find_links: Sequence[str]) -> list[str]:
    args: list[str] = []
    for i, url in enumerate(index_urls):
        args += ["--index-url" if i == 0 else "--extra-index-url", url]
    for f in find_links:
        args += ["--find-links", f]
    return args


def offline_args(index_urls: Sequence[str], find_links: Sequence[str], *, pypi: bool,
                 log: Callable[[str], None]) -> list[str]:
    """What tells uv to stay off the network for requirements: when every source given is
    local (find-links folders, no index) it must not ask PyPI; when the index it would ask
    cannot be reached, it must not wait on it either (its cache and the folders serve)."""
    remote_links = [f for f in find_links if urlsplit(f).scheme in ("http", "https")]
    if find_links and not (index_urls or remote_links or pypi):
        return ["--no-index", "--offline"]
    index = (index_urls[0] if index_urls else os.environ.get("UV_DEFAULT_INDEX")
             or os.environ.get("UV_INDEX_URL") or PYPI_SIMPLE)
    parts = urlsplit(index)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return []
    import socket

    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=3).close()
    except OSError as e:
        log(f"{parts.hostname} cannot be reached ({e.strerror or e}): requirements come from "
            "uv's cache and the --find-links folders only (uv --offline)")
        return ["--offline"]
    return []


def constraint_file(pins: Mapping[str, str], folder: Path) -> Path:
    """torch's family and everything it requires, pinned at the installed versions."""
    p = folder / "torch-constraint.txt"
    p.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()), encoding="utf-8")
    return p

