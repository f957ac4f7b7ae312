"""The API's published shapes: the problem document every error uses, and the response models of the
routes whose answers are not already a domain model. Responses are built by validating the domain's
answer against these, so the OpenAPI document is what the API really sends."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from privseg.apikeys import Role
from privseg.policy.categories import CategoryPolicy
from privseg.policy.ingest import IngestPolicy


class Problem(BaseModel):
    """An RFC 9457 problem: every error of this API, never with a stack trace or an input value."""

    type: str = Field(description="Stable URI of the error class, e.g. .../problems/budget-exhausted.")
    title: str
    status: int
    detail: str = Field(description="What was wrong and where (file, row, field), never a value.")


PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}  # registered by create_app's openapi()


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": PROBLEM_SCHEMA}}}


# Documented on every operation (the middleware and role checks can answer any /v1 route with these).
ERRORS: dict[int | str, dict[str, Any]] = {
    401: _problem("No valid API key (the response carries WWW-Authenticate)."),
    403: _problem("The key's role or identity may not do this (policy, recipient, owner)."),
    404: _problem("No such segment, snapshot, release or route."),
    409: _problem("A conflicting state: a stale snapshot, a concurrent identical release, a change in use."),
    413: _problem("The body is larger than allowed (JSON 1 MiB; uploads PRIVSEG_MAX_UPLOAD_BYTES)."),
    422: _problem("The request is invalid; the detail names the field, never the value."),
    429: _problem("The release budget is exhausted; the detail states what remains."),
    500: _problem("An unexpected error; nothing about it is shown."),
}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- admin -----------------------------------------------------------------------------------------------
class Ingested(BaseModel):
    kind: Literal["profiles", "events"]
    source: str = Field(description="The uploaded file's name.")
    stored: bool = Field(description="False when the same content was stored before (idempotent).")
    batch_id: int
    rows: int
    people: int
    dropped_columns: list[str] = Field(description="Columns the ingest policy drops.")
    generalized_columns: list[str] = Field(description="Columns stored generalized (e.g. age -> age_band).")
    expired_events: int = Field(description="Events older than the retention period, not stored.")
    mode: Literal["patch", "replace"] | None
    replaced_batches: list[int]


class KindStatus(BaseModel):
    model_config = ConfigDict(extra="allow")  # events also carry first and last timestamps
    batches: int
    rows: int
    bytes: int
    people: int


class StoreStatus(BaseModel):
    namespace: str | None
    key_version: int | None
    profiles: KindStatus
    events: KindStatus


class Erased(BaseModel):
    profile_rows: int
    event_rows: int
    batches_rewritten: int
    snapshots_rewritten: int
    found: bool


class KeyVersion(BaseModel):
    version: int
    created_at: str


class KeyStatus(BaseModel):
    """The keyset without key bytes."""

    namespace: str
    created_at: str
    primary: int
    versions: list[KeyVersion]
    store_key_version: int | None


class SnapshotInfo(BaseModel):
    id: int
    as_of: str
    computed_at: str
    pruned: bool
    segments: dict[str, int] = Field(description="Segment -> the definition version used (never a size).")
    traits: dict[str, int] = Field(description="Trait -> the definition version used.")
    batches: list[int]
    policy_hash: str | None
    key_version: int | None
    people: int | None = Field(None, description="Exact head count: admins only (an operator's figure).")


class SnapshotStatus(BaseModel):
    snapshot: SnapshotInfo | None
    stale: bool
    reasons: list[str]


class Recomputed(BaseModel):
    snapshot: SnapshotInfo
    timings: dict[str, float] = Field(description="Seconds per phase (features_count is a count).")


class ApiKeyRow(BaseModel):
    id: int
    name: str
    role: Role
    principal: str
    created_at: str
    revoked_at: str | None


class ApiKeyBody(Body):
    role: Role = Field(description="admin, marketer, compliance, partner or intake (a data pipeline).")
    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="The key's name; for a marketer, the recipient id its releases go to.",
    )
    partner: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_]*$", description="Partner keys only: the partner id the key acts as."
    )

    model_config = ConfigDict(json_schema_extra={"examples": [{"role": "marketer", "name": "growth_team"}]})


class CreatedKey(BaseModel):
    key_id: int
    name: str
    role: Role
    principal: str
    token: str = Field(description="Shown once; only a keyed hash is stored.")
    note: str


class ErasureBody(Body):
    id: str = Field(min_length=1, description="The data subject's raw identifier (never logged or stored).")

    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "C-000123"}]})


# -- marketer ----------------------------------------------------------------------------------------------
class Definition(BaseModel):
    kind: Literal["segment", "trait"]
    id: str
    version: int
    body: dict[str, Any] = Field(description="The definition as applied.")
    created_at: str
    owner: str
    editor: str
    retired: bool
    category: list[str] | None = Field(None, description="A segment's effective categories.")


class Applied(BaseModel):
    kind: Literal["segment", "trait"]
    id: str
    version: int
    status: Literal["created", "updated", "unchanged", "retired"]


class Explanation(BaseModel):
    segment: str
    explanation: str


class IntakeAccepted(BaseModel):
    received: int
    stored: int = Field(description="Events stored by this call.")
    profiles: int = Field(description="Profile patches stored by this call (identify calls).")
    duplicates: int = Field(description="Messages stored before (a retry) or repeated in the batch.")
    skipped: int = Field(description="Messages the intake mapping does not cover, or without a userId.")
    expired: int = Field(description="Events older than the retention.")
    batch_id: int | None


class MarketerBudget(BaseModel):
    category: str
    remaining_epsilon: float
    per_recipient: float
    period_days: int
    objectives: dict[str, float] = Field(
        default_factory=dict, description="Epsilon left per objective, when the category splits its budget."
    )


# -- compliance ----------------------------------------------------------------------------------------------
class PolicySet(BaseModel):
    policy_hash: str
    categories: dict[str, CategoryPolicy]
    ingest: IngestPolicy


class PolicyCandidate(Body):
    categories: dict[str, dict[str, Any]] = Field(description="Category name -> the YAML document, as JSON.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "categories": {
                        "general": {
                            "name": "general",
                            "stigmatized": False,
                            "consent_attribute": "consent_marketing",
                            "epsilon_per_release": 0.5,
                            "delta": 0.0,
                            "budget": {"period_days": 30, "per_recipient": 10.0, "category_cap": 40.0},
                            "min_cohort_size": 50,
                            "breakdowns": {
                                "allowed": ["age_band", "region"],
                                "forbidden": [],
                                "max_dimensions": 2,
                            },
                            "recipients": {"marketers": ["growth_team"], "partners": []},
                            "partner_audiences": False,
                            "value_clip": 500.0,
                        }
                    }
                }
            ]
        }
    )


class Validation(BaseModel):
    valid: bool = Field(description="Whether the set would be loaded (no finding).")
    findings: list[str]
    unbuildable_definitions: list[str] = Field(
        default_factory=list,
        description=(
            "Stored segments and traits a snapshot under a valid candidate could not compute, each with "
            "why; one of them would stop every snapshot until it is changed or retired."
        ),
    )


class ObjectiveSpend(BaseModel):
    spent: float
    remaining: float


class RecipientSpend(BaseModel):
    recipient: str
    spent: float
    releases: int
    remaining: float
    objectives: dict[str, ObjectiveSpend] = Field(
        default_factory=dict, description="Spent and left per objective, when the category splits its budget."
    )


class CategoryBudget(BaseModel):
    category: str
    period_days: int
    category_cap: float
    category_spent: float
    category_remaining: float
    objective_shares: dict[str, float] = Field(
        default_factory=dict, description="The category's split of per_recipient by objective (empty: none)."
    )
    recipients: list[RecipientSpend]


class AuditEntry(BaseModel):
    seq: int
    at: str
    event: str
    details: dict[str, Any]
    mac: str


class Verification(BaseModel):
    ok: bool
    entries: int
    first_bad_seq: int | None
    problem: str | None


class Anchor(BaseModel):
    entries: int
    last_mac: str
    at: str
    namespace: str
    signature: str
