"""Compliance routes: the policy set, candidate checks, the budget ledger, the audit log, releases."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from fastapi import APIRouter, Query

from privseg import audit, ledger, release
from privseg.api.deps import Compliance, DepDep
from privseg.api.routes.common import V1, IdParam
from privseg.api.schemas import (
    ERRORS,
    Anchor,
    AuditEntry,
    CategoryBudget,
    PolicyCandidate,
    PolicySet,
    Validation,
    Verification,
)
from privseg.db import MAX_ID
from privseg.policy.checks import candidate_set
from privseg.release.records import ReleaseRecord
from privseg.segments import definitions

router = APIRouter(prefix=V1, responses=ERRORS, tags=["compliance"])


@router.get("/policies")
def policies(dep: DepDep, _who: Compliance) -> PolicySet:
    """The category policies in force (with their hash) and the ingest policy."""
    cats = dep.categories
    return PolicySet(policy_hash=cats.content_hash, categories=cats.categories, ingest=dep.ingest_policy)


@router.post("/policies/validate")
def validate_policies(body: PolicyCandidate, dep: DepDep, _who: Compliance) -> Validation:
    """Check a candidate policy set without loading it, and name the stored definitions that a valid
    candidate would leave uncomputable (a snapshot computes them all at once)."""
    cats, problems = candidate_set(body.categories, dep.schema)
    unbuildable = (
        []
        if cats is None or problems
        else definitions.unbuildable(definitions.active(dep.store.conn), schema=dep.schema, categories=cats)
    )
    return Validation(valid=not problems, findings=problems, unbuildable_definitions=unbuildable)


@router.get("/budget")
def budget(dep: DepDep, _who: Compliance) -> list[CategoryBudget]:
    """Spent and remaining budget per category and recipient, in each category's current period."""
    return [
        CategoryBudget.model_validate(r)
        for r in ledger.status(dep.store.conn, dep.categories, datetime.now(UTC))
    ]


@router.get("/audit")
def audit_log(
    dep: DepDep,
    _who: Compliance,
    after: int = Query(0, ge=0, le=MAX_ID),
    limit: int = Query(100, ge=1, le=1000),
) -> list[AuditEntry]:
    """Audit entries after a sequence number, oldest first."""
    return [
        AuditEntry.model_validate(asdict(e)) for e in audit.entries(dep.store.conn, after=after, limit=limit)
    ]


@router.get("/audit/verify")
def audit_verify(dep: DepDep, _who: Compliance) -> Verification:
    """The HMAC chain, the ledger against the audited charges and its day totals against its charges."""
    return Verification.model_validate(asdict(audit.verify_all(dep.store.conn, dep.keyset)))


@router.get("/audit/anchor")
def audit_anchor(dep: DepDep, _who: Compliance) -> Anchor:
    """A signed head of the audit log: keep it outside the server; `privseg audit verify --anchor`
    then detects entries cut from the end."""
    return Anchor.model_validate(audit.anchor(dep.store.conn, dep.keyset))


@router.get("/releases/{release_id}")
def release_metadata(release_id: IdParam, dep: DepDep, _who: Compliance) -> ReleaseRecord:
    """What was released to whom, at what cost and under which policy; not the released values."""
    return release.metadata(dep.store.conn, release_id)
