"""The Attention Backend node on real ComfyUI model classes (COMFYUI_DIR; skipped without it).

tests/comfyui_models.py builds a tiny random-weight model of each family from ComfyUI's own
classes and samples it through comfy.sample on the CPU: without the node, then with the node
for each backend choice. It runs once, in a process of its own (ComfyUI's `comfy` package is
global state), and these tests check what it measured.

Tolerance: the node's latents equal the no-node run to 2e-5 of the latents' largest
magnitude (max |a - b| <= 2e-5 * max(1, max |reference|)). The reference is ComfyUI's own
CPU attention (attention_sub_quad), the node's is PyTorch SDPA through the dispatcher, so the
two differ by float32 rounding only (measured: at most 3e-6 relative); every family's masks
change its latents by over 5e-2 relative, 2,500 times the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from comfyui_models import BACKENDS, FAMILIES

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 2e-5  # of the reference latents' largest magnitude
MASKED = ("sd15_masked_cross_attention", "flux", "chroma", "ltxv", "hunyuan_video", "lumina2")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("comfyui-models")
    out = tmp / "result.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM",
                        "COMFY_ENV_ATTN_UNVERIFIED")}
    env["COMFY_ENV_ATTN_LOCK"] = str(tmp / "no-lock.toml")  # no lock: the dispatcher uses SDPA
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "comfyui_models.py"), str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert r.returncode == 0 and out.exists(), r.stderr[-5000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def family(measured: dict[str, Any], name: str) -> dict[str, Any]:
    res: dict[str, Any] = measured["families"][name]
    assert "error" not in res, res.get("traceback", res["error"])
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_node_gives_the_no_node_latents(measured: dict[str, Any], name: str,
                                        backend: str) -> None:
    res = family(measured, name)
    run = res["backends"][backend]
    assert "error" not in run, run.get("traceback", run["error"])
    assert run["finite"]
    assert run["max_diff"] <= TOLERANCE * max(1.0, res["scale"]), (run, res["scale"])
    # every attention call of the model went through the dispatcher, none fell back
    assert res["attention_calls"] > 0
    assert run["dispatch_calls"] == res["attention_calls"], run
    assert run["override_set"]
    # the node's input model is unchanged: no override, the same model_options
    assert run["options_unchanged"] and not run["original_has_override"], run


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reference_runs_are_sound(measured: dict[str, Any], name: str) -> None:
    res = family(measured, name)
    assert res["finite"] and res["scale"] > 0
    # an override that calls ComfyUI's function changes nothing: the count is of real calls
    assert res["spy_diff"] == 0.0
    # after every node run, the original model samples bit for bit as before
    assert res["ref_again_diff"] == 0.0 and res["weights_unchanged"]


@pytest.mark.parametrize("name", MASKED)
def test_the_masks_change_the_latents(measured: dict[str, Any], name: str) -> None:
    # the text-padding masks are real: a node that dropped them would miss the tolerance
    # by three orders of magnitude (the node before the fix was off by 1.8 on LTX-Video)
    res = family(measured, name)
    assert res["mask_effect"] > 1000 * TOLERANCE * max(1.0, res["scale"]), res


def test_every_calling_convention_matches_comfyui_attention_pytorch(
        measured: dict[str, Any]) -> None:
    conv = measured["conventions"]
    assert len(conv) >= 20
    bad = {label: r for label, r in conv.items()
           if "error" in r or not r["shape_ok"] or r["max_diff"] > 1e-6
           or r["dispatch_calls"] != 1 or r["fallback_calls"] != 0}
    assert not bad, json.dumps(bad, indent=1)


def test_calls_it_cannot_route_go_to_comfyui_unchanged(measured: dict[str, Any]) -> None:
    fb = measured["fallbacks"]
    assert len(fb) >= 11
    bad = {label: r for label, r in fb.items()
           if "error" in r or not r["returned_comfy_result"] or not r["same_args"]
           or r["dispatch_calls"] != 0}
    assert not bad, json.dumps(bad, indent=1)
