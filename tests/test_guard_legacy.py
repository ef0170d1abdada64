"""The guard against distributions that have no RECORD (a legacy .egg-info: `setup.py
install`, an old pip's install of an sdist, conda) or a RECORD written with './', 'a/./b' or
backslashes: real site dirs in tmp_path, read by facts.installed, judged by the real guard.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, venv_python, venv_site, write_gpu_profile
from wheels import SAGE_OK, build_wheel, sage_wheel

from comfy_env_attn.facts.installed import (
    file_stats,
    mentions,
    owned_files,
    read_installed,
    record_lines,
    record_paths,
    record_problems,
)
from comfy_env_attn.install import guard

EGG = f"legacy_pkg-1.0-py{sys.version_info[0]}.{sys.version_info[1]}.egg-info"


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "prefix" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    return site


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _legacy(site: Path, **meta: str) -> Path:
    """legacy-pkg 1.0 as `setup.py install` leaves it: its package, module and script, and an
    .egg-info folder holding PKG-INFO and `meta` (file name -> text)."""
    _write(site, {"legacy/__init__.py": "", "legacy/core.py": "X = 1\n",
                  "legacy_mod.py": "Y = 2\n", "../../../bin/legacy-tool": "#!/bin/sh\n",
                  f"{EGG}/PKG-INFO": "Metadata-Version: 1.1\nName: legacy-pkg\nVersion: 1.0\n",
                  **{f"{EGG}/{k}": v for k, v in meta.items()}})
    return site


def _problems(site: Path, names: list[str]) -> list[str]:
    """What the guard says of a sageattention 2.2.0 wheel listing `names`, with the owners
    of site's distributions gathered as the installer does (mentions, then record_paths)."""
    prefix = site.parent.parent.parent
    layout = guard.Layout(site=guard.norm(str(site)), scripts=guard.norm(str(prefix / "bin")),
                          data=guard.norm(str(prefix)),
                          headers=guard.norm(str(prefix / "include" / "site" / "python3.11")))
    d = "sageattention-2.2.0"
    entries, refused = guard.destinations("x.whl", d, names, layout, dist="sageattention")
    toks = guard.tokens(entries)
    owners = guard.build_owners((i.name, i.version, i.location, record_paths(i))
                                for i in read_installed([str(site)]).values()
                                if mentions(i, toks))
    existing = [e.dest for e in entries if os.path.lexists(e.dest)]
    return refused + guard.problems("x.whl", "sageattention", d, entries, owners, existing)


INSTALLED_FILES = ("../legacy/__init__.py\n../legacy/core.py\n"
                   "../legacy/__pycache__/core.cpython-311.pyc\n../legacy_mod.py\n"
                   "../../../../bin/legacy-tool\n./\nPKG-INFO\ninstalled-files.txt\n")


def test_an_egg_infos_installed_files_are_its_own(tmp_path) -> None:
    """installed-files.txt lists paths relative to the .egg-info folder: each is the
    distribution's file, relative to the site dir; the guard refuses overwriting them and
    adding files to its package. It has no hashes: doctor's RECORD check says so."""
    site = _legacy(_site(tmp_path), **{"installed-files.txt": INSTALLED_FILES})
    inst = read_installed([str(site)])["legacy-pkg"]
    assert record_paths(inst) == [
        "legacy/__init__.py", "legacy/core.py", "legacy/__pycache__/core.cpython-311.pyc",
        "legacy_mod.py", "../../../bin/legacy-tool", f"{EGG}/PKG-INFO",
        f"{EGG}/installed-files.txt"]
    assert record_lines(inst)[0] == ("legacy/__init__.py", "", "")
    assert sorted(file_stats([inst])) == sorted(
        os.path.normpath(site / p) for p in record_paths(inst) if "__pycache__" not in p)
    assert record_problems(inst) == [f"{EGG}/RECORD is missing or unreadable"]
    prefix = site.parent.parent.parent
    assert _problems(site, ["sageattention/__init__.py", "legacy/core.py", "legacy/extra.py",
                            "legacy_mod.py", "sageattention-2.2.0.data/scripts/legacy-tool"]) == [
        f"x.whl: legacy/core.py would overwrite {site}/legacy/core.py, which belongs to "
        "legacy-pkg 1.0",
        "x.whl: legacy/extra.py would go into legacy, which belongs to legacy-pkg 1.0",
        f"x.whl: legacy_mod.py would overwrite {site}/legacy_mod.py, which belongs to "
        "legacy-pkg 1.0",
        "x.whl: sageattention-2.2.0.data/scripts/legacy-tool would overwrite "
        f"{prefix}/bin/legacy-tool, which belongs to legacy-pkg 1.0"]


