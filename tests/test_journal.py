"""Nothing is lost (issue 13): an install stopped at each step of its journal, by kill -9 or by
Ctrl-C, leaves the target either exactly as it was (byte for byte, scripts and data files
included) or fully upgraded, once the next run has recovered it; a journal that cannot be read
is reported, never a crash; leftovers of killed runs are cleaned up.

The fault is injected by COMFY_ENV_ATTN_TEST_CRASH_AT (set only here): the install sends itself
SIGKILL or SIGINT at that step, or a write there fails with ENOSPC.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import Route, Server, cli, venv_python
from test_hostile import LABEL, install, make_venv, serve, site
from untouched import baseline
from wheels import data_wheel

from comfy_env_attn.facts.installed import read_installed
from comfy_env_attn.facts.probe import probe_interpreter
from comfy_env_attn.install.installer import recover
from comfy_env_attn.install.journal import target_lock

V1, V2 = f"2.1.0+{LABEL}", f"2.2.0+{LABEL}"
STATE = ".comfy-env-attn"


@pytest.fixture(autouse=True)
def torch_and_sympy_untouched():
    base = baseline()
    yield
    assert base.problems() == []


def snapshot(venv: Path) -> dict[str, str]:
    """Every file of the venv by content, compiled bytecode included (install.lock's holder
    line aside)."""
    out = {}
    for p in sorted(venv.rglob("*")):
        rel = p.relative_to(venv).as_posix()
        if p.is_file() and rel != f"{STATE}/install.lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Scene:
    """A venv with sageattention v1 (a console script and a data file outside
    site-packages) installed and locked, kept as a template and put back before each case
    at the same path."""

    def __init__(self, root: Path, uv_bin: str, server, profile: Path) -> None:
        self.venv = make_venv(root / "venv", torch=True)
        self.template = root / "template"
        self.profile = profile
        w = root / "wheels"
        v1 = data_wheel(w, V1, script="v1", data="notes of v1\n")
        self.index = serve(server, {"sageattention": [v1]})
        r = install(self.venv, profile, "--index-url", self.index)
        assert r.returncode == 0, r.stdout + r.stderr
        # imported once, as ComfyUI would: its bytecode is part of the state to come back
        subprocess.run([str(venv_python(self.venv)), "-c", "import sageattention"],
                       check=True, env={k: v for k, v in os.environ.items()
                                        if k != "PYTHONDONTWRITEBYTECODE"})
        assert list((site(self.venv) / "sageattention" / "__pycache__").glob("*.pyc"))
        v2 = data_wheel(w, V2, script="v2", data="notes of v2\n")
        serve(server, {"sageattention": [v1, v2]})
        shutil.copytree(self.venv, self.template, symlinks=True)
        self.old = snapshot(self.venv)

    def reset(self) -> None:
        shutil.rmtree(self.venv)
        shutil.copytree(self.template, self.venv, symlinks=True)

    def install(self, crash: str) -> subprocess.CompletedProcess[str]:
        return install(self.venv, self.profile, "--index-url", self.index,
                       env={"COMFY_ENV_ATTN_TEST_CRASH_AT": crash})

    def recover(self) -> list[str]:
        target = probe_interpreter(str(venv_python(self.venv)))
        with target_lock(target.prefix, print):
            return list(recover(target))

    def state(self) -> str:
        """"old" (byte for byte as before), "new" (v2 complete and locked) or what is wrong."""
        now = snapshot(self.venv)
        if now == self.old:
            return "old"
        site_rel = site(self.venv).relative_to(self.venv).as_posix()
        installed = read_installed([str(site(self.venv))])
        lock = (self.venv / "pylock.comfy-env-attn.toml").read_text()
        leftovers = [k for k in now if k.startswith(f"{STATE}/") or ".tmp" in k]
        checks = {
            "v2 installed": installed["sageattention"].version == V2,
            "v2 script": (self.venv / "bin" / "sage-info").read_text().endswith("echo v2\n"),
            "v2 data": (self.venv / "share/sageattention/notes.txt").read_text()
            == "notes of v2\n",
            "v2 locked": f"sageattention-{V2}-py3-none-any.whl" in lock,
            "no leftovers": not leftovers,
            "v2 package": (site(self.venv) / "sageattention/__init__.py").read_text()
            .endswith(f"VERSION = {V2!r}\n"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        return "new" if not bad else f"neither old nor new ({site_rel}): {bad} {leftovers}"


@pytest.fixture(scope="module")
def scene(tmp_path_factory, uv_bin) -> Iterator[Scene]:
    """One scene (and one loopback index) for the module: each case puts the venv back."""
    import torch

    routes: dict[str, Route] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0])
            body = route.body if route else b""
            self.send_response(200 if route else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    root = tmp_path_factory.mktemp("journal")
    profile = root / "gpu.toml"
    profile.write_text(f'python = "{sys.version.split()[0]}"\nplatform = "linux"\n'
                       f'torch = "{torch.__version__.split("+")[0]}+cu128"\n'
                       'torch_cuda = "12.8"\ngpus = ["8.9"]\ndriver_cuda = "12.8"\n')
    try:
        yield Scene(root, uv_bin, Server(f"http://127.0.0.1:{httpd.server_address[1]}",
                                         routes), profile)
    finally:
        httpd.shutdown()
        httpd.server_close()


# step -> what recovery must leave after a kill -9 there
KILL = {
    "backed-up": "old",
    "installed": "old",
    "verifying": "old",
    "locking": "old",
    "locked": "new",  # the new lock was renamed into place: the install had finished
    "committed": "new",
    "journal-removed": "new",
    "save-verifying:enospc,restoring": "old",  # killed while undoing a failure
}


@pytest.mark.parametrize("step", list(KILL))
def test_kill_9_at_each_step_then_recovery(scene: Scene, step: str) -> None:
    scene.reset()
    r = scene.install(f"{step}:kill")
    assert r.returncode == -9, r.stdout + r.stderr
    # killed with uv's requirements folder still there: it is beside the journal, not in the
    # system's temporary folder, and the recovery clears it with the rest
    work = list((scene.venv / STATE).glob("uv-*"))
    assert bool(work) == (step == "installed"), work
    done = scene.recover()
    assert scene.state() == KILL[step], (done, r.stderr)


def test_a_run_killed_while_locking_elsewhere_is_judged_by_that_lock(scene: Scene,
                                                                     tmp_path: Path) -> None:
    """An install writing its lock where COMFY_ENV_ATTN_LOCK said, killed before it did,
    is undone by a run without that variable: the journal names the lock it was replacing
    (the target's own lock, untouched, says nothing about it)."""
    scene.reset()
    r = install(scene.venv, scene.profile, "--index-url", scene.index,
                env={"COMFY_ENV_ATTN_TEST_CRASH_AT": "locking:kill",
                     "COMFY_ENV_ATTN_LOCK": str(tmp_path / "elsewhere.toml")})
    assert r.returncode == -9, r.stdout + r.stderr
    done = scene.recover()
    assert scene.state() == "old", done


def test_doctor_removes_the_backups_a_kill_left_after_the_journal(scene: Scene) -> None:
    """Killed between removing the journal and its backups: the install had finished, and
    doctor (not only the next install) removes the backup copy, saying so."""
    scene.reset()
    r = scene.install("journal-removed:kill")
    assert r.returncode == -9, r.stdout + r.stderr
    assert (scene.venv / STATE / "backup").exists()
    r = cli("doctor", "--python", str(venv_python(scene.venv)))
    assert "removed what an interrupted run left behind" in r.stderr, r.stdout + r.stderr
    assert scene.state() == "new"


# Ctrl-C: before the lock is in place the run undoes itself; after, it keeps the new state
INT = {
    "installed": "old",
    "locked": "new",
    "journal-removed": "new",
}


@pytest.mark.parametrize("step", list(INT))
def test_ctrl_c_at_each_step_leaves_old_or_new(scene: Scene, step: str) -> None:
    """Ctrl-C is handled in the run itself: nothing is left for a recovery to do."""
    scene.reset()
    r = scene.install(f"{step}:int")
    assert r.returncode == 130 and "ERROR interrupted" in r.stderr, r.stdout + r.stderr
    assert scene.state() == INT[step]
    # said at once, and then what became of the target
    assert "interrupted: putting the target back as it was ..." in r.stderr
    assert ("the target was restored: " if INT[step] == "old" else
            "the run itself had completed and was kept") in r.stderr, r.stderr
    assert scene.recover() == []


def test_ctrl_c_while_undoing_is_finished_by_the_next_run(scene: Scene) -> None:
    scene.reset()
    r = scene.install("save-verifying:enospc,restoring:int")
    assert r.returncode == 130
    assert (scene.venv / STATE / "journal.json").exists()  # half undone, and it says so
    scene.recover()
    assert scene.state() == "old"


def test_an_uninstall_interrupted_whose_undoing_fails_stays_an_interrupt(scene: Scene
                                                                          ) -> None:
    """An uninstall's end is an install's (installer._put_back): Ctrl-C midway, then a
    rollback that fails (the disk full), leaves the journal to the next run and ends as an
    interrupt, not as the rollback's error; the next run puts the target back."""
    scene.reset()
    r = cli("uninstall", "--python", str(venv_python(scene.venv)), "--backends", "sage",
            env={"COMFY_ENV_ATTN_TEST_CRASH_AT": "uninstalling:int,restoring:enospc"})
    assert r.returncode == 130 and "ERROR interrupted" in r.stderr, r.stdout + r.stderr
    assert "interrupted: putting the target back as it was ..." in r.stderr
    assert (scene.venv / STATE / "journal.json").exists()
    scene.recover()
    assert scene.state() == "old"


def test_a_full_disk_is_one_line_and_leftovers_are_cleaned(scene: Scene) -> None:
    """Before it starts, an install clears what killed runs left: a download's .part, a
    lock's temp file, journal.tmp, backups no journal points to (killed while backing up).
    Then a full disk at its first journal write is one line, and nothing changed."""
    scene.reset()
    part = Path(os.environ["COMFY_ENV_ATTN_CACHE_DIR"]) / "wheels" / "x" / "999999.a.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"partial")
    (scene.venv / ".pylock.comfy-env-attn.toml.999999.tmp").write_text("half a lock")
    (scene.venv / STATE / "backup" / "sageattention").mkdir(parents=True)
    (scene.venv / STATE / "backup" / "sageattention" / "0").write_text("half a backup")
    (scene.venv / STATE / "journal.tmp").write_text('{"meta": {"st')
    r = scene.install("save-backing-up:enospc")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot write the install journal" in r.stdout + r.stderr
    assert "No space left on device" in r.stdout + r.stderr
    assert scene.state() == "old" and not part.exists()
    # later, after the target changed: undone, v1 with its script and data back
    r = scene.install("save-verifying:enospc")
    assert r.returncode == 1 and "the target was restored" in r.stdout + r.stderr
    assert scene.state() == "old"


def test_a_truncated_journal_is_reported_never_a_crash(scene: Scene) -> None:
    scene.reset()
    r = scene.install("verifying:kill")
    journal = scene.venv / STATE / "journal.json"
    journal.write_text(journal.read_text()[:40])
    exe = str(venv_python(scene.venv))
    r = cli("doctor", "--python", exe)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot be read" in r.stdout and "then delete" in r.stdout.replace("\n", " ")
    r = cli("install", "--backends", "sage", "--no-embedded-index", "--python", exe)
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    assert r.returncode == 1 and errors[0].startswith("ERROR the journal of an "
                                                      "interrupted install"), r.stderr
    # what the message says to do, then the tool goes on
    journal.unlink()
    shutil.rmtree(scene.venv / STATE / "backup")
    r = scene.install("none")
    assert r.returncode == 0, r.stdout + r.stderr
    assert scene.state() == "new"


@pytest.mark.parametrize("damage", ["cut", "gone", "empty", "data"])
def test_a_dist_info_a_kill_left_half_written_is_still_undone(scene: Scene,
                                                              damage: str) -> None:
    """Killed while uv wrote the new .dist-info (its RECORD cut short, not yet written, or
    the folder still empty): uv can no longer uninstall it, and the next run removes it as
    far as its RECORD goes and puts the old version back, byte for byte."""
    scene.reset()
    r = scene.install("installed:kill")
    assert r.returncode == -9, r.stdout + r.stderr
    info = site(scene.venv) / f"sageattention-{V2}.dist-info"
    record = info / "RECORD"
    if damage == "cut":
        text = record.read_text()
        record.write_text(text[: text.index("\n", len(text) // 2) + 9])  # mid-line
    elif damage == "gone":
        record.unlink()
    elif damage == "empty":
        for f in info.iterdir():
            f.unlink()
    else:  # uv killed while it moved the wheel's .data files into place
        data = site(scene.venv) / f"sageattention-{V2}.data" / "scripts"
        data.mkdir(parents=True)
        (data / "sage-info").write_text("half\n")
    r = cli("doctor", "--python", str(venv_python(scene.venv)))
    assert "interrupted install was found and undone" in r.stdout.replace("\n", " "), \
        r.stdout + r.stderr
    assert scene.state() == "old"


def test_a_journal_naming_what_no_install_touches_is_refused(scene: Scene) -> None:
    """A journal read after a kill may be anything: one naming another environment's
    folders (copied with a moved environment), torch, a file outside the environment, or
    of the wrong types is refused, one line, and nothing anywhere is changed."""
    import json

    scene.reset()
    r = scene.install("verifying:kill")
    assert r.returncode == -9, r.stdout + r.stderr
    journal = scene.venv / STATE / "journal.json"
    good = json.loads(journal.read_text())
    (entry,) = good["touched"].values()
    other = str(scene.venv.parent / "elsewhere" / "lib" / "site-packages")
    bad = {
        "another environment's site": {**entry, "site": other},
        "a backup elsewhere": {**entry, "backup": str(scene.venv.parent / "elsewhere")},
        "a file outside": {**entry, "files": [*entry["files"], "../../../../../x.py"]},
        "an added file outside": {**entry, "adds": ["../../../../../x.py"]},
        "wrong types": {**entry, "files": 5},
        "adds of the wrong type": {**entry, "adds": "x.py"},
    }
    exe = str(venv_python(scene.venv))

    def snapshot() -> dict[str, str]:  # every file of the venv but the tool's own state
        return {str(f.relative_to(scene.venv)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in scene.venv.rglob("*") if f.is_file() and STATE not in f.parts}

    before = snapshot()
    for why, edited in bad.items():
        journal.write_text(json.dumps({**good, "touched": {entry["name"]: edited}}))
        r = cli("install", "--backends", "sage", "--no-embedded-index", "--python", exe)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]
        assert r.returncode == 1 and "Traceback" not in r.stderr, (why, r.stderr)
        assert errors[0].startswith("ERROR the journal of an interrupted install"), why
        assert snapshot() == before and not (scene.venv.parent / "elsewhere").exists(), why
    torch_entry = {**entry, "name": "torch"}
    journal.write_text(json.dumps({**good, "touched": {"torch": torch_entry}}))
    r = cli("doctor", "--python", exe)
    assert "names torch, which is torch or a package torch needs" in r.stdout.replace("\n", " ")
    assert snapshot() == before
    journal.write_text(json.dumps(good))  # as it was: recovery goes on
    r = cli("doctor", "--python", exe)
    assert "interrupted install was found and undone" in r.stdout.replace("\n", " "), r.stdout
    assert scene.state() == "old"


@pytest.mark.parametrize("name", ["install.lock", "backup", "journal.tmp"])
def test_a_link_in_the_state_folder_is_refused_never_followed(scene: Scene, tmp_path: Path,
                                                              name: str) -> None:
    """The tool's state folder holds its own files: a link there (to a file of torch's, a
    folder elsewhere, a dangling name) is refused before anything is opened through it."""
    scene.reset()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine\n")
    (scene.venv / STATE).mkdir(exist_ok=True)
    (scene.venv / STATE / name).unlink(missing_ok=True)  # the template's own lock file
    where = {"install.lock": outside / "keep.txt", "backup": outside,
             "journal.tmp": outside / "new.txt"}[name]
    (scene.venv / STATE / name).symlink_to(where)
    r = scene.install("none")
    assert r.returncode == 1 and f"{name} is a link" in r.stderr, r.stdout + r.stderr
    assert sorted(os.listdir(outside)) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "mine\n"
    assert read_installed([str(site(scene.venv))])["sageattention"].version == V1


def test_a_copy_of_an_interrupted_environment_is_recovered_in_itself(scene: Scene,
                                                                      tmp_path: Path) -> None:
    """A ComfyUI folder copied while an install in it was killed: doctor on the copy puts
    the copy back (its own backups), and never touches the original."""
    scene.reset()
    r = scene.install("verifying:kill")
    assert r.returncode == -9, r.stdout + r.stderr
    copy = tmp_path / "copy"
    shutil.copytree(scene.venv, copy, symlinks=True)
    original = snapshot(scene.venv)
    r = cli("doctor", "--python", str(venv_python(copy)))
    assert "interrupted install was found and undone" in r.stdout.replace("\n", " "), \
        r.stdout + r.stderr
    assert read_installed([str(site(copy))])["sageattention"].version == V1
    assert snapshot(scene.venv) == original


def test_a_read_only_target_is_one_line(tmp_path, uv_bin, scene: Scene) -> None:
    venv = make_venv(tmp_path / "ro", torch=True)
    if subprocess.run(["chattr", "+i", str(venv)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        r = install(venv, scene.profile, "--index-url", scene.index)
    finally:
        subprocess.run(["chattr", "-i", str(venv)], check=True)
    assert r.returncode == 1 and "\nERROR cannot write to" in "\n" + r.stderr, r.stderr
    assert "read-only" in r.stderr and "Traceback" not in r.stderr
    assert not (venv / STATE).exists() and "sageattention" not in \
        read_installed([str(site(venv))])


def test_every_file_the_tool_rewrites_is_replaced_whole_or_not_at_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """core.paths.replace_file, the one writer of the journal, RECORDs, the lock, the node's
    loader and the caches: text that cannot be written (here, a lone surrogate) leaves the
    old file as it was and no temporary file; a durable write lands like any other, the
    file forced to disk, then (POSIX) its folder, which holds the rename."""
    import stat

    from comfy_env_attn.core.paths import replace_file

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    target = tmp_path / "journal.json"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        replace_file(target, "new \ud800 half", durable=True)
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]
    synced.clear()
    replace_file(target, "new\n", durable=True, newline="\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]
    assert synced == (["file"] if os.name == "nt" else ["file", "folder"])
    synced.clear()
    replace_file(target, "cache\n")  # a cache: nothing forced
    assert synced == [] and target.read_text(encoding="utf-8") == "cache\n"


def test_a_journal_is_followed_whichever_path_reaches_the_environment(tmp_path) -> None:
    """Written by a run that reached the venv by its real path, read by one that reached it
    through a linked folder: the same environment, followed. Copied elsewhere (a ComfyUI
    folder moved while an install ran), it is followed in the copy, its paths moved there;
    one that does not say which folder it was written in is refused there."""
    from comfy_env_attn.install.journal import Journal, JournalError

    real = tmp_path / "real" / "venv"
    site = real / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    alias = tmp_path / "alias" / "venv"
    j = Journal(real)
    j.begin({"python": str(real / "bin" / "python"), "backends": ["sage"]})
    j.add("sageattention", {}, [str(site)])
    j.set_state("installing")
    seen = Journal(alias).load([str(alias / "lib" / "python3.11" / "site-packages")], ())
    assert list(seen.touched) == ["sageattention"]
    copy = tmp_path / "copy" / "venv"
    shutil.copytree(real, copy)
    copied = Journal(copy).load([str(copy / "lib" / "python3.11" / "site-packages")], ())
    t = copied.touched["sageattention"]
    assert t.site == os.path.realpath(copy / "lib" / "python3.11" / "site-packages")
    doc = json.loads(copied.path.read_text())
    del doc["meta"]["prefix"]  # as a journal of an older version, or an edited one
    copied.path.write_text(json.dumps(doc))
    with pytest.raises(JournalError, match="not this environment's site-packages"):
        Journal(copy).load([str(copy / "lib" / "python3.11" / "site-packages")], ())


def test_a_journal_is_written_once_before_anything_changes(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Each write of the journal is forced to disk, on the way to uv: a fresh install (no
    backup to make) writes it once, at "installing", holding every distribution it adds.
    One that replaces a distribution writes it before the first file is copied aside, so a
    kill while copying leaves backups the journal points to."""
    from comfy_env_attn.facts.installed import Installed
    from comfy_env_attn.install.journal import Journal

    syncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    j = Journal(tmp_path / "env")
    j.begin({"python": "python", "backends": ["sage"]})
    j.add("sageattention", {}, [str(site_dir)])
    j.add("triton", {}, [str(site_dir)])
    assert not j.path.exists() and syncs == []  # nothing changed yet: nothing to undo
    j.set_state("installing")
    doc = json.loads(j.path.read_text())
    assert doc["meta"]["state"] == "installing"
    assert sorted(doc["touched"]) == ["sageattention", "triton"]
    assert len(syncs) == (2 if os.name != "nt" else 1)  # the file, then its folder's entry
    j.finish()

    # replacing: on disk (state backing-up) before the copy of its files begins
    info = site_dir / "sageattention-1.0.dist-info"
    info.mkdir()
    (site_dir / "sageattention.py").write_text("v1")
    (info / "RECORD").write_text("sageattention.py,,\nsageattention-1.0.dist-info/RECORD,,\n")
    copies: list[str] = []
    real_copy = shutil.copy2
    monkeypatch.setattr(shutil, "copy2", lambda src, dst: (
        copies.append(json.loads(j.path.read_text())["meta"]["state"]), real_copy(src, dst))[1])
    j = Journal(tmp_path / "env")
    j.begin({"python": "python", "backends": ["sage"]})
    inst = Installed("sageattention", "1.0", str(site_dir), str(info))
    j.add("sageattention", {"sageattention": inst}, [str(site_dir)])
    assert copies and set(copies) == {"backing-up"}
    assert json.loads(j.path.read_text())["touched"]["sageattention"]["before"] == "1.0"


def test_a_fresh_install_whose_first_journal_write_fails_changed_nothing(
        tmp_path: Path, scene: Scene) -> None:
    """The first write of a fresh install's journal is at "installing": a disk full there
    is its one line, and a Ctrl-C there is 130; neither claims to have removed what was
    never installed, and the venv is as it was, with no journal."""
    venv = make_venv(tmp_path / "venv", torch=True)
    data_wheel(tmp_path / "w", "2.2.0+" + LABEL, script="v", data="notes\n")
    before = {k: v for k, v in snapshot(venv).items() if not k.startswith(STATE)}
    for crash, code in (("save-installing:enospc", 1), ("save-installing:int", 130)):
        r = install(venv, scene.profile, "--find-links", str(tmp_path / "w"),
                    env={"COMFY_ENV_ATTN_TEST_CRASH_AT": crash})
        out = r.stdout + r.stderr
        assert r.returncode == code and "Traceback" not in out, out
        assert "removed" not in out and "it was not installed before" not in out, out
        if code == 1:
            assert "cannot write the install journal" in out and "No space left" in out
        assert not (venv / STATE / "journal.json").exists()
        assert {k: v for k, v in snapshot(venv).items() if not k.startswith(STATE)} == before


def test_a_restore_writes_a_new_file_never_into_a_link(tmp_path: Path) -> None:
    """uv installs by hard-linking from its cache: the rollback of a wheel whose RECORD a
    kill left missing (uv could not remove its files) puts the old file in place of the
    link, and the cache's copy of the new wheel keeps its bytes."""
    from comfy_env_attn.facts.installed import Installed
    from comfy_env_attn.install.journal import Journal

    site_dir = tmp_path / "site"
    info = site_dir / "sageattention-1.0.dist-info"
    info.mkdir(parents=True)
    (site_dir / "sageattention.py").write_text("v1")
    (info / "RECORD").write_text("sageattention.py,,\nsageattention-1.0.dist-info/RECORD,,\n")
    j = Journal(tmp_path / "env")
    j.begin({"python": "python", "backends": ["sage"]})
    inst = Installed("sageattention", "1.0", str(site_dir), str(info))
    j.add("sageattention", {"sageattention": inst}, [str(site_dir)])
    j.set_state("installing")
    cached = tmp_path / "uv-cache" / "sageattention.py"  # the new wheel, as uv's cache has it
    cached.parent.mkdir()
    cached.write_text("v2")
    (site_dir / "sageattention.py").unlink()
    os.link(cached, site_dir / "sageattention.py")
    j.restore("sageattention", lambda name: None)
    assert (site_dir / "sageattention.py").read_text() == "v1"
    assert cached.read_text() == "v2"


def test_a_fresh_install_killed_before_uv_wrote_its_record_is_undone_whole(
        tmp_path: Path, scene: Scene) -> None:
    """A kill while uv writes a new distribution can leave its files with no RECORD (uv
    writes it last): nothing then says what to remove. The journal holds what the wheel
    writes (its module, its script, its data file), and the recovery removes it all."""
    venv = make_venv(tmp_path / "venv", torch=True)
    data_wheel(tmp_path / "w", "2.2.0+" + LABEL, script="v", data="notes\n")
    # uv's own lock file of the venv (made by its first run there) aside
    before = {k: v for k, v in snapshot(venv).items() if not k.startswith(STATE)}
    r = install(venv, scene.profile, "--find-links", str(tmp_path / "w"),
                env={"COMFY_ENV_ATTN_TEST_CRASH_AT": "installed:kill"})
    assert r.returncode == -9, r.stdout + r.stderr
    (record,) = site(venv).glob("sageattention-*.dist-info/RECORD")
    record.unlink()  # as a kill before uv wrote it leaves the distribution
    assert (venv / "bin" / "sage-info").exists()
    r = cli("doctor", "--python", str(venv_python(venv)))
    assert "an interrupted install was found and undone" in r.stdout + r.stderr, r.stdout
    after = {k: v for k, v in snapshot(venv).items() if not k.startswith(STATE)}
    assert {k: v for k, v in after.items() if k != ".lock"} == before


def test_doctor_clears_what_a_kill_during_the_first_journal_write_left(tmp_path: Path,
                                                                         scene: Scene) -> None:
    """journal.tmp alone (a kill while the first journal was written: no journal.json):
    doctor removes it, as install and verify do."""
    venv = make_venv(tmp_path / "venv", torch=True)
    (venv / STATE).mkdir()
    (venv / STATE / "journal.tmp").write_text('{"meta": {"st')
    r = cli("doctor", "--python", str(venv_python(venv)))
    assert "removed what an interrupted run left behind" in r.stdout + r.stderr, r.stderr
    assert not (venv / STATE / "journal.tmp").exists()
