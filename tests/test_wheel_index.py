"""The embedded index is a document to trust and reproduce: the generator rebuilds the
committed files byte for byte offline, each file names its generator, pin and where each stored
fact came from, and wheels generated from a naming pattern rank after observed ones."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from conftest import ROOT, make_system

from comfy_env_attn.candidates.sources import (
    Candidate,
    candidate_from_json,
    embedded_dir,
    load_embedded,
)
from comfy_env_attn.resolve import resolve

SCRIPT = ROOT / "scripts" / "update_wheel_index.py"
PEP691 = {"filename", "url", "hashes", "size", "requires-python", "yanked"}
OURS = {"requires-torch", "built-torch", "cuda", "sm"}  # build facts PEP 691 has no name for


def test_the_committed_index_is_what_the_generator_writes_offline() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--offline", "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_each_file_names_its_generator_pin_and_where_its_facts_came_from() -> None:
    script_sha = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    files = sorted(embedded_dir().glob("*.json"))
    assert {p.stem for p in files} == {"comfy_forge", "dao_ailab", "mjun0812", "pypi",
                                       "woct0rdho"}
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["schema"] == 2, path.name
        assert doc["generator"] == {"script": "scripts/update_wheel_index.py",
                                    "sha256": script_sha}, path.name
        assert doc["pin"], path.name
        stored = {k for w in doc["wheels"] for k in w} | set(doc["defaults"])
        assert stored <= PEP691 | OURS, (path.name, stored - PEP691 - OURS)
        # every stored fact beyond the link itself says where it came from
        assert stored - {"filename", "url"} <= set(doc["facts-from"]), path.name
    dao = json.loads((embedded_dir() / "dao_ailab.json").read_text())
    assert "naming pattern" in dao["generated-from"]


def test_generated_names_rank_after_observed_wheels() -> None:
    system = make_system(torch="2.8.0+cu128", python="3.12.3", gpus=("9.0",))
    observed = Candidate("flash_attn-2.8.2+cu128torch2.8-cp312-cp312-linux_x86_64.whl",
                         "https://x/a.whl", "index:x")
    generated = Candidate("flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-"
                          "linux_x86_64.whl", "https://x/b.whl", "embedded:dao",
                          generated="a naming pattern")
    (flash,) = [b for b in resolve(system, [generated, observed], ["flash"]).backends
                if b.backend == "flash"]
    assert flash.selected == observed  # an older version seen in a listing wins
    assert [r.candidate for r in flash.rejected] == [generated]
    (flash,) = [b for b in resolve(system, [generated], ["flash"]).backends
                if b.backend == "flash"]
    assert flash.selected == generated
    assert any("not seen in a listing: its name comes from a naming pattern" in n
               for n in flash.notes)
    # the same file in a listing: observed after all
    (flash,) = [b for b in resolve(system, [generated, Candidate(
        generated.filename, "https://x/c.whl", "index:y")], ["flash"]).backends
        if b.backend == "flash"]
    assert flash.selected is not None and flash.selected.generated is None


def test_embedded_entries_load_with_schema_2_and_schema_1_names() -> None:
    dao = [c for c in load_embedded(["flash-attn"]) if c.source == "embedded:Dao-AILab/"
           "flash-attention"]
    assert len(dao) == 50 and all(c.generated for c in dao)
    (c,) = [c for c in load_embedded(["xformers"]) if c.filename ==
            "xformers-0.0.28-cp310-cp310-manylinux_2_28_x86_64.whl"]
    assert c.sha256 and c.requires_python == ">=3.7" and c.built_torch == "2.4.1+cu121"
    old = candidate_from_json({"filename": "a-1-py3-none-any.whl", "url": "u",
                               "sha256": "ab" * 32, "requires_python": ">=3.9",
                               "built_torch": "2.8.0"}, source="s")
    new = candidate_from_json({"filename": "a-1-py3-none-any.whl", "url": "u",
                               "hashes": {"sha256": "ab" * 32}, "requires-python": ">=3.9",
                               "built-torch": "2.8.0"}, source="s")
    assert old == new and new.sha256 == "ab" * 32
