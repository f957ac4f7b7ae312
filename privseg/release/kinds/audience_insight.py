"""Audience insight (for lookalikes): for one segment, the DP distribution of each requested attribute
as shares, and the affinity index of every cell against the whole consenting base.

Sensitivity (privacy unit: one person). Attributes are the policy's allowed breakdown dimensions, each
single-valued over a public domain plus unknown, and each released on its own (no joint of two
attributes): for every attribute a person is in exactly one cell. The vector holds, per attribute, the
segment's counts and the base's counts (the people with the category's consent). One person moves at
most one segment cell and one base cell per attribute: with A attributes, d_in = 2A. Shares, affinity
indexes, their intervals and the suppression of cells below the minimum cohort size are computed
from the noisy counts only: post-processing, free.

Two kinds share this module: ``audience_insight`` for marketers and ``partner_insight`` for partners
(granted like partner audiences); they differ only in who may receive them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from privseg.errors import NotPermitted
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register

DRAWS = 500  # simulated noise draws for the affinity intervals (OpenDP draws ~6 µs a value here)


class InsightRequest(ReleaseRequest):
    segment: str = Field(description="The segment to describe.")
    attributes: list[str] = Field(
        min_length=1,
        max_length=8,
        description="Profile attributes, each released on its own (no joint), within the category's "
        "allowed dimensions.",
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"segment": "frequent_buyers", "attributes": ["age_band", "region"]}]}
    )


class PartnerInsightRequest(InsightRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"segment": "hearing_aid_interest_55plus", "attributes": ["age_band", "region"]}]
        }
    )


class InsightCell(BaseModel):
    value: str
    count: int | None = Field(description="Noisy people of the segment (null: suppressed).")
    share: float | None = Field(description="The cell's share of the segment (noisy counts).")
    base_share: float | None = Field(description="The cell's share of the consenting base.")
    affinity: float | None = Field(description="share / base_share; 1 = like the base, 2 = twice as common.")
    affinity_interval_95: list[float] | None = Field(None, description="DP noise included (simulated).")


class AttributeInsight(BaseModel):
    attribute: str
    cells: list[InsightCell]
    suppressed_cells: int


class Insight(Released):
    segment: str
    attributes: list[AttributeInsight]
    note: str


def _plan(ctx: ReleaseContext, req: InsightRequest, recipient: str, kind: str) -> ReleasePlan:
    snap = scope.snapshot(ctx)
    scope.distinct(req.attributes, f"an attribute is named twice: {req.attributes}")
    scope.dimensions_exist(ctx, req.attributes)
    policy, charged = scope.categories(ctx, [snap], [req.segment], breakdown=req.attributes)
    if kind == PARTNER.name:
        if not policy.partner_audiences:
            raise NotPermitted(f"category {policy.name!r} does not allow partner audiences")
        if recipient not in policy.recipients.partners:
            raise NotPermitted(f"partner {recipient!r} is not granted audiences for category {policy.name!r}")
    else:
        scope.marketer(policy, recipient)
    # Each attribute on its own: checked like a one-dimension breakdown (allowed, not forbidden).
    keys = [(a, *cell) for a in req.attributes for cell in scope.cells(ctx, policy, [a])]
    return ReleasePlan(
        kind=kind,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=[req.segment],
        breakdown=req.attributes,
        keys=keys,
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        # Segment cells then base cells, every attribute: d_in = 2A (see the module docstring).
        vectors=(Vector("counts", 2 * len(req.attributes), policy.epsilon_per_release),),
    )


def plan_marketer(ctx: ReleaseContext, req: InsightRequest, recipient: str) -> ReleasePlan:
    return _plan(ctx, req, recipient, MARKETER.name)


def plan_partner(ctx: ReleaseContext, req: PartnerInsightRequest, recipient: str) -> ReleasePlan:
    return _plan(ctx, req, recipient, PARTNER.name)


def exact(ctx: ReleaseContext, plan: ReleasePlan) -> dict[str, list[int]]:
    """Segment counts for every (attribute, value) key, then base counts for the same keys."""
    (sid,) = plan.segments
    consent = plan.policy.consent_attribute
    frame = data.members(ctx, plan, [consent])
    segment: list[int] = []
    base: list[int] = []
    for attribute in plan.breakdown:
        values = [k[1] for k in plan.keys if k[0] == attribute]
        table = (
            pl.DataFrame({attribute: values})
            .join(
                frame.group_by(attribute).agg(
                    pl.col(sid).sum().alias("__segment"),
                    pl.col(consent).fill_null(False).sum().alias("__base"),
                ),
                on=attribute,
                how="left",
                maintain_order="left",
            )
            .fill_null(0)
        )
        segment += [int(v) for v in table.get_column("__segment")]
        base += [int(v) for v in table.get_column("__base")]
    return {"counts": segment + base}


def result(plan: ReleasePlan, noisy: Noisy) -> dict[str, Any]:
    """Shares and affinity per attribute from the noisy counts. The affinity interval is simulated by
    post-processing: noise drawn from the same OpenDP measurement on a zero vector (no data) is
    subtracted from the noisy counts to give plausible true counts, and the index recomputed."""
    n, floor = len(plan.keys), plan.policy.min_cohort_size
    counts = np.array(noisy["counts"], dtype=float)
    # One call for every draw: the noise on each coordinate is independent, so a long zero vector
    # is DRAWS draws of the 2n-vector.
    draws = np.asarray(plan.counts.noise([0] * (2 * n * DRAWS)), dtype=np.float64).reshape(DRAWS, 2 * n)
    plausible = np.maximum(counts[None, :] - draws, 0.0)
    out = []
    for attribute in plan.breakdown:
        idx = [j for j, k in enumerate(plan.keys) if k[0] == attribute]
        seg, base = counts[idx].clip(min=0), counts[[n + j for j in idx]].clip(min=0)
        seg_total, base_total = seg.sum(), base.sum()
        sim_seg, sim_base = plausible[:, idx], plausible[:, [n + j for j in idx]]
        sim_share = sim_seg / np.maximum(sim_seg.sum(axis=1, keepdims=True), 1.0)
        sim_base_share = sim_base / np.maximum(sim_base.sum(axis=1, keepdims=True), 1.0)
        cells, suppressed = [], 0
        for i, j in enumerate(idx):
            if noisy["counts"][j] < floor:
                suppressed += 1
                continue
            share = float(seg[i] / seg_total) if seg_total else None
            base_ok = noisy["counts"][n + j] >= floor and base_total > 0
            base_share = float(base[i] / base_total) if base_ok else None
            affinity, interval = None, None
            if share is not None and base_share:
                affinity = share / base_share
                ratio = sim_share[:, i] / np.maximum(sim_base_share[:, i], 1e-12)
                interval = [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))]
            cells.append(
                {
                    "value": plan.keys[j][1],
                    "count": int(noisy["counts"][j]),
                    "share": share,
                    "base_share": base_share,
                    "affinity": affinity,
                    "affinity_interval_95": interval,
                }
            )
        out.append({"attribute": attribute, "cells": cells, "suppressed_cells": suppressed})
    return {
        "segment": plan.segments[0],
        "attributes": out,
        "note": f"cells with a noisy count below {floor} are suppressed and only counted; the base is "
        f"everyone with the {plan.policy.consent_attribute} consent",
    }


def text(r: dict[str, Any]) -> list[str]:
    lines = []
    for a in r["attributes"]:
        lines.append(f"  {a['attribute']}: {a['suppressed_cells']} cell(s) suppressed")
        for c in a["cells"]:
            share = "n/a" if c["share"] is None else f"{c['share']:.1%}"
            affinity = "n/a" if c["affinity"] is None else f"{c['affinity']:.2f}"
            interval = c["affinity_interval_95"]
            span = "" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]"
            lines.append(f"    {c['value']:<20} {c['count']:>9}  share {share:>6}  affinity {affinity}{span}")
    return lines


MARKETER = register(
    ReleaseKind(
        name="audience_insight",
        route="/reports/insight",
        summary="Audience insight: each attribute's DP shares in a segment and its affinity index against "
        "the base.",
        request=InsightRequest,
        response=Insight,
        recipient="marketer",
        plan=plan_marketer,
        exact=exact,
        result=result,
        text=text,
    )
)
PARTNER = register(
    ReleaseKind(
        name="partner_insight",
        route="/audiences/insight",
        summary="Audience insight for lookalikes: a granted segment's DP attribute shares and affinity "
        "indexes.",
        request=PartnerInsightRequest,
        response=Insight,
        recipient="partner",
        plan=plan_partner,
        exact=exact,
        result=result,
        text=text,
    )
)
