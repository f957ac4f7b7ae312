"""Segment movement: a transition table between two snapshots (e.g. brand -> performance funnel).

Sensitivity (privacy unit: one person). A person's state in a snapshot is the first listed segment
they are in, or none (absent from a snapshot counts as none), so each person is in exactly one
(from, to) cell: adding or removing one person moves the table by at most 1 in L1 (d_in = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import ConfigDict, Field

from privseg.db import MAX_ID
from privseg.errors import InvalidInput
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released, SegmentCells
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register
from privseg.segments import engine

NONE_STATE = "none"


class MovementRequest(ReleaseRequest):
    segments: list[str] = Field(
        min_length=2,
        max_length=6,
        description="Ordered states: a person's state is the first listed segment they are in.",
    )
    from_snapshot: int = Field(ge=1, le=MAX_ID, description="The earlier snapshot id.")
    to_snapshot: int | None = Field(
        None, ge=1, le=MAX_ID, description="The later snapshot id (default: latest)."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"segments": ["engaged_not_ready", "cart_abandoners_7d"], "from_snapshot": 1}]
        }
    )


class Movement(Released):
    from_snapshot: int
    from_as_of: str
    results: list[SegmentCells] = Field(description="One entry; its cells have `from` and `to` states.")
    note: str


@dataclass(frozen=True, kw_only=True)
class MovementPlan(ReleasePlan):
    from_snapshot: engine.Snapshot

    def identity(self) -> dict[str, Any]:
        return {"from_snapshot": self.from_snapshot.id}

    def details(self) -> dict[str, Any]:
        return {"from_snapshot": self.from_snapshot.id, "from_as_of": self.from_snapshot.as_of}


def plan(ctx: ReleaseContext, req: MovementRequest, recipient: str) -> MovementPlan:
    later = scope.snapshot(ctx, req.to_snapshot)
    earlier = scope.snapshot(ctx, req.from_snapshot)
    if earlier.id >= later.id:
        raise InvalidInput("from_snapshot must be earlier than to_snapshot")
    scope.distinct(req.segments)
    policy, charged = scope.categories(ctx, [earlier, later], req.segments)
    scope.marketer(policy, recipient)
    states = [*req.segments, NONE_STATE]
    return MovementPlan(
        kind=KIND.name,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=req.segments,
        breakdown=["from", "to"],
        keys=[(a, b) for a in states for b in states],
        snapshot=later,
        policy_hash=ctx.categories.content_hash,
        vectors=(Vector("counts", 1, policy.epsilon_per_release),),
        from_snapshot=earlier,
    )


def states(ctx: ReleaseContext, snap: engine.Snapshot, segments: list[str], name: str) -> pl.LazyFrame:
    state: pl.Expr = pl.lit(NONE_STATE)
    for sid in reversed(segments):
        state = pl.when(pl.col(sid)).then(pl.lit(sid)).otherwise(state)
    return data.memberships(ctx, snap).select("pid", state.alias(name))


def exact(ctx: ReleaseContext, plan: MovementPlan) -> dict[str, list[int]]:
    before = states(ctx, plan.from_snapshot, plan.segments, "from")
    after = states(ctx, plan.snapshot, plan.segments, "to")
    moved = (
        before.join(after, on="pid", how="full", coalesce=True)
        .with_columns(pl.col("from").fill_null(NONE_STATE), pl.col("to").fill_null(NONE_STATE))
        .group_by("from", "to")
        .len()
        .collect()
    )
    counts: dict[tuple[str, ...], int] = {(r[0], r[1]): int(r[2]) for r in moved.iter_rows()}
    return {"counts": [counts.get(k, 0) for k in plan.keys]}


def result(plan: MovementPlan, noisy: Noisy) -> dict[str, Any]:
    hw, floor = plan.counts.half_width, plan.policy.min_cohort_size
    cells, suppressed = [], 0
    for (a, b), value in zip(plan.keys, noisy["counts"], strict=True):
        if value < floor:
            suppressed += 1
            continue
        cells.append({"from": a, "to": b, "count": value, "interval_95": [max(value - hw, 0), value + hw]})
    return {
        "results": [{"segment": " -> ".join(plan.segments), "cells": cells, "suppressed_cells": suppressed}],
        "note": f"transitions with a noisy count below {floor} are suppressed and only counted",
    }


def text(r: dict[str, Any]) -> list[str]:
    lines = []
    for seg in r["results"]:
        lines.append(f"  {seg['segment']}: {seg['suppressed_cells']} transition(s) suppressed")
        for cell in seg["cells"]:
            lo, hi = cell["interval_95"]
            lines.append(
                f"    {cell['from']:>24} -> {cell['to']:<24} {cell['count']:>9}  [{lo:.0f}, {hi:.0f}]"
            )
    return lines


KIND = register(
    ReleaseKind(
        name="segment_movement",
        route="/reports/movement",
        summary="A DP transition table between two snapshots.",
        request=MovementRequest,
        response=Movement,
        recipient="marketer",
        plan=plan,
        exact=exact,
        result=result,
        text=text,
    )
)
