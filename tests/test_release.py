from __future__ import annotations

import itertools
import json
import math
import re
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from opendp.accuracy import discrete_laplacian_scale_to_accuracy

from privseg import audit, ledger, release
from privseg.deployment import Deployment
from privseg.errors import BudgetExhausted, Conflict, InvalidInput, NotFound, NotPermitted, PolicyViolation
from privseg.release import data as release_data
from privseg.release import engine as release_engine
from privseg.segments import engine
from tests.conftest import AS_OF, REPO, prepare
from tests.test_store import _env

EXAMPLES = REPO / "privseg" / "segments" / "examples"
GENERAL = [
    "cart_abandoners_7d",
    "discount_seekers",
    "coupon_responders",
    "frequent_buyers",
    "high_spenders",
    "lapsed_customers",
    "rfm_champions",
    "rfm_at_risk",
    "view_then_cart_1d",
    "engaged_not_ready",
]


@pytest.fixture
def ready(dep: Deployment, demo_files) -> Deployment:  # type: ignore[no-untyped-def]
    prepare(dep, demo_files.customers, demo_files.events)
    return dep


def spent(dep: Deployment) -> int:
    return int(dep.store.conn.execute("SELECT COALESCE(SUM(epsilon_micro), 0) FROM ledger").fetchone()[0])


def report(dep: Deployment, segments: list[str], by: list[str] = (), recipient: str = "growth_team", **kw):  # type: ignore[no-untyped-def,assignment]
    return release.run(
        dep.release_context(),
        release.CohortReportRequest(segments=segments, breakdown=list(by), **kw),
        recipient,
    )


# -- the noise ---------------------------------------------------------------------------------------
def test_noise_has_the_scale_opendp_states(ready: Deployment) -> None:
    plan = release.plan(
        ready.release_context(), release.CohortReportRequest(segments=GENERAL[:2]), "growth_team"
    )
    assert plan.counts.sensitivity == 2 and plan.counts.scale == pytest.approx(4.0)  # d_in 2 at epsilon 0.5
    m = plan.counts.measurement()
    assert m.map(2) <= 0.5 + 1e-9
    # 30,000 draws: the sample variance's relative error has sd ~sqrt(5 / n) = 1.3% (a Laplace's
    # kurtosis is 6), so the 8% tolerance is ~6 sd, the mean's 0.25 ~8 sd: not a flaky test.
    draws = [v - 1000 for _ in range(15) for v in m([1000] * 2000)]
    p = math.exp(-1 / plan.counts.scale)
    variance = 2 * p / (1 - p) ** 2  # discrete Laplace with scale t: 2e^{-1/t} / (1 - e^{-1/t})^2
    mean = sum(draws) / len(draws)
    emp = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)
    assert abs(mean) < 0.25
    assert emp == pytest.approx(variance, rel=0.08)
    # The stated 95% interval covers about 95% of draws.
    covered = sum(abs(d) <= plan.counts.half_width for d in draws) / len(draws)
    assert 0.94 <= covered <= 0.975
    assert plan.counts.half_width == pytest.approx(
        discrete_laplacian_scale_to_accuracy(plan.counts.scale, 0.05)
    )


