"""The tamper-evident audit log: an append-only table chained by HMAC.

Entry n stores ``mac_n = HMAC(audit_key, mac_{n-1} || canonical_json(entry_n))`` with ``mac_0`` a
fixed genesis value, so editing, deleting or reordering any past entry breaks every later MAC, and
nobody without the audit key can forge a consistent chain. Entries never hold raw identifiers or
released values: callers pass only counts, ids of privseg's own objects and parameters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from privseg.keyset import Keyset

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    event: str
    details: dict[str, Any]
    mac: str


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None


def _canonical(seq: int, at: str, event: str, details_json: str) -> bytes:
    return json.dumps(
        {"seq": seq, "at": at, "event": event, "details": json.loads(details_json)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def _mac(keyset: Keyset, prev_mac: str, payload: bytes) -> str:
    return hmac.new(
        keyset.audit_key.reveal(), prev_mac.encode() + b"\n" + payload, hashlib.sha256
    ).hexdigest()


def append(conn: sqlite3.Connection, keyset: Keyset, event: str, details: dict[str, Any]) -> AuditEntry:
    """Append one entry. Call inside :func:`privseg.db.transaction` so it commits with the change it
    records (and so that concurrent appenders serialize on the write lock)."""
    if not conn.in_transaction:
        raise RuntimeError("audit.append must run inside a write transaction")
    row = conn.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (1, GENESIS) if row is None else (int(row[0]) + 1, str(row[1]))
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    details_json = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    mac = _mac(keyset, prev, _canonical(seq, at, event, details_json))
    conn.execute(
        "INSERT INTO audit (seq, at, event, details, mac) VALUES (?, ?, ?, ?, ?)",
        (seq, at, event, details_json, mac),
    )
    return AuditEntry(seq, at, event, details, mac)


def verify(conn: sqlite3.Connection, keyset: Keyset) -> VerifyResult:
    """Walk the chain from the start; name the first entry that does not verify."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for seq, at, event, details_json, mac in conn.execute(
        "SELECT seq, at, event, details, mac FROM audit ORDER BY seq"
    ):
        count += 1
        if seq != expected_seq:
            return VerifyResult(False, count, expected_seq, f"entry {expected_seq} is missing")
        try:
            payload = _canonical(seq, at, event, details_json)
        except json.JSONDecodeError:
            return VerifyResult(False, count, seq, f"entry {seq} has unreadable details")
        if not hmac.compare_digest(_mac(keyset, prev, payload), mac):
            return VerifyResult(False, count, seq, f"entry {seq} was altered, removed or reordered")
        prev = mac
        expected_seq += 1
    return VerifyResult(True, count)


def entries(conn: sqlite3.Connection, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
    rows = conn.execute(
        "SELECT seq, at, event, details, mac FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    ).fetchall()
    return [AuditEntry(int(s), str(a), str(e), json.loads(d), str(m)) for s, a, e, d, m in rows]
