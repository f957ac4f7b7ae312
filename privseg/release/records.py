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


def metadata(conn: sqlite3.Connection, release_id: int) -> ReleaseRecord:
    row = conn.execute(
        "SELECT id, at, kind, recipient, category, status, request, snapshot_id, policy_hash, epsilon_micro "
        "FROM releases WHERE id = ?",
        (release_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no release {release_id}")
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
