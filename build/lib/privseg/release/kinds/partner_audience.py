"""Partner audience: a segment's people per cell for an ad partner, with each cell's share of the
consenting population.

Sensitivity (privacy unit: one person). Two vectors over the same public cells: the segment's
members per cell and the consenting population per cell. A person is in at most one cell of each, so
one person moves the concatenated vector by at most 2 in L1 (d_in = 2). The share is
post-processing of the two noisy counts; cells below the minimum cohort size are suppressed on the
noisy counts (free).
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import ConfigDict, Field

from privseg.errors import NotPermitted
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.kinds.cohort_report import cell_results
from privseg.release.kinds.cohort_report import text as cells_text
from privseg.release.models import Released, SegmentCells
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register


class PartnerAudienceRequest(ReleaseRequest):
    segment: str = Field(description="A segment the partner is granted (see GET /v1/audiences).")
    breakdown: list[str] = Field(
        default_factory=lambda: ["region"],
        min_length=1,
        max_length=4,
        description="Profile dimensions of the cells, within the category's allowed ones. "
        "Default: ['region'].",
        json_schema_extra={"default": ["region"]},
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"segment": "hearing_aid_interest_55plus", "breakdown": ["region"]}]}
    )


class PartnerAudience(Released):
    results: list[SegmentCells] = Field(
        description="The segment's cells; each has `share`, its noisy fraction of the cell's consenting "
        "population (null when that population is below the minimum cohort size)."
    )
    note: str


POPULATION = "population"


def plan(ctx: ReleaseContext, req: PartnerAudienceRequest, recipient: str) -> ReleasePlan:
    snap = scope.snapshot(ctx)
    scope.dimensions_exist(ctx, req.breakdown)
    policy, charged = scope.categories(ctx, [snap], [req.segment], breakdown=req.breakdown)
    if not policy.partner_audiences:
        raise NotPermitted(f"category {policy.name!r} does not allow partner audiences")
    if recipient not in policy.recipients.partners:
        raise NotPermitted(f"partner {recipient!r} is not granted audiences for category {policy.name!r}")
    return ReleasePlan(
        kind=KIND.name,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=[req.segment],
        breakdown=req.breakdown,
        keys=scope.cells(ctx, policy, req.breakdown),
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        # Members then populations, one vector: d_in = 2 (see the module docstring).
        vectors=(Vector("counts", 2, policy.epsilon_per_release),),
    )


def exact(ctx: ReleaseContext, plan: ReleasePlan) -> dict[str, list[int]]:
    consent = plan.policy.consent_attribute
    frame = data.members(ctx, plan, [consent])
    (sid,) = plan.segments
    table = data.per_cell(
        plan, frame, [pl.col(sid).sum().alias(sid), pl.col(consent).fill_null(False).sum().alias(POPULATION)]
    )
    return {"counts": [int(v) for name in (sid, POPULATION) for v in table.get_column(name).to_list()]}


def result(plan: ReleasePlan, noisy: Noisy) -> dict[str, Any]:
    n, floor = len(plan.keys), plan.policy.min_cohort_size
    population = noisy["counts"][n:]
    position = {key: j for j, key in enumerate(plan.keys)}
    (segment,) = cell_results(plan, noisy, plan.segments)
    for cell in segment["cells"]:
        pop = population[position[tuple(cell[d] for d in plan.breakdown)]]
        cell["share"] = None if pop < floor else min(max(cell["count"] / pop, 0.0), 1.0)
    return {
        "results": [segment],
        "note": f"cells with a noisy count below {floor} are suppressed and only counted",
    }


KIND = register(
    ReleaseKind(
        name="partner_audience",
        route="/audiences",
        summary="A thresholded partner audience: DP counts per cell and the share of each cell.",
        request=PartnerAudienceRequest,
        response=PartnerAudience,
        recipient="partner",
        plan=plan,
        exact=exact,
        result=result,
        text=cells_text,
    )
)
