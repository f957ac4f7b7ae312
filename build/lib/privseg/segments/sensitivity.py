"""Which sensitive data a definition reads: the basis of a segment's effective category.

The category policies tag data (``sensitive_data``: attributes, attribute values, event types,
event-field values). A leaf *reads* a tagged value when that value can change whether somebody is a
member:

- an event step reads every value of a tagged event field that its filter lets through: no filter
  on the field lets every value through, ``neq``/``not_in`` let through every value they do not
  name, ``eq``/``in`` only those they name. Polarity does not matter (``not`` of a leaf reads
  what the leaf reads);
- a property leaf on a single-valued attribute reads the values its condition admits; on a list
  attribute it reads the values whose presence can flip the condition (``contains: fitness`` does
  not read ``cannabis``, ``not contains: cannabis`` does);
- a trait reads what its source step reads; a bucket reads nothing (a keyed hash of the pseudonym).

Which values a condition admits is computed by evaluating the operator registry's own Polars
expression over the field's public domain, so this can never drift from what the engine computes.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import polars as pl

from privseg.policy.categories import CategorySet
from privseg.schema import FieldType, Schema
from privseg.segments import operators
from privseg.segments.language import Cond, Step
from privseg.segments.operators import AttrRef


@dataclass(frozen=True)
class Taint:
    """A read of a category's data: which category, where in the definition, and what was read."""

    category: str
    path: str
    what: str

    def describe(self) -> str:
        return f"{self.path} reads {self.category} data ({self.what})"


def admitted(cond: Cond, ft: FieldType) -> frozenset[str]:
    """The domain values whose presence can make ``cond`` true (or, for lists, flip it)."""
    return _admitted(cond.op, cond.value, ft)


@functools.lru_cache(maxsize=8192)
def _admitted(op: str, value: Any, ft: FieldType) -> frozenset[str]:
    # Cached: thousands of segments repeat a few hundred conditions, and each evaluation builds a frame.
    cond = Cond("x", op, value)
    domain = list(ft.values or ())
    if not domain:
        return frozenset()
    if ft.type == "list":
        # v is read when toggling it flips the outcome, against the empty list or the full list.
        lists = [[v] for v in domain] + [[u for u in domain if u != v] for v in domain] + [[], domain]
        frame = pl.DataFrame({"x": lists}, schema={"x": pl.List(pl.String)})
        out = frame.select(operators.build(cond.op, pl.col("x"), cond.value)).to_series().to_list()
        n = len(domain)
        empty, full = out[2 * n], out[2 * n + 1]
        return frozenset(v for i, v in enumerate(domain) if out[i] != empty or out[n + i] != full)
    frame = pl.DataFrame({"x": domain}, schema={"x": pl.String})
    out = frame.select(operators.build(cond.op, pl.col("x"), cond.value)).to_series().to_list()
    return frozenset(v for v, ok in zip(domain, out, strict=True) if ok)


class SensitivityIndex:
    """The category policies' tags, indexed for lookups while walking a definition."""

    def __init__(self, categories: CategorySet, schema: Schema) -> None:
        self.schema = schema
        self.attributes: dict[str, set[str]] = defaultdict(set)
        self.attribute_values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.event_types: dict[str, set[str]] = defaultdict(set)
        self.event_values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for name, policy in categories.categories.items():
            tags = policy.sensitive_data
            for attr in tags.attributes:
                self.attributes[attr].add(name)
            for attr, values in tags.attribute_values.items():
                for v in values:
                    self.attribute_values[attr][v].add(name)
            for etype in tags.event_types:
                self.event_types[etype].add(name)
            for field, values in tags.event_values.items():
                for v in values:
                    self.event_values[field][v].add(name)

    def property_reads(self, cond: Cond, path: str) -> list[Taint]:
        if isinstance(cond.value, AttrRef):
            # Comparing two attributes reads every value of both.
            return self.dimension_reads(cond.field, path) + self.dimension_reads(cond.value.name, path)
        return self._value_reads(cond, path)

    def _value_reads(self, cond: Cond, path: str) -> list[Taint]:
        out = [
            Taint(c, path, f"profile attribute {cond.field}")
            for c in sorted(self.attributes.get(cond.field, ()))
        ]
        tagged = self.attribute_values.get(cond.field)
        if tagged:
            ft = self.schema.profile[cond.field]
            for value in sorted(admitted(cond, ft) & set(tagged)):
                out += [Taint(c, path, f"{cond.field} may be {value!r}") for c in sorted(tagged[value])]
        return out

    def dimension_reads(self, dim: str, path: str) -> list[Taint]:
        """A breakdown by ``dim`` reads every value of it."""
        names = set(self.attributes.get(dim, ())) | {
            c for cats in self.attribute_values.get(dim, {}).values() for c in cats
        }
        return [Taint(c, path, f"every value of {dim}") for c in sorted(names)]

    def step_reads(self, step: Step, path: str) -> list[Taint]:
        out = [
            Taint(c, f"{path}.type", f"event type {step.type}")
            for c in sorted(self.event_types.get(step.type, ()))
        ]
        filters = {c.field: c for c in step.filters}
        for field, tagged in sorted(self.event_values.items()):
            cond = filters.get(field)
            if cond is None:
                values, where = set(tagged), f"{path} (no filter on {field})"
            else:
                values = set(admitted(cond, self.schema.event_fields[field])) & set(tagged)
                where = f"{path}.where.{field}"
            for value in sorted(values):
                out += [
                    Taint(c, where, f"{step.type} events with {field} {value!r}")
                    for c in sorted(tagged[value])
                ]
        return out
