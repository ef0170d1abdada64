"""A backend variant: sage_fp16, SageAttention 2's int8-QK/fp16-PV kernel, another function
of the sageattention package. One distribution (one plan row, one fingerprint entry), two
backends (verified, timed, locked and chosen each on its own), and a variant that is missing
or failing never fails an install. Real verification in subprocesses, real venvs and uv,
fake sageattention packages computed on the CPU through SDPA."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import cli, make_system, venv_python, venv_site, write_gpu_profile
from wheels import build_wheel, installed_sage

from comfy_env_attn import lockfile
from comfy_env_attn.core import backends as bk
from comfy_env_attn.core import choose
from comfy_env_attn.core.lockmodel import BenchRow, stale_reasons, tool_table
from comfy_env_attn.facts.installed import installed_backends, read_installed

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from comfy_env_attn.runtime import dispatch
from comfy_env_attn.runtime.live import live_facts
from comfy_env_attn.verify.run import Options, verify

TORCH_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])
LABEL = f"cu128torch{TORCH_MINOR}"
KERNEL = "sageattn_qk_int8_pv_fp16_cuda"

# sageattn (the fp8-PV kernel on a real GPU) and, optionally, the fp16-PV kernel with the
# real one's signature; each may ignore is_causal or answer garbage.
FAKE = '''
import torch
import torch.nn.functional as F
CALLS = []

def _attend(q, k, v, causal, scale, wrong):
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                         scale=scale)
    return (out * 0.5 if wrong else out).to(q.dtype)

def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
    CALLS.append(("sageattn", is_causal))
    assert tensor_layout == "HND"
    return _attend(q, k, v, is_causal and not {sage_ignores_causal}, sm_scale, {sage_wrong})
'''
FP16 = '''
def sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout="HND", is_causal=False,
                                  qk_quant_gran="per_thread", sm_scale=None,
                                  pv_accum_dtype="fp32", smooth_k=True, smooth_v=False,
                                  return_lse=False, **kwargs):
    CALLS.append(("fp16", is_causal, pv_accum_dtype))
    assert tensor_layout == "HND"
    return _attend(q, k, v, is_causal and not {fp16_ignores_causal}, sm_scale, {fp16_wrong})
'''


def source(*, fp16: str | None = "ok", sage: str = "ok") -> str:
    """fp16: None (no such function, as SageAttention 1.x), "ok", "ignores_causal" or
    "wrong"; sage: "ok", "ignores_causal" or "wrong"."""
    src = FAKE.format(sage_ignores_causal=sage == "ignores_causal", sage_wrong=sage == "wrong")
    if fp16 is not None:
        src += FP16.format(fp16_ignores_causal=fp16 == "ignores_causal",
                           fp16_wrong=fp16 == "wrong")
    return src


def fake_sage(folder: Path, version: str = "2.2.0", **kw: str | None) -> Path:
    """sageattention and its dist-info in `folder`, as an install leaves them."""
    return installed_sage(folder, source(**kw), version)


def proven(folder: Path) -> tuple[dict, Path]:
    """Real verification of ["sage"] with `folder` on the target's path; its lock."""
    results = verify(sys.executable, ["sage"], Options(
        shapes=[[1, 2, 128, 64]], head_dims=(64,), min_time=0.05,
        env={"PYTHONPATH": str(folder)}))
    lock = folder / "pylock.toml"
    lockfile.write(lock, lockfile.build([], lockfile.tool_table_from(
        results, python=sys.executable)))
    return results, lock


@pytest.fixture(scope="module")
def fp8_ignores_causal(tmp_path_factory) -> tuple[Path, dict, Path]:
    """sageattn ignores is_causal (as the fp8 kernel failed causal on an H100); the fp16 one
    is right."""
    folder = fake_sage(tmp_path_factory.mktemp("fp8bad") / "site", sage="ignores_causal")
    return (folder, *proven(folder))


@pytest.fixture
def fresh(fresh, monkeypatch):  # conftest's, with no timing of close calls
    monkeypatch.setenv("COMFY_ENV_ATTN_SETTLE", "0")


def qkv(n: int = 128, d: int = 64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, d, generator=g).bfloat16() for _ in range(3))


# -- names: one distribution, two backends ------------------------------------------------

