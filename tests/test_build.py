"""install --build and build: prerequisite checks before anything is fetched or compiled, a
real C extension built by the target interpreter, the wheelhouse reused by a second venv, and a
failed build that leaves the target as it was.

The source is tests/fixtures/c_sage: a `sageattention` whose default softmax scale comes from
a compiled C extension (no CUDA), served from a loopback HTTP server and pinned by sha256 in a
sources file of the shape of wheel_index/build_sources.toml. Its recipe says toolchain "c":
nvcc is then not needed, everything else goes through the same path as SageAttention's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, cli, make_system, make_venv, venv_python, venv_site, write_gpu_profile
from wheels import sage_wheel

from comfy_env_attn.core.errors import UsageError
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.install import build as b
from comfy_env_attn.lockfile import LOCK_NAME, read

torch = pytest.importorskip("torch")
FIXTURE = ROOT / "tests" / "fixtures" / "c_sage"
TORCH = torch.__version__.split("+")[0]


def _builds_wheels() -> bool:
    """The test venvs see this interpreter's setuptools: can it build a wheel on its own?"""
    import importlib.util

    try:
        import setuptools
    except ImportError:
        return False
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1):
        return True
    return importlib.util.find_spec("wheel") is not None


needs_cc = pytest.mark.skipif(
    (shutil.which("cc") is None and shutil.which("gcc") is None) or not _builds_wheels(),
    reason="no C compiler, or no setuptools that builds wheels (pip install '.[dev]')")


# -- pure checks ----------------------------------------------------------------------------

def recipe(**kw: object) -> b.Recipe:
    base: dict[str, object] = dict(
        backend="sage", dist="sageattention", version="2.2.0", url="https://example/s.tgz",
        sha256="0" * 64, build_modules=("setuptools", "packaging", "torch"), min_nvcc="12.0",
        min_nvcc_sm={"9.0": "12.3"}, sm=("8.0", "8.9", "9.0"), built_sm={"9.0": "9.0a"},
        ram_per_job_gb=4.0, disk_gb=3.0,
        measured={"minutes": 3.63, "cores": 16, "sm": "9.0"})
    base.update(kw)
    return b.Recipe(**base)  # type: ignore[arg-type]


def facts(**kw: object) -> b.BuildFacts:
    base: dict[str, object] = dict(
        python="/venv/bin/python",
        modules={"setuptools": "80.0", "packaging": "25.0", "torch": "2.8.0"},
        compiler=b.Compiler("/usr/bin/g++", "gcc", "13.3.0"),
        nvcc=b.Nvcc("/usr/local/cuda/bin/nvcc", "on PATH", "12.8", "/usr/local/cuda",
                    {"gcc": 14, "clang": 19}, "its crt/host_config.h"),
        ninja="/usr/bin/ninja", free_disk=100 << 30, disk_path="/cache/build",
        ram_available=64 << 30, cores=16)
    base.update(kw)
    return b.BuildFacts(**base)  # type: ignore[arg-type]


H100 = make_system(python="3.11.9", torch="2.8.0+cu128", gpus=("9.0",))


def problems(r: b.Recipe | None = None, s=H100, **kw: object) -> list[str]:
    return [str(p) for p in b.check(r or recipe(), s, facts(**kw))]


def test_a_machine_that_can_build_has_no_problems() -> None:
    assert problems() == []
    assert b.build_archs(recipe(), H100) == (("9.0",), [])


