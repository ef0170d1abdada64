"""install / verify / lock through real uv into real venvs that see the CPU torch.

The System profile declares a GPU (resolving as for a CUDA machine); verification then runs
for real in the venv, on the CPU, and decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TERMINAL, cli, make_venv, venv_python, venv_site, write_gpu_profile
from wheels import SAGE_WRONG, build_wheel, sage_wheel

from comfy_env_attn.facts.installed import Installed, read_installed
from comfy_env_attn.lockfile import LOCK_NAME, read

torch = pytest.importorskip("torch")
TORCH_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])
LABEL = f"cu128torch{TORCH_MINOR}"
SHAPES = ["--shapes", "1x2x128x64"]


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write_gpu_profile(tmp_path)



def serve_index(server, wheels: list[Path], *, bad_hash: bool = False,
                metadata: bool = False) -> str:
    """A PEP 503 index on the loopback server; with metadata, PEP 658 .metadata files too."""
    links = []
    for w in wheels:
        sha = hashlib.sha256(w.read_bytes()).hexdigest()
        if bad_hash:
            sha = "0" * 64
        path = f"/files/{w.name.replace('+', '%2B')}"
        url = server.add_file(path, w)
        attr = ""
        if metadata:
            import zipfile

            with zipfile.ZipFile(w) as z:
                meta = next(n for n in z.namelist() if n.endswith("/METADATA"))
                server.add(path + ".metadata", z.read(meta), "text/plain")
            attr = ' data-dist-info-metadata="true"'
        links.append(f'<a href="{url}#sha256={sha}"{attr}>{w.name}</a>')
    server.add("/simple/sageattention/", "<html><body>" + "".join(links) + "</body></html>")
    return server.url + "/simple"


def torch_state() -> tuple[str, str]:
    inst = read_installed([p for p in sys.path if p.endswith("site-packages")])["torch"]
    record = Path(inst.dist_info, "RECORD").read_bytes()
    return inst.version, hashlib.sha256(record).hexdigest()


@pytest.fixture(autouse=True)
def torch_is_never_replaced():
    before = torch_state()
    yield
    assert torch_state() == before


def site(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def installed_in(venv: Path) -> dict[str, str]:
    return {k: v.version for k, v in read_installed([str(site(venv))]).items()}


def install(venv: Path, profile: Path, index: str, *extra: str):
    return cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
               "--index-url", index, "--no-embedded-index", "--backends", "sage", *SHAPES,
               *extra)


def test_correct_backend_is_installed_verified_and_locked(tmp_path, venv, profile,
                                                          http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [w]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    doc = read(venv / LOCK_NAME)  # validated with packaging.pylock
    (pkg,) = doc["packages"]
    assert pkg["name"] == "sageattention"
    assert pkg["wheels"][0]["hashes"]["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    tool = doc["tool"]["comfy-env-attn"]
    assert tool["fingerprint"]["device"] == "cpu"
    assert tool["fingerprint"]["torch"] == torch.__version__
    sage = tool["backends"]["sage"]
    assert sage["status"] == "verified"
    # every variant it claims (its sageattn takes a mask), at every head dim it claims up to
    # 128, in the half dtype it claims (bfloat16 on a CPU)
    assert {c["variant"] for c in sage["checks"]} == {
        "plain", "causal", "scale", "cross", "mask_bool", "mask_additive", "gqa"}
    assert {c["head_dim"] for c in sage["checks"]} == {40, 64, 80, 96, 128}
    assert {c["dtype"] for c in sage["checks"]} == {"bfloat16"}
    ok = [c for c in sage["checks"] if c["passed"]]
    assert {c["variant"] for c in ok} == {"plain", "causal", "scale", "cross", "mask_bool"}
    assert all(c["max_abs"] < 0.05 for c in ok)
    # this fake really takes no bfloat16 additive mask and no fewer key/value heads: those
    # fail with the reason, and the rest still serves
    bad = {c["variant"]: c["error"] for c in sage["checks"] if not c["passed"]}
    assert set(bad) == {"mask_additive", "gqa"}
    assert "attn_mask dtype" in bad["mask_additive"] and "size of tensor" in bad["gqa"]
    assert sage["bench"][0]["shape"] == [1, 2, 128, 64] and sage["bench"][0]["tflops"] > 0
    # timed together with SDPA, at the same shapes (what auto compares)
    assert [b["shape"] for b in sage["bench"]] == \
        [b["shape"] for b in tool["backends"]["sdpa"]["bench"]]
    assert set(tool["auto"]) == {"sage", "sdpa"} and tool["exact"] == ["sdpa"]
    assert "verified" in r.stdout or "passed" in r.stdout
    # the journal is gone, the lock reads as fresh
    assert not (venv / ".comfy-env-attn" / "journal.json").exists()
    r = cli("lock", "--python", str(venv_python(venv)))
    assert r.returncode == 0 and "fingerprint: fresh" in r.stdout, r.stdout + r.stderr
    # the dispatcher in that venv trusts the lock: sage by name, auto as the lock measured
    code = ("from comfy_env_attn.runtime import dispatch; from comfy_env_attn.core import choose;"
            "from comfy_env_attn.runtime.adapters import describe; import torch, json;"
            "lab = dispatch.set_backend('sage'); q = torch.randn(1, 2, 128, 64).bfloat16();"
            "dispatch.dispatch_attention(q, q, q); r1 = next(iter(dispatch._S.routes.values()));"
            "dispatch.set_backend('auto'); dispatch.dispatch_attention(q, q, q);"
            "r2 = next(iter(dispatch._S.routes.values()));"
            "c = choose.choose(dispatch._S.backends, describe(q, q, None, False, None));"
            "close = choose.close_call(c.order, 0.08);"
            "print(json.dumps([lab, r1, r2, close or [c.names[0]]]))")
    r = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True)
    lab, r1, r2, allowed = json.loads(r.stdout.splitlines()[-1])
    assert lab.startswith(f"SageAttention 2.2.0+{LABEL}, verified") and r1[0] == "sage"
    assert r2[0] in allowed  # the lock's best, or a close call settled by timing it here
    r = cli("doctor", "--python", str(venv_python(venv)))
    out = r.stdout.replace("\n", " ")
    assert "auto for Flux 1024x1024 [1, 24, 4608, 128] kv 4608 float32:" in out
    # the wheel's label (CUDA 12.8) does not fit this CPU torch, yet the fresh lock proves
    # it ran here: a note, not a predicted import failure
    assert r.returncode == 0 and "PROBLEM" not in r.stdout, r.stdout
    assert "yet the lock proves it works here (verified, " in out
    r = cli("launch-args", "--python", str(venv_python(venv)))
    assert r.returncode == 0 and r.stdout.strip() in ("--use-sage-attention",
                                                      "--use-pytorch-cross-attention")


def test_wrong_results_fail_with_numbers_and_are_rolled_back(tmp_path, venv, profile,
                                                             http_server) -> None:
    w = sage_wheel(tmp_path / "w", "wrong", f"2.2.1+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [w]))
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "max abs error" in out and "cosine" in out
    assert "rolled back" in out
    assert "sageattention" not in installed_in(venv)
    tool = read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]
    assert "sage" not in tool["backends"] and tool["auto"] == ["sdpa"]
    # under --json: the document says so, and the ERROR line is beside it (docs/json.md)
    r = install(venv, profile, serve_index(http_server, [w]), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False, r.stdout
    assert "ERROR not done as asked: sage" in r.stderr, r.stderr


def test_a_backend_rolled_back_takes_the_requirements_it_brought(tmp_path, venv, profile,
                                                                 http_server, uv_bin) -> None:
    """Verification fails: what the backend brought goes with it (bar, and baz through bar),
    dep, which it upgraded, goes back to the version the target had; nothing else stays."""
    from test_hostile import serve
    from wheels import build_wheel

    w = tmp_path / "w"
    old = build_wheel(w / "old", "dep", "1.0", {"dep.py": ""}, requires=[])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", str(venv_python(venv)),
                    "--no-deps", str(old)], check=True)
    before = installed_in(venv)
    sage = sage_wheel(w, "wrong", f"2.2.1+{LABEL}", requires=["torch>=2.0", "bar", "dep>=2"])
    bar = build_wheel(w, "bar", "1.0", {"bar.py": ""}, requires=["baz"])
    baz = build_wheel(w, "baz", "1.0", {"baz.py": ""}, requires=[])
    dep = build_wheel(w, "dep", "2.0", {"dep.py": ""}, requires=[])
    r = install(venv, profile, serve(http_server, {"sageattention": [sage], "bar": [bar],
                                                   "baz": [baz], "dep": [dep]}))
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "rolled back" in out, out
    assert installed_in(venv) == before == {"dep": "1.0"}, out
    for name in ("bar", "baz", "dep"):
        assert f"{name}: " in out and "(it came with sage, which was rolled back)" in out


def test_uninstall_takes_the_requirements_the_install_brought(tmp_path, venv, profile,
                                                              http_server, uv_bin) -> None:
    """The lock records what install put in for a backend (bar, and baz through bar), not
    what it upgraded (dep, the target's before); uninstall --with-requirements takes out
    what nothing staying needs (bar), and keeps, saying why, what something installed since
    requires (baz, for qux) and the upgrade; a kill midway puts everything back."""
    import signal

    from test_hostile import serve
    from wheels import build_wheel

    w = tmp_path / "w"
    py = str(venv_python(venv))
    old = build_wheel(w / "old", "dep", "1.0", {"dep.py": ""}, requires=[])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps", str(old)],
                   check=True)
    sage = sage_wheel(w, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "bar", "dep>=2"])
    bar = build_wheel(w, "bar", "1.0", {"bar.py": ""}, requires=["baz"])
    baz = build_wheel(w, "baz", "1.0", {"baz.py": ""}, requires=[])
    dep = build_wheel(w, "dep", "2.0", {"dep.py": ""}, requires=[])
    index = serve(http_server, {"sageattention": [sage], "bar": [bar], "baz": [baz],
                                "dep": [dep]})
    r = install(venv, profile, index, "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    packages = {p["name"]: p for p in read(venv / LOCK_NAME)["packages"]}
    assert set(packages) == {"sageattention", "bar", "baz"}
    assert packages["bar"]["tool"]["comfy-env-attn"]["brought-by"] == ["sage"]
    # another venv from that lock: the backend's wheel as locked, its requirements resolved
    # again (as they were: the lock records them as brought by it)
    fresh = make_venv(tmp_path / "fresh", torch=True)
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock", str(venv / LOCK_NAME),
            "--index-url", index, "--dry-run")  # it names them too
    assert r.returncode == 0 and "and bar (the lock records 1.0, brought by sage), which the " \
        "install resolves again as they require" in r.stdout and "and baz (" in r.stdout, r.stdout + r.stderr
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock", str(venv / LOCK_NAME),
            "--index-url", index, "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(fresh) == {"sageattention": f"2.2.0+{LABEL}", "bar": "1.0",
                                   "baz": "1.0", "dep": "2.0"}
    # dep too, this time: that venv had none, so install brought it
    assert {p["name"] for p in read(fresh / LOCK_NAME)["packages"]} == {*packages, "dep"}
    qux = build_wheel(w / "user", "qux", "1.0", {"qux.py": ""}, requires=["baz"])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps", str(qux)],
                   check=True)
    before = installed_in(venv)
    r = cli("uninstall", "--python", py, "--with-requirements",
            env={"COMFY_ENV_ATTN_TEST_CRASH_AT": "locking"})
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    r = cli("doctor", "--python", py)
    assert "interrupted uninstall was found and undone" in r.stdout.replace("\n", " "), r.stdout
    assert installed_in(venv) == before
    # a lock edited to say that sage brought qux, which sage does not require: qux stays
    lock = venv / LOCK_NAME
    lock.write_text(lock.read_text() + '\n[[packages]]\nname = "qux"\nversion = "1.0"\n'
                    '[[packages.wheels]]\nname = "qux-1.0-py3-none-any.whl"\n'
                    'url = "https://example.invalid/qux-1.0-py3-none-any.whl"\n'
                    f'hashes = {{sha256 = "{"0" * 64}"}}\n'
                    '[packages.tool.comfy-env-attn]\nbrought-by = ["sage"]\n')
    r = cli("uninstall", "--python", py, "--with-requirements", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(r.stdout)["backends"]
    assert "left qux 1.0: the lock says it came with sage, which does not require it" in \
        row["note"], row
    assert row["action"] == "removed" and "also removed bar 1.0, which came with it" in \
        row["note"] and "left baz 1.0: qux requires it" in row["note"], row
    have = installed_in(venv)
    assert have == {"dep": "2.0", "baz": "1.0", "qux": "1.0"}, have
    assert "packages" not in read(venv / LOCK_NAME) or not read(venv / LOCK_NAME)["packages"]


def test_requirements_of_a_backend_gone_go_only_as_asked_and_never_a_backend(
        tmp_path, venv, profile, http_server, uv_bin) -> None:
    """A lock (edited here) says flash, never installed, brought userlib and sageattention.
    `uninstall --backends xformers --with-requirements` takes neither: flash is not named.
    Naming flash takes userlib (at its recorded version, required by nothing), never
    sageattention: a backend is no requirement to take along, and sage stays locked."""
    from wheels import build_wheel

    w = tmp_path / "w"
    py = str(venv_python(venv))
    r = install(venv, profile, serve_index(http_server, [sage_wheel(w, "ok", f"2.2.0+{LABEL}")]),
                "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    userlib = build_wheel(w / "user", "userlib", "1.0", {"userlib.py": ""}, requires=[])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps", str(userlib)],
                   check=True)
    have = installed_in(venv)
    lock = venv / LOCK_NAME
    for name, version in (("userlib", "1.0"), ("sageattention", have["sageattention"])):
        lock.write_text(lock.read_text() + f'\n[[packages]]\nname = "{name}"\n'
                        f'version = "{version}"\n[[packages.wheels]]\n'
                        f'name = "{name}-{version}-py3-none-any.whl"\n'
                        f'url = "https://example.invalid/{name}.whl"\n'
                        f'hashes = {{sha256 = "{"0" * 64}"}}\n'
                        '[packages.tool.comfy-env-attn]\nbrought-by = ["flash"]\n')
    r = cli("uninstall", "--python", py, "--backends", "xformers", "--with-requirements")
    assert r.returncode == 0 and installed_in(venv) == have, r.stdout + r.stderr
    r = cli("uninstall", "--python", py, "--backends", "flash", "--with-requirements")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "also removed userlib 1.0, which came with it" in r.stdout, r.stdout
    assert "left sageattention" in r.stdout and "an attention backend itself" in r.stdout
    assert installed_in(venv) == {n: v for n, v in have.items() if n != "userlib"}
    assert "sage" in read(lock)["tool"]["comfy-env-attn"]["backends"]


def test_a_wheel_whose_requirements_cannot_be_had_gives_way_to_the_next(
        tmp_path, venv, profile) -> None:
    """The best-ranked wheel needs a package no source has: the install says so, names the
    wheel, and installs the next fitting one, whose requirements can be had."""
    folder = tmp_path / "carried"
    sage_wheel(folder, "ok", f"2.4.0+{LABEL}", requires=["torch>=2.0", "nowhere-pkg>=1"])
    sage_wheel(folder, "ok", f"2.3.0+{LABEL}")
    r = cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
            "--find-links", str(folder), "--no-embedded-index", "--backends", "sage",
            "--no-verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(r.stdout)["backends"]
    assert row["action"] == "installed" and row["version"] == f"2.3.0+{LABEL}", row
    assert row["note"].startswith(f"passed over sageattention-2.4.0+{LABEL}-py3-none-any.whl: "
                                  "its requirements cannot be had (Because nowhere-pkg "), row
    assert installed_in(venv)["sageattention"] == f"2.3.0+{LABEL}"
    # with no next wheel, the backend is unavailable and the command fails, saying why
    (folder / f"sageattention-2.3.0+{LABEL}-py3-none-any.whl").unlink()
    r = cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
            "--find-links", str(folder), "--no-embedded-index", "--backends", "sage",
            "--no-verify", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    (row,) = json.loads(r.stdout)["backends"]
    assert row["action"] == "unavailable" and "nowhere-pkg" in row["note"], row
    assert installed_in(venv)["sageattention"] == f"2.3.0+{LABEL}"  # as it was


def test_a_wheel_not_had_leaves_the_installed_version_said_as_kept(tmp_path, venv, profile,
                                                                   http_server) -> None:
    """The wheel chosen cannot be had (its hash does not match): the version already
    installed stays, and the row says that is what it reports, not the wheel's."""
    ok = sage_wheel(tmp_path / "a", "ok", f"2.2.0+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [ok]), "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    newer = sage_wheel(tmp_path / "b", "ok", f"2.2.1+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [newer], bad_hash=True), "--no-verify",
                "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    (row,) = json.loads(r.stdout)["backends"]
    assert row["wheel"] == newer.name and row["version"] == f"2.2.0+{LABEL}", row
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"


@pytest.mark.parametrize("unresolvable", ["dep", "other"])
def test_a_failed_attempt_leaves_no_claim_on_the_next_wheel(tmp_path, venv, profile, uv_bin,
                                                            unresolvable: str) -> None:
    """sage 2.4 needs dep>=2 (and other); dep 2.0 or other needs a package no source has.
    sage 2.3 needs dep>=1, which the installed dep 1.0 meets: it installs, and dep stays
    1.0 (what the failed attempt's wheels claimed is forgotten)."""
    py = str(venv_python(venv))
    old = build_wheel(tmp_path / "old", "dep", "1.0", {"dep.py": ""}, requires=[])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps", str(old)],
                   check=True)
    folder = tmp_path / "links"
    sage_wheel(folder, "ok", f"2.4.0+{LABEL}", requires=["torch>=2.0", "dep>=2", "other"])
    sage_wheel(folder, "ok", f"2.3.0+{LABEL}", requires=["torch>=2.0", "dep>=1"])
    build_wheel(folder, "dep", "2.0", {"dep.py": ""},
                requires=["nowhere-pkg"] if unresolvable == "dep" else [])
    build_wheel(folder, "other", "1.0", {"other.py": ""},
                requires=["nowhere-pkg"] if unresolvable == "other" else [])
    r = cli("install", "--python", py, "--system", str(profile), "--find-links", str(folder),
            "--no-embedded-index", "--backends", "sage", "--no-verify", "--json")
    (row,) = json.loads(r.stdout)["backends"]
    assert row["action"] == "installed" and row["version"] == f"2.3.0+{LABEL}", row
    assert installed_in(venv) == {"dep": "1.0", "sageattention": f"2.3.0+{LABEL}"}


def test_only_what_the_failed_backend_brought_is_rolled_back(tmp_path) -> None:
    """_orphaned walks what each wheel of the run needed as the run resolved it, through an
    installed distribution's extras too: x, which a kept backend needs, stays, and so does
    z, which x needs through the installed y[fast], even where the failed backend asked for
    z as well; w came with the failed backend alone and goes."""
    from comfy_env_attn.install.edges import Fetched
    from comfy_env_attn.install.installer import _orphaned

    def run_wheel(name: str) -> tuple[str, Fetched]:
        from comfy_env_attn.candidates.sources import Candidate

        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        return name, Fetched(Candidate(path.name, str(path), "test"), path, "0" * 64,
                             "computed")

    extra = [run_wheel(n) for n in ("x", "z", "w")]
    brought = {"x": ["z"], "w": ["x"]}  # x -> y[fast] (installed) -> z, as resolved
    assert _orphaned(extra, brought, ["w", "z"], ["x"]) == ["w"]
    assert _orphaned(extra, brought, ["W"], []) == ["x", "z", "w"]  # nothing kept


def test_keep_failed_keeps_it_and_locks_the_failure(tmp_path, venv, profile,
                                                    http_server) -> None:
    w = sage_wheel(tmp_path / "w", "wrong", f"2.2.1+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [w]), "--keep-failed")
    assert r.returncode == 1
    assert "sageattention" in installed_in(venv)
    sage = read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]["backends"]["sage"]
    assert sage["status"] == "failed" and "max abs error" in sage["error"]
    assert "sage" not in read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]["auto"]


def test_a_backend_that_segfaults_fails_alone(tmp_path, venv, profile, http_server) -> None:
    w = sage_wheel(tmp_path / "w", "segfault", f"2.2.2+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [w]))
    assert r.returncode == 1
    assert "crashed with SIGSEGV" in r.stdout + r.stderr
    assert "sageattention" not in installed_in(venv)
    assert read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]["backends"]["sdpa"]["status"] \
        == "verified"


def test_a_wheel_that_needs_another_torch_is_refused(tmp_path, venv, profile,
                                                     http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.3+{LABEL}", requires=["torch==2.9.1"])
    r = install(venv, profile, serve_index(http_server, [w], metadata=True))
    assert r.returncode == 1
    assert "requires torch==2.9.1" in r.stdout and "would replace torch" in r.stdout
    assert "sageattention" not in installed_in(venv)
    # refused from its PEP 658 metadata: the wheel itself was never downloaded
    assert any(h.endswith(".whl.metadata") for h in http_server.hits)
    assert not any(h.endswith(".whl") for h in http_server.hits)
    # and without PEP 658, from the wheel's own METADATA, before anything is installed
    w2 = sage_wheel(tmp_path / "w2", "ok", f"2.2.4+{LABEL}", requires=["torch==2.9.1"])
    r = install(venv, profile, serve_index(http_server, [w2]))
    assert r.returncode == 1 and "requires torch==2.9.1" in r.stdout
    assert installed_in(venv) == {}


def test_hash_mismatch_is_refused(tmp_path, venv, profile, http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [w], bad_hash=True))
    assert r.returncode == 1
    assert "hash mismatch" in r.stdout and "refusing" in r.stdout
    assert installed_in(venv) == {}


def test_index_down_leaves_the_venv_unchanged(venv, profile) -> None:
    before = installed_in(venv)
    r = install(venv, profile, "http://127.0.0.1:9/simple")
    assert r.returncode == 1 and r.stderr.startswith("ERROR cannot reach index")
    assert installed_in(venv) == before
    assert not (venv / LOCK_NAME).exists()


def test_a_no_verify_lock_left_with_sdpa_alone_is_not_stale(tmp_path, venv, profile,
                                                            http_server) -> None:
    """install --no-verify, then uninstall of all it put in: the lock is SDPA's alone, which
    has nothing to prove; `lock` and `doctor` do not call it stale."""
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    assert install(venv, profile, serve_index(http_server, [w]), "--no-verify").returncode == 0
    py = str(venv_python(venv))
    r = cli("uninstall", "--python", py)
    assert r.returncode == 0, r.stdout + r.stderr
    tool = read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]
    assert tool["fingerprint"]["device"] == "unverified" and list(tool["backends"]) == ["sdpa"]
    r = cli("lock", "--python", py)
    assert r.returncode == 0 and "stale" not in r.stdout, r.stdout
    r = cli("doctor", "--python", py)
    assert "nothing was verified" not in r.stdout, r.stdout