def test_names_aliases_and_one_backend_per_distribution(tmp_path: Path) -> None:
    for alias in ("sage_fp16", "sage_safe", "SAGE-FP16PV", "sage-fp16", KERNEL):
        assert bk.canonical(alias) == "sage_fp16", alias
    assert bk.canonical("sageattention") == "sage"  # the package names its primary
    assert bk.BY_DIST["sageattention"] == "sage" and "sage_fp16" not in bk.BY_DIST.values()
    assert bk.primary("sage_fp16") == "sage" and bk.primary("sage") == "sage"
    assert bk.primary("not-a-backend") == "not-a-backend"
    assert bk.variants("sage") == ["sage_fp16"] and bk.variants("flash") == []
    everything = bk.parse_list("all")
    assert "sage_fp16" not in everything and "sage" in everything
    dists = [bk.BACKENDS[n].dist for n in everything]
    assert len(dists) == len(set(dists))  # each distribution once
    assert bk.parse_list("sage_fp16") == ["sage"]
    assert bk.parse_list("sage_safe, sage, flash") == ["sage", "flash"]
    site = fake_sage(tmp_path / "site")
    assert installed_backends(read_installed([str(site)])) == ["sage"]


def test_what_the_variant_claims() -> None:
    b = bk.BACKENDS["sage_fp16"]
    assert (b.dist, b.import_name, b.kernel, b.variant_of) == (
        "sageattention", "sageattention", KERNEL, "sage")
    assert b.quantized and b.fp16_pv
    # safe mode, judged from what each backend declares (the dispatcher's unverified mode)
    assert [n for n in ("sage_fp16", "sage", "sage3", "flash")
            if choose.mode_reason(n, None, safe=True) is None] == ["sage_fp16", "flash"]
    assert [n for n in ("sage_fp16", "sage", "sage3", "flash", "sdpa")
            if choose.mode_reason(n, None, exact=True) is None] == ["flash", "sdpa"]
    assert b.caps.dtypes == bk.HALF and max(b.caps.head_dims) == 128
    assert b.caps.masks == frozenset() and not b.caps.varlen
    assert b.thresholds() == bk.QUANTIZED_LIMITS
    runs = {cc: b.runs_on_sm(cc) for cc in ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0),
                                            (10, 3), (11, 0), (12, 0), (12, 1), (13, 0))}
    assert [cc for cc, ok in runs.items() if ok] == [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0),
                                                      (12, 0), (12, 1)]
    call = bk.Call("bfloat16", 64, 128, 128, mask="bool", capability=(9, 0))
    assert b.not_supported_reasons(call) == [f"{b.title} takes no attention mask"]


