"""Install overhead with a real wheel on the GPU machine (gpu_variants.sh runs it after the
build): `comfy-env-attn install --no-verify` of the built SageAttention wheel against a raw
`uv pip install --no-cache` of the same file, each into a fresh venv that sees the base torch
and its packages (--system-site-packages, and a .pth file naming torch's folder).

    python3 benchmarks/gpu_install_overhead.py [WHEEL_DIR] [--runs 9] [--pad-mb 0 60]
                                               [--runner tool target] [--json FILE]
                                               [--system F]

--pad-mb: the wheel as built (0), and copies of it grown to about that many MB with compiled
code deflated as wheels ship it (_common.padded_wheel: torch's largest shared library), for
the size a goal names.

--runner: `tool`, the tool run as CEA says with the venv named by --python; `target`, the
fresh venv's own Python running `-m comfy_env_attn` (the README's usage, ComfyUI's Python
running the tool; the tool's modules come from PYTHONPATH), whose probe is read in process.

--compare DIR: also the target runner with the tool's modules from DIR (a checkout of an
earlier commit, `git archive COMMIT | tar -x -C DIR`), its runs alternating with the others.

--venvs: `system` (the default), each venv sees the base Python's site-packages, and runs
the base's .pth start-up hooks at each start; `isolated`, it does not: it sees torch's
folder (the site-packages holding torch, every package in it) through a .pth file naming
it, whose own .pth hooks are then not run, as in a ComfyUI venv with torch installed in it. Raw uv starts the target's Python once (its query of it), the
target runner twice (the tool itself, then uv's query), so a hook slow at start weighs on
the target runner twice: the GPU machine's base Pythons import certifi and numba-cuda's
redirector from .pth files (40-80 ms a start). Each Python's start is printed beside the
figures (`-c pass`, median of 7), the floor under the tool's own part.

Without WHEEL_DIR: _common.test_wheel's sageattention (tests/wheels.py, tagged for this
interpreter), for the overhead where no SageAttention was built. Each command's time is
also given against raw uv's in the same round (median and quartiles): uv's own unpacking of
a 60 MB wheel varies by more than the tool's part, and the difference of medians with it.

The commands alternate, the order turning each round; each run of ours gets an empty
UV_CACHE_DIR (as raw uv has --no-cache), so both learn the fresh venv's interpreter and
unpack the wheel within the timed run. The tool runs as CEA says (default `python3 -m
comfy_env_attn`), uv as found on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ENV, alternating, padded_wheel, test_wheel, timed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("wheels", type=Path, nargs="?",
                    help="the folder holding the built wheel (default: _common.test_wheel's)")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--pad-mb", type=float, nargs="*", default=[0],
                    help="0: the wheel as built; MB: a copy grown to about that size")
    ap.add_argument("--runner", nargs="*", choices=["tool", "target"], default=["tool"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--system", type=Path,
                    help="resolve for this System profile (to try the script off a GPU)")
    ap.add_argument("--compare", type=Path, metavar="DIR",
                    help="also the target runner with the tool's modules from this checkout")
    ap.add_argument("--venvs", choices=["system", "isolated"], default="system",
                    help="whether each fresh venv sees the base Python's site-packages")
    args = ap.parse_args()
    runners = [*args.runner, *(["compare"] if args.compare else [])]
    cea = os.environ.get("CEA", "python3 -m comfy_env_attn").split()
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("uv is not on PATH")
    made = tempfile.TemporaryDirectory()
    if args.wheels is None:
        args.wheels = test_wheel(Path(made.name), labelled=bool(args.system))
    built = next(args.wheels.glob("sageattention-*.whl"))
    # the folder holding the base torch, named in each venv by a .pth file (as gpu_variants.sh
    # does where --system-site-packages does not show it)
    holder = subprocess.run([sys.executable, "-c", "import os, torch; print(os.path.dirname("
                             "os.path.dirname(torch.__file__)))"], capture_output=True,
                            text=True, check=True).stdout.strip()
    purelib = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"

    def make_venv(venv: Path) -> str:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                        *(["--system-site-packages"] if args.venvs == "system" else []),
                        str(venv)], check=True)
        (venv / purelib / "base-env.pth").write_text(holder + "\n")
        return str(venv / "bin" / "python")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        starts = {f"a fresh venv's Python ({args.venvs})": _start_ms(make_venv(
            Path(tmp) / "start"))}
        if cea[1:3] == ["-m", "comfy_env_attn"]:  # a Python (not a console script)
            starts["the tool's Python"] = _start_ms(cea[0])
        print("Python start (-c pass, median of 7): " + ", ".join(
            f"{who} {ms:.0f} ms" for who, ms in starts.items()), flush=True)
        for pad in args.pad_mb:
            wheels = args.wheels if not pad else padded_wheel(
                built, pad, Path(tmp) / f"padded-{pad:g}").parent
            wheel = next(wheels.glob("sageattention-*.whl"))

            def run(who: str, i: int, wheels: Path = wheels) -> float:
                venv = Path(tmp) / f"{who}-{i}"
                py = make_venv(venv)
                env, cwd = dict(ENV), Path.cwd()
                if who == "uv":
                    cmd = [uv, "pip", "install", "-q", "--python", py, "--no-cache", "--no-deps",
                           "--no-index", "--find-links", str(wheels), "sageattention"]
                else:
                    runner = cea if who == "tool" else [py, "-m", "comfy_env_attn"]
                    if who == "compare":  # its modules first: `-m` looks in cwd, then there
                        cwd = args.compare.resolve()
                        env["PYTHONPATH"] = os.pathsep.join(
                            [str(cwd), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
                    cmd = [*runner, "install", "--python", py, "--find-links", str(wheels),
                           "--no-embedded-index", "--backends", "sage", "--no-verify", "-q",
                           *(["--system", str(args.system)] if args.system else [])]
                    env["UV_CACHE_DIR"] = str(Path(tmp) / f"uv-cache-{i}")
                try:
                    return timed(cmd, cwd=cwd, env=env)
                finally:
                    shutil.rmtree(venv)
                    shutil.rmtree(Path(tmp) / f"uv-cache-{i}", ignore_errors=True)

            times = alternating(args.runs, (*runners, "uv"), run)
            raw = statistics.median(times["uv"])
            size = wheel.stat().st_size / 1e6
            what = "as built" if not pad else "grown with compiled code"
            row: dict[str, object] = {"wheel": wheel.name, "mb": size, "padded": bool(pad),
                                      "runs": times, "uv": raw}
            for runner in runners:
                ours = statistics.median(times[runner])
                who = f"the {runner}'s Python" if runner != "compare" else \
                    f"the target's Python from {args.compare}"
                paired = _quartiles([a - b for a, b in zip(times[runner], times["uv"],
                                                           strict=True)])
                print(f"{wheel.name} ({size:.1f} MB, {what}), medians of {args.runs}: "
                      f"comfy-env-attn install run by {who} {ours:.3f} s, "
                      f"raw uv pip install {raw:.3f} s, ratio {ours / raw:.2f}, "
                      f"difference {ours - raw:+.3f} s; against raw uv in the same round "
                      f"{paired[1]:+.3f} s (quartiles {paired[0]:+.3f} to {paired[2]:+.3f})",
                      flush=True)
                row["ours" if runner == "tool" else runner] = ours
            if "compare" in runners and "target" in runners:
                q = _quartiles([a - b for a, b in zip(times["target"], times["compare"],
                                                      strict=True)])
                print(f"  the target's Python, this checkout against {args.compare} in the "
                      f"same round: {q[1]:+.3f} s (quartiles {q[0]:+.3f} to {q[2]:+.3f})")
            results.append(row)
    if args.json:
        # the wheel as built first, as this file held before --pad-mb
        args.json.write_text(json.dumps({**results[0], "sizes": results, "venvs": args.venvs,
                                         "python_start_ms": starts}, indent=1))
    return 0


def _start_ms(python: str) -> float:
    """Milliseconds this Python takes to start and end (`-c pass`), median of 7."""
    return statistics.median(timed([python, "-c", "pass"]) for _ in range(7)) * 1000


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile): a difference taken within each round is
    steadier than the difference of medians where the machine's speed drifts."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[-1]


if __name__ == "__main__":
    sys.exit(main())