def test_no_verify_then_verify_and_from_lock(tmp_path, venv, profile, http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    r = install(venv, profile, serve_index(http_server, [w]), "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    tool = read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]
    assert tool["backends"]["sage"]["status"] == "unverified" and "sage" not in tool["auto"]
    r = cli("lock", "--python", str(venv_python(venv)), env={"COLUMNS": "160"})
    assert r.returncode == 1 and "nothing was verified" in r.stdout  # stale until verified
    assert any("unverified" in line and f"2.2.0+{LABEL}" in line  # its wheel's version
               for line in r.stdout.splitlines()), r.stdout
    (sdpa,) = [line for line in r.stdout.splitlines() if "│ sdpa " in line]
    assert "builtin" in sdpa and "not checked here" in sdpa and "verified" not in sdpa, sdpa
    r = cli("verify", "--python", str(venv_python(venv)), *SHAPES)
    assert r.returncode == 0, r.stdout + r.stderr
    tool = read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]
    assert tool["backends"]["sage"]["status"] == "verified"
    assert tool["fingerprint"]["device"] == "cpu"
    # nothing to install and nothing verified: the lock's proof stands, byte for byte
    proven = (venv / LOCK_NAME).read_bytes()
    r = install(venv, profile, serve_index(http_server, [w]), "--no-verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["lock"] is None and "kept as it was" in r.stderr
    assert (venv / LOCK_NAME).read_bytes() == proven
    # a fresh venv reproduces exactly what the lock records; --backends picks among the
    # lock's backends, and one it does not lock is refused, never passed over in silence
    fresh = make_venv(tmp_path / "fresh", torch=True)
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock",
            str(venv / LOCK_NAME), "--backends", "sage,xformers", "--dry-run")
    assert r.returncode == 2 and f"{venv / LOCK_NAME} locks no wheel of xformers (it locks " \
        "sage)" in r.stderr, r.stdout + r.stderr
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock",
            str(venv / LOCK_NAME), "--backends", "sdpa", "--dry-run")
    assert r.returncode == 0 and "would install" not in r.stdout, r.stdout + r.stderr
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock",
            str(venv / LOCK_NAME), "--backends", "sage", *SHAPES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(fresh)["sageattention"] == f"2.2.0+{LABEL}"
    assert read(fresh / LOCK_NAME)["packages"] == read(venv / LOCK_NAME)["packages"]


