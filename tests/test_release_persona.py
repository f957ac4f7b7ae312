"""DP personas (k-means): the accounting (every vector charged, each drawn once), the sensitivity of
a round on neighbouring data, recovery of well-separated centers at high epsilon, and the release."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from privseg import ledger, release
from privseg.demo_data import generate
from privseg.deployment import Deployment
from privseg.errors import NotPermitted
from privseg.keyset import create_keyset
from privseg.release.engine import _draw_once
from privseg.release.kinds.persona import RESOLUTION, PersonaPlan, initial_centers, lloyd
from privseg.release.plan import Vector
from tests.conftest import AS_OF, make_settings, prepare

GENERAL = {"product_category": {"not_in_or_unknown": ["hearing_aids", "cannabis", "sexual_health"]}}
ORDERS = {"type": "purchase", "where": GENERAL}
SPEND = {"type": "purchase", "where": GENERAL, "last": "365d"}
FEATURES = [
    {"name": "orders", "event": ORDERS, "measure": "count", "min": 0, "max": 20},
    {"name": "spend", "event": SPEND, "measure": "sum", "min": 0, "max": 2000},
]


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("persona")
    settings = make_settings(root)
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    files = generate(root / "demo", customers=6_000, seed=9, as_of=AS_OF)
    prepare(dep, files.customers, files.events)
    yield dep
    dep.close()


def test_every_round_is_planned_and_the_vectors_add_up_to_the_charge(ready: Deployment) -> None:
    req = release.PersonaRequest(segment="lapsed_customers", features=FEATURES, k=3, iterations=4)
    plan = release.plan(ready.release_context(), req, "growth_team")
    assert isinstance(plan, PersonaPlan)
    assert [v.name for v in plan.vectors] == [f"{kind}_{i}" for i in range(4) for kind in ("counts", "sums")]
    assert {v.sensitivity for v in plan.vectors if v.name.startswith("counts")} == {1}
    assert {v.sensitivity for v in plan.vectors if v.name.startswith("sums")} == {2 * RESOLUTION}
    assert plan.epsilon == pytest.approx(0.5) and all(
        v.epsilon == pytest.approx(0.5 / 8) for v in plan.vectors
    )


def test_a_vector_is_never_noised_twice() -> None:
    plan = PersonaPlan.__new__(PersonaPlan)
    object.__setattr__(plan, "vectors", (Vector("counts_0", 1, 0.1),))
    noise = _draw_once(plan)
    noise("counts_0", [5, 5])
    with pytest.raises(RuntimeError, match="already noised"):
        noise("counts_0", [5, 5])


def test_one_person_moves_a_round_by_its_stated_sensitivity() -> None:
    """Neighbouring data (one person more): the exact counts move by 1 and the exact sums by at most
    d x RESOLUTION in L1, for the same (public) centers."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(500, 3))
    centers = initial_centers(4, 3, 0)
    worst_counts = worst_sums = 0
    for extra in ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.99, 0.0, 0.5], *rng.uniform(0, 1, size=(30, 3))):
        seen: list[dict[str, list[int]]] = []
        for data in (x, np.vstack([x, extra])):
            captured: dict[str, list[int]] = {}

            def identity(name: str, exact: list[int], captured: dict[str, list[int]] = captured) -> list[int]:
                captured[name] = exact
                return exact

            lloyd(data, centers.copy(), 1, identity)
            seen.append(captured)
        moved_counts = sum(abs(a - b) for a, b in zip(seen[0]["counts_0"], seen[1]["counts_0"], strict=True))
        moved_sums = sum(abs(a - b) for a, b in zip(seen[0]["sums_0"], seen[1]["sums_0"], strict=True))
        assert moved_counts == 1 and moved_sums <= 3 * RESOLUTION
        worst_counts, worst_sums = max(worst_counts, moved_counts), max(worst_sums, moved_sums)
    assert worst_sums == 3 * RESOLUTION  # reached by the person at (1, 1, 1): the bound is tight


