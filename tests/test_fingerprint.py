"""core.fingerprint finds a distribution as importlib.metadata does, without importing it:
the same first distribution of a name on the same path list, in every layout importlib's
path finder reads (folders in listdir order, legacy egg-info files, `.egg` folders and zips,
zips on the path), and the same version. Each case is built in a tmp folder and compared
with importlib.metadata's own choice for that path list."""

from __future__ import annotations

import importlib.metadata as md
import io
import os
import random
import warnings
import zipfile
from pathlib import Path

import pytest

from comfy_env_attn.core import fingerprint
from comfy_env_attn.core.fingerprint import (
    dist_facts,
    files_digest,
    find_metadata_dir,
    metadata_version,
)


def importlib_choice(name: str, path: list[str]) -> tuple[object, str | None] | None:
    """(where, version) of the distribution importlib.metadata's path finder finds first:
    where is a Path, or (archive, member) for one in a zip."""
    md.MetadataPathFinder().invalidate_caches()  # FastPath caches a folder by its mtime
    ctx = md.DistributionFinder.Context(name=name, path=path)
    for dist in md.MetadataPathFinder.find_distributions(ctx):
        where = dist._path  # type: ignore[attr-defined]
        try:
            with warnings.catch_warnings():  # 3.12: a missing Version will be a KeyError
                warnings.simplefilter("ignore", DeprecationWarning)
                version = dist.version
        except (TypeError, KeyError):  # TypeError: no metadata text at all
            version = None
        if isinstance(where, zipfile.Path):
            return (where.root.filename, where.at.rstrip("/")), version
        return Path(where), version
    return None


def ours(name: str, path: list[str]) -> tuple[object, str | None] | None:
    meta = find_metadata_dir(name, path)
    if meta is None:
        return None
    where = meta if isinstance(meta, Path) else (meta.archive, meta.member)
    return where, metadata_version(meta) or None


