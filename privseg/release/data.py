"""Exact aggregates over a membership snapshot, shared by the release kinds.

Nothing here leaves the server: the engine adds OpenDP noise to these vectors before anything is
returned.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import polars as pl

from privseg.release.context import ReleaseContext
from privseg.release.plan import UNKNOWN, ReleasePlan
from privseg.segments import engine, operators
from privseg.segments.language import Step

_DIMS_CACHE: dict[tuple[str, str], pl.DataFrame] = {}
_DIMS_LOCK = threading.Lock()
_CELL = "__cell"
WARM_BREAKDOWNS = 8  # cell codes built ahead per snapshot: each is 8 bytes per person
WARM_SEGMENTS = 200  # segments counted ahead per warm breakdown: ~1.7 ms each at 1M people
# Exact per-cell counts kept in memory, in values (4 bytes each): 16 MB, e.g. a 60-cell breakdown's
# counts for 66,000 segments. A snapshot never changes, so a segment's counts under a breakdown are
# computed once; every release still draws fresh noise and is charged as usual.
COUNTS_KEPT = 4_000_000


@dataclass(frozen=True)
class CellCodes:
    cell: pl.Series  # per row of the snapshot
    labels: list[list[str]]  # per dimension, its sorted labels
    occupied: pl.Series  # the distinct cells rows carry, sorted: the order cached counts are kept in
    positions: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", {c: i for i, c in enumerate(self.occupied.to_list())})

    def of(self, key: Sequence[str]) -> int | None:
        """The cell of a public key (None: no row carries one of its labels)."""
        code = 0
        for label, labels in zip(key, self.labels, strict=True):
            if label not in labels:
                return None
            code = code * len(labels) + labels.index(label)
        return code


_CELLS_CACHE: dict[tuple[str, str, tuple[str, ...]], CellCodes] = {}
_SCANS: dict[tuple[str, str], pl.LazyFrame] = {}


class _CountCache:
    """Exact per-cell counts by (snapshot, breakdown, segment), the least recently used dropped first
    once more than ``limit`` values are held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            if (hit := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: Hashable, counts: np.ndarray) -> None:
        counts.flags.writeable = False  # shared by every later release of the segment
        with self._lock:
            if (old := self._entries.pop(key, None)) is not None:
                self._held -= len(old)
            self._entries[key] = counts
            self._held += len(counts)
            while self._held > self.limit and len(self._entries) > 1:
                self._held -= len(self._entries.popitem(last=False)[1])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._held = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries


_COUNTS_CACHE = _CountCache(COUNTS_KEPT)
_BUILDING: dict[Hashable, threading.Lock] = {}  # one lock per (cache, key) being built
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
    """The snapshot's membership file, through one scan kept per file: a kept scan keeps the file's
    Parquet metadata, which a new scan or ``read_parquet`` parses again on every read. Ten columns of
    a 2,000-segment snapshot: 13.9 ms by ``read_parquet``, 5.5 ms through a kept scan (the footer
    alone 6-8 ms); of the benchmark's 20-segment snapshot 4.8 -> 3.6 ms. A pruned or rewritten file
    fails its read with FileNotFoundError, as before (the release engine then reads the new file)."""
    path = engine.snapshot_path(ctx.store, snap)
    return _once(_SCANS, _snapshot_key(ctx, snap), lambda: pl.scan_parquet(path), keep=16)


def columns(ctx: ReleaseContext, snap: engine.Snapshot, names: Sequence[str]) -> pl.DataFrame:
    """These columns of the snapshot's membership file, in the snapshot's row order."""
    return memberships(ctx, snap).select(names).collect()


def dimensions(ctx: ReleaseContext, snap: engine.Snapshot) -> pl.DataFrame:
    """Every breakdown dimension and consent attribute, in the snapshot's row order (cached per
    snapshot: the join on pseudonyms is the slow part of a release, and a snapshot never changes)."""
    # A few snapshots at most: the latest, and those movement reads.
    return _once(_DIMS_CACHE, _snapshot_key(ctx, snap), lambda: _dimensions(ctx, snap), keep=4)


def _snapshot_key(ctx: ReleaseContext, snap: engine.Snapshot) -> tuple[str, str]:
    # Keyed by file: an erasure rewrites a snapshot under a new name, with different rows.
    return str(ctx.store.data_dir.resolve()), f"{snap.id}/{snap.file}"


def warm(ctx: ReleaseContext) -> bool:
    """Build the latest snapshot's dimension frame ahead of the first release that needs it, the
    cell codes of the breakdowns released most recently (~0.3 s each at 1M people, else paid by the
    first fresh report of each breakdown on each worker) and the counts of the segments released
    under them (~1.7 ms a segment); False when there is no snapshot yet. A release arriving
    meanwhile waits for the build it needs (see _once)."""
    snap = engine.latest(ctx.store.conn)
    if snap is None or not engine.snapshot_path(ctx.store, snap).exists():
        return False
    dims = set(dimensions(ctx, snap).columns)
    in_snapshot = set(memberships(ctx, snap).collect_schema().names())
    for breakdown, segments in recent_breakdowns(ctx.store.conn).items():
        if set(breakdown) <= dims:  # a dimension the policies no longer allow is not built
            codes = cell_codes(ctx, snap, breakdown)
            # Segments retired since are not in this snapshot.
            _cell_counts(ctx, snap, breakdown, [s for s in segments if s in in_snapshot], codes)
    return True


