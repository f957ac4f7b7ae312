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
import itertools
import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import polars as pl
from opendp.accuracy import discrete_laplacian_scale_to_accuracy
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_laplace
from opendp.metrics import l1_distance
from opendp.mod import enable_features
from pydantic import BaseModel, ConfigDict, Field

from privseg import audit, ledger
from privseg.category_policy import CategoryPolicy
from privseg.db import transaction
from privseg.deployment import Deployment
from privseg.errors import BudgetExhausted, Conflict, InvalidInput, NotFound, NotPermitted, PolicyViolation
from privseg.segments import definitions, engine

# Specific modules, not opendp.prelude: the prelude imports scikit-learn (0.75 s on every CLI call).
enable_features("contrib")

ALPHA = 0.05  # intervals are 95%, two-sided
PENDING_TIMEOUT = timedelta(minutes=10)  # a pending release older than this died mid-computation
UNKNOWN = "unknown"


Measure = Literal["count", "spend"]


class CohortReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segments: list[str] = Field(min_length=1, max_length=20, description="Segment ids, one category.")
    breakdown: list[str] = Field(default_factory=list, description="Profile dimensions, in order.")
    recipient: str = Field(min_length=1, description="The marketer receiving the report.")
    measures: list[Measure] = Field(
        default_factory=lambda: list[Measure](["count"]),
        min_length=1,
        description="count: people per cell; spend: total and mean clipped spend per cell (needs count).",
    )
    spend_event: str = Field("purchase", description="Event type whose value counts as spend.")
    spend_window_days: int = Field(365, ge=1, le=3650, description="Spend is summed over this many days.")
    dry_run: bool = Field(False, description="Plan and price the release without spending anything.")


class PartnerAudienceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segment: str
    breakdown: list[str] = Field(default_factory=lambda: ["region"], min_length=1)
    partner: str = Field(min_length=1)
    dry_run: bool = False


class MovementRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segments: list[str] = Field(
        min_length=2,
        max_length=6,
        description="Ordered states: a person's state is the first listed segment they are in.",
    )
    from_snapshot: int = Field(description="The earlier snapshot id.")
    to_snapshot: int | None = Field(None, description="The later snapshot id (default: the latest).")
    recipient: str = Field(min_length=1)
    dry_run: bool = False


class LiftRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    treatment: str = Field(description="Segment of the treatment arm.")
    control: str = Field(description="Segment of the control arm (e.g. a bucket holdout).")
    conversion: str = Field(description="Segment whose members count as converted.")
    recipient: str = Field(min_length=1)
    dry_run: bool = False


Kind = Literal["cohort_report", "partner_audience", "segment_movement", "ab_lift"]
NONE_STATE = "none"


