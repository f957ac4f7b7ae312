"""Governance the data decides: a segment's category comes from what it reads, not from its author.

Each test is written as the attack a hostile marketer or partner would try, and asserts it fails
safely (refused, or released under the stricter category's rules).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from fastapi.testclient import TestClient

from privseg import apikeys, audit, ledger, release
from privseg.api.app import create_app
from privseg.db import transaction
from privseg.deployment import Deployment
from privseg.errors import BudgetExhausted, Conflict, NotPermitted, PolicyViolation
from privseg.policy.categories import read_categories
from privseg.policy.checks import findings
from privseg.policy.diff import diff
from privseg.schema import FieldType
from privseg.segments import definitions, engine
from privseg.segments.language import Cond, DefinitionError
from privseg.segments.sensitivity import admitted
from tests.conftest import AS_OF, POLICIES, prepare
from tests.segment_helpers import CATEGORIES, SCHEMA, compiler, events, members, profiles, segment

CANNABIS_VIEWS = {"event": {"type": "product_view", "where": {"product_category": {"eq": "cannabis"}}}}


@pytest.fixture
def ready(dep: Deployment, demo_files) -> Deployment:  # type: ignore[no-untyped-def]
    prepare(dep, demo_files.customers, demo_files.events)
    return dep


@pytest.fixture
def api(ready: Deployment) -> tuple[TestClient, dict[str, dict[str, str]], Deployment]:
    tokens: dict[str, dict[str, str]] = {}
    for name in ("crm_team", "brand_team", "growth_team"):
        token = apikeys.create(ready.store.conn, ready.keyset, role="marketer", name=name)[1]
        tokens[name] = {"Authorization": f"Bearer {token}"}
    token = apikeys.create(ready.store.conn, ready.keyset, role="admin", name="ops")[1]
    tokens["admin"] = {"Authorization": f"Bearer {token}"}
    for partner in ("adnet_alpha", "adnet_beta"):
        token = apikeys.create(ready.store.conn, ready.keyset, role="partner", name=partner, partner=partner)[
            1
        ]
        tokens[partner] = {"Authorization": f"Bearer {token}"}
    return TestClient(create_app(ready), raise_server_exceptions=False), tokens, ready


def _seg(sid: str, where: dict[str, Any], category: str | None = "general") -> dict[str, Any]:
    doc: dict[str, Any] = {"id": sid, "objective": "brand", "where": where}
    if category is not None:
        doc["category"] = category
    return doc


def _recompute(dep: Deployment) -> engine.Snapshot:
    return engine.compute_snapshot(store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF)[
        0
    ]


# -- 1. the reproductions from the review ---------------------------------------------------------
def test_a_marketer_cannot_launder_cannabis_views_as_general(api) -> None:  # type: ignore[no-untyped-def]
    client, h, dep = api
    before = definitions.active(dep.store.conn)
    r = client.post("/v1/segments", json=[_seg("x_cannabis", CANNABIS_VIEWS)], headers=h["crm_team"])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "where.event.where.product_category reads cannabis data" in detail
    assert "declare category cannabis" in detail
    ref = _seg("x_ref_hearing", {"segment": "hearing_aid_interest_55plus"})
    r = client.post("/v1/segments", json=[ref], headers=h["crm_team"])
    assert r.status_code == 422 and "references segment 'hearing_aid_interest_55plus'" in r.json()["detail"]
    assert definitions.active(dep.store.conn) == before  # nothing stored


def test_an_undeclared_cannabis_segment_is_released_only_under_cannabis_rules(api) -> None:  # type: ignore[no-untyped-def]
    client, h, dep = api
    r = client.post("/v1/segments", json=[_seg("x_cannabis", CANNABIS_VIEWS, None)], headers=h["crm_team"])
    assert r.status_code == 200, r.text
    _recompute(dep)
    listed = {s["id"]: s for s in client.get("/v1/segments", headers=h["crm_team"]).json()}
    assert (
        listed["x_cannabis"]["category"] == ["cannabis"]
        and listed["x_cannabis"]["owner"] == "marketer:crm_team"
    )
    # The review's report: general's threshold and breakdowns for someone who is no cannabis recipient.
    body = {"segments": ["x_cannabis"], "breakdown": ["gender", "income_band"]}
    r = client.post("/v1/reports/cohort", json=body, headers=h["crm_team"])
    assert r.status_code == 403 and "'cannabis'" in r.json()["detail"]
    r = client.post("/v1/reports/cohort", json=body, headers=h["growth_team"])
    assert r.status_code == 422 and "at most 1 breakdown" in r.json()["detail"]
    r = client.post(
        "/v1/reports/cohort",
        json={"segments": ["x_cannabis"], "breakdown": ["gender"]},
        headers=h["growth_team"],
    )
    assert r.status_code == 422 and "forbids breaking down by 'gender'" in r.json()["detail"]
    assert ledger.spent_micro(dep.store.conn, category="general", since=AS_OF.replace(year=2000)) == 0
    ok = client.post(
        "/v1/reports/cohort",
        json={"segments": ["x_cannabis"], "breakdown": ["region"]},
        headers=h["growth_team"],
    ).json()
    assert ok["category"] == "cannabis" and ok["min_cohort_size"] == 100 and ok["epsilon"] == 0.25
    rows = dep.store.conn.execute("SELECT category, epsilon_micro FROM ledger").fetchall()
    assert rows == [("cannabis", ledger.to_micro(0.25))]


def test_members_of_a_derived_cannabis_segment_all_have_sensitive_consent(ready: Deployment) -> None:
    definitions.apply_documents(
        ready.store.conn,
        ready.keyset,
        [("segment", _seg("x_cannabis", CANNABIS_VIEWS, None), "test")],
        schema=ready.schema,
        categories=ready.categories,
        actor="marketer:crm_team",
    )
    snap = _recompute(ready)
    members_ = pl.read_parquet(engine.snapshot_path(ready.store, snap)).filter(pl.col("x_cannabis"))
    prof = ready.store.scan_profiles()
    assert prof is not None
    joined = members_.join(prof.collect(), on="pid", how="left")
    assert joined.height > 0
    assert joined.get_column("consent_sensitive").to_list() == [True] * joined.height


def test_a_partner_cannot_reach_a_hearing_aids_audience_through_a_reference(api) -> None:  # type: ignore[no-untyped-def]
    client, h, dep = api
    ref = _seg("x_ref_hearing", {"segment": "hearing_aid_interest_55plus"}, None)
    assert client.post("/v1/segments", json=[ref], headers=h["crm_team"]).status_code == 200
    _recompute(dep)
    grants = {g["segment"] for g in client.get("/v1/audiences", headers=h["adnet_beta"]).json()}
    assert "x_ref_hearing" not in grants and "hearing_aid_interest_55plus" not in grants
    assert "x_ref_hearing" in {
        g["segment"] for g in client.get("/v1/audiences", headers=h["adnet_alpha"]).json()
    }
    r = client.post(
        "/v1/audiences", json={"segment": "x_ref_hearing", "breakdown": ["age_band"]}, headers=h["adnet_beta"]
    )
    assert r.status_code == 403 and "'adnet_beta' is not granted" in r.json()["detail"]
    assert dep.store.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 0


def test_a_filter_that_does_not_pin_the_value_reads_every_category() -> None:
    for where in (
        {"event": {"type": "purchase"}},  # absent
        {"event": {"type": "purchase", "where": {"product_category": {"neq": "home"}}}},
        {"event": {"type": "purchase", "where": {"product_category": {"not_in": ["home", "beauty"]}}}},
        {"event": {"type": "purchase", "where": {"product_category": {"is_set": True}}}},
        {"trait": {"spend_score": {"gte": 2}}},
    ):
        comp = compiler(
            [segment(where, category=None)],  # type: ignore[arg-type]
            [
                {
                    "name": "spend_score",
                    "source": {"sum": {"type": "purchase"}},
                    "edges": [10],
                    "scores": [1, 2],
                }
            ],
            categories=CATEGORIES,
        )
        assert comp.effective("s").categories == ("cannabis", "hearing_aids", "sexual_health"), where
    pinned = {"event": {"type": "purchase", "where": {"product_category": {"in": ["home", "beauty"]}}}}
    assert compiler([segment(pinned, category=None)], categories=CATEGORIES).effective("s").categories == (
        "general",
    )  # type: ignore[arg-type]


def test_list_attributes_read_only_the_values_that_can_flip_the_condition() -> None:
    interests = SCHEMA.profile["interests"]
    assert admitted(Cond("interests", "contains", "fitness"), interests) == {"fitness"}
    assert admitted(Cond("interests", "is_set", True), interests) == set()
    gender = FieldType("category", ("female", "male", "non_binary"))
    assert admitted(Cond("gender", "neq", "female"), gender) == {"male", "non_binary"}
    assert admitted(Cond("gender", "is_null", True), gender) == set()
    for where, expected in (
        ({"property": {"interests": {"contains": "fitness"}}}, ("general",)),
        ({"not": {"property": {"interests": {"contains": "cannabis"}}}}, ("cannabis",)),
    ):
        comp = compiler([segment(where, category=None)], categories=CATEGORIES)  # type: ignore[arg-type]
        assert comp.effective("s").categories == expected


def test_consent_of_every_category_read_is_required() -> None:
    prof = profiles(
        {
            "marketing_only": {"consent_sensitive": False, "interests": ["cannabis"]},
            "both": {"consent_sensitive": True, "interests": ["cannabis"]},
        }
    )
    where = {"property": {"interests": {"contains": "cannabis"}}}
    # Declared general would be refused at apply; evaluated directly, the derived category still rules.
    comp = compiler([segment(where, category=None)], categories=CATEGORIES)  # type: ignore[arg-type]
    assert comp.consent_attributes("s") == ["consent_sensitive"]
    assert members(where, prof) == {"marketing_only", "both"}  # untagged: only general's consent
    result, _ = engine.evaluate(comp.compile(AS_OF), profiles=prof, events=events([]))
    assert set(result.filter(pl.col("s")).get_column("pid")) == {"both"}


def test_a_declared_category_may_be_stricter_and_a_segment_with_several_gets_them_all() -> None:
    stricter = segment({"property": {"gender": {"eq": "female"}}}, category="cannabis")
    assert compiler([stricter], categories=CATEGORIES).effective("s").categories == ("cannabis",)
    both = {
        "any": [
            CANNABIS_VIEWS,
            {"property": {"interests": {"contains": "hearing_aids"}}},
        ]
    }
    comp = compiler([segment(both, category="cannabis")], categories=CATEGORIES)
    with pytest.raises(DefinitionError, match="reads hearing_aids data"):
        comp.check()
    ok = compiler([segment(both, category=["cannabis", "hearing_aids"])], categories=CATEGORIES)  # type: ignore[arg-type]
    ok.check()
    assert ok.effective("s").categories == ("cannabis", "hearing_aids")


def test_a_release_over_several_categories_takes_the_strictest_rule_and_charges_each(
    ready: Deployment,
) -> None:
    segs = ["hearing_aid_interest_55plus", "cannabis_curious"]
    with pytest.raises(
        PolicyViolation, match="'cannabis\\+hearing_aids' does not allow breaking down by 'age_band'"
    ):
        release.run(
            ready.release_context(),
            release.CohortReportRequest(segments=segs, breakdown=["age_band"]),
            "growth_team",
        )
    dry = release.run(
        ready.release_context(),
        release.CohortReportRequest(segments=segs, breakdown=["region"], dry_run=True),
        "growth_team",
    )
    assert dry["charged_categories"] == ["cannabis", "hearing_aids"] and dry["remaining_epsilon"] == 2.0
    out = release.run(
        ready.release_context(),
        release.CohortReportRequest(segments=segs, breakdown=["region"]),
        "growth_team",
    )
    assert out["category"] == "cannabis+hearing_aids" and out["min_cohort_size"] == 100
    rows = ready.store.conn.execute("SELECT category, epsilon_micro FROM ledger ORDER BY category").fetchall()
    assert rows == [("cannabis", 250_000), ("hearing_aids", 250_000)]
    # Once cannabis's budget is spent, the mixed release is refused too (every member's budget is
    # checked) and hearing_aids is not charged alone.
    cannabis = ready.categories.get("cannabis")
    with transaction(ready.store.conn):
        ledger.charge(
            ready.store.conn,
            policy=cannabis,
            recipient="growth_team",
            epsilon_micro=ledger.to_micro(1.75),
            delta=0.0,
            release_id=0,
            policy_hash="test",
            now=datetime.now(UTC),
        )
    with pytest.raises(BudgetExhausted, match="'cannabis' has 0 left"):
        release.run(
            ready.release_context(), release.CohortReportRequest(segments=segs, breakdown=[]), "growth_team"
        )
    hearing = ready.store.conn.execute(
        "SELECT SUM(epsilon_micro) FROM ledger WHERE category = 'hearing_aids'"
    )
    assert hearing.fetchone()[0] == 250_000


def test_a_breakdown_by_a_tagged_attribute_is_released_under_its_category(
    dep: Deployment, demo_files, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    hearing = policies / "categories" / "hearing_aids.yaml"
    doc = yaml.safe_load(hearing.read_text())
    doc["sensitive_data"]["attributes"] = ["income_band"]
    hearing.write_text(yaml.safe_dump(doc))
    d = Deployment(dep.settings.model_copy(update={"policy_dir": policies}))
    prepare(d, demo_files.customers, demo_files.events)
    with pytest.raises(PolicyViolation, match="'hearing_aids' forbids breaking down by 'income_band'"):
        release.run(
            d.release_context(),
            release.CohortReportRequest(segments=["frequent_buyers"], breakdown=["income_band"]),
            "growth_team",
        )
    d.close()


# -- owners ----------------------------------------------------------------------------------------
def test_only_the_owner_or_an_admin_changes_or_retires_a_segment(api) -> None:  # type: ignore[no-untyped-def]
    client, h, dep = api
    mine = _seg(
        "crm_winback", {"event": {"type": "email_open", "where": {"product_category": {"is_null": True}}}}
    )
    assert client.post("/v1/segments", json=[mine], headers=h["crm_team"]).json()[0]["status"] == "created"
    edited = {**mine, "description": "hijacked"}
    r = client.post("/v1/segments", json=[edited], headers=h["brand_team"])
    assert r.status_code == 403 and "belongs to marketer:crm_team" in r.json()["detail"]
    assert client.delete("/v1/segments/crm_winback", headers=h["brand_team"]).status_code == 403
    # Others may reference it (and inherit its category).
    ref = _seg("brand_ref", {"segment": "crm_winback"})
    assert client.post("/v1/segments", json=[ref], headers=h["brand_team"]).status_code == 200
    r = client.delete("/v1/segments/crm_winback", headers=h["crm_team"])
    assert r.status_code == 409 and "still used" in r.json()["detail"]
    assert client.post("/v1/segments", json=[edited], headers=h["admin"]).json()[0]["status"] == "updated"
    assert client.delete("/v1/segments/brand_ref", headers=h["brand_team"]).json()["status"] == "retired"
    assert client.delete("/v1/segments/crm_winback", headers=h["crm_team"]).json()["status"] == "retired"
    assert ("segment", "crm_winback") not in definitions.active(dep.store.conn)
    history = definitions.history(dep.store.conn, "segment", "crm_winback")
    assert [(s.owner, s.editor, s.retired) for s in history] == [
        ("marketer:crm_team", "marketer:crm_team", False),
        ("marketer:crm_team", "admin:ops", False),
        ("marketer:crm_team", "marketer:crm_team", True),
    ]
    events = [e for e in audit.entries(dep.store.conn, limit=1000) if e.event.startswith("definition")]
    assert events[-1].details == {"editor": "marketer:crm_team", "definition": "segment:crm_winback@v3"}
    assert {
        "editor": "admin:ops",
        "changed": ["segment:crm_winback@v2"],
        "owners": ["marketer:crm_team"],
    } in [e.details for e in events]


def test_changing_a_referenced_segment_cannot_taint_a_general_segment_silently(ready: Deployment) -> None:
    kw: dict[str, Any] = {
        "schema": ready.schema,
        "categories": ready.categories,
        "actor": "marketer:crm_team",
    }
    base = _seg("base", {"event": {"type": "email_open", "where": {"product_category": {"is_null": True}}}})
    top = _seg("top", {"segment": "base"})
    definitions.apply_documents(
        ready.store.conn, ready.keyset, [("segment", base, "t"), ("segment", top, "t")], **kw
    )
    tainted = _seg("base", CANNABIS_VIEWS, "cannabis")
    with pytest.raises(DefinitionError, match=r"segment 'top': where.segment reads cannabis data"):
        definitions.apply_documents(ready.store.conn, ready.keyset, [("segment", tainted, "t")], **kw)


# -- the policies say what is sensitive -------------------------------------------------------------
def test_policy_check_validates_the_tags_against_the_ingest_schema(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    cannabis = policies / "categories" / "cannabis.yaml"
    doc = yaml.safe_load(cannabis.read_text())
    doc["sensitive_data"] = {
        "attributes": ["no_such_attribute"],
        "attribute_values": {"interests": ["canabis"]},
        "event_types": ["dispensary_visit"],
        "event_values": {"campaign": ["x"]},
    }
    cannabis.write_text(yaml.safe_dump(doc))
    general = policies / "categories" / "general.yaml"
    gdoc = yaml.safe_load(general.read_text())
    gdoc["sensitive_data"] = {"event_values": {"product_category": ["home"]}}
    general.write_text(yaml.safe_dump(gdoc))
    found = "\n".join(findings(read_categories(policies), SCHEMA))
    assert "cannabis: sensitive_data.attributes names 'no_such_attribute'" in found
    assert "sensitive_data.attribute_values.interests lists ['canabis'], not in the field's domain" in found
    assert "names 'dispensary_visit', which is not an event type" in found
    assert "names 'campaign', which is not a field with a public domain" in found
    assert "general: tags sensitive data but is not stigmatized" in found
    changes = diff(read_categories(POLICIES), read_categories(policies))
    assert "cannabis: sensitive_data.event_values.product_category drops ['cannabis'] (LOOSER)" in changes


def test_a_snapshot_from_another_policy_set_is_not_released(
    dep: Deployment, demo_files, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    prepare(dep, demo_files.customers, demo_files.events)
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    general = policies / "categories" / "general.yaml"
    general.write_text(general.read_text().replace("min_cohort_size: 50", "min_cohort_size: 60"))
    d = Deployment(dep.settings.model_copy(update={"policy_dir": policies}))
    assert (
        "the category policies changed"
        in engine.staleness(d.store, engine.latest(d.store.conn), policy_hash=d.categories.content_hash)[0]
    )
    with pytest.raises(Conflict, match="computed under another policy set"):
        release.run(
            d.release_context(), release.CohortReportRequest(segments=["frequent_buyers"]), "growth_team"
        )
    d.close()


def test_retiring_needs_the_owner(ready: Deployment) -> None:
    with pytest.raises(NotPermitted, match="belongs to admin:cli"):
        definitions.retire(
            ready.store.conn,
            ready.keyset,
            "segment",
            "frequent_buyers",
            schema=ready.schema,
            categories=ready.categories,
            actor="marketer:crm_team",
        )


# -- 2. keys and rotation ---------------------------------------------------------------------------
def _rotate(dep: Deployment) -> Deployment:
    from privseg import maintenance

    maintenance.rotate_keys(store=dep.store, keyset_path=dep.settings.keyset, policy=dep.ingest_policy)
    fresh = Deployment(dep.settings)  # the keyset on disk gained a version
    dep.close()
    return fresh


def test_a_movement_across_a_rotation_keeps_each_person_in_one_cell(ready: Deployment) -> None:
    first = engine.latest(ready.store.conn)
    assert first is not None and first.key_version == 1
    dep = _rotate(ready)
    rekeyed = engine.snapshots(dep.store.conn)[0]
    assert rekeyed.key_version == 2 and rekeyed.file != first.file
    assert not (dep.store.data_dir / "snapshots" / first.file).exists()  # type: ignore[operator]
    later = _recompute(dep)
    req = release.MovementRequest(
        segments=["engaged_not_ready", "cart_abandoners_7d"], from_snapshot=first.id
    )
    plan = release.plan(dep.release_context(), req, "growth_team")
    assert plan.counts.sensitivity == 1
    before, after = (
        set(pl.read_parquet(engine.snapshot_path(dep.store, s), columns=["pid"]).get_column("pid"))
        for s in (rekeyed, later)
    )
    # The same data before and after: the same people, under the same (new) pseudonyms.
    assert before == after and all(p.startswith("k2.") for p in after)
    # Every person is in exactly one (from, to) cell: the L1 bound d_in = 1 holds after the rotation
    # (with the old snapshot left under k1, everybody would be counted twice).
    assert sum(release.KINDS[plan.kind].exact(dep.release_context(), plan)["counts"]) == len(after)
    dep.close()


def test_a_snapshot_under_another_key_version_is_not_released(ready: Deployment) -> None:
    with transaction(ready.store.conn):
        ready.store.conn.execute("UPDATE snapshots SET key_version = NULL")
    with pytest.raises(Conflict, match="another pseudonym key version"):
        release.run(
            ready.release_context(), release.CohortReportRequest(segments=["frequent_buyers"]), "growth_team"
        )


def test_erasure_after_a_rotation_removes_the_person_from_every_kept_snapshot(ready: Deployment) -> None:
    from privseg.maintenance import erase_subject
    from privseg.pseudonym import Pseudonymizer

    dep = _rotate(ready)
    _recompute(dep)
    id_type = dep.ingest_policy.identity.type
    pids = {Pseudonymizer(dep.keyset, id_type, v).encrypt("C000000001") for v in (1, 2)}
    result = erase_subject(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id="C000000001")
    assert result.found and result.snapshots_rewritten == 2
    for snap in engine.snapshots(dep.store.conn):
        kept = pl.read_parquet(engine.snapshot_path(dep.store, snap), columns=["pid"]).get_column("pid")
        assert not set(kept) & pids
    dep.close()


def test_a_swapped_keyset_with_the_same_namespace_and_versions_is_refused(
    ready: Deployment, tmp_path: Path
) -> None:
    from privseg.errors import KeysetError
    from privseg.keyset import create_keyset
    from tests.conftest import run_cli

    impostor = tmp_path / "other" / "keyset.json"
    create_keyset(impostor, ready.keyset.namespace)
    settings = ready.settings.model_copy(update={"keyset": impostor})
    other = Deployment(settings)
    with pytest.raises(KeysetError, match="does not match this store: its audit key differs"):
        _ = other.keyset
    other.close()
    refused = run_cli(settings, "erase", "--id", "-", stdin="C000000001\n", check=False)
    assert refused.returncode == 2 and "does not match this store" in refused.stderr
    assert "C000000001" not in refused.stderr + refused.stdout


# -- 3. an audit log and ledger that cannot be quietly cut ---------------------------------------------
def _cut(dep: Deployment, sql: str, trigger: str) -> None:
    """What an attacker with write access to the database does: drop the guard, delete rows."""
    conn = dep.store.conn
    with transaction(conn):
        conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute(sql)


def test_cutting_the_newest_audit_entries_is_detected_against_an_anchor(
    ready: Deployment, tmp_path: Path
) -> None:
    from tests.conftest import run_cli

    release.run(
        ready.release_context(), release.CohortReportRequest(segments=["frequent_buyers"]), "growth_team"
    )
    anchors = tmp_path / "outside" / "anchors.jsonl"
    assert "anchored" in run_cli(ready.settings, "audit", "anchor", "--out", str(anchors)).stdout
    assert (anchors.stat().st_mode & 0o777) == 0o600
    assert audit.verify_all(ready.store.conn, ready.keyset, audit.read_anchors(anchors)).ok
    # The release and its ledger row go, and with them the audit entries after some point.
    last = audit.entries(ready.store.conn, limit=10_000)[-1].seq
    _cut(ready, f"DELETE FROM audit WHERE seq > {last - 2}", "audit_no_delete")
    assert audit.verify(ready.store.conn, ready.keyset).ok  # the shorter chain is still a valid chain
    result = audit.verify_all(ready.store.conn, ready.keyset, audit.read_anchors(anchors))
    assert not result.ok and "entries were cut" in (result.problem or "")
    out = run_cli(ready.settings, "audit", "verify", "--anchor", str(anchors), check=False)
    assert out.returncode == 1 and "entries were cut" in out.stdout


def test_a_deleted_ledger_charge_is_found(ready: Deployment) -> None:
    release.run(
        ready.release_context(), release.CohortReportRequest(segments=["frequent_buyers"]), "growth_team"
    )
    assert audit.verify_all(ready.store.conn, ready.keyset).ok
    _cut(ready, "DELETE FROM ledger", "ledger_no_delete")
    result = audit.verify_all(ready.store.conn, ready.keyset)
    assert not result.ok and "audited but missing from the ledger" in (result.problem or "")


def test_a_lowered_day_total_is_found(ready: Deployment) -> None:
    # Budget sums read the day totals: lowering one would let a recipient spend past its budget.
    release.run(
        ready.release_context(), release.CohortReportRequest(segments=["frequent_buyers"]), "growth_team"
    )
    _cut(ready, "DELETE FROM ledger_days", "ledger_days_no_delete")
    result = audit.verify_all(ready.store.conn, ready.keyset)
    assert not result.ok and "'general', recipient 'growth_team'" in (result.problem or "")
    assert "differs from its charges" in (result.problem or "")


def test_a_forged_or_foreign_anchor_is_refused(ready: Deployment) -> None:
    head = audit.anchor(ready.store.conn, ready.keyset)
    forged = {**head, "entries": head["entries"] - 1}
    assert "signature does not verify" in (audit.check_anchor(ready.store.conn, ready.keyset, forged) or "")
    assert "not a privseg audit anchor" in (audit.check_anchor(ready.store.conn, ready.keyset, [1]) or "")
    assert audit.check_anchor(ready.store.conn, ready.keyset, head) is None


def test_the_server_writes_anchors_periodically_and_at_shutdown(ready: Deployment, tmp_path: Path) -> None:
    import time

    path = tmp_path / "anchors.jsonl"
    settings = ready.settings.model_copy(
        update={"audit_anchor_file": path, "audit_anchor_interval_seconds": 0.2}
    )
    dep = Deployment(settings)
    with TestClient(create_app(dep)):
        deadline = time.monotonic() + 10
        while (not path.exists() or len(path.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        during = len(path.read_text().splitlines())
    heads = audit.read_anchors(path)
    assert during >= 3 and len(heads) == during + 1  # plus the one written at shutdown
    assert all(audit.check_anchor(dep.store.conn, dep.keyset, h) is None for h in heads)
    dep.close()


# -- 4. outsiders and hostile uploads -------------------------------------------------------------------
def test_failed_authentications_cannot_flood_the_audit_log(ready: Deployment) -> None:
    from privseg.apikeys import FailureRecorder

    now = [0.0]
    app = create_app(ready)
    app.state.auth_failures = FailureRecorder(per_window=5, window_seconds=60, clock=lambda: now[0])
    client = TestClient(app, raise_server_exceptions=False)
    before = len(audit.entries(ready.store.conn, limit=100_000))
    long_path = "/v1/segments/" + "x" * 8000 + "/explain"  # a real route: the role check runs
    for _ in range(40):
        assert client.get(long_path).status_code == 401
        assert client.get("/v1/store", headers={"Authorization": "Bearer psk_" + "A" * 43}).status_code == 401
    new = audit.entries(ready.store.conn, after=before, limit=100_000)
    assert [e.event for e in new] == ["auth_failed"] * 5
    assert all(len(e.details["path"]) <= 128 for e in new)
    now[0] = 61.0  # the next minute
    client.get("/v1/store")
    later = audit.entries(ready.store.conn, after=new[-1].seq, limit=100)
    assert [e.event for e in later] == ["auth_failed_suppressed", "auth_failed"]
    assert later[0].details["count"] == 75
    assert audit.verify(ready.store.conn, ready.keyset).ok


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _send_chunked(base: str, path: str, headers: dict[str, str], total: int) -> tuple[int, int]:
    """POST ``total`` bytes as a chunked body over a raw socket; returns (status, bytes sent)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nTransfer-Encoding: chunked\r\n"
    head += "Content-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    chunk = b"[" + b"1," * (1 << 19)  # ~1 MiB chunks of a never-ending JSON list
    sent = 0
    try:
        while sent < total:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: what we want
    sock.settimeout(30)
    reply = b""
    try:
        while b"\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    finally:
        sock.close()
    return int(reply.split(b" ")[1]), sent


def test_an_unauthenticated_chunked_body_never_allocates_past_the_limit(ready: Deployment) -> None:
    from tests.conftest import running_server

    token = apikeys.create(ready.store.conn, ready.keyset, role="marketer", name="crm_team")[1]
    ready.close()
    with running_server(ready.settings) as (base, proc):
        start = _peak_rss_kb(proc.pid)
        status, _sent = _send_chunked(base, "/v1/segments", {}, 256 << 20)
        assert status == 401
        status, _sent = _send_chunked(base, "/v1/segments", {"Authorization": f"Bearer {token}"}, 64 << 20)
        assert status == 413
        growth_mb = (_peak_rss_kb(proc.pid) - start) / 1024
        assert growth_mb < 40, growth_mb  # the review measured +800 MB for a 400 MB body


def test_the_default_upload_folder_is_private_to_the_deployment_and_outside_its_state(tmp_path: Path) -> None:
    import os
    import tempfile

    from privseg.settings import Settings

    # The tests' own settings name a folder beside their state; this is what a deployment gets by default.
    one, two = (Settings(home=tmp_path / name, policy_dir=POLICIES) for name in ("one", "two"))
    assert one.uploads_path.parent == Path(tempfile.gettempdir())
    assert one.uploads_path.name.startswith(f"privseg-uploads-{os.getuid()}-")
    assert not one.uploads_path.is_relative_to(tmp_path)  # not under the state that backups copy
    assert one.uploads_path != two.uploads_path  # two deployments never clear each other's uploads
    assert one.uploads_path == Settings(home=tmp_path / "one", policy_dir=POLICIES).uploads_path
    assert not one.uploads_path.exists()  # named, not created, by reading the setting


def test_uploads_left_by_a_killed_server_are_cleared_at_start(ready: Deployment) -> None:
    import fcntl
    import os

    from privseg.ingest.uploads import upload_folder

    root = ready.settings.uploads_path
    assert not root.resolve().is_relative_to(ready.settings.home.resolve())  # outside backed-up state
    with upload_folder(root) as stale:
        (stale / "customers.csv").write_text("customer_id,email\nC1,a@example.com\n")
    stale.mkdir()  # as a kill -9 leaves it: a raw file, no live lock
    (stale / "customers.csv").write_text("customer_id,email\nC1,a@example.com\n")
    with upload_folder(root) as live:  # an upload in flight in another worker holds its lock
        (live / "events.csv").write_text("x")
        fd = os.open(live / ".in-use", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        with TestClient(create_app(ready)):
            assert not stale.exists()
            assert (live / "events.csv").exists()
    assert (root.stat().st_mode & 0o777) == 0o700


def test_bad_filenames_are_refused_and_leave_nothing(api) -> None:  # type: ignore[no-untyped-def]
    client, h, dep = api
    root = dep.settings.uploads_path
    before = sorted(root.iterdir()) if root.exists() else []
    for name in ("bad\x00name.csv", "../../etc/passwd.csv", "a/b.csv", "x" * 300 + ".csv", ""):
        r = client.post(
            "/v1/ingest/profiles", params={"filename": name}, content=b"customer_id\nC1\n", headers=h["admin"]
        )
        assert r.status_code == 422, (name, r.status_code)
        assert "passwd" not in r.text and "x" * 50 not in r.text
    assert (sorted(root.iterdir()) if root.exists() else []) == before


def test_a_file_without_a_header_is_refused_without_quoting_its_first_row(
    dep: Deployment, tmp_path: Path
) -> None:
    from privseg.errors import InvalidInput
    from privseg.ingest.files import ingest_files

    rows = "C000000042,jane.doe@example.com,+1 555 123 4567,Jane,Doe,1961-04-02,02139,female\n" * 3
    for name, content in (("p.csv", rows), ("q.csv", "customer_id,jane.doe@example.com\nC1,x\n")):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(InvalidInput) as info:
            ingest_files(
                store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="profiles", paths=[path]
            )
        message = str(info.value)
        for secret in ("C000000042", "jane", "Jane", "555", "Doe", "1961", "02139", "example.com"):
            assert secret not in message, (name, message)
        assert "header" in message or "name not shown" in message
    assert not dep.store.batches()


@pytest.mark.parametrize("suffix", [".csv.gz", ".ndjson.gz"])
def test_a_gzip_bomb_is_refused_before_it_is_decompressed_whole(
    dep: Deployment, tmp_path: Path, suffix: str
) -> None:
    import gzip

    from privseg.errors import InvalidInput
    from privseg.ingest.files import ingest_files

    path = tmp_path / f"bomb{suffix}"
    with gzip.open(path, "wb", compresslevel=9) as fh:
        if suffix == ".csv.gz":
            fh.write(b"customer_id,gender\n")
            line = b"C1,female\n"
        else:
            line = b'{"customer_id": "C1", "gender": "female"}\n'
        fh.write(line * ((8 << 20) // len(line)))  # 8 MiB decompressed, a few KB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidInput, match="decompresses to more than 1048576 bytes"):
        ingest_files(
            store=dep.store,
            keyset=dep.keyset,
            policy=dep.ingest_policy,
            kind="profiles",
            paths=[path],
            max_decompressed_bytes=1 << 20,
        )
    assert not dep.store.batches()


# -- 5. small leaks -----------------------------------------------------------------------------------
def test_state_is_owner_only(ready: Deployment) -> None:
    home = ready.settings.home
    paths = [home, *home.rglob("*")]
    assert len(paths) > 8
    for p in paths:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_the_demo_keeps_no_raw_input_files(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import tempfile

    from tests.conftest import run_cli

    before = set(Path(tempfile.gettempdir()).glob("privseg-demo-*"))
    out = run_cli(settings, "demo", "--customers", "300").stdout
    assert "raw files were deleted" in out
    assert set(Path(tempfile.gettempdir()).glob("privseg-demo-*")) == before
    for p in settings.home.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"C000000001" not in data and b"@inbox.example" not in data, p
    assert "nothing generated" in run_cli(settings, "demo", "--customers", "300").stdout


def test_snapshot_status_shows_nothing_that_depends_on_one_person(api) -> None:  # type: ignore[no-untyped-def]
    client, h, _dep = api
    before = client.get("/v1/snapshots", headers=h["crm_team"]).json()
    assert "file" not in before["snapshot"] and "people" not in before["snapshot"]
    r = client.post("/v1/erase", json={"id": "C000000001"}, headers=h["admin"])
    assert r.status_code == 200 and r.json()["found"]
    assert client.get("/v1/snapshots", headers=h["crm_team"]).json() == before


def test_old_key_versions_are_retired_once_nothing_uses_them(ready: Deployment) -> None:
    from privseg.keyset import load_keyset
    from privseg.maintenance import retire_keys

    dep = _rotate(ready)
    assert sorted(dep.keyset.pseudonym_keys) == [1, 2]
    assert retire_keys(store=dep.store, keyset_path=dep.settings.keyset) == [1]
    assert sorted(load_keyset(dep.settings.keyset).pseudonym_keys) == [2]
    assert retire_keys(store=dep.store, keyset_path=dep.settings.keyset) == []
    again = Deployment(dep.settings)
    assert again.keyset.primary == 2  # still matches the store
    assert audit.entries(again.store.conn, limit=10_000)[-1].event == "keys_retired"
    again.close()
    dep.close()


def test_changing_a_trait_cannot_taint_the_general_segments_that_use_it(ready: Deployment) -> None:
    kw: dict[str, Any] = {"schema": ready.schema, "categories": ready.categories, "actor": "admin:cli"}
    # rfm_frequency counts purchases outside the stigmatized categories; rfm_at_risk (general) uses it.
    unpinned = {
        "name": "rfm_frequency",
        "source": {"count": {"type": "purchase", "last": "365d"}},
        "edges": [1, 2, 4, 8],
        "scores": [1, 2, 3, 4, 5],
    }
    with pytest.raises(
        DefinitionError, match=r"segment 'rfm_at_risk': .*trait\.rfm_frequency .*reads cannabis data"
    ):
        definitions.apply_documents(ready.store.conn, ready.keyset, [("trait", unpinned, "t")], **kw)


def test_budget_sums_read_an_index_alone(dep: Deployment) -> None:
    # Every charge sums the period's spend (the recipient's, everyone's, each objective's) under the
    # write lock: the charges of the period's first day are read from a covering index, never the
    # table (the later days come from the day totals: tests/test_ledger.py).
    general = dep.categories.categories["general"]
    budget = general.budget.model_copy(update={"objectives": {"brand": 0.2, "performance": 0.8}})
    split = general.model_copy(update={"budget": budget})
    conn = dep.store.conn
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        ledger.remaining(conn, split, "crm_team", AS_OF, ("brand", "performance"))
        ledger.status(conn, dep.categories, AS_OF)
    finally:
        conn.set_trace_callback(None)
    sums = [s for s in seen if "FROM ledger" in s]
    assert len(sums) == 4 + len(dep.categories.categories)  # recipient, everyone, two objectives; status
    for statement in sums:
        plan = " ".join(str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}"))
        assert "USING COVERING INDEX" in plan, (statement, plan)
