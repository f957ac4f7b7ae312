"""Live event intake (Segment / RudderStack batch JSON): mapping, pseudonymization at the door,
all-or-nothing batches, messageId dedup (retries, repeats, concurrency), compaction, roles."""

from __future__ import annotations

import json
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient

from privseg import apikeys
from privseg.api.app import create_app
from privseg.deployment import Deployment
from privseg.errors import InvalidInput
from privseg.ingest.intake import SOURCE, IntakeBatch, ingest_batch
from privseg.maintenance import compact_intake
from privseg.policy.ingest import IngestPolicy


def track(user: str | None, event: str = "Order Completed", **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": str(uuid.uuid4()),
        "userId": user,
        "event": event,
        "properties": {"revenue": 42.5, "category": "home"},
        "context": {"campaign": {"name": "winter"}},
        "timestamp": "2026-11-29T10:00:00Z",
        **extra,
    }


def post(dep: Deployment, messages: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    batch = IntakeBatch.model_validate({"batch": messages})
    return ingest_batch(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, batch=batch)


def stored_events(dep: Deployment) -> pl.DataFrame:
    events = dep.store.scan_events()
    return pl.DataFrame() if events is None else events.collect()


def test_tracked_events_are_mapped_and_pseudonymized_at_the_door(dep: Deployment) -> None:
    result = post(
        dep,
        [
            track("CUST-1"),
            track("CUST-2", event="Email Opened", properties={"campaign_name": "nl_12"}),
            {"type": "page", "messageId": "p1", "userId": "CUST-1", "timestamp": "2026-11-29T09:00:00Z"},
            track("CUST-3", event="Some Unmapped Event"),
            track(None, anonymousId="anon-7"),  # no customer id: skipped, never stored
            {"type": "identify", "messageId": "i1", "userId": "CUST-1", "traits": {"email": "x@example.com"}},
        ],
    )
    assert (result.received, result.stored, result.skipped, result.duplicates) == (6, 3, 3, 0)
    events = stored_events(dep)
    assert sorted(events["event_type"].to_list()) == ["email_open", "page_view", "purchase"]
    purchase = events.filter(pl.col("event_type") == "purchase").row(0, named=True)
    assert (
        purchase["value"] == 42.5
        and purchase["product_category"] == "home"
        and purchase["campaign"] == "winter"
    )
    # No raw identifier anywhere in what was stored.
    for path in dep.settings.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"CUST-1" not in data and b"anon-7" not in data and b"x@example.com" not in data, path


def test_a_message_is_stored_once_however_often_it_is_sent(dep: Deployment) -> None:
    first = [track("CUST-1"), track("CUST-2")]
    assert post(dep, first).stored == 2
    again = post(dep, [*first, track("CUST-3"), first[0]])  # a retry, one new, one repeat inside
    assert (again.stored, again.duplicates) == (1, 3)
    assert stored_events(dep).height == 3
    assert post(dep, first).stored == 0


def test_a_bad_message_stores_nothing_of_its_batch_and_its_retry_is_stored(dep: Deployment) -> None:
    good, bad = track("CUST-1"), track("CUST-2", properties={"revenue": "lots", "category": "home"})
    with pytest.raises(InvalidInput) as refused:
        post(dep, [good, bad])
    assert "lots" not in str(refused.value) and "CUST" not in str(refused.value)  # never quotes a value
    assert stored_events(dep).height == 0
    fixed = {**bad, "properties": {"revenue": 9.5, "category": "home"}}
    assert post(dep, [good, fixed]).stored == 2  # the ids of the refused batch were not recorded


def test_compaction_merges_intake_batches_and_keeps_every_event(dep: Deployment) -> None:
    for i in range(5):
        post(dep, [track(f"CUST-{i}"), track(f"CUST-{i}", event="Product Viewed")])
    assert len([b for b in dep.store.batches("events") if b.source == SOURCE]) == 5
    before = stored_events(dep).sort(["pid", "event_type"])
    assert compact_intake(store=dep.store, keyset=dep.keyset) == 5
    assert len([b for b in dep.store.batches("events") if b.source == SOURCE]) == 1
    assert stored_events(dep).sort(["pid", "event_type"]).equals(before)
    assert post(dep, [track("CUST-9")]).stored == 1  # dedup survives the merge


def test_the_intake_mapping_is_checked_against_the_schema() -> None:
    import yaml

    from tests.conftest import POLICIES

    doc = yaml.safe_load((POLICIES / "ingest.yaml").read_text())
    doc["intake"]["events"]["Order Completed"]["type"] = "refund"
    with pytest.raises(
        ValueError, match=r"intake\.events\.Order Completed\.type: .refund. is not an event_type"
    ):
        IngestPolicy.model_validate(doc)
    doc["intake"]["events"]["Order Completed"] = {"type": "purchase", "fields": {"email": "properties.email"}}
    with pytest.raises(ValueError, match="'email' is not an event attribute"):
        IngestPolicy.model_validate(doc)


def test_only_intake_keys_post_and_they_cannot_sign_in_to_the_console(dep: Deployment) -> None:
    _, intake = apikeys.create(dep.store.conn, dep.keyset, role="intake", name="segment_pipeline")
    _, marketer = apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="growth_team")
    client = TestClient(create_app(dep), base_url="http://127.0.0.1")
    body = {"batch": [track("CUST-1")]}
    ok = client.post("/v1/intake/batch", json=body, headers={"Authorization": f"Bearer {intake}"})
    assert ok.status_code == 200 and ok.json()["stored"] == 1
    assert "CUST-1" not in ok.text
    refused = client.post("/v1/intake/batch", json=body, headers={"Authorization": f"Bearer {marketer}"})
    assert refused.status_code == 403
    assert client.get("/v1/segments", headers={"Authorization": f"Bearer {intake}"}).status_code == 403
    page = client.get("/ui/login")
    from tests.test_console import CSRF

    signin = client.post("/ui/login", data={"api_key": intake, "csrf": CSRF.findall(page.text)[0]})
    assert signin.status_code == 403 and "data pipeline" in signin.text


