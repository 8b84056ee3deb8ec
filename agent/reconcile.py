"""The agent's decisions, pure: messages and facts in, results and actions out (sans-IO).

Two parts, neither doing any I/O (no files, sockets, clock or event loop: time comes in as ``now``):

- :class:`Trust` holds what the device trusts and has accepted: the root, the desired state and its
  revision. :meth:`Trust.on_root` holds root versions that arrive early and applies consecutive
  ones, one version at a time (TUF's chain); :meth:`Trust.on_desired` accepts or refuses a desired
  state. Each returns what happened as values (:class:`RootTrusted`, :class:`Accepted`,
  :class:`Refused`) for the caller to persist, count and act on. The order rule (protocol.md): roots
  first, then state; a state refused is held and judged again after every root update, so a state
  signed by a rotated key that arrives before its root is applied once the root comes.
- :func:`step` is the reconciler: the desired state and what is installed (:class:`ModuleFacts`)
  in, the actions to converge (:class:`Remove`, :class:`Activate`, :class:`Install`, …) out.
  :func:`supersede` decides whether a newer desired state cancels the download under way.

``agent.executor`` carries the actions out; ``tests/test_agent_reconcile.py`` drives every action and
every message order here without a broker. ``tests/test_architecture.py`` keeps I/O imports out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.encoding import ProtocolError, digest_of
from protocol.messages import DesiredModule, DesiredState, ShadowSpec, config_digest, validate
from protocol.signing import Root, parse_envelope
from protocol.trust import TrustState
from protocol.verify import MAX_DESIRED_LIFETIME_S

MAX_PENDING_ROOTS = 64  # root versions held while waiting for the one before them
# A version the device judged unusable (its health check, bake or verification failed): not installed
# again until the desired state names a different bundle or configuration, or the same with a higher
# ``retry`` (unless the failure has a retry time).
GAVE_UP = frozenset({"rolled_back", "failed"})


# --- trust ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RootTrusted:
    """``root`` is trusted now: persist ``envelope`` (atomically) before acting on anything else."""

    root: Root
    envelope: Any
    floor_reset: bool = False  # the root no longer trusts the applied state's signer: any newer revision goes


@dataclass(frozen=True)
class Accepted:
    """``state`` is the desired state now: persist ``envelope`` and reconcile."""

    state: DesiredState
    envelope: Any
    recheck: bool = False  # a held state, accepted after a root update


@dataclass(frozen=True)
class Refused:
    """A message refused, with the reason; ``kind`` is the rejected counter's key (``desired``, ``root``)."""

    kind: str
    reason: str
    recheck: bool = False  # a held state refused again after a root update: no new message, not counted again


TrustEvent = RootTrusted | Accepted | Refused