def test_an_egg_info_without_a_file_list_owns_its_top_level_names(tmp_path) -> None:
    """Without installed-files.txt only top_level.txt tells: a package is owned as a whole
    folder (its files there are its own, and nothing may be added), a module file as itself,
    and any file imported under one of those names is refused; a pkg_resources namespace
    (namespace_packages.txt) stays shared."""
    site = _legacy(_site(tmp_path), **{"top_level.txt": "legacy\nlegacy_mod\nlegacy_ext\nns\n",
                                       "namespace_packages.txt": "ns\n"})
    ext = "legacy_ext.cpython-311-x86_64-linux-gnu.so"
    _write(site, {ext: "ELF", "ns/theirs/__init__.py": ""})
    inst = read_installed([str(site)])["legacy-pkg"]
    assert record_paths(inst) == ["legacy/", "legacy_mod.py", ext]
    assert record_lines(inst) == []
    # a folder's stat changes with every file written in it: the files in it are watched,
    # as those a RECORD lists (bytecode aside)
    _write(site, {"legacy/__pycache__/core.cpython-311.pyc": "bytecode"})
    assert sorted(file_stats([inst])) == [
        str(site / "legacy/__init__.py"), str(site / "legacy/core.py"), str(site / ext),
        str(site / "legacy_mod.py")]
    assert sorted(owned_files(inst)) == [
        ("legacy/__init__.py", str(site / "legacy/__init__.py")),
        ("legacy/__pycache__/core.cpython-311.pyc",
         str(site / "legacy/__pycache__/core.cpython-311.pyc")),
        ("legacy/core.py", str(site / "legacy/core.py")),
        ("legacy_ext.cpython-311-x86_64-linux-gnu.so", str(site / ext)),
        ("legacy_mod.py", str(site / "legacy_mod.py"))]
    assert _problems(site, ["sageattention/__init__.py", "legacy/__init__.py",
                            "legacy/sub/evil.py", "legacy_mod.py", "legacy_mod.pyd", ext,
                            "legacy_ext.py", "ns/mine/__init__.py"]) == [
        f"x.whl: legacy/__init__.py would overwrite {site}/legacy/__init__.py, which belongs "
        "to legacy-pkg 1.0",
        "x.whl: legacy/sub/evil.py would go into legacy, which belongs to legacy-pkg 1.0",
        f"x.whl: legacy_mod.py would overwrite {site}/legacy_mod.py, which belongs to "
        "legacy-pkg 1.0",
        "x.whl: legacy_mod.pyd would be imported as legacy_mod, which belongs to legacy-pkg 1.0",
        f"x.whl: {ext} would overwrite {site}/{ext}, which belongs to legacy-pkg 1.0",
        "x.whl: legacy_ext.py would be imported as legacy_ext, which belongs to legacy-pkg 1.0"]


def test_mentions_reads_what_ownership_is_read_from(tmp_path) -> None:
    """The installer's prefilter: a dist-info's RECORD only (as before: not its
    top_level.txt); an .egg-info's installed-files.txt and top_level.txt."""
    site = _site(tmp_path)
    _write(site, {"a-1.0.dist-info/RECORD": "a/__init__.py,,\n",
                  "a-1.0.dist-info/METADATA": "Name: a\nVersion: 1.0\n",
                  "a-1.0.dist-info/top_level.txt": "a_extra\n",
                  "b-1.0.egg-info/PKG-INFO": "Name: b\nVersion: 1.0\n",
                  "b-1.0.egg-info/installed-files.txt": "../B_Pkg/__init__.py\n",
                  "c-1.0.egg-info/PKG-INFO": "Name: c\nVersion: 1.0\n",
                  "c-1.0.egg-info/top_level.txt": "c_pkg\n"})
    found = read_installed([str(site)])
    a, b, c = found["a"], found["b"], found["c"]
    assert mentions(a, {"a"}) and not mentions(a, {"a_extra"})
    assert mentions(b, {"B_Pkg"}) and not mentions(b, {"b_pkg"})
    assert mentions(b, {"b_pkg"}, fold=True)
    assert mentions(c, {"c_pkg"}) and not mentions(c, {"d_pkg"}) and not mentions(c, set())


