"""A/B lift: arm sizes and conversions, the rates and the lift with an interval.

Sensitivity (privacy unit: one person). The vector is [n_treatment, n_control, converted_treatment,
converted_control]. Nothing forces the arms to be disjoint, so one person may add 1 to all four:
d_in = 4. The interval of the lift is simulated by post-processing only (see :func:`result`).
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import Noisy, ReleaseKind, ReleaseRequest, register

DRAWS = 4000  # simulated draws for the lift interval


class LiftRequest(ReleaseRequest):
    treatment: str = Field(description="Segment of the treatment arm.")
    control: str = Field(description="Segment of the control arm (e.g. a bucket holdout).")
    conversion: str = Field(description="Segment whose members count as converted.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "treatment": "spring_test_treatment",
                    "control": "control_group_10pct",
                    "conversion": "coupon_responders",
                }
            ]
        }
    )


class Arm(BaseModel):
    size: int
    converted: int
    rate: float


class Lift(Released):
    arms: dict[str, str] = Field(description="Arm name -> its segment.")
    conversion: str
    suppressed: bool = Field(description="True when an arm's noisy size is below the minimum cohort size.")
    note: str | None = None
    treatment: Arm | None = None
    control: Arm | None = None
    count_interval_95_half_width: float | None = None
    lift: float | None = Field(
        None, description="rate_treatment / rate_control - 1 (null: no control conversions)."
    )
    lift_interval_95: list[float] | None = Field(None, description="DP noise and sampling error included.")


def plan(ctx: ReleaseContext, req: LiftRequest, recipient: str) -> ReleasePlan:
    names = [req.treatment, req.control, req.conversion]
    scope.distinct(names, "treatment, control and conversion must be three different segments")
    snap = scope.snapshot(ctx)
    policy, charged = scope.categories(ctx, [snap], names)
    scope.marketer(policy, recipient)
    return ReleasePlan(
        kind=KIND.name,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=names,
        breakdown=["arm", "measure"],
        keys=[
            ("treatment", "size"),
            ("control", "size"),
            ("treatment", "converted"),
            ("control", "converted"),
        ],
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        vectors=(Vector("counts", 4, policy.epsilon_per_release),),
    )


def exact(ctx: ReleaseContext, plan: ReleasePlan) -> dict[str, list[int]]:
    t, c, conv = (pl.col(s) for s in plan.segments)
    row = (
        data.memberships(ctx, plan.snapshot)
        .select(t.sum(), c.sum(), (t & conv).sum().alias("ct"), (c & conv).sum().alias("cc"))
        .collect()
        .row(0)
    )
    return {"counts": [int(v) for v in row]}


def result(plan: ReleasePlan, noisy: Noisy) -> dict[str, Any]:
    """Rates and lift with a 95% interval that accounts for both the DP noise and sampling.

    The interval is simulated by post-processing only: the noise distribution is sampled from the
    same OpenDP measurement (on a zero vector, touching no data), and sampling error of each rate is
    approximated as normal. Arms whose noisy size is below the minimum cohort size are suppressed.
    """
    import numpy as np

    nt, nc, ct, cc = noisy["counts"]
    floor = plan.policy.min_cohort_size
    base = {
        "arms": {"treatment": plan.segments[0], "control": plan.segments[1]},
        "conversion": plan.segments[2],
    }
    if min(nt, nc) < floor:
        return {**base, "suppressed": True, "note": f"an arm's noisy size is below {floor}; nothing is shown"}
    # The counts' own measurement (built once per thread), on zeros: draws of the noise alone.
    noise = np.asarray(plan.counts.noise([0] * (4 * DRAWS)), dtype=np.float64).reshape(DRAWS, 4)
    est = np.array([nt, nc, ct, cc], dtype=float) - noise  # plausible true counts given the noisy ones
    n_t, n_c = np.maximum(est[:, 0], 1), np.maximum(est[:, 1], 1)
    r_t, r_c = np.clip(est[:, 2] / n_t, 0, 1), np.clip(est[:, 3] / n_c, 0, 1)
    rng = np.random.default_rng()
    r_t = np.clip(r_t + rng.standard_normal(DRAWS) * np.sqrt(r_t * (1 - r_t) / n_t), 0, 1)
    r_c = np.clip(r_c + rng.standard_normal(DRAWS) * np.sqrt(r_c * (1 - r_c) / n_c), 0, 1)
    defined = r_c > 0  # a draw with no control conversions has no lift
    lift = r_t[defined] / r_c[defined] - 1
    rate_t, rate_c = min(max(ct / nt, 0.0), 1.0), min(max(cc / nc, 0.0), 1.0)
    return {
        **base,
        "suppressed": False,
        "treatment": {"size": nt, "converted": max(ct, 0), "rate": rate_t},
        "control": {"size": nc, "converted": max(cc, 0), "rate": rate_c},
        "count_interval_95_half_width": plan.counts.half_width,
        "lift": None if rate_c == 0 else rate_t / rate_c - 1,
        "lift_interval_95": (
            [float(np.quantile(lift, 0.025)), float(np.quantile(lift, 0.975))] if lift.size else None
        ),
    }


def text(r: dict[str, Any]) -> list[str]:
    if r["suppressed"]:
        return ["  " + r["note"]]
    lines = []
    for arm in ("treatment", "control"):
        a = r[arm]
        lines.append(
            f"  {arm:<9} {r['arms'][arm]:<28} size {a['size']:>8}  "
            f"converted {a['converted']:>7}  rate {a['rate']:.2%}"
        )
    lift = "n/a" if r["lift"] is None else f"{r['lift']:+.1%}"
    if r["lift_interval_95"] is None:
        lines.append(f"  lift {lift} (no interval: the control arm shows no conversions)")
    else:
        lo, hi = r["lift_interval_95"]
        lines.append(f"  lift {lift} (95% interval {lo:+.1%} .. {hi:+.1%}, noise and sampling included)")
    return lines


KIND = register(
    ReleaseKind(
        name="ab_lift",
        route="/reports/lift",
        summary="A DP A/B lift report, with an interval that includes the noise.",
        request=LiftRequest,
        response=Lift,
        recipient="marketer",
        plan=plan,
        exact=exact,
        result=result,
        text=text,
    )
)
