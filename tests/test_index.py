"""Remote sources over a real loopback HTTP server, parsed by the real code (real httpx)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from comfy_env_attn.candidates.sources import Sources, gather
from comfy_env_attn.core.errors import IndexFetchError

SAGE = "sageattention-2.2.0+cu128torch2.8-cp312-cp312-manylinux_2_28_x86_64.whl"
FLASH = "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
SHA = "0f" * 32


def pep503(*files: str) -> str:
    links = "\n".join(
        f'<a href="../../files/{f.replace("+", "%2B")}#sha256={SHA}" '
        f'data-requires-python="&gt;=3.9" data-dist-info-metadata="sha256={SHA}">{f}</a><br>'
        for f in files)
    return f"<!DOCTYPE html><html><body>{links}<a href='x.tar.gz'>sdist</a></body></html>"


def test_pep503_index(http_server) -> None:
    http_server.add("/simple/sageattention/", pep503(SAGE))
    got = gather(Sources(index_urls=(http_server.url + "/simple",), embedded=False),
                 ["sageattention", "flash-attn"])
    assert [c.filename for c in got] == [SAGE]
    c = got[0]
    assert c.url == http_server.url + "/files/" + SAGE.replace("+", "%2B")
    assert c.sha256 == SHA and c.requires_python == ">=3.9"
    assert c.metadata_url == c.url + ".metadata"
    # flash-attn answered 404: not an error, just no candidates
    assert "/simple/flash-attn/" in http_server.hits


def test_pep691_json_index(http_server) -> None:
    doc = {"meta": {"api-version": "1.1"}, "name": "flash-attn", "files": [
        {"filename": FLASH, "url": f"/files/{FLASH}", "hashes": {"sha256": SHA},
         "requires-python": ">=3.9", "core-metadata": {"sha256": SHA}, "yanked": "bad"},
        {"filename": "flash_attn-2.8.3.tar.gz", "url": "/files/x.tar.gz", "hashes": {}}]}
    http_server.add("/simple/flash-attn/", json.dumps(doc),
                    "application/vnd.pypi.simple.v1+json")
    got = gather(Sources(index_urls=(http_server.url + "/simple/",), embedded=False),
                 ["flash-attn"])
    assert len(got) == 1
    assert got[0].sha256 == SHA and got[0].yanked == "bad"
    assert got[0].url == f"{http_server.url}/files/{FLASH}"


def test_find_links_page_and_directory(http_server, tmp_path: Path) -> None:
    http_server.add("/links.html", pep503(SAGE, FLASH, "unrelated-1.0-py3-none-any.whl"))
    got = gather(Sources(find_links=(http_server.url + "/links.html",), embedded=False),
                 ["sageattention", "flash-attn"])
    assert sorted(c.filename for c in got) == sorted([SAGE, FLASH])
    (tmp_path / SAGE).write_bytes(b"PK")
    (tmp_path / "notes.txt").write_text("x")
    got = gather(Sources(find_links=(str(tmp_path),), embedded=False), ["sageattention"])
    assert [c.filename for c in got] == [SAGE]
    assert got[0].url.startswith("file://")


def test_garbage_page_is_a_clear_error(http_server) -> None:
    http_server.add("/simple/sageattention/", "just some text, no links", "text/plain")
    with pytest.raises(IndexFetchError) as e:
        gather(Sources(index_urls=(http_server.url + "/simple",), embedded=False),
               ["sageattention"])
    assert "/simple/sageattention/" in str(e.value) and "text/plain" in str(e.value)
    assert "just some text" in str(e.value)


def test_bad_json_is_a_clear_error(http_server) -> None:
    http_server.add("/simple/sageattention/", '{"nope": 1}', "application/vnd.pypi.simple.v1+json")
    with pytest.raises(IndexFetchError, match="not a PEP 691 page"):
        gather(Sources(index_urls=(http_server.url + "/simple",), embedded=False),
               ["sageattention"])


def test_server_error_and_unreachable(http_server) -> None:
    http_server.add("/simple/sageattention/", "oops", status=500)
    with pytest.raises(IndexFetchError, match="HTTP 500"):
        gather(Sources(index_urls=(http_server.url + "/simple",), embedded=False),
               ["sageattention"])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(IndexFetchError, match=f"cannot reach index http://127.0.0.1:{port}"):
        gather(Sources(index_urls=(f"http://127.0.0.1:{port}/simple",), embedded=False,
                       timeout=5), ["sageattention"])


def test_embedded_can_be_left_out() -> None:
    assert gather(Sources(embedded=False), ["sageattention"]) == []
    assert len(gather(Sources(), ["sageattention"])) > 50


def test_html_attribute_forms(http_server) -> None:
    page = ("<html><head><base href='/pkgs/'></head><body>\n"
            f"<A HREF='{SAGE.replace('+', '%2B')}#sha256={SHA}' data-yanked>{SAGE}</A>\n"
            f'<a data-requires-python="&gt;=3.10" href="https://cdn.example/{FLASH}?x=1&amp;y=2">'
            f"{FLASH}</a>\n</body></html>")
    http_server.add("/fl.html", page)
    got = {c.filename: c for c in gather(
        Sources(find_links=(http_server.url + "/fl.html",), embedded=False),
        ["sageattention", "flash-attn"])}
    assert got[SAGE].url == f"{http_server.url}/pkgs/{SAGE.replace('+', '%2B')}"
    assert got[SAGE].yanked == "yanked" and got[SAGE].sha256 == SHA
    assert got[FLASH].url == f"https://cdn.example/{FLASH}?x=1&y=2"
    assert got[FLASH].requires_python == ">=3.10"
