"""The command line of comfy-env-attn (its commands: _COMMANDS).

Results go to stdout (--json where a machine reads them), progress and logs to stderr.
Exit 0 success, 1 a failure the message explains (a file or folder the command line names
that is missing or not what it should be included), 2 bad usage (words the command line
cannot mean: an unknown option or backend, options that contradict, a required one
missing, an empty path).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence

from comfy_env_attn import __version__
from comfy_env_attn.core.errors import AttnError, UsageError

TYPE_CHECKING = False  # typing and argparse load after what starts first (_start_early)
if TYPE_CHECKING:
    import argparse
    from typing import Any


def _parser_class() -> type[argparse.ArgumentParser]:
    """An ArgumentParser whose errors are UsageError (argparse loads here, not at import:
    see _start_early)."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(f"{self.prog}: {message}")

    return _Parser


JSON_HELP = "one JSON document on stdout (schemas: docs/json.md)"


def _target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (one of)").add_mutually_exclusive_group()
    g.add_argument("--python", type=_given, metavar="PATH",
                   help="the interpreter ComfyUI runs with")
    g.add_argument("--comfyui", type=_given, metavar="DIR",
                   help="a ComfyUI folder (finds python_embeded, .venv, venv, ...)")
    g.add_argument("--comfy-cli", action="store_true",
                   help="use comfy-cli's configured workspace")


def _index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("wheel sources")
    g.add_argument("--index-url", type=_given, action="append", default=[], metavar="URL",
                   help="a PEP 503/691 simple index (repeatable)")
    g.add_argument("--find-links", type=_given, action="append", default=[],
                   metavar="URL|PATH",
                   help="an HTML page of links or a folder of wheels (repeatable)")
    g.add_argument("--pypi", action="store_true", help="also search PyPI live")
    g.add_argument("--no-embedded-index", action="store_true",
                   help="leave the embedded index out")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=_given, metavar="FILE",
                   help="a comfy-env.toml: the attention packages it asks for, with their "
                        "versions")
    p.add_argument("--env", type=_given, metavar="NAME",
                   help="the environment of --config to use (default: each in turn)")


