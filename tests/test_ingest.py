from __future__ import annotations

import gzip
import json
import os
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest

from privseg.deployment import Deployment
from privseg.errors import InvalidInput
from privseg.ingest import sources
from privseg.ingest.files import ingest_files
from privseg.ingest.sources import read_source
from privseg.pseudonym import Pseudonymizer
from tests.conftest import AS_OF, EVENT_HEADER, PROFILE_HEADER, event_row, profile_row, write_csv


def ingest(dep: Deployment, kind: str, *paths: Path, encoding: str = "utf-8") -> list:
    return ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind=kind,  # type: ignore[arg-type]
        paths=list(paths),
        now=AS_OF,
        encoding=encoding,
    )


def stored_files(dep: Deployment) -> list[Path]:
    return sorted(p for p in dep.settings.data_dir.rglob("*") if p.is_file() and p.suffix == ".parquet")


def assert_nothing_stored(dep: Deployment) -> None:
    assert dep.store.batches() == []
    assert stored_files(dep) == []


def test_profiles_are_pseudonymized_generalized_and_typed(dep: Deployment, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "p.csv",
        PROFILE_HEADER,
        [profile_row("C1"), profile_row(" C2 ", birth_date="1950-01-01", postal_code="02139", interests="")],
    )
    (result,) = ingest(dep, "profiles", path)
    assert result.stored and result.rows == 2 and result.people == 2
    assert result.dropped_columns == ("email",)
    assert set(result.generalized_columns) == {"birth_date", "postal_code"}
    df = dep.store.scan_profiles().collect().sort("age_band")  # type: ignore[union-attr]
    assert df.columns[:3] == ["pid", "age_band", "region"]
    assert "email" not in df.columns and "birth_date" not in df.columns and "postal_code" not in df.columns
    assert df.schema["interests"] == pl.List(pl.String)
    assert df.schema["consent_marketing"] == pl.Boolean
    assert "signup_date" not in df.columns  # patch (the default): a column the file lacks is not written
    assert df.get_column("age_band").to_list() == [
        "45-54",
        "65+",
    ]  # born 1980-05-17 / 1950, as of 2026-06-01
    assert df.get_column("region").to_list() == ["pacific", "new_england"]
    # A blank cell means "not given" for every type, lists included: null, not an empty list.
    assert df.get_column("interests").to_list() == [["travel", "hearing_aids"], None]
    p = Pseudonymizer(dep.keyset, dep.ingest_policy.identity.type, 1)
    assert sorted(df.get_column("pid").to_list()) == sorted([p.pseudonymize("C1"), p.pseudonymize("C2")])


@pytest.mark.parametrize(
    "born, band",
    [
        ("2008-06-01", "18-24"),  # 18th birthday on the as-of day: 18
        ("2008-06-02", "<18"),  # one day short of 18
        ("2001-06-02", "18-24"),  # turns 25 tomorrow
        ("2001-06-01", "25-34"),
        ("1961-06-01", "65+"),
        ("1961-06-02", "55-64"),
    ],
)
def test_age_band_edges_are_inclusive_on_the_birthday(
    dep: Deployment, tmp_path: Path, born: str, band: str
) -> None:
    ingest(
        dep, "profiles", write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1", birth_date=born)])
    )
    assert dep.store.scan_profiles().collect().get_column("age_band").to_list() == [band]  # type: ignore[union-attr]


def test_events_are_parsed_to_utc(dep: Deployment, tmp_path: Path) -> None:
    rows = [
        event_row("C1", ts="2026-05-30T10:00:00Z"),
        event_row("C1", ts="2026-05-30T12:00:00+02:00"),
        event_row("C2", ts="2026-05-30 10:00:00", value="", campaign=""),
        event_row("C2", ts="2026-05-30T10:00:00.250Z", event_type="page_view", product_category=""),
    ]
    ingest(dep, "events", write_csv(tmp_path / "e.csv", EVENT_HEADER, rows))
    df = dep.store.scan_events().collect()  # type: ignore[union-attr]
    assert df.schema["ts"] == pl.Datetime("us", "UTC")
    assert df.get_column("ts").dt.hour().to_list() == [10, 10, 10, 10]
    # Rows are stored sorted by person shard (a person's rows keep their order, people do not): so
    # each person's rows are checked in the file's order.
    per_person = sorted(
        df.group_by("pid", maintain_order=True).agg("value", "ts").select("value", "ts").rows(),
        key=lambda r: r[1][0] != r[1][1],
    )
    t10 = datetime(2026, 5, 30, 10, tzinfo=UTC)
    assert per_person == [  # C1: both at 10:00 UTC; C2: the null value, then the .250 s page view
        ([19.99, 19.99], [t10, t10]),
        ([None, 19.99], [t10, t10.replace(microsecond=250_000)]),
    ]
    assert df.get_column("campaign").null_count() == 1
    assert df.get_column("variant").null_count() == 4  # column absent from the file


