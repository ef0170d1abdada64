"""Wheel candidates: the embedded index (offline) and remote sources.

Parsing (PEP 503 HTML, PEP 691 JSON, find-links pages, the embedded JSON) is pure;
fetching with httpx happens only in fetch_* functions.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from comfy_env_attn.core.backends import normalize_dist
from comfy_env_attn.core.errors import IndexFetchError

if TYPE_CHECKING:
    import httpx

PYPI_SIMPLE = "https://pypi.org/simple/"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class Candidate:
    """One downloadable wheel and what its source says about it beyond the filename."""

    filename: str
    url: str
    source: str
    sha256: str | None = None
    requires_torch: str | None = None  # specifier from metadata, e.g. "==2.9.1"
    requires_python: str | None = None
    cuda: str | None = None  # "12.8" where the filename does not say
    built_torch: str | None = None  # torch it was really built against, where known
    sm: tuple[str, ...] | None = None  # TORCH_CUDA_ARCH_LIST entries: "8.0", "9.0a", "12.0+PTX"
    metadata_url: str | None = None  # PEP 658 .metadata
    yanked: str | None = None
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items() if v is not None}


def candidate_from_json(data: dict[str, Any], *, source: str) -> Candidate:
    sm = data.get("sm")
    return Candidate(
        filename=data["filename"],
        url=data["url"],
        source=data.get("source", source),
        sha256=data.get("sha256"),
        requires_torch=data.get("requires_torch"),
        requires_python=data.get("requires_python"),
        cuda=data.get("cuda"),
        built_torch=data.get("built_torch"),
        sm=None if sm is None else tuple(sm),
        metadata_url=data.get("metadata_url"),
        yanked=data.get("yanked"),
        size=data.get("size"),
    )


def project_of(filename: str) -> str:
    """The normalized project name of a wheel filename, without a full parse."""
    return normalize_dist(filename.split("-", 1)[0])


# -- the embedded index -----------------------------------------------------------------

def embedded_dir() -> Path:
    """wheel_index/ shipped inside the package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent.parent  # the package folder
    for p in (here / "wheel_index", here.parent / "wheel_index"):
        if p.is_dir():
            return p
    return here / "wheel_index"


