"""The real command line, in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import cli, make_system, make_venv, venv_python, venv_site

# how the next steps name the tool run as `python -m comfy_env_attn` (as cli() runs it)
RUN = f"{sys.executable} -m comfy_env_attn"

H100 = """python = "3.12.3"
platform = "linux"
arch = "x86_64"
glibc = "2.35"
torch = "2.11.0+cu130"
torch_cuda = "13.0"
cxx11abi = true
driver = "580.95.05"
driver_cuda = "13.0"
gpus = ["9.0"]
"""


@pytest.fixture
def h100(tmp_path: Path) -> Path:
    p = tmp_path / "h100.toml"
    p.write_text(H100)
    return p


def test_console_script_entry_point_imports() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "comfy-env-attn"]
    assert callable(ep.load())


def test_the_command_runs_with_the_garbage_collector_on_and_main_leaves_it_alone(
        h100: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gc
    import subprocess

    # the console script: collector off while the modules load, on (load-time objects
    # frozen) while the command runs
    code = ("import gc, sys\n"
            "from comfy_env_attn import cli\n"
            "from comfy_env_attn.cli import commands\n"
            "seen = []\n"
            "commands.COMMANDS['probe'] = lambda a: seen.append("
            "(gc.isenabled(), gc.get_freeze_count())) or 0\n"
            "sys.argv = ['comfy-env-attn', 'probe']\n"
            "assert cli.entry() == 0\n"
            "print(seen[0][0], seen[0][1] > 1000)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
    # main, called in a long-lived process (tests, embedders), changes nothing
    frozen = gc.get_freeze_count()
    from comfy_env_attn.cli import main

    assert main(["plan", "--system", str(h100), "--backends", "sage", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"]
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_one_commands_parser_reads_its_arguments_as_the_whole_command_line_does() -> None:
    from comfy_env_attn.cli import _command_of, build_parser

    for argv in (["-v", "install", "--python", "p", "--backends", "sage", "--no-verify", "-q"],
                 ["plan", "--system", "s.toml", "--json", "-v"],
                 ["-q", "node", "install", "--comfyui", "c"],
                 ["uninstall", "--backends", "sage", "--yes"],
                 ["launch-args", "--exact"]):
        assert _command_of(argv) == next(a for a in argv if not a.startswith("-"))
        assert vars(build_parser(_command_of(argv)).parse_args(argv)) == \
            vars(build_parser().parse_args(argv)), argv
    assert _command_of(["instal"]) is None and _command_of(["-v"]) is None
    assert _command_of(["--", "install"]) is None
    assert _command_of(["-h", "install"]) is None and _command_of(["--help", "plan"]) is None


def test_top_level_help_names_every_command_once(capsys: pytest.CaptureFixture[str]) -> None:
    from comfy_env_attn.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert parser.description == "comfy-env-attn: " + " | ".join(commands)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for name in commands:
        assert f"    {name} " in out, name


def test_plan_json_for_a_system_file(h100: Path) -> None:
    r = cli("plan", "--system", str(h100), "--json", "--backends", "sage,flash,fa4,xformers")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by = {b["backend"]: b for b in doc["backends"]}
    assert set(by) == {"sdpa", "sage", "flash", "flash4", "xformers"}
    assert by["sage"]["selected"]["filename"].startswith("sageattention-2.2.0+cu130torch2.11-cp312")
    assert len(by["sage"]["selected"]["sha256"]) == 64
    assert by["flash"]["selected"]["filename"].startswith("flash_attn-2.8.3+cu130torch2.11-cp312")
    for rej in by["flash"]["rejected"]:
        assert rej["reasons"], rej


def test_plan_for_a_profile_warns_only_about_a_named_target(h100: Path) -> None:
    """`plan --system FILE` alone plans for another machine: the Python running the tool is
    no target, so no warning names it; with --python, where the profile contradicts it."""
    r = cli("plan", "--system", str(h100), "--backends", "sage")
    assert r.returncode == 0 and "resolving for the profile" not in r.stdout + r.stderr
    r = cli("plan", "--system", str(h100), "--backends", "sage", "--python", sys.executable)
    assert "resolving for the profile, not for" in r.stdout + r.stderr, r.stdout + r.stderr
    # written as install writes it
    assert any(line.startswith("warning: the profile")
               for line in (r.stdout + r.stderr).splitlines()), r.stdout + r.stderr


def test_lock_without_a_lock_says_how_to_make_one_for_that_target(tmp_path: Path) -> None:
    py = str(venv_python(make_venv(tmp_path / "v", torch=False)))
    r = cli("lock", "--python", py)
    assert r.returncode == 1 and f"run {RUN} install --python {py}" in r.stderr, \
        r.stderr
    # every command that needs the lock names the target in the way to write it
    for command in ("launch-args", "uninstall"):
        r = cli(command, "--python", py)
        assert r.returncode == 1 and f"{RUN} install --python {py}" in r.stderr, r.stderr


def test_plan_table_and_verbose_reasons(h100: Path) -> None:
    r = cli("plan", "--system", str(h100), "--backends", "xformers", "-v")
    assert r.returncode == 0, r.stderr
    assert "xformers" in r.stdout
    assert "target has torch 2.11.0+cu130" in r.stdout


def test_verbose_before_or_after_the_command(h100: Path) -> None:
    from comfy_env_attn.cli import build_parser

    for argv in (["-v", "plan"], ["plan", "-v"], ["--verbose", "doctor"], ["lock", "-v"]):
        assert build_parser().parse_args(argv).verbose is True, argv
    assert build_parser().parse_args(["plan"]).verbose is False
    r = cli("-v", "plan", "--system", str(h100), "--backends", "xformers")
    assert r.returncode == 0, r.stderr
    assert "target has torch 2.11.0+cu130" in r.stdout and "-v lists every" not in r.stdout


def test_probe_toml_is_a_valid_system_profile(tmp_path: Path) -> None:
    r = cli("probe", "--toml")
    assert r.returncode == 0, r.stderr
    prof = tmp_path / "me.toml"
    prof.write_text(r.stdout)
    r2 = cli("plan", "--system", str(prof), "--json", "--backends", "sage")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["system"]["python"] == "%d.%d.%d" % sys.version_info[:3]
    # written without a GPU: the facts it lacks are named, and keys appended are read
    assert "# Not found here:\n#   gpus: " in r.stdout
    prof.write_text(r.stdout + 'gpus = ["8.9"]\ndriver = "570.124.06"\ndriver_cuda = "12.8"\n')
    r2 = cli("plan", "--system", str(prof), "--json", "--backends", "sage")
    assert r2.returncode == 0 and json.loads(r2.stdout)["system"]["gpus"] == ["8.9"], r2.stderr
    # a file of an older probe --toml, ending with [provenance]: a key appended there is in
    # that table, unread; said, not planned without
    prof.write_text(r.stdout + '[provenance]\nprobed_at = "2026-11-20T10:00:00Z"\n'
                    'gpus = ["8.9"]\n')
    r2 = cli("plan", "--system", str(prof))
    assert r2.returncode == 1 and "'gpus' is inside the [provenance] table, where it is not " \
        "read: move it above [provenance]" in r2.stderr, r2.stderr


def test_probe_json() -> None:
    r = cli("probe", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["system"]["platform"] == "linux" and "executable" in doc


def test_probe_says_why_the_gpu_facts_are_absent_once() -> None:
    """Without a GPU (this machine), one NVML failure leaves the driver, its CUDA, the GPUs
    and their names unknown: the table gives the reason once and points back to it."""
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("a machine with an NVIDIA driver")
    r = cli("probe", env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in r.stdout.splitlines() if line.count("│") >= 3}
    assert rows["driver"].startswith("absent: NVML") or \
        rows["driver"].startswith("absent: nvidia-smi"), rows
    assert [rows[k] for k in ("driver_cuda", "gpus", "gpu_names")] == ["absent: as driver"] * 3
    assert r.stdout.count("libnvidia-ml") <= 1


def test_no_gpu_is_explained_once_with_the_way_to_plan_for_one(tmp_path: Path) -> None:
    """On a machine without a GPU (this one), why none is seen is said once, with --system,
    not in every backend's row."""
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("a machine with an NVIDIA driver")
    py = str(venv_python(make_venv(tmp_path / "v", torch=True)))
    r = cli("install", "--python", py, "--dry-run", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("no NVIDIA GPU seen: ") == 1 and "--system FILE" in r.stdout
    # the probe's command as this tool was run (cli runs `python -m comfy_env_attn`)
    assert f"(written there by `{sys.executable} -m comfy_env_attn probe --toml`)" in \
        " ".join(r.stdout.split()), r.stdout
    assert r.stdout.count("needs an NVIDIA GPU; target has none") >= 5
    assert r.stdout.count("nvidia-smi not found") == 1  # the reason, once


def test_install_into_a_python_without_torch_stops_before_choosing(tmp_path: Path) -> None:
    """A target without torch (ComfyUI's requirements not installed yet): install stops
    before it reads an index, with doctor's words, where it went on to verification; a dry
    run shows its plan and says the install would stop."""
    py = str(venv_python(make_venv(tmp_path / "v", torch=False)))
    r = cli("install", "--python", py, "--backends", "sage")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"ERROR torch is not installed in {py}: ComfyUI cannot start and no attention backend "
        "can work; install ComfyUI's requirements (torch first) into that Python (--force "
        "installs anyway)"), r.stderr
    assert "verifying" not in r.stderr
    r = cli("install", "--python", py, "--dry-run")
    assert r.returncode == 1 and "install would refuse: torch is not installed" in r.stderr


