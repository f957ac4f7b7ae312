"""Membership snapshots: every active segment evaluated for every person, in one pass.

A snapshot is a Parquet file (``pid`` plus one Boolean column per segment; Parquet bit-packs them)
under ``data/snapshots/``, recorded in SQLite with its ``as_of``, the batches it read and the
definition versions it used. It never leaves the server: releases aggregate it under DP. A snapshot
is stale when batches or definitions have changed since; the last few are kept so that later
reports can show movement between segments over time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from privseg import audit, fsutil
from privseg.db import transaction
from privseg.errors import Conflict, NotFound, StoreError
from privseg.keyset import Keyset
from privseg.segments import features as feature_engine
from privseg.segments import staging
from privseg.segments.compiler import Compiler, Plan
from privseg.segments.definitions import Stored, active
from privseg.store import Store

log = logging.getLogger(__name__)
KEEP_SNAPSHOTS = 5


@dataclass(frozen=True)
class Snapshot:
    """One recorded snapshot. Its dicts and lists are shared by every reader of the same row (see
    :func:`_loads`): read them, never change them."""

    id: int
    as_of: str
    computed_at: str
    file: str | None
    people: int
    segments: dict[str, int]
    traits: dict[str, int]
    batches: list[int]
    policy_hash: str | None = None  # the policy set it was computed under (None: before categories)
    categories: dict[str, list[str]] | None = None  # each segment's effective categories under it
    key_version: int | None = None  # the pseudonym key version of its pids

    def public(self) -> dict[str, Any]:
        """What callers may see. Not the file name (a new one is written when an erasure removes
        somebody) and not the exact head count (a non-DP aggregate)."""
        return {
            "id": self.id,
            "as_of": self.as_of,
            "computed_at": self.computed_at,
            "pruned": self.file is None,
            "segments": self.segments,
            "traits": self.traits,
            "batches": self.batches,
            "policy_hash": self.policy_hash,
            "key_version": self.key_version,
        }


Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def load(
    plan: Plan, compiler: Compiler, store: Store, group: range | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The profile and event columns ``plan`` reads, up to its ``as_of``: of everyone, or of the
    people in the shards of ``group``."""
    profiles_lf, events_lf = store.scan_profiles(group), store.scan_events(group)
    wanted = plan.profile_columns()
    if profiles_lf is not None:
        available = profiles_lf.collect_schema().names()
        profiles = profiles_lf.select([c for c in wanted if c in available]).collect()
    else:
        profiles = pl.DataFrame(schema={"pid": pl.String})
    # An attribute no batch has carried yet (patch batches carry only their columns) is unknown.
    profiles = profiles.with_columns(
        pl.lit(None, dtype=compiler.schema.profile[c].dtype()).alias(c)
        for c in wanted
        if c not in profiles.columns and c in compiler.schema.profile
    )
    if events_lf is not None:
        events = events_lf.select(plan.event_columns()).filter(pl.col("ts") <= plan.as_of).collect()
    else:
        events = pl.DataFrame(
            schema={"pid": pl.String, "ts": feature_engine.TS_DTYPE, "event_type": pl.String}
        )
    return profiles, events


