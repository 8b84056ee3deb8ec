"""Operators' bearer tokens with roles (admin > operator > viewer): stored as sha256 hashes, named, expiring, revocable.

One *bootstrap* admin token exists at a time: generated at first start (written to ``DATA/admin-token``,
never logged) or given by ``EDGEFLEET_ADMIN_TOKEN``; a new configured one replaces (revokes) the previous
one. Tokens made through the API (``edgefleet token create``) are independent of it. A token's id is
the first 12 hex digits of its hash: safe to show, enough to revoke by. Checking a request's token
is the API's job (``hub/api/deps.py``); this module answers who holds a token, or why it is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hub.audit import record
from hub.errors import Conflict, HubError, NotFound
from hub.store import Database, now
from hub.trust.keys import private_file, write_secret

log = logging.getLogger("edgefleet.hub.auth")

ROLE_RANK = {"viewer": 1, "operator": 2, "admin": 3}
ADMIN_TOKEN_ENV = "EDGEFLEET_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin-token"
MIN_TOKEN_CHARS = 32  # a supplied token: secrets.token_urlsafe(24) is 32 characters (192 bits)
MAX_TOKEN_CHARS = 512
ID_CHARS = 12
BOOTSTRAP = "bootstrap"


class TokenError(ValueError):
    """A supplied token cannot be used (too short, revoked); the text says why and what to do, in one line."""


class TokenRefused(HubError):
    """A request's bearer token is unknown, expired or revoked (401)."""

    status = 401


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    id: str = ""  # the token's id (hash prefix), for the audit log


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def check_supplied(token: str, what: str = "the token") -> str:
    """A token chosen by a person (env, config) must be long enough to resist guessing."""
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"{what} is {len(token)} characters: a token must have at least {MIN_TOKEN_CHARS} (make "
                         "one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if len(token) > MAX_TOKEN_CHARS or not token.isprintable() or token != token.strip():
        raise TokenError(f"{what} must be {MIN_TOKEN_CHARS}..{MAX_TOKEN_CHARS} printable characters without"
                         " surrounding spaces")
    return token


def _state(row: dict[str, Any], t: float) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= t:
        return "expired"
    return "active"


ACTIVE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"


def create_token(db: Database, name: str, role: str, token: str | None = None, *, expires_in: float | None = None,
                 actor: str = "", source: str = "api") -> str:
    """A new token; the plain text is returned once and stored only as its hash."""
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}: one of {sorted(ROLE_RANK)}")
    token = token or secrets.token_urlsafe(32)
    digest, t = hash_token(token), now()
    expires_at = t + expires_in if expires_in is not None else None
    with db.transaction() as tx:
        if source != BOOTSTRAP and tx.one(f"SELECT 1 FROM api_tokens WHERE name = ? AND {ACTIVE}", (name, t)):
            raise Conflict(f"an active token is already named {name!r}: revoke it first or choose another name")
        tx.insert("api_tokens", {"token_hash": digest, "name": name, "role": role, "created_at": t,
                                 "expires_at": expires_at, "created_by": actor, "source": source})
        record(db, actor or "hub", "token.created", name, id=digest[:ID_CHARS], role=role, expires_at=expires_at,
               source=source)
    return token


def _view(row: dict[str, Any], t: float) -> dict[str, Any]:
    return {"id": row["token_hash"][:ID_CHARS], "name": row["name"], "role": row["role"], "state": _state(row, t),
            "source": row["source"], "created_at": row["created_at"], "created_by": row["created_by"],
            "expires_at": row["expires_at"], "revoked_at": row["revoked_at"]}


def list_tokens(db: Database, include_inactive: bool = False) -> list[dict[str, Any]]:
    """Every token's id, name, role and state (never the token); active ones only unless asked."""
    t = now()
    rows = db.query("SELECT * FROM api_tokens ORDER BY created_at, token_hash")
    return [v for v in (_view(r, t) for r in rows) if include_inactive or v["state"] == "active"]


def find_token(db: Database, ref: str) -> dict[str, Any]:
    """The one active token whose id starts with ``ref`` (8+ hex digits) or whose name is ``ref``."""
    t = now()
    rows = db.query(f"SELECT * FROM api_tokens WHERE name = ? AND {ACTIVE}", (ref, t))
    if not rows and len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref.lower()):
        rows = [r for r in db.query(f"SELECT * FROM api_tokens WHERE {ACTIVE}", (t,))
                if r["token_hash"].startswith(ref.lower())]
    if not rows:
        raise NotFound(f"no active token named {ref!r} or with an id starting so (edgefleet token list)")
    if len(rows) > 1:
        raise Conflict(f"{ref!r} matches {len(rows)} tokens ({', '.join(r['token_hash'][:ID_CHARS] for r in rows)}):"
                       " give more of the id")
    return rows[0]


