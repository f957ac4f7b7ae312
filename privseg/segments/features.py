"""Computing features over events: each touches only the events it can match.

Events are partitioned once by event type and sorted by person. Features that share a step (event
type + filters) share one filtered partition and one ``group_by`` with all their window
aggregations; one join per step makes them dense columns indexed by person. Sequences use an as-of
join per person; buckets hash the pseudonym with a salt.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import datetime

import polars as pl

from privseg.segments import operators
from privseg.segments.feature_kinds import (
    AggFeature,
    BucketFeature,
    Feature,
    LastFeature,
    SeqFeature,
    window_mask,
)
from privseg.segments.language import BUCKETS, Step

TS_DTYPE = pl.Datetime("us", "UTC")


def _defaults(feature: AggFeature | LastFeature, n: int) -> pl.Series:
    if isinstance(feature, LastFeature):
        return pl.repeat(None, n, dtype=TS_DTYPE, eager=True)
    if feature.measure == "count":
        return pl.zeros(n, dtype=pl.UInt32, eager=True)
    if feature.measure == "sum":
        return pl.zeros(n, dtype=pl.Float64, eager=True)
    return pl.repeat(None, n, dtype=pl.Float64, eager=True)


def _aggregation(feature: AggFeature | LastFeature, as_of: datetime) -> pl.Expr:
    if isinstance(feature, LastFeature):
        return pl.col("ts").max()
    mask = window_mask(feature.window, as_of, pl.col("ts"))
    if feature.measure == "count":
        return mask.sum().cast(pl.UInt32)
    value = pl.col("value").filter(mask)
    return {"sum": value.sum(), "avg": value.mean(), "min": value.min(), "max": value.max()}[
        feature.measure
    ].cast(pl.Float64)


def _filtered(partitions: dict[str, pl.DataFrame], step: Step) -> pl.DataFrame | None:
    part = partitions.get(step.type)
    if part is None:
        return None
    if step.filters:
        part = part.filter(
            pl.all_horizontal([operators.build(c.op, pl.col(c.field), c.value) for c in step.filters])
        )
    return part


def compute(
    features: dict[str, Feature],
    *,
    events: pl.DataFrame,
    pids: pl.Series,
    as_of: datetime,
) -> dict[str, pl.Series]:
    """Dense feature columns (length ``len(pids)``). ``events`` has ``pidx`` (row in ``pids``), ``ts``,
    ``event_type`` and the event fields, and holds no event after ``as_of``."""
    n = pids.len()
    # Each type's events in person order (stable: a person's own events keep their order), so that
    # every step's group_by works on sorted keys and returns them sorted for the join below. Sorting
    # costs ~0.5 s per 10M events; the group_bys and joins of 2,000 segments' 72 steps took 3.1 and
    # 1.9 s on sorted keys, 4.2 and 3.1 s on hashed ones (throwaway script at 1M people). Sums may
    # differ from the hashed order's in the last bits (the same rows, added in another order).
    partitions = {
        key[0]: df.sort("pidx", maintain_order=True)
        for key, df in events.partition_by("event_type", as_dict=True).items()
    }
    out: dict[str, pl.Series] = {}

    by_step: dict[Step, list[tuple[str, AggFeature | LastFeature]]] = defaultdict(list)
    for name, f in features.items():
        if isinstance(f, AggFeature | LastFeature):
            by_step[f.step].append((name, f))
    everyone = pl.DataFrame({"pidx": pl.int_range(0, n, dtype=pl.UInt32, eager=True)})
    for step, group in by_step.items():
        part = _filtered(partitions, step)
        if part is None or part.height == 0:
            out.update({name: _defaults(f, n).alias(name) for name, f in group})
            continue
        aggs = [_aggregation(f, as_of).alias(name) for name, f in group]
        agg = part.group_by("pidx", maintain_order=True).agg(aggs)
        # Densified by one join per step, not a scatter per feature into a fresh column: the scatters
        # were 38% of a 2,000-segment run (py-spy, benchmarks/scale.py). A person without a matching
        # event gets the feature's default: 0 for counts and sums, unknown otherwise.
        dense = everyone.join(agg, on="pidx", how="left", maintain_order="left")
        zero = [name for name, f in group if isinstance(f, AggFeature) and f.measure in ("count", "sum")]
        if zero:
            dense = dense.with_columns(pl.col(zero).fill_null(0))
        out.update({name: dense.get_column(name) for name, _f in group})

    for name, f in features.items():
        if isinstance(f, SeqFeature):
            out[name] = _sequence(f, partitions, n, as_of).alias(name)
        elif isinstance(f, BucketFeature):
            out[name] = bucket(pids, f.salt).alias(name)
    return out


def _sequence(f: SeqFeature, partitions: dict[str, pl.DataFrame], n: int, as_of: datetime) -> pl.Series:
    hit = pl.zeros(n, dtype=pl.Boolean, eager=True)
    first, then = _filtered(partitions, f.first), _filtered(partitions, f.then)
    if first is None or then is None:
        return hit
    mask = window_mask(f.window, as_of, pl.col("ts"))
    a = first.filter(mask).select("pidx", "ts").sort("pidx", "ts")
    b = then.filter(mask).select("pidx", pl.col("ts").alias("ts_then")).sort("pidx", "ts_then")
    if f.first == f.then:
        # The same step twice means a *second* event: strictly later than the first.
        a = a.with_columns(pl.col("ts") + pl.duration(microseconds=1))
    matched = a.join_asof(
        b,
        left_on="ts",
        right_on="ts_then",
        by="pidx",
        strategy="forward",
        tolerance=f.within,
        check_sortedness=False,
    )
    idx = matched.filter(pl.col("ts_then").is_not_null()).get_column("pidx").unique()
    return hit.scatter(idx, True)


def bucket(pids: pl.Series, salt: str) -> pl.Series:
    """Deterministic bucket 0..9999 per pseudonym: SHA-256 of salt and pseudonym (a stable hash:
    Polars' own hash may change between versions, which would silently reshuffle A/B groups)."""
    prefix = salt.encode() + b"\x00"
    values = [
        int.from_bytes(hashlib.sha256(prefix + p.encode()).digest()[:8], "big") % BUCKETS
        for p in pids.to_list()
    ]
    return pl.Series(values, dtype=pl.UInt16)
