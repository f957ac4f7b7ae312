from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from privseg import audit, maintenance
from privseg.deployment import Deployment
from privseg.ingest.files import ingest_files
from privseg.keyset import load_keyset
from privseg.pseudonym import Pseudonymizer
from privseg.settings import Settings
from tests.conftest import AS_OF, EVENT_HEADER, PROFILE_HEADER, REPO, event_row, profile_row, write_csv


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "PRIVSEG_HOME": str(settings.home),
        "PRIVSEG_KEYSET": str(settings.keyset),
        "PRIVSEG_POLICY_DIR": str(settings.policy_dir),
        "PRIVSEG_UPLOAD_DIR": str(settings.uploads_path),
    }


def _crash(settings: Settings, point: str, operation: str, file: Path | str = "-") -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.crash_helper", point, operation, str(file)],
        cwd=REPO,
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _snapshot(dep: Deployment) -> tuple[list[tuple[int, str, int]], pl.DataFrame, pl.DataFrame]:
    batches = [(b.id, b.file, b.rows) for b in dep.store.batches()]
    profiles = dep.store.scan_profiles()
    events = dep.store.scan_events()
    return (
        batches,
        pl.DataFrame() if profiles is None else profiles.collect().sort("pid"),
        pl.DataFrame() if events is None else events.collect().sort("pid", "ts"),
    )


def _files_on_disk(dep: Deployment) -> set[str]:
    return {p.name for p in dep.settings.data_dir.rglob("*.parquet")}


@pytest.mark.parametrize("point", ["before_publish", "after_publish", "before_commit"])
def test_a_crash_mid_batch_leaves_no_half_batch_and_loses_nothing(
    dep: Deployment, tmp_path: Path, point: str
) -> None:
    first = write_csv(tmp_path / "first.csv", PROFILE_HEADER, [profile_row(f"C{i}") for i in range(5)])
    ingest_files(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="profiles", paths=[first])
    before = _snapshot(dep)
    second = write_csv(tmp_path / "second.csv", EVENT_HEADER, [event_row(f"C{i}") for i in range(5)])

    _crash(dep.settings, point, "ingest-events", second)

    dep.close()  # reopen as a fresh process would
    after = _snapshot(dep)
    assert after[0] == before[0]
    assert after[1].equals(before[1]) and after[2].equals(before[2])
    leftovers = _files_on_disk(dep) - {b.file for b in dep.store.batches()}
    if point != "before_publish":
        assert leftovers, "the crash should have left an unrecorded file behind"
    dep.store.recover()
    assert _files_on_disk(dep) == {b.file for b in dep.store.batches()}
    assert not [p for p in dep.settings.data_dir.rglob(".tmp-*")]
    assert audit.verify(dep.store.conn, dep.keyset).ok
    # The interrupted batch can be ingested again: it was never recorded.
    (result,) = ingest_files(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="events", paths=[second]
    )
    assert result.stored and result.rows == 5


def test_a_crash_after_commit_keeps_the_batch(dep: Deployment, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.crash_helper", "none", "ingest-profiles", str(path)],
        cwd=REPO,
        env=_env(dep.settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [b.rows for b in dep.store.batches()] == [1]


def _ingest_sample(dep: Deployment, tmp_path: Path) -> None:
    profiles = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row(f"C{i}") for i in range(6)])
    events = write_csv(
        tmp_path / "e.csv", EVENT_HEADER, [event_row(f"C{i % 6}", value=str(i)) for i in range(30)]
    )
    for kind, path in (("profiles", profiles), ("events", events)):
        ingest_files(
            store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=[path], now=AS_OF
        )  # type: ignore[arg-type]