class Trust:
    """One device's trust (:class:`protocol.trust.TrustState`) and what the agent needs of it: the
    accepted desired state, why the last one was refused, roots held until the one before them comes.

    ``applied`` and ``policy`` are the envelopes persisted by the caller (``state.json``): the revision
    floor and the release policy are derived from them, so a restart keeps both, and a root that
    stops trusting the applied state's signer resets the floor (fast-forward recovery, §7a).
    """

    def __init__(self, device_id: str, root_envelope: Any, applied: Any = None, policy: Any = None) -> None:
        self.device_id = device_id
        self.state = TrustState(root_envelope, applied, policy)
        self.desired: DesiredState | None = None
        self.desired_digest = ""
        if applied is not None:  # verified when it was accepted: expiry is not judged again on a restart
            self.desired = validate(DesiredState, applied["signed"])
            self.desired_digest = digest_of(applied)
        self.desired_error = ""  # why the last desired state was refused; "" once one is accepted
        self.pending_roots: dict[int, Any] = {}  # version -> envelope, waiting for the versions before it

    @property
    def root(self) -> Root:
        return self.state.root

    @property
    def revision(self) -> int:
        return self.desired.revision if self.desired is not None else 0

    @property
    def held(self) -> Any:
        """The last desired envelope refused, judged again after each root update."""
        return self.state.refused

    def on_desired(self, payload: bytes, now: float) -> list[TrustEvent]:
        """A desired-state message: [] for the state already applied (its retained copy), else its verdict."""
        try:
            envelope = parse_envelope(payload)
            digest = digest_of(envelope)
        except ProtocolError as exc:
            return [self._refuse(str(exc))]
        except (ValueError, TypeError) as exc:
            return [self._refuse(f"malformed desired state: {exc!r}")]
        if digest == self.desired_digest:
            return []  # the retained copy of the state already applied (re-sent on every reconnect)
        return [self._judge(envelope, digest, now)]

    def on_root(self, version: int, payload: bytes, now: float) -> list[TrustEvent]:
        """A root message (``root/{version}``): held, then every consecutive version after ours applied in order."""
        if version <= self.root.version or not payload:
            return []  # the retained history, re-sent on every connect (or a cleared retained message)
        if len(self.pending_roots) >= MAX_PENDING_ROOTS and version not in self.pending_roots:
            return [Refused("root", f"more than {MAX_PENDING_ROOTS} root versions pending")]
        try:
            self.pending_roots[version] = parse_envelope(payload)
        except ProtocolError as exc:
            return [Refused("root", str(exc))]
        updates, refused = self.state.update_roots(self.pending_roots)
        events: list[TrustEvent] = [RootTrusted(u.root, u.root.document, u.floor_reset) for u in updates]
        events += [Refused("root", f"root version {v} refused: {why}") for v, why in refused.items()]
        if updates and self.state.refused is not None:
            events.append(self._judge(self.state.refused, digest_of(self.state.refused), now, recheck=True))
        return events

    def warnings(self, now: float) -> list[str]:
        """What the report flags without refusing anything: the device keeps running what it has (§7b)."""
        out = []
        if self.state.root.expired(now) and not self.desired_error:
            out.append(self._root_expired(now))
        if self.desired is not None and self.desired.expires <= now:
            out.append(f"applied state expired at {self.desired.expires} (now {int(now)}): still running it")
        # A state lives at most MAX_DESIRED_LIFETIME_S: one expiring further ahead was issued after "now".
        if self.desired is not None and self.desired.expires - now > MAX_DESIRED_LIFETIME_S:
            out.append(f"device clock looks wrong: now ({int(now)}) is before the applied state was issued "
                       f"(it expires at {self.desired.expires}, more than {MAX_DESIRED_LIFETIME_S} s ahead)")
        return out

    def _root_expired(self, now: float) -> str:
        return (f"root expired: trusted root version {self.root.version} expired at {self.root.expires} "
                f"(now {int(now)}); new states are refused until a newer root arrives")

    def _judge(self, envelope: Any, digest: str, now: float, recheck: bool = False) -> Accepted | Refused:
        if self.state.root.expired(now):  # §7a: judged after every newer root available was applied
            self.state.refused = envelope
            return self._refuse(self._root_expired(now), recheck, prefix=False)
        try:
            state = self.state.accept_desired(envelope, self.device_id, now)
        except ProtocolError as exc:
            return self._refuse(str(exc), recheck)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # shapes the schema checks never reached
            self.state.refused = envelope
            return self._refuse(f"malformed desired state: {exc!r}", recheck)
        self.desired, self.desired_digest, self.desired_error = state, digest, ""
        return Accepted(state, envelope, recheck)

    def _refuse(self, reason: str, recheck: bool = False, prefix: bool = True) -> Refused:
        self.desired_error = f"desired state refused: {reason}" if prefix else reason
        return Refused("desired", reason, recheck)


# --- reconciling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleFacts:
    """What the device holds of one module, read before a reconcile pass."""

    current: str | None = None  # the bundle ``modules/<name>/current`` points at
    active: str | None = None  # the bundle serving now
    journal: str | None = None  # the install state on record
    journal_bundle: str | None = None  # the bundle that install is for
    journal_retry: int = 0  # the hub's retry number that install was for
    retry_at: float = 0.0  # a failure the environment caused (disk full, slow download): tried again from then
    config: str = ""  # config_digest of the configuration applied to ``current`` ("" none)
    active_config: str = ""  # ... of the one serving
    journal_config: str = ""  # ... of the one the install on record is for


@dataclass(frozen=True)
class Facts:
    """Device-wide facts for a pass."""

    starting: bool = False  # the agent has just started: installs a restart interrupted come first
    hold_until: float = 0.0  # an application holds installs until then (agent/deferral.py)


@dataclass(frozen=True)
class Remove:
    """Stop serving ``name`` and uninstall it: no longer desired."""

    name: str


@dataclass(frozen=True)
class Activate:
    """Serve the version ``current`` points at (load it, start its worker, replace the one serving)."""

    name: str


@dataclass(frozen=True)
class SetCollectRate:
    """The data-collection rate of ``name`` if it is serving (the desired state may change it alone)."""

    name: str
    ppm: int


@dataclass(frozen=True)
class Reconfigure:
    """Apply ``module``'s configuration to the version installed (same bundle): activated, health-checked and baked
    like an install, and rolled back to the previous configuration if that fails."""

    module: DesiredModule


@dataclass(frozen=True)
class Install:
    """Download, verify, activate and health-check (and bake) ``module``; one at a time."""

    module: DesiredModule


@dataclass(frozen=True)
class ResumeBake:
    """Bake again a version a restart interrupted while baking (it serves on probation meanwhile)."""

    name: str


@dataclass(frozen=True)
class CancelInstall:
    """Drop the download under way: the desired state no longer wants its bundle."""

    name: str
    bundle: str


@dataclass(frozen=True)
class InstallShadow:
    """Install ``module`` (a shadow's candidate) beside the live version: health-checked, never served."""

    module: DesiredModule


@dataclass(frozen=True)
class StartShadow:
    """Run the installed candidate of ``name`` on the live version's inputs (``spec`` says how)."""

    name: str
    spec: ShadowSpec


@dataclass(frozen=True)
class RemoveShadow:
    """Stop and uninstall the candidate of ``name``: no longer desired, or another one is."""

    name: str


