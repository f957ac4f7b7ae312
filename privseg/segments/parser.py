"""The parser of the segment language (see language.py for the language itself): definitions as data
in, a typed tree out, every problem named by its path inside the definition (never by its value)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar

from privseg.schema import FieldType, Schema
from privseg.segments.language import (
    BUCKETS,
    ID_RE,
    MEASURES,
    All,
    AnyOf,
    BucketLeaf,
    Cond,
    DefinitionError,
    EventLeaf,
    Node,
    Not,
    PersonaFeature,
    PersonaLeaf,
    PropertyLeaf,
    RecencyLeaf,
    SegmentDef,
    SegmentRef,
    SequenceLeaf,
    Step,
    TraitDef,
    TraitLeaf,
    TraitSource,
    Window,
)
from privseg.segments.operators import COMPARABLE, OPERATORS, AttrRef

_DURATION_RE = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _fail(path: str, message: str) -> DefinitionError:
    return DefinitionError(f"{path}: {message}")


def _number(value: Any) -> bool:
    """A finite number (not a bool): JSON as Python reads it also admits Infinity and NaN, which no
    threshold, bound or edge means (a NaN edge is not even ordered)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, float) or math.isfinite(value)


# The longest window: 999999d parsed, then as_of - 999999d (year -712) raised OverflowError inside every
# snapshot computation, so one stored definition stopped every segment's.
MAX_DURATION = timedelta(days=100 * 365)


def parse_duration(text: Any, path: str) -> timedelta:
    match = _DURATION_RE.match(str(text)) if isinstance(text, str) else None
    if match is None:
        raise _fail(path, f"expected a duration such as 7d, 12h or 2w, found {text!r}")
    duration = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    if duration > MAX_DURATION:
        raise _fail(path, f"longer than {MAX_DURATION.days} days (100 years), found {text!r}")
    return duration


