"""The release engine: the only way numbers leave privseg, for every release kind alike.

A request is planned by its kind (policy checks, cells, the sensitivity of each vector), charged to
the ledger in a write transaction that commits *before* any noise is drawn, then computed: the kind's
exact vectors, each put through its OpenDP measurement, then the kind's post-processing. A kind may
start exact work while the charge commits (its ``ahead``: exact values, in memory only). Identical
requests on the same snapshot and policy return the stored release and spend nothing (no averaging
attacks). A refused request is audited as a refusal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson

from privseg import audit, ledger, metrics
from privseg.db import transaction
from privseg.errors import BudgetExhausted, Conflict, NotPermitted, PolicyViolation
from privseg.policy.categories import OBJECTIVES, Objective
from privseg.release import kinds as _kinds  # noqa: F401  (registers every kind)
from privseg.release import series
from privseg.release.context import ReleaseContext
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import KINDS, NoiseFn, ReleaseRequest, for_request
from privseg.segments import definitions, engine

PENDING_TIMEOUT = timedelta(minutes=10)  # a pending release older than this died mid-computation
# Runs kinds' `ahead` work beside the charges of this process's releases (two cores: two at once).
_AHEAD = ThreadPoolExecutor(2, thread_name_prefix="privseg-ahead")
log = logging.getLogger(__name__)
T = TypeVar("T")
# By either of a release's keys (see _keys).
_LOOKUP = "SELECT id, status, result, at FROM releases WHERE cache_key IN (?, ?) ORDER BY id DESC LIMIT 1"


def plan(ctx: ReleaseContext, req: ReleaseRequest, recipient: str) -> ReleasePlan:
    planned: ReleasePlan = for_request(req).plan(ctx, req, recipient)
    return planned


def run(ctx: ReleaseContext, req: ReleaseRequest, recipient: str) -> dict[str, Any]:
    """Plan ``req`` for ``recipient``, then price it (dry run) or release it. Refusals are audited."""
    return _planned(ctx, req, recipient, lambda p: dry_run(ctx, p) if req.dry_run else release(ctx, p))


def run_json(ctx: ReleaseContext, req: ReleaseRequest, recipient: str) -> str:
    """:func:`run`, as the JSON text a client receives. A cached release is sent as stored: decoding
    and re-encoding it were 60% of a cached request's CPU over HTTP (py-spy, benchmarks/server.py)."""

    def answer(planned: ReleasePlan) -> str:
        if req.dry_run:
            return encode(dry_run(ctx, planned))
        # A fresh release is sent as the text just stored, marked: encoding its cells twice was ~9% of
        # a server worker's CPU under fresh reports (py-spy, benchmarks/server.py).
        return _release(ctx, planned)[0]

    return _planned(ctx, req, recipient, answer)


def stored_json(ctx: ReleaseContext, req: ReleaseRequest, recipient: str) -> str | None:
    """:func:`run_json`'s answer if it is a stored release, else None (then call :func:`run_json`).
    Plans and reads one row, spends and writes nothing: cheap enough for the server's event loop,
    which answers a repeated request without a worker thread. A request that would be refused gets
    None, so that its refusal is audited by :func:`run_json`, off the loop."""
    if req.dry_run:
        return None
    try:
        planned = for_request(req).plan(ctx, req, recipient)
    except (PolicyViolation, NotPermitted, BudgetExhausted):
        return None
    return cached_text(ctx, planned)


def cached_text(ctx: ReleaseContext, plan: ReleasePlan) -> str | None:
    """The stored release for ``plan`` as JSON text, marked cached (None: not released yet). The same
    text :func:`encode` gives for :func:`release`'s cached answer: the stored object with ``cached``
    and ``charged_epsilon`` appended (the stored result has neither key)."""
    return _cached_text(ctx.store.conn.execute(_LOOKUP, _keys(plan)).fetchone(), plan)


def _planned(ctx: ReleaseContext, req: ReleaseRequest, recipient: str, then: Callable[[ReleasePlan], T]) -> T:
    kind = for_request(req)
    try:
        return then(kind.plan(ctx, req, recipient))
    except (PolicyViolation, NotPermitted, BudgetExhausted) as exc:
        with transaction(ctx.store.conn):
            audit.append(
                ctx.store.conn,
                ctx.keyset,
                "refusal",
                {"kind": kind.name, "recipient": recipient, "code": getattr(exc, "code", "error")},
            )
        raise


def cache_key(plan: ReleasePlan) -> str:
    """What makes two requests the same release. A kind whose segments are a set keys them sorted."""
    return _key(plan, _keyed_segments(plan))


