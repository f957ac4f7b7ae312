"""DP personas: k behavioural centers found by differentially private k-means (Lloyd iterations with
noisy counts and noisy clipped sums per cluster) over per-person features the marketer picks.

Features are event aggregates of the segment language (count or sum of a step's events in a window),
clipped to public bounds [min, max] the request states and scaled to [0, 1]: the bounds are public, so
scaling reveals nothing. The starting centers are fixed points of the unit cube (from the public k and
seed, never from data). Each of the ``iterations`` rounds assigns every member of the segment to the
nearest current center (public: the previous round's noisy output) and releases two vectors:

- the people per cluster: a person is in one cluster, d_in = 1;
- the sum of each cluster's scaled features, in units of 1/RESOLUTION: a person adds at most
  RESOLUTION to each of the d coordinates of one cluster, d_in = d x RESOLUTION.

Each round gets epsilon / iterations, split evenly between its two vectors: the whole release costs the
charged epsilon by basic composition over the 2 x iterations vectors, each noised exactly once (the
engine's adaptive path refuses a second draw). New centers are noisy sum / noisy count, clipped to the
cube (post-processing). The released object is the last round's centers, in the features' own units,
with their noisy sizes; a center whose noisy size is below the minimum cohort size is suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from privseg.errors import InvalidInput
from privseg.release import data, scope
from privseg.release.context import ReleaseContext
from privseg.release.models import Released
from privseg.release.plan import ReleasePlan, Vector
from privseg.release.registry import NoiseFn, Noisy, ReleaseKind, ReleaseRequest, register
from privseg.segments.feature_kinds import window_mask
from privseg.segments.language import Step, Window
from privseg.segments.parser import Parser

RESOLUTION = 1000  # scaled features are summed in thousandths (OpenDP's discrete Laplace is on integers)


class PersonaFeature(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$", description="A label for the feature.")
    event: dict[str, Any] = Field(
        description="The events aggregated, as in the segment language: type, where, and a window "
        "(last / between / from+to), e.g. {'type': 'purchase', 'last': '365d'}."
    )
    measure: Literal["count", "sum"] = Field(description="count of the events, or sum of their value.")
    min: float = Field(description="Public lower bound: smaller values are clipped to it.")
    max: float = Field(description="Public upper bound: larger values are clipped to it.")

    @model_validator(mode="after")
    def _bounds(self) -> PersonaFeature:
        if not self.min < self.max:
            raise ValueError("min must be below max")
        return self


class PersonaRequest(ReleaseRequest):
    segment: str = Field(description="Whose behaviour: the segment's members in the latest snapshot.")
    features: list[PersonaFeature] = Field(min_length=1, max_length=6)
    k: int = Field(4, ge=2, le=8, description="How many personas.")
    iterations: int = Field(5, ge=1, le=10, description="Lloyd rounds (each costs epsilon / iterations).")
    seed: int = Field(0, ge=0, le=2**31, description="Picks the data-independent starting centers.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "segment": "frequent_buyers",
                    "features": [
                        {
                            "name": "orders",
                            "event": {"type": "purchase", "last": "365d"},
                            "measure": "count",
                            "min": 0,
                            "max": 30,
                        },
                        {
                            "name": "visits",
                            "event": {"type": "page_view", "last": "90d"},
                            "measure": "count",
                            "min": 0,
                            "max": 60,
                        },
                    ],
                    "k": 3,
                }
            ]
        }
    )


class Persona(BaseModel):
    persona: int
    size: int | None = Field(description="Noisy members (null: suppressed, below the minimum cohort size).")
    center: dict[str, float] | None = Field(description="Feature -> value, in the feature's own units.")


class Personas(Released):
    features: list[str]
    feature_specs: list[PersonaFeature] = Field(
        description="The features as requested; `persona: {release: N, is: J}` in a segment uses them."
    )
    personas: list[Persona]
    note: str


@dataclass(frozen=True, kw_only=True)
class PersonaPlan(ReleasePlan):
    steps: tuple[tuple[Step, Window, str], ...]  # per feature: events, window, measure
    specs: tuple[dict[str, Any], ...]  # the features as requested (a persona leaf is filled from them)
    names: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]
    k: int
    iterations: int
    seed: int

    def identity(self) -> dict[str, Any]:
        return {
            "features": repr((self.steps, self.bounds, self.names)),
            "k": self.k,
            "it": self.iterations,
            "seed": self.seed,
        }

    def details(self) -> dict[str, Any]:
        return {
            "features": list(self.names),
            "feature_specs": list(self.specs),
            "k": self.k,
            "iterations": self.iterations,
        }


def plan(ctx: ReleaseContext, req: PersonaRequest, recipient: str) -> PersonaPlan:
    snap = scope.snapshot(ctx)
    parser = Parser(ctx.schema, set(ctx.categories.categories))
    scope.distinct([f.name for f in req.features], "a feature name is used twice")
    steps = []
    for i, f in enumerate(req.features):
        path = f"features[{i}].event"
        event = {k: v for k, v in f.event.items() if k in ("type", "where")}
        window = parser.window(f.event, path)
        unknown = set(f.event) - {"type", "where", "last", "between", "from", "to"}
        if unknown:
            raise InvalidInput(f"{path}: unknown key(s) {sorted(unknown)}")
        steps.append((parser.step(event, path), window, f.measure))
    policy, charged = scope.categories(ctx, [snap], [req.segment], steps=[s for s, _w, _m in steps])
    scope.marketer(policy, recipient)
    d, eps = len(steps), policy.epsilon_per_release
    share = eps / (2 * req.iterations)
    vectors = tuple(
        v
        for i in range(req.iterations)
        for v in (Vector(f"counts_{i}", 1, share), Vector(f"sums_{i}", d * RESOLUTION, share))
    )
    return PersonaPlan(
        kind=KIND.name,
        recipient=recipient,
        policy=policy,
        charged=charged,
        segments=[req.segment],
        breakdown=[],
        keys=[(str(j),) for j in range(req.k)],
        snapshot=snap,
        policy_hash=ctx.categories.content_hash,
        vectors=vectors,
        steps=tuple(steps),
        specs=tuple(f.model_dump() for f in req.features),
        names=tuple(f.name for f in req.features),
        bounds=tuple((f.min, f.max) for f in req.features),
        k=req.k,
        iterations=req.iterations,
        seed=req.seed,
    )


def scaled_features(ctx: ReleaseContext, plan: PersonaPlan) -> np.ndarray:
    """Members x features, clipped to the public bounds and scaled to [0, 1]."""
    (sid,) = plan.segments
    as_of = datetime.fromisoformat(plan.snapshot.as_of)
    population = data.memberships(ctx, plan.snapshot).filter(pl.col(sid)).select("pid").collect()
    columns = []
    for i, (step, window, measure) in enumerate(plan.steps):
        # pl.len(), not pl.lit(1).sum(): a literal does not broadcast inside group_by().agg().
        value = pl.len() if measure == "count" else pl.col("value").fill_null(0).sum()
        events = data.step_events(ctx, step)
        if events is None:
            per_person = pl.DataFrame(schema={"pid": pl.String, "x": pl.Float64})
        else:
            per_person = (
                events.filter((pl.col("ts") <= as_of) & window_mask(window, as_of, pl.col("ts")))
                .group_by("pid")
                .agg(value.cast(pl.Float64).alias("x"))
                .collect()
            )
        lo, hi = plan.bounds[i]
        column = population.join(per_person, on="pid", how="left").get_column("x").fill_null(0.0)
        columns.append(((column.clip(lo, hi) - lo) / (hi - lo)).to_numpy())
    return np.column_stack(columns) if columns else np.zeros((population.height, 0))


def initial_centers(k: int, d: int, seed: int) -> np.ndarray:
    """Data-independent starting centers inside the unit cube (public: from k, d and the seed)."""
    return np.random.default_rng(seed).uniform(0.15, 0.85, size=(k, d))


def lloyd(
    x: np.ndarray, centers: np.ndarray, iterations: int, noise: NoiseFn
) -> tuple[np.ndarray, list[int]]:
    """DP k-means on scaled features ``x``: per round, noisy counts and noisy sums per cluster, each
    vector drawn once through ``noise``. Returns the last centers and the last round's noisy sizes."""
    k, d = centers.shape
    sizes = [0] * k
    for i in range(iterations):
        nearest = (
            ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
            if len(x)
            else np.array([], int)
        )
        counts = np.bincount(nearest, minlength=k).astype(int)
        sums = np.zeros((k, d))
        np.add.at(sums, nearest, x)
        sizes = noise(f"counts_{i}", [int(c) for c in counts])
        noisy_sums = np.array(
            noise(f"sums_{i}", [int(v) for v in np.rint(sums * RESOLUTION).ravel()]), dtype=float
        )
        noisy_sums = noisy_sums.reshape(k, d) / RESOLUTION
        for j in range(k):
            if sizes[j] > 0:  # post-processing: an empty or noise-dominated cluster keeps its center
                centers[j] = np.clip(noisy_sums[j] / sizes[j], 0.0, 1.0)
    return centers, sizes


