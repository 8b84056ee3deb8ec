"""Webhook signatures: HMAC-SHA256 of the exact body bytes with the subscription's shared secret (pure).

Header ``X-Edgefleet-Signature: sha256=<hex>``. The body carries the event id and time, so both are
covered by the signature; receivers compare in constant time and drop event ids they have seen.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Edgefleet-Signature"
EVENT_HEADER = "X-Edgefleet-Event"
EVENT_ID_HEADER = "X-Edgefleet-Event-Id"
TIMESTAMP_HEADER = "X-Edgefleet-Timestamp"
DELIVERY_HEADER = "X-Edgefleet-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The header value for ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(sign(secret, body), header)
