"""The tamper-evident audit log: an append-only table chained by HMAC.

Entry n stores ``mac_n = HMAC(audit_key, mac_{n-1} || canonical_json(entry_n))`` with ``mac_0`` a
fixed genesis value, so editing, deleting or reordering any past entry breaks every later MAC, and
nobody without the audit key can forge a consistent chain. Entries never hold raw identifiers or
released values: callers pass only counts, ids of privseg's own objects and parameters.

Cutting the newest entries leaves a valid (shorter) chain: only a head kept *outside* the server
shows it, as Certificate Transparency's signed tree heads do. :func:`anchor` signs one (entry count,
last MAC, time); compliance keeps it, and :func:`verify` checks the log still extends it. Every
release's ledger charges are in its audit entry, so :func:`verify` also finds a ledger row that was
deleted (or added) behind the log's back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privseg.errors import InvalidInput, loggable
from privseg.keyset import Keyset

log = logging.getLogger(__name__)
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


def _anchor_signature(keyset: Keyset, head: dict[str, Any]) -> str:
    payload = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(keyset.derived_key("audit-anchor"), payload, hashlib.sha256).hexdigest()


def anchor(conn: sqlite3.Connection, keyset: Keyset) -> dict[str, Any]:
    """A signed head of the log (entry count, last MAC, time, namespace) to keep outside the server."""
    row = conn.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    head: dict[str, Any] = {
        "entries": 0 if row is None else int(row[0]),
        "last_mac": GENESIS if row is None else str(row[1]),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "namespace": keyset.namespace,
    }
    return {**head, "signature": _anchor_signature(keyset, head)}


def check_anchor(conn: sqlite3.Connection, keyset: Keyset, head: Any) -> str | None:
    """Why the log does not extend ``head`` (None: it does). Run after the chain itself verified."""
    fields = ("entries", "last_mac", "at", "namespace")
    if not isinstance(head, dict) or set(head) != {*fields, "signature"}:
        return (
            "the anchor is not a privseg audit anchor (expected entries, last_mac, at, namespace, signature)"
        )
    expected = _anchor_signature(keyset, {k: head[k] for k in fields})
    if not isinstance(head["signature"], str) or not hmac.compare_digest(expected, head["signature"]):
        return "the anchor's signature does not verify: it was edited, or made with another audit key"
    count = head["entries"]
    row = conn.execute("SELECT mac FROM audit WHERE seq = ?", (count,)).fetchone() if count else None
    total = int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
    if count and (row is None or row[0] != head["last_mac"]):
        return (
            f"the log does not extend the anchor of {head['at']}: it recorded {count} entries, the log "
            f"now has {total}{' (entries were cut)' if total < count else ' (the chain was rewritten)'}"
        )
    return None


def check_ledger(conn: sqlite3.Connection) -> str | None:
    """Why the ledger and the audited charges disagree (None: they agree)."""
    audited: dict[tuple[int, str], int] = {}
    for (details_json,) in conn.execute("SELECT details FROM audit WHERE event = 'release' ORDER BY seq"):
        d = json.loads(details_json)
        charges = d.get("charges") or {d["category"]: round(d["epsilon"] * 1_000_000)}
        for category, micro in charges.items():
            audited[(int(d["release"]), category)] = int(micro)
    ledger = {
        (int(r), str(c)): int(m)
        for r, c, m in conn.execute(
            "SELECT release_id, category, SUM(epsilon_micro) FROM ledger GROUP BY release_id, category"
        )
    }
    for key in sorted(audited.keys() - ledger.keys()):
        return f"release {key[0]}'s charge to {key[1]!r} is audited but missing from the ledger (deleted?)"
    for key in sorted(ledger.keys() - audited.keys()):
        return (
            f"the ledger holds a charge to {key[1]!r} for release {key[0]} that the audit log does not record"
        )
    for key in sorted(audited):
        if audited[key] != ledger[key]:
            return f"release {key[0]}'s charge to {key[1]!r} differs between the ledger and the audit log"
    return None


def check_day_totals(conn: sqlite3.Connection) -> str | None:
    """Why the ledger's day totals (what budget sums read, privseg/ledger.py) disagree with its charges
    (None: they agree)."""
    day = "substr(at, 1, 10)"
    charged = {
        (str(c), str(r), str(d), str(o)): (int(e), int(n))
        for c, r, d, o, e, n in conn.execute(
            f"SELECT category, recipient, {day}, objectives, SUM(epsilon_micro), COUNT(*) FROM ledger "
            f"GROUP BY category, recipient, {day}, objectives"
        )
    }
    kept = {
        (str(c), str(r), str(d), str(o)): (int(e), int(n))
        for c, r, d, o, e, n in conn.execute(
            "SELECT category, recipient, day, objectives, epsilon_micro, charges FROM ledger_days"
        )
    }
    for key in sorted(charged.keys() | kept.keys()):
        if charged.get(key) != kept.get(key):
            return (
                f"the ledger's total for {key[0]!r}, recipient {key[1]!r} on {key[2]} differs from its "
                "charges (budget sums read the totals: edited outside privseg?)"
            )
    return None


def verify_all(conn: sqlite3.Connection, keyset: Keyset, anchors: Sequence[Any] = ()) -> VerifyResult:
    """The chain, then the ledger against the audited charges and its day totals, and each anchor
    kept outside (every problem found is named)."""
    result = verify(conn, keyset)
    if not result.ok:
        return result
    checks = (check_ledger(conn), check_day_totals(conn))
    problems = [p for p in (*checks, *(check_anchor(conn, keyset, h) for h in anchors)) if p]
    return result if not problems else VerifyResult(False, result.entries, None, "; ".join(problems))


def append_anchor(path: Path, head: dict[str, Any]) -> None:
    """Append a signed head to an anchor file (one JSON object a line, mode 0600), durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(head, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class AnchorWriter:
    """Appends a signed head to ``path`` now, every ``interval`` seconds and when stopped (a server's
    periodic anchors); ``head`` builds one (on its own database connection)."""

    def __init__(self, path: Path, interval: float, head: Callable[[], dict[str, Any]]) -> None:
        self.path, self.interval, self.head = path, interval, head
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-anchors", daemon=True)

    def _write(self) -> None:
        try:
            append_anchor(self.path, self.head())
        except Exception as exc:  # a failed anchor must not take the server down; say so loudly
            log.error("could not write an audit anchor to %s: %s", self.path, loggable(exc))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def start(self) -> None:
        self._write()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._write()


def read_anchors(path: Path) -> list[Any]:
    """Every anchor in a file written by :func:`append_anchor` (or one saved from `audit anchor`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such anchor file") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a text file") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise InvalidInput(f"{path}, line {number}: not a JSON anchor") from None
    if not out:
        raise InvalidInput(f"{path}: holds no anchor")
    return out


def entries(conn: sqlite3.Connection, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
    rows = conn.execute(
        "SELECT seq, at, event, details, mac FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    ).fetchall()
    return [AuditEntry(int(s), str(a), str(e), json.loads(d), str(m)) for s, a, e, d, m in rows]


def search(
    conn: sqlite3.Connection,
    *,
    event: str | None = None,
    mentions: str | None = None,
    since: str | None = None,
    until: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Entries newest first, filtered by event kind, by a name their details mention (an actor, a
    recipient, a category: matched as a whole JSON string value) and by time (ISO 8601)."""
    query = "SELECT seq, at, event, details, mac FROM audit WHERE seq < ?"
    args: list[object] = [before or 2**62]
    if event:
        query += " AND event = ?"
        args.append(event)
    if mentions:
        query += " AND instr(details, ?) > 0"
        args.append(json.dumps(mentions))
    if since:
        query += " AND at >= ?"
        args.append(since)
    if until:
        query += " AND at < ?"
        args.append(until)
    rows = conn.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit]).fetchall()
    return [AuditEntry(int(s), str(a), str(e), json.loads(d), str(m)) for s, a, e, d, m in rows]


def event_kinds(conn: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT DISTINCT event FROM audit ORDER BY event")]
