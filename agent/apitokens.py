"""The local API's per-app tokens (``DATA/api-tokens``), followed without a restart.

One ``app-name token`` line per application (0600; a token is at least 16 characters). The file is
read at start and again on SIGHUP (``agent/daemon.py``) or when it changed (its mtime, size or inode):

- a request with a known token costs one ``stat`` of the file, so a token removed from it is refused
  on the first request after the edit;
- a request with an unknown token looks at the file at most once a ``recheck_s`` (a second), so a
  token just added works within a second while a caller guessing tokens cannot make the agent re-read
  the file at its own pace.

A file that disappears or cannot be read grants nothing (fail closed) until it is back.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("edgefleet.agent.api")

TOKENS_FILE = "api-tokens"
MIN_TOKEN_LENGTH = 16
RECHECK_S = 1.0  # an unknown token re-checks the file at most this often

Stamp = tuple[int, int, int] | None  # (mtime_ns, size, inode) of the file; None: missing or unreadable


def parse_tokens(text: str) -> dict[str, str]:
    """``token -> app name`` of a tokens file's text; comments, blank lines and short tokens are left out."""
    tokens = {}
    for line in text.splitlines():
        name, _, token = line.strip().partition(" ")
        if name and not name.startswith("#") and len(token.strip()) >= MIN_TOKEN_LENGTH:
            tokens[token.strip()] = name
    return tokens


def load_tokens(path: Path) -> dict[str, str]:
    """The per-app tokens (token -> app name) of ``path``, made with one ``default`` token (0600) if missing."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# local API tokens, one 'app-name token' per line\ndefault {secrets.token_urlsafe(32)}\n")
        log.warning("local API tokens made in %s: give each app a line of its own", path)
    return parse_tokens(path.read_text())


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ApiTokens:
    """The tokens of one file, re-read when it changes (see the module's docstring for when it looks)."""

    def __init__(self, path: Path, *, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.recheck_s, self._clock = Path(path), recheck_s, clock
        self._stamp = _stamp(self.path)  # before reading: an edit made while reading is seen next time
        self._tokens = load_tokens(self.path)
        self._stamp = self._stamp or _stamp(self.path)  # load_tokens made the file
        self._unknown_at = -float("inf")
        self.reloads = 0  # times the file was read again (SIGHUP or a change)

    def __len__(self) -> int:
        return len(self._tokens)

    def app(self, token: str | None) -> str | None:
        """The app ``token`` belongs to, or None: not (or no longer) in the file."""
        if not token:
            return None
        if self._find(token) is not None:
            self._refresh()  # one stat: a revoked token is refused at once
            return self._find(token)
        now = self._clock()
        if now - self._unknown_at < self.recheck_s:
            return None
        self._unknown_at = now
        return self._find(token) if self._refresh() else None

    def reload(self) -> None:
        """Read the file again whatever its stamp says (SIGHUP: an edit its mtime did not show)."""
        self._read(_stamp(self.path))
        log.info("local API tokens re-read from %s on request: %d token(s)", self.path, len(self._tokens))

    def _find(self, token: str) -> str | None:
        found = None
        for known, name in self._tokens.items():  # every one compared, in constant time each
            if hmac.compare_digest(token.encode(), known.encode()):
                found = name
        return found

    def _refresh(self) -> bool:
        """Re-read the file if its stamp changed; True if it did."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        before = len(self._tokens)
        self._read(stamp)
        log.info("local API tokens changed in %s: %d token(s), were %d", self.path, len(self._tokens), before)
        return True

    def _read(self, stamp: Stamp) -> None:
        self._stamp = stamp
        try:
            self._tokens = parse_tokens(self.path.read_text()) if stamp is not None else {}
        except (OSError, UnicodeDecodeError) as exc:
            log.error("local API tokens: cannot read %s (%s): no token is valid until it can be", self.path, exc)
            self._tokens = {}
        else:
            if stamp is None:
                log.error("local API tokens: %s is gone: no token is valid until it is back", self.path)
        self.reloads += 1
