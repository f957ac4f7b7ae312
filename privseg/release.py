"""Releases: the only way numbers leave privseg.

A request is planned against the segment's category policy (recipient, dimensions, epsilon), charged
to the ledger in a write transaction that commits *before* any noise is drawn, then computed: exact
counts in one Polars pass over the membership snapshot, and OpenDP's discrete Laplace measurement
applied to the whole count vector. Identical requests on the same snapshot and policy return the
stored release and spend nothing (no averaging attacks).

Sensitivity (privacy unit: one person). Breakdown keys are the public domains of the dimensions (plus
"unknown"), never taken from the data, and every dimension is single-valued, so a person is in
exactly one cell of a segment's breakdown. Adding or removing one person therefore changes each
segment's count vector by at most 1 in L1, and a report over k segments by at most k: the
measurement is built for d_in = k. A partner audience releases the segment's counts and the cell
populations (two vectors), so d_in = 2. Suppressing cells below the minimum cohort size is done on
the noisy counts, which is post-processing and costs nothing further.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from privseg import audit, ledger, metrics
from privseg.db import transaction
from privseg.deployment import Deployment
from privseg.errors import BudgetExhausted, Conflict, NotFound, NotPermitted, PolicyViolation
from privseg.release_data import exact, exact_spend
from privseg.release_plan import (
    ALPHA,
    CohortReportRequest,
    LiftRequest,
    MovementRequest,
    PartnerAudienceRequest,
    ReleasePlan,
    plan_cohort_report,
    plan_lift,
    plan_movement,
    plan_partner_audience,
)

__all__ = [
    "ALPHA",
    "PENDING_TIMEOUT",
    "CohortReportRequest",
    "LiftRequest",
    "MovementRequest",
    "PartnerAudienceRequest",
    "ReleasePlan",
    "cohort_report",
    "dry_run",
    "lift",
    "metadata",
    "movement",
    "partner_audience",
    "partner_grants",
    "plan_cohort_report",
    "plan_lift",
    "plan_movement",
    "plan_partner_audience",
    "release",
    "release_text",
]

PENDING_TIMEOUT = timedelta(minutes=10)  # a pending release older than this died mid-computation


def _refuse(dep: Deployment, kind: str, recipient: str, exc: Exception) -> None:
    with transaction(dep.store.conn):
        code = getattr(exc, "code", "error")
        audit.append(
            dep.store.conn, dep.keyset, "refusal", {"kind": kind, "recipient": recipient, "code": code}
        )


def _cache_key(plan: ReleasePlan) -> str:
    doc = {
        "kind": plan.kind,
        "recipient": plan.recipient,
        "segments": plan.segments,
        "breakdown": plan.breakdown,
        "snapshot": plan.snapshot.id,
        "policy": plan.policy_hash,
        "from_snapshot": plan.from_snapshot.id if plan.from_snapshot else None,
        # Step and Cond are frozen dataclasses of plain values: their repr is deterministic.
        "spend": None if plan.spend is None else [repr(plan.spend[0]), plan.spend[1]],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _result(
    plan: ReleasePlan, noisy: list[int], release_id: int, noisy_spend: list[int] | None = None
) -> dict[str, Any]:
    if plan.kind == "segment_movement":
        return _movement_result(plan, noisy, release_id)
    if plan.kind == "ab_lift":
        return _lift_result(plan, noisy, release_id)
    n = len(plan.keys)
    hw = plan.half_width
    floor = plan.policy.min_cohort_size
    segments_out = []
    population = noisy[n:] if plan.kind == "partner_audience" else None
    for i, sid in enumerate(plan.segments if plan.kind == "cohort_report" else plan.segments[:1]):
        cells, suppressed = [], 0
        for j, key in enumerate(plan.keys):
            value = noisy[i * n + j]
            if value < floor:
                suppressed += 1
                continue
            cell: dict[str, Any] = dict(zip(plan.breakdown, key, strict=True))
            cell |= {"count": value, "interval_95": [max(value - hw, 0), value + hw]}
            if noisy_spend is not None:
                total = max(noisy_spend[i * n + j], 0) / 100
                shw = plan.spend_half_width
                cell |= {
                    "spend": total,
                    "spend_interval_95": [max(total - shw, 0.0), total + shw],
                    # Post-processing: a mean of clipped values cannot exceed the clip.
                    "mean_spend": min(total / value, plan.policy.value_clip),
                }
            if population is not None:
                pop = population[j]
                cell["share"] = None if pop < floor else min(max(value / pop, 0.0), 1.0)
            cells.append(cell)
        segments_out.append({"segment": sid, "cells": cells, "suppressed_cells": suppressed})
    return {
        "release_id": release_id,
        **plan.describe(),
        "results": segments_out,
        "note": f"cells with a noisy count below {floor} are suppressed and only counted",
    }


def _movement_result(plan: ReleasePlan, noisy: list[int], release_id: int) -> dict[str, Any]:
    hw, floor = plan.half_width, plan.policy.min_cohort_size
    cells, suppressed = [], 0
    for (a, b), value in zip(plan.keys, noisy, strict=True):
        if value < floor:
            suppressed += 1
            continue
        cells.append({"from": a, "to": b, "count": value, "interval_95": [max(value - hw, 0), value + hw]})
    return {
        "release_id": release_id,
        **plan.describe(),
        "results": [{"segment": " -> ".join(plan.segments), "cells": cells, "suppressed_cells": suppressed}],
        "note": f"transitions with a noisy count below {floor} are suppressed and only counted",
    }


def _lift_result(plan: ReleasePlan, noisy: list[int], release_id: int, draws: int = 4000) -> dict[str, Any]:
    """Rates and lift with a 95% interval that accounts for both the DP noise and sampling.

    The interval is simulated by post-processing only: the noise distribution is sampled from the
    same OpenDP measurement (on a zero vector, touching no data), and sampling error of each rate is
    approximated as normal. Arms whose noisy size is below the minimum cohort size are suppressed.
    """
    import numpy as np

    nt, nc, ct, cc = noisy
    floor, hw = plan.policy.min_cohort_size, plan.half_width
    base = {
        "release_id": release_id,
        **plan.describe(),
        "arms": {"treatment": plan.segments[0], "control": plan.segments[1]},
        "conversion": plan.segments[2],
    }
    if min(nt, nc) < floor:
        return {**base, "suppressed": True, "note": f"an arm's noisy size is below {floor}; nothing is shown"}
    m = plan.measurement()
    noise = np.array([m([0, 0, 0, 0]) for _ in range(draws)], dtype=float)
    est = np.array([nt, nc, ct, cc], dtype=float) - noise  # plausible true counts given the noisy ones
    n_t, n_c = np.maximum(est[:, 0], 1), np.maximum(est[:, 1], 1)
    r_t, r_c = np.clip(est[:, 2] / n_t, 0, 1), np.clip(est[:, 3] / n_c, 0, 1)
    rng = np.random.default_rng()
    r_t = np.clip(r_t + rng.standard_normal(draws) * np.sqrt(r_t * (1 - r_t) / n_t), 0, 1)
    r_c = np.clip(r_c + rng.standard_normal(draws) * np.sqrt(r_c * (1 - r_c) / n_c), 0, 1)
    defined = r_c > 0  # a draw with no control conversions has no lift
    lift = r_t[defined] / r_c[defined] - 1
    rate_t, rate_c = min(max(ct / nt, 0.0), 1.0), min(max(cc / nc, 0.0), 1.0)
    return {
        **base,
        "suppressed": False,
        "treatment": {"size": nt, "converted": max(ct, 0), "rate": rate_t},
        "control": {"size": nc, "converted": max(cc, 0), "rate": rate_c},
        "count_interval_95_half_width": hw,
        "lift": None if rate_c == 0 else rate_t / rate_c - 1,
        "lift_interval_95": (
            [float(np.quantile(lift, 0.025)), float(np.quantile(lift, 0.975))] if lift.size else None
        ),
    }


def release(dep: Deployment, plan: ReleasePlan, *, now: datetime | None = None) -> dict[str, Any]:
    """Charge (or reuse the cache), then compute. The charge commits before noise is drawn."""
    now = now or datetime.now(UTC)
    conn = dep.store.conn
    key = _cache_key(plan)
    eps_micro = ledger.to_micro(plan.epsilon)
    lookup = "SELECT id, status, result, at FROM releases WHERE cache_key = ? ORDER BY id DESC LIMIT 1"
    # A cached release is served with a plain read: no write lock, so cache hits never queue behind
    # charges. (Checked again under the lock below, where it decides.)
    done = conn.execute(lookup, (key,)).fetchone()
    if done is not None and done[1] == "done":
        metrics.CACHE_HITS.labels(plan.kind).inc()
        return {**json.loads(done[2]), "cached": True, "charged_epsilon": 0.0}
    with transaction(conn):
        row = conn.execute(lookup, (key,)).fetchone()
        if row is not None and row[1] == "done":
            metrics.CACHE_HITS.labels(plan.kind).inc()
            return {**json.loads(row[2]), "cached": True, "charged_epsilon": 0.0}
        if row is not None and datetime.fromisoformat(row[3]) > now - PENDING_TIMEOUT:
            raise Conflict("an identical release is being computed; retry in a moment")
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
        release_id = int(cur.lastrowid or 0)
        # A release over data of several categories is charged to each of them (all in this one
        # transaction: if any budget refuses, none is charged).
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
            )
        audit.append(
            conn,
            dep.keyset,
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
                "snapshot": plan.snapshot.id,
                "policy_hash": plan.policy_hash,
            },
        )
    # Committed: from here on the budget is spent whatever happens.
    for member in plan.charged:
        metrics.EPSILON_CHARGED.labels(member.name).inc(plan.epsilon)
    started = time.perf_counter()
    noisy = [int(v) for v in plan.measurement()(exact(dep, plan))]
    noisy_spend = [int(v) for v in plan.spend_measurement()(exact_spend(dep, plan))] if plan.spend else None
    result = _result(plan, noisy, release_id, noisy_spend)
    metrics.RELEASE_SECONDS.labels(plan.kind).observe(time.perf_counter() - started)
    with transaction(conn):
        conn.execute(
            "UPDATE releases SET status = 'done', result = ? WHERE id = ?", (json.dumps(result), release_id)
        )
    return {**result, "cached": False, "charged_epsilon": plan.epsilon}


def dry_run(dep: Deployment, plan: ReleasePlan, *, now: datetime | None = None) -> dict[str, Any]:
    """What the release would cost and how accurate it would be; spends nothing."""
    now = now or datetime.now(UTC)
    cached = dep.store.conn.execute(
        "SELECT 1 FROM releases WHERE cache_key = ? AND status = 'done'", (_cache_key(plan),)
    ).fetchone()
    left = min(ledger.remaining(dep.store.conn, member, plan.recipient, now).micro for member in plan.charged)
    return {
        **plan.describe(),
        "dry_run": True,
        "would_charge_epsilon": 0.0 if cached else plan.epsilon,
        "cached": cached is not None,
        "remaining_epsilon": ledger.from_micro(max(left, 0)),
    }


def _run(dep: Deployment, kind: str, recipient: str, plan_fn: Any, req: Any) -> dict[str, Any]:
    try:
        plan = plan_fn(dep, req)
        return dry_run(dep, plan) if req.dry_run else release(dep, plan)
    except (PolicyViolation, NotPermitted, BudgetExhausted) as exc:
        _refuse(dep, kind, recipient, exc)
        raise


def movement(dep: Deployment, req: MovementRequest) -> dict[str, Any]:
    return _run(dep, "segment_movement", req.recipient, plan_movement, req)


def lift(dep: Deployment, req: LiftRequest) -> dict[str, Any]:
    return _run(dep, "ab_lift", req.recipient, plan_lift, req)


def cohort_report(dep: Deployment, req: CohortReportRequest) -> dict[str, Any]:
    return _run(dep, "cohort_report", req.recipient, plan_cohort_report, req)


def partner_audience(dep: Deployment, req: PartnerAudienceRequest) -> dict[str, Any]:
    return _run(dep, "partner_audience", req.partner, plan_partner_audience, req)


def metadata(conn: sqlite3.Connection, release_id: int) -> dict[str, Any]:
    """What was released to whom, at what cost and under which policy; never the released values."""
    row = conn.execute(
        "SELECT id, at, kind, recipient, category, status, request, snapshot_id, policy_hash, epsilon_micro "
        "FROM releases WHERE id = ?",
        (release_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no release {release_id}")
    keys = ("id", "at", "kind", "recipient", "category", "status", "request", "snapshot", "policy_hash")
    out: dict[str, Any] = dict(zip(keys, row[:-1], strict=True))
    out["request"] = json.loads(out["request"])
    out["epsilon"] = ledger.from_micro(int(row[-1]))
    return out


def partner_grants(dep: Deployment, partner: str) -> list[dict[str, Any]]:
    """The active segments a partner may receive audiences for, under their effective categories."""
    out = []
    compiler = dep.compiler()
    for sid in sorted(compiler.defs):
        policy = dep.categories.effective(compiler.effective(sid).categories)
        if policy.partner_audiences and partner in policy.recipients.partners:
            out.append({"segment": sid, "category": policy.name, "dimensions": policy.allowed_dimensions()})
    return out


def release_text(r: dict[str, Any]) -> str:
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
    lines = [
        head
        + (" [cached: charged nothing]" if r["cached"] else f" [charged epsilon {r['charged_epsilon']:g}]")
    ]
    if r["kind"] == "ab_lift":
        if r["suppressed"]:
            return "\n".join([*lines, "  " + r["note"]])
        for arm in ("treatment", "control"):
            a = r[arm]
            lines.append(
                f"  {arm:<9} {r['arms'][arm]:<28} size {a['size']:>8}  "
                f"converted {a['converted']:>7}  rate {a['rate']:.2%}"
            )
        lift = "n/a" if r["lift"] is None else f"{r['lift']:+.1%}"
        if r["lift_interval_95"] is None:
            lines.append(f"  lift {lift} (no interval: the control arm shows no conversions)")
        else:
            lo, hi = r["lift_interval_95"]
            lines.append(f"  lift {lift} (95% interval {lo:+.1%} .. {hi:+.1%}, noise and sampling included)")
        return "\n".join(lines)
    for seg in r["results"]:
        lines.append(
            f"  {seg['segment']}: {seg['suppressed_cells']} cell(s) suppressed "
            f"(noisy count < {r['min_cohort_size']})"
        )
        for cell in seg["cells"]:
            key = ", ".join(f"{d}={cell[d]}" for d in r["breakdown"]) or "all"
            share = f", share {cell['share']:.1%}" if cell.get("share") is not None else ""
            if "spend" in cell:
                share += f", spend {cell['spend']:,.0f} (mean {cell['mean_spend']:,.2f})"
            lo, hi = cell["interval_95"]
            lines.append(f"    {key:<40} {cell['count']:>9}  [{lo:.0f}, {hi:.0f}]{share}")
    return "\n".join(lines)