def test_a_long_vector_is_noised_in_parts_in_order_with_the_stated_scale() -> None:
    from privseg.release.plan import _PARALLEL_FROM, Vector

    vector = Vector("counts", sensitivity=2, epsilon=0.5)  # scale 4
    n = 4 * _PARALLEL_FROM + 3  # parts of unequal length
    exact = [i * 1_000 for i in range(n)]
    draws: list[int] = []
    for _ in range(20):  # ~20,000 draws: the tolerances below are ~6 (variance) and ~7 (mean) sd
        noisy = vector.noise(exact)
        assert len(noisy) == n and all(type(v) is int for v in noisy)
        # Each value stays next to its own exact count (noise beyond 500 at scale 4: p ~ 1e-54).
        assert [round(v / 1_000) * 1_000 for v in noisy] == exact
        draws += [v - x for v, x in zip(noisy, exact, strict=True)]
    # The parts together have the whole vector's distribution: discrete Laplace with scale 4.
    p = math.exp(-1 / vector.scale)
    mean = sum(draws) / len(draws)
    emp = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)
    assert abs(mean) < 0.3
    assert emp == pytest.approx(2 * p / (1 - p) ** 2, rel=0.1)
    # Independent draws: no two parts (nor two calls) repeat the same noise.
    size = -(-n // 2)
    assert draws[:size] != draws[size : 2 * size]
    assert draws[:n] != draws[n : 2 * n]


def test_a_total_beyond_32_bits_is_noised_not_refused() -> None:
    """Spend is released in cents: one cell of 50,000 people who each spent the general clip ($500) is
    $25M, 2.5e9 cents, past what a 32-bit integer holds. OpenDP's ``T=int`` is i32 and refused such a
    value (ValueError) after the release had been charged; every vector is 64-bit."""
    from privseg.release.plan import _PARALLEL_FROM, Vector

    spend = Vector("spend", sensitivity=500 * 100, epsilon=0.25, unit=0.01)  # scale 200,000 cents
    assert "i64" in str(spend.measurement().input_domain)
    big = 50_000 * 500 * 100
    for exact in ([big, 0, 2**31 - 1], [big + i for i in range(2 * _PARALLEL_FROM)]):  # here, and in parts
        noisy = spend.noise(exact)
        assert all(type(v) is int for v in noisy)
        # Within 30 scales of the truth (p ~ 1e-13 per value): noised, not wrapped or saturated.
        assert all(abs(v - x) < 30 * spend.scale for v, x in zip(noisy, exact, strict=True))


def test_a_spend_report_past_21_million_dollars_in_one_cell_is_released(tmp_path: Path) -> None:
    """End to end: a brand whose policy clips spend at $1M a person, 150 frequent buyers at the clip:
    one cell of $150M (1.5e10 cents). Before spend was noised as 64-bit integers this request was
    charged, then failed inside OpenDP, and the release stayed pending."""
    from privseg.keyset import create_keyset
    from tests.conftest import (
        EVENT_HEADER,
        PROFILE_HEADER,
        event_row,
        make_settings,
        profile_row,
        write_csv,
    )
    from tests.test_policy import _copy, _edit

    policies = _copy(tmp_path)
    _edit(policies, "general", "value_clip", 1_000_000.0)
    settings = make_settings(tmp_path).model_copy(update={"policy_dir": policies})
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    try:
        people = [f"C{i:05d}" for i in range(150)]
        customers = write_csv(tmp_path / "c.csv", PROFILE_HEADER, [profile_row(c) for c in people])
        purchases = [
            event_row(c, ts=f"2026-05-{day:02d}T10:00:00Z", value="999999.99")
            for c in people
            for day in range(20, 25)  # five purchases in the last 180 days: a frequent buyer
        ]
        events = write_csv(tmp_path / "e.csv", EVENT_HEADER, purchases)
        prepare(dep, customers, events)
        req = release.CohortReportRequest(
            segments=["frequent_buyers"],
            measures=["count", "spend"],
            spend_where={
                "product_category": {"not_in_or_unknown": ["hearing_aids", "cannabis", "sexual_health"]}
            },
        )
        out = release.run(dep.release_context(), req, "growth_team")
        assert out["charged_epsilon"] == 0.5 and spent(dep) == ledger.to_micro(0.5)
        (cell,) = out["results"][0]["cells"]
        truth = 150 * 1_000_000  # dollars: each person's $5M clipped to $1M
        assert truth * 100 > 2**31  # in cents, past a 32-bit integer
        assert abs(cell["spend"] - truth) <= 10 * out["spend_interval_95_half_width"]
        assert cell["mean_spend"] <= 1_000_000.0
        statuses = dep.store.conn.execute("SELECT status FROM releases").fetchall()
        assert statuses == [("done",)]
        # And again: the stored release, nothing more spent.
        assert release.run(dep.release_context(), req, "growth_team")["cached"]
        assert spent(dep) == ledger.to_micro(0.5)
    finally:
        dep.close()


def test_report_cells_state_each_vectors_interval_asking_opendp_once_per_vector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cells of a spend report: labels, count and spend with their intervals, the mean clipped,
    the small cells suppressed and counted. Each half width is one OpenDP call, made once per vector:
    asked per cell, a spend report's 880 cells spent 27 ms on them."""
    import importlib
    from types import SimpleNamespace

    from privseg.release.kinds.cohort_report import cell_results
    from privseg.release.plan import Vector

    release_plan = importlib.import_module("privseg.release.plan")  # the package's `plan` is a function
    calls: list[float] = []
    accuracy = release_plan.discrete_laplacian_scale_to_accuracy

    def counted(scale: float, alpha: float) -> float:
        calls.append(scale)
        return float(accuracy(scale, alpha))

    monkeypatch.setattr(release_plan, "discrete_laplacian_scale_to_accuracy", counted)
    counts, spend = Vector("counts", 2, 0.25), Vector("spend", 2 * 50_000, 0.25, 0.01)
    keys = [(a, r) for a in ("18-24", "unknown") for r in ("north", "south", "unknown")]
    plan = SimpleNamespace(
        keys=keys,
        breakdown=["age_band", "region"],
        policy=SimpleNamespace(min_cohort_size=10, value_clip=500.0),
        counts=counts,
        vector=lambda name: {"counts": counts, "spend": spend}[name],
    )
    noisy = {
        "counts": [40, 9, 10, -3, 200, 0, 0, 0, 0, 0, 0, 11],  # two segments of six cells
        "spend": [80_000, 5, 1_000_000, 7, -50, 0, 0, 0, 0, 0, 0, 999_999_999],
    }
    out = cell_results(plan, noisy, ["a", "b"])  # type: ignore[arg-type]
    assert len(calls) == 2 and sorted(calls) == sorted([counts.scale, spend.scale])
    hw, shw = counts.half_width, spend.half_width
    assert [(s["segment"], s["suppressed_cells"]) for s in out] == [("a", 3), ("b", 5)]
    north, clipped, refunded = out[0]["cells"]
    assert north == {
        "age_band": "18-24",
        "region": "north",
        "count": 40,
        "interval_95": [max(40 - hw, 0), 40 + hw],
        "spend": 800.0,
        "spend_interval_95": [max(800.0 - shw, 0.0), 800.0 + shw],
        "mean_spend": 20.0,
    }
    assert (clipped["age_band"], clipped["region"], clipped["count"]) == ("18-24", "unknown", 10)
    assert clipped["mean_spend"] == 500.0  # $1,000 over 10 people: the mean is clipped to the clip
    assert (refunded["age_band"], refunded["region"], refunded["spend"]) == ("unknown", "south", 0.0)
    (last,) = out[1]["cells"]
    assert (last["age_band"], last["region"], last["count"]) == ("unknown", "unknown", 11)
    assert last["mean_spend"] == 500.0


def test_a_measurement_opendp_refuses_spends_nothing(
    ready: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release's measurements are built (and their cost checked) before the charge: if OpenDP
    refuses one, nothing is charged, recorded as pending or audited as a release."""
    import importlib

    plans = importlib.import_module("privseg.release.plan")  # the module: release.plan is a function

    def refused(self: plans.Vector) -> None:
        raise RuntimeError("OpenDP refused the measurement")

    monkeypatch.setattr(plans.Vector, "measurement", refused)
    monkeypatch.setattr(plans, "_BUILT", threading.local())  # no thread has a measurement built yet
    audited = ready.store.conn.execute("SELECT COUNT(*) FROM audit WHERE event = 'release'").fetchone()[0]
    with pytest.raises(RuntimeError, match="refused"):
        report(ready, ["frequent_buyers"], ["age_band"])
    assert spent(ready) == 0
    assert ready.store.conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0] == 0
    assert (
        ready.store.conn.execute("SELECT COUNT(*) FROM audit WHERE event = 'release'").fetchone()[0]
        == audited
    )


def test_each_thread_builds_a_vectors_measurement_once_and_draws_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building a measurement (and checking its cost) is done once per thread and parameters; every
    call still draws new noise, and other parameters get their own measurement."""
    from privseg.release.plan import _PARALLEL_FROM, Vector

    built: list[tuple[int, float]] = []
    real = Vector.measurement
    monkeypatch.setattr(
        Vector, "measurement", lambda self: built.append((self.sensitivity, self.epsilon)) or real(self)
    )
    odd = Vector("counts", sensitivity=3, epsilon=0.37)  # parameters no other test uses
    exact = [1_000] * (2 * _PARALLEL_FROM)
    draws = [odd.noise(exact) for _ in range(4)] + [odd.noise(exact[:10]) for _ in range(4)]
    # The long draws ran on the two noise threads, the short ones here: one build per thread.
    assert 1 <= built.count((3, 0.37)) <= 3
    assert len({tuple(d) for d in draws}) == len(draws)  # fresh noise on every call
    Vector("counts", sensitivity=3, epsilon=0.38).noise(exact[:10])
    assert built[-1] == (3, 0.38)


def test_an_empty_cell_is_almost_never_released(ready: Deployment) -> None:
    plan = release.plan(
        ready.release_context(),
        release.PartnerAudienceRequest(segment="hearing_aid_interest_55plus"),
        "adnet_alpha",
    )
    m = plan.counts.measurement()
    floor = plan.policy.min_cohort_size
    draws = [v for _ in range(10) for v in m([0] * 2000)]
    released = sum(v >= floor for v in draws)
    # P(noise >= 100) at scale 8 is about 3e-6: 20,000 draws should release none; 3 would be 1e-6 rare.
    bound = math.exp(-floor / plan.counts.scale) * len(draws)
    assert bound < 0.1 and released <= 3


# -- the ledger --------------------------------------------------------------------------------------
def test_budget_arithmetic_is_exact(ready: Deployment) -> None:
    combos = [list(c) for n in (1, 2) for c in itertools.combinations(GENERAL, n)]
    for segments in combos[:20]:  # 20 x 0.5 = exactly the 10.0 a recipient has
        assert report(ready, segments)["charged_epsilon"] == 0.5
    assert spent(ready) == 10 * ledger.MICRO
    with pytest.raises(BudgetExhausted, match=r"costs epsilon 0\.5 but the recipient budget .* has 0 left"):
        report(ready, combos[20])
    assert spent(ready) == 10 * ledger.MICRO
    # Another marketer still has their own budget; the category cap (40) is not reached.
    assert report(ready, combos[20], recipient="crm_team")["charged_epsilon"] == 0.5


def test_concurrent_requests_never_overspend(ready: Deployment) -> None:
    combos = [list(c) for n in (2, 3) for c in itertools.combinations(GENERAL, n)][:50]
    assert len(combos) == 50
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(segments: list[str]) -> None:
        mine = Deployment(ready.settings)  # its own SQLite connection, as a separate request would have
        try:
            report(mine, segments)
            result = "ok"
        except BudgetExhausted:
            result = "refused"
        finally:
            mine.close()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(c,)) for c in combos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == 50
    assert outcomes.count("ok") == 20 and outcomes.count("refused") == 30
    assert spent(ready) == 10 * ledger.MICRO


def test_a_kill_during_a_release_leaves_the_charge_recorded(ready: Deployment) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.crash_helper", "after_charge", "release", "frequent_buyers"],
        cwd=REPO,
        env=_env(ready.settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert spent(ready) == ledger.to_micro(0.5)  # spent, and never refunded
    with pytest.raises(Conflict, match="being computed"):
        report(ready, ["frequent_buyers"], ["age_band"])
    # Once the dead release times out, asking again draws fresh noise and pays for it again:
    # a crash must never become a free second sample.
    later = release.plan(
        ready.release_context(),
        release.CohortReportRequest(segments=["frequent_buyers"], breakdown=["age_band"]),
        "growth_team",
    )
    from datetime import UTC, datetime

    out = release.release(
        ready, later, now=datetime.now(UTC) + release.PENDING_TIMEOUT + timedelta(seconds=1)
    )
    assert out["charged_epsilon"] == 0.5 and spent(ready) == ledger.to_micro(1.0)


# -- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda d: report(d, ["hearing_aid_interest_55plus"], ["gender"]),
            PolicyViolation,
            "forbids breaking down by 'gender'",
        ),
        (
            lambda d: report(d, ["cart_abandoners_7d"], ["signup_date"]),
            PolicyViolation,
            "does not allow breaking down by 'signup_date'",
        ),
        (
            lambda d: report(d, ["hearing_aid_interest_55plus"], ["age_band", "region"]),
            PolicyViolation,
            "at most 1 breakdown",
        ),
        (
            lambda d: report(d, ["cart_abandoners_7d"], recipient="stranger"),
            NotPermitted,
            "'stranger' may not receive",
        ),
        (
            # A release over general and cannabis segments is made under cannabis's stricter rules.
            lambda d: report(d, ["cart_abandoners_7d", "cannabis_curious"], ["age_band"]),
            PolicyViolation,
            "category 'cannabis' does not allow breaking down by 'age_band'",
        ),
        (
            lambda d: release.run(
                d.release_context(), release.PartnerAudienceRequest(segment="cannabis_curious"), "adnet_alpha"
            ),
            NotPermitted,
            "does not allow partner audiences",
        ),
        (
            lambda d: release.run(
                d.release_context(),
                release.PartnerAudienceRequest(segment="hearing_aid_interest_55plus"),
                "adnet_beta",
            ),
            NotPermitted,
            "'adnet_beta' is not granted",
        ),
        (lambda d: report(d, ["no_such_segment"]), NotFound, "not in snapshot"),
        (lambda d: report(d, ["cart_abandoners_7d"], ["region", "region"]), InvalidInput, "twice"),
    ],
)
def test_refusals_are_clear_and_spend_nothing(ready: Deployment, call, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        call(ready)
    assert spent(ready) == 0
    assert ready.store.conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0] == 0
    if error in (PolicyViolation, NotPermitted):
        assert audit.entries(ready.store.conn, after=0, limit=1000)[-1].event == "refusal"


