"""`comfy-env-attn cache` and `cache clean`: what the cache folder holds, what clean removes,
and what it keeps (the wheelhouse, a folder of the user's own, what a live process uses)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, venv_python
from test_workflow import check

from comfy_env_attn.core.paths import CACHE_PARTS


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def _parts(r: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    """The parts of a `cache --json` document, checked against docs/json.md's schema."""
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    check(doc, "cache")
    return {p["name"]: p for p in doc["parts"]}


H = [c * 64 for c in "abcd"]  # <sha256>/ folders, as downloads and sources are kept


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, dict[str, str], int]:
    """A cache folder with something in each part, a download and a build folder of this
    (live) process, leftovers of a dead one, a read-only source tree, and entries the tool
    never writes (in the folder and in its parts' folders)."""
    cache = tmp_path / "cache"
    live, dead = os.getpid(), _dead_pid()
    _write(cache / "wheels" / H[0] / "sageattention-2.2.0-py3-none-any.whl", 1000)
    _write(cache / "wheels" / H[1] / f"{live}.xyz.part", 300)
    _write(cache / "wheels" / "unhashed" / f"{dead}.xyz.part", 200)
    _write(cache / "metadata" / f"{H[0]}.METADATA", 50)
    for kind in ("interp", "torch", "files"):
        _write(cache / f"{kind}-0123456789abcdef0123.json", 10)
    src = _write(cache / "sources" / H[3] / "sage" / ".git" / "objects" / "pack", 400)
    src.chmod(0o444)
    src.parent.chmod(0o555)  # a git checkout's objects: read-only (Windows: undeletable)
    _write(cache / "build" / f"{live}.sage-abcd1234" / "setup.py", 20)
    _write(cache / "build" / f"{dead}.sage-efgh5678" / "setup.py", 30)
    _write(cache / "build" / "sage_fp16-k1l2m3n4" / "setup.py", 40)  # no pid: not its name
    old_log = _write(cache / "build-logs" / "sageattention-2.2.0-1.log", 70)
    os.utime(old_log, (1e9, 1e9))  # written long before the running build started
    _write(cache / "build-logs" / "sageattention-2.2.0-2.log", 7)  # the running build's
    _write(cache / f".interp-{'0' * 20}.json.{dead}.tmp", 3)  # a killed write's
    _write(cache / f".torch-{'0' * 20}.json.{live}.tmp", 4)  # a write going on
    _write(cache / "wheelhouse" / "sageattention" / "e" / "w.whl", 5000)
    _write(cache / "wheelhouse" / "sageattention" / "e" / "build.json", 100)
    _write(cache / "notes.txt", 5)  # the tool never writes these: they stay
    _write(cache / "files-list.json", 5)
    _write(cache / "build" / "my-project" / "main.c", 5)
    _write(cache / "wheelhouse" / "sageattention" / "mine.whl", 5)
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(cache), "COMFY_ENV_ATTN_WHEELHOUSE": ""}
    return cache, env, live


def test_cache_lists_each_part_with_its_files_and_size(filled: tuple[Path, dict[str, str], int]
                                                      ) -> None:
    cache, env, _live = filled
    parts = _parts(cli("cache", "--json", env=env))
    assert list(parts) == [*CACHE_PARTS, "wheelhouse"]
    assert (parts["downloads"]["files"], parts["downloads"]["bytes"]) == (3, 1500)
    assert (parts["probes"]["files"], parts["probes"]["bytes"]) == (5, 37)
    assert (parts["build"]["files"], parts["build"]["bytes"]) == (2, 50)
    assert (parts["build logs"]["files"], parts["build logs"]["bytes"]) == (2, 77)
    assert (parts["wheelhouse"]["files"], parts["wheelhouse"]["bytes"]) == (2, 5100)
    assert parts["downloads"]["where"] == [str(cache / "wheels")]
    assert all(p["removed_bytes"] == 0 for p in parts.values())
    table = cli("cache", env=env)
    assert table.returncode == 0, table.stderr
    assert str(cache) in table.stdout and "1.5 KB" in table.stdout  # the downloads
    assert cache.joinpath("wheels", H[0]).exists()  # listing removes nothing


