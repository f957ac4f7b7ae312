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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privseg.errors import PolicyError, describe_validation_error
from privseg.yamltext import parse_yaml


class _Strict(BaseModel):
    # YAML's .inf and .nan are no budget, clip or epsilon (an infinite budget failed every charge).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Objective = Literal["brand", "performance"]
OBJECTIVES: tuple[Objective, ...] = ("brand", "performance")


class Budget(_Strict):
    period_days: int = Field(30, ge=1, le=3650, description="Length of the rolling budget period, in days.")
    per_recipient: float = Field(
        gt=0, description="Total epsilon one recipient may spend on this category within a period (unitless)."
    )
    category_cap: float = Field(
        gt=0, description="Total epsilon all recipients together may spend on this category within a period."
    )
    objectives: dict[Objective, float] = Field(
        default_factory=dict,
        description="Optional split of per_recipient between objectives: the share (0 to 1] of it that "
        "releases of brand or of performance segments may spend; shares sum to at most 1. A release is "
        "charged to the objectives of its segments (one over both counts against both). Empty: no split.",
    )

    @model_validator(mode="after")
    def _shares(self) -> Budget:
        if any(not 0 < share <= 1 for share in self.objectives.values()):
            raise ValueError("objectives: each share must be in (0, 1]")
        if sum(self.objectives.values()) > 1 + 1e-9:
            raise ValueError("objectives: the shares sum to more than 1")
        return self

    def objective_cap(self, objective: Objective) -> float:
        """The epsilon one recipient may spend on ``objective`` in a period (per_recipient if no split;
        0 for an objective a split leaves out)."""
        if not self.objectives:
            return self.per_recipient
        return self.per_recipient * self.objectives.get(objective, 0.0)


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
    # At most a million: spend is summed and noised in 64-bit integer cents, 1e8 a person at the bound,
    # so that even 1e10 people's total fits.
    value_clip: float = Field(
        500.0,
        gt=0,
        le=1_000_000,
        description="Per-person spend is clipped to [0, value_clip] before summing (currency).",
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
    its own (the ledger charges every member, see release/engine.py)."""
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
            # No split here: every member category is charged on its own, under its own split.
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
            doc = parse_yaml(path.read_text(encoding="utf-8"))
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
