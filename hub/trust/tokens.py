"""Operators' bearer tokens with roles (admin > operator > viewer), stored as sha256 hashes.

Checking a request's token is the API's job: ``hub/api/deps.py``."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hub.store import Database, now
from hub.trust.keys import private_file, write_secret

log = logging.getLogger("edgefleet.hub.auth")

ROLE_RANK = {"viewer": 1, "operator": 2, "admin": 3}
ADMIN_TOKEN_ENV = "EDGEFLEET_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin-token"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Database, name: str, role: str, token: str | None = None) -> str:
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}: one of {sorted(ROLE_RANK)}")
    token = token or secrets.token_urlsafe(32)
    with db.transaction() as tx:
        tx.upsert("api_tokens", {"token_hash": hash_token(token), "name": name, "role": role, "created_at": now()},
                  key=["token_hash"])
    return token


def ensure_admin_token(db: Database, data_dir: Path, configured: str | None) -> str | None:
    """Make sure an admin token exists; return the plain token when it is known to this process.

    A configured token (argument or env) is always accepted as admin. A generated
    one is logged once and written to ``data_dir/admin-token`` (0600) for the CLI.
    """
    configured = configured or os.environ.get(ADMIN_TOKEN_ENV) or None
    token_file = data_dir / ADMIN_TOKEN_FILE
    private_file(token_file)
    if configured:
        if db.one("SELECT 1 FROM api_tokens WHERE token_hash = ?", (hash_token(configured),)) is None:
            create_token(db, "admin", "admin", configured)
            write_secret(token_file, configured + "\n")
        return configured
    if db.scalar("SELECT count(*) FROM api_tokens WHERE role = 'admin'"):
        return token_file.read_text().strip() if token_file.exists() else None
    token = create_token(db, "admin", "admin")
    write_secret(token_file, token + "\n")
    log.warning("admin token: %s (also written to %s)", token, token_file)
    return token


def principal_for(db: Database, token: str) -> Principal | None:
    """Who holds ``token``; None when no such token exists."""
    row = db.one("SELECT name, role FROM api_tokens WHERE token_hash = ?", (hash_token(token),))
    return None if row is None else Principal(row["name"], row["role"])
