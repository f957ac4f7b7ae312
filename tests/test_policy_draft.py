"""`privseg policy draft`: a reviewed starting point that ingests its sample and leaks none of it."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from privseg.deployment import Deployment
from privseg.errors import InvalidInput
from privseg.ingest.files import ingest_files
from privseg.policy.draft import draft
from privseg.policy.ingest import IngestPolicy
from tests.conftest import AS_OF, run_cli


def test_a_draft_from_the_demo_data_ingests_it_and_drops_every_direct_identifier(
    dep: Deployment, demo_files
) -> None:  # type: ignore[no-untyped-def]
    text = draft(demo_files.customers, demo_files.events)
    policy = IngestPolicy.model_validate(yaml.safe_load(text))
    assert policy.identity.column == "customer_id"
    assert {"email", "phone", "first_name", "last_name", "postal_code"} <= set(policy.profiles.drop)
    assert "ip_address" in policy.events.drop
    assert policy.profiles.generalize["birth_date"].to == "age_band"
    # Nothing of any person is in the draft: no identifier, e-mail, phone, name or birth date.
    customers = pl.read_csv(demo_files.customers, infer_schema=False)
    for column in ("customer_id", "email", "phone", "first_name", "last_name", "birth_date", "postal_code"):
        leaked = [v for v in customers.get_column(column).unique().to_list() if v and f"{v}" in text]
        assert not leaked, column
    for kind, path in (("profiles", demo_files.customers), ("events", demo_files.events)):
        (r,) = ingest_files(
            store=dep.store, keyset=dep.keyset, policy=policy, kind=kind, paths=[path], now=AS_OF
        )
        assert r.stored and r.rows > 0
    stored = dep.store.scan_profiles()
    assert stored is not None
    columns = set(stored.collect_schema().names())
    assert not columns & {"email", "phone", "first_name", "last_name", "postal_code", "birth_date"}
    assert {"age_band", "gender", "interests", "consent_marketing"} <= columns


EXPORT = (
    "ID;Year_Birth;Education;Income;Kidhome;MntWines;Dt_Customer;Response\n"
    + "".join(
        f"{1000 + i};{1950 + i % 40};{['Graduation', 'PhD', 'Master'][i % 3]};"
        f"{'' if i % 17 == 0 else 20000 + 997 * i};"
        f"{i % 3};{(i * 37) % 900};{2012 + i % 3}-0{1 + i % 9}-1{i % 9};{i % 2}\n"
        for i in range(300)
    )
    + "1300;1893;YOLO;666666;0;5;2014-01-01;1\n"
)


def test_a_marketing_export_gets_birth_years_and_incomes_generalized(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "marketing_campaign.csv"
    path.write_text(EXPORT)
    out = tmp_path / "ingest.yaml"
    assert "wrote a draft" in run_cli(settings, "policy", "draft", str(path), "--out", str(out)).stdout
    text = out.read_text()
    doc = yaml.safe_load(text)
    assert doc["identity"]["column"] == "ID"
    assert doc["profiles"]["generalize"]["Year_Birth"]["from_type"] == "year"
    assert doc["profiles"]["generalize"]["Income"]["to"] == "income_band"
    education = doc["profiles"]["attributes"]["Education"]
    assert education["values"] == ["Graduation", "Master", "PhD"]  # YOLO (one row) is counted, not named
    assert "YOLO" not in text and "1893" not in text and "666666" not in text
    assert "1 rarer value(s) are not listed" in text
    assert doc["profiles"]["attributes"]["Response"] == {"type": "bool"}
    refused = run_cli(settings, "policy", "draft", str(path), "--out", str(out), check=False)
    assert refused.returncode == 2 and "refusing to overwrite" in refused.stderr


def test_draft_then_a_reviewed_edit_then_ingest(dep: Deployment, tmp_path: Path) -> None:
    """The issue's path: a semicolon export with birth years, blank incomes and an odd value."""
    path = tmp_path / "marketing_campaign.csv"
    path.write_bytes(("\ufeff" + EXPORT).encode("utf-8"))
    doc = yaml.safe_load(draft(path))
    drafted = IngestPolicy.model_validate(doc)
    with pytest.raises(InvalidInput) as refused:  # the unreviewed draft refuses the odd row
        ingest_files(
            store=dep.store, keyset=dep.keyset, policy=drafted, kind="profiles", paths=[path], now=AS_OF
        )
    assert "row 301" in str(refused.value)
    assert "YOLO" not in str(refused.value) and "1893" not in str(refused.value)
    # The reviewed edit: fold the odd education into other, make an impossible birth year unknown.
    education = doc["profiles"]["attributes"]["Education"]
    education["values"].append("other")
    education["fold"] = {"other": ["YOLO"]}
    doc["profiles"]["generalize"]["Year_Birth"]["out_of_range"] = "unknown"
    reviewed = IngestPolicy.model_validate(doc)
    (r,) = ingest_files(
        store=dep.store, keyset=dep.keyset, policy=reviewed, kind="profiles", paths=[path], now=AS_OF
    )
    assert r.stored and r.rows == 301
    stored = dep.store.scan_profiles()
    assert stored is not None
    frame = stored.collect()
    assert frame.filter(pl.col("Education") == "other").height == 1
    assert frame.get_column("age_band").null_count() == 1  # born 1893: unknown, not refused
    assert frame.get_column("income_band").null_count() == 18  # the blank incomes: unknown
