"""Generalization of quasi-identifiers at the door: birth dates or years to age bands, numbers to bands
on public edges, postal codes to regions. Values outside the rules are checks, never quoted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date

import polars as pl

from privseg.ingest.checks import Checks, source_text, typed_column
from privseg.policy.ingest import AgeBandRule, NumberBandRule, RegionRule

# Computes an expression once, as a working column, and returns a reference to it. Polars does not
# share a sub-expression used several times in one select: a band on six edges evaluated the parsed
# age seven times, and the checks twice more (3.7 s for a million birth dates; 0.3 s staged).
Stage = Callable[[str, pl.Expr], pl.Expr]


def age_band(name: str, rule: AgeBandRule, today: date, checks: Checks, stage: Stage) -> pl.Expr:
    text = stage(f"{name}\x00text", source_text(name))
    if rule.from_type == "date":
        born = stage(f"{name}\x00born", text.str.to_date("%Y-%m-%d", strict=False, cache=False))
        checks.add(text.is_not_null() & born.is_null(), name, "not a date in YYYY-MM-DD form")
        later_in_year = (born.dt.month().cast(pl.Int32) * 100 + born.dt.day().cast(pl.Int32)) > (
            today.month * 100 + today.day
        )
        age = (today.year - born.dt.year().cast(pl.Int32)) - later_in_year.cast(pl.Int32)
    elif rule.from_type == "year":
        year = text.cast(pl.Int32, strict=False)
        checks.add(text.is_not_null() & year.is_null(), name, "not a year (four digits)")
        age = today.year - year  # the age reached this year: at most one year more than the exact age
    else:
        age = text.cast(pl.Int32, strict=False)
        checks.add(text.is_not_null() & age.is_null(), name, "not a whole number of years")
    age = stage(f"{name}\x00age", age)
    outside = (age < 0) | (age > 120)
    if rule.out_of_range == "unknown":
        age = pl.when(outside).then(None).otherwise(age)
    else:
        checks.add(outside, name, "gives an age outside 0-120 years")
    return band(age, rule.edges, rule.bands())


def number_band(name: str, rule: NumberBandRule, checks: Checks, stage: Stage) -> pl.Expr:
    """The band of a number on public edges; blank is unknown (null), text that is no number an error."""
    text = stage(f"{name}\x00text", source_text(name))
    value = stage(f"{name}\x00number", text.cast(pl.Float64, strict=False))
    checks.add(text.is_not_null() & (value.is_null() | ~value.is_finite()), name, "not a number")
    return band(value, rule.edges, rule.labels)


def band(value: pl.Expr, edges: Sequence[float], labels: Sequence[str]) -> pl.Expr:
    """``labels[0]`` below ``edges[0]``, ``labels[i]`` in ``[edges[i-1], edges[i])``, ``labels[-1]`` from
    ``edges[-1]`` on; an unknown value stays unknown."""
    band: pl.Expr = pl.lit(labels[-1])
    for edge, label in reversed(list(zip(edges, labels[:-1], strict=True))):
        band = pl.when(value < edge).then(pl.lit(label)).otherwise(band)
    return pl.when(value.is_null()).then(pl.lit(None, dtype=pl.String)).otherwise(band)


def region(name: str, rule: RegionRule, checks: Checks) -> pl.Expr:
    text = source_text(name)
    region = text.str.slice(0, rule.prefix_length).replace_strict(rule.regions, default=None)
    checks.add(
        text.is_not_null() & pl.col(typed_column(name)).is_null(),
        name,
        "postal code prefix is not in the policy's region map",
    )
    return region
