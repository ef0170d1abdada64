"""Hostile sources (issue 13): wheels that would change torch, a package torch needs, the venv's
own scripts, or files outside the download cache. Real uv, real venvs, wheels built here and
served over loopback; after every test torch's and sympy's files are checked byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, make_venv, venv_python, venv_site, write_gpu_profile
from untouched import baseline
from wheels import (
    SAGE_OK,
    build_wheel,
    hostile_wheel,
    sage_wheel,
    sympy_impostor,
    traversal_name,
)

from comfy_env_attn.facts.installed import protected, read_installed
from comfy_env_attn.install import guard
from comfy_env_attn.install.edges import Needs, check_requirements

torch = pytest.importorskip("torch")
TORCH = torch.__version__
TORCH_MINOR = ".".join(TORCH.split("+")[0].split(".")[:2])
LABEL = f"cu128torch{TORCH_MINOR}"


@pytest.fixture(autouse=True)
def torch_and_sympy_untouched():
    base = baseline()
    yield
    assert base.problems() == []


site = venv_site


def installed_in(venv: Path) -> dict[str, str]:
    return {k: v.version for k, v in read_installed([str(site(venv))]).items()}



@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write_gpu_profile(tmp_path, glibc="2.28")


def serve(server, projects: dict[str, list[Path]], *, names: dict[Path, str] | None = None
          ) -> str:
    """A PEP 503 index of these projects on the loopback server; `names` overrides the
    filename a link shows (quoted as an index would write it)."""
    for project, wheels in projects.items():
        links = []
        for w in wheels:
            name = (names or {}).get(w, w.name.replace("+", "%2B"))
            url = server.add(f"/files/{name}", w.read_bytes(), "application/octet-stream")
            sha = hashlib.sha256(w.read_bytes()).hexdigest()
            links.append(f'<a href="{url}#sha256={sha}">{name}</a>')
        server.add(f"/simple/{project}/", "<html><body>" + "".join(links) + "</body></html>")
    return server.url + "/simple"


def install(venv: Path, profile: Path, *extra: str, env: dict[str, str] | None = None):
    return cli("install", "--python", str(venv_python(venv)), "--system", str(profile),
               "--no-embedded-index", "--backends", "sage", "--no-verify", *extra, env=env)


def test_hostile_wheels_are_refused_and_the_clean_one_installed(tmp_path, venv, profile,
                                                                 http_server) -> None:
    """Each fitting wheel in the plan's order is inspected before anything is installed;
    every hostile one is refused with the wheel, the path and its owner, and the next one
    is tried: here down to the clean 2.2.0."""
    w = tmp_path / "w"
    hostile = {kind: hostile_wheel(w, kind, f"2.2.{i}+{LABEL}")
               for i, kind in enumerate(["sympy", "distinfo", "pth", "scripts", "torch"], 1)}
    clean = sage_wheel(w, "ok", f"2.2.0+{LABEL}")
    index = serve(http_server, {"sageattention": [clean, *hostile.values()],
                                "sympy": [sympy_impostor(w)]})
    activate = (venv / "bin" / "activate").read_bytes()
    r = install(venv, profile, "--index-url", index)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    assert f"sageattention-2.2.5+{LABEL}-py3-none-any.whl: torch/__init__.py would go into " \
           f"torch, which belongs to torch {TORCH}" in out
    assert "sageattention-2.2.4" in out and ".data/scripts/activate would replace" in out
    assert "bin/activate" in out and "part of the environment" in out
    assert "zz_sage_hook.pth is a .pth file" in out
    assert f"is metadata of another distribution (torch-{TORCH}.dist-info)" in out
    assert "requires sympy==0.0.1; the target has sympy" in out and \
        "would replace sympy, which torch needs" in out
    # nothing of theirs got in: no torch/ hiding the real one, no sympy, the venv's own
    # scripts as they were, no .pth
    assert not (site(venv) / "torch").exists() and "sympy" not in installed_in(venv)
    assert (venv / "bin" / "activate").read_bytes() == activate
    assert not (venv / "bin" / "pip").exists()
    assert not list(site(venv).glob("zz_*.pth"))
    check = subprocess.run([str(venv_python(venv)), "-c",
                            "import torch, sympy; print(torch.__file__, sympy.__version__)"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and str(Path(torch.__file__)) in check.stdout


@pytest.fixture(scope="module")
def fake_torch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel named torch, to make a venv whose torch is in its own site-packages (as in a
    ComfyUI venv): there a wheel shipping torch/__init__.py overwrites torch itself."""
    return build_wheel(tmp_path_factory.mktemp("fake-torch"), "torch", "2.13.0", {
        "torch/__init__.py": "__version__ = '2.13.0'\nREAL = True\n",
        "torch/version.py": "__version__ = '2.13.0'\ncuda = None\n",
    }, requires=[])


def fake_torch_venv(path: Path, uv_bin: str, fake_torch: Path) -> Path:
    make_venv(path, torch=False)
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", str(venv_python(path)),
                    "--no-deps", str(fake_torch)], check=True)
    return path


def test_a_wheel_cannot_overwrite_torch_in_its_own_site(tmp_path, uv_bin, fake_torch) -> None:
    venv = fake_torch_venv(tmp_path / "v", uv_bin, fake_torch)
    torch_init = site(venv) / "torch" / "__init__.py"
    before = torch_init.read_bytes()
    profile = tmp_path / "p.toml"
    profile.write_text(f'python = "{sys.version.split()[0]}"\nplatform = "linux"\n'
                       'torch = "2.13.0+cu128"\ntorch_cuda = "12.8"\ngpus = ["8.9"]\n'
                       'driver_cuda = "12.8"\n')
    # carried on this machine (--find-links FOLDER): inspected like a downloaded one
    w = hostile_wheel(tmp_path / "w", "torch", "2.2.0+cu128torch2.13")
    r = install(venv, profile, "--find-links", str(w.parent))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"torch/__init__.py would overwrite {torch_init}, which belongs to torch 2.13.0" \
        in r.stdout + r.stderr
    assert torch_init.read_bytes() == before and "sageattention" not in installed_in(venv)
    # doctor checks torch's files against its RECORD: untouched here ...
    r = cli("doctor", "--python", str(venv_python(venv)), "--json")
    doc = json.loads(r.stdout)
    assert not [f for f in doc["findings"] if f["subject"] == "torch" and
                "RECORD" in f["message"]], doc
    # ... and a torch modified in place is a problem naming the file, exit 1
    torch_init.write_text("PWNED = True\n")
    r = cli("doctor", "--python", str(venv_python(venv)), "--json")
    doc = json.loads(r.stdout)
    bad = [f for f in doc["findings"] if f["subject"] == "torch" and f["severity"] == "problem"
           and "torch/__init__.py (modified)" in f["message"]]
    assert r.returncode == 1 and bad, doc


def test_entry_point_launchers_and_module_files_are_refused(tmp_path, venv, profile,
                                                           http_server) -> None:
    """What a wheel writes beyond its zip listing counts too: a console script named python
    would replace the venv's interpreter; a top-level torch.py earlier on sys.path hides
    torch as surely as a torch/ folder. Both are refused before install, the clean wheel
    goes in, and its own launcher is allowed."""
    w = tmp_path / "w"
    info = f"sageattention-2.2.7+{LABEL}.dist-info"
    launcher = build_wheel(w, "sageattention", f"2.2.7+{LABEL}", {
        "sageattention/__init__.py": SAGE_OK + "def main():\n    print('pwned')\n",
        f"{info}/entry_points.txt": "[console_scripts]\npython = sageattention:main\n"},
        requires=["torch>=2.0"])
    module = build_wheel(w, "sageattention", f"2.2.6+{LABEL}", {
        "sageattention/__init__.py": SAGE_OK, "torch.py": "PWNED = True\n"},
        requires=["torch>=2.0"])
    info = f"sageattention-2.2.0+{LABEL}.dist-info"
    clean = build_wheel(w, "sageattention", f"2.2.0+{LABEL}", {
        "sageattention/__init__.py": SAGE_OK + "def main():\n    print('sage')\n",
        f"{info}/entry_points.txt": "[console_scripts]\nsage-info = sageattention:main\n"},
        requires=["torch>=2.0"])
    python = venv / "bin" / "python"
    before = (os.path.realpath(python), python.read_bytes())
    r = install(venv, profile, "--index-url",
                serve(http_server, {"sageattention": [clean, launcher, module]}))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"[console_scripts] python would replace {python}, which is already there" in out
    assert "torch.py would be imported as torch, which belongs to torch" in out
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    assert (os.path.realpath(python), python.read_bytes()) == before
    assert not (site(venv) / "torch.py").exists()
    assert (venv / "bin" / "sage-info").exists()  # its own launcher: a new file, no owner


