"""What changed between two category policy sets, marked LOOSER or STRICTER for compliance review."""

from __future__ import annotations

from typing import Any

from privseg.policy.categories import OBJECTIVES, CategoryPolicy, CategorySet, SensitiveData

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
        for objective in OBJECTIVES if a.budget.objectives or b.budget.objectives else ():
            x, y = a.budget.objective_cap(objective), b.budget.objective_cap(objective)
            if x != y:
                verdict = "stricter" if y < x else "LOOSER"
                out.append(f"{name}: budget for {objective} {x:g} -> {y:g} epsilon per recipient ({verdict})")
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
