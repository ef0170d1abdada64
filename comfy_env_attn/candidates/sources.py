"""Wheel candidates: the embedded index (offline) and remote sources.

Parsing (PEP 503 HTML, PEP 691 JSON, find-links pages, the embedded JSON) is pure;
fetching with httpx happens only in fetch_* functions.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import unquote, urljoin, urlsplit

from comfy_env_attn.candidates.wheelname import InvalidWheelName, safe_wheel_filename
from comfy_env_attn.core.backends import normalize_dist
from comfy_env_attn.core.errors import AttnError, IndexFetchError, UsageError
from comfy_env_attn.core.process import parallel
from comfy_env_attn.core.progress import log
from comfy_env_attn.core.records import dataclass

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
    # made from a naming pattern, not seen in a listing (how): ranked after observed wheels
    generated: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items() if v is not None}


def candidate_from_json(data: dict[str, Any], *, source: str) -> Candidate:
    """A Candidate from an embedded index entry (schema 2 names PEP 691's way: `hashes`,
    `requires-python`; schema 1's `sha256`, `requires_python` are read too) or from
    Candidate.to_json."""
    sm = data.get("sm")

    def key(name: str) -> Any:
        return data.get(name.replace("_", "-"), data.get(name))

    return Candidate(
        filename=data["filename"],
        url=data["url"],
        source=data.get("source", source),
        sha256=(data.get("hashes") or {}).get("sha256") or data.get("sha256"),
        requires_torch=key("requires_torch"),
        requires_python=key("requires_python"),
        cuda=data.get("cuda"),
        built_torch=key("built_torch"),
        sm=None if sm is None else tuple(sm),
        metadata_url=data.get("metadata_url"),
        yanked=data.get("yanked"),
        size=data.get("size"),
        generated=key("generated"),
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
        if doc.get("generated-from"):
            defaults = {**defaults, "generated": doc["generated-from"]}
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


def _unescape(text: str) -> str:
    """html.unescape, its module loaded only for a page that has an entity (few do)."""
    if "&" not in text:
        return text
    import html

    return html.unescape(text)


def _anchor_attrs(inner: str) -> dict[str, str | None]:
    attrs: dict[str, str | None] = {}
    for a in _ATTR.finditer(inner):
        value = a[2] if a[2] is not None else a[3] if a[3] is not None else a[4]
        attrs[a[1].lower()] = None if value is None else _unescape(value)
    return attrs


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def is_sha256(text: object) -> TypeGuard[str]:
    """Whether this is a sha256 as hex: what a source's hash must be before it is trusted to
    check a file, or to name a folder or file in the cache."""
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


def _split_hash(url: str) -> tuple[str, str | None]:
    base, _, frag = url.partition("#")
    sha = frag[len("sha256="):].lower() if frag.startswith("sha256=") else None
    return base, sha


def filename_of(url: str) -> str:
    """The file name a link names (its fragment already split off)."""
    return unquote(url.split("?", 1)[0].rsplit("/", 1)[-1])


def looks_like_html(text: str) -> bool:
    head = text[:2048].lower()
    return "<a " in head or "<html" in head or "<!doctype html" in head or "<a\n" in head


def _is_remote(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def _refusal(filename: str, url: str, page_url: str) -> str | None:
    """Why a link of this page is not taken: a name that is not one wheel file name (it
    would name a path on disk), or a local file linked from a remote page."""
    try:
        safe_wheel_filename(filename)
    except InvalidWheelName as e:
        return str(e)
    if _is_remote(page_url) and not _is_remote(url):
        return (f"{filename}: a remote index may not link a local file ({url[:120]}); use "
                "--find-links FOLDER for wheels on this machine")
    return None


class LinkScanner:
    """PEP 503 / find-links HTML fed in pieces as it arrives: only the wheel links of the
    wanted projects are kept, never the whole page."""

    def __init__(self, page_url: str, *, source: str, projects: set[str] | None) -> None:
        self.page_url, self.source, self.projects = page_url, source, projects
        self.head = ""  # the first 2 kB, to tell an HTML page from something else
        self._buf = ""
        self._base: str | None = None
        self._links: list[dict[str, str | None]] = []
        self.refused: list[str] = []

    def feed(self, text: str) -> None:
        if len(self.head) < 2048:
            self.head += text[:2048 - len(self.head)]
        self._buf += text
        cut = self._buf.rfind("<")
        if cut == -1:
            self._buf = ""
            return
        if self._buf.find(">", cut) != -1:  # the last tag is complete
            cut = len(self._buf)
        self._scan(self._buf[:cut])
        self._buf = self._buf[cut:]

    def _scan(self, text: str) -> None:
        if self._base is None:
            m = _BASE.search(text)
            if m:
                self._base = urljoin(self.page_url, _unescape(m[1]))
        for m in _ANCHOR.finditer(text):
            attrs = _anchor_attrs(m[1])
            href = attrs.get("href")
            if not href:
                continue
            filename = filename_of(_split_hash(href)[0])
            if not filename.endswith(".whl"):
                continue
            if self.projects is not None and project_of(filename) not in self.projects:
                continue
            self._links.append(attrs)

    def close(self) -> list[Candidate]:
        self._scan(self._buf)
        self._buf = ""
        base = self._base or self.page_url
        out: list[Candidate] = []
        for a in self._links:
            url, sha = _split_hash(a["href"] or "")
            filename = filename_of(url)
            if not url.startswith(("http://", "https://", "file:")):
                url = urljoin(base, url)
            why = _refusal(filename, url, self.page_url)
            if why:
                self.refused.append(why)
                continue
            meta = a.get("data-core-metadata") or a.get("data-dist-info-metadata")
            yanked = a.get("data-yanked")
            out.append(Candidate(
                filename=filename, url=url, source=self.source, sha256=sha,
                requires_python=a.get("data-requires-python"),
                metadata_url=url + ".metadata" if meta and meta != "false" else None,
                yanked=(yanked or "yanked") if "data-yanked" in a else None,
            ))
        return out


def parse_html(text: str, page_url: str, *, source: str,
               projects: set[str] | None = None,
               refused: list[str] | None = None) -> list[Candidate]:
    """Wheel links of a PEP 503 project page or a find-links page; the links not taken,
    with the reason, go to `refused`."""
    scanner = LinkScanner(page_url, source=source, projects=projects)
    scanner.feed(text)
    out = scanner.close()
    if refused is not None:
        refused.extend(scanner.refused)
    return out


def _typed(f: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = f.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{where}.{key} has the wrong type: {str(value)[:60]!r}")
    return value


def parse_json(doc: Any, page_url: str, *, source: str,
               refused: list[str] | None = None) -> list[Candidate]:
    """Wheel files of a PEP 691 project page; ValueError naming the first malformed entry."""
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise ValueError("not a PEP 691 project page (no 'files' list)")
    out: list[Candidate] = []
    for i, f in enumerate(doc["files"]):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise ValueError(f"{where} is not an object: {str(f)[:60]!r}")
        filename = _typed(f, "filename", str, where) or ""
        if not filename.endswith(".whl"):
            continue
        raw_url = _typed(f, "url", str, where)
        if not raw_url:
            raise ValueError(f"{where} ({filename[:80]}) has no url")
        url = urljoin(page_url, raw_url)
        hashes = _typed(f, "hashes", dict, where) or {}
        sha = hashes.get("sha256")
        if sha is not None and not is_sha256(sha):
            raise ValueError(f"{where}.hashes.sha256 is not a sha256: {str(sha)[:80]!r}")
        meta = f.get("core-metadata", f.get("dist-info-metadata"))
        yanked = _typed(f, "yanked", (bool, str), where)
        size = _typed(f, "size", int, where)
        why = _refusal(filename, _split_hash(url)[0], page_url)
        if why:
            if refused is not None:
                refused.append(why)
            continue
        out.append(Candidate(
            filename=filename, url=_split_hash(url)[0], source=source,
            sha256=sha,
            requires_python=_typed(f, "requires-python", str, where),
            metadata_url=url + ".metadata" if meta else None,
            yanked=(yanked if isinstance(yanked, str) and yanked else "yanked") if yanked
            else None,
            size=None if isinstance(size, bool) else size,
        ))
    return out


# -- fetching, bounded --------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Bounds on every network read: a slow or endless server fails, it never hangs."""

    timeout: float = 60.0  # connecting, and the longest silence between two reads
    min_rate: float = 10_000.0  # bytes per second on average, once `grace` has passed
    grace: float = 30.0
    index_deadline: float = 120.0  # one index page, from request to last byte
    download_deadline: float = 3600.0  # one wheel
    index_max_bytes: int = 32 << 20  # one index page

    def deadline_error(self, what: str, got: int, elapsed: float, deadline: float) -> str | None:
        """Why a transfer that got `got` bytes in `elapsed` seconds must stop, or None."""
        if elapsed > deadline:
            return (f"{what} took longer than {deadline:g} s ({got} bytes so far); set "
                    "COMFY_ENV_ATTN_INDEX_DEADLINE or COMFY_ENV_ATTN_DOWNLOAD_DEADLINE "
                    "to allow more")
        if elapsed > self.grace and got < self.min_rate * elapsed:
            return (f"{what} is too slow: {got} bytes in {elapsed:.0f} s, under "
                    f"{self.min_rate:g} bytes/s (COMFY_ENV_ATTN_MIN_RATE)")
        return None


_LIMIT_ENV = {"timeout": "COMFY_ENV_ATTN_TIMEOUT", "min_rate": "COMFY_ENV_ATTN_MIN_RATE",
              "grace": "COMFY_ENV_ATTN_RATE_GRACE",
              "index_deadline": "COMFY_ENV_ATTN_INDEX_DEADLINE",
              "download_deadline": "COMFY_ENV_ATTN_DOWNLOAD_DEADLINE",
              "index_max_bytes": "COMFY_ENV_ATTN_INDEX_MAX_BYTES"}


def limits_from_env(environ: Mapping[str, str] | None = None) -> Limits:
    """Limits with the COMFY_ENV_ATTN_* overrides; UsageError naming a bad value."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in _LIMIT_ENV.items():
        text = env.get(var, "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{var}={text[:40]!r} is not a positive number")
        values[name] = int(value) if name == "index_max_bytes" else value
    return Limits(**values)


def read_bounded(r: httpx.Response, sink: Callable[[bytes], None], *, what: str,
                 limits: Limits, deadline: float, started: float,
                 max_bytes: int | None = None, error: type[AttnError] = IndexFetchError,
                 raw: bool = False) -> int:
    """Feed a streamed response's bytes to `sink` as they arrive; `error` when the total
    deadline, the rate floor or the size cap is passed. Returns the byte count. `raw`: the
    bytes as sent, never decoded (a file download: what the server holds, byte for byte)."""
    got = 0
    for chunk in r.iter_raw() if raw else r.iter_bytes():
        got += len(chunk)
        if max_bytes is not None and got > max_bytes:
            raise error(f"{what} is larger than {max_bytes} bytes "
                        "(COMFY_ENV_ATTN_INDEX_MAX_BYTES): refusing to read more")
        sink(chunk)
        why = limits.deadline_error(what, got, time.monotonic() - started, deadline)
        if why:
            raise error(why)
    return got


_ACCEPT = ("application/vnd.pypi.simple.v1+json, "
           "application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1")


_CLIENTS: dict[bool, httpx.Client] = {}


def http_client(timeout: float = 30.0, *, tls: bool = True) -> httpx.Client:
    """One client per process: building one loads the CA bundle (a tenth of a second).
    Each request passes its own timeout."""
    if tls not in _CLIENTS:
        import httpx

        _CLIENTS[tls] = httpx.Client(timeout=timeout, follow_redirects=True, verify=tls,
                                     headers={"User-Agent": "comfy-env-attn"})
    return _CLIENTS[tls]


class _Page:
    """One index or find-links page being read: HTML scanned as it arrives, JSON kept
    (under the size cap) and parsed at the end."""

    def __init__(self, url: str, ctype: str, charset: str | None, *, source: str,
                 projects: set[str] | None) -> None:
        self.url, self.ctype = url, ctype
        self.json = ctype.endswith("+json") or ctype == "application/json"
        self._raw = bytearray()
        try:
            self._decoder = codecs.getincrementaldecoder(charset or "utf-8")(errors="replace")
        except LookupError:
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = LinkScanner(url, source=source, projects=projects)
        self.source = source

    def feed(self, data: bytes) -> None:
        if self.json:
            self._raw += data
        else:
            self.scanner.feed(self._decoder.decode(data))

    def close(self, what: str) -> tuple[list[Candidate], list[str]]:
        refused: list[str] = []
        if self.json:
            try:
                doc = json.loads(self._raw.decode("utf-8", errors="replace"))
                return parse_json(doc, self.url, source=self.source, refused=refused), refused
            except ValueError as e:
                raise IndexFetchError(f"{what} answered JSON that is not a PEP 691 page: "
                                      f"{e}") from None
        self.scanner.feed(self._decoder.decode(b"", final=True))
        if not looks_like_html(self.scanner.head):
            snippet = self.scanner.head[:80].replace("\n", " ")
            raise IndexFetchError(f"{what} answered {self.ctype or 'no content type'} that is "
                                  f"neither a PEP 503 page nor PEP 691 JSON: {snippet!r}")
        return self.scanner.close(), self.scanner.refused


def fetch_page(client: httpx.Client, url: str, *, source: str, projects: set[str] | None,
               limits: Limits, what: str = "index") -> list[Candidate] | None:
    """The candidates of one remote page; None for 404/410 (project not on this index);
    IndexFetchError for anything else that is not a page, read within `limits`."""
    import httpx

    started = time.monotonic()
    label = f"{what} {url}"
    try:
        with client.stream("GET", url, headers={"Accept": _ACCEPT},
                           timeout=limits.timeout) as r:
            if r.status_code in (404, 410):
                return None
            if r.status_code >= 400:
                raise IndexFetchError(f"{label} answered HTTP {r.status_code} "
                                      f"{r.reason_phrase}")
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            page = _Page(str(r.url), ctype, r.charset_encoding, source=source,
                         projects=projects)
            read_bounded(r, page.feed, what=label, limits=limits,
                         deadline=limits.index_deadline, started=started,
                         max_bytes=limits.index_max_bytes)
    except httpx.HTTPError as e:
        raise IndexFetchError(f"cannot reach {label}: {type(e).__name__}: {e}") from None
    found, refused = page.close(label)
    for why in refused[:5]:
        log(f"{label}: link not taken: {why}")
    if len(refused) > 5:
        log(f"{label}: {len(refused) - 5} more links not taken")
    return found


def fetch_index(client: httpx.Client, index_url: str, projects: Sequence[str],
                limits: Limits | None = None) -> list[Candidate]:
    """Project pages of a simple index (PEP 503 or 691), fetched in parallel."""
    base = index_url if index_url.endswith("/") else index_url + "/"
    source = f"index:{index_url}"
    lim = limits or limits_from_env()

    def one(project: str) -> list[Candidate]:
        return fetch_page(client, f"{base}{normalize_dist(project)}/", source=source,
                          projects={normalize_dist(project)}, limits=lim) or []

    pages = parallel(one, list(projects), 6)
    return [c for page in pages for c in page]


def find_links_dir(path: Path, projects: set[str]) -> list[Candidate]:
    out = []
    for p in sorted(path.glob("*.whl")):
        if project_of(p.name) in projects:
            out.append(Candidate(filename=p.name, url=p.resolve().as_uri(),
                                 source=f"find-links:{path}", size=p.stat().st_size))
    return out


def fetch_find_links(client: httpx.Client | None, location: str,
                     projects: Sequence[str], limits: Limits | None = None
                     ) -> list[Candidate]:
    wanted = {normalize_dist(p) for p in projects}
    parts = urlsplit(location)
    if parts.scheme in ("http", "https"):
        assert client is not None
        found = fetch_page(client, location, source=f"find-links:{location}",
                           projects=wanted, limits=limits or limits_from_env(),
                           what="find-links page")
        if found is None:
            raise IndexFetchError(f"find-links page {location} answered HTTP 404 Not Found")
        return found
    path = Path(unquote(parts.path) if parts.scheme == "file" else location)
    if path.is_dir():
        return find_links_dir(path, wanted)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise IndexFetchError(f"find-links file {path} is not UTF-8 text (byte "
                                  f"{e.start})") from None
        except OSError as e:
            raise IndexFetchError(f"cannot read find-links file {path}: {e.strerror}") from None
        if not looks_like_html(text):
            raise IndexFetchError(f"find-links file {path} is not an HTML page of links")
        return parse_html(text, path.resolve().as_uri(), source=f"find-links:{path}",
                          projects=wanted)
    raise IndexFetchError(f"find-links location {location!r} is neither a URL, a directory "
                          f"nor an HTML file")


@dataclass(frozen=True)
class Sources:
    """Where candidate wheels come from: indexes, find-links, the embedded index, PyPI."""
    index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    embedded: bool = True
    pypi: bool = False
    timeout: float | None = None  # None: COMFY_ENV_ATTN_TIMEOUT or Limits' default
    wheelhouse: bool = True  # wheels built on this machine (install --build)


def gather(sources: Sources, projects: Sequence[str]) -> list[Candidate]:
    """Every candidate from every source: the wheelhouse first (built here, for this
    machine), then remote ones (the user's choice), then the embedded index."""
    out: list[Candidate] = []
    if sources.wheelhouse:
        from comfy_env_attn.candidates.wheelhouse import load_wheelhouse, wheelhouse_dir

        out.extend(load_wheelhouse(wheelhouse_dir(), projects))
    remote = list(sources.index_urls) + ([PYPI_SIMPLE] if sources.pypi else [])
    needs_http = remote or any(urlsplit(f).scheme in ("http", "https")
                               for f in sources.find_links)
    limits = limits_from_env()
    if sources.timeout is not None:
        limits = replace(limits, timeout=sources.timeout)
    # plain-http sources only (a local mirror, loopback): no TLS context to build
    tls = any(u.startswith("https:") for u in [*remote, *sources.find_links])
    client = http_client(tls=tls) if needs_http else None
    for url in remote:
        assert client is not None
        out.extend(fetch_index(client, url, projects, limits))
    for loc in sources.find_links:
        out.extend(fetch_find_links(client, loc, projects, limits))
    if sources.embedded:
        out.extend(load_embedded(projects))
    return out
