"""The install state machine: one module version at a time, journalled, recoverable.

    downloading -> verifying -> staged -> activating -> health_check [-> baking] -> committed
                                           \\-> rolling_back -> rolled_back | failed

Every transition is written to the journal (``agent.journal``, which also holds the
``TRANSITIONS`` table) *before* it takes effect, so after a crash :meth:`Installer.recover`
knows what was under way and finishes or undoes it. Versions unpack to
``modules/{name}/{digest}/``; ``modules/{name}/current`` is a symlink swapped
atomically, and the previous version stays on disk until the new one commits,
so a device always ends with the old or the new version active, never neither.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import modconfig
from agent.errors import InstallError, RetryLater
from agent.journal import BEFORE_ACTIVATION, JOURNAL_FILE, Entry, Journal
from agent.limits import DownloadLimits, check_free, disk_full, is_disk_full
from modules.bundle import FILES_DIR, write_bundle_dir
from modules.bundle import verify_bundle_dir as _verify_bundle_dir
from modules.errors import InputError, ModelError
from modules.store import ContentStore
from protocol.encoding import ProtocolError
from protocol.manifest import FileEntry, Manifest, choose_chunks, parse_spans
from protocol.messages import BakePolicy, DesiredModule
from protocol.names import name_problem
from protocol.schema import validate
from protocol.signing import Root
from protocol.topics import DIGEST_RE

if TYPE_CHECKING:
    from modules.runners import Runner

log = logging.getLogger("edgefleet.agent.install")

__all__ = ["InstallError", "Installed", "Installer", "RetryLater"]

CURRENT = "current"
# Test hook: kill -9 this process right after the named install state is persisted, so crash-recovery
# tests can stop at a chosen point deterministically. Never set it on a real device.
CRASH_ENV = "EDGEFLEET_AGENT_CRASH_AT"

# An install interrupted this many times while baking is rolled back on the next start instead of baked again:
# the agent keeps dying with the new version (e.g. an in-process module that crashes it).
MAX_BAKE_STARTS = 3


@dataclass(frozen=True)
class Installed:
    name: str
    bundle: str
    manifest: Manifest
    files: Path  # the unpacked files directory
    config: dict[str, Any] = field(default_factory=dict)  # the module's configuration applied (desired state)
    config_digest: str = ""

    @property
    def key(self) -> str:
        """What a loaded runner is for: the bundle, and the configuration it was loaded with."""
        return f"{self.bundle}+{self.config_digest}" if self.config_digest else self.bundle


ChangeHook = Callable[[str, Entry], None]
# Runs the health check elsewhere (the agent's worker process) within its own deadline; raises on failure.
HealthHook = Callable[[Installed], Awaitable[None]]
# Serves the new version for the bake and watches it: the reason to roll back, or "" to commit.
BakeHook = Callable[[Installed, BakePolicy], Awaitable[str]]


class Installer:
    """Installs, activates, health-checks and rolls back module versions under ``data_dir/modules``."""

    def __init__(self, data_dir: Path, root: Root, chunks: ContentStore,
                 runner_cache: MutableMapping[str, Runner] | None = None, health_timeout: float = 30.0,
                 on_change: ChangeHook | None = None, health: HealthHook | None = None, bake: BakeHook | None = None,
                 limits: DownloadLimits | None = None, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or DownloadLimits()
        self.clock = clock
        self.modules_dir = Path(data_dir) / "modules"
        self.modules_dir.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.chunks = chunks
        self.runner_cache: MutableMapping[str, Runner] = runner_cache if runner_cache is not None else {}
        self.health_timeout = health_timeout
        self.on_change = on_change
        self.health = health
        self.bake = bake  # None: a bake policy is not applied (no agent serves the module to watch it)
        self.journal = Journal(Path(data_dir) / JOURNAL_FILE)
        # Runs (in a thread) before every health check; raising fails it. The simulator's slow and failing
        # devices use it (simulator/scenarios.py); a device integrator can add a check of its own.
        self.health_gate: Callable[[Installed], None] | None = None
        self._crash_at = os.environ.get(CRASH_ENV, "")
        self.facts: dict[str, str] = {}  # the device's facts: runners choose their accelerator from them

    # --- layout ------------------------------------------------------------------------------

    def module_dir(self, name: str) -> Path:
        """``modules/<name>``; a name that is not one (protocol.names) is refused before any file is touched.

        The protocol boundary refuses such names already; this is the second check, right at the filesystem.
        """
        problem = name_problem(name)
        if problem is not None:
            raise InstallError(f"refusing module name {name!r}: {problem}")
        return self.modules_dir / name

    def version_dir(self, name: str, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise InstallError(f"refusing bundle digest {digest!r}: not 64 lowercase hex digits")
        return self.module_dir(name) / digest

    def current(self, name: str) -> str | None:
        """The digest ``current`` points at, or None."""
        link = self.module_dir(name) / CURRENT
        try:
            return os.readlink(link)
        except OSError:
            return None

    def current_config(self, name: str) -> str:
        """The digest of the configuration applied, or ""."""
        return modconfig.current(self.module_dir(name))

    def _write_config(self, name: str, config: dict[str, Any]) -> str:
        return modconfig.write(self.module_dir(name), config)

    def _swap_config(self, name: str, digest: str) -> None:
        modconfig.swap(self.module_dir(name), digest)

    def installed_names(self) -> list[str]:
        return sorted(p.name for p in self.modules_dir.iterdir()
                      if p.is_dir() and name_problem(p.name) is None and self.current(p.name))

    def _swap(self, name: str, digest: str | None) -> None:
        """Point ``current`` at ``digest`` (None removes it) with one atomic rename."""
        link = self.module_dir(name) / CURRENT
        if digest is None:
            link.unlink(missing_ok=True)
            return
        tmp = link.with_name(f".{CURRENT}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(digest, tmp)  # relative: the data directory may move
        os.replace(tmp, link)

    def _set(self, name: str, state: str, **fields: Any) -> Entry:
        entry = self.journal.transition(name, state, **fields)
        if state == self._crash_at:
            log.warning("%s=%s: killing the agent (test hook)", CRASH_ENV, state)
            os.kill(os.getpid(), signal.SIGKILL)
        log.info("module %s %s: %s%s", name, entry.bundle[:12], state, f" ({entry.error})" if entry.error else "")
        if self.on_change is not None:
            self.on_change(name, entry)
        return entry

    # --- loading -----------------------------------------------------------------------------

    def load_installed(self, name: str) -> Installed:
        """The active version of ``name``, its signature and every file's hash checked."""
        digest = self.current(name)
        if digest is None:
            raise InstallError(f"module {name} has no active version")
        # now=0: expiry guards fresh metadata against freeze attacks; it must not stop a version
        # that was accepted and committed from running again after a reboot.
        manifest = _verify_bundle_dir(self.version_dir(name, digest), self.root, now=0)
        try:
            config, cdigest = modconfig.read(self.module_dir(name))
        except ValueError as exc:
            raise InstallError(f"module {name}: {exc}") from None
        return Installed(name, digest, manifest, self.version_dir(name, digest) / FILES_DIR, config, cdigest)

    def runner_for(self, inst: Installed) -> Runner:
        from modules.runners import load_runner  # in-process isolation: runners (and NumPy) live in this process

        runner = self.runner_cache.get(inst.key)
        if runner is None:
            runner = load_runner(inst.files, inst.manifest, inst.config, self.facts)
            self.runner_cache[inst.key] = runner
        return runner

    # --- install -----------------------------------------------------------------------------

    async def install(self, module: DesiredModule, fetch: Callable[[], Awaitable[dict[str, Any]]]) -> Entry:
        """Install ``module``: ``fetch`` returns the verified release envelope once every chunk is stored."""
        name = module.name
        previous = self.current(name)
        config = await asyncio.to_thread(self._write_config, name, dict(module.config))
        self._set(name, "downloading", bundle=module.bundle, version=module.version, previous=previous,
                  bake=module.bake.to_dict() if module.bake is not None else None, config=config,
                  previous_config=self.current_config(name))
        try:
            envelope = await fetch()
        except InstallError as exc:
            return self._fail(name, exc)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            return self._fail(name, disk_full(exc, "downloading"))
        self._set(name, "verifying")
        try:
            await asyncio.to_thread(self._unpack, module, envelope)
        except (InstallError, ProtocolError, OSError, ValueError) as exc:
            shutil.rmtree(self.version_dir(name, module.bundle), ignore_errors=True)
            shutil.rmtree(self.version_dir(name, module.bundle).with_name(module.bundle + ".partial"),
                          ignore_errors=True)
            if is_disk_full(exc):
                exc = disk_full(exc, "unpacking")  # type: ignore[arg-type]
            if isinstance(exc, RetryLater):
                return self._fail(name, exc)
            return self._set(name, "failed", error=f"verification failed: {exc}")
        self._set(name, "staged")
        self._set(name, "activating")
        self._swap(name, module.bundle)
        self._swap_config(name, config)
        return await self._check_and_finish(name)

    async def reconfigure(self, module: DesiredModule) -> Entry:
        """Apply ``module.config`` to the bundle installed: staged -> activating -> health_check [-> baking] ->
        committed, or rolled back to the configuration before (the bundle stays)."""
        name = module.name
        if self.current(name) != module.bundle:
            raise InstallError(f"module {name}: {module.bundle[:12]}… is not the version installed")
        config = await asyncio.to_thread(self._write_config, name, dict(module.config))
        self._set(name, "staged", bundle=module.bundle, version=module.version, previous=module.bundle,
                  bake=module.bake.to_dict() if module.bake is not None else None, config=config,
                  previous_config=self.current_config(name))
        self._set(name, "activating")
        self._swap_config(name, config)
        return await self._check_and_finish(name)

    def _fail(self, name: str, exc: InstallError) -> Entry:
        """Fail the install with the reason; one the environment caused is tried again after ``limits.retry_s``."""
        retry_at = self.clock() + self.limits.retry_s if isinstance(exc, RetryLater) else 0.0
        return self._set(name, "failed", error=str(exc) + (f" (trying again in {self.limits.retry_s:g}s)"
                                                           if retry_at else ""), retry_at=retry_at)

    def _unpack(self, module: DesiredModule, envelope: dict[str, Any]) -> None:
        dest = self.version_dir(module.name, module.bundle)
        dest.parent.mkdir(parents=True, exist_ok=True)
        manifest = validate(Manifest, envelope["signed"]["manifest"])
        check_free(self.modules_dir, manifest.size, self.limits.reserve_bytes, f"unpack {module.name}")
        try:
            spans = parse_spans(envelope["signed"], manifest)
        except ProtocolError:  # refused and counted by the transfer, which fetched fixed chunks instead
            spans = {}
        # The lists the transfer completed: for each file, its spans or its fixed chunks, whichever is in the store.
        chosen = choose_chunks(manifest, spans, self.chunks.has)

        def open_file(entry: FileEntry) -> Iterator[bytes]:
            for digest, _ in chosen[entry.path]:
                if not self.chunks.has(digest):
                    raise InstallError(f"chunk {digest[:12]}… of {entry.path} is not in the chunk store")
                yield self.chunks.get(digest)

        write_bundle_dir(dest, envelope, open_file)
        manifest = _verify_bundle_dir(dest, self.root)
        if manifest.digest() != module.bundle:
            raise InstallError(f"unpacked bundle is {manifest.digest()[:12]}…, desired {module.bundle[:12]}…")
        if manifest.size != module.size:
            raise InstallError(f"bundle holds {manifest.size} bytes, the desired state says {module.size}")
        if manifest.version != module.version:
            raise InstallError(f"bundle is version {manifest.version}, the desired state says {module.version}")

    async def _check_and_finish(self, name: str, bake_now: bool = True) -> Entry:
        """Health-check the active version, then bake it (or leave it ``baking`` unless ``bake_now``) or commit."""
        entry = self.journal.get(name)
        assert entry is not None
        if entry.state != "health_check":
            self._set(name, "health_check")
        try:
            inst = self.load_installed(name)
            if self.health_gate is not None:
                await asyncio.wait_for(asyncio.to_thread(self.health_gate, inst), self.health_timeout)
            if self.health is not None:
                await self.health(inst)
            else:
                await asyncio.wait_for(asyncio.to_thread(self._health_check, inst), self.health_timeout)
        except TimeoutError:
            return await self._roll_back(name, f"health check timed out after {self.health_timeout:g}s")
        except (InstallError, ProtocolError, ModelError, InputError, OSError, ValueError) as exc:
            return await self._roll_back(name, f"health check failed: {exc}")
        if entry.bake is not None and self.bake is not None:
            entry = self._set(name, "baking", bakes=entry.bakes + 1)
            return await self._finish_bake(name, inst) if bake_now else entry
        return self._commit(name)

    def _commit(self, name: str) -> Entry:
        entry = self._set(name, "committed", error="")
        self._collect_garbage(name, entry.previous)
        return entry

    async def _finish_bake(self, name: str, inst: Installed) -> Entry:
        entry = self.journal.get(name)
        assert entry is not None and entry.bake is not None and self.bake is not None
        policy = validate(BakePolicy, entry.bake)
        reason = await self.bake(inst, policy)
        if reason:
            return await self._roll_back(name, f"bake failed: {reason}")
        return self._commit(name)

    def baking(self) -> list[str]:
        """Modules whose bake a restart interrupted (``recover`` leaves them to :meth:`resume_bake`)."""
        return [name for name, e in self.journal.entries.items() if e.state == "baking"]

    async def resume_bake(self, name: str) -> Entry:
        """Bake an interrupted install again from the start, or roll it back after MAX_BAKE_STARTS tries.

        Called once the agent serves again: a bake watches real traffic, so it cannot run inside ``recover``.
        """
        entry = self.journal.get(name)
        assert entry is not None and entry.state == "baking"
        if entry.bakes >= MAX_BAKE_STARTS:
            return await self._roll_back(name, f"bake interrupted {entry.bakes} times by an agent restart: "
                                               "the agent keeps dying with this version")
        try:
            inst = self.load_installed(name)
        except (InstallError, ProtocolError, OSError) as exc:
            return await self._roll_back(name, f"interrupted while baking and the new version is unusable: {exc}")
        if self.bake is None or entry.bake is None:
            return self._commit(name)
        self._set(name, "baking", bakes=entry.bakes + 1)
        return await self._finish_bake(name, inst)

    def _health_check(self, inst: Installed) -> None:
        from modules.runners import health_check, load_runner, load_sample  # in-process isolation, as above

        runner = self.runner_cache.get(inst.key) or load_runner(inst.files, inst.manifest, inst.config, self.facts)
        health_check(runner, load_sample(inst.files, inst.manifest))
        self.runner_cache[inst.key] = runner  # cache only what passed

    async def _roll_back(self, name: str, reason: str) -> Entry:
        entry = self.journal.get(name)
        assert entry is not None
        if entry.state != "rolling_back":
            entry = self._set(name, "rolling_back", error=reason)
        prev = entry.previous
        if prev == entry.bundle:  # a configuration change: the bundle stays, the configuration before comes back
            self._swap_config(name, entry.previous_config)
            return self._set(name, "rolled_back")
        if prev and prev != entry.bundle and self.version_dir(name, prev).is_dir():
            self._swap_config(name, entry.previous_config)
            self._swap(name, prev)
            shutil.rmtree(self.version_dir(name, entry.bundle), ignore_errors=True)
            return self._set(name, "rolled_back")
        self._swap(name, None)
        self._swap_config(name, "")
        shutil.rmtree(self.version_dir(name, entry.bundle), ignore_errors=True)
        return self._set(name, "failed")

    def _collect_garbage(self, name: str, previous: str | None) -> None:
        """After a commit, drop every version of ``name`` but the active one and the one before it.

        The previous version stays as the target should the new one crash-loop after its commit.
        """
        keep = {self.current(name), previous, CURRENT, modconfig.CONFIG_DIR}
        for p in self.module_dir(name).iterdir():
            if p.name not in keep and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        entry = self.journal.get(name)
        modconfig.keep_only(self.module_dir(name), {self.current_config(name), entry.previous_config if entry else ""})

    async def roll_back_committed(self, name: str, reason: str) -> Entry | None:
        """Undo a committed version that fails in service (e.g. its worker crash-loops); None if not committed."""
        entry = self.journal.get(name)
        if entry is None or entry.state != "committed" or self.current(name) != entry.bundle:
            return None
        return await self._roll_back(name, reason)

    def remove(self, name: str) -> None:
        """Uninstall ``name`` (no longer desired)."""
        self._swap(name, None)
        shutil.rmtree(self.module_dir(name), ignore_errors=True)
        self.journal.drop(name)
        log.info("module %s removed", name)

    # --- recovery ----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish or undo installs a crash interrupted; idempotent."""
        for name, entry in list(self.journal.entries.items()):
            if name_problem(name) is not None:  # a journal edited on disk: never follow it outside modules/
                log.error("install journal names module %r, which is not a name: dropped", name)
                self.journal.drop(name)
                continue
            base = self.module_dir(name)
            if base.is_dir():
                for partial in base.glob("*.partial"):
                    shutil.rmtree(partial, ignore_errors=True)
            if entry.state in BEFORE_ACTIVATION:
                # Nothing was activated: discard; the reconciler re-installs from the chunk store.
                if self.current(name) != entry.bundle:
                    shutil.rmtree(self.version_dir(name, entry.bundle), ignore_errors=True)
                self.journal.drop(name)
                log.info("module %s: discarded an install interrupted in %s", name, entry.state)
            elif entry.state == "activating":
                try:
                    _verify_bundle_dir(self.version_dir(name, entry.bundle), self.root, now=0)
                except (ProtocolError, OSError) as exc:
                    await self._roll_back(name, f"interrupted during activation and the new version is unusable: {exc}")
                    continue
                self._swap(name, entry.bundle)  # finish the activation, then judge it
                self._swap_config(name, entry.config)
                await self._check_and_finish(name, bake_now=False)
            elif entry.state == "health_check":
                await self._check_and_finish(name, bake_now=False)
            elif entry.state == "rolling_back":
                await self._roll_back(name, entry.error)
