"""What a batch means: profile patches update only their columns (latest wins per person and per
column, through compaction, erasure and rotation), a batch that stores nothing is an error, and
retention and ages count from a stated reference time."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from privseg import maintenance
from privseg.deployment import Deployment
from privseg.errors import InvalidInput
from privseg.ingest.files import ingest_files
from privseg.pseudonym import Pseudonymizer
from tests.conftest import AS_OF, EVENT_HEADER, PROFILE_HEADER, event_row, profile_row, run_cli, write_csv


def ingest(dep: Deployment, kind: str, path: Path, **kw: Any) -> Any:
    return ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind=kind,  # type: ignore[arg-type]
        paths=[path],
        now=kw.pop("now", AS_OF),
        **kw,
    )


def profiles_by_id(dep: Deployment) -> dict[str, dict[str, Any]]:
    """Current profiles keyed by the raw id (decrypted here, in the test only)."""
    lf = dep.store.scan_profiles()
    assert lf is not None
    p = Pseudonymizer(dep.keyset, dep.ingest_policy.identity.type, dep.store.key_version())
    out = {}
    for row in lf.collect().iter_rows(named=True):
        out[p.decrypt(row.pop("pid"))] = row
    return out


@pytest.fixture
def three(dep: Deployment, tmp_path: Path) -> Deployment:
    rows = [profile_row("C1"), profile_row("C2", gender="male"), profile_row("C3", consent_marketing="false")]
    ingest(dep, "profiles", write_csv(tmp_path / "full.csv", PROFILE_HEADER, rows))
    return dep


def test_a_partial_batch_updates_only_its_columns_of_its_people(three: Deployment, tmp_path: Path) -> None:
    before = profiles_by_id(three)
    # The review's reproduction: an update file with the id and one column.
    update = write_csv(tmp_path / "update.csv", ["customer_id", "gender"], [["C1", "non_binary"], ["C2", ""]])
    (r,) = ingest(three, "profiles", update)
    assert r.stored and r.mode == "patch" and "patch" in r.message
    after = profiles_by_id(three)
    assert after["C1"] == {**before["C1"], "gender": "non_binary"}
    assert after["C2"] == {**before["C2"], "gender": None}  # an explicit blank is an update too
    assert after["C3"] == before["C3"]
    assert [after[c]["consent_marketing"] for c in ("C1", "C2", "C3")] == [True, True, False]


def test_a_replace_batch_is_the_whole_profile_of_its_people(three: Deployment, tmp_path: Path) -> None:
    before = profiles_by_id(three)
    update = write_csv(tmp_path / "replace.csv", ["customer_id", "gender"], [["C1", "non_binary"]])
    (r,) = ingest(three, "profiles", update, mode="replace")
    assert r.mode == "replace"
    after = profiles_by_id(three)
    assert after["C1"]["gender"] == "non_binary"
    assert after["C1"]["consent_marketing"] is None and after["C1"]["age_band"] is None
    # C2 and C3 are untouched; they only gain the columns the replace batch brought, as unknown.
    for cid in ("C2", "C3"):
        assert after[cid] == {**dict.fromkeys(after[cid]), **before[cid]}


def test_a_patch_for_a_new_person_and_a_new_column(three: Deployment, tmp_path: Path) -> None:
    update = write_csv(tmp_path / "u.csv", ["customer_id", "signup_date"], [["C3", "2024-02-29"], ["C9", ""]])
    ingest(three, "profiles", update)
    after = profiles_by_id(three)
    assert str(after["C3"]["signup_date"]) == "2024-02-29" and after["C1"]["signup_date"] is None
    assert after["C9"]["gender"] is None and after["C9"]["consent_marketing"] is None
    with pytest.raises(InvalidInput, match="carries no profile attribute"):
        ingest(three, "profiles", write_csv(tmp_path / "ids.csv", ["customer_id"], [["C1"]]))


def _with_patch(dep: Deployment, tmp_path: Path) -> dict[str, dict[str, Any]]:
    update = write_csv(tmp_path / "update.csv", ["customer_id", "gender"], [["C1", "non_binary"]])
    ingest(dep, "profiles", update)
    ingest(
        dep, "profiles", write_csv(tmp_path / "c2.csv", ["customer_id", "consent_marketing"], [["C2", "no"]])
    )
    return profiles_by_id(dep)


def test_column_level_latest_wins_survives_compaction(three: Deployment, tmp_path: Path) -> None:
    expected = _with_patch(three, tmp_path)
    maintenance.compact(store=three.store, keyset=three.keyset, policy=three.ingest_policy, now=AS_OF)
    assert len(three.store.batches("profiles")) == 1
    assert profiles_by_id(three) == expected


def test_column_level_latest_wins_survives_erasure(three: Deployment, tmp_path: Path) -> None:
    expected = _with_patch(three, tmp_path)
    maintenance.erase_subject(store=three.store, keyset=three.keyset, policy=three.ingest_policy, raw_id="C3")
    del expected["C3"]
    assert profiles_by_id(three) == expected


def test_column_level_latest_wins_survives_rotation(three: Deployment, tmp_path: Path) -> None:
    expected = _with_patch(three, tmp_path)
    maintenance.rotate_keys(store=three.store, keyset_path=three.settings.keyset, policy=three.ingest_policy)
    dep = Deployment(three.settings)
    assert dep.store.key_version() == 2
    assert profiles_by_id(dep) == expected
    dep.close()


def test_segments_see_the_patched_profiles(three: Deployment, tmp_path: Path) -> None:
    from privseg.segments import definitions, engine

    definitions.apply_documents(
        three.store.conn,
        three.keyset,
        [
            (
                "segment",
                {
                    "id": "everyone",
                    "objective": "brand",
                    "where": {"bucket": {"salt": "x", "range": [0, 9999]}},
                },
                "t",
            )
        ],
        schema=three.schema,
        categories=three.categories,
        actor="admin:cli",
    )
    _with_patch(three, tmp_path)
    snap, _ = engine.compute_snapshot(
        store=three.store, compiler=three.compiler(), keyset=three.keyset, as_of=AS_OF
    )
    members = pl.read_parquet(engine.snapshot_path(three.store, snap)).get_column("everyone").sum()
    assert members == 1  # C1 still consents (its patch left consent alone); C2 withdrew; C3 never did


# -- nothing lost silently: retention and the reference time -----------------------------------------------
def test_a_batch_that_would_store_nothing_is_an_error_and_records_nothing(
    dep: Deployment, tmp_path: Path
) -> None:
    old = write_csv(
        tmp_path / "2014.csv",
        EVENT_HEADER,
        [event_row("C1", ts="2014-03-01T10:00:00Z"), event_row("C2", ts="2014-07-01T10:00:00Z")],
    )
    with pytest.raises(
        InvalidInput, match="nothing to store: all 2 events are older than the 730-day retention"
    ):
        ingest(dep, "events", old)
    assert dep.store.batches() == []
    assert dep.store.conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0] == 0
    # The same file, as of its own time: stored (it was never recorded as ingested).
    (r,) = ingest(dep, "events", old, now=datetime(2014, 12, 31, tzinfo=UTC))
    assert r.stored and r.rows == 2 and r.expired_events == 0


def test_ages_count_from_the_reference_time(dep: Deployment, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1", birth_date="1980-05-17")])
    ingest(dep, "profiles", path, now=datetime(2000, 1, 1, tzinfo=UTC))
    assert profiles_by_id(dep)["C1"]["age_band"] == "18-24"  # 19 in 2000, not 46


def test_cli_mode_and_as_of(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from privseg.keyset import create_keyset

    create_keyset(settings.keyset, "test")
    events = write_csv(tmp_path / "e.csv", EVENT_HEADER, [event_row("C1", ts="2014-03-01T10:00:00Z")])
    refused = run_cli(settings, "ingest", "events", str(events), check=False)
    assert refused.returncode == 2 and "nothing to store" in refused.stderr
    assert (
        "stored events batch"
        in run_cli(settings, "ingest", "events", str(events), "--as-of", "2014-06-01").stdout
    )
    profiles = write_csv(tmp_path / "p.csv", ["customer_id", "gender"], [["C1", "male"]])
    assert "replace" in run_cli(settings, "ingest", "profiles", str(profiles), "--mode", "replace").stdout
    bad = run_cli(settings, "ingest", "profiles", str(profiles), "--mode", "merge", check=False)
    assert bad.returncode == 2 and "--mode must be patch or replace" in bad.stderr


# -- re-ingestion: content ids, changed policies, and the HMAC-SHA256 ids of earlier versions ----------
def _recorded_before_blake3(dep: Deployment, kind: str, path: Path, *, bytes_only: bool = False) -> None:
    """Turn what this version recorded for ``path`` into what a privseg with HMAC-SHA256 content ids
    recorded (its source and content id; ``bytes_only``: events keyed on their bytes alone, from
    before the policy was part of an event file's id), and flag the store as its migration does."""
    import hashlib
    import hmac

    from privseg.db import set_meta, transaction
    from privseg.ingest.files import content_ids, policy_content_id

    old = hmac.new(dep.keyset.derived_key("content-id"), kind.encode() + b"\n", hashlib.sha256)
    old.update(path.read_bytes())
    source = old.hexdigest()
    cid = policy_content_id(dep.keyset, source, dep.ingest_policy) if kind == "events" else source
    new, _ = content_ids(dep.keyset, kind, path)  # type: ignore[arg-type]
    conn = dep.store.conn
    with transaction(conn):
        changed = conn.execute(
            "UPDATE contents SET content_id = ?, source = ? WHERE kind = ? AND source = ?",
            (source if bytes_only else cid, source, kind, new),
        ).rowcount
        conn.execute("UPDATE batches SET source = ? WHERE source = ?", (source, new))
        set_meta(conn, "legacy_content_ids", "1")
    assert changed == 1


def _longer_retention(dep: Deployment, tmp_path: Path) -> Deployment:
    import shutil

    from tests.conftest import POLICIES

    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    ingest_yaml = policies / "ingest.yaml"
    ingest_yaml.write_text(ingest_yaml.read_text().replace("retention_days: 730", "retention_days: 1000"))
    return Deployment(dep.settings.model_copy(update={"policy_dir": policies}))


@pytest.mark.parametrize("earlier_ids", [False, True], ids=["blake3", "recorded with HMAC-SHA256 ids"])
def test_the_same_events_under_a_changed_policy_are_stored_again_without_duplicates(
    dep: Deployment, tmp_path: Path, earlier_ids: bool
) -> None:
    rows = [event_row("C1", ts="2024-03-01T10:00:00Z"), event_row("C2", ts="2026-05-01T10:00:00Z")]
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, rows)
    (first,) = ingest(dep, "events", path)
    assert first.rows == 1 and first.expired_events == 1  # 2024-03 is past 730 days before 2026-06
    if earlier_ids:
        _recorded_before_blake3(dep, "events", path)
    (again,) = ingest(dep, "events", path)
    assert not again.stored  # same bytes, same policy: a no-op
    longer = _longer_retention(dep, tmp_path)
    (second,) = ingest(longer, "events", path)
    assert second.stored and second.rows == 2 and second.replaced_batches == (first.batch_id,)
    events = longer.store.scan_events()
    assert events is not None and events.collect().height == 2  # not 3: the first batch was replaced
    assert [b.id for b in longer.store.batches("events")] == [second.batch_id]
    longer.close()