@dataclass(frozen=True)
class ReleasePlan:
    kind: Kind
    recipient: str
    policy: CategoryPolicy
    segments: list[str]
    breakdown: list[str]
    keys: list[tuple[str, ...]]  # every cell, in release order
    sensitivity: int  # L1 over the whole released vector
    epsilon: float
    snapshot: engine.Snapshot
    policy_hash: str
    from_snapshot: engine.Snapshot | None = None  # segment movement only
    spend: tuple[str, int] | None = None  # cohort report with spend: (event type, window days)

    @property
    def count_epsilon(self) -> float:
        # With spend, the epsilon is split evenly between the count and the spend vectors (basic
        # composition: the two measurements together cost exactly the charged epsilon).
        return self.epsilon / 2 if self.spend else self.epsilon

    @property
    def scale(self) -> float:
        # Discrete Laplace: epsilon = d_in / scale.
        return self.sensitivity / self.count_epsilon

    @property
    def clip_cents(self) -> int:
        return round(self.policy.value_clip * 100)

    @property
    def spend_sensitivity(self) -> int:
        # Each person's spend is clipped to [0, clip] and lands in one cell per segment.
        return len(self.segments) * self.clip_cents

    @property
    def spend_scale(self) -> float:
        return self.spend_sensitivity / (self.epsilon - self.count_epsilon)

    @staticmethod
    def _laplace(scale: float, d_in: int, budget: float) -> Any:
        m = make_laplace(vector_domain(atom_domain(T=int)), l1_distance(T=int), scale=scale)
        cost = m.map(d_in)  # type: ignore[no-untyped-call]
        if cost > budget * (1 + 1e-9):
            raise RuntimeError(f"measurement costs {cost}, more than the planned {budget}")
        return m

    def measurement(self) -> Any:
        return self._laplace(self.scale, self.sensitivity, self.count_epsilon)

    def spend_measurement(self) -> Any:
        return self._laplace(self.spend_scale, self.spend_sensitivity, self.epsilon - self.count_epsilon)

    @property
    def half_width(self) -> float:
        return float(discrete_laplacian_scale_to_accuracy(self.scale, ALPHA))

    @property
    def spend_half_width(self) -> float:
        """In currency units (the noise is drawn in cents)."""
        return float(discrete_laplacian_scale_to_accuracy(self.spend_scale, ALPHA)) / 100

    def describe(self) -> dict[str, Any]:
        return (
            {
                "kind": self.kind,
                "recipient": self.recipient,
                "category": self.policy.name,
                "segments": self.segments,
                "breakdown": self.breakdown,
                "cells_per_segment": len(self.keys),
                "epsilon": self.epsilon,
                "delta": self.policy.delta,
                "noise_scale": self.scale,
                "interval_95_half_width": self.half_width,
                "min_cohort_size": self.policy.min_cohort_size,
                "allowed_dimensions": self.policy.allowed_dimensions(),
                "max_dimensions": self.policy.breakdowns.max_dimensions,
                "snapshot": self.snapshot.id,
                "as_of": self.snapshot.as_of,
                "policy_hash": self.policy_hash,
            }
            | (
                {"from_snapshot": self.from_snapshot.id, "from_as_of": self.from_snapshot.as_of}
                if self.from_snapshot
                else {}
            )
            | (
                {
                    "measures": ["count", "spend"],
                    "spend_event": self.spend[0],
                    "spend_window_days": self.spend[1],
                    "value_clip": self.policy.value_clip,
                    "spend_interval_95_half_width": self.spend_half_width,
                }
                if self.spend
                else {}
            )
        )


def _refuse(dep: Deployment, kind: str, recipient: str, exc: Exception) -> None:
    with transaction(dep.store.conn):
        code = getattr(exc, "code", "error")
        audit.append(
            dep.store.conn, dep.keyset, "refusal", {"kind": kind, "recipient": recipient, "code": code}
        )


def _segment_categories(dep: Deployment, snap: engine.Snapshot, segments: list[str]) -> str:
    cats = set()
    for sid in segments:
        if sid not in snap.segments:
            raise NotFound(
                f"segment {sid!r} is not in snapshot {snap.id}; apply it and run `privseg segments compute`"
            )
        versions = {s.version: s for s in definitions.history(dep.store.conn, "segment", sid)}
        cats.add(str(versions[snap.segments[sid]].body["category"]))
    if len(cats) != 1:
        raise PolicyViolation(f"a release covers one category; these segments span {sorted(cats)}")
    return cats.pop()


def _keys(dep: Deployment, policy: CategoryPolicy, breakdown: list[str]) -> list[tuple[str, ...]]:
    if len(set(breakdown)) != len(breakdown):
        raise InvalidInput(f"breakdown names a dimension twice: {breakdown}")
    if len(breakdown) > policy.breakdowns.max_dimensions:
        raise PolicyViolation(
            f"category {policy.name!r} allows at most {policy.breakdowns.max_dimensions} breakdown "
            f"dimension(s); the request has {len(breakdown)}"
        )
    allowed = policy.allowed_dimensions()
    for dim in breakdown:
        if dim in policy.breakdowns.forbidden:
            raise PolicyViolation(f"category {policy.name!r} forbids breaking down by {dim!r}")
        if dim not in allowed:
            raise PolicyViolation(
                f"category {policy.name!r} does not allow breaking down by {dim!r}; allowed: {allowed}"
            )
    domains = []
    for dim in breakdown:
        ft = dep.schema.profile[dim]
        values = list(ft.values or ()) if ft.type == "category" else ["true", "false"]
        domains.append([*values, UNKNOWN])
    return [tuple(k) for k in itertools.product(*domains)]


