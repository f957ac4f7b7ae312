"""DP trends: the binary tree (its sums and its sensitivity), the exact per-period counts against an
independent computation, the accounting, and the categories the events read."""

from __future__ import annotations

import bisect
import itertools
import sqlite3
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

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
    # 26 periods: summing 26 increments (d_in = 1) is less noisy than a 6-level tree (d_in = 6).
    assert plan.counts.name == "increments" and plan.counts.sensitivity == 1
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
    theory = out["theory"]
    assert (
        theory["running_total_increments"]
        < theory["running_total_tree"]
        < theory["running_total_direct"] * 1.5
    )
    totals = [p["cumulative"] for p in out["points"]]
    assert totals[-1] == sum(p["count"] for p in out["points"])  # increments are differences of totals
    again = release.run(ctx, req, "growth_team")
    assert again["cached"] and again["points"] == out["points"]
    assert len(ledger.charges(ready.store.conn)) == before + 1


def test_the_plan_picks_the_less_noisy_mechanism_for_the_window(ready: Deployment) -> None:
    """Summed increments for short windows; the tree once it sums fewer noises (about 1,000 periods):
    both beat releasing running totals directly, more so as T grows."""
    from privseg.release.kinds.trend import result

    ctx = ready.release_context()
    picked = {}
    for periods in (12, 366, 2000, 3660):
        req = release.TrendRequest(segment="lapsed_customers", period="day", periods=periods, dry_run=True)
        plan = release.plan(ctx, req, "growth_team")
        assert isinstance(plan, TrendPlan)
        size = 2 * plan.leaves - 1 if plan.counts.name == "tree" else periods
        theory = result(plan, {plan.counts.name: [0] * size})["theory"]
        best = min(theory["running_total_tree"], theory["running_total_increments"])
        assert best < theory["running_total_direct"] / {12: 1.2, 366: 6, 2000: 15, 3660: 20}[periods]
        chosen = theory["running_total_tree" if plan.counts.name == "tree" else "running_total_increments"]
        assert chosen == best
        picked[periods] = plan.counts.name
    assert picked == {12: "increments", 366: "increments", 2000: "tree", 3660: "tree"}


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
    assert (
        out["kind"] == "trend"
        and len(out["points"]) == 4
        and out["mechanism"].startswith("summed increments")
    )
    bad = run_cli(ready.settings, *args, "--period", "year", check=False)
    assert bad.returncode == 2 and "period" in bad.stderr and "Traceback" not in bad.stderr


def test_a_long_daily_trend_goes_through_the_tree_end_to_end(ready: Deployment) -> None:
    ctx = ready.release_context()
    req = release.TrendRequest(segment="frequent_buyers", where=NOT_STIGMATIZED, period="day", periods=2000)
    out = release.run(ctx, req, "growth_team")
    assert out["mechanism"] == "binary tree: 4095 nodes in 12 levels, d_in = 12"
    assert out["charged_epsilon"] == 0.5 and len(out["points"]) == 2000
    totals = [p["cumulative"] for p in out["points"]]
    assert totals[-1] == sum(p["count"] for p in out["points"])
    # A gross check here (totals share tree nodes, so their misses come together: one release can miss
    # many); the interval formula itself is checked over many draws below.
    plan = release.plan(ctx, req, "growth_team")
    truth = list(itertools.accumulate(per_period(ctx, plan)))  # type: ignore[arg-type]
    inside = sum(
        lo <= v <= hi
        for v, (lo, hi) in zip(truth, (p["cumulative_interval_95"] for p in out["points"]), strict=True)
    )
    assert inside / len(truth) > 0.5


def test_the_stated_running_total_intervals_cover_95_percent() -> None:
    """Over many draws of the tree's own OpenDP noise, a running total's stated 95% interval holds the
    truth 95% of the time (the normal approximation of a sum of discrete Laplace noises)."""
    import numpy as np

    from privseg.release.kinds.trend import _half_width
    from privseg.release.plan import Vector

    leaves, t = 512, 500
    vector = Vector("tree", levels(leaves), 0.5)
    measurement = vector.measurement()
    used = [prefix_nodes(i + 1, leaves) for i in range(t)]
    half = np.array([_half_width(vector.scale, len(u)) for u in used])
    draws = np.array(measurement([0] * ((2 * leaves - 1) * 200)), dtype=float).reshape(200, -1)
    totals = np.array([[row[u].sum() for u in used] for row in draws])
    coverage = float((np.abs(totals) <= half).mean())
    assert 0.92 <= coverage <= 0.975, coverage


