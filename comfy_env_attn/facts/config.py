"""comfy-env's TOML (comfy-env.toml) as an input, every form real node repositories write
(FACTS.md section 8), read by one parser:

- flat: `[cuda] packages = ["sageattention>=2.2", "spconv", ...]` (PEP 508 strings), or
  `[cuda]` as a table of `name = "version"`, or a top-level `cuda = [...]` list; a top-level
  `python` (and an `[env]` table's python / cuda / pytorch) describe its environment;
- per environment: `[<env>]` with `python`, `cuda_version`, `pytorch_version` ("auto" or a
  version) and `[<env>.cuda]`, a table of `name = "version"` where "*" is any version and
  "2.8.3" means ==2.8.3; `[local.cuda]` is that table for the node's own Python.

The attention packages become the requested backends, with their version specifiers; every
other package, table and key belongs to comfy-env and is left to it (said once, by the
caller). Explicit environment versions describe the target the wheels are resolved for
(comfy-env builds that environment itself); "auto" means the real target.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from packaging.markers import InvalidMarker, Marker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from comfy_env_attn.core.backends import BY_DIST, normalize_dist
from comfy_env_attn.core.errors import ProfileError, UsageError
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.system import System, marker_env, read_toml

# Keys of an environment table that make it one (comfy-env's own test).
_ENV_KEYS = ("python", "cuda", "pytorch", "cuda_version", "pytorch_version")
# Top-level tables that are never environments: comfy-env's own and pixi's (comfy-env.toml
# is a superset of pixi.toml).
_NOT_ENVS = frozenset({
    "local", "env", "cuda", "packages", "sources", "variables", "worker", "tools", "system",
    "node_reqs", "apt", "dependencies", "pypi-dependencies", "host-dependencies",
    "build-dependencies", "target", "feature", "environments", "project", "workspace",
    "tasks", "activation", "system-requirements", "pypi-options"})
_AUTO = ("", "auto")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class Wanted:
    """One attention package an environment asks for."""

    backend: str
    specifier: str  # PEP 440 specifiers, "" for any version
    written: str  # as the file writes it: 'sageattention>=2.2', 'flash-attn = "2.8.3"'
    marker: str | None = None

    def applies(self, system: System) -> bool:
        """Whether its environment marker (if any) holds on that system."""
        if not self.marker:
            return True
        try:
            return Marker(self.marker).evaluate(marker_env(system))
        except (InvalidMarker, UndefinedEnvironmentName):
            return True


@dataclass(frozen=True)
class Environment:
    """One environment of the file and the attention packages it asks for."""

    name: str  # "cuda" for the flat form, "local", or the table name
    table: str  # where its packages are: "[cuda] packages", "[local.cuda]", "[myenv.cuda]"
    python: str | None = None  # None: "auto", the real target's
    cuda: str | None = None  # torch's CUDA; "none" for a CPU build
    torch: str | None = None
    wanted: tuple[Wanted, ...] = ()

    @property
    def backends(self) -> list[str]:
        return [w.backend for w in self.wanted]

    @property
    def explicit(self) -> dict[str, str]:
        """The versions it states (python, cuda, torch), "auto" ones left out."""
        return {k: v for k, v in (("python", self.python), ("cuda", self.cuda),
                                  ("torch", self.torch)) if v is not None}

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in (("Python", self.python), ("CUDA", self.cuda),
                                         ("torch", self.torch)) if v is not None]
        return f"{self.name} ({self.table}" + (f"; {', '.join(parts)}" if parts else "") + ")"

    def system_for(self, real: System) -> System:
        """The system its wheels are resolved for: the real one, with the versions the
        environment states in place of the real ones."""
        out = real
        if self.python is not None:
            out = replace(out, python=self.python, free_threaded=False)
        cuda = real.torch_cuda if self.cuda is None else \
            (None if self.cuda == "none" else self.cuda)
        if self.torch is not None:
            public = self.torch.split("+")[0]
            label = f"+cu{cuda.replace('.', '')}" if cuda else "+cpu"
            minor = tuple(int(x) for x in public.split(".")[:2])
            # torch's pip wheels use the C++11 ABI from 2.7 on (FACTS.md section 4)
            abi = (minor >= (2, 7)) if real.platform == "linux" else None
            out = replace(out, torch=public + label, cxx11abi=abi)
        if self.cuda is not None:
            out = replace(out, torch_cuda=cuda)
            if self.torch is None and out.torch is not None:
                label = f"+cu{cuda.replace('.', '')}" if cuda else "+cpu"
                out = replace(out, torch=out.torch.split("+")[0] + label)
        return out


@dataclass(frozen=True)
class ComfyEnvConfig:
    """A comfy-env.toml as this tool reads it: its environments' attention packages."""
    path: Path
    environments: tuple[Environment, ...]
    left_to_comfy_env: tuple[str, ...]  # tables, keys and packages that are comfy-env's

    def names(self) -> list[str]:
        return [e.name for e in self.environments]

    def pick(self, name: str | None) -> list[Environment]:
        """The environment named (UsageError listing the names otherwise), or all."""
        if name is None:
            return list(self.environments)
        for e in self.environments:
            if e.name == name:
                return [e]
        raise UsageError(f"{self.path} has no environment {name!r}; it has: "
                         f"{', '.join(self.names()) or 'none'}")

    def nothing_to_do(self, envs: list[Environment] | None = None) -> str:
        """One line: the file (or those environments) asks for no attention package."""
        scope = "" if envs is None or len(envs) == len(self.environments) else \
            f" for environment {', '.join(e.name for e in envs)}"
        others = [x for x in self.left_to_comfy_env if not x.startswith("[")]
        tail = f" ({', '.join(others)} left to comfy-env)" if others else ""
        return (f"{self.path}: no attention package{scope}{tail}; nothing to do (known: "
                f"{', '.join(BY_DIST)})")