def test_record_paths_are_normalised_in_one_form(tmp_path) -> None:
    """RECORD lines written as './pkg/x.py', 'pkg/./x.py' or 'pkg\\x.py' (a RECORD made on
    Windows) own pkg/x.py: the guard refuses overwriting them and adding to the package,
    and doctor's hash check still finds the files."""
    site = _site(tmp_path)
    files = {"dotted/__init__.py": "", "dotted/core.py": "A = 1\n", "dotted/win.py": "B = 2\n"}
    _write(site, files)

    def line(written: str, rel: str) -> str:
        digest = base64.urlsafe_b64encode(
            hashlib.sha256(files[rel].encode()).digest()).rstrip(b"=").decode()
        return f"{written},sha256={digest},{len(files[rel])}\n"

    _write(site, {"dotted-1.0.dist-info/METADATA": "Name: dotted\nVersion: 1.0\n",
                  "dotted-1.0.dist-info/RECORD":
                      line("./dotted/__init__.py", "dotted/__init__.py")
                      + line("dotted/./core.py", "dotted/core.py")
                      + line("dotted\\win.py", "dotted/win.py")
                      + "./dotted-1.0.dist-info/METADATA,,\n"})
    inst = read_installed([str(site)])["dotted"]
    assert record_paths(inst) == ["dotted/__init__.py", "dotted/core.py", "dotted/win.py",
                                  "dotted-1.0.dist-info/METADATA"]
    assert record_problems(inst) == []
    assert _problems(site, ["sageattention/__init__.py", "dotted/win.py", "dotted/new.py"]) == [
        f"x.whl: dotted/win.py would overwrite {site}/dotted/win.py, which belongs to "
        "dotted 1.0",
        "x.whl: dotted/new.py would go into dotted, which belongs to dotted 1.0"]


def test_an_egg_info_file_is_not_a_distribution_it_names_no_files(tmp_path) -> None:
    """distutils' install_egg_info writes PKG-INFO alone, as a file named .egg-info: no
    files, no top-level names to own. It is left out; its files are still protected as
    files that are there and that no distribution lists."""
    site = _site(tmp_path)
    _write(site, {"old-1.0-py3.11.egg-info": "Metadata-Version: 1.0\nName: old\nVersion: 1.0\n",
                  "old.py": "Z = 3\n"})
    assert read_installed([str(site)]) == {}
    assert _problems(site, ["sageattention/__init__.py", "old.py"]) == [
        f"x.whl: old.py would replace {site}/old.py, which is already there and belongs to "
        "no distribution"]


@pytest.mark.parametrize("listing", ["installed-files.txt", "top_level.txt"])
def test_install_refuses_a_wheel_that_writes_into_an_egg_info_package(tmp_path, venv,
                                                                      listing) -> None:
    """A real `comfy-env-attn install` into a venv holding legacy-pkg as an .egg-info: the
    only sageattention wheel would add legacy/evil.py, and is refused before anything is
    installed."""
    from test_hostile import LABEL, install, installed_in
    from untouched import baseline

    base = baseline()
    site = venv_site(venv)
    _legacy(site, **{listing: INSTALLED_FILES if listing == "installed-files.txt"
                     else "legacy\nlegacy_mod\n"})
    evil = build_wheel(tmp_path / "w", "sageattention", f"2.2.0+{LABEL}",
                       {"sageattention/__init__.py": SAGE_OK, "legacy/evil.py": "PWNED = 1\n"},
                       requires=["torch>=2.0"])
    r = install(venv, write_gpu_profile(tmp_path, glibc="2.28"), "--find-links",
                str(evil.parent))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"{evil.name}: legacy/evil.py would go into legacy, which belongs to legacy-pkg " \
        "1.0" in out
    assert not (site / "legacy" / "evil.py").exists()
    assert "sageattention" not in installed_in(venv)
    assert base.problems() == []


def test_install_refuses_to_replace_an_egg_info_distribution(tmp_path, venv) -> None:
    """A backend that needs legacy-pkg>=2 where 1.0 is an .egg-info: its files cannot all
    be backed up (top_level.txt names no files, installed-files.txt not itself), so a
    rollback could not put it back. Refused before anything changes, saying what to do."""
    from test_hostile import LABEL, install, installed_in

    site = venv_site(venv)
    _legacy(site, **{"top_level.txt": "legacy\nlegacy_mod\n"})
    before = sorted(p.relative_to(site) for p in site.rglob("*"))
    w = tmp_path / "w"
    build_wheel(w, "sageattention", f"2.2.0+{LABEL}", {"sageattention/__init__.py": SAGE_OK},
                requires=["torch>=2.0", "legacy-pkg>=2"])
    build_wheel(w, "legacy-pkg", "2.0", {"legacy/__init__.py": ""}, requires=[])
    r = install(venv, write_gpu_profile(tmp_path, glibc="2.28"), "--find-links", str(w))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "legacy_pkg-2.0-py3-none-any.whl would replace legacy-pkg 1.0, installed as a " \
        "legacy .egg-info" in out
    assert "uninstall it first (python -m pip uninstall legacy-pkg)" in out
    assert "nothing was installed" in out
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before
    assert "sageattention" not in installed_in(venv)