def test_each_missing_prerequisite_is_named_with_its_fix() -> None:
    (p,) = problems(nvcc=b.Nvcc(None, "CUDA_HOME is /opt/none"))
    assert p == ("nvcc not found (CUDA_HOME is /opt/none); fix: install the CUDA toolkit "
                 "12.x (matching torch's CUDA 12.8) and set CUDA_HOME to it")
    (p,) = problems(ninja=None)
    assert p.startswith("ninja not found") and "uv pip install --python /venv/bin/python ninja" in p
    (p,) = problems(modules={"setuptools": None, "packaging": "25", "torch": "2.8.0"})
    assert p.startswith("setuptools is not installed in /venv/bin/python") and \
        p.endswith("fix: uv pip install --python /venv/bin/python setuptools")
    (p,) = problems(modules={"setuptools": "65.5.0", "wheel": None, "packaging": "25",
                             "torch": "2.8.0"})
    assert p.startswith("setuptools 65.5.0 in /venv/bin/python builds wheels only with the "
                        "'wheel' package") and p.endswith("uv pip install --python "
                                                          "/venv/bin/python wheel")
    assert problems(modules={"setuptools": "80.0", "wheel": None, "packaging": "25",
                             "torch": "2.8.0"}) == []
    (p,) = problems(compiler=b.Compiler(None, looked="g++, gcc on PATH"))
    assert p.startswith("no compiler found (g++, gcc on PATH)") and "build-essential" in p
    (p,) = problems(free_disk=1 << 30)
    assert p.startswith("/cache/build has 1.0 GB free; building sageattention needs about "
                        "3 GB")
    (p,) = problems(ram_available=1 << 30)
    assert "1.0 GB of memory is free; one sageattention compile job takes up to 4 GB" in p
    assert problems(ram_available=1 << 30, max_jobs_env="1") == []


def test_nvcc_must_match_torchs_cuda_and_take_the_compiler() -> None:
    old = b.Nvcc("/cuda/bin/nvcc", "CUDA_HOME is /cuda", "11.8", "/cuda", {"gcc": 11},
                 "CUDA's release notes")
    found = problems(nvcc=old)
    assert found[0] == ("nvcc /cuda/bin/nvcc is CUDA 11.8; torch 2.8.0+cu128 uses CUDA 12.8: "
                        "the extension would not load; fix: install the CUDA toolkit 12.8 (any "
                        "12.x works) and set CUDA_HOME to it")
    assert "sageattention 2.2.0 needs CUDA >= 12.3 for sm 9.0" in found[2]
    assert found[3].startswith("nvcc (CUDA 11.8) accepts gcc up to 11 (CUDA's release notes); "
                               "the host compiler is gcc 13.3.0 (/usr/bin/g++)")
    (p,) = problems(nvcc=b.Nvcc("/usr/local/bin/nvcc", "on PATH", "12.8", "/usr/local",
                                {"gcc": 14}, headers=False))
    assert p.startswith("nvcc /usr/local/bin/nvcc belongs to no CUDA toolkit this build can "
                        "use: /usr/local has no include/cuda_runtime.h")
    # a minor mismatch is no error (torch's own check only warns)
    assert problems(nvcc=b.Nvcc("/c/nvcc", "on PATH", "12.4", "/c", {"gcc": 13})) == []
    cpu = make_system(torch="2.8.0+cpu", torch_cuda=None, gpus=("9.0",))
    assert any("is a CPU build: a CUDA extension cannot be built" in p
               for p in problems(s=cpu))
    (p,) = problems(s=make_system(torch="2.8.0+cu128", gpus=("10.0",)))
    assert p.startswith("sageattention 2.2.0 has no kernels for sm 10.0")


def test_jobs_follow_memory_and_the_time_estimate_follows_cores() -> None:
    assert b.max_jobs(recipe(), facts(ram_available=18 << 30, cores=16)) == 4
    assert b.max_jobs(recipe(), facts(ram_available=256 << 30, cores=16)) == 16
    assert b.max_jobs(recipe(), facts(max_jobs_env="3")) == 3
    sys_ = make_system(python="3.11.9", torch="2.8.0+cu128", gpus=("9.0",))
    hint = b.build_hint("sage", sys_, 16, selected="1.0.6", recipes={"sage": recipe()})
    assert hint == ("no sageattention 2.x wheel for torch 2.8 + cp311 (the plan selects 1.0.6); "
                    f"`{tool_command()} install --build --backends sage` builds sageattention "
                    "2.2.0 for sm 9.0 in about 4 minutes on 16 cores")
    assert b.build_hint("sage", sys_, 16, selected="2.2.0", recipes={"sage": recipe()}) is None
    assert b.wants_build(recipe(), None) and b.wants_build(recipe(), "1.0.6")
    assert not b.wants_build(recipe(), "2.1.1") and not b.wants_build(recipe(), "3.0")
    assert "about 29 minutes on 2 cores" in (b.build_hint("sage", sys_, 2,
                                                          recipes={"sage": recipe()}) or "")