def _mapping(obj: Any, path: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a mapping, found {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(obj))
    if missing:
        raise _fail(path, f"missing key(s) {missing}")
    return obj


def _single(obj: Any, path: str, what: str) -> tuple[str, Any]:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise _fail(path, f"expected a mapping with exactly one {what}")
    ((key, value),) = obj.items()
    return str(key), value


class Parser:
    """Parses definitions and checks them against the schema, the categories and known names."""

    def __init__(self, schema: Schema, categories: set[str]) -> None:
        self.schema = schema
        self.categories = categories
        self._comparing = False

    # values -----------------------------------------------------------------------------------
    def _scalar(self, ft: FieldType, value: Any, path: str) -> Any:
        kind = ft.type
        if kind in ("category", "list"):
            if not isinstance(value, str):
                raise _fail(path, f"expected text, found {value!r}")
            if ft.values is not None and value not in ft.values:
                raise _fail(path, f"{value!r} is not a known value; expected one of {list(ft.values)}")
            return value
        if kind == "string":
            if not isinstance(value, str):
                raise _fail(path, f"expected text, found {value!r}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise _fail(path, f"expected true or false, found {value!r}")
            return value
        if kind == "date":
            if isinstance(value, datetime):
                return value.date()
            if isinstance(value, date):
                return value
            try:
                return date.fromisoformat(str(value))
            except ValueError:
                raise _fail(path, f"expected a date YYYY-MM-DD, found {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, f"expected a number, found {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(path, f"expected a finite number, found {value!r}")
        if kind == "int" and not isinstance(value, int):
            raise _fail(path, f"expected a whole number, found {value!r}")
        return value

    def cond(self, field: str, ft: FieldType, spec: Any, path: str) -> Cond:
        op, value = _single(spec, path, "operator (e.g. {gte: 3})")
        operator = OPERATORS.get(op)
        if operator is None:
            raise _fail(f"{path}.{op}", f"unknown operator; known: {sorted(OPERATORS)}")
        type_key = "number" if ft.type in ("float", "int", "number") else ft.type
        if ft.type not in operator.types and type_key not in operator.types:
            raise _fail(f"{path}.{op}", f"operator {op!r} does not apply to {ft.type} field {field!r}")
        vpath = f"{path}.{op}"
        if operator.value == "flag":
            if value is not True:
                raise _fail(vpath, "expected true")
            parsed: Any = True
        elif operator.value == "list":
            if not isinstance(value, list) or not value:
                raise _fail(vpath, "expected a non-empty list")
            parsed = tuple(self._scalar(ft, v, f"{vpath}[{i}]") for i, v in enumerate(value))
        elif operator.value == "pair":
            if not isinstance(value, list) or len(value) != 2:
                raise _fail(vpath, "expected [low, high]")
            lo, hi = (self._scalar(ft, v, f"{vpath}[{i}]") for i, v in enumerate(value))
            if lo > hi:
                raise _fail(vpath, "low is greater than high")
            parsed = (lo, hi)
        elif isinstance(value, dict) and self._comparing:
            parsed = self._attribute(field, ft, op, value, vpath)
        else:
            parsed = self._scalar(ft, value, vpath)
        return Cond(field, op, parsed)

    def _attribute(self, field: str, ft: FieldType, op: str, value: dict[str, Any], path: str) -> AttrRef:
        """``{attribute: other}``: compare with the person's other profile attribute."""
        spec = _mapping(value, path, {"attribute"}, {"attribute"})
        other = spec["attribute"]
        oft = self.schema.profile.get(other) if isinstance(other, str) else None
        if oft is None:
            raise _fail(
                f"{path}.attribute", f"unknown profile attribute; known: {sorted(self.schema.profile)}"
            )
        if op not in COMPARABLE:
            raise _fail(path, f"only {sorted(COMPARABLE)} compare two attributes")
        numeric = {"int", "float"}
        if not ({ft.type, oft.type} <= numeric or (ft.type == oft.type and ft.type in ("date", "category"))):
            raise _fail(path, f"cannot compare {ft.type} {field!r} with {oft.type} {other!r}")
        if ft.type == "category" and set(ft.values or ()) != set(oft.values or ()):
            raise _fail(path, f"{field!r} and {other!r} have different domains: they are never equal")
        return AttrRef(other)

    def window(self, spec: dict[str, Any], path: str) -> Window:
        """The window of an event spec (last / between / from + to; none: all time)."""
        return self._window(spec, path)

    def _window(self, spec: dict[str, Any], path: str) -> Window:
        keys = {k for k in ("last", "between", "from", "to") if k in spec}
        if not keys:
            return Window("all")
        if keys == {"last"}:
            return Window("last", parse_duration(spec["last"], f"{path}.last"))
        if keys == {"between"}:
            pair = spec["between"]
            if not isinstance(pair, list) or len(pair) != 2:
                raise _fail(f"{path}.between", "expected [older, newer], e.g. [90d, 30d]")
            old = parse_duration(pair[0], f"{path}.between[0]")
            new = parse_duration(pair[1], f"{path}.between[1]")
            if old <= new:
                raise _fail(f"{path}.between", "the first duration must be the longer one (further back)")
            return Window("between", old, new)
        if keys == {"from", "to"}:
            start, end = (self._instant(spec[k], f"{path}.{k}") for k in ("from", "to"))
            if start >= end:
                raise _fail(path, "'from' must be before 'to'")
            return Window("absolute", start, end)
        raise _fail(path, "use one window: last, between, or from + to")

    @staticmethod
    def _instant(value: Any, path: str) -> datetime:
        if isinstance(value, datetime):
            dt = value
        elif isinstance(value, date):
            dt = datetime(value.year, value.month, value.day)
        else:
            try:
                dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                raise _fail(path, f"expected an ISO 8601 time, found {value!r}") from None
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)

    def step(self, spec: dict[str, Any], path: str) -> Step:
        etype = spec.get("type")
        if etype not in self.schema.event_types:
            raise _fail(
                f"{path}.type", f"unknown event type {etype!r}; known: {list(self.schema.event_types)}"
            )
        where = spec.get("where") or {}
        if not isinstance(where, dict):
            raise _fail(f"{path}.where", "expected a mapping of event field -> condition")
        filters = []
        for field in sorted(where):
            ft = self.schema.event_fields.get(field)
            if ft is None:
                raise _fail(
                    f"{path}.where.{field}", f"unknown event field; known: {sorted(self.schema.event_fields)}"
                )
            filters.append(self.cond(field, ft, where[field], f"{path}.where.{field}"))
        return Step(str(etype), tuple(filters))

    # nodes ------------------------------------------------------------------------------------
    def node(self, obj: Any, path: str) -> Node:
        key, body = _single(
            obj,
            path,
            "node (all, any, not, property, event, recency, sequence, trait, segment, bucket, persona)",
        )
        here = f"{path}.{key}"
        parse = self._NODES.get(key)
        if parse is None:
            kinds = ", ".join(self._NODES)
            raise _fail(here, f"unknown node; use one of {kinds}")
        return parse(self, key, body, here)

    def _group(self, key: str, body: Any, here: str) -> Node:
        if not isinstance(body, list) or not body:
            raise _fail(here, "expected a non-empty list of nodes")
        children = tuple(self.node(c, f"{here}[{i}]") for i, c in enumerate(body))
        return All(children) if key == "all" else AnyOf(children)

    def _not(self, _key: str, body: Any, here: str) -> Node:
        return Not(self.node(body, here))

    def _property(self, _key: str, body: Any, here: str) -> Node:
        field, spec = _single(body, here, "profile attribute")
        ft = self.schema.profile.get(field)
        if ft is None:
            raise _fail(f"{here}.{field}", f"unknown profile attribute; known: {sorted(self.schema.profile)}")
        self._comparing = True  # only profile properties may name another attribute
        try:
            return PropertyLeaf(self.cond(field, ft, spec, f"{here}.{field}"))
        finally:
            self._comparing = False

    def _event(self, _key: str, body: Any, here: str) -> Node:
        spec = _mapping(body, here, {"type", "where", "last", "between", "from", "to", *MEASURES}, {"type"})
        measures = [m for m in MEASURES if m in spec]
        if len(measures) > 1:
            raise _fail(here, f"use one measure, found {measures}")
        measure = measures[0] if measures else "count"
        op, value = "gte", 1
        if measures:
            ft = FieldType("int" if measure == "count" else "float")
            cond = self.cond(measure, ft, spec[measure], f"{here}.{measure}")
            op, value = cond.op, cond.value
        if measure != "count" and "value" not in self.schema.event_fields:
            raise _fail(here, f"{measure} needs a numeric 'value' event field")
        return EventLeaf(self.step(spec, here), self._window(spec, here), measure, op, value)

    def _recency(self, _key: str, body: Any, here: str) -> Node:
        spec = _mapping(body, here, {"type", "where", "within", "not_within"}, {"type"})
        modes = [m for m in ("within", "not_within") if m in spec]
        if len(modes) != 1:
            raise _fail(here, "give exactly one of within or not_within")
        within = parse_duration(spec[modes[0]], f"{here}.{modes[0]}")
        return RecencyLeaf(self.step(spec, here), within, modes[0] == "not_within")

    def _sequence(self, _key: str, body: Any, here: str) -> Node:
        spec = _mapping(body, here, {"steps", "within", "last", "between", "from", "to"}, {"steps", "within"})
        steps = spec["steps"]
        if not isinstance(steps, list) or len(steps) != 2:
            raise _fail(f"{here}.steps", "expected exactly two steps")
        first, then = (
            self.step(_mapping(s, f"{here}.steps[{i}]", {"type", "where"}, {"type"}), f"{here}.steps[{i}]")
            for i, s in enumerate(steps)
        )
        within = parse_duration(spec["within"], f"{here}.within")
        return SequenceLeaf(first, then, within, self._window(spec, here))

    def _trait(self, _key: str, body: Any, here: str) -> Node:
        name, spec = _single(body, here, "trait name")
        cond = self.cond(name, FieldType("int"), spec, f"{here}.{name}")
        return TraitLeaf(name, cond.op, cond.value)

    def _segment_ref(self, _key: str, body: Any, here: str) -> Node:
        if not isinstance(body, str) or not ID_RE.match(body):
            raise _fail(here, f"expected a segment id, found {body!r}")
        return SegmentRef(body)

    def _bucket(self, _key: str, body: Any, here: str) -> Node:
        spec = _mapping(body, here, {"salt", "range"}, {"salt", "range"})
        salt, rng = spec["salt"], spec["range"]
        if not isinstance(salt, str) or not salt:
            raise _fail(f"{here}.salt", "expected non-empty text")
        ok = (
            isinstance(rng, list)
            and len(rng) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
        )
        if not ok or not 0 <= rng[0] <= rng[1] < BUCKETS:
            raise _fail(f"{here}.range", f"expected [low, high] with 0 <= low <= high <= {BUCKETS - 1}")
        return BucketLeaf(salt, rng[0], rng[1])

    def _persona(self, _key: str, body: Any, here: str) -> Node:
        spec = _mapping(body, here, {"release", "is", "features", "centers"}, {"is"})
        if "features" not in spec or "centers" not in spec:
            raise _fail(
                here,
                "give features and centers, or a persona release id (`release: N`) for privseg to fill "
                "them in when the definition is applied",
            )
        raw_features, raw_centers, target = spec["features"], spec["centers"], spec["is"]
        if not isinstance(raw_features, list) or not 1 <= len(raw_features) <= 6:
            raise _fail(f"{here}.features", "expected a list of 1 to 6 features")
        features = []
        for i, f in enumerate(raw_features):
            at = f"{here}.features[{i}]"
            fs = _mapping(
                f, at, {"event", "measure", "min", "max", "name"}, {"event", "measure", "min", "max"}
            )
            event = _mapping(
                fs["event"], f"{at}.event", {"type", "where", "last", "between", "from", "to"}, {"type"}
            )
            if fs["measure"] not in ("count", "sum"):
                raise _fail(f"{at}.measure", "expected count or sum")
            low, high = fs["min"], fs["max"]
            if not all(_number(v) for v in (low, high)) or low >= high:
                raise _fail(at, "expected numbers min < max")
            step = self.step(event, f"{at}.event")
            features.append(
                PersonaFeature(step, self._window(event, f"{at}.event"), fs["measure"], low, high)
            )
        if not isinstance(raw_centers, list) or not 2 <= len(raw_centers) <= 8:
            raise _fail(f"{here}.centers", "expected a list of 2 to 8 centers (null for a suppressed one)")
        centers: list[tuple[float, ...] | None] = []
        for j, c in enumerate(raw_centers):
            if c is None:
                centers.append(None)
                continue
            if not isinstance(c, list) or len(c) != len(features) or not all(_number(v) for v in c):
                raise _fail(f"{here}.centers[{j}]", f"expected {len(features)} numbers (one per feature)")
            centers.append(tuple(float(v) for v in c))
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < len(centers):
            raise _fail(f"{here}.is", f"expected a persona number from 0 to {len(centers) - 1}")
        if centers[target] is None:
            raise _fail(f"{here}.is", "that persona was suppressed: no one is assigned to it")
        release = spec.get("release")
        if release is not None and (not isinstance(release, int) or isinstance(release, bool) or release < 1):
            raise _fail(f"{here}.release", "expected a release id")
        return PersonaLeaf(tuple(features), tuple(centers), target, release)

    # One parser per node kind, by the key that names it.
    _NODES: ClassVar[dict[str, Callable[[Parser, str, Any, str], Node]]] = {
        "all": _group,
        "any": _group,
        "not": _not,
        "property": _property,
        "event": _event,
        "recency": _recency,
        "sequence": _sequence,
        "trait": _trait,
        "segment": _segment_ref,
        "bucket": _bucket,
        "persona": _persona,
    }

    def segment(self, doc: Any, path: str) -> SegmentDef:
        spec = _mapping(
            doc,
            path,
            {"id", "description", "category", "objective", "where"},
            {"id", "objective", "where"},
        )
        sid = spec["id"]
        if not isinstance(sid, str) or not ID_RE.match(sid):
            raise _fail(
                f"{path}.id", "expected lower-case letters, digits and _ (starting with a letter, at most 64)"
            )
        path = f"{path} (segment {sid!r})"
        declared = spec.get("category")
        names = [declared] if isinstance(declared, str) else declared if declared is not None else []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _fail(f"{path}.category", "expected a category name or a list of them")
        for name in names:
            if name not in self.categories:
                raise _fail(
                    f"{path}.category", f"unknown category {name!r}; known: {sorted(self.categories)}"
                )
        if spec["objective"] not in ("performance", "brand"):
            raise _fail(f"{path}.objective", "expected performance or brand")
        return SegmentDef(
            sid,
            str(spec.get("description", "")),
            tuple(sorted(set(names))),
            spec["objective"],
            self.node(spec["where"], f"{path}.where"),
        )

    def trait(self, doc: Any, path: str) -> TraitDef:
        spec = _mapping(
            doc,
            path,
            {"name", "description", "source", "edges", "scores", "missing"},
            {"name", "source", "edges", "scores"},
        )
        name = spec["name"]
        if not isinstance(name, str) or not ID_RE.match(name):
            raise _fail(f"{path}.name", "expected lower-case letters, digits and _")
        path = f"{path} (trait {name!r})"
        kind, src = _single(
            spec["source"], f"{path}.source", "source (days_since, count, sum, avg, min, max)"
        )
        if kind not in ("days_since", *MEASURES):
            raise _fail(f"{path}.source.{kind}", "expected days_since, count, sum, avg, min or max")
        allowed = (
            {"type", "where"} if kind == "days_since" else {"type", "where", "last", "between", "from", "to"}
        )
        src = _mapping(src, f"{path}.source.{kind}", allowed, {"type"})
        here = f"{path}.source.{kind}"
        source = TraitSource(kind, self.step(src, here), self._window(src, here))  # type: ignore[arg-type]
        edges, scores = spec["edges"], spec["scores"]
        if not isinstance(edges, list) or not edges or not all(_number(e) for e in edges):
            raise _fail(f"{path}.edges", "expected a non-empty list of numbers")
        if edges != sorted(set(edges)):
            raise _fail(f"{path}.edges", "edges must be strictly ascending")
        if (
            not isinstance(scores, list)
            or len(scores) != len(edges) + 1
            or not all(isinstance(s, int) for s in scores)
        ):
            raise _fail(
                f"{path}.scores", f"expected {len(edges) + 1} whole numbers (one more than the edges)"
            )
        missing = spec.get("missing", 0)
        if not isinstance(missing, int):
            raise _fail(f"{path}.missing", "expected a whole number")
        return TraitDef(name, str(spec.get("description", "")), source, tuple(edges), tuple(scores), missing)
