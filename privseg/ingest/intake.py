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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from privseg.batches import Batch, NewBatch, Rewrite
from privseg.db import transaction
from privseg.errors import InvalidInput
from privseg.ingest.transform import transform
from privseg.keyset import Keyset
from privseg.policy.ingest import IngestPolicy
from privseg.pseudonym import Pseudonymizer
from privseg.store import Store

SOURCE = "intake"  # the source of every intake batch (compaction merges these)
MAX_MESSAGES = 500
# Intake batches merged inline once there are this many: every write lists the manifest and the data
# folder (crash recovery), so without a bound each call costs more than the last (measured: ~20 ms a
# call at first, several times that past 5,000 batches).
MERGE_AT = 200


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
    traits: dict[str, Any] = Field(default_factory=dict)


class IntakeBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")
    batch: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


@dataclass(frozen=True)
class IntakeResult:
    received: int
    stored: int  # events stored by this call
    profiles: int  # profile patches stored by this call (identify calls)
    duplicates: int  # messages already stored (a retry) or repeated within the batch
    skipped: int  # not mapped by the policy's intake section, or without a userId
    expired: int  # older than the retention
    batch_id: int | None


def _path(message: Message, dotted: str) -> Any:
    root, *rest = dotted.split(".")
    value: Any = {"properties": message.properties, "context": message.context, "traits": message.traits}[
        root
    ]
    for part in rest:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def message_key(keyset: Keyset, message_id: str) -> str:
    # Keyed: a message id may be built from anything by the sender, identifiers included.
    return hmac.new(keyset.derived_key("intake-message"), message_id.encode(), hashlib.sha256).hexdigest()


def _event_row(policy: IngestPolicy, m: Message, received: str) -> dict[str, Any] | None:
    """A tracked (or page) message as a text row of the events policy's columns, or None if unmapped."""
    assert policy.intake is not None
    name = "$page" if m.type == "page" else m.event if m.type == "track" else None
    mapping = policy.intake.events.get(name) if name is not None else None
    if mapping is None:
        return None
    row: dict[str, Any] = {
        policy.identity.column: m.user_id,
        # Segment always sends one (its receive time if the source gave none); fall back likewise.
        policy.events.timestamp: m.timestamp or received,
        "event_type": mapping.type,
    }
    for field, dotted in mapping.fields.items():
        row[field] = _text(_path(m, dotted), policy, field, "events")
    return row


def _profile_row(policy: IngestPolicy, m: Message) -> dict[str, Any] | None:
    """An identify message's mapped traits as a profile patch row (only the traits it carries)."""
    assert policy.intake is not None
    if m.type != "identify" or not policy.intake.traits:
        return None
    row: dict[str, Any] = {}
    for column, dotted in policy.intake.traits.items():
        value = _path(m, dotted)
        if value is not None:
            row[column] = _text(value, policy, column, "profiles")
    return {policy.identity.column: m.user_id, **row} if row else None


def _text(value: Any, policy: IngestPolicy, column: str, kind: str) -> str | None:
    """A JSON value as the text a file would carry (lists joined by the attribute's separator)."""
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        spec = (policy.profiles if kind == "profiles" else policy.events).attributes.get(column)
        separator = getattr(spec, "separator", ";")
        return separator.join(str(v) for v in value)
    return str(value)


Row = tuple[dict[str, Any], str]  # a text row and its message's key


@dataclass
class _Sorted:
    """A batch's new messages by what becomes of them."""

    events: list[Row]
    profiles: dict[tuple[str, ...], list[Row]]  # by the set of columns carried
    skipped: list[str]
    duplicates: int


def _sort(
    store: Store, policy: IngestPolicy, messages: list[Message], keys: list[str], now: datetime
) -> _Sorted:
    marks = ",".join("?" * len(keys))
    query = f"SELECT message_key FROM intake_messages WHERE message_key IN ({marks})"
    seen = {r[0] for r in store.conn.execute(query, keys)}
    out = _Sorted([], {}, [], 0)
    for m, k in zip(messages, keys, strict=True):
        if k in seen:
            out.duplicates += 1
            continue
        seen.add(k)  # a repeat inside the batch is a duplicate too
        event = _event_row(policy, m, now.isoformat()) if m.user_id else None
        profile = _profile_row(policy, m) if m.user_id else None
        if event is not None:
            out.events.append((event, k))
        elif profile is not None:
            out.profiles.setdefault(tuple(sorted(profile)), []).append((profile, k))
        else:
            out.skipped.append(k)
    return out


