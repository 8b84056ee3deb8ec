"""Run operator code (model files, entry scripts, endpoint modules) outside the hub's trust domain.

The hub's data directory holds the signing keys, the tokens and the database; code an operator
uploads must see none of them. :meth:`Sandbox.launch` turns a command into one that runs:

* ``bwrap`` (bubblewrap): in fresh mount, pid, ipc and uts namespaces (and network, unless asked
  otherwise) holding only the system (``/usr``, a few ``/etc`` files), the Python installation and
  edgefleet's code read-only, the directories the caller names read-only, and a private ``/tmp``.
  As root, bwrap runs privileged without a user namespace (a user namespace would map the child's
  uid back to root outside) and ``setpriv`` becomes the sandbox user, with no groups, no
  capabilities and no_new_privs, before anything else runs. As another user, bwrap makes an
  unprivileged user namespace: the child keeps the hub's uid but sees none of its files.
* ``user`` (hub running as root, no usable bubblewrap): ``setpriv`` to the sandbox user only. The
  data directory is 0700, so it cannot enter it; what it needs is staged outside (:meth:`stage`).
* ``off`` (``--no-sandbox``): as before this module existed, the hub's user and environment.

In ``bwrap`` and ``user`` the environment is an allow-list (no token, key or password variable can
pass), and ``prlimit`` caps address space, CPU seconds, open files and processes before the child's
first instruction. The wrappers (``setpriv``, ``prlimit``) come from util-linux.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("edgefleet.sandbox")

CODE_ROOT = Path(__file__).resolve().parents[1]  # the tree holding protocol/, modules/, hub/: the child imports it
MODES = ("bwrap", "user", "off")
SETTINGS = ("on", "auto", "off")  # on: isolation required; auto: best effort (off with a warning); off: none
ENV_ALLOW = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                       "MKL_NUM_THREADS"})
# what a Python process may need from /etc: the loader's cache, names of users and hosts, time zone, CAs
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf",
             "hosts", "resolv.conf", "host.conf", "ssl", "ca-certificates", "alternatives", "mime.types")
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # merged-/usr symlinks, or real directories
PROBE_TIMEOUT_S = 60.0


class SandboxUnavailable(RuntimeError):
    """Isolation was required and this host cannot provide it; the text says what to install or change."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed process (0: no cap)."""

    memory_mb: int = 0  # address space (RLIMIT_AS)
    cpu_s: int = 0  # CPU seconds (RLIMIT_CPU): for bounded jobs such as a load check, never a long-lived server
    open_files: int = 1024  # RLIMIT_NOFILE
    processes: int = 4096  # RLIMIT_NPROC: counts every thread of the child's uid, so generous; stops fork bombs
    tmp_mb: int = 256  # the private /tmp (bwrap): a tmpfs is host memory outside the address-space cap

    def prlimit(self) -> list[str]:
        args = ["prlimit", f"--nofile={self.open_files}:{self.open_files}",
                f"--nproc={self.processes}:{self.processes}"]
        if self.memory_mb:
            args.append(f"--as={self.memory_mb << 20}:{self.memory_mb << 20}")
        if self.cpu_s:
            args.append(f"--cpu={self.cpu_s}:{self.cpu_s}")
        return [*args, "--"]


