"""Where an install's time goes: timelines of `comfy-env-attn install --no-verify` of one
local wheel into fresh venvs (made as gpu_install_overhead.py makes them), beside raw
`uv pip install --no-cache` of the same file.

    python3 benchmarks/install_timeline.py [WHEEL_DIR] [--runs 4] [--pad-mb 60]
                                           [--runner tool target] [--system FILE]

Each line of a timeline is milliseconds since the command was started: when its first line
of Python ran (the interpreter's own start before it), each process it started and when
that process ended, the first RECORD it read, and each time it opened its journal or the lock. Without WHEEL_DIR, a wheel is made here: tests/wheels.py's working sageattention,
tagged for this interpreter (with --system, labelled for the profile's CUDA, as
bench_install.py does), grown to --pad-mb with compiled code (_common.padded_wheel). The
first round also fills the tool's caches (the probe's, the owner index): as on a user's
machine, they stay; uv gets an empty cache each run, as raw uv has --no-cache.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ENV, ROOT, padded_wheel, test_wheel

WATCH = ("comfy_env_attn.cli.commands", "comfy_env_attn.install.installer")


def child() -> None:
    """Run the command line here, noting what the timeline shows (an audit hook for files
    and imports; Popen wrapped for the processes and a thread waiting on each one's end)."""
    t0 = float(os.environ["TIMELINE_T0"])
    events: list[tuple[float, str]] = []

    def note(what: str) -> None:
        events.append(((time.time() - t0) * 1000, what))

    note("interpreter up")
    records = [0]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event == "open" and isinstance(args[0], str):
            path = args[0]
            if path.endswith("/RECORD"):
                records[0] += 1
                if records[0] == 1:
                    note("first RECORD read")
                records.append(len(events))  # index where the last one would go
            elif path.endswith(("journal.tmp", "pylock.comfy-env-attn.toml")) or \
                    "/.pylock.comfy-env-attn.toml" in path:
                note("open " + os.path.basename(path))
        elif event == "import" and args[0] in WATCH and f"import {args[0]}" not in \
                {w for _, w in events}:
            note(f"import {args[0]}")

    sys.addaudithook(hook)
    start = subprocess.Popen.__init__

    def init(self: subprocess.Popen[bytes], argv: list[str], *a: object, **k: object) -> None:
        label = " ".join(os.path.basename(str(x)) for x in list(argv)[:3])[:48]
        note(f"start {label}")
        start(self, argv, *a, **k)  # type: ignore[arg-type]
        pid = self.pid

        def ended() -> None:
            try:  # WNOWAIT: the command reaps it itself
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                note(f"end   {label}")
            except OSError:
                pass

        threading.Thread(target=ended, daemon=True).start()

    subprocess.Popen.__init__ = init  # type: ignore[method-assign]

    def report() -> None:
        note(f"exit ({records[0]} RECORDs read)")
        with open(os.environ["TIMELINE_OUT"], "w") as f:
            for t, what in sorted(events):
                print(f"{t:8.1f} ms  {what}", file=f)

    import atexit

    atexit.register(report)  # the first handler registered: it runs last
    sys.argv = ["comfy-env-attn", *sys.argv[2:]]
    runpy.run_module("comfy_env_attn", run_name="__main__", alter_sys=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("wheels", type=Path, nargs="?",
                    help="a folder holding a sageattention wheel (default: one made here)")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--pad-mb", type=float, default=60)
    ap.add_argument("--runner", nargs="*", choices=["tool", "target"], default=["tool", "target"])
    ap.add_argument("--system", type=Path, help="resolve for this System profile (off a GPU)")
    args = ap.parse_args()
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("uv is not on PATH")
    holder = subprocess.run([sys.executable, "-c", "import os, torch; print(os.path.dirname("
                             "os.path.dirname(torch.__file__)))"], capture_output=True,
                            text=True, check=True).stdout.strip()
    purelib = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheels = args.wheels or test_wheel(work / "built", labelled=bool(args.system))
        built = next(wheels.glob("sageattention-*.whl"))
        wheel = padded_wheel(built, args.pad_mb, work / "padded") if args.pad_mb else built
        print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
        for i in range(args.runs):
            for who in ("uv", *args.runner):
                venv = work / f"{who}-{i}"
                subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                                "--system-site-packages", str(venv)], check=True)
                (venv / purelib / "base-env.pth").write_text(holder + "\n")
                py = str(venv / "bin" / "python")
                # the tool's modules from this checkout, as `-m comfy_env_attn` run here
                path = [str(ROOT), *filter(None, ENV.get("PYTHONPATH", "").split(os.pathsep))]
                env = {**ENV, "UV_CACHE_DIR": str(work / "uv-cache"),
                       "TIMELINE_OUT": str(work / "timeline.txt"),
                       "PYTHONPATH": os.pathsep.join(path)}
                if who == "uv":
                    cmd = [uv, "pip", "install", "-q", "--python", py, "--no-cache",
                           "--no-deps", "--no-index", "--find-links", str(wheel.parent),
                           "sageattention"]
                else:
                    runner = sys.executable if who == "tool" else py
                    cmd = [runner, __file__, "--child", "install", "--python", py,
                           "--find-links", str(wheel.parent), "--no-embedded-index",
                           "--backends", "sage", "--no-verify", "-q",
                           *(["--system", str(args.system)] if args.system else [])]
                env["TIMELINE_T0"] = repr(time.time())
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                took = (time.perf_counter() - t0) * 1000
                shutil.rmtree(work / "uv-cache", ignore_errors=True)
                if r.returncode != 0:
                    raise SystemExit(f"{who} failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
                print(f"== round {i + 1}, {'raw uv' if who == 'uv' else who + chr(39) + 's Python'}:"
                      f" {took:.1f} ms")
                if who != "uv":
                    print((work / "timeline.txt").read_text(), end="")
                shutil.rmtree(venv)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child()
    else:
        sys.exit(main())
