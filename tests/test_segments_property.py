"""Property test: the compiled Polars evaluation equals a straightforward pure-Python reading of the
same definition, on random small data. The reference below shares no code with the engine."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.segment_helpers import AS_OF, D, S, events, members, profiles

TYPES = ["purchase", "page_view", "add_to_cart"]
CATS = ["electronics", "hearing_aids", None]
OFFSETS = [timedelta(0), S, D, 7 * D, 7 * D + S, 30 * D, 30 * D + S, 100 * D, -S]
WINDOWS: list[dict[str, Any]] = [{}, {"last": "7d"}, {"last": "30d"}, {"between": ["30d", "7d"]}]

person = st.fixed_dictionaries(
    {
        "gender": st.sampled_from(["female", "male", None]),
        "age_band": st.sampled_from(["25-34", "55-64", None]),
        "interests": st.sampled_from([None, [], ["travel"], ["travel", "hearing_aids"]]),
        "consent_marketing": st.sampled_from([True, True, False, None]),
    }
)
event = st.tuples(
    st.integers(0, 5),
    st.sampled_from(OFFSETS),
    st.sampled_from(TYPES),
    st.fixed_dictionaries(
        {"product_category": st.sampled_from(CATS), "value": st.sampled_from([None, 0.0, 5.0, 20.0])}
    ),
)

prop_leaf = st.one_of(
    st.builds(lambda v: {"property": {"gender": {"eq": v}}}, st.sampled_from(["female", "male"])),
    st.builds(lambda v: {"property": {"gender": {"neq": v}}}, st.sampled_from(["female", "male"])),
    st.just({"property": {"gender": {"is_null": True}}}),
    st.just({"property": {"age_band": {"in": ["55-64", "65+"]}}}),
    st.just({"property": {"interests": {"contains": "hearing_aids"}}}),
)


def _event_leaf(
    t: str, cat: str | None, window: dict[str, Any], measure: str, op: str, value: int
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": t, **window, measure: {op: value}}
    if cat is not None:
        spec["where"] = {"product_category": {"eq": cat}}
    return {"event": spec}


event_leaf = st.builds(
    _event_leaf,
    st.sampled_from(TYPES),
    st.sampled_from(["electronics", "hearing_aids", None]),
    st.sampled_from(WINDOWS),
    st.sampled_from(["count", "sum", "avg", "min", "max"]),
    st.sampled_from(["gte", "lte", "eq"]),
    st.sampled_from([0, 1, 2, 5, 20]),
)
recency_leaf = st.builds(
    lambda t, mode, d: {"recency": {"type": t, mode: d}},
    st.sampled_from(TYPES),
    st.sampled_from(["within", "not_within"]),
    st.sampled_from(["1d", "7d", "30d"]),
)
tree = st.recursive(
    st.one_of(prop_leaf, event_leaf, recency_leaf),
    lambda kids: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, kids),
    ),
    max_leaves=6,
)

DURATION = {"1d": D, "7d": 7 * D, "30d": 30 * D}


def _in_window(ts: datetime, window: dict[str, Any]) -> bool:
    if ts > AS_OF:
        return False
    if "last" in window:
        return ts >= AS_OF - DURATION[window["last"]]
    if "between" in window:
        old, new = (DURATION[x] for x in window["between"])
        return AS_OF - old <= ts < AS_OF - new
    return True


def _compare(value: Any, op: str, target: Any) -> bool:
    if value is None:
        return False
    return {"gte": value >= target, "lte": value <= target, "eq": value == target}[op]


def reference(
    node: dict[str, Any], attrs: dict[str, Any], evs: list[tuple[datetime, str, dict[str, Any]]]
) -> bool:
    ((key, body),) = node.items()
    if key == "all":
        return all(reference(c, attrs, evs) for c in body)
    if key == "any":
        return any(reference(c, attrs, evs) for c in body)
    if key == "not":
        return not reference(body, attrs, evs)
    if key == "property":
        ((field, cond),) = body.items()
        ((op, target),) = cond.items()
        v = attrs.get(field)
        if op == "is_null":
            return v is None
        if v is None:
            return False
        if op == "eq":
            return v == target
        if op == "neq":
            return v != target
        if op == "in":
            return v in target
        assert op == "contains"
        return target in v
    if key == "event":
        cat = body.get("where", {}).get("product_category", {}).get("eq")
        window = {k: body[k] for k in ("last", "between") if k in body}
        chosen = [
            f
            for ts, t, f in evs
            if t == body["type"]
            and _in_window(ts, window)
            and (cat is None or f.get("product_category") == cat)
        ]
        measure = next(m for m in ("count", "sum", "avg", "min", "max") if m in body)
        ((op, target),) = body[measure].items()
        values = [f["value"] for f in chosen if f.get("value") is not None]
        got = {
            "count": len(chosen),
            "sum": sum(values),
            "avg": sum(values) / len(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
        }[measure]
        return _compare(got, op, target)
    assert key == "recency"
    mode = "within" if "within" in body else "not_within"
    recent = any(t == body["type"] and AS_OF - DURATION[body[mode]] <= ts <= AS_OF for ts, t, _ in evs)
    return recent if mode == "within" else not recent


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(person, min_size=1, max_size=5), st.lists(event, max_size=15), tree)
def test_compiled_segments_equal_the_reference(
    people: list[dict[str, Any]], evs: list[Any], where: dict[str, Any]
) -> None:
    prof = profiles({f"p{i}": attrs for i, attrs in enumerate(people)})
    ev_rows = [(f"p{owner}", off, t, fields) for owner, off, t, fields in evs]
    assert members(where, prof, events(ev_rows)) == _expected(people, ev_rows, where)


def _expected(people: list[dict[str, Any]], ev_rows: list[Any], where: dict[str, Any]) -> set[str]:
    everyone = {f"p{i}" for i in range(len(people))} | {r[0] for r in ev_rows}
    out = set()
    for pid in everyone:
        i = int(pid[1:])
        attrs = people[i] if i < len(people) else {}
        mine = [(AS_OF - off, t, f) for owner, off, t, f in ev_rows if owner == pid]
        if attrs.get("consent_marketing") is True and reference(where, attrs, mine):
            out.add(pid)
    return out


ME = {"gender": None, "age_band": None, "interests": None, "consent_marketing": True}
NOCAT = {"product_category": None, "value": None}


def _edge(offset: timedelta, window: dict[str, Any], op: str = "gte", value: int = 1, n: int = 1) -> Any:
    return example(
        [ME],
        [(0, offset, "purchase", NOCAT)] * n,
        _event_leaf("purchase", None, window, "count", op, value),
        False,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Every window edge, pinned so that each run checks them (random draws reach them rarely).
@_edge(7 * D, {"between": ["30d", "7d"]})  # end of between: exclusive
@_edge(30 * D, {"between": ["30d", "7d"]})  # start of between: inclusive
@_edge(7 * D, {"last": "7d"})  # start of last: inclusive
@_edge(7 * D + S, {"last": "7d"})
@_edge(timedelta(0), {"last": "7d"})  # as_of itself: inclusive
@_edge(-S, {})  # after as_of: never
@_edge(timedelta(0), {}, value=2, n=2)  # two events at one instant count twice
@example([ME], [(0, D, "page_view", NOCAT)], _event_leaf("purchase", None, {}, "sum", "eq", 0), False)
@example([ME], [(0, D, "purchase", NOCAT)], _event_leaf("purchase", None, {}, "max", "lte", 20), True)
@example([ME], [(0, 7 * D, "purchase", NOCAT)], {"recency": {"type": "purchase", "within": "7d"}}, False)
@given(
    st.lists(person, min_size=1, max_size=4),
    st.lists(event, min_size=1, max_size=12),
    st.one_of(event_leaf, recency_leaf),
    st.booleans(),
)
def test_single_event_leaves_equal_the_reference(
    people: list[dict[str, Any]], evs: list[Any], leaf: dict[str, Any], negate: bool
) -> None:
    # Leaves drawn on their own, so that window edges, empty aggregates and nulls are hit often.
    where = {"not": leaf} if negate else leaf
    ev_rows = [(f"p{owner}", off, t, fields) for owner, off, t, fields in evs]
    assert members(where, profiles({f"p{i}": a for i, a in enumerate(people)}), events(ev_rows)) == _expected(
        people, ev_rows, where
    )
