"""Category policies (``policies/categories/*.yaml``): who may receive what, at which privacy cost.

Every privacy parameter has a name, a unit and a sentence of help (the ``description`` of its field),
so compliance can read a policy file next to this model. ``check`` refuses a set in which a
stigmatized category is looser than ``general`` on any axis and explains each finding; the loaded
set has a content hash that every release and audit entry records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privseg.errors import PolicyError, describe_validation_error
from privseg.schema import Schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    period_days: int = Field(30, ge=1, le=3650, description="Length of the rolling budget period, in days.")
    per_recipient: float = Field(
        gt=0, description="Total epsilon one recipient may spend on this category within a period (unitless)."
    )
    category_cap: float = Field(
        gt=0, description="Total epsilon all recipients together may spend on this category within a period."
    )


class Breakdowns(_Strict):
    allowed: tuple[str, ...] = Field(
        (), description="Profile dimensions a release may break down by (their values are public keys)."
    )
    forbidden: tuple[str, ...] = Field((), description="Dimensions never allowed, whatever 'allowed' says.")
    max_dimensions: int = Field(
        2, ge=0, le=4, description="Most dimensions in one breakdown (cells grow fast)."
    )


class Recipients(_Strict):
    marketers: tuple[str, ...] = Field((), description="Marketer ids who may receive cohort reports.")
    partners: tuple[str, ...] = Field((), description="Ad-partner ids who may receive partner audiences.")


class SensitiveData(_Strict):
    """What this category's data is. A segment or release that reads any of it is released under this
    category (its consent, threshold, budget and recipients), whatever its author declared."""

    attributes: tuple[str, ...] = Field(
        (), description="Profile attributes that are this category's data whatever their value."
    )
    attribute_values: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Profile attribute -> values of its public domain that are this category's data.",
    )
    event_types: tuple[str, ...] = Field((), description="Event types that are this category's data.")
    event_values: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Event field -> values (of any event type) that are this category's data.",
    )

    def is_empty(self) -> bool:
        return not (self.attributes or self.attribute_values or self.event_types or self.event_values)


class CategoryPolicy(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="Must match the file name.")
    stigmatized: bool = Field(description="Stigmatized categories must be at least as strict as general.")
    consent_attribute: str = Field(
        description="Boolean profile attribute that must be true for a person to be counted at all."
    )
    epsilon_per_release: float = Field(
        gt=0, le=10, description="Epsilon charged for one release (pure DP, Laplace noise on counts)."
    )
    delta: float = Field(0.0, ge=0, lt=1e-3, description="Delta per release (0: pure differential privacy).")
    budget: Budget
    min_cohort_size: int = Field(
        ge=1, description="Cells whose noisy count is below this are suppressed (people)."
    )
    breakdowns: Breakdowns
    recipients: Recipients
    partner_audiences: bool = Field(description="Whether partner audiences may be released at all.")
    value_clip: float = Field(
        500.0, gt=0, description="Per-person spend is clipped to [0, value_clip] before summing (currency)."
    )
    sensitive_data: SensitiveData = Field(
        default_factory=SensitiveData,
        description="The attributes, attribute values, event types and event-field values that are this "
        "category's data: reading any of them puts a segment in this category.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CategoryPolicy:
        both = sorted(set(self.breakdowns.allowed) & set(self.breakdowns.forbidden))
        if both:
            raise ValueError(f"breakdowns {both} are both allowed and forbidden")
        if self.budget.per_recipient > self.budget.category_cap:
            raise ValueError("budget.per_recipient exceeds budget.category_cap")
        if self.epsilon_per_release > self.budget.per_recipient:
            raise ValueError(
                "epsilon_per_release exceeds budget.per_recipient: no release could ever be made"
            )
        return self

    def allowed_dimensions(self) -> list[str]:
        return [d for d in self.breakdowns.allowed if d not in self.breakdowns.forbidden]


@dataclass(frozen=True)
class CategorySet:
    categories: dict[str, CategoryPolicy]
    content_hash: str

    def effective(self, names: tuple[str, ...] | list[str]) -> CategoryPolicy:
        """The strictest policy of the named categories on every axis (see :func:`strictest`)."""
        return strictest([self.get(n) for n in names])

    def get(self, name: str) -> CategoryPolicy:
        try:
            return self.categories[name]
        except KeyError:
            raise PolicyError(
                f"unknown category {name!r}; known categories: {sorted(self.categories)}"
            ) from None


def strictest(policies: list[CategoryPolicy]) -> CategoryPolicy:
    """One policy holding the strictest rule of ``policies`` on every axis (a release over data of
    several categories). Its name joins theirs with '+'; each category's budget is still charged on
    its own (the ledger charges every member, see release.py)."""
    if len(policies) == 1:
        return policies[0]
    ps = sorted(policies, key=lambda p: p.name)
    dims = [d for d in ps[0].allowed_dimensions() if all(d in p.allowed_dimensions() for p in ps)]
    return CategoryPolicy.model_construct(
        name="+".join(p.name for p in ps),
        stigmatized=any(p.stigmatized for p in ps),
        consent_attribute="+".join(sorted({p.consent_attribute for p in ps})),
        epsilon_per_release=min(p.epsilon_per_release for p in ps),
        delta=min(p.delta for p in ps),
        budget=Budget(
            period_days=max(p.budget.period_days for p in ps),
            per_recipient=min(p.budget.per_recipient for p in ps),
            category_cap=min(p.budget.category_cap for p in ps),
        ),
        min_cohort_size=max(p.min_cohort_size for p in ps),
        breakdowns=Breakdowns(
            allowed=tuple(dims),
            forbidden=tuple(sorted({d for p in ps for d in p.breakdowns.forbidden})),
            max_dimensions=min(p.breakdowns.max_dimensions for p in ps),
        ),
        recipients=Recipients(
            marketers=tuple(
                m for m in ps[0].recipients.marketers if all(m in p.recipients.marketers for p in ps)
            ),
            partners=tuple(
                m for m in ps[0].recipients.partners if all(m in p.recipients.partners for p in ps)
            ),
        ),
        partner_audiences=all(p.partner_audiences for p in ps),
        value_clip=min(p.value_clip for p in ps),
        sensitive_data=SensitiveData(),
    )


def _hash(docs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(docs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def read_categories(policy_dir: Path) -> CategorySet:
    """Parse every category file; no cross-category checks (see :func:`findings`)."""
    folder = policy_dir / "categories"
    if not folder.is_dir():
        raise PolicyError(f"no category policies: {folder} is missing")
    out: dict[str, CategoryPolicy] = {}
    docs: dict[str, Any] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            policy = CategoryPolicy.model_validate(doc)
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path}: not valid YAML: {exc}") from None
        except ValidationError as exc:
            raise PolicyError(f"{path}: {describe_validation_error(exc)}") from None
        if policy.name != path.stem:
            raise PolicyError(f"{path}: name {policy.name!r} does not match the file name")
        out[policy.name] = policy
        docs[policy.name] = policy.model_dump(mode="json")
    if "general" not in out:
        raise PolicyError(f"{folder}: the 'general' category is required")
    return CategorySet(out, _hash(docs))


def _tag_findings(name: str, tags: SensitiveData, schema: Schema) -> list[str]:
    """Sensitivity tags that name nothing the ingest schema has (a typo would silently tag nothing)."""
    out: list[str] = []
    for attr in tags.attributes:
        if attr not in schema.profile:
            out.append(f"{name}: sensitive_data.attributes names {attr!r}, which is not a profile attribute")
    for where, fields, known in (
        ("attribute_values", tags.attribute_values, schema.profile),
        ("event_values", tags.event_values, schema.event_fields),
    ):
        for field, values in sorted(fields.items()):
            ft = known.get(field)
            if ft is None or ft.values is None:
                out.append(
                    f"{name}: sensitive_data.{where} names {field!r}, which is not a field with a public "
                    "domain (a category or list field)"
                )
                continue
            unknown = sorted(set(values) - set(ft.values))
            if unknown:
                out.append(
                    f"{name}: sensitive_data.{where}.{field} lists {unknown}, not in the field's domain"
                )
    for etype in tags.event_types:
        if etype not in schema.event_types:
            out.append(f"{name}: sensitive_data.event_types names {etype!r}, which is not an event type")
    return out


def findings(cats: CategorySet, schema: Schema | None = None) -> list[str]:
    """Every way a stigmatized category is looser than general, dimensions that cannot be keys, and
    sensitivity tags that are misplaced or name nothing in the ingest ``schema``.

    A breakdown over a dimension without a public, single-valued domain could not use public keys,
    so it is refused here.
    """
    g = cats.get("general")
    out: list[str] = []
    for name, c in sorted(cats.categories.items()):
        if not c.stigmatized and not c.sensitive_data.is_empty():
            out.append(
                f"{name}: tags sensitive data but is not stigmatized; only a stigmatized category may "
                "(its rules must be stricter than general's)"
            )
        if schema is not None:
            out += _tag_findings(name, c.sensitive_data, schema)
            consent = schema.profile.get(c.consent_attribute)
            if consent is None or consent.type != "bool":
                out.append(
                    f"{name}: consent_attribute {c.consent_attribute!r} is not a boolean profile attribute "
                    "of the ingest policy (nobody could ever be counted)"
                )
            profile_dimensions = schema.breakdown_dimensions()
            for dim in c.breakdowns.allowed:
                if dim not in profile_dimensions:
                    out.append(f"{name}: breakdown {dim!r} is not a profile attribute")
                elif not profile_dimensions[dim]:
                    out.append(
                        f"{name}: breakdown {dim!r} has no public single-valued domain "
                        "(lists and free text cannot be keys)"
                    )
        if not c.stigmatized or name == "general":
            continue

        # (field, this category's value, general's, why a larger value is looser)
        numeric = [
            (
                "epsilon_per_release",
                c.epsilon_per_release,
                g.epsilon_per_release,
                "each release reveals more",
            ),
            ("delta", c.delta, g.delta, "a larger chance of failure"),
            (
                "budget.per_recipient",
                c.budget.per_recipient,
                g.budget.per_recipient,
                "a recipient may learn more",
            ),
            (
                "budget.category_cap",
                c.budget.category_cap,
                g.budget.category_cap,
                "all recipients may learn more",
            ),
            (
                "breakdowns.max_dimensions",
                c.breakdowns.max_dimensions,
                g.breakdowns.max_dimensions,
                "finer cells",
            ),
            ("value_clip", c.value_clip, g.value_clip, "one person's spend weighs more"),
            # For these two a smaller value is the looser one: compare them negated.
            ("budget.period_days", -c.budget.period_days, -g.budget.period_days, "the budget refills sooner"),
            ("min_cohort_size", -c.min_cohort_size, -g.min_cohort_size, "smaller groups are released"),
        ]
        for what, mine, general, why in numeric:
            if mine > general:
                out.append(f"{name}: {what} is {abs(mine)}, looser than general's {abs(general)} ({why})")
        extra = sorted(set(c.allowed_dimensions()) - set(g.allowed_dimensions()))
        if extra:
            out.append(f"{name}: allows breakdowns {extra} that general does not")
        unforbidden = sorted(set(g.breakdowns.forbidden) - set(c.breakdowns.forbidden))
        if unforbidden:
            out.append(f"{name}: does not forbid {unforbidden}, which general forbids")
        for kind in ("marketers", "partners"):
            more = sorted(set(getattr(c.recipients, kind)) - set(getattr(g.recipients, kind)))
            if more:
                out.append(f"{name}: grants {kind} {more} that general does not")
        if c.partner_audiences and not g.partner_audiences:
            out.append(f"{name}: allows partner audiences, which general does not")
        if c.consent_attribute == g.consent_attribute:
            out.append(
                f"{name}: uses general's consent attribute {c.consent_attribute!r}; a stigmatized category "
                "needs its own, explicit consent"
            )
    return out


def candidate_findings(documents: dict[str, dict[str, Any]], schema: Schema) -> list[str]:
    """Everything wrong with a candidate policy set given as documents (name -> YAML as JSON), without
    loading it: each document's validation errors, then :func:`findings`."""
    parsed: dict[str, CategoryPolicy] = {}
    problems: list[str] = []
    for name, doc in documents.items():
        try:
            parsed[name] = CategoryPolicy.model_validate(doc)
        except ValidationError as exc:
            problems.append(f"{name}: {describe_validation_error(exc)}")
    if problems:
        return problems
    if "general" not in parsed:
        return ["the 'general' category is required"]
    return findings(CategorySet(parsed, "candidate"), schema)


