"""The ingest policy (``policies/ingest.yaml``): what may enter the store, and in what form."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from privseg.errors import PolicyError, describe_validation_error
from privseg.identity import IdType
from privseg.yamltext import parse_yaml

# Columns privseg writes itself; a policy may not reuse these names for source columns.
RESERVED = frozenset({"pid", "ts", "age_band", "region"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no .inf or .nan bounds


class Identity(_Strict):
    column: str = Field(min_length=1, description="Source column holding the person's identifier.")
    type: IdType = Field(description="Identifier kind; selects the normalization rule.")


class CategoryAttr(_Strict):
    type: Literal["category"]
    values: tuple[str, ...] = Field(min_length=1, description="The public domain of the attribute.")
    fold: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Domain value -> source values stored as it (e.g. other: [YOLO, Absurd]): rare or odd "
        "values an export carries, folded into a public value by a declared list, never learned from data.",
    )
    required: bool = False

    @model_validator(mode="after")
    def _fold_targets(self) -> CategoryAttr:
        bad = sorted(set(self.fold) - set(self.values))
        if bad:
            raise ValueError(f"fold targets {bad} are not among the values")
        return self


class ListAttr(_Strict):
    type: Literal["list"]
    separator: str = Field(";", min_length=1, description="Separator of items in text sources.")
    values: tuple[str, ...] = Field(min_length=1)
    required: bool = False


class BoolAttr(_Strict):
    type: Literal["bool"]
    required: bool = False


class DateAttr(_Strict):
    type: Literal["date"]
    required: bool = False


OutOfRange = Literal["refuse", "clip", "unknown"]
_OUT_OF_RANGE = (
    "A value outside [min, max]: refuse (the file is refused, naming the row), clip (to the nearest "
    "bound) or unknown (stored as missing)."
)


class FloatAttr(_Strict):
    type: Literal["float"]
    min: float | None = Field(None, description="Smallest accepted value (inclusive).")
    max: float | None = Field(None, description="Largest accepted value (inclusive).")
    out_of_range: OutOfRange = Field("refuse", description=_OUT_OF_RANGE)
    required: bool = False


class IntAttr(_Strict):
    type: Literal["int"]
    min: int | None = Field(None, description="Smallest accepted value (inclusive).")
    max: int | None = Field(None, description="Largest accepted value (inclusive).")
    out_of_range: OutOfRange = Field("refuse", description=_OUT_OF_RANGE)
    required: bool = False


class StringAttr(_Strict):
    type: Literal["string"]
    max_length: int = Field(64, ge=1, le=1024, description="Longer values are refused.")
    required: bool = False


Attribute = Annotated[
    CategoryAttr | ListAttr | BoolAttr | DateAttr | FloatAttr | IntAttr | StringAttr,
    Field(discriminator="type"),
]


class AgeBandRule(_Strict):
    to: Literal["age_band"]
    from_type: Literal["date", "age", "year"] = Field(
        "date",
        description="date: a birth date YYYY-MM-DD; age: whole years; year: a birth year (the age reached "
        "in the reference year, so it can be one year more than the exact age).",
    )
    edges: tuple[int, ...] = Field(min_length=1, description="Ascending band edges in years.")
    out_of_range: Literal["refuse", "unknown"] = Field(
        "refuse",
        description="An age outside 0-120 years (a typo such as a birth year of 1893): refuse the file, "
        "naming the row, or store the age band as unknown.",
    )

    @model_validator(mode="after")
    def _ascending(self) -> AgeBandRule:
        if list(self.edges) != sorted(set(self.edges)):
            raise ValueError("edges must be strictly ascending")
        return self

    def bands(self) -> tuple[str, ...]:
        """Band labels, in order: <18, 18-24, ..., 65+. (Not 18_24: YAML 1.1 reads 55_64 as the
        number 5564, which would break every hand-written definition that names a band.)"""
        e = self.edges
        labels = [f"<{e[0]}"]
        labels += [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(e)]
        labels.append(f"{e[-1]}+")
        return tuple(labels)


class RegionRule(_Strict):
    to: Literal["region"]
    prefix_length: int = Field(ge=1, le=5, description="Leading characters of the postal code kept.")
    regions: dict[str, str] = Field(min_length=1, description="Prefix -> public region name.")

    @model_validator(mode="after")
    def _prefix_lengths(self) -> RegionRule:
        bad = [p for p in self.regions if len(p) != self.prefix_length]
        if bad:
            raise ValueError(f"region prefixes {bad} are not {self.prefix_length} characters long")
        return self


class NumberBandRule(_Strict):
    """A number replaced by its band on public edges (e.g. income -> income_band); blank -> unknown."""

    to: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="The stored (generalized) attribute.")
    edges: tuple[float, ...] = Field(min_length=1, description="Ascending band edges.")
    labels: tuple[str, ...] = Field(
        description="One label more than edges: below edges[0], [edges[i-1], edges[i]), and edges[-1]+."
    )

    @model_validator(mode="after")
    def _shape(self) -> NumberBandRule:
        if list(self.edges) != sorted(set(self.edges)):
            raise ValueError("edges must be strictly ascending")
        if len(self.labels) != len(self.edges) + 1 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"expected {len(self.edges) + 1} distinct labels (one more than the edges)")
        return self


def _rule_kind(value: Any) -> str:
    to = value.get("to") if isinstance(value, dict) else getattr(value, "to", None)
    return to if to in ("age_band", "region") else "bands"


GeneralizeRule = Annotated[
    Annotated[AgeBandRule, Tag("age_band")]
    | Annotated[RegionRule, Tag("region")]
    | Annotated[NumberBandRule, Tag("bands")],
    Discriminator(_rule_kind),
]


class DerivedAttr(_Strict):
    """An attribute computed at ingest from numeric attributes of the same file."""

    sum: tuple[str, ...] = Field(
        min_length=2,
        description="Numeric attributes added up; missing ones count as 0, all missing is unknown.",
    )


class ProfilesPolicy(_Strict):
    drop: tuple[str, ...] = ()
    generalize: dict[str, GeneralizeRule] = Field(default_factory=dict)
    attributes: dict[str, Attribute]
    derived: dict[str, DerivedAttr] = Field(
        default_factory=dict, description="Attributes computed at ingest (stored as numbers)."
    )

    @model_validator(mode="after")
    def _derived_sources(self) -> ProfilesPolicy:
        for name, rule in self.derived.items():
            bad = [c for c in rule.sum if not isinstance(self.attributes.get(c), FloatAttr | IntAttr)]
            if bad:
                raise ValueError(f"derived {name!r} adds {bad}, which are not int or float attributes")
            if name in self.attributes or name in {r.to for r in self.generalize.values()}:
                raise ValueError(f"derived {name!r} has the name of another attribute")
        return self


class EventsPolicy(_Strict):
    timestamp: str = Field(min_length=1, description="Source column holding the event time.")
    drop: tuple[str, ...] = ()
    attributes: dict[str, Attribute]


class IntakeEvent(_Strict):
    type: str = Field(min_length=1, description="The event type it is stored as (an event_type value).")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Event attribute -> where it is in the message, as a dotted path under properties or "
        "context (e.g. properties.revenue, context.campaign.name).",
    )


class IntakeMapping(_Strict):
    """Live events from a CDP pipeline (Segment / RudderStack batch JSON): which tracked events enter
    and as what. A message's userId is the identity (pseudonymized like a file's); names not listed are
    skipped and counted."""

    events: dict[str, IntakeEvent] = Field(
        min_length=1, description="Tracked event name (or $page for page calls) -> how it is stored."
    )
    traits: dict[str, str] = Field(
        default_factory=dict,
        description="Profile column (an attribute, or a column the profiles policy generalizes such as "
        "birth_date) -> dotted path under traits: identify calls become profile patches. Empty: "
        "identify calls are skipped.",
    )


class IngestPolicy(_Strict):
    version: Literal[1]
    identity: Identity
    retention_days: int = Field(ge=1, description="Events older than this many days are dropped.")
    profiles: ProfilesPolicy
    events: EventsPolicy
    intake: IntakeMapping | None = Field(None, description="Live event intake (POST /v1/intake/batch).")

    @model_validator(mode="after")
    def _intake_maps_to_the_schema(self) -> IngestPolicy:
        if self.intake is None:
            return self
        etype = self.events.attributes.get("event_type")
        known_types = getattr(etype, "values", None)
        profile_columns = {*self.profiles.attributes, *self.profiles.generalize}
        for column, path in self.intake.traits.items():
            if column not in profile_columns:
                raise ValueError(
                    f"intake.traits: {column!r} is not a profile attribute or generalized column"
                )
            if not path.startswith("traits."):
                raise ValueError(f"intake.traits.{column}: paths start with traits.")
        for name, m in self.intake.events.items():
            if known_types is not None and m.type not in known_types:
                raise ValueError(f"intake.events.{name}.type: {m.type!r} is not an event_type value")
            for field, path in m.fields.items():
                if field not in self.events.attributes or field == "event_type":
                    raise ValueError(f"intake.events.{name}.fields: {field!r} is not an event attribute")
                if not path.startswith(("properties.", "context.")):
                    raise ValueError(
                        f"intake.events.{name}.fields.{field}: paths start with properties. or context."
                    )
        return self

    @model_validator(mode="after")
    def _names_are_unambiguous(self) -> IngestPolicy:
        for kind, section in (("profiles", self.profiles), ("events", self.events)):
            named: list[str] = [self.identity.column, *section.drop, *section.attributes]
            if isinstance(section, ProfilesPolicy):
                named += list(section.generalize)
                outputs = [rule.to for rule in section.generalize.values()]
                if len(outputs) != len(set(outputs)):
                    raise ValueError(f"{kind}.generalize produces the same output twice: {outputs}")
            else:
                named.append(section.timestamp)
            dupes = sorted({n for n in named if named.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: columns named in more than one role: {dupes}")
            reserved = sorted(set(section.attributes) & RESERVED)
            if reserved:
                raise ValueError(f"{kind}.attributes uses reserved names {reserved}")
        return self

    def content_hash(self) -> str:
        """A hash of the policy as loaded: what it does to a file (retention, domains, drops)."""
        # The intake mapping changes nothing a file becomes: it is left out, so adding it does not make
        # every stored events file look ingested under another policy.
        return hashlib.sha256(self.model_dump_json(exclude={"intake"}).encode()).hexdigest()[:16]

    def known_columns(self, kind: str) -> frozenset[str]:
        if kind == "profiles":
            p = self.profiles
            return frozenset([self.identity.column, *p.drop, *p.generalize, *p.attributes])
        e = self.events
        return frozenset([self.identity.column, e.timestamp, *e.drop, *e.attributes])


def load_ingest_policy(path: Path) -> IngestPolicy:
    """Load and validate ``ingest.yaml``; errors name the file and the path inside it."""
    try:
        doc = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"no ingest policy at {path} (set PRIVSEG_POLICY_DIR)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path} is not valid YAML: {exc}") from None
    try:
        return IngestPolicy.model_validate(doc)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise PolicyError(f"{path}: {problems}") from None
