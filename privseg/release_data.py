"""Exact aggregates for releases, in one Polars pass over the membership snapshot.

Nothing here leaves the server: release.py adds OpenDP noise to these vectors before anything is
returned.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl

from privseg.deployment import Deployment
from privseg.release_plan import NONE_STATE, UNKNOWN, ReleasePlan
from privseg.segments import engine, operators


def states(dep: Deployment, snap: engine.Snapshot, segments: list[str], name: str) -> pl.LazyFrame:
    members = pl.scan_parquet(engine.snapshot_path(dep.store, snap)).select("pid", *segments)
    state: pl.Expr = pl.lit(NONE_STATE)
    for sid in reversed(segments):
        state = pl.when(pl.col(sid)).then(pl.lit(sid)).otherwise(state)
    return members.select("pid", state.alias(name))


def exact(dep: Deployment, plan: ReleasePlan) -> list[int]:
    """The exact counts, in the order of the released vector."""
    if plan.kind == "segment_movement":
        assert plan.from_snapshot is not None
        before = states(dep, plan.from_snapshot, plan.segments, "from")
        after = states(dep, plan.snapshot, plan.segments, "to")
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
    return exact_cells(dep, plan)


_DIMS_CACHE: dict[tuple[str, str], pl.DataFrame] = {}
_DIMS_LOCK = threading.Lock()


def dimensions(dep: Deployment, snap: engine.Snapshot) -> pl.DataFrame:
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
        frame = (
            pids.join(profiles.select("pid", *cols), on="pid", how="left", maintain_order="left")
            # A dimension no batch has carried yet (patch batches carry only their columns): unknown.
            .with_columns([pl.lit(None, dtype=pl.String).alias(d) for d in dims if d not in available])
            .collect()
        )
    frame = frame.drop("pid")
    with _DIMS_LOCK:
        if len(_DIMS_CACHE) >= 4:  # a few snapshots at most: the latest, and those movement reads
            _DIMS_CACHE.pop(next(iter(_DIMS_CACHE)))
        _DIMS_CACHE[key] = frame
    return frame


def person_spend(dep: Deployment, plan: ReleasePlan) -> pl.Series:
    """Each person's spend in cents, clipped to [0, value_clip], in the snapshot's row order."""
    assert plan.spend is not None
    step, days = plan.spend
    as_of = datetime.fromisoformat(plan.snapshot.as_of)
    pids = pl.scan_parquet(engine.snapshot_path(dep.store, plan.snapshot)).select("pid")
    events = dep.store.scan_events()
    if events is None:
        return pl.zeros(pids.select(pl.len()).collect().item(), dtype=pl.Int64, eager=True)
    window = (pl.col("ts") <= as_of) & (pl.col("ts") >= as_of - timedelta(days=days))
    totals = (
        events.filter(
            (pl.col("event_type") == step.type)
            & window
            & pl.all_horizontal(
                True, *(operators.build(c.op, pl.col(c.field), c.value) for c in step.filters)
            )
        )
        .group_by("pid")
        .agg(pl.col("value").fill_null(0).clip(lower_bound=0).sum().alias("spend"))
    )
    spend = pids.join(totals, on="pid", how="left", maintain_order="left").select(
        (pl.col("spend").fill_null(0).clip(0, plan.policy.value_clip) * 100).round().cast(pl.Int64)
    )
    return spend.collect().to_series()


def _members(dep: Deployment, plan: ReleasePlan, also: Sequence[str] = ()) -> pl.DataFrame:
    """The plan's segment columns, its breakdown dimensions (unknown filled in) and ``also`` (more
    columns of the per-snapshot dimension frame), row-aligned with the snapshot."""
    dims = plan.breakdown
    frame = pl.read_parquet(engine.snapshot_path(dep.store, plan.snapshot), columns=plan.segments)
    if dims or also:
        frame = pl.concat([frame, dimensions(dep, plan.snapshot).select(*dims, *also)], how="horizontal")
        frame = frame.with_columns([pl.col(d).cast(pl.String).fill_null(UNKNOWN) for d in dims])
    return frame


def _per_cell(plan: ReleasePlan, frame: pl.DataFrame, exprs: list[pl.Expr]) -> pl.DataFrame:
    """``exprs`` aggregated per cell, one row per public key in the plan's order (0 where empty)."""
    dims = plan.breakdown
    if not dims:
        return frame.select(exprs)
    keys = pl.DataFrame([list(k) for k in plan.keys], schema=dims, orient="row")
    return keys.join(frame.group_by(dims).agg(exprs), on=dims, how="left", maintain_order="left").fill_null(0)


def exact_spend(dep: Deployment, plan: ReleasePlan) -> list[int]:
    """Clipped spend in cents per cell, segment-major, in the order of the count vector."""
    frame = _members(dep, plan).with_columns(person_spend(dep, plan).alias("__spend"))
    table = _per_cell(
        plan, frame, [pl.col("__spend").filter(pl.col(s)).sum().alias(s) for s in plan.segments]
    )
    return [int(v) for s in plan.segments for v in table.get_column(s).to_list()]


def exact_cells(dep: Deployment, plan: ReleasePlan) -> list[int]:
    """Exact counts, segment-major then cell order (plus cell populations for partner audiences)."""
    audience = plan.kind == "partner_audience"
    consent = plan.policy.consent_attribute
    frame = _members(dep, plan, [consent] if audience else [])
    exprs = [pl.col(s).sum().alias(s) for s in plan.segments]
    if audience:
        exprs.append(pl.col(consent).fill_null(False).sum().alias("__population"))
    table = _per_cell(plan, frame, exprs)
    names = [*plan.segments, *(["__population"] if audience else [])]
    return [int(v) for name in names for v in table.get_column(name).to_list()]