def test_a_plan_has_one_sageattention_row(tmp_path: Path) -> None:
    from comfy_env_attn.candidates.sources import Candidate
    from comfy_env_attn.resolve import resolve

    wheel = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    cand = Candidate(filename=wheel, url="https://example.invalid/" + wheel, source="test")
    for names in (["sage_fp16"], ["sage", "sage_fp16"], ["sage_fp16", "sage"]):
        plan = resolve(make_system(), [cand], names)
        assert [b.backend for b in plan.backends] == ["sdpa", "sage"], names
        assert plan.get("sage").selected.filename == wheel  # type: ignore[union-attr]
    # the command line: `plan --backends sage_fp16` is sageattention's one row
    folder = tmp_path / "wheels"
    build_wheel(folder, "sageattention", f"2.2.0+{LABEL}",
                {"sageattention/__init__.py": source()})
    r = cli("plan", "--system", str(write_gpu_profile(tmp_path)), "--find-links", str(folder),
            "--no-embedded-index", "--backends", "sage_fp16", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["backends"]
    assert [b["backend"] for b in rows] == ["sdpa", "sage"]
    assert rows[1]["selected"]["filename"].startswith("sageattention-2.2.0")


# -- verified, timed, locked and chosen on its own -----------------------------------------

def test_the_variant_is_verified_timed_and_locked_on_its_own(fp8_ignores_causal,
                                                              monkeypatch) -> None:
    folder, results, lock = fp8_ignores_causal
    assert list(results) == ["sdpa", "sage", "sage_fp16"]  # its variant with sage
    table = tool_table(lockfile.read(lock))
    sage, fp16 = table.backends["sage"], table.backends["sage_fp16"]
    assert sage.verified and fp16.verified and fp16.quantized
    assert fp16.version == "2.2.0" and fp16.title == "SageAttention (int8 QK, fp16 PV)"
    assert not sage.proven("causal", 64, "bfloat16")
    assert fp16.proven("causal", 64, "bfloat16") and fp16.proven("gqa", 64, "bfloat16")
    assert {c.variant for c in fp16.checks} == {"plain", "causal", "scale", "cross", "gqa"}
    assert {(c.head_dim, c.dtype) for c in fp16.checks} == {(64, "bfloat16")}  # half only
    assert [b.label() for b in fp16.bench] == ["1x2x128x64"] and fp16.bench[0].timed
    # one distribution, one fingerprint entry; the variant is trusted through it
    assert list(table.fingerprint.backends) == ["sage"]
    assert set(table.verified()) == {"sdpa", "sage", "sage_fp16"}
    assert "sage_fp16" in table.auto and "sage_fp16" not in table.exact
    monkeypatch.syspath_prepend(str(folder))
    assert stale_reasons(table, live_facts()) == []


def _ranked(lock: Path, out: Path, **tflops: float) -> Path:
    """The same verified lock with its throughputs set by hand (the CPU's are noise)."""
    table = tool_table(lockfile.read(lock))
    backends = {n: replace(r, bench=tuple(BenchRow((1, 2, 128, 64), "bfloat16", ms=1.0,
                                                   tflops=tflops[n]) for _ in r.bench[:1]))
                for n, r in table.backends.items()}
    lockfile.write(out, lockfile.build([], replace(table, backends=backends)))
    return out


def test_auto_safe_and_exact_choose_between_the_two_kernels(fp8_ignores_causal, tmp_path,
                                                             monkeypatch, fresh) -> None:
    folder, _, lock = fp8_ignores_causal
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(_ranked(
        lock, tmp_path / "l.toml", sage=3.0, sage_fp16=2.0, sdpa=1.0)))
    import sageattention

    q, k, v = qkv()

    def run(**kw: bool) -> list:
        sageattention.CALLS.clear()
        out = dispatch.dispatch_attention(q, k, v, **kw)
        exp = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        torch.testing.assert_close(out.float(), exp, atol=3e-2, rtol=3e-2)
        return list(sageattention.CALLS)

    dispatch.set_backend("auto")
    assert run() == [("sageattn", False)]  # the fastest
    # causal: sage failed it, the variant passed it: the variant, with fp32 accumulation
    assert run(is_causal=True) == [("fp16", True, "fp32")]
    order, over = dispatch.passed_over(q, k, is_causal=True)
    assert order == ["sage_fp16", "sdpa"]
    assert "causal at head dim 64 bfloat16 failed verification" in dict(over)["sage"][0]
    label = dispatch.set_backend("auto", safe=True)
    assert label.startswith("auto (safe): SageAttention (int8 QK, fp16 PV) 2.2.0, verified")
    assert run() == [("fp16", False, "fp32")]
    _, over = dispatch.passed_over(q, k)
    assert dict(over)["sage"] == ("SageAttention quantizes P.V below fp16 and safe mode is on",)
    dispatch.set_backend("auto", exact=True)
    assert run() == [] and run(is_causal=True) == []
    _, over = dispatch.passed_over(q, k)
    assert "exact mode is on" in dict(over)["sage_fp16"][0]
    assert dispatch.set_backend("sage_safe").startswith(
        "SageAttention (int8 QK, fp16 PV) 2.2.0, verified")  # by an alias
    assert run() == [("fp16", False, "fp32")]


def test_a_variant_that_ignores_causal_is_locked_for_what_it_passed(tmp_path, monkeypatch,
                                                                     fresh) -> None:
    folder = fake_sage(tmp_path / "site", fp16="ignores_causal")
    results, lock = proven(folder)
    assert results["sage"].passed and results["sage_fp16"].passed
    fp16 = tool_table(lockfile.read(lock)).backends["sage_fp16"]
    assert fp16.proven("plain", 64, "bfloat16") and not fp16.proven("causal", 64, "bfloat16")
    assert "not proven: causal (64 bfloat16)" in results["sage_fp16"].summary()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(lock))
    import sageattention

    dispatch.set_backend("sage_fp16")
    q, k, v = qkv()
    out = dispatch.dispatch_attention(q, k, v, is_causal=True)  # not proven: SDPA
    assert sageattention.CALLS == []
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True), atol=3e-2, rtol=3e-2)
    dispatch.dispatch_attention(q, k, v)
    assert sageattention.CALLS == [("fp16", False, "fp32")]


