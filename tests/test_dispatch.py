"""The runtime dispatcher on the CPU with real torch: in-process with fake backend modules on
sys.path and hand-written locks, and end to end with a lock written by a real install."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import tomli_w
import torch.nn.functional as F

from comfy_env_attn.core import choose
from comfy_env_attn.runtime import dispatch

FAKE_SAGE = '''
import torch
import torch.nn.functional as F
CALLS = []

def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None{mask_param}):
    CALLS.append((q.shape[-1], q.dtype, {mask_value}))
    if q.dtype == torch.float16:
        raise RuntimeError("no kernel for float16 here")
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=sm_scale{mask_arg})
'''


def fake_sage(tmp_path: Path, *, takes_mask: bool) -> Path:
    pkg = tmp_path / "fakes" / "sageattention"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_SAGE.format(
        mask_param=", attn_mask=None" if takes_mask else "",
        mask_value="attn_mask is not None" if takes_mask else "False",
        mask_arg=", attn_mask=attn_mask" if takes_mask else ""))
    return pkg.parent


def write_lock(path: Path, *, sage_ms: float, sdpa_ms: float, torch_version: str | None = None,
               checks_96: bool = True) -> Path:
    checks = [{"head_dim": d, "dtype": dt, "passed": True, "required": d != 96}
              for d in (64, 128) for dt in ("float32", "bfloat16")]
    if not checks_96:
        checks.append({"head_dim": 96, "dtype": "float32", "passed": False, "required": False})
    def bench(ms: float) -> list[dict]:
        return [{"shape": [1, 2, 128, 64], "dtype": "float32", "ms": ms, "tflops": 1 / ms}]
    doc = {"lock-version": "1.0", "created-by": "test", "packages": [], "tool": {
        "comfy-env-attn": {"schema": 1, "auto": ["sage", "sdpa"], "fingerprint": {
            "torch": torch_version or torch.__version__, "torch_cuda": torch.version.cuda,
            "device": "cpu", "backends": {}},
            "backends": {
                "sdpa": {"status": "verified", "quantized": False, "checks": checks,
                         "bench": bench(sdpa_ms), "version": torch.__version__},
                "sage": {"status": "verified", "quantized": True, "checks": checks,
                         "bench": bench(sage_ms), "version": "2.2.0"}}}}}
    from comfy_env_attn.lockfile import _clean  # TOML has no null (torch.version.cuda on a CPU)

    path.write_text(tomli_w.dumps(_clean(doc)))
    return path


@pytest.fixture
def fresh(monkeypatch):
    dispatch._reset_for_tests()
    monkeypatch.delenv("COMFY_ENV_ATTN_BACKEND", raising=False)
    monkeypatch.delenv("COMFYUI_ATTENTION_MECHANISM", raising=False)
    monkeypatch.delenv("COMFY_ENV_ATTN_UNVERIFIED", raising=False)
    yield
    dispatch._reset_for_tests()
    sys.modules.pop("sageattention", None)


def qkv(d: int = 64, n: int = 128, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g).to(dtype) for _ in range(3)]


def test_no_lock_sdpa_equals_reference(tmp_path, monkeypatch, fresh, caplog) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "missing.toml"))
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        out = dispatch.dispatch_attention(q, k, v)
        dispatch.dispatch_attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert [r.message for r in caplog.records if "no lock" in r.message].__len__() == 1
    assert "no verified lock" in dispatch.get_backend()


def test_auto_picks_the_measured_fastest(tmp_path, monkeypatch, fresh) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, takes_mask=False)))
    lock = write_lock(tmp_path / "lock.toml", sage_ms=1.0, sdpa_ms=5.0)
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    label = dispatch.set_backend("auto")
    assert "SageAttention 2.2.0, verified" in label and "1x2x128x64" in label
    q, k, v = qkv()
    out = dispatch.dispatch_attention(q, k, v)
    import sageattention

    assert sageattention.CALLS == [(64, torch.float32, False)]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    # exact mode leaves the quantized backend out
    dispatch.set_backend("auto", exact=True)
    dispatch.dispatch_attention(q, k, v)
    assert len(sageattention.CALLS) == 1
    # and when SDPA measured faster, SDPA is chosen
    dispatch._reset_for_tests()
    write_lock(lock, sage_ms=9.0, sdpa_ms=1.0)
    dispatch.set_backend("auto")
    dispatch.dispatch_attention(q, k, v)
    assert len(sageattention.CALLS) == 1


def test_head_dim_the_lock_saw_fail_is_not_routed(tmp_path, monkeypatch, fresh) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, takes_mask=False)))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(write_lock(
        tmp_path / "l.toml", sage_ms=1.0, sdpa_ms=5.0, checks_96=False)))
    q, k, v = qkv(d=96)
    dispatch.dispatch_attention(q, k, v)
    import sageattention

    assert sageattention.CALLS == []


def test_failure_memory_logs_once(tmp_path, monkeypatch, fresh, caplog) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, takes_mask=False)))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(write_lock(tmp_path / "l.toml", sage_ms=1.0,
                                                             sdpa_ms=5.0)))
    q, k, v = qkv(dtype=torch.float16)
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        outs = [dispatch.dispatch_attention(q, k, v) for _ in range(5)]
    import sageattention

    assert len(sageattention.CALLS) == 1  # tried once, then remembered
    fails = [r for r in caplog.records if "sage failed for head dim 64" in r.message]
    assert len(fails) == 1 and "using sdpa" in fails[0].message
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert all(o.dtype == torch.float16 for o in outs)
    torch.testing.assert_close(outs[-1].float(), ref, atol=2e-3, rtol=2e-3)
    # other kinds of input still go to sage
    dispatch.dispatch_attention(*qkv())
    assert len(sageattention.CALLS) == 2


def test_stale_or_corrupt_lock_one_warning_then_sdpa(tmp_path, monkeypatch, fresh,
                                                     caplog) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, takes_mask=False)))
    lock = write_lock(tmp_path / "l.toml", sage_ms=1.0, sdpa_ms=5.0, torch_version="2.0.0")
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        for _ in range(3):
            dispatch.dispatch_attention(*qkv())
    import sageattention

    assert sageattention.CALLS == []
    stale = [r for r in caplog.records if "stale" in r.message]
    assert len(stale) == 1 and "the lock verified 2.0.0" in stale[0].message
    dispatch._reset_for_tests()
    caplog.clear()
    lock.write_text("this is [not toml")
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        for _ in range(3):
            dispatch.dispatch_attention(*qkv())
    assert len([r for r in caplog.records if "unreadable" in r.message]) == 1


def test_masks_reach_only_mask_capable_backends(tmp_path, monkeypatch, fresh) -> None:
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 64:] = float("-inf")
    q, k, v = qkv()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path / "a", takes_mask=False)))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(write_lock(tmp_path / "l.toml", sage_ms=1.0,
                                                             sdpa_ms=5.0)))
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask)
    import sageattention

    assert sageattention.CALLS == []  # it takes no mask: never silently dropped
    torch.testing.assert_close(out, ref)
    # a sage whose signature takes a mask gets it
    sys.modules.pop("sageattention")
    dispatch._reset_for_tests()
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path / "b", takes_mask=True)))
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask)
    import sageattention as sage2

    assert sage2.CALLS == [(64, torch.float32, True)]
    torch.testing.assert_close(out, ref)


def test_env_override_and_aliases(tmp_path, monkeypatch, fresh) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, takes_mask=False)))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(write_lock(tmp_path / "l.toml", sage_ms=9.0,
                                                             sdpa_ms=1.0)))
    monkeypatch.setenv("COMFYUI_ATTENTION_MECHANISM", "sage")
    assert dispatch.set_backend("sdpa").startswith("SageAttention")
    dispatch.dispatch_attention(*qkv())
    import sageattention

    assert len(sageattention.CALLS) == 1
    monkeypatch.delenv("COMFYUI_ATTENTION_MECHANISM")
    assert dispatch.set_backend("pytorch").startswith("PyTorch SDPA")
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        dispatch.set_backend("nope")


def test_unverified_mode_is_opt_in_and_labelled(tmp_path, monkeypatch, fresh) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    label = dispatch.set_backend("auto", allow_unverified=True)
    assert "unverified" in label
    out = dispatch.dispatch_attention(*qkv())  # CPU: nothing but SDPA qualifies
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*qkv()))


def test_varlen_equals_per_sequence_sdpa(tmp_path, monkeypatch, fresh) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    lens = [5, 17, 64, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t = sum(lens)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(t, 3, 32, generator=g, dtype=torch.float32).to(torch.bfloat16)
               for _ in range(3))
    out = dispatch.dispatch_varlen_attention(q, k, v, cu, cu, max(lens), max(lens))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # reference: dense attention with a block-diagonal mask
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = seg[:, None] == seg[None, :]
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.float().transpose(0, 1),
                                         v.float().transpose(0, 1), attn_mask=mask)
    torch.testing.assert_close(out.float(), ref.transpose(0, 1), atol=2e-2, rtol=2e-2)


def test_choose_follows_the_crossover() -> None:
    def entry(ms_by_n: dict[int, float], d: int = 128, quantized: bool = False) -> dict:
        return {"status": "verified", "quantized": quantized,
                "checks": [{"head_dim": d, "dtype": "bfloat16", "passed": True}],
                "bench": [{"shape": [1, 24, n, d], "ms": ms} for n, ms in ms_by_n.items()]}
    # FACTS.md section 6 shape: SDPA wins short, sage wins long
    backends = {"sdpa": entry({1024: 1.0, 4608: 10.0, 16896: 100.0}),
                "sage": entry({1024: 3.0, 4608: 12.0, 16896: 80.0}, quantized=True),
                "flash4": entry({1024: 2.0, 4608: 9.0, 16896: 95.0})}
    def first(n: int, exact: bool = False) -> str:
        return choose.order_for(backends, 128, "bfloat16", n, exact=exact)[0][0]
    assert first(1000) == "sdpa"
    assert first(4608) == "flash4"
    assert first(17000) == "sage"
    assert first(17000, exact=True) == "flash4"
    # a head dim no accuracy check covered goes to SDPA only
    assert [n for n, _ in choose.order_for(backends, 256, "bfloat16", 4608)] == ["sdpa"]


def test_importing_the_dispatcher_loads_only_stdlib_and_torch() -> None:
    code = textwrap.dedent("""
        import sys, json
        import torch
        before = set(sys.modules)
        import comfy_env_attn.runtime.dispatch
        new = sorted(m for m in set(sys.modules) - before)
        print(json.dumps(new))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = json.loads(r.stdout)
    foreign = [m for m in new if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] not in ("comfy_env_attn", "torch")]
    assert foreign == [], foreign
    assert "comfy_env_attn.cli" not in new and "packaging" not in new