def load_categories(policy_dir: Path, schema: Schema | None = None) -> CategorySet:
    """Load the category set, refusing it if :func:`findings` reports anything."""
    cats = read_categories(policy_dir)
    problems = findings(cats, schema)
    if problems:
        raise PolicyError(
            f"{policy_dir / 'categories'}: the policy set is refused:\n  " + "\n  ".join(problems)
        )
    return cats


_FIELDS_STRICTER_WHEN_LOWER = (
    "epsilon_per_release",
    "delta",
    "budget.per_recipient",
    "budget.category_cap",
    "breakdowns.max_dimensions",
    "value_clip",
)
_FIELDS_STRICTER_WHEN_HIGHER = ("min_cohort_size", "budget.period_days")


def _get(policy: CategoryPolicy, dotted: str) -> Any:
    value: Any = policy
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _tag_items(a: SensitiveData, b: SensitiveData) -> list[tuple[str, set[str], set[str]]]:
    """(tag path, old values, new values) for every tag list of either side."""
    out = [
        ("attributes", set(a.attributes), set(b.attributes)),
        ("event_types", set(a.event_types), set(b.event_types)),
    ]
    for where in ("attribute_values", "event_values"):
        x: dict[str, tuple[str, ...]] = getattr(a, where)
        y: dict[str, tuple[str, ...]] = getattr(b, where)
        out += [(f"{where}.{f}", set(x.get(f, ())), set(y.get(f, ()))) for f in sorted(set(x) | set(y))]
    return out