@pytest.mark.parametrize("earlier_ids", [False, True], ids=["blake3", "recorded with HMAC-SHA256 ids"])
def test_a_file_stored_before_an_erasure_is_not_replayed_under_a_new_policy(
    dep: Deployment, tmp_path: Path, earlier_ids: bool
) -> None:
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, [event_row("C1"), event_row("C2")])
    ingest(dep, "events", path)
    if earlier_ids:
        _recorded_before_blake3(dep, "events", path)
    maintenance.erase_subject(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id="C1")
    longer = _longer_retention(dep, tmp_path)
    with pytest.raises(InvalidInput, match="could bring an erased person back"):
        ingest(longer, "events", path)
    events = longer.store.scan_events()
    assert events is not None and events.collect().height == 1
    longer.close()


def test_content_ids_are_keyed_blake3_hashes(dep: Deployment, tmp_path: Path) -> None:
    import hashlib

    from blake3 import blake3

    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, [event_row("C1")])
    ingest(dep, "events", path)
    ((cid, source),) = dep.store.conn.execute("SELECT content_id, source FROM contents").fetchall()
    assert source.startswith("b3:") and not dep.store.legacy_content_ids
    data = path.read_bytes()
    # Keyed: nobody without the keyset can tell from the database which file was ingested.
    for digest in (
        blake3(data).hexdigest(),
        blake3(b"events\n" + data).hexdigest(),
        hashlib.sha256(data).hexdigest(),
    ):
        assert digest not in (cid, source.removeprefix("b3:"))