def test_after_install_uvs_record_must_match_what_the_guard_saw(tmp_path, venv, profile,
                                                               http_server) -> None:
    """uv writes RECORD from what it really installed. After the install, each file it lists
    must be one the guard approved (or the installer's own .dist-info files) and be there
    at its recorded size; anything else fails the install. Shown on a real install whose
    RECORD is then made to name the venv's python, and to miss a file."""
    from comfy_env_attn.candidates.sources import Candidate
    from comfy_env_attn.core.errors import InstallError
    from comfy_env_attn.facts.probe import probe_interpreter
    from comfy_env_attn.install.edges import Fetched
    from comfy_env_attn.install.installer import _check_untouched, _Context

    wheel = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    r = install(venv, profile, "--index-url", serve(http_server, {"sageattention": [wheel]}))
    assert r.returncode == 0, r.stdout + r.stderr
    ctx = _Context(probe_interpreter(str(venv_python(venv)), use_cache=False))
    cand = Candidate(filename=wheel.name, url=wheel.as_uri(), source="test")
    assert ctx.inspect(Fetched(cand, wheel, "0" * 64, "computed"), "sageattention") == []
    after = read_installed(ctx.target.site_dirs)
    _check_untouched(ctx, None, after, ["sageattention"])  # as installed: fine
    record = Path(after["sageattention"].dist_info) / "RECORD"
    record.write_text(record.read_text() + "../../../bin/python,,\n")
    with pytest.raises(InstallError, match=r"does not match what its wheel showed: "
                                           r"\.\./\.\./\.\./bin/python \(not in the wheel\)"):
        _check_untouched(ctx, None, read_installed(ctx.target.site_dirs), ["sageattention"])
    record.write_text("".join(line for line in record.read_text().splitlines(True)
                              if "bin/python" not in line))
    (site(venv) / "sageattention" / "__init__.py").unlink()
    with pytest.raises(InstallError, match=r"sageattention/__init__\.py \(missing\)"):
        _check_untouched(ctx, None, read_installed(ctx.target.site_dirs), ["sageattention"])


def test_a_dependency_that_needs_another_sympy_is_refused(tmp_path, venv, profile,
                                                          http_server) -> None:
    """Two levels down: sageattention needs sage-helper, which needs sympy==0.0.1. Each
    requirement's wheel is fetched and read before anything is installed: the helper's own
    requirement is refused, and nothing goes in."""
    w = tmp_path / "w"
    sage = sage_wheel(w, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "sage-helper"])
    helper = build_wheel(w, "sage-helper", "1.0", {"sage_helper.py": "X = 1\n"},
                         requires=["sympy==0.0.1"])
    index = serve(http_server, {"sageattention": [sage], "sage-helper": [helper],
                                "sympy": [sympy_impostor(w)]})
    r = install(venv, profile, "--index-url", index)
    assert r.returncode == 1
    assert "sage_helper-1.0-py3-none-any.whl requires sympy==0.0.1" in r.stderr and \
        "would replace sympy, which torch needs" in r.stderr
    assert "nothing was installed for sage" in r.stderr and " pip install " not in r.stderr
    assert installed_in(venv) == {}


def test_traversal_and_local_links_never_touch_the_disk(tmp_path, venv, profile,
                                                        http_server) -> None:
    w = tmp_path / "w"
    trav = sage_wheel(w, "ok", f"2.2.1+{LABEL}")
    local = sage_wheel(tmp_path / "local", "ok", f"2.2.2+{LABEL}")
    cache = tmp_path / "a" / "b" / "cache"
    index = serve(http_server, {"sageattention": [trav]},
                  names={trav: traversal_name(f"2.2.1+{LABEL}")})
    # a remote index linking a wheel on this machine by file://
    page = http_server.routes["/simple/sageattention/"].body.decode()
    http_server.add("/simple/sageattention/", page.replace(
        "</body>", f'<a href="{local.as_uri()}">{local.name}</a></body>'))
    r = install(venv, profile, "--index-url", index,
                env={"COMFY_ENV_ATTN_CACHE_DIR": str(cache)})
    assert r.returncode == 1
    assert "link not taken: invalid wheel filename (not one file name of letters, digits " \
        f"and ._+!-): 'sageattention-2.2.1+{LABEL}-1/../../../../evil-py3-none-any.whl'" \
        in r.stderr
    assert "a remote index may not link a local file" in r.stderr
    assert not list(tmp_path.rglob("*evil*")) and installed_in(venv) == {}


