"""Build a backend's wheel from source for this machine, once, into the wheelhouse.

Three steps, in this order:
1. facts (I/O): the CUDA toolkit nvcc belongs to, the host compiler, ninja, what the target
   interpreter can import, free disk, free memory and cores;
2. checks (pure): every reason the build would fail, each with its fix, all before anything is
   downloaded or compiled;
3. the build: the source fetched and checked against its pin, compiled by the TARGET interpreter
   without build isolation (so against the target's own torch, never a fetched one), for this
   machine's SM only (TORCH_CUDA_ARCH_LIST and the backend's own switch), MAX_JOBS from memory;
   the wheel labelled with the torch and CUDA it was built against and kept in the wheelhouse
   with its build facts. Nothing here touches the target: installing is the installer's job.

Where the hours come from: flash-attn's and SageAttention's setup.py build every architecture
by default; where the failures come from: build isolation fetching another torch, and nvcc or
compiler versions nobody checked (issue 12).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from comfy_env_attn.candidates.sources import (
    Candidate,
    embedded_dir,
    limits_from_env,
)
from comfy_env_attn.candidates.wheelhouse import (
    BuildRecord,
    SourceFacts,
    candidate_of,
    entry_dir,
    write_record,
)
from comfy_env_attn.candidates.wheelname import (
    InvalidWheelName,
    Label,
    format_label,
    parse_wheel_name,
)
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core.errors import InstallError, UsageError
from comfy_env_attn.core.paths import cache_part, parse_toml
from comfy_env_attn.core.process import own_group, stop_tree
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.probe import Target
from comfy_env_attn.facts.system import System, cc_tuple
from comfy_env_attn.install.edges import clean_partials, download, sha256_file

SOURCES_ENV = "COMFY_ENV_ATTN_BUILD_SOURCES"
SOURCES_FILE = "build_sources.toml"
# Only the tests set this: the free bytes the disk check sees.
TEST_FREE_DISK_ENV = "COMFY_ENV_ATTN_TEST_FREE_DISK"
GB = 1 << 30


class BuildError(InstallError):
    """A build that cannot run or failed; the target is unchanged."""


# -- recipes: where a backend's source comes from and what its build needs -----------------

@dataclass(frozen=True)
class Recipe:
    """How to build one backend from source: pinned source, version and build settings."""
    backend: str
    dist: str
    version: str
    url: str
    sha256: str | None = None
    git_commit: str | None = None
    git_tree: str | None = None
    subdirectory: str | None = None
    needs_checkout: str | None = None  # no archive builds: the command that makes a checkout
    requires_torch: str | None = None
    toolchain: str = "cuda"  # "cuda" or "c"
    build_modules: tuple[str, ...] = ("setuptools",)
    min_nvcc: str | None = None
    min_nvcc_sm: Mapping[str, str] = field(default_factory=dict)
    sm: tuple[str, ...] = ()
    built_sm: Mapping[str, str] = field(default_factory=dict)
    arch_env: str | None = None
    arch_values: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    ram_per_job_gb: float = 4.0
    disk_gb: float = 2.0
    measured: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.toolchain == "cuda"

    @property
    def title(self) -> str:
        return f"{self.backend} ({self.dist} {self.version})"


def _recipe(d: Mapping[str, Any], where: str) -> Recipe:
    def strs(key: str) -> dict[str, str]:
        value = d.get(key, {})
        if not isinstance(value, dict):
            raise UsageError(f"{where}: {key} must be a table")
        return {str(k): str(v) for k, v in value.items()}

    try:
        backend = bk.canonical(str(d["backend"]))
        arch = d.get("arch-env") or {}
        toolchain = str(d.get("toolchain", "cuda"))
        if toolchain not in ("cuda", "c"):
            raise UsageError(f"{where}: toolchain {toolchain!r} is neither 'cuda' nor 'c'")
        return Recipe(
            backend=backend, dist=bk.normalize_dist(str(d["dist"])), version=str(d["version"]),
            url=str(d["url"]), sha256=(d.get("hashes") or {}).get("sha256"),
            git_commit=d.get("git-commit"), git_tree=d.get("git-tree"),
            subdirectory=d.get("subdirectory"), needs_checkout=d.get("needs-checkout"),
            requires_torch=d.get("requires-torch"), toolchain=toolchain,
            build_modules=tuple(str(m) for m in d.get("build-modules", ["setuptools"])),
            min_nvcc=d.get("min-nvcc"), min_nvcc_sm=strs("min-nvcc-sm"),
            sm=tuple(str(s) for s in d.get("sm", [])), built_sm=strs("built-sm"),
            arch_env=arch.get("name"), arch_values={str(k): str(v) for k, v in
                                                    (arch.get("values") or {}).items()},
            env=strs("env"), ram_per_job_gb=float(d.get("ram-per-job-gb", 4.0)),
            disk_gb=float(d.get("disk-gb", 2.0)), measured=dict(d.get("measured") or {}))
    except KeyError as e:
        raise UsageError(f"{where}: a source has no {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{where}: malformed source: {e}") from None


def sources_path() -> Path:
    env = os.environ.get(SOURCES_ENV, "").strip()
    return Path(env) if env else embedded_dir() / SOURCES_FILE


def load_recipes(path: Path | None = None) -> dict[str, Recipe]:
    """backend -> its source recipe, from the embedded build_sources.toml (or $SOURCES_ENV)."""
    p = path or sources_path()
    try:
        doc = parse_toml(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read the build sources {p}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{p} is not UTF-8 text (byte {e.start}); save it as UTF-8") \
            from None
    except RecursionError:
        raise UsageError(f"{p}: nests tables or arrays deeper than TOML can be read here") \
            from None
    except ValueError as e:  # the TOML error
        raise UsageError(f"{p}: malformed TOML: {e}") from None
    if doc.get("schema") != 1:
        raise UsageError(f"{p}: schema {doc.get('schema')!r}, expected 1")
    out: dict[str, Recipe] = {}
    for i, entry in enumerate(doc.get("sources", [])):
        r = _recipe(entry, f"{p} sources[{i}]")
        out[r.backend] = r
    return out


# -- facts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Nvcc:
    """The CUDA compiler found (or not), its release and the host compilers it accepts."""
    path: str | None
    looked: str  # where it was looked for / found, for the message
    release: str | None = None  # "12.8"
    cuda_home: str | None = None
    host_max: Mapping[str, int] = field(default_factory=dict)  # {"gcc": 15, "clang": 20}
    host_max_from: str = ""  # where host_max comes from
    headers: bool = True  # cuda_home has include/cuda_runtime.h


@dataclass(frozen=True)
class Compiler:
    """The host C++ compiler found (or not)."""
    path: str | None
    kind: str | None = None  # gcc | clang | msvc
    version: str | None = None  # "12.2.0"
    looked: str = ""

    def describe(self) -> str:
        return f"{self.kind or 'compiler'} {self.version or '?'} ({self.path})"


@dataclass(frozen=True)
class BuildFacts:
    """What a build needs, learned before anything is downloaded or compiled."""

    python: str  # the target interpreter
    modules: Mapping[str, str | None]  # what the build imports from it -> version, None absent
    compiler: Compiler
    nvcc: Nvcc | None = None  # None: not looked for (a C-only build)
    ninja: str | None = None
    free_disk: int = 0
    disk_path: str = ""
    ram_available: int | None = None
    cores: int = 1
    max_jobs_env: str | None = None  # MAX_JOBS already set by the user


_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def parse_nvcc_release(text: str) -> str | None:
    m = _RELEASE.search(text)
    return f"{m[1]}.{m[2]}" if m else None


def _run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
         timeout: float = 20) -> str | None:
    """stdout+stderr of a small fact-finding command, None when it cannot run."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else dict(env))
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout or "") + (r.stderr or "")


