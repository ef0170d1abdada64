"""The node installed the ways ComfyUI users install nodes: `comfy-env-attn node install`
into a ComfyUI folder tree, the repository copied into custom_nodes/ (git clone, the Comfy
Registry, ComfyUI-Manager) with and without comfy-env-attn in that Python, requirements.txt
for ComfyUI-Manager, and what doctor says about each."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path, PureWindowsPath

import pytest
from conftest import cli, make_venv, venv_python, venv_site
from packaging.requirements import Requirement

from comfy_env_attn import __version__
from comfy_env_attn.core.lockmodel import read_toml
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.facts.installed import TORCH_FAMILY
from comfy_env_attn.facts.node import (
    NodeCopy,
    comfyui_root,
    find_nodes,
    loader_text,
    node_file,
    node_finding,
)

ROOT = Path(__file__).resolve().parent.parent
NODE = "ComfyEnvAttnBackend"
NODES = [NODE, "ComfyEnvAttnTaylor"]  # the router, and the approximate Taylor node


def fake_comfyui(where: Path) -> Path:
    """The files that make a folder ComfyUI's: main.py, comfy/, nodes.py, custom_nodes/."""
    (where / "comfy").mkdir(parents=True)
    (where / "custom_nodes").mkdir()
    (where / "main.py").write_text("")
    (where / "nodes.py").write_text("")
    return where


def copy_repo(dest: Path) -> Path:
    """What a git clone of this working tree holds: the tracked and the untracked files git
    does not ignore (so uncommitted work is what is tested)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree as it is
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", ".*cache", "*.egg-info"))
        return dest
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


# ComfyUI's own way of importing a custom node folder (nodes.load_custom_node): the folder's
# __init__.py under a module name made from its path.
LOAD_LIKE_COMFYUI = textwrap.dedent("""
    import importlib.util, json, sys
    path = sys.argv[1]
    name = path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    pkg = sys.modules.get("comfy_env_attn")
    print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS),
                      "names": module.NODE_DISPLAY_NAME_MAPPINGS,
                      "package": getattr(pkg, "__file__", None),
                      "torch": "torch" in sys.modules,
                      "ours": sorted(m for m in sys.modules if m.startswith("comfy_env_attn."))}))
""")


def load_like_comfyui(python: Path | str, folder: Path, cwd: Path
                      ) -> tuple[dict[str, object], str]:
    import json

    r = subprocess.run([str(python), "-c", LOAD_LIKE_COMFYUI, str(folder)], capture_output=True,
                       text=True, cwd=cwd, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr  # never an import error
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.fixture
def comfy(tmp_path: Path) -> Path:
    return fake_comfyui(tmp_path / "ComfyUI")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python without comfy-env-attn (and without torch)."""
    return venv_python(make_venv(tmp_path_factory.mktemp("bare") / "venv", torch=False))


# -- node install / remove ----------------------------------------------------------------

