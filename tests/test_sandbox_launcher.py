"""The sandbox launcher itself (modules/sandbox.py), with real bubblewrap, setpriv and prlimit, as root.

The child is the attacker: it tries to read a private directory standing in for the hub's data
directory, the parent's environment and its /proc entry, and reports what it got on stdout.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from modules.loadcheck import inspect_model
from modules.runners import ModelError
from modules.sandbox import Limits, Sandbox, SandboxUnavailable, detect, exit_reason

PROBE = """
import os, sys
for path in sys.argv[1:]:
    try:
        print(path, "READ", open(path, "rb").read().hex())
    except Exception as exc:
        print(path, "DENIED", type(exc).__name__)
print("UID", os.getuid())
print("ENV", sorted(os.environ.items()))
print("PIDS", sorted(p for p in os.listdir("/proc") if p.isdigit()))
"""


@pytest.fixture(scope="module")
def box() -> Sandbox:
    if os.geteuid() != 0:
        pytest.fail("these tests exercise the separate sandbox user: run them as root (CI does)")
    return detect("on", hide=[])


@pytest.fixture
def secret_dir(tmp_path: Path) -> tuple[Path, str]:
    """A 0700 directory with a 0600 key in it, like DATA/keys; and the key's text."""
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    data.chmod(0o700)
    key = secrets.token_hex(32)
    (data / "keys" / "root.key").write_text(key)
    (data / "keys" / "root.key").chmod(0o600)
    return data, key


def run(launch, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(launch.argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              **launch.kwargs())
    finally:
        launch.cleanup()


def test_detect_picks_bubblewrap_with_the_sandbox_user_when_root(box):
    assert box.mode == "bwrap" and box.user == "nobody" and box.uid > 0


def test_bwrap_child_sees_no_data_dir_no_parent_env_no_parent_process(box, secret_dir, monkeypatch):
    data, key = secret_dir
    token = secrets.token_urlsafe(24)
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", token)
    targets = [data / "keys" / "root.key", f"/proc/{os.getpid()}/environ", "/proc/1/environ"]
    proc = run(box.launch([sys.executable, "-c", PROBE, *map(str, targets)]))
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert key not in out and key.encode().hex() not in out and token not in out
    assert f"{data / 'keys' / 'root.key'} DENIED FileNotFoundError" in out  # not even there: not mounted
    assert f"/proc/{os.getpid()}/environ DENIED" in out  # its own pid namespace: the parent does not exist
    assert f"UID {box.uid}" in out
    env = dict(eval(out.split("ENV ", 1)[1].splitlines()[0]))  # noqa: S307 - our own probe's repr
    assert "EDGEFLEET_ADMIN_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert set(env) <= {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "HOME", "PWD",
                        "TMPDIR"} | {k for k in env if k.startswith("LC_")}
    assert len(eval(out.split("PIDS ", 1)[1].splitlines()[0])) <= 3  # noqa: S307 - bwrap's init, the probe


def test_a_data_dir_inside_a_bound_directory_is_hidden(box, tmp_path):
    tree = tmp_path / "code"
    data = tree / "edgefleet-data"  # the default --data, relative to a checkout the sandbox binds
    (data / "keys").mkdir(parents=True)
    key = secrets.token_hex(16)
    (data / "keys" / "root.key").write_text(key)
    (tree / "model.txt").write_text("visible")
    tree.chmod(0o755)
    hiding = Sandbox(**{**box.to_dict(), "hide": (str(data),), "binds": ()})
    target = data / "keys" / "root.key"
    proc = run(hiding.launch([sys.executable, "-c", PROBE, str(target), str(tree / "model.txt")], read_only=[tree]))
    assert f"{target} DENIED FileNotFoundError" in proc.stdout and key not in proc.stdout
    assert f"{tree / 'model.txt'} READ {b'visible'.hex()}" in proc.stdout  # the rest of the tree is there


