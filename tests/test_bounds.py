"""Bounds (issue 13): bad input files, bad values, slow and huge servers. Each gives one clear
line and an exit code, never a traceback, a hang or gigabytes of memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, cli
from servers import RawServer

from comfy_env_attn.candidates.sources import Sources, gather, limits_from_env, parse_html
from comfy_env_attn.candidates.wheelname import InvalidWheelName, parse_wheel_name
from comfy_env_attn.core.errors import IndexFetchError, ProfileError, UsageError
from comfy_env_attn.facts.system import disagreements, from_dict, load_profile

PY = sys.version.split()[0]
SAGE = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
BASE = {"python": "3.12.3", "platform": "linux"}


# -- profiles -----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("gpus", ["99.9"], "GPU compute capability '99.9' must look like '8.9', major 1 to 15"),
    ("gpus", ["0.5"], "major 1 to 15"),
    ("glibc", "abc", "glibc must look like '2.35', got 'abc'"),
    ("glibc", "2.1000000", "glibc must look like '2.35'"),
    ("torch", "garbage", "torch must look like '2.8.0+cu128', got 'garbage'"),
    ("torch", "2." + "9" * 5000, "torch must look like"),
    ("python", "3.100000", "python must look like '3.12.3', got '3.100000'"),
    ("torch_cuda", "12.8garbage", "torch_cuda must look like '12.8'"),
    ("driver", "five", "driver must look like '570.124.06'"),
])
def test_impossible_profile_values_are_rejected(key, value, message) -> None:
    with pytest.raises(ProfileError) as e:
        from_dict({**BASE, key: value})
    assert message in str(e.value)


def test_real_profile_values_still_pass() -> None:
    s = from_dict({**BASE, "glibc": "2.39", "torch": "2.10.0.dev20250101+cu130",
                   "torch_cuda": "13.0", "driver": "580.95.05", "driver_cuda": "13.0",
                   "gpus": ["8.9", "9.0a", "12.0", "10.3"]})
    assert s.gpus == ("8.9", "9.0a", "12.0", "10.3")


@pytest.mark.parametrize(("platform", "driver", "driver_cuda", "floor"), [
    ("linux", "535.104.05", "13.0", "580"),
    ("windows", "527.41", "12.0", "528.33"),
    ("linux", "470.82.01", "12.2", "525.60.13"),
])
def test_a_driver_that_cannot_run_its_driver_cuda_is_refused(platform, driver, driver_cuda,
                                                             floor) -> None:
    """driver and driver_cuda come from one driver: one too old for the CUDA the other
    names is a profile pieced together, and the plan would rest on whichever it read."""
    with pytest.raises(ProfileError) as e:
        from_dict({**BASE, "platform": platform, "driver": driver, "driver_cuda": driver_cuda})
    assert f"profile: driver {driver} cannot run CUDA {driver_cuda} (CUDA " \
           f"{driver_cuda.split('.')[0]}.x needs driver >= {floor}), yet driver_cuda says it " \
           "does" in str(e.value)
    # each alone, and the two of one machine (the newest CUDA of a newer driver: less is
    # what an older CUDA toolkit's nvidia-smi or a forward-compat package may say)
    for pair in ({"driver": driver}, {"driver_cuda": driver_cuda},
                 {"driver": "580.95.05", "driver_cuda": "13.0"},
                 {"driver": "580.95.05", "driver_cuda": "12.8"},
                 {"driver": floor, "driver_cuda": driver_cuda}):
        assert from_dict({**BASE, "platform": platform, **pair}).platform == platform


def test_a_huge_python_minor_fails_fast_through_the_cli(tmp_path) -> None:
    """python = "3.100000" used to grow to 7.7 GB while generating wheel tags."""
    p = tmp_path / "p.toml"
    p.write_text('python = "3.100000"\nplatform = "linux"\n')
    t = time.monotonic()
    r = cli("plan", "--system", str(p), "--no-embedded-index", timeout=60)
    assert r.returncode == 1 and time.monotonic() - t < 30
    assert r.stderr.startswith("ERROR") and "python must look like" in r.stderr


@pytest.mark.parametrize("encoding", ["utf-16", "binary"])
def test_input_files_must_be_utf8(tmp_path, encoding) -> None:
    text = 'python = "3.12"\nplatform = "linux"\n'
    data = text.encode("utf-16") if encoding == "utf-16" else b"\x89PNG\r\n\x1a\n\xff\x00" * 8
    p = tmp_path / "p.toml"
    p.write_bytes(data)
    with pytest.raises(ProfileError, match="is not UTF-8 text"):
        load_profile(p)
    if encoding != "binary":
        return  # the same path through the CLI once is enough
    r = cli("plan", "--system", str(p))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not UTF-8 text" in r.stderr
    r = cli("install", "--python", sys.executable, "--config", str(p), "--dry-run", "--yes")
    assert r.returncode == 1 and "comfy-env config" in r.stderr and "not UTF-8" in r.stderr
    assert "Traceback" not in r.stderr


def test_profile_against_target_disagreements() -> None:
    prof = from_dict({**BASE, "python": "3.12.3", "torch": "2.8.0+cu128", "glibc": "2.39",
                      "cxx11abi": True})
    target = from_dict({**BASE, "python": "3.11.7", "torch": "2.13.0+cpu", "glibc": "2.36",
                        "cxx11abi": True})
    assert disagreements(prof, target) == [
        "Python 3.12.3, the target runs 3.11.7",
        "torch 2.8.0+cu128, the target has torch 2.13.0+cpu",
        "glibc 2.39, the target has 2.36 (wheels built for the newer one do not load)"]
    # a CUDA profile for a CPU torch of the same version, an older glibc: not contradictions
    same = from_dict({**BASE, "python": "3.11.2", "torch": "2.13.0+cu128", "glibc": "2.28"})
    assert disagreements(same, target) == []


def test_install_refuses_a_profile_of_another_python_unless_forced(tmp_path, uv_bin) -> None:
    venv = tmp_path / "v"
    subprocess.run([uv_bin, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    other = "3.12.3" if not PY.startswith("3.12") else "3.11.9"
    p = tmp_path / "p.toml"
    p.write_text(f'python = "{other}"\nplatform = "linux"\n')
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    args = ["install", "--python", str(venv / "bin" / "python"), "--system", str(p),
            "--backends", "sage", "--no-embedded-index", "--find-links", str(empty),
            "--no-verify"]
    r = cli(*args)
    assert r.returncode == 1 and f"it says Python {other}, the target runs {PY}" in r.stderr
    assert "pass --force" in r.stderr
    r = cli(*args, "--force")  # past the check: it plans, finds no wheel, says so
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "warning: " in r.stderr and f"says Python {other}, the target runs {PY}" in r.stderr


# -- wheel names and versions ----------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "sageattention-2.2.0-1/../../evil-py3-none-any.whl",
    "../sageattention-2.2.0-py3-none-any.whl",
    "sageattention-2.2.0-x1-py3-none-any.whl",
    "sageattention-2.2.0-py3-none-any.whl/../x.whl",
    "sage attention-2.2.0-py3-none-any.whl",
    "sageattention-2." + "1" * 5000 + "-py3-none-any.whl",
    "sageattention-2.2.0-py3-none-any" + "x" * 300 + ".whl",
])
def test_wheel_names_are_one_plain_component(name) -> None:
    with pytest.raises(InvalidWheelName):
        parse_wheel_name(name)


def test_index_links_with_bad_names_or_local_files_are_not_taken() -> None:
    refused: list[str] = []
    page = (f'<a href="/f/{SAGE}">ok</a>'
            '<a href="/f/sageattention-2.2.0-1%2F..%2Fevil-py3-none-any.whl">t</a>'
            f'<a href="file:///home/me/{SAGE}">local</a>')
    got = parse_html(page, "https://idx.example/simple/sageattention/", source="s",
                     refused=refused)
    assert [c.url for c in got] == [f"https://idx.example/f/{SAGE}"]
    assert len(refused) == 2 and "a remote index may not link a local file" in refused[1]
    # a page on this machine (find-links FILE) may link local wheels
    got = parse_html(page, "file:///home/me/links.html", source="s")
    assert [c.url for c in got] == [f"file:///f/{SAGE}", f"file:///home/me/{SAGE}"]


# -- index pages ---------------------------------------------------------------------------

@pytest.mark.parametrize(("files", "message"), [
    ([1], "files[0] is not an object"),
    ([{"filename": SAGE}], f"files[0] ({SAGE}) has no url"),
    ([{"filename": SAGE, "url": 5}], "files[0].url has the wrong type"),
    ([{"filename": SAGE, "url": "/x", "hashes": "abc"}], "files[0].hashes has the wrong type"),
    ([{"filename": SAGE, "url": "/x", "hashes": {"sha256": 7}}], "files[0].hashes.sha256"),
    ([{"filename": 7, "url": "/x"}], "files[0].filename has the wrong type"),
])
def test_malformed_pep691_files_are_one_clear_error(http_server, files, message) -> None:
    http_server.add("/simple/sageattention/", json.dumps({"meta": {}, "files": files}),
                    "application/vnd.pypi.simple.v1+json")
    with pytest.raises(IndexFetchError, match="not a PEP 691 page") as e:
        gather(Sources(index_urls=(http_server.url + "/simple",), embedded=False),
               ["sageattention"])
    assert message in str(e.value)


def test_bad_limit_values_are_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="COMFY_ENV_ATTN_TIMEOUT='abc' is not a positive"):
        limits_from_env({"COMFY_ENV_ATTN_TIMEOUT": "abc"})
    with pytest.raises(UsageError, match="COMFY_ENV_ATTN_MIN_RATE='-1'"):
        limits_from_env({"COMFY_ENV_ATTN_MIN_RATE": "-1"})
    p = tmp_path / "p.toml"
    p.write_text('python = "3.12"\nplatform = "linux"\n')
    r = cli("plan", "--system", str(p), "--index-url", "http://127.0.0.1:9/simple",
            env={"COMFY_ENV_ATTN_TIMEOUT": "abc"})
    assert r.returncode == 2 and r.stderr.startswith("ERROR COMFY_ENV_ATTN_TIMEOUT='abc'")
    assert "Traceback" not in r.stderr


def test_an_index_page_over_the_size_cap_is_refused(http_server, monkeypatch) -> None:
    monkeypatch.setenv("COMFY_ENV_ATTN_INDEX_MAX_BYTES", "100000")
    http_server.add("/simple/sageattention/", "<html>" + "<p>filler</p>\n" * 20000)
    with pytest.raises(IndexFetchError, match="larger than 100000 bytes"):
        gather(Sources(index_urls=(http_server.url + "/simple",), embedded=False),
               ["sageattention"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_big_index_page_is_read_in_bounded_memory(http_server) -> None:
    """A 28 MB page (under the 32 MiB cap) of links to other projects: only the wanted links are
    kept, the page is never held whole (a 300 MB page used to take 4.8 GB)."""
    row = '<a href="/f/other_project-1.0.{i}-py3-none-any.whl#sha256=' + "0" * 64 + \
          '">other_project-1.0.{i}-py3-none-any.whl</a><br/>\n'
    body = "<html><body>\n" + "".join(row.format(i=i) for i in range(160_000)) + \
        f'<a href="/f/{SAGE}">{SAGE}</a></body></html>'
    assert 25_000_000 < len(body) < 32 << 20
    http_server.add("/simple/sageattention/", body)
    # VmHWM, this process's own peak (ru_maxrss would count the forking pytest's size too)
    code = ("from comfy_env_attn.candidates.sources import Sources, gather;"
            f"got = gather(Sources(index_urls=({http_server.url + '/simple'!r},), "
            "embedded=False), ['sageattention']);"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
            "print(len(got), int(hwm.split()[1]) // 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    n, peak_mb = map(int, r.stdout.split())
    assert n == 1
    assert peak_mb < 80, f"peak {peak_mb} MB for a {len(body) >> 20} MB page"


# -- servers that trickle ------------------------------------------------------------------

@pytest.fixture
def trickle() -> Iterator[RawServer]:
    """Headers at once (10 MB of HTML announced), then one byte every 0.2 s."""
    t = RawServer("HTTP/1.1 200 OK\nContent-Type: text/html\nContent-Length: 10000000\n",
                  b"<", trickle=0.2)
    yield t
    t.close()


SLOW = {"COMFY_ENV_ATTN_RATE_GRACE": "1", "COMFY_ENV_ATTN_MIN_RATE": "1000"}


def test_a_trickling_index_fails_in_bounded_time(tmp_path, trickle) -> None:
    p = tmp_path / "p.toml"
    p.write_text('python = "3.12"\nplatform = "linux"\n')
    t = time.monotonic()
    r = cli("plan", "--system", str(p), "--no-embedded-index", "--backends", "sage",
            "--index-url", trickle.url + "/simple", env=SLOW, timeout=60)
    assert r.returncode == 1 and time.monotonic() - t < 20
    assert "is too slow" in r.stderr and "under 1000 bytes/s" in r.stderr
    # the total deadline holds even at a rate above the floor
    r = cli("plan", "--system", str(p), "--no-embedded-index", "--backends", "sage",
            "--index-url", trickle.url + "/simple",
            env={"COMFY_ENV_ATTN_INDEX_DEADLINE": "1", "COMFY_ENV_ATTN_MIN_RATE": "1"},
            timeout=60)
    assert r.returncode == 1 and "took longer than 1 s" in r.stderr


def test_a_trickling_download_fails_and_releases_the_target(tmp_path, uv_bin, trickle,
                                                           http_server) -> None:
    import torch

    venv = tmp_path / "v"
    subprocess.run([uv_bin, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    minor = ".".join(torch.__version__.split(".")[:2])
    name = f"sageattention-2.2.0+cu128torch{minor}-py3-none-any.whl"
    http_server.add("/simple/sageattention/",
                    f'<a href="{trickle.url}/f/{name.replace("+", "%2B")}">{name}</a>')
    p = tmp_path / "p.toml"
    p.write_text(f'python = "{PY}"\nplatform = "linux"\ntorch_cuda = "12.8"\n'
                 f'torch = "{torch.__version__.split("+")[0]}+cu128"\n'
                 'gpus = ["8.9"]\ndriver_cuda = "12.8"\n')
    t = time.monotonic()
    r = cli("install", "--python", str(venv / "bin" / "python"), "--system", str(p),
            "--backends", "sage", "--no-embedded-index", "--no-verify", "--force",
            "--index-url", http_server.url + "/simple", env=SLOW, timeout=60)
    assert r.returncode == 1 and time.monotonic() - t < 30, r.stdout + r.stderr
    assert f"the download of {name} is too slow" in r.stdout + r.stderr
    assert not list((venv / ".comfy-env-attn").glob("journal*"))


# -- the target interpreter answers nonsense ----------------------------------------------

@pytest.mark.parametrize("answer", ['{"implementation": "cpython"}', "[1, 2]",
                                    '{"implementation": "cpython", "python": "x",'
                                    ' "platform": "linux"}'])
def test_a_partial_probe_answer_is_one_line(tmp_path, answer) -> None:
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nprintf '%s' '{answer}'\n")
    fake.chmod(0o755)
    r = cli("probe", "--python", str(fake), "--no-cache")
    assert r.returncode == 1 and r.stderr.startswith("ERROR") and "Traceback" not in r.stderr
    assert "not a Python this tool can probe" in r.stderr