def test_setup_link_without_symlinks(tmp_path, monkeypatch) -> None:
    comfy = tmp_path / "ComfyUI" / "comfy"
    comfy.mkdir(parents=True)
    (comfy / "__init__.py").write_text("")
    (comfy / "real.py").write_text("WHO = 'comfyui'\n")
    node = tmp_path / "node"
    node.mkdir()
    (node / "sparse_attn.py").write_text("WHO = 'node'\n")
    (node / "real.py").write_text("WHO = 'node'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "ComfyUI"))
    for m in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
        monkeypatch.delitem(sys.modules, m)
    assert dispatch.setup_link(node, "sparse_attn.py") is True
    import comfy.sparse_attn

    assert comfy.sparse_attn.WHO == "node"
    assert dispatch.setup_link(node / "real.py", "real.py") is False  # ComfyUI ships it
    import comfy.real

    assert comfy.real.WHO == "comfyui"
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    for m in ("comfy", "comfy.sparse_attn", "comfy.real"):
        sys.modules.pop(m, None)


def test_choice_compares_throughput_not_milliseconds_across_batch_sizes() -> None:
    # Found on the H100: backends timed at different batch x heads must be compared by
    # throughput. SDPA: 463 TFLOP/s at 2x10x4096x64; sage: 429 TFLOP/s at 1x10x4096x64.
    def entry(shape: list[int], ms: float, quantized: bool) -> dict:
        return {"status": "verified", "quantized": quantized,
                "checks": [{"head_dim": 64, "dtype": "bfloat16", "passed": True}],
                "bench": [{"shape": shape, "ms": ms}]}
    backends = {"sdpa": entry([2, 10, 4096, 64], 0.1855, False),
                "sage": entry([1, 10, 4096, 64], 0.1, True)}
    assert choose.order_for(backends, 64, "bfloat16", 4096)[0][0] == "sdpa"


def test_verification_lets_the_device_pick_the_shapes() -> None:
    # Found on the H100: SDPA, verified first, was timed at the CPU shapes before anything
    # knew the device, so no shape matched the GPU shapes of the other backends.
    from comfy_env_attn.verify.run import CPU_SHAPES, GPU_SHAPES, Options, _config

    cfg = _config("sdpa", Options())
    assert "shapes" not in cfg
    assert cfg["gpu_shapes"] == GPU_SHAPES and cfg["cpu_shapes"] == CPU_SHAPES
    assert _config("sage", Options(shapes=[[1, 2, 3, 4]]))["shapes"] == [[1, 2, 3, 4]]


def test_auto_order_makes_no_speed_claim_without_common_shapes() -> None:
    from comfy_env_attn.lockfile import auto_order

    b = {"sdpa": {"status": "verified", "bench": [{"shape": [1, 4, 256, 64], "tflops": 2.0}]},
         "sage": {"status": "verified", "bench": [{"shape": [2, 10, 4096, 64], "tflops": 200}]},
         "flash": {"status": "verified", "bench": [{"shape": [1, 4, 256, 64], "tflops": 3.0}]}}
    assert auto_order(b) == ["flash", "sdpa", "sage"]
    assert "speed_vs_sdpa" not in b["sage"] and b["flash"]["speed_vs_sdpa"] == 1.5


def test_attention_backend_node_override_reshapes_like_comfyui(tmp_path, monkeypatch,
                                                                fresh) -> None:
    from comfy_env_attn.runtime.comfyui import AttentionBackend, make_override

    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    override = make_override("auto", False)
    b, n, heads, d = 2, 77, 4, 32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, heads * d, generator=g) for _ in range(3))
    called = []

    def comfy_func(*args, **kwargs):  # what ComfyUI would have called
        called.append(1)
        raise AssertionError("the override handles unmasked attention itself")

    out = override(comfy_func, q, k, v, heads, skip_reshape=False, skip_output_reshape=False)
    split = [t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, heads * d)
    torch.testing.assert_close(out, ref)
    assert called == []
    # [B, H, N, D] in and out with skip_reshape / skip_output_reshape
    out2 = override(comfy_func, *split, heads, skip_reshape=True, skip_output_reshape=True)
    torch.testing.assert_close(out2, F.scaled_dot_product_attention(*split))
    # the node's inputs list auto and the backend names
    choices = AttentionBackend.INPUT_TYPES()["required"]["backend"][0]
    assert choices[:2] == ["auto", "auto (exact)"] and "sage" in choices


