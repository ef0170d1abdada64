"""The command line around install, through real uv into real venvs (loopback index):
comfy-env.toml pins at install time, --json of install / verify / bench against the schemas
of docs/json.md, the lock written when nothing fits, progress lines, uninstall (including a
kill -9 midway), --version and --quiet."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from conftest import cli, make_venv, venv_python, venv_site
from wheels import sage_wheel

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
    p = tmp_path / "gpu.toml"
    p.write_text(f'python = "{sys.version.split()[0]}"\nplatform = "linux"\narch = "x86_64"\n'
                 f'glibc = "2.36"\ntorch = "{TORCH.split("+")[0]}+cu128"\n'
                 'torch_cuda = "12.8"\ncxx11abi = true\ndriver = "570.124.06"\n'
                 'driver_cuda = "12.8"\ngpus = ["8.9"]\n')
    return p


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    return make_venv(tmp_path / "venv", torch=True)


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
    assert r.returncode == 0, r.stderr  # a dry run only warns
    r = cli(*base, "--config", str(cfg))
    assert r.returncode == 1
    assert f"it says Python 3.9, the target runs {sys.version.split()[0]}" in r.stderr
    assert "pass --python with its interpreter" in r.stderr and "--force" in r.stderr