def test_clean_removes_what_the_tool_wrote_but_the_wheelhouse_and_what_a_live_process_uses(
        filled: tuple[Path, dict[str, str], int]) -> None:
    cache, env, live = filled
    parts = _parts(cli("cache", "clean", "--json", env=env))
    assert parts["downloads"]["removed_bytes"] == 1200  # the wheel and the dead .part
    assert parts["downloads"]["kept"] == [f"{cache / 'wheels' / H[1]} (in use by process {live})"]
    assert parts["build"]["removed_bytes"] == 30
    assert parts["build"]["kept"] == [
        f"{cache / 'build' / f'{live}.sage-abcd1234'} (in use by process {live})",
        "2 entries not named as comfy-env-attn names its own "
        f"({cache / 'build' / 'my-project'}, ...)"]
    assert parts["build logs"]["removed_bytes"] == 70  # the running build's log stays
    assert parts["probes"]["removed_bytes"] == 33  # all but the write going on
    assert parts["sources"]["removed_bytes"] == 400  # read-only, removed all the same
    assert parts["wheelhouse"]["removed_bytes"] == 0 and "--wheelhouse" in \
        parts["wheelhouse"]["kept"][0]  # type: ignore[index]
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert left == sorted([
        f"build/{live}.sage-abcd1234/setup.py", "build/my-project/main.c", "notes.txt",
        "build/sage_fp16-k1l2m3n4/setup.py", "build-logs/sageattention-2.2.0-2.log",
        f".torch-{'0' * 20}.json.{live}.tmp",
        "files-list.json", f"wheels/{H[1]}/{live}.xyz.part", "wheelhouse/sageattention/e/w.whl",
        "wheelhouse/sageattention/e/build.json", "wheelhouse/sageattention/mine.whl"])
    assert not (cache / "metadata").exists()
    again = _parts(cli("cache", "clean", "--json", env=env))  # nothing more to do: no error
    assert sum(p["removed_bytes"] for p in again.values()) == 0  # type: ignore[misc]

    gone = _parts(cli("cache", "clean", "--wheelhouse", "--json", env=env))
    assert gone["wheelhouse"]["removed_bytes"] == 5100
    assert sorted(p.name for p in (cache / "wheelhouse").rglob("*")) == \
        ["mine.whl", "sageattention"]  # what it did not build stays


def test_a_wheelhouse_of_the_users_own_is_never_removed(tmp_path: Path) -> None:
    mine = _write(tmp_path / "my-wheels" / "sageattention" / "e" / "w.whl", 10)
    _write(tmp_path / "my-wheels" / "sageattention" / "e" / "build.json", 10)
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "cache"),
           "COMFY_ENV_ATTN_WHEELHOUSE": str(tmp_path / "my-wheels")}
    parts = _parts(cli("cache", "clean", "--wheelhouse", "--json", env=env))
    assert mine.exists() and parts["wheelhouse"]["removed_bytes"] == 0
    assert "your own" in parts["wheelhouse"]["kept"][0]  # type: ignore[index]
    assert "never removed" in str(parts["wheelhouse"]["what"])


def test_what_the_tool_writes_is_in_a_part_and_cleaned(tmp_path: Path,
                                                       plain_venv: Path) -> None:
    """A real probe's answers land where `cache` looks for them (answer_file, CACHE_PARTS)."""
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "cache")}
    r = cli("probe", "--python", str(venv_python(plain_venv)), "--json", env=env)
    assert r.returncode == 0, r.stderr
    written = {p.name for p in (tmp_path / "cache").iterdir()}
    assert any(n.startswith("interp-") for n in written), written
    parts = _parts(cli("cache", "clean", "--json", env=env))
    assert parts["probes"]["files"] == len(written) and parts["probes"]["removed_bytes"]
    assert not any((tmp_path / "cache").iterdir())