def test_well_separated_centers_are_recovered_at_high_epsilon() -> None:
    rng = np.random.default_rng(1)
    truth = np.array([[0.2, 0.2], [0.8, 0.3], [0.5, 0.85]])
    x = np.vstack([c + rng.normal(0, 0.03, size=(3000, 2)) for c in truth]).clip(0, 1)

    def noise(name: str, exact: list[int]) -> list[int]:  # real OpenDP noise, at epsilon 50 a vector
        d_in = 2 * RESOLUTION if name.startswith("sums") else 1
        return [int(v) for v in Vector(name, d_in, 50.0).measurement()(exact)]

    centers, sizes = lloyd(x, initial_centers(3, 2, 0), 6, noise)
    for t in truth:
        assert min(np.abs(c - t).max() for c in centers) < 0.01
    assert sorted(sizes) == pytest.approx([3000, 3000, 3000], abs=5)


def test_personas_are_charged_once_cached_and_thresholded(ready: Deployment) -> None:
    ctx = ready.release_context()
    req = release.PersonaRequest(segment="lapsed_customers", features=FEATURES, k=3, iterations=3)
    before = len(ledger.charges(ready.store.conn))
    out = release.run(ctx, req, "growth_team")
    assert out["charged_epsilon"] == 0.5 and out["category"] == "general"
    assert len(ledger.charges(ready.store.conn)) == before + 1
    for p in out["personas"]:
        if p["center"] is None:
            assert p["size"] is None
        else:
            assert p["size"] >= out["min_cohort_size"]
            assert 0 <= p["center"]["orders"] <= 20 and 0 <= p["center"]["spend"] <= 2000
    assert any(p["center"] is not None for p in out["personas"])
    again = release.run(ctx, req, "growth_team")
    assert again["cached"] and again["personas"] == out["personas"]
    assert len(ledger.charges(ready.store.conn)) == before + 1


def test_features_read_their_categories(ready: Deployment) -> None:
    """Unfiltered purchases are every stigmatized category's data: the personas fall under them."""
    ctx = ready.release_context()
    unfiltered = [{"name": "orders", "event": {"type": "purchase"}, "measure": "count", "min": 0, "max": 20}]
    req = release.PersonaRequest(segment="lapsed_customers", features=unfiltered, k=2, iterations=1)
    with pytest.raises(NotPermitted, match="'crm_team' may not receive releases"):
        release.run(ctx, req, "crm_team")
    priced = release.run(ctx, req.model_copy(update={"dry_run": True}), "growth_team")
    assert set(priced["charged_categories"]) == {"cannabis", "hearing_aids", "sexual_health"}


def test_the_cli_releases_personas(ready: Deployment, tmp_path: Path) -> None:
    import json

    from tests.conftest import run_cli

    args = [
        "personas",
        "-s",
        "lapsed_customers",
        "--recipient",
        "growth_team",
        "--k",
        "2",
        "--iterations",
        "2",
    ]
    out = run_cli(ready.settings, *args, "-f", json.dumps(FEATURES[0]), "--json")
    released = json.loads(out.stdout)
    assert released["kind"] == "personas" and len(released["personas"]) == 2
    bad = run_cli(ready.settings, *args, "-f", json.dumps({**FEATURES[0], "min": 5, "max": 1}), check=False)
    assert bad.returncode == 2 and "min must be below max" in bad.stderr