def test_concurrent_small_batches_lose_nothing_and_duplicate_nothing(dep: Deployment) -> None:
    """2,000 batches of 1-3 messages from 16 threads against a two-worker `privseg serve`, a tenth of
    them resent (a pipeline's retries, concurrent with the first send): every message is stored exactly
    once. (benchmarks/intake.py runs the same at 10,000 batches.)"""
    import httpx2

    from tests.conftest import running_server

    _, token = apikeys.create(dep.store.conn, dep.keyset, role="intake", name="segment_pipeline")
    rng = random.Random(7)
    batches = [[track(f"CUST-{rng.randrange(500)}") for _ in range(rng.randint(1, 3))] for _ in range(2000)]
    sends = batches + rng.sample(batches, 200)
    rng.shuffle(sends)
    unique = {m["messageId"] for b in batches for m in b}
    lock, stored, failures = threading.Lock(), [0], []
    with running_server(dep.settings, workers=2) as (base, _proc):

        def worker(share: list[list[dict[str, Any]]]) -> None:
            auth = {"Authorization": f"Bearer {token}"}
            with httpx2.Client(base_url=base, headers=auth, timeout=120) as client:
                for batch in share:
                    for _attempt in range(5):  # a pipeline retries what failed
                        r = client.post("/v1/intake/batch", json={"batch": batch})
                        if r.status_code == 200:
                            with lock:
                                stored[0] += r.json()["stored"]
                            break
                    else:
                        failures.append(r.status_code)

        threads = [threading.Thread(target=worker, args=(sends[i::16],)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    assert failures == []
    assert stored[0] == len(unique)
    events = stored_events(dep)
    assert events.height == len(unique)
    recorded = dep.store.conn.execute("SELECT COUNT(*) FROM intake_messages").fetchone()[0]
    assert recorded == len(unique)


def test_the_server_merges_intake_batches_and_refreshes_the_snapshot(dep: Deployment, tmp_path: Path) -> None:
    """With a short refresh interval the server's refresher merges intake batches and recomputes a
    stale snapshot while the API keeps answering."""
    import time

    from privseg.segments import definitions, engine
    from tests.conftest import EXAMPLES

    definitions.apply(
        dep.store.conn, dep.keyset, [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml"],
        schema=dep.schema, categories=dep.categories, actor=definitions.ADMIN_CLI,
    )  # fmt: skip
    for i in range(3):
        post(dep, [track(f"CUST-{i}")])
    fast = Deployment(dep.settings.model_copy(update={"snapshot_refresh_seconds": 0.2}))
    import privseg.api.app as app_module

    merge_at = app_module.INTAKE_MERGE_AT
    app_module.INTAKE_MERGE_AT = 2
    try:
        with TestClient(create_app(fast)) as client:
            deadline = time.monotonic() + 30
            while engine.latest(dep.store.conn) is None and time.monotonic() < deadline:
                assert client.get("/healthz").status_code == 200
                time.sleep(0.1)
    finally:
        app_module.INTAKE_MERGE_AT = merge_at
        fast.close()
    snap = engine.latest(dep.store.conn)
    assert snap is not None
    assert not engine.staleness(dep.store, snap, policy_hash=dep.categories.content_hash)
    assert len([b for b in dep.store.batches("events") if b.source == SOURCE]) == 1


def test_the_intake_role_migration_keeps_every_key(tmp_path: Path) -> None:
    """The api_keys table is rebuilt to admit the intake role: keys made before still authenticate
    (same ids and hashes), open console sessions end, the session table still points at the keys."""
    import sqlite3

    from privseg import db

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    # The database as it was before the intake migration (the one that rebuilds api_keys); the later
    # migrations run too.
    upgrade = next(i for i, script in enumerate(db._MIGRATIONS) if "api_keys_new" in script)
    for number, script in enumerate(db._MIGRATIONS[:upgrade], start=1):
        for statement in db._statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute(
        "INSERT INTO api_keys (id, name, role, principal, token_hash, created_at) "
        "VALUES (7, 'growth_team', 'marketer', 'growth_team', 'h7', 't')"
    )
    conn.execute("INSERT INTO console_sessions VALUES ('s', 7, 't', 't', 't')")
    conn.close()
    migrated = db.connect(path)
    assert migrated.execute("PRAGMA user_version").fetchone()[0] == len(db._MIGRATIONS)
    assert migrated.execute("SELECT id, role, token_hash FROM api_keys").fetchall() == [(7, "marketer", "h7")]
    assert migrated.execute("SELECT COUNT(*) FROM console_sessions").fetchone()[0] == 0
    migrated.execute(
        "INSERT INTO api_keys (name, role, principal, token_hash, created_at) "
        "VALUES ('p', 'intake', 'p', 'h8', 't')"
    )
    migrated.execute("INSERT INTO console_sessions VALUES ('s2', 7, 't', 't', 't')")  # the FK still resolves
    with pytest.raises(sqlite3.IntegrityError):
        migrated.execute("INSERT INTO console_sessions VALUES ('s3', 999, 't', 't', 't')")
    assert migrated.execute("PRAGMA foreign_key_check").fetchall() == []
    migrated.close()


def test_identify_calls_patch_profiles_with_generalized_traits(dep: Deployment) -> None:
    def identify(user: str, traits: dict[str, Any]) -> dict[str, Any]:
        return {"type": "identify", "messageId": str(uuid.uuid4()), "userId": user, "traits": traits}

    first = post(
        dep,
        [
            identify(
                "CUST-1",
                {
                    "birthday": "1961-03-02",
                    "address": {"postal_code": "94110", "street": "1 Main St"},
                    "gender": "female",
                    "interests": ["travel", "hearing_aids"],
                    "consent_marketing": True,
                    "email": "jane@example.com",  # not mapped: never stored
                },
            ),
            track("CUST-1"),
        ],
    )
    assert (first.profiles, first.stored) == (1, 1)
    second = post(dep, [identify("CUST-1", {"gender": "non_binary"})])  # a patch: other traits stay
    assert second.profiles == 1
    profiles = dep.store.scan_profiles()
    assert profiles is not None
    (person,) = profiles.collect().to_dicts()
    assert person["gender"] == "non_binary" and person["age_band"] == "65+" and person["region"] == "pacific"
    assert sorted(person["interests"]) == ["hearing_aids", "travel"] and person["consent_marketing"] is True
    for path in dep.settings.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"CUST-1" not in data and b"1961-03-02" not in data and b"94110" not in data, path
            assert b"jane@example.com" not in data and b"1 Main St" not in data, path


def test_the_cli_replays_a_batch_file_once(dep: Deployment, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"batch": [track("CUST-1"), track("CUST-2")]}))
    first = json.loads(run_cli(dep.settings, "ingest", "intake", str(path), "--json").stdout)
    assert first["stored"] == 2
    again = run_cli(dep.settings, "ingest", "intake", str(path)).stdout
    assert "0 event(s)" in again and "2 duplicate(s)" in again
    path.write_text(json.dumps({"batch": [{"type": "track"}]}))
    bad = run_cli(dep.settings, "ingest", "intake", str(path), check=False)
    assert bad.returncode == 2 and "messageId" in bad.stderr and "Traceback" not in bad.stderr


def test_store_compaction_merges_intake_batches_and_applies_retention(dep: Deployment) -> None:
    from datetime import UTC, datetime, timedelta

    from privseg.maintenance import compact

    for i in range(3):
        post(dep, [track(f"CUST-{i}"), track(f"CUST-{i}", event="Product Viewed")])
    result = compact(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy)
    assert result.expired_events == 0
    assert len([b for b in dep.store.batches("events") if b.source == SOURCE]) == 1
    assert stored_events(dep).height == 6
    post(dep, [track("CUST-9")])
    later = datetime(2026, 11, 29, tzinfo=UTC) + timedelta(days=dep.ingest_policy.retention_days + 1)
    aged = compact(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, now=later)
    assert aged.expired_events == 7 and stored_events(dep).height == 0