@pytest.mark.parametrize("kind", ["profiles", "events"])
def test_content_recorded_with_the_earlier_ids_is_still_known(
    dep: Deployment, tmp_path: Path, kind: str
) -> None:
    path = (
        write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")])
        if kind == "profiles"
        else write_csv(tmp_path / "e.csv", EVENT_HEADER, [event_row("C1")])
    )
    (first,) = ingest(dep, kind, path)
    _recorded_before_blake3(dep, kind, path)
    (again,) = ingest(dep, kind, path)
    assert not again.stored and again.batch_id == first.batch_id
    # A new file in such a store is recorded under the current ids, and known again as well.
    other = (
        write_csv(tmp_path / "p2.csv", PROFILE_HEADER, [profile_row("C2")])
        if kind == "profiles"
        else write_csv(tmp_path / "e2.csv", EVENT_HEADER, [event_row("C2")])
    )
    (stored,) = ingest(dep, kind, other)
    (repeat,) = ingest(dep, kind, other)
    assert stored.stored and not repeat.stored
    sources = [r[0] for r in dep.store.conn.execute("SELECT source FROM contents ORDER BY first_batch")]
    assert not sources[0].startswith("b3:") and sources[1].startswith("b3:")


def test_events_keyed_on_their_bytes_alone_by_an_earlier_version_are_still_known(
    dep: Deployment, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "e.csv", EVENT_HEADER, [event_row("C1")])
    (first,) = ingest(dep, "events", path)
    _recorded_before_blake3(dep, "events", path, bytes_only=True)
    (again,) = ingest(dep, "events", path)
    assert not again.stored and again.batch_id == first.batch_id