def test_from_lock_names_are_checked(tmp_path, venv, profile, http_server, uv_bin) -> None:
    """A lock is input too: a wheel name with a folder in it, or a torch package, is refused
    before anything is fetched."""
    w = sage_wheel(tmp_path / "w", "ok", f"2.2.0+{LABEL}")
    index = serve(http_server, {"sageattention": [w]})
    r = install(venv, profile, "--index-url", index)
    assert r.returncode == 0, r.stdout + r.stderr
    lock = (venv / "pylock.comfy-env-attn.toml").read_text()
    fresh = make_venv(tmp_path / "fresh", torch=True)
    cache = tmp_path / "x" / "y" / "cache"
    bad = tmp_path / "bad.toml"
    # packaging.pylock takes this name: its build tag only has to start with a digit
    evil = f"sageattention-2.2.0+{LABEL}-1/../../../../evil-py3-none-any.whl"
    bad.write_text(lock.replace(f'name = "{w.name}"', f'name = "{evil}"'))
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock", str(bad),
            "--no-verify", env={"COMFY_ENV_ATTN_CACHE_DIR": str(cache)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"refusing a wheel from lock:{bad}: invalid wheel filename" in r.stdout + r.stderr
    assert not list(tmp_path.rglob("*evil*")) and installed_in(fresh) == {}
    bad.write_text(lock.replace("sageattention", "torch"))
    r = cli("install", "--python", str(venv_python(fresh)), "--from-lock", str(bad),
            "--no-verify")
    assert r.returncode == 1 and r.stderr.startswith("ERROR") and "torch" in r.stderr
    assert "Traceback" not in r.stderr and installed_in(fresh) == {}


# -- the guard's rules, pure ------------------------------------------------------------

LAYOUT = guard.Layout(site="/v/site", scripts="/v/bin", data="/v", headers="/v/include/site/p")


def _owners() -> guard.Owners:
    return guard.build_owners([
        ("flash-attn", "2.8.3", "/v/site", ["flash_attn/__init__.py", "flash_attn/ops.py",
                                            "flash_attn-2.8.3.dist-info/RECORD"]),
        ("torch", "2.9.1", "/sys/site", ["torch/__init__.py", "../../../bin/torchrun"]),
        ("pip", "25.0", "/v/site", ["pip/__init__.py", "../bin/pip"]),
    ])


def _problems(dist: str, dist_dir: str, names: list[str], existing: tuple[str, ...] = ()
              ) -> list[str]:
    entries, refused = guard.destinations("x.whl", dist_dir, names, LAYOUT, dist=dist)
    return refused + guard.problems("x.whl", dist, dist_dir, entries, _owners(), existing)


def test_guard_flash4_may_add_files_inside_flash_attn_but_not_overwrite() -> None:
    d = "flash_attn_4-4.0.0b1"
    assert _problems("flash-attn-4", d, ["flash_attn/cute/__init__.py",
                                         f"{d}.dist-info/METADATA"]) == []
    assert _problems("flash-attn-4", d, ["flash_attn/__init__.py"]) == [
        "x.whl: flash_attn/__init__.py would overwrite /v/site/flash_attn/__init__.py, which "
        "belongs to flash-attn 2.8.3"]
    # the sharing is between those two only
    assert _problems("sageattention", "sageattention-2.2.0", ["flash_attn/cute/x.py"]) == [
        "x.whl: flash_attn/cute/x.py would go into flash_attn, which belongs to flash-attn 2.8.3"]


def test_guard_paths_scripts_and_packages_of_others() -> None:
    d = "sageattention-2.2.0"
    assert _problems("sageattention", d, [f"{d}.data/scripts/pip"]) == [
        f"x.whl: {d}.data/scripts/pip would overwrite /v/bin/pip, which belongs to pip 25.0"]
    assert _problems("sageattention", d, [f"{d}.data/scripts/python"], ("/v/bin/python",)) == [
        f"x.whl: {d}.data/scripts/python would replace /v/bin/python, which is already there "
        "and belongs to no distribution (part of the environment)"]
    assert _problems("sageattention", d, [f"{d}.data/scripts/sage-info"]) == []
    assert _problems("sageattention", d, ["torch/__init__.py", "torch/x.py"]) == [
        "x.whl: torch/__init__.py would go into torch, which belongs to torch 2.9.1"]
    assert _problems("sageattention", d, ["../evil.py", "/etc/passwd", "a\\b.py",
                                          f"{d}.data/weird/x"]) == [
        "x.whl: the entry '../evil.py' has a '.' or '..' component",
        "x.whl: the entry '/etc/passwd' is an absolute path",
        "x.whl: the entry 'a\\\\b.py' has a backslash or NUL in its name",
        f"x.whl: {d}.data/weird/x is in an unknown .data folder"]
    # a new version of the same distribution replaces its own files
    assert _problems("flash-attn", "flash_attn-2.8.4", ["flash_attn/__init__.py"]) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX paths")
@pytest.mark.parametrize("os_name", ["windows", "macos"])
def test_guard_compares_names_case_insensitively_where_the_file_system_does(os_name) -> None:
    """On NTFS and a default APFS volume `Torch/` is torch's own folder: a wheel's
    `Torch/_C/__init__.py` would land in it and make `torch._C` its package. Where names
    fold (facts.locate.folds_case), each rule compares them so; on Linux the same names are
    other folders, and nothing of torch's is reached."""
    from comfy_env_attn.facts.locate import folds_case

    fold = folds_case(os_name)
    assert fold and not folds_case("linux")
    records = [("torch", "2.9.1", "/v/site", ["torch/__init__.py", "torch/_C.so",
                                              "torch-2.9.1.dist-info/RECORD"]),
               ("pip", "25.0", "/v/site", ["pip/__init__.py", "../bin/pip"])]
    d = "SageAttention-2.2.0"  # a .dist-info not lower-cased is the wheel's own still

    def problems(names: list[str], *, fold: bool) -> list[str]:
        entries, refused = guard.destinations("x.whl", d, names, LAYOUT, dist="sageattention")
        owners = guard.build_owners(records, fold=fold)
        claimed = owners.claim("flash-attn", "2.8.3", guard.destinations(
            "y.whl", "flash_attn-2.8.3", ["flash_attn/__init__.py"], LAYOUT,
            dist="flash-attn")[0])
        return refused + guard.problems("x.whl", "sageattention", d, entries, claimed, ())

    hostile = ["Torch/_C/__init__.py", "TORCH/__init__.py", "Pip/__init__.py",
               f"{d}.data/scripts/PIP", "Flash_Attn/__init__.py", "SiteCustomize.py"]
    assert problems(hostile, fold=True) == [
        "x.whl: Torch/_C/__init__.py would go into torch, which belongs to torch 2.9.1",
        "x.whl: TORCH/__init__.py would overwrite /v/site/TORCH/__init__.py, which belongs "
        "to torch 2.9.1",
        "x.whl: Pip/__init__.py would overwrite /v/site/Pip/__init__.py, which belongs to "
        "pip 25.0",
        f"x.whl: {d}.data/scripts/PIP would overwrite /v/bin/PIP, which belongs to pip 25.0",
        "x.whl: Flash_Attn/__init__.py would overwrite /v/site/Flash_Attn/__init__.py, which "
        "belongs to flash-attn 2.8.3",
        "x.whl: SiteCustomize.py is sitecustomize, run at every start of Python"]
    # case-sensitive: other folders and files, nobody's (sitecustomize is spelt so)
    assert problems(hostile, fold=False) == []
    own = ["sageattention/__init__.py", f"{d}.dist-info/METADATA", f"{d}.dist-info/RECORD"]
    assert problems(own, fold=True) == problems(own, fold=False) == []


def test_the_installs_guard_folds_case_for_a_windows_or_macos_target(tmp_path, uv_bin,
                                                                    fake_torch) -> None:
    """The install's own inspection of a wheel, on a real venv with torch in it: where the
    target's platform (or this machine's) folds names, `Torch/_C/__init__.py` is refused as
    going into torch; a Linux target's file system keeps it apart."""
    from dataclasses import replace

    from comfy_env_attn.candidates.sources import Candidate
    from comfy_env_attn.facts.probe import probe_interpreter
    from comfy_env_attn.install.edges import Fetched
    from comfy_env_attn.install.installer import _Context

    venv = fake_torch_venv(tmp_path / "v", uv_bin, fake_torch)
    wheel = build_wheel(tmp_path / "w", "sageattention", "2.2.0",
                        {"sageattention/__init__.py": SAGE_OK, "Torch/_C/__init__.py": "x=1\n"},
                        requires=[])
    target = probe_interpreter(str(venv_python(venv)), use_cache=False)
    fetched = Fetched(Candidate(filename=wheel.name, url=wheel.as_uri(), source="test"),
                      wheel, "0" * 64, "computed")
    for platform, refused in (("macos", True), ("windows", True), ("linux", False)):
        ctx = _Context(replace(target, facts={**target.facts, "platform": platform}))
        assert ctx.folds_case == refused
        found = ctx.inspect(fetched, "sageattention")
        assert found == ([f"{wheel.name}: Torch/_C/__init__.py would go into torch, which "
                          "belongs to torch 2.13.0"] if refused else []), (platform, found)


def test_guard_reads_the_zip_not_the_record(tmp_path) -> None:
    """A RECORD that lists only innocent files changes nothing: the zip directory decides."""
    import zipfile

    w = sage_wheel(tmp_path, "ok", "2.2.0")
    with zipfile.ZipFile(w, "a") as z:
        z.writestr("torch/__init__.py", "PWNED = True\n")  # not in its RECORD
    from comfy_env_attn.install.edges import wheel_listing

    entries, _ = guard.destinations(w.name, "sageattention-2.2.0", wheel_listing(w), LAYOUT,
                                    dist="sageattention")
    assert [e.rel for e in entries if e.rel.startswith("torch")] == ["torch/__init__.py"]


def test_a_dependency_overwriting_torch_is_refused_before_install(tmp_path, uv_bin,
                                                                       fake_torch,
                                                                       http_server) -> None:
    """A requirement is inspected like a backend wheel, before anything is installed (uv
    resolves it, this tool fetches and reads it): one that ships torch/__init__.py is
    refused, and torch's file is never written."""
    venv = fake_torch_venv(tmp_path / "v", uv_bin, fake_torch)
    torch_init = site(venv) / "torch" / "__init__.py"
    before = torch_init.read_bytes()
    w = tmp_path / "w"
    sage = sage_wheel(w, "ok", "2.2.0+cu128torch2.13", requires=["torch>=2.0", "sage-helper"])
    helper = build_wheel(w, "sage-helper", "1.0", {"sage_helper.py": "X = 1\n",
                                                   "torch/__init__.py": "PWNED = True\n"},
                         requires=[])
    profile = tmp_path / "p.toml"
    profile.write_text(f'python = "{sys.version.split()[0]}"\nplatform = "linux"\n'
                       'torch = "2.13.0+cu128"\ntorch_cuda = "12.8"\ngpus = ["8.9"]\n'
                       'driver_cuda = "12.8"\n')
    r = install(venv, profile, "--index-url",
                serve(http_server, {"sageattention": [sage], "sage-helper": [helper]}))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"sage_helper-1.0-py3-none-any.whl: torch/__init__.py would overwrite {torch_init}, " \
        "which belongs to torch 2.13.0: refusing this requirement of the backends" in out
    assert "nothing was installed" in out and " pip install " not in out
    assert torch_init.read_bytes() == before and installed_in(venv) == {"torch": "2.13.0"}


def test_guard_two_wheels_of_one_run_may_not_overwrite_each_other() -> None:
    owners = guard.build_owners([])
    a, _ = guard.destinations("a.whl", "flash_attn-2.8.3", ["flash_attn/__init__.py"], LAYOUT,
                              dist="flash-attn")
    owners = owners.claim("flash-attn", "2.8.3", a)
    b, _ = guard.destinations("b.whl", "flash_attn_4-4.0", ["flash_attn/__init__.py",
                                                           "flash_attn/cute/x.py"], LAYOUT,
                              dist="flash-attn-4")
    assert guard.problems("b.whl", "flash-attn-4", "flash_attn_4-4.0", b, owners, ()) == [
        "b.whl: flash_attn/__init__.py would overwrite /v/site/flash_attn/__init__.py, which "
        "belongs to flash-attn 2.8.3"]


def test_record_check_names_modified_and_missing_files_not_bytecode(tmp_path) -> None:
    """What doctor and install check torch with: each file against its RECORD sha256;
    bytecode that Python rewrote is not a modification; the cache skips unchanged files."""
    import base64

    from comfy_env_attn.facts.installed import Installed, record_problems

    def digest(b: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()

    site_dir = tmp_path / "site"
    files = {"pkg/__init__.py": b"A = 1\n", "pkg/mod.py": b"B = 2\n",
             "pkg/__pycache__/mod.cpython-311.pyc": b"old bytecode"}
    for rel, data in files.items():
        (site_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (site_dir / rel).write_bytes(data)
    info = site_dir / "pkg-1.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("".join(f"{r},sha256={digest(d)},{len(d)}\n"
                                         for r, d in files.items()) + "pkg-1.0.dist-info/RECORD,,\n")
    inst = Installed("pkg", "1.0", str(site_dir), str(info))
    cache = tmp_path / "cache"
    assert record_problems(inst, cache=cache) == []
    (site_dir / "pkg/__pycache__/mod.cpython-311.pyc").write_bytes(b"recompiled")
    (site_dir / "pkg/mod.py").write_bytes(b"B = 3\n")
    (site_dir / "pkg/__init__.py").unlink()
    assert record_problems(inst, cache=cache) == ["pkg/__init__.py (missing)",
                                                  "pkg/mod.py (modified)"]


def test_guard_a_platlib_wheel_lands_in_platlib() -> None:
    layout = guard.Layout(site="/v/lib/site", scripts="/v/bin", data="/v",
                          headers="/v/include/site/p", platlib="/v/lib64/site")
    entries, _ = guard.destinations("x.whl", "x-1", ["x/_C.so", "x-1.data/purelib/y.py"],
                                    layout, dist="x", purelib=False)
    assert [e.dest for e in entries] == ["/v/lib64/site/x/_C.so", "/v/lib/site/y.py"]


def test_guard_entry_point_launchers_per_platform_and_module_names() -> None:
    """Launchers land in the scripts folder, with .exe on Windows (uv's launchers); a
    script name that is a path, or an entry_points.txt that cannot be parsed, is refused.
    torch.py, torch/ and torch.cpython-311-x86_64-linux-gnu.so are all imported as torch."""
    text = "[console_scripts]\nsage-info = sageattention:main\n[gui_scripts]\nsage-gui = s:g\n"
    win = guard.Layout(site="/p/Lib/site-packages", scripts="/p/Scripts", data="/p",
                       headers="/p/include/site/p", exe=".exe")
    entries, refused = guard.script_entries("x.whl", "sageattention-2.2.0", text, win)
    assert refused == [] and [(e.dest, e.kind) for e in entries] == [
        ("/p/Scripts/sage-info.exe", "scripts"), ("/p/Scripts/sage-gui.exe", "scripts")]
    entries, _ = guard.script_entries("x.whl", "sageattention-2.2.0", text, LAYOUT)
    assert [e.dest for e in entries] == ["/v/bin/sage-info", "/v/bin/sage-gui"]
    _, refused = guard.script_entries("x.whl", "d-1", "[console_scripts]\n../../x = a:b\n",
                                      LAYOUT)
    assert refused == ["x.whl: the script '../../x' in d-1.dist-info/entry_points.txt is not "
                       "a plain file name"]
    _, refused = guard.script_entries("x.whl", "d-1", "no section header\n", LAYOUT)
    assert refused and "d-1.dist-info/entry_points.txt cannot be read" in refused[0]
    assert {guard.module_key(t) for t in ("torch", "torch.py",
                                          "torch.cpython-311-x86_64-linux-gnu.so",
                                          "torch.pyd")} == {"torch"}
    assert guard.module_key("torch-2.9.1.dist-info") == "torch-2.9.1.dist-info"
    owners = guard.build_owners([("torch", "2.9.1", "/v/site", ["torch/__init__.py"])])
    a, _ = guard.destinations("a.whl", "evil-1", ["torch.py"], LAYOUT, dist="evil")
    assert guard.problems("a.whl", "evil", "evil-1", a, owners, ()) == [
        "a.whl: torch.py would be imported as torch, which belongs to torch 2.9.1"]
    # the other way round: a package folder takes precedence over a module of its name
    owners = guard.build_owners([("six", "1.17.0", "/v/site", ["six.py"]),
                                 ("opt-einsum", "3.4", "/v/site", ["opt_einsum/__init__.py"])])
    a, _ = guard.destinations("a.whl", "evil-1", ["six/__init__.py", "six/x.py",
                                                  "opt_einsum/extra.py"], LAYOUT, dist="evil")
    assert guard.problems("a.whl", "evil", "evil-1", a, owners, ()) == [
        "a.whl: six/__init__.py would make six/ a package that hides the module six of six "
        "1.17.0",
        "a.whl: opt_einsum/extra.py would go into opt_einsum, which belongs to opt-einsum 3.4"]


def test_a_known_pth_is_accepted_only_with_its_known_text(tmp_path, venv, profile,
                                                           http_server) -> None:
    """flash-attn-4 needs nvidia-cutlass-dsl, whose wheel ships a .pth that puts its
    dsl_packages folder first on sys.path. That file, with that text, goes in with the
    requirement; the same name with other code is refused before anything is installed."""
    text = guard.KNOWN_PTH["nvidia-cutlass-dsl"]["nvidia_cutlass_dsl_packages.pth"]
    w = tmp_path / "w"
    sage = sage_wheel(w, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "nvidia-cutlass-dsl"])
    good = build_wheel(w / "good", "nvidia-cutlass-dsl", "4.8.1",
                       {"nvidia_cutlass_dsl_packages.pth": text,
                        "nvidia_cutlass_dsl/__init__.py": ""}, requires=[])
    evil = build_wheel(w / "evil", "nvidia-cutlass-dsl", "4.8.1",
                       {"nvidia_cutlass_dsl_packages.pth": "import os; os.system('echo pwned')",
                        "nvidia_cutlass_dsl/__init__.py": ""}, requires=[])
    r = install(venv, profile, "--index-url",
                serve(http_server, {"sageattention": [sage], "nvidia-cutlass-dsl": [evil]}))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "nvidia_cutlass_dsl_packages.pth is a .pth file, run at every start of Python, and " \
        "its text is not the one nvidia-cutlass-dsl is known to ship" in out
    assert installed_in(venv) == {}
    assert not (site(venv) / "nvidia_cutlass_dsl_packages.pth").exists()
    r = install(venv, profile, "--index-url",
                serve(http_server, {"sageattention": [sage], "nvidia-cutlass-dsl": [good]}))
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv)["nvidia-cutlass-dsl"] == "4.8.1"
    assert (site(venv) / "nvidia_cutlass_dsl_packages.pth").read_text() == text