# nvcc's host_config.h, where it cannot be read: the newest gcc each CUDA release accepts
GCC_MAX = (((13, 0), 15), ((12, 8), 14), ((12, 4), 13), ((12, 0), 12), ((11, 4), 11),
           ((11, 1), 10), ((11, 0), 9))
CLANG_MAX = (((13, 0), 20), ((12, 8), 19), ((12, 4), 17), ((12, 0), 15))


def host_limits(header: str) -> dict[str, int]:
    """The newest gcc and clang majors a CUDA toolkit's crt/host_config.h accepts."""
    out: dict[str, int] = {}
    m = re.search(r"#if __GNUC__ > (\d+)", header)
    if m:
        out["gcc"] = int(m[1])
    m = re.search(r"defined\(__clang__\)[^\n]*\n+#if \(__clang_major__ >= (\d+)\)", header)
    if m:
        out["clang"] = int(m[1]) - 1
    return out


def _table_limits(release: str) -> dict[str, int]:
    v = _minor(release)
    out: dict[str, int] = {}
    for name, table in (("gcc", GCC_MAX), ("clang", CLANG_MAX)):
        for since, most in table:
            if v >= since:
                out[name] = most
                break
    return out


def _minor(text: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", text)
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if parts else (0, 0)


def find_nvcc(environ: Mapping[str, str]) -> Nvcc:
    """nvcc as torch's cpp_extension finds it: $CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda."""
    exe = "nvcc.exe" if os.name == "nt" else "nvcc"
    path: str | None = None
    looked = ""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(var)
        if home:
            looked = f"{var} is {home}"
            cand = Path(home) / "bin" / exe
            path = str(cand) if cand.is_file() else None
            break
    else:
        found = shutil.which("nvcc", path=environ.get("PATH", ""))
        if found:
            path, looked = found, "on PATH"
        elif os.name != "nt" and Path("/usr/local/cuda/bin/nvcc").is_file():
            path, looked = "/usr/local/cuda/bin/nvcc", "/usr/local/cuda"
        else:
            looked = "CUDA_HOME and CUDA_PATH unset, none on PATH" + \
                ("" if os.name == "nt" else ", no /usr/local/cuda")
    if path is None:
        return Nvcc(None, looked)
    release = parse_nvcc_release(_run([path, "--version"], env=environ) or "")
    home = str(Path(path).resolve().parent.parent)
    if "CUDA_HOME" in environ or "CUDA_PATH" in environ:
        home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH") or home
    elif not _has_headers(home) and os.name != "nt":
        # an nvcc on PATH that is a wrapper script (/usr/local/bin/nvcc): its toolkit
        for toolkit in ("/usr/local/cuda", f"/usr/local/cuda-{release}"):
            if _has_headers(toolkit) and parse_nvcc_release(
                    _run([f"{toolkit}/bin/nvcc", "--version"], env=environ) or "") == release:
                home = toolkit
                break
    header = Path(home) / "include" / "crt" / "host_config.h"
    try:
        limits, source = host_limits(header.read_text(encoding="utf-8", errors="replace")), \
            "its crt/host_config.h"
    except OSError:
        limits, source = {}, ""
    if not limits and release:
        limits, source = _table_limits(release), "CUDA's release notes"
    return Nvcc(path, looked, release, home, limits, source, _has_headers(home))


def _has_headers(home: str) -> bool:
    return Path(home, "include", "cuda_runtime.h").is_file()


def find_compiler(environ: Mapping[str, str], *, cuda: bool) -> Compiler:
    """The compiler the build will run: for nvcc's host code $CC (torch passes it as -ccbin),
    $NVCC_CCBIN, else g++/gcc on PATH; for a C extension $CC, else cc/gcc/clang."""
    path_env = environ.get("PATH", "")
    if os.name == "nt":
        found = shutil.which("cl", path=path_env)
        return Compiler(found, "msvc" if found else None, None, "cl.exe on PATH")
    names = ["CC", "NVCC_CCBIN"] if cuda else ["CC"]
    for var in names:
        value = environ.get(var)
        if value:
            found = shutil.which(value.split()[0], path=path_env) or \
                (value if Path(value).is_file() else None)
            looked = f"${var} is {value}"
            break
    else:
        progs = ("g++", "gcc", "clang++", "c++") if cuda else ("cc", "gcc", "clang")
        found = next((f for f in (shutil.which(p, path=path_env) for p in progs) if f), None)
        looked = f"{', '.join(progs)} on PATH"
    if not found:
        return Compiler(None, None, None, looked)
    text = _run([found, "--version"], env=environ) or ""
    kind = "clang" if "clang" in text.lower() else "gcc" if text else None
    version = None
    if kind == "clang":
        m = re.search(r"clang version (\d+(?:\.\d+)*)", text)
        version = m[1] if m else None
    elif kind == "gcc":
        version = (_run([found, "-dumpfullversion", "-dumpversion"], env=environ) or "").strip() \
            or None
        if version and not re.fullmatch(r"\d+(\.\d+)*", version):
            version = None
    return Compiler(found, kind, version, looked)


_MODULES_SCRIPT = """
import importlib.util, json, sys
try:
    from importlib.metadata import version
except ImportError:
    version = None
out = {}
for m in sys.argv[1:]:
    try:
        spec = importlib.util.find_spec(m)
    except Exception:
        spec = None
    if spec is None:
        out[m] = None
        continue
    try:
        out[m] = version(m) if version else "?"
    except Exception:
        out[m] = "?"
print(json.dumps(out))
"""


def target_modules(python: str, names: Iterable[str]) -> dict[str, str | None]:
    """Which of `names` the target interpreter can import (found, not imported), with versions."""
    wanted = list(dict.fromkeys(names))
    text = _run([python, "-c", _MODULES_SCRIPT, *wanted], timeout=60)
    try:
        data = json.loads((text or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return dict.fromkeys(wanted)
    return {n: data.get(n) for n in wanted}


def free_disk(path: Path, environ: Mapping[str, str]) -> int:
    override = environ.get(TEST_FREE_DISK_ENV)
    if override:
        return int(override)
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_env(target: Target, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the build runs in: the target's scripts folder first on PATH (a
    pip-installed ninja lives there)."""
    env = dict(os.environ if environ is None else environ)
    scripts = target.facts.get("scripts") or str(Path(target.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    return env


def gather_facts(target: Target, recipe: Recipe, work: Path,
                 environ: Mapping[str, str] | None = None) -> BuildFacts:
    env = build_env(target, environ)
    nvcc = find_nvcc(env) if recipe.cuda else None
    return BuildFacts(
        python=target.executable,
        modules=target_modules(target.executable, [
            *recipe.build_modules, *(["wheel"] if "setuptools" in recipe.build_modules else [])]),
        compiler=find_compiler(env, cuda=recipe.cuda), nvcc=nvcc,
        ninja=shutil.which("ninja", path=env.get("PATH", "")) if recipe.cuda else None,
        free_disk=free_disk(work, env), disk_path=str(work), ram_available=available_ram(),
        cores=usable_cores(), max_jobs_env=env.get("MAX_JOBS"))


# -- checks: pure ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """A build prerequisite that is missing, and how to fix it."""
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}; fix: {self.fix}"


def build_archs(recipe: Recipe, system: System) -> tuple[tuple[str, ...], list[Problem]]:
    """The SM archs to build for (this machine's GPUs that the source has kernels for)."""
    if not recipe.cuda:
        return (), []
    if not system.gpus:
        why = system.absent.get("gpus")
        return (), [Problem(f"no NVIDIA GPU visible{f' ({why})' if why else ''}: nothing to "
                            f"compile {recipe.dist} for",
                            "build on the machine that runs it, or pass --system with a "
                            "profile naming its GPU (gpus = [\"9.0\"])")]
    archs: list[str] = []
    problems: list[Problem] = []
    for g in dict.fromkeys(system.gpus):
        norm = "{}.{}".format(*cc_tuple(g))
        if norm in recipe.sm:
            archs.append(norm)
        else:
            problems.append(Problem(f"{recipe.dist} {recipe.version} has no kernels for sm "
                                    f"{norm} (its source builds for {', '.join(recipe.sm)})",
                                    f"use another backend on this GPU; `{tool_command()} plan "
                                    f"--backends {recipe.backend}` shows its wheels"))
    if archs:
        return tuple(archs), []
    return (), problems


def max_jobs(recipe: Recipe, facts: BuildFacts) -> int:
    """Parallel compile jobs: one per core, as many as free memory holds (flash-attn's own
    build notes: each job can take ~9 GB)."""
    if facts.max_jobs_env and facts.max_jobs_env.isdigit() and int(facts.max_jobs_env) > 0:
        return int(facts.max_jobs_env)
    by_ram = facts.cores if facts.ram_available is None else \
        int(facts.ram_available / (recipe.ram_per_job_gb * GB))
    return max(1, min(facts.cores, by_ram))


def check(recipe: Recipe, system: System, facts: BuildFacts) -> list[Problem]:
    """Every reason this build would fail, each with its fix (empty: go)."""
    out: list[Problem] = []
    exe = facts.python
    if recipe.needs_checkout:
        out.append(Problem(f"{recipe.dist} {recipe.version} cannot be built from an archive "
                           "(its source needs git submodules)",
                           f"make a checkout ({recipe.needs_checkout}) and pass "
                           f"--source <checkout>"))
    if system.torch is None:
        out.append(Problem(f"torch is not installed in {exe}: the build compiles against "
                           "the target's torch", "install ComfyUI's requirements there first"))
    elif recipe.requires_torch:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            if not SpecifierSet(recipe.requires_torch).contains(system.torch_public or "0",
                                                                prereleases=True):
                out.append(Problem(f"{recipe.dist} {recipe.version} needs torch"
                                   f"{recipe.requires_torch}; the target has torch "
                                   f"{system.torch}", "build another version with --source, "
                                   "or use the backend's wheels for this torch"))
        except InvalidSpecifier:
            pass
    for name, version in facts.modules.items():
        if version is None and name not in ("torch", "wheel"):
            out.append(Problem(f"{name} is not installed in {exe}: the build runs there "
                               "without isolation (so that it compiles against that torch)",
                               f"uv pip install --python {exe} {name}"))
    setuptools = facts.modules.get("setuptools")
    if setuptools and setuptools != "?" and _minor(setuptools) < (70, 1) and \
            "wheel" in facts.modules and facts.modules["wheel"] is None:
        out.append(Problem(f"setuptools {setuptools} in {exe} builds wheels only with the "
                           "'wheel' package, which is not installed there (setuptools 70.1 "
                           "and newer need none)",
                           f"uv pip install --python {exe} wheel"))
    if recipe.cuda:
        out += _cuda_problems(recipe, system, facts)
    c = facts.compiler
    if c.path is None:
        need = "a C++ compiler for nvcc's host code" if recipe.cuda else "a C compiler"
        out.append(Problem(f"no compiler found ({c.looked}): the build needs {need}",
                           "install one: apt install build-essential (Debian/Ubuntu), "
                           "dnf install gcc-c++ (Fedora), Visual Studio Build Tools (Windows)"))
    disk = recipe.disk_gb * GB
    if facts.free_disk < disk:
        out.append(Problem(f"{facts.disk_path} has {facts.free_disk / GB:.1f} GB free; "
                           f"building {recipe.dist} needs about {recipe.disk_gb:g} GB (source, "
                           "objects, wheel)", "free disk space there, or point "
                           "COMFY_ENV_ATTN_CACHE_DIR at a larger disk"))
    if facts.ram_available is not None and facts.ram_available < recipe.ram_per_job_gb * GB \
            and not facts.max_jobs_env:
        out.append(Problem(f"{facts.ram_available / GB:.1f} GB of memory is free; one "
                           f"{recipe.dist} compile job takes up to {recipe.ram_per_job_gb:g} GB",
                           "close other programs, or set MAX_JOBS=1 to try with one job "
                           "anyway"))
    return out


def _cuda_problems(recipe: Recipe, system: System, facts: BuildFacts) -> list[Problem]:
    out: list[Problem] = []
    archs, arch_problems = build_archs(recipe, system)
    out += arch_problems
    tcuda = system.torch_cuda
    if system.torch is not None and tcuda is None:
        out.append(Problem(f"torch {system.torch} is a CPU build: a CUDA extension cannot be "
                           "built against it", "install a CUDA build of torch "
                           "(https://pytorch.org/get-started/)"))
    nvcc = facts.nvcc
    if nvcc is None or nvcc.path is None:
        looked = nvcc.looked if nvcc else "not looked for"
        want = f"{tcuda.split('.')[0]}.x" if tcuda else "12.x"
        out.append(Problem(f"nvcc not found ({looked})", f"install the CUDA toolkit {want} "
                           f"(matching torch's CUDA {tcuda or '?'}) and set CUDA_HOME to it"))
    elif nvcc.release is None:
        out.append(Problem(f"{nvcc.path} --version does not say which CUDA release it is",
                           "set CUDA_HOME to a working CUDA toolkit"))
    else:
        have = _minor(nvcc.release)
        if tcuda is not None and have[0] != _minor(tcuda)[0]:
            out.append(Problem(f"nvcc {nvcc.path} is CUDA {nvcc.release}; torch {system.torch} "
                               f"uses CUDA {tcuda}: the extension would not load",
                               f"install the CUDA toolkit {tcuda} (any {_minor(tcuda)[0]}.x "
                               "works) and set CUDA_HOME to it"))
        needs = [(recipe.min_nvcc, "")] if recipe.min_nvcc else []
        needs += [(recipe.min_nvcc_sm[a], f" for sm {a}") for a in archs
                  if a in recipe.min_nvcc_sm]
        for need, why in needs:
            if have < _minor(need):
                out.append(Problem(f"{recipe.dist} {recipe.version} needs CUDA >= {need}"
                                   f"{why}; nvcc {nvcc.path} is CUDA {nvcc.release}",
                                   f"install the CUDA toolkit {need} or newer (same major as "
                                   "torch's) and set CUDA_HOME to it"))
        c = facts.compiler
        limit = nvcc.host_max.get(c.kind or "")
        if c.path and c.version and limit is not None and _minor(c.version)[0] > limit:
            out.append(Problem(f"nvcc (CUDA {nvcc.release}) accepts {c.kind} up to {limit} "
                               f"({nvcc.host_max_from}); the host compiler is "
                               f"{c.describe()}", f"install {c.kind} {limit} or older and "
                               f"set CC to it (torch passes it to nvcc as -ccbin)"))
    if nvcc is not None and nvcc.path is not None and not nvcc.headers:
        out.append(Problem(f"nvcc {nvcc.path} belongs to no CUDA toolkit this build can use: "
                           f"{nvcc.cuda_home} has no include/cuda_runtime.h",
                           "set CUDA_HOME to the CUDA toolkit's folder (the one holding bin/nvcc "
                           "and include/)"))
    if facts.ninja is None:
        out.append(Problem("ninja not found (torch compiles CUDA extensions one file at a "
                           "time without it)", f"uv pip install --python {facts.python} ninja, "
                           "or apt install ninja-build"))
    return out


def estimate_minutes(recipe: Recipe, archs: int, cores: int) -> float | None:
    """From the recipe's one measured build: core-minutes per SM, spread over this machine's
    cores. None when the source has no measured build."""
    m = recipe.measured
    if not m.get("minutes") or not m.get("cores"):
        return None
    return float(m["minutes"]) * float(m["cores"]) * max(1, archs) / max(1, cores)


def describe_minutes(minutes: float) -> str:
    if minutes < 1.5:
        return "about a minute"
    if minutes < 90:
        return f"about {round(minutes)} minutes"
    return f"about {minutes / 60:.1f} hours"


def wants_build(recipe: Recipe, selected: str | None) -> bool:
    """Whether building the pinned source beats the plan's choice: nothing fits, or only an
    older major line (SageAttention 1.x, Triton, where the source is 2.x)."""
    return selected is None or _minor(selected)[0] < _minor(recipe.version)[0]


def build_hint(backend: str, system: System, cores: int, *, selected: str | None = None,
               recipes: Mapping[str, Recipe] | None = None) -> str | None:
    """When building would help: no wheel fits (`selected` None), or only one of an older
    major version than the pinned source (SageAttention 1.x, Triton, where 2.x is built),
    the command that builds it for this machine and how long that should take. None when no
    source is pinned for it or its build could not run here."""
    try:
        recipe = (recipes if recipes is not None else load_recipes()).get(backend)
    except UsageError:
        return None
    if recipe is None or recipe.needs_checkout or not wants_build(recipe, selected):
        return None
    major = _minor(recipe.version)[0]
    archs, problems = build_archs(recipe, system)
    if problems or system.torch is None or (recipe.cuda and system.torch_cuda is None):
        return None
    mins = estimate_minutes(recipe, len(archs), cores)
    sm = f" for sm {', '.join(archs)}" if archs else ""
    when = f" in {describe_minutes(mins)} on {cores} cores" if mins is not None else ""
    torch = "{}.{}".format(*system.torch_minor) if system.torch_minor else system.torch
    have = f" (the plan selects {selected})" if selected else ""
    py = "cp{}{}".format(*system.python_tuple)
    return (f"no {recipe.dist} {major}.x wheel for torch {torch} + {py}{have}; "
            f"`{tool_command()} install --build --backends {backend}` builds {recipe.dist} "
            f"{recipe.version}{sm}{when}")


# -- the source -------------------------------------------------------------------------------

def git_tree_of_archive(path: Path, *, gitlinks: Mapping[str, str] | None = None) -> str:
    """The git tree id of an archive's files (one top folder stripped): equal to the commit's
    tree when the archive holds exactly that commit, whatever compressed it."""
    files: dict[str, tuple[str, bytes]] = {}  # path -> (mode, blob id)
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.issym()]
        prefix = _common_top([m.name for m in members])
        for m in members:
            rel = m.name[len(prefix):]
            if not rel:
                continue
            if m.issym():
                mode, data = "120000", m.linkname.encode()
            else:
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                mode = "100755" if m.mode & 0o100 else "100644"
            files[rel] = (mode, _git_object(b"blob", data))
    for rel, commit in (gitlinks or {}).items():
        files[rel.strip("/")] = ("160000", bytes.fromhex(commit))
    return _git_tree(files).hex()


def _common_top(names: list[str]) -> str:
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return tops.pop() + "/"
    return ""


def _git_object(kind: bytes, data: bytes) -> bytes:
    return hashlib.sha1(kind + b" %d\0" % len(data) + data).digest()


def _git_tree(files: Mapping[str, tuple[str, bytes]]) -> bytes:
    here: dict[str, tuple[str, bytes]] = {}
    below: dict[str, dict[str, tuple[str, bytes]]] = {}
    for rel, entry in files.items():
        head, sep, rest = rel.partition("/")
        if sep:
            below.setdefault(head, {})[rest] = entry
        else:
            here[head] = entry
    for name, sub in below.items():
        here[name] = ("40000", _git_tree(sub))
    # git sorts tree entries by name, a folder's name as if it ended in "/"
    order = sorted(here, key=lambda n: n + "/" if here[n][0] == "40000" else n)
    body = b"".join(here[n][0].encode() + b" " + n.encode() + b"\0" + here[n][1] for n in order)
    return _git_object(b"tree", body)


def tree_sha256(folder: Path) -> str:
    """A digest of a source folder: every file's path and sha256 (.git and build output
    left out), so that a build from a folder records what it was built from."""
    h = hashlib.sha256()
    for p in sorted(_source_files(folder)):
        rel = p.relative_to(folder).as_posix()
        h.update(rel.encode() + b"\0" + bytes.fromhex(sha256_file(p)) + b"\n")
    return h.hexdigest()


_SKIP = {".git", "build", "dist", "__pycache__"}


def _source_files(folder: Path) -> Iterable[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in _SKIP and not d.endswith(".egg-info")]
        for n in names:
            p = Path(root, n)
            if p.is_file() and not p.is_symlink():
                yield p


@dataclass(frozen=True)
class Source:
    """A source on local disk, checked."""

    path: Path  # an archive or a folder
    facts: SourceFacts


def _download(url: str, dest: Path, log: Callable[[str], None]) -> str:
    """The archive at `dest`; its sha256."""
    import httpx

    try:
        _, sha = download(url, url, part_dir=dest.parent, to=lambda _: dest, log=log,
                          limits=limits_from_env(), error=BuildError)
    except httpx.HTTPError as e:
        raise BuildError(f"cannot download {url}: {type(e).__name__}: {e}; on an offline "
                         "machine, carry the source and pass --source FILE") from None
    return sha


def obtain_source(recipe: Recipe, override: str | None, log: Callable[[str], None]) -> Source:
    """The source on disk, checked: against the recipe's sha256 or git tree when it is the
    pinned source; a source given with --source is the user's own, its hash recorded."""
    spec = override or recipe.url
    base, _, frag = spec.partition("#")
    want = frag[len("sha256="):].lower() if frag.startswith("sha256=") else None
    parts = urlsplit(base)
    if parts.scheme in ("http", "https"):
        pinned_url = override is None or base == recipe.url
        expect = want or (recipe.sha256 if pinned_url else None)
        name = unquote(parts.path.rsplit("/", 1)[-1]) or "source.tar.gz"
        clean_partials(cache_part("sources"))  # what killed downloads left
        folder = cache_part("sources") / (expect or hashlib.sha256(base.encode()).hexdigest())
        path = folder / name
        sha = sha256_file(path) if expect and path.is_file() else None
        if sha is None or sha != expect:
            sha = _download(base, path, log)
    else:
        path = Path(unquote(parts.path) if parts.scheme == "file" else base).expanduser()
        if not path.exists():
            raise BuildError(f"--source {spec}: no such file or folder")
        expect = want
        sha = None
    if path.is_dir():
        digest = tree_sha256(path)
        log(f"{recipe.backend}: building from the folder {path}; the sha256 of its files, "
            f"{digest}, is recorded")
        return Source(path, SourceFacts(str(path.resolve()), digest, "directory"))
    sha = sha or sha256_file(path)
    if expect and sha != expect.lower():
        if parts.scheme in ("http", "https"):
            path.unlink(missing_ok=True)
        raise BuildError(f"hash mismatch for the {recipe.dist} source {base}: expected sha256 "
                         f"{expect}, the file has {sha}; refusing to build it")
    pinned = bool(recipe.sha256 and sha == recipe.sha256)
    facts = SourceFacts(base if parts.scheme else str(path.resolve()), sha, "archive",
                        git_commit=recipe.git_commit, pinned=pinned)
    if not pinned and recipe.git_tree and _is_tar(path):
        tree = git_tree_of_archive(path)
        if tree == recipe.git_tree:
            facts = replace(facts, git_tree=tree, pinned=True)
        elif override is None:
            raise BuildError(f"the {recipe.dist} source {base} is not commit "
                             f"{recipe.git_commit}: its files have git tree {tree}, the pin "
                             f"says {recipe.git_tree}; refusing to build it")
    if override is None and not facts.pinned:
        raise BuildError(f"the {recipe.dist} source {base} has no pinned hash to check it "
                         "against; refusing to build it (pass --source FILE#sha256=HEX)")
    if not facts.pinned:
        facts = replace(facts, git_commit=None)
        log(f"{recipe.backend}: building from {base}, not the pinned source; its sha256 "
            f"{sha} is recorded")
    return Source(path, facts)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def unpack(source: Source, dest: Path, subdirectory: str | None) -> Path:
    """The source tree to build in: an archive extracted (no path may leave `dest`), a folder
    copied (the build writes into its tree; .git left out, so no setup.py fetches
    submodules)."""
    if source.path.is_dir():
        root = dest / source.path.name
        shutil.copytree(source.path, root, symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info"))
    elif _is_tar(source.path):
        with tarfile.open(source.path) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Pythons before the extraction filters
                for m in tar.getmembers():
                    _inside(dest, m.name)
                tar.extractall(dest)
        root = _single_root(dest)
    elif zipfile.is_zipfile(source.path):
        with zipfile.ZipFile(source.path) as z:
            for n in z.namelist():
                _inside(dest, n)
            z.extractall(dest)
        root = _single_root(dest)
    else:
        raise BuildError(f"{source.path} is neither a folder, a tar archive nor a zip")
    if subdirectory:
        root = root / subdirectory
        if not root.is_dir():
            raise BuildError(f"the source has no {subdirectory}/ folder to build")
    if not (root / "setup.py").is_file() and not (root / "pyproject.toml").is_file():
        raise BuildError(f"{source.facts.url}: no setup.py or pyproject.toml at its top: "
                         "not a Python source tree")
    return root


def _inside(dest: Path, name: str) -> None:
    target = (dest / name).resolve()
    if not str(target).startswith(str(dest.resolve()) + os.sep) and target != dest.resolve():
        raise BuildError(f"the source archive has a path outside its folder: {name!r}")


def _single_root(dest: Path) -> Path:
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


# -- the build --------------------------------------------------------------------------------

# Runs in the TARGET interpreter, in the source folder: the PEP 517 hook without isolation.
_HOOK = """
import importlib, os, sys
backend_name, out = sys.argv[1], sys.argv[2]
# as pypa/build's hook runner: the source folder is not on sys.path unless the backend puts it
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
for p in reversed(sys.argv[3:]):
    sys.path.insert(0, os.path.abspath(p))
mod, _, attr = backend_name.partition(":")
backend = importlib.import_module(mod)
for part in attr.split(".") if attr else []:
    backend = getattr(backend, part)
name = backend.build_wheel(out)
print("comfy-env-attn built: " + name, flush=True)
"""


def _backend_of(root: Path) -> tuple[str, list[str]]:
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            doc = parse_toml(pyproject.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise BuildError(f"{pyproject}: {e}") from None
        system = doc.get("build-system") or {}
        if system.get("build-backend"):
            return str(system["build-backend"]), [str(p) for p in system.get("backend-path", [])]
    return "setuptools.build_meta:__legacy__", []


@dataclass(frozen=True)
class Plan:
    """One build, decided: what, for which archs, with which switches."""

    recipe: Recipe
    archs: tuple[str, ...]
    env: dict[str, str]  # what the build adds to the environment
    max_jobs: int
    facts: BuildFacts

    def describe(self) -> str:
        sm = f" for sm {', '.join(self.archs)}" if self.archs else ""
        return (f"{self.recipe.dist} {self.recipe.version}{sm}, {self.max_jobs} parallel "
                f"jobs, {self.facts.compiler.describe()}"
                + (f", nvcc {self.facts.nvcc.release}" if self.facts.nvcc else ""))


def plan_build(target: Target, system: System, recipe: Recipe,
               environ: Mapping[str, str] | None = None) -> Plan:
    """Facts and checks: BuildError listing every problem (with its fix) before anything is
    downloaded or compiled."""
    facts = gather_facts(target, recipe, cache_part("build"), environ)
    problems = check(recipe, system, facts)
    if problems:
        raise BuildError(f"cannot build {recipe.title} here (nothing was downloaded or "
                         "compiled):\n  - " + "\n  - ".join(str(p) for p in problems))
    archs, _ = build_archs(recipe, system)
    jobs = max_jobs(recipe, facts)
    env: dict[str, str] = {"MAX_JOBS": str(jobs)}
    if archs:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        if recipe.arch_env:
            env[recipe.arch_env] = ";".join(dict.fromkeys(recipe.arch_values.get(a, a)
                                                          for a in archs))
    if facts.nvcc and facts.nvcc.cuda_home:
        env["CUDA_HOME"] = facts.nvcc.cuda_home  # the toolkit checked above, nothing else
    env.update(recipe.env)
    return Plan(recipe, archs, env, jobs, facts)


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


_NINJA_STEP = re.compile(r"\[(\d+)/(\d+)\]")


def progress_line(lines: Sequence[str]) -> str:
    """The newest ninja step ("[12/40] ...") of the log, else its last line."""
    for ln in reversed(lines):
        if _NINJA_STEP.search(ln):
            return ln.strip()[:140]
    return lines[-1].strip()[:140] if lines else ""


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_build(plan: Plan, root: Path, out_dir: Path, log_path: Path,
              log: Callable[[str], None], *, every: float = 15.0,
              environ: Mapping[str, str] | None = None, target: Target) -> tuple[Path, float]:
    """Compile with the target interpreter; the wheel and the seconds it took. BuildError
    with the last lines of the log when it fails (the whole log is kept)."""
    backend, backend_path = _backend_of(root)
    env = build_env(target, environ)
    env.update(plan.env)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [plan.facts.python, "-c", _HOOK, backend, str(out_dir), *backend_path]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join(f"{k}={v}" for k, v in plan.env.items())
    log(f"building {plan.describe()}; log: {log_path}")
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write(f"# {shown}\n# {plan.facts.python} <PEP 517 build_wheel via {backend}> in "
                   f"{root}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **own_group())
        last = started
        # the compilers run in their own session: a SIGTERM to this process (a timeout, a
        # kill) must stop them too, as Ctrl-C does
        restore = _on_sigterm_interrupt()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                now = time.monotonic()
                if now - last >= every:
                    last = now
                    log(f"  {plan.recipe.backend}: {_elapsed(now - started)} "
                        f"{progress_line(_tail(log_path, 30))}")
        except BaseException:
            stop_tree(proc, grace=10)
            raise
        finally:
            restore()
    seconds = time.monotonic() - started
    lines = _tail(log_path, 400)
    if proc.returncode != 0:
        shown_lines = "\n    ".join(ln[:300] for ln in lines[-25:])
        raise BuildError(f"building {plan.recipe.title} failed after {_elapsed(seconds)} "
                         f"(exit {proc.returncode}); the last lines of {log_path}:\n    "
                         f"{shown_lines}")
    built = [ln.split("comfy-env-attn built: ", 1)[1].strip() for ln in lines
             if "comfy-env-attn built: " in ln]
    wheel = out_dir / built[-1] if built else None
    if wheel is None or not wheel.is_file():
        raise BuildError(f"the build of {plan.recipe.title} reported no wheel; see {log_path}")
    log(f"built {wheel.name} in {_elapsed(seconds)}")
    return wheel, seconds


def _on_sigterm_interrupt() -> Callable[[], None]:
    """SIGTERM raises KeyboardInterrupt until the returned function is called."""
    if os.name == "nt" or threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


# -- the wheel: labelled with what it was built against ---------------------------------------

def build_label(system: System, recipe: Recipe) -> str:
    """`cu128torch2.8`: the resolver's rules read torch and CUDA from it, like any index's."""
    cuda = None
    if recipe.cuda and system.torch_cuda:
        major, minor = _minor(system.torch_cuda)
        cuda = f"{major}{minor}"
    torch = "{}.{}".format(*system.torch_minor) if system.torch_minor else None
    return format_label(Label(cuda=cuda, torch=torch))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def relabel(wheel: Path, label: str, dest: Path) -> Path:
    """A copy of `wheel` whose version carries the local label `label` (its .dist-info and
    .data folders renamed, METADATA and RECORD rewritten)."""
    w = parse_wheel_name(wheel.name)
    old = w.raw_version
    new = f"{old.split('+', 1)[0]}+{label}" if label else old
    stem = wheel.name[:-len(".whl")].split("-")
    name = stem[0]
    new_name = "-".join([name, new, *stem[2:]]) + ".whl"
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        data = {i.filename: z.read(i) for i in infos}
    tops = {n.split("/", 1)[0] for n in data}
    info_dirs = [t for t in tops if t.endswith(".dist-info")]
    if len(info_dirs) != 1:
        raise BuildError(f"{wheel.name} has {len(info_dirs)} .dist-info folders, not one")
    old_info = info_dirs[0]
    old_prefix = old_info[:-len(".dist-info")]
    new_prefix = f"{old_prefix.rsplit('-', 1)[0]}-{new}"
    renames = {f"{old_prefix}.dist-info/": f"{new_prefix}.dist-info/",
               f"{old_prefix}.data/": f"{new_prefix}.data/"}

    def moved(path: str) -> str:
        for a, b in renames.items():
            if path.startswith(a):
                return b + path[len(a):]
        return path

    record = f"{new_prefix}.dist-info/RECORD"
    out_entries: list[tuple[zipfile.ZipInfo, bytes]] = []
    rows: list[str] = []
    for info in infos:
        path = moved(info.filename)
        body = data[info.filename]
        if path == record:
            continue
        if path == f"{new_prefix}.dist-info/METADATA":
            text = body.decode("utf-8")
            text = re.sub(r"^Version: .*$", f"Version: {new}", text, count=1, flags=re.M)
            body = text.encode("utf-8")
        ni = zipfile.ZipInfo(path, date_time=info.date_time)
        ni.external_attr, ni.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
        out_entries.append((ni, body))
        if not path.endswith("/"):
            rows.append(f"{path},{_record_hash(body)},{len(body)}")
    rows.append(f"{record},,")
    ri = zipfile.ZipInfo(record, date_time=(2020, 1, 1, 0, 0, 0))
    ri.compress_type = zipfile.ZIP_DEFLATED
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / new_name
    tmp = dest / f".{new_name}.{os.getpid()}.tmp"
    with zipfile.ZipFile(tmp, "w") as z:
        for ni, body in out_entries:
            z.writestr(ni, body)
        z.writestr(ri, "\n".join(rows) + "\n")
    os.replace(tmp, out)
    return out


# -- all of it ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    """A wheel built on this machine: its candidate, its build record and the file."""
    candidate: Candidate
    record: BuildRecord
    wheel: Path


def build(target: Target, system: System, plan: Plan, wheelhouse: Path, *,
          source: str | None = None, log: Callable[[str], None],
          environ: Mapping[str, str] | None = None) -> Built:
    """Fetch and check the source, compile it as `plan` (from plan_build) says, label the
    wheel, and keep it in the wheelhouse with its build facts."""
    recipe = plan.recipe
    work_root = cache_part("build")
    src = obtain_source(recipe, source, log)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = cache_part("build logs") / f"{recipe.dist}-{recipe.version}-{stamp}.log"
    work_root.mkdir(parents=True, exist_ok=True)
    # named by this process (`cache clean` leaves a running build's folder alone)
    work = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.{recipe.backend}-", dir=work_root))
    try:
        root = unpack(src, work / "src", recipe.subdirectory)
        out_dir = work / "dist"
        out_dir.mkdir()
        raw, seconds = run_build(plan, root, out_dir, log_path, log, environ=environ,
                                 target=target)
        try:
            upstream = parse_wheel_name(raw.name)
        except InvalidWheelName as e:
            raise BuildError(f"the build produced {raw.name}: {e}") from None
        if upstream.project != recipe.dist:
            raise BuildError(f"the build produced {raw.name}, not a {recipe.dist} wheel")
        recorded_sm = tuple(recipe.built_sm.get(a, a) for a in plan.archs)
        staged = relabel(raw, build_label(system, recipe), work / "labelled")
        folder = entry_dir(wheelhouse, recipe.dist, staged.name, recorded_sm)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / staged.name
        shutil.move(staged, final)
        c = plan.facts.compiler
        record = BuildRecord(
            backend=recipe.backend, dist=recipe.dist, filename=final.name,
            sha256=sha256_file(final), version=final.name.split("-")[1],
            upstream_version=upstream.raw_version,
            torch=target.facts.get("torch") or system.torch or "",
            torch_cuda=system.torch_cuda if recipe.cuda else None,
            python=str(target.facts.get("python", system.python)), sm=recorded_sm,
            source=src.facts, arch_list=plan.env.get("TORCH_CUDA_ARCH_LIST"),
            cxx11abi=system.cxx11abi, nvcc=plan.facts.nvcc.release if plan.facts.nvcc else None,
            compiler=f"{c.kind} {c.version}" if c.kind else None, max_jobs=plan.max_jobs,
            seconds=round(seconds, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime()),
            log=str(log_path), env={k: v for k, v in plan.env.items()})
        write_record(folder, record)
        log(f"wheelhouse: {final}")
        return Built(candidate_of(record, final, wheelhouse), record, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
