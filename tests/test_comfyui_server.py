"""End to end, as a ComfyUI user gets it (COMFYUI_DIR; skipped without it): the repository
copied into custom_nodes/ of a fresh ComfyUI base folder, ComfyUI's server started with
`main.py --cpu`, the node in /object_info, and a workflow queued through /prompt that loads a
tiny random-weight SD3 model with ComfyUI's own loader (UNETLoader, from a safetensors file),
routes it through the node and samples it with KSampler, polled on /history until it
completes. The ComfyUI checkout itself is not modified: --base-directory points custom_nodes,
models, input, output and user at a temporary folder (--disable-api-nodes leaves out the
cloud API nodes, half of the start time here)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_node_install import copy_repo

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
TESTS = Path(__file__).resolve().parent
# What ComfyUI's server imports before it serves (its requirements.txt, less the optional)
NEEDS = ("aiohttp", "yarl", "av", "yaml", "PIL", "safetensors", "einops", "torchsde", "scipy",
         "psutil", "tqdm", "transformers", "sentencepiece", "alembic", "sqlalchemy",
         "comfyui_frontend_package")
NODE = "ComfyEnvAttnBackend"


def _missing() -> list[str]:
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set"),
    pytest.mark.skipif(bool(COMFYUI_DIR) and bool(_missing()),
                       reason=f"ComfyUI's server needs {', '.join(_missing())} in this Python "
                              f"(pip install -r {COMFYUI_DIR}/requirements.txt, torch aside)"),
]

# main.py run the way `python main.py ARGS` runs it, with a stand-in torchvision where this
# CPU torch has none (ComfyUI imports it at start and uses it only in nodes this test skips).
RUN_MAIN = """
import os, runpy, sys
sys.path.insert(0, {tests!r})
from torchvision_stub import stub_torchvision
stub_torchvision()
sys.path[0] = {comfy!r}
sys.argv = [os.path.join({comfy!r}, "main.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Test-only custom node file, imported by the server at start (after ComfyUI's own modules):
# it saves the tiny random-weight SD3 that UNETLoader then loads (built from ComfyUI's classes
# here, where they are imported already), and adds a text conditioning without a text encoder
# (the tiny SD3 takes 32-wide text features) and an output node that reports the label and
# how many attention calls the dispatcher served during sampling.
HELPERS = '''
import os
import sys

import folder_paths
import torch
from safetensors.torch import save_file

from comfy_env_attn.runtime import dispatch

sys.path.insert(0, TESTS_DIR)
import comfyui_models  # noqa: E402

_folder = os.path.join(folder_paths.models_dir, "diffusion_models")
os.makedirs(_folder, exist_ok=True)
_file = os.path.join(_folder, "tiny_sd3.safetensors")
_net = comfyui_models.sd3().model.model.diffusion_model
save_file({k: v.contiguous() for k, v in _net.state_dict().items()}, _file)
del _net

CALLS = [0]
_dispatch = dispatch.dispatch_attention


def _counted(*args, **kwargs):
    CALLS[0] += 1
    return _dispatch(*args, **kwargs)


dispatch.dispatch_attention = _counted


class E2ETinyConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 77, 32, generator=g),
                  {"pooled_output": torch.randn(1, 32, generator=g)}]],)


class E2EReport:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "label": ("STRING", {"forceInput": True})}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def report(self, samples, label):
        lat = samples["samples"]
        return {"ui": {"label": [label], "calls": [CALLS[0]], "shape": [list(lat.shape)],
                       "finite": [bool(torch.isfinite(lat).all())]}}


NODE_CLASS_MAPPINGS = {"E2ETinyConditioning": E2ETinyConditioning, "E2EReport": E2EReport}
'''


def workflow(model_file: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": model_file, "weight_dtype": "default"}},
        "2": {"class_type": NODE, "inputs": {"model": ["1", 0], "backend": "auto"}},
        "3": {"class_type": "E2ETinyConditioning", "inputs": {"seed": 1}},
        "4": {"class_type": "E2ETinyConditioning", "inputs": {"seed": 2}},
        "5": {"class_type": "EmptySD3LatentImage",
              "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": 3, "steps": 2, "cfg": 4.0,
                         "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0],
                         "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "E2EReport", "inputs": {"samples": ["6", 0], "label": ["2", 1]}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post(url: str, doc: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: {e.code} {e.read().decode()[:2000]}") from None


class Server:
    def __init__(self, base: Path, log: Path) -> None:
        assert COMFYUI_DIR is not None
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        env = {k: v for k, v in os.environ.items()
               if k not in ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM",
                            "COMFY_ENV_ATTN_UNVERIFIED", "PYTHONPATH")}
        env["COMFY_ENV_ATTN_LOCK"] = str(base / "no-lock.toml")  # the dispatcher: SDPA
        code = RUN_MAIN.format(tests=str(TESTS), comfy=COMFYUI_DIR)
        self.out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "--cpu", "--listen", "127.0.0.1", "--port",
             self.url.rsplit(":", 1)[1], "--base-directory", str(base), "--disable-api-nodes"],
            cwd=COMFYUI_DIR, env=env, stdout=self.out, stderr=subprocess.STDOUT)

    def wait(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                if "ModuleNotFoundError" in text:
                    pytest.skip("ComfyUI's server misses a module here: "
                                + text.strip().splitlines()[-1])
                raise AssertionError(f"ComfyUI exited ({self.proc.returncode}):\n{text[-4000:]}")
            try:
                get(self.url + "/system_stats")
                return
            except (OSError, ValueError):
                time.sleep(0.25)
        raise AssertionError("ComfyUI did not start in time:\n" + self.log.read_text()[-4000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    base = tmp_path_factory.mktemp("comfyui-base")
    custom = base / "custom_nodes"
    custom.mkdir()
    copy_repo(custom / "comfy-env-attn")
    (custom / "e2e_helpers.py").write_text(HELPERS.replace("TESTS_DIR", repr(str(TESTS))))
    server = Server(base, base / "comfyui.log")
    try:
        server.wait(time.monotonic() + 120)
        yield server, base
    finally:
        server.stop()


def test_the_cloned_node_loads_and_appears_in_object_info(comfyui) -> None:
    server, base = comfyui
    info = get(f"{server.url}/object_info/{NODE}")[NODE]
    assert info["display_name"] == "Attention Backend (comfy-env-attn)"
    assert info["output"] == ["MODEL", "STRING"]
    choices = info["input"]["required"]["backend"][0]
    assert choices[:4] == ["auto", "auto (exact)", "auto (safe)", "sdpa (always available)"], \
        choices
    assert "sage (not verified here)" in choices
    log = server.log.read_text()
    clone = str(base / "custom_nodes" / "comfy-env-attn")
    assert not any(clone in line and "IMPORT FAILED" in line for line in log.splitlines()), log
    assert f"Cannot import {clone}" not in log


def test_a_workflow_through_the_node_completes(comfyui) -> None:
    server, _ = comfyui
    reply = post(server.url + "/prompt", {"prompt": workflow("tiny_sd3.safetensors"),
                                          "client_id": "comfy-env-attn-e2e"})
    assert not reply.get("node_errors"), reply
    pid = reply["prompt_id"]
    deadline = time.monotonic() + 60
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        entry = get(f"{server.url}/history/{pid}").get(pid, {})
        if entry.get("status", {}).get("completed") or \
                entry.get("status", {}).get("status_str") == "error":
            break
        time.sleep(0.25)
    status = entry.get("status", {})
    assert status.get("status_str") == "success" and status.get("completed"), \
        json.dumps(status)[:3000] + server.log.read_text()[-3000:]
    report = entry["outputs"]["7"]
    assert report["label"] == ["auto: PyTorch SDPA (no verified lock)"], report
    assert report["shape"] == [[1, 16, 16, 16]] and report["finite"] == [True], report
    # every attention call of the sampling went through the dispatcher: 2 steps x 3 calls
    # (2 joint blocks, 1 MMDiT-X self-attention), cond and uncond batched or not
    assert report["calls"][0] in (2 * 3, 2 * 3 * 2), report