def test_guard_namespace_packages_are_shared_regular_packages_are_not() -> None:
    """nvidia-cutlass-dsl-libs-base, -core and -cu12 all put files in the namespace
    packages nvidia_cutlass_dsl/ and nvidia_cutlass_dsl/dsl_packages/ (no __init__.py), as
    torch's CUDA libraries share nvidia/: new files there are fine. A folder with an
    __init__.py is someone's package: nothing goes in it (nvidia/cudnn/)."""
    owners = guard.build_owners([
        ("nvidia-cutlass-dsl-libs-base", "4.8.1", "/v/site",
         ["nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py",
          "nvidia_cutlass_dsl/dsl_packages/cutlass/base.py"]),
        ("nvidia-cudnn-cu12", "9.1", "/v/site",
         ["nvidia/cudnn/__init__.py", "nvidia/cudnn/lib/libcudnn.so.9"]),
    ])

    def problems(dist: str, names: list[str]) -> list[str]:
        entries, refused = guard.destinations("x.whl", f"{dist.replace('-', '_')}-1",
                                              names, LAYOUT, dist=dist)
        return refused + guard.problems("x.whl", dist, f"{dist.replace('-', '_')}-1",
                                        entries, owners, ())

    assert problems("nvidia-cutlass-dsl-libs-core",
                    ["nvidia_cutlass_dsl/dsl_packages/cute/__init__.py"]) == []
    assert problems("nvidia-cutlass-dsl-libs-cu12",
                    ["nvidia_cutlass_dsl/cu12/include/CuteDSLRuntime.h"]) == []
    assert problems("quack-kernels",
                    ["nvidia_cutlass_dsl/dsl_packages/cutlass/extra.py"]) == [
        "x.whl: nvidia_cutlass_dsl/dsl_packages/cutlass/extra.py would go into "
        "nvidia_cutlass_dsl/dsl_packages/cutlass, which belongs to "
        "nvidia-cutlass-dsl-libs-base 4.8.1"]
    # ... except within the family that shares it by design (guard.SHARED_TOPS): libs-cu12
    # puts its compiled module into libs-base's cutlass package (seen on the H100)
    assert problems("nvidia-cutlass-dsl-libs-cu12", [
        "nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu12.so"]) == []
    assert problems("evil", ["nvidia/cudnn/lib/libcudnn_extra.so"]) == [
        "x.whl: nvidia/cudnn/lib/libcudnn_extra.so would go into nvidia/cudnn, which belongs "
        "to nvidia-cudnn-cu12 9.1"]
    assert problems("nvidia-newlib-cu12", ["nvidia/newlib/lib/libnew.so"]) == []
    # a wheel that makes the shared folder its own package is refused too
    assert problems("evil", ["nvidia_cutlass_dsl/__init__.py"]) == [
        "x.whl: nvidia_cutlass_dsl/__init__.py would go into nvidia_cutlass_dsl, which "
        "belongs to nvidia-cutlass-dsl-libs-base 4.8.1"]


