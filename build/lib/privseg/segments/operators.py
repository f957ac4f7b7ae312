"""The operator registry: one row per operator, each knowing how to build its Polars expression,
which attribute types it applies to, what value it takes, and how to say itself in words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

ValueKind = Literal["scalar", "list", "pair", "flag"]
NUMERIC = frozenset({"float", "int", "number"})
SCALAR = frozenset({"category", "string", "bool", "date"}) | NUMERIC
ORDERED = frozenset({"date"}) | NUMERIC


@dataclass(frozen=True)
class Operator:
    name: str
    value: ValueKind
    types: frozenset[str]
    build: Callable[[pl.Expr, Any], pl.Expr]
    words: Callable[[str, Any], str]


@dataclass(frozen=True)
class AttrRef:
    """The value of another profile attribute of the same person, in place of a constant
    (``{gt: {attribute: num_store_purchases}}``)."""

    name: str


COMPARABLE = frozenset({"eq", "neq", "gt", "gte", "lt", "lte"})  # the operators that take an AttrRef


def _fmt(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, AttrRef):
        return f"their {v.name}"
    return str(v)


OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in (
        Operator("eq", "scalar", SCALAR, lambda c, v: c == v, lambda f, v: f"{f} is {_fmt(v)}"),
        Operator("neq", "scalar", SCALAR, lambda c, v: c != v, lambda f, v: f"{f} is not {_fmt(v)}"),
        Operator(
            "in",
            "list",
            SCALAR - {"bool"},
            lambda c, v: c.is_in(list(v)),
            lambda f, v: f"{f} is one of {_fmt(v)}",
        ),
        Operator(
            "not_in",
            "list",
            SCALAR - {"bool"},
            lambda c, v: ~c.is_in(list(v)),
            lambda f, v: f"{f} is none of {_fmt(v)}",
        ),
        Operator(
            "not_in_or_unknown",
            "list",
            SCALAR - {"bool"},
            # Unknown passes: e.g. events with no product category are not any stigmatized category's
            # data, so a general segment can keep them while excluding every tagged value.
            lambda c, v: (~c.is_in(list(v))).fill_null(True),
            lambda f, v: f"{f} is none of {_fmt(v)} (or unknown)",
        ),
        Operator("gt", "scalar", ORDERED, lambda c, v: c > v, lambda f, v: f"{f} is more than {_fmt(v)}"),
        Operator("gte", "scalar", ORDERED, lambda c, v: c >= v, lambda f, v: f"{f} is at least {_fmt(v)}"),
        Operator("lt", "scalar", ORDERED, lambda c, v: c < v, lambda f, v: f"{f} is less than {_fmt(v)}"),
        Operator("lte", "scalar", ORDERED, lambda c, v: c <= v, lambda f, v: f"{f} is at most {_fmt(v)}"),
        Operator(
            "between",
            "pair",
            ORDERED,
            lambda c, v: c.is_between(v[0], v[1], closed="both"),
            lambda f, v: f"{f} is between {_fmt(v[0])} and {_fmt(v[1])} (inclusive)",
        ),
        Operator(
            "contains",
            "scalar",
            frozenset({"list"}),
            lambda c, v: c.list.contains(v),
            lambda f, v: f"{f} include {_fmt(v)}",
        ),
        Operator(
            "is_set", "flag", SCALAR | {"list"}, lambda c, v: c.is_not_null(), lambda f, v: f"{f} is known"
        ),
        Operator(
            "is_null", "flag", SCALAR | {"list"}, lambda c, v: c.is_null(), lambda f, v: f"{f} is unknown"
        ),
    )
}


def build(op: str, column: pl.Expr, value: Any) -> pl.Expr:
    """The leaf's boolean expression. A missing value satisfies no comparison (only ``is_null``), so
    null becomes false here and ``not`` of a leaf is exactly its complement. An :class:`AttrRef`
    compares with the person's other attribute (unknown on either side: false)."""
    operand = pl.col(value.name) if isinstance(value, AttrRef) else value
    return OPERATORS[op].build(column, operand).fill_null(False)
