"""Release requests and plans: what is asked, whether policy allows it, what it costs.

A plan fixes the category policy, the cells (public keys), the L1 sensitivity of the released vector
and the epsilon; it builds the OpenDP measurements. See release.py for the sensitivity arguments.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from opendp.accuracy import discrete_laplacian_scale_to_accuracy
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_laplace
from opendp.metrics import l1_distance
from opendp.mod import enable_features
from pydantic import BaseModel, ConfigDict, Field

from privseg.category_policy import CategoryPolicy, strictest
from privseg.deployment import Deployment
from privseg.errors import Conflict, InvalidInput, NotFound, NotPermitted, PolicyViolation
from privseg.segments import engine
from privseg.segments.language import Parser, Step
from privseg.segments.operators import OPERATORS

# Specific modules, not opendp.prelude: the prelude imports scikit-learn (0.75 s on every CLI call).
enable_features("contrib")

ALPHA = 0.05  # intervals are 95%, two-sided
UNKNOWN = "unknown"
Measure = Literal["count", "spend"]


class CohortReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segments: list[str] = Field(min_length=1, max_length=20, description="Segment ids, one category.")
    breakdown: list[str] = Field(default_factory=list, description="Profile dimensions, in order.")
    recipient: str = Field(min_length=1, description="The marketer receiving the report.")
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
    dry_run: bool = Field(False, description="Plan and price the release without spending anything.")


class PartnerAudienceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segment: str
    breakdown: list[str] = Field(default_factory=lambda: ["region"], min_length=1)
    partner: str = Field(min_length=1)
    dry_run: bool = False


class MovementRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segments: list[str] = Field(
        min_length=2,
        max_length=6,
        description="Ordered states: a person's state is the first listed segment they are in.",
    )
    from_snapshot: int = Field(description="The earlier snapshot id.")
    to_snapshot: int | None = Field(None, description="The later snapshot id (default: the latest).")
    recipient: str = Field(min_length=1)
    dry_run: bool = False


class LiftRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    treatment: str = Field(description="Segment of the treatment arm.")
    control: str = Field(description="Segment of the control arm (e.g. a bucket holdout).")
    conversion: str = Field(description="Segment whose members count as converted.")
    recipient: str = Field(min_length=1)
    dry_run: bool = False


Kind = Literal["cohort_report", "partner_audience", "segment_movement", "ab_lift"]
NONE_STATE = "none"


@dataclass(frozen=True)
class ReleasePlan:
    kind: Kind
    recipient: str
    policy: CategoryPolicy
    segments: list[str]
    breakdown: list[str]
    keys: list[tuple[str, ...]]  # every cell, in release order
    sensitivity: int  # L1 over the whole released vector
    epsilon: float
    snapshot: engine.Snapshot
    policy_hash: str
    from_snapshot: engine.Snapshot | None = None  # segment movement only
    spend: tuple[Step, int] | None = None  # cohort report with spend: (spend events, window days)
    charged: tuple[CategoryPolicy, ...] = ()  # every category whose budget the release is charged to

    def __post_init__(self) -> None:
        if not self.charged:
            raise ValueError("a release plan must name the categories it charges")

    @property
    def count_epsilon(self) -> float:
        # With spend, the epsilon is split evenly between the count and the spend vectors (basic
        # composition: the two measurements together cost exactly the charged epsilon).
        return self.epsilon / 2 if self.spend else self.epsilon

    @property
    def scale(self) -> float:
        # Discrete Laplace: epsilon = d_in / scale.
        return self.sensitivity / self.count_epsilon

    @property
    def clip_cents(self) -> int:
        return round(self.policy.value_clip * 100)

    @property
    def spend_sensitivity(self) -> int:
        # Each person's spend is clipped to [0, clip] and lands in one cell per segment.
        return len(self.segments) * self.clip_cents

    @property
    def spend_scale(self) -> float:
        return self.spend_sensitivity / (self.epsilon - self.count_epsilon)

    @staticmethod
    def _laplace(scale: float, d_in: int, budget: float) -> Any:
        m = make_laplace(vector_domain(atom_domain(T=int)), l1_distance(T=int), scale=scale)
        cost = m.map(d_in)  # type: ignore[no-untyped-call]
        if cost > budget * (1 + 1e-9):
            raise RuntimeError(f"measurement costs {cost}, more than the planned {budget}")
        return m

    def measurement(self) -> Any:
        return self._laplace(self.scale, self.sensitivity, self.count_epsilon)

    def spend_measurement(self) -> Any:
        return self._laplace(self.spend_scale, self.spend_sensitivity, self.epsilon - self.count_epsilon)

    @property
    def half_width(self) -> float:
        return float(discrete_laplacian_scale_to_accuracy(self.scale, ALPHA))

    @property
    def spend_half_width(self) -> float:
        """In currency units (the noise is drawn in cents)."""
        return float(discrete_laplacian_scale_to_accuracy(self.spend_scale, ALPHA)) / 100

    def describe(self) -> dict[str, Any]:
        return (
            {
                "kind": self.kind,
                "recipient": self.recipient,
                "category": self.policy.name,
                "charged_categories": [p.name for p in self.charged],
                "segments": self.segments,
                "breakdown": self.breakdown,
                "cells_per_segment": len(self.keys),
                "epsilon": self.epsilon,
                "delta": self.policy.delta,
                "noise_scale": self.scale,
                "interval_95_half_width": self.half_width,
                "min_cohort_size": self.policy.min_cohort_size,
                "allowed_dimensions": self.policy.allowed_dimensions(),
                "max_dimensions": self.policy.breakdowns.max_dimensions,
                "snapshot": self.snapshot.id,
                "as_of": self.snapshot.as_of,
                "policy_hash": self.policy_hash,
            }
            | (
                {"from_snapshot": self.from_snapshot.id, "from_as_of": self.from_snapshot.as_of}
                if self.from_snapshot
                else {}
            )
            | (
                {
                    "measures": ["count", "spend"],
                    "spend_event": self.spend[0].type,
                    "spend_where": [OPERATORS[c.op].words(c.field, c.value) for c in self.spend[0].filters],
                    "spend_window_days": self.spend[1],
                    "value_clip": self.policy.value_clip,
                    "spend_interval_95_half_width": self.spend_half_width,
                }
                if self.spend
                else {}
            )
        )


def _categories(
    dep: Deployment,
    snaps: list[engine.Snapshot],
    segments: list[str],
    *,
    breakdown: Sequence[str] = (),
    spend: Step | None = None,
) -> tuple[CategoryPolicy, tuple[CategoryPolicy, ...]]:
    """The policy a release is made under, and the categories it charges: every effective category
    of its segments (recorded with the snapshot, under the policy set in force) plus whatever its
    breakdown and measures read; general drops out once a stigmatized category is in."""
    names: set[str] = {"general"}
    for snap in snaps:
        if snap.policy_hash != dep.categories.content_hash or snap.categories is None:
            raise Conflict(
                f"snapshot {snap.id} was computed under another policy set (its consent filters and "
                "categories may differ): run `privseg segments compute`"
            )
        for sid in segments:
            if sid not in snap.segments:
                raise NotFound(
                    f"segment {sid!r} is not in snapshot {snap.id}; apply it and run "
                    "`privseg segments compute`"
                )
            names.update(snap.categories[sid])
    index = dep.sensitivity
    taints = [t for dim in breakdown for t in index.dimension_reads(dim, f"breakdown {dim}")]
    if spend is not None:
        taints += index.step_reads(spend, "spend")
    names.update(t.category for t in taints)
    members = [dep.categories.get(n) for n in sorted(names)]
    if any(p.stigmatized for p in members):
        members = [p for p in members if p.name != "general"]
    return strictest(members), tuple(members)


def _dimensions_exist(dep: Deployment, breakdown: list[str]) -> None:
    unknown = [d for d in breakdown if d not in dep.schema.profile]
    if unknown:
        raise InvalidInput(f"unknown breakdown dimension(s) {unknown}; known: {sorted(dep.schema.profile)}")


def _keys(dep: Deployment, policy: CategoryPolicy, breakdown: list[str]) -> list[tuple[str, ...]]:
    if len(set(breakdown)) != len(breakdown):
        raise InvalidInput(f"breakdown names a dimension twice: {breakdown}")
    if len(breakdown) > policy.breakdowns.max_dimensions:
        raise PolicyViolation(
            f"category {policy.name!r} allows at most {policy.breakdowns.max_dimensions} breakdown "
            f"dimension(s); the request has {len(breakdown)}"
        )
    allowed = policy.allowed_dimensions()
    for dim in breakdown:
        if dim in policy.breakdowns.forbidden:
            raise PolicyViolation(f"category {policy.name!r} forbids breaking down by {dim!r}")
        if dim not in allowed:
            raise PolicyViolation(
                f"category {policy.name!r} does not allow breaking down by {dim!r}; allowed: {allowed}"
            )
    domains = []
    for dim in breakdown:
        ft = dep.schema.profile[dim]
        values = list(ft.values or ()) if ft.type == "category" else ["true", "false"]
        domains.append([*values, UNKNOWN])
    return [tuple(k) for k in itertools.product(*domains)]


def plan_cohort_report(dep: Deployment, req: CohortReportRequest) -> ReleasePlan:
    snap = _snapshot(dep)
    if len(set(req.segments)) != len(req.segments):
        raise InvalidInput("a segment is named twice")
    spend = None
    if "spend" in req.measures:
        if "count" not in req.measures:
            raise InvalidInput(
                "spend is released with its counts (the mean needs them): add the count measure"
            )
        parser = Parser(dep.schema, set(dep.categories.categories))
        step = parser.step({"type": req.spend_event, "where": req.spend_where}, "spend")
        spend = (step, req.spend_window_days)
    _dimensions_exist(dep, req.breakdown)
    policy, charged = _categories(
        dep, [snap], req.segments, breakdown=req.breakdown, spend=spend[0] if spend else None
    )
    _marketer(policy, req.recipient)
    keys = _keys(dep, policy, req.breakdown)
    return ReleasePlan(
        "cohort_report",
        req.recipient,
        policy,
        req.segments,
        req.breakdown,
        keys,
        len(req.segments),
        policy.epsilon_per_release,
        snap,
        dep.categories.content_hash,
        spend=spend,
        charged=charged,
    )


def plan_partner_audience(dep: Deployment, req: PartnerAudienceRequest) -> ReleasePlan:
    snap = _snapshot(dep)
    _dimensions_exist(dep, req.breakdown)
    policy, charged = _categories(dep, [snap], [req.segment], breakdown=req.breakdown)
    if not policy.partner_audiences:
        raise NotPermitted(f"category {policy.name!r} does not allow partner audiences")
    if req.partner not in policy.recipients.partners:
        raise NotPermitted(f"partner {req.partner!r} is not granted audiences for category {policy.name!r}")
    keys = _keys(dep, policy, req.breakdown)
    return ReleasePlan(
        "partner_audience",
        req.partner,
        policy,
        [req.segment],
        req.breakdown,
        keys,
        2,
        policy.epsilon_per_release,
        snap,
        dep.categories.content_hash,
        charged=charged,
    )


def _snapshot(dep: Deployment, snapshot_id: int | None = None) -> engine.Snapshot:
    if snapshot_id is None:
        snap = engine.latest(dep.store.conn)
        if snap is None or snap.file is None:
            raise NotFound("no membership snapshot yet: run `privseg segments compute`")
        return _same_key(dep, snap)
    found = [s for s in engine.snapshots(dep.store.conn) if s.id == snapshot_id]
    if not found:
        raise NotFound(f"no snapshot {snapshot_id}")
    if found[0].file is None:
        raise NotFound(f"snapshot {snapshot_id} was pruned (only the last {engine.KEEP_SNAPSHOTS} are kept)")
    return _same_key(dep, found[0])


def _same_key(dep: Deployment, snap: engine.Snapshot) -> engine.Snapshot:
    # Pseudonyms under two key versions are two people to every join and every transition table.
    if snap.key_version is None or snap.key_version != dep.store.key_version():
        raise Conflict(
            f"snapshot {snap.id} is keyed under another pseudonym key version than the store "
            "(a rotation did not finish re-keying it): run `privseg segments compute`"
        )
    return snap


def _marketer(policy: CategoryPolicy, recipient: str) -> None:
    if recipient not in policy.recipients.marketers:
        raise NotPermitted(f"{recipient!r} may not receive releases for category {policy.name!r}")


def plan_movement(dep: Deployment, req: MovementRequest) -> ReleasePlan:
    """A transition table between two snapshots. Each person has exactly one state per snapshot (the
    first listed segment they are in, or none; absent from a snapshot counts as none), so each person
    is in exactly one (from, to) cell: d_in = 1."""
    later = _snapshot(dep, req.to_snapshot)
    earlier = _snapshot(dep, req.from_snapshot)
    if earlier.id >= later.id:
        raise InvalidInput("from_snapshot must be earlier than to_snapshot")
    if len(set(req.segments)) != len(req.segments):
        raise InvalidInput("a segment is named twice")
    policy, charged = _categories(dep, [earlier, later], req.segments)
    _marketer(policy, req.recipient)
    states = [*req.segments, NONE_STATE]
    keys: list[tuple[str, ...]] = [(a, b) for a in states for b in states]
    return ReleasePlan(
        "segment_movement",
        req.recipient,
        policy,
        req.segments,
        ["from", "to"],
        keys,
        1,
        policy.epsilon_per_release,
        later,
        dep.categories.content_hash,
        from_snapshot=earlier,
        charged=charged,
    )


def plan_lift(dep: Deployment, req: LiftRequest) -> ReleasePlan:
    """Arm sizes and conversions: [n_treatment, n_control, converted_treatment, converted_control].
    Nothing forces the arms to be disjoint, so one person may add 1 to all four: d_in = 4."""
    names = [req.treatment, req.control, req.conversion]
    if len(set(names)) != 3:
        raise InvalidInput("treatment, control and conversion must be three different segments")
    snap = _snapshot(dep)
    policy, charged = _categories(dep, [snap], names)
    _marketer(policy, req.recipient)
    keys: list[tuple[str, ...]] = [
        ("treatment", "size"),
        ("control", "size"),
        ("treatment", "converted"),
        ("control", "converted"),
    ]
    return ReleasePlan(
        "ab_lift",
        req.recipient,
        policy,
        names,
        ["arm", "measure"],
        keys,
        4,
        policy.epsilon_per_release,
        snap,
        dep.categories.content_hash,
        charged=charged,
    )