def _egg_over_an_old_backend(tmp_path: Path, venv: Path, uv_bin: str) -> Path:
    """sageattention 2.1.0 installed by uv from a wheel that also shipped pkg/x.py (its RECORD
    lists that file), then legacy-pkg installed over it as `setup.py install` leaves it: pkg/
    is its package, named by top_level.txt alone (a folder owned whole), pkg/x.py its file.
    Returns site-packages."""
    from test_hostile import LABEL

    site = venv_site(venv)
    old = build_wheel(tmp_path / "old", "sageattention", f"2.1.0+{LABEL}",
                      {"sageattention/__init__.py": SAGE_OK, "pkg/x.py": "OLD = 1\n"},
                      requires=["torch>=2.0"])
    subprocess.run([uv_bin, "pip", "install", "-q", "--python", str(venv_python(venv)),
                    "--no-deps", str(old)], check=True)
    _write(site, {"pkg/__init__.py": "", "pkg/x.py": "LEGACY = 'x'\n",
                  f"{EGG}/PKG-INFO": "Metadata-Version: 1.1\nName: legacy-pkg\nVersion: 1.0\n",
                  f"{EGG}/top_level.txt": "pkg\n"})
    inst = read_installed([str(site)])
    assert record_paths(inst["legacy-pkg"]) == ["pkg/"]
    assert "pkg/x.py" in record_paths(inst["sageattention"])
    return site


def test_uninstall_keeps_a_file_of_a_folder_an_egg_info_owns_whole(tmp_path, venv,
                                                                    uv_bin) -> None:
    """`comfy-env-attn uninstall` of a backend whose RECORD lists pkg/x.py, where pkg/ is
    legacy-pkg's (top_level.txt): the backend goes, pkg/x.py stays byte for byte, and the
    row says which file was left to its owner."""
    site = _egg_over_an_old_backend(tmp_path, venv, uv_bin)
    x = site / "pkg" / "x.py"
    before = x.read_bytes()
    r = cli("uninstall", "--python", str(venv_python(venv)), "--backends", "sage")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left 1 file(s) other distributions own (pkg/x.py)" in r.stdout
    assert "sageattention" not in read_installed([str(site)])
    assert x.read_bytes() == before and (site / "pkg" / "__init__.py").exists()
    assert not (site / "sageattention").exists()


def test_an_install_that_fails_or_succeeds_keeps_a_file_of_a_folder_an_egg_info_owns_whole(
        tmp_path, venv, uv_bin) -> None:
    """Installing sageattention 2.2.0 over that 2.1.0: uv removes what the old RECORD lists,
    and pkg/x.py is legacy-pkg's. Killed once uv has installed, the file is still there
    (nothing waits on the next run to put it back), and the next run's rollback leaves it
    byte for byte; a failure the run undoes itself, likewise; then an install that
    completes keeps it too."""
    from test_hostile import LABEL, install, installed_in

    site = _egg_over_an_old_backend(tmp_path, venv, uv_bin)
    x = site / "pkg" / "x.py"
    before = x.read_bytes()
    new = sage_wheel(tmp_path / "new", "ok", f"2.2.0+{LABEL}")
    profile = write_gpu_profile(tmp_path, glibc="2.28")

    def run(crash: str | None = None):
        return install(venv, profile, "--find-links", str(new.parent),
                       env={"COMFY_ENV_ATTN_TEST_CRASH_AT": crash} if crash else None)

    r = run("installed:kill")
    assert r.returncode == -9, r.stdout + r.stderr
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"  # killed midway
    assert x.read_bytes() == before
    r = cli("doctor", "--python", str(venv_python(venv)))
    assert "found an interrupted install" in r.stderr and "undone" in r.stderr, r.stderr
    assert installed_in(venv)["sageattention"] == f"2.1.0+{LABEL}"
    assert x.read_bytes() == before
    r = run("save-verifying:enospc")
    assert r.returncode == 1 and "the target was restored" in r.stdout + r.stderr
    assert installed_in(venv)["sageattention"] == f"2.1.0+{LABEL}"
    assert x.read_bytes() == before
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_in(venv)["sageattention"] == f"2.2.0+{LABEL}"
    assert x.read_bytes() == before and (site / "pkg" / "__init__.py").exists()