def test_close_calls_are_settled_on_the_real_input(tmp_path, monkeypatch, fresh) -> None:
    # Found on the H100: FA4 and Sage 2 were within run-to-run spread at Flux 2048, so the
    # lock's numbers (another process) picked the one that ran 5% slower at the time.
    pkg = fake_sage(tmp_path, takes_mask=False) / "sageattention"
    src = (pkg / "__init__.py").read_text()
    (pkg / "__init__.py").write_text(src.replace(
        "    CALLS.append(", "    import time; time.sleep(0.003)\n    CALLS.append("))
    monkeypatch.syspath_prepend(str(pkg.parent))
    lock = write_lock(tmp_path / "l.toml", sage_ms=1.0, sdpa_ms=1.04)  # 4% apart: close
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    q, k, v = qkv()
    dispatch.dispatch_attention(q, k, v)
    key = (q.shape, q.dtype, k.shape, True, False, True, False)
    assert dispatch._ROUTES[key][0] == "sdpa"  # timed here: the sleeping sage lost
    import sageattention

    timed_calls = len(sageattention.CALLS)
    assert timed_calls == 5  # 2 warm-up + 3 timed, once, at first use
    for _ in range(3):
        dispatch.dispatch_attention(q, k, v)
    assert len(sageattention.CALLS) == timed_calls
    # far apart: the lock decides, nothing is timed
    dispatch._reset_for_tests()
    sageattention.CALLS.clear()
    write_lock(lock, sage_ms=1.0, sdpa_ms=5.0)
    dispatch.dispatch_attention(q, k, v)
    assert dispatch._ROUTES[key][0] == "sage" and len(sageattention.CALLS) == 1