# -- cache, dry run, what leaves ------------------------------------------------------------------------
def test_identical_requests_are_cached_and_free(ready: Deployment) -> None:
    first = report(ready, ["cart_abandoners_7d", "frequent_buyers"], ["age_band"])
    second = report(ready, ["cart_abandoners_7d", "frequent_buyers"], ["age_band"])
    assert second["cached"] and second["charged_epsilon"] == 0
    strip = lambda r: {k: v for k, v in r.items() if k not in ("cached", "charged_epsilon")}  # noqa: E731
    assert strip(first) == strip(second)
    assert spent(ready) == ledger.to_micro(0.5)
    # A new snapshot is new data: the same request is a new release and is charged.
    engine.compute_snapshot(store=ready.store, compiler=ready.compiler(), keyset=ready.keyset, as_of=AS_OF)
    third = report(ready, ["cart_abandoners_7d", "frequent_buyers"], ["age_band"])
    assert not third["cached"] and spent(ready) == ledger.to_micro(1.0)
    # The HTTP path sends a cached release as its stored text: byte for byte what encoding the
    # cached answer gives, and it spends nothing either.
    req = release.CohortReportRequest(
        segments=["cart_abandoners_7d", "frequent_buyers"], breakdown=["age_band"]
    )
    text = release.run_json(ready.release_context(), req, "growth_team")
    assert text == release_engine.encode(release.run(ready.release_context(), req, "growth_team"))
    assert json.loads(text) == {**third, "cached": True, "charged_epsilon": 0.0}
    assert spent(ready) == ledger.to_micro(1.0)
    fresh = release.CohortReportRequest(segments=["frequent_buyers"], breakdown=["age_band"])
    first_text = release.run_json(ready.release_context(), fresh, "growth_team")
    assert json.loads(first_text)["cached"] is False and spent(ready) == ledger.to_micro(1.5)
    # A fresh release is sent as the text it stored, marked: byte for byte what encoding its answer
    # gives, and the stored result is that answer without the two marks.
    answer = json.loads(first_text)
    assert first_text == release_engine.encode(answer) and answer["charged_epsilon"] == 0.5
    (stored,) = ready.store.conn.execute(
        "SELECT result FROM releases WHERE id = ?", (answer["release_id"],)
    ).fetchone()
    assert json.loads(stored) == {k: v for k, v in answer.items() if k not in ("cached", "charged_epsilon")}


