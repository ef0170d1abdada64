from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comfy_env_attn.candidates.wheelname import (
    InvalidWheelName,
    Label,
    format_label,
    parse_label,
    parse_wheel_name,
)

# One real filename per source of FACTS.md section 3.
REAL = {
    "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl":
        Label(cuda="12", torch="2.8", cxx11abi=True),
    "flash_attn-2.8.3+cu128torch2.8-cp312-cp312-linux_x86_64.whl":
        Label(cuda="128", torch="2.8"),
    "flash_attn_3-3.0.0+cu128torch2.8gitabcdef0-cp39-abi3-linux_x86_64.whl":
        Label(cuda="128", torch="2.8", git="abcdef0"),
    "sageattention-2.2.0+cu126torch2.10-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl":
        Label(cuda="126", torch="2.10"),
    "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_34_x86_64.whl":
        Label(cuda="128", torch="2.8"),
    "sageattention-2.2.0+cu128torch2.8.0.post3-cp39-abi3-win_amd64.whl":
        Label(cuda="128", torch="2.8.0", post=3),
    "sageattention-2.2.0+cu130torch2.10.0andhigher.post6-cp310-abi3-win_amd64.whl":
        Label(cuda="130", torch="2.10.0", andhigher=True, post=6),
    "flash_attn_4-4.0.0b36-py3-none-any.whl": None,
    "sageattention-1.0.6-py3-none-any.whl": None,
    "xformers-0.0.33.post2-cp39-abi3-manylinux_2_28_x86_64.whl": None,
}


@pytest.mark.parametrize("filename,label", list(REAL.items()))
def test_real_filenames_parse(filename: str, label: Label | None) -> None:
    w = parse_wheel_name(filename)
    assert w.label == label
    assert w.tags
    if label is not None:
        assert format_label(label) == w.local  # case and order kept


def test_every_url_in_the_shared_data_parses() -> None:
    urls = (Path(__file__).parent.parent / "scripts/index_sources/mjun0812_urls.txt").read_text()
    names = [u.rsplit("/", 1)[1] for u in urls.splitlines() if u and not u.startswith("#")]
    assert len(names) > 3000
    for n in names:
        w = parse_wheel_name(n)
        assert w.label is not None and w.label.torch is not None, n
        assert w.label.cuda_version is not None


def test_label_cuda_and_torch_values() -> None:
    assert parse_label("cu12torch2.8cxx11abiTRUE").cuda_version == (12, None)  # type: ignore[union-attr]
    assert parse_label("cu128torch2.8").cuda_version == (12, 8)  # type: ignore[union-attr]
    assert parse_label("cu118torch2.1").cuda_version == (11, 8)  # type: ignore[union-attr]
    assert parse_label("cu130torch2.10.0andhigher").torch_minor == (2, 10)  # type: ignore[union-attr]
    assert parse_label("cpu") is None
    assert parse_label("") is None
    assert parse_label("cu128torch2.8junk") is None


@pytest.mark.parametrize("bad", [
    "flash_attn-2.8.3.tar.gz",
    "flash_attn-2.8.3-cp312.whl",
    "flash_attn-not@version-cp312-cp312-linux_x86_64.whl",
    "-2.8.3-cp312-cp312-linux_x86_64.whl",
])
def test_invalid_names_raise_quoting_the_name(bad: str) -> None:
    with pytest.raises(InvalidWheelName) as e:
        parse_wheel_name(bad)
    assert repr(bad) in str(e.value)


labels = st.builds(
    Label,
    cuda=st.one_of(st.none(), st.sampled_from(["11", "12", "13", "118", "121", "126", "128",
                                               "129", "130", "132"])),
    torch=st.one_of(st.none(), st.from_regex(r"2\.(?:[0-9]|1[0-9])(?:\.[0-9])?", fullmatch=True)),
    andhigher=st.booleans(),
    cxx11abi=st.one_of(st.none(), st.booleans()),
    git=st.one_of(st.none(), st.from_regex(r"[0-9a-f]{7}", fullmatch=True)),
    post=st.one_of(st.none(), st.integers(0, 99)),
).filter(lambda lab: lab.cuda is not None or lab.torch is not None)


@given(labels)
def test_label_parse_inverts_format(label: Label) -> None:
    assert parse_label(format_label(label)) == label


@given(labels)
def test_label_format_inverts_parse(label: Label) -> None:
    text = format_label(label)
    parsed = parse_label(text)
    assert parsed is not None and format_label(parsed) == text
