"""Exact aggregates over a membership snapshot, shared by the release kinds.

Nothing here leaves the server: the engine adds OpenDP noise to these vectors before anything is
returned.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import polars as pl

from privseg.release.context import ReleaseContext
from privseg.release.plan import UNKNOWN, ReleasePlan
from privseg.segments import engine, operators
from privseg.segments.language import Step

_DIMS_CACHE: dict[tuple[str, str], pl.DataFrame] = {}
_DIMS_LOCK = threading.Lock()
_CELL = "__cell"
WARM_BREAKDOWNS = 8  # cell codes built ahead per snapshot: each is 8 bytes per person


@dataclass(frozen=True)
class CellCodes:
    cell: pl.Series  # per row of the snapshot
    labels: list[list[str]]  # per dimension, its sorted labels

    def of(self, key: Sequence[str]) -> int | None:
        """The cell of a public key (None: no row carries one of its labels)."""
        code = 0
        for label, labels in zip(key, self.labels, strict=True):
            if label not in labels:
                return None
            code = code * len(labels) + labels.index(label)
        return code


_CELLS_CACHE: dict[tuple[str, str, tuple[str, ...]], CellCodes] = {}
_BUILDING: dict[Hashable, threading.Lock] = {}  # one lock per cache key being built
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def step_events(ctx: ReleaseContext, step: Step) -> pl.LazyFrame | None:
    """The stored events a step matches (its type and every filter), or None when none are stored.
    Callers add their own time window."""
    events = ctx.store.scan_events()
    if events is None:
        return None
    where = [operators.build(c.op, pl.col(c.field), c.value) for c in step.filters]
    return events.filter((pl.col("event_type") == step.type) & pl.all_horizontal(True, *where))


def memberships(ctx: ReleaseContext, snap: engine.Snapshot) -> pl.LazyFrame:
    return pl.scan_parquet(engine.snapshot_path(ctx.store, snap))


def dimensions(ctx: ReleaseContext, snap: engine.Snapshot) -> pl.DataFrame:
    """Every breakdown dimension and consent attribute, in the snapshot's row order (cached per
    snapshot: the join on pseudonyms is the slow part of a release, and a snapshot never changes)."""
    # A few snapshots at most: the latest, and those movement reads.
    return _once(_DIMS_CACHE, _snapshot_key(ctx, snap), lambda: _dimensions(ctx, snap), keep=4)


def _snapshot_key(ctx: ReleaseContext, snap: engine.Snapshot) -> tuple[str, str]:
    # Keyed by file: an erasure rewrites a snapshot under a new name, with different rows.
    return str(ctx.store.data_dir.resolve()), f"{snap.id}/{snap.file}"


def warm(ctx: ReleaseContext) -> bool:
    """Build the latest snapshot's dimension frame ahead of the first release that needs it, and the
    cell codes of the breakdowns released most recently (~0.3 s each at 1M people, else paid by the
    first fresh report of each breakdown on each worker); False when there is no snapshot yet. A
    release arriving meanwhile waits for the build it needs (see _once)."""
    snap = engine.latest(ctx.store.conn)
    if snap is None or not engine.snapshot_path(ctx.store, snap).exists():
        return False
    columns = set(dimensions(ctx, snap).columns)
    for breakdown in recent_breakdowns(ctx.store.conn):
        if set(breakdown) <= columns:  # a dimension the policies no longer allow is not built
            cell_codes(ctx, snap, breakdown)
    return True


def recent_breakdowns(conn: sqlite3.Connection, limit: int = WARM_BREAKDOWNS) -> list[tuple[str, ...]]:
    """The distinct breakdowns of the latest releases, newest first, at most ``limit``."""
    found: list[tuple[str, ...]] = []
    for (request,) in conn.execute("SELECT request FROM releases ORDER BY id DESC LIMIT 500"):
        breakdown = tuple(json.loads(request).get("breakdown") or ())
        if breakdown and breakdown not in found:
            found.append(breakdown)
            if len(found) == limit:
                break
    return found


def _dimensions(ctx: ReleaseContext, snap: engine.Snapshot) -> pl.DataFrame:
    policies = ctx.categories.categories.values()
    dims = sorted(
        {d for c in policies for d in c.allowed_dimensions()} | {c.consent_attribute for c in policies}
    )
    pids = memberships(ctx, snap).select("pid")
    profiles = ctx.store.scan_profiles()
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
    return frame.drop("pid")


def _once(cache: dict[K, V], key: K, build: Callable[[], V], *, keep: int) -> V:
    """``cache[key]``, built by one caller while concurrent callers of the same key wait for it: with
    a cold cache, concurrent fresh releases each built the same frame (a join over every person) at
    once. At most ``keep`` entries, the oldest dropped first."""
    with _DIMS_LOCK:
        if key in cache:
            return cache[key]
        building = _BUILDING.setdefault(key, threading.Lock())
    with building:
        with _DIMS_LOCK:
            if key in cache:
                return cache[key]
        try:
            value = build()
            with _DIMS_LOCK:
                if len(cache) >= keep:
                    cache.pop(next(iter(cache)))
                cache[key] = value
        finally:
            with _DIMS_LOCK:
                _BUILDING.pop(key, None)
    return value


def members(ctx: ReleaseContext, plan: ReleasePlan, also: Sequence[str] = ()) -> pl.DataFrame:
    """The plan's segment columns, its breakdown dimensions (unknown filled in) and ``also`` (more
    columns of the per-snapshot dimension frame), row-aligned with the snapshot."""
    dims = plan.breakdown
    frame = pl.read_parquet(engine.snapshot_path(ctx.store, plan.snapshot), columns=plan.segments)
    if dims or also:
        frame = pl.concat([frame, dimensions(ctx, plan.snapshot).select(*dims, *also)], how="horizontal")
        frame = frame.with_columns([pl.col(d).cast(pl.String).fill_null(UNKNOWN) for d in dims])
    return frame


def per_cell(plan: ReleasePlan, frame: pl.DataFrame, exprs: list[pl.Expr]) -> pl.DataFrame:
    """``exprs`` aggregated per cell, one row per public key in the plan's order (0 where empty)."""
    dims = plan.breakdown
    if not dims:
        return frame.select(exprs)
    keys = pl.DataFrame([list(k) for k in plan.keys], schema=dims, orient="row")
    return keys.join(frame.group_by(dims).agg(exprs), on=dims, how="left", maintain_order="left").fill_null(0)