def adaptive(ctx: ReleaseContext, plan: PersonaPlan, noise: NoiseFn) -> dict[str, Any]:
    x = scaled_features(ctx, plan)
    centers, sizes = lloyd(x, initial_centers(plan.k, len(plan.steps), plan.seed), plan.iterations, noise)
    return {"centers": centers.tolist(), "sizes": sizes}


def result(plan: PersonaPlan, noisy: Noisy) -> dict[str, Any]:
    floor = plan.policy.min_cohort_size
    centers = np.array(noisy["centers"], dtype=float)
    personas: list[dict[str, Any]] = []
    for j, size in enumerate(noisy["sizes"]):
        if size < floor:
            personas.append({"persona": j, "size": None, "center": None})
            continue
        center = {
            name: lo + float(centers[j][i]) * (hi - lo)
            for i, (name, (lo, hi)) in enumerate(zip(plan.names, plan.bounds, strict=True))
        }
        personas.append({"persona": j, "size": int(size), "center": center})
    return {
        "features": list(plan.names),
        "personas": personas,
        "note": f"personas with a noisy size below {floor} are suppressed; centers are in the features' "
        "units, clipped to the stated bounds",
    }


def _no_exact(_ctx: ReleaseContext, _plan: PersonaPlan) -> dict[str, list[int]]:
    raise TypeError("persona releases are adaptive: the engine runs them through `adaptive`")


def text(r: dict[str, Any]) -> list[str]:
    lines = []
    for p in r["personas"]:
        if p["center"] is None:
            lines.append(f"  persona {p['persona']}: suppressed")
            continue
        center = ", ".join(f"{k} {v:.2f}" for k, v in p["center"].items())
        lines.append(f"  persona {p['persona']}: {p['size']:>8} people  ({center})")
    return lines


KIND = register(
    ReleaseKind(
        name="personas",
        route="/reports/personas",
        summary="DP personas: k behavioural centers by DP k-means, with their noisy sizes.",
        request=PersonaRequest,
        response=Personas,
        recipient="marketer",
        plan=plan,
        exact=_no_exact,
        result=result,
        text=text,
        adaptive=adaptive,
    )
)
