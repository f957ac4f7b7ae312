"""Marketer routes: definitions (owned by their author) and the caller's own budget. Releases are in
releases.py, one route per release kind."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from privseg import ledger
from privseg.api.deps import AdminOrMarketer, DepDep, Marketer
from privseg.api.routes.common import V1
from privseg.api.schemas import ERRORS, Applied, Definition, Explanation, MarketerBudget
from privseg.errors import NotFound
from privseg.segments import definitions, document

router = APIRouter(prefix=V1, responses=ERRORS, tags=["marketer"])


@router.get("/segments")
def list_segments(dep: DepDep, _who: Marketer) -> list[Definition]:
    """Active definitions; a segment's ``category`` is its effective one (derived from what it reads)."""
    compiler = dep.compiler()
    return [
        Definition(
            **asdict(s),
            category=list(compiler.effective(s.id).categories) if s.kind == "segment" else None,
        )
        for s in definitions.active(dep.store.conn).values()
    ]


@router.post("/segments", tags=["admin"])
async def apply_segments(body: document.Document, dep: DepDep, who: AdminOrMarketer) -> list[Applied]:
    """Apply segment and trait definitions (a segment, a list, or {segments, traits}), all or none.
    The caller owns new definitions; only the owner or an admin may change existing ones."""
    docs = definitions.split_document(document.as_data(body), "request body")
    results = await run_in_threadpool(
        definitions.apply_documents,
        dep.store.conn,
        dep.keyset,
        docs,
        schema=dep.schema,
        categories=dep.categories,
        actor=who.actor,
    )
    return [Applied.model_validate(asdict(r)) for r in results]


@router.delete("/segments/{segment_id}", tags=["admin"])
def retire_segment(segment_id: str, dep: DepDep, who: AdminOrMarketer) -> Applied:
    """Retire a segment (its owner or an admin); its history is kept. Refused while referenced."""
    r = definitions.retire(
        dep.store.conn,
        dep.keyset,
        "segment",
        segment_id,
        schema=dep.schema,
        categories=dep.categories,
        actor=who.actor,
    )
    return Applied.model_validate(asdict(r))


@router.get("/segments/{segment_id}/explain")
def explain(segment_id: str, dep: DepDep, _who: Marketer) -> Explanation:
    """What a segment means, in words."""
    compiler = dep.compiler()
    if segment_id not in compiler.defs:
        raise NotFound(f"no active segment {segment_id!r}")
    return Explanation(segment=segment_id, explanation=compiler.explain(segment_id))


@router.get("/budget/me")
def my_budget(dep: DepDep, who: Marketer) -> list[MarketerBudget]:
    """What the caller may still spend, per category it receives releases for."""
    rows = ledger.budget_of(dep.store.conn, dep.categories, who.principal, datetime.now(UTC))
    return [MarketerBudget.model_validate(r) for r in rows]
