"""The dispatcher against what a review threw at it: backends that cannot be loaded or fail
while being timed, calls that combine variants verification proves one by one (a mask with
causal, packed sequences of other key lengths, fewer key/value heads), settings changed while
a call is in flight, a patched F.scaled_dot_product_attention, a kernel answering in another
dtype, gradients, empty sequences and odd ranks. Each must end in the right answer, by a
proven backend or SDPA, and never in an exception the caller did not cause."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from test_dispatch import (
    bench,
    checks,
    fake_sage,
    qkv,
    ref,
    sage_record,
    write_lock,
)
from wheels import installed_plugin, installed_sage

from comfy_env_attn import lockfile
from comfy_env_attn.core.lockmodel import BackendRecord, tool_table
from comfy_env_attn.runtime import dispatch
from comfy_env_attn.verify import _target
from comfy_env_attn.verify.run import Options, verify


def _sage_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: BackendRecord,
               **lock: object) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(write_lock(
        tmp_path / "l.toml", sage=record, sage_dir=tmp_path, **lock)))  # type: ignore[arg-type]


def test_a_backend_that_cannot_be_loaded_is_said_once_and_left_out(tmp_path, monkeypatch,
                                                                   fresh, caplog) -> None:
    # its files are as verified (the lock is fresh), but a library it needs is gone
    installed_sage(tmp_path, 'raise ImportError("libcudart.so.12: cannot open shared object")')
    monkeypatch.syspath_prepend(str(tmp_path))
    _sage_lock(tmp_path, monkeypatch, sage_record())
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        outs = [dispatch.dispatch_attention(q, k, v) for _ in range(3)]
        out_m = dispatch.dispatch_attention(q, k, v, scale=0.1)  # another kind of call
    for out in outs:
        torch.testing.assert_close(out.float(), ref(q, k, v), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_m.float(), ref(q, k, v, scale=0.1), atol=2e-2, rtol=2e-2)
    said = [r.message for r in caplog.records if "cannot be loaded" in r.message]
    assert len(said) == 1 and "libcudart.so.12" in said[0], said
    assert "sage (cannot be loaded: ImportError" in dispatch.get_backend()
    order, over = dispatch.passed_over(q, k)
    assert order == ["sdpa"] and "cannot be loaded" in dict(over)["sage"][0]


def test_settling_when_every_close_backend_fails_ends_at_sdpa(tmp_path, monkeypatch,
                                                               fresh) -> None:
    # sage raises for float16; this sageattention has no fp16-PV kernel (sage_fp16 cannot
    # be loaded); both were measured within the settle margin, SDPA far behind
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path)))
    f16 = checks(variants=("plain",), dtype="float16")
    fp16 = BackendRecord("sage_fp16", "verified", quantized=True, version="2.2.0",
                         checks=f16, bench=bench(1.02))
    _sage_lock(tmp_path, monkeypatch, sage_record(1.0, checks=f16))
    lock = Path(tmp_path / "l.toml")
    table = tool_table(lockfile.read(lock))
    table.backends["sage_fp16"] = fp16
    lockfile.write(lock, lockfile.build([], table))
    q, k, v = qkv(dtype=torch.float16)
    for _ in range(2):
        out = dispatch.dispatch_attention(q, k, v)
        torch.testing.assert_close(out.float(), ref(q, k, v), atol=5e-3, rtol=5e-3)
    assert next(iter(dispatch._ROUTES.values()))[0] == "sdpa"


def test_a_mask_with_causal_reaches_a_backend_as_one_mask(tmp_path, monkeypatch,
                                                          fresh) -> None:
    """Verification proves causal and a mask apart; a kernel that takes one or the other
    (this one drops the mask when causal is set) must never get both."""
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, takes_mask=True,
                                              drop_mask_if_causal=True)))
    _sage_lock(tmp_path, monkeypatch, sage_record(
        checks=checks(variants=("plain", "causal", "mask_bool", "mask_additive"))))
    q, k, v = qkv()
    g = torch.Generator().manual_seed(3)
    for mask in ((torch.rand(1, 1, 128, 128, generator=g) > 0.3) | torch.eye(128).bool(),
                 -3.0 * torch.rand(1, 1, 128, 128, generator=g).bfloat16()):
        out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, is_causal=True)
        tri = torch.ones(128, 128, dtype=torch.bool).tril()
        merged = mask & tri if mask.dtype == torch.bool else \
            mask.float().masked_fill(~tri, float("-inf"))
        torch.testing.assert_close(out.float(), ref(q, k, v, merged), atol=2e-2, rtol=2e-2)
    import sageattention

    assert [c[2:] for c in sageattention.CALLS] == [(False, False, True)] * 2  # one mask


PACKED = '''
import torch
import torch.nn.functional as F
from comfy_env_attn import register_backend
from comfy_env_attn.core.backends import ALL_DTYPES, Capabilities
CALLS = []

def dense(q, k, v, mask, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=scale)

def packed(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """Per sequence, with the causal triangle aligned bottom-right (as flash-attn aligns
    it) and no grouped heads: right wherever a sequence's lengths are equal. Offsets as
    flash-attn and SageAttention take them: int32, on q's device."""
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
        raise RuntimeError("cu_seqlens_q must have dtype int32")
    CALLS.append((q.shape[1], k.shape[1], causal))
    out = torch.empty_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t, a, b in
                      ((q, bq[i], bq[i + 1]), (k, bk[i], bk[i + 1]), (v, bk[i], bk[i + 1])))
        n, m = qs.shape[1], ks.shape[1]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n) if causal else None
        out[bq[i]:bq[i + 1]] = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
    return out