def _put_in_by_uv(tmp_path: Path, venv: Path, uv_bin: str, variant: str) -> tuple[Path, str]:
    """A sageattention wheel of this variant installed by uv itself (not by this tool):
    (the wheel, the venv's Python)."""
    w = sage_wheel(tmp_path / "w", variant, f"2.2.0+{LABEL}")
    py = str(venv_python(venv))
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps", str(w)],
                   check=True)
    return w, py


def test_a_lock_verify_wrote_for_a_backend_installed_by_hand_is_kept(
        tmp_path, venv, profile, uv_bin) -> None:
    """sageattention put in by uv itself, then `verify`: the lock lists no [[packages]], its
    fingerprint holds the proof. `install --no-verify` with nothing to install keeps it; once
    the same version is reinstalled from other bytes, the proof no longer stands."""
    w, py = _put_in_by_uv(tmp_path, venv, uv_bin, "ok")
    r = cli("verify", "--python", py, *SHAPES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read(venv / LOCK_NAME)["packages"] == []
    proven = (venv / LOCK_NAME).read_bytes()
    args = ("install", "--python", py, "--system", str(profile), "--find-links",
            str(tmp_path / "w"), "--no-embedded-index", "--backends", "sage", "--no-verify")
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept as it was" in r.stderr and (venv / LOCK_NAME).read_bytes() == proven
    time.sleep(0.01)  # another mtime for the reinstalled files
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps",
                    "--reinstall", "--no-cache", str(w)], check=True)
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    tool = read(venv / LOCK_NAME)["tool"]["comfy-env-attn"]
    assert tool["backends"]["sage"]["status"] == "unverified"