def scrubbed_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of ``base`` (default: this process's environment), plus what Python needs."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k in ENV_ALLOW or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env |= {"PYTHONPATH": str(CODE_ROOT), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp", "TMPDIR": "/tmp"}
    env |= dict(extra or {})
    return env


@dataclass
class Launch:
    """A command ready for ``subprocess.Popen``/``asyncio.create_subprocess_exec``; ``cleanup()`` after it ends."""

    argv: list[str]
    env: dict[str, str] | None  # None: inherit (mode off)
    cwd: str | None
    scratch: str | None = None  # mode user: the child's own HOME and TMPDIR

    def kwargs(self) -> dict[str, Any]:
        return {"env": self.env, "cwd": self.cwd}

    def cleanup(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


@dataclass(frozen=True)
class Sandbox:
    """How to run operator code on this host; build one with :func:`detect` (or ``from_dict`` in a child)."""

    mode: str = "off"
    user: str = ""  # the account the child becomes ("" : keeps this process's uid)
    uid: int = -1
    gid: int = -1
    network: bool = False  # bwrap: keep the host's network namespace (endpoint workers need none: a socketpair)
    hide: tuple[str, ...] = ()  # directories never visible (the hub's data directory), even inside a bound path
    new_bwrap: bool = True  # bwrap >= 0.8: can size its tmpfs and forbid nested user namespaces
    binds: tuple[str, ...] = field(default=())  # extra read-only system paths (tests; unusual installs)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sandbox mode {self.mode!r}: expected one of {MODES}")

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> Sandbox:
        if not doc:
            return cls()
        return cls(**{**doc, "hide": tuple(doc.get("hide", ())), "binds": tuple(doc.get("binds", ()))})

    def describe(self) -> str:
        if self.mode == "off":
            return "off: operator code runs as the hub's user with its environment"
        who = f"user {self.user} (uid {self.uid})" if self.uid >= 0 else "the hub's uid in a user namespace"
        if self.mode == "bwrap":
            return f"bubblewrap as {who}, {'with' if self.network else 'no'} network, rlimits"
        return f"separate {who}, scrubbed environment, rlimits (no bubblewrap: weaker)"

    # --- launching ------------------------------------------------------------------------------

    def launch(self, argv: Sequence[str], *, read_only: Iterable[Path | str] = (), cwd: Path | str | None = None,
               limits: Limits = Limits(), env: Mapping[str, str] | None = None,
               writable: Iterable[Path | str] = ()) -> Launch:
        """Wrap ``argv``; ``read_only`` directories are the only ones of the caller's the child sees (bwrap), even
        inside a hidden directory, and ``writable`` the only ones it may write (the sandbox user must own them)."""
        argv = [str(a) for a in argv]
        if self.mode == "off":  # no isolation, but limits still hold where prlimit exists
            wrap = limits.prlimit() if shutil.which("prlimit") else []
            return Launch([*wrap, *argv], None if env is None else dict(env), str(cwd) if cwd else None)
        child_env = scrubbed_env(env)
        tail = [*self._become(), *limits.prlimit(), *argv]
        if self.mode == "user":
            scratch = tempfile.mkdtemp(prefix="edgefleet-sandbox-home-")
            if self.uid >= 0:
                os.chown(scratch, self.uid, self.gid)
            child_env |= {"HOME": scratch, "TMPDIR": scratch}
            return Launch(tail, child_env, str(cwd or scratch), scratch)
        return Launch(self._bwrap([Path(p) for p in read_only], cwd, limits, [Path(p) for p in writable]) + tail,
                      child_env, None)

    def _become(self) -> list[str]:
        if self.uid < 0:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]

    def _bwrap(self, read_only: list[Path], cwd: Path | str | None, limits: Limits,
               writable: list[Path] | None = None) -> list[str]:
        args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try"]
        if not self.network:
            args.append("--unshare-net")
        if os.geteuid() != 0:  # unprivileged: a user namespace, and none nested inside it
            args += ["--unshare-user", *(["--disable-userns"] if self.new_bwrap else [])]
        elif self.uid < 0:  # root staying root (the agent's module workers): at least without any capability
            args += ["--cap-drop", "ALL"]
        for name in SYSTEM_LINKS:
            p = Path("/") / name
            if p.is_symlink():
                args += ["--symlink", os.readlink(p), str(p)]
            elif p.is_dir():
                args += ["--ro-bind", str(p), str(p)]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in ETC_FILES:
            if os.path.exists(f"/etc/{name}"):
                args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        if self.new_bwrap:
            args += ["--size", str(limits.tmp_mb << 20)]
        if writable and self.new_bwrap:  # a batch job: its process pool writes /tmp (fork server) as the sandbox user
            args += ["--perms", "1777"]
        args += ["--tmpfs", "/tmp"]
        if writable:  # ... and needs POSIX semaphores: a private /dev/shm, sized like /tmp
            args += [*(["--size", str(limits.tmp_mb << 20), "--perms", "1777"] if self.new_bwrap else []),
                     "--tmpfs", "/dev/shm"]
        binds = _outermost([*python_paths(), *map(str, self.binds), *(str(p) for p in read_only)])
        for parent in _ancestors(binds):  # created 0755: bwrap would copy the host's modes (e.g. /root's 0700)
            args += ["--perms", "0755", "--dir", parent]
        for path in binds:
            args += ["--ro-bind", path, path]
        hidden = [h for h in self.hide if any(_inside(h, b) for b in binds)]
        for h in hidden:
            args += ["--tmpfs", h]
        # the caller's directories inside a hidden one were covered by its tmpfs: bound again on top of it
        own = [(str(p), "--ro-bind") for p in read_only if any(_inside(str(p), h) for h in hidden)]
        own += [(str(p), "--bind") for p in writable or []]
        for parent in _ancestors([p for p, _ in own]):
            in_tmpfs = any(_inside(parent, h) and parent != h for h in hidden)
            if in_tmpfs or not any(_inside(b, parent) or _inside(parent, b) for b in binds):  # not there yet
                args += ["--perms", "0755", "--dir", parent]
        for path, how in own:
            args += [how, path, path]
        return [*args, "--chdir", str(cwd or "/tmp"), "--"]

    # --- files the child needs -------------------------------------------------------------------

    def stage(self, source: Path, *, follow_symlinks: bool = False) -> Path:
        """A copy of directory ``source`` the child can read and other local users cannot; remove it after use.

        Outside the data directory (which the sandbox user cannot enter); owned by this process, its group the
        sandbox user's (dirs 0750, files 0640). ``follow_symlinks`` copies what links point to (only for
        directories this process made itself); otherwise links stay links, dangling in the sandbox.
        """
        dest = Path(tempfile.mkdtemp(prefix="edgefleet-sandbox-"))
        shutil.copytree(source, dest, symlinks=not follow_symlinks, dirs_exist_ok=True)
        if self.gid >= 0:
            for path in [dest, *dest.rglob("*")]:
                if path.is_symlink():
                    continue
                os.chown(path, -1, self.gid)
                os.chmod(path, 0o750 if path.is_dir() else 0o640)
        return dest


def python_paths() -> list[str]:
    """This Python installation, its venv and edgefleet's code tree: what a child needs to run ``-m hub…``."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(CODE_ROOT),
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    out = set()
    for p in paths:
        if p and os.path.isdir(p) and p != "/":
            out |= {os.path.abspath(p), os.path.realpath(p)}
    return sorted(out)


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _outermost(paths: Iterable[str]) -> list[str]:
    """Absolute paths with those inside another (or under /usr, bound anyway) dropped; shallowest first."""
    unique = sorted({os.path.abspath(p) for p in paths}, key=lambda p: (p.count("/"), p))
    out: list[str] = []
    for p in unique:
        if not any(_inside(p, q) for q in [*out, "/usr"]):
            out.append(p)
    return out


def _ancestors(binds: list[str]) -> list[str]:
    """The directories above each bind that bwrap must create, parents first (/tmp is its tmpfs)."""
    found: set[str] = set()
    for b in binds:
        parts = Path(b).parts
        for i in range(2, len(parts)):
            found.add(str(Path(*parts[:i])))
    return sorted((p for p in found if p != "/tmp" and p not in binds), key=lambda p: (p.count("/"), p))


@functools.cache
def bwrap_version() -> tuple[int, ...]:
    try:
        out = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


@functools.cache
def probe(sandbox: Sandbox) -> str:
    """'' when ``sandbox`` can run this Python and import edgefleet's code, else why not."""
    launch = sandbox.launch([sys.executable, "-c", "import modules.sandbox"], limits=Limits(memory_mb=0))
    try:
        proc = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        launch.cleanup()
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return ""


def detect(setting: str = "on", user: str = "nobody", *, network: bool = False,
           hide: Iterable[Path | str] = ()) -> Sandbox:
    """The strongest isolation this host offers, checked by running Python in it once per process.

    ``setting`` on: raise :class:`SandboxUnavailable` if nothing isolates; auto: fall back to off with a
    warning; off: off. ``user``: the account a root hub runs operator code as.
    """
    if setting not in SETTINGS:
        raise ValueError(f"sandbox setting {setting!r}: expected one of {SETTINGS}")
    if setting == "off":
        return Sandbox()
    hidden = tuple(os.path.realpath(p) for p in hide)
    tools = {t: shutil.which(t) for t in ("bwrap", "setpriv", "prlimit")}
    reasons = []
    uid = gid = -1
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            reasons.append(f"sandbox user {user!r} does not exist")
        if uid == 0:
            reasons.append(f"sandbox user {user!r} is root")
            uid = -1
    candidates = []
    if tools["bwrap"] and tools["prlimit"] and (os.geteuid() != 0 or (uid > 0 and tools["setpriv"])):
        version = bwrap_version()
        candidates.append(Sandbox("bwrap", user if uid > 0 else "", uid, gid, network, hidden,
                                  new_bwrap=version >= (0, 8)))
    elif not tools["bwrap"]:
        reasons.append("bubblewrap (bwrap) is not installed")
    if os.geteuid() == 0 and uid > 0 and tools["setpriv"] and tools["prlimit"]:
        candidates.append(Sandbox("user", user, uid, gid, network, hidden))
    missing = [t for t in ("setpriv", "prlimit") if not tools[t]]
    if missing:
        reasons.append(f"{' and '.join(missing)} (util-linux) not found")
    for candidate in candidates:
        why = probe(replace(candidate, hide=()))
        if not why:
            if candidate.mode == "user":
                log.warning("sandbox: bubblewrap unusable (%s); operator code runs as %s without namespaces",
                            "; ".join(reasons) or "see above", user)
            return candidate
        reasons.append(f"{candidate.mode}: {why}")
        log.warning("sandbox mode %s does not work here: %s", candidate.mode, why)
    if os.geteuid() != 0 and not tools["bwrap"]:
        reasons.append("not root, so no separate user either")
    text = ("cannot isolate operator code (model load checks, endpoint workers): " + "; ".join(reasons) +
            ". Install bubblewrap (and allow unprivileged user namespaces), or run the hub as root with a sandbox "
            "user whose uid can read the Python installation; or accept the risk with --no-sandbox")
    if setting == "on":
        raise SandboxUnavailable(text)
    log.warning("%s: running operator code WITHOUT a sandbox", text)
    return Sandbox()


def exit_reason(sandbox: Sandbox, returncode: int) -> str:
    """A child's end in words; under bwrap a signal shows as 128 + its number."""
    if returncode < 0:
        return f"killed by signal {-returncode}"
    if sandbox.mode == "bwrap" and returncode > 128:
        return f"killed by signal {returncode - 128}"
    return f"exit status {returncode}"