def test_a_cohort_report_of_the_same_segments_in_another_order_is_the_same_release(ready: Deployment) -> None:
    """A cohort report's segments are a set: listing them in another order (a console form, a script
    that builds the list from a dict) asks for the same numbers, which are served from the cache, not
    charged again. Order still matters where it means something (A/B roles, movement stages)."""
    first = report(ready, ["frequent_buyers", "cart_abandoners_7d"], ["age_band"])
    dry = report(ready, ["cart_abandoners_7d", "frequent_buyers"], ["age_band"], dry_run=True)
    assert dry["cached"] and dry["would_charge_epsilon"] == 0
    again = report(ready, ["cart_abandoners_7d", "frequent_buyers"], ["age_band"])
    assert again["cached"] and again["release_id"] == first["release_id"]
    assert spent(ready) == ledger.to_micro(0.5)
    # Another breakdown order is another table (its cells transposed): a new release.
    report(ready, ["frequent_buyers"], ["age_band", "region"])
    assert not report(ready, ["frequent_buyers"], ["region", "age_band"])["cached"]
    # A release stored before segment sets were keyed sorted (under the key of the segments as listed)
    # is still the cached answer to the same request.
    from privseg.release.engine import _key

    req = release.CohortReportRequest(segments=["lapsed_customers", "discount_seekers"], breakdown=["region"])
    plan = release.plan(ready.release_context(), req, "growth_team")
    old = release.run(ready.release_context(), req, "growth_team")
    ready.store.conn.execute(
        "UPDATE releases SET cache_key = ? WHERE id = ?", (_key(plan, plan.segments), old["release_id"])
    )
    ready.store.conn.commit()
    before = spent(ready)
    repeat = release.run(ready.release_context(), req, "growth_team")
    assert repeat["cached"] and repeat["release_id"] == old["release_id"] and spent(ready) == before
    # Segments listed in order: the listed key is the sorted key, computed once.
    from privseg.release.engine import _keys

    listed = release.plan(
        ready.release_context(),
        release.CohortReportRequest(segments=sorted(req.segments), breakdown=["region"]),
        "growth_team",
    )
    assert _keys(listed) == (_key(listed, listed.segments),) * 2
    assert _keys(plan) == (release_engine.cache_key(plan), _key(plan, plan.segments))
    assert _keys(plan)[0] != _keys(plan)[1]


def test_dry_run_states_cost_and_accuracy_and_spends_nothing(ready: Deployment) -> None:
    out = report(ready, ["hearing_aid_interest_55plus"], ["region"], dry_run=True)
    assert out["dry_run"] and out["would_charge_epsilon"] == 0.25 and out["remaining_epsilon"] == 2.0
    assert out["interval_95_half_width"] > 0 and out["cells_per_segment"] == 11  # 10 regions + unknown
    assert out["allowed_dimensions"] == ["age_band", "region"]
    assert spent(ready) == 0
    report(ready, ["hearing_aid_interest_55plus"], ["region"])
    again = report(ready, ["hearing_aid_interest_55plus"], ["region"], dry_run=True)
    assert again["cached"] and again["would_charge_epsilon"] == 0 and again["remaining_epsilon"] == 1.75


