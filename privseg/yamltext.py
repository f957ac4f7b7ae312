"""YAML documents (policies, segment definitions) parsed safely, with libyaml when PyYAML has it."""

from __future__ import annotations

from typing import Any

import yaml

# The C safe loader builds the same documents as yaml.SafeLoader (checked on every file in
# policies/) about 8x faster; PyYAML wheels ship it, a source build may not.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``: plain data only, never Python objects."""
    return yaml.load(text, Loader=_LOADER)  # noqa: S506  (a safe loader, C or Python)
