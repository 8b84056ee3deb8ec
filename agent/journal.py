"""The install state machine's table and its journal: the persisted context, apart from the installer.

``TRANSITIONS`` is the one statement of which install state may follow which (``docs/agent.md`` draws
its diagram from it: ``scripts/diagrams.py``); :class:`Journal` refuses any other move and writes each
entry to ``data_dir/journal.json`` (temp file, fsync, rename) *before* the step it names is carried
out, so after a crash ``Installer.recover`` knows what was under way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("edgefleet.agent.install")

JOURNAL_FILE = "journal.json"

# state -> states it may move to. None is "no install on record": where a first install begins.
TRANSITIONS: dict[str | None, frozenset[str]] = {
    # staged directly: a new configuration for the bundle already installed (nothing to download or verify)
    None: frozenset({"downloading", "staged"}),
    "downloading": frozenset({"verifying", "failed"}),
    "verifying": frozenset({"staged", "failed"}),
    "staged": frozenset({"activating", "failed"}),
    "activating": frozenset({"health_check", "rolling_back"}),
    "health_check": frozenset({"committed", "rolling_back", "baking"}),
    # Probation: the new version serves while its error rate is watched. baking -> baking is the bake
    # started again after the agent restarted (counted in Entry.bakes).
    "baking": frozenset({"baking", "committed", "rolling_back"}),
    "rolling_back": frozenset({"rolled_back", "failed"}),
    # Terminal for this version; the next version's install starts from here. A committed version
    # whose worker then crash-loops is rolled back to the version kept beside it.
    "committed": frozenset({"downloading", "staged", "rolling_back"}),
    "rolled_back": frozenset({"downloading", "staged"}),
    "failed": frozenset({"downloading", "staged"}),
}
TERMINAL = frozenset({"committed", "rolled_back", "failed"})
BEFORE_ACTIVATION = frozenset({"downloading", "verifying", "staged"})


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: str | None, new: str) -> None:
    if new not in TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"install state {old!r} cannot move to {new!r}")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write, fsync, rename, fsync the directory: the file is the old or the new version after any crash."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class Entry:
    """One module's install on record."""

    state: str
    bundle: str
    version: int
    previous: str | None = None  # the digest active before this install, the rollback target
    error: str = ""
    ts: float = 0.0
    bake: dict[str, int] | None = None  # the desired BakePolicy (None: commit after the health check)
    bakes: int = 0  # times the bake was started: a restart during baking starts it again
    retry_at: float = 0.0  # failed because of the environment (disk full, slow download): try again then (0: never)
    config: str = ""  # config digest this install applies ("" none); its file is modules/<name>/config/<digest>.json
    previous_config: str = ""  # the one applied before, restored by a rollback


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                self.entries = {name: Entry(**e) for name, e in raw.get("modules", {}).items()}
            except (ValueError, TypeError, AttributeError) as exc:
                # Only a torn write of an old format could cause this; start clean but say so.
                log.error("install journal %s unreadable (%s): starting with an empty journal", path, exc)

    def save(self) -> None:
        atomic_write_json(self.path, {"v": 1, "modules": {n: vars(e) for n, e in self.entries.items()}})

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def transition(self, name: str, new: str, **fields: Any) -> Entry:
        old = self.entries.get(name)
        check_transition(old.state if old else None, new)
        if new == "downloading" or (new == "staged" and (old is None or old.state in TERMINAL)):  # a new install
            entry = Entry(state=new, bundle=fields["bundle"], version=fields["version"], previous=fields.get("previous"),
                          bake=fields.get("bake"), config=fields.get("config", ""),
                          previous_config=fields.get("previous_config", ""))
        else:
            assert old is not None
            entry = Entry(**{**vars(old), "state": new, **fields})
        entry.ts = time.time()
        self.entries[name] = entry
        try:
            self.save()  # persisted before the step it names is carried out
        except OSError:  # e.g. a full disk: the step does not happen, and the record stays what the file says
            if old is None:
                self.entries.pop(name, None)
            else:
                self.entries[name] = old
            raise
        return entry

    def drop(self, name: str) -> None:
        old = self.entries.pop(name, None)
        if old is not None:
            try:
                self.save()
            except OSError:
                self.entries[name] = old
                raise