def test_releases_hold_no_person_level_data_and_audit_holds_no_values(ready: Deployment) -> None:
    out = report(ready, GENERAL[:3], ["age_band"])
    aud = release.run(
        ready.release_context(),
        release.PartnerAudienceRequest(segment="hearing_aid_interest_55plus", breakdown=["age_band"]),
        "adnet_alpha",
    )
    text = json.dumps(out) + json.dumps(aud)
    assert re.search(r"k\d+\.[A-Za-z0-9_-]{20,}", text) is None
    floor = out["min_cohort_size"]
    for seg in out["results"]:
        assert all(c["count"] >= floor for c in seg["cells"])  # nothing below the threshold leaves
        assert len(seg["cells"]) + seg["suppressed_cells"] == 8  # 7 age bands + unknown
    entry = [e for e in audit.entries(ready.store.conn, limit=1000) if e.event == "release"][-1]
    assert (
        entry.details["epsilon"] == 0.25
        and "results" not in entry.details
        and "count" not in json.dumps(entry.details)
    )
    assert audit.verify(ready.store.conn, ready.keyset).ok


def test_counts_are_close_to_the_truth(ready: Deployment) -> None:
    snap = engine.latest(ready.store.conn)
    assert snap is not None
    import polars as pl

    truth = pl.read_parquet(engine.snapshot_path(ready.store, snap)).get_column("cart_abandoners_7d").sum()
    out = report(ready, ["cart_abandoners_7d"])
    (cell,) = out["results"][0]["cells"]
    # 10 x the 95% half-width: a failure here means a wrong count, not bad luck.
    assert abs(cell["count"] - truth) <= 10 * out["interval_95_half_width"]


@pytest.mark.parametrize("by", [[], ["age_band"], ["age_band", "region"], ["region", "age_band"]])
def test_counts_on_cached_cell_codes_equal_the_string_group_by(ready: Deployment, by: list[str]) -> None:
    # The exact counts a report noises come from per-snapshot integer cell codes; they must be the
    # plain group-by over the snapshot's text dimensions, cell by cell, in the plan's key order.
    import polars as pl

    ctx = ready.release_context()
    plan = release.plan(ctx, release.CohortReportRequest(segments=GENERAL[:4], breakdown=by), "growth_team")
    fast = release_data.segment_counts(ctx, plan)
    table = release_data.per_cell(
        plan, release_data.members(ctx, plan), [pl.col(s).sum().alias(s) for s in plan.segments]
    )
    assert fast == [int(v) for s in plan.segments for v in table.get_column(s).to_list()]
    assert sum(fast) > 0 and (not by or 0 in fast)  # non-vacuous: people counted, and empty cells too