def plan_cohort_report(dep: Deployment, req: CohortReportRequest) -> ReleasePlan:
    snap = _snapshot(dep)
    if len(set(req.segments)) != len(req.segments):
        raise InvalidInput("a segment is named twice")
    policy = dep.categories.get(_segment_categories(dep, snap, req.segments))
    _marketer(policy, req.recipient)
    keys = _keys(dep, policy, req.breakdown)
    spend = None
    if "spend" in req.measures:
        if "count" not in req.measures:
            raise InvalidInput(
                "spend is released with its counts (the mean needs them): add the count measure"
            )
        if req.spend_event not in dep.schema.event_types:
            raise InvalidInput(f"unknown spend event type {req.spend_event!r}")
        spend = (req.spend_event, req.spend_window_days)
    return ReleasePlan(
        "cohort_report",
        req.recipient,
        policy,
        req.segments,
        req.breakdown,
        keys,
        len(req.segments),
        policy.epsilon_per_release,
        snap,
        dep.categories.content_hash,
        spend=spend,
    )


def plan_partner_audience(dep: Deployment, req: PartnerAudienceRequest) -> ReleasePlan:
    snap = _snapshot(dep)
    policy = dep.categories.get(_segment_categories(dep, snap, [req.segment]))
    if not policy.partner_audiences:
        raise NotPermitted(f"category {policy.name!r} does not allow partner audiences")
    if req.partner not in policy.recipients.partners:
        raise NotPermitted(f"partner {req.partner!r} is not granted audiences for category {policy.name!r}")
    keys = _keys(dep, policy, req.breakdown)
    return ReleasePlan(
        "partner_audience",
        req.partner,
        policy,
        [req.segment],
        req.breakdown,
        keys,
        2,
        policy.epsilon_per_release,
        snap,
        dep.categories.content_hash,
    )


def _snapshot(dep: Deployment, snapshot_id: int | None = None) -> engine.Snapshot:
    if snapshot_id is None:
        snap = engine.latest(dep.store.conn)
        if snap is None or snap.file is None:
            raise NotFound("no membership snapshot yet: run `privseg segments compute`")
        return snap
    found = [s for s in engine.snapshots(dep.store.conn) if s.id == snapshot_id]
    if not found:
        raise NotFound(f"no snapshot {snapshot_id}")
    if found[0].file is None:
        raise NotFound(f"snapshot {snapshot_id} was pruned (only the last {engine.KEEP_SNAPSHOTS} are kept)")
    return found[0]


def _marketer(policy: CategoryPolicy, recipient: str) -> None:
    if recipient not in policy.recipients.marketers:
        raise NotPermitted(f"{recipient!r} may not receive releases for category {policy.name!r}")


def plan_movement(dep: Deployment, req: MovementRequest) -> ReleasePlan:
    """A transition table between two snapshots. Each person has exactly one state per snapshot (the
    first listed segment they are in, or none; absent from a snapshot counts as none), so each person
    is in exactly one (from, to) cell: d_in = 1."""
    later = _snapshot(dep, req.to_snapshot)
    earlier = _snapshot(dep, req.from_snapshot)
    if earlier.id >= later.id:
        raise InvalidInput("from_snapshot must be earlier than to_snapshot")
    if len(set(req.segments)) != len(req.segments):
        raise InvalidInput("a segment is named twice")
    category = _segment_categories(dep, later, req.segments)
    if _segment_categories(dep, earlier, req.segments) != category:
        raise PolicyViolation("the segments changed category between the two snapshots")
    policy = dep.categories.get(category)
    _marketer(policy, req.recipient)
    states = [*req.segments, NONE_STATE]
    keys: list[tuple[str, ...]] = [(a, b) for a in states for b in states]
    return ReleasePlan(
        "segment_movement",
        req.recipient,
        policy,
        req.segments,
        ["from", "to"],
        keys,
        1,
        policy.epsilon_per_release,
        later,
        dep.categories.content_hash,
        from_snapshot=earlier,
    )