def test_a_continual_trend_is_charged_once_and_keeps_every_released_period(tmp_path: Path) -> None:
    """Anchored at a start date, a trend released on a snapshot, then on a later one two weeks on:
    the second release charges nothing, repeats the first one's periods exactly (their noise was drawn
    once and kept) and adds the periods closed since. Audit and ledger still agree."""
    from datetime import timedelta

    from privseg import audit
    from privseg.segments import engine

    settings = make_settings(tmp_path)
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    files = generate(tmp_path / "demo", customers=3_000, seed=4, as_of=AS_OF)
    prepare(dep, files.customers, files.events, snapshots=(AS_OF - timedelta(days=14),))
    req = release.TrendRequest(
        segment="lapsed_customers", where=NOT_STIGMATIZED, period="week", periods=10, start=date(2026, 3, 16)
    )
    first = release.run(dep.release_context(), req, "growth_team")
    assert first["charged_epsilon"] == 0.5 and first["continual"] and first["closed_periods"] == 9
    assert len(first["points"]) == 9
    engine.compute_snapshot(store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF)
    priced = release.run(dep.release_context(), req.model_copy(update={"dry_run": True}), "growth_team")
    assert priced["would_charge_epsilon"] == 0.0
    second = release.run(dep.release_context(), req, "growth_team")
    assert second["charged_epsilon"] == 0.0 and not second["cached"] and second["closed_periods"] == 10
    assert second["points"][:9] == first["points"]  # nothing redrawn
    assert len(second["points"]) == 10
    charges = ledger.charges(dep.store.conn, recipient="growth_team")
    assert [c.release_id for c in charges] == [first["release_id"]]
    events = [e.event for e in audit.entries(dep.store.conn, limit=1000)]
    assert events.count("release") == 1 and events.count("release_continued") == 1
    assert audit.verify_all(dep.store.conn, dep.keyset).ok
    # Another recipient, or the same trend under another start, is another series: charged.
    other = release.run(dep.release_context(), req, "crm_team")
    assert other["charged_epsilon"] == 0.5
    moved = release.run(
        dep.release_context(), req.model_copy(update={"start": date(2026, 3, 23)}), "growth_team"
    )
    assert moved["charged_epsilon"] == 0.5
    # A block once released is never redrawn, even by a direct write.
    with pytest.raises(sqlite3.IntegrityError, match="never redrawn"):
        dep.store.conn.execute("UPDATE series_blocks SET value = value + 1")
    dep.close()


def test_a_continual_trend_releases_only_closed_tree_blocks() -> None:
    from privseg.release.kinds.trend import TrendPlan

    plan = TrendPlan.__new__(TrendPlan)  # only the fields closed() reads
    object.__setattr__(plan, "leaves", 8)
    object.__setattr__(plan, "closed_periods", 5)
    closed = plan.closed("tree")
    # Leaves 0-4; blocks [0,2) [2,4) at level 1; [0,4) at level 2; nothing that reaches period 5+.
    assert closed == [0, 1, 2, 3, 4, 8, 9, 12]
    for t in range(1, 6):
        assert set(prefix_nodes(t, 8)) <= set(closed)  # every released running total is computable


def test_a_continual_trend_before_its_first_period_closes_is_refused(ready: Deployment) -> None:
    from privseg.errors import InvalidInput

    req = release.TrendRequest(segment="lapsed_customers", period="month", periods=3, start=date(2026, 6, 1))
    with pytest.raises(InvalidInput, match="had closed at the snapshot"):
        release.run(ready.release_context(), req, "growth_team")
    # So is one that starts at the end of the calendar (its horizon raised OverflowError: a 500).
    last = release.TrendRequest(
        segment="lapsed_customers", period="quarter", periods=3660, start=date(9999, 12, 31)
    )
    with pytest.raises(InvalidInput, match="had closed at the snapshot"):
        release.run(ready.release_context(), last, "growth_team")


def test_a_series_is_bound_to_the_categories_it_is_charged_to() -> None:
    """A segment redefined to read a stigmatized category must not continue a general series for free."""
    from dataclasses import replace

    from privseg.policy.categories import read_categories
    from privseg.release import series
    from privseg.release.plan import ReleasePlan, Vector
    from tests.conftest import POLICIES

    cats = read_categories(POLICIES)
    general, cannabis = cats.categories["general"], cats.categories["cannabis"]
    plan = ReleasePlan(
        kind="trend",
        recipient="growth_team",
        policy=general,
        charged=(general,),
        segments=["s"],
        breakdown=[],
        keys=[("a",)],
        snapshot=None,  # type: ignore[arg-type]
        policy_hash=cats.content_hash,
        vectors=(Vector("increments", 1, 0.25),),
        series="anchored",
    )
    assert series.key(plan) == series.key(replace(plan, snapshot=object()))  # type: ignore[arg-type]
    assert series.key(plan) != series.key(replace(plan, policy=cannabis, charged=(cannabis,)))
    assert series.key(plan) != series.key(replace(plan, recipient="crm_team"))
    assert series.key(plan) != series.key(replace(plan, vectors=(Vector("increments", 1, 0.2),)))