def ingest_batch(
    *, store: Store, keyset: Keyset, policy: IngestPolicy, batch: IntakeBatch, now: datetime | None = None
) -> IntakeResult:
    """Store the new, mapped messages of ``batch``: its identify calls as profile patches (one batch per
    set of traits carried, so a trait a call leaves out is left alone), its tracked events as one events
    batch. Each kind is stored all or nothing with its messages' ids; a message is stored once."""
    if policy.intake is None:
        raise InvalidInput("live intake is not configured: add an intake section to policies/ingest.yaml")
    now = now or datetime.now(UTC)
    keys = [message_key(keyset, m.message_id) for m in batch.batch]
    version = store.bind(keyset=keyset, id_type=policy.identity.type.value)
    pseudonymizer = Pseudonymizer(keyset, policy.identity.type, version)
    with store.writer_lock():
        found = _sort(store, policy, batch.batch, keys, now)
        # Skipped messages are done (a retry changes nothing): recorded with the first stored batch.
        pending = list(found.skipped)
        people = 0
        if found.profiles:
            people = _store_profiles(
                store, keyset, policy, pseudonymizer, version, found.profiles, pending, now
            )
            pending = []
        stored_events, expired, batch_id = 0, 0, None
        if found.events:
            stored_events, expired, batch_id = _store_events(
                store, keyset, policy, pseudonymizer, version, found.events, pending, now
            )
            pending = []
        _record(store, pending, None, now)
        if stored_events:
            merge_intake_locked(store, keyset, MERGE_AT)
    return IntakeResult(
        len(batch.batch), stored_events, people, found.duplicates, len(found.skipped), expired, batch_id
    )


def merge_intake_locked(store: Store, keyset: Keyset, at_least: int) -> int:
    """Merge the intake event batches into one when there are ``at_least`` (caller holds the writer
    lock); returns how many were merged. The merged batch keeps the newest one's place and source."""
    intake = intake_batches(store)
    if len(intake) < max(at_least, 2):
        return 0
    store.rewrite(
        merge_changes(store, intake),
        keyset=keyset,
        event="compaction",
        details={"intake_batches_merged": len(intake)},
    )
    return len(intake)


def intake_batches(store: Store) -> list[Batch]:
    return [b for b in store.batches("events") if b.source == SOURCE]


def merge_changes(
    store: Store, intake: list[Batch], keep: Callable[[pl.DataFrame], pl.DataFrame] = lambda frame: frame
) -> list[Rewrite]:
    """The rewrites that make ``intake`` one batch (the newest one's place and source), holding
    ``keep`` of their events."""
    merged = keep(pl.concat([pl.read_parquet(store.path_of(b)) for b in intake], how="diagonal_relaxed"))
    return [Rewrite(b, None) for b in intake[:-1]] + [Rewrite(intake[-1], merged)]


def _store_profiles(
    store: Store,
    keyset: Keyset,
    policy: IngestPolicy,
    pseudonymizer: Pseudonymizer,
    version: int,
    groups: dict[tuple[str, ...], list[Row]],
    pending: list[str],
    now: datetime,
) -> int:
    items = []
    for columns, group in groups.items():
        raw = pl.DataFrame([r for r, _k in group], schema=dict.fromkeys(columns, pl.String))
        frame, result = transform(
            raw,
            kind="profiles",
            policy=policy,
            pseudonymizer=pseudonymizer,
            source="intake identify",
            now=now,
        )
        items.append(_new_batch(keyset, frame, [k for _r, k in group], result.people))
    done = pending + [k for group in groups.values() for _r, k in group]
    store.add_batches(
        kind="profiles", items=items, key_version=version, keyset=keyset, also=_recorder(store, done, now)
    )
    return sum(i.frame.height for i in items)


def _store_events(
    store: Store,
    keyset: Keyset,
    policy: IngestPolicy,
    pseudonymizer: Pseudonymizer,
    version: int,
    events: list[Row],
    pending: list[str],
    now: datetime,
) -> tuple[int, int, int | None]:
    """(events stored, events past retention, batch id)."""
    columns = [policy.identity.column, policy.events.timestamp, *policy.events.attributes]
    raw = pl.DataFrame(
        [{c: r.get(c) for c in columns} for r, _k in events], schema=dict.fromkeys(columns, pl.String)
    )
    frame, result = transform(
        raw, kind="events", policy=policy, pseudonymizer=pseudonymizer, source="intake batch", now=now
    )
    done = pending + [k for _r, k in events]
    if frame.height == 0:
        _record(store, done, None, now)  # every event past retention: nothing stored
        return 0, result.expired_events, None
    item = _new_batch(keyset, frame, [k for _r, k in events], result.people)
    (stored,) = store.add_batches(
        kind="events", items=[item], key_version=version, keyset=keyset, also=_recorder(store, done, now)
    )
    return frame.height, result.expired_events, stored.id


def _recorder(store: Store, keys: list[str], now: datetime) -> Callable[[list[Batch]], None]:
    """Records ``keys`` in the transaction that records the batches (Store.add_batches' ``also``)."""

    def record(batches: list[Batch]) -> None:
        _insert(store, keys, batches[0].id, now)

    return record


def _new_batch(keyset: Keyset, frame: pl.DataFrame, keys: list[str], people: int) -> NewBatch:
    content = hmac.new(keyset.derived_key("intake-batch"), "".join(sorted(keys)).encode(), hashlib.sha256)
    return NewBatch(frame, content.hexdigest(), SOURCE, people, {"source": "intake", "rows": frame.height})


def _insert(store: Store, keys: list[str], batch_id: int | None, now: datetime) -> None:
    store.conn.executemany(
        "INSERT INTO intake_messages (message_key, batch_id, received_at) VALUES (?, ?, ?)",
        [(k, batch_id, now.isoformat()) for k in keys],
    )


def _record(store: Store, keys: list[str], batch_id: int | None, now: datetime) -> None:
    if keys:
        with transaction(store.conn):
            _insert(store, keys, batch_id, now)
