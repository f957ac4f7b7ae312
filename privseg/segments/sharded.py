"""The sharded engine: a snapshot computed a few person shards at a time, in bounded memory.

Every segment is a function of one person's profile and events (features, traits, sequences,
buckets, references, personas), so evaluating the people of a group of shards on their own gives
exactly their rows of the whole-store evaluation. Each group's rows are written as one part; the
snapshot writer streams the parts into the snapshot file. Peak memory follows the largest group,
not the store.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from privseg import shards
from privseg.segments import staging
from privseg.segments.compiler import Compiler, Plan
from privseg.segments.engine import Progress, Runner, evaluate, load
from privseg.store import Store

# What the evaluation holds at its peak, per person and per event row, fitted to benchmarks/scale.py
# (2,000 segments over 559 features and 213 shared conditions, 1M customers and 10M events: the local
# engine peaked at 3.7 GB; this model says 4.5 GB before the margin): a feature column is a 4-byte
# count or an 8-byte sum or time, a shared condition a Boolean (1 byte while built), a membership a
# bit; an event row holds its read columns. The margin covers Polars' intermediates.
BYTES_PER_FEATURE = 6
BYTES_PER_SHARED = 1
BYTES_PER_EVENT_COLUMN = 12
MARGIN = 1.25


def estimate_bytes(plan: Plan, store: Store) -> int:
    """Memory to evaluate the whole store at once (people are counted per batch: an upper bound)."""
    profile_batches, event_batches = store.batches("profiles"), store.batches("events")
    people = sum(b.people for b in profile_batches) or sum(b.people for b in event_batches)
    events = sum(b.rows for b in event_batches)
    shared = len(plan.derived) + sum(len(level) for level in plan.shared)
    per_person = (
        BYTES_PER_FEATURE * len(plan.features) + BYTES_PER_SHARED * shared + len(plan.segments) // 8 + 64
    )
    per_event = BYTES_PER_EVENT_COLUMN * len(plan.event_columns())
    return int(MARGIN * (people * per_person + events * per_event))


def parts_for(plan: Plan, store: Store, memory_bytes: float) -> int:
    """How many groups of shards keep one group's evaluation within ``memory_bytes`` (a power of
    two, at most the store's shard count)."""
    needed = max(1, math.ceil(estimate_bytes(plan, store) / memory_bytes))
    return min(store.shard_count(), 1 << (needed - 1).bit_length())


def sharded_runner(*, memory_gb: float = 8.0, parts: int | None = None) -> Runner:
    """A runner evaluating ``parts`` groups of shards one after the other (default: as many as keep
    a group within ``memory_gb``)."""

    def run(
        compiler: Compiler, store: Store, as_of: datetime, folder: Path, progress: Progress
    ) -> dict[str, float]:
        plan = compiler.compile(as_of)
        count = parts or parts_for(plan, store, memory_gb * 1024**3)
        groups = shards.groups(store.shard_count(), count)
        timings: defaultdict[str, float] = defaultdict(float)
        for i, group in enumerate(groups):
            progress(
                f"shards {group.start}-{group.stop - 1} of {store.shard_count()} ({i + 1}/{len(groups)})"
            )
            t = time.perf_counter()
            profiles, events = load(plan, compiler, store, group)
            timings["load"] += time.perf_counter() - t
            members, times = evaluate(plan, profiles=profiles, events=events)
            for key, value in times.items():
                if key != "features_count":
                    timings[key] += value
            staging.write_members(members, folder / f"part-{i:05d}.parquet")
            del profiles, events, members
        return {**timings, "features_count": len(plan.features), "groups": len(groups)}

    return run