def register():
    register_backend("packed", dense, dist="packed-attn", varlen=packed,
                     capabilities=Capabilities(ALL_DTYPES, (64,), gqa=False, varlen=True))
'''


@pytest.fixture(scope="module")
def packed_plugin(tmp_path_factory) -> tuple[Path, Path]:
    """A plugin with a packed kernel, verified for real and locked."""
    root = installed_plugin(tmp_path_factory.mktemp("packed") / "site", "packed_attn", PACKED)
    results = verify(sys.executable, [], Options(shapes=[[1, 2, 128, 64]], head_dims=(64,),
                                                 env={"PYTHONPATH": str(root)}))
    lock = root.parent / "pylock.toml"
    lockfile.write(lock, lockfile.build([], lockfile.tool_table_from(
        results, python=sys.executable)))
    return root, lock


def test_packed_calls_reach_a_backend_only_as_verification_proved_them(
        packed_plugin, monkeypatch, fresh) -> None:
    root, lock = packed_plugin
    table = tool_table(lockfile.read(lock))
    proven = {c.variant for c in table.backends["packed"].checks if c.passed}
    assert {"varlen", "varlen_causal", "varlen_cross", "varlen_scale"} <= proven
    assert "varlen_gqa" not in {c.variant for c in table.backends["packed"].checks}
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    # by name: it is SDPA's speed on a CPU, which auto may rank either side of SDPA; a name
    # goes through the same proof check
    dispatch.set_backend("packed")
    import packed_attn

    g = torch.Generator().manual_seed(5)

    def call(lens_q: list[int], lens_k: list[int], heads_k: int = 4,
             causal: bool = False) -> None:
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32)
                      for x in (lens_q, lens_k))
        q = torch.randn(sum(lens_q), 4, 64, generator=g)
        k, v = (torch.randn(sum(lens_k), heads_k, 64, generator=g) for _ in range(2))
        out = dispatch.dispatch_varlen_attention(q, k, v, cu_q, cu_k, max(lens_q),
                                                 max(lens_k), is_causal=causal)
        expected = dispatch._SDPA.varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                         causal, None)  # per sequence, top-left like SDPA
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

    call([40, 56], [40, 56])
    call([40, 56], [40, 56], causal=True)
    assert len(packed_attn.CALLS) == 2  # proven: the plugin serves both
    # the same longest lengths, but each sequence's keys another length: bottom-right causal
    # is not SDPA's answer there, and the call goes to SDPA
    call([40, 56], [56, 40], causal=True)
    call([40, 56], [40, 56], heads_k=2)  # grouped heads: never proven
    assert len(packed_attn.CALLS) == 2
    call([40, 56], [56, 40])  # other key lengths without causal: proven (varlen_cross)
    assert len(packed_attn.CALLS) == 3
    call([0, 56], [40, 56])  # an empty sequence: never proven
    assert len(packed_attn.CALLS) == 3
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    q = torch.randn(96, 4, 64, generator=g, requires_grad=True)
    kv = torch.randn(96, 4, 64, generator=g)
    dispatch.dispatch_varlen_attention(q, kv, kv, cu, cu, 56, 56).sum().backward()
    assert q.grad is not None and len(packed_attn.CALLS) == 3  # gradients: SDPA's
    # int64 offsets (as torch.cumsum gives them) reach it as it was proven: int32
    with torch.no_grad():
        out = dispatch.dispatch_varlen_attention(q, kv, kv, cu.long(), cu.long(), 56, 56)
    assert len(packed_attn.CALLS) == 4
    torch.testing.assert_close(out, dispatch._SDPA.varlen(q, kv, kv, cu, cu, 56, 56, False,
                                                          None))
    # an input SDPA rejects too (q and k of two dtypes) is the caller's fault: raised, and
    # the backend keeps its place for the next call
    with pytest.raises(RuntimeError):
        dispatch.dispatch_varlen_attention(q.detach(), kv.double(), kv, cu, cu, 56, 56)
    assert not dispatch._S.failed and len(packed_attn.CALLS) == 5  # it was tried
    dispatch.dispatch_varlen_attention(q.detach(), kv, kv, cu, cu, 56, 56)
    assert len(packed_attn.CALLS) == 6


def test_settings_changed_during_a_first_call_are_not_undone_by_it(tmp_path, monkeypatch,
                                                                    fresh) -> None:
    folder = fake_sage(tmp_path)
    init = folder / "sageattention" / "__init__.py"
    init.write_text("import time; time.sleep(1.0)\n" + init.read_text())  # a slow import
    monkeypatch.syspath_prepend(str(folder))
    _sage_lock(tmp_path, monkeypatch, sage_record())
    q, k, v = qkv()
    dispatch.set_backend("auto")
    first = threading.Thread(target=dispatch.dispatch_attention, args=(q, k, v))
    first.start()
    time.sleep(0.3)  # the first call is loading sage
    dispatch.set_backend("auto", exact=True)  # sage is quantized: out
    first.join()
    import sageattention

    before = len(sageattention.CALLS)
    for _ in range(5):
        dispatch.dispatch_attention(q, k, v)
    assert len(sageattention.CALLS) == before
    assert dispatch.passed_over(q, k)[0] == ["sdpa"]


def test_the_fallback_is_pytorchs_own_sdpa_whatever_replaced_it(tmp_path, monkeypatch,
                                                                fresh) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    real = F.scaled_dot_product_attention
    q, k, v = qkv(dtype=torch.float32)
    monkeypatch.setattr(F, "scaled_dot_product_attention", dispatch.dispatch_attention)
    out = dispatch.dispatch_attention(q, k, v, scale=0.3)  # no recursion
    torch.testing.assert_close(out, real(q, k, v, scale=0.3))


def test_an_answer_in_another_dtype_fails_verification_and_is_cast_at_runtime(
        tmp_path, monkeypatch, fresh) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path, out_dtype="float32")))
    from comfy_env_attn.runtime import adapters

    sage = adapters.adapter("sage")
    sage.load()
    res = _target.check(sage, adapters.adapter("sdpa"), "plain", 64, "bfloat16", "cpu",
                        {"max_abs": 0.1, "min_cosine": 0.99})
    assert not res["passed"] and "float32, expected (1, 2, 96, 64) bfloat16" in res["error"]
    _sage_lock(tmp_path, monkeypatch, sage_record())  # a lock that says otherwise
    q, k, v = qkv()
    out = dispatch.dispatch_attention(q, k, v)
    assert out.dtype == torch.bfloat16  # the model's next layer takes it


def test_gradients_empty_sequences_and_other_ranks_go_to_sdpa(tmp_path, monkeypatch,
                                                              fresh) -> None:
    monkeypatch.syspath_prepend(str(fake_sage(tmp_path)))
    _sage_lock(tmp_path, monkeypatch, sage_record())
    import sageattention

    q, k, v = qkv(dtype=torch.float32)
    dispatch.set_backend("auto")
    q.requires_grad_()
    with torch.no_grad():  # no gradient wanted: the proven backend
        dispatch.dispatch_attention(q, k, v, scale=0.2)
    assert len(sageattention.CALLS) == 0  # float32 is not proven for this sage either
    qb, kb, vb = qkv()
    qb.requires_grad_()
    dispatch.dispatch_attention(qb, kb, vb).float().sum().backward()  # SDPA has a backward
    assert qb.grad is not None and sageattention.CALLS == []
    order, over = dispatch.passed_over(qb, kb)  # says so, as dispatch does
    assert order == ["sdpa"] and "gradients" in dict(over)["sage"][0]
    vg = vb.detach().clone().requires_grad_()  # values alone want gradients (a LoRA on v)
    dispatch.dispatch_attention(qb.detach(), kb, vg).float().sum().backward()
    assert sageattention.CALLS == [] and vg.grad is not None
    assert dispatch.passed_over(qb.detach(), kb, v=vg)[0] == ["sdpa"]
    dispatch.set_backend("flash")  # named, not verified here: still said, with the rest
    over = dict(dispatch.passed_over(qb, kb)[1])
    assert over["flash"] == ("it wants gradients, and verification proves no backward pass",
                             "it is not verified on this machine")
    dispatch.set_backend("auto")
    with torch.no_grad():
        dispatch.dispatch_attention(qb, kb, vb)
    assert len(sageattention.CALLS) == 1
    empty = dispatch.dispatch_attention(qb[:, :, :0].detach(), kb, vb)
    assert empty.shape == (1, 2, 0, 64) and len(sageattention.CALLS) == 1
    q3, k3, v3 = (t[0].detach() for t in (qb, kb, vb))  # [H, N, D]: SDPA takes it as is
    short = k3[:, :32]
    torch.testing.assert_close(dispatch.dispatch_attention(q3, short, v3[:, :32]),
                               F.scaled_dot_product_attention(q3, short, v3[:, :32]))
    assert dispatch.passed_over(q3, short)[0] == ["sdpa"]
    with pytest.raises(ValueError, match="cannot share"):  # 2 query heads over 4 k/v heads
        dispatch.dispatch_attention(qb.detach(), *qkv(kv_heads=4)[1:])


def test_overrides_and_the_state_say_what_they_do(tmp_path, monkeypatch, fresh,
                                                  caplog) -> None:
    import comfy_env_attn

    assert comfy_env_attn.passed_over is dispatch.passed_over
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", "x" * 5000)  # no such path (ENAMETOOLONG)
    q, k, v = qkv(dtype=torch.float32)
    torch.testing.assert_close(dispatch.dispatch_attention(q, k, v), ref(q, k, v))
    monkeypatch.setenv("COMFYUI_ATTENTION_MECHANISM", "sage")
    dispatch._reset_for_tests()
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        dispatch.dispatch_attention(q, k, v)  # the first call starts with auto: nothing said
        dispatch.set_backend("auto", exact=True)
        dispatch.set_backend("flash")
    said = [r.message for r in caplog.records if "overrides" in r.message]
    assert said == ["comfy-env-attn: COMFYUI_ATTENTION_MECHANISM=sage overrides "
                    "set_backend('auto', exact=True)", "comfy-env-attn: "
                    "COMFYUI_ATTENTION_MECHANISM=sage overrides set_backend('flash')"], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):  # putting settings back
        dispatch.restore({**dispatch.settings(), "name": "flash"})  # asks nothing anew
    assert not [r for r in caplog.records if "overrides" in r.message]
    monkeypatch.delenv("COMFYUI_ATTENTION_MECHANISM")
    dispatch.set_backend("auto", safe=True)
    kept = dispatch.settings()
    dispatch.set_backend("sdpa")
    dispatch.restore(kept)
    assert dispatch.settings() == kept and kept["safe"] is True


def test_a_first_call_does_not_undo_settings_applied_meanwhile(tmp_path, monkeypatch,
                                                              fresh) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    slow = dispatch._load_lock

    def load() -> object:
        time.sleep(0.5)  # set_backend holds the dispatcher's lock here
        return slow()

    monkeypatch.setattr(dispatch, "_load_lock", load)
    asked = threading.Thread(target=dispatch.set_backend, args=("sdpa",))
    asked.start()
    time.sleep(0.1)
    dispatch.get_backend()  # a first call: it waits for the lock, then finds sdpa set
    asked.join()
    assert dispatch.settings()["name"] == "sdpa"


def test_causal_with_other_key_lengths_needs_its_own_proof() -> None:
    """xformers aligns the triangle as SDPA does and claims the pair; proofs of causal and of
    cross-attention apart do not show the alignment: the pair is proven on its own."""
    from comfy_env_attn.core import choose
    from comfy_env_attn.core.backends import BACKENDS, Call

    call = Call("bfloat16", 64, q_len=512, kv_len=77, causal=True)
    assert "causal_cross" in call.variants()
    assert "causal_cross" in BACKENDS["xformers"].caps.variants()
    apart = BackendRecord("xformers", "verified", version="0.0.32",
                          checks=checks(variants=("plain", "causal", "cross")))
    assert any("causal_cross at head dim 64 bfloat16 was not verified" in r
               for r in choose.reasons("xformers", apart, call))
    paired = BackendRecord("xformers", "verified", version="0.0.32", checks=checks(
        variants=("plain", "causal", "cross", "causal_cross")))
    assert choose.reasons("xformers", paired, call) == []
    packed = Call("bfloat16", 64, q_len=56, kv_len=56, causal=True, varlen=True,
                  lengths_differ=True)
    assert packed.variants() == ("varlen", "varlen_causal", "varlen_cross",
                                 "varlen_causal_cross")


@pytest.mark.parametrize("kind", ["fifo", "nested"])
def test_a_lock_that_is_no_file_or_too_deep_is_one_warning_never_a_hang(
        tmp_path, monkeypatch, caplog, fresh, kind) -> None:
    """A FIFO in the lock's place would block ComfyUI's start on the read; a lock nested
    past what TOML can read raised RecursionError: each is one warning, then SDPA."""
    import os

    lock = tmp_path / "pylock.comfy-env-attn.toml"
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    q = torch.randn(1, 2, 16, 8)
    with caplog.at_level(logging.WARNING, "comfy_env_attn"):
        out = dispatch.dispatch_attention(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    said = [r.getMessage() for r in caplog.records if "is invalid" in r.getMessage()]
    assert len(said) == 1 and ("not a regular file" if kind == "fifo" else "Recursion") \
        in said[0], said
