"""The shape of a definition document, as a typed model: the body of ``POST /v1/segments`` and its
JSON Schema in the API documentation.

This checks structure only (which keys, which node kinds, which operators). What depends on the
deployment (attribute and event names, value domains, categories, references) is checked by the
:class:`~privseg.segments.language.Parser`, which names the path of every problem.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag

from privseg.segments.operators import OPERATORS

Duration = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,5}[smhdw]$", examples=["7d", "12h", "2w"])]
Operator = Literal[tuple(sorted(OPERATORS))]  # type: ignore[valid-type]
Id = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class Condition(RootModel[dict[Operator, Any]]):  # type: ignore[valid-type]
    """One operator and its value, e.g. ``{"gte": 3}``, ``{"in": ["55-64", "65+"]}``."""

    root: dict[Operator, Any] = Field(min_length=1, max_length=1)  # type: ignore[valid-type]


Conditions = dict[str, Condition]  # field -> condition, e.g. {"product_category": {"in": [...]}}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Step(_Spec):
    type: str = Field(description="An event type of the ingest policy.")
    where: Conditions | None = Field(None, description="Event field -> condition; all must hold.")


class Windowed(Step):
    last: Duration | None = Field(None, description="as_of - last <= ts <= as_of.")
    between: list[Duration] | None = Field(
        None, min_length=2, max_length=2, description="[older, newer]: as_of - older <= ts < as_of - newer."
    )
    from_: str | None = Field(None, alias="from", description="ISO 8601 start (inclusive), with `to`.")
    to: str | None = Field(None, description="ISO 8601 end (exclusive), with `from`.")


class EventSpec(Windowed):
    count: Condition | None = None
    sum: Condition | None = None
    avg: Condition | None = None
    min: Condition | None = None
    max: Condition | None = None


class RecencySpec(Step):
    within: Duration | None = None
    not_within: Duration | None = None


class SequenceSpec(_Spec):
    steps: list[Step] = Field(min_length=2, max_length=2)
    within: Duration
    last: Duration | None = None
    between: list[Duration] | None = Field(None, min_length=2, max_length=2)
    from_: str | None = Field(None, alias="from")
    to: str | None = None


class BucketSpec(_Spec):
    salt: str = Field(min_length=1)
    range: list[int] = Field(min_length=2, max_length=2, description="[low, high] within 0..9999.")


class PersonaFeatureSpec(_Spec):
    name: str | None = None
    event: Windowed
    measure: str = Field(description="count or sum.")
    min: float
    max: float


class PersonaSpec(_Spec):
    release: int | None = Field(None, ge=1, description="A persona release of yours; fills the rest in.")
    is_: int = Field(alias="is", ge=0, description="The persona whose members these are.")
    features: list[PersonaFeatureSpec] | None = None
    centers: list[list[float] | None] | None = Field(None, description="In the features' units.")


class AllNode(_Spec):
    all: list[Node] = Field(min_length=1)


class AnyNode(_Spec):
    any: list[Node] = Field(min_length=1)


class NotNode(_Spec):
    not_: Node = Field(alias="not")


class PropertyNode(_Spec):
    property: Conditions = Field(
        min_length=1, max_length=1, description="One profile attribute and its condition."
    )


class EventNode(_Spec):
    event: EventSpec


class RecencyNode(_Spec):
    recency: RecencySpec


class SequenceNode(_Spec):
    sequence: SequenceSpec


class TraitNode(_Spec):
    trait: Conditions = Field(min_length=1, max_length=1, description="One trait name and its condition.")


class SegmentNode(_Spec):
    segment: Id = Field(description="Membership of another segment.")


class BucketNode(_Spec):
    bucket: BucketSpec


class PersonaNode(_Spec):
    persona: PersonaSpec


def _node_kind(value: Any) -> str | None:
    # A node is a mapping with exactly one key, which names its kind.
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    if isinstance(value, _Spec):  # serializing a parsed node: its class names its kind
        return type(value).__name__.removesuffix("Node").lower()
    return None


Node = Annotated[
    Annotated[AllNode, Tag("all")]
    | Annotated[AnyNode, Tag("any")]
    | Annotated[NotNode, Tag("not")]
    | Annotated[PropertyNode, Tag("property")]
    | Annotated[EventNode, Tag("event")]
    | Annotated[RecencyNode, Tag("recency")]
    | Annotated[SequenceNode, Tag("sequence")]
    | Annotated[TraitNode, Tag("trait")]
    | Annotated[SegmentNode, Tag("segment")]
    | Annotated[BucketNode, Tag("bucket")]
    | Annotated[PersonaNode, Tag("persona")],
    Discriminator(
        _node_kind,
        custom_error_type="invalid_node",
        custom_error_message="expected one node: all, any, not, property, event, recency, sequence, "
        "trait, segment, bucket or persona",
    ),
]


class SegmentSpec(_Spec):
    id: Id
    description: str | None = None
    category: str | list[str] | None = Field(
        None, description="Optional: the category the author expects; refused if the data says stricter."
    )
    objective: Literal["performance", "brand"]
    where: Node

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "cart_abandoners_7d",
                    "description": "added to cart in the last 7 days and did not buy",
                    "objective": "performance",
                    "where": {
                        "all": [
                            {"event": {"type": "add_to_cart", "last": "7d"}},
                            {"not": {"event": {"type": "purchase", "last": "7d"}}},
                        ]
                    },
                }
            ]
        }
    )


class SourceSpec(Windowed):
    pass


class TraitSpec(_Spec):
    name: Id
    description: str | None = None
    source: dict[Literal["days_since", "count", "sum", "avg", "min", "max"], SourceSpec] = Field(
        min_length=1, max_length=1
    )
    edges: list[float] = Field(min_length=1, description="Public, strictly ascending bin edges.")
    scores: list[int] = Field(min_length=2, description="One more score than edges.")
    missing: int | None = None


class DefinitionSet(_Spec):
    segments: list[SegmentSpec] = Field(default_factory=list)
    traits: list[TraitSpec] = Field(default_factory=list)


def _document_kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "list"
    if isinstance(value, DefinitionSet) or (isinstance(value, dict) and {"segments", "traits"} & set(value)):
        return "set"
    return "segment" if isinstance(value, dict | SegmentSpec) else None


Document = Annotated[
    Annotated[DefinitionSet, Tag("set")]
    | Annotated[list[SegmentSpec], Tag("list")]
    | Annotated[SegmentSpec, Tag("segment")],
    Discriminator(
        _document_kind,
        custom_error_type="invalid_document",
        custom_error_message="expected a JSON object or array: a segment, a list of segments, or "
        "{segments, traits}",
    ),
    Field(description="One segment, a list of segments, or {segments, traits}; applied all or none."),
]


def as_data(doc: DefinitionSet | list[SegmentSpec] | SegmentSpec) -> Any:
    """The document as plain data, exactly as sent (only the keys given, under their own names)."""
    if isinstance(doc, list):
        return [s.model_dump(mode="json", by_alias=True, exclude_unset=True) for s in doc]
    return doc.model_dump(mode="json", by_alias=True, exclude_unset=True)
