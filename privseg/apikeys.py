"""API keys: a role and a principal (the marketer or partner id the key acts as), stored hashed.

A token is 32 random bytes (``psk_`` + base64url), shown once. Only HMAC-SHA256(token) under a key
derived from the keyset is stored, so a copy of the database neither reveals tokens nor lets anyone
test guesses offline without the keyset.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from privseg import audit
from privseg.db import transaction
from privseg.errors import InvalidInput, NotFound
from privseg.keyset import Keyset

Role = Literal["admin", "marketer", "compliance", "partner", "intake"]
ROLES: tuple[Role, ...] = ("admin", "marketer", "compliance", "partner", "intake")
PREFIX = "psk_"


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    role: Role
    principal: str  # the marketer id (recipient) or partner id the key acts as

    @property
    def actor(self) -> str:
        """Who this is in ownership and audit records: ``marketer:<principal>``, ``admin:<name>``."""
        return f"{self.role}:{self.principal if self.role in ('marketer', 'partner') else self.name}"


def _hash(keyset: Keyset, token: str) -> str:
    return hmac.new(keyset.derived_key("api-key"), token.encode(), hashlib.sha256).hexdigest()


def create(
    conn: sqlite3.Connection, keyset: Keyset, *, role: str, name: str, partner: str | None = None
) -> tuple[Principal, str]:
    """Create a key; returns it and the token (shown once, never stored)."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; use one of {list(ROLES)}")
    if role == "partner" and not partner:
        raise InvalidInput("a partner key needs --partner ID (the partner it acts as)")
    if role != "partner" and partner:
        raise InvalidInput("--partner is only for partner keys")
    if not name.strip():
        raise InvalidInput("the key needs a name (for marketers: the marketer id, e.g. growth_team)")
    token = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    principal = partner if role == "partner" else name
    assert principal is not None
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO api_keys (name, role, principal, token_hash, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, role, principal, _hash(keyset, token), datetime.now(UTC).isoformat(timespec="seconds")),
        )
        key_id = int(cur.lastrowid or 0)
        audit.append(conn, keyset, "apikey_created", {"key": key_id, "role": role, "principal": principal})
    return Principal(key_id, name, role, principal), token


def authenticate(conn: sqlite3.Connection, keyset: Keyset, token: str) -> Principal | None:
    row = conn.execute(
        "SELECT id, name, role, principal FROM api_keys WHERE token_hash = ? AND revoked_at IS NULL",
        (_hash(keyset, token),),
    ).fetchone()
    return None if row is None else Principal(int(row[0]), row[1], row[2], row[3])


def revoke(conn: sqlite3.Connection, keyset: Keyset, key_id: int) -> None:
    with transaction(conn):
        n = conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (datetime.now(UTC).isoformat(timespec="seconds"), key_id),
        ).rowcount
        if n != 1:
            raise NotFound(f"no active API key {key_id}")
        audit.append(conn, keyset, "apikey_revoked", {"key": key_id})


def listing(conn: sqlite3.Connection) -> list[dict[str, object]]:
    rows = conn.execute(
        "SELECT id, name, role, principal, created_at, revoked_at FROM api_keys ORDER BY id"
    ).fetchall()
    return [
        dict(zip(("id", "name", "role", "principal", "created_at", "revoked_at"), r, strict=True))
        for r in rows
    ]


MAX_AUDITED_PATH = 128  # characters of a failed request's path kept in the audit entry


class FailureRecorder:
    """Failed authentications, recorded in the audit log without letting an outsider write to it at
    will: at most ``per_window`` entries per window (each with a truncated path, never the token);
    past that, one summary entry per window says how many more were seen."""

    def __init__(
        self, per_window: int = 20, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_window, self.window_seconds, self._clock = per_window, window_seconds, clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._recorded = 0
        self._suppressed = 0

    def record(self, conn: sqlite3.Connection, keyset: Keyset, reason: str, path: str) -> None:
        with self._lock:
            now = self._clock()
            entries: list[tuple[str, dict[str, object]]] = []
            if now - self._window_start >= self.window_seconds:
                if self._suppressed:
                    entries.append(
                        (
                            "auth_failed_suppressed",
                            {"count": self._suppressed, "window_seconds": self.window_seconds},
                        )
                    )
                self._window_start, self._recorded, self._suppressed = now, 0, 0
            if self._recorded < self.per_window:
                self._recorded += 1
                entries.append(("auth_failed", {"reason": reason, "path": path[:MAX_AUDITED_PATH]}))
            else:
                self._suppressed += 1
        if entries:
            with transaction(conn):
                for event, details in entries:
                    audit.append(conn, keyset, event, details)
