"""The per-person features segments are built from (aggregates, last times, sequences, buckets): what
they are and how they are named, so that equal features are computed once. features.py computes them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from privseg.segments.language import Step, Window


@dataclass(frozen=True)
class AggFeature:
    """count / sum / avg / min / max of ``value`` over a step's events in a window.

    count and sum are 0 for a person with no such events; avg, min and max are unknown (null)."""

    step: Step
    window: Window
    measure: str


@dataclass(frozen=True)
class LastFeature:
    """Time of the person's last event of a step (up to as_of), or null."""

    step: Step


@dataclass(frozen=True)
class SeqFeature:
    first: Step
    then: Step
    within: timedelta
    window: Window


@dataclass(frozen=True)
class BucketFeature:
    salt: str


Feature = AggFeature | LastFeature | SeqFeature | BucketFeature


def feature_name(feature: Feature) -> str:
    # repr of frozen dataclasses of tuples, strings, numbers and dates is deterministic.
    return "f_" + hashlib.sha256(repr(feature).encode()).hexdigest()[:16]


def window_mask(window: Window, as_of: datetime, ts: pl.Expr) -> pl.Expr:
    """Events of the window (see language.py for the edges); every feature already drops ts > as_of."""
    if window.kind == "all":
        # Not pl.lit(True): inside group_by().agg() a literal does not broadcast, so its sum() is 1
        # per group instead of the number of events (found by the property test).
        return ts.is_not_null()
    if window.kind == "last":
        assert isinstance(window.start, timedelta)
        return ts >= as_of - window.start
    if window.kind == "between":
        assert isinstance(window.start, timedelta) and isinstance(window.end, timedelta)
        return (ts >= as_of - window.start) & (ts < as_of - window.end)
    assert isinstance(window.start, datetime) and isinstance(window.end, datetime)
    return (ts >= window.start) & (ts < window.end)
