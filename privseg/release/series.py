"""Continual releases: a series charged once for its whole horizon, whose noisy blocks are drawn once
each, when they close, and kept.

A kind opts in by planning a ``series`` (its identity without the snapshot: e.g. a trend anchored at a
start date over T periods) and saying which blocks of each vector are closed now. The privacy argument
is the kind's, over the whole horizon (a trend's person lies in at most one block per tree level,
whatever the snapshot): the first release of a series is charged the series' epsilon; later releases
of it charge nothing, reuse every stored block and draw noise only for blocks that closed since.
A block's noise is drawn once and stored before it is returned: concurrent releases of one series keep
the first stored value, so no block is ever released with two different noises.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime

from privseg.db import transaction
from privseg.release.plan import ReleasePlan, Vector


def key(plan: ReleasePlan) -> str:
    """What a series is: the kind's own identity, the recipient, the policy set, the categories it is
    released under and charged to, and every vector's sensitivity and epsilon. A changed policy, or a
    segment redefined so that it reads another category, starts a new series, charged anew."""
    doc = {
        "kind": plan.kind,
        "recipient": plan.recipient,
        "segments": plan.segments,
        "policy": plan.policy_hash,
        "category": plan.policy.name,
        "charged": sorted(p.name for p in plan.charged),
        "series": plan.series,
        "vectors": [[v.name, v.sensitivity, v.epsilon] for v in plan.vectors],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def started(conn: sqlite3.Connection, series_key: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM release_series WHERE series_key = ?", (series_key,)).fetchone()
        is not None
    )


def start(conn: sqlite3.Connection, series_key: str, release_id: int, recipient: str, now: datetime) -> None:
    """Record that the series was charged by ``release_id`` (inside the charging transaction)."""
    conn.execute(
        "INSERT INTO release_series (series_key, first_release, recipient, at) VALUES (?, ?, ?, ?)",
        (series_key, release_id, recipient, now.isoformat()),
    )


def blocks(
    conn: sqlite3.Connection, series_key: str, vector: Vector, exact: Sequence[int], closed: Sequence[int]
) -> list[int]:
    """The vector as released: stored noisy values for closed blocks drawn before, OpenDP noise for
    closed blocks not drawn yet (stored first), 0 for blocks still open (never released)."""
    query = "SELECT block, value FROM series_blocks WHERE series_key = ? AND vector = ?"
    stored = dict(conn.execute(query, (series_key, vector.name)).fetchall())
    new = [i for i in closed if i not in stored]
    if new:
        # Independent noise per coordinate: drawing the new blocks on their own is the same measurement.
        noisy = vector.noise([exact[i] for i in new])
        with transaction(conn):
            conn.executemany(
                "INSERT OR IGNORE INTO series_blocks (series_key, vector, block, value) VALUES (?, ?, ?, ?)",
                [(series_key, vector.name, i, v) for i, v in zip(new, noisy, strict=True)],
            )
            stored = dict(conn.execute(query, (series_key, vector.name)).fetchall())
    out = [0] * len(exact)
    for i in closed:
        out[i] = int(stored[i])
    return out
