"""A module's configuration on the device (the desired state's per-module ``config``), beside its versions.

``modules/<name>/config/<digest>.json`` holds each configuration an install applies (and the one before it, for a
rollback); the ``config.current`` symlink names the applied one and is swapped with one rename, like ``current``.
No link: no configuration (``{}``). The installer journals which digest each install applies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.journal import atomic_write_json
from protocol.messages import config_digest

CONFIG_DIR = "config"
CONFIG_CURRENT = "config.current"


def current(module_dir: Path) -> str:
    """The digest of the configuration applied, or ""."""
    try:
        return os.readlink(module_dir / CONFIG_CURRENT).removeprefix(f"{CONFIG_DIR}/").removesuffix(".json")
    except OSError:
        return ""


def write(module_dir: Path, config: dict[str, Any]) -> str:
    """Store ``config`` as ``config/<digest>.json`` (atomic); its digest ("" for none: nothing written)."""
    digest = config_digest(config)
    if digest:
        target = module_dir / CONFIG_DIR / f"{digest}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, config)
    return digest


def swap(module_dir: Path, digest: str) -> None:
    """Point ``config.current`` at ``digest`` ("" removes it) with one atomic rename."""
    link = module_dir / CONFIG_CURRENT
    if not digest:
        link.unlink(missing_ok=True)
        return
    tmp = link.with_name(f".{CONFIG_CURRENT}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(f"{CONFIG_DIR}/{digest}.json", tmp)
    os.replace(tmp, link)


def read(module_dir: Path) -> tuple[dict[str, Any], str]:
    """The applied configuration and its digest (``{}``, "" for none); ValueError if its file is unreadable or altered."""
    digest = current(module_dir)
    if not digest:
        return {}, ""
    try:
        config = json.loads((module_dir / CONFIG_DIR / f"{digest}.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"applied configuration {digest[:12]}… unreadable: {exc}") from None
    if not isinstance(config, dict) or config_digest(config) != digest:
        raise ValueError(f"applied configuration {digest[:12]}… does not match its digest")
    return config, digest


def keep_only(module_dir: Path, digests: set[str]) -> None:
    """Delete stored configurations other than ``digests`` (after a commit: the applied one and the one before)."""
    for path in (module_dir / CONFIG_DIR).glob("*.json"):
        if path.stem not in digests:
            path.unlink(missing_ok=True)
