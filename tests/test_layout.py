"""The layout's import rules: stages import only the stages before them, the runtime only
the standard library, torch and core, and nothing imports the command line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "comfy_env_attn"

# stage -> the stages it may import (besides itself and the standard library)
ALLOWED = {
    "core": set(),
    "facts": {"core"},
    "candidates": {"core"},
    "resolve": {"core", "facts", "candidates"},
    "verify": {"core"},
    "lockfile": {"core", "facts", "candidates", "verify", "install"},
    "install": {"core", "facts", "candidates", "resolve", "verify", "lockfile"},
    "doctor": {"core", "facts", "candidates", "resolve", "install", "lockfile", "verify"},
    "runtime": {"core"},
    "cli": {"core", "facts", "candidates", "resolve", "install", "verify", "lockfile",
            "doctor", "runtime"},
}
THIRD_PARTY = {"runtime": {"torch"}, "core": set()}
# verification's target-side script loads the runtime's adapters: the code it proves
EXTRA = {"verify/_target.py": {"runtime"}}


def _stage(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else ""


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "comfy_env_attn":
                out += [f"comfy_env_attn.{a.name}" for a in node.names]
            else:
                out.append(node.module)
    return out


def test_each_stage_imports_only_the_stages_before_it() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        stage = _stage(path)
        if stage not in ALLOWED:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "comfy_env_attn" and len(parts) > 1:
                other = parts[1]
                extra = EXTRA.get(str(path.relative_to(PKG)), set())
                if other not in (stage, "__version__") and other not in ALLOWED[stage] | extra:
                    bad.append(f"{path.relative_to(PKG)} imports {name}")
            elif stage in THIRD_PARTY and parts[0] not in sys.stdlib_module_names \
                    and parts[0] not in THIRD_PARTY[stage] | {"comfy_env_attn", "tomli"}:
                bad.append(f"{path.relative_to(PKG)} imports {name}")  # tomli: 3.10's tomllib
    assert bad == []


def test_importing_the_dispatcher_loads_only_stdlib_and_torch() -> None:
    code = textwrap.dedent("""
        import sys, json
        import torch
        before = set(sys.modules)
        import comfy_env_attn.runtime.dispatch
        from comfy_env_attn import dispatch_attention
        new = sorted(m for m in set(sys.modules) - before)
        print(json.dumps(new))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = json.loads(r.stdout)
    foreign = [m for m in new if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] not in ("comfy_env_attn", "torch")]
    assert foreign == [], foreign
    ours = {m for m in new if m.startswith("comfy_env_attn.")}
    assert all(m.split(".")[1] in ("core", "runtime") for m in ours), ours