def cell_codes(ctx: ReleaseContext, snap: engine.Snapshot, breakdown: Sequence[str]) -> CellCodes:
    """Each row's cell under ``breakdown`` in the snapshot's row order, as one integer, with each
    dimension's labels (the text :func:`members` groups, unknown filled in): computed once per
    snapshot and breakdown, so that a release groups one integer column instead of strings (the
    string group-by was half of a fresh report's time, benchmarks/release.py)."""
    key = (*_snapshot_key(ctx, snap), tuple(breakdown))
    # Snapshots x breakdowns in use; each is 8 bytes per person.
    return _once(_CELLS_CACHE, key, lambda: _cell_codes(dimensions(ctx, snap), breakdown), keep=64)


def _cell_codes(frame: pl.DataFrame, breakdown: Sequence[str]) -> CellCodes:
    cell = pl.zeros(frame.height, dtype=pl.UInt64, eager=True)
    labels: list[list[str]] = []
    for dim in breakdown:
        values = frame.get_column(dim).cast(pl.String).fill_null(UNKNOWN)
        labels.append(values.unique().sort().to_list())
        # A row's cell: its dimensions' label indices in mixed radix.
        cell = cell * len(labels[-1]) + (values.rank("dense") - 1).cast(pl.UInt64)
    return CellCodes(cell.rename(_CELL), labels)


def segment_counts(ctx: ReleaseContext, plan: ReleasePlan) -> list[int]:
    """Members per cell, segment-major then cell order: what :func:`per_cell` gives for the plan's
    segment sums over :func:`members` (tests compare the two), grouped on :func:`cell_codes`."""
    frame = pl.read_parquet(engine.snapshot_path(ctx.store, plan.snapshot), columns=plan.segments)
    sums = [pl.col(s).sum().alias(s) for s in plan.segments]
    if not plan.breakdown:
        return [int(v) for v in frame.select(sums).row(0)]
    codes = cell_codes(ctx, plan.snapshot, plan.breakdown)
    table = frame.with_columns(codes.cell).group_by(_CELL).agg(sums)
    found = dict(zip(table.get_column(_CELL).to_list(), table.select(plan.segments).rows(), strict=True))
    zero = (0,) * len(plan.segments)
    per_key = []
    for key in plan.keys:  # a public key no row carries is a cell of zeros
        cell = codes.of(key)
        per_key.append(zero if cell is None else found.get(cell, zero))
    return [int(row[j]) for j in range(len(plan.segments)) for row in per_key]
