"""comfy-env.toml in every form real node repositories write (FACTS.md section 8), version
pins honoured by the resolver, several environments, a file with nothing to do; and honest
plans: the older major line said, --system against the real target, no wheel planned that
the install would refuse (its metadata read at plan time, PEP 658 or range requests)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from conftest import make_system
from wheels import build_wheel

from comfy_env_attn.candidates.sources import Candidate
from comfy_env_attn.cli import main
from comfy_env_attn.core.errors import ProfileError
from comfy_env_attn.facts.config import read_config
from comfy_env_attn.resolve import Pin, resolve

# Shaped like the files of public node repositories: the flat form beside other CUDA packages
FLAT = """\
# ComfyUI-Hunyuan3DWrapper style
[cuda]
packages = ["flash_attn==2.8.3", "sageattention>=2.2", "spconv", "nvdiffrast", "cubvh"]

[node_reqs]
ComfyUI-VideoHelperSuite = "Kosinkadink/ComfyUI-VideoHelperSuite"
"""

# the isolated-environment form: one per environment, plus the node's own Python
ENVS = """\
[sam3d]
python = "3.11"
cuda_version = "auto"
pytorch_version = "auto"

[sam3d.cuda]
flash-attn = "2.8.3"
sageattention = "*"
torch-scatter = "*"

[sam3d.packages]
requirements = ["trimesh>=4.0", "open3d"]

[sam3d.packages.linux]
requirements = ["pymeshlab"]

[trellis]
python = "3.10"
cuda_version = "12.8"
pytorch_version = "2.8.0"

[trellis.cuda]
sageattention = ">=2.2"
xformers = "0.0.32.post2"

[local.cuda]
flash_attn = "*"

[pypi-dependencies]
numpy = ">=1.21,<2"

[tools]
blender = "4.2"
"""

NOTHING = """\
python = "3.10"

[cuda]
packages = ["spconv", "nvdiffrast", "cumesh"]

