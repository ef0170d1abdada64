"""Every rule of FACTS.md section 4 on invented Systems. No I/O but the embedded index."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import make_system

from comfy_env_attn.candidates.sources import Candidate, load_embedded
from comfy_env_attn.resolve import resolve

GH = "https://example.invalid/"


def cand(filename: str, **kw: object) -> Candidate:
    return Candidate(filename=filename, url=GH + filename, source="test", **kw)  # type: ignore[arg-type]


def reasons_for(system, filename: str, backend: str = "sage", **kw: object) -> list[str]:
    plan = resolve(system, [cand(filename, **kw)], [backend])
    bp = plan.get(backend)
    assert bp is not None
    if bp.selected is not None:
        return []
    assert len(bp.rejected) == 1
    return [r.text for r in bp.rejected[0].reasons]


SAGE = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"


def test_a_fitting_wheel_is_selected() -> None:
    plan = resolve(make_system(), [cand(SAGE)], ["sage"])
    assert plan.get("sage").selected.filename == SAGE  # type: ignore[union-attr]
    assert plan.get("sdpa").builtin  # type: ignore[union-attr]


def test_python_version_mismatch_names_both_sides() -> None:
    r = reasons_for(make_system(python="3.11.9"), SAGE)
    assert r == ["built for CPython 3.12 (cp312-cp312); target is Python 3.11.9"]


def test_abi3_covers_newer_python_not_older() -> None:
    f = "sageattention-2.2.0+cu128torch2.8.0.post3-cp310-abi3-manylinux_2_28_x86_64.whl"
    assert reasons_for(make_system(python="3.13.1"), f) == []
    r = reasons_for(make_system(python="3.9.1"), f)
    assert len(r) == 1 and "3.10+" in r[0] and "3.9.1" in r[0]


def test_free_threaded_tags_fit_only_free_threaded() -> None:
    f = "sageattention-2.2.0+cu128torch2.8-cp313-cp313t-manylinux_2_28_x86_64.whl"
    r = reasons_for(make_system(python="3.13.1"), f)
    assert r and "free-threaded" in r[0]
    assert reasons_for(make_system(python="3.13.1", free_threaded=True), f) == []
    # ...and a free-threaded interpreter takes no abi3 wheel
    f3 = "sageattention-2.2.0+cu128torch2.8-cp39-abi3-manylinux_2_28_x86_64.whl"
    assert reasons_for(make_system(python="3.13.1", free_threaded=True), f3)


def test_manylinux_needs_glibc() -> None:
    f = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_34_x86_64.whl"
    r = reasons_for(make_system(glibc="2.31"), f)
    assert r == ["needs glibc >= 2.34 (manylinux_2_34_x86_64); target has glibc 2.31"]
    assert reasons_for(make_system(glibc="2.35"), f) == []


def test_compound_tag_fits_if_any_part_fits() -> None:
    f = ("sageattention-2.2.0+cu128torch2.8-cp312-cp312-"
         "manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl")
    assert reasons_for(make_system(glibc="2.17"), f) == []


def test_plain_linux_tag_fits_any_glibc_on_that_arch() -> None:
    f = "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    assert reasons_for(make_system(glibc="2.17"), f, "flash") == []
    r = reasons_for(make_system(arch="aarch64"), f, "flash")
    assert r == ["built for linux x86_64 (linux_x86_64); target is linux aarch64"]


def test_windows_wheel_on_linux_and_back() -> None:
    f = "sageattention-2.2.0+cu128torch2.8.0.post3-cp39-abi3-win_amd64.whl"
    assert reasons_for(make_system(), f) == [
        "built for windows amd64 (win_amd64); target is linux x86_64"]
    assert reasons_for(make_system(platform="windows", glibc=None), f) == []


def test_torch_minor_must_match() -> None:
    r = reasons_for(make_system(torch="2.9.1+cu128"), SAGE)
    assert r == ["built for torch 2.8, target has torch 2.9.1+cu128"]


def test_no_torch_in_target() -> None:
    r = reasons_for(make_system(torch=None, torch_cuda=None), SAGE)
    assert "built for torch 2.8; target has no torch installed" in r


def test_andhigher_is_a_floor() -> None:
    f = "sageattention-2.2.0+cu130torch2.10.0andhigher.post6-cp310-abi3-win_amd64.whl"
    win = dict(platform="windows", glibc=None, torch_cuda="13.0", driver_cuda="13.0",
               driver="580.88")
    assert reasons_for(make_system(torch="2.11.0+cu130", **win), f) == []
    r = reasons_for(make_system(torch="2.9.1+cu130", **win), f)
    assert r == ["built for torch >= 2.10 (stable ABI), target has torch 2.9.1+cu130"]


def test_metadata_torch_pin() -> None:
    f = "xformers-0.0.33.post2-cp39-abi3-manylinux_2_28_x86_64.whl"
    r = reasons_for(make_system(torch="2.10.0+cu128"), f, "xformers", requires_torch="==2.9.1")
    assert r == ["requires torch==2.9.1 (its metadata), target has torch 2.10.0+cu128: "
                 "installing it would replace torch"]


def test_recorded_build_torch_without_label() -> None:
    f = "xformers-0.0.30-cp312-cp312-manylinux_2_28_x86_64.whl"
    r = reasons_for(make_system(torch="2.8.0+cu128"), f, "xformers", built_torch="2.7.0+cu126",
                    cuda="12.6")
    assert r == ["built against torch 2.7.0+cu126 (recorded in the wheel), target has torch "
                 "2.8.0+cu128"]
    # a range in its metadata claims a stable ABI: a note, verification decides
    f35 = "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl"
    plan = resolve(make_system(torch="2.11.0+cu128"),
                   [cand(f35, requires_torch=">=2.10", built_torch="2.10.0+cu128",
                         cuda="12.8")], ["xformers"])
    bp = plan.get("xformers")
    assert bp.selected is not None  # type: ignore[union-attr]
    assert any("verification decides" in n for n in bp.notes)  # type: ignore[union-attr]


def test_cuda_major_and_minor() -> None:
    r = reasons_for(make_system(torch="2.8.0+cu126", torch_cuda="12.6"), SAGE)
    assert r == ["built for CUDA 12.8, newer than target torch's CUDA 12.6"]
    f13 = "sageattention-2.2.0+cu130torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    r = reasons_for(make_system(driver_cuda="13.0", driver="580.1"), f13)
    assert r == ["built for CUDA 13.0, target's torch uses CUDA 12.8"]
    older = "sageattention-2.2.0+cu126torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert reasons_for(make_system(), older) == []


def test_cuda_major_only_label_fits_any_minor() -> None:
    f = "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    assert reasons_for(make_system(torch_cuda="12.1", driver_cuda="12.2"), f, "flash") == []


def test_cpu_torch_refuses_cuda_wheels() -> None:
    r = reasons_for(make_system(torch="2.8.0+cpu", torch_cuda=None), SAGE)
    assert r == ["built for CUDA 12.8; target's torch 2.8.0+cpu is a CPU build "
                 "(torch.version.cuda is None)"]
    r = reasons_for(make_system(torch="2.8.0+cpu", torch_cuda=None),
                    "sageattention-1.0.6-py3-none-any.whl")
    assert r == ["needs a CUDA build of torch; target's torch 2.8.0+cpu is a CPU build "
                 "(torch.version.cuda is None)"]


def test_driver_must_support_the_cuda_major() -> None:
    f = "sageattention-2.2.0+cu130torch2.11-cp312-cp312-manylinux_2_28_x86_64.whl"
    sysm = make_system(torch="2.11.0+cu130", torch_cuda="13.0", driver="570.124.06",
                       driver_cuda="12.8")
    r = reasons_for(sysm, f)
    assert r == ["needs a driver for CUDA 13.x (>= 580); driver 570.124.06 supports CUDA 12.8"]
    old = make_system(driver="520.61.05", driver_cuda="12.8")
    assert reasons_for(old, SAGE) == ["CUDA 12.x needs driver >= 525.60.13; target has driver "
                                      "520.61.05"]


def test_cxx11abi() -> None:
    f = "flash_attn-2.8.3+cu12torch2.8cxx11abiFALSE-cp312-cp312-linux_x86_64.whl"
    r = reasons_for(make_system(), f, "flash")
    assert r == ["built with cxx11abi=FALSE, target torch has cxx11abi=TRUE"]


def test_gpu_arch_rules() -> None:
    # SASS for 8.0 runs on 8.6/8.9, not on 9.0 or 12.0 without PTX
    sm = ("8.0", "8.6")
    assert reasons_for(make_system(gpus=("8.9",)), SAGE, sm=sm) == []
    r = reasons_for(make_system(gpus=("9.0",)), SAGE, sm=sm)
    assert r == ['compiled for sm 8.0, 8.6; target GPU sm 9.0 is not among them ("no kernel '
                 'image is available")']
    assert reasons_for(make_system(gpus=("12.0",)), SAGE, sm=("8.0", "9.0+PTX")) == []
    # sm_90a only on 9.0
    f = "flash_attn_3-3.0.0+cu128torch2.8gitabcdef0-cp39-abi3-linux_x86_64.whl"
    assert reasons_for(make_system(gpus=("9.0",)), f, "flash3", sm=("9.0a",)) == []


def test_backend_kernel_support() -> None:
    r = reasons_for(make_system(gpus=("10.0",)), SAGE)
    assert len(r) == 1 and "SageAttention has no kernels for sm 10.0" in r[0]
    r = reasons_for(make_system(gpus=("8.6",)), SAGE.replace("sageattention-2.2.0",
                    "flash_attn_3-3.0.0"), "flash3")
    assert "FlashAttention 3 has no kernels for sm 8.6" in r[0]
    sage3 = "sageattn3-1.0.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert reasons_for(make_system(gpus=("12.0",)), sage3, "sage3") == []
    assert "no kernels for sm 8.9" in reasons_for(make_system(), sage3, "sage3")[0]


def test_no_gpu_is_a_reason_and_why_none_is_seen_a_fact_of_the_system() -> None:
    s = make_system(gpus=(), absent={"gpus": "NVML: Driver Not Loaded"})
    assert reasons_for(s, SAGE) == ["SageAttention needs an NVIDIA GPU; target has none"]
    plan = resolve(s, [cand(SAGE)], ["sage"])
    assert plan.to_json()["absent"] == {"gpus": "NVML: Driver Not Loaded"}


def test_all_reasons_not_only_the_first() -> None:
    s = make_system(python="3.11.2", torch="2.9.1+cu126", torch_cuda="12.6", glibc="2.31",
                    gpus=("10.0",))
    f = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_34_x86_64.whl"
    plan = resolve(s, [cand(f)], ["sage"])
    kinds = {r.kind for r in plan.get("sage").rejected[0].reasons}  # type: ignore[union-attr]
    assert kinds == {"python", "platform", "torch", "cuda", "gpu"}


def test_yanked_and_unparseable() -> None:
    plan = resolve(make_system(), [cand(SAGE, yanked="broken build"),
                                   cand("sageattention-2.2.0-cp312.whl")], ["sage"])
    bp = plan.get("sage")
    assert bp.selected is None  # type: ignore[union-attr]
    texts = [r.reasons[0].text for r in bp.rejected]  # type: ignore[union-attr]
    assert "yanked from its index: broken build" in texts
    assert any("wrong number of parts" in t for t in texts)
    assert "2 candidates rejected" in bp.reason  # type: ignore[union-attr,operator]


def test_unknown_label_is_rejected_with_reason() -> None:
    f = "sageattention-2.2.0+weird-cp312-cp312-manylinux_2_28_x86_64.whl"
    r = reasons_for(make_system(), f)
    assert r == ["local version label 'weird' follows no known convention: its torch and CUDA "
                 "are unknown"]


def test_ranking_version_then_cuda_minor_then_specific_tag() -> None:
    a = "sageattention-2.1.1+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    b = "sageattention-2.2.0+cu126torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    c = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
    d = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_34_x86_64.whl"
    e = "sageattention-2.2.0+cu128torch2.8-cp39-abi3-manylinux_2_34_x86_64.whl"
    plan = resolve(make_system(glibc="2.35"), [cand(x) for x in (a, b, c, d, e)], ["sage"])
    bp = plan.get("sage")
    assert bp.selected.filename == d  # type: ignore[union-attr]
    ranked = {r.candidate.filename for r in bp.rejected}  # type: ignore[union-attr]
    assert ranked == {a, b, c, e}
    assert all(r.reasons[0].kind == "ranked" for r in bp.rejected)  # type: ignore[union-attr]
    # each says what decided it, not the whole ranking rule
    why = {r.candidate.filename: r.reasons[0].text.rsplit(": ", 1)[1]
           for r in bp.rejected}  # type: ignore[union-attr]
    assert why == {a: "a newer version", b: "a closer CUDA minor",
                   c: "a more specific platform tag", e: "a more specific platform tag"}


def test_plan_json_stable_part() -> None:
    plan = resolve(make_system(), [cand(SAGE, sha256="ab" * 32)], ["sage", "flash"])
    doc = plan.to_json()
    assert doc["schema"] == 1 and doc["system"]["python"] == "3.12.3"
    by = {b["backend"]: b for b in doc["backends"]}
    assert by["sdpa"]["selected"]["builtin"] is True
    assert by["sage"]["selected"]["sha256"] == "ab" * 32
    assert by["flash"]["selected"] is None and "no flash-attn wheel" in by["flash"]["reason"]


@pytest.mark.parametrize("system,expect", [
    # H100 machine of issue 5: torch 2.11 + CUDA 13.0, Python 3.12, sm 9.0
    (make_system(torch="2.11.0+cu130", torch_cuda="13.0", driver="580.95.05",
                 driver_cuda="13.0", gpus=("9.0",), glibc="2.35"),
     {"sage": "sageattention-2.2.0+cu130torch2.11-cp312-cp312-manylinux_2_24_x86_64."
              "manylinux_2_28_x86_64.whl",
      "flash4": "flash_attn_4-4.0.0b36-py3-none-any.whl", "sage3": None}),
    # Windows portable, RTX 4090, torch 2.8 + cu128
    (make_system(platform="windows", glibc=None, python="3.12.10", gpus=("8.9",)),
     {"sage": "sageattention-2.2.0+cu128torch2.8.0.post3-cp39-abi3-win_amd64.whl",
      "flash4": None}),
])
def test_embedded_index_picks(system, expect) -> None:
    plan = resolve(system, load_embedded(), list(expect))
    for backend, filename in expect.items():
        bp = plan.get(backend)
        got = bp.selected.filename if bp.selected else None  # type: ignore[union-attr]
        assert got == filename, (backend, bp.reason)  # type: ignore[union-attr]


def test_embedded_index_has_real_sources() -> None:
    cands = load_embedded()
    sources = {c.source for c in cands}
    assert {"embedded:PyPI", "embedded:Comfy-Forge/cuda-wheels",
            "embedded:mjun0812/flash-attention-prebuild-wheels",
            "embedded:woct0rdho/SageAttention", "embedded:Dao-AILab/flash-attention"} <= sources
    pypi = [c for c in cands if c.source == "embedded:PyPI"]
    assert all(c.sha256 and len(c.sha256) == 64 for c in pypi)
    x = next(c for c in pypi if c.filename.startswith("xformers-0.0.33.post2-")
             and "manylinux" in c.filename)
    assert x.requires_torch == "==2.9.1" and x.built_torch == "2.9.1+cu128"


def test_build_facts_of_the_same_file_are_merged_across_sources() -> None:
    # Found on the H100: a carried copy of xformers 0.0.35 (find-links, no facts) hid what
    # the embedded index records (built with CUDA 12.8), so the plan took it for a CUDA 13
    # torch; it then failed verification ("xFormers wasn't built with CUDA support").
    f = "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl"
    sysm = make_system(python="3.12.3", torch="2.11.0+cu130", torch_cuda="13.0",
                       driver="580.159.04", driver_cuda="13.0", gpus=("9.0",))
    carried = Candidate(filename=f, url="file:///w/" + f, source="find-links:/w")
    known = cand(f, requires_torch=">=2.10", built_torch="2.10.0+cu128", cuda="12.8",
                 sha256="ab" * 32)
    plan = resolve(sysm, [carried, known], ["xformers"])
    bp = plan.get("xformers")
    assert bp.selected is None  # type: ignore[union-attr]
    (rej,) = bp.rejected  # type: ignore[union-attr]
    assert rej.candidate.url == "file:///w/" + f and rej.candidate.sha256 == "ab" * 32
    assert [r.text for r in rej.reasons] == ["built for CUDA 12.8, target's torch uses CUDA 13.0"]
    # a listing whose hash contradicts is another file: nothing is taken from it
    other = cand(f, cuda="12.8", sha256="cd" * 32)
    mine = Candidate(filename=f, url="file:///w/" + f, source="x", sha256="ef" * 32)
    assert resolve(sysm, [mine, other], ["xformers"]).get("xformers").selected is not None  # type: ignore[union-attr]


def test_rule_counts_count_wheels_not_reasons() -> None:
    """A wheel built against another torch that also requires another torch is one wheel
    the torch rules passed over, not two (the plan table's counts never exceed its total)."""
    from comfy_env_attn.resolve import Reason, Rejected, rule_counts

    def rejected(name: str, *kinds: str) -> Rejected:
        return Rejected(Candidate(f"{name}-1.0-py3-none-any.whl", "u", "s"),
                        tuple(Reason(k, f"{k} rule") for k in kinds))

    out = rule_counts([rejected("a", "torch", "torch", "cuda"), rejected("b", "torch")], 4)
    assert out == "torch 2, cuda 1"


def test_rule_counts_order_ties_the_same_in_every_run() -> None:
    """Kinds counted alike come in their names' order whatever the string hashes of the
    process (a set's order changes from run to run with PYTHONHASHSEED)."""
    code = ("from comfy_env_attn.candidates.sources import Candidate\n"
            "from comfy_env_attn.resolve import Reason, Rejected, rule_counts\n"
            "r = [Rejected(Candidate(f'w{i}-1.0-py3-none-any.whl', 'u', 's'), "
            "(Reason('gpu', 'g'), Reason('cuda', 'c'), Reason('torch', 't'))) for i in range(3)]\n"
            "print(rule_counts(r, 2))\n")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}
                           ).stdout.strip() for seed in range(8)}
    assert seen == {"cuda 3, gpu 3"}


def test_nothing_fits_names_the_closest_wheel_and_what_stands_in_its_way() -> None:
    """Among many wheels rejected for torch, Python and CUDA, the one that fails only for
    the driver is named with that reason: the counts alone (torch 2, python 2, ...) never
    said 'driver', the one thing to change."""
    sysm = make_system(python="3.12.3", torch="2.11.0+cu130", torch_cuda="13.0",
                       driver="570.124.06", driver_cuda="12.8")
    near = "sageattention-2.2.0+cu130torch2.11-cp312-cp312-manylinux_2_28_x86_64.whl"
    far = ["sageattention-2.2.0+cu128torch2.8-cp311-cp311-manylinux_2_28_x86_64.whl",
           "sageattention-2.2.0+cu126torch2.7-cp310-cp310-manylinux_2_28_x86_64.whl"]
    bp = resolve(sysm, [cand(f) for f in [*far, near]], ["sage"]).get("sage")
    assert bp is not None and bp.selected is None
    assert bp.reason is not None and "(reasons: " in bp.reason
    assert bp.reason.endswith(f"; closest, {near}: needs a driver for CUDA 13.x (>= 580); "
                              "driver 570.124.06 supports CUDA 12.8"), bp.reason
