"""Small frames and a one-call evaluator for segment tests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl

from privseg.policy.categories import CategorySet, SensitiveData
from privseg.policy.checks import load_categories
from privseg.policy.ingest import load_ingest_policy
from privseg.schema import Schema
from privseg.segments.compiler import Compiler
from privseg.segments.engine import evaluate
from privseg.segments.parser import Parser
from tests.conftest import POLICIES

AS_OF = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SCHEMA = Schema.from_ingest_policy(load_ingest_policy(POLICIES / "ingest.yaml"))
CATEGORIES = load_categories(POLICIES, SCHEMA)
# The shipped policies without their sensitivity tags: operator and engine tests check evaluation
# semantics under a declared category alone (the derived categories have their own tests).
UNTAGGED = CategorySet(
    {n: p.model_copy(update={"sensitive_data": SensitiveData()}) for n, p in CATEGORIES.categories.items()},
    "untagged",
)
PROFILE_SCHEMA = {
    "pid": pl.String,
    "age_band": pl.String,
    "region": pl.String,
    "gender": pl.String,
    "income_band": pl.String,
    "interests": pl.List(pl.String),
    "consent_marketing": pl.Boolean,
    "consent_sensitive": pl.Boolean,
    "signup_date": pl.Date,
}
EVENT_SCHEMA = {
    "pid": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "event_type": pl.String,
    "product_category": pl.String,
    "value": pl.Float64,
    "campaign": pl.String,
    "variant": pl.String,
}


def profiles(people: dict[str, dict[str, Any]]) -> pl.DataFrame:
    rows = []
    for pid, attrs in people.items():
        row: dict[str, Any] = {"pid": pid, "consent_marketing": True, "consent_sensitive": True}
        row.update(attrs)
        rows.append(row)
    return pl.DataFrame(rows, schema=PROFILE_SCHEMA)


def events(rows: list[tuple[str, timedelta | datetime, str, dict[str, Any]]]) -> pl.DataFrame:
    """(pid, how long before AS_OF or an absolute time, event type, other fields)."""
    out = []
    for pid, when, etype, fields in rows:
        ts = AS_OF - when if isinstance(when, timedelta) else when
        out.append({"pid": pid, "ts": ts, "event_type": etype, **fields})
    return pl.DataFrame(out, schema=EVENT_SCHEMA)


def segment(where: Any, sid: str = "s", category: str = "general") -> dict[str, Any]:
    return {"id": sid, "category": category, "objective": "performance", "where": where}


def compiler(
    segments: list[dict[str, Any]],
    traits: list[dict[str, Any]] = (),  # type: ignore[assignment]
    categories: CategorySet = UNTAGGED,
) -> Compiler:
    parser = Parser(SCHEMA, set(categories.categories))
    segs = {d["id"]: parser.segment(d, f"test {d['id']}") for d in segments}
    trs = {d["name"]: parser.trait(d, f"test {d['name']}") for d in traits}
    return Compiler(schema=SCHEMA, categories=categories, segments=segs, traits=trs)


def members(
    where: Any,
    prof: pl.DataFrame,
    ev: pl.DataFrame | None = None,
    *,
    traits: list[dict[str, Any]] = (),  # type: ignore[assignment]
    others: list[dict[str, Any]] = (),  # type: ignore[assignment]
    category: str = "general",
    as_of: datetime = AS_OF,
) -> set[str]:
    ev = ev if ev is not None else pl.DataFrame(schema=EVENT_SCHEMA)
    comp = compiler([segment(where, category=category), *others], traits)
    result, _ = evaluate(comp.compile(as_of), profiles=prof, events=ev)
    return set(result.filter(pl.col("s")).get_column("pid").to_list())


D = timedelta(days=1)
S = timedelta(seconds=1)
TODAY = date(2026, 6, 1)
