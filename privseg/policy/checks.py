"""Checks of a category policy set: every way a stigmatized category is looser than general, keys
without a public domain, misplaced sensitivity tags. A set with findings is refused at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from privseg.errors import PolicyError, describe_validation_error
from privseg.policy.categories import OBJECTIVES, CategoryPolicy, CategorySet, SensitiveData, read_categories
from privseg.schema import Schema


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


def _schema_findings(name: str, c: CategoryPolicy, schema: Schema) -> list[str]:
    """Tags, consent and breakdowns that name nothing usable in the ingest schema."""
    out = _tag_findings(name, c.sensitive_data, schema)
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
            # A breakdown without a public, single-valued domain could not use public keys.
            out.append(
                f"{name}: breakdown {dim!r} has no public single-valued domain "
                "(lists and free text cannot be keys)"
            )
    return out


def _looser_than_general(name: str, c: CategoryPolicy, g: CategoryPolicy) -> list[str]:
    """Every axis on which a stigmatized category is looser than general."""
    out: list[str] = []
    # (field, this category's value, general's, why a larger value is looser)
    numeric = [
        ("epsilon_per_release", c.epsilon_per_release, g.epsilon_per_release, "each release reveals more"),
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
    numeric += [
        (
            f"budget for {objective}",
            c.budget.objective_cap(objective),
            g.budget.objective_cap(objective),
            "a recipient may learn more for this objective",
        )
        for objective in OBJECTIVES
        # Without a split anywhere the objective caps are per_recipient, already compared above.
        if c.budget.objectives or g.budget.objectives
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


def findings(cats: CategorySet, schema: Schema | None = None) -> list[str]:
    """Every way a stigmatized category is looser than general, dimensions that cannot be keys, and
    sensitivity tags that are misplaced or name nothing in the ingest ``schema``."""
    g = cats.get("general")
    out: list[str] = []
    for name, c in sorted(cats.categories.items()):
        if not c.stigmatized and not c.sensitive_data.is_empty():
            out.append(
                f"{name}: tags sensitive data but is not stigmatized; only a stigmatized category may "
                "(its rules must be stricter than general's)"
            )
        if schema is not None:
            out += _schema_findings(name, c, schema)
        if c.stigmatized and name != "general":
            out += _looser_than_general(name, c, g)
    return out


def candidate_findings(documents: dict[str, dict[str, Any]], schema: Schema) -> list[str]:
    """Everything wrong with a candidate policy set given as documents (name -> YAML as JSON), without
    loading it: each document's validation errors, then :func:`findings`."""
    return candidate_set(documents, schema)[1]


def candidate_set(
    documents: dict[str, dict[str, Any]], schema: Schema
) -> tuple[CategorySet | None, list[str]]:
    """A candidate policy set given as documents, and everything wrong with it (see
    :func:`candidate_findings`); the set is None when a document does not parse."""
    parsed: dict[str, CategoryPolicy] = {}
    problems: list[str] = []
    for name, doc in documents.items():
        try:
            parsed[name] = CategoryPolicy.model_validate(doc)
        except ValidationError as exc:
            problems.append(f"{name}: {describe_validation_error(exc)}")
    if problems:
        return None, problems
    if "general" not in parsed:
        return None, ["the 'general' category is required"]
    cats = CategorySet(parsed, "candidate")
    return cats, findings(cats, schema)


def load_categories(policy_dir: Path, schema: Schema | None = None) -> CategorySet:
    """Load the category set, refusing it if :func:`findings` reports anything."""
    cats = read_categories(policy_dir)
    problems = findings(cats, schema)
    if problems:
        raise PolicyError(
            f"{policy_dir / 'categories'}: the policy set is refused:\n  " + "\n  ".join(problems)
        )
    return cats