def test_guard_a_package_and_a_module_of_one_name_at_any_depth() -> None:
    """A package folder takes precedence over a module of its name, and a module over a
    namespace folder: one rule at every depth, inside a namespace package (ns/, shared by
    design) as at the top. a/b/c/ over another's a/b/c.py hides that module; a new a/b/c.py
    (or a/b/c.*.so) beside another's a/b/c/ or a/b/c.py is imported as a.b.c, which is
    theirs. One line per folder, naming every owner; bytecode and new names stay free."""
    owners = guard.build_owners([
        ("six", "1.17.0", "/v/site", ["six.py"]),
        ("ns-mod", "1.0", "/v/site", ["ns/mod.py", "ns/both.py",
                                      "ns/deep/er/core.cpython-311-x86_64-linux-gnu.so"]),
        ("ns-pkg", "1.0", "/v/site", ["ns/pkg/__init__.py", "ns/pkg/x.py",
                                      "ns/both/data.txt", "ns/__pycache__/mod.cpython-311.pyc"]),
    ])

    def problems(names: list[str], owned: guard.Owners = owners) -> list[str]:
        entries, refused = guard.destinations("x.whl", "evil-1", names, LAYOUT, dist="evil")
        return refused + guard.problems("x.whl", "evil", "evil-1", entries, owned, ())

    assert problems(["six/__init__.py", "six/x.py"]) == [
        "x.whl: six/__init__.py would make six/ a package that hides the module six of six "
        "1.17.0"]
    assert problems(["ns/mod/__init__.py", "ns/mod/x.py", "ns/deep/er/core/__init__.py",
                     "ns/both/__init__.py"]) == [
        "x.whl: ns/mod/__init__.py would make ns/mod/ a package that hides the module ns.mod "
        "of ns-mod 1.0",
        "x.whl: ns/deep/er/core/__init__.py would make ns/deep/er/core/ a package that hides "
        "the module ns.deep.er.core of ns-mod 1.0",
        "x.whl: ns/both/__init__.py would make ns/both/ a package that hides the module "
        "ns.both of ns-mod 1.0"]
    # the reverse: a module beside another's package, namespace folder or module of its name
    assert problems(["ns/pkg.py", "ns/both.cpython-311-x86_64-linux-gnu.so",
                     "ns/mod.pyd"]) == [
        "x.whl: ns/pkg.py would be imported as ns.pkg, which belongs to ns-pkg 1.0",
        "x.whl: ns/both.cpython-311-x86_64-linux-gnu.so would be imported as ns.both, which "
        "belongs to ns-mod 1.0, ns-pkg 1.0",
        "x.whl: ns/mod.pyd would be imported as ns.mod, which belongs to ns-mod 1.0"]
    assert problems(["ns/new.py", "ns/newer/__init__.py", "ns/deep/er/other.py",
                     "ns/__pycache__/new.cpython-311.pyc", "ns/mod.txt"]) == []
    # bytecode of a module the wheel does not ship (another's, at any depth, or torch's
    # requirements at the top): Python would run it instead of that module's source
    assert problems(["ns/__pycache__/mod.cpython-311.opt-1.pyc",
                     "__pycache__/typing_extensions.cpython-311.pyc"]) == [
        "x.whl: ns/__pycache__/mod.cpython-311.opt-1.pyc is bytecode of ns/mod.py, which it "
        "does not ship: Python could run it in place of that module",
        "x.whl: __pycache__/typing_extensions.cpython-311.pyc is bytecode of "
        "typing_extensions.py, which it does not ship: Python could run it in place of that "
        "module"]
    # two wheels of one run: the second may not hide the first's module either
    a, _ = guard.destinations("a.whl", "ns_a-1", ["ns/fresh.py"], LAYOUT, dist="ns-a")
    assert problems(["ns/fresh/__init__.py"], owners.claim("ns-a", "1", a)) == [
        "x.whl: ns/fresh/__init__.py would make ns/fresh/ a package that hides the module "
        "ns.fresh of ns-a 1"]