def _version(value: Any, where: str, kind: str) -> str | None:
    """An environment's python / cuda / pytorch version: None for "auto". A TOML number is
    refused: 3.10 written without quotes reads as 3.1."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ProfileError(f"{where} must be a string: write it in quotes, as \"{value}\" "
                           f"if that is what you mean (a TOML number {value} cannot tell "
                           "3.1 from 3.10)")
    if not isinstance(value, str):
        raise ProfileError(f"{where} must be \"auto\" or a version string, got {value!r}")
    text = str(value).strip()
    if text.lower() in _AUTO:
        return None
    if kind == "cuda" and text.lower() in ("none", "null", "cpu"):
        return "none"
    pattern, example = {"python": (r"^3\.\d{1,2}(\.\d{1,3})?$", "3.11"),
                        "cuda": (r"^\d{1,2}\.\d{1,2}(\.\d{1,3})?$", "12.8"),
                        "torch": (r"^\d{1,3}\.\d{1,3}(\.\d{1,3})?(\+[A-Za-z0-9.]{1,40})?$",
                                  "2.8.0")}[kind]
    if not re.match(pattern, text):
        raise ProfileError(f"{where} must be \"auto\" or a version like {example!r}, "
                           f"got {text[:60]!r}")
    if kind == "cuda":
        text = ".".join(text.split(".")[:2])
    return text


def _spec_of_value(value: Any, where: str) -> str:
    """A `name = "version"` value as specifiers: "*" any, "2.8.3" ==2.8.3, ">=2" as is."""
    if not isinstance(value, str):
        raise ProfileError(f"{where} must be a version string (\"*\", \"2.8.3\", \">=2.2\"), "
                           f"got {value!r}")
    text = value.strip()
    if text in ("", "*"):
        return ""
    spec = f"=={text}" if re.match(r"^\d", text) else text
    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise ProfileError(f"{where} = {value!r} is not a version or a version "
                           "specifier") from None
    return spec


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.left: list[str] = []

    def leave(self, what: str) -> None:
        if what not in self.left:
            self.left.append(what)

    def _add(self, wanted: dict[str, Wanted], backend: str, spec: str, written: str,
             marker: str | None) -> None:
        have = wanted.get(backend)
        if have is None:
            wanted[backend] = Wanted(backend, spec, written, marker)
        elif have.marker != marker:  # which pin holds where could only be guessed
            raise ProfileError(f"{self.path}: {have.written!r} and {written!r} name one "
                               "package under different environment markers; write it once")
        else:  # named twice (flash_attn and flash-attn==2.8.3): both hold
            wanted[backend] = Wanted(backend, ",".join(s for s in (have.specifier, spec) if s),
                                     f"{have.written}, {written}", marker)

    def requirement_list(self, items: Any, where: str,
                         wanted: dict[str, Wanted] | None = None) -> list[Wanted]:
        """`packages = ["sageattention>=2.2", "spconv"]`; `wanted`: what other forms of the
        same environment asked for, which these join."""
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ProfileError(f"{self.path}: {where} must be a list of strings, got "
                               f"{items!r}")
        wanted = {} if wanted is None else wanted
        for text in items:
            m = _NAME.match(text)
            backend = BY_DIST.get(normalize_dist(m[1])) if m else None
            if backend is None:
                self.leave(text.strip())
                continue
            try:
                req = Requirement(text)
            except InvalidRequirement as e:
                raise ProfileError(f"{self.path}: {where}: {text!r} is not a PEP 508 "
                                   f"requirement ({e})") from None
            if req.url:
                raise ProfileError(f"{self.path}: {where}: {text!r} names a URL; "
                                   "comfy-env-attn chooses the wheel itself (give a version "
                                   "specifier instead)")
            self._add(wanted, backend, str(req.specifier), text.strip(),
                      str(req.marker) if req.marker else None)
        return list(wanted.values())

    def version_table(self, table: dict[str, Any], where: str, skip: tuple[str, ...] = (),
                      wanted: dict[str, Wanted] | None = None) -> list[Wanted]:
        """`[myenv.cuda]`: `flash-attn = "2.8.3"`, `sageattention = "*"`; `wanted` as in
        requirement_list."""
        wanted = {} if wanted is None else wanted
        for name, value in table.items():
            if name in skip:
                continue
            backend = BY_DIST.get(normalize_dist(name))
            if backend is None:
                self.leave(name)
                continue
            spec = _spec_of_value(value, f"{self.path}: {where} {name}")
            self._add(wanted, backend, spec, f'{name} = "{value}"', None)
        return list(wanted.values())

    def environment(self, name: str, table: dict[str, Any]) -> Environment:
        where = f"[{name}]"
        versions: dict[str, str | None] = {}
        for key, kind in (("python", "python"), ("cuda_version", "cuda"),
                          ("pytorch_version", "torch"), ("pytorch", "torch")):
            if key in table:
                versions.setdefault(kind, _version(table[key], f"{self.path}: {where} {key}",
                                                   kind))
        cuda = table.get("cuda")
        wanted: list[Wanted] = []
        if isinstance(cuda, dict):
            wanted = self.version_table(cuda, f"[{name}.cuda]")
        elif cuda is not None and "cuda" not in versions:  # `cuda = "12.8"`, older files
            versions["cuda"] = _version(cuda, f"{self.path}: {where} cuda", "cuda")
        for key in table:
            if key not in _ENV_KEYS:
                self.leave(f"[{name}.{key}]" if isinstance(table[key], dict)
                           else f"{name}.{key}")
        return Environment(name, f"[{name}.cuda]", python=versions.get("python"),
                           cuda=versions.get("cuda"), torch=versions.get("torch"),
                           wanted=tuple(wanted))

    def flat(self, doc: dict[str, Any]) -> Environment | None:
        """`[cuda] packages = [...]` (or its older forms), with a top-level python and an
        [env] table describing the environment."""
        cuda = doc.get("cuda")
        if cuda is None:
            return None
        if isinstance(cuda, list):
            table, wanted = "cuda = [...]", self.requirement_list(cuda, "cuda")
        elif isinstance(cuda, dict):  # both forms in one table: a backend in both gets both
            both: dict[str, Wanted] = {}
            if "packages" in cuda:
                self.requirement_list(cuda["packages"], "[cuda] packages", both)
            wanted = self.version_table(cuda, "[cuda]", skip=("packages",), wanted=both)
            table = "[cuda] packages" if "packages" in cuda else "[cuda]"
        else:
            raise ProfileError(f"{self.path}: cuda must be a table or a list of packages, "
                               f"got {cuda!r}")
        versions: dict[str, str | None] = {}
        if "python" in doc:
            versions["python"] = _version(doc["python"], f"{self.path}: python", "python")
        env = doc.get("env")
        if isinstance(env, dict):
            for key, kind in (("python", "python"), ("cuda", "cuda"), ("cuda_version", "cuda"),
                              ("pytorch", "torch"), ("pytorch_version", "torch")):
                if key in env and kind not in versions:
                    versions[kind] = _version(env[key], f"{self.path}: [env] {key}", kind)
        return Environment("cuda", table, python=versions.get("python"),
                           cuda=versions.get("cuda"), torch=versions.get("torch"),
                           wanted=tuple(wanted))


def read_config(path: str | Path) -> ComfyEnvConfig:
    """Every environment of a comfy-env.toml and the attention packages each asks for;
    ProfileError naming the file, table and key of anything malformed."""
    p = Path(path)
    doc = read_toml(p, what="comfy-env config")
    r = _Reader(p)
    envs: list[Environment] = []
    flat = r.flat(doc)
    if flat is not None:
        envs.append(flat)
    for key, value in doc.items():
        if key == "cuda":
            continue  # the flat form, read above
        if key in ("python", "env") and flat is not None:
            if isinstance(value, dict):  # [env]: what it says beyond the versions is comfy-env's
                for k in value:
                    if k not in _ENV_KEYS:
                        r.leave(f"env.{k}")
            continue
        if key == "local" and isinstance(value, dict):
            local = value.get("cuda")
            if local is not None and not isinstance(local, dict):
                raise ProfileError(f"{p}: [local.cuda] must be a table of name = \"version\"")
            envs.append(Environment("local", "[local.cuda]",
                                    wanted=tuple(r.version_table(local or {}, "[local.cuda]"))))
            for k in value:
                if k != "cuda":
                    r.leave(f"[local.{k}]" if isinstance(value[k], dict) else f"local.{k}")
        elif key not in _NOT_ENVS and isinstance(value, dict) and \
                any(k in value for k in _ENV_KEYS):
            envs.append(r.environment(key, value))
        else:
            r.leave(f"[{key}]" if isinstance(value, dict) else key)
    return ComfyEnvConfig(p, tuple(envs), tuple(r.left))
