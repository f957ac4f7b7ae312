"""Definitions in words: what ``privseg segments explain`` prints, for marketers and compliance."""

from __future__ import annotations

from datetime import timedelta
from typing import assert_never

from privseg.segments.language import (
    BUCKETS,
    All,
    AnyOf,
    BucketLeaf,
    EventLeaf,
    Node,
    Not,
    PersonaLeaf,
    PropertyLeaf,
    RecencyLeaf,
    SegmentRef,
    SequenceLeaf,
    Step,
    TraitDef,
    TraitLeaf,
    Window,
)
from privseg.segments.operators import OPERATORS


def _duration(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


def _window_words(w: Window) -> str:
    if w.kind == "all":
        return "ever"
    if w.kind == "last":
        assert isinstance(w.start, timedelta)
        return f"in the last {_duration(w.start)}"
    if w.kind == "between":
        assert isinstance(w.start, timedelta) and isinstance(w.end, timedelta)
        return f"between {_duration(w.start)} and {_duration(w.end)} ago"
    return f"from {w.start} to {w.end}"


def _step_words(step: Step) -> str:
    text = f"{step.type} events"
    if step.filters:
        text += " where " + " and ".join(OPERATORS[c.op].words(c.field, c.value) for c in step.filters)
    return text


def words(node: Node, traits: dict[str, TraitDef], depth: int) -> list[str]:
    """A definition tree in words, one line per node, indented by depth."""
    pad = "  " * depth
    match node:
        case All() | AnyOf():
            head = "all of:" if isinstance(node, All) else "any of:"
            return [
                f"{pad}{head}",
                *(line for child in node.children for line in words(child, traits, depth + 1)),
            ]
        case Not():
            return [f"{pad}NOT:", *words(node.child, traits, depth + 1)]
        case PropertyLeaf():
            c = node.cond
            return [f"{pad}- {OPERATORS[c.op].words(c.field, c.value)}"]
        case EventLeaf():
            what = "number of" if node.measure == "count" else f"{node.measure} of value over"
            subject = f"the {what} {_step_words(node.step)} {_window_words(node.window)}"
            return [f"{pad}- {OPERATORS[node.op].words(subject, node.value)}"]
        case RecencyLeaf():
            verb = "no" if node.negate else "some"
            return [f"{pad}- {verb} {_step_words(node.step)} in the last {_duration(node.within)}"]
        case SequenceLeaf():
            return [
                f"{pad}- {_step_words(node.first)} followed within {_duration(node.within)} by "
                f"{_step_words(node.then)}, {_window_words(node.window)}"
            ]
        case TraitLeaf():
            t = traits.get(node.name)
            label = f"trait {node.name}" + (f" ({t.description})" if t and t.description else "")
            return [f"{pad}- {OPERATORS[node.op].words(label, node.value)}"]
        case SegmentRef():
            return [f"{pad}- is in segment {node.id}"]
        case PersonaLeaf():
            names = ", ".join(
                f"{'number of' if f.measure == 'count' else 'value over'} {_step_words(f.step)} "
                f"{_window_words(f.window)}"
                for f in node.features
            )
            source = f" of release {node.release}" if node.release else ""
            k = sum(c is not None for c in node.centers)
            return [f"{pad}- is nearest to persona {node.target} of {k}{source} (by {names})"]
        case BucketLeaf():
            share = (node.high - node.low + 1) / BUCKETS
            buckets = f"random buckets {node.low}-{node.high} of {BUCKETS} for salt {node.salt!r}"
            return [f"{pad}- falls in {buckets} ({share:.1%} of people)"]
    assert_never(node)