def membership(
    compiler: Compiler, store: Store, as_of: datetime, progress: Progress = _quiet
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Evaluate every active segment for every person in the store (see :func:`evaluate`)."""
    t0 = time.perf_counter()
    plan = compiler.compile(as_of)
    progress(f"loading the store for {len(plan.segments)} segments")
    profiles, events = load(plan, compiler, store)
    load_time = time.perf_counter() - t0
    progress(
        f"computing {len(plan.features)} features over {events.height:,} events and evaluating "
        f"{len(plan.segments)} segments for {profiles.height:,}+ people"
    )
    members, timings = evaluate(plan, profiles=profiles, events=events)
    return members, {"load": load_time, **timings}


Runner = Callable[[Compiler, Store, datetime, Path, Progress], dict[str, float]]
"""Computes the membership of every active segment at an instant and writes it into a staging
folder as Parquet parts (``pid`` plus one Boolean column per segment; every person in exactly one
part); returns its timings. See :func:`local_runner`, segments/sharded.py and privseg/spark/."""


def local_runner(
    compiler: Compiler, store: Store, as_of: datetime, folder: Path, progress: Progress = _quiet
) -> dict[str, float]:
    """The whole store in memory at once: the fastest while it fits."""
    members, timings = membership(compiler, store, as_of, progress)
    staging.write_members(members, folder / "part-00000.parquet")
    return timings


def evaluate(
    plan: Plan, *, profiles: pl.DataFrame, events: pl.DataFrame
) -> tuple[pl.DataFrame, dict[str, float]]:
    """``pid`` plus one Boolean column per segment of ``plan``, for everyone in ``profiles`` or
    ``events`` (one row per pid in profiles; events after the plan's ``as_of`` are ignored)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    as_of = plan.as_of
    events = events.filter(pl.col("ts") <= as_of)
    # One person index: the profiles in their order, then people known only from events (in pid
    # order). One left join maps events onto it; people without a profile are looked for only among
    # the events it left unmatched. (At 10M events: 0.7 s, where a distinct over every event's pid,
    # an anti join and an inner join took 3.4 s.)
    person = profiles.with_row_index("pidx")
    events = events.join(person.select("pid", "pidx"), on="pid", how="left", maintain_order="left")
    unmatched = events.filter(pl.col("pidx").is_null())
    if unmatched.height:
        extra = unmatched.select(pl.col("pid").unique().sort())
        person = pl.concat([profiles, extra], how="diagonal_relaxed").with_row_index("pidx")
        events = events.drop("pidx").join(
            person.select("pid", "pidx"), on="pid", how="left", maintain_order="left"
        )
        # An event without a pid (never stored: ingest refuses it) matches no one, not a person index.
        events = events.filter(pl.col("pidx").is_not_null())
    pids = person.get_column("pid")
    events = events.drop("pid")
    timings["index"] = time.perf_counter() - t

    t = time.perf_counter()
    columns = feature_engine.compute(plan.features, events=events, pids=pids, as_of=as_of)
    timings["features"] = time.perf_counter() - t

    t = time.perf_counter()
    categorical = [c for c in plan.categorical if c in person.columns]
    frame = person.with_columns(*columns.values(), pl.col(categorical).cast(pl.Categorical)).lazy()
    # Shared columns first (each distinct property condition and trait score, then referenced
    # segments level by level), so no segment recomputes what another already did.
    for stage in [plan.derived, *plan.shared]:
        if stage:
            frame = frame.with_columns(expr.alias(name) for name, expr in stage.items())
    members = frame.select(pl.col("pid"), *[expr.alias(sid) for sid, expr in plan.segments.items()]).collect()
    timings["evaluate"] = time.perf_counter() - t
    timings["features_count"] = len(plan.features)
    return members, timings


def compute_snapshot(
    *,
    store: Store,
    compiler: Compiler,
    keyset: Keyset,
    as_of: datetime | None = None,
    progress: Progress = _quiet,
    runner: Runner = local_runner,
) -> tuple[Snapshot, dict[str, float]]:
    """Compute and record a snapshot of every active segment at ``as_of`` (default: now, UTC)."""
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC)
    conn = store.conn
    defs = active(conn)
    batches = [b.id for b in store.batches()]
    seg_versions = {i: s.version for (k, i), s in defs.items() if k == "segment"}
    trait_versions = {i: s.version for (k, i), s in defs.items() if k == "trait"}
    with staging.folder(store.data_dir) as stage:
        timings = runner(compiler, store, as_of, stage, progress)
        parts = staging.parts(stage)
        progress(f"writing the snapshot ({len(seg_versions)} segments, {len(parts)} part(s))")

        folder = fsutil.private_dir(store.data_dir / "snapshots")
        categories = {sid: list(compiler.effective(sid).categories) for sid in seg_versions}
        policy_hash = compiler.categories.content_hash
        key_version = store.key_version()
        computed_at = datetime.now(UTC).isoformat(timespec="seconds")
        t = time.perf_counter()
        # Under the store's writer lock, so that clearing files left by a snapshot writer that crashed
        # before its commit can never delete the file another writer is about to record.
        with store.writer_lock():
            _remove_unrecorded(conn, folder)
            staging.sweep(store.data_dir)
            final, people = _publish_parts(folder, as_of, parts, [*seg_versions])
            snap = _record(
                conn,
                keyset,
                final,
                Snapshot(
                    0,
                    as_of.isoformat(),
                    computed_at,
                    final.name,
                    people,
                    seg_versions,
                    trait_versions,
                    batches,
                    policy_hash,
                    categories,
                    key_version,
                ),
            )
            _remove_unrecorded(conn, folder)  # the ones just pruned
    timings["write"] = time.perf_counter() - t
    log.info("snapshot %d: %d segments over %d people", snap.id, len(seg_versions), people)
    return snap, timings


def _publish_parts(folder: Path, as_of: datetime, parts: list[Path], segments: list[str]) -> tuple[Path, int]:
    """Publish a computation's parts as one snapshot file under a new name; the file and its row
    count. Every part must have exactly ``pid`` and the segment columns (a part from an engine that
    lost or added a column would shift every release read by name)."""
    expected = ["pid", *segments]
    for part in parts:
        names = pl.read_parquet_schema(part)
        if sorted(names) != sorted(expected):
            raise StoreError(f"a membership part does not have the snapshot's columns ({part.name})")
    final = folder / f"{as_of:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = fsutil.tmp_path_for(final)
    if not parts:
        pl.DataFrame(schema={"pid": pl.String, **dict.fromkeys(segments, pl.Boolean)}).write_parquet(tmp)
    elif len(parts) == 1:
        os.replace(parts[0], tmp)  # same file system: the staging folder is inside the data directory
    else:
        # Streamed part by part: memory stays at one part's size, not the snapshot's.
        scans = [pl.scan_parquet(p).select(expected) for p in parts]
        pl.concat(scans, how="vertical").sink_parquet(tmp, **staging.PARQUET)
    fsutil.publish(tmp, final)
    people = int(pl.scan_parquet(final).select(pl.len()).collect().item())
    return final, people


def _record(conn: sqlite3.Connection, keyset: Keyset, final: Path, snap: Snapshot) -> Snapshot:
    """Insert the snapshot row (``snap`` without its id) and its audit entry, and prune old snapshots,
    in one transaction; the snapshot with its id."""
    try:
        with transaction(conn):
            cur = conn.execute(
                "INSERT INTO snapshots (as_of, computed_at, file, people, segments, traits, batches, "
                "policy_hash, categories, key_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    snap.as_of,
                    snap.computed_at,
                    snap.file,
                    snap.people,
                    json.dumps(snap.segments),
                    json.dumps(snap.traits),
                    json.dumps(snap.batches),
                    snap.policy_hash,
                    json.dumps(snap.categories),
                    snap.key_version,
                ),
            )
            snap = dataclasses.replace(snap, id=int(cur.lastrowid or 0))
            audit.append(
                conn,
                keyset,
                "snapshot",
                {
                    "snapshot": snap.id,
                    "as_of": snap.as_of,
                    "segments": len(snap.segments),
                    "batches": len(snap.batches),
                    "policy_hash": snap.policy_hash,
                },
            )
            conn.execute(
                "UPDATE snapshots SET file = NULL WHERE file IS NOT NULL AND id NOT IN "
                "(SELECT id FROM snapshots WHERE file IS NOT NULL ORDER BY id DESC LIMIT ?)",
                (KEEP_SNAPSHOTS,),
            )
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return snap


