"""The command line around install, through real uv into real venvs (loopback index):
comfy-env.toml pins at install time, --json of install / verify / bench against the schemas
of docs/json.md, the lock written when nothing fits, progress lines, uninstall (including a
kill -9 midway), --version and --quiet."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TERMINAL, cli, venv_python, venv_site, write_gpu_profile
from wheels import SAGE_OK, build_wheel, sage_wheel

from comfy_env_attn.facts.installed import read_installed

torch = pytest.importorskip("torch")
TORCH = torch.__version__
TORCH_MINOR = ".".join(TORCH.split("+")[0].split(".")[:2])
LABEL = f"cu128torch{TORCH_MINOR}"
PY = "%d.%d" % sys.version_info[:2]
SHAPES = ["--shapes", "1x2x128x64"]


@pytest.fixture(autouse=True)
def torch_and_sympy_untouched():
    from untouched import baseline

    base = baseline()
    yield
    assert base.problems() == []


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write_gpu_profile(tmp_path)



def serve(server, wheels: list[Path]) -> str:
    links = []
    for w in wheels:
        url = server.add_file(f"/files/{w.name.replace('+', '%2B')}", w)
        links.append(f'<a href="{url}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                     f"{w.name}</a>")
    server.add("/simple/sageattention/", "<html>" + "".join(links) + "</html>")
    return server.url + "/simple"


def installed_in(venv: Path) -> dict[str, str]:
    return {k: v.version for k, v in read_installed([str(venv_site(venv))]).items()}


def test_install_honours_a_comfy_env_pin_and_refuses_one_nothing_fits(
        tmp_path: Path, venv: Path, profile: Path, http_server) -> None:
    w = tmp_path / "w"
    index = serve(http_server, [sage_wheel(w, "ok", f"2.2.0+{LABEL}"),
                                sage_wheel(w, "ok", f"2.3.0+{LABEL}")])
    cfg = tmp_path / "comfy-env.toml"
    cfg.write_text(f'[nodeenv]\npython = "{PY}"\ncuda_version = "auto"\n'
                   'pytorch_version = "auto"\n\n[nodeenv.cuda]\nsageattention = "2.2.0"\n'
                   'spconv = "*"\n')
    base = ["install", "--python", str(venv_python(venv)), "--system", str(profile),
            "--index-url", index, "--no-embedded-index", "--no-verify"]
    r = cli(*base, "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"  # not the newer 2.3.0
    assert "left to comfy-env (not attention packages): spconv" in r.stderr
    # a pin no wheel satisfies: a failure naming the pin, nothing changed
    cfg.write_text('[cuda]\npackages = ["sageattention>=3"]\n')
    r = cli(*base, "--config", str(cfg))
    assert r.returncode == 1
    assert "no sageattention wheel satisfies sageattention>=3 ([cuda] packages of " \
           "comfy-env.toml)" in " ".join(r.stdout.split())
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    # an environment whose stated Python is not the target's: comfy-env builds that one
    cfg.write_text('[other]\npython = "3.9"\n[other.cuda]\nsageattention = "*"\n')
    r = cli(*base, "--config", str(cfg), "--dry-run")
    # a dry run shows the plan, and says the install would stop there
    assert r.returncode == 1 and "would install sage" in r.stdout, r.stdout + r.stderr
    assert "ERROR install would refuse: " in r.stderr and "--force" in r.stderr
    assert r.stderr.count("would refuse") == 1  # said once
    r = cli(*base, "--config", str(cfg))
    assert r.returncode == 1
    assert f"it says Python 3.9, the target runs {sys.version.split()[0]}" in r.stderr
    assert "pass --python with its interpreter" in r.stderr and "--force" in r.stderr


# -- --json, against the schemas of docs/json.md --------------------------------------------

def schema(name: str) -> dict:
    """A JSON Schema of docs/json.md (the ```json schema=NAME block)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "json.md").read_text()
    block = text.split(f"```json schema={name}\n", 1)[1].split("```", 1)[0]
    return json.loads(block)


def check(doc: dict, name: str) -> None:
    import jsonschema

    jsonschema.validate(doc, schema(name))


def test_install_and_bench_json(tmp_path: Path, venv: Path, profile: Path,
                                       http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    py = str(venv_python(venv))
    # a cache of its own: a wheel of the same bytes downloaded by another test of this
    # session would be found there, and no download lines written
    r = cli("install", "--python", py, "--system", str(profile), "--index-url",
            serve(http_server, [w]), "--no-embedded-index", "--backends", "sage",
            "--no-verify", "--json", env={"COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)  # nothing but the document on stdout
    check(doc, "outcome")
    (sage,) = [b for b in doc["backends"] if b["backend"] == "sage"]
    assert sage["action"] == "installed" and sage["version"] == f"2.2.0+{LABEL}"
    assert sage["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    assert sage["verification"] is None and sage["wheel"] == w.name
    assert doc["ok"] is True and Path(doc["lock"]).is_file()
    # the downloaded wheel was marked in use while the install ran, and is no longer
    assert list((tmp_path / "cache").rglob("*.whl")) and \
        not list((tmp_path / "cache").rglob("*.inuse"))
    assert doc["plan"]["backends"][1]["selected"]["filename"] == w.name
    # the lock of an unverified install learns the target's facts without starting its
    # torch: the same facts the target itself reports
    from comfy_env_attn.core.lockmodel import Live
    from comfy_env_attn.verify.run import live_facts

    fp = read_lock(Path(doc["lock"]))["fingerprint"]
    live = Live.from_dict(live_facts(py))
    assert (fp["torch"], fp.get("torch_cuda"), fp["adapters_sha256"]) == \
        (live.torch, live.torch_cuda, live.adapters_sha256)
    assert fp["backends"]["sage"]["files_sha256"] == live.dists["sageattention"][1]  # type: ignore[index]
    # not a terminal: a line where the download starts and one when it ends, and uv's
    # messages summarised in one line
    assert f"downloading {w.name}" in r.stderr and f"downloaded {w.name}: " in r.stderr
    (uv,) = [ln for ln in r.stderr.splitlines() if ln.startswith("uv: ")]
    assert "Installed 1 package in " in uv and f"+ sageattention=={sage['version']}" in uv, \
        r.stderr
    r = cli("bench", "--python", py, *SHAPES, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    check(doc, "bench")
    (shape,) = doc["shapes"]
    assert shape["shape"] == [1, 2, 128, 64] and shape["results"]["sdpa"]["vs_sdpa"] == 1.0
    assert shape["results"]["sage"]["tflops"] > 0
    # this sageattention has no fp16-PV kernel: its variant is n/a, not a failure
    assert shape["results"]["sage_fp16"] == {"error": "not in this package"}
    # SDPA itself fails (no GPU for this CPU torch): an error, exit 1, with the way to check
    # on the CPU; not a table, a note or exit 0
    r = cli("bench", "--python", py, *SHAPES, "--device", "cuda", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    check(doc, "error")
    assert doc["error"].startswith(f"the SDPA baseline itself failed in {py}: "), doc
    assert "--device cpu checks on the CPU" in doc["error"], doc
    # narrowed to SDPA: nothing to compare, and it says what else is there to name
    r = cli("bench", "--python", py, *SHAPES, "--backends", "sdpa")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--backends names only sdpa (PyTorch's own); installed here: sage" in \
        " ".join(r.stdout.split())


def test_nothing_fits_still_writes_a_lock(tmp_path: Path, venv: Path, profile: Path) -> None:
    """No wheel fits (an empty folder of wheels): install writes an SDPA-only lock, verified
    there, and the dispatcher stops saying there is none."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    r = cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
            "--find-links", str(empty), "--no-embedded-index", *SHAPES, "--json")
    assert r.returncode == 0, r.stdout + r.stderr  # nothing asked for by name
    assert "ERROR" not in r.stderr
    named = cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
                "--find-links", str(empty), "--no-embedded-index", "--backends", "sage",
                "--dry-run")
    assert named.returncode == 1  # asked for by name: the failure says why in one line
    assert named.stderr.splitlines()[-1].startswith("ERROR not done as asked: sage (no wheel"), \
        named.stderr
    doc = json.loads(r.stdout)
    check(doc, "outcome")
    by = {b["backend"]: b for b in doc["backends"]}
    assert {b["action"] for n, b in by.items() if n != "sdpa"} == {"no-wheel"}
    assert by["sdpa"]["action"] == "builtin" and by["sdpa"]["verification"]["passed"]
    # one line per backend while verifying, with its elapsed time
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("  sdpa: ")]
    assert line.startswith("  sdpa: passed ") and line.endswith(" s)"), r.stderr
    tool = read_lock(Path(doc["lock"]))
    assert tool["auto"] == ["sdpa"] and tool["backends"]["sdpa"]["status"] == "verified"
    code = ("import torch; from comfy_env_attn.runtime import dispatch; "
            "print(dispatch.set_backend('auto'))")
    r = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "no lock" not in r.stderr and "stale" not in r.stderr, r.stderr
    r = cli("verify", "--python", str(venv_python(venv)), *SHAPES, "--json", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""  # --quiet: the results only
    doc = json.loads(r.stdout)
    check(doc, "outcome")
    assert doc["command"] == "verify" and doc["lock"] == str(venv / "pylock.comfy-env-attn.toml")
    assert [(b["backend"], b["action"]) for b in doc["backends"]] == [("sdpa", "builtin")]
    # only SDPA is there: bench has nothing to time against it, and says so without
    # starting the target to verify SDPA alone; named, a backend that is absent is an error
    # at once, with the step that installs it
    r = cli("bench", "--python", str(venv_python(venv)), *SHAPES)
    assert r.returncode == 0 and "nothing to compare" in r.stdout and "only sdpa" in r.stdout
    assert "verifying" not in r.stderr, r.stderr
    r = cli("bench", "--python", str(venv_python(venv)), *SHAPES, "--json")
    doc = json.loads(r.stdout)
    check(doc, "bench")
    assert doc["shapes"] == [] and doc["backends"] == {} and "nothing to compare" in doc["note"]
    r = cli("bench", "--python", str(venv_python(venv)), *SHAPES, "--backends", "sage",
            "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    check(doc, "error")
    assert doc["command"] == "bench" and doc["error"].startswith(
        f"sage: not installed in {venv_python(venv)}"), doc
    assert f"install --backends sage --python {venv_python(venv)} puts it in" in doc["error"]
    assert "verifying" not in r.stderr, r.stderr
    for command in ("probe", "doctor", "lock"):  # every --json document has its schema
        r = cli(command, "--python", str(venv_python(venv)), "--json")
        assert r.returncode in (0, 1), r.stdout + r.stderr  # doctor: 1 when unhealthy
        check(json.loads(r.stdout), command)


def read_lock(path: Path) -> dict:
    from comfy_env_attn.lockfile import read

    return read(path)["tool"]["comfy-env-attn"]


def test_version_and_quiet() -> None:
    from comfy_env_attn import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"comfy-env-attn {__version__}"
    from comfy_env_attn.cli import build_parser

    for argv in (["-q", "plan"], ["plan", "--quiet"], ["--quiet", "install"]):
        assert build_parser().parse_args(argv).quiet is True
    assert build_parser().parse_args(["plan"]).quiet is False


def test_an_error_under_json_is_a_json_document(tmp_path: Path) -> None:
    """Failing, a command given --json still prints a document a script can read."""
    missing = tmp_path / "none.toml"
    r = cli("lock", "--file", str(missing), "--js")  # argparse takes it for --json
    assert r.returncode == 1 and "ERROR " in r.stderr
    doc = json.loads(r.stdout)
    check(doc, "error")
    assert doc["command"] == "lock" and str(missing) in doc["error"]
    r = cli("plan", "--backends", "nosuch", "--json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    check(doc, "error")
    assert doc["command"] == "plan" and "nosuch" in doc["error"]


def test_an_interrupted_command_under_json_is_a_json_document(tmp_path: Path) -> None:
    """SIGTERM (as `timeout` sends it) while a command waits on a server that never ends its
    page: exit 130, the ERROR line, and the error document on stdout."""
    import os
    import signal
    import time

    from servers import RawServer

    server = RawServer("HTTP/1.1 200 OK\nContent-Type: text/html\n", b"<html>", trickle=0.05)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "comfy_env_attn", "plan", "--json", "--no-embedded-index",
             "--system", str(write_gpu_profile(tmp_path)), "--index-url", server.url + "/"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "cache")})
        deadline = time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.requests, "the command never asked the server"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        server.close()
    assert proc.returncode == 130 and "ERROR interrupted" in err, err
    doc = json.loads(out)
    check(doc, "error")
    assert doc == {"schema": 1, "command": "plan", "ok": False, "error": "interrupted"}


def test_an_interrupt_at_the_edges_of_a_command_is_still_exit_130_or_its_own_status() -> None:
    """An interrupt before main's own handling began (the handlers just installed) is still
    exit 130 with its document; once the command has ended, a late Ctrl-C or SIGTERM ends
    the process at once with the command's own status, never "killed by a signal"."""
    import os
    import signal
    import time

    early = ("import sys, comfy_env_attn.cli as cli\n"
             "def interrupted():\n    raise KeyboardInterrupt\n"
             "cli._interrupt_on_termination = interrupted\n"
             "sys.argv = ['comfy-env-attn', 'plan', '--json']\nsys.exit(cli.entry())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", early], capture_output=True, text=True, env=env)
    assert r.returncode == 130 and "ERROR interrupted" in r.stderr, r.stderr
    assert json.loads(r.stdout) == {"schema": 1, "command": "plan", "ok": False,
                                    "error": "interrupted"}
    # the command ended with 3, and the interpreter's shutdown then waits on a thread (as it
    # joins a stopped verification's): Ctrl-C ends it at once, with the command's status
    late = ("import sys, threading, time, comfy_env_attn.cli as cli\n"
            "cli.main = lambda short_lived: 3\n"
            "sys.argv = ['comfy-env-attn', 'doctor']\ncode = cli.entry()\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "print('ended', code, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", late], stdout=subprocess.PIPE, text=True,
                            env=env, **TERMINAL)
    assert proc.stdout is not None and proc.stdout.readline() == "ended 3\n"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 3 and time.monotonic() - t0 < 10


def test_progress_on_a_terminal(tmp_path: Path, venv: Path, profile: Path,
                                http_server) -> None:
    """stderr a terminal: a rich bar for the download (bytes, rate, time left) and uv's own
    output passed through."""
    import os
    import pty

    w = build_wheel(tmp_path / "w", "sageattention", f"2.2.0+{LABEL}",
                    {"sageattention/__init__.py": SAGE_OK,
                     "sageattention/blob.bin": os.urandom(3 << 20).hex()},
                    requires=["torch>=2.0"])
    index = serve(http_server, [w])
    leader, follower = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "comfy_env_attn", "install", "--python",
         str(venv_python(venv)), "--system", str(profile), "--index-url", index,
         "--no-embedded-index", "--backends", "sage", "--no-verify"],
        stdout=subprocess.PIPE, stderr=follower, cwd=ROOT,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    out = p.communicate(timeout=300)[0]
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    assert p.returncode == 0, text + out.decode()
    assert "6.3/6.3 MB" in text and "MB/s" in text, text  # the bar, finished
    assert "downloaded " not in text  # no summary line: the bar said it
    assert "Installed 1 package" in text and "uv: " not in text  # uv's own messages


# -- uninstall ------------------------------------------------------------------------------

def _serve_two(server, folder: Path) -> str:
    # both need xf-helper: install records it as brought by both
    sage = sage_wheel(folder, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "xf-helper"])
    # a requirement the index serves itself: the test must not depend on what the runner's
    # environment happens to have (a fresh CI venv has no numpy)
    xf = build_wheel(folder, "xformers", "0.0.32.post2",
                     {"xformers/__init__.py": "VERSION = 'fake'\n"}, requires=["xf-helper"])
    helper = build_wheel(folder, "xf-helper", "1.0", {"xf_helper/__init__.py": ""})
    for project, w in (("sageattention", sage), ("xformers", xf), ("xf-helper", helper)):
        url = server.add_file(f"/files/{w.name.replace('+', '%2B')}", w)
        sha = hashlib.sha256(w.read_bytes()).hexdigest()
        server.add(f"/simple/{project}/", f'<a href="{url}#sha256={sha}">{w.name}</a>')
    return server.url + "/simple"


def test_uninstall_removes_what_install_put_in_and_survives_kill_9(
        tmp_path: Path, venv: Path, profile: Path, http_server) -> None:
    import os
    import signal

    py = str(venv_python(venv))
    r = cli("install", "--python", py, "--system", str(profile), "--index-url",
            _serve_two(http_server, tmp_path / "w"), "--no-embedded-index", "--backends",
            "sage,xformers", "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    have = installed_in(venv)
    assert {"sageattention", "xformers"} <= set(have)
    helper_before = have.get("xf-helper")
    assert helper_before == "1.0"  # pulled in by xformers
    lock = venv / "pylock.comfy-env-attn.toml"
    lock_before = lock.read_bytes()

    # killed after the first backend is gone: the next run puts it back, lock unchanged
    r = cli("uninstall", "--python", py, env={"COMFY_ENV_ATTN_TEST_CRASH_AT": "uninstalling"})
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert len({"sageattention", "xformers"} & set(installed_in(venv))) == 1  # half done
    assert (venv / ".comfy-env-attn" / "journal.json").exists()
    r = cli("lock", "--python", py)  # reads the lock, and says what is still to be undone
    assert "was interrupted and is still to be finished or undone" in r.stderr, r.stderr
    r = cli("-q", "uninstall", "--python", py, "--backends", "sage", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    # said even with --quiet, and in the document
    assert "found an interrupted uninstall" in r.stderr and "restored" in r.stderr
    doc = json.loads(r.stdout)
    check(doc, "outcome")
    assert doc["recovered"]["interrupted"] == "uninstall"
    assert doc["recovered"]["verb"] == "undone"
    assert any("restored" in line for line in doc["recovered"]["done"])
    assert [(b["backend"], b["action"]) for b in doc["backends"]] == [("sage", "removed")]
    assert "left xf-helper 1.0: xformers brought it too" in doc["backends"][0]["note"]
    have = installed_in(venv)
    assert "sageattention" not in have and have["xformers"] == "0.0.32.post2"
    assert have.get("xf-helper") == helper_before  # what it pulled in stays
    check_import = subprocess.run([py, "-c", "import xformers; print(xformers.VERSION)"],
                                  capture_output=True, text=True)
    assert check_import.stdout.strip() == "fake"  # xformers' files were restored whole
    tool = read_lock(lock)
    assert "sage" not in tool["backends"] and "sage" not in tool["fingerprint"]["backends"]
    from comfy_env_attn.lockfile import read

    # xformers and what install put in for it, which now only xformers brought
    packages = read(lock)["packages"]
    assert [p["name"] for p in packages] == ["xf-helper", "xformers"]
    assert packages[0]["tool"]["comfy-env-attn"]["brought-by"] == ["xformers"]
    assert lock.read_bytes() != lock_before
    # the rest, as the lock records it; what it brought stays unless asked for (ComfyUI and
    # custom nodes import packages they do not declare), and is named
    r = cli("uninstall", "--python", py)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "xformers: removed (xformers 0.0.32.post2)" in r.stdout, r.stdout
    assert "left xf-helper 1.0, which came with it (`uninstall --with-requirements` takes " \
        "it out, now or later)" in r.stdout, r.stdout
    assert set(installed_in(venv)) & {"sageattention", "xformers", "xf-helper"} == \
        {"xf-helper"}
    # the lock keeps what was left as xformers' still, so that the hint can be followed
    (left,) = read(lock)["packages"]
    assert left["name"] == "xf-helper" and read_lock(lock)["auto"] == ["sdpa"]
    assert left["tool"]["comfy-env-attn"]["brought-by"] == ["xformers"]
    r = cli("install", "--python", py, "--from-lock", str(lock), "--dry-run")
    assert r.returncode == 0 and "records no backend (only what an uninstall left): nothing " \
        "to install from it" in r.stderr, r.stdout + r.stderr
    r = cli("uninstall", "--python", py, "--with-requirements")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "also removed xf-helper 1.0, which came with it" in r.stdout, r.stdout
    assert "xf-helper" not in installed_in(venv) and read(lock)["packages"] == []
    r = cli("uninstall", "--python", py, "--with-requirements")
    assert r.returncode == 0 and "nothing to remove" in r.stdout, r.stdout + r.stderr
    assert not (venv / ".comfy-env-attn" / "journal.json").exists()
    assert not os.listdir(venv / ".comfy-env-attn" / "backup") if \
        (venv / ".comfy-env-attn" / "backup").exists() else True


def test_a_folder_of_wheels_installs_offline_dependencies_included(
        tmp_path: Path, venv: Path, profile: Path) -> None:
    """Every source local (--find-links FOLDER): the requirements come from the folder, uv is
    told not to ask an index (here uv's default index is a dead address, as offline)."""
    folder = tmp_path / "carried"
    sage_wheel(folder, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "sage-helper>=1"])
    build_wheel(folder, "sage-helper", "1.0", {"sage_helper/__init__.py": ""})
    r = cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
            "--find-links", str(folder), "--no-embedded-index", "--backends", "sage",
            "--no-verify", env={"UV_DEFAULT_INDEX": "http://127.0.0.1:9/simple",
                                "UV_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--no-index --offline" in r.stderr
    have = installed_in(venv)
    assert have["sageattention"] == f"2.2.0+{LABEL}" and have["sage-helper"] == "1.0"


@pytest.mark.parametrize("broken", ["tomli_w", "packaging.pylock"])
def test_a_lock_writer_module_that_does_not_load_is_an_error_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """A broken install of the tool itself (a module the lock writer needs fails to load,
    in the background thread or in write): a LockError naming it, which the install's
    rollback catches like any other, and no lock file left half-written."""
    from comfy_env_attn import lockfile
    from comfy_env_attn.core.errors import AttnError

    monkeypatch.setitem(sys.modules, broken, None)  # any import of it raises ImportError
    lockfile.load_in_background()  # swallows it; write() reports it
    path = tmp_path / "pylock.comfy-env-attn.toml"
    with pytest.raises(AttnError, match=re.escape(broken.split(".")[-1]) + ".*reinstall"):
        lockfile.write(path, {"lock-version": "1.0", "created-by": "test", "packages": []})
    assert list(tmp_path.iterdir()) == []
