"""Live event intake: batches in the shape CDP pipelines send (Segment / RudderStack batch JSON), mapped
to the ingest policy's event types and fields by its ``intake`` section, validated and pseudonymized
exactly like a file (the same transform), and appended as one small batch (no rewrite of anything
stored; `privseg store compact` merges them later).

Each message's ``messageId`` is recorded as a keyed hash in the transaction that records its batch,
under the store's writer lock: a message resent (a pipeline's retry, a duplicate inside a batch) is
never stored twice, and a batch that fails stores nothing, its ids included, so its retry is stored.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from privseg.batches import Batch, NewBatch
from privseg.db import transaction
from privseg.errors import InvalidInput
from privseg.ingest.transform import transform
from privseg.keyset import Keyset
from privseg.policy.ingest import IngestPolicy
from privseg.pseudonym import Pseudonymizer
from privseg.store import Store

SOURCE = "intake"  # the source of every intake batch (compaction merges these)
MAX_MESSAGES = 500


class Message(BaseModel):
    """One call as Segment / RudderStack send it; fields privseg does not use are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["track", "page", "screen", "identify", "group", "alias"]
    message_id: str = Field(alias="messageId", min_length=1, max_length=200)
    user_id: str | None = Field(None, alias="userId", max_length=512)
    anonymous_id: str | None = Field(None, alias="anonymousId", max_length=512)
    event: str | None = Field(None, max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    timestamp: str | None = Field(None, max_length=64)


class IntakeBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")
    batch: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


@dataclass(frozen=True)
class IntakeResult:
    received: int
    stored: int  # events stored by this call
    duplicates: int  # messages already stored (a retry) or repeated within the batch
    skipped: int  # not mapped by the policy's intake section, or without a userId
    expired: int  # older than the retention
    batch_id: int | None


def _path(message: Message, dotted: str) -> Any:
    root, *rest = dotted.split(".")
    value: Any = message.properties if root == "properties" else message.context
    for part in rest:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def message_key(keyset: Keyset, message_id: str) -> str:
    # Keyed: a message id may be built from anything by the sender, identifiers included.
    return hmac.new(keyset.derived_key("intake-message"), message_id.encode(), hashlib.sha256).hexdigest()


def _rows(
    policy: IngestPolicy, messages: list[Message], received: str
) -> tuple[list[dict[str, Any]], list[int], int]:
    """The mapped messages as text rows (the identity and timestamp columns, event_type, fields), the
    index of each row's message, and how many were skipped."""
    assert policy.intake is not None
    rows, index, skipped = [], [], 0
    for i, m in enumerate(messages):
        name = "$page" if m.type == "page" else m.event if m.type == "track" else None
        mapping = policy.intake.events.get(name) if name is not None else None
        if mapping is None or not m.user_id:
            skipped += 1
            continue
        row: dict[str, Any] = {
            policy.identity.column: m.user_id,
            # Segment always sends one (its receive time if the source gave none); fall back likewise.
            policy.events.timestamp: m.timestamp or received,
            "event_type": mapping.type,
        }
        for field, dotted in mapping.fields.items():
            value = _path(m, dotted)
            row[field] = None if value is None or isinstance(value, dict | list) else str(value)
        rows.append(row)
        index.append(i)
    return rows, index, skipped


def ingest_batch(
    *, store: Store, keyset: Keyset, policy: IngestPolicy, batch: IntakeBatch, now: datetime | None = None
) -> IntakeResult:
    """Store the new, mapped messages of ``batch`` as one events batch, all or nothing."""
    if policy.intake is None:
        raise InvalidInput("live intake is not configured: add an intake section to policies/ingest.yaml")
    now = now or datetime.now(UTC)
    messages = batch.batch
    keys = [message_key(keyset, m.message_id) for m in messages]
    version = store.bind(keyset=keyset, id_type=policy.identity.type.value)
    with store.writer_lock():
        conn = store.conn
        marks = ",".join("?" * len(keys))
        seen = {
            r[0]
            for r in conn.execute(
                f"SELECT message_key FROM intake_messages WHERE message_key IN ({marks})", keys
            )
        }
        fresh: list[Message] = []
        fresh_keys: list[str] = []
        for m, k in zip(messages, keys, strict=True):
            if k in seen:
                continue
            seen.add(k)  # a repeat inside the batch is a duplicate too
            fresh.append(m)
            fresh_keys.append(k)
        duplicates = len(messages) - len(fresh)
        rows, _index, skipped = _rows(policy, fresh, now.isoformat())
        if not rows:
            _record(store, fresh_keys, None, now)  # skipped messages are done: a retry changes nothing
            return IntakeResult(len(messages), 0, duplicates, skipped, 0, None)
        columns = [policy.identity.column, policy.events.timestamp, *policy.events.attributes]
        raw = pl.DataFrame(
            [{c: r.get(c) for c in columns} for r in rows], schema=dict.fromkeys(columns, pl.String)
        )
        pseudonymizer = Pseudonymizer(keyset, policy.identity.type, version)
        frame, result = transform(
            raw, kind="events", policy=policy, pseudonymizer=pseudonymizer, source="intake batch", now=now
        )
        if frame.height == 0:
            _record(store, fresh_keys, None, now)
            return IntakeResult(len(messages), 0, duplicates, skipped, result.expired_events, None)
        content = hmac.new(
            keyset.derived_key("intake-batch"), "".join(sorted(fresh_keys)).encode(), hashlib.sha256
        )
        item = NewBatch(
            frame, content.hexdigest(), SOURCE, result.people, {"source": "intake", "rows": frame.height}
        )

        def record(batches: list[Batch]) -> None:
            _insert(store, fresh_keys, batches[0].id, now)

        (stored,) = store.add_batches(
            kind="events", items=[item], key_version=version, keyset=keyset, also=record
        )
    return IntakeResult(len(messages), frame.height, duplicates, skipped, result.expired_events, stored.id)


def _insert(store: Store, keys: list[str], batch_id: int | None, now: datetime) -> None:
    store.conn.executemany(
        "INSERT INTO intake_messages (message_key, batch_id, received_at) VALUES (?, ?, ?)",
        [(k, batch_id, now.isoformat()) for k in keys],
    )


def _record(store: Store, keys: list[str], batch_id: int | None, now: datetime) -> None:
    if keys:
        with transaction(store.conn):
            _insert(store, keys, batch_id, now)