def _write_file(folder: Path, as_of: datetime, members: pl.DataFrame) -> Path:
    """Write a snapshot file crash-safely under a new, unique name (never reused: caches key on it)."""
    final = folder / f"{as_of:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = fsutil.tmp_path_for(final)
    staging.write_members(members, tmp)
    fsutil.publish(tmp, final)
    return final


def _remove_unrecorded(conn: sqlite3.Connection, folder: Path) -> None:
    """Delete snapshot files no row refers to: pruned ones, and any a crashed writer left."""
    recorded = {r[0] for r in conn.execute("SELECT file FROM snapshots WHERE file IS NOT NULL")}
    for path in folder.iterdir():
        if path.name not in recorded:
            path.unlink()


def _row(r: tuple[Any, ...]) -> Snapshot:
    return Snapshot(
        int(r[0]),
        r[1],
        r[2],
        r[3],
        int(r[4]),
        _loads(r[5]),
        _loads(r[6]),
        _loads(r[7]),
        r[8],
        None if r[9] is None else _loads(r[9]),
        None if r[10] is None else int(r[10]),
    )


# A snapshot's segments, traits, batches and categories never change once recorded (a rewrite changes
# its file, people and key version only), and every release request reads the latest snapshot: at
# 2,000 segments, parsing those columns took 0.9 ms per read, more than a whole cached report. The
# parsed values of the last few distinct texts are kept and shared by every reader, found by comparing
# the text itself (a few microseconds): never by snapshot id, which another database reuses. Readers
# must not mutate them.
_PARSED_KEPT = 16
_parsed: list[tuple[str, Any]] = []  # most recently parsed first
_parsed_lock = threading.Lock()


def _loads(text: str) -> Any:
    with _parsed_lock:
        for kept, value in _parsed:
            if kept == text:
                return value
    value = json.loads(text)
    with _parsed_lock:
        _parsed.insert(0, (text, value))
        del _parsed[_PARSED_KEPT:]
    return value


_COLUMNS = (
    "id, as_of, computed_at, file, people, segments, traits, batches, policy_hash, categories, key_version"
)


def snapshots(conn: sqlite3.Connection) -> list[Snapshot]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
    return [_row(r) for r in rows]