def test_clean_removes_read_only_files_as_windows_refuses_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows will not delete a file without its write bit (a git checkout's objects), where
    Linux asks only the folder: unlink here refuses such files as Windows does."""
    from comfy_env_attn.cli import cache as cache_cli

    real = os.unlink

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        full = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"),
                                                        path)
        if not os.lstat(full).st_mode & stat.S_IWRITE:
            raise PermissionError(13, "Access is denied", full)
        real(path, dir_fd=dir_fd)

    tree = tmp_path / "sources" / "d"
    for f in (_write(tree / "objects" / "pack", 4), _write(tree / "top", 4)):
        f.chmod(0o444)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(PermissionError):
        unlink(str(tree / "top"))  # the fake refuses, as Windows would
    part = cache_cli.Part("sources", "", [], [tmp_path / "sources"])
    assert cache_cli.clean(part) == [] and not (tmp_path / "sources").exists()


def test_a_wheelhouse_that_is_the_cache_or_inside_a_part_is_the_users(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    built = _write(cache / "sageattention" / "e" / "build.json", 10)
    notes = _write(cache / "notes.txt", 5)
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(cache), "COMFY_ENV_ATTN_WHEELHOUSE": str(cache)}
    parts = _parts(cli("cache", "clean", "--wheelhouse", "--json", env=env))
    assert built.exists() and notes.exists() and parts["wheelhouse"]["removed_bytes"] == 0
    inner = cache / "build" / f"{_dead_pid()}.sage-abcd1234"  # named like a build folder
    kept = _write(inner / "sageattention" / "e" / "w.whl", 10)
    env["COMFY_ENV_ATTN_WHEELHOUSE"] = str(inner)
    parts = _parts(cli("cache", "clean", "--json", env=env))
    assert kept.exists() and parts["build"]["removed_bytes"] == 0


@pytest.mark.skipif(os.name == "nt", reason="making links needs a privilege there")
def test_a_part_folder_that_is_a_link_is_left_alone(tmp_path: Path) -> None:
    elsewhere = _write(tmp_path / "elsewhere" / H[0] / "x.whl", 10)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "wheels").symlink_to(tmp_path / "elsewhere")
    parts = _parts(cli("cache", "clean", "--json",
                       env={"COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "cache")}))
    assert elsewhere.exists() and parts["downloads"]["files"] == 0
    assert (tmp_path / "cache" / "wheels").is_symlink()


def test_clean_refuses_a_cache_folder_that_is_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    mine = _write(home / "build" / "1.sage-abcdefgh" / "main.c", 5)
    r = cli("cache", "clean", env={"HOME": str(home), "COMFY_ENV_ATTN_CACHE_DIR": str(home)})
    assert r.returncode == 2 and "refusing to clean your home folder" in r.stderr
    assert mine.exists()
    rel = cli("cache", "--json", env={"COMFY_ENV_ATTN_CACHE_DIR": "."})  # from the repository
    assert json.loads(rel.stdout)["folder"] == str(Path(__file__).resolve().parent.parent)


@pytest.mark.skipif(os.name == "nt", reason="making links needs a privilege there")
def test_the_read_only_retry_follows_no_link_and_retries_only_removals(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comfy_env_attn.cli import cache as cache_cli

    secret = _write(tmp_path / "secret", 3)
    secret.chmod(0o444)
    entry = tmp_path / "cache" / "build" / "1.sage-abcdefgh"
    entry.mkdir(parents=True)
    (entry / "lnk").symlink_to(secret)
    real, refused = os.unlink, []

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        if path.endswith("lnk") and not refused:  # refused once, as Windows might
            refused.append(path)
            raise PermissionError(13, "Access is denied", path)
        real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    cache_cli._remove(entry)
    monkeypatch.undo()
    assert refused and not entry.exists()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o444  # the link's target untouched
    with pytest.raises(PermissionError, match="no listing"):  # not a TypeError
        cache_cli._writable(os.scandir, str(entry), PermissionError(13, "no listing"))


@pytest.mark.skipif(os.name == "nt", reason="making links needs a privilege there")
def test_odd_layouts_are_counted_or_left_never_a_crash(tmp_path: Path) -> None:
    """A file where a part's folder should be, a file and a broken link where wheelhouse
    folders should be: listed as nothing of the tool's, left as they are."""
    cache = tmp_path / "cache"
    _write(cache / "wheels", 5)  # a file, not the downloads folder
    _write(cache / "wheelhouse" / "sageattention", 5)  # a file, not a dist's folder
    (cache / "wheelhouse" / "flash-attn").mkdir()
    (cache / "wheelhouse" / "flash-attn" / "e").symlink_to(tmp_path / "gone")
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(cache), "COMFY_ENV_ATTN_WHEELHOUSE": ""}
    parts = _parts(cli("cache", "clean", "--wheelhouse", "--json", env=env))
    assert parts["downloads"]["files"] == 0 and parts["wheelhouse"]["files"] == 0
    assert (cache / "wheels").is_file() and (cache / "wheelhouse" / "sageattention").is_file()
    assert (cache / "wheelhouse" / "flash-attn" / "e").is_symlink()


