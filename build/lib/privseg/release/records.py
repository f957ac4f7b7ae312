"""What compliance and partners may see about releases without seeing released values."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from pydantic import BaseModel, Field

from privseg import ledger
from privseg.errors import NotFound
from privseg.policy.categories import CategorySet
from privseg.segments.compiler import Compiler


class ReleaseRecord(BaseModel):
    """What was released to whom, at what cost and under which policy; never the released values."""

    id: int
    at: str
    kind: str
    recipient: str
    category: str
    status: str = Field(description="pending while computing (the budget is already charged), then done.")
    request: dict[str, Any]
    snapshot: int
    policy_hash: str
    epsilon: float


class Grant(BaseModel):
    segment: str
    category: str = Field(description="The segment's effective category (the strictest it reads).")
    dimensions: list[str] = Field(description="Dimensions an audience of it may be broken down by.")


_RECORD = "id, at, kind, recipient, category, status, request, snapshot_id, policy_hash, epsilon_micro"


def metadata(conn: sqlite3.Connection, release_id: int) -> ReleaseRecord:
    row = conn.execute(f"SELECT {_RECORD} FROM releases WHERE id = ?", (release_id,)).fetchone()
    if row is None:
        raise NotFound(f"no release {release_id}")
    return _record(row)


def listing(
    conn: sqlite3.Connection, *, recipient: str | None = None, before: int | None = None, limit: int = 100
) -> list[ReleaseRecord]:
    """Release records, newest first: every recipient's (compliance) or one recipient's own."""
    query = f"SELECT {_RECORD} FROM releases WHERE id < ?"
    args: list[object] = [before if before is not None else 2**62]
    if recipient is not None:
        query += " AND recipient = ?"
        args.append(recipient)
    rows = conn.execute(query + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
    return [_record(r) for r in rows]


def released(conn: sqlite3.Connection, release_id: int, recipient: str) -> dict[str, Any]:
    """The released document of one of ``recipient``'s own releases, as it was stored when released
    (already noisy): a recipient may read again what it received, nobody else may. Another
    recipient's release is "not found", like one that does not exist."""
    row = conn.execute(
        "SELECT result FROM releases WHERE id = ? AND recipient = ? AND status = 'done'",
        (release_id, recipient),
    ).fetchone()
    if row is None:
        raise NotFound(f"no release {release_id} of yours")
    result: dict[str, Any] = json.loads(row[0])
    return result


def _record(row: Any) -> ReleaseRecord:
    return ReleaseRecord(
        id=row[0],
        at=row[1],
        kind=row[2],
        recipient=row[3],
        category=row[4],
        status=row[5],
        request=json.loads(row[6]),
        snapshot=row[7],
        policy_hash=row[8],
        epsilon=ledger.from_micro(int(row[9])),
    )


def partner_grants(compiler: Compiler, categories: CategorySet, partner: str) -> list[Grant]:
    """The active segments a partner may receive audiences for, under their effective categories."""
    out = []
    for sid in sorted(compiler.defs):
        policy = categories.effective(compiler.effective(sid).categories)
        if policy.partner_audiences and partner in policy.recipients.partners:
            out.append(Grant(segment=sid, category=policy.name, dimensions=policy.allowed_dimensions()))
    return out