def test_a_package_or_module_of_another_ones_name_in_a_namespace_package_is_refused(
        tmp_path, venv, profile, http_server, uv_bin) -> None:
    """A real install into a venv where ns-mod ships the module ns/mod.py and ns-pkg the
    package ns/pkg/, both in the namespace package ns/. A sageattention wheel that would make
    ns/mod/ a package (hiding ns.mod), and one that would add ns/pkg.py (imported as ns.pkg,
    ns-pkg's), are refused before anything is installed, naming the wheel, the path and the
    owner; the next one, which adds a new module to ns/, goes in and all three import."""
    py = str(venv_python(venv))
    w = tmp_path / "w"
    for name, files in (("ns-mod", {"ns/mod.py": "WHO = 'ns-mod'\n"}),
                        ("ns-pkg", {"ns/pkg/__init__.py": "WHO = 'ns-pkg'\n"})):
        subprocess.run([uv_bin, "pip", "install", "-q", "--python", py, "--no-deps",
                        str(build_wheel(w / name, name, "1.0", files, requires=[]))],
                       check=True)
    ns = site(venv) / "ns"
    before = {p: p.read_bytes() for p in ns.rglob("*") if p.is_file()}
    hides = build_wheel(w, "sageattention", f"2.2.2+{LABEL}", {
        "sageattention/__init__.py": SAGE_OK, "ns/mod/__init__.py": "WHO = 'sage'\n",
        "ns/mod/extra.py": ""}, requires=["torch>=2.0"])
    hidden = build_wheel(w, "sageattention", f"2.2.1+{LABEL}", {
        "sageattention/__init__.py": SAGE_OK, "ns/pkg.py": "WHO = 'sage'\n"},
        requires=["torch>=2.0"])
    clean = build_wheel(w, "sageattention", f"2.2.0+{LABEL}", {
        "sageattention/__init__.py": SAGE_OK, "ns/sage_ext.py": "WHO = 'sage'\n"},
        requires=["torch>=2.0"])
    r = install(venv, profile, "--index-url",
                serve(http_server, {"sageattention": [clean, hides, hidden]}))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"{hides.name}: ns/mod/__init__.py would make ns/mod/ a package that hides the " \
        "module ns.mod of ns-mod 1.0" in out
    assert f"{hidden.name}: ns/pkg.py would be imported as ns.pkg, which belongs to ns-pkg " \
        "1.0" in out
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    assert not (ns / "mod").exists() and not (ns / "pkg.py").exists()
    assert {p: p.read_bytes() for p in ns.rglob("*") if p.is_file()
            and p.name != "sage_ext.py" and "__pycache__" not in p.parts} == before
    check = subprocess.run([py, "-c", "import ns.mod, ns.pkg, ns.sage_ext as s; "
                            "print(ns.mod.WHO, ns.pkg.WHO, s.WHO)"],
                           capture_output=True, text=True)
    assert check.stdout.split() == ["ns-mod", "ns-pkg", "sage"], check.stderr


def test_guard_data_files_that_land_in_site_packages_follow_the_site_rules() -> None:
    """<dist>.data/data/ is relative to the prefix: lib/pythonX.Y/site-packages/... inside
    it is site-packages, where torch/, a .pth or sitecustomize.py are refused as usual."""
    layout = guard.Layout(site="/v/lib/python3.11/site-packages", scripts="/v/bin", data="/v",
                          headers="/v/include/site/python3.11")
    owners = guard.build_owners([("torch", "2.9.1", "/sys/site", ["torch/__init__.py"])])
    d = "sageattention-2.2.0"
    names = [f"{d}.data/data/lib/python3.11/site-packages/torch/__init__.py",
             f"{d}.data/data/lib/python3.11/site-packages/zz_evil.pth",
             f"{d}.data/data/share/sage/notes.txt", "sitecustomize.py"]
    entries, refused = guard.destinations("x.whl", d, names, layout, dist="sageattention")
    assert refused == []
    assert [(e.kind, e.rel) for e in entries] == [
        ("site", "torch/__init__.py"), ("site", "zz_evil.pth"),
        ("data", "share/sage/notes.txt"), ("site", "sitecustomize.py")]
    assert guard.problems("x.whl", "sageattention", d, entries, owners, ()) == [
        f"x.whl: {d}.data/data/lib/python3.11/site-packages/torch/__init__.py would go into "
        "torch, which belongs to torch 2.9.1",
        f"x.whl: {d}.data/data/lib/python3.11/site-packages/zz_evil.pth is a .pth file, run "
        "at every start of Python; sageattention is not known to ship one",
        "x.whl: sitecustomize.py is sitecustomize, run at every start of Python"]


def test_guard_follows_links_on_the_way_to_site_packages(tmp_path) -> None:
    """A venv on 64-bit Linux has lib64 -> lib: <dist>.data/data/lib64/... lands in
    site-packages through it, and follows the site rules (a .pth, torch's folder)."""
    site = tmp_path / "v" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "v" / "lib64").symlink_to("lib")  # as venv makes it
    layout = guard.Layout(site=str(site), scripts=str(tmp_path / "v" / "bin"),
                          data=str(tmp_path / "v"), headers=str(tmp_path / "v" / "include"))
    d = "sageattention-2.2.0"
    names = [f"{d}.data/data/lib64/python3.11/site-packages/zz_evil.pth",
             f"{d}.data/data/lib64/python3.11/site-packages/torch/evil.py"]
    entries, refused = guard.destinations("x.whl", d, names, layout, dist="sageattention")
    assert refused == []
    assert [(e.kind, e.rel, e.dest) for e in entries] == [
        ("site", "zz_evil.pth", guard.norm(str(site / "zz_evil.pth"))),
        ("site", "torch/evil.py", guard.norm(str(site / "torch" / "evil.py")))]
    owners = guard.build_owners([("torch", "2.9.1", str(site), ["torch/__init__.py"])])
    found = guard.problems("x.whl", "sageattention", d, entries, owners, ())
    assert len(found) == 2 and "is a .pth file" in found[0] and "into torch" in found[1]


def test_requirements_that_conflict_fail_and_extras_are_honoured(tmp_path, venv, profile,
                                                                 http_server) -> None:
    """Two rounds of requirements that want different versions of one package fail before
    anything is installed, naming both; a requirement's extras bring their own."""
    w = tmp_path / "w"
    sage = sage_wheel(w, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "foo", "bar"])
    bar = build_wheel(w, "bar", "1.0", {"bar.py": ""}, requires=["foo<2"])
    foos = [build_wheel(w, "foo", v, {"foo.py": ""}, requires=[]) for v in ("1.0", "2.0")]
    r = install(venv, profile, "--index-url", serve(
        http_server, {"sageattention": [sage], "bar": [bar], "foo": foos}))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "the backends' requirements conflict: foo<2 does not fit foo 2.0" in out
    assert "nothing was installed" in out and installed_in(venv) == {}
    sage = sage_wheel(w / "x", "ok", f"2.2.1+{LABEL}", requires=["torch>=2.0", "ext[fast]>=1"])
    ext = build_wheel(w, "ext", "1.0", {"ext.py": ""},
                      requires=["baz; extra == 'fast'", "never; extra == 'slow'"])
    baz = build_wheel(w, "baz", "1.0", {"baz.py": ""}, requires=[])
    r = install(venv, profile, "--index-url", serve(
        http_server, {"sageattention": [sage], "ext": [ext], "baz": [baz]}))
    assert r.returncode == 0, r.stdout + r.stderr
    have = installed_in(venv)
    assert have["ext"] == "1.0" and have["baz"] == "1.0" and "never" not in have


def test_an_extra_asked_in_a_later_round_brings_its_requirements(tmp_path, venv, profile,
                                                                 http_server) -> None:
    """`foo` chosen plainly in one round, then `foo[fast]` asked by a requirement found in
    the next: foo's requirements for `fast` are resolved too, not taken as met by foo."""
    w = tmp_path / "w"
    sage = sage_wheel(w, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "foo", "bar"])
    bar = build_wheel(w, "bar", "1.0", {"bar.py": ""}, requires=["Foo[Fast]>=1"])
    foo = build_wheel(w, "foo", "1.0", {"foo.py": ""}, requires=["baz; extra == 'fast'"])
    baz = build_wheel(w, "baz", "1.0", {"baz.py": ""}, requires=[])
    r = install(venv, profile, "--index-url", serve(
        http_server, {"sageattention": [sage], "bar": [bar], "foo": [foo], "baz": [baz]}))
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv) == {"sageattention": f"2.2.0+{LABEL}", "bar": "1.0",
                                  "foo": "1.0", "baz": "1.0"}