def dist_info(site: Path, folder: str, name: str, version: str,
              files: dict[str, str] | None = None) -> Path:
    """A dist-info folder `folder` in `site`, with METADATA and a RECORD of `files`."""
    info = site / folder
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = []
    for rel, text in (files or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
        rows.append(f"{rel},,")
    (info / "RECORD").write_text("\n".join([*rows, f"{folder}/METADATA,,", ""]))
    return info


def write_zip(path: Path, members: dict[str, str], *, comment: bytes = b"",
              prefix: bytes = b"", zip64: bool = False,
              monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """A zip with these members in this order (the central directory's order); `prefix`
    bytes before it (as a self-extracting archive has), a comment after it, zip64 end
    records when `zip64`."""
    buf = io.BytesIO()
    if zip64:
        assert monkeypatch is not None
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 0)  # zip64 end records now
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
        zf.comment = comment
    if zip64:
        assert monkeypatch is not None
        monkeypatch.undo()
    path.write_bytes(prefix + buf.getvalue())  # its offsets do not count the prefix
    return path


def meta_text(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"


# -- several dist-infos of one name in one folder -------------------------------------------

def test_of_several_dist_infos_in_one_folder_the_first_listed_wins(tmp_path, monkeypatch) -> None:
    """A broken install can leave foo-1.0.dist-info and foo-2.0.dist-info side by side:
    importlib.metadata takes the one os.listdir gives first, not the first sorted."""
    site = tmp_path / "site"
    for v in ("1.0", "2.0", "3.0", "10.0"):
        dist_info(site, f"foo-{v}.dist-info", "foo", v)
    got = ours("foo", [str(site)])
    assert got is not None and got == importlib_choice("foo", [str(site)])
    assert got[0] == site / next(n for n in os.listdir(site) if n.startswith("foo-"))

    # whatever this file system's order, a listing that is not sorted: both read it
    other = tmp_path / "other"
    for v in ("1.0", "2.0", "3.0"):
        dist_info(other, f"Foo-{v}.dist-info", "Foo", v)
    real = os.listdir

    def backwards(p: str | os.PathLike[str] = ".") -> list[str]:
        names = real(p)
        return sorted(names, reverse=True) if Path(p) == other else names

    monkeypatch.setattr(os, "listdir", backwards)
    got = ours("FOO", [str(other)])
    assert got == (other / "Foo-3.0.dist-info", "3.0")
    assert got == importlib_choice("FOO", [str(other)])


# -- legacy egg-info files, .egg folders and zips ----------------------------------------

def test_a_legacy_egg_info_file_is_a_distribution(tmp_path) -> None:
    """distutils wrote `foo-1.0-py3.11.egg-info` as a file holding PKG-INFO's text:
    importlib.metadata reads it (read_text('')), so it hides a later foo."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "foo-1.0-py3.11.egg-info").write_text(meta_text("foo", "1.0"))
    dist_info(b, "foo-2.0.dist-info", "foo", "2.0")
    path = [str(a), str(b)]
    assert ours("foo", path) == importlib_choice("foo", path) == \
        (a / "foo-1.0-py3.11.egg-info", "1.0")
    assert dist_facts("foo", path) == ("1.0", None)  # no RECORD: no digest


def test_an_egg_folder_ahead_of_site_packages_is_the_distribution(tmp_path) -> None:
    """`foo_bar-1.0-py3.11.egg/EGG-INFO/PKG-INFO` on sys.path before site-packages (an
    easy_install, a .pth): importlib.metadata finds the egg's EGG-INFO first."""
    egg = tmp_path / "Foo_Bar-1.0-py3.11.egg"
    (egg / "EGG-INFO").mkdir(parents=True)
    (egg / "EGG-INFO" / "PKG-INFO").write_text(meta_text("Foo-Bar", "1.0"))
    (egg / "foo_bar").mkdir()
    (egg / "foo_bar" / "__init__.py").write_text("")
    site = tmp_path / "site"
    dist_info(site, "foo_bar-2.0.dist-info", "foo-bar", "2.0")
    path = [str(egg), str(site)]
    for name in ("foo-bar", "Foo_Bar", "FOO-BAR"):
        assert ours(name, path) == importlib_choice(name, path) == (egg / "EGG-INFO", "1.0")
    assert dist_facts("foo-bar", path) == ("1.0", None)
    # importlib's legacy rule for eggs does not fold "." into "_": the egg is passed over
    assert ours("foo.bar", path) == importlib_choice("foo.bar", path) == \
        (site / "foo_bar-2.0.dist-info", "2.0")
    # another name's egg holds nothing for foo_bar; a folder not named *.egg has no EGG-INFO
    other = tmp_path / "baz-1.0-py3.11.egg"
    (other / "EGG-INFO").mkdir(parents=True)
    (other / "EGG-INFO" / "PKG-INFO").write_text(meta_text("foo-bar", "3.0"))
    plain = tmp_path / "plain"
    (plain / "EGG-INFO").mkdir(parents=True)
    (plain / "EGG-INFO" / "PKG-INFO").write_text(meta_text("plain", "3.0"))
    path = [str(other), str(plain), str(site)]
    assert ours("foo-bar", path) == importlib_choice("foo-bar", path) == \
        (site / "foo_bar-2.0.dist-info", "2.0")
    assert ours("plain", path) is None and importlib_choice("plain", path) is None


def test_in_an_egg_folder_a_dist_info_comes_before_its_egg_info(tmp_path) -> None:
    egg = tmp_path / "foo-1.0-py3.11.egg"
    (egg / "EGG-INFO").mkdir(parents=True)
    (egg / "EGG-INFO" / "PKG-INFO").write_text(meta_text("foo", "1.0"))
    dist_info(egg, "foo-1.1.dist-info", "foo", "1.1")
    assert ours("foo", [str(egg)]) == importlib_choice("foo", [str(egg)]) == \
        (egg / "foo-1.1.dist-info", "1.1")


def test_an_egg_zip_ahead_of_site_packages_is_the_distribution(tmp_path) -> None:
    egg = write_zip(tmp_path / "foo-1.0-py3.11.egg", {
        "foo/__init__.py": "", "EGG-INFO/PKG-INFO": meta_text("foo", "1.0"),
        "EGG-INFO/top_level.txt": "foo\n"})
    site = tmp_path / "site"
    dist_info(site, "foo-2.0.dist-info", "foo", "2.0")
    path = [str(site / "missing.zip"), str(egg), str(site)]
    assert ours("foo", path) == importlib_choice("foo", path) == ((str(egg), "EGG-INFO"), "1.0")
    assert find_metadata_dir("foo", path) == fingerprint.InZip(str(egg), "EGG-INFO")
    assert dist_facts("foo", path) == ("1.0", None)


def test_a_dist_info_in_a_zip_on_the_path_is_found_and_digested(tmp_path) -> None:
    """Any zip on sys.path (zipimport imports from it) is searched by importlib.metadata:
    its top-level *.dist-info in the archive's order. The digest follows the files it
    lists: their sizes and CRCs as the zip's directory has them."""
    site = tmp_path / "site"
    dist_info(site, "flash_attn-2.7.0.dist-info", "flash_attn", "2.7.0")
    members = {
        "flash_attn-2.8.3.dist-info/METADATA": meta_text("flash_attn", "2.8.3"),
        "flash_attn/__init__.py": "x = 1\n",
        "flash_attn-2.8.3.dist-info/RECORD":
            "flash_attn/__init__.py,,\nflash_attn-2.8.3.dist-info/METADATA,,\n",
        "flash_attn-1.0.dist-info/METADATA": meta_text("flash_attn", "1.0"),
    }
    z = write_zip(tmp_path / "deps.zip", members)
    path = [str(z), str(site)]
    assert ours("Flash-Attn", path) == importlib_choice("Flash-Attn", path) == \
        ((str(z), "flash_attn-2.8.3.dist-info"), "2.8.3")
    version, digest = dist_facts("flash-attn", path) or ("", None)
    assert version == "2.8.3" and digest is not None
    write_zip(z, {**members, "flash_attn/__init__.py": "x = 2\n"})  # same size, new CRC
    assert dist_facts("flash-attn", path) == ("2.8.3", files_digest(
        fingerprint.InZip(str(z), "flash_attn-2.8.3.dist-info"))) != ("2.8.3", digest)
    # the archive's order, not sorted: 2.0 is listed before 1.0
    z2 = write_zip(tmp_path / "two.zip", {
        "foo-2.0.dist-info/METADATA": meta_text("foo", "2.0"),
        "foo-1.0.dist-info/METADATA": meta_text("foo", "1.0")})
    assert ours("foo", [str(z2)]) == importlib_choice("foo", [str(z2)]) == \
        ((str(z2), "foo-2.0.dist-info"), "2.0")


@pytest.mark.parametrize("kind", ["plain", "comment", "prefix", "zip64", "all"])
def test_zips_are_read_however_their_end_records_lie(tmp_path, monkeypatch, kind) -> None:
    """The cheap test that passes over zips holding no metadata (ComfyUI portable's
    python311.zip, ahead of site-packages) finds the central directory as zipfile does:
    after a comment, past data before the zip, through zip64 end records."""
    opts = {"comment": b"a comment" if kind in ("comment", "all") else b"",
            "prefix": b"MZ" + b"\0" * 300 if kind in ("prefix", "all") else b"",
            "zip64": kind in ("zip64", "all"), "monkeypatch": monkeypatch}
    stdlib = write_zip(tmp_path / "python311.zip",
                       {f"mod{i}.pyc": "x" for i in range(50)}, **opts)  # type: ignore[arg-type]
    deps = write_zip(tmp_path / "deps.zip", {
        "foo/__init__.py": "", "foo-1.5.dist-info/METADATA": meta_text("foo", "1.5")},
        **opts)  # type: ignore[arg-type]
    with zipfile.ZipFile(stdlib) as zf:
        assert zf.comment == opts["comment"] and len(zf.namelist()) == 50
    assert (b"PK\x06\x06" in stdlib.read_bytes()) == opts["zip64"]
    site = tmp_path / "site"
    dist_info(site, "foo-2.0.dist-info", "foo", "2.0")
    path = [str(stdlib), str(deps), str(site)]
    assert ours("foo", path) == importlib_choice("foo", path) == \
        ((str(deps), "foo-1.5.dist-info"), "1.5")
    # the standard library's zip is passed over without zipfile parsing it
    with open(stdlib, "rb") as f:
        assert not fingerprint._may_hold_metadata(f)
    with open(deps, "rb") as f:
        assert fingerprint._may_hold_metadata(f)


def test_a_zip_without_metadata_is_read_again_once_it_changes(tmp_path) -> None:
    z = write_zip(tmp_path / "site.zip", {"mod.pyc": "x"})
    assert ours("foo", [str(z)]) is None and importlib_choice("foo", [str(z)]) is None
    write_zip(z, {"mod.pyc": "x", "foo-1.0.dist-info/METADATA": meta_text("foo", "1.0")})
    assert ours("foo", [str(z)]) == importlib_choice("foo", [str(z)]) == \
        ((str(z), "foo-1.0.dist-info"), "1.0")


def test_what_no_zip_is_holds_nothing(tmp_path) -> None:
    (tmp_path / "not.zip").write_bytes(b"PK\x05\x06 garbage")
    (tmp_path / "empty.egg").write_bytes(b"")
    site = tmp_path / "site"
    dist_info(site, "foo-2.0.dist-info", "foo", "2.0")
    path = [str(tmp_path / "not.zip"), str(tmp_path / "empty.egg"), "", str(site)]
    assert ours("foo", path) == importlib_choice("foo", path) == \
        (site / "foo-2.0.dist-info", "2.0")


def test_an_empty_metadata_file_gives_way_to_pkg_info(tmp_path) -> None:
    info = tmp_path / "foo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("")
    (info / "PKG-INFO").write_text(meta_text("foo", "1.0"))
    assert ours("foo", [str(tmp_path)]) == importlib_choice("foo", [str(tmp_path)]) == \
        (info, "1.0")


def test_random_layouts_choose_as_importlib_metadata(tmp_path) -> None:
    """Many layouts at once: names spelt every way a normalised name allows, versions,
    folders or files, dist-info or egg-info, eggs, zips, over several path entries."""
    rng = random.Random(20240611)
    spellings = ["foo_bar", "Foo-Bar", "foo.bar", "FOO__BAR", "foo_bar_baz", "foo",
                 "foo-bar", "foo_.bar"]
    for case in range(80):
        root = tmp_path / str(case)
        path: list[str] = []
        for e in range(rng.randint(1, 4)):
            kind = rng.choice(["dir", "dir", "dir", "egg", "egg zip", "zip"])
            entries: dict[str, str] = {}  # name: "dir" or "file"
            for _ in range(rng.randint(0, 6)):
                stem = f"{rng.choice(spellings)}-{rng.randint(1, 9)}.0"
                suffix = rng.choice([".dist-info", ".egg-info", ".DIST-INFO", ".dist-info"])
                entries[stem + suffix] = rng.choice(["dir", "dir", "file"])
            if kind.startswith("egg"):
                egg = rng.choice(["foo_bar", "Foo_Bar", "foo", "foo.bar"])
                entry = root / f"{egg}-{e}.0-py3.11.egg"
                entries[rng.choice(["EGG-INFO", "egg-info"])] = "dir"
            else:
                entry = root / (f"site{e}.zip" if kind == "zip" else f"site{e}")
            members: dict[str, str] = {}
            for name, form in entries.items():
                version = f"{e}.0" if name.lower() == "egg-info" else \
                    name.split("-", 1)[-1].rsplit(".", 1)[0]
                text = meta_text("x", version)
                file = "PKG-INFO" if "egg" in name.lower() else "METADATA"
                if kind.endswith("zip"):
                    members[f"{name}/{file}" if form == "dir" else name] = text
                elif form == "dir":
                    (entry / name).mkdir(parents=True)
                    (entry / name / file).write_text(text)
                else:
                    entry.mkdir(parents=True, exist_ok=True)
                    (entry / name).write_text(text)
            if kind.endswith("zip"):
                root.mkdir(parents=True, exist_ok=True)
                write_zip(entry, {"mod.py": "", **members})
            path.append(str(entry))
        names = ("foo-bar", "Foo.Bar", "foo", "foo_bar_baz", "FOO_BAR")
        for name in names:
            assert ours(name, path) == importlib_choice(name, path), (case, name, path)
        # all at once, each folder listed once: each as asked alone
        assert fingerprint.find_metadata_dirs(names, path) == \
            {n: find_metadata_dir(n, path) for n in names}, (case, path)
        assert fingerprint.dists_facts(names, path) == \
            {n: fingerprint.dist_facts(n, path) for n in names}, (case, path)


def test_a_lock_written_without_verification_reads_the_target_s_import_path(
        tmp_path: Path) -> None:
    """static_live (the lock of `install --no-verify`) takes each backend's distribution
    from the target's sys.path in order, as the runtime's fingerprint does: an egg folder
    ahead of site-packages wins there, not the site dir's copy."""
    from comfy_env_attn.facts.probe import Target
    from comfy_env_attn.install.installer import static_live

    site, egg = tmp_path / "site-packages", tmp_path / "sageattention-2.2.0-py3.11.egg"
    info = site / "sageattention-1.0.6.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sageattention\n"
                                   "Version: 1.0.6\n\n")
    (info / "RECORD").write_text("")
    (egg / "EGG-INFO").mkdir(parents=True)
    (egg / "EGG-INFO" / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: sageattention\n"
                                               "Version: 2.2.0\n\n")
    path = [str(egg), str(site)]
    target = Target("python", {"purelib": str(site), "platlib": str(site), "sys_path": path})
    assert target.import_path == path
    assert importlib_choice("sageattention", path)[1] == "2.2.0"  # type: ignore[index]
    assert static_live(target).dists["sageattention"] == ("2.2.0", None)