def revoke_token(db: Database, ref: str, actor: str) -> dict[str, Any]:
    """Revoke a token by name or id at once; refused for the last active admin token (nobody could manage tokens)."""
    with db.transaction() as tx:
        row = find_token(db, ref)
        t = now()
        if row["role"] == "admin" and tx.scalar(
                f"SELECT count(*) FROM api_tokens WHERE role = 'admin' AND {ACTIVE}", (t,)) <= 1:
            raise Conflict(f"token {row['name']!r} is the last active admin token: create another admin token first")
        tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE token_hash = ?", (t, row["token_hash"]))
        record(db, actor, "token.revoked", row["name"], id=row["token_hash"][:ID_CHARS], role=row["role"])
    log.info("revoked token %s (%s)", row["token_hash"][:ID_CHARS], row["name"])
    return _view(row | {"revoked_at": t}, t)


def ensure_admin_token(db: Database, data_dir: Path, configured: str | None) -> str | None:
    """Make sure an admin token works; return the plain bootstrap token when this process knows it.

    A configured token (argument or env) becomes the bootstrap admin token and revokes the previous
    bootstrap token (a changed ``EDGEFLEET_ADMIN_TOKEN`` replaces the old one); a revoked token is never
    taken back. With none configured, one is generated when no admin token is active, written to
    ``data_dir/admin-token`` (0600), and never logged.
    """
    what = "the configured admin token" if configured else ADMIN_TOKEN_ENV
    configured = configured or os.environ.get(ADMIN_TOKEN_ENV) or None
    token_file = data_dir / ADMIN_TOKEN_FILE
    private_file(token_file)
    t = now()
    if configured:
        check_supplied(configured, what)
        digest = hash_token(configured)
        with db.transaction() as tx:
            row = tx.one("SELECT role, revoked_at FROM api_tokens WHERE token_hash = ?", (digest,))
            if row is not None and row["revoked_at"] is not None:
                raise TokenError(f"the configured admin token was revoked at {iso(row['revoked_at'])}: configure a"
                                 " new one (a revoked token never becomes valid again)")
            if row is not None and row["role"] != "admin":
                raise TokenError(f"the configured admin token is already an API token with role {row['role']!r}")
            replaced = tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE source = ? AND revoked_at IS NULL"
                                  " AND token_hash != ?", (t, BOOTSTRAP, digest)).rowcount
            if replaced:
                record(db, "hub", "token.replaced", "admin", revoked=replaced, reason=f"{ADMIN_TOKEN_ENV} changed")
            if row is None:
                create_token(db, "admin", "admin", configured, actor="hub", source=BOOTSTRAP)
        if not token_file.exists() or token_file.read_text().strip() != configured:
            write_secret(token_file, configured + "\n")
        if replaced:
            log.warning("the configured admin token replaced the previous one (%d revoked)", replaced)
        return configured
    if db.scalar(f"SELECT count(*) FROM api_tokens WHERE role = 'admin' AND {ACTIVE}", (t,)):
        known = token_file.read_text().strip() if token_file.exists() else None
        return known if known and authenticates(db, known) else None
    first = not db.scalar("SELECT count(*) FROM api_tokens")
    token = create_token(db, "admin", "admin", actor="hub", source=BOOTSTRAP)
    write_secret(token_file, token + "\n")
    log.warning("%s: the admin token is in %s (read it there; it is never logged)",
                "first start" if first else "no admin token was active", token_file)
    return token


def authenticate_token(db: Database, token: str) -> Principal:
    """Who holds ``token``; ``TokenRefused`` saying whether it is unknown, expired or revoked."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise TokenRefused("invalid bearer token")
    row = db.one("SELECT token_hash, name, role, expires_at, revoked_at FROM api_tokens WHERE token_hash = ?",
                 (hash_token(token),))
    if row is None:
        raise TokenRefused("invalid bearer token")
    state = _state(row, now())
    if state == "revoked":
        raise TokenRefused(f"bearer token {row['name']!r} was revoked at {iso(row['revoked_at'])}")
    if state == "expired":
        raise TokenRefused(f"bearer token {row['name']!r} expired at {iso(row['expires_at'])}")
    return Principal(row["name"], row["role"], row["token_hash"][:ID_CHARS])


def authenticates(db: Database, token: str) -> bool:
    try:
        authenticate_token(db, token)
    except TokenRefused:
        return False
    return True


def principal_for(db: Database, token: str) -> Principal | None:
    """Who holds ``token``; None when it is unknown, expired or revoked."""
    try:
        return authenticate_token(db, token)
    except TokenRefused:
        return None