def test_host_compiler_limits_are_read_from_nvccs_header() -> None:
    header = ("#if defined(__GNUC__)\n\n#if __GNUC__ > 15\n#error -- unsupported GNU version!\n"
              "#endif\n#if defined(__clang__) && !defined(__ibmxl_vrm__) && !defined(__ICC)\n\n"
              "#if (__clang_major__ >= 21) || (__clang_major__ < 3)\n#error\n#endif\n")
    assert b.host_limits(header) == {"gcc": 15, "clang": 20}
    assert b.parse_nvcc_release("Cuda compilation tools, release 12.8, V12.8.93") == "12.8"


def test_the_embedded_pins_load() -> None:
    recipes = b.load_recipes()
    assert set(recipes) == {"sage", "flash", "flash3", "xformers"}
    for r in recipes.values():
        assert r.sha256 or r.git_tree or r.needs_checkout, r.backend
    with pytest.raises(UsageError, match="schema"):
        b.load_recipes(ROOT / "pyproject.toml")


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_a_git_archives_files_give_the_commits_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg" / "sub").mkdir(parents=True)
    (repo / "setup.py").write_text("print('x')\n")
    (repo / "pkg" / "run.sh").write_text("#!/bin/sh\n")
    (repo / "pkg" / "run.sh").chmod(0o755)
    (repo / "pkg" / "sub" / "a.c").write_text("int a;\n")
    (repo / "pkg-link").symlink_to("pkg/run.sh")

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    archive = tmp_path / "x.tar.gz"
    git("archive", "--format=tar.gz", "--prefix=repo-abc/", "-o", str(archive), "HEAD")
    assert b.git_tree_of_archive(archive) == git("rev-parse", "HEAD^{tree}")


# -- through the command line, real venvs, real uv ---------------------------------------

def source_archive(folder: Path, *, broken: bool = False) -> Path:
    """The fixture as a release archive (one top folder, as GitHub and sdists make them)."""
    src = folder / "c_sage-2.2.0"
    shutil.copytree(FIXTURE, src)
    if broken:
        (src / "csrc" / "scale.c").write_text("this is not C;\n")
    out = folder / ("c_sage-broken.tar.gz" if broken else "c_sage-2.2.0.tar.gz")
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return out


def sources_file(folder: Path, url: str, sha256: str) -> Path:
    p = folder / "sources.toml"
    p.write_text(f'schema = 1\n[[sources]]\nbackend = "sage"\ndist = "sageattention"\n'
                 f'version = "2.2.0"\nurl = "{url}"\nhashes = {{ sha256 = "{sha256}" }}\n'
                 'toolchain = "c"\nbuild-modules = ["setuptools"]\ndisk-gb = 0.05\n'
                 'ram-per-job-gb = 0.25\n')
    return p


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write_gpu_profile(tmp_path, gpu="9.0")


@pytest.fixture
def served(tmp_path: Path, http_server) -> tuple[Path, str, str]:
    """(sources file, archive URL path, its sha256) for the fixture on the loopback server."""
    archive = source_archive(tmp_path / "src")
    path = "/archive/c_sage-2.2.0.tar.gz"
    url = http_server.add_file(path, archive)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    return sources_file(tmp_path, url, sha), path, sha


def env_for(tmp_path: Path, sources: Path | None = None, **extra: str) -> dict[str, str]:
    env = {"COMFY_ENV_ATTN_WHEELHOUSE": str(tmp_path / "wheelhouse"),
           "COMFY_ENV_ATTN_CACHE_DIR": str(tmp_path / "cache"), **extra}
    if sources is not None:
        env["COMFY_ENV_ATTN_BUILD_SOURCES"] = str(sources)
    return env


def site_listing(venv: Path) -> list[str]:
    return sorted(p.name for p in venv_site(venv).iterdir())