def test_comfy_env_config(tmp_path, venv, profile, http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    cfg = tmp_path / "comfy-env.toml"
    cfg.write_text('[cuda]\npackages = ["sageattention>=2", "nvdiffrast", "flash_attn_3"]\n')
    r = cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
            "--index-url", serve_index(http_server, [w]), "--no-embedded-index",
            "--config", str(cfg), "--no-verify")
    assert r.returncode == 1, r.stdout + r.stderr  # flash_attn_3 was asked for and has no wheel
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    assert "left to comfy-env (not attention packages): nvdiffrast" in r.stderr
    assert "flash3" in r.stdout  # requested, no wheel found: said in the summary
    bad = tmp_path / "bad.toml"
    bad.write_text("[cuda]\npackages = [\"sageattention\"\n")  # unclosed at the end
    r = cli("install", "--python", str(venv_python(venv)), "--config", str(bad))
    assert r.returncode == 1 and "line" in r.stderr and "column" in r.stderr


def _start_install(venv: Path, profile: Path, index: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "comfy_env_attn", "install", "--python", str(venv_python(venv)),
         "--system", str(profile), "--index-url", index, "--no-embedded-index", "--backends",
         "sage", *SHAPES], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def test_kill_9_midway_then_a_new_run_leaves_a_consistent_venv(tmp_path, venv, profile,
                                                               http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    index = serve_index(http_server, [w])
    p = _start_install(venv, profile, index)
    journal = venv / ".comfy-env-attn" / "journal.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the package is in and verification runs
        if journal.exists() and json.loads(journal.read_text())["meta"]["state"] == "verifying":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the install never reached verification")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert "sageattention" in installed_in(venv)  # half done: installed, not verified
    r = cli("doctor", "--python", str(venv_python(venv)), "--json")
    doc = json.loads(r.stdout)
    assert any("interrupted install was found and undone" in f["message"]
               for f in doc["findings"]), doc
    assert "sageattention" not in installed_in(venv) and not journal.exists()
    r = install(venv, profile, index)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    check = subprocess.run([str(venv_python(venv)), "-c", "import sageattention"])
    assert check.returncode == 0


def test_two_concurrent_installs_serialise(tmp_path, venv, profile, http_server) -> None:
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    index = serve_index(http_server, [w])
    a = _start_install(venv, profile, index)
    time.sleep(1.0)
    b = _start_install(venv, profile, index)
    _, err_a = a.communicate(timeout=300)
    _, err_b = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    assert "waiting for another comfy-env-attn run" in err_a + err_b
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"


def test_an_unreachable_wheel_gives_way_to_the_next_fitting_one(tmp_path, venv, profile,
                                                                 http_server) -> None:
    good = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    newer = sage_wheel(tmp_path / "w", "ok", f"2.3.0+{LABEL}")
    index = serve_index(http_server, [good, newer])
    del http_server.routes[f"/files/{newer.name.replace('+', '%2B')}"]  # its host is gone
    r = install(venv, profile, index, "--no-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"download of {newer.name} failed" in r.stderr and "HTTP 404" in r.stderr
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    # the result's row names the wheel passed over, not only a log line
    (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith("sage: ")]
    assert f"passed over download of {newer.name} failed" in row, r.stdout


def test_wheels_on_an_unreachable_host_are_said_once(tmp_path, venv, profile,
                                                      http_server) -> None:
    """Every fitting wheel on a host that refuses connections: the first one's failure says
    why, the others, not tried, are counted in one line, not listed one by one."""
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    wheels = [sage_wheel(tmp_path / "w", "ok", f"2.2.{i}+{LABEL}") for i in range(3)]
    links = "".join(f'<a href="http://{dead}/files/{w.name.replace("+", "%2B")}#sha256='
                    f'{hashlib.sha256(w.read_bytes()).hexdigest()}">{w.name}</a>'
                    for w in wheels)
    http_server.add("/simple/sageattention/", f"<html><body>{links}</body></html>")
    r = install(venv, profile, http_server.url + "/simple", "--no-verify")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert f"2 more fitting wheels on {dead} not tried ({dead} was unreachable for an " \
        "earlier wheel)" in out, out
    assert "skipped," not in out, out
    assert "sageattention" not in installed_in(venv)


@pytest.fixture(autouse=True)
def torch_and_sympy_files_are_untouched():
    """Beyond torch's version and RECORD: every file of torch and sympy, byte for byte."""
    from untouched import baseline

    base = baseline()
    yield
    assert base.problems() == []


def test_metadata_headers_as_email_parser_reads_them() -> None:
    """Requirements are read from METADATA without the email package: folded fields
    (whitespace-only continuation lines included) stay one field, and the description after
    the first empty line is not read, even where it looks like a header."""
    from email.parser import HeaderParser

    from comfy_env_attn.core.fingerprint import metadata_headers

    text = ("Metadata-Version: 2.1\nName: scipy\nVersion: 1.17.1\n"
            "License: Copyright (c) 2001\n         All rights reserved.\n         \n"
            "         Redistribution and use\nRequires-Python: >=3.11\n"
            "Requires-Dist: numpy<2.7,>=1.26.4\nRequires-Dist: pytest; extra == \"test\"\n"
            "\nRequires-Dist: not-a-requirement\nLong description.\n")
    got = metadata_headers(text)
    assert got == [(k, v.strip()) for k, v in HeaderParser().parsestr(text).items()]
    assert [v for k, v in got if k == "Requires-Dist"] == [
        "numpy<2.7,>=1.26.4", "pytest; extra == \"test\""]
    # only CR, LF and CRLF end a line (not a form feed or U+2028, as str.splitlines has it);
    # a line that is neither a field nor a continuation ends the headers
    odd = ("Name: sympy\r\nSummary: a\u2028Requires-Dist: evil\r\n"
           "Description: x\f\r\n  more\r\nRequires-Dist: mpmath>=1.1\r\n"
           "not a header\r\nRequires-Dist: after-the-end\r\n")
    got = metadata_headers(odd)
    assert [v for k, v in got if k == "Requires-Dist"] == ["mpmath>=1.1"]
    assert [(k, " ".join(v.split())) for k, v in got] == [
        (k, " ".join(v.split())) for k, v in HeaderParser().parsestr(odd).items()]


def _install_from_folder(venv: Path, profile: Path, folder: Path, uv_cache: Path):
    return cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
               "--find-links", str(folder), "--no-embedded-index", "--backends", "sage",
               "--no-verify", "-v", env={"UV_CACHE_DIR": str(uv_cache), "UV_NO_CACHE": "0"})


def _uv_unpacked(uv_cache: Path) -> Path:
    """uv's unpacked copy of the one sageattention wheel it has cached (uv's own layout:
    archive-v0/<id>/; the tests that poison it skip where uv lays it out otherwise)."""
    found = [d for d in (uv_cache / "archive-v0").glob("*") if (d / "sageattention").is_dir()]
    if len(found) != 1:
        pytest.skip(f"uv's cache is not laid out as archive-v0/<id>/ here: {found}")
    return found[0]


def _sage_files(folder: Path, files: dict[str, str | bytes], *, hashes: bool = True,
                prefix: str = "") -> Path:
    from wheels import build_wheel

    return build_wheel(folder, "sageattention", f"2.2.0+{LABEL}", files,
                       record_hashes=hashes, record_prefix=prefix)


@pytest.mark.parametrize("case", ["file-missing", "no-hashes", "dot-slash-paths"])
def test_every_way_uvs_cached_copy_can_differ_is_caught(tmp_path, profile, case) -> None:
    """uv's cached copy of a wheel path holds another wheel: one that lacks a file the
    inspected wheel has; one whose RECORD gives no hashes (its file of the same size, other
    bytes: hashed here); the inspected wheel's RECORD writing './' paths. Each is rolled
    back."""
    import shutil
    import zipfile

    from wheels import SAGE_OK

    ok = SAGE_OK.encode()
    bad = ok.replace(b"q.float()", b"q.half() ")
    assert len(bad) == len(ok)
    inspected = {"sageattention/__init__.py": ok, "sageattention/extra.py": b"NEEDED = 1\n"}
    cached, kw = {"sageattention/__init__.py": bad, "sageattention/extra.py": b"NEEDED = 1\n"}, {}
    if case == "file-missing":
        cached = {"sageattention/__init__.py": ok}
    elif case == "no-hashes":
        kw = {"hashes": False}
    _sage_files(tmp_path / "w", inspected, prefix="./" if case == "dot-slash-paths" else "")
    other = _sage_files(tmp_path / "other", cached, **kw)
    uv_cache = tmp_path / "uv-cache"
    first = make_venv(tmp_path / "first", torch=True)
    r = _install_from_folder(first, profile, tmp_path / "w", uv_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    unpacked = _uv_unpacked(uv_cache)
    shutil.rmtree(unpacked)
    with zipfile.ZipFile(other) as z:
        z.extractall(unpacked)
    second = make_venv(tmp_path / "second", torch=True)
    r = _install_from_folder(second, profile, tmp_path / "w", uv_cache)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    what = "sageattention/extra.py (in the wheel, not installed" if case == "file-missing" \
        else "sageattention/__init__.py (hash sha256="
    assert what in out and "uv cache clean sageattention" in out, out
    assert installed_in(second) == {}


def _uv_command(r) -> str:
    return next(line for line in r.stderr.splitlines() if line.startswith("$ "))


def test_uv_answers_from_its_cache_yet_installs_exactly_the_inspected_wheel(
        tmp_path, profile) -> None:
    """Into a target that lacks the distribution, uv runs without --reinstall-package (which
    would make it query the interpreter again), its query of the target made beside the
    tool's imports. uv may then take a wheel's files from its cache of that path (keyed by
    ctime on Linux, by mtime on Windows, where a copy that keeps the mtime fools it): files
    of another wheel are caught by their RECORD's hashes and rolled back, with the way
    out. The target has the distribution: --reinstall-package, and uv reads the file."""
    import zipfile

    from comfy_env_attn.facts.probe_start import uv_binary

    uv_cache = tmp_path / "uv-cache"
    uv_env = {**os.environ, "UV_CACHE_DIR": str(uv_cache), "UV_NO_CACHE": "0"}
    folder = tmp_path / "w"
    first = make_venv(tmp_path / "first", torch=True)
    sage_wheel(folder, "ok", f"2.2.0+{LABEL}")
    r = _install_from_folder(first, profile, folder, uv_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " pip install " in _uv_command(r) and "--reinstall-package" not in _uv_command(r)
    # uv's query of `first` was cached before uv installed: uv answers from it now
    q = subprocess.run([str(uv_binary()), "-vv", "pip", "list", "--python",
                        str(venv_python(first))], capture_output=True, text=True, env=uv_env)
    assert "Found cached interpreter info" in q.stderr, q.stderr[-2000:]

    # uv's cache of that path now holds another wheel's files (what a copy that kept the
    # mtime leaves on Windows): made here by writing that wheel over uv's unpacked copy
    unpacked = _uv_unpacked(uv_cache)
    other = sage_wheel(tmp_path / "other", "wrong", f"2.2.0+{LABEL}")
    with zipfile.ZipFile(other) as z:
        for name in z.namelist():
            (unpacked / name).write_bytes(z.read(name))
    second = make_venv(tmp_path / "second", torch=True)
    r = _install_from_folder(second, profile, folder, uv_cache)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "does not match what its wheel showed: sageattention/__init__.py (hash sha256=" in out
    assert "uv cache clean sageattention" in out and "the target was restored" in out
    assert installed_in(second) == {}

    # once cleaned, the same install works; into a target that has it, uv reinstalls
    subprocess.run([str(uv_binary()), "cache", "clean", "sageattention"], check=True,
                   capture_output=True, env=uv_env)
    r = _install_from_folder(second, profile, folder, uv_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    newer = sage_wheel(tmp_path / "newer", "wrong", f"2.2.1+{LABEL}")
    r = _install_from_folder(second, profile, newer.parent, uv_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--reinstall-package sageattention" in _uv_command(r), r.stdout + r.stderr
    assert (site(second) / "sageattention" / "__init__.py").read_text() == SAGE_WRONG
    # and again: nothing to change, uv is not run at all
    r = _install_from_folder(second, profile, newer.parent, uv_cache)
    assert r.returncode == 0 and "already 2.2.1" in r.stdout, r.stdout + r.stderr
    assert "$ " not in r.stderr, r.stderr


def _processes_naming(text: str) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and d.name != str(os.getpid()):
            out.append(f"{d.name}: {cmd}")
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_an_interrupted_install_leaves_no_uv_query_behind(tmp_path, profile, sig) -> None:
    """uv's early query of the target runs in a session of its own, out of reach of the
    terminal's signals; the tool interrupted (SIGINT to it alone, as a terminal's Ctrl-C is
    not: that reaches the whole group; SIGTERM, as `timeout` or a service manager sends;
    SIGHUP, a closed terminal) while it waits for a target that starts slowly under uv stops
    uv and the interpreter uv started, and the target is as it was."""
    venv = make_venv(tmp_path / "slow", torch=True)
    (site(venv) / "zz_slow_under_uv.pth").write_text(
        "import os, time; exec(\"try:\\n c = open('/proc/%d/cmdline' % os.getppid(), 'rb')"
        ".read().split(b'\\\\0')[0]\\nexcept OSError:\\n c = b''\\nif c.endswith(b'/uv') and "
        "os.environ.get('SLOW_UNDER_UV'):\\n time.sleep(60)\")\n")
    sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    p = subprocess.Popen(
        [sys.executable, "-m", "comfy_env_attn", "install", "--python", str(venv_python(venv)),
         "--system", str(profile), "--find-links", str(tmp_path / "w"), "--no-embedded-index",
         "--backends", "sage", "--no-verify"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SLOW_UNDER_UV": "1", "UV_CACHE_DIR": str(tmp_path / "uv-cache")},
        **TERMINAL)
    deadline = time.time() + 60
    while not any(" python find " in c for c in _processes_naming(str(venv))):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # the tool is waiting for it now
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "ERROR interrupted" in err, err
    deadline = time.time() + 10
    while _processes_naming(str(venv)) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_naming(str(venv)) == []
    assert installed_in(venv) == {} and not (venv / ".comfy-env-attn" / "journal.json").exists()


@pytest.mark.skipif(os.name == "nt", reason="a /bin/sh shim")
def test_a_shim_installs_into_the_interpreter_it_runs_now(tmp_path, profile) -> None:
    """`--python python3` where python3 is a pyenv-like shim: probed while it ran venv a,
    then installed with it running venv b. The install goes into b, the one the shim runs,
    and is checked there: a stale answer about the shim would have journalled a, let uv
    install into b, then "restored" a and left b changed."""
    a, b = make_venv(tmp_path / "a", torch=True), make_venv(tmp_path / "b", torch=True)
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python3").write_text(f'#!/bin/sh\nexec "{tmp_path}/$SEL/bin/python" "$@"\n')
    (shims / "python3").chmod(0o755)
    sage_wheel(tmp_path / "wh", "ok", f"2.2.0+{LABEL}")
    path = f"{shims}{os.pathsep}{os.environ['PATH']}"
    r = cli("probe", "--python", "python3", "--json", env={"PATH": path, "SEL": "a"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["executable"] == str(venv_python(a))
    r = cli("install", "--python", "python3", "--system", str(profile), "--find-links",
            str(tmp_path / "wh"), "--no-embedded-index", "--backends", "sage", "--no-verify",
            env={"PATH": path, "SEL": "b"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"is a script that runs {venv_python(b)}" in r.stderr
    assert installed_in(b)["sageattention"] == f"2.2.0+{LABEL}"
    assert "sageattention" not in installed_in(a)
    assert (b / LOCK_NAME).is_file() and not (a / LOCK_NAME).exists()


def test_the_uninstall_fallback_takes_only_that_distribution(tmp_path) -> None:
    """After uv's uninstall, what is left of that distribution (a .dist-info uv could not
    remove, or not see) is removed as far as its RECORD goes, and never another
    distribution whose folder name starts alike (bar-baz-1.0), nor a file its RECORD puts
    outside the environment. Real uv, in a real venv."""
    from comfy_env_attn.facts.installed import read_installed
    from comfy_env_attn.facts.probe import probe_interpreter
    from comfy_env_attn.install import installer

    venv = make_venv(tmp_path / "v", torch=False)
    target = probe_interpreter(str(venv_python(venv)))
    site = Path(installer.own_sites(target)[0])
    for folder, name, module in (("bar-1.0.dist-info", "bar", "bar.py"),
                                 ("bar-baz-1.0.dist-info", "bar-baz", "bar_baz.py")):
        (site / folder).mkdir()
        (site / folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                                "Version: 1.0\n")
        (site / module).write_text("x")
        (site / folder / "RECORD").write_text(f"{module},,\n{folder}/RECORD,,\n")
    # a second, broken .dist-info of bar (a kill while writing it): uv does not see it
    broken = site / "bar-2.0.dist-info"
    broken.mkdir()
    (broken / "RECORD").write_text("bar_new.py,,\n../../../../../x,,\nbar_ne")
    (site / "bar_new.py").write_text("x")
    outside = tmp_path.parent / "x"
    outside.write_text("outside the environment")
    before = {p.name for p in site.iterdir()}
    installer.uninstaller(target)("bar")
    assert sorted(read_installed([str(site)])) == ["bar-baz"]
    assert {p.name for p in site.iterdir()} == \
        before - {"bar-1.0.dist-info", "bar.py", "bar-2.0.dist-info", "bar_new.py"}
    assert outside.read_text() == "outside the environment"


@pytest.mark.parametrize("passthrough", [False, True])
def test_work_meant_for_while_uv_runs_starts_once_uv_has_started(tmp_path: Path,
                                                                 passthrough: bool) -> None:
    """run_uv's `meanwhile` (the lock writer's imports and the owner index, which would hold
    back uv's start if they began before it) runs after uv has started and before it ends,
    with uv's output captured or passed through to a terminal; a failure of `meanwhile`
    stops uv."""
    from comfy_env_attn.install.edges import run_uv

    started, ended = tmp_path / "started", tmp_path / "ended"
    fake = tmp_path / "uv.py"
    fake.write_text(  # `ended` before the print: stopped, it could not die of a closed pipe
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(0.5)\n"
        f"pathlib.Path({str(ended)!r}).touch()\n"
        "print('Installed 1 package in 3ms', file=sys.stderr)\n", encoding="utf-8")
    seen: list[tuple[bool, bool]] = []

    def meanwhile() -> None:
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append((started.exists(), ended.exists()))

    lines: list[str] = []
    out = run_uv([str(fake)], lines.append, uv=sys.executable, meanwhile=meanwhile,
                 passthrough=passthrough)
    assert seen == [(True, False)] and ended.exists()
    assert passthrough or "Installed 1 package" in out

    started.unlink()
    ended.unlink()

    def fails() -> None:
        meanwhile()
        raise OSError("no room")

    with pytest.raises(OSError, match="no room"):
        run_uv([str(fake)], lines.append, uv=sys.executable, meanwhile=fails,
               passthrough=passthrough)
    time.sleep(0.7)
    assert not ended.exists()  # stopped, not left to run on


def test_the_install_starts_its_background_work_once_uv_runs(
        tmp_path: Path, venv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """_uv_install, with the real uv installing a real wheel: the hashing of a local wheel
    for the lock (not begun before: it would compete with the way to uv), the lock writer's
    imports and the owner index start while uv runs (uv is this process's child then), the
    index leaves out what uv replaces, and is joined before the install goes on; the
    background work is optional: its failure does not stop uv."""
    from types import SimpleNamespace

    from comfy_env_attn.install import installer
    from comfy_env_attn.install.edges import FileDigest, sha256_file

    def children() -> set[str]:  # the running processes this thread started
        task = Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children")
        return set(task.read_text().split())

    earlier: set[str] = set()

    def uv_running() -> bool:  # a process started by _uv_install (uv, found as the tests'
        return bool(children() - earlier)  # uv_binary finds it) and not ended

    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        pytest.skip("reads the running uv from /proc (Linux)")
    order: list[str] = []
    monkeypatch.setattr(installer.lockfile, "load_in_background",
                        lambda: order.append(f"lock writer, uv running: {uv_running()}"))
    indexed: list[list[str]] = []

    def index(installed: list[Installed]) -> threading.Thread:
        order.append(f"index, uv running: {uv_running()}")
        indexed.append(sorted(i.name for i in installed))
        thread = threading.Thread(target=lambda: (time.sleep(0.2), order.append("indexed")))
        thread.start()
        return thread

    monkeypatch.setattr(installer, "index_in_background", index)

    class Digest(FileDigest):
        def start(self) -> None:
            if self._thread is None:
                order.append(f"hash, uv running: {uv_running()}")
            super().start()

    path = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    wheel = SimpleNamespace(path=path, digest=Digest(path))
    assert "sha256" not in [t.name for t in threading.enumerate()]  # not begun yet
    target = SimpleNamespace(executable=str(venv_python(venv)))
    site = [str(venv_site(venv))]
    earlier |= children()
    for _ in range(2):  # installed, then reinstalled over itself
        before = read_installed(site)
        installer._uv_install(target, [("sageattention", wheel)], tmp_path,  # type: ignore[arg-type,list-item]
                              before)
        assert order == [*(["hash, uv running: True"] if not indexed[:-1] else []),
                         "lock writer, uv running: True", "index, uv running: True",
                         "indexed"], order
        assert indexed[-1] == sorted(n for n in before if n != "sageattention")
        assert wheel.digest.value() == sha256_file(path)
        order.clear()
    assert "sageattention" in read_installed(site) and "sageattention" in before

    def no_thread() -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(installer.lockfile, "load_in_background", no_thread)
    installer._uv_install(target, [("sageattention", wheel)], tmp_path,  # type: ignore[arg-type,list-item]
                          read_installed(site))
    assert order == ["index, uv running: True", "indexed"]
    assert read_installed(site)["sageattention"].version == f"2.2.0+{LABEL}"


def test_uv_output_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """uv writes UTF-8 (its "✓", a path's accents) under any locale, Windows' cp1252 too:
    run_uv reads it as such, never with the locale's encoding (here ASCII, the C locale
    without Python's coercion)."""
    fake = tmp_path / "uv.py"
    fake.write_bytes(b"import sys\nsys.stderr.buffer.write('\\u2713 Installed 1 package in "
                     b"/tmp/\\u00e9t\\u00e9 3ms\\n'.encode())\n")
    code = ("import sys\nfrom comfy_env_attn.install.edges import run_uv\n"
            f"out = run_uv([{str(fake)!r}], print, uv=sys.executable)\n"
            "sys.stdout.buffer.write(out.encode('utf-8'))\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert "\u2713 Installed 1 package in /tmp/\u00e9t\u00e9" in r.stdout.decode("utf-8")


def test_verify_that_fails_says_what_and_the_way_out(tmp_path, venv, uv_bin) -> None:
    """`verify` finding a backend that gives wrong results: exit 1 with an error line naming
    it, what the lock does about it, and the step doctor would give; pasted, that step
    takes it out."""
    _w, py = _put_in_by_uv(tmp_path, venv, uv_bin, "wrong")
    r = cli("verify", "--python", py, *SHAPES)
    assert r.returncode == 1, r.stdout + r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("ERROR ")]
    assert error and error[0].startswith("ERROR verification failed: sage (the lock sends "
                                         "none of their calls there"), r.stderr
    step = error[0].split("to take them out, run: ", 1)[1]
    assert step.endswith(f"uninstall --backends sage --python {py}"), step
    r = subprocess.run(step, shell=True, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sageattention" not in installed_in(venv)


def test_the_failure_line_names_what_failed_not_what_was_never_asked_for() -> None:
    """A backend nobody named that has no wheel is no failure (a plain install exits 0 with
    such rows): the error line of a run that failed otherwise leaves it out."""
    from comfy_env_attn.install.installer import Outcome

    out = Outcome()
    out.row("sage").action, out.row("sage").note = "rolled-back", "wrong results"
    out.row("flash3").action, out.row("flash3").note = "no-wheel", "no wheel: none fits"
    out.row("flash3").asked = False
    out.row("xformers").action, out.row("xformers").note = "no-wheel", "no wheel: torch"
    assert out.why_not_ok() == ("not done as asked: sage (wrong results); xformers (no wheel: "
                                "torch)")