def _plain(dep: Deployment, version: int) -> tuple[list[tuple[str, str]], list[tuple[str, float]]]:
    """The store's content with pseudonyms decrypted: what must survive a rotation unchanged."""
    ks = load_keyset(dep.settings.keyset)
    p = Pseudonymizer(ks, dep.ingest_policy.identity.type, version)
    prof = dep.store.scan_profiles().collect()  # type: ignore[union-attr]
    ev = dep.store.scan_events().collect()  # type: ignore[union-attr]
    assert all(t.startswith(f"k{version}.") for t in prof.get_column("pid"))
    assert all(t.startswith(f"k{version}.") for t in ev.get_column("pid"))
    return (
        sorted(
            zip(
                p.decrypt_series(prof.get_column("pid")).to_list(),
                prof.get_column("gender").to_list(),
                strict=True,
            )
        ),
        sorted(
            zip(
                p.decrypt_series(ev.get_column("pid")).to_list(),
                ev.get_column("value").to_list(),
                strict=True,
            )
        ),
    )


def test_rotation_re_pseudonymizes_everything_and_keeps_the_data(dep: Deployment, tmp_path: Path) -> None:
    _ingest_sample(dep, tmp_path)
    before = _plain(dep, 1)
    old_pids = set(dep.store.scan_profiles().collect().get_column("pid"))  # type: ignore[union-attr]
    old_files = _files_on_disk(dep)
    result = maintenance.rotate_keys(
        store=dep.store, keyset_path=dep.settings.keyset, policy=dep.ingest_policy
    )
    assert (result.from_version, result.to_version, result.batches_rewritten) == (1, 2, 2)
    assert dep.store.key_version() == 2
    assert _plain(dep, 2) == before
    assert not old_pids & set(dep.store.scan_profiles().collect().get_column("pid"))  # type: ignore[union-attr]
    assert not old_files & _files_on_disk(dep)  # old pseudonyms are gone from disk
    # New ingestion uses the new key, so it joins with the rotated store.
    dep.__dict__.pop("keyset", None)
    more = write_csv(tmp_path / "e2.csv", EVENT_HEADER, [event_row("C1", value="999")])
    ingest_files(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="events", paths=[more], now=AS_OF
    )
    events = dep.store.scan_events().collect()  # type: ignore[union-attr]
    c1 = Pseudonymizer(dep.keyset, dep.ingest_policy.identity.type, 2).pseudonymize("C1")
    assert events.filter(pl.col("pid") == c1).height == 6
    assert [e.event for e in audit.entries(dep.store.conn)][-2:] == ["key_rotation", "ingest"]


def test_a_crash_mid_rotation_is_resumed_without_a_new_version(dep: Deployment, tmp_path: Path) -> None:
    _ingest_sample(dep, tmp_path)
    before = _plain(dep, 1)
    _crash(dep.settings, "before_commit", "rotate")
    dep.close()
    assert load_keyset(dep.settings.keyset).primary == 2  # the key was added ...
    assert dep.store.key_version() == 1  # ... but the store never moved
    assert _plain(dep, 1) == before
    # Ingestion meanwhile keeps using the store's version, so nothing splits.
    dep.__dict__.pop("keyset", None)
    assert ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind="events",
        paths=[write_csv(tmp_path / "e3.csv", EVENT_HEADER, [event_row("C2")])],
        now=AS_OF,
    )[0].stored
    result = maintenance.rotate_keys(
        store=dep.store, keyset_path=dep.settings.keyset, policy=dep.ingest_policy
    )
    assert result.resumed and result.to_version == 2
    assert load_keyset(dep.settings.keyset).primary == 2
    profiles_after, events_after = _plain(dep, 2)
    assert profiles_after == before[0] and len(events_after) == len(before[1]) + 1


