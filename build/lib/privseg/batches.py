"""What the store's manifest records of a batch, and what a write or a rewrite hands it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

Kind = Literal["profiles", "events"]
KINDS: tuple[Kind, ...] = ("profiles", "events")


@dataclass(frozen=True)
class Batch:
    id: int
    kind: Kind
    file: str
    rows: int
    people: int
    min_ts: str | None
    max_ts: str | None
    key_version: int
    written_at: str
    seq: int  # ingestion order; a rewrite keeps it
    source: str | None = None  # keyed hash of the source bytes; a rewrite keeps it


@dataclass(frozen=True)
class NewBatch:
    """A batch to store: its frame, the keyed hashes of what was ingested (content_id: the bytes and,
    for events, the policy applied; source: the bytes alone), its people count, its audit details,
    and the batches of the same source it replaces."""

    frame: pl.DataFrame
    content_id: str
    source: str
    people: int
    details: dict[str, Any]
    replaces: tuple[Batch, ...] = ()


@dataclass(frozen=True)
class Rewrite:
    """Replace ``old`` with ``new`` (None: the batch becomes empty and is removed)."""

    old: Batch
    new: pl.DataFrame | None


def batch_from_row(row: Sequence[Any]) -> Batch:
    return Batch(*row)


BATCH_COLUMNS = "id, kind, file, rows, people, min_ts, max_ts, key_version, written_at, seq, source"
