"""A release kind is one module: registering it is all the engine, the ledger, the cache, the audit
log and the API need to serve it. The kind below lives only in this test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient
from pydantic import Field

from privseg import apikeys, audit, ledger, release
from privseg.api.app import create_app
from privseg.deployment import Deployment
from privseg.errors import NotPermitted
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register
from tests.conftest import prepare


class ReachRequest(ReleaseRequest):
    segments: list[str] = Field(min_length=1, max_length=5, description="People in any of these.")


class Reach(Released):
    reach: int | None = Field(description="Noisy number of people in any of the segments (null: too few).")


def _plan(ctx: ReleaseContext, req: ReachRequest, recipient: str) -> ReleasePlan:
    # Sensitivity: one number, people in the union of the segments; a person adds at most 1 (d_in = 1).
    snap = scope.snapshot(ctx)
    scope.distinct(req.segments)
    policy, charged = scope.categories(ctx, [snap], req.segments)
    scope.marketer(policy, recipient)
    return ReleasePlan(
        kind="reach",
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=req.segments,
        breakdown=[],
        keys=[()],
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        vectors=(Vector("counts", 1, policy.epsilon_per_release),),
    )


def _exact(ctx: ReleaseContext, plan: ReleasePlan) -> dict[str, list[int]]:
    union = pl.any_horizontal([pl.col(s) for s in plan.segments]).sum()
    return {"counts": [int(data.memberships(ctx, plan.snapshot).select(union).collect().item())]}


def _result(plan: ReleasePlan, noisy: Noisy) -> dict[str, Any]:
    (value,) = noisy["counts"]
    return {"reach": value if value >= plan.policy.min_cohort_size else None}


REACH: ReleaseKind[ReachRequest, ReleasePlan] = ReleaseKind(
    name="reach",
    route="/reports/reach",
    summary="People in any of the segments.",
    request=ReachRequest,
    response=Reach,
    recipient="marketer",
    plan=_plan,
    exact=_exact,
    result=_result,
    text=lambda r: [f"  reach {r['reach']}"],
)


@pytest.fixture
def reach(dep: Deployment, demo_files) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    prepare(dep, demo_files.customers, demo_files.events)
    register(REACH)
    yield dep
    release.KINDS.pop("reach")


def test_a_registered_kind_is_planned_charged_noised_cached_and_audited(reach: Deployment) -> None:
    ctx = reach.release_context()
    # Two general segments with many members, so the noisy reach is far above the threshold.
    req = ReachRequest(segments=["cart_abandoners_7d", "lapsed_customers"])
    dry = release.run(ctx, req.model_copy(update={"dry_run": True}), "growth_team")
    assert dry["dry_run"] and dry["would_charge_epsilon"] == 0.5
    out = release.run(ctx, req, "growth_team")
    assert out["kind"] == "reach" and out["charged_epsilon"] == 0.5 and not out["cached"]
    truth = _exact(ctx, release.plan(ctx, req, "growth_team"))["counts"][0]
    hw = out["interval_95_half_width"]
    assert truth >= out["min_cohort_size"] + 3 * hw, "pick larger segments: this test needs a released reach"
    assert out["reach"] is not None and abs(out["reach"] - truth) <= 3 * hw
    assert release.run(ctx, req, "growth_team")["cached"]  # spends nothing the second time
    rows = reach.store.conn.execute("SELECT category, epsilon_micro FROM ledger").fetchall()
    assert rows == [("general", ledger.to_micro(0.5))]
    (entry,) = [e for e in audit.entries(reach.store.conn, limit=1000) if e.event == "release"]
    assert entry.details["kind"] == "reach" and entry.details["charges"] == {"general": 500_000}
    with pytest.raises(NotPermitted):
        release.run(ctx, req, "stranger")
    refusals = [e for e in audit.entries(reach.store.conn, limit=1000) if e.event == "refusal"]
    assert refusals[-1].details == {"kind": "reach", "recipient": "stranger", "code": "not-permitted"}
    assert release.text(out).splitlines()[-1] == f"  reach {out['reach']}"


def test_a_registered_kind_gets_its_route_schema_and_role_check(reach: Deployment) -> None:
    client = TestClient(create_app(reach), raise_server_exceptions=False)
    doc = client.app.openapi()  # type: ignore[attr-defined]
    op = doc["paths"]["/v1/reports/reach"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReachRequest")
    answers = op["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert {a["$ref"].rsplit("/", 1)[1] for a in answers} == {"Reach", "DryRun"}
    conn, keyset = reach.store.conn, reach.keyset
    marketer = apikeys.create(conn, keyset, role="marketer", name="growth_team")[1]
    partner = apikeys.create(conn, keyset, role="partner", name="alpha", partner="adnet_alpha")[1]
    body = {"segments": ["frequent_buyers"]}
    r = client.post("/v1/reports/reach", json=body, headers={"Authorization": f"Bearer {partner}"})
    assert r.status_code == 403
    r = client.post("/v1/reports/reach", json=body, headers={"Authorization": f"Bearer {marketer}"})
    assert r.status_code == 200 and r.json()["recipient"] == "growth_team" and "reach" in r.json()
    # The caller cannot name another recipient: the body has no such field.
    r = client.post(
        "/v1/reports/reach",
        json={**body, "recipient": "crm_team"},
        headers={"Authorization": f"Bearer {marketer}"},
    )
    assert r.status_code == 422
