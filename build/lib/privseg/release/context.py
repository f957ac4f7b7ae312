"""What release code reads and writes, passed explicitly (never the whole deployment)."""

from __future__ import annotations

from dataclasses import dataclass

from privseg.keyset import Keyset
from privseg.policy.categories import CategorySet
from privseg.schema import Schema
from privseg.segments.sensitivity import SensitivityIndex
from privseg.store import Store


@dataclass(frozen=True)
class ReleaseContext:
    # Snapshots, profiles and events; its database also holds the ledger, the releases and the audit log.
    store: Store
    # Signs the audit entries a release writes (the release, or the refusal).
    keyset: Keyset
    # The category policies in force, loaded once at start-up; reading them writes nothing.
    categories: CategorySet
    schema: Schema
    # What each dimension and event filter reads, to find every category a release touches.
    sensitivity: SensitivityIndex