def diff(old: CategorySet, new: CategorySet) -> list[str]:
    """What got looser or stricter between two policy sets, one line per change."""
    out: list[str] = []
    for name in sorted(set(old.categories) | set(new.categories)):
        if name not in new.categories:
            out.append(f"{name}: removed")
            continue
        if name not in old.categories:
            out.append(f"{name}: added")
            continue
        a, b = old.categories[name], new.categories[name]
        for f in _FIELDS_STRICTER_WHEN_LOWER + _FIELDS_STRICTER_WHEN_HIGHER:
            x, y = _get(a, f), _get(b, f)
            if x != y:
                stricter = (y < x) if f in _FIELDS_STRICTER_WHEN_LOWER else (y > x)
                out.append(f"{name}: {f} {x} -> {y} ({'stricter' if stricter else 'LOOSER'})")
        for f, more_is_looser in (
            ("breakdowns.allowed", True),
            ("breakdowns.forbidden", False),
            ("recipients.marketers", True),
            ("recipients.partners", True),
        ):
            x, y = set(_get(a, f)), set(_get(b, f))
            if y - x:
                out.append(f"{name}: {f} adds {sorted(y - x)} ({'LOOSER' if more_is_looser else 'stricter'})")
            if x - y:
                out.append(
                    f"{name}: {f} drops {sorted(x - y)} ({'stricter' if more_is_looser else 'LOOSER'})"
                )
        for tag, x, y in _tag_items(a.sensitive_data, b.sensitive_data):
            if y - x:
                out.append(f"{name}: sensitive_data.{tag} adds {sorted(y - x)} (stricter)")
            if x - y:
                out.append(f"{name}: sensitive_data.{tag} drops {sorted(x - y)} (LOOSER)")
        for f in ("partner_audiences", "stigmatized", "consent_attribute"):
            x, y = _get(a, f), _get(b, f)
            if x != y:
                looser = (f == "partner_audiences" and y) or (f == "stigmatized" and not y)
                out.append(f"{name}: {f} {x} -> {y}{' (LOOSER)' if looser else ''}")
    return out