def test_install_places_a_copy_idempotently_and_remove_cleans_up(comfy: Path) -> None:
    r = cli("node", "install", "--comfyui", str(comfy))
    assert r.returncode == 0, r.stderr
    folder = comfy / "custom_nodes" / "comfy_env_attn"
    init = folder / "__init__.py"
    assert f"placed the node in {folder} (comfy-env-attn {__version__})" in r.stdout
    assert not folder.is_symlink() and not init.is_symlink() and init.is_file()
    assert init.read_text() == loader_text(__version__)
    assert sorted(p.name for p in folder.iterdir()) == ["__init__.py"]
    before = init.stat().st_mtime_ns
    r = cli("node", "install", "--comfyui", str(comfy))
    assert r.returncode == 0 and "the node is already in" in r.stdout, r.stdout + r.stderr
    assert init.stat().st_mtime_ns == before
    (folder / "__pycache__").mkdir()  # ComfyUI's import leaves bytecode
    (folder / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    r = cli("node", "remove", "--comfyui", str(comfy))
    assert r.returncode == 0 and f"removed the node from {folder}" in r.stdout, r.stderr
    assert list((comfy / "custom_nodes").iterdir()) == []
    r = cli("node", "remove", "--comfyui", str(comfy))
    assert r.returncode == 0 and "nothing removed" in r.stdout


def test_install_updates_an_older_loader(comfy: Path) -> None:
    from comfy_env_attn.cli.node import install_node

    init = Path(node_file(comfy))
    init.parent.mkdir()
    init.write_text(loader_text("0.0.1"))
    assert install_node(comfy).startswith(f"updated the node in {init.parent}")
    assert init.read_text() == loader_text(__version__)


def test_what_node_install_did_not_place_stays(comfy: Path, tmp_path: Path) -> None:
    folder = comfy / "custom_nodes" / "comfy_env_attn"
    folder.mkdir()
    (folder / "__init__.py").write_text("# someone else's node\n")
    for action in ("install", "remove"):
        r = cli("node", action, "--comfyui", str(comfy))
        assert r.returncode == 1 and "was not placed by comfy-env-attn node install; it stays" \
            in r.stderr, (action, r.stdout, r.stderr)
    assert (folder / "__init__.py").read_text() == "# someone else's node\n"
    shutil.rmtree(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder.symlink_to(elsewhere, target_is_directory=True)
    r = cli("node", "install", "--comfyui", str(comfy))
    assert r.returncode == 1 and "is a link" in r.stderr and list(elsewhere.iterdir()) == []
    folder.unlink()
    # the placed loader with another file beside it: remove takes only the loader
    assert cli("node", "install", "--comfyui", str(comfy)).returncode == 0
    (folder / "notes.txt").write_text("mine")
    r = cli("node", "remove", "--comfyui", str(comfy))
    assert r.returncode == 0 and "holds other files and stays" in r.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_portable_folder_and_windows_paths(tmp_path: Path) -> None:
    portable = tmp_path / "ComfyUI_windows_portable"
    comfy = fake_comfyui(portable / "ComfyUI")
    assert comfyui_root(portable) == comfy and comfyui_root(comfy) == comfy
    assert comfyui_root(tmp_path) is None
    r = cli("node", "install", "--comfyui", str(portable))
    assert r.returncode == 0, r.stderr
    assert (comfy / "custom_nodes" / "comfy_env_attn" / "__init__.py").is_file()
    win = PureWindowsPath(r"C:\ComfyUI_windows_portable\ComfyUI")
    assert node_file(win) == PureWindowsPath(
        r"C:\ComfyUI_windows_portable\ComfyUI\custom_nodes\comfy_env_attn\__init__.py")


def test_a_folder_that_is_not_comfyui_fails_and_none_is_bad_usage(tmp_path: Path) -> None:
    r = cli("node", "install", "--comfyui", str(tmp_path))
    assert r.returncode == 1 and f"{tmp_path} is not a ComfyUI folder" in r.stderr
    (tmp_path / "main.py").write_text("")
    r = cli("node", "install", "--comfyui", str(tmp_path / "main.py"))
    assert r.returncode == 1 and "main.py: a file, not a folder" in r.stderr
    r = cli("node", "install")
    assert r.returncode == 2 and "--comfyui DIR" in r.stderr


# -- the repository in custom_nodes/ --------------------------------------------------------

def test_the_root_init_is_the_loader() -> None:
    """One loader for both ways in: the repository's root __init__.py and the placed file."""
    assert (ROOT / "__init__.py").read_text() == loader_text(None)
    assert loader_text(None).splitlines()[1:] == loader_text(__version__).splitlines()[1:]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    comfy = fake_comfyui(tmp_path_factory.mktemp("clone") / "ComfyUI")
    return copy_repo(comfy / "custom_nodes" / "comfy-env-attn")


def test_a_clone_loads_the_installed_package_first(clone: Path, tmp_path: Path) -> None:
    got, err = load_like_comfyui(sys.executable, clone, tmp_path)
    assert got["nodes"] == NODES, err
    assert got["names"] == {NODE: "Attention Backend (comfy-env-attn)",
                            "ComfyEnvAttnTaylor": "Taylor Attention (approximate)"}
    assert not str(got["package"]).startswith(str(clone))  # the pip-installed one
    assert got["torch"] is False  # the node's import needs no torch, nor the tool side
    assert {str(m).split(".")[1] for m in got["ours"]} == {"core", "runtime"}, got["ours"]


def test_a_clone_without_the_package_installed_loads_its_own(clone: Path, bare_venv: Path,
                                                             tmp_path: Path) -> None:
    got, err = load_like_comfyui(bare_venv, clone, tmp_path)
    assert got["nodes"] == NODES, err
    assert str(got["package"]).startswith(str(clone / "comfy_env_attn"))
    assert err == ""


def test_without_the_package_anywhere_one_line_says_how_to_install(
        comfy: Path, bare_venv: Path, tmp_path: Path) -> None:
    lone = comfy / "custom_nodes" / "comfy-env-attn"  # the loader alone, no package beside
    lone.mkdir()
    shutil.copy(ROOT / "__init__.py", lone / "__init__.py")
    placed = Path(node_file(comfy))
    placed.parent.mkdir()
    placed.write_text(loader_text(__version__))
    # an empty folder a `pip uninstall` of an editable install leaves: no install either
    leftover = venv_site(bare_venv.parent.parent) / "comfy_env_attn"
    for folder, empty in ((lone, False), (placed.parent, False), (placed.parent, True)):
        if empty:
            leftover.mkdir()
        try:
            got, err = load_like_comfyui(bare_venv, folder, tmp_path)
        finally:
            if empty:
                leftover.rmdir()
        assert got["nodes"] == [] and got["names"] == {}
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("comfy-env-attn: the Attention Backend node is not loaded: "
                                   "comfy-env-attn is not installed in this Python.")
        assert lines[0].endswith(f'"{bare_venv}" -m pip install comfy-env-attn (not on PyPI '
                                 "yet: until it is, give pip a clone of its repository in its "
                                 "place)"), lines[0]


# -- requirements.txt and the package metadata ---------------------------------------------

def _project() -> dict[str, object]:
    return read_toml(ROOT / "pyproject.toml")


def test_requirements_for_comfyui_manager_cannot_replace_torch() -> None:
    """ComfyUI-Manager runs `pip install LINE` for each line: only comfy-env-attn, at least
    this copy's version, whose whole dependency closure holds no torch-family package."""
    lines = [ln.split("#")[0].strip() for ln in
             (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln]
    assert [r.name for r in reqs] == ["comfy-env-attn"]
    project = _project()["project"]
    assert isinstance(project, dict)
    assert str(reqs[0].specifier) == f">={project['version']}" and project["version"] == \
        __version__
    seen: set[str] = set()
    todo = ["comfy-env-attn"]
    while todo:  # the closure as installed here, markers evaluated for this interpreter
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(re.sub(r"[-_.]+", "-", req.name).lower())
    assert not seen & set(TORCH_FAMILY), sorted(seen)
    assert {"httpx", "packaging", "uv"} <= seen


def test_the_wheel_packages_only_the_package_and_the_registry_table_is_complete() -> None:
    doc = _project()
    tool = doc["tool"]
    assert isinstance(tool, dict)
    assert tool["hatch"]["build"]["targets"]["wheel"]["packages"] == ["comfy_env_attn"]
    comfy = tool["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert "comfy_env_attn" in comfy["includes"]


# -- doctor ---------------------------------------------------------------------------------

def test_doctor_node_finding_cases(tmp_path: Path) -> None:
    comfy = tmp_path
    placed = NodeCopy(comfy / "custom_nodes" / "comfy_env_attn", __version__, None)
    repo = NodeCopy(comfy / "custom_nodes" / "comfy-env-attn", None, __version__)

    def finding(nodes: list[NodeCopy], installed: str | None) -> tuple[str, str, str | None]:
        return node_finding(comfy, nodes, tool=__version__, installed=installed,
                            python="/c/python")

    sev, msg, step = finding([], __version__)
    assert sev == "info" and "not in" in msg and step is not None \
        and f"{tool_command()} node install --comfyui {comfy}" in step
    sev, msg, _ = finding([placed], __version__)
    assert sev == "ok" and f"runs comfy-env-attn {__version__}, this tool's version" in msg
    sev, msg, step = finding([placed], None)
    assert sev == "problem" and "loads no node: comfy-env-attn is not installed" in msg
    # what pip installs is where this tool runs from: this checkout (not on PyPI yet)
    assert step == f'Run: "/c/python" -m pip install "{ROOT}"'
    sev, msg, _ = finding([repo], None)  # the clone's own package serves
    assert sev == "ok" and "a copy of the repository" in msg
    sev, msg, _ = finding([repo], "0.0.1")
    assert sev == "problem" and f"runs comfy-env-attn 0.0.1, this tool is {__version__}" in msg
    old = NodeCopy(placed.folder, "0.0.1", None)
    sev, msg, step = finding([old], __version__)
    assert sev == "info" and "was placed by comfy-env-attn 0.0.1" in msg
    assert step == f"Run: {tool_command()} node install --comfyui {comfy}"
    sev, msg, _ = finding([placed, repo], __version__)
    assert sev == "info" and "ComfyUI loads the node from each of" in msg


def test_find_nodes_reads_the_copies_comfyui_would_load(comfy: Path, clone: Path) -> None:
    assert find_nodes(comfy) == []
    Path(node_file(comfy)).parent.mkdir()
    Path(node_file(comfy)).write_text(loader_text("0.0.9"))
    disabled = comfy / "custom_nodes" / "comfy-env-attn.disabled"  # ComfyUI-Manager's
    disabled.mkdir()
    (disabled / "__init__.py").write_text(loader_text(None))
    (comfy / "custom_nodes" / "other").mkdir()
    (comfy / "custom_nodes" / "other" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    assert find_nodes(comfy) == [NodeCopy(comfy / "custom_nodes" / "comfy_env_attn", "0.0.9",
                                          None)]
    assert find_nodes(clone.parent.parent) == [NodeCopy(clone, None, __version__)]


@pytest.mark.slow
def test_doctor_reports_the_node_in_the_target_comfyui(comfy: Path) -> None:
    make_venv(comfy / ".venv", torch=False)  # ComfyUI's Python, without comfy-env-attn
    r = cli("doctor", "--comfyui", str(comfy), "--no-embedded-index")
    assert "node: the Attention Backend node is not in" in r.stdout, r.stdout + r.stderr
    assert cli("node", "install", "--comfyui", str(comfy)).returncode == 0
    r = cli("doctor", "--comfyui", str(comfy), "--no-embedded-index", "--json")
    import json

    doc = json.loads(r.stdout)
    (node,) = [f for f in doc["findings"] if f["subject"] == "node"]
    assert node["severity"] == "problem" and "loads no node" in node["message"], node
    assert node["next"].endswith(f'-m pip install "{ROOT}"')
    assert r.returncode == 1


def test_every_step_names_the_target_as_it_was_named(tmp_path: Path) -> None:
    """doctor --comfyui DIR: each step it gives names the target as the user did, --comfyui
    DIR (install, verify and uninstall take it as the node's commands do), never the
    interpreter found there as --python; pasted, such a step runs against that ComfyUI.
    lock's steps too."""
    import json

    comfy = fake_comfyui(tmp_path / "ComfyUI")
    make_venv(comfy / ".venv", torch=True)
    r = cli("doctor", "--comfyui", str(comfy), "--json")
    steps = [f["next"] for f in json.loads(r.stdout)["findings"] if f.get("next")]
    runs = [s for s in steps if s.startswith("Run: ")]
    assert any(" install --comfyui " in s for s in runs), steps  # no lock yet
    assert any(" node install --comfyui " in s for s in runs), steps
    for s in runs:
        assert f"--comfyui {comfy}" in s and "--python" not in s, s
    pasted = next(s for s in runs if " node install " not in s)[len("Run: "):].split(" (")[0]
    r = subprocess.run([*pasted.split(), "--dry-run", "--json"], capture_output=True,
                       text=True, cwd=ROOT)
    assert Path(json.loads(r.stdout)["python"]).parent == venv_python(comfy / ".venv").parent
    # every command's steps do (core.progress.name_target): lock's, with no lock there
    r = cli("lock", "--comfyui", str(comfy))
    assert r.returncode == 1 and f"install --comfyui {comfy} (or verify" in r.stderr, r.stderr