def test_a_sageattention_without_the_kernel_leaves_the_variant_unlocked(tmp_path) -> None:
    folder = fake_sage(tmp_path / "site", version="1.0.6", fp16=None)
    results, lock = proven(folder)
    assert results["sage"].passed and not results["sage_fp16"].passed
    assert results["sage_fp16"].data["stage"] == "import"
    why = f"ImportError: sageattention 1.0.6 has no {KERNEL}"
    assert results["sage_fp16"].error == why
    table = tool_table(lockfile.read(lock))
    rec = table.backends["sage_fp16"]
    assert rec.status == "failed" and rec.error == why and rec.checks == ()
    assert "sage_fp16" not in table.verified() and "sage_fp16" not in table.auto
    assert table.backends["sage"].verified


# -- through the installer: the variant never fails an install ---------------------------

@pytest.mark.parametrize("fp16", [None, "wrong"])
def test_a_missing_or_failing_variant_never_fails_an_install(tmp_path: Path, venv: Path,
                                                             fp16: str | None) -> None:
    folder = tmp_path / "wheels"
    build_wheel(folder, "sageattention", f"2.2.0+{LABEL}",
                {"sageattention/__init__.py": source(fp16=fp16)}, requires=["torch>=2.0"])
    py = str(venv_python(venv))
    env = {"COMFY_ENV_ATTN_VERIFY_HEAD_DIMS": "64"}
    r = cli("install", "--python", py, "--system", str(write_gpu_profile(tmp_path)),
            "--find-links", str(folder), "--no-embedded-index", "--backends", "sage_fp16",
            "--shapes", "1x2x128x64", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    rows = {b["backend"]: b for b in doc["backends"]}
    assert doc["ok"] is True and rows["sage"]["action"] == "installed"
    assert rows["sage"]["verification"]["passed"] is True
    assert rows["sage_fp16"]["action"] == "none"
    assert rows["sage_fp16"]["verification"]["passed"] is False
    reason = rows["sage_fp16"]["verification"]["error"]
    assert (f"has no {KERNEL}" if fp16 is None else "no plain call passed") in reason
    have = read_installed([str(venv_site(venv))])
    assert have["sageattention"].version == f"2.2.0+{LABEL}"  # kept, not rolled back
    table = tool_table(lockfile.read(Path(doc["lock"])))
    assert table.backends["sage"].verified and table.backends["sage_fp16"].status == "failed"
    assert table.backends["sage_fp16"].error == reason
    r = cli("verify", "--python", py, "--shapes", "1x2x128x64", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is True


def test_a_rolled_back_package_takes_its_variant_out_of_the_lock(tmp_path: Path,
                                                                 venv: Path) -> None:
    folder = tmp_path / "wheels"
    build_wheel(folder, "sageattention", f"2.2.0+{LABEL}",
                {"sageattention/__init__.py": source(sage="wrong")}, requires=["torch>=2.0"])
    r = cli("install", "--python", str(venv_python(venv)), "--system",
            str(write_gpu_profile(tmp_path)), "--find-links", str(folder),
            "--no-embedded-index", "--backends", "sage", "--shapes", "1x2x128x64", "--json",
            env={"COMFY_ENV_ATTN_VERIFY_HEAD_DIMS": "64"})
    assert r.returncode == 1, r.stdout + r.stderr  # sage failed: rolled back
    doc = json.loads(r.stdout)
    rows = {b["backend"]: b for b in doc["backends"]}
    assert rows["sage"]["action"] == "rolled-back"
    assert "sageattention" not in read_installed([str(venv_site(venv))])
    table = tool_table(lockfile.read(Path(doc["lock"])))
    assert "sage_fp16" not in table.backends  # it was proven in a package now gone
    # the fingerprint describes the files as the rollback left them: the lock is fresh
    r = cli("lock", "--python", str(venv_python(venv)), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fresh"] is True, r.stdout + r.stderr


def test_uninstall_takes_the_variant_out_of_the_lock(tmp_path: Path, venv: Path) -> None:
    folder = tmp_path / "wheels"
    build_wheel(folder, "sageattention", f"2.2.0+{LABEL}",
                {"sageattention/__init__.py": source()}, requires=["torch>=2.0"])
    py = str(venv_python(venv))
    env = {"COMFY_ENV_ATTN_VERIFY_HEAD_DIMS": "64"}
    r = cli("install", "--python", py, "--system", str(write_gpu_profile(tmp_path)),
            "--find-links", str(folder), "--no-embedded-index", "--backends", "sage",
            "--shapes", "1x2x128x64", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lock = venv / lockfile.LOCK_NAME
    assert tool_table(lockfile.read(lock)).backends["sage_fp16"].verified
    # the variant is a kernel of sage's package: naming it alone is refused, saying so
    r = cli("uninstall", "--python", py, "--backends", "sage_fp16")
    assert r.returncode == 2 and "`--backends sage` removes both" in r.stderr, r.stderr
    assert "sageattention" in read_installed([str(venv_site(venv))])
    r = cli("uninstall", "--python", py, "--backends", "sage")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sageattention" not in read_installed([str(venv_site(venv))])
    table = tool_table(lockfile.read(lock))
    assert "sage" not in table.backends and not table.fingerprint.backends
    assert "sage_fp16" not in table.backends


def test_a_variant_the_package_lacks_is_said_so_not_failed() -> None:
    from comfy_env_attn.verify.run import Result

    lacking = Result("sage_fp16", False, {"stage": "import"}, f"ImportError: has no {KERNEL}")
    assert lacking.summary() == f"n/a: not in this package (ImportError: has no {KERNEL})"
    wrong = Result("sage_fp16", False, {"stage": "accuracy"}, "no plain call passed")
    assert wrong.summary() == "failed: no plain call passed"  # present, and wrong
    broken = Result("sage", False, {"stage": "import"}, "ImportError: undefined symbol")
    assert broken.summary() == "failed: ImportError: undefined symbol"  # the package itself


def test_the_lock_table_says_a_lacking_variant_as_install_does(tmp_path: Path) -> None:
    from test_dispatch import write_lock

    from comfy_env_attn.core.lockmodel import BackendRecord

    lock = write_lock(tmp_path / "l.toml", sage=None)
    table = tool_table(lockfile.read(lock))
    table.backends["sage_fp16"] = BackendRecord("sage_fp16", "failed", stage="import",
                                                error=f"ImportError: has no {KERNEL}")
    lockfile.write(lock, lockfile.build([], table))
    r = cli("lock", "--file", str(lock))
    row = next(ln for ln in r.stdout.splitlines() if "sage_fp16" in ln)
    assert "n/a" in row and "failed" not in row and "not in this" in row, r.stdout


def test_the_lock_table_names_the_calls_a_verified_backend_was_not_proven_for(
        tmp_path: Path) -> None:
    """A backend verified for most of its calls (SageAttention's causal on sm 9.0): the lock's
    table says which calls were not proven, as install's summary line does, and that they
    go to SDPA; a backend proven for all says nothing of it."""
    from test_dispatch import sage_record, write_lock

    from comfy_env_attn.core.lockmodel import Check
    from comfy_env_attn.verify.run import Result

    checks = [Check("plain", d, t, True) for d in (64, 128) for t in ("float16", "bfloat16")]
    checks += [Check("causal", d, t, d == 128) for d in (40, 64, 128)
               for t in ("float16", "bfloat16")]
    lock = write_lock(tmp_path / "l.toml", sage=sage_record(checks=tuple(checks)))
    r = cli("lock", "--file", str(lock), env={"COLUMNS": "250"})
    rows = {ln.split("│")[1].strip(): ln for ln in r.stdout.splitlines() if ln.count("│") > 3}
    said = "not proven, to SDPA: causal (40 float16, 40 bfloat16, 64 float16, 64 bfloat16)"
    assert said in rows["sage"], r.stdout
    assert "not proven" not in rows["sdpa"]
    as_install = Result("sage", True, {"checks": [c.to_dict() for c in checks]}).summary()
    assert as_install.endswith("; " + said.replace(", to SDPA", "")), as_install


def test_a_long_error_is_one_line_in_the_summary_and_whole_in_the_result() -> None:
    """xformers' "No operator found" lists every kernel it tried, over many lines: a row and
    the progress line give it as one line, cut; the result (and --json) keeps it whole."""
    from comfy_env_attn.verify.run import ONE_LINE_MAX, Result

    error = ("NotImplementedError: No operator found for `memory_efficient_attention_forward`"
             " with inputs:\n" + "".join(f"     query : shape=(1, {i}, 2, 64)\n"
                                         for i in range(40))
             + "`cutlassF` is not supported because:\n    xFormers wasn't build with CUDA")
    r = Result("xformers", False, {}, error)
    line = r.summary()
    assert "\n" not in line and line.startswith("failed: NotImplementedError: No operator found")
    assert len(line) <= len("failed: ") + ONE_LINE_MAX + 40 and line.endswith(
        " ... (--json gives the whole error)")
    assert r.error == error  # whole where it is kept
    short = Result("xformers", False, {}, "ImportError:\n  undefined symbol")
    assert short.summary() == "failed: ImportError: undefined symbol"
