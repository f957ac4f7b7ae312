"""The data schema segments and policies are checked against, derived from the ingest policy.

Profile attributes (after generalization) and event fields, each with its type and, where it has
one, its public domain. Core: both the category policies (their sensitivity tags name attributes,
event types and values) and the segment language read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from privseg.errors import InvalidInput
from privseg.policy.ingest import (
    AgeBandRule,
    BoolAttr,
    CategoryAttr,
    DateAttr,
    FloatAttr,
    IngestPolicy,
    IntAttr,
    ListAttr,
    NumberBandRule,
    StringAttr,
)

if TYPE_CHECKING:
    import polars as pl


@dataclass(frozen=True)
class FieldType:
    type: str  # category | list | bool | date | float | int | string
    values: tuple[str, ...] | None = None

    def dtype(self) -> pl.DataType:
        """How the store holds it."""
        import polars as pl  # here: reading policies needs the schema, not Polars

        return {
            "list": pl.List(pl.String),
            "bool": pl.Boolean(),
            "date": pl.Date(),
            "float": pl.Float64(),
            "int": pl.Int64(),
        }.get(self.type, pl.String())


@dataclass(frozen=True)
class Schema:
    profile: dict[str, FieldType]
    event_types: tuple[str, ...]
    event_fields: dict[str, FieldType]

    def breakdown_dimensions(self) -> dict[str, bool]:
        """Profile attributes, and whether each has a public single-valued domain (can be a key)."""
        return {name: ft.type in ("category", "bool") for name, ft in self.profile.items()}

    @classmethod
    def from_ingest_policy(cls, policy: IngestPolicy) -> Schema:
        profile: dict[str, FieldType] = {}
        for rule in policy.profiles.generalize.values():
            if isinstance(rule, AgeBandRule):
                profile[rule.to] = FieldType("category", rule.bands())
            elif isinstance(rule, NumberBandRule):
                profile[rule.to] = FieldType("category", rule.labels)
            else:
                profile[rule.to] = FieldType("category", tuple(sorted(set(rule.regions.values()))))
        for name, attr in policy.profiles.attributes.items():
            profile[name] = _field_type(attr)
        for name in policy.profiles.derived:
            profile[name] = FieldType("float")
        fields = {n: _field_type(a) for n, a in policy.events.attributes.items() if n != "event_type"}
        et = policy.events.attributes.get("event_type")
        if not isinstance(et, CategoryAttr):
            raise InvalidInput("the ingest policy must declare event_type as a category attribute")
        return cls(profile, et.values, fields)


def _field_type(attr: object) -> FieldType:
    if isinstance(attr, CategoryAttr):
        return FieldType("category", attr.values)
    if isinstance(attr, ListAttr):
        return FieldType("list", attr.values)
    if isinstance(attr, BoolAttr):
        return FieldType("bool")
    if isinstance(attr, DateAttr):
        return FieldType("date")
    if isinstance(attr, FloatAttr):
        return FieldType("float")
    if isinstance(attr, IntAttr):
        return FieldType("int")
    assert isinstance(attr, StringAttr)
    return FieldType("string")