def test_events_past_retention_are_dropped_and_counted(dep: Deployment, tmp_path: Path) -> None:
    rows = [
        event_row("C1", ts="2023-01-01T00:00:00Z"),
        event_row("C1"),
        event_row("C2", ts="2023-02-01T00:00:00Z"),
    ]
    (result,) = ingest(dep, "events", write_csv(tmp_path / "e.csv", EVENT_HEADER, rows))
    assert result.expired_events == 2 and result.rows == 1
    assert result.people == 1  # C2 had only expired events: not a person of this batch
    assert dep.store.batches("events")[0].people == 1


@pytest.mark.parametrize(
    "override, column, rows_named, what",
    [
        ({"birth_date": "1980-13-45"}, "birth_date", "2", "not a date"),
        ({"birth_date": "2090-01-01"}, "birth_date", "2", "outside 0-120"),
        ({"postal_code": "X1234"}, "postal_code", "2", "region map"),
        ({"gender": "robot"}, "gender", "2", "not one of"),
        ({"interests": "travel;knitting"}, "interests", "2", "item is not one of"),
        ({"consent_marketing": "maybe"}, "consent_marketing", "2", "not a boolean"),
        ({"customer_id": "   "}, "customer_id", "2", "missing or empty"),
    ],
)
def test_bad_profile_values_are_refused_naming_file_row_and_column(
    dep: Deployment, tmp_path: Path, override: dict[str, str], column: str, rows_named: str, what: str
) -> None:
    secret_value = "zz-secret-zz@example.com"
    rows = [profile_row("C1", email=secret_value), profile_row("C2", **override), profile_row("C3")]
    with pytest.raises(InvalidInput) as info:
        ingest(dep, "profiles", write_csv(tmp_path / "batch.csv", PROFILE_HEADER, rows))
    msg = str(info.value)
    assert "batch.csv" in msg and f"column {column!r}, row {rows_named}" in msg and what in msg
    for value in override.values():
        if value.strip():
            assert value not in msg  # values are never echoed (they may be personal data)
    assert secret_value not in msg and "C1" not in msg
    assert_nothing_stored(dep)


@pytest.mark.parametrize(
    "override, column, what",
    [
        ({"ts": "yesterday"}, "ts", "ISO 8601"),
        ({"ts": "2027-01-01T00:00:00Z"}, "ts", "in the future"),
        ({"value": "abc"}, "value", "not a number"),
        ({"value": "-5"}, "value", "below the minimum"),
        ({"value": "inf"}, "value", "not a number"),
        ({"event_type": ""}, "event_type", "required"),
        ({"campaign": "promo for jane.doe@example.com"}, "campaign", "e-mail address"),
        ({"campaign": "x" * 65}, "campaign", "longer than 64"),
    ],
)
def test_bad_event_values_are_refused(
    dep: Deployment, tmp_path: Path, override: dict[str, str], column: str, what: str
) -> None:
    rows = [event_row("C1"), event_row("C1"), event_row("C2", **override)]
    with pytest.raises(InvalidInput) as info:
        ingest(dep, "events", write_csv(tmp_path / "e.csv", EVENT_HEADER, rows))
    msg = str(info.value)
    assert f"column {column!r}, row 3" in msg and what in msg
    assert "jane.doe" not in msg
    assert_nothing_stored(dep)


def test_all_problems_are_reported_at_once(dep: Deployment, tmp_path: Path) -> None:
    rows = [profile_row(f"C{i}", gender="robot") for i in range(8)] + [profile_row("D", birth_date="nope")]
    with pytest.raises(InvalidInput) as info:
        ingest(dep, "profiles", write_csv(tmp_path / "p.csv", PROFILE_HEADER, rows))
    msg = str(info.value)
    assert "9 invalid value(s)" in msg
    assert "column 'gender', row 1, 2, 3, 4, 5 and 3 more" in msg
    assert "column 'birth_date', row 9" in msg