@dataclass(frozen=True)
class Report:
    """Publish the reported state (once the pass is through)."""


Action = (Remove | Activate | SetCollectRate | Reconfigure | Install | ResumeBake | CancelInstall | InstallShadow
          | StartShadow | RemoveShadow | Report)


def step(now: float, desired: DesiredState | None, installed: Mapping[str, ModuleFacts],
         facts: Facts = Facts(), shadows: Mapping[str, ModuleFacts] | None = None) -> list[Action]:
    """The actions that take the device from ``installed`` to ``desired``, in the order to carry them out.

    Installs and reconfigurations wait while an application holds them (``facts.hold_until`` after ``now``).
    ``now`` also judges retry times: an install that failed because of the environment is tried again from its
    ``retry_at``; one the device judged unusable is not, until the desired state names another bundle or
    configuration, or raises ``retry`` above the one that install was for.
    ``shadows``: what the device holds of shadow candidates, per module name (their own install slots).
    Candidates no longer wanted go first (they only cost CPU), then the live modules, then candidates.
    """
    if facts.starting:  # a bake is an install under way, and installs run one at a time
        return [*(ResumeBake(n) for n, f in sorted(installed.items()) if f.journal == "baking"), Report()]
    if desired is None:
        return []
    wanted = {m.name for m in desired.modules}
    candidates = {m.name: m.shadow for m in desired.modules if m.shadow is not None}
    shadows = dict(shadows or {})
    actions: list[Action] = []
    for n, f in sorted(shadows.items()):
        spec = candidates.get(n)
        held = [b for b in (f.current, f.active) if b is not None]
        if (held or f.journal is not None) and (spec is None or any(b != spec.bundle for b in held)):
            actions.append(RemoveShadow(n))
            shadows[n] = ModuleFacts()
    actions += [Remove(n) for n, f in sorted(installed.items())
                if n not in wanted and (f.current is not None or f.active is not None)]
    for m in desired.modules:
        f = installed.get(m.name, ModuleFacts())
        want = config_digest(m.config)
        # a (bundle, configuration) the device judged unusable is not tried again until the desired state changes
        gave_up = (f.journal_bundle == m.bundle and f.journal_config == want and f.journal in GAVE_UP
                   and m.retry <= f.journal_retry)
        if f.current == m.bundle:
            if f.config != want and not gave_up:
                if now >= facts.hold_until:
                    actions.append(Reconfigure(m))
            elif f.active != m.bundle or f.active_config != f.config:
                actions.append(Activate(m.name))
            actions.append(SetCollectRate(m.name, m.collect_rate_ppm))
        elif not gave_up or (f.retry_at and now >= f.retry_at):
            if now >= facts.hold_until:
                actions.append(Install(m))
    for m in desired.modules:
        cand = m.candidate()
        if m.shadow is None or cand is None:
            continue
        f = shadows.get(m.name, ModuleFacts())
        if f.current == cand.bundle:
            if f.active != cand.bundle:
                actions.append(StartShadow(m.name, m.shadow))
        elif not (f.journal_bundle == cand.bundle and f.journal in GAVE_UP) or (f.retry_at and now >= f.retry_at):
            actions.append(InstallShadow(cand))  # a candidate the environment stopped: again from its retry time
    actions.append(Report())
    return actions


def next_retry(desired: DesiredState | None, installed: Mapping[str, ModuleFacts],
               shadows: Mapping[str, ModuleFacts] | None = None) -> float | None:
    """When the earliest desired install (or shadow candidate's) that the environment stopped is due again
    (None: none waits)."""
    wanted = [(m.bundle, installed.get(m.name)) for m in (desired.modules if desired else [])]
    wanted += [(m.shadow.bundle, (shadows or {}).get(m.name)) for m in (desired.modules if desired else [])
               if m.shadow is not None]
    due = [f.retry_at for bundle, f in wanted if f and f.journal_bundle == bundle and f.journal == "failed"
           and f.retry_at]
    return min(due, default=None)


def still_wanted(desired: DesiredState | None, installed: Mapping[str, ModuleFacts]) -> list[str]:
    """The desired bundles the device has not given up on: their cached releases and chunks are kept."""
    return [m.bundle for m in (desired.modules if desired else []) if not (
        (f := installed.get(m.name)) and f.journal_bundle == m.bundle and f.journal in GAVE_UP and not f.retry_at
        and m.retry <= f.journal_retry)]


def supersede(desired: DesiredState, installing: tuple[str, str] | None, state: str | None) -> list[CancelInstall]:
    """A newer desired state arrived during the install of ``installing`` (name, bundle), now in ``state``.

    Cancel it if it is still downloading a bundle no longer wanted: nothing was activated yet. Past the
    download it finishes (an activation is never undone halfway), and the next pass handles the rest.
    """
    if installing is None or state != "downloading":
        return []
    name, bundle = installing
    if any(m.bundle == bundle or (m.shadow is not None and m.shadow.bundle == bundle) for m in desired.modules):
        return []
    return [CancelInstall(name, bundle)]
