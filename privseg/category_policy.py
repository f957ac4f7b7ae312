"""Category policies (``policies/categories/*.yaml``): the part the segment engine needs.

Each category names whether it is stigmatized and the consent attribute a person must have (true) to
be counted in any segment of that category. The release rules are added by the release engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privseg.errors import PolicyError


class CategoryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="Must match the file name.")
    stigmatized: bool = Field(description="Stigmatized categories must be stricter than general.")
    consent_attribute: str = Field(
        description="Boolean profile attribute that must be true for a person to be counted at all."
    )


@dataclass(frozen=True)
class CategorySet:
    categories: dict[str, CategoryPolicy]

    def get(self, name: str) -> CategoryPolicy:
        try:
            return self.categories[name]
        except KeyError:
            raise PolicyError(
                f"unknown category {name!r}; known categories: {sorted(self.categories)}"
            ) from None


def load_categories(policy_dir: Path) -> CategorySet:
    folder = policy_dir / "categories"
    if not folder.is_dir():
        raise PolicyError(f"no category policies: {folder} is missing")
    out: dict[str, CategoryPolicy] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            policy = CategoryPolicy.model_validate(doc)
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path}: not valid YAML: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise PolicyError(f"{path}: {problems}") from None
        if policy.name != path.stem:
            raise PolicyError(f"{path}: name {policy.name!r} does not match the file name")
        out[policy.name] = policy
    if "general" not in out:
        raise PolicyError(f"{folder}: the 'general' category is required")
    return CategorySet(out)