def latest(conn: sqlite3.Connection) -> Snapshot | None:
    # One row, not every snapshot ever computed: every release asks (rows outlive their pruned files).
    row = conn.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else _row(row)


def get(conn: sqlite3.Connection, snapshot_id: int) -> Snapshot | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    return None if row is None else _row(row)


def staleness(store: Store, snap: Snapshot | None, *, policy_hash: str) -> list[str]:
    """Why the snapshot no longer reflects the store, definitions and policy set (empty: current)."""
    if snap is None:
        return ["no snapshot has been computed"]
    reasons = []
    if snap.policy_hash != policy_hash:
        reasons.append("the category policies changed since it was computed (consent and categories)")
    if sorted(snap.batches) != sorted(b.id for b in store.batches()):
        reasons.append("data batches changed since it was computed")
    defs: dict[tuple[str, str], Stored] = dict(active(store.conn))  # type: ignore[arg-type]
    segs = {i: s.version for (k, i), s in defs.items() if k == "segment"}
    traits = {i: s.version for (k, i), s in defs.items() if k == "trait"}
    if segs != snap.segments or traits != snap.traits:
        reasons.append("segment or trait definitions changed since it was computed")
    return reasons


def snapshot_path(store: Store, snap: Snapshot) -> Path:
    if snap.file is None:
        raise NotFound(f"snapshot {snap.id} was pruned (only the last {KEEP_SNAPSHOTS} are kept)")
    return store.data_dir / "snapshots" / snap.file


@dataclass(frozen=True)
class Rekeyed:
    """A kept snapshot rewritten under a new key version, not yet recorded."""

    snapshot_id: int
    old_file: str
    new_file: str


def rekey_files(store: Store, rekey: Callable[[pl.Series], pl.Series]) -> list[Rekeyed]:
    """Write every kept snapshot again with ``rekey`` applied to its pids (key rotation), under new
    names. Nothing is recorded: :func:`record_rekeyed` does that inside the rotation's transaction,
    so the store and its snapshots move to the new key together. Caller holds the writer lock."""
    folder = store.data_dir / "snapshots"
    out: list[Rekeyed] = []
    try:
        for snap in snapshots(store.conn):
            if snap.file is None:
                continue
            members = pl.read_parquet(folder / snap.file)
            rekeyed = members.with_columns(rekey(members.get_column("pid")).alias("pid"))
            new = _write_file(folder, datetime.fromisoformat(snap.as_of), rekeyed)
            out.append(Rekeyed(snap.id, snap.file, new.name))
    except BaseException:
        discard_rekeyed(store, out)
        raise
    return out


def record_rekeyed(conn: sqlite3.Connection, rekeyed: list[Rekeyed], key_version: int) -> None:
    """Point the snapshot rows at their re-keyed files. Call inside the rotation's transaction."""
    for r in rekeyed:
        moved = conn.execute(
            "UPDATE snapshots SET file = ?, key_version = ? WHERE id = ? AND file = ?",
            (r.new_file, key_version, r.snapshot_id, r.old_file),
        ).rowcount
        if moved != 1:
            raise Conflict(f"snapshot {r.snapshot_id} changed while it was being re-keyed")


def discard_rekeyed(store: Store, rekeyed: list[Rekeyed], *, new: bool = True) -> None:
    """Delete the new files (rotation failed) or the old ones (it committed)."""
    folder = store.data_dir / "snapshots"
    for r in rekeyed:
        (folder / (r.new_file if new else r.old_file)).unlink(missing_ok=True)


def remove_person(store: Store, pids: set[str]) -> int:
    """Rewrite every kept snapshot without ``pids`` (erasure: the person's pseudonym under every key
    version still held, so a snapshot a crashed rotation left on an old key is cleaned too);
    returns how many held them.

    Each rewritten snapshot gets a new file name, so anything cached per snapshot file (the release
    dimension cache is aligned to row order) can never be used with the new rows. Caller holds the
    store's writer lock."""
    conn = store.conn
    folder = store.data_dir / "snapshots"
    changed = 0
    for snap in snapshots(conn):
        if snap.file is None:
            continue
        path = folder / snap.file
        members = pl.read_parquet(path)
        kept = members.filter(~pl.col("pid").is_in(list(pids)))
        if kept.height == members.height:
            continue
        name = _write_file(folder, datetime.fromisoformat(snap.as_of), kept).name
        with transaction(conn):
            conn.execute(
                "UPDATE snapshots SET file = ?, people = ? WHERE id = ?", (name, kept.height, snap.id)
            )
        path.unlink(missing_ok=True)
        changed += 1
    return changed
