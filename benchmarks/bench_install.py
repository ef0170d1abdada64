"""Install time against a raw `uv pip install` of the same wheel from the same local index,
and verification time per backend against a bare `python -c "import torch"` in the target.

    python benchmarks/bench_install.py [--runs 5] [--size-mb 0 60] [--source index folder]
                                       [--runner tool target] [--rate-mb 50] [--compare DIR]

`index`: both install from a PEP 503 index served over loopback (our download, then uv from
the file; uv downloads it itself). `folder`: a local wheel, `--find-links FOLDER` for both.
Each run gets a fresh venv that sees this interpreter's torch (tests/conftest.py's make_venv:
a .pth file names the folder holding it; not timed). raw uv runs with --no-cache; each run of
comfy-env-attn gets an empty UV_CACHE_DIR, so that uv learns the fresh venv's interpreter and
unpacks the wheel within the timed run for both. The wheel is a working CPU sageattention built
here; --size-mb grows it to a realistic wheel size (SageAttention 2 builds are 20-100 MB), with
a payload of each --payload kind:
- `library`: compiled code deflated as wheels ship it (torch's largest shared library,
  _common.padded_wheel), which uv inflates as it installs: what a real CUDA wheel costs;
- `random`: random hex stored uncompressed, which uv only copies: the cheapest wheel of that
  size for uv, and so the hardest case for the ratio.

--runner: which Python runs comfy-env-attn. `tool`: this interpreter, the target named with
--python (the tool in a venv of its own). `target`: the fresh venv's own Python, `python -m
comfy_env_attn install` as the README has ComfyUI's Python run it; the target's fast probe
is then read in the running process (facts.probe_start.in_process).

--compare DIR: also time the command line of another checkout (an earlier commit:
`git worktree add /tmp/before COMMIT`), run by this interpreter. The runs of the three
commands alternate, and the order turns each round, so that a machine slowing down or
speeding up during the bench weighs on all three alike (on a shared 2-core machine the
medians of separate benches can differ by 0.1 s).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import CLI, ENV, ROOT, alternating, padded_wheel, serve
from _common import timed as run_timed

from comfy_env_attn.core.paths import cache_dir

sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_venv, venv_python, write_gpu_profile
from wheels import SAGE_OK, build_wheel


def uv_bin() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


def fresh_venv(path: Path) -> Path:
    return venv_python(make_venv(path, torch=True))


def timed(cmd: list[str], root: Path = ROOT, env: dict[str, str] | None = None) -> float:
    """Seconds the command took; run from `root` with `root` first on the import path, so
    that `python -m comfy_env_attn` is that checkout's."""
    return run_timed(cmd, cwd=root, env={**ENV, "PYTHONPATH": str(root), **(env or {})})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mb", type=int, nargs="*", default=[0, 60])
    ap.add_argument("--source", nargs="*", choices=["index", "folder"],
                    default=["index", "folder"])
    ap.add_argument("--payload", nargs="*", choices=["library", "random"],
                    default=["library", "random"],
                    help="what a wheel of --size-mb above 0 is grown with (see above)")
    ap.add_argument("--runner", nargs="*", choices=["tool", "target"], default=["tool"],
                    help="which Python runs comfy-env-attn (see above)")
    ap.add_argument("--rate-mb", type=float, default=None,
                    help="pace the index server at this many MB/s (default: loopback speed)")
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="also time the command line of this checkout (an earlier commit)")
    args = ap.parse_args()
    roots = {"ours": ROOT, **({"compare": args.compare.resolve()} if args.compare else {})}
    import torch

    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    version = f"2.2.0+cu128torch{minor}"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prof = write_gpu_profile(d)
        print(f"{'source':>6}  {'runner':>6}  {'wheel':>18}  {'comfy-env-attn install':>24}  "
              f"{'raw uv pip install':>20}  {'ratio':>6}  {'difference':>10}"
              + (f"  {'--compare checkout':>20}" if args.compare else ""))
        for size, payload in [(mb, kind) for mb in args.size_mb
                              for kind in (args.payload if mb else [""])]:
            files = {"sageattention/__init__.py": SAGE_OK}
            if size and payload == "random":
                files["sageattention/_payload.txt"] = os.urandom(size * 1024 * 512).hex()
            site = d / f"site{size}{payload}"
            w = build_wheel(site / "built", "sageattention", version, files,
                            requires=["torch>=2.0"])
            if payload == "library":
                w = padded_wheel(w, size, site / "files")
            else:
                (site / "files").mkdir()
                w = Path(shutil.copy2(w, site / "files"))
            sha = hashlib.sha256(w.read_bytes()).hexdigest()
            (site / "simple" / "sageattention").mkdir(parents=True)
            base, srv = serve(site, args.rate_mb * 1e6 if args.rate_mb else None)
            (site / "simple" / "sageattention" / "index.html").write_text(
                f'<a href="{base}/files/{w.name.replace("+", "%2B")}#sha256={sha}">{w.name}</a>')
            for source, runner in [(s, r) for s in args.source for r in args.runner]:
                if source == "index":
                    ours_src = ["--index-url", f"{base}/simple"]
                    uv_src = ["--index-url", f"{base}/simple"]
                else:
                    ours_src = ["--find-links", str(site / "files")]
                    uv_src = ["--no-index", "--find-links", str(site / "files")]

                def run(who: str, i: int, case: str = f"{size}{payload}-{source}-{runner}",
                        ours_src: list[str] = ours_src, uv_src: list[str] = uv_src,
                        runner: str = runner) -> float:
                    py = fresh_venv(d / f"{who}{case}-{i}")
                    if who == "uv":
                        return timed([uv_bin(), "pip", "install", "-q", "--python", str(py),
                                      *uv_src, "--no-cache",
                                      "--no-deps",  # uv does not see torch through a .pth
                                      f"sageattention=={version}"])
                    # like uv --no-cache: no wheel or metadata downloaded by an earlier run
                    # (the probe's cache of torch's facts stays, as on a user's machine), and
                    # an empty uv cache of its own: uv learns the fresh venv's interpreter
                    # and unpacks the wheel within the timed run
                    for sub in ("wheels", "metadata"):
                        shutil.rmtree(cache_dir() / sub, ignore_errors=True)
                    uv_cache = d / f"uv-cache-{who}{case}-{i}"
                    try:
                        cli = CLI if runner == "tool" else [str(py), "-m", "comfy_env_attn"]
                        return timed(
                            [*cli, "install", "--python", str(py), "--system", str(prof),
                             *ours_src, "--no-embedded-index", "--backends", "sage",
                             "--no-verify"], roots[who], {"UV_CACHE_DIR": str(uv_cache)})
                    finally:
                        shutil.rmtree(uv_cache, ignore_errors=True)

                times = alternating(args.runs, (*roots, "uv"), run)
                a, b = statistics.median(times["ours"]), statistics.median(times["uv"])
                label = f"{w.stat().st_size / 1e6:.1f} MB" + (f" {payload}" if payload else "")
                c = f"  {statistics.median(times['compare']):>18.3f} s" if args.compare else ""
                print(f"{source:>6}  {runner:>6}  {label:>18}  {a:>22.3f} s  {b:>18.3f} s  {a / b:>6.2f}  "
                      f"{a - b:>+8.3f} s{c}", flush=True)
            srv.shutdown()
        # verification time per backend against a bare import torch in the target
        py = fresh_venv(d / "verify")
        imp = statistics.median(timed([str(py), "-c", "import torch"])
                                for _ in range(args.runs))
        from comfy_env_attn.verify.run import Options, run_one

        for backend in ("sdpa",):
            ts = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                res = run_one(str(py), backend, Options())
                ts.append(time.perf_counter() - t0)
                assert res.passed, res.error
            v = statistics.median(ts)
            print(f"verify {backend}: {v:.2f} s (checks + CPU bench); import torch: {imp:.2f} s;"
                  f" ratio {v / imp:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
