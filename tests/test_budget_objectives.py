"""Budgets split by objective (brand, performance): the policy rules, the ledger's accounting, and
what the budget views show."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from privseg import ledger, release
from privseg.demo_data import DemoFiles
from privseg.deployment import Deployment
from privseg.errors import BudgetExhausted
from privseg.keyset import create_keyset
from privseg.policy.categories import Budget, CategorySet
from privseg.policy.checks import findings
from privseg.policy.diff import diff
from tests.conftest import POLICIES, make_settings, prepare, run_cli

BRAND = "engaged_not_ready"  # the example segments' brand one
PERFORMANCE = ["cart_abandoners_7d", "lapsed_customers", "frequent_buyers", "discount_seekers"]


def split_policies(root: Path, general: dict[str, float]) -> Path:
    """A copy of the shipped policies whose general category splits its budget."""
    target = root / "policies"
    shutil.copytree(POLICIES, target)
    path = target / "categories" / "general.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["budget"]["objectives"] = general
    path.write_text(yaml.safe_dump(doc))
    return target


@pytest.fixture
def split(tmp_path: Path, demo_files: DemoFiles) -> Iterator[Deployment]:
    # general: 10 epsilon per recipient, brand may spend 20% of it (2), performance 80% (8).
    settings = make_settings(tmp_path).model_copy(
        update={"policy_dir": split_policies(tmp_path, {"brand": 0.2, "performance": 0.8})}
    )
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    prepare(dep, demo_files.customers, demo_files.events)
    yield dep
    dep.close()


def test_shares_must_be_positive_and_sum_to_at_most_one() -> None:
    Budget(per_recipient=10, category_cap=40, objectives={"brand": 0.5, "performance": 0.5})
    with pytest.raises(ValueError, match="sum to more than 1"):
        Budget(per_recipient=10, category_cap=40, objectives={"brand": 0.7, "performance": 0.5})
    with pytest.raises(ValueError, match=r"each share must be in \(0, 1\]"):
        Budget(per_recipient=10, category_cap=40, objectives={"brand": 0.0})
    with pytest.raises(ValueError):
        Budget(per_recipient=10, category_cap=40, objectives={"awareness": 0.5})  # type: ignore[dict-item]
    assert (
        Budget(per_recipient=10, category_cap=40, objectives={"brand": 0.3}).objective_cap("performance") == 0
    )


def test_a_stigmatized_objective_budget_may_not_exceed_generals_and_diff_marks_it(tmp_path: Path) -> None:
    from privseg.policy.categories import read_categories

    shipped = read_categories(POLICIES)  # the policies folder (read_categories finds categories/)
    # general gives brand 1 epsilon; cannabis (2 per recipient, no split) would let brand spend 2.
    looser = read_categories(split_policies(tmp_path, {"brand": 0.1, "performance": 0.9}))
    assert isinstance(looser, CategorySet)
    problems = findings(looser)
    for name in ("cannabis", "hearing_aids", "sexual_health"):
        why = "a recipient may learn more for this objective"
        assert f"{name}: budget for brand is 2.0, looser than general's 1.0 ({why})" in problems
    assert not [p for p in problems if "budget for performance" in p]  # 2 <= 9
    assert "general: budget for brand 10 -> 1 epsilon per recipient (stricter)" in diff(shipped, looser)
    assert "general: budget for brand 1 -> 10 epsilon per recipient (LOOSER)" in diff(looser, shipped)


def test_releases_are_charged_to_their_segments_objective(split: Deployment) -> None:
    ctx = split.release_context()
    general = split.categories.categories["general"]
    assert general.budget.objective_cap("brand") == pytest.approx(2.0)
    # Brand: 2 epsilon = four releases of 0.5; the fifth is refused, naming the brand budget.
    for i, by in enumerate(([], ["age_band"], ["region"], ["gender"])):
        out = release.run(ctx, release.CohortReportRequest(segments=[BRAND], breakdown=by), "crm_team")
        assert out["charged_epsilon"] == 0.5, i
    priced = release.run(
        ctx,
        release.CohortReportRequest(segments=[BRAND], breakdown=["income_band"], dry_run=True),
        "crm_team",
    )
    assert priced["remaining_epsilon"] == 0 and priced["objectives"] == ["brand"]
    before = len(ledger.charges(split.store.conn))
    with pytest.raises(BudgetExhausted, match="0 left of its brand budget for 'general'"):
        release.run(ctx, release.CohortReportRequest(segments=[BRAND], breakdown=["income_band"]), "crm_team")
    # A release over brand and performance segments counts against both: refused too.
    with pytest.raises(BudgetExhausted, match="brand budget"):
        release.run(ctx, release.CohortReportRequest(segments=[BRAND, PERFORMANCE[0]]), "crm_team")
    assert len(ledger.charges(split.store.conn)) == before  # refusals charge nothing
    # Performance still has its own 8.
    out = release.run(ctx, release.CohortReportRequest(segments=[PERFORMANCE[0]]), "crm_team")
    assert out["charged_epsilon"] == 0.5
    recorded = split.store.conn.execute("SELECT objectives FROM ledger ORDER BY id").fetchall()
    assert [r[0] for r in recorded] == ["brand"] * 4 + ["performance"]
    # Another recipient's brand budget is untouched.
    other = release.run(ctx, release.CohortReportRequest(segments=[BRAND]), "brand_team")
    assert other["charged_epsilon"] == 0.5


def test_a_mixed_release_counts_against_both_objectives_once_against_the_total(split: Deployment) -> None:
    ctx = split.release_context()
    release.run(ctx, release.CohortReportRequest(segments=[BRAND, PERFORMANCE[1]]), "crm_team")
    (status,) = [
        s for s in ledger.status(split.store.conn, split.categories, _now()) if s["category"] == "general"
    ]
    (crm,) = status["recipients"]  # type: ignore[misc]
    assert crm["spent"] == 0.5 and crm["remaining"] == 9.5
    assert crm["objectives"] == {
        "brand": {"spent": 0.5, "remaining": 1.5},
        "performance": {"spent": 0.5, "remaining": 7.5},
    }
    (mine,) = [
        b
        for b in ledger.budget_of(split.store.conn, split.categories, "crm_team", _now())
        if b["category"] == "general"
    ]
    assert mine["objectives"] == {"brand": 1.5, "performance": 7.5}
    out = run_cli(split.settings, "budget")
    assert "brand" in out.stdout and "performance" in out.stdout


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_the_console_shows_the_split(split: Deployment) -> None:
    from fastapi.testclient import TestClient

    from privseg import apikeys
    from privseg.api.app import create_app
    from tests.test_console import sign_in

    release.run(split.release_context(), release.CohortReportRequest(segments=[BRAND]), "crm_team")
    _, marketer = apikeys.create(split.store.conn, split.keyset, role="marketer", name="crm_team")
    _, compliance = apikeys.create(split.store.conn, split.keyset, role="compliance", name="dpo")
    client = TestClient(create_app(split), base_url="http://127.0.0.1", follow_redirects=False)
    sign_in(client, marketer)
    page = client.get("/ui/budget").text
    assert 'general: brand releases</td><td class="num">1.5<' in page
    assert 'general: performance releases</td><td class="num">8<' in page
    sign_in(client, compliance)
    ledger_page = client.get("/ui/ledger?category=general").text
    assert (
        "[brand: 0.5 spent, 1.5 left]" in ledger_page and "split: brand 20%, performance 80%" in ledger_page
    )
