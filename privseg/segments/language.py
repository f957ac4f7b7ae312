"""The segment language: definitions as data (YAML or JSON), parsed into a typed tree.

A definition::

    id: cart_abandoners_7d
    description: Added to cart in the last 7 days and did not buy
    category: general            # optional: a file in policies/categories/ (or a list of them)
    objective: performance       # or brand
    where:
      all:
        - event: {type: add_to_cart, last: 7d}
        - not: {event: {type: purchase, last: 7d}}

Nodes: ``all`` / ``any`` (lists), ``not`` (one node), and leaves:

- ``property: {age_band: {in: [55-64, 65+]}}`` -- one profile attribute and one operator; the value
  may be another attribute of the same person: ``{num_web_purchases: {gt: {attribute: num_store}}}``;
- ``event: {type, where?, <window>?, count|sum|avg|min|max: {op: value}}`` -- events of a type,
  filtered on event fields, aggregated over a window (default ``count: {gte: 1}``). Sums of no
  events are 0; avg/min/max of no events are unknown, so they satisfy no comparison;
- ``recency: {type, where?, within: 30d}`` or ``{type, where?, not_within: 180d}``;
- ``sequence: {steps: [{type, where?}, {type, where?}], within: 1d, <window>?}`` -- some event of the
  first step followed, at the same instant or later and at most ``within`` after it, by the second;
- ``trait: {rfm_recency: {gte: 4}}`` -- a named computed trait (see :class:`TraitDef`);
- ``segment: other_id`` -- membership of another segment (cycles are refused);
- ``bucket: {salt: spring_test, range: [0, 999]}`` -- deterministic bucket 0..9999 of the pseudonym.

Windows, against an explicit ``as_of`` (no event after ``as_of`` ever counts):
``last: 7d`` is ``as_of - 7d <= ts <= as_of`` (both ends inclusive); ``between: [90d, 30d]`` is
``as_of - 90d <= ts < as_of - 30d`` (start inclusive, end exclusive, so it tiles with ``last: 30d``);
``from: T1, to: T2`` is ``T1 <= ts < T2``. No window: every event up to ``as_of``.
Durations: a whole number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w``; at most 100 years.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from privseg.errors import InvalidInput

ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MEASURES = ("count", "sum", "avg", "min", "max")
BUCKETS = 10_000


# -- the tree ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cond:
    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class Window:
    kind: Literal["all", "last", "between", "absolute"]
    start: timedelta | datetime | None = None  # last/between: how long before as_of; absolute: a time
    end: timedelta | datetime | None = None


@dataclass(frozen=True)
class Step:
    type: str
    filters: tuple[Cond, ...]


@dataclass(frozen=True)
class All:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class PropertyLeaf:
    cond: Cond


@dataclass(frozen=True)
class EventLeaf:
    step: Step
    window: Window
    measure: str
    op: str
    value: Any


@dataclass(frozen=True)
class RecencyLeaf:
    step: Step
    within: timedelta
    negate: bool


@dataclass(frozen=True)
class SequenceLeaf:
    first: Step
    then: Step
    within: timedelta
    window: Window


@dataclass(frozen=True)
class TraitLeaf:
    name: str
    op: str
    value: Any


@dataclass(frozen=True)
class SegmentRef:
    id: str


@dataclass(frozen=True)
class BucketLeaf:
    salt: str
    low: int
    high: int


@dataclass(frozen=True)
class PersonaFeature:
    """An event aggregate clipped to [low, high] and scaled to [0, 1] (as the persona release did)."""

    step: Step
    window: Window
    measure: str  # count or sum
    low: float
    high: float


@dataclass(frozen=True)
class PersonaLeaf:
    """Nearest released persona center is ``target`` (ties go to the lower index, as in the release);
    suppressed personas (None) are no one's nearest."""

    features: tuple[PersonaFeature, ...]
    centers: tuple[tuple[float, ...] | None, ...]  # in the features' own units
    target: int
    release: int | None


Node = (
    All
    | AnyOf
    | Not
    | PropertyLeaf
    | EventLeaf
    | RecencyLeaf
    | SequenceLeaf
    | TraitLeaf
    | SegmentRef
    | BucketLeaf
    | PersonaLeaf
)


@dataclass(frozen=True)
class SegmentDef:
    id: str
    description: str
    declared: tuple[str, ...]  # the author's categories (may be empty); the effective ones are derived
    objective: Literal["performance", "brand"]
    root: Node


@dataclass(frozen=True)
class TraitSource:
    kind: Literal["days_since", "count", "sum", "avg", "min", "max"]
    step: Step
    window: Window


@dataclass(frozen=True)
class TraitDef:
    """A named per-person score on public, fixed bin edges (never quantiles of the data: edges taken
    from the data would leak it). ``value < edges[0]`` scores ``scores[0]``, ``edges[i-1] <= value <
    edges[i]`` scores ``scores[i]``, ``value >= edges[-1]`` scores ``scores[-1]``; unknown scores
    ``missing``."""

    name: str
    description: str
    source: TraitSource
    edges: tuple[float, ...]
    scores: tuple[int, ...]
    missing: int


# -- parsing -------------------------------------------------------------------------------------
class DefinitionError(InvalidInput):
    """A segment or trait definition is invalid; the message names the path inside it."""

    code = "invalid-definition"
