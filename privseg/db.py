"""The SQLite database: manifest, audit log (and later ledger), with its schema migrations."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from privseg.errors import StoreError
from privseg.fsutil import private_dir, private_files

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('profiles', 'events')),
        file TEXT NOT NULL UNIQUE,
        rows INTEGER NOT NULL,
        people INTEGER NOT NULL,
        min_ts TEXT,
        max_ts TEXT,
        key_version INTEGER NOT NULL,
        written_at TEXT NOT NULL
    );
    -- Every content ever ingested, kept when its batch is later merged, rewritten or emptied, so a
    -- replayed old file stays a no-op (and can never overwrite newer profiles).
    CREATE TABLE contents (
        kind TEXT NOT NULL,
        content_id TEXT NOT NULL,
        first_batch INTEGER NOT NULL,
        ingested_at TEXT NOT NULL,
        PRIMARY KEY (kind, content_id)
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        details TEXT NOT NULL,
        mac TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    """
    -- Segment and trait definitions: every edit is a new version; the highest version is active.
    CREATE TABLE definitions (
        kind TEXT NOT NULL CHECK (kind IN ('segment', 'trait')),
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (kind, id, version)
    );
    -- Membership snapshots (person x segment, never leaving the server) and what they were built from.
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY,
        as_of TEXT NOT NULL,
        computed_at TEXT NOT NULL,
        file TEXT,
        people INTEGER NOT NULL,
        segments TEXT NOT NULL,
        traits TEXT NOT NULL,
        batches TEXT NOT NULL
    );
    """,
    """
    -- Every privacy spend, committed before any noise is drawn and never refunded. Epsilon is held in
    -- integer micro-units: summed floats drift (ten charges of 0.1 do not fit a budget of 1.0).
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        recipient TEXT NOT NULL,
        category TEXT NOT NULL,
        epsilon_micro INTEGER NOT NULL CHECK (epsilon_micro > 0),
        delta REAL NOT NULL,
        release_id INTEGER NOT NULL,
        policy_hash TEXT NOT NULL
    );
    CREATE INDEX ledger_by_category ON ledger (category, at);
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
    -- Releases: the request, what it cost, and (once computed) its noisy result, for the cache.
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        recipient TEXT NOT NULL,
        category TEXT NOT NULL,
        cache_key TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'done')),
        request TEXT NOT NULL,
        result TEXT,
        snapshot_id INTEGER NOT NULL,
        policy_hash TEXT NOT NULL,
        epsilon_micro INTEGER NOT NULL
    );
    CREATE INDEX releases_by_key ON releases (cache_key);
    """,
    """
    -- API keys: only a keyed hash of each token is stored; the token is shown once, at creation.
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'marketer', 'compliance', 'partner')),
        principal TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    """,
    """
    -- Who owns a definition (only they or an admin may change or retire it) and who wrote each version;
    -- a retired definition keeps its history but is no longer active.
    ALTER TABLE definitions ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin:cli';
    ALTER TABLE definitions ADD COLUMN editor TEXT NOT NULL DEFAULT 'admin:cli';
    ALTER TABLE definitions ADD COLUMN retired INTEGER NOT NULL DEFAULT 0;
    -- The policy set a snapshot was computed under (its consent filters depend on it) and the
    -- effective categories of its segments under that set.
    ALTER TABLE snapshots ADD COLUMN policy_hash TEXT;
    ALTER TABLE snapshots ADD COLUMN categories TEXT;
    -- The pseudonym key version of a snapshot's pids (a rotation re-keys kept snapshots with the store).
    ALTER TABLE snapshots ADD COLUMN key_version INTEGER;
    """,
    """
    -- Ingestion order, kept when a batch is rewritten (erasure, rotation) under a new id: profiles are
    -- "latest wins" per column, so a rewritten old batch must not become the latest.
    ALTER TABLE batches ADD COLUMN seq INTEGER;
    UPDATE batches SET seq = id;
    -- The keyed hash of the source bytes a batch came from (kept through rewrites), and of each
    -- recorded content: the same events file under a changed policy replaces what it stored before.
    ALTER TABLE batches ADD COLUMN source TEXT;
    ALTER TABLE contents ADD COLUMN source TEXT;
    """,
    """
    -- Web console sessions: only a keyed hash of each session token is stored. A session acts as the
    -- API key it was opened with, and ends with it (revocation), after idleness or at its expiry.
    CREATE TABLE console_sessions (
        token_hash TEXT PRIMARY KEY,
        key_id INTEGER NOT NULL REFERENCES api_keys (id),
        created_at TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    """,
    """
    -- The objectives (brand, performance) of a release's segments, sorted and comma-joined: a category
    -- may split a recipient's budget between them. '' for charges made before the split existed.
    ALTER TABLE ledger ADD COLUMN objectives TEXT NOT NULL DEFAULT '';
    """,
    """
    -- Continual releases (release/series.py): a series is charged once, by its first release, and each
    -- of its noisy blocks is drawn once, when it closes, and kept.
    CREATE TABLE release_series (
        series_key TEXT PRIMARY KEY,
        first_release INTEGER NOT NULL REFERENCES releases (id),
        recipient TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE series_blocks (
        series_key TEXT NOT NULL REFERENCES release_series (series_key),
        vector TEXT NOT NULL,
        block INTEGER NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (series_key, vector, block)
    );
    CREATE TRIGGER series_blocks_no_update BEFORE UPDATE ON series_blocks
    BEGIN SELECT RAISE(ABORT, 'a released block is never redrawn'); END;
    """,
    """
    -- Live intake: the keyed hash of every message id stored (or expired on arrival), so a resent
    -- message is never stored twice; recorded in the transaction that records its batch.
    CREATE TABLE intake_messages (
        message_key TEXT PRIMARY KEY,
        batch_id INTEGER,
        received_at TEXT NOT NULL
    );
    -- The intake role (pipelines that post events and nothing else). SQLite cannot alter a CHECK, so
    -- the table is rebuilt; console sessions (which reference it) end: people sign in again.
    DELETE FROM console_sessions;
    CREATE TABLE api_keys_new (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'marketer', 'compliance', 'partner', 'intake')),
        principal TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    INSERT INTO api_keys_new (id, name, role, principal, token_hash, created_at, revoked_at)
        SELECT id, name, role, principal, token_hash, created_at, revoked_at FROM api_keys;
    DROP TABLE api_keys;
    ALTER TABLE api_keys_new RENAME TO api_keys;
    """,
    """
    -- Budget sums read the index alone, never the table: every charge runs them under the write
    -- lock, over every charge of the period (4,345 charges: 1.7-1.9 ms a sum before, 0.6-0.7 after).
    DROP INDEX ledger_by_category;
    CREATE INDEX ledger_spend ON ledger (category, at, epsilon_micro);
    CREATE INDEX ledger_spend_by_recipient ON ledger (category, recipient, at, epsilon_micro, objectives);
    """,
    """
    -- What each recipient spent on each category, per UTC day (the first ten characters of `at`) and
    -- set of objectives: a budget sum reads the period's days here and, from the ledger, only the
    -- charges of the day the period starts in. Summing every charge of the period under the write
    -- lock took 3.3 ms a sum at 32,000 charges (two a charge: a third of a fresh release) and grew
    -- with every charge.
    -- Kept by a trigger in the transaction of each charge; like the ledger, it only grows.
    CREATE TABLE ledger_days (
        category TEXT NOT NULL,
        recipient TEXT NOT NULL,
        day TEXT NOT NULL,
        objectives TEXT NOT NULL,
        epsilon_micro INTEGER NOT NULL,
        charges INTEGER NOT NULL,
        PRIMARY KEY (category, recipient, day, objectives)
    ) WITHOUT ROWID;
    CREATE INDEX ledger_days_by_category ON ledger_days (category, day, epsilon_micro, charges);
    INSERT INTO ledger_days (category, recipient, day, objectives, epsilon_micro, charges)
        SELECT category, recipient, substr(at, 1, 10), objectives, SUM(epsilon_micro), COUNT(*)
        FROM ledger GROUP BY category, recipient, substr(at, 1, 10), objectives;
    CREATE TRIGGER ledger_days_add AFTER INSERT ON ledger
    BEGIN
        INSERT INTO ledger_days (category, recipient, day, objectives, epsilon_micro, charges)
        VALUES (new.category, new.recipient, substr(new.at, 1, 10), new.objectives, new.epsilon_micro, 1)
        ON CONFLICT (category, recipient, day, objectives) DO UPDATE
        SET epsilon_micro = epsilon_micro + excluded.epsilon_micro, charges = charges + 1;
    END;
    CREATE TRIGGER ledger_days_no_delete BEFORE DELETE ON ledger_days
        BEGIN SELECT RAISE(ABORT, 'the ledger''s day totals only grow'); END;
    CREATE TRIGGER ledger_days_only_grow BEFORE UPDATE ON ledger_days
        WHEN new.charges != old.charges + 1 OR new.epsilon_micro <= old.epsilon_micro
            OR new.category != old.category OR new.recipient != old.recipient
            OR new.day != old.day OR new.objectives != old.objectives
        BEGIN SELECT RAISE(ABORT, 'the ledger''s day totals only grow'); END;
    """,
    """
    -- Content ids and sources are keyed BLAKE3 hashes of the bytes from here on (ingest/files.py). A
    -- store that recorded content with the earlier HMAC-SHA256 ones keeps recognizing it: ingestion
    -- computes both there.
    INSERT INTO meta (key, value) SELECT 'legacy_content_ids', '1' WHERE EXISTS (SELECT 1 FROM contents);
    """,
)


# SQLite integers are 64-bit signed: ids above this are refused as invalid input (API paths and
# bodies) instead of overflowing in a query.
MAX_ID = 2**62


BUSY_TIMEOUT = 30.0  # seconds a writer waits for the write lock before "database is locked"


class Connection(sqlite3.Connection):
    """A connection that knows the lock its process's writers queue on (see :func:`transaction`)."""

    writers: threading.RLock


_WRITERS: dict[str, threading.RLock] = {}
_WRITERS_GUARD = threading.Lock()


def _writers(path: Path) -> threading.RLock:
    with _WRITERS_GUARD:
        return _WRITERS.setdefault(str(path.resolve()), threading.RLock())


def connect(path: Path) -> sqlite3.Connection:
    """Open the database (creating and migrating it if needed) in autocommit mode.

    Autocommit (isolation_level=None) so that every write goes through :func:`transaction`, which
    takes the write lock up front (BEGIN IMMEDIATE): no two writers interleave read-then-write.
    """
    private_dir(path.parent)
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False, factory=Connection
    )
    conn.writers = _writers(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a committed charge or batch survives power loss
    conn.execute("PRAGMA foreign_keys=ON")
    _migrate(conn)
    private_files(path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
    return conn


class ConnectionPool:
    """Connections to one database, each lent to one request at a time. Opening one (pragmas, the
    migration check, file modes) costs more than serving a cached release, so the server keeps a few
    open. A connection handed back inside a transaction is closed, never lent again."""

    def __init__(self, path: Path, keep: int = 16) -> None:
        self.path, self.keep = path, keep
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return connect(self.path)

    def release(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not conn.in_transaction and len(self._idle) < self.keep:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    # Every request opens a connection: check without the write lock first, so that readers do not
    # queue behind writers; take the lock (and look again) only when there is something to migrate.
    (current,) = conn.execute("PRAGMA user_version").fetchone()
    if current == len(_MIGRATIONS):
        return
    _refuse_newer(current)
    with transaction(conn):
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        _refuse_newer(current)
        for number, script in enumerate(_MIGRATIONS[current:], start=current + 1):
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def _refuse_newer(version: int) -> None:
    """A database a newer privseg upgraded is not used: this version would read and write it without
    knowing what the newer migrations changed (since schema 13, for one, which content ids a store
    computes is decided at its upgrade)."""
    if version > len(_MIGRATIONS):
        raise StoreError(
            f"the database's schema is version {version}, newer than this privseg's ({len(_MIGRATIONS)}): "
            "a newer privseg upgraded it; run that version (nothing was changed)"
        )


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, holding the write lock from the start; rolled back on any error.

    A process's writers queue on one lock before asking SQLite: a writer SQLite finds locked sleeps
    and retries (1, 2, 5, ... up to 100 ms a time), so threads of one server worker waiting on each
    other's commits slept far longer than the commits took. Now only one writer per process waits on
    SQLite, for writers of other processes. Reentrant: a nested transaction still fails in SQLite."""
    writers = getattr(conn, "writers", None)
    if writers is not None and not writers.acquire(timeout=BUSY_TIMEOUT):
        raise sqlite3.OperationalError("database is locked")
    try:
        _begin_immediate(conn)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if writers is not None:
            writers.release()


_POLL_FIRST, _POLL_MAX = 0.0005, 0.004  # seconds between tries for a write lock another process holds
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, trying again every 0.5-4 ms while another process holds the write lock, for
    up to :data:`BUSY_TIMEOUT`. SQLite's own busy handler sleeps 1, 2, 5, ... up to 100 ms between
    tries, so a server worker waiting on another worker's 2 ms commit slept on long after the lock
    was free: fresh reports from wrk at concurrency 8, two workers, p99 0.90-1.17 s -> 229-261 ms and
    54-59 -> 72-76 a second (three A/B pairs). The connection's busy timeout still covers every
    other statement."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = _POLL_FIRST
    (previous,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(previous)}")


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