def test_erasure_removes_the_subject_everywhere_and_audits_without_the_id(
    dep: Deployment, tmp_path: Path
) -> None:
    _ingest_sample(dep, tmp_path)
    result = maintenance.erase_subject(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id="  C3 "
    )
    assert (result.profile_rows, result.event_rows, result.batches_rewritten) == (1, 5, 2)
    pid = Pseudonymizer(dep.keyset, dep.ingest_policy.identity.type, 1).pseudonymize("C3")
    assert dep.store.scan_profiles().filter(pl.col("pid") == pid).collect().height == 0  # type: ignore[union-attr]
    assert dep.store.scan_events().filter(pl.col("pid") == pid).collect().height == 0  # type: ignore[union-attr]
    assert dep.store.scan_profiles().collect().height == 5  # type: ignore[union-attr]
    for f in dep.settings.data_dir.rglob("*.parquet"):
        assert pid.encode() not in f.read_bytes()
    entry = audit.entries(dep.store.conn)[-1]
    assert entry.event == "erasure" and entry.details == {"profile_rows": 1, "event_rows": 5, "batches": 2}
    # The raw id is two characters, so it is looked for where rows live: the database file after a
    # checkpoint has moved every WAL frame into it (free pages included). Not in the WAL's frame
    # headers or the shared-memory index: their random salts and checksums held the bytes "C3" by
    # chance in 1 run of 100 (measured), which made this test fail at random.
    busy, _frames, _moved = dep.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    db_bytes = b"".join((dep.settings.home / name).read_bytes() for name in ("privseg.db", "privseg.db-wal"))
    assert b"C3" not in db_bytes and pid.encode() not in db_bytes
    again = maintenance.erase_subject(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id="C3"
    )
    assert not again.found
    # Replaying the old file is still recognised as already ingested: erasure is not undone by accident.
    (replay,) = ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind="profiles",
        paths=[tmp_path / "p.csv"],
    )
    assert not replay.stored


def test_compaction_merges_profiles_and_applies_retention(dep: Deployment, tmp_path: Path) -> None:
    _ingest_sample(dep, tmp_path)
    ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind="profiles",
        paths=[
            write_csv(
                tmp_path / "p2.csv", PROFILE_HEADER, [profile_row("C1", gender="male"), profile_row("C9")]
            )
        ],
        now=AS_OF,
    )
    current = dep.store.scan_profiles().collect().sort("pid")  # type: ignore[union-attr]
    # Two years later, every event is past the 730-day retention.
    result = maintenance.compact(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, now=AS_OF + timedelta(days=800)
    )
    assert result.superseded_profiles == 1 and result.expired_events == 30
    assert len(dep.store.batches("profiles")) == 1 and dep.store.batches("events") == []
    assert dep.store.scan_profiles().collect().sort("pid").equals(current)  # type: ignore[union-attr]
    # Older profile content stays known: replaying it cannot overwrite the newer values.
    (replay,) = ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind="profiles",
        paths=[tmp_path / "p.csv"],
    )
    assert not replay.stored


def test_manifest_and_missing_file_is_reported(dep: Deployment, tmp_path: Path) -> None:
    _ingest_sample(dep, tmp_path)
    victim = dep.store.path_of(dep.store.batches()[0])
    victim.unlink()
    from privseg.errors import StoreError

    with pytest.raises(StoreError, match="missing"):
        dep.store.recover()


def test_store_status_never_lists_people(dep: Deployment, tmp_path: Path) -> None:
    _ingest_sample(dep, tmp_path)
    status = dep.store.status()
    assert status["profiles"]["people"] == 6 and status["events"]["rows"] == 30
    assert "k1." not in repr(status)


