"""The pseudonymized store: one Parquet file per batch, recorded in the SQLite manifest.

Write protocol (a crash at any point leaves the whole batch or none of it):
1. write the Parquet file under a temporary name, fsync it, rename it to its final name, fsync the
   directory;
2. in one SQLite transaction, insert the manifest row and the audit entry.
Readers only ever open files the manifest lists, so a file that was renamed but never recorded is
invisible; :meth:`Store.recover` deletes such orphans (and temporaries) under the writer lock.
Rewrites (erasure, key rotation, compaction) follow the same protocol: new files first, then one
transaction that swaps every manifest row at once, then the old files are deleted.
"""

from __future__ import annotations

import fcntl
import hmac
import logging
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from privseg import audit, fsutil, shards
from privseg.batches import BATCH_COLUMNS, KINDS, Batch, Kind, NewBatch, Rewrite, batch_from_row
from privseg.db import get_meta, set_meta, transaction
from privseg.errors import Conflict, KeysetError, StoreError
from privseg.keyset import Keyset

log = logging.getLogger(__name__)


ROW_GROUP_ROWS = 64 * 1024
# zstd's fastest level: 2% larger files than the default (3) and 0.4-0.8 s less per 10M events
# (measured on a 1M-customer batch: 124 vs 122 MB, 2.7 vs 3.1 s). Pseudonyms are random text that no
# level compresses, and the store is written far more often than it is archived.
COMPRESSION_LEVEL = 1
_VERIFIED: set[str] = set()  # data directories whose listed files this process has checked
_PREPARED: set[str] = set()  # data directories this process has made (private) already