def load_embedded(projects: Iterable[str] | None = None) -> list[Candidate]:
    wanted = None if projects is None else {normalize_dist(p) for p in projects}
    out: list[Candidate] = []
    for path in sorted(embedded_dir().glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        source = f"{EMBEDDED}:{doc.get('source', path.stem)}"
        defaults = doc.get("defaults", {})
        for entry in doc["wheels"]:
            if wanted is not None and project_of(entry["filename"]) not in wanted:
                continue
            out.append(candidate_from_json({**defaults, **entry}, source=source))
    return out


# -- PEP 503 / find-links HTML ------------------------------------------------------------

# PEP 503 pages are flat lists of anchors; a regex scan is several times faster than
# html.parser on pages of thousands of links, and html.unescape handles the entities.
_ANCHOR = re.compile(r"<a\s([^>]*)>", re.IGNORECASE)
_BASE = re.compile(r"<base\s[^>]*href\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
_ATTR = re.compile(r"""([a-zA-Z_:][-a-zA-Z0-9_:.]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")


def _anchors(text: str) -> list[dict[str, str | None]]:
    out: list[dict[str, str | None]] = []
    for m in _ANCHOR.finditer(text):
        attrs: dict[str, str | None] = {}
        for a in _ATTR.finditer(m[1]):
            value = a[2] if a[2] is not None else a[3] if a[3] is not None else a[4]
            attrs[a[1].lower()] = None if value is None else html.unescape(value)
        out.append(attrs)
    return out


def _split_hash(url: str) -> tuple[str, str | None]:
    base, _, frag = url.partition("#")
    sha = frag[len("sha256="):].lower() if frag.startswith("sha256=") else None
    return base, sha


def _filename_of(url: str) -> str:
    return unquote(url.split("?", 1)[0].rsplit("/", 1)[-1])


def looks_like_html(text: str) -> bool:
    head = text[:2048].lower()
    return "<a " in head or "<html" in head or "<!doctype html" in head or "<a\n" in head


def parse_html(text: str, page_url: str, *, source: str,
               projects: set[str] | None = None) -> list[Candidate]:
    """Wheel links of a PEP 503 project page or a find-links page."""
    m = _BASE.search(text)
    base = urljoin(page_url, html.unescape(m[1])) if m else page_url
    out: list[Candidate] = []
    for a in _anchors(text):
        href = a.get("href")
        if not href:
            continue
        url, sha = _split_hash(href)
        filename = _filename_of(url)
        if not filename.endswith(".whl"):
            continue
        if projects is not None and project_of(filename) not in projects:
            continue
        if not url.startswith(("http://", "https://", "file:")):
            url = urljoin(base, url)
        meta = a.get("data-core-metadata") or a.get("data-dist-info-metadata")
        yanked = a.get("data-yanked")
        out.append(Candidate(
            filename=filename, url=url, source=source, sha256=sha,
            requires_python=a.get("data-requires-python"),
            metadata_url=url + ".metadata" if meta and meta != "false" else None,
            yanked=(yanked or "yanked") if "data-yanked" in a else None,
        ))
    return out


def parse_json(doc: Any, page_url: str, *, source: str) -> list[Candidate]:
    """Wheel files of a PEP 691 project page."""
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise ValueError("not a PEP 691 project page (no 'files' list)")
    out: list[Candidate] = []
    for f in doc["files"]:
        filename = f.get("filename", "")
        if not filename.endswith(".whl"):
            continue
        url = urljoin(page_url, f["url"])
        hashes = f.get("hashes") or {}
        meta = f.get("core-metadata", f.get("dist-info-metadata"))
        yanked = f.get("yanked")
        out.append(Candidate(
            filename=filename, url=_split_hash(url)[0], source=source,
            sha256=hashes.get("sha256"),
            requires_python=f.get("requires-python"),
            metadata_url=url + ".metadata" if meta else None,
            yanked=(yanked if isinstance(yanked, str) and yanked else "yanked") if yanked
            else None,
            size=f.get("size"),
        ))
    return out


# -- fetching -----------------------------------------------------------------------------

_ACCEPT = ("application/vnd.pypi.simple.v1+json, "
           "application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1")


_CLIENTS: dict[tuple[float, bool], httpx.Client] = {}


def http_client(timeout: float = 30.0, *, tls: bool = True) -> httpx.Client:
    """One client per process: building one loads the CA bundle (a tenth of a second)."""
    key = (timeout, tls)
    if key not in _CLIENTS:
        import httpx

        _CLIENTS[key] = httpx.Client(timeout=timeout, follow_redirects=True, verify=tls,
                                     headers={"User-Agent": "comfy-env-attn"})
    return _CLIENTS[key]


def _get(client: httpx.Client, url: str) -> httpx.Response | None:
    """The response, None for 404/410 (project not on this index); IndexFetchError else."""
    import httpx

    try:
        r = client.get(url, headers={"Accept": _ACCEPT})
    except httpx.HTTPError as e:
        raise IndexFetchError(f"cannot reach index {url}: {type(e).__name__}: {e}") from None
    if r.status_code in (404, 410):
        return None
    if r.status_code >= 400:
        raise IndexFetchError(f"index {url} answered HTTP {r.status_code} {r.reason_phrase}")
    return r


def _parse_page(r: httpx.Response, url: str, *, source: str,
                projects: set[str] | None) -> list[Candidate]:
    ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.endswith("+json") or ctype == "application/json":
        try:
            return parse_json(r.json(), str(r.url), source=source)
        except ValueError as e:
            raise IndexFetchError(f"index {url} answered JSON that is not a PEP 691 page: "
                                  f"{e}") from None
    text = r.text
    if not looks_like_html(text):
        snippet = text[:80].replace("\n", " ")
        raise IndexFetchError(f"index {url} answered {ctype or 'no content type'} that is "
                              f"neither a PEP 503 page nor PEP 691 JSON: {snippet!r}")
    return parse_html(text, str(r.url), source=source, projects=projects)


def fetch_index(client: httpx.Client, index_url: str, projects: Sequence[str]) -> list[Candidate]:
    """Project pages of a simple index (PEP 503 or 691), fetched in parallel."""
    base = index_url if index_url.endswith("/") else index_url + "/"
    source = f"index:{index_url}"

    def one(project: str) -> list[Candidate]:
        url = f"{base}{normalize_dist(project)}/"
        r = _get(client, url)
        if r is None:
            return []
        return _parse_page(r, url, source=source, projects={normalize_dist(project)})

    with ThreadPoolExecutor(max_workers=max(1, min(6, len(projects)))) as pool:
        pages = list(pool.map(one, projects))
    return [c for page in pages for c in page]


def find_links_dir(path: Path, projects: set[str]) -> list[Candidate]:
    out = []
    for p in sorted(path.glob("*.whl")):
        if project_of(p.name) in projects:
            out.append(Candidate(filename=p.name, url=p.resolve().as_uri(),
                                 source=f"find-links:{path}", size=p.stat().st_size))
    return out


def fetch_find_links(client: httpx.Client | None, location: str,
                     projects: Sequence[str]) -> list[Candidate]:
    wanted = {normalize_dist(p) for p in projects}
    parts = urlsplit(location)
    if parts.scheme in ("http", "https"):
        assert client is not None
        r = _get(client, location)
        if r is None:
            raise IndexFetchError(f"find-links page {location} answered HTTP 404 Not Found")
        return _parse_page(r, location, source=f"find-links:{location}", projects=wanted)
    path = Path(unquote(parts.path) if parts.scheme == "file" else location)
    if path.is_dir():
        return find_links_dir(path, wanted)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not looks_like_html(text):
            raise IndexFetchError(f"find-links file {path} is not an HTML page of links")
        return parse_html(text, path.resolve().as_uri(), source=f"find-links:{path}",
                          projects=wanted)
    raise IndexFetchError(f"find-links location {location!r} is neither a URL, a directory "
                          f"nor an HTML file")


@dataclass(frozen=True)
class Sources:
    index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    embedded: bool = True
    pypi: bool = False
    timeout: float = float(os.environ.get("COMFY_ENV_ATTN_TIMEOUT", "30"))


def gather(sources: Sources, projects: Sequence[str]) -> list[Candidate]:
    """Every candidate from every source, remote ones first (they are the user's choice)."""
    out: list[Candidate] = []
    remote = list(sources.index_urls) + ([PYPI_SIMPLE] if sources.pypi else [])
    needs_http = remote or any(urlsplit(f).scheme in ("http", "https")
                               for f in sources.find_links)
    # plain-http sources only (a local mirror, loopback): no TLS context to build
    tls = any(u.startswith("https:") for u in [*remote, *sources.find_links])
    client = http_client(sources.timeout, tls=tls) if needs_http else None
    for url in remote:
        assert client is not None
        out.extend(fetch_index(client, url, projects))
    for loc in sources.find_links:
        out.extend(fetch_find_links(client, loc, projects))
    if sources.embedded:
        out.extend(load_embedded(projects))
    return out