def _common(p: argparse.ArgumentParser) -> None:
    # -v goes before or after the command. Each subparser writes its defaults over the
    # top-level ones, so here it leaves verbose alone unless -v is given after the command.
    import argparse

    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="tracebacks and details")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress lines (results and errors only)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `command` only that command's part (what a run
    parses: building all twelve is a few milliseconds of every start)."""
    parser_class = _parser_class()
    parser = parser_class(prog="comfy-env-attn",
                          description="comfy-env-attn: " + " | ".join(_COMMANDS))
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks and details")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines (results and errors only)")
    parser.add_argument("--version", action="version", version=f"comfy-env-attn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    for name, add in _COMMANDS.items():
        if command is None or name == command:
            add(sub, name)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list names when it names a known one: its first argument
    that is not an option (the top-level options take no value); None after a top-level
    -h, whose help lists every command."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in _COMMANDS else None
        if a in ("--", "-h", "--help"):
            return None  # the top-level help lists every command
    return None


def _probe(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="what the target machine and interpreter are")
    _target_args(p)
    _common(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help=JSON_HELP)
    fmt.add_argument("--toml", action="store_true", help="a System profile for --system")
    p.add_argument("--no-cache", action="store_true", help="re-run the interpreter probe")


def _plan(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="which wheel fits, and why the others do not")
    _target_args(p)
    p.add_argument("--system", type=_given, metavar="FILE",
                   help="resolve for a System profile (TOML)")
    _index_args(p)
    p.add_argument("--backends", type=_given, metavar="LIST",
                   help="comma-separated, e.g. sage,flash")
    _config_args(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _common(p)


def _doctor(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="what is wrong with the target and what to do")
    _target_args(p)
    _index_args(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _common(p)


def _install(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="install the fitting wheels with uv, verify, lock")
    _target_args(p)
    _index_args(p)
    p.add_argument("--backends", type=_given, metavar="LIST",
                   help="comma-separated, e.g. sage,flash (default: every backend a wheel "
                        "fits)")
    _config_args(p)
    p.add_argument("--system", type=_given, metavar="FILE",
                   help="resolve for this System profile; install and verify in the target")
    p.add_argument("--from-lock", type=_given, metavar="FILE",
                   help="reinstall exactly what a lock records")
    p.add_argument("--dry-run", action="store_true",
                   help="show what would be installed, and why; change nothing")
    p.add_argument("--yes", action="store_true",
                   help="allow installing into a Python that is not a venv")
    p.add_argument("--force", action="store_true",
                   help="install even where --system or --config contradicts the target "
                        "interpreter, or the target has no torch")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep a backend that fails verification")
    p.add_argument("--no-verify", action="store_true",
                   help="skip verification: the lock marks backends unverified")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _build_args(p, "a requested backend with no fitting wheel")
    _verify_opts(p)
    _common(p)


def _build(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="compile a backend from source for this machine's GPU "
                                  "into the wheelhouse")
    _target_args(p)
    p.add_argument("--backends", type=_given, metavar="LIST", required=True,
                   help="comma-separated, those with a pinned source, e.g. sage")
    p.add_argument("--system", type=_given, metavar="FILE",
                   help="build for this System profile's GPUs (compiled against the "
                        "target's own torch)")
    p.add_argument("--force", action="store_true",
                   help="build even where --system contradicts the target's torch or Python "
                        "(the wheel is labelled with the profile's)")
    p.add_argument("--dry-run", action="store_true", help="check the prerequisites only")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _build_args(p, None)
    _common(p)


def _uninstall(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="remove what install put in (torch and the rest stay), "
                                  "rewrite the lock")
    _target_args(p)
    p.add_argument("--backends", type=_given, metavar="LIST",
                   help="these backends (default: the ones the lock records)")
    p.add_argument("--with-requirements", action="store_true",
                   help="also remove the requirements install put in for them alone, unless "
                        "an installed package requires one (without it they stay, named; "
                        "ComfyUI and custom nodes may import one without declaring it)")
    p.add_argument("--yes", action="store_true",
                   help="allow changing a Python that is not a venv")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _common(p)


def _verify(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="prove the installed backends and rewrite the lock")
    _target_args(p)
    p.add_argument("--include", metavar="LIST",
                   help="also prove and lock these, which verification leaves out unless "
                        "asked: the approximate taylor plugin (later verify runs keep them)")
    p.add_argument("--yes", action="store_true",
                   help="allow writing the lock into a Python that is not a venv")
    _verify_opts(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _common(p)


def _lock(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="show the lock and whether it matches this machine")
    _target_args(p)
    p.add_argument("--file", type=_given, metavar="PATH",
                   help="a lock file other than the target's")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    _common(p)


def _launch_args(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="the ComfyUI flag for the verified best backend")
    _target_args(p)
    p.add_argument("--exact", action="store_true", help="non-quantized backends only")
    _common(p)


def _bench(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="time the installed backends against SDPA")
    _target_args(p)
    p.add_argument("--backends", type=_given, metavar="LIST",
                   help="comma-separated (default: every installed backend)")
    p.add_argument("--json", action="store_true", help="the timings as JSON (docs/json.md)")
    _verify_opts(p)
    _common(p)


def _node(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="place or remove the Attention Backend node in a ComfyUI")
    nodes = p.add_subparsers(dest="node_command", metavar="{install,remove}", required=True,
                             parser_class=type(p))
    for action, text in (("install", "copy the node into DIR/custom_nodes/comfy_env_attn/"),
                         ("remove", "take away the node `node install` placed")):
        q = nodes.add_parser(action, help=text)
        g = q.add_argument_group("target (one of)").add_mutually_exclusive_group()
        g.add_argument("--comfyui", type=_given, metavar="DIR", help="the ComfyUI folder")
        g.add_argument("--comfy-cli", action="store_true",
                       help="use comfy-cli's configured workspace")
        _common(q)
    _common(p)


def _cache(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="what the tool's cache folder holds; clean removes it")
    p.add_argument("cache_command", nargs="?", choices=("info", "clean"), default="info",
                   metavar="info|clean", help="info (the default) or clean")
    p.add_argument("--wheelhouse", action="store_true",
                   help="clean the wheels built for this GPU too (kept by default)")
    p.add_argument("--json", action="store_true", help="the parts as JSON (docs/json.md)")
    _common(p)


# The commands in the order --help lists them.
_COMMANDS: dict[str, Callable[[Any, str], None]] = {
    "probe": _probe, "plan": _plan, "doctor": _doctor, "install": _install, "build": _build,
    "uninstall": _uninstall, "verify": _verify, "lock": _lock, "launch-args": _launch_args,
    "bench": _bench, "node": _node, "cache": _cache}


def _build_args(p: argparse.ArgumentParser, when: str | None) -> None:
    g = p.add_argument_group("building from source")
    if when:
        g.add_argument("--build", action="store_true",
                       help=f"compile {when} from source for this GPU (into the wheelhouse)")
    g.add_argument("--source", type=_given, metavar="DIR|FILE|URL",
                   help="build from this source instead of the pinned one (URL#sha256=HEX "
                        "checks it)")


def _verify_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification")
    g.add_argument("--device", type=_device_arg,
                   help="cuda, cuda:1 or cpu (default: cuda when available)")
    g.add_argument("--shapes", metavar="BxHxNxD,...", type=_shapes_arg,
                   help="benchmark shapes, e.g. 1x24x4608x128,2x10x4096x64")
    g.add_argument("--timeout", type=_timeout_arg, help="seconds per backend (default 600)")


# Checked as the command line is read (exit 2), before anything starts, and the same for
# every command and for --dry-run.

def _given(text: str) -> str:
    """A path, URL or command named on the command line: never empty (an unset variable in
    a script would otherwise leave the default in its place: the tool's own Python, a fresh
    plan instead of a lock's)."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("empty (an unset variable?)")
    return text


def _device_arg(text: str) -> str:
    import argparse
    import re

    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give cuda, cuda:N (a GPU's index) or cpu")
    return text


def _shapes_arg(text: str) -> list[list[int]]:
    import argparse

    try:
        shapes = [[int(x) for x in s.lower().split("x")] for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give BxHxNxD,... e.g. 1x24x4608x128") \
            from None
    if any(len(s) != 4 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: each shape needs 4 numbers, BxHxNxD "
                                         "(batch, heads, tokens, head dim)")
    if any(n < 1 for s in shapes for n in s):
        raise argparse.ArgumentTypeError(f"{text!r}: each number must be 1 or more")
    return shapes


def _timeout_arg(text: str) -> float:
    import argparse
    import math

    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return seconds



# The commands that run `uv pip ... --python TARGET`, unless they only plan.
_RUN_UV = ("install", "uninstall")
# The commands that ask NVML about the GPUs, unless given a System profile (--system).
_READ_GPUS = ("probe", "plan", "doctor", "install", "build")


def target_named(args: argparse.Namespace) -> bool:
    """Whether the command line names a target (--python, --comfyui, --comfy-cli); without
    one, the Python running this tool stands in."""
    return any(getattr(args, a, None) for a in ("python", "comfyui", "comfy_cli"))


def _start_probe(args: argparse.Namespace) -> None:
    """Start now what the command will wait for (_start_for), as the parsed command line
    says: what _start_early started from the same words is not started again."""
    _start_for(args.command, python=getattr(args, "python", None),
               comfyui=getattr(args, "comfyui", None),
               comfy_cli=bool(getattr(args, "comfy_cli", False)),
               dry_run=bool(getattr(args, "dry_run", False)),
               system=getattr(args, "system", None))


def _start_for(command: str | None, *, python: str | None = None, comfyui: str | None = None,
               comfy_cli: bool = False, dry_run: bool = False, system: str | None = None
               ) -> None:
    """Start what the command will wait for: the target's probe; uv's own query of the
    target, for a command that runs uv; NVML's answer, for one that reads the GPUs. Their
    start-up then overlaps the command's imports (most of a quick install's own time). The
    processes first (the thread's imports would hold them back), uv's query before the
    probe, which then starts after uv is found (3 ms): an install waits on that query, the
    longer of the two. A target that cannot be found is left for the command to report."""
    from comfy_env_attn.facts.probe_start import start_gpu_probe, start_probe, warm_uv

    if python or comfyui or comfy_cli:
        from comfy_env_attn.facts.locate import find_python_auto

        try:
            exe, _how = find_python_auto(python=python, comfyui=comfyui,
                                         use_workspace=comfy_cli)
        except (AttnError, OSError):
            pass
        else:
            if command in _RUN_UV and not dry_run:
                warm_uv(exe)
            start_probe(exe)
    if command in _READ_GPUS and not system:
        start_gpu_probe()


# The options _start_early reads: those taking a value, and flags.
_EARLY_VALUES = ("--python", "--comfyui", "--system")
_EARLY_FLAGS = ("--comfy-cli", "--dry-run")


def _start_early(argv: Sequence[str]) -> None:
    """_start_for from the words of the command line, before argparse and the command's
    imports load (the first milliseconds of the command line's own process, main's
    short_lived): uv's query of the target is
    then under way 5 ms sooner, and an install into a fresh uv cache waits on that query.
    Only the exact spellings count (`--python X`, `--python=X`, `--dry-run`); anything
    else, and what the command line really means, is left to the parse that follows (which
    starts what is missing, and reports what is wrong). Starting something the command will
    not want costs nothing but the start: it is stopped at exit."""
    command = _command_of(argv)
    if command is None:
        return
    seen: dict[str, Any] = {}
    words = iter(argv)
    for word in words:
        if word == "--":
            break
        name, eq, value = word.partition("=")
        if name in _EARLY_VALUES:
            given = value if eq else next(words, None)
            if given is None or given.startswith("-"):
                return  # argparse's to reject
            seen[name[2:]] = given
        elif word in _EARLY_FLAGS:
            seen[word[2:].replace("-", "_")] = True
    _start_for(command, **seen)


def console() -> None:
    """The console script and `python -m comfy_env_attn`: the command (entry), then the
    process ends at once (_end_now). `--help` and `--version` end it as well."""
    try:
        status = entry()
    except SystemExit as e:  # argparse's own exits; a message to print is Python's to print
        if e.code is not None and not isinstance(e.code, int):
            raise
        status = e.code or 0
    _end_now(status)


def _end_now(status: int) -> None:
    """End the process with this status once what Python runs at exit has run (the atexit
    handlers: ours stop what the command started; weakref finalizers remove temporary
    folders) and stdout and stderr are flushed, without the interpreter's teardown: freeing
    each of the 200 modules' objects one by one, which only tells the operating system what
    it knows, took 8 ms on the H100 machine (a tenth of an install's own time). A stream
    that cannot be flushed ends it with 120, as Python's own exit does (`plan --json >
    out.json` on a full disk must not look like a success). Where a thread that is not a
    daemon still runs, Python's own exit, which waits for it, ends the process; also under
    a profiler, tracer or other tool watching it (`python -m cProfile -m comfy_env_attn`,
    coverage), which reports once the command returns. Embedders call main()."""
    import threading

    monitoring = getattr(sys, "monitoring", None)  # Python 3.12: cProfile and coverage
    if sys.getprofile() is not None or sys.gettrace() is not None or \
            (monitoring is not None and any(monitoring.get_tool(i) is not None
                                            for i in range(6))) or \
            any(t.is_alive() and not t.daemon for t in threading.enumerate()
                if t is not threading.current_thread()):
        sys.exit(status)
    import atexit

    atexit._run_exitfuncs()
    _exit_flushed(status)


def _exit_flushed(status: int) -> None:
    """stdout and stderr flushed, then the process ends at once with this status, or with
    120 where a stream cannot be flushed (as Python's own exit)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # pythonw has none
                stream.flush()
        except (OSError, ValueError):
            status = 120
    os._exit(status)


def entry() -> int:
    """The command in one short-lived process (console() ends it).

    Python's cyclic garbage collector finds nothing to free in the objects that loading the
    modules creates, yet its passes over them cost about 20 ms while they load and 30 ms at
    exit, a sixth of a quick install. So it is off while they load, and they are frozen
    (left out of every later pass) once loaded and again at exit. Later garbage is still
    collected. `main` itself leaves the collector alone: tests and embedders call it in
    their own long-lived process."""
    gc.disable()
    import atexit

    atexit.register(_ignore_signals)  # the first registered, so run last of all (see below)
    status = 1  # an exception that escapes: Python's traceback and exit 1
    try:
        _interrupt_on_termination()
        status = main(short_lived=True)
    except KeyboardInterrupt:  # in the instant before main's own handling
        print("ERROR interrupted", file=sys.stderr)
        _json_error(sys.argv[1:], "interrupted")
        status = 130
    finally:
        gc.freeze()
        _exit_on_late_signals(status)
    return status


def _exit_on_late_signals(status: int) -> None:
    """The command has ended and said how: a signal from here on ends the process at once
    with that status. Python's shutdown puts the default handlers back, so that a Ctrl-C or
    SIGTERM arriving while the interpreter winds down (a second one, or one sent as the
    command finished) killed it, its exit status saying "killed by a signal" after an
    install that completed, or after the interruption was handled and reported (exit 130);
    and what the shutdown still waits for (the threads of a verification that was stopped)
    must stay interruptible. After the last exit handler (_ignore_signals) nothing is left to
    wait for, and a signal is ignored."""
    def now(signum: int, frame: Any) -> None:
        _exit_flushed(status)

    _handle_signals(now)


def _ignore_signals() -> None:
    import signal

    _handle_signals(signal.SIG_IGN)


def _handle_signals(handler: Any, names: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGHUP")
                    ) -> None:
    """Handle these signals so, where the platform has them; one the caller set to be
    ignored (nohup; SIGINT for a background job of a script) stays ignored."""
    import signal

    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) not in (signal.SIG_IGN, None):
            signal.signal(sig, handler)


def _interrupt_on_termination() -> None:
    """SIGTERM (`timeout`, a service manager) and SIGHUP (a closed terminal) interrupt the
    command as Ctrl-C does: an install rolls back at once, and what it started in sessions
    of its own (uv's early query of the target, a build's compilers) is stopped at exit,
    which a plain termination would leave running. A signal the caller set to be ignored
    (nohup) stays ignored."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    _handle_signals(interrupt, ("SIGTERM", "SIGHUP"))


def _json_error(argv: list[str], e: Exception | str) -> None:
    """A command asked for --json that fails still prints one JSON document (docs/json.md):
    a script reads why from stdout, as it reads a result."""
    if any(a.startswith("--j") and "--json".startswith(a) for a in argv):  # --js too
        import json

        command = next((a for a in argv if not a.startswith("-")), None)
        print(json.dumps({"schema": 1, "command": command, "ok": False, "error": str(e)}))


def main(argv: Sequence[str] | None = None, *, short_lived: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if short_lived:
            from comfy_env_attn.facts.probe_start import running_as_command

            running_as_command()
            _start_early(argv)
        args = build_parser(_command_of(argv)).parse_args(argv)
        if not args.command:
            build_parser().print_help(sys.stderr)
            return 2
        from comfy_env_attn.cli.progress import set_quiet

        set_quiet(bool(args.quiet))
        _start_probe(args)
        from comfy_env_attn.cli.commands import handler

        command = handler(args.command)
        if short_lived:  # loaded: see entry()
            gc.freeze()
            gc.enable()
        return int(command(args))
    except UsageError as e:
        print(f"ERROR {e}", file=sys.stderr)
        _json_error(argv, e)
        return 2
    except AttnError as e:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"ERROR {e}", file=sys.stderr)
        _json_error(argv, e)
        return 1
    except KeyboardInterrupt:
        print("ERROR interrupted", file=sys.stderr)
        _json_error(argv, "interrupted")
        return 130
    except BrokenPipeError:
        return 1