def test_audit_table_rejects_updates_and_deletes(dep: Deployment, tmp_path: Path) -> None:
    _ingest_sample(dep, tmp_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        dep.store.conn.execute("UPDATE audit SET event = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        dep.store.conn.execute("DELETE FROM audit")


def test_request_connections_are_pooled_and_a_dirty_one_is_not_lent_again(dep) -> None:  # type: ignore[no-untyped-def]
    first = dep.for_request()
    conn = first.store.conn
    first.close()
    second = dep.for_request()
    assert second.store.conn is conn  # reused: no new connection per request
    # A request that ends inside an open transaction hands back a connection nobody may reuse.
    second.store.conn.execute("BEGIN IMMEDIATE")
    second.close()
    third = dep.for_request()
    assert third.store.conn is not conn
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")
    third.close()


def test_writers_of_one_process_queue_and_a_stuck_writer_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from privseg import db

    path = tmp_path / "state" / "privseg.db"
    conns = [db.connect(path) for _ in range(9)]
    with db.transaction(conns[0]) as c:
        c.execute("INSERT INTO meta (key, value) VALUES ('n', '0')")

    def bump(conn: sqlite3.Connection) -> None:  # read, then write: only safe if writers serialize
        for _ in range(25):
            with db.transaction(conn):
                (n,) = conn.execute("SELECT value FROM meta WHERE key = 'n'").fetchone()
                conn.execute("UPDATE meta SET value = ? WHERE key = 'n'", (str(int(n) + 1),))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(bump, conns[1:]))
    assert db.get_meta(conns[0], "n") == "200"
    # A nested transaction still fails in SQLite, at once (the lock is reentrant, not a deadlock).
    with (
        db.transaction(conns[0]),
        pytest.raises(sqlite3.OperationalError, match="within a transaction"),
        db.transaction(conns[0]),
    ):
        pass
    # A writer holding the lock past the busy timeout makes the others fail, not hang.
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.2)
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with db.transaction(conns[1]):
            holding.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    # The writer holds its process's lock, which every connection to this database shares.
    assert all(c.writers is conns[1].writers for c in conns)  # type: ignore[attr-defined]
    assert not conns[2].writers.acquire(blocking=False)  # type: ignore[attr-defined]
    with pytest.raises(sqlite3.OperationalError, match="database is locked"), db.transaction(conns[2]):
        pass
    done.set()
    holder.join()
    with db.transaction(conns[2]):  # and the lock is free again afterwards
        pass
    for conn in conns:
        conn.close()


def test_a_writer_polls_for_a_lock_another_process_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's write lock (here a plain connection, outside this process's writer queue) is
    waited for by trying BEGIN again every few milliseconds, not by SQLite's sleeps of up to 100 ms;
    the wait still ends at the busy timeout, other errors are not retried, and the connection keeps
    its busy timeout for every other statement."""
    import threading

    from privseg import db

    path = tmp_path / "state" / "privseg.db"
    conn = db.connect(path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # another process, for locks
    tries: list[float] = []
    real_sleep = time.sleep
    here = threading.current_thread()  # time.sleep is patched for every thread: count this one's only

    def sleep(seconds: float) -> None:
        if threading.current_thread() is here:
            tries.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(db.time, "sleep", sleep)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    with db.transaction(conn):
        conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    release.join()
    # Tried again and again, with pauses of 0.5 ms doubling to at most 4 ms.
    assert len(tries) >= 10 and tries[0] == 0.0005 and max(tries) == 0.004
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT * 1000
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.2)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"), db.transaction(conn):
        pass
    assert 0.2 <= time.monotonic() - started < 5
    other.execute("ROLLBACK")
    tries.clear()
    conn.execute("BEGIN")  # a transaction already open: an error that waiting cannot fix
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"), db.transaction(conn):
        pass
    assert tries == []
    conn.execute("ROLLBACK")
    conn.close()
    other.close()


@pytest.mark.parametrize("recorded", [True, False])
def test_the_upgrade_to_blake3_content_ids_flags_a_store_that_recorded_content(
    tmp_path: Path, recorded: bool
) -> None:
    # A store that recorded content under HMAC-SHA256 ids keeps computing them too (at a cost); a
    # store that never did is spared it.
    from privseg import db
    from tests.conftest import database_before

    path = tmp_path / "old.db"
    conn = database_before(path, "legacy_content_ids")
    if recorded:
        conn.execute(
            "INSERT INTO contents (kind, content_id, first_batch, ingested_at, source) "
            "VALUES ('events', 'c0ffee', 1, '2026-01-01T00:00:00+00:00', 'c0ffee')"
        )
    conn.close()
    migrated = db.connect(path)
    assert (db.get_meta(migrated, "legacy_content_ids") == "1") is recorded
    migrated.close()


def test_a_database_upgraded_by_a_newer_privseg_is_refused_and_left_alone(tmp_path: Path) -> None:
    from privseg import db
    from privseg.errors import StoreError

    path = tmp_path / "newer.db"
    db.connect(path).close()
    newer = sqlite3.connect(path)
    (version,) = newer.execute("PRAGMA user_version").fetchone()
    newer.execute(f"PRAGMA user_version = {version + 1}")
    newer.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"schema is version {version + 1}, newer than this privseg's"):
        db.connect(path)
    assert path.read_bytes() == before