def test_a_distribution_this_run_replaces_does_not_answer_with_its_old_version(
        tmp_path, venv, profile, http_server, uv_bin) -> None:
    """dep 1.0 is installed; the backend needs dep[all]>=2, and dep 2.0's `all` asks for
    its own `fast`, which needs baz. What dep 1.0's metadata says of `fast` (here: a sympy
    that would replace torch's) does not count: dep 2.0's does, and baz goes in."""
    w = tmp_path / "w"
    old = build_wheel(w / "old", "dep", "1.0", {"dep.py": ""},
                      requires=["sympy==0.0.1; extra == 'fast'"])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", str(venv_python(venv)),
                    "--no-deps", str(old)], check=True)
    sage = sage_wheel(w, "ok", f"2.2.0+{LABEL}", requires=["torch>=2.0", "dep[all]>=2"])
    dep = build_wheel(w, "dep", "2.0", {"dep.py": ""},
                      requires=["dep[fast]; extra == 'all'", "baz; extra == 'fast'"])
    baz = build_wheel(w, "baz", "1.0", {"baz.py": ""}, requires=[])
    r = install(venv, profile, "--index-url", serve(
        http_server, {"sageattention": [sage], "dep": [dep], "baz": [baz]}))
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv) == {"sageattention": f"2.2.0+{LABEL}", "dep": "2.0",
                                  "baz": "1.0"}


def test_torch_s_closure_reads_each_requirement_marker(tmp_path) -> None:
    """protected(): a requirement for an extra alone is not followed (it skips those without
    parsing them), one whose marker also holds for the target is, spelled any way."""
    site = tmp_path / "site"
    for name, requires in (
            ("torch", ['only-extra; extra == "x"', "only-extra2 ;extra=='y'  ",
                       'either; extra == "x" or python_version >= "3"',
                       "platform; sys_platform == 'linux'", 'not-here; sys_platform == "win32"',
                       'url @ https://h/x;y.whl ; extra == "x"', 'url2 @ file:///a;extra=="x"',
                       "plain"]),
            ("only-extra", []), ("only-extra2", []), ("either", []), ("platform", []),
            ("not-here", []), ("url", []), ("url2", []), ("plain", [])):
        info = site / f"{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
    protect = protected(read_installed([str(site)]), {"sys_platform": "linux",
                                                      "python_version": "3.11"})
    # url2's ";extra==..." is part of its URL: no marker, always required
    assert set(protect) == {"torch", "either", "platform", "url2", "plain"}


def test_torch_s_closure_is_kept_while_it_would_come_out_the_same(tmp_path) -> None:
    """protected() keeps its answer in the cache, and works it out again when it could come
    out otherwise: a distribution of the closure whose metadata changed (a new requirement),
    a requirement it looked for and did not find now installed, torch in another folder
    (a venv's own), other markers, or a cache file that is not its own."""
    from comfy_env_attn.core.paths import answer_file

    site, venv_site_dir = tmp_path / "site", tmp_path / "venv-site"

    def dist(where: Path, name: str, *requires: str, version: str = "1.0") -> Path:
        info = where / f"{name}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                       f"{version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        return info

    dist(site, "torch", "sympy", "later; python_version >= '3'", "winonly; sys_platform == 'win32'")
    sympy = dist(site, "sympy")
    dist(site, "mpmath")
    linux = {"sys_platform": "linux", "python_version": "3.11"}

    def closure(markers: dict[str, str] = linux, *sites: Path) -> list[str]:
        return sorted(protected(read_installed([str(p) for p in (*sites, site)]), markers))

    assert closure() == ["sympy", "torch"]
    cache = answer_file("closure", str(site / "torch-1.0.dist-info"))
    assert json.loads(cache.read_text())["absent"] == ["later", "torchaudio", "torchvision"]
    assert closure() == ["sympy", "torch"]  # from the cache
    (sympy / "METADATA").write_text("Metadata-Version: 2.1\nName: sympy\nVersion: 1.0\n"
                                    "Requires-Dist: mpmath\n")
    assert closure() == ["mpmath", "sympy", "torch"]
    dist(site, "later")
    assert closure() == ["later", "mpmath", "sympy", "torch"]
    dist(site, "winonly")
    assert closure() == ["later", "mpmath", "sympy", "torch"]  # its marker is false here
    assert closure({"sys_platform": "win32", "python_version": "3.11"}) == \
        ["later", "mpmath", "sympy", "torch", "winonly"]
    dist(venv_site_dir, "torch", version="2.0")  # a venv's own torch, needing nothing
    assert closure(linux, venv_site_dir) == ["torch"]
    for text in ("{not json", json.dumps({"schema": 1, "markers": linux, "closure": {"x": 1},
                                          "members": {"torch": 3}, "absent": []})):
        cache.write_text(text)
        assert closure() == ["later", "mpmath", "sympy", "torch"]


def test_an_installed_distribution_asked_with_extras_brings_their_requirements(
        tmp_path) -> None:
    """A requirement with extras that an installed distribution satisfies: its requirements
    for those extras are checked like the wheel's own (missing ones added, one that would
    change torch's closure refused), once per extra, and its base requirements are its own
    business."""
    site = tmp_path / "site"
    for name, version, requires in (
            ("foo", "1.0", ["base-only", "baz>=2; extra == 'fast'",
                            "numpy<1; extra == 'np'", "foo[fast]; extra == 'all'"]),
            ("numpy", "2.1.0", []), ("torch", "2.9.1", ["numpy"])):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                       f"{version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                 for r in requires))
    have = read_installed([str(site)])
    protect = protected(have, {})
    assert protect == {"torch": "2.9.1", "numpy": "2.1.0"}
    needs = check_requirements("x.whl", ["foo[all]>=1", "foo"], have, {}, protect)
    assert needs == Needs([], ["baz>=2"])
    needs = check_requirements("x.whl", ["foo[np,fast]"], have, {}, protect)
    assert needs.missing == ["baz>=2"]
    assert needs.refused == ["foo 1.0 requires numpy<1; the target has numpy 2.1.0: "
                             "installing it would replace numpy, which torch needs"]


def test_a_decompression_bomb_is_refused_before_anything_inflates(tmp_path) -> None:
    """A member that inflates 100 times past 64 MB, or a METADATA beyond 1 MB, is refused
    from the zip directory: neither the tool nor uv inflates it."""
    import zipfile

    from comfy_env_attn.core.errors import InstallError
    from comfy_env_attn.install.edges import wheel_bomb, wheel_metadata

    d = "sageattention-2.2.0"
    bomb = tmp_path / "bomb" / f"{d}-py3-none-any.whl"
    bomb.parent.mkdir()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{d}.dist-info/METADATA", "Metadata-Version: 2.1\nName: sageattention\n"
                   "Version: 2.2.0\n" + "X: " + " " * (2 << 20) + "\n")
        with z.open("sageattention/big.bin", "w", force_zip64=True) as f:
            for _ in range(70):
                f.write(b"\0" * (1 << 20))
    assert bomb.stat().st_size < 1 << 20
    why = wheel_bomb(bomb)
    assert why is not None and "sageattention/big.bin would inflate" in why and \
        "a decompression bomb" in why
    with pytest.raises(InstallError, match="METADATA is 2 MB, more than any such file"):
        wheel_metadata(bomb)
    ok = sage_wheel(tmp_path / "ok", "ok", f"2.2.0+{LABEL}")
    assert wheel_bomb(ok) is None and "Name: sageattention" in wheel_metadata(ok)


# -- which distributions the guard reads: the index of what each RECORD reaches -----------