def _keyed_segments(plan: ReleasePlan) -> list[str]:
    kind = KINDS.get(plan.kind)
    return sorted(plan.segments) if kind is not None and kind.unordered else plan.segments


def _keys(plan: ReleasePlan) -> tuple[str, str]:
    """The release's key, and the key a release stored before segment sets were keyed sorted has (the
    segments as listed): the same request made before and after that change is still one release.
    Segments listed as keyed key the same both ways, computed once (each key is a JSON encoding and a
    SHA-256: a fifth of a cached report's planning and lookup, measured in-process)."""
    keyed = _keyed_segments(plan)
    key = _key(plan, keyed)
    return key, key if keyed == plan.segments else _key(plan, plan.segments)


def _key(plan: ReleasePlan, segments: list[str]) -> str:
    doc = {
        "kind": plan.kind,
        "recipient": plan.recipient,
        "segments": segments,
        "breakdown": plan.breakdown,
        "snapshot": plan.snapshot.id,
        "policy": plan.policy_hash,
        **plan.identity(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _cached_text(row: Any, plan: ReleasePlan) -> str | None:
    """A looked-up release row's stored result, marked cached (None: no finished release)."""
    if row is None or row[1] != "done":
        return None
    metrics.CACHE_HITS.labels(plan.kind).inc()
    return _marked(row[2], cached=True, charged=0.0)


def _marked(stored: str, *, cached: bool, charged: float) -> str:
    """A stored result (a JSON object) with ``cached`` and ``charged_epsilon`` appended: the text
    :func:`encode` gives for the result's dict with those two keys added last (for a result stored
    before releases were encoded by orjson, the same JSON value: those have spaces after separators)."""
    return f'{stored[:-1]},"cached":{encode(cached)},"charged_epsilon":{encode(charged)}}}'


def encode(value: Any) -> str:
    """A release as JSON text, by orjson: 0.05 ms for a 10-segment cohort report of 880 cells where
    ``json.dumps`` took 0.9 ms, a tenth of a fresh report's CPU. Whatever ``json.dumps`` encodes is
    encoded (the release is charged before it is encoded, so this must not fail where that did not):
    a float subclass (numpy's float64) as its float, and anything else orjson refuses (an integer past
    64 bits) by ``json.dumps``. Not a number is null where ``json.dumps`` wrote NaN, which is not JSON."""
    try:
        return orjson.dumps(value, default=_as_float).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


def _as_float(value: Any) -> float:
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def objectives(ctx: ReleaseContext, plan: ReleasePlan) -> tuple[Objective, ...]:
    """The objectives of a release's segments (brand, performance): what a category that splits its
    budget charges it to. Read from the active definitions, under the caller's write lock."""
    found = set(definitions.objectives(ctx.store.conn, plan.segments).values())
    return tuple(o for o in OBJECTIVES if o in found)


def _pending(conn: Any, plan: ReleasePlan, key: str, now: datetime, eps_micro: int) -> int:
    """Record a release as pending (computing), costing ``eps_micro``; returns its id."""
    cur = conn.execute(
        "INSERT INTO releases (at, kind, recipient, category, cache_key, status, request, snapshot_id, "
        "policy_hash, epsilon_micro) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
        (
            now.isoformat(),
            plan.kind,
            plan.recipient,
            plan.policy.name,
            key,
            json.dumps({"segments": plan.segments, "breakdown": plan.breakdown}),
            plan.snapshot.id,
            plan.policy_hash,
            eps_micro,
        ),
    )
    return int(cur.lastrowid or 0)


def _charge(ctx: ReleaseContext, plan: ReleasePlan, key: str, now: datetime) -> int:
    """Record the release as pending, charge every category it reads and audit it, in one transaction
    that the caller has opened: if any budget refuses, nothing is charged."""
    conn = ctx.store.conn
    eps_micro = ledger.to_micro(plan.epsilon)
    release_id = _pending(conn, plan, key, now, eps_micro)
    charged_to = objectives(ctx, plan)
    for member in plan.charged:
        ledger.charge(
            conn,
            policy=member,
            recipient=plan.recipient,
            epsilon_micro=eps_micro,
            delta=plan.policy.delta,
            release_id=release_id,
            policy_hash=plan.policy_hash,
            now=now,
            objectives=charged_to,
        )
    audit.append(
        conn,
        ctx.keyset,
        "release",
        {
            "release": release_id,
            "kind": plan.kind,
            "recipient": plan.recipient,
            "category": plan.policy.name,
            "segments": plan.segments,
            "breakdown": plan.breakdown,
            "epsilon": plan.epsilon,
            # What the ledger was charged, per category: `audit verify` cross-checks the two.
            "charges": {member.name: eps_micro for member in plan.charged},
            "objectives": list(charged_to),
            "snapshot": plan.snapshot.id,
            "policy_hash": plan.policy_hash,
        },
    )
    return release_id


def release(ctx: ReleaseContext, plan: ReleasePlan, *, now: datetime | None = None) -> dict[str, Any]:
    """Charge (or reuse the cache), then compute. The charge commits before noise is drawn."""
    text, fresh = _release(ctx, plan, now=now)
    # A cached answer is parsed from the very text the HTTP path sends, so the two cannot drift apart.
    return fresh if fresh is not None else dict(json.loads(text))


def _release(
    ctx: ReleaseContext, plan: ReleasePlan, *, now: datetime | None = None
) -> tuple[str, dict[str, Any] | None]:
    """:func:`release`'s answer as JSON text, and for a fresh release also as the object it encodes
    (None when cached: the stored text is sent without being decoded)."""
    now = now or datetime.now(UTC)
    kind = KINDS[plan.kind]
    conn = ctx.store.conn
    keys = _keys(plan)
    key = keys[0]
    # A cached release is served with a plain read: no write lock, so cache hits never queue behind
    # charges. (Checked again under the lock below, where it decides.)
    if (hit := _cached_text(conn.execute(_LOOKUP, keys).fetchone(), plan)) is not None:
        return hit, None
    for vector in plan.vectors:
        vector.prepare()
    # Exact work only (nothing drawn, nothing returned): it overlaps the charge's commit and fsync.
    ahead = _AHEAD.submit(kind.ahead, ctx, plan) if kind.ahead is not None else None
    try:
        with transaction(conn):
            row = conn.execute(_LOOKUP, keys).fetchone()
            if (hit := _cached_text(row, plan)) is not None:
                return hit, None
            if row is not None and datetime.fromisoformat(row[3]) > now - PENDING_TIMEOUT:
                raise Conflict("an identical release is being computed; retry in a moment")
            plan = _rewritten(conn, plan)  # under the lock: an erasure's rename is committed or not yet
            series_key = series.key(plan) if plan.series is not None else None
            if series_key is not None and series.started(conn, series_key):
                release_id, charged = _continue(ctx, plan, key, series_key, now), 0.0
            else:
                release_id, charged = _charge(ctx, plan, key, now), plan.epsilon
                if series_key is not None:
                    series.start(conn, series_key, release_id, plan.recipient, now)
    finally:
        if ahead is not None:
            _settle(ahead)
    # Committed: from here on the budget is spent whatever happens.
    for member in plan.charged if charged else ():
        metrics.EPSILON_CHARGED.labels(member.name).inc(plan.epsilon)
    started = time.perf_counter()
    if kind.adaptive is not None:
        noisy = kind.adaptive(ctx, plan, _draw_once(plan))
    else:
        exact, plan = _exact(ctx, plan)
        noisy = {v.name: _noised(ctx, plan, v, exact[v.name], series_key) for v in plan.vectors}
    result = {"release_id": release_id, **plan.describe(), **kind.result(plan, noisy)}
    metrics.RELEASE_SECONDS.labels(plan.kind).observe(time.perf_counter() - started)
    stored = encode(result)
    with transaction(conn):
        conn.execute("UPDATE releases SET status = 'done', result = ? WHERE id = ?", (stored, release_id))
    answer = {**result, "cached": False, "charged_epsilon": charged}
    return _marked(stored, cached=False, charged=charged), answer


def _rewritten(conn: sqlite3.Connection, plan: ReleasePlan) -> ReleasePlan:
    """``plan`` on its snapshot's current file. An erasure or a key rotation rewrites a kept snapshot
    under a new name and deletes the old file; the snapshot (its id, as_of, segments) is the same, so
    the release is computed on what is there now (after an erasure: without the erased people)."""
    current = engine.get(conn, plan.snapshot.id)
    if current is None or current.file is None or current.file == plan.snapshot.file:
        return plan
    return dataclasses.replace(plan, snapshot=current)


def _exact(ctx: ReleaseContext, plan: ReleasePlan) -> tuple[dict[str, list[int]], ReleasePlan]:
    """The kind's exact vectors, and the plan they were computed for: if the snapshot file was
    rewritten after the charge (its old file is gone), again on the new file. Nothing is drawn yet,
    so computing twice reveals nothing more."""
    for attempt in range(4):
        try:
            return KINDS[plan.kind].exact(ctx, plan), plan
        except FileNotFoundError:
            moved = _rewritten(ctx.store.conn, plan)
            if moved is plan or attempt == 3:
                raise
            plan = moved
    raise AssertionError("unreachable: the last attempt returns or raises")


def _settle(ahead: Future[None]) -> None:
    """Wait for the work started ahead of the charge, unless it has not started (then ``exact`` does
    it). Its failure is not the release's: ``exact`` computes whatever it left undone, and raises
    its own errors."""
    if ahead.cancel():
        return
    try:
        ahead.result()
    except Exception as exc:  # the type only: exact data is never logged
        log.warning("work ahead of a release failed (%s); done after the charge instead", type(exc).__name__)


def _draw_once(plan: ReleasePlan) -> NoiseFn:
    """Noise for an adaptive kind: each planned vector through its OpenDP measurement, once only (a
    second draw of a vector would spend more than was charged)."""
    drawn: set[str] = set()

    def noise(name: str, exact: list[int]) -> list[int]:
        if name in drawn:
            raise RuntimeError(f"vector {name!r} was already noised: a second draw is not paid for")
        drawn.add(name)
        return plan.vector(name).noise(exact)

    return noise


def _noised(
    ctx: ReleaseContext, plan: ReleasePlan, vector: Vector, exact: list[int], series_key: str | None
) -> list[int]:
    """OpenDP's noise on a vector; for a series, each closed block's noise drawn once and kept."""
    if series_key is None:
        return vector.noise(exact)
    closed = plan.closed(vector.name)
    return series.blocks(
        ctx.store.conn, series_key, vector, exact, range(len(exact)) if closed is None else closed
    )


def _continue(ctx: ReleaseContext, plan: ReleasePlan, key: str, series_key: str, now: datetime) -> int:
    """A later release of a series already charged: recorded and audited, charged nothing."""
    conn = ctx.store.conn
    release_id = _pending(conn, plan, key, now, 0)
    first = conn.execute(
        "SELECT first_release FROM release_series WHERE series_key = ?", (series_key,)
    ).fetchone()
    audit.append(
        conn,
        ctx.keyset,
        "release_continued",
        {
            "release": release_id,
            "kind": plan.kind,
            "recipient": plan.recipient,
            "category": plan.policy.name,
            "segments": plan.segments,
            "series_charged_by": int(first[0]),
            "snapshot": plan.snapshot.id,
            "policy_hash": plan.policy_hash,
        },
    )
    return release_id


def dry_run(ctx: ReleaseContext, plan: ReleasePlan, *, now: datetime | None = None) -> dict[str, Any]:
    """What the release would cost and how accurate it would be; spends nothing."""
    now = now or datetime.now(UTC)
    cached = ctx.store.conn.execute(
        "SELECT 1 FROM releases WHERE cache_key IN (?, ?) AND status = 'done'", _keys(plan)
    ).fetchone()
    # A later release of a series already charged is free, like a cached one.
    free = cached is not None or (
        plan.series is not None and series.started(ctx.store.conn, series.key(plan))
    )
    charged_to = objectives(ctx, plan)
    left = min(
        ledger.remaining(ctx.store.conn, member, plan.recipient, now, charged_to).micro
        for member in plan.charged
    )
    return {
        **plan.describe(),
        "dry_run": True,
        "would_charge_epsilon": 0.0 if free else plan.epsilon,
        "cached": cached is not None,
        "remaining_epsilon": ledger.from_micro(max(left, 0)),
        "objectives": list(charged_to),
    }


def text(r: dict[str, Any]) -> str:
    """A release (or dry run) as text for a terminal."""
    head = (
        f"{r['kind']} for {r['recipient']} ({r['category']}), snapshot {r['snapshot']}, "
        f"epsilon {r['epsilon']:g}, 95% interval +/-{r['interval_95_half_width']:.0f}"
    )
    if r.get("dry_run"):
        return (
            f"DRY RUN {head}\n  would charge epsilon {r['would_charge_epsilon']:g} "
            f"(remaining {r['remaining_epsilon']:g}); {r['cells_per_segment']} cell(s) per segment; "
            f"allowed dimensions {r['allowed_dimensions']}"
        )
    spent = " [cached: charged nothing]" if r["cached"] else f" [charged epsilon {r['charged_epsilon']:g}]"
    return "\n".join([head + spent, *KINDS[r["kind"]].text(r)])