@needs_cc
def test_build_install_verify_lock_then_a_second_venv_reuses_the_wheel(
        tmp_path: Path, profile: Path, served, http_server) -> None:
    sources, path, sha = served
    env = env_for(tmp_path, sources)
    first = make_venv(tmp_path / "first", torch=True)
    # the case: only SageAttention 1.x (Triton) fits; --build builds the 2.x source
    old = sage_wheel(tmp_path / "old", "ok", "1.0.6")
    r = cli("install", "--build", "--python", str(venv_python(first)), "--system", str(profile),
            "--backends", "sage", "--no-embedded-index", "--find-links", str(old.parent),
            "--shapes", "1x2x128x64", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the plan selects sageattention-1.0.6-py3-none-any.whl, an older major line" \
        in r.stderr
    assert "building sageattention 2.2.0, " in r.stderr and "built sageattention-2.2.0-cp" in r.stderr
    (record_path,) = (tmp_path / "wheelhouse" / "sageattention").glob("*/build.json")
    record = json.loads(record_path.read_text())
    label = f"torch{'.'.join(TORCH.split('.')[:2])}"
    assert record["version"] == f"2.2.0+{label}" and record["upstream_version"] == "2.2.0"
    assert record["source"] == {"url": http_server.url + path, "sha256": sha,
                                "kind": "archive", "pinned": True}
    assert Path(record["log"]).is_file()
    # installed, proven by verification (through the compiled scale), locked as built here
    doc = read(first / LOCK_NAME)
    (pkg,) = doc["packages"]
    assert pkg["version"] == f"2.2.0+{label}"
    assert pkg["wheels"][0]["hashes"]["sha256"] == record["sha256"]
    assert pkg["tool"]["comfy-env-attn"]["built-here"] is True
    assert pkg["tool"]["comfy-env-attn"]["source-sha256"] == sha
    sage = doc["tool"]["comfy-env-attn"]["backends"]["sage"]
    assert sage["status"] == "verified"
    assert any(c["variant"] == "plain" and c["passed"] for c in sage["checks"])
    assert list(venv_site(first).glob("sageattention/_C*.so"))
    # a second venv takes the wheel from the wheelhouse: no build, no download
    second = make_venv(tmp_path / "second", torch=True)
    r = cli("install", "--python", str(venv_python(second)), "--system", str(profile),
            "--backends", "sage", "--no-embedded-index", "--no-verify", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building" not in r.stderr
    assert http_server.hits.count(path) == 1
    assert read(second / LOCK_NAME)["packages"][0]["wheels"][0]["name"] == record["filename"]
    r = cli("plan", "--system", str(profile), "--backends", "sage", "--no-embedded-index",
            "--json", env=env)
    plan = json.loads(r.stdout)
    sel = next(x for x in plan["backends"] if x["backend"] == "sage")["selected"]
    assert sel["source"] == f"wheelhouse:{tmp_path / 'wheelhouse'}"


def test_missing_or_mismatched_nvcc_and_too_little_disk_fail_before_anything_is_fetched(
        tmp_path: Path, profile: Path, served, http_server) -> None:
    sources, path, _sha = served
    venv = make_venv(tmp_path / "venv", torch=True)
    base = ["build", "--python", str(venv_python(venv)), "--system", str(profile),
            "--backends", "sage"]
    (tmp_path / "empty").mkdir()
    # the embedded SageAttention pin: a CUDA build. The profile says torch is a CUDA build,
    # the target's is not: its wheel would be labelled for a torch it was not compiled for
    r = cli(*base, env=env_for(tmp_path, CUDA_HOME=str(tmp_path / "empty")))
    assert r.returncode == 1 and r.stderr.startswith("ERROR"), r.stderr
    assert f"ERROR the profile {profile} does not describe {venv_python(venv)}: it says " \
        "torch's CUDA 12.8, the target's torch is a CPU build. A build compiles against the " \
        "target's own torch and Python" in r.stderr and "pass --force" in r.stderr
    assert "cannot build" not in r.stderr
    r = cli("install", "--build", "--dry-run", "--python", str(venv_python(venv)), "--system",
            str(profile), "--backends", "sage", "--no-embedded-index", env=env_for(tmp_path))
    assert r.returncode == 1 and f"the profile {profile} does not describe" in r.stderr, \
        r.stdout + r.stderr
    # the profile stands in for a CUDA torch here (--force), and the build says so
    base.append("--force")
    r = cli(*base, env=env_for(tmp_path, CUDA_HOME=str(tmp_path / "empty")))
    assert r.returncode == 1
    assert f"warning: the profile {profile} says torch's CUDA 12.8, the target's torch is a " \
        "CPU build: --force, so the profile's torch and Python stand for the target's in the " \
        "checks and the wheel's label" in r.stderr
    assert "cannot build sage (sageattention 2.2.0) here (nothing was downloaded or compiled)" \
        in r.stderr
    assert f"nvcc not found (CUDA_HOME is {tmp_path / 'empty'}); fix: install the CUDA " \
        "toolkit 12.x" in r.stderr
    fake = tmp_path / "cuda11" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    fake.chmod(0o755)
    (fake.parent.parent / "include").mkdir()
    (fake.parent.parent / "include" / "cuda_runtime.h").write_text("")
    r = cli(*base, env=env_for(tmp_path, CUDA_HOME=str(fake.parent.parent)))
    assert r.returncode == 1
    assert f"nvcc {fake} is CUDA 11.8; torch {TORCH}+cu128 uses CUDA 12.8: the extension " \
        "would not load" in r.stderr
    # the C fixture, with a disk too small for it
    r = cli(*base, env=env_for(tmp_path, sources, COMFY_ENV_ATTN_TEST_FREE_DISK="1000"))
    assert r.returncode == 1
    assert "has 0.0 GB free; building sageattention needs about 0.05 GB" in r.stderr
    assert path not in http_server.hits  # nothing was downloaded
    assert not (tmp_path / "cache" / "build-logs").exists()  # nothing was compiled
    assert not (tmp_path / "wheelhouse").exists()


def test_a_build_profile_must_match_what_the_wheel_is_labelled_with_only(
        tmp_path: Path, served) -> None:
    """build --system refuses a profile whose Python or torch is not the target's (the
    wheel's tags and label are the target's); a newer glibc (an older build machine, the
    usual case) is no fault, and another C++ ABI is a warning: the build uses the target
    torch's. torch's CUDA counts for CUDA builds only (the fixture compiles C)."""
    sources, _path, _sha = served
    venv = make_venv(tmp_path / "venv", torch=True)
    text = write_gpu_profile(tmp_path, glibc="2.99").read_text()
    prof = tmp_path / "p.toml"
    prof.write_text(text.replace("cxx11abi = true", "cxx11abi = false"))
    base = ["build", "--python", str(venv_python(venv)), "--system", str(prof),
            "--backends", "sage", "--dry-run"]
    r = cli(*base, env=env_for(tmp_path, sources))
    assert r.returncode == 0 and "would build sage" in r.stdout, r.stdout + r.stderr
    assert "does not describe" not in r.stderr and "glibc" not in r.stderr, r.stderr
    assert f"warning: the profile {prof} says cxx11abi False, the target's torch has True: " \
        "the build compiles with the target torch's" in r.stderr, r.stderr
    prof.write_text(text.replace('glibc = "2.99"', 'glibc = "2.17"'))  # an older machine
    r = cli(*base, env=env_for(tmp_path, sources))
    assert r.returncode == 0 and f"warning: the profile {prof} says glibc 2.17; this machine " \
        "has " in r.stderr and "may not load there" in r.stderr, r.stderr
    prof.write_text(text.replace(f'python = "{sys.version.split()[0]}"', 'python = "3.9.1"'))
    r = cli(*base, env=env_for(tmp_path, sources))
    assert r.returncode == 1 and f"the profile {prof} does not describe" in r.stderr and \
        "Python 3.9.1" in r.stderr, r.stderr


@needs_cc
def test_build_json_is_one_document_dry_run_or_not(tmp_path: Path, profile: Path,
                                                   served) -> None:
    """build --json: one document on stdout (docs/json.md, schema=build), the dry run's
    lines on stderr; sdpa alone has nothing to build (bad usage)."""
    from test_workflow import check

    sources, _path, _sha = served
    venv = make_venv(tmp_path / "venv", torch=True)
    base = ["build", "--python", str(venv_python(venv)), "--system", str(profile),
            "--backends", "sage", "--json"]
    r = cli(*base, "--dry-run", env=env_for(tmp_path, sources))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    check(doc, "build")
    assert doc["dry_run"] is True and [b["backend"] for b in doc["builds"]] == ["sage"]
    assert doc["builds"][0]["wheel"] is None and "would build sage: " in r.stderr
    r = cli(*base, env=env_for(tmp_path, sources))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    check(doc, "build")
    (b,) = doc["builds"]
    assert Path(b["wheel"]).is_file() and b["record"]["backend"] == "sage"
    r = cli("build", "--python", str(venv_python(venv)), "--backends", "sdpa", "--dry-run")
    assert r.returncode == 2 and "SDPA is PyTorch's own, there is nothing to build" in r.stderr


@needs_cc
def test_install_build_dry_run_exits_as_the_install_would(tmp_path: Path, profile: Path,
                                                          served) -> None:
    """install --build --dry-run where no wheel fits: it would build, then install, so the
    dry run succeeds and says so (not 'no wheel'); a backend with no pinned source has the
    reason in its failure line, -q or not, and no 'nothing to build' line contradicts it."""
    from test_workflow import check

    sources, _path, _sha = served
    venv = make_venv(tmp_path / "venv", torch=True)
    base = ["install", "--build", "--dry-run", "--python", str(venv_python(venv)), "--system",
            str(profile), "--no-embedded-index"]
    r = cli(*base, "--backends", "sage", env=env_for(tmp_path, sources))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sage: would build sageattention 2.2.0" in r.stdout and "then install it" in r.stdout
    assert "ERROR" not in r.stderr and "no wheel" not in r.stdout + r.stderr
    r = cli(*base, "--backends", "sage", "--json", env=env_for(tmp_path, sources))
    doc = json.loads(r.stdout)
    check(doc, "outcome")
    (row,) = [b for b in doc["backends"] if b["backend"] == "sage"]
    assert row["action"] == "would-build" and doc["ok"] is True
    assert not (tmp_path / "wheelhouse").exists()  # nothing was built
    r = cli(*base, "--backends", "sage3", "-q", env=env_for(tmp_path, sources))
    assert r.returncode == 1
    assert "no source is pinned for sage3" in r.stderr.splitlines()[-1], r.stderr
    assert "nothing to build" not in r.stderr


@needs_cc
def test_a_failed_build_leaves_the_target_unchanged(tmp_path: Path, profile: Path,
                                                    http_server) -> None:
    archive = source_archive(tmp_path / "src", broken=True)
    url = http_server.add_file("/archive/c_sage-2.2.0.tar.gz", archive)
    sources = sources_file(tmp_path, url, hashlib.sha256(archive.read_bytes()).hexdigest())
    venv = make_venv(tmp_path / "venv", torch=True)
    before = site_listing(venv)
    r = cli("install", "--build", "--python", str(venv_python(venv)), "--system", str(profile),
            "--backends", "sage", "--no-embedded-index", env=env_for(tmp_path, sources))
    assert r.returncode == 1
    assert "ERROR building sage (sageattention 2.2.0) failed after" in r.stderr
    assert "this is not C" in r.stderr  # the last lines of the log, with the compiler's error
    (log,) = (tmp_path / "cache" / "build-logs").glob("*.log")
    assert "error" in log.read_text().lower()
    assert site_listing(venv) == before
    assert not (venv / LOCK_NAME).exists()
    assert not list((tmp_path / "wheelhouse").rglob("*.whl"))
    assert not list((tmp_path / "cache" / "build").iterdir())  # the build tree is gone


def test_a_source_that_is_not_its_pin_is_refused(tmp_path: Path, profile: Path,
                                                 http_server) -> None:
    archive = source_archive(tmp_path / "src")
    url = http_server.add_file("/archive/c_sage-2.2.0.tar.gz", archive)
    sources = sources_file(tmp_path, url, "ab" * 32)
    venv = make_venv(tmp_path / "venv", torch=True)
    r = cli("build", "--python", str(venv_python(venv)), "--system", str(profile),
            "--backends", "sage", env=env_for(tmp_path, sources))
    assert r.returncode == 1
    assert f"hash mismatch for the sageattention source {url}: expected sha256 {'ab' * 32}" \
        in r.stderr
    assert not (tmp_path / "wheelhouse").exists()


def test_build_sources_that_cannot_be_read_are_one_line(tmp_path: Path) -> None:
    """$COMFY_ENV_ATTN_BUILD_SOURCES malformed, not UTF-8, or nested deeper than TOML can be
    read: one line naming the file, never a traceback."""
    from comfy_env_attn.install.build import load_recipes

    p = tmp_path / "sources.toml"
    for data, says in [(b"schema = \n", "malformed TOML"),
                       (b"schema = 1\n# \xff\n", "is not UTF-8 text"),
                       (b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
                        "deeper than TOML can be read")]:
        p.write_bytes(data)
        with pytest.raises(UsageError, match=says):
            load_recipes(p)