def test_bound_directories_are_read_only(box, tmp_path):
    shared = tmp_path / "bundle"
    shared.mkdir()
    shared.chmod(0o755)
    proc = run(box.launch(["/bin/sh", "-c", f"echo x > {shared}/new; echo rc=$?"], read_only=[shared]))
    assert "rc=0" not in proc.stdout and not (shared / "new").exists()


def test_fallback_user_mode_separate_uid_scrubbed_env_limits(box, secret_dir, monkeypatch):
    """No bubblewrap: setpriv to the sandbox user. The probe is the shell: this host's Python lives under /root
    (0700), which the sandbox user cannot enter, exactly as it cannot enter a 0700 data directory."""
    data, key = secret_dir
    token = secrets.token_urlsafe(24)
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", token)
    user = Sandbox("user", box.user, box.uid, box.gid)
    script = (f"id -u; cat {data}/keys/root.key; echo cat=$?; ls {data}; echo ls=$?; env; "
              f"cat /proc/{os.getpid()}/environ; echo environ=$?; ulimit -v; ulimit -n")
    proc = run(user.launch(["/bin/sh", "-c", script], limits=Limits(memory_mb=512, open_files=64)))
    out = proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == str(box.uid)
    assert key not in out and token not in out
    assert "cat=1" in out and "ls=2" in out and "environ=1" in out
    assert "EDGEFLEET_ADMIN_TOKEN" not in out
    assert proc.stdout.splitlines()[-2:] == [str(512 * 1024), "64"]


def test_memory_and_cpu_limits_end_the_child_not_the_caller(box):
    grab = box.launch([sys.executable, "-c", "b = bytearray(2 << 30)"], limits=Limits(memory_mb=768))
    proc = run(grab)
    assert proc.returncode == 1 and "MemoryError" in proc.stderr
    spin = box.launch([sys.executable, "-c", "while True: pass"], limits=Limits(cpu_s=1))
    proc = run(spin)
    assert exit_reason(box, proc.returncode) in ("killed by signal 24", "killed by signal 9")  # SIGXCPU, then KILL


def test_load_check_in_the_sandbox_reports_out_of_memory_and_sees_only_its_files(box, secret_dir, tmp_path):
    data, key = secret_dir
    model = tmp_path / "model" / "entry.py"
    model.parent.mkdir()
    model.write_text("bomb = bytearray(3 << 30)\n\ndef run(inputs):\n    return inputs\n")
    with pytest.raises(ModelError, match="MemoryError"):
        inspect_model(model, "python", timeout_s=60, memory_limit_mb=1024, sandbox=box)
    thief = tmp_path / "thief" / "entry.py"
    thief.parent.mkdir()
    (thief.parent / "helper.txt").write_text("sibling")
    thief.write_text(f"import os\nhere = open(os.path.join(os.path.dirname(__file__), 'helper.txt')).read()\n"
                     f"try:\n    got = open({str(data / 'keys' / 'root.key')!r}).read()\n"
                     f"except OSError as exc:\n    got = repr(exc)\nraise RuntimeError(here + ' ' + got)\n")
    with pytest.raises(ModelError) as err:
        inspect_model(thief, "python", timeout_s=60, sandbox=box)
    assert "sibling" in str(err.value) and "No such file" in str(err.value) and key not in str(err.value)


def test_detect_refuses_when_nothing_can_isolate_and_auto_falls_back():
    with pytest.raises(SandboxUnavailable, match="no-such-sandbox-user"):
        detect("on", user="no-such-sandbox-user")
    assert detect("auto", user="no-such-sandbox-user").mode == "off"
    assert detect("off").mode == "off"



def test_hub_serve_refuses_to_start_without_isolation_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "hub", "serve", "--data", str(tmp_path / "d"),
                           "--port", "0", "--sandbox-user", "no-such-sandbox-user"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "cannot isolate operator code" in proc.stderr and "--no-sandbox" in proc.stderr
    assert "Traceback" not in proc.stderr
