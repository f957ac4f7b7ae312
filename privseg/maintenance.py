"""Store-wide rewrites: key rotation, erasure of a data subject, compaction with retention.

Each is one call to :meth:`Store.rewrite`: new files first, then a single transaction that swaps the
manifest and appends the audit entry, so a crash leaves the store entirely before or after.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from privseg import audit
from privseg.batches import Rewrite
from privseg.db import get_meta, transaction
from privseg.errors import Conflict, InvalidInput
from privseg.ingest.intake import intake_batches, merge_changes, merge_intake_locked
from privseg.keyset import Keyset, add_pseudonym_version, load_keyset, remove_pseudonym_versions
from privseg.policy.ingest import IngestPolicy
from privseg.pseudonym import Pseudonymizer, normalize
from privseg.segments import engine
from privseg.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationResult:
    from_version: int | None
    to_version: int
    batches_rewritten: int
    resumed: bool


def rotate_keys(*, store: Store, keyset_path: Path, policy: IngestPolicy) -> RotationResult:
    """Add a pseudonym key version and re-pseudonymize the whole store with it, atomically.

    If an earlier rotation added the key but stopped before the store moved (a crash), this finishes
    that rotation instead of adding yet another version.
    """
    with store.writer_lock():
        keyset = load_keyset(keyset_path)
        store.check_keyset(keyset)
        current = store.key_version()
        resumed = current is not None and current < keyset.primary
        if not resumed:
            keyset = add_pseudonym_version(keyset_path)
        target = keyset.primary
        if current is None:  # empty store: nothing to re-pseudonymize; it will bind on first ingest
            return RotationResult(None, target, 0, False)
        id_type = policy.identity.type
        if get_meta(store.conn, "id_type") != id_type.value:
            raise Conflict("the ingest policy's identity type differs from the store's; cannot rotate")
        old = Pseudonymizer(keyset, id_type, current)
        new = Pseudonymizer(keyset, id_type, target)
        changes = []
        for batch in store.batches():
            df = pl.read_parquet(store.path_of(batch))
            plain = old.decrypt_series(df.get_column("pid"))
            changes.append(Rewrite(batch, df.with_columns(new.encrypt_series(plain).alias("pid"))))

        # Kept snapshots move with the store: a movement release across the rotation would
        # otherwise put each person in two cells (old and new pseudonym), and erasure would miss them.
        rekeyed = engine.rekey_files(store, lambda pids: new.encrypt_series(old.decrypt_series(pids)))

        def unchanged_then_snapshots() -> None:
            if store.key_version() != current:
                raise Conflict("another rotation finished first")
            engine.record_rekeyed(store.conn, rekeyed, target)

        try:
            store.rewrite(
                changes,
                keyset=keyset,
                event="key_rotation",
                details={
                    "from_version": current,
                    "to_version": target,
                    "batches": len(changes),
                    "snapshots": len(rekeyed),
                },
                meta={"key_version": str(target)},
                key_version=target,
                check=unchanged_then_snapshots,
            )
        except BaseException:
            engine.discard_rekeyed(store, rekeyed)
            raise
        engine.discard_rekeyed(store, rekeyed, new=False)
        log.info("rotated pseudonyms from k%d to k%d over %d batches", current, target, len(changes))
        return RotationResult(current, target, len(changes), resumed)


def retire_keys(*, store: Store, keyset_path: Path) -> list[int]:
    """Delete pseudonym key versions nothing uses any more: not the store's, no batch's, no kept
    snapshot's (a rotation that has completed leaves the old version unused). Returns what went.

    With an old version gone, a pseudonym written under it can never be decrypted again; that is the
    point (a leaked old key reveals nothing new), and why only unused versions are retired."""
    with store.writer_lock():
        keyset = load_keyset(keyset_path)
        store.check_keyset(keyset)
        kept = [s for s in engine.snapshots(store.conn) if s.file is not None]
        if any(s.key_version is None for s in kept):
            raise Conflict("a kept snapshot predates key tracking: run `privseg segments compute` first")
        used = {b.key_version for b in store.batches()} | {keyset.primary}
        used |= {s.key_version for s in kept if s.key_version is not None}
        current = store.key_version()
        if current is not None:
            used.add(current)
        unused = set(keyset.pseudonym_keys) - used
        if unused:
            remove_pseudonym_versions(keyset_path, unused)
            with transaction(store.conn):
                audit.append(store.conn, keyset, "keys_retired", {"versions": sorted(unused)})
            log.info("retired pseudonym key versions %s", sorted(unused))
        return sorted(unused)


@dataclass(frozen=True)
class ErasureResult:
    profile_rows: int
    event_rows: int
    batches_rewritten: int
    snapshots_rewritten: int = 0

    @property
    def found(self) -> bool:
        return self.profile_rows + self.event_rows + self.snapshots_rewritten > 0


def erase_subject(*, store: Store, keyset: Keyset, policy: IngestPolicy, raw_id: str) -> ErasureResult:
    """Remove every row of one data subject, named by raw identifier (pseudonymized on the fly).

    The audit entry records that an erasure happened and how many rows went, never who it was.
    """
    normalized = normalize(raw_id, policy.identity.type)
    if not normalized:
        raise InvalidInput("the identifier to erase is empty after normalization")
    with store.writer_lock():
        version = store.key_version()
        if version is None:
            return ErasureResult(0, 0, 0)
        pid = Pseudonymizer(keyset, policy.identity.type, version).encrypt(normalized)
        every_pid = {
            Pseudonymizer(keyset, policy.identity.type, v).encrypt(normalized) for v in keyset.pseudonym_keys
        }
        changes: list[Rewrite] = []
        removed = {"profiles": 0, "events": 0}
        for batch in store.batches():
            path = store.path_of(batch)
            hits = pl.scan_parquet(path).filter(pl.col("pid") == pid).select(pl.len()).collect().item()
            if hits:
                df = pl.read_parquet(path).filter(pl.col("pid") != pid)
                changes.append(Rewrite(batch, df))
                removed[batch.kind] += int(hits)
        if changes:
            store.rewrite(
                changes,
                keyset=keyset,
                event="erasure",
                details={
                    "profile_rows": removed["profiles"],
                    "event_rows": removed["events"],
                    "batches": len(changes),
                },
            )
        # Also out of every kept membership snapshot (checked even when the batches were already
        # clean, so that an erasure interrupted between the two steps is finished by running it again).
        snapshots_changed = engine.remove_person(store, every_pid)
        if snapshots_changed and not changes:
            with transaction(store.conn):
                audit.append(store.conn, keyset, "erasure", {"snapshots": snapshots_changed})
    return ErasureResult(removed["profiles"], removed["events"], len(changes), snapshots_changed)


@dataclass(frozen=True)
class CompactionResult:
    profile_batches: int
    event_batches: int
    expired_events: int
    superseded_profiles: int


def compact(
    *, store: Store, keyset: Keyset, policy: IngestPolicy, now: datetime | None = None
) -> CompactionResult:
    """Merge profile batches (latest per pid wins), merge the small event batches of live intake into
    one, and drop events past retention."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=policy.retention_days)
    with store.writer_lock():
        changes: list[Rewrite] = []
        profiles = store.batches("profiles")
        superseded = 0
        if len(profiles) > 1:
            current = store.scan_profiles()
            assert current is not None
            merged = current.collect()
            superseded = sum(b.rows for b in profiles) - merged.height
            # The merged frame replaces the newest batch; the older ones are removed.
            changes += [Rewrite(b, None) for b in profiles[:-1]]
            changes.append(Rewrite(profiles[-1], merged))
        expired = 0
        intake = intake_batches(store)
        if len(intake) > 1:
            # Live intake appends one small batch per call: they become one (the newest), and retention
            # applies to it like to any other. Batches from files keep their own (their lineage matters).
            intake_changes = merge_changes(store, intake, lambda frame: frame.filter(pl.col("ts") >= cutoff))
            kept = intake_changes[-1].new
            assert kept is not None  # merge_changes puts the merged frame in the last rewrite
            expired += sum(b.rows for b in intake) - kept.height
            changes += intake_changes
        merged_ids = {b.id for b in intake} if len(intake) > 1 else set()
        for batch in store.batches("events"):
            if batch.id in merged_ids:
                continue
            if batch.min_ts is not None and datetime.fromisoformat(batch.min_ts) >= cutoff:
                continue  # nothing in this batch is old enough
            df = pl.read_parquet(store.path_of(batch))
            kept = df.filter(pl.col("ts") >= cutoff)
            if kept.height < df.height:
                expired += df.height - kept.height
                changes.append(Rewrite(batch, kept))
        if changes:
            store.rewrite(
                changes,
                keyset=keyset,
                event="compaction",
                details={"expired_events": expired, "superseded_profiles": superseded},
            )
    return CompactionResult(len(profiles), len(store.batches("events")), expired, superseded)


def compact_intake(*, store: Store, keyset: Keyset, at_least: int = 2) -> int:
    """Merge live intake's small event batches into one when there are ``at_least`` of them (the
    server's refresher runs this); returns how many were merged. Nothing else is touched."""
    with store.writer_lock():
        return merge_intake_locked(store, keyset, at_least)


def reidentify(*, store: Store, keyset: Keyset, policy: IngestPolicy, pseudonym: str, reason: str) -> str:
    """The one audited way back from a pseudonym to the (normalized) identifier: CLI only, for whoever
    holds the keyset file, with a stated reason. The audit entry records the reason and a hash of the
    pseudonym (enough to match it to a record under review), never the identifier."""
    reason, pseudonym = reason.strip(), pseudonym.strip()
    if len(reason) < 15:
        raise InvalidInput("state the reason for re-identification (at least 15 characters; it is audited)")
    identifier = Pseudonymizer(keyset, policy.identity.type).decrypt(pseudonym)
    with transaction(store.conn):
        digest = hashlib.sha256(pseudonym.encode()).hexdigest()[:16]
        audit.append(store.conn, keyset, "reidentification", {"reason": reason, "pseudonym_sha256": digest})
    return identifier
