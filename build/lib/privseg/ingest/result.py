"""What ingesting one file did: the answer of the CLI, the API and the audit entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from privseg.batches import Kind

Mode = Literal["patch", "replace"]


@dataclass(frozen=True)
class IngestResult:
    kind: Kind
    source: str
    stored: bool
    batch_id: int
    rows: int
    people: int
    dropped_columns: tuple[str, ...] = ()
    generalized_columns: tuple[str, ...] = ()
    expired_events: int = 0
    mode: Mode | None = None  # profiles: patch (only the columns given) or replace
    replaced_batches: tuple[int, ...] = ()  # events stored from the same file under an earlier policy

    @property
    def message(self) -> str:
        if not self.stored:
            return f"{self.source}: already ingested (batch {self.batch_id}); nothing stored"
        extra = f", {self.expired_events} events past retention dropped" if self.expired_events else ""
        extra += f", {self.mode}" if self.mode else ""
        if self.replaced_batches:
            replaced = list(self.replaced_batches)
            extra += f"; replaces batch(es) {replaced}, the same file under an earlier policy"
        return (
            f"{self.source}: stored {self.kind} batch {self.batch_id} "
            f"({self.rows} rows, {self.people} people{extra})"
        )