def test_unknown_columns_are_refused_by_name(dep: Deployment, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "p.csv", [*PROFILE_HEADER, "ssn", "favourite_color"], [[*profile_row("C1"), "1", "red"]]
    )
    with pytest.raises(
        InvalidInput, match=r"not named in the ingest policy \(profiles\): \['ssn', 'favourite_color'\]"
    ):
        ingest(dep, "profiles", path)
    assert_nothing_stored(dep)


def test_structural_problems(dep: Deployment, tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes, str]] = {
        "empty.csv": (b"", "empty"),
        "header_only.csv": (b"customer_id,gender\n", "no rows"),
        "dup.csv": (b"customer_id,gender,gender\nC1,male,male\n", "names column 'gender' twice"),
        "garbage.csv": (os.urandom(2048) + b"\xff\xfe", "not UTF-8"),
        "ragged.csv": (b"customer_id,gender\nC1,male\nC2,male,extra\n", "line 3: expected 2 fields, found 3"),
        "oldmac.csv": (b"customer_id,gender\rC1,male\rC2,female\r", "lines end with a bare carriage return"),
        "noid.csv": (b"gender\nmale\n", "identity column 'customer_id' is missing"),
        "blankname.csv": (b"customer_id,,gender\nC1,x,male\n", "has no name"),
        "notparquet.parquet": (b"PAR0 nonsense", "not a Parquet file"),
        "trunc.parquet": (b"PAR1" + os.urandom(100), "corrupt or truncated"),
        "bad.ndjson": (b'{"customer_id": "C1"}\n{"customer_id": \n', "line 2: not valid JSON"),
        "data.xlsx": (b"PK..", "unknown file type"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InvalidInput) as info:
            ingest(dep, "profiles", path)
        assert message in str(info.value), name
        assert name in str(info.value), name
    assert_nothing_stored(dep)


def test_gzip_parquet_and_ndjson_give_the_same_store_content(dep: Deployment, tmp_path: Path) -> None:
    rows = [profile_row("C1"), profile_row("C2", interests="fitness", consent_marketing="false")]
    csv_path = write_csv(tmp_path / "p.csv", PROFILE_HEADER, rows)
    gz_path = tmp_path / "p.csv.gz"
    gz_path.write_bytes(gzip.compress(csv_path.read_bytes()))
    typed = pl.read_csv(csv_path, infer_schema=False).with_columns(
        pl.col("birth_date").str.to_date(),
        pl.col("consent_marketing") == "true",
        pl.col("interests").str.split(";"),
    )
    pq_path = tmp_path / "p.parquet"
    typed.write_parquet(pq_path)
    nd_path = tmp_path / "p.ndjson"
    nd_path.write_text(
        "\n".join(
            json.dumps(
                {
                    **dict(zip(PROFILE_HEADER, r, strict=True)),
                    "interests": r[5].split(";"),
                    "consent_marketing": r[6] == "true",
                }
            )
            for r in rows
        )
    )
    frames = []
    for path in (csv_path, gz_path, pq_path, nd_path):
        (result,) = ingest(dep, "profiles", path)
        assert result.stored, path.name
        batch = dep.store.batches("profiles")[-1]
        frames.append(pl.read_parquet(dep.store.path_of(batch)).sort("pid"))
    for other in frames[1:]:
        assert other.equals(frames[0])


def test_reingesting_identical_content_is_a_noop_that_says_so(dep: Deployment, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")])
    (first,) = ingest(dep, "profiles", path)
    copy = tmp_path / "copy.csv"
    copy.write_bytes(path.read_bytes())
    (again,) = ingest(dep, "profiles", copy)
    assert not again.stored and again.batch_id == first.batch_id
    assert "already ingested" in again.message
    assert len(dep.store.batches()) == 1
    # The same bytes as events are a different thing, not a duplicate.
    ev = write_csv(tmp_path / "e.csv", EVENT_HEADER, [event_row("C1")])
    assert ingest(dep, "events", ev)[0].stored


def test_stored_content_is_a_noop_even_when_its_read_now_fails(dep: Deployment, tmp_path: Path) -> None:
    """The content id is hashed while the file is read: content already stored is a no-op whatever
    the read says (here: a limit that the stored file now exceeds), and new content that fails to
    read is still an error."""
    path = tmp_path / "p.csv.gz"
    path.write_bytes(
        gzip.compress(write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")]).read_bytes())
    )
    (first,) = ingest(dep, "profiles", path)
    tight = {"store": dep.store, "keyset": dep.keyset, "policy": dep.ingest_policy, "kind": "profiles"}
    (again,) = ingest_files(**tight, paths=[path], max_decompressed_bytes=8)
    assert not again.stored and again.batch_id == first.batch_id and len(dep.store.batches()) == 1
    other = tmp_path / "q.csv.gz"
    other.write_bytes(
        gzip.compress(write_csv(tmp_path / "q.csv", PROFILE_HEADER, [profile_row("C2")]).read_bytes())
    )
    with pytest.raises(InvalidInput, match=r"q\.csv\.gz"):
        ingest_files(**tight, paths=[other], max_decompressed_bytes=8)
    assert len(dep.store.batches()) == 1


def test_profiles_upsert_latest_batch_wins(dep: Deployment, tmp_path: Path) -> None:
    ingest(
        dep, "profiles", write_csv(tmp_path / "a.csv", PROFILE_HEADER, [profile_row("C1"), profile_row("C2")])
    )
    ingest(dep, "profiles", write_csv(tmp_path / "b.csv", PROFILE_HEADER, [profile_row("C2", gender="male")]))
    df = dep.store.scan_profiles().collect()  # type: ignore[union-attr]
    assert df.height == 2
    p = Pseudonymizer(dep.keyset, dep.ingest_policy.identity.type, 1)
    genders = dict(zip(df.get_column("pid"), df.get_column("gender"), strict=True))
    assert genders[p.pseudonymize("C2")] == "male" and genders[p.pseudonymize("C1")] == "female"


def test_duplicate_person_within_a_profile_batch_is_refused(dep: Deployment, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1"), profile_row("C2"), profile_row(" C1")]
    )
    with pytest.raises(
        InvalidInput, match=r"column 'customer_id', row 1, 3: the same person appears more than once"
    ):
        ingest(dep, "profiles", path)


def test_several_files_are_all_or_nothing(dep: Deployment, tmp_path: Path) -> None:
    good = write_csv(tmp_path / "good.csv", PROFILE_HEADER, [profile_row("C1")])
    bad = write_csv(tmp_path / "bad.csv", PROFILE_HEADER, [profile_row("C2", gender="robot")])
    with pytest.raises(InvalidInput, match=r"bad\.csv"):
        ingest(dep, "profiles", good, bad)
    assert_nothing_stored(dep)
    results = ingest(dep, "profiles", good, good)
    assert [r.stored for r in results] == [True, False]


def test_demo_data_ingests_cleanly(dep: Deployment, demo_files) -> None:  # type: ignore[no-untyped-def]
    (p,) = ingest(dep, "profiles", demo_files.customers)
    (e,) = ingest(dep, "events", demo_files.events)
    assert p.rows == demo_files.customer_rows == 2000
    assert e.rows + e.expired_events == demo_files.event_rows
    events = dep.store.scan_events().collect()  # type: ignore[union-attr]
    profiles = dep.store.scan_profiles().collect()  # type: ignore[union-attr]
    assert set(events.get_column("pid")) <= set(profiles.get_column("pid"))
    assert events.get_column("ts").max() <= AS_OF  # type: ignore[operator]
    assert date(2024, 1, 1) < events.get_column("ts").min().date()  # type: ignore[union-attr]


def test_a_truncated_gzip_is_refused_not_partly_read(dep: Deployment, tmp_path: Path) -> None:
    # Polars alone reads what it can of a cut-off gzip stream: rows would vanish silently.
    rows = [profile_row(f"C{i}") for i in range(2000)]
    whole = gzip.compress(write_csv(tmp_path / "p.csv", PROFILE_HEADER, rows).read_bytes())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(InvalidInput, match=r"cut\.csv\.gz: the gzip stream is corrupt or truncated"):
        ingest(dep, "profiles", cut)
    assert_nothing_stored(dep)


def test_an_unsupported_parquet_type_is_refused_naming_the_file(dep: Deployment, tmp_path: Path) -> None:
    path = tmp_path / "odd.parquet"
    pl.DataFrame({"customer_id": ["C1"], "gender": [b"\x01"]}).write_parquet(path)  # binary column
    with pytest.raises(InvalidInput, match=r"odd\.parquet: column 'gender' has type Binary"):
        ingest(dep, "profiles", path)
    assert_nothing_stored(dep)


def _events_cut_after_field(path: Path, fields_kept: int) -> bytes:
    """The file as if the transfer stopped right after a separator of its last row: the row keeps its
    first ``fields_kept`` fields and the rest of the line is gone."""
    data = path.read_bytes().rstrip(b"\r\n")
    head, last = data.rsplit(b"\n", 1)
    return head + b"\n" + b",".join(last.split(b",")[:fields_kept]) + b"\n"


@pytest.mark.parametrize("compressed", [False, True])
def test_a_file_cut_between_two_fields_is_refused_not_stored_with_blanks(
    dep: Deployment, tmp_path: Path, compressed: bool
) -> None:
    # Polars fills a short row's missing fields with nulls: the last event would be stored without its
    # value and campaign, as if the file said they were blank.
    whole = write_csv(tmp_path / "whole.csv", EVENT_HEADER, [event_row(f"C{i}") for i in range(50)])
    cut = _events_cut_after_field(whole, 4)
    path = tmp_path / ("cut.csv.gz" if compressed else "cut.csv")
    path.write_bytes(gzip.compress(cut) if compressed else cut)
    with pytest.raises(InvalidInput) as info:
        ingest(dep, "events", path)
    assert str(info.value) == f"{path.name}: line 51: expected 6 fields, found 4"
    assert_nothing_stored(dep)


def test_a_short_row_is_refused_in_another_encoding_and_with_quoted_values(
    dep: Deployment, tmp_path: Path
) -> None:
    # Quoted values holding the separator are not fields: the count must not be fooled by them in
    # either direction (the same file, whole, is accepted with its values intact).
    header = ",".join(f'"{h}"' for h in PROFILE_HEADER)
    good = ['"C1","a@x.org","1980-01-01","02139","female","fitness;travel","true"']
    short = ['"C2","b@x.org","1990-01-01","Cañada, Sur","male"']  # 5 fields, one with a comma in it
    whole = tmp_path / "whole.csv"
    whole.write_bytes("\n".join([header, *good, good[0].replace("C1", "C3")]).encode("latin-1") + b"\n")
    path = tmp_path / "short.csv"
    path.write_bytes("\n".join([header, *good, *short]).encode("latin-1") + b"\n")
    with pytest.raises(InvalidInput) as info:
        ingest(dep, "profiles", path, encoding="latin-1")
    assert str(info.value) == "short.csv: line 3: expected 7 fields, found 5"
    assert_nothing_stored(dep)
    (result,) = ingest(dep, "profiles", whole, encoding="latin-1")
    assert result.rows == 2


def test_a_quoted_separator_in_a_value_or_the_header_is_not_a_field(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b'id,"a,b",c\n"1,1","x,""y",3\n4,,\n')
    df = read_source(path)
    assert df.columns == ["id", "a,b", "c"]
    assert df.rows() == [("1,1", 'x,"y', "3"), ("4", None, None)]


def test_a_blank_line_is_named_not_read_as_a_row_of_missing_values(dep: Deployment, tmp_path: Path) -> None:
    rows = [profile_row("C1"), profile_row("C2")]
    data = write_csv(tmp_path / "p.csv", PROFILE_HEADER, rows).read_bytes().replace(b"\r\n", b"\n")
    for name, content, line in (
        ("middle.csv", data.replace(b"\nC2,", b"\n\nC2,"), 3),
        ("end.csv", data + b"\n", 4),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InvalidInput) as info:
            ingest(dep, "profiles", path)
        assert str(info.value) == f"{name}: line {line}: blank line (expected 7 fields)"
    assert_nothing_stored(dep)


def test_a_separator_that_is_not_one_ascii_character_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", PROFILE_HEADER, [profile_row("C1")])
    for separator in ("§", ",,"):
        with pytest.raises(InvalidInput, match=r"^separator: expected one ASCII character"):
            read_source(path, separator=separator)


def test_count_chars_counts_across_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_COUNT_STEP", 7)
    data = b'a,b;"c"\n' * 13 + b",,"
    assert sources.count_chars(data, ',;"\n') == {c: data.count(c.encode()) for c in ',;"\n'}
