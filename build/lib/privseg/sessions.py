"""Web console sessions: an API key, presented once at sign-in, turned into a server-side session.

The browser holds only a random session token (a cookie the console marks HttpOnly and
SameSite=Strict). The database holds HMAC(token) under a key derived from the keyset, so a copy of it
cannot be replayed as a cookie. A session acts exactly as the API key it was opened with: it ends when
that key is revoked, after ``idle`` without a request, at ``expires_at`` whatever its use, and at
sign-out. The CSRF token of a session is derived from its token (HMAC under another derived key), so
it needs no storage and is worthless without the cookie beside it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta

from privseg.apikeys import Principal
from privseg.db import transaction
from privseg.keyset import Keyset

# last_seen is written at most this often: a page view must not take the write lock every time.
TOUCH_EVERY = timedelta(seconds=30)


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    expires_at: datetime


def _hash(keyset: Keyset, token: str) -> str:
    return hmac.new(keyset.derived_key("console-session"), token.encode(), hashlib.sha256).hexdigest()


def csrf_token(keyset: Keyset, token: str) -> str:
    """The CSRF token that goes with a session token (or with a sign-in form's nonce)."""
    return hmac.new(keyset.derived_key("console-csrf"), token.encode(), hashlib.sha256).hexdigest()


def csrf_ok(keyset: Keyset, token: str, presented: str) -> bool:
    return hmac.compare_digest(csrf_token(keyset, token), presented)


def start(
    conn: sqlite3.Connection, keyset: Keyset, principal: Principal, *, lifetime: timedelta, now: datetime
) -> str:
    """Open a session for ``principal``; returns its token (for the cookie only)."""
    token = secrets.token_urlsafe(32)
    with transaction(conn):
        # Sessions past their expiry are dropped here, so the table does not grow without bound.
        conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now.isoformat(),))
        conn.execute(
            "INSERT INTO console_sessions (token_hash, key_id, created_at, last_seen, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                _hash(keyset, token),
                principal.key_id,
                now.isoformat(),
                now.isoformat(),
                (now + lifetime).isoformat(),
            ),
        )
    return token


def find(
    conn: sqlite3.Connection, keyset: Keyset, token: str, *, idle: timedelta, now: datetime
) -> Session | None:
    """The live session of ``token``, or None: unknown, ended, idle too long, expired, or its API key
    revoked. A live session's idle clock restarts."""
    token_hash = _hash(keyset, token)
    row = conn.execute(
        "SELECT k.id, k.name, k.role, k.principal, s.last_seen, s.expires_at FROM console_sessions s "
        "JOIN api_keys k ON k.id = s.key_id WHERE s.token_hash = ? AND k.revoked_at IS NULL",
        (token_hash,),
    ).fetchone()
    if row is None:
        return None
    last_seen, expires_at = datetime.fromisoformat(row[4]), datetime.fromisoformat(row[5])
    if now >= expires_at or now - last_seen >= idle:
        end(conn, keyset, token)
        return None
    if now - last_seen >= TOUCH_EVERY:
        with transaction(conn):
            conn.execute(
                "UPDATE console_sessions SET last_seen = ? WHERE token_hash = ?",
                (now.isoformat(), token_hash),
            )
    principal = Principal(int(row[0]), row[1], row[2], row[3])
    return Session(principal, csrf_token(keyset, token), expires_at)


def end(conn: sqlite3.Connection, keyset: Keyset, token: str) -> None:
    """End a session (sign-out); ending an unknown one is not an error."""
    with transaction(conn):
        conn.execute("DELETE FROM console_sessions WHERE token_hash = ?", (_hash(keyset, token),))