def test_a_persona_leaf_puts_each_member_in_its_nearest_released_persona(ready: Deployment) -> None:
    """Personas become segments: `persona: {release: N, is: J}` is filled in from the release at apply
    time, and membership is exactly the release's own nearest-center rule on the same data."""
    from privseg.release.kinds.persona import scaled_features
    from privseg.segments import definitions, engine
    from privseg.segments.language import DefinitionError

    ctx = ready.release_context()
    req = release.PersonaRequest(segment="lapsed_customers", features=FEATURES, k=3, iterations=3, seed=2)
    out = release.run(ctx, req, "growth_team")
    plan = release.plan(ctx, req, "growth_team")
    assert isinstance(plan, PersonaPlan)
    shown = [p for p in out["personas"] if p["center"] is not None]
    assert shown, out["personas"]
    # The release's own nearest-center rule, independently with numpy, on the release's snapshot data.
    x = scaled_features(ctx, plan)
    bounds = np.array(plan.bounds)
    centers = [
        None
        if p["center"] is None
        else (np.array([p["center"][n] for n in plan.names]) - bounds[:, 0]) / np.ptp(bounds, axis=1)
        for p in out["personas"]
    ]
    dist = np.column_stack(
        [((x - c) ** 2).sum(axis=1) if c is not None else np.full(len(x), np.inf) for c in centers]
    )
    nearest = np.bincount(dist.argmin(axis=1), minlength=len(centers))
    # The shown persona nearest to most people: the first shown one had no one nearest in 2 of 300
    # noise draws (throwaway script), which left the membership check below with nothing to check.
    target = max((p["persona"] for p in shown), key=lambda j: nearest[j])
    doc = {
        "id": "persona_members",
        "objective": "brand",
        "where": {
            "all": [
                {"segment": "lapsed_customers"},
                {"persona": {"release": out["release_id"], "is": target}},
            ]
        },
    }
    applied = definitions.apply_documents(
        ready.store.conn, ready.keyset, [("segment", doc, "test")],
        schema=ready.schema, categories=ready.categories, actor="marketer:growth_team",
    )  # fmt: skip
    assert applied[0].status == "created"
    stored = definitions.active(ready.store.conn)[("segment", "persona_members")].body
    leaf = stored["where"]["all"][1]["persona"]
    assert len(leaf["centers"]) == 3 and leaf["features"][0]["name"] == "orders"
    assert "nearest to persona" in ready.compiler().explain("persona_members")
    # Membership against the independent assignment.
    expected = int(nearest[target])
    snap, _ = engine.compute_snapshot(
        store=ready.store, compiler=ready.compiler(), keyset=ready.keyset, as_of=AS_OF
    )
    members = release_data_count(ready, snap, "persona_members")
    assert members == expected and expected > 0
    # Another marketer cannot build on growth_team's personas (nor learn whether the release exists).
    with pytest.raises(DefinitionError, match=f"no persona release {out['release_id']} of yours"):
        definitions.apply_documents(
            ready.store.conn, ready.keyset, [("segment", {**doc, "id": "theirs"}, "test")],
            schema=ready.schema, categories=ready.categories, actor="marketer:crm_team",
        )  # fmt: skip


def release_data_count(dep: Deployment, snap, sid: str) -> int:  # type: ignore[no-untyped-def]
    import polars as pl

    from privseg.release import data

    return int(data.memberships(dep.release_context(), snap).select(pl.col(sid).sum()).collect().item())


def test_the_api_accepts_a_persona_leaf_and_refuses_a_bare_one(ready: Deployment) -> None:
    from fastapi.testclient import TestClient

    from privseg import apikeys
    from privseg.api.app import create_app

    _, token = apikeys.create(ready.store.conn, ready.keyset, role="marketer", name="brand_team")
    client = TestClient(create_app(ready), base_url="http://127.0.0.1")
    h = {"Authorization": f"Bearer {token}"}
    leaf = {
        "is": 1,
        "features": [{"event": ORDERS, "measure": "count", "min": 0, "max": 20}],
        "centers": [[1.0], [8.0]],
    }
    ok = client.post(
        "/v1/segments", json={"id": "heavy", "objective": "brand", "where": {"persona": leaf}}, headers=h
    )
    assert ok.status_code == 200, ok.text
    bare = client.post(
        "/v1/segments", json={"id": "bare", "objective": "brand", "where": {"persona": {"is": 0}}}, headers=h
    )
    assert bare.status_code == 422 and "give features and centers" in bare.json()["detail"]
    suppressed = client.post(
        "/v1/segments",
        json={
            "id": "gone",
            "objective": "brand",
            "where": {"persona": {**leaf, "centers": [[1.0], None], "is": 1}},
        },
        headers=h,
    )
    assert suppressed.status_code == 422 and "suppressed" in suppressed.json()["detail"]
