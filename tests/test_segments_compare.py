"""Comparing two attributes of the same person (``{gt: {attribute: other}}``), checked against a
pure-Python reading on generated profiles."""

from __future__ import annotations

import operator
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privseg.schema import FieldType, Schema
from privseg.segments.compiler import Compiler
from privseg.segments.engine import evaluate
from privseg.segments.language import DefinitionError
from privseg.segments.parser import Parser
from tests.segment_helpers import AS_OF, CATEGORIES, UNTAGGED, events

SCHEMA = Schema(
    profile={
        "web": FieldType("int"),
        "store": FieldType("int"),
        "spend": FieldType("float"),
        "tier": FieldType("category", ("a", "b")),
        "old_tier": FieldType("category", ("a", "b")),
        "signup_date": FieldType("date"),
        "consent_marketing": FieldType("bool"),
    },
    event_types=("purchase",),
    event_fields={},
)
PY = {
    "eq": operator.eq,
    "neq": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def _compile(where: Any, schema: Schema = SCHEMA) -> Compiler:
    seg = {"id": "s", "objective": "brand", "where": where}
    parsed = Parser(schema, set(UNTAGGED.categories)).segment(seg, "test")
    return Compiler(schema=schema, categories=UNTAGGED, segments={"s": parsed}, traits={})


people = st.lists(
    st.fixed_dictionaries(
        {
            "web": st.one_of(st.none(), st.integers(0, 5)),
            "store": st.one_of(st.none(), st.integers(0, 5)),
            "spend": st.one_of(st.none(), st.sampled_from([0.0, 2.5, 5.0])),
            "tier": st.one_of(st.none(), st.sampled_from(["a", "b"])),
            "old_tier": st.one_of(st.none(), st.sampled_from(["a", "b"])),
        }
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=people,
    pair=st.sampled_from([("web", "store"), ("web", "spend"), ("spend", "store"), ("tier", "old_tier")]),
    op=st.sampled_from(sorted(PY)),
    negate=st.booleans(),
)
def test_attribute_comparison_equals_the_reference(
    rows: list[dict[str, Any]], pair: tuple[str, str], op: str, negate: bool
) -> None:
    left, right = pair
    if left == "tier" and op not in ("eq", "neq"):
        op = "eq"
    leaf: dict[str, Any] = {"property": {left: {op: {"attribute": right}}}}
    where = {"not": leaf} if negate else leaf
    frame = pl.DataFrame(
        [{"pid": f"p{i}", **r, "consent_marketing": True} for i, r in enumerate(rows)],
        schema={
            "pid": pl.String,
            "web": pl.Int64,
            "store": pl.Int64,
            "spend": pl.Float64,
            "tier": pl.String,
            "old_tier": pl.String,
            "consent_marketing": pl.Boolean,
        },
    )
    out, _ = evaluate(_compile(where).compile(AS_OF), profiles=frame, events=events([]))
    got = set(out.filter(pl.col("s")).get_column("pid"))

    def holds(r: dict[str, Any]) -> bool:
        a, b = r[left], r[right]
        inside = a is not None and b is not None and PY[op](a, b)  # unknown on either side: false
        return not inside if negate else inside

    assert got == {f"p{i}" for i, r in enumerate(rows) if holds(r)}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"web": {"gt": {"attribute": "nope"}}}, "unknown profile attribute"),
        ({"web": {"gt": {"attribute": "tier"}}}, "cannot compare int 'web' with category 'tier'"),
        ({"tier": {"gt": {"attribute": "old_tier"}}}, "operator 'gt' does not apply to category field"),
        ({"web": {"in": [{"attribute": "store"}]}}, "expected a number"),
        ({"web": {"gt": {"attribute": "store", "x": 1}}}, "unknown key"),
    ],
)
def test_bad_comparisons_name_the_path(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        _compile({"property": spec})


def test_an_event_filter_cannot_name_a_profile_attribute() -> None:
    schema = Schema(
        profile=SCHEMA.profile,
        event_types=("purchase",),
        event_fields={"value": FieldType("float")},
    )
    with pytest.raises(DefinitionError, match="expected a number"):
        _compile({"event": {"type": "purchase", "where": {"value": {"gt": {"attribute": "spend"}}}}}, schema)


def test_comparing_with_a_tagged_attribute_reads_all_of_its_values() -> None:
    from privseg.segments.language import Cond
    from privseg.segments.operators import AttrRef
    from privseg.segments.sensitivity import SensitivityIndex
    from tests.segment_helpers import SCHEMA as SHIPPED
    from tests.segment_helpers import compiler, segment

    index = SensitivityIndex(CATEGORIES, SHIPPED)
    reads = index.property_reads(Cond("gender", "eq", AttrRef("interests")), "where.property.gender")
    assert sorted(t.category for t in reads) == ["cannabis", "hearing_aids", "sexual_health"]
    with pytest.raises(DefinitionError, match="different domains"):
        compiler([segment({"property": {"gender": {"neq": {"attribute": "income_band"}}}})])


def test_a_comparison_explains_itself() -> None:
    assert "web is more than their store" in _compile(
        {"property": {"web": {"gt": {"attribute": "store"}}}}
    ).explain("s")