# -- what real exports look like ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, data, kw",
    [
        (
            "semicolon_bom.csv",
            "\ufeffcustomer_id;gender;consent_marketing\nC1;female;true\nC2;male;false\n",
            {},
        ),
        ("tab.csv", "customer_id\tgender\tconsent_marketing\nC1\tfemale\ttrue\nC2\tmale\tfalse\n", {}),
        ("pipe.csv", "customer_id|gender|consent_marketing\nC1|female|true\nC2|male|false\n", {}),
        (
            "given.csv",
            "customer_id;gender;consent_marketing\nC1;female;true\nC2;male;false\n",
            {"separator": ";"},
        ),
    ],
)
def test_separators_are_detected_or_given(
    dep: Deployment, tmp_path: Path, name: str, data: str, kw: dict[str, str]
) -> None:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8"))
    (r,) = ingest(dep, "profiles", path, **kw)
    assert r.rows == 2
    got = profiles_by_id(dep)
    assert got["C1"]["gender"] == "female" and got["C2"]["consent_marketing"] is False


def test_a_latin1_export_needs_its_encoding_and_is_then_read(dep: Deployment, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    # A Latin-1 byte (é) in the identifier: read as UTF-8 it is invalid, as Latin-1 it is the id.
    path.write_bytes("customer_id;gender\nCé1;female\n".encode("latin-1"))
    with pytest.raises(InvalidInput, match=r"latin1.csv: not UTF-8 text .*see --encoding"):
        ingest(dep, "profiles", path)
    (r,) = ingest(dep, "profiles", path, encoding="latin-1")
    assert r.rows == 1 and "Cé1" in profiles_by_id(dep)
    with pytest.raises(InvalidInput, match="unknown text encoding"):
        ingest(dep, "profiles", path, encoding="klingon")
    with pytest.raises(InvalidInput, match="unknown text encoding"):  # a NUL once escaped as ValueError
        ingest(dep, "profiles", path, encoding="utf\x00-8")


def test_an_undetectable_layout_is_a_clear_error(dep: Deployment, tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("customer_id;gender,x\nC1;a,b;c\nC2|d\n")
    with pytest.raises(
        InvalidInput, match=r"ragged.csv: cannot tell the separator: .* comma and on semicolon"
    ):
        ingest(dep, "profiles", path)
    assert dep.store.batches() == []


# -- an export as marketing tools write it ------------------------------------------------------------
EXPORT_POLICY = """
version: 1
identity: {column: ID, type: customer_number}
retention_days: 3650
profiles:
  drop: [Dt_Customer]
  generalize:
    Year_Birth: {to: age_band, from_type: year, edges: [18, 25, 35, 45, 55, 65]}
    Income: {to: income_band, edges: [25000, 50000, 100000], labels: [lt_25k, 25k_50k, 50k_100k, gt_100k]}
  attributes:
    Marital_Status:
      type: category
      values: [single, married, together, divorced, widow, other]
      fold: {other: [YOLO, Absurd, Alone]}
    MntWines: {type: float, min: 0}
    MntFruits: {type: float, min: 0}
    NumWebPurchases: {type: int, min: 0, max: 30, out_of_range: clip}
    NumStorePurchases: {type: int, min: 0, max: 30, out_of_range: unknown}
    consent_marketing: {type: bool}
  derived:
    total_spend: {sum: [MntWines, MntFruits]}
events:
  timestamp: ts
  attributes:
    event_type: {type: category, values: [purchase], required: true}
"""

EXPORT = (
    "ID;Year_Birth;Income;Marital_Status;MntWines;MntFruits;NumWebPurchases;NumStorePurchases;"
    "consent_marketing;Dt_Customer\n"
    "5524;1957;58138;single;635;88;8;4;1;2012-09-04\n"
    "2174;1954;;YOLO;11;;1;2;1;2014-03-08\n"
    "4141;1965;71613;together;;;99;75;0;2013-08-21\n"
    "6182;1984;26646;married;11;4;2;4;1;2014-02-10\n"
)


def test_a_marketing_export_goes_in_with_its_own_policy(dep: Deployment, tmp_path: Path) -> None:
    import yaml

    from privseg.policy.ingest import IngestPolicy

    policy = IngestPolicy.model_validate(yaml.safe_load(EXPORT_POLICY))
    path = tmp_path / "marketing_campaign.csv"
    path.write_bytes(("\ufeff" + EXPORT).encode("utf-8"))
    (r,) = ingest_files(
        store=dep.store, keyset=dep.keyset, policy=policy, kind="profiles", paths=[path], now=AS_OF
    )
    assert r.rows == 4 and r.dropped_columns == ("Dt_Customer",)
    lf = dep.store.scan_profiles()
    assert lf is not None
    p = Pseudonymizer(dep.keyset, policy.identity.type, 1)
    rows = {p.decrypt(row.pop("pid")): row for row in lf.collect().iter_rows(named=True)}
    assert rows["5524"]["age_band"] == "65+" and rows["6182"]["age_band"] == "35-44"  # 2026 - year
    assert rows["5524"]["income_band"] == "50k_100k" and rows["6182"]["income_band"] == "25k_50k"
    assert rows["2174"]["income_band"] is None  # a blank income is unknown, not an error
    assert rows["2174"]["Marital_Status"] == "other"  # YOLO folds into the declared value
    assert rows["4141"]["NumWebPurchases"] == 30 and rows["4141"]["NumStorePurchases"] is None
    assert rows["5524"]["total_spend"] == 723.0 and rows["2174"]["total_spend"] == 11.0
    assert rows["4141"]["total_spend"] is None  # every source unknown
    assert "Dt_Customer" not in lf.collect_schema().names()


def test_a_derived_attribute_can_be_used_in_a_segment(tmp_path: Path) -> None:
    import yaml

    from privseg.policy.ingest import IngestPolicy
    from privseg.schema import Schema
    from privseg.segments.compiler import Compiler
    from privseg.segments.engine import evaluate
    from privseg.segments.parser import Parser
    from tests.segment_helpers import UNTAGGED

    schema = Schema.from_ingest_policy(IngestPolicy.model_validate(yaml.safe_load(EXPORT_POLICY)))
    assert schema.profile["total_spend"].type == "float"
    seg = {
        "id": "big",
        "category": "general",
        "objective": "brand",
        "where": {"property": {"total_spend": {"gte": 500}}},
    }
    compiler = Compiler(
        schema=schema,
        categories=UNTAGGED,
        segments={"big": Parser(schema, set(UNTAGGED.categories)).segment(seg, "t")},
        traits={},
    )
    profiles = pl.DataFrame(
        {"pid": ["a", "b", "c"], "total_spend": [723.0, 11.0, None], "consent_marketing": [True, True, True]}
    )
    out, _ = evaluate(
        compiler.compile(AS_OF),
        profiles=profiles,
        events=pl.DataFrame(
            schema={"pid": pl.String, "ts": pl.Datetime("us", "UTC"), "event_type": pl.String}
        ),
    )
    assert out.filter(pl.col("big")).get_column("pid").to_list() == ["a"]


def test_out_of_range_still_refuses_by_default(dep: Deployment, tmp_path: Path) -> None:
    import yaml

    from privseg.policy.ingest import IngestPolicy

    doc = yaml.safe_load(EXPORT_POLICY)
    doc["profiles"]["attributes"]["NumWebPurchases"].pop("out_of_range")
    policy = IngestPolicy.model_validate(doc)
    path = tmp_path / "export.csv"
    path.write_text(EXPORT)
    with pytest.raises(InvalidInput, match=r"column 'NumWebPurchases', row 3: above the maximum 30"):
        ingest_files(
            store=dep.store, keyset=dep.keyset, policy=policy, kind="profiles", paths=[path], now=AS_OF
        )
    assert dep.store.batches() == []


def test_long_work_reports_its_stages_and_nothing_of_a_person(dep: Deployment, demo_files) -> None:  # type: ignore[no-untyped-def]
    from privseg.segments import definitions, engine

    messages: list[str] = []
    for kind, path in (("profiles", demo_files.customers), ("events", demo_files.events)):
        ingest_files(
            store=dep.store,
            keyset=dep.keyset,
            policy=dep.ingest_policy,
            kind=kind,  # type: ignore[arg-type]
            paths=[path],
            now=AS_OF,
            progress=messages.append,
        )
    assert messages[:3] == [
        "customers.csv: reading",
        f"customers.csv: validating and pseudonymizing {demo_files.customer_rows:,} rows",
        f"writing 1 batch(es) of {demo_files.customer_rows:,} rows",
    ]
    definitions.apply_documents(
        dep.store.conn,
        dep.keyset,
        [
            (
                "segment",
                {"id": "all_buyers", "objective": "brand", "where": {"event": {"type": "purchase"}}},
                "t",
            )
        ],
        schema=dep.schema,
        categories=dep.categories,
        actor="admin:cli",
    )
    engine.compute_snapshot(
        store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF, progress=messages.append
    )
    assert messages[-3].startswith("loading the store for 1 segments")
    assert messages[-1].startswith("writing the snapshot (")
    assert not any("C0000" in m or "@" in m for m in messages)


def test_no_progress_is_printed_when_not_on_a_terminal(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from privseg.keyset import create_keyset

    create_keyset(settings.keyset, "test")
    path = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")])
    out = run_cli(settings, "ingest", "profiles", str(path))
    assert "reading" not in out.stderr and "pseudonymizing" not in out.stderr