def recent_breakdowns(
    conn: sqlite3.Connection, limit: int = WARM_BREAKDOWNS, segments: int = WARM_SEGMENTS
) -> dict[tuple[str, ...], list[str]]:
    """The distinct breakdowns of the latest releases, newest first, at most ``limit``, each with the
    segments released under it (most recent first, at most ``segments``)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for (request,) in conn.execute("SELECT request FROM releases ORDER BY id DESC LIMIT 500"):
        asked = json.loads(request)
        breakdown = tuple(asked.get("breakdown") or ())
        if not breakdown or (breakdown not in found and len(found) == limit):
            continue
        listed = found.setdefault(breakdown, [])
        for segment in asked.get("segments") or ():
            if segment not in listed and len(listed) < segments:
                listed.append(segment)
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
    # Build locks are per cache and key: caches share key shapes, and one entry's build may read
    # another cache's entry under the same key (the dimension frame reads the snapshot's scan).
    lock_key = (id(cache), key)
    with _DIMS_LOCK:
        if key in cache:
            return cache[key]
        building = _BUILDING.setdefault(lock_key, threading.Lock())
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
                _BUILDING.pop(lock_key, None)
    return value


def members(ctx: ReleaseContext, plan: ReleasePlan, also: Sequence[str] = ()) -> pl.DataFrame:
    """The plan's segment columns, its breakdown dimensions (unknown filled in) and ``also`` (more
    columns of the per-snapshot dimension frame), row-aligned with the snapshot."""
    dims = plan.breakdown
    frame = columns(ctx, plan.snapshot, plan.segments)
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
    cell = cell.rename(_CELL)
    return CellCodes(cell, labels, cell.unique().sort())


def segment_counts(ctx: ReleaseContext, plan: ReleasePlan) -> list[int]:
    """Members per cell, segment-major then cell order: what :func:`per_cell` gives for the plan's
    segment sums over :func:`members` (tests compare the two), grouped on :func:`cell_codes`. Each
    segment's counts under a breakdown (its total, without one) are computed once per snapshot (see
    COUNTS_KEPT)."""
    if not plan.breakdown:
        totals = _totals(ctx, plan.snapshot, plan.segments)
        return [totals[s] for s in plan.segments]
    codes = cell_codes(ctx, plan.snapshot, plan.breakdown)
    counts = _cell_counts(ctx, plan.snapshot, plan.breakdown, plan.segments, codes)
    # A public key no row carries is a cell of zeros: it points at a zero column past the occupied
    # cells. Gathered as arrays: picking the 880 values of a 10-segment report one by one took 0.4 ms.
    empty = len(codes.occupied)
    at = [empty if (cell := codes.of(key)) is None else codes.positions.get(cell, empty) for key in plan.keys]
    table = np.zeros((len(plan.segments), empty + 1), dtype=np.int64)
    for row, segment in zip(table, plan.segments, strict=True):
        row[:empty] = counts[segment]
    result: list[int] = table[:, at].ravel().tolist()
    return result


def count_ahead(ctx: ReleaseContext, plan: ReleasePlan) -> None:
    """Count the plan's segments not yet counted under its breakdown, if the breakdown's cell codes
    are built (building them reads the database, which this must not): what :func:`segment_counts`
    would otherwise compute after the charge, computed while it commits (without a breakdown, their
    totals). The counts stay in memory."""
    if not plan.breakdown:
        _totals(ctx, plan.snapshot, plan.segments)
        return
    with _DIMS_LOCK:
        codes = _CELLS_CACHE.get((*_snapshot_key(ctx, plan.snapshot), tuple(plan.breakdown)))
    if codes is not None:
        _cell_counts(ctx, plan.snapshot, plan.breakdown, plan.segments, codes)


def _totals(ctx: ReleaseContext, snap: engine.Snapshot, segments: Sequence[str]) -> dict[str, int]:
    """Per segment, its members (cached as the one cell of the empty breakdown), the missing ones
    summed in one pass."""

    def count(frame: pl.DataFrame) -> dict[str, np.ndarray]:
        sums = frame.select(pl.all().sum()).row(0, named=True)
        return {s: np.array([total], dtype=np.int64) for s, total in sums.items()}

    return {s: int(c[0]) for s, c in _counted(ctx, snap, (), segments, count).items()}


def _cell_counts(
    ctx: ReleaseContext,
    snap: engine.Snapshot,
    breakdown: Sequence[str],
    segments: Sequence[str],
    codes: CellCodes,
) -> dict[str, np.ndarray]:
    """Per segment, its members in each of ``codes.occupied``, the missing ones by one group-by over
    the snapshot's integer cell codes."""

    def count(frame: pl.DataFrame) -> dict[str, np.ndarray]:
        grouped = frame.with_columns(codes.cell).group_by(_CELL).agg(pl.exclude(_CELL).sum())
        # Every occupied cell has a row, so the join leaves no gap; the cells come out in codes' order.
        table = codes.occupied.to_frame().join(grouped, on=_CELL, how="left", maintain_order="left")
        return {s: table.get_column(s).to_numpy() for s in frame.columns}

    return _counted(ctx, snap, breakdown, segments, count)


def _counted(
    ctx: ReleaseContext,
    snap: engine.Snapshot,
    breakdown: Sequence[str],
    segments: Sequence[str],
    count: Callable[[pl.DataFrame], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Per segment, its counts under ``breakdown`` from the count cache; the missing ones by ``count``
    over one read of their columns of the snapshot, then cached."""
    base = (*_snapshot_key(ctx, snap), tuple(breakdown))
    found = {s: hit for s in segments if (hit := _COUNTS_CACHE.get((*base, s))) is not None}
    missing = [s for s in segments if s not in found]
    if missing:
        frame = columns(ctx, snap, missing)
        for s, counts in count(frame).items():
            _COUNTS_CACHE.put((*base, s), counts)
            found[s] = counts
    return found