class Store:
    def __init__(
        self, conn: sqlite3.Connection, data_dir: Path, *, new_shards: int = shards.DEFAULT_SHARDS
    ) -> None:
        self.conn = conn
        self.data_dir = data_dir
        self._new_shards = shards.check_count(new_shards)  # for a new store; an existing one keeps its own
        # Once per process and directory: a server opens a Store per request, and the mkdir/chmod
        # calls were 5% of a cached release's time.
        key = str(data_dir)
        if key not in _PREPARED:
            fsutil.private_dir(data_dir)  # (mkdir's mode applies to the leaf only, not to parents)
            for kind in KINDS:
                fsutil.private_dir(data_dir / kind)
            _PREPARED.add(key)

    # -- identity binding --------------------------------------------------------------------
    def shard_count(self) -> int:
        """How many person shards the store's files are partitioned into (fixed when it is created,
        recorded in the manifest; see shards.py)."""
        value = get_meta(self.conn, "shards")
        return self._new_shards if value is None else int(value)

    def _record_shard_count(self) -> int:
        """The shard count, recorded before the first file is written with it: every file of a
        store must use the same count, whatever a later process is configured with."""
        if get_meta(self.conn, "shards") is None:
            with nullcontext() if self.conn.in_transaction else transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('shards', ?) ON CONFLICT(key) DO NOTHING",
                    (str(self._new_shards),),
                )
        return self.shard_count()

    def key_version(self) -> int | None:
        value = get_meta(self.conn, "key_version")
        return None if value is None else int(value)

    def bind(self, *, keyset: Keyset, id_type: str) -> int:
        """The key version to pseudonymize with; binds an empty store to the keyset on first use.

        The store, not the keyset, says which version its pseudonyms use: a rotation that crashed
        half-way leaves the store on the old version, and ingestion keeps using it until
        ``privseg keys rotate`` finishes (see rekey.py).
        """
        self.check_keyset(keyset)
        with transaction(self.conn):
            namespace = get_meta(self.conn, "namespace")
            if namespace is None:
                set_meta(self.conn, "namespace", keyset.namespace)
                set_meta(self.conn, "id_type", id_type)
                set_meta(self.conn, "key_version", str(keyset.primary))
                self._record_shard_count()
                return keyset.primary
            if namespace != keyset.namespace:
                raise Conflict(
                    f"this store belongs to namespace {namespace!r} but the keyset is for "
                    f"{keyset.namespace!r}: wrong keyset or wrong PRIVSEG_HOME"
                )
            stored_type = get_meta(self.conn, "id_type")
            if stored_type != id_type:
                raise Conflict(
                    f"the store's pseudonyms are of identifier type {stored_type!r} but the ingest "
                    f"policy now says {id_type!r}; changing it needs a re-pseudonymization"
                )
            version = int(get_meta(self.conn, "key_version") or keyset.primary)
            keyset.pseudonym_key(version)  # the keyset must still hold it
            return version

    def check_keyset(self, keyset: Keyset) -> None:
        """Refuse a keyset whose keys are not the ones this store was written with.

        The store records a fingerprint (see :meth:`Keyset.fingerprint`) of the audit key and of every
        pseudonym key version the first time it sees them; a keyset with the same namespace and
        versions but other key bytes (another deployment's, or a lost one re-created) would otherwise
        be accepted and quietly find nobody (erasure: "no data for that identifier")."""
        wanted = {"key_fp.audit": keyset.fingerprint()}
        wanted |= {f"key_fp.{v}": keyset.fingerprint(v) for v in keyset.pseudonym_keys}
        recorded = dict(self.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'key_fp.%'").fetchall())
        for name, fp in wanted.items():
            if name in recorded and not hmac.compare_digest(recorded[name], fp):
                what = "audit key" if name == "key_fp.audit" else f"pseudonym key version {name[7:]}"
                raise KeysetError(
                    f"the keyset does not match this store: its {what} differs from the one the store "
                    "was written with (wrong PRIVSEG_KEYSET, or a keyset from another deployment); "
                    "refusing to use it"
                )
        version = self.key_version()
        if version is not None and f"key_fp.{version}" not in wanted:
            raise KeysetError(
                f"the store's pseudonyms use key version {version}, which the keyset does not hold"
            )
        if set(wanted) - set(recorded):
            # Trust on first use of a version; may run inside a caller's transaction (the keyset is
            # loaded lazily), in which case it commits with it.
            with nullcontext() if self.conn.in_transaction else transaction(self.conn):
                for name, fp in wanted.items():
                    self.conn.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (name, fp)
                    )

    # -- reading -----------------------------------------------------------------------------
    def batches(self, kind: Kind | None = None) -> list[Batch]:
        if kind is None:
            rows = self.conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY seq, id").fetchall()
        else:
            rows = self.conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE kind = ? ORDER BY seq, id", (kind,)
            ).fetchall()
        return [batch_from_row(r) for r in rows]

    @property
    def legacy_content_ids(self) -> bool:
        """Whether the store recorded content under the HMAC-SHA256 ids of earlier privseg versions
        (set by the schema migration that introduced keyed BLAKE3 ids)."""
        return get_meta(self.conn, "legacy_content_ids") == "1"

    def find_content(self, kind: Kind, content_id: str) -> int | None:
        """The batch id under which this content was first ingested, or None if it never was."""
        row = self.conn.execute(
            "SELECT first_batch FROM contents WHERE kind = ? AND content_id = ?", (kind, content_id)
        ).fetchone()
        return None if row is None else int(row[0])

    def path_of(self, batch: Batch) -> Path:
        return self.data_dir / batch.kind / batch.file

    def _scan(self, batch: Batch, group: range | None) -> pl.LazyFrame:
        """One batch file, without its shard column; with ``group``, only the rows of those shards
        (files written before sharding carry no shard column: it is computed from the pid)."""
        frame = pl.scan_parquet(self.path_of(batch))
        if group is None:
            return frame.drop(shards.SHARD, strict=False)
        if shards.SHARD not in frame.collect_schema():
            frame = frame.with_columns(shards.shard_expr(self.shard_count()))
        return frame.filter(shards.in_group(group)).drop(shards.SHARD)

    def scan_events(self, group: range | None = None) -> pl.LazyFrame | None:
        """All stored events, or those of the people in the shards of ``group`` (None when there are
        none)."""
        frames = [self._scan(b, group) for b in self.batches("events")]
        if not frames:
            return None
        return pl.concat(frames, how="diagonal_relaxed")

    def scan_profiles(self, group: range | None = None) -> pl.LazyFrame | None:
        """Current profiles, of everyone or of the people in the shards of ``group``."""
        return merge_profiles([self._scan(b, group) for b in self.batches("profiles")])

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(os.open(self.data_dir / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o600), "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Serialize writers across processes (CLI and server may write at the same time), first
        clearing what an interrupted writer left behind."""
        with self._lock():
            self._recover_locked()
            yield

    def _write_file(self, kind: Kind, df: pl.DataFrame) -> tuple[str, Path]:
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
        final = self.data_dir / kind / name
        tmp = fsutil.tmp_path_for(final)
        # Sorted by shard in row groups small enough that a reader of a few shards skips the rest.
        sharded = shards.by_shard(df.drop(shards.SHARD, strict=False), self._record_shard_count())
        sharded.sink_parquet(
            tmp,
            compression="zstd",
            compression_level=COMPRESSION_LEVEL,
            statistics=True,
            row_group_size=ROW_GROUP_ROWS,
        )
        fsutil.publish(tmp, final)
        return name, final

    @staticmethod
    def _summary(kind: Kind, df: pl.DataFrame, people: int | None) -> tuple[int, int, str | None, str | None]:
        if people is None:
            people = df.get_column("pid").n_unique() if df.height else 0
        min_ts = max_ts = None
        if kind == "events" and df.height:
            lo, hi = df.get_column("ts").min(), df.get_column("ts").max()
            min_ts = None if lo is None else str(lo)
            max_ts = None if hi is None else str(hi)
        return df.height, people, min_ts, max_ts

    def _insert(
        self,
        kind: Kind,
        name: str,
        df: pl.DataFrame,
        key_version: int,
        people: int | None = None,
        seq: int | None = None,
        source: str | None = None,
    ) -> Batch:
        """Record a batch file; ``seq`` and ``source`` are those of the batch it rewrites (seq None: a
        new batch, last in ingestion order)."""
        rows, people, min_ts, max_ts = self._summary(kind, df, people)
        at = datetime.now(UTC).isoformat(timespec="seconds")
        cur = self.conn.execute(
            "INSERT INTO batches (kind, file, rows, people, min_ts, max_ts, key_version, written_at, seq, "
            "source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, name, rows, people, min_ts, max_ts, key_version, at, seq, source),
        )
        assert cur.lastrowid is not None
        if seq is None:
            seq = int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()[0])
            self.conn.execute("UPDATE batches SET seq = ? WHERE id = ?", (seq, cur.lastrowid))
        return Batch(cur.lastrowid, kind, name, rows, people, min_ts, max_ts, key_version, at, seq, source)

    def lineage(self, kind: Kind, source: str) -> list[Batch]:
        """The stored batches that came from the source bytes with this keyed hash."""
        return [b for b in self.batches(kind) if b.source == source]

    def add_batches(
        self,
        *,
        kind: Kind,
        items: Sequence[NewBatch],
        key_version: int,
        keyset: Keyset,
        also: Callable[[list[Batch]], None] | None = None,
    ) -> list[Batch]:
        """Store pseudonymized batches atomically: every file is written and published first, then one
        transaction records them all with their audit entries, and removes the batches each one
        ``replaces`` (the same source stored under an earlier policy). ``also`` runs inside that
        transaction with the new batches (live intake records its message ids there), and may raise
        to abort it. Caller holds :meth:`writer_lock`."""
        written: list[tuple[str, Path]] = []
        replaced: list[Batch] = []
        try:
            for item in items:
                written.append(self._write_file(kind, item.frame))
            batches: list[Batch] = []
            with transaction(self.conn):
                for item, (name, _path) in zip(items, written, strict=True):
                    if self.find_content(kind, item.content_id) is not None:
                        raise Conflict("this content was ingested concurrently by another writer")
                    for old in item.replaces:
                        gone = self.conn.execute(
                            "DELETE FROM batches WHERE id = ? AND file = ?", (old.id, old.file)
                        ).rowcount
                        if gone != 1:
                            raise Conflict(f"batch {old.id} changed while it was being replaced")
                        replaced.append(old)
                    batch = self._insert(kind, name, item.frame, key_version, item.people, source=item.source)
                    self.conn.execute(
                        "INSERT INTO contents (kind, content_id, first_batch, ingested_at, source) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (kind, item.content_id, batch.id, batch.written_at, item.source),
                    )
                    details = {**item.details, "batch": batch.id}
                    if item.replaces:
                        details["replaced_batches"] = [b.id for b in item.replaces]
                    audit.append(self.conn, keyset, "ingest", details)
                    batches.append(batch)
                if also is not None:
                    also(batches)
        except BaseException:
            for _name, path in written:
                path.unlink(missing_ok=True)
            raise
        for old in replaced:
            self.path_of(old).unlink(missing_ok=True)
        for b in batches:
            log.info("stored %s batch %d: %d rows, %d people", kind, b.id, b.rows, b.people)
        return batches

    def rewrite(
        self,
        changes: Sequence[Rewrite],
        *,
        keyset: Keyset,
        event: str,
        details: dict[str, Any],
        meta: dict[str, str] | None = None,
        key_version: int | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[Batch]:
        """Replace batches atomically: all new files first, then one transaction swaps every
        manifest row (plus ``meta`` updates and the audit entry), then old files are deleted.
        ``check`` runs inside the transaction and may raise to abort. Caller holds writer_lock."""
        written: list[tuple[Rewrite, str, Path]] = []
        try:
            for change in changes:
                if change.new is not None and change.new.height > 0:
                    name, path = self._write_file(change.old.kind, change.new)
                    written.append((change, name, path))
            new_batches: list[Batch] = []
            with transaction(self.conn):
                if check is not None:
                    check()
                for change in changes:
                    deleted = self.conn.execute(
                        "DELETE FROM batches WHERE id = ? AND file = ?", (change.old.id, change.old.file)
                    ).rowcount
                    if deleted != 1:
                        raise Conflict(f"batch {change.old.id} changed while it was being rewritten")
                for change, name, _path in written:
                    assert change.new is not None
                    version = change.old.key_version if key_version is None else key_version
                    new_batches.append(
                        self._insert(
                            change.old.kind,
                            name,
                            change.new,
                            version,
                            seq=change.old.seq,
                            source=change.old.source,
                        )
                    )
                for key, value in (meta or {}).items():
                    set_meta(self.conn, key, value)
                audit.append(self.conn, keyset, event, details)
        except BaseException:
            for _change, _name, path in written:
                path.unlink(missing_ok=True)
            raise
        for change in changes:
            self.path_of(change.old).unlink(missing_ok=True)
        return new_batches

    def _recover_locked(self, *, full: bool = False) -> list[Path]:
        batches = self.batches()
        listed = {(b.kind, b.file) for b in batches}
        removed: list[Path] = []
        for kind in KINDS:
            for path in (self.data_dir / kind).iterdir():
                if (kind, path.name) not in listed:
                    path.unlink()
                    removed.append(path)
        # Every listed file is checked once per process and store: a stat per batch on every write
        # made live intake (one small batch per call) quadratic. Files go missing by hand, not by
        # privseg, and a read of a missing one fails loudly anyway.
        key = str(self.data_dir.resolve())
        check = full or key not in _VERIFIED
        missing = [b for b in batches if not self.path_of(b).exists()] if check else []
        if not missing:
            _VERIFIED.add(key)
        if missing:
            raise StoreError(
                f"the manifest lists {len(missing)} batch file(s) that are missing "
                f"(first: {missing[0].kind}/{missing[0].file}); restore them from backup"
            )
        if removed:
            log.warning("removed %d unrecorded file(s) left by an interrupted write", len(removed))
        return removed

    def recover(self) -> list[Path]:
        """Delete files no manifest row lists (left by a crash); check every listed file exists."""
        with self._lock():
            return self._recover_locked(full=True)

    def status(self) -> dict[str, Any]:
        """Batches, rows and people per kind; never a pid."""
        out: dict[str, Any] = {
            "namespace": get_meta(self.conn, "namespace"),
            "key_version": self.key_version(),
            "shards": self.shard_count(),
        }
        for kind in KINDS:
            bs = self.batches(kind)
            out[kind] = {
                "batches": len(bs),
                "rows": sum(b.rows for b in bs),
                "bytes": sum(self.path_of(b).stat().st_size for b in bs if self.path_of(b).exists()),
            }
        profiles = self.scan_profiles()
        events = self.scan_events()
        out["profiles"]["people"] = 0 if profiles is None else _count(profiles)
        out["events"]["people"] = 0 if events is None else _n_unique_pid(events)
        if events is not None:
            lo, hi = (
                events.select(pl.col("ts").min().alias("lo"), pl.col("ts").max().alias("hi")).collect().row(0)
            )
            out["events"]["first"] = None if lo is None else str(lo)
            out["events"]["last"] = None if hi is None else str(hi)
        return out


def merge_profiles(frames: Sequence[pl.LazyFrame]) -> pl.LazyFrame | None:
    """Profile batches (in ingestion order) merged into current profiles: one row per pid; for each
    column, the latest batch that carries that column for that person wins (a patch batch carries
    only the columns its file had, so it updates only those; an explicit unknown in a carried column
    does overwrite). Per person, so merging the batches of one shard gives that shard's profiles."""
    if not frames:
        return None
    if len(frames) == 1:
        return frames[0]
    schemas = [f.collect_schema() for f in frames]
    columns: dict[str, pl.DataType] = {}
    for schema in schemas:
        for name, dtype in schema.items():
            columns.setdefault(name, dtype)
    # update() only touches columns the left side has: start from every column any batch has.
    merged = frames[0].with_columns(
        pl.lit(None, dtype=dtype).alias(name) for name, dtype in columns.items() if name not in schemas[0]
    )
    for frame in frames[1:]:
        merged = merged.update(frame, on="pid", how="full", include_nulls=True)
    return merged


def _count(lf: pl.LazyFrame) -> int:
    return int(lf.select(pl.len()).collect().item())


def _n_unique_pid(lf: pl.LazyFrame) -> int:
    return int(lf.select(pl.col("pid").n_unique()).collect().item())