def test_uninstall_of_a_variant_says_it_would_take_its_package(tmp_path: Path) -> None:
    py = str(venv_python(make_venv(tmp_path / "v", torch=False)))
    r = cli("uninstall", "--python", py, "--backends", "sage_fp16")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "sage_fp16 is a kernel inside sageattention, the package of sage" in r.stderr
    assert "`--backends sage` removes both" in r.stderr


def test_a_lock_or_profile_that_is_no_regular_file_is_refused_not_read(
        tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for args in (("lock", "--file", str(fifo)), ("plan", "--system", str(fifo))):
        r = cli(*args, timeout=60)
        assert r.returncode == 1 and "is not a regular file" in r.stderr, r.stderr


def test_malformed_toml_names_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('python = "3.12"\nplatform = linux\n')
    r = cli("plan", "--system", str(bad))
    assert r.returncode == 1
    assert "line 2, column 12" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_profile_that_contradicts_itself_or_is_empty_says_what_to_do(tmp_path: Path
                                                                        ) -> None:
    """A CPU build of torch with a CUDA version, and an empty file: refused, each with the
    way out (an empty profile: how one is written)."""
    bad = tmp_path / "p.toml"
    bad.write_text('python = "3.12"\nplatform = "linux"\ntorch = "2.8.0+cpu"\n'
                   'torch_cuda = "13.0"\n')
    r = cli("plan", "--system", str(bad))
    assert r.returncode == 1 and "torch 2.8.0+cpu is a CPU build, yet torch_cuda is 13.0" \
        in r.stderr, r.stderr
    bad.write_text("")
    r = cli("plan", "--system", str(bad))
    assert r.returncode == 1 and "missing required key 'python'" in r.stderr
    assert "probe --toml > FILE" in r.stderr


def test_a_folder_where_a_file_belongs_is_said_so(tmp_path: Path) -> None:
    """--from-lock DIR and a wheel path that is a folder: 'a folder', not 'no such file'."""
    r = cli("install", "--from-lock", str(tmp_path))
    assert r.returncode == 1 and f"--from-lock {tmp_path}: a folder, not a lock file" \
        in r.stderr, r.stderr
    from comfy_env_attn.candidates.sources import Candidate
    from comfy_env_attn.core.errors import InstallError
    from comfy_env_attn.install.edges import fetch_wheel

    name = "sageattention-2.2.0-py3-none-any.whl"
    (tmp_path / name).mkdir()
    with pytest.raises(InstallError, match=f"{tmp_path / name} is a folder, not a wheel file"):
        fetch_wheel(Candidate(name, str(tmp_path / name), f"find-links:{tmp_path}"), print)


def test_profile_with_an_unknown_key(tmp_path: Path) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text('python = "3.12"\nplatform = "linux"\ncuda = "12.8"\n')
    r = cli("plan", "--system", str(bad))
    assert r.returncode == 1 and "unknown key 'cuda'" in r.stderr
    # a value out of its list is named with the file, as every other fault
    for key, value in (("platform", "solaris"), ("arch", "sparc")):
        bad.write_text(f'python = "3.12"\nplatform = "linux"\n{key} = "{value}"\n'
                       .replace('platform = "linux"\nplatform', "platform"))
        r = cli("plan", "--system", str(bad))
        assert r.returncode == 1 and f"ERROR {bad}: {key} '{value}' is not one of " in \
            r.stderr, r.stderr


def test_unknown_backend_is_bad_usage(h100: Path) -> None:
    r = cli("plan", "--system", str(h100), "--backends", "sage,turbo")
    assert r.returncode == 2
    assert "unknown backend 'turbo'; valid names:" in r.stderr and "flash4" in r.stderr
    r = cli("plan", "--system", str(h100), "--backends", "sagee")
    assert r.returncode == 2 and "unknown backend 'sagee' (did you mean 'sage'?)" in r.stderr
    r = cli("plan", "--system", str(h100), "--backends", "flash_attn4")  # an alias's typo
    assert "(did you mean 'flash4'?)" in r.stderr


def test_unreachable_index_one_line_exit_1(h100: Path) -> None:
    r = cli("plan", "--system", str(h100), "--index-url", "http://127.0.0.1:9/simple")
    assert r.returncode == 1
    assert r.stderr.startswith("ERROR cannot reach index http://127.0.0.1:9/simple/")
    assert "Traceback" not in r.stderr
    r = cli("plan", "--system", str(h100), "--index-url", "http://127.0.0.1:9/simple", "-v")
    assert "Traceback" in r.stderr


def test_garbage_index_page(h100: Path, http_server) -> None:
    http_server.add("/simple/sageattention/", "<<<not an index>>>", "text/plain")
    r = cli("plan", "--system", str(h100), "--index-url", http_server.url + "/simple",
            "--backends", "sage")
    assert r.returncode == 1 and "neither a PEP 503 page nor PEP 691 JSON" in r.stderr


def test_python_that_does_not_run(tmp_path: Path) -> None:
    r = cli("plan", "--python", str(tmp_path / "missing-python"))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = cli("doctor", "--comfyui", str(tmp_path))
    assert r.returncode == 1 and "tried:" in r.stderr


def test_comfyui_folder_without_python_fails_inside_an_active_venv(tmp_path: Path) -> None:
    """The runner's own environment as $VIRTUAL_ENV is not ComfyUI's: the places tried."""
    r = cli("doctor", "--comfyui", str(tmp_path),
            env={"VIRTUAL_ENV": sys.prefix, "CONDA_PREFIX": sys.prefix})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"$VIRTUAL_ENV={sys.prefix} (not inside {tmp_path})" in r.stderr
    assert f"$CONDA_PREFIX={sys.prefix} (not inside {tmp_path})" in r.stderr
    assert str(tmp_path / ".venv" / "bin" / "python") in r.stderr


def test_comfy_cli_without_configuration_fails(tmp_path: Path) -> None:
    """--comfy-cli with no comfy-cli configuration: the places tried, not the running Python."""
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "LOCALAPPDATA": str(tmp_path / "local")}
    r = cli("probe", "--comfy-cli", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no comfy-cli configuration; tried: " in r.stderr
    assert str(tmp_path) in r.stderr and "config.ini" in r.stderr


def test_system_python_is_refused_without_yes(h100: Path) -> None:
    """install refuses a system interpreter without --yes. The interpreter under the runner
    (sys.base_prefix) is one whether or not the runner is a venv. --dry-run: nothing would be
    installed into it even if the refusal broke; it shows the plan and says that the
    install would stop (so does the profile, which describes another machine: --force)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    if (Path(sys.base_prefix) / "conda-meta").is_dir():
        pytest.skip(f"the base interpreter {base} is a conda env, which install may change")
    args = ["install", "--python", base, "--system", str(h100), "--backends", "sage",
            "--dry-run"]
    r = cli(*args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{base} is not a virtual environment" in r.stderr and "--yes" in r.stderr
    assert "install would refuse: " in r.stderr and "would install sage" in r.stdout
    assert r.stderr.count("would refuse") == 1, r.stderr  # once, as the ERROR line
    r = cli(*args, "--json")  # the document, and the ERROR line beside it (docs/json.md)
    assert r.returncode == 1 and json.loads(r.stdout)["refused"], r.stdout
    assert f"ERROR install would refuse: {base} is not a virtual environment" in r.stderr
    r = cli(*args, "-q")  # quiet: the reason is still said, in the error line itself
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"ERROR install would refuse: {base} is not a virtual environment" in r.stderr
    assert "; and the profile " in r.stderr and "--force" in r.stderr  # its disagreement
    r = cli(*args, "--yes", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would install sage" in r.stdout and "would refuse" not in r.stderr
    assert "says Python 3.12" in r.stderr  # forced, yet the disagreement is said
    lock = Path(sys.base_prefix) / "pylock.comfy-env-attn.toml"
    had = lock.exists()
    r = cli("verify", "--python", base)  # it would write the lock into that prefix
    assert r.returncode == 1 and f"{base} is not a virtual environment" in r.stderr
    assert lock.exists() == had


def test_a_profile_that_does_not_describe_the_target_stops_before_any_work(
        h100: Path, tmp_path: Path, http_server) -> None:
    """Refused before an index is read or a backend compiled (a build takes minutes)."""
    venv = make_venv(tmp_path / "venv", torch=True)
    r = cli("install", "--python", str(venv_python(venv)), "--system", str(h100),
            "--backends", "sage", "--index-url", f"{http_server.url}/simple",
            "--no-embedded-index", "--build")
    assert r.returncode == 1 and "does not describe" in r.stderr and "--force" in r.stderr
    assert http_server.hits == [], http_server.hits


def test_bad_usage_exit_2() -> None:
    assert cli("plan", "--frobnicate").returncode == 2
    assert cli().returncode == 2
    r = cli("plan", "--python", sys.executable, "--comfyui", ".")  # one target, not two
    assert r.returncode == 2 and "not allowed with argument --python" in r.stderr
    r = cli("node", "install", "--comfyui", ".", "--comfy-cli")
    assert r.returncode == 2 and "not allowed with argument --comfyui" in r.stderr
    # options that contradict: a lock's exact wheels, or wheels chosen anew
    for extra, says in [(["--from-lock", "l.toml", "--config", "c.toml"], "--config would"),
                        (["--from-lock", "l.toml", "--system", "p.toml"], "--system would"),
                        (["--from-lock", "l.toml", "--build"], "--build would"),
                        (["--from-lock", "l.toml", "--source", "s"], "--source would"),
                        (["--from-lock", "l.toml", "--env", "e"], "--env would"),
                        (["--source", "src.tar.gz"], "--source names what --build compiles")]:
        r = cli("install", "--python", "/nonexistent/python", "--dry-run", *extra)
        assert r.returncode == 2 and says in r.stderr, (extra, r.stderr)


def test_an_empty_path_is_bad_usage_not_the_default() -> None:
    """`--python "$PY"` with PY unset: an empty word would leave the default in its place
    (the tool's own Python, a fresh plan instead of the lock's); it is refused, exit 2,
    naming the option."""
    for args in (["install", "--python", "", "--dry-run"], ["probe", "--comfyui", ""],
                 ["plan", "--system", ""], ["lock", "--file", ""],
                 ["install", "--from-lock", "", "--dry-run"], ["plan", "--config", ""],
                 ["plan", "--find-links", " "], ["node", "install", "--comfyui", ""],
                 ["uninstall", "--backends", ""], ["install", "--backends", "", "--dry-run"],
                 ["plan", "--config", "c.toml", "--env", ""]):
        r = cli(*args)
        option = args[[a.strip() for a in args].index("") - 1]  # the one given empty
        assert r.returncode == 2 and f"argument {option}: empty (an unset variable?)" \
            in r.stderr, (args, r.stderr)



def test_verification_options_are_checked_as_the_command_line_is_read() -> None:
    """--device, --shapes and --timeout: a value that cannot be meant is bad usage (2) for
    every command that takes them, --dry-run included, before any target is looked for."""
    for command in (["verify"], ["bench"], ["install", "--dry-run"]):
        for option, value, says in [
                ("--device", "bogus", "give cuda, cuda:N (a GPU's index) or cpu"),
                ("--shapes", "foo", "give BxHxNxD,... e.g. 1x24x4608x128"),
                ("--shapes", "1x2x64", "each shape needs 4 numbers"),
                ("--shapes", "0x2x64x64", "each number must be 1 or more"),
                ("--timeout", "-5", "a number of seconds above 0"),
                ("--timeout", "nan", "a number of seconds above 0")]:
            r = cli(*command, "--python", "/nonexistent/python", option, value)
            assert r.returncode == 2 and f"argument {option}: " in r.stderr \
                and says in r.stderr, (command, option, value, r.stderr)
            assert "no such file" not in r.stderr  # before the target is looked for


def test_a_path_that_cannot_be_used_is_a_failure_exit_1(tmp_path: Path) -> None:
    """One rule for every command: a file or folder the command line names that is missing
    or not what it should be is a failure the message explains (1), not bad usage (2,
    words the command line cannot mean); the message names the option."""
    nope = str(tmp_path / "nope")
    for args, says in [
            (["install", "--from-lock", nope], f"--from-lock {nope}: no such file"),
            (["install", "--comfyui", nope], f"--comfyui {nope}: no such folder"),
            (["node", "install", "--comfyui", nope], f"--comfyui {nope}: no such folder"),
            (["node", "remove", "--comfyui", nope], f"--comfyui {nope}: no such folder"),
            (["install", "--python", nope], f"--python {nope}: no such file"),
            (["plan", "--system", nope], f"cannot read System profile {nope!r}")]:
        r = cli(*args)
        assert r.returncode == 1 and says in r.stderr, (args, r.stderr)


def _fake_dist(site: Path, name: str, version: str, tag: str, requires: list[str]) -> None:
    d = site / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (d / "WHEEL").write_text(f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
    (d / "RECORD").write_text("")


def test_doctor_explains_a_mismatch_and_exits_1(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    venv = make_venv(tmp_path / "v", torch=True)
    r = cli("doctor", "--python", str(venv_python(venv)), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["healthy"] is True
    site = venv_site(venv)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    _fake_dist(site, "flash_attn", "2.8.3+cu12torch2.8cxx11abiTRUE",
               f"{tag}-{tag}-linux_x86_64", ["torch", "einops"])
    r = cli("doctor", "--python", str(venv_python(venv)), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    (p,) = [f for f in doc["findings"] if f["severity"] == "problem"]
    assert p["subject"] == "flash"
    assert "built for torch 2.8, target has torch 2." in p["message"]
    assert "undefined symbol" in p["message"]
    assert p["next"].startswith(f"Run: {RUN} uninstall --backends flash")
    r = cli("doctor", "--python", str(venv_python(venv)))
    assert r.returncode == 1 and "PROBLEM" in r.stdout and "next:" in r.stdout


def test_doctor_suggests_an_install_only_as_it_would_run(tmp_path: Path) -> None:
    """No lock yet: the step doctor gives is one install takes (with --yes for an
    interpreter that is no environment of its own), and none where install would refuse
    for want of torch (the torch finding says what to do first)."""
    def lock_step(py: str) -> str | None:
        r = cli("doctor", "--python", py, "--json")
        (f,) = [f for f in json.loads(r.stdout)["findings"] if f["subject"] == "lock"]
        assert f["message"].startswith("no lock at"), f
        return f.get("next")

    assert lock_step(str(venv_python(make_venv(tmp_path / "bare", torch=False)))) is None
    system = sys.executable  # this machine's own Python: torch, and no venv
    if not Path(sys.prefix, "pylock.comfy-env-attn.toml").exists() and sys.prefix == \
            sys.base_prefix:
        step = lock_step(system) or ""  # install, or verify where a backend is there
        assert step.startswith((f"Run: {system} -m comfy_env_attn install --yes (it writes",
                                f"Run: {system} -m comfy_env_attn verify --yes")), step
    assert lock_step(str(venv_python(make_venv(tmp_path / "v", torch=True)))).startswith(
        f"Run: {RUN} install --python ")


def test_doctor_warns_of_xformers_beside_flash_attn_4() -> None:

    from comfy_env_attn.doctor import diagnose
    from comfy_env_attn.facts.installed import Installed
    from comfy_env_attn.resolve import resolve

    system = make_system(torch="2.11.0+cu130", torch_cuda="13.0", driver_cuda="13.0",
                         driver="580.1", gpus=("9.0",))
    installed = {n: Installed(n, v, "/site", "/site/none") for n, v in
                 (("xformers", "0.0.35"), ("flash-attn-4", "4.0.0b36"))}
    diag = diagnose(system, installed, resolve(system, [], ["xformers", "flash4"]),
                    python="py")
    (f,) = [f for f in diag.findings if "flash_attn_interface" in f.message]
    assert f.subject == "xformers" and f.next_step == f"Run: {RUN} verify --python py"


def test_doctor_on_a_cpu_torch_names_no_cuda_runtime_mismatch() -> None:
    """A CUDA wheel beside a CPU build of torch: its kernels cannot run at all (there is no
    CUDA runtime to mismatch), as the new user's SageAttention 1.0.6 showed."""
    from comfy_env_attn.doctor import diagnose
    from comfy_env_attn.facts.installed import Installed
    from comfy_env_attn.resolve import resolve

    system = make_system(torch="2.13.0+cpu", torch_cuda=None, gpus=())
    installed = {"sageattention": Installed("sageattention", "2.2.0+cu128torch2.13", "/site",
                                            "/site/none")}
    diag = diagnose(system, installed, resolve(system, [], ["sage"]), python="py")
    (f,) = [f for f in diag.findings if f.subject == "sage"]
    assert "cannot run on a CPU build of torch" in f.message, f.message
    assert "CUDA runtime mismatch" not in f.message
    assert "no kernel image" not in f.message  # no GPU to lack a kernel for, either


def test_doctor_prints_toml_table_names_as_text(tmp_path: Path) -> None:
    """Found by the hostile-input review: rich read `[tool.comfy-env-attn]` in a message as
    markup and printed "no  table"."""
    from comfy_env_attn.cli.commands import print_diagnosis
    from comfy_env_attn.doctor import Diagnosis, Finding

    class Target:
        executable = "/x/[bold]python"

    import contextlib
    import io

    diag = Diagnosis(make_system(), (Finding("problem", "lock", "no [tool.comfy-env-attn] table",
                                             "Run: comfy-env-attn verify"),))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_diagnosis(diag, Target())
    text = out.getvalue()
    assert "no [tool.comfy-env-attn] table" in text and "/x/[bold]python" in text


def test_the_command_line_ends_at_once_once_its_exit_handlers_ran(tmp_path: Path) -> None:
    """console() (the console script, `python -m comfy_env_attn`) ends the process itself,
    without the interpreter's teardown: with the command's status, its output flushed and
    every exit handler run; output that cannot be flushed is exit 120. While a thread that
    is not a daemon still runs, Python's own exit, which waits for it, ends it, as it does
    under a profiler (which writes what it saw once the command returns); --version ends
    with status 0."""
    import subprocess

    code = ("import atexit, sys, threading, time\n"
            "from comfy_env_attn import cli\n"
            "from comfy_env_attn.cli import commands\n"
            "atexit.register(lambda: print('handler', end=''))\n"  # unflushed: console flushes
            "commands.COMMANDS['probe'] = lambda a: print('ran') or 3\n"
            "if sys.argv[1] == 'thread':\n"
            "    threading.Thread(target=lambda: (time.sleep(0.5), print('joined'))).start()\n"
            "sys.argv = ['comfy-env-attn', *sys.argv[2:]]\n"
            "cli.console()\n"
            "print('never')\n")
    r = subprocess.run([sys.executable, "-c", code, "-", "probe"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "ran\nhandler", "")
    r = subprocess.run([sys.executable, "-c", code, "thread", "probe"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout.split()) == (3, ["ran", "joined", "handler"])
    r = subprocess.run([sys.executable, "-c", code, "-", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("comfy-env-attn") and \
        r.stdout.endswith("handler")
    if os.path.exists("/dev/full"):  # stdout that cannot be written: 120, as Python's exit
        buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-c", code, "-", "probe"], stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=60, env=buffered)
        assert r.returncode == 120, r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; sys.stdout = None\n" + code, "-",
                        "probe"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr  # no stdout at all (pythonw): nothing to flush
    script, stats = tmp_path / "run.py", tmp_path / "run.prof"
    script.write_text(code)
    r = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), str(script), "-",
                        "probe"], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("ran") and stats.stat().st_size > 0, r.stderr


def test_next_steps_name_the_tool_as_it_was_run(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """The command a message tells the user to run is the one that ran, ready to paste: the
    console script's name where it is the one on PATH, else its path (`comfy-env-attn.exe`
    and `-script.py` on Windows), else the running Python with -m (python -m, and ComfyUI's process for the dispatcher's
    warnings); the target named with --python unless it is the Python that runs the tool;
    every word with a space or a shell's special character quoted."""
    from comfy_env_attn.core.progress import tool_command

    monkeypatch.setattr(sys, "executable", "/c/python_embeded/python.exe")
    bin_dir = tmp_path / "v" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "comfy-env-attn"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "doctor"])
    monkeypatch.setenv("PATH", str(bin_dir))
    assert tool_command() == "comfy-env-attn"  # the one on PATH
    assert tool_command("verify", python="/my comfy/.venv/bin/python") == \
        'comfy-env-attn verify --python "/my comfy/.venv/bin/python"'
    assert tool_command("verify", python="/c/python_embeded/python.exe") == \
        "comfy-env-attn verify"  # the console script's own Python is the target
    monkeypatch.setenv("PATH", str(tmp_path))  # run by its path, from a venv not activated
    assert tool_command("lock") == f"{script} lock"
    for argv0 in ("comfy-env-attn.exe", "comfy-env-attn-script.py"):  # Windows' launchers
        monkeypatch.setattr(sys, "argv", [str(tmp_path / "Scripts" / argv0)])
        assert tool_command("lock") == f"{tmp_path / 'Scripts' / argv0} lock"
    for argv0 in ("/src/comfy_env_attn/__main__.py", "main.py", ""):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert tool_command() == "/c/python_embeded/python.exe -m comfy_env_attn"
        assert tool_command("node", "install", "--comfyui", "/my comfy") == \
            '/c/python_embeded/python.exe -m comfy_env_attn node install --comfyui "/my comfy"'
        assert tool_command("install", python="/c/python_embeded/python.exe") == \
            "/c/python_embeded/python.exe -m comfy_env_attn install"
        assert tool_command("install", python="/other/python") == \
            "/c/python_embeded/python.exe -m comfy_env_attn install --python /other/python"
    monkeypatch.setattr(sys, "executable", r"C:\Program Files\ComfyUI\python.exe")
    assert tool_command("lock") == r'"C:\Program Files\ComfyUI\python.exe" -m comfy_env_attn lock'


def test_plan_quiet_gives_the_plan_without_the_hint_lines(h100: Path) -> None:
    """-q (results and errors only): the plan and its notes, not the line on what -v and
    --json would add."""
    r = cli("plan", "--system", str(h100), "--backends", "sage")
    assert r.returncode == 0 and "-v gives each selected wheel's full name" in r.stdout
    r = cli("plan", "--system", str(h100), "--backends", "sage", "-q")
    assert r.returncode == 0, r.stderr
    assert "Plan for" in r.stdout and "-v gives" not in r.stdout
