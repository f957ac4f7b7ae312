"""Cohort report: people per cell of a breakdown, for up to 20 segments, optionally with spend.

Sensitivity (privacy unit: one person). The cells are the public domains of the breakdown's
dimensions (plus unknown) and every dimension is single-valued, so a person is in exactly one cell of
a segment's breakdown: adding or removing one person changes each segment's count vector by at most 1
in L1, and the report over k segments by at most k (d_in = k). Spend: each person's spend in the
window is clipped to [0, value_clip] (in cents) and lands in the same single cell per segment, so the
spend vector moves by at most k * clip (d_in = k * clip cents). With spend, the epsilon is split
evenly between the two vectors (basic composition: together they cost exactly the charged epsilon).
Suppressing cells below the minimum cohort size uses the noisy counts: post-processing, free.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import polars as pl
from pydantic import ConfigDict, Field

from privseg.errors import InvalidInput
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released, SegmentCells
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register
from privseg.segments.language import Step
from privseg.segments.operators import OPERATORS
from privseg.segments.parser import Parser

Measure = Literal["count", "spend"]


class CohortReportRequest(ReleaseRequest):
    segments: list[str] = Field(min_length=1, max_length=20, description="Segment ids.")
    breakdown: list[str] = Field(
        default_factory=list, max_length=4, description="Profile dimensions of the cells, in order."
    )
    measures: list[Measure] = Field(
        default_factory=lambda: list[Measure](["count"]),
        min_length=1,
        description="count: people per cell; spend: total and mean clipped spend per cell (needs count).",
    )
    spend_event: str = Field("purchase", description="Event type whose value counts as spend.")
    spend_where: dict[str, Any] = Field(
        default_factory=dict,
        description="Event-field conditions (the segment language's `where`) on the spend events, e.g. "
        "{'product_category': {'not_in_or_unknown': ['cannabis']}}. Spend of every product category "
        "reads every stigmatized category's purchases, so the release falls under their rules.",
    )
    spend_window_days: int = Field(365, ge=1, le=3650, description="Spend is summed over this many days.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"segments": ["cart_abandoners_7d", "frequent_buyers"], "breakdown": ["age_band"]}]
        }
    )


class CohortReport(Released):
    results: list[SegmentCells] = Field(
        description="Per segment, its cells; with spend, each cell also has spend, spend_interval_95 "
        "and mean_spend (post-processed, at most the value clip)."
    )
    note: str


@dataclass(frozen=True, kw_only=True)
class CohortPlan(ReleasePlan):
    spend: Step | None  # the spend events, when spend is a measure
    spend_days: int

    def identity(self) -> dict[str, Any]:
        # Step and Cond are frozen dataclasses of plain values: their repr is deterministic.
        return {"spend": None if self.spend is None else [repr(self.spend), self.spend_days]}

    def details(self) -> dict[str, Any]:
        if self.spend is None:
            return {}
        return {
            "measures": ["count", "spend"],
            "spend_event": self.spend.type,
            "spend_where": [OPERATORS[c.op].words(c.field, c.value) for c in self.spend.filters],
            "spend_window_days": self.spend_days,
            "value_clip": self.policy.value_clip,
            "spend_interval_95_half_width": self.vector("spend").half_width,
        }


def plan(ctx: ReleaseContext, req: CohortReportRequest, recipient: str) -> CohortPlan:
    snap = scope.snapshot(ctx)
    scope.distinct(req.segments)
    spend = None
    if "spend" in req.measures:
        if "count" not in req.measures:
            raise InvalidInput(
                "spend is released with its counts (the mean needs them): add the count measure"
            )
        parser = Parser(ctx.schema, set(ctx.categories.categories))
        spend = parser.step({"type": req.spend_event, "where": req.spend_where}, "spend")
    scope.dimensions_exist(ctx, req.breakdown)
    policy, charged = scope.categories(ctx, [snap], req.segments, breakdown=req.breakdown, spend=spend)
    scope.marketer(policy, recipient)
    k, eps = len(req.segments), policy.epsilon_per_release
    vectors = (
        (Vector("counts", k, eps / 2), Vector("spend", k * round(policy.value_clip * 100), eps / 2, 0.01))
        if spend
        else (Vector("counts", k, eps),)
    )
    return CohortPlan(
        kind=KIND.name,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=req.segments,
        breakdown=req.breakdown,
        keys=scope.cells(ctx, policy, req.breakdown),
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        vectors=vectors,
        spend=spend,
        spend_days=req.spend_window_days,
    )


def person_spend(ctx: ReleaseContext, plan: CohortPlan) -> pl.Series:
    """Each person's spend in cents, clipped to [0, value_clip], in the snapshot's row order."""
    assert plan.spend is not None
    step = plan.spend
    as_of = datetime.fromisoformat(plan.snapshot.as_of)
    pids = data.memberships(ctx, plan.snapshot).select("pid")
    events = data.step_events(ctx, step)
    if events is None:
        return pl.zeros(pids.select(pl.len()).collect().item(), dtype=pl.Int64, eager=True)
    window = (pl.col("ts") <= as_of) & (pl.col("ts") >= as_of - timedelta(days=plan.spend_days))
    totals = (
        events.filter(window)
        .group_by("pid")
        .agg(pl.col("value").fill_null(0).clip(lower_bound=0).sum().alias("spend"))
    )
    spend = pids.join(totals, on="pid", how="left", maintain_order="left").select(
        (pl.col("spend").fill_null(0).clip(0, plan.policy.value_clip) * 100).round().cast(pl.Int64)
    )
    return spend.collect().to_series()


def exact(ctx: ReleaseContext, plan: CohortPlan) -> dict[str, list[int]]:
    """Counts (and clipped spend in cents) per cell, segment-major then cell order."""
    if plan.spend is None:
        return {"counts": data.segment_counts(ctx, plan)}
    frame = data.members(ctx, plan).with_columns(person_spend(ctx, plan).alias("__spend"))
    counts = [pl.col(s).sum().alias(s) for s in plan.segments]
    spend = [pl.col("__spend").filter(pl.col(s)).sum().alias(f"__spend_{s}") for s in plan.segments]
    table = data.per_cell(plan, frame, counts + spend)
    return {
        "counts": [int(v) for s in plan.segments for v in table.get_column(s).to_list()],
        "spend": [int(v) for s in plan.segments for v in table.get_column(f"__spend_{s}").to_list()],
    }


def cell_results(plan: ReleasePlan, noisy: Noisy, segments: list[str]) -> list[dict[str, Any]]:
    """Per segment, its cells above the minimum cohort size (spend and share added when noised)."""
    n, floor = len(plan.keys), plan.policy.min_cohort_size
    # Each half width is one OpenDP call: asked once per release, not once per cell (a spend report's
    # 880 cells spent 27 ms of its time on them).
    hw = plan.counts.half_width
    counts, spend = noisy["counts"], noisy.get("spend")
    shw = plan.vector("spend").half_width if spend is not None else 0.0
    labels = [dict(zip(plan.breakdown, key, strict=True)) for key in plan.keys]
    out = []
    for i, sid in enumerate(segments):
        cells: list[dict[str, Any]] = []
        at = i * n
        for j, value in enumerate(counts[at : at + n]):
            if value < floor:
                continue
            cell = {**labels[j], "count": value, "interval_95": [max(value - hw, 0), value + hw]}
            if spend is not None:
                total = max(spend[at + j], 0) / 100
                cell["spend"] = total
                cell["spend_interval_95"] = [max(total - shw, 0.0), total + shw]
                # Post-processing: a mean of clipped values cannot exceed the clip.
                cell["mean_spend"] = min(total / value, plan.policy.value_clip)
            cells.append(cell)
        out.append({"segment": sid, "cells": cells, "suppressed_cells": n - len(cells)})
    return out


def result(plan: CohortPlan, noisy: Noisy) -> dict[str, Any]:
    return {
        "results": cell_results(plan, noisy, plan.segments),
        "note": f"cells with a noisy count below {plan.policy.min_cohort_size} are suppressed and only "
        "counted",
    }


def text(r: dict[str, Any]) -> list[str]:
    lines = []
    for seg in r["results"]:
        lines.append(
            f"  {seg['segment']}: {seg['suppressed_cells']} cell(s) suppressed "
            f"(noisy count < {r['min_cohort_size']})"
        )
        for cell in seg["cells"]:
            key = ", ".join(f"{d}={cell[d]}" for d in r["breakdown"]) or "all"
            extra = f", share {cell['share']:.1%}" if cell.get("share") is not None else ""
            if "spend" in cell:
                extra += f", spend {cell['spend']:,.0f} (mean {cell['mean_spend']:,.2f})"
            lo, hi = cell["interval_95"]
            lines.append(f"    {key:<40} {cell['count']:>9}  [{lo:.0f}, {hi:.0f}]{extra}")
    return lines


KIND = register(
    ReleaseKind(
        name="cohort_report",
        route="/reports/cohort",
        summary="A DP cohort report: people per cell of a breakdown, with 95% intervals.",
        request=CohortReportRequest,
        response=CohortReport,
        recipient="marketer",
        plan=plan,
        exact=exact,
        result=result,
        text=text,
        ahead=lambda ctx, plan: data.count_ahead(ctx, plan) if plan.spend is None else None,
        unordered=True,
    )
)
