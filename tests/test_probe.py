from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_venv, venv_python, venv_site

from comfy_env_attn.core.errors import ProbeError
from comfy_env_attn.facts import probe as probe_mod
from comfy_env_attn.facts import probe_start
from comfy_env_attn.facts.locate import find_python, find_python_auto, on_path
from comfy_env_attn.facts.probe import parse_nvidia_smi, probe, probe_interpreter


def test_real_probe_of_this_interpreter_with_cpu_torch() -> None:
    pytest.importorskip("torch")
    import torch

    _target, system, gpus = probe(sys.executable)
    assert system.python == "%d.%d.%d" % sys.version_info[:3]
    assert system.platform == "linux" and system.glibc
    assert system.torch == torch.__version__
    assert system.torch_cuda == torch.version.cuda  # None on the CPU build
    assert system.cxx11abi == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if not gpus.gpus:  # this machine: absent with the reason, never a crash
        assert system.gpus == () and "gpus" in system.absent
        assert system.absent["gpus"]


def test_test_venvs_see_the_torch_this_interpreter_runs(torch_venv: Path) -> None:
    """The venvs the tests and benchmarks make see the runner's own torch, also where the
    runner is a venv whose base interpreter has no torch or another one (the README's set-up
    in a venv)."""
    import torch

    r = subprocess.run([str(venv_python(torch_venv)), "-c",
                        "import torch; print(torch.__file__)"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == Path(torch.__file__).resolve()


def test_cache_hits_and_is_invalidated_by_a_changed_torch(plain_venv: Path) -> None:
    py = str(venv_python(plain_venv))
    first = probe_interpreter(py)
    assert not first.cached and first.facts["torch"] is None
    again = probe_interpreter(py)
    assert again.cached and again.facts == first.facts
    # a torch appears (a broken one: import fails, version.py is still read)
    time.sleep(0.01)
    pkg = venv_site(plain_venv) / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libtorch_cuda.so: cannot open')\n")
    (pkg / "version.py").write_text("__version__ = '2.9.1+cu128'\ncuda: Optional[str] = '12.8'\n")
    changed = probe_interpreter(py)
    assert not changed.cached
    assert changed.facts["torch"] == "2.9.1+cu128" and changed.facts["torch_cuda"] == "12.8"
    assert "libtorch_cuda.so" in changed.facts["torch_error"]
    # and a new torch version.py invalidates again
    time.sleep(0.01)
    (pkg / "version.py").write_text("__version__ = '2.10.0+cu128'\ncuda = '12.8'\n")
    assert probe_interpreter(py).facts["torch"] == "2.10.0+cu128"


def test_a_probe_started_early_is_the_one_that_answers(plain_venv: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI starts the target's probe before its own imports (start_probe); the probe
    that follows reads that process instead of starting another, with the same facts. A
    cached target, or a path that is no file, starts nothing; a broken interpreter started
    early fails the same way as one probed late."""
    monkeypatch.setenv("COMFY_ENV_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    py = os.path.abspath(str(venv_python(plain_venv)))
    probe_start.start_probe(py)
    proc = probe_start._PENDING[py]
    target = probe_interpreter(py)
    assert py not in probe_start._PENDING and proc.returncode == 0 and not target.cached
    assert target.facts == probe_interpreter(py, use_cache=False).facts
    probe_start.start_probe(py)  # cached now
    probe_start.start_probe(str(tmp_path / "nope"))
    assert probe_start._PENDING == {}
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    fake.chmod(0o755)
    probe_start.start_probe(str(fake))
    assert str(fake) in probe_start._PENDING
    with pytest.raises(ProbeError, match=r"failed the probe \(exit 1\): Fatal Python error"):
        probe_interpreter(str(fake))
    assert probe_start._PENDING == {}


_IN_PROCESS = """
import json, sys
from comfy_env_attn.facts import probe, probe_start
def refuse(*args, **kwargs):
    raise AssertionError("the target's Python was started")
started = probe._start
plain = probe_start.in_process(sys.executable)
probe_start.running_as_command()
probe._start = probe_start._start = refuse
here = probe._run_script(sys.executable, import_torch=False) \\
    if probe_start.in_process(sys.executable) else None
other = probe_start.in_process(sys.executable + "-other")
import os
alias = os.path.join(os.path.dirname(sys.executable), "python-alias")
os.symlink(os.path.realpath(sys.executable), alias)
try:
    alias_facts = probe._run_script(alias, import_torch=False) \\
        if probe_start.in_process(alias) else None
finally:
    os.unlink(alias)
probe_start._COMMAND.clear()
probe._start = started
there = probe._run_script(sys.executable, import_torch=False)
print(json.dumps({"plain": plain, "here": here, "there": there, "other": other,
                  "alias": alias_facts}))
"""


def test_the_running_interpreter_is_probed_in_process_with_the_same_facts(
        torch_venv: Path, tmp_path: Path) -> None:
    """Run as the target's own command (`python -m comfy_env_attn install` from ComfyUI's
    Python), the fast probe reads this process's facts instead of starting the target's
    Python again, and they are the facts a started probe gives. Not in a process that did
    not start as the command (its sys.path may have changed), not for another interpreter,
    and not under a flag that changes what the target's sys.path would be."""
    py = str(venv_python(torch_venv))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # run from a folder holding a torch of its own: the command's current folder (sys.path[0]
    # for -c and -m) is not the target's, and its torch is not the one the target imports
    decoy = tmp_path / "torch"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "version.py").write_text("__version__ = '0.0.1'\n")
    r = subprocess.run([py, "-c", _IN_PROCESS], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["here"] == out["there"] and out["here"]["torch"]
    assert out["here"]["torch"] != "0.0.1" and str(tmp_path) not in out["here"]["sys_path"]
    assert out["plain"] is False and out["other"] is False
    # another name for the same binary in the venv's folder (python3 beside python): the
    # same interpreter, probed in process, its facts naming the path it was given
    assert out["alias"] == {**out["here"], "executable": out["alias"]["executable"]}
    assert out["alias"]["executable"].endswith("python-alias")
    r = subprocess.run([py, "-s", "-c", _IN_PROCESS], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["here"] is None  # -s: the target would see a user site


@pytest.mark.skipif(sys.platform == "win32", reason="the interpreter is copied as on Linux")
def test_an_embeddable_python_is_probed_in_process_with_its_whole_path(tmp_path: Path) -> None:
    """A ._pth file beside the interpreter (ComfyUI portable's python_embeded; CPython reads
    it on every OS) makes every start of it isolated, with no script folder in sys.path:
    the command run by it still probes in process, and neither probe drops the first entry
    of the path the ._pth file sets."""
    import shutil
    import sysconfig

    emb = tmp_path / "python_embeded"
    emb.mkdir()
    exe = emb / "python"
    shutil.copy2(os.path.realpath(sys._base_executable), exe)
    stdlib = sysconfig.get_path("stdlib")
    entries = [stdlib, os.path.join(stdlib, "lib-dynload"), str(ROOT)]
    (emb / "python._pth").write_text("\n".join([*entries, "import site"]) + "\n")
    script = ("import json, sys; from comfy_env_attn.facts import _interp_probe, probe_start;"
              "probe_start.running_as_command();"
              "print(json.dumps([probe_start.in_process(sys.executable), sys.path,"
              " _interp_probe.facts(import_torch=False)['sys_path']]))")
    r = subprocess.run([str(exe), "-c", script], capture_output=True, text=True)
    if r.returncode != 0 and "comfy_env_attn" not in r.stderr:
        pytest.skip(f"this interpreter does not run copied: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr
    here, path, facts_path = json.loads(r.stdout)
    assert here is True and facts_path == path and facts_path[0] == entries[0]
    script_path = ROOT / "comfy_env_attn" / "facts" / "_interp_probe.py"
    r = subprocess.run([str(exe), str(script_path)], capture_output=True, text=True,
                       env={**os.environ, "COMFY_ENV_ATTN_PROBE_NO_IMPORT": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sys_path"][:3] == entries


def test_a_python_that_does_not_run(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ProbeError, match=r"failed the probe \(exit 1\): Fatal Python error"):
        probe_interpreter(str(fake), use_cache=False)
    with pytest.raises(ProbeError, match="does not exist"):
        probe_interpreter(str(tmp_path / "nope"), use_cache=False)
    notexec = tmp_path / "python2"
    notexec.write_text("")
    with pytest.raises(ProbeError, match="not executable"):
        probe_interpreter(str(notexec), use_cache=False)


@pytest.mark.skipif(os.name == "nt", reason="a /bin/sh fake and POSIX signals")
@pytest.mark.parametrize("early", [False, True], ids=["late", "started-early"])
def test_a_python_that_never_answers_times_out_promptly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool) -> None:
    """A "python" that hangs, and whose own child keeps the pipes open, fails with the
    timeout that was used, at once: the hung process is killed and reaped and the pipes the
    grandchild holds are not waited on. The same holds for a probe started early."""
    fake = tmp_path / "python"
    self_pid, child_pid = tmp_path / "self.pid", tmp_path / "child.pid"
    # the grandchild sleeps 30 s, not forever: a regression that waits on it fails, not hangs
    fake.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > '{child_pid}'\n"
                    f"echo $$ > '{self_pid}'\nexec sleep 1000\n")
    fake.chmod(0o755)
    monkeypatch.setattr(probe_mod, "PROBE_TIMEOUT_S", 1)
    reaped = False
    try:
        if early:
            probe_start.start_probe(str(fake))
            proc = probe_start._PENDING[str(fake)]
        start = time.monotonic()
        with pytest.raises(ProbeError, match=r"'.*python' did not answer within 1 s$"):
            probe_interpreter(str(fake))
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed < 10, elapsed
        assert probe_start._PENDING == {}
        if early:
            assert proc.returncode == -signal.SIGKILL
        # killed and reaped: not even a zombie is left of the fake's own process
        with pytest.raises(ProcessLookupError):
            os.kill(int(self_pid.read_text()), 0)
        reaped = True
        os.kill(int(child_pid.read_text()), 0)  # the grandchild, holding the pipes, lives on
    finally:
        # this test's own cleanup: the grandchild always; the fake only if not reaped above
        for f in (child_pid, self_pid) if not reaped else (child_pid,):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                continue
            if f is self_pid:  # our child: reap it
                os.waitpid(int(f.read_text()), 0)


def test_nvidia_smi_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    q = "NVIDIA H100 80GB HBM3, 9.0, 580.95.05\nNVIDIA GeForce RTX 4090, 8.9, 580.95.05\n"
    banner = "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: 13.0     |"
    f = parse_nvidia_smi(q, banner)
    assert f.gpus == ("9.0", "8.9") and f.driver == "580.95.05" and f.driver_cuda == "13.0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert parse_nvidia_smi(q, banner).gpus == ("8.9",)


def test_nvml_read_from_the_start_answers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line asks NVML in a thread from its start; probe_gpus takes that answer
    once, and only while CUDA_VISIBLE_DEVICES is as it was read under. (NVML stands in for
    the GPU this machine lacks: each answer says which call it came from.)"""
    calls: list[str] = []

    def nvml() -> dict[str, object]:
        calls.append("call")
        return {"gpus": ("9.0",), "source": f"nvml call {len(calls)}"}

    monkeypatch.setattr(probe_start, "_nvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe_start.start_gpu_probe()
    probe_start.start_gpu_probe()  # already under way: not a second thread
    assert probe_mod.probe_gpus().source == "nvml call 1"
    assert probe_mod.probe_gpus().source == "nvml call 2"  # asked again, not kept
    probe_start.start_gpu_probe()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert probe_mod.probe_gpus().source == "nvml call 4"  # read under another setting
    assert probe_start._GPUS == {} and len(calls) == 4


def test_nvml_that_hangs_is_a_reason_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver in a bad state can hang NVML's start-up: after NVML_TIMEOUT_S it is a
    reason, and nvidia-smi (with its own limit) is asked next."""
    import threading

    release = threading.Event()
    monkeypatch.setattr(probe_start, "_nvml", lambda: release.wait(30) and {})
    monkeypatch.setattr(probe_start, "NVML_TIMEOUT_S", 0.2)
    t0 = time.perf_counter()
    f = probe_mod.probe_gpus()
    release.set()
    assert time.perf_counter() - t0 < 20  # not the hang's 30 s
    if not f.gpus:  # this machine's nvidia-smi, if any, answered instead
        assert "NVML did not answer within 0.2 s" in f.absent["gpus"], f.absent


def test_the_command_line_reads_nvml_early_only_where_it_will_ask(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from comfy_env_attn.cli import _start_probe, build_parser

    started: list[str] = []
    monkeypatch.setattr(probe_start, "start_gpu_probe", lambda: started.append("nvml"))
    profile = tmp_path / "gpu.toml"
    for argv, want in ((["plan"], ["nvml"]), (["plan", "--system", str(profile)], []),
                       (["lock"], []), (["doctor"], ["nvml"])):
        started.clear()
        _start_probe(build_parser().parse_args(argv))
        assert started == want, argv


def test_what_starts_early_is_what_the_parsed_command_line_starts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The command line's own process starts the target's probe, uv's query and NVML from
    the words of the command line, before argparse loads (cli._start_early): for the exact
    spellings, what the parsed command line would start (cli._start_probe), and never more;
    a spelling it does not read (an abbreviation) is left to the parse."""
    from comfy_env_attn.cli import _start_early, _start_probe, build_parser

    started: list[tuple[str, str]] = []
    monkeypatch.setattr(probe_start, "start_probe", lambda exe: started.append(("probe", exe)))
    monkeypatch.setattr(probe_start, "warm_uv", lambda exe: started.append(("uv", exe)))
    monkeypatch.setattr(probe_start, "start_gpu_probe", lambda: started.append(("nvml", "")))
    exe, profile = sys.executable, str(tmp_path / "gpu.toml")
    exact = (["install", "--python", exe, "--no-verify"],
             ["install", f"--python={exe}", "--dry-run"],
             ["-v", "install", "--python", exe, "--system", profile, "--backends", "sage"],
             ["uninstall", "--python", exe], ["plan", f"--python={exe}", "--json"], ["lock"],
             ["doctor"], ["probe", "--python", exe, "--toml"])
    for argv in exact:
        started.clear()
        _start_early(argv)
        early = list(started)
        started.clear()
        _start_probe(build_parser().parse_args(argv))
        assert early == started, argv
    started.clear()
    _start_early(["install", "--python", exe, "--no-verify"])
    # uv's query first: an install waits on it, and it takes longer than the probe
    assert [what for what, _ in started] == ["uv", "probe", "nvml"]
    for argv in (["install", "--pyth", exe], ["install", "--pyt=" + exe, "--dry-run"]):
        started.clear()
        _start_early(argv)
        early = list(started)
        started.clear()
        _start_probe(build_parser().parse_args(argv))
        assert set(early) <= set(started), argv
    started.clear()
    _start_early(["install", "--python"])  # a value missing: argparse's to refuse
    _start_early(["--help", "install", "--python", exe])
    assert started == []


def test_no_nvml_is_a_reason_not_a_crash() -> None:
    f = probe_mod.probe_gpus()
    if f.gpus:
        pytest.skip("this machine has a GPU")
    assert f.absent["gpus"] and f.driver is None
    if os.name != "nt":  # the library NVML lives in, and why it did not load
        assert "NVML not found: libnvidia-ml.so.1" in f.absent["gpus"], f.absent


def test_nvml_on_windows_is_looked_for_where_drivers_put_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(probe_start.os, "name", "nt")
    monkeypatch.setenv("WINDIR", str(tmp_path / "Windows"))
    monkeypatch.setenv("PROGRAMFILES", str(tmp_path / "Program Files"))
    with pytest.raises(OSError) as e:
        probe_start._nvml_library()
    assert str(tmp_path / "Windows" / "System32" / "nvml.dll") in str(e.value)
    assert str(tmp_path / "Program Files" / "NVIDIA Corporation" / "NVSMI" / "nvml.dll") \
        in str(e.value)


# -- finding ComfyUI's Python --------------------------------------------------------------

def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("")
    return p


def test_windows_portable_layout(tmp_path: Path) -> None:
    root = tmp_path / "ComfyUI_windows_portable"
    py = _touch(root / "python_embeded" / "python.exe")
    _touch(root / "ComfyUI" / "main.py")
    for where in (root, root / "ComfyUI"):
        got, how = find_python(comfyui=str(where), os_name="windows", env={})
        assert got == str(py), how


@pytest.mark.parametrize("venv", [".venv", "venv"])
def test_venv_layouts(tmp_path: Path, venv: str) -> None:
    linux = _touch(tmp_path / "lin" / venv / "bin" / "python3")
    assert find_python(comfyui=str(tmp_path / "lin"), os_name="linux", env={})[0] == str(linux)
    win = _touch(tmp_path / "win" / venv / "Scripts" / "python.exe")
    assert find_python(comfyui=str(tmp_path / "win"), os_name="windows", env={})[0] == str(win)


def test_env_vars_and_the_error_lists_every_place(tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    conda = _touch(comfy / "conda-env" / "python.exe")  # ComfyUI's own env, by another name
    got = find_python(comfyui=str(comfy), os_name="windows",
                      env={"CONDA_PREFIX": str(conda.parent)})
    assert got[0] == str(conda)
    with pytest.raises(ProbeError) as e:
        find_python(comfyui=str(comfy), os_name="linux", env={})
    msg = str(e.value)
    for part in ("python_embeded", ".venv/bin/python", "venv/bin/python", "$VIRTUAL_ENV",
                 "$CONDA_PREFIX"):
        assert part in msg


def test_an_active_environment_elsewhere_is_not_comfyuis(tmp_path: Path) -> None:
    """--comfyui DIR with no Python in DIR fails: the venv or conda env that runs the tool
    is not ComfyUI's, and was once silently targeted in its place."""
    comfy = tmp_path / "ComfyUI"
    _touch(comfy / "main.py")
    (comfy / "comfy").mkdir()
    tool_venv = _touch(tmp_path / "tool-venv" / "bin" / "python").parent.parent
    conda = _touch(tmp_path / "conda" / "bin" / "python").parent.parent
    with pytest.raises(ProbeError) as e:
        find_python(comfyui=str(comfy), os_name="linux",
                    env={"VIRTUAL_ENV": str(tool_venv), "CONDA_PREFIX": str(conda)})
    msg = str(e.value)
    assert f"$VIRTUAL_ENV={tool_venv} (not inside {comfy})" in msg
    assert f"$CONDA_PREFIX={conda} (not inside {comfy})" in msg
    assert str(comfy / ".venv" / "bin" / "python") in msg and "--python" in msg


def test_comfy_cli_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    py = _touch(ws / ".venv" / "bin" / "python")
    cfg = tmp_path / "home" / ".config" / "comfy-cli" / "config.ini"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"[DEFAULT]\ndefault_workspace = {ws}\n")
    got = find_python_auto(os_name="linux", env={}, home=tmp_path / "home", use_workspace=True)
    assert got[0] == str(py)
    win_cfg = tmp_path / "local" / "comfy-cli" / "config.ini"
    win_cfg.parent.mkdir(parents=True)
    win_cfg.write_text(f"[DEFAULT]\nrecent_workspace = {ws}\n")
    _touch(ws / ".venv" / "Scripts" / "python.exe")
    got = find_python_auto(os_name="windows", env={"LOCALAPPDATA": str(tmp_path / "local")},
                           home=tmp_path / "nohome", use_workspace=True)
    assert got[0].endswith("python.exe")


def test_comfy_cli_without_a_workspace_fails_and_says_where_it_looked(tmp_path: Path) -> None:
    """--comfy-cli never falls back to the running Python."""
    home = tmp_path / "home"
    cfg = home / ".config" / "comfy-cli" / "config.ini"
    with pytest.raises(ProbeError) as e:
        find_python_auto(os_name="linux", env={}, home=home, use_workspace=True)
    assert f"tried: {cfg} (no such file)" in str(e.value)
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"[DEFAULT]\ndefault_workspace = {tmp_path / 'gone'}\n")
    with pytest.raises(ProbeError) as e:
        find_python_auto(os_name="linux", env={}, home=home, use_workspace=True)
    assert f"default_workspace = {tmp_path / 'gone'} (no such folder)" in str(e.value)
    assert "recent_workspace (not set)" in str(e.value)
    ws = tmp_path / "ws"  # a workspace with no Python: the places tried, not sys.executable
    ws.mkdir()
    cfg.write_text(f"[DEFAULT]\nrecent_workspace = {ws}\n")
    with pytest.raises(ProbeError) as e:
        find_python_auto(os_name="linux", env={"VIRTUAL_ENV": sys.prefix}, home=home,
                         use_workspace=True)
    assert f"no Python found for ComfyUI in {ws}" in str(e.value)


@pytest.mark.skipif(os.name == "nt", reason="a POSIX executable bit")
def test_python_flag_accepts_a_command_on_path(tmp_path: Path) -> None:
    """`--python python3` is the command on PATH, as uv reads it; a name that is on neither
    says both."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "python3.99"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env = {"PATH": str(bin_dir)}
    assert find_python(python="python3.99", env=env) == \
        (str(exe), [f"--python python3.99: {exe} on PATH"])
    with pytest.raises(ProbeError, match="no such file, and no command of that name on PATH"):
        find_python(python="python3.98", env=env)
    with pytest.raises(ProbeError, match=r"no such file$"):  # a path is not looked up
        find_python(python="./python3.99", env=env)


def test_the_path_lookup_on_windows_skips_the_store_stubs_and_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows' PATH: PATHEXT extensions, ';' between folders, WindowsApps' python.exe (the
    Store's stub) passed over but not its versioned aliases, the current folder never
    searched."""
    apps = tmp_path / "Users" / "me" / "AppData" / "Local" / "Microsoft" / "WindowsApps"
    real = tmp_path / "Python312"
    for folder in (apps, real, tmp_path / "cwd"):
        folder.mkdir(parents=True)
        (folder / "python.exe").write_bytes(b"MZ")
    monkeypatch.chdir(tmp_path / "cwd")
    path = ";".join([str(apps), "", ".", str(real)])
    assert on_path("python", path, "windows", ".COM;.EXE") == str(real / "python.exe")
    assert on_path("python.exe", path, "windows", ".COM;.EXE") == str(real / "python.exe")
    assert on_path("python", str(apps).upper() + "\\", "windows") is None
    (apps / "python3.12.exe").write_bytes(b"MZ")  # the Store's Python: a real alias
    assert on_path("python3.12", path, "windows") == str(apps / "python3.12.exe")
    (real / "python3.cmd").write_text("@echo off")
    assert on_path("python3", path, "windows", ".COM;.EXE;.BAT;.CMD") == \
        str(real / "python3.cmd")
    assert on_path("python", f"{apps}{os.pathsep}{real}", "linux") is None  # not executable


@pytest.mark.skipif(os.name == "nt", reason="a /bin/sh shim")
def test_a_shim_on_path_is_followed_to_the_interpreter_it_runs_now(tmp_path: Path) -> None:
    """pyenv's and asdf's shims are scripts that run whichever interpreter is selected when
    started: the target is that interpreter, asked each time (a cached answer about the shim
    would describe the one selected before)."""
    a, b = make_venv(tmp_path / "a", torch=False), make_venv(tmp_path / "b", torch=False)
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{tmp_path}/$SEL/bin/python" "$@"\n')
    shim.chmod(0o755)
    for sel, venv in (("a", a), ("b", b), ("a", a)):
        exe, how = find_python(python="python3", env={"PATH": str(shims), "SEL": sel})
        assert os.path.samefile(exe, venv_python(venv)) and str(venv) in exe
        assert how == [f"--python python3: {shim} on PATH", f"{shim} is a script that runs {exe}"]
    exe, how = find_python(python=str(shim), env={"SEL": "b"})  # a path to a shim, too
    assert str(b) in exe
    broken = shims / "python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert find_python(python=str(broken)) == (str(broken), [f"--python {broken}"])
    assert find_python(python=str(venv_python(a))) == \
        (str(venv_python(a)), [f"--python {venv_python(a)}"])  # a program: not run


@pytest.mark.skipif(os.name == "nt", reason="a /bin/sh script")
def test_a_script_that_is_no_shim_is_never_started(tmp_path: Path) -> None:
    """A wrapper that sets up its interpreter's environment, or a launcher (ComfyUI's
    run_nvidia_gpu.bat), is the target as given: starting it to ask would start whatever it
    launches (here a 60 s sleep that would be left behind)."""
    launcher = tmp_path / "run.sh"
    marker = tmp_path / "started"
    launcher.write_text(f"#!/bin/sh\ntouch '{marker}'\nsleep 60\n")
    launcher.chmod(0o755)
    start = time.monotonic()
    assert find_python(python=str(launcher)) == (str(launcher), [f"--python {launcher}"])
    assert time.monotonic() - start < 5 and not marker.exists()


@pytest.mark.skipif(os.name == "nt", reason="a /bin/sh shim")
def test_a_shim_that_never_answers_is_stopped_with_what_it_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comfy_env_attn.facts import locate

    shims = tmp_path / "shims"
    shims.mkdir()
    child = tmp_path / "child.pid"
    (shims / "python3").write_text(f"#!/bin/sh\nsleep 60 &\necho $! > '{child}'\nwait\n")
    (shims / "python3").chmod(0o755)
    monkeypatch.setattr(locate, "FOLLOW_TIMEOUT_S", 1.0)
    exe, _how = find_python(python=str(shims / "python3"))
    assert exe == str(shims / "python3")  # kept as given: the probe reports it
    pid = int(child.read_text())
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid), "the shim's child was left running"


def _running(pid: int) -> bool:
    from comfy_env_attn.core.process import pid_alive

    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False  # a zombie waiting for init
    except OSError:
        return False
    return pid_alive(pid)


def test_python_flag_accepts_a_venv_folder(plain_venv: Path) -> None:
    assert find_python(python=str(plain_venv), os_name="linux")[0].startswith(str(plain_venv))
    with pytest.raises(ProbeError, match="no such file"):
        find_python(python=os.path.join(str(plain_venv), "nothing"))


@pytest.mark.parametrize("facts,kind", [
    ({"is_venv": True}, "venv"),
    ({"is_venv": False, "conda_env": True}, "conda"),
    # ComfyUI_windows_portable/python_embeded/python312._pth
    ({"is_venv": False, "conda_env": False, "pth_files": ["python312._pth"]}, "embedded"),
    ({"is_venv": False, "conda_env": False, "pth_files": []}, "system"),
])
def test_environment_kind(facts: dict, kind: str) -> None:
    from comfy_env_attn.facts.probe import Target, environment_kind

    assert environment_kind(facts) == kind
    assert Target("x", facts).is_dedicated is (kind != "system")


def test_probe_reports_the_environment_kind(plain_venv: Path) -> None:
    t = probe_interpreter(str(venv_python(plain_venv)))
    assert t.kind == "venv" and t.facts["pth_files"] == []


def test_comfyui_naming_a_file_or_nothing_says_which(tmp_path: Path) -> None:
    """--comfyui given a file (a profile, main.py) is told apart from a folder that is
    not there."""
    f = _touch(tmp_path / "gpu.toml")
    with pytest.raises(ProbeError, match=r"gpu\.toml: a file, not a folder: give "
                                         r"ComfyUI's folder"):
        find_python(comfyui=str(f), os_name="linux", env={})
    with pytest.raises(ProbeError, match="gone: no such folder"):
        find_python(comfyui=str(tmp_path / "gone"), os_name="linux", env={})
