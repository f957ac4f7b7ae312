"""DP trends: the binary tree (its sums and its sensitivity), the exact per-period counts against an
independent computation, the accounting, and the categories the events read."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from datetime import datetime

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from privseg import ledger, release
from privseg.demo_data import generate
from privseg.deployment import Deployment
from privseg.errors import NotPermitted
from privseg.keyset import create_keyset
from privseg.release import data
from privseg.release.kinds.trend import TrendPlan, levels, per_period, prefix_nodes, tree_nodes, window
from tests.conftest import AS_OF, make_settings, prepare

NOT_STIGMATIZED = {"product_category": {"not_in_or_unknown": ["hearing_aids", "cannabis", "sexual_health"]}}


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("trend")
    settings = make_settings(root)
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    files = generate(root / "demo", customers=8_000, seed=3, as_of=AS_OF)
    prepare(dep, files.customers, files.events)
    yield dep
    dep.close()


@given(st.lists(st.integers(0, 50), min_size=1, max_size=70))
def test_running_totals_from_the_tree_are_the_prefix_sums(increments: list[int]) -> None:
    t = len(increments)
    leaves = 1 << max(t - 1, 0).bit_length()
    nodes = tree_nodes(increments, leaves)
    assert len(nodes) == 2 * leaves - 1
    for i in range(1, t + 1):
        used = prefix_nodes(i, leaves)
        assert sum(nodes[j] for j in used) == sum(increments[:i])
        assert len(used) <= levels(leaves)  # at most one block per level


@pytest.mark.parametrize("t", [1, 2, 3, 7, 8, 12, 52, 100])
def test_one_persons_increment_moves_the_tree_by_exactly_its_levels(t: int) -> None:
    """The sensitivity argument of the first measure: one person adds 1 to one period's increment,
    and that period lies in exactly one block per level, so the node vector moves by L in L1."""
    leaves = 1 << max(t - 1, 0).bit_length()
    base = tree_nodes([3] * t, leaves)
    for period in range(t):
        bumped = [3] * t
        bumped[period] += 1
        moved = sum(abs(a - b) for a, b in zip(base, tree_nodes(bumped, leaves), strict=True))
        assert moved == levels(leaves)


def _independent_first(ready: Deployment, plan: TrendPlan) -> list[int]:
    """People whose first matching purchase is in each period, in plain Python over the rows."""
    events = ready.store.scan_events()
    assert events is not None
    rows = events.filter(pl.col("event_type") == "purchase").select("pid", "ts", "product_category").collect()
    members = set(
        data.memberships(ready.release_context(), plan.snapshot)
        .filter(pl.col(plan.segments[0]))
        .select("pid")
        .collect()["pid"]
    )
    first: dict[str, datetime] = {}
    for pid, ts, category in rows.iter_rows():
        if category in ("hearing_aids", "cannabis", "sexual_health") or ts >= plan.starts[-1]:
            continue
        if pid not in first or ts < first[pid]:
            first[pid] = ts
    counts = [0] * (len(plan.starts) - 1)
    bounds = [s.replace(tzinfo=None) for s in plan.starts]
    for pid, ts in first.items():
        i = bisect.bisect_right(bounds, ts.replace(tzinfo=None)) - 1
        if pid in members and 0 <= i < len(counts):
            counts[i] += 1
    return counts


def test_first_and_active_counts_are_exact_before_noise(ready: Deployment) -> None:
    ctx = ready.release_context()
    req = release.TrendRequest(segment="frequent_buyers", where=NOT_STIGMATIZED, period="week", periods=26)
    plan = release.plan(ctx, req, "growth_team")
    assert isinstance(plan, TrendPlan) and len(plan.starts) == 27
    assert plan.counts.sensitivity == levels(32) == 6  # 26 periods padded to 32 leaves
    exact = per_period(ctx, plan)
    assert exact == _independent_first(ready, plan) and sum(exact) > 0
    active = release.plan(ctx, req.model_copy(update={"measure": "active"}), "growth_team")
    assert active.counts.sensitivity == 26  # a person may be active in every period
    counts = per_period(ctx, active)  # type: ignore[arg-type]
    assert all(a >= f for a, f in zip(counts, exact, strict=True))  # a first purchase is an activity


def test_a_trend_is_charged_once_and_cached(ready: Deployment) -> None:
    ctx = ready.release_context()
    req = release.TrendRequest(segment="lapsed_customers", where=NOT_STIGMATIZED, period="month", periods=6)
    before = len(ledger.charges(ready.store.conn))
    priced = release.run(ctx, req.model_copy(update={"dry_run": True}), "growth_team")
    assert priced["would_charge_epsilon"] == 0.5 and len(ledger.charges(ready.store.conn)) == before
    out = release.run(ctx, req, "growth_team")
    assert out["charged_epsilon"] == 0.5 and len(out["points"]) == 6
    assert out["theory"]["running_total_tree"] < out["theory"]["running_total_direct"] * 1.5
    totals = [p["cumulative"] for p in out["points"]]
    assert totals[-1] == sum(p["count"] for p in out["points"])  # increments are differences of totals
    again = release.run(ctx, req, "growth_team")
    assert again["cached"] and again["points"] == out["points"]
    assert len(ledger.charges(ready.store.conn)) == before + 1


def test_the_tree_beats_direct_running_totals_as_t_grows(ready: Deployment) -> None:
    ctx = ready.release_context()
    for periods in (12, 52, 104):
        req = release.TrendRequest(segment="lapsed_customers", period="week", periods=periods, dry_run=True)
        plan = release.plan(ctx, req, "growth_team")
        from privseg.release.kinds.trend import result

        theory = result(plan, {"tree": [0] * (2 * plan.leaves - 1)})["theory"]  # type: ignore[arg-type]
        ratio = theory["running_total_direct"] / theory["running_total_tree"]
        assert ratio > {12: 1.0, 52: 2.5, 104: 4.0}[periods], (periods, theory)


def test_events_that_read_a_stigmatized_category_put_the_trend_under_its_rules(ready: Deployment) -> None:
    ctx = ready.release_context()
    req = release.TrendRequest(segment="frequent_buyers", where={"product_category": {"eq": "cannabis"}})
    with pytest.raises(NotPermitted, match="'crm_team' may not receive releases for category 'cannabis'"):
        release.run(ctx, req, "crm_team")
    priced = release.run(ctx, req.model_copy(update={"dry_run": True}), "growth_team")
    assert priced["category"] == "cannabis"


def test_the_window_is_closed_calendar_periods() -> None:
    from datetime import UTC

    weeks = window(datetime(2026, 6, 3, 9, tzinfo=UTC), "week", 2)  # a Wednesday
    assert [w.date().isoformat() for w in weeks] == ["2026-05-18", "2026-05-25", "2026-06-01"]
    quarters = window(datetime(2026, 6, 3, 9, tzinfo=UTC), "quarter", 2)
    assert [q.date().isoformat() for q in quarters] == ["2025-10-01", "2026-01-01", "2026-04-01"]


def test_the_cli_releases_a_trend_and_names_a_bad_option(ready: Deployment) -> None:
    import json

    from tests.conftest import run_cli

    where = json.dumps(NOT_STIGMATIZED)
    args = [
        "trend",
        "-s",
        "frequent_buyers",
        "--recipient",
        "growth_team",
        "--where",
        where,
        "--periods",
        "4",
    ]
    out = json.loads(run_cli(ready.settings, *args, "--json").stdout)
    assert out["kind"] == "trend" and len(out["points"]) == 4 and out["mechanism"].startswith("binary tree")
    bad = run_cli(ready.settings, *args, "--period", "year", check=False)
    assert bad.returncode == 2 and "period" in bad.stderr and "Traceback" not in bad.stderr
