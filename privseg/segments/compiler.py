"""Compile segment definitions into per-person features and one Polars expression per segment.

Every distinct feature the leaves need (an event aggregate over a window, the last time of an event,
a sequence, a random bucket) is collected once across *all* segments, keyed by a hash of its
normalized form, so a thousand segments that ask about purchases in the last 30 days share one
column. Each segment then becomes a boolean expression over the person table (profile attributes
plus feature columns), and every segment is evaluated in one lazy ``select``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import assert_never

import polars as pl

from privseg.policy.categories import CategorySet
from privseg.schema import Schema
from privseg.segments import operators
from privseg.segments.feature_kinds import (
    AggFeature,
    BucketFeature,
    Feature,
    LastFeature,
    SeqFeature,
    feature_name,
)
from privseg.segments.language import (
    All,
    AnyOf,
    BucketLeaf,
    DefinitionError,
    EventLeaf,
    Node,
    Not,
    PersonaLeaf,
    PropertyLeaf,
    RecencyLeaf,
    SegmentDef,
    SegmentRef,
    SequenceLeaf,
    TraitDef,
    TraitLeaf,
)
from privseg.segments.sensitivity import SensitivityIndex, Taint
from privseg.segments.words import words


# -- compilation -------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a compilation needs computed, in order: the features (per person, from events), then the
    derived columns (each distinct property condition and trait score, computed once however many
    segments use it), then the referenced segments level by level (a level reads only earlier
    ones), then every segment."""

    as_of: datetime
    features: dict[str, Feature] = field(default_factory=dict)
    derived: dict[str, pl.Expr] = field(default_factory=dict)
    shared: list[dict[str, pl.Expr]] = field(default_factory=list)
    segments: dict[str, pl.Expr] = field(default_factory=dict)
    # Category attributes that conditions read: evaluated as Polars categoricals, whose comparisons
    # and is_in match the text's (tested) at a fraction of the cost (is_in of three values over 1M
    # people: 12 ms on text, 0.7 ms on the categorical after a 40 ms cast).
    categorical: set[str] = field(default_factory=set)

    def use(self, feature: Feature) -> pl.Expr:
        name = feature_name(feature)
        self.features.setdefault(name, feature)
        return pl.col(name)

    def derive(self, key: object, build: Callable[[], pl.Expr]) -> pl.Expr:
        """A column computed once for ``key`` (a frozen, deterministic value), by ``build``."""
        name = "\x00d:" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        if name not in self.derived:
            self.derived[name] = build()
        return pl.col(name)

    def share(self, sid: str, level: int, expr: pl.Expr) -> pl.Expr:
        """A referenced segment as a column of its level, so every reference reads it."""
        while len(self.shared) <= level:
            self.shared.append({})
        name = f"\x00s:{sid}"
        self.shared[level][name] = expr
        return pl.col(name)

    def event_columns(self) -> list[str]:
        """The event columns the features read: loading only these halves the load of a big store."""
        needed = {"pid", "ts", "event_type"}
        for f in self.features.values():
            steps = (
                [f.first, f.then]
                if isinstance(f, SeqFeature)
                else []
                if isinstance(f, BucketFeature)
                else [f.step]
            )
            needed.update(c.field for step in steps for c in step.filters)
            if isinstance(f, AggFeature) and f.measure != "count":
                needed.add("value")
        return sorted(needed)

    def profile_columns(self) -> list[str]:
        """The profile columns the expressions read (plus pid)."""
        computed = set(self.features) | set(self.derived) | {n for level in self.shared for n in level}
        exprs = [*self.derived.values(), *(e for level in self.shared for e in level.values())]
        names = {"pid"}
        for expr in [*exprs, *self.segments.values()]:
            names.update(n for n in expr.meta.root_names() if n not in computed)
        return sorted(names)


@dataclass(frozen=True)
class Effective:
    """The categories a segment is released under (the strictest rule of all of them applies, and
    each is charged) and every read of stigmatized data that put it there."""

    categories: tuple[str, ...]
    taints: tuple[Taint, ...]


