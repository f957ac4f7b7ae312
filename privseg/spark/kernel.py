"""What runs inside a Spark task: one partition's people evaluated by the local engine's kernel.

A partition holds whole people (the store is repartitioned by shard), as rows of a union of profile
and event rows: ``_k`` tells which (0 profile, 1 event), ``_b`` the profile batch's place in
ingestion order, and every column is prefixed (``p_``, ``e_``) so that a profile attribute and an
event field of the same name never meet. The kernel rebuilds the profile and event frames exactly as
the local engine loads them (profiles merged batch by batch, each batch updating only the columns it
carries), evaluates, and returns ``pid`` plus the person's memberships bit-packed (:func:`pack`):
person-level rows that Spark writes to the staging folder from the executors, never to the driver.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from privseg.segments.compiler import Plan
from privseg.segments.engine import evaluate
from privseg.store import merge_profiles

if TYPE_CHECKING:
    import pyarrow as pa

KIND, BATCH = "_k", "_b"
PROFILE, EVENT = 0, 1


def profile_column(name: str) -> str:
    return f"p_{name}"


def event_column(name: str) -> str:
    return f"e_{name}"


@dataclass(frozen=True)
class Kernel:
    """Picklable: Spark ships it to every task."""

    plan: Plan
    profile_batches: tuple[tuple[str, ...], ...]  # per profile batch, in order: the wanted columns it has
    profile_dtypes: dict[str, pl.DataType]  # every wanted profile column (absent ones: unknown)
    event_dtypes: dict[str, pl.DataType]  # every event column the plan reads

    def frames(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The partition's profiles and events, as :func:`privseg.segments.engine.load` gives them."""
        profile_rows = rows.filter(pl.col(KIND) == PROFILE)
        batches = [
            profile_rows.filter(pl.col(BATCH) == i)
            .select(
                pl.col(profile_column(c)).cast(self.profile_dtypes[c]).alias(c) for c in ("pid", *columns)
            )
            .lazy()
            for i, columns in enumerate(self.profile_batches)
        ]
        merged = merge_profiles(batches)
        profiles = pl.DataFrame(schema={"pid": pl.String}) if merged is None else merged.collect()
        profiles = profiles.with_columns(
            pl.lit(None, dtype=dtype).alias(c)
            for c, dtype in self.profile_dtypes.items()
            if c not in profiles
        )
        event_rows = rows.filter(pl.col(KIND) == EVENT)
        events = event_rows.select(
            (pl.col(event_column(c)) if event_column(c) in event_rows else pl.lit(None)).cast(dtype).alias(c)
            for c, dtype in self.event_dtypes.items()
        )
        return profiles, events

    def __call__(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        received = list(batches)
        if not received:
            return  # an empty partition (Spark hands those over too)
        rows = pl.from_arrow(pa.Table.from_batches(received))
        assert isinstance(rows, pl.DataFrame)
        profiles, events = self.frames(rows)
        members, _timings = evaluate(self.plan, profiles=profiles, events=events)
        yield pack(members, list(self.plan.segments))


def pack(members: pl.DataFrame, segments: list[str]) -> pa.RecordBatch:
    """``pid`` and the memberships bit-packed into one binary value per person (segment i is bit i,
    most significant first). Spark moves rows between Arrow and its writer one value at a time: two
    columns per person instead of thousands is what makes the job as fast as the kernel."""
    import numpy as np
    import pyarrow as pa

    bits = np.packbits(members.select(segments).to_numpy().astype(np.bool_), axis=1)
    width = bits.shape[1]
    offsets = np.arange(0, (members.height + 1) * width, width, dtype=np.int32)
    packed = pa.BinaryArray.from_buffers(
        pa.binary(), members.height, [None, pa.py_buffer(offsets), pa.py_buffer(bits.tobytes())]
    )
    return pa.RecordBatch.from_arrays([members.get_column("pid").to_arrow(), packed], names=["pid", "bits"])


def unpack(packed: pl.DataFrame, segments: list[str]) -> pl.DataFrame:
    """The inverse of :func:`pack`: ``pid`` plus one Boolean column per segment."""
    import numpy as np

    width = (len(segments) + 7) // 8
    raw = np.frombuffer(b"".join(packed.get_column("bits").to_list()), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(packed.height, width), axis=1, count=len(segments)).astype(np.bool_)
    return pl.concat(
        [packed.select("pid"), pl.from_numpy(bits, schema=dict.fromkeys(segments, pl.Boolean), orient="row")],
        how="horizontal",
    )