def _column_reads(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The columns of every read of a membership snapshot from now on (what the count cache saves)."""
    read = release_data.columns
    reads: list[list[str]] = []

    def counting_read(ctx, snap, names):  # type: ignore[no-untyped-def]
        reads.append(list(names))
        return read(ctx, snap, names)

    monkeypatch.setattr(release_data, "columns", counting_read)
    return reads


def test_segment_counts_are_computed_once_per_snapshot_and_breakdown(
    ready: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polars as pl

    ctx = ready.release_context()

    def plan_of(segments: list[str], by: list[str]) -> release.ReleasePlan:
        return release.plan(ctx, release.CohortReportRequest(segments=segments, breakdown=by), "growth_team")

    first = release_data.segment_counts(ctx, plan_of(GENERAL[:3], ["age_band"]))
    reads = _column_reads(monkeypatch)
    # The same segments in another order, and one more: only the new one is read.
    plan = plan_of([GENERAL[3], GENERAL[1], GENERAL[0], GENERAL[2]], ["age_band"])
    again = release_data.segment_counts(ctx, plan)
    assert reads == [[GENERAL[3]]]
    cells = len(plan.keys)
    by_segment = {s: again[i * cells : (i + 1) * cells] for i, s in enumerate(plan.segments)}
    assert [v for s in GENERAL[:3] for v in by_segment[s]] == first
    # Cached or not, they are the plain group-by's numbers.
    table = release_data.per_cell(
        plan, release_data.members(ctx, plan), [pl.col(s).sum().alias(s) for s in plan.segments]
    )
    assert again == [int(v) for s in plan.segments for v in table.get_column(s).to_list()]
    # Another breakdown is another count.
    reads.clear()
    release_data.segment_counts(ctx, plan_of(GENERAL[:1], ["region"]))
    assert reads == [[GENERAL[0]]]


def test_segment_totals_without_a_breakdown_are_counted_once_per_snapshot(
    ready: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import polars as pl

    ctx = ready.release_context()
    away = dataclasses.replace(ctx, store=_NoDatabase(ctx.store))  # type: ignore[arg-type]

    def plan_of(segments: list[str]) -> release.ReleasePlan:
        return release.plan(ctx, release.CohortReportRequest(segments=segments), "growth_team")

    first = release_data.segment_counts(ctx, plan_of(GENERAL[:2]))
    reads = _column_reads(monkeypatch)
    again = release_data.segment_counts(ctx, plan_of([GENERAL[2], GENERAL[0], GENERAL[1]]))
    assert reads == [[GENERAL[2]]] and again[1:] == first
    release_data.count_ahead(away, plan_of(GENERAL[3:4]))  # ahead of a charge: no database either
    assert reads == [[GENERAL[2]], [GENERAL[3]]]
    plan = plan_of(GENERAL[:4])
    totals = release_data.segment_counts(ctx, plan)
    assert len(reads) == 2  # all four cached now
    table = release_data.per_cell(
        plan, release_data.members(ctx, plan), [pl.col(s).sum().alias(s) for s in plan.segments]
    )
    assert totals == [int(table.get_column(s).item()) for s in plan.segments] and min(totals) > 0


class _NoDatabase:
    """A store whose database may not be touched (work ahead of a charge runs beside its transaction)."""

    def __init__(self, store: object) -> None:
        self._store = store

    @property
    def conn(self) -> None:
        raise AssertionError("work ahead of the charge touched the database")

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_counts_ahead_of_the_charge_touch_no_database_and_are_the_exact_counts(
    ready: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import polars as pl

    ctx = ready.release_context()
    away = dataclasses.replace(ctx, store=_NoDatabase(ctx.store))  # type: ignore[arg-type]
    asked = release.CohortReportRequest(segments=GENERAL[:3], breakdown=["region"])
    plan = release.plan(ctx, asked, "crm_team")
    reads = _column_reads(monkeypatch)
    release_data.count_ahead(away, plan)
    assert reads == []  # the cell codes are not built (that reads the database): nothing done ahead
    release_data.cell_codes(ctx, plan.snapshot, plan.breakdown)
    release_data.count_ahead(away, plan)
    assert reads == [GENERAL[:3]]
    reads.clear()
    counts = release_data.segment_counts(ctx, plan)
    assert reads == []  # done ahead: the release reads nothing more
    table = release_data.per_cell(
        plan, release_data.members(ctx, plan), [pl.col(s).sum().alias(s) for s in plan.segments]
    )
    assert counts == [int(v) for s in plan.segments for v in table.get_column(s).to_list()]


def test_a_release_does_not_fail_with_its_work_ahead_and_logs_no_value(
    ready: Deployment, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from privseg.release.registry import KINDS

    def failing(ctx: object, plan: object) -> None:
        raise ValueError("count 4711 of a cell")

    kind = KINDS["cohort_report"]
    monkeypatch.setitem(KINDS, "cohort_report", dataclasses.replace(kind, ahead=failing))
    before = spent(ready)
    out = report(ready, GENERAL[:2])
    assert out["charged_epsilon"] == 0.5 and spent(ready) == before + 500_000
    assert sum(c["count"] for r in out["results"] for c in r["cells"]) > 0  # exact() counted instead
    assert "work ahead of a release failed (ValueError)" in caplog.text
    assert "4711" not in caplog.text


def test_work_ahead_not_yet_started_is_cancelled_not_waited_for() -> None:
    from concurrent.futures import ThreadPoolExecutor

    gate, ran = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait, 10)  # the pool's only thread is busy
        ahead = pool.submit(ran.append, 1)
        release_engine._settle(ahead)
        gate.set()
    assert ahead.cancelled() and ran == []


def test_the_count_cache_drops_the_least_recently_used_beyond_its_limit() -> None:
    import numpy as np

    cache = release_data._CountCache(limit=10)
    for key in "abc":
        cache.put(key, np.arange(4))
    assert "a" not in cache and "b" in cache and "c" in cache  # 12 values > 10: the oldest went
    assert cache.get("b") is not None  # now the most recently used
    cache.put("d", np.arange(4))
    assert "c" not in cache and "b" in cache and "d" in cache
    hit = cache.get("d")
    assert hit is not None and not hit.flags.writeable  # shared: nobody may change it in place
    cache.put("e", np.arange(30))  # larger than the limit on its own: kept alone
    assert "e" in cache and "b" not in cache and "d" not in cache


def test_a_cold_cache_entry_is_built_once_under_concurrent_releases() -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    calls: list[int] = []

    def build() -> object:
        calls.append(1)
        time.sleep(0.2)  # long enough that every caller arrives while it is being built
        return object()

    cache: dict[tuple[str], object] = {}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: release_data._once(cache, ("k",), build, keep=4), range(8)))
    assert len(calls) == 1 and all(g is got[0] for g in got)

    # A build that fails leaves no entry and no stuck lock: the next caller builds again.
    def failing() -> object:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        release_data._once(cache, ("other",), failing, keep=4)
    assert release_data._once(cache, ("other",), object, keep=4) is cache[("other",)]


def test_segment_movement_between_two_snapshots(ready: Deployment) -> None:
    import polars as pl

    first = engine.latest(ready.store.conn)
    assert first is not None
    later, _ = engine.compute_snapshot(
        store=ready.store, compiler=ready.compiler(), keyset=ready.keyset, as_of=AS_OF + timedelta(days=10)
    )
    stages = ["engaged_not_ready", "cart_abandoners_7d"]
    req = release.MovementRequest(segments=stages, from_snapshot=first.id)
    plan = release.plan(ready.release_context(), req, "growth_team")
    assert plan.counts.sensitivity == 1 and len(plan.keys) == 9  # (2 stages + none) squared
    out = release.run(ready.release_context(), req, "growth_team")
    assert out["from_snapshot"] == first.id and out["snapshot"] == later.id and out["charged_epsilon"] == 0.5

    def state(snap: engine.Snapshot) -> pl.DataFrame:
        df = pl.read_parquet(engine.snapshot_path(ready.store, snap))
        return df.select(
            "pid",
            pl.when(pl.col(stages[0]))
            .then(pl.lit(stages[0]))
            .when(pl.col(stages[1]))
            .then(pl.lit(stages[1]))
            .otherwise(pl.lit("none"))
            .alias("s"),
        )

    truth = state(first).join(state(later), on="pid", suffix="_to").group_by("s", "s_to").len()
    exact = {(a, b): n for a, b, n in truth.iter_rows()}
    cells = out["results"][0]["cells"]
    assert cells and len(cells) + out["results"][0]["suppressed_cells"] == 9
    for cell in cells:
        assert (
            abs(cell["count"] - exact.get((cell["from"], cell["to"]), 0))
            <= 10 * out["interval_95_half_width"]
        )
    with pytest.raises(InvalidInput, match="earlier"):
        release.run(
            ready.release_context(),
            release.MovementRequest(segments=stages, from_snapshot=later.id, to_snapshot=first.id),
            "growth_team",
        )


@pytest.fixture
def ready_20k(dep: Deployment, tmp_path: Path) -> Deployment:
    """Enough people that each arm's conversions dwarf the noise (2,000 gives ~16 against +/-24)."""
    from privseg.demo_data import generate

    files = generate(tmp_path / "demo20k", customers=20_000, seed=5, as_of=AS_OF)
    prepare(dep, files.customers, files.events)
    return dep


def test_ab_lift_report(ready_20k: Deployment) -> None:
    ready = ready_20k
    # Treatment is cart abandoners outside the holdout, so "converted" = cart abandoner is certain
    # for treatment and about 10% for control: a lift far above zero, whatever the noise.
    req = release.LiftRequest(
        treatment="spring_test_treatment",
        control="control_group_10pct",
        conversion="cart_abandoners_7d",
    )
    assert release.plan(ready.release_context(), req, "growth_team").counts.sensitivity == 4
    out = release.run(ready.release_context(), req, "growth_team")
    assert out["charged_epsilon"] == 0.5 and not out["suppressed"]
    t, c = out["treatment"], out["control"]
    assert 0 <= t["rate"] <= 1 and 0 <= c["rate"] <= 1
    assert t["rate"] > 0.8 and c["rate"] < 0.4
    lo, hi = out["lift_interval_95"]
    assert out["lift"] == pytest.approx(t["rate"] / c["rate"] - 1)
    assert 0 < lo <= out["lift"] <= hi  # clearly positive, and the interval brackets the estimate
    assert release.run(ready.release_context(), req, "growth_team")["cached"]
    # Counting cannabis conversions makes the whole release cannabis's: crm_team is no recipient of it.
    with pytest.raises(NotPermitted, match="'crm_team' may not receive releases for category 'cannabis'"):
        release.run(
            ready.release_context(),
            release.LiftRequest(
                treatment="spring_test_treatment",
                control="control_group_10pct",
                conversion="cannabis_curious",
            ),
            "crm_team",
        )
    with pytest.raises(InvalidInput, match="three different"):
        release.run(
            ready.release_context(),
            release.LiftRequest(treatment="a_b", control="a_b", conversion="c"),
            "growth_team",
        )


def test_erasure_reaches_snapshots_and_later_releases(ready: Deployment) -> None:
    import polars as pl

    from privseg.maintenance import erase_subject
    from privseg.pseudonym import Pseudonymizer

    snap = engine.latest(ready.store.conn)
    assert snap is not None
    before = pl.read_parquet(engine.snapshot_path(ready.store, snap))
    report(ready, ["cart_abandoners_7d"], ["age_band"])  # warms the per-snapshot dimension cache
    p = Pseudonymizer(ready.keyset, ready.ingest_policy.identity.type, 1)
    member = before.filter(pl.col("cart_abandoners_7d")).get_column("pid")[0]
    raw = p.decrypt(member)
    result = erase_subject(store=ready.store, keyset=ready.keyset, policy=ready.ingest_policy, raw_id=raw)
    assert result.snapshots_rewritten == 1 and result.profile_rows == 1
    snap_after = engine.latest(ready.store.conn)
    assert snap_after is not None and snap_after.id == snap.id and snap_after.file != snap.file
    after = pl.read_parquet(engine.snapshot_path(ready.store, snap_after))
    assert after.height == before.height - 1 and member not in set(after.get_column("pid"))
    # A new release on the rewritten snapshot uses dimensions aligned to its new rows.
    dims = release_data.dimensions(ready.release_context(), snap_after)
    assert dims.height == after.height
    # Its counts are the rewritten snapshot's, not those cached for the old one: one fewer member.
    ctx = ready.release_context()
    plan = release.plan(
        ctx,
        release.CohortReportRequest(segments=["cart_abandoners_7d"], breakdown=["age_band"]),
        "growth_team",
    )
    assert sum(release_data.segment_counts(ctx, plan)) == after.get_column("cart_abandoners_7d").sum()
    assert after.get_column("cart_abandoners_7d").sum() == before.get_column("cart_abandoners_7d").sum() - 1
    out = report(ready, ["cart_abandoners_7d", "frequent_buyers"], ["age_band"])
    assert not out["cached"]
    # Running the erasure again finds nothing left anywhere.
    assert not erase_subject(
        store=ready.store, keyset=ready.keyset, policy=ready.ingest_policy, raw_id=raw
    ).found


def test_membership_columns_read_through_a_kept_scan_are_what_the_file_holds_from_many_threads(
    ready: Deployment,
) -> None:
    import random

    import polars as pl

    snap = engine.latest(ready.store.conn)
    assert snap is not None
    ctx = ready.release_context()
    path = engine.snapshot_path(ready.store, snap)
    segments = [c for c in pl.read_parquet_schema(path) if c != "pid"]
    # One scan per file, kept: it is what keeps the file's metadata between reads.
    assert release_data.memberships(ctx, snap) is release_data.memberships(ctx, snap)
    rng = random.Random(7)
    asks = [rng.sample(segments, rng.randint(1, len(segments))) for _ in range(24)]
    wrong: list[list[str]] = []

    def read(names: list[str]) -> None:
        got = release_data.columns(ctx, snap, names)
        if not got.equals(pl.read_parquet(path, columns=names).select(names)):
            wrong.append(names)

    threads = [threading.Thread(target=read, args=(names,)) for names in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_a_release_planned_before_an_erasure_is_computed_on_the_rewritten_snapshot(ready: Deployment) -> None:
    """An erasure rewrites the kept snapshots under new names and deletes the old files. A release
    planned just before (a request in flight) used to be charged, then fail reading the deleted file.
    It is computed on the rewritten snapshot instead: charged once, released, without the person."""
    import polars as pl

    from privseg.maintenance import erase_subject
    from privseg.pseudonym import Pseudonymizer

    snap = engine.latest(ready.store.conn)
    assert snap is not None
    before = pl.read_parquet(engine.snapshot_path(ready.store, snap))
    raw = Pseudonymizer(ready.keyset, ready.ingest_policy.identity.type, 1).decrypt(
        before.filter(pl.col("frequent_buyers")).get_column("pid")[0]
    )
    ctx = ready.release_context()
    planned = release.plan(
        ctx, release.CohortReportRequest(segments=["frequent_buyers"], breakdown=["age_band"]), "growth_team"
    )
    # The old file was read through its kept scan before it was deleted: that scan must fail the way
    # a fresh read of a deleted file does, so that the release moves to the new file.
    assert release_data.columns(ctx, planned.snapshot, ["frequent_buyers"]).height == before.height
    erase_subject(store=ready.store, keyset=ready.keyset, policy=ready.ingest_policy, raw_id=raw)
    assert not engine.snapshot_path(ready.store, planned.snapshot).exists()
    out = release.release(ctx, planned)
    assert not out["cached"] and out["snapshot"] == snap.id
    assert spent(ready) == ledger.to_micro(0.5)
    assert ready.store.conn.execute("SELECT status FROM releases").fetchall() == [("done",)]
    # Its exact counts were the rewritten snapshot's: one member fewer.
    after = engine.get(ready.store.conn, snap.id)
    assert after is not None and after.file != snap.file
    moved = release.plan(
        ctx, release.CohortReportRequest(segments=["frequent_buyers"], breakdown=["age_band"]), "growth_team"
    )
    assert moved.snapshot.file == after.file
    assert sum(release_data.segment_counts(ctx, moved)) == before.get_column("frequent_buyers").sum() - 1


def test_spend_measure_is_clipped_noisy_and_close_to_the_truth(ready_20k: Deployment) -> None:
    import polars as pl

    ready = ready_20k
    stigmatized = ["hearing_aids", "cannabis", "sexual_health"]
    unfiltered = release.CohortReportRequest(segments=["frequent_buyers"], measures=["count", "spend"])
    # Spend over every purchase reads every stigmatized category's purchases: their rules, each charged.
    mixed = release.plan(ready.release_context(), unfiltered, "growth_team")
    assert sorted(p.name for p in mixed.charged) == sorted(stigmatized)
    assert mixed.policy.min_cohort_size == 100 and mixed.epsilon == 0.25
    req = unfiltered.model_copy(
        update={"spend_where": {"product_category": {"not_in_or_unknown": stigmatized}}}
    )
    plan = release.plan(ready.release_context(), req, "growth_team")
    assert [p.name for p in plan.charged] == ["general"]
    spend = plan.vector("spend")
    # Half the epsilon each; spend's d_in is one segment x the clip of 500, in cents.
    assert plan.counts.epsilon == spend.epsilon == 0.25 and spend.sensitivity == 500 * 100
    assert spend.measurement().map(spend.sensitivity) <= 0.25 + 1e-9
    out = release.run(ready.release_context(), req, "growth_team")
    assert out["charged_epsilon"] == 0.5 and spent(ready) == ledger.to_micro(0.5)
    (cell,) = out["results"][0]["cells"]
    snap = engine.latest(ready.store.conn)
    assert snap is not None
    members = pl.read_parquet(engine.snapshot_path(ready.store, snap), columns=["pid", "frequent_buyers"])
    events = ready.store.scan_events().collect()  # type: ignore[union-attr]
    as_of = AS_OF
    per_person = (
        events.filter(
            (pl.col("event_type") == "purchase")
            & ~pl.col("product_category").is_in(stigmatized).fill_null(False)
            & (pl.col("ts") <= as_of)
            & (pl.col("ts") >= as_of - timedelta(days=365))
        )
        .group_by("pid")
        .agg(pl.col("value").sum().clip(0, 500).alias("spend"))
    )
    truth = (
        members.filter(pl.col("frequent_buyers"))
        .join(per_person, on="pid", how="left")
        .get_column("spend")
        .fill_null(0)
        .sum()
    )
    assert abs(cell["spend"] - truth) <= 10 * out["spend_interval_95_half_width"]
    assert cell["mean_spend"] == pytest.approx(min(cell["spend"] / cell["count"], 500))
    with pytest.raises(InvalidInput, match="add the count measure"):
        release.run(
            ready.release_context(),
            release.CohortReportRequest(segments=["frequent_buyers"], measures=["spend"]),
            "growth_team",
        )


def test_movement_from_different_snapshots_are_different_releases(ready: Deployment) -> None:
    first = engine.latest(ready.store.conn)
    assert first is not None
    second, _ = engine.compute_snapshot(
        store=ready.store, compiler=ready.compiler(), keyset=ready.keyset, as_of=AS_OF + timedelta(days=5)
    )
    engine.compute_snapshot(
        store=ready.store, compiler=ready.compiler(), keyset=ready.keyset, as_of=AS_OF + timedelta(days=10)
    )
    stages = ["engaged_not_ready", "cart_abandoners_7d"]
    a = release.run(
        ready.release_context(),
        release.MovementRequest(segments=stages, from_snapshot=first.id),
        "growth_team",
    )
    b = release.run(
        ready.release_context(),
        release.MovementRequest(segments=stages, from_snapshot=second.id),
        "growth_team",
    )
    assert not a["cached"] and not b["cached"] and a["from_snapshot"] != b["from_snapshot"]
    assert spent(ready) == ledger.to_micro(1.0)


def test_a_release_is_encoded_wherever_the_json_module_encoded_it() -> None:
    """Releases are charged before they are encoded: orjson must not fail where json.dumps did not."""
    import numpy as np

    class Share(float):  # a float subclass, like numpy's float64
        pass

    value = {"a": Share(0.25), "b": np.float64(1.5), "c": (1, 2), "big": 2**70, "s": "é"}
    text = release_engine.encode(value)
    assert json.loads(text) == {"a": 0.25, "b": 1.5, "c": [1, 2], "big": 2**70, "s": "é"}
    small = {k: v for k, v in value.items() if k != "big"}  # orjson's own path (no fallback)
    assert release_engine.encode(small) == '{"a":0.25,"b":1.5,"c":[1,2],"s":"é"}'
    with pytest.raises(TypeError):  # what json.dumps refuses is still refused
        release_engine.encode({"x": object()})
    # A name a hostile request slipped a lone surrogate into (orjson refuses it): still encoded.
    assert json.loads(release_engine.encode({"segment": "a\ud800b"})) == {"segment": "a\ud800b"}
    # A release stored by json.dumps before (spaces after separators) is still marked into valid JSON.
    before = release_engine._marked(json.dumps({"a": [1, 2]}), cached=True, charged=0.0)
    assert json.loads(before) == {"a": [1, 2], "cached": True, "charged_epsilon": 0.0}