class Compiler:
    def __init__(
        self,
        *,
        schema: Schema,
        categories: CategorySet,
        segments: dict[str, SegmentDef],
        traits: dict[str, TraitDef],
    ) -> None:
        self.schema = schema
        self.categories = categories
        self.defs = segments
        self.traits = traits
        self.index = SensitivityIndex(categories, schema)
        self._effective: dict[str, Effective] = {}

    def check(self, only: set[str] | None = None) -> None:
        """Validate references, traits, consent attributes, cycles and declared categories (of the
        segments in ``only``, default all) without building anything."""
        self.compile(datetime.now(UTC))
        for sid in sorted(self.defs if only is None else only):
            seg, eff = self.defs[sid], self.effective(sid)
            if not seg.declared:
                continue
            for taint in eff.taints:
                if taint.category not in seg.declared:
                    raise DefinitionError(
                        f"{taint.describe()}, but the segment is declared {'+'.join(seg.declared)}: "
                        f"declare category {taint.category} (a declared category may be stricter than "
                        "what a segment reads, never looser)"
                    )

    def dependents(self, ids: set[str], traits: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
        """``ids``, every segment using one of ``traits``, and every segment that references any of
        those, directly or transitively (their effective categories follow what they use)."""
        refs = {sid: references(seg.root) for sid, seg in self.defs.items()}
        out = set(ids) | {sid for sid, seg in self.defs.items() if traits_used(seg.root) & traits}
        while True:
            more = {sid for sid, r in refs.items() if r & out} - out
            if not more:
                return out
            out |= more

    # -- effective categories ------------------------------------------------------------------
    def effective(self, sid: str, stack: tuple[str, ...] = ()) -> Effective:
        """General is the floor; declared categories and every category whose data the definition
        reads (transitively through references) are added; general is dropped once a stigmatized
        category is present (policy check guarantees those are stricter on every axis)."""
        if sid in stack:
            cycle = " -> ".join([*stack[stack.index(sid) :], sid])
            raise DefinitionError(f"segment {stack[-1]!r}: reference cycle {cycle}")
        if sid not in self._effective:
            seg = self.defs[sid]
            taints = self._reads(seg.root, f"segment {sid!r}: where", (*stack, sid))
            names = {"general", *seg.declared, *(t.category for t in taints)}
            if any(self.categories.get(c).stigmatized for c in names):
                names.discard("general")
            stigmatized = tuple(t for t in taints if self.categories.get(t.category).stigmatized)
            self._effective[sid] = Effective(tuple(sorted(names)), stigmatized)
        return self._effective[sid]

    def _reads(self, node: Node, path: str, stack: tuple[str, ...]) -> list[Taint]:
        idx = self.index
        match node:
            case All() | AnyOf():
                key = "all" if isinstance(node, All) else "any"
                return [
                    t
                    for i, c in enumerate(node.children)
                    for t in self._reads(c, f"{path}.{key}[{i}]", stack)
                ]
            case Not():
                return self._reads(node.child, f"{path}.not", stack)
            case PropertyLeaf():
                return idx.property_reads(node.cond, f"{path}.property.{node.cond.field}")
            case EventLeaf():
                return idx.step_reads(node.step, f"{path}.event")
            case RecencyLeaf():
                return idx.step_reads(node.step, f"{path}.recency")
            case SequenceLeaf():
                return idx.step_reads(node.first, f"{path}.sequence.steps[0]") + idx.step_reads(
                    node.then, f"{path}.sequence.steps[1]"
                )
            case TraitLeaf():
                trait = self.traits.get(node.name)
                if trait is None:
                    raise DefinitionError(_unknown_trait(path, node.name, self.traits))
                return idx.step_reads(trait.source.step, f"{path}.trait.{node.name} (source)")
            case PersonaLeaf():
                return [
                    t
                    for i, f in enumerate(node.features)
                    for t in idx.step_reads(f.step, f"{path}.persona.features[{i}].event")
                ]
            case SegmentRef():
                if node.id not in self.defs:
                    raise DefinitionError(f"{path}.segment: unknown segment {node.id!r}")
                ref = self.effective(node.id, stack)
                return [
                    Taint(c, f"{path}.segment", f"references segment {node.id!r}, which is {c}")
                    for c in ref.categories
                    if c != "general"
                ]
            case BucketLeaf():
                return []
        assert_never(node)

    def consent_attributes(self, sid: str) -> list[str]:
        """Every consent a member needs: one per effective category."""
        return sorted({self.categories.get(c).consent_attribute for c in self.effective(sid).categories})

    def compile(self, as_of: datetime, only: set[str] | None = None) -> Plan:
        plan = Plan(as_of)
        memo: dict[str, tuple[pl.Expr, int]] = {}
        referenced = {r for seg in self.defs.values() for r in references(seg.root)}
        for sid in sorted(self.defs if only is None else only):
            plan.segments[sid] = self._segment(sid, plan, memo, (), referenced)[0]
        return plan

    def _segment(
        self,
        sid: str,
        plan: Plan,
        memo: dict[str, tuple[pl.Expr, int]],
        stack: tuple[str, ...],
        referenced: set[str],
    ) -> tuple[pl.Expr, int]:
        """The segment's expression and its level (1 + the highest level it references; 0: none)."""
        if sid in stack:
            cycle = " -> ".join([*stack[stack.index(sid) :], sid])
            raise DefinitionError(f"segment {stack[-1]!r}: reference cycle {cycle}")
        if sid not in memo:
            seg = self.defs[sid]
            levels: list[int] = []
            body = self._node(
                seg.root, plan, memo, (*stack, sid), f"segment {sid!r}: where", (referenced, levels)
            )
            consents = self.consent_attributes(sid)
            for consent in consents:
                ft = self.schema.profile.get(consent)
                if ft is None or ft.type != "bool":
                    raise DefinitionError(
                        f"segment {sid!r}: its categories {list(self.effective(sid).categories)} require "
                        f"consent attribute {consent!r}, which is not a boolean profile attribute in the "
                        "ingest policy"
                    )
            # People without the consent of every category the segment reads are never counted,
            # whatever the definition says.
            expr = pl.all_horizontal([body, *(pl.col(c).fill_null(False) for c in consents)])
            level = 1 + max(levels) if levels else 0
            # Referenced by another segment: computed once, as a column of its level.
            memo[sid] = (plan.share(sid, level, expr) if sid in referenced else expr, level)
        return memo[sid]

    def _node(
        self,
        node: Node,
        plan: Plan,
        memo: dict[str, tuple[pl.Expr, int]],
        stack: tuple[str, ...],
        path: str,
        refs: tuple[set[str], list[int]],
    ) -> pl.Expr:
        match node:
            case All() | AnyOf():
                key = "all" if isinstance(node, All) else "any"
                children = [
                    self._node(c, plan, memo, stack, f"{path}.{key}[{i}]", refs)
                    for i, c in enumerate(node.children)
                ]
                return pl.all_horizontal(children) if key == "all" else pl.any_horizontal(children)
            case Not():
                return ~self._node(node.child, plan, memo, stack, f"{path}.not", refs)
            case PropertyLeaf():
                cond = node.cond
                if (ft := self.schema.profile.get(cond.field)) is not None and ft.type == "category":
                    plan.categorical.add(cond.field)
                return plan.derive(cond, lambda: operators.build(cond.op, pl.col(cond.field), cond.value))
            # Event and recency conditions are derived columns too: 2,000 generated segments hold
            # 3,556 event and 1,203 recency leaves but only 1,382 and 112 distinct ones
            # (benchmarks/segments.py), and building a datetime literal costs ~0.4 ms each.
            case EventLeaf():
                feature = plan.use(AggFeature(node.step, node.window, node.measure))
                return plan.derive(
                    ("event", feature.meta.output_name(), node.op, node.value),
                    lambda: operators.build(node.op, feature, node.value),
                )
            case RecencyLeaf():
                last = plan.use(LastFeature(node.step))
                recent = plan.derive(
                    ("recent", last.meta.output_name(), node.within),
                    lambda: (last >= plan.as_of - node.within).fill_null(False),
                )
                return ~recent if node.negate else recent
            case SequenceLeaf():
                return plan.use(SeqFeature(node.first, node.then, node.within, node.window))
            case TraitLeaf():
                trait = self.traits.get(node.name)
                if trait is None:
                    raise DefinitionError(_unknown_trait(path, node.name, self.traits))
                score = plan.derive(("trait", trait), lambda: self.trait_score(trait, plan))
                return operators.build(node.op, score, node.value)
            case SegmentRef():
                if node.id not in self.defs:
                    raise DefinitionError(f"{path}.segment: unknown segment {node.id!r}")
                expr, level = self._segment(node.id, plan, memo, stack, refs[0])
                refs[1].append(level)
                return expr
            case BucketLeaf():
                return plan.use(BucketFeature(node.salt)).is_between(node.low, node.high, closed="both")
            case PersonaLeaf():
                return self.nearest(node, plan)
        assert_never(node)

    @staticmethod
    def nearest(node: PersonaLeaf, plan: Plan) -> pl.Expr:
        """Whether the person's nearest persona center is the target, in the release's own terms:
        features clipped to their bounds and scaled to [0, 1], squared distance, ties to the lower
        index (numpy's argmin)."""
        scaled = [
            (
                (
                    plan.use(AggFeature(f.step, f.window, f.measure))
                    .cast(pl.Float64)
                    .fill_null(0.0)
                    .clip(f.low, f.high)
                    - f.low
                )
                / (f.high - f.low)
            )
            for f in node.features
        ]

        def distance(center: tuple[float, ...]) -> pl.Expr:
            terms = []
            for x, f, c in zip(scaled, node.features, center, strict=True):
                at = min(max((c - f.low) / (f.high - f.low), 0.0), 1.0)
                terms.append((x - at) ** 2)
            return pl.sum_horizontal(terms)

        mine = node.centers[node.target]
        assert mine is not None  # the parser refuses a suppressed target
        own = distance(mine)
        beats = [
            own < distance(c) if j < node.target else own <= distance(c)
            for j, c in enumerate(node.centers)
            if c is not None and j != node.target
        ]
        return pl.all_horizontal(beats) if beats else pl.lit(True)

    @staticmethod
    def trait_score(trait: TraitDef, plan: Plan) -> pl.Expr:
        src = trait.source
        if src.kind == "days_since":
            last = plan.use(LastFeature(src.step))
            value = (pl.lit(plan.as_of) - last).dt.total_seconds() / 86_400
        else:
            value = plan.use(AggFeature(src.step, src.window, src.kind)).cast(pl.Float64)
        # Built from the top bin down: each earlier edge wraps the rest.
        score: pl.Expr = pl.lit(trait.scores[-1])
        for edge, s in reversed(list(zip(trait.edges, trait.scores[:-1], strict=True))):
            score = pl.when(value < edge).then(pl.lit(s)).otherwise(score)
        return pl.when(value.is_null()).then(pl.lit(trait.missing)).otherwise(score)

    # -- words ---------------------------------------------------------------------------------
    def explain(self, sid: str) -> str:
        seg, eff = self.defs[sid], self.effective(sid)
        lines = [f"{sid}: {seg.description}" if seg.description else sid]
        names = [c + (" (stigmatized)" if self.categories.get(c).stigmatized else "") for c in eff.categories]
        declared = f"; declared {'+'.join(seg.declared)}" if seg.declared else ""
        lines.append(f"category {' + '.join(names)}{declared}, objective {seg.objective}")
        lines += [f"  because {t.describe()}" for t in eff.taints]
        lines.append("A person is in this segment when")
        lines += words(seg.root, self.traits, 1)
        consents = " and ".join(f"{c} is true" for c in self.consent_attributes(sid))
        lines.append(f"  and has consented: {consents}.")
        return "\n".join(lines)


def _unknown_trait(path: str, name: str, known: dict[str, TraitDef]) -> str:
    return (
        f"{path}.trait: unknown trait {name!r}; known: {sorted(known)}. Traits are defined in a `traits:` "
        "list: apply the file that defines it in the same call or before (the shipped RFM traits are in "
        "traits.yaml; `privseg segments examples --apply` applies the examples as one set)"
    )


def leaves(node: Node) -> Iterator[Node]:
    """Every leaf of a tree, in order."""
    match node:
        case All() | AnyOf():
            for child in node.children:
                yield from leaves(child)
        case Not():
            yield from leaves(node.child)
        case _:
            yield node


def references(node: Node) -> set[str]:
    """The segments a tree references directly."""
    return {leaf.id for leaf in leaves(node) if isinstance(leaf, SegmentRef)}


def traits_used(node: Node) -> set[str]:
    """The traits a tree uses directly."""
    return {leaf.name for leaf in leaves(node) if isinstance(leaf, TraitLeaf)}