@pytest.mark.skipif(os.name == "nt", reason="making links needs a privilege there")
def test_third_review_layouts(tmp_path: Path) -> None:
    """Names whose digits are no pid, a default wheelhouse that is a link, a home folder
    reached through a link, an empty user wheelhouse that is a part's folder, and a cache
    path that reads as rich markup: each kept or refused, never a traceback."""
    cache = tmp_path / "c[/y]"
    big = _write(cache / "build" / f"{'9' * 20}.sage-abcdefgh" / "x", 1)  # no pid: foreign
    sup = _write(cache / "wheels" / H[0] / "²³.x.part", 1)  # not ASCII digits: no pid
    outside = _write(tmp_path / "outside" / "sageattention" / "e" / "build.json", 1)
    (cache / "wheelhouse").symlink_to(tmp_path / "outside")
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(cache), "COMFY_ENV_ATTN_WHEELHOUSE": ""}
    parts = _parts(cli("cache", "clean", "--wheelhouse", "--json", env=env))
    assert big.exists() and not sup.exists() and outside.exists()
    assert parts["wheelhouse"]["removed_bytes"] == 0
    table = cli("cache", env=env)
    assert table.returncode == 0 and "c[/y]" in table.stdout, table.stderr

    home = tmp_path / "home"
    _write(home / "build" / "1.sage-abcdefgh" / "main.c", 1)
    (tmp_path / "alias").symlink_to(home)
    r = cli("cache", "clean", env={"HOME": str(home),
                                   "COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "alias")})
    assert r.returncode == 2 and "refusing" in r.stderr

    c2 = tmp_path / "c2"
    (c2 / "wheels").mkdir(parents=True)
    r = cli("cache", "clean", env={"COMFY_ENV_ATTN_CACHE_DIR": str(c2),
                                   "COMFY_ENV_ATTN_WHEELHOUSE": str(c2 / "wheels")})
    assert r.returncode == 0 and (c2 / "wheels").is_dir()  # the user's, though empty


def test_a_hard_linked_file_keeps_its_mode(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only file removed from the cache that has another hard link elsewhere: its
    mode is that other file's too, so the retry leaves it (and says it could not)."""
    from comfy_env_attn.cli import cache as cache_cli

    outside = _write(tmp_path / "outside" / "f", 3)
    outside.chmod(0o444)
    entry = tmp_path / "cache" / "build" / f"{_dead_pid()}.sage-abcdefgh"
    entry.mkdir(parents=True)
    os.link(outside, entry / "f")
    real = os.unlink

    def unlink(path: str, *, dir_fd: int | None = None) -> None:  # Windows' refusal
        full = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"),
                                                        path)
        if not os.lstat(full).st_mode & stat.S_IWRITE:
            raise PermissionError(13, "Access is denied", full)
        real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setenv("COMFY_ENV_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    part = cache_cli.Part("build", "", [], [entry])
    errors = cache_cli.clean(part)
    monkeypatch.undo()
    assert errors and "Access is denied" in errors[0]
    assert stat.S_IMODE(outside.stat().st_mode) == 0o444


def test_a_finished_download_a_running_install_holds_is_kept(tmp_path: Path) -> None:
    """An install marks the wheel it downloaded (`<pid>.inuse`) until it exits: uv may still
    read it. A mark whose process is gone protects nothing."""
    from comfy_env_attn.install import edges

    cache = tmp_path / "cache"
    held = cache / "wheels" / H[0]
    _write(held / "x-1.0-py3-none-any.whl", 100)
    edges.mark_in_use(held)  # this process: alive
    gone = cache / "wheels" / H[1]
    _write(gone / "y-1.0-py3-none-any.whl", 10)
    _write(gone / f"{_dead_pid()}.inuse", 0)
    try:
        env = {"COMFY_ENV_ATTN_CACHE_DIR": str(cache), "COMFY_ENV_ATTN_WHEELHOUSE": ""}
        parts = _parts(cli("cache", "clean", "--json", env=env))
        assert parts["downloads"]["kept"] == [f"{held} (in use by process {os.getpid()})"]
        assert (held / "x-1.0-py3-none-any.whl").is_file() and not gone.exists()
    finally:
        edges.unmark_in_use()
    assert not (held / f"{os.getpid()}.inuse").exists()


def test_a_cache_folder_that_cannot_be_written_is_said_once(tmp_path: Path) -> None:
    """The cache is only ever faster: a cache folder that is a file (or cannot be written)
    leaves each command working as before, and says once that nothing is cached."""
    folder = tmp_path / "cache"
    folder.write_text("not a folder")
    env = {"COMFY_ENV_ATTN_CACHE_DIR": str(folder)}
    r = cli("probe", "--python", sys.executable, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    said = f"comfy-env-attn: cannot write to its cache folder {folder} (a file, not a folder)"
    assert r.stderr.count(said) == 1, r.stderr
    assert r.stderr.count("cannot write to its cache folder") == 1
