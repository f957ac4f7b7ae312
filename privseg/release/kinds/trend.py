"""DP trends: a count per period (day, week, month, quarter) over a window of closed periods, for the
members of a segment, as one release.

Two measures, two sensitivity arguments (privacy unit: one person, over the whole window):

- ``active``: people with at least one matching event in each period. A person active in every period
  moves every one of the T counts by 1: d_in = T, said as it is. The noise per period grows with T.
- ``first``: people whose first matching event (over all their stored history up to the window's end)
  falls in each period. Each person adds 1 to at most one period's increment, so the T increments have
  d_in = 1, but a marketer reads them as a running total, and releasing T running totals directly
  would cost d_in = T. Two mechanisms avoid that, both eps-DP:
  * summed increments: the T increments with d_in = 1; a running total sums up to T noises, so its
    error grows with sqrt(T);
  * the binary tree (continual counting): the sums of the increments over dyadic blocks of periods,
    padded to P = 2^k >= T leaves, 2P - 1 nodes in k + 1 levels; a person's one increment lies in
    exactly one node per level, so d_in = k + 1 = L, and a running total sums at most L nodes (the
    binary decomposition of its prefix): its error grows like L^1.5, with (log T)^1.5, not T.
  The tree only wins for long windows (measured: beyond about 1,000 periods at any epsilon, as both
  errors scale with 1/eps), so the plan picks the one whose noisiest running total has the smaller
  variance; T is public, so the choice reveals nothing. Totals and per-period counts (differences of
  totals) are post-processing.

Periods are the calendar's (UTC), public: the window is the ``periods`` periods that closed at or
before the snapshot's as-of time. The population is the segment's members in the snapshot (their
consent already applied); the events read (type and filters) join the categories of the release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import polars as pl
from opendp.accuracy import discrete_laplacian_scale_to_accuracy
from pydantic import BaseModel, ConfigDict, Field

from privseg.errors import InvalidInput
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released
from privseg.release.plan import ALPHA, ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register
from privseg.segments.language import Step
from privseg.segments.operators import OPERATORS
from privseg.segments.parser import Parser

Period = Literal["day", "week", "month", "quarter"]
EVERY: dict[str, str] = {"day": "1d", "week": "1w", "month": "1mo", "quarter": "3mo"}
STEP: dict[str, tuple[int, str]] = {
    "day": (1, "d"),
    "week": (1, "w"),
    "month": (1, "mo"),
    "quarter": (3, "mo"),
}
Z95 = 1.959963984540054


class TrendRequest(ReleaseRequest):
    segment: str = Field(description="Whose events count: the segment's members in the latest snapshot.")
    event: str = Field("purchase", description="The event type counted.")
    where: dict[str, Any] = Field(
        default_factory=dict, description="Event-field conditions (the segment language's `where`)."
    )
    measure: Literal["active", "first"] = Field(
        "first",
        description="first: people whose first such event falls in the period (binary-tree mechanism: "
        "error grows with log T); active: people with such an event in the period (d_in = T).",
    )
    period: Period = Field("week", description="Calendar periods (UTC).")
    periods: int = Field(
        12,
        ge=1,
        le=3660,
        description="How many closed periods, ending at the snapshot (up to ten years of days).",
    )
    start: date | None = Field(
        None,
        description="Anchor a continual trend at this date's period: `periods` is then its horizon. The "
        "first release charges it once for the whole horizon; later releases (on later snapshots) "
        "charge nothing, keep every closed period's noise and add the periods closed since.",
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"segment": "frequent_buyers", "measure": "first", "period": "week"}]}
    )


class TrendPoint(BaseModel):
    period_start: str
    count: int = Field(description="Noisy people in the period (first: new in the period).")
    interval_95: list[float]
    cumulative: int | None = Field(None, description="first: noisy running total up to this period.")
    cumulative_interval_95: list[float] | None = None


class Trend(Released):
    measure: str
    period: str
    points: list[TrendPoint]
    mechanism: str
    theory: dict[str, float] = Field(
        description="Expected 95% half-widths. first: of the running total at the last period, by the "
        "tree and by releasing the T running totals directly (d_in = T); active: of one period's count."
    )
    note: str


@dataclass(frozen=True, kw_only=True)
class TrendPlan(ReleasePlan):
    step: Step
    measure: str
    period: str
    starts: list[datetime]  # period starts, then the window's end
    leaves: int  # P: padded number of tree leaves (first), else T
    closed_periods: int  # how many of the T periods had closed at the snapshot (T unless anchored)

    def closed(self, vector: str) -> list[int] | None:
        c = self.closed_periods
        if vector != "tree":
            return list(range(c))
        out, offset, n = [], 0, self.leaves
        while n >= 1:  # every dyadic block whose periods have all closed
            width = self.leaves // n
            out += [offset + p for p in range(n) if (p + 1) * width <= c]
            offset, n = offset + n, n // 2
        return out

    def identity(self) -> dict[str, Any]:
        return {
            "step": repr(self.step),
            "measure": self.measure,
            "period": self.period,
            "window": str(self.starts),
        }

    def details(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "event": self.step.type,
            "where": [OPERATORS[c.op].words(c.field, c.value) for c in self.step.filters],
            "period": self.period,
            "periods": len(self.starts) - 1,
            "closed_periods": self.closed_periods,
            "window": [self.starts[0].isoformat(), self.starts[-1].isoformat()],
            "continual": self.series is not None,
        }


def window(as_of: datetime, period: str, periods: int) -> list[datetime]:
    """The starts of the ``periods`` closed calendar periods before ``as_of``, then their end."""
    end = pl.select(pl.lit(as_of).dt.truncate(EVERY[period])).item()
    n, unit = STEP[period]
    start = pl.select(pl.lit(end).dt.offset_by(f"-{n * periods}{unit}")).item()
    return list(pl.datetime_range(start, end, EVERY[period], closed="both", eager=True).to_list())


def anchored(start: date, as_of: datetime, period: str, periods: int) -> tuple[list[datetime], int]:
    """A continual trend's horizon: ``periods`` periods from ``start``'s period, and how many of them
    had closed at ``as_of``."""
    first = pl.select(
        pl.lit(datetime(start.year, start.month, start.day, tzinfo=UTC)).dt.truncate(EVERY[period])
    ).item()
    n, unit = STEP[period]
    end = pl.select(pl.lit(first).dt.offset_by(f"{n * periods}{unit}")).item()
    starts = list(pl.datetime_range(first, end, EVERY[period], closed="both", eager=True).to_list())
    now = pl.select(pl.lit(as_of).dt.truncate(EVERY[period])).item()
    return starts, sum(1 for s in starts[1:] if s <= now)


def levels(leaves: int) -> int:
    return leaves.bit_length()  # P = 2^k leaves: k + 1 levels


def plan(ctx: ReleaseContext, req: TrendRequest, recipient: str) -> TrendPlan:
    snap = scope.snapshot(ctx)
    parser = Parser(ctx.schema, set(ctx.categories.categories))
    step = parser.step({"type": req.event, "where": req.where}, "trend")
    policy, charged = scope.categories(ctx, [snap], [req.segment], spend=step)
    scope.marketer(policy, recipient)
    as_of = datetime.fromisoformat(snap.as_of)
    if req.start is None:
        starts, series = window(as_of, req.period, req.periods), None
        closed = len(starts) - 1
    else:
        # A start after the snapshot has no closed period (and one near year 9999 has a horizon past
        # what a date can hold: it raised OverflowError).
        starts, closed = (
            anchored(req.start, as_of, req.period, req.periods) if req.start <= as_of.date() else ([], 0)
        )
        if closed == 0:
            raise InvalidInput(
                f"start: no {req.period} of this trend had closed at the snapshot ({snap.as_of}); "
                "release it once its first period has closed"
            )
        series = repr((repr(step), req.measure, req.period, starts[0].isoformat(), req.periods))
    t = len(starts) - 1
    if req.measure == "first":
        leaves = 1 << max(t - 1, 0).bit_length()  # the smallest power of two >= T
        eps = policy.epsilon_per_release
        # Both mechanisms are eps-DP on the same data; T is public, so choosing between them by
        # their worst expected error (the running total that sums the most noises) leaks nothing.
        tree = Vector("tree", levels(leaves), eps)  # d_in = L (module docstring)
        increments = Vector("increments", 1, eps)  # d_in = 1 (module docstring)
        if worst_variance(tree, leaves, t) < worst_variance(increments, leaves, t):
            vector = tree
        else:
            vector = increments
    else:
        leaves = t
        vector = Vector("counts", t, policy.epsilon_per_release)  # d_in = T (module docstring)
    return TrendPlan(
        kind=KIND.name,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=[req.segment],
        breakdown=[],
        keys=[(s.isoformat(),) for s in starts[:-1]],
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        vectors=(vector,),
        step=step,
        measure=req.measure,
        period=req.period,
        starts=starts,
        leaves=leaves,
        closed_periods=closed,
        series=series,
    )


def blocks(vector: Vector, leaves: int, t: int) -> list[int]:
    """The released blocks whose sum is the running total of periods [0, t)."""
    return prefix_nodes(t, leaves) if vector.name == "tree" else list(range(t))


def noise_variance(scale: float) -> float:
    """Variance of a discrete Laplace noise of ``scale``: 2q/(1-q)^2 with q = e^(-1/scale)."""
    q = math.exp(-1 / scale)
    return 2 * q / (1 - q) ** 2


def worst_variance(vector: Vector, leaves: int, t: int) -> float:
    """The variance of the noisiest running total over periods 1..t."""
    return max(len(blocks(vector, leaves, i)) for i in range(1, t + 1)) * noise_variance(vector.scale)


def per_period(ctx: ReleaseContext, plan: TrendPlan) -> list[int]:
    """Exact people per period (active: with an event in it; first: whose first event is in it)."""
    (sid,) = plan.segments
    # Only closed periods are read: an anchored trend's later periods are zeros, never released.
    start, end, t = plan.starts[0], plan.starts[plan.closed_periods], len(plan.starts) - 1
    events = data.step_events(ctx, plan.step)
    if events is None:
        return [0] * t
    population = data.memberships(ctx, plan.snapshot).filter(pl.col(sid)).select("pid")
    matching = events.filter(pl.col("ts") < end)
    if plan.measure == "first":
        people = matching.group_by("pid").agg(pl.col("ts").min()).filter(pl.col("ts") >= start)
    else:
        people = matching.filter(pl.col("ts") >= start).select("pid", "ts")
    periods = (
        people.join(population, on="pid", how="semi")
        .select("pid", pl.col("ts").dt.truncate(EVERY[plan.period]).alias("period"))
        .unique()
        .group_by("period")
        .len()
        .collect()
    )
    found = {p.replace(tzinfo=None): int(n) for p, n in periods.iter_rows()}
    return [found.get(s.replace(tzinfo=None), 0) for s in plan.starts[:-1]]


def tree_nodes(increments: list[int], leaves: int) -> list[int]:
    """The sums over every dyadic block, level by level from the leaves (padded with zeros) to the root."""
    level = increments + [0] * (leaves - len(increments))
    nodes = list(level)
    while len(level) > 1:
        level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
        nodes += level
    return nodes


def prefix_nodes(t: int, leaves: int) -> list[int]:
    """Indexes (in :func:`tree_nodes` order) of the dyadic blocks whose union is periods [0, t): at
    most one per level, the widest first."""
    levels_: list[tuple[int, int]] = []  # (offset of the level in tree_nodes order, block width)
    offset, n = 0, leaves
    while n >= 1:
        levels_.append((offset, leaves // n))
        offset, n = offset + n, n // 2
    out, position = [], 0
    for offset, width in reversed(levels_):
        if position + width <= t:
            out.append(offset + position // width)
            position += width
    return out


def exact(ctx: ReleaseContext, plan: TrendPlan) -> dict[str, list[int]]:
    counts = per_period(ctx, plan)
    if plan.counts.name == "tree":
        return {"tree": tree_nodes(counts, plan.leaves)}
    return {plan.counts.name: counts}


def _half_width(scale: float, terms: int) -> float:
    """95% half-width of a sum of ``terms`` independent discrete Laplace noises of ``scale``: OpenDP's
    exact figure for one; a normal approximation for more (variance 2t/(1-t)^2 each, t = e^(-1/scale))."""
    if terms <= 1:
        return float(discrete_laplacian_scale_to_accuracy(scale, ALPHA))
    return Z95 * math.sqrt(terms * noise_variance(scale))


def result(plan: TrendPlan, noisy: Noisy) -> dict[str, Any]:
    t, c = len(plan.starts) - 1, plan.closed_periods
    vector = plan.counts
    naive = _half_width(t / vector.epsilon, 1)  # T running totals released directly: d_in = T
    points = []
    if plan.measure == "first":
        nodes = noisy[vector.name]
        previous, before = 0, set[int]()
        for i in range(c):
            used = blocks(vector, plan.leaves, i + 1)
            total = sum(nodes[j] for j in used)
            hw = _half_width(vector.scale, len(used))
            # The period's own count is a difference of two totals: the nodes in both cancel.
            own = _half_width(vector.scale, len(before.symmetric_difference(used)))
            points.append(
                {
                    "period_start": plan.starts[i].isoformat(),
                    "count": total - previous,
                    "interval_95": [total - previous - own, total - previous + own],
                    "cumulative": total,
                    "cumulative_interval_95": [total - hw, total + hw],
                }
            )
            previous, before = total, set(used)
        tree = Vector("tree", levels(plan.leaves), vector.epsilon)
        increments = Vector("increments", 1, vector.epsilon)
        theory = {
            "running_total_tree": Z95 * math.sqrt(worst_variance(tree, plan.leaves, t)),
            "running_total_increments": Z95 * math.sqrt(worst_variance(increments, plan.leaves, t)),
            "running_total_direct": naive,
        }
        if vector.name == "tree":
            levels_, nodes_ = vector.sensitivity, 2 * plan.leaves - 1
            mechanism = f"binary tree: {nodes_} nodes in {levels_} levels, d_in = {levels_}"
        else:
            mechanism = f"summed increments: {t} counts, d_in = 1 (fewer noises than a tree at this T)"
    else:
        hw = vector.half_width
        for i, value in enumerate(noisy["counts"][:c]):
            points.append(
                {
                    "period_start": plan.starts[i].isoformat(),
                    "count": value,
                    "interval_95": [value - hw, value + hw],
                }
            )
        theory = {"per_period": hw}
        mechanism = f"plain: {t} counts, d_in = {t} (a person may be active in every period)"
    return {
        "measure": plan.measure,
        "period": plan.period,
        "points": points,
        "mechanism": mechanism,
        "theory": theory,
        "note": "counts are noisy and may be negative or dip; periods are calendar periods (UTC) that had "
        "closed at the snapshot's as-of time"
        + (f" ({c} of the {t} periods of this continual trend)" if plan.series is not None else ""),
    }


def text(r: dict[str, Any]) -> list[str]:
    lines = [f"  {r['mechanism']}"]
    for p in r["points"]:
        lo, hi = p["interval_95"]
        total = "" if p.get("cumulative") is None else f"  total {p['cumulative']:>8}"
        lines.append(f"    {p['period_start'][:10]}  {p['count']:>8}  [{lo:.0f}, {hi:.0f}]{total}")
    th = r["theory"]
    if "running_total_tree" in th:
        lines.append(
            f"  95% half-width of the last running total: {th['running_total_tree']:.1f} "
            f"(releasing running totals directly: {th['running_total_direct']:.1f})"
        )
    return lines


KIND = register(
    ReleaseKind(
        name="trend",
        route="/reports/trend",
        summary="A DP trend: people per calendar period over a window (first events by the binary-tree "
        "mechanism).",
        request=TrendRequest,
        response=Trend,
        recipient="marketer",
        plan=plan,
        exact=exact,
        result=result,
        text=text,
    )
)