_DISTS = {  # site dir ("site": the target's, "base": one inside its prefix, as /usr's) ->
    "site": {  # distribution -> the paths its RECORD lists
        "torch": ["torch/__init__.py", "torch/lib/libx.so",
                  "torch/_C.cpython-311-x86_64-linux-gnu.so", "../../../bin/torchrun"],
        "six": ["six.py"],
        "nvidia-cublas": ["nvidia/cublas/lib/libcublas.so"],
        "weird": ["./weird//pkg/__init__.py", "weird/../weirder/mod.py",
                  "../site-packages/landed/x.py"],
        "datapkg": ["datapkg/__init__.py", "../../../share/datapkg/a.json"],
    },
    "base": {"apt-foo": ["foo/__init__.py", "foo/bar.py"]},
}
_D = "sageattention-2.2.0"
_WHEELS = {  # what each wheel lists besides its own .dist-info
    "clean": ["sageattention/__init__.py"],
    "overwrites torch's file": ["torch/lib/libx.so"],
    "adds to torch's package": ["torch/new.py"],
    "shadows torch": ["torch.py"],
    "hides six": ["six/__init__.py"],
    "hides torch._C": ["torch/_C/__init__.py"],
    "a script over torchrun": [f"{_D}.data/scripts/torchrun"],
    "data into torch": [f"{_D}.data/data/lib/python3.11/site-packages/torch/evil.py"],
    "data over apt's file": [f"{_D}.data/data/lib/python3/dist-packages/foo/bar.py",
                             f"{_D}.data/data/lib/python3/dist-packages/foo/new.py"],
    "into nvidia's namespace": ["nvidia/newlib/x.so"],
    "over nvidia's file": ["nvidia/cublas/lib/libcublas.so"],
    "over a path a RECORD reaches with ..": ["landed/x.py"],
    "over normalised paths": ["weirder/mod.py", "weird/pkg/new.py"],
    "over shared data": [f"{_D}.data/data/share/datapkg/a.json"],
}


def _environment(root: Path) -> tuple[guard.Layout, list[str]]:
    sites = {"site": root / "lib" / "python3.11" / "site-packages",
             "base": root / "lib" / "python3" / "dist-packages"}
    for where, dists in _DISTS.items():
        for dist, paths in dists.items():
            info = sites[where] / f"{dist.replace('-', '_')}-1.0.dist-info"
            info.mkdir(parents=True)
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
            (info / "RECORD").write_text("".join(f"{p},,\n" for p in paths)
                                         + f"{info.name}/RECORD,,\n")
            for p in paths:
                f = Path(os.path.normpath(sites[where] / p))
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text("theirs")
    layout = guard.Layout(site=guard.norm(str(sites["site"])), scripts=guard.norm(str(root / "bin")),
                          data=guard.norm(str(root)),
                          headers=guard.norm(str(root / "include" / "site" / "python3.11")))
    return layout, [str(sites["site"]), str(sites["base"])]


def test_the_guard_answers_alike_from_every_record_and_from_those_it_picks(tmp_path) -> None:
    """guard.candidates picks the distributions whose RECORDs the guard reads: from their
    text at first, from the index of what each RECORD reaches once it is kept (filled while
    uv runs). Either way, every wheel's problems are those found from all the RECORDs,
    for a wheel that overwrites, shadows, hides or goes into another's files through the
    site dir, a script, data that lands in a site dir (the target's or another inside its
    prefix), a RECORD path through '..' or one written unnormalised; and the index reads
    fewer RECORDs than the text does."""
    from comfy_env_attn.facts import installed as inst_mod

    layout, sites = _environment(tmp_path / "v")
    installed = read_installed(sites)
    assert len(installed) == 6

    def problems(names: list[str], picked: list) -> list[str]:
        entries, refused = guard.destinations("x.whl", _D, [*names, f"{_D}.dist-info/RECORD"],
                                              layout, dist="sageattention")
        assert refused == []
        owners = guard.build_owners((i.name, i.version, i.location, inst_mod.record_paths(i))
                                    for i in picked)
        there = [e.dest for e in entries if os.path.isfile(e.dest)]
        return guard.problems("x.whl", "sageattention", _D, entries, owners, there)

    def picked(names: list[str], fold: bool) -> list:
        entries, _ = guard.destinations("x.whl", _D, [*names, f"{_D}.dist-info/RECORD"],
                                        layout, dist="sageattention")
        return guard.candidates(installed.values(), entries, fold)

    inst_mod._INDEX.clear()
    cold = {(w, fold): picked(names, fold) for w, names in _WHEELS.items()
            for fold in (False, True)}
    inst_mod.index_in_background(installed.values()).join()
    inst_mod._INDEX.clear()  # read back from the cache folder
    warm = {(w, fold): picked(names, fold) for w, names in _WHEELS.items()
            for fold in (False, True)}
    for (w, fold), chosen in warm.items():
        names = _WHEELS[w]
        expected = problems(names, list(installed.values()))
        assert (w, fold, problems(names, cold[(w, fold)])) == (w, fold, expected)
        assert (w, fold, problems(names, chosen)) == (w, fold, expected)
        assert {i.name for i in chosen} <= {i.name for i in cold[(w, fold)]}
        assert bool(expected) == (w not in ("clean", "into nvidia's namespace")), (w, expected)
    assert warm[("clean", False)] == []  # 'sageattention' is in no RECORD's reach
    assert {i.name for i in warm[("data over apt's file", False)]} == {"apt-foo"}
    assert {i.name for i in warm[("over a path a RECORD reaches with ..", False)]} == {"weird"}


def test_the_index_is_read_again_when_a_record_changes_or_the_cache_is_not_its_own(
        tmp_path) -> None:
    """An entry of the index stands while its RECORD's stat is unchanged: a RECORD written
    again is read again (its new paths count at once); a cache file that is not JSON, or
    whose entries are not as the index writes them, is passed over, never trusted."""
    from comfy_env_attn.core.paths import answer_file
    from comfy_env_attn.facts import installed as inst_mod

    layout, sites = _environment(tmp_path / "v")
    installed = read_installed(sites)
    entries, _ = guard.destinations("x.whl", _D, ["sageattention/__init__.py"], layout,
                                    dist="sageattention")
    inst_mod._INDEX.clear()
    inst_mod.index_in_background(installed.values()).join()
    inst_mod._INDEX.clear()
    assert guard.candidates(installed.values(), entries, False) == []
    six = installed["six"]
    record = Path(six.dist_info, "RECORD")
    record.write_text(record.read_text() + "sageattention/stolen.py,,\n")
    assert [i.name for i in guard.candidates(installed.values(), entries, False)] == ["six"]
    cache = answer_file("owners", six.location)
    for text in ("{not json", json.dumps({"schema": 1, "location": six.location,
                                          "dists": {"six-1.0.dist-info": {
                                              "record": [0], "firsts": 3, "outside": []},
                                              "torch-1.0.dist-info": "x"}})):
        cache.write_text(text)
        inst_mod._INDEX.clear()
        assert [i.name for i in guard.candidates(installed.values(), entries, False)] == ["six"]


def test_the_index_keeps_no_record_that_changed_while_it_was_read(tmp_path, monkeypatch) -> None:
    """The index is filled while uv runs, removing old versions: a RECORD removed (or written
    again) between its stat and its reading is left out of the index, so that the same
    RECORD put back by a rollback (shutil.copy2 keeps its stat, and a filesystem may hand
    out the inode again) is read as the text it is, not matched to an entry read from
    nothing."""
    import shutil

    from comfy_env_attn.facts import installed as inst_mod

    layout, sites = _environment(tmp_path / "v")
    installed = read_installed(sites)
    six = installed["six"]
    backup = tmp_path / "six-backup"
    shutil.copytree(six.dist_info, backup)
    real_reach = inst_mod.reach_of

    def removed_while_read(inst):
        if inst.name == "six":
            shutil.rmtree(inst.dist_info)  # uv removing it just then
        return real_reach(inst)

    monkeypatch.setattr(inst_mod, "reach_of", removed_while_read)
    inst_mod._INDEX.clear()
    inst_mod.index_in_background(installed.values()).join()
    assert "six-1.0.dist-info" not in inst_mod._INDEX[six.location]
    assert "torch-1.0.dist-info" in inst_mod._INDEX[six.location]
    shutil.copytree(backup, six.dist_info)  # the rollback puts it back
    entries, _ = guard.destinations("x.whl", _D, ["six/__init__.py"], layout,
                                    dist="sageattention")
    assert [i.name for i in guard.candidates(installed.values(), entries, False)] == ["six"]
