"""Where the tool keeps its files on this machine (standard library only)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import Any


def parse_toml(text: str) -> dict[str, Any]:
    """TOML text as a dict, read by tomllib (Python 3.11+) or tomli (3.10), imported at its
    first use rather than at each start of the tool (4 ms). Raises ValueError (the
    module's TOMLDecodeError is one) or RecursionError (tables nested too deep)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return dict(tomllib.loads(text))


def cache_dir() -> Path:
    """$COMFY_ENV_ATTN_CACHE_DIR, else the platform's user cache folder: probe results,
    downloads, build logs and the wheelhouse."""
    env = os.environ.get("COMFY_ENV_ATTN_CACHE_DIR")
    if env:
        return Path(os.path.abspath(env))  # one folder, wherever the command runs from
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "comfy-env-attn" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "comfy-env-attn"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "comfy-env-attn"


# The parts of the cache folder: name -> (its folder, or the patterns of its file names;
# what it holds). Each part is written in one place (named beside it) and listed and
# cleaned by `comfy-env-attn cache` (cli.cache). The wheelhouse (candidates.wheelhouse) is
# apart: it may be a folder of the user's own.
ANSWER_KINDS = ("interp", "torch", "files", "owners", "closure")  # answer_file
ANSWER_KEY_HEX = 20  # answer_file's key: this many hex digits of the path's sha256
CACHE_PARTS: dict[str, tuple[str, str]] = {
    "downloads": ("wheels/", "wheels downloaded from indexes, reused by the next install"
                  ),  # install.edges
    "metadata": ("metadata/", "wheel metadata read when planning (PEP 658)"),  # install.edges
    "probes": (" ".join(f"{k}-*.json" for k in ANSWER_KINDS),
               "answers about interpreters, torch installs and what they require, installed "
               "files and what each site dir's distributions own, asked again when what "
               "they describe changes"
               ),  # answer_file
    "sources": ("sources/", "source archives fetched to build from"),  # install.build
    "build": ("build/", "build folders (a killed build's, or one running now)"),  # install.build
    "build logs": ("build-logs/", "the compiler's output of each build"),  # install.build
}


def cache_part(name: str) -> Path:
    """The folder of a part of the cache (CACHE_PARTS)."""
    return cache_dir() / CACHE_PARTS[name][0].rstrip("/")


def answer_file(kind: str, path: str, root: Path | None = None) -> Path:
    """Where an answer about one file or folder is cached (in `root`, else the cache folder):
    `interp` an interpreter's facts, `torch` a torch install's (shared by the venvs that see
    it), `files` which files of a distribution matched its RECORD, `owners` what the RECORDs
    of a site dir's distributions reach (facts.installed.could_own), `closure` what torch
    requires, transitively, as installed (facts.installed.protected)."""
    assert kind in ANSWER_KINDS, kind
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:ANSWER_KEY_HEX]
    return (cache_dir() if root is None else root) / f"{kind}-{key}.json"


def replace_file(path: Path, text: str, *, durable: bool = False, tmp: Path | None = None,
                 newline: str | None = None) -> None:
    """Write a text file whole or not at all: into a temporary file beside it (`tmp`, else
    `.NAME.PID.tmp`), then renamed over it, so that a reader, a kill or a full disk leaves
    the old file or the new one, never half of one. `durable`: forced to disk before the
    rename, and the rename itself after it (its folder's entry; POSIX: Windows has no such
    call and NTFS journals the rename): the journal, a RECORD a rollback must read after a
    power cut. On any failure
    the temporary file is removed and the error raised, the caller's to report or pass
    over (a cache that cannot be written is only slower)."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable and os.name != "nt":
        # the file is written and renamed: a filesystem that cannot sync a folder (some
        # network and FUSE ones answer EINVAL) makes it no less written
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_cache(path: Path, text: str) -> None:
    """A cache file written whole (replace_file), its folder made; one that cannot be
    written is passed over (a cache is only ever faster), and said once: every run then
    does its work again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, text)
    except OSError as e:
        if not _UNWRITABLE:
            _UNWRITABLE.append(path)
            from comfy_env_attn.core.progress import notice

            folder = cache_dir()
            why = "a file, not a folder" if folder.is_file() else e.strerror or str(e)
            notice(f"comfy-env-attn: cannot write to its cache folder {folder} ({why}): "
                   "nothing is cached, so each run does its work again "
                   "(COMFY_ENV_ATTN_CACHE_DIR can name another folder)")


_UNWRITABLE: list[Path] = []  # the first cache file that could not be written, once said


FILE_MAX_BYTES = 256 * 10**6  # a lock with thousands of checks is a few MB


def readable_file(path: Path) -> None:
    """ValueError unless `path`, where it exists, is a regular file of a sane size: a FIFO
    in its place would block the read (ComfyUI's start, where the dispatcher reads the
    lock), a device would never end. A path that does not exist is left to the reader."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{str(path)!r} is not a regular file")
    if st.st_size > FILE_MAX_BYTES:
        raise ValueError(f"{str(path)!r} is {st.st_size / 1e6:.0f} MB, more than any such "
                         f"file ({FILE_MAX_BYTES // 10**6} MB at most)")