def plan_lift(dep: Deployment, req: LiftRequest) -> ReleasePlan:
    """Arm sizes and conversions: [n_treatment, n_control, converted_treatment, converted_control].
    Nothing forces the arms to be disjoint, so one person may add 1 to all four: d_in = 4."""
    names = [req.treatment, req.control, req.conversion]
    if len(set(names)) != 3:
        raise InvalidInput("treatment, control and conversion must be three different segments")
    snap = _snapshot(dep)
    policy = dep.categories.get(_segment_categories(dep, snap, names))
    _marketer(policy, req.recipient)
    keys: list[tuple[str, ...]] = [
        ("treatment", "size"),
        ("control", "size"),
        ("treatment", "converted"),
        ("control", "converted"),
    ]
    return ReleasePlan(
        "ab_lift",
        req.recipient,
        policy,
        names,
        ["arm", "measure"],
        keys,
        4,
        policy.epsilon_per_release,
        snap,
        dep.categories.content_hash,
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
        "spend": plan.spend,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _states(dep: Deployment, snap: engine.Snapshot, segments: list[str], name: str) -> pl.LazyFrame:
    members = pl.scan_parquet(engine.snapshot_path(dep.store, snap)).select("pid", *segments)
    state: pl.Expr = pl.lit(NONE_STATE)
    for sid in reversed(segments):
        state = pl.when(pl.col(sid)).then(pl.lit(sid)).otherwise(state)
    return members.select("pid", state.alias(name))


def _exact(dep: Deployment, plan: ReleasePlan) -> list[int]:
    """The exact counts, in the order of the released vector."""
    if plan.kind == "segment_movement":
        assert plan.from_snapshot is not None
        before = _states(dep, plan.from_snapshot, plan.segments, "from")
        after = _states(dep, plan.snapshot, plan.segments, "to")
        moved = (
            before.join(after, on="pid", how="full", coalesce=True)
            .with_columns(pl.col("from").fill_null(NONE_STATE), pl.col("to").fill_null(NONE_STATE))
            .group_by("from", "to")
            .len()
            .collect()
        )
        counts: dict[tuple[str, ...], int] = {(r[0], r[1]): int(r[2]) for r in moved.iter_rows()}
        return [counts.get(k, 0) for k in plan.keys]
    if plan.kind == "ab_lift":
        t, c, conv = (pl.col(s) for s in plan.segments)
        row = (
            pl.scan_parquet(engine.snapshot_path(dep.store, plan.snapshot))
            .select(t.sum(), c.sum(), (t & conv).sum().alias("ct"), (c & conv).sum().alias("cc"))
            .collect()
            .row(0)
        )
        return [int(v) for v in row]
    return _exact_cells(dep, plan)


_DIMS_CACHE: dict[tuple[str, str], pl.DataFrame] = {}
_DIMS_LOCK = threading.Lock()


def _dimensions(dep: Deployment, snap: engine.Snapshot) -> pl.DataFrame:
    """Every breakdown dimension and consent attribute, in the snapshot's row order (cached per
    snapshot: the join on pseudonyms is the slow part of a release, and a snapshot never changes)."""
    # Keyed by file: an erasure rewrites a snapshot under a new name, with different rows.
    key = (str(dep.settings.db_path.resolve()), f"{snap.id}/{snap.file}")
    with _DIMS_LOCK:
        cached = _DIMS_CACHE.get(key)
    if cached is not None:
        return cached
    dims = sorted(
        {d for c in dep.categories.categories.values() for d in c.allowed_dimensions()}
        | {c.consent_attribute for c in dep.categories.categories.values()}
    )
    pids = pl.scan_parquet(engine.snapshot_path(dep.store, snap)).select("pid")
    profiles = dep.store.scan_profiles()
    if profiles is None:
        frame = pids.collect().with_columns([pl.lit(None, dtype=pl.String).alias(d) for d in dims])
    else:
        available = profiles.collect_schema().names()
        cols = [d for d in dims if d in available]
        frame = pids.join(
            profiles.select("pid", *cols), on="pid", how="left", maintain_order="left"
        ).collect()
    frame = frame.drop("pid")
    with _DIMS_LOCK:
        if len(_DIMS_CACHE) >= 4:  # a few snapshots at most: the latest, and those movement reads
            _DIMS_CACHE.pop(next(iter(_DIMS_CACHE)))
        _DIMS_CACHE[key] = frame
    return frame


def _person_spend(dep: Deployment, plan: ReleasePlan) -> pl.Series:
    """Each person's spend in cents, clipped to [0, value_clip], in the snapshot's row order."""
    assert plan.spend is not None
    event, days = plan.spend
    as_of = datetime.fromisoformat(plan.snapshot.as_of)
    pids = pl.scan_parquet(engine.snapshot_path(dep.store, plan.snapshot)).select("pid")
    events = dep.store.scan_events()
    if events is None:
        return pl.zeros(pids.select(pl.len()).collect().item(), dtype=pl.Int64, eager=True)
    window = (pl.col("ts") <= as_of) & (pl.col("ts") >= as_of - timedelta(days=days))
    totals = (
        events.filter((pl.col("event_type") == event) & window)
        .group_by("pid")
        .agg(pl.col("value").fill_null(0).clip(lower_bound=0).sum().alias("spend"))
    )
    spend = pids.join(totals, on="pid", how="left", maintain_order="left").select(
        (pl.col("spend").fill_null(0).clip(0, plan.policy.value_clip) * 100).round().cast(pl.Int64)
    )
    return spend.collect().to_series()


def _exact_spend(dep: Deployment, plan: ReleasePlan) -> list[int]:
    """Clipped spend in cents per cell, segment-major, in the order of the count vector."""
    dims = plan.breakdown
    frame = pl.read_parquet(engine.snapshot_path(dep.store, plan.snapshot), columns=plan.segments)
    frame = frame.with_columns(_person_spend(dep, plan).alias("__spend"))
    if dims:
        frame = pl.concat([frame, _dimensions(dep, plan.snapshot).select(dims)], how="horizontal")
        frame = frame.with_columns([pl.col(d).cast(pl.String).fill_null(UNKNOWN) for d in dims])
    exprs = [pl.col("__spend").filter(pl.col(s)).sum().alias(s) for s in plan.segments]
    if dims:
        keys = pl.DataFrame([list(k) for k in plan.keys], schema=dims, orient="row")
        table = keys.join(
            frame.group_by(dims).agg(exprs), on=dims, how="left", maintain_order="left"
        ).fill_null(0)
    else:
        table = frame.select(exprs)
    return [int(v) for s in plan.segments for v in table.get_column(s).to_list()]


def _exact_cells(dep: Deployment, plan: ReleasePlan) -> list[int]:
    """Exact counts, segment-major then cell order (plus cell populations for partner audiences)."""
    dims = plan.breakdown
    members = pl.read_parquet(engine.snapshot_path(dep.store, plan.snapshot), columns=plan.segments)
    frame = members
    if dims or plan.kind == "partner_audience":
        need = [*dims] + ([plan.policy.consent_attribute] if plan.kind == "partner_audience" else [])
        frame = pl.concat([members, _dimensions(dep, plan.snapshot).select(need)], how="horizontal")
        frame = frame.with_columns([pl.col(d).cast(pl.String).fill_null(UNKNOWN) for d in dims])
    exprs = [pl.col(s).sum().alias(s) for s in plan.segments]
    if plan.kind == "partner_audience":
        exprs.append(pl.col(plan.policy.consent_attribute).fill_null(False).sum().alias("__population"))
    if dims:
        keys = pl.DataFrame([list(k) for k in plan.keys], schema=dims, orient="row")
        agg = frame.group_by(dims).agg(exprs)
        table = keys.join(agg, on=dims, how="left", maintain_order="left").fill_null(0)
    else:
        table = frame.select(exprs)
    out: list[int] = []
    for name in [*plan.segments, *(["__population"] if plan.kind == "partner_audience" else [])]:
        out += [int(v) for v in table.get_column(name).to_list()]
    return out


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
    with transaction(conn):
        row = conn.execute(
            "SELECT id, status, result, at FROM releases WHERE cache_key = ? ORDER BY id DESC LIMIT 1", (key,)
        ).fetchone()
        if row is not None and row[1] == "done":
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
        ledger.charge(
            conn,
            policy=plan.policy,
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
                "snapshot": plan.snapshot.id,
                "policy_hash": plan.policy_hash,
            },
        )
    # Committed: from here on the budget is spent whatever happens.
    noisy = [int(v) for v in plan.measurement()(_exact(dep, plan))]
    noisy_spend = [int(v) for v in plan.spend_measurement()(_exact_spend(dep, plan))] if plan.spend else None
    result = _result(plan, noisy, release_id, noisy_spend)
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
    left = ledger.remaining(dep.store.conn, plan.policy, plan.recipient, now)
    return {
        **plan.describe(),
        "dry_run": True,
        "would_charge_epsilon": 0.0 if cached else plan.epsilon,
        "cached": cached is not None,
        "remaining_epsilon": ledger.from_micro(max(left.micro, 0)),
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