[dependencies]
mesalib = "*"
"""


def write(tmp_path: Path, text: str, name: str = "comfy-env.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_flat_form_with_pep508_specifiers(tmp_path: Path) -> None:
    cfg = read_config(write(tmp_path, FLAT))
    (env,) = cfg.environments
    assert env.name == "cuda" and env.table == "[cuda] packages" and env.explicit == {}
    assert {w.backend: w.specifier for w in env.wanted} == {"flash": "==2.8.3",
                                                             "sage": ">=2.2"}
    assert cfg.left_to_comfy_env == ("spconv", "nvdiffrast", "cubvh", "[node_reqs]")


def test_a_package_in_both_flat_forms_keeps_both_pins(tmp_path: Path) -> None:
    """`packages = [...]` and `name = "version"` in one [cuda] table: the two pins on one
    backend combine, whichever line comes first."""
    for text in ('[cuda]\npackages = ["flash-attn>=2.8"]\nFlash_Attn = "2.7.4"\n',
                 '[cuda]\nFlash_Attn = "2.7.4"\npackages = ["flash-attn>=2.8"]\n'):
        (env,) = read_config(write(tmp_path, text)).environments
        assert [(w.backend, w.specifier) for w in env.wanted] == [("flash", ">=2.8,==2.7.4")]
        assert env.wanted[0].written == 'flash-attn>=2.8, Flash_Attn = "2.7.4"'
    # under a marker in one form only: which pin holds where would be a guess
    with pytest.raises(ProfileError, match="under different environment markers"):
        read_config(write(tmp_path, '[cuda]\npackages = [\'flash-attn>=2.8; sys_platform == '
                                    '"linux"\']\nflash-attn = "2.7.4"\n'))


def test_older_flat_forms_and_a_top_level_python(tmp_path: Path) -> None:
    cfg = read_config(write(tmp_path, 'python = "3.10"\n[cuda]\nsageattention = "2.2.0"\n'
                                      'torch-scatter = "2.1.2"\n'))
    (env,) = cfg.environments
    assert env.python == "3.10" and env.wanted[0].specifier == "==2.2.0"
    assert cfg.left_to_comfy_env == ("torch-scatter",)
    cfg = read_config(write(tmp_path, 'cuda = ["xformers==0.0.32.post2"]\n'
                                      '[env]\npytorch = "2.8.0"\ncuda = "12.8"\n'))
    (env,) = cfg.environments
    assert env.explicit == {"torch": "2.8.0", "cuda": "12.8"}
    assert env.wanted[0].backend == "xformers"


def test_environments_local_and_unknown_tables(tmp_path: Path) -> None:
    cfg = read_config(write(tmp_path, ENVS))
    by = {e.name: e for e in cfg.environments}
    assert list(by) == ["sam3d", "trellis", "local"]
    sam = by["sam3d"]
    assert sam.explicit == {"python": "3.11"} and sam.table == "[sam3d.cuda]"
    assert {w.backend: w.specifier for w in sam.wanted} == {"flash": "==2.8.3", "sage": ""}
    trellis = by["trellis"]
    assert trellis.explicit == {"python": "3.10", "cuda": "12.8", "torch": "2.8.0"}
    assert {w.backend: w.specifier for w in trellis.wanted} == {"sage": ">=2.2",
                                                                 "xformers": "==0.0.32.post2"}
    assert by["local"].explicit == {} and by["local"].backends == ["flash"]
    assert cfg.left_to_comfy_env == ("torch-scatter", "[sam3d.packages]",
                                     "[pypi-dependencies]", "[tools]")
    # explicit versions describe the environment; "auto" ones are the real target's
    real = make_system(python="3.12.3", torch="2.9.1+cu130", torch_cuda="13.0")
    s = trellis.system_for(real)
    assert (s.python, s.torch, s.torch_cuda, s.cxx11abi) == ("3.10", "2.8.0+cu128", "12.8", True)
    s = sam.system_for(real)
    assert (s.python, s.torch, s.torch_cuda, s.gpus) == ("3.11", "2.9.1+cu130", "13.0", ("8.9",))


@pytest.mark.parametrize("text, message", [
    ('[cuda]\npackages = "sageattention"\n', "[cuda] packages must be a list of strings"),
    ('[cuda]\npackages = ["sageattention>>2"]\n', "is not a PEP 508 requirement"),
    ('[e]\npython = "three"\n[e.cuda]\nsageattention = "*"\n', "[e] python must be"),
    ('[e]\npython = "3.11"\n[e.cuda]\nsageattention = 2\n', "[e.cuda] sageattention must be"),
    ('[e]\npython = "3.11"\n[e.cuda]\nsageattention = "=>2"\n', "is not a version or"),
    # a TOML number: 3.10 reads as 3.1
    ('[e]\npython = 3.10\n[e.cuda]\nsageattention = "*"\n', "[e] python must be a string: "
     'write it in quotes, as "3.1"'),
    ('python = 3.10\n[cuda]\npackages = ["sageattention"]\n', "python must be a string"),
])
def test_malformed_files_name_the_table_and_key(tmp_path: Path, text: str,
                                                message: str) -> None:
    with pytest.raises(ProfileError, match=None) as e:
        read_config(write(tmp_path, text))
    assert message in str(e.value) and "comfy-env.toml" in str(e.value)


# -- pins in the resolver -------------------------------------------------------------------

def _c(filename: str) -> Candidate:
    return Candidate(filename, "https://example.invalid/" + filename, "test")


SAGE1 = "sageattention-1.0.6-py3-none-any.whl"
SAGE2 = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
SAGE21 = "sageattention-2.1.1+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"


def test_a_pin_rejects_every_other_version_with_its_reason() -> None:
    pin = Pin("==2.1.1", 'sageattention = "2.1.1" ([e.cuda] of comfy-env.toml)')
    plan = resolve(make_system(), [_c(SAGE1), _c(SAGE2), _c(SAGE21)], ["sage"],
                   pins={"sage": pin})
    b = plan.get("sage")
    assert b is not None and b.selected is not None and b.selected.filename == SAGE21
    why = {r.candidate.filename: [x.text for x in r.reasons] for r in b.rejected}
    assert why[SAGE2] == ['version 2.2.0+cu128torch2.8 does not satisfy sageattention = '
                          '"2.1.1" ([e.cuda] of comfy-env.toml)']
    assert why[SAGE1] == ['version 1.0.6 does not satisfy sageattention = "2.1.1" '
                          '([e.cuda] of comfy-env.toml)']
    # a pin no wheel fits is a failure that names the pin
    plan = resolve(make_system(), [_c(SAGE1), _c(SAGE2)], ["sage"],
                   pins={"sage": Pin(">=3", "sageattention>=3")})
    b = plan.get("sage")
    assert b is not None and b.selected is None
    assert b.reason is not None and b.reason.startswith(
        "no sageattention wheel satisfies sageattention>=3 for torch 2.8 + CUDA 12.8")


def test_an_older_major_line_is_noted_with_why_the_newer_lost() -> None:
    plan = resolve(make_system(python="3.11.9"), [_c(SAGE1), _c(SAGE2)], ["sage"])
    b = plan.get("sage")
    assert b is not None and b.selected is not None and b.selected.filename == SAGE1
    (note,) = [n for n in b.notes if "older" in n]
    assert note.startswith("SageAttention 1.0.6 is the older 1.x line: no 2.x wheel fits. "
                           "SageAttention 2.2.0: no wheel for torch 2.8 + CUDA 12.8 on linux "
                           "x86_64, Python 3.11.9")
    assert "built for CPython 3.12 (cp312-cp312); target is Python 3.11.9" in note
    # a pin that excludes the newer line leaves nothing to note
    plan = resolve(make_system(python="3.11.9"), [_c(SAGE1), _c(SAGE2)], ["sage"],
                   pins={"sage": Pin("<2", "sageattention<2")})
    assert not [n for n in plan.get("sage").notes if "older" in n]  # type: ignore[union-attr]


def test_a_final_release_ranks_before_a_newer_dev_build() -> None:
    dev = "xformers-0.0.35.dev1147-py3-none-any.whl"
    final = "xformers-0.0.32.post2-cp39-abi3-manylinux_2_28_x86_64.whl"
    plan = resolve(make_system(), [_c(dev), _c(final)], ["xformers"])
    assert plan.get("xformers").selected.filename == final  # type: ignore[union-attr]


# -- the command line -----------------------------------------------------------------------

def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


PROFILE = """python = "3.12.3"
platform = "linux"
arch = "x86_64"
glibc = "2.35"
torch = "2.8.0+cu128"
torch_cuda = "12.8"
cxx11abi = true
driver = "570.124.06"
driver_cuda = "12.8"
gpus = ["8.9"]
"""


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write(tmp_path, PROFILE, "gpu.toml")


def test_plan_each_environment_in_turn_and_env_picks_one(tmp_path: Path, profile: Path,
                                                         capsys) -> None:
    cfg = write(tmp_path, ENVS)
    code, out, err = run(capsys, "plan", "--system", str(profile), "--config", str(cfg),
                         "--json", "--python", str(tmp_path / "none"))
    assert code == 0, err
    # said once, whatever the number of environments
    assert err.count("left to comfy-env") == 1
    assert "[pypi-dependencies]" in err and "torch-scatter" in err
    envs = json.loads(out)["environments"]
    assert [e["env"] for e in envs] == ["sam3d", "trellis", "local"]
    assert [e["system"]["python"] for e in envs] == ["3.11", "3.10", "3.12.3"]
    sam = {b["backend"]: b for b in envs[0]["backends"]}
    assert sam["flash"]["selected"]["filename"].startswith("flash_attn-2.8.3+")
    # Python 3.11 and torch 2.8: no SageAttention 2 wheel, and the plan says why
    assert sam["sage"]["selected"]["filename"] == "sageattention-1.0.6-py3-none-any.whl"
    assert "older 1.x line" in sam["sage"]["notes"][0]
    trellis = {b["backend"]: b for b in envs[1]["backends"]}
    assert trellis["xformers"]["selected"]["filename"].startswith("xformers-0.0.32.post2-")
    assert 'sageattention = ">=2.2" ([trellis.cuda] of comfy-env.toml)' in \
        trellis["sage"]["reason"]
    pinned = [r for r in trellis["sage"]["rejected"] if "pin" in r["kinds"]]
    assert pinned and all("does not satisfy" in " ".join(r["reasons"]) for r in pinned)
    code, out, err = run(capsys, "plan", "--system", str(profile), "--config", str(cfg),
                         "--env", "local", "--json", "--python", str(tmp_path / "none"))
    assert code == 0 and json.loads(out)["env"] == "local"
    code, out, err = run(capsys, "plan", "--system", str(profile), "--config", str(cfg),
                         "--env", "nope", "--python", str(tmp_path / "none"))
    assert code == 2 and "has no environment 'nope'; it has: sam3d, trellis, local" in err


def test_a_file_with_nothing_to_do_exits_0_with_one_line(tmp_path: Path, profile: Path,
                                                         torch_venv: Path, capsys) -> None:
    from conftest import venv_python

    cfg = write(tmp_path, NOTHING)
    for command in ("plan", "install"):
        code, out, err = run(capsys, command, "--system", str(profile), "--config", str(cfg),
                             "--python", str(venv_python(torch_venv)))
        assert code == 0, err
        assert (out + err).strip().splitlines() == [
            f"{cfg}: no attention package (spconv, nvdiffrast, cumesh left to comfy-env); "
            "nothing to do (known: sageattention, sageattn3, flash-attn, flash-attn-3, "
            "flash-attn-4, xformers)"]
        code, out, err = run(capsys, command, "--system", str(profile), "--config", str(cfg),
                             "--python", str(venv_python(torch_venv)), "--json")
        assert code == 0, err
        assert "no attention package" in json.loads(out)["nothing_to_do"]


def test_nothing_to_do_says_what_left_the_packages_out(tmp_path: Path, profile: Path,
                                                       capsys) -> None:
    """A file that does ask for attention packages, all left out on this target: by a
    marker, or by --backends. The line names them, not "no attention package"."""
    cfg = write(tmp_path, '[cuda]\npackages = [\'sageattention; sys_platform == "win32"\', '
                          '"xformers"]\n')
    code, out, err = run(capsys, "plan", "--system", str(profile), "--config", str(cfg),
                         "--backends", "flash")
    assert code == 0, err
    assert out.strip() == (f'{cfg}: nothing to do: cuda: sageattention; sys_platform == '
                           '"win32" (the marker leaves it out on this target); cuda asks for '
                           "xformers, which --backends flash leaves out")


def test_plan_system_disagreeing_with_the_target_warns(tmp_path: Path, profile: Path,
                                                       torch_venv: Path, capsys) -> None:
    import torch
    from conftest import venv_python

    code, out, err = run(capsys, "plan", "--system", str(profile), "--backends", "sage",
                         "--python", str(venv_python(torch_venv)))
    assert code == 0, err
    text = " ".join(out.split())
    assert f"says torch 2.8.0+cu128, the target has torch {torch.__version__}" in text
    assert "says torch's CUDA 12.8, the target's torch is a CPU build" in text
    # a target that cannot be probed: the profile alone, no warning
    code, out, err = run(capsys, "plan", "--system", str(profile), "--backends", "sage",
                         "--python", str(tmp_path / "missing"))
    assert code == 0 and "warning" not in out


def test_install_for_a_gpu_profile_into_a_cpu_torch_says_verifying_here_cannot_work(
        profile: Path, torch_venv: Path, capsys) -> None:
    """A CUDA profile applied to a target whose torch is a CPU build (an image built on a
    machine without the GPU): the install says, before it verifies, that a CUDA backend
    cannot run there, and how to install for the GPU machine (--no-verify, then verify
    there); with --no-verify, nothing of the kind."""
    from conftest import venv_python

    args = ["install", "--system", str(profile), "--backends", "sage", "--dry-run",
            "--python", str(venv_python(torch_venv))]
    _code, out, err = run(capsys, *args)
    text = " ".join((out + err).split())
    assert "verification runs here, on a CPU build of torch" in text
    assert "pass --no-verify, then verify there (" in text and " verify)" in text
    _code, out, err = run(capsys, *args, "--no-verify")
    assert "verification runs here" not in out + err


def _xformers(folder: Path, version: str, torch_pin: str) -> Path:
    return build_wheel(folder, "xformers", version, {"xformers/__init__.py": str(folder)},
                       requires=[f"torch{torch_pin}", "numpy"],
                       tag="cp39-abi3-manylinux_2_28_x86_64")


@pytest.mark.parametrize("pep658", [True, False])
def test_no_plan_picks_a_wheel_whose_metadata_needs_another_torch(tmp_path: Path,
                                                                  profile: Path, http_server,
                                                                  capsys, pep658: bool) -> None:
    """A remote-only plan for torch 2.8: the newest xformers wheels need torch 2.10 and 2.9.1
    (said only in their metadata); the plan reads it, from PEP 658 files or with range
    requests into the wheels, and picks the release for torch 2.8."""
    wheels = [_xformers(tmp_path, "0.0.35", ">=2.10"), _xformers(tmp_path, "0.0.33.post2",
                                                                   "==2.9.1"),
              _xformers(tmp_path, "0.0.32.post2", "==2.8.0")]
    links = []
    for w in wheels:
        url = http_server.add_file(f"/files/{w.name}", w)
        sha = hashlib.sha256(w.read_bytes()).hexdigest()
        attr = ""
        if pep658:
            with zipfile.ZipFile(w) as z:
                meta = next(n for n in z.namelist() if n.endswith("/METADATA"))
                http_server.add(f"/files/{w.name}.metadata", z.read(meta), "text/plain")
            attr = ' data-core-metadata="true"'
        links.append(f'<a href="{url}#sha256={sha}"{attr}>{w.name}</a>')
    http_server.add("/simple/xformers/", "<html>" + "".join(links) + "</html>")
    args = ["plan", "--system", str(profile), "--backends", "xformers", "--index-url",
            http_server.url + "/simple", "--no-embedded-index", "--json",
            "--python", str(tmp_path / "none")]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    (x,) = [b for b in json.loads(out)["backends"] if b["backend"] == "xformers"]
    assert x["selected"]["filename"] == wheels[2].name
    why = {r["filename"]: r["reasons"] for r in x["rejected"]}
    assert why[wheels[0].name] == ["requires torch>=2.10 (its metadata), target has torch "
                                   "2.8.0+cu128: installing it would replace torch"]
    assert "requires torch==2.9.1" in why[wheels[1].name][0]
    if not pep658:  # a few small range reads, never the whole wheel
        assert all(not h.endswith(".metadata") for h in http_server.hits)
    # read once: a second plan takes the metadata from the cache
    hits = len(http_server.hits)
    code, out2, _ = run(capsys, *args)
    assert code == 0 and json.loads(out2)["backends"] == json.loads(out)["backends"]
    assert [h for h in http_server.hits[hits:] if "/files/" in h] == []


def test_range_reads_fetch_only_the_end_of_a_big_wheel(tmp_path: Path, http_server) -> None:
    from comfy_env_attn.install.edges import remote_metadata

    big = build_wheel(tmp_path, "xformers", "0.0.32.post2",
                      {"xformers/__init__.py": "", "xformers/blob.bin": "x" * 3_000_000},
                      requires=["torch==2.8.0"])
    url = http_server.add_file(f"/files/{big.name}", big)
    meta = remote_metadata(Candidate(big.name, url, "test"))
    assert meta is not None and "Requires-Dist: torch==2.8.0" in meta
    assert 1 <= http_server.hits.count(f"/files/{big.name}") <= 2  # 64 kB each
