"""The /v1 routes. Thin: each checks the caller's role, then calls the same service function the CLI
calls. Bodies are pydantic models; the recipient of a release is always the caller's own identity."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from privseg import apikeys, audit, ledger, release
from privseg.api.deps import Admin, AdminOrMarketer, Compliance, DepDep, Marketer, Partner
from privseg.category_policy import candidate_findings
from privseg.deployment import Deployment
from privseg.errors import InvalidInput, NotFound, PayloadTooLarge
from privseg.ingest import ingest_files
from privseg.maintenance import erase_subject
from privseg.release_plan import Measure
from privseg.segments import definitions, engine
from privseg.sources import check_encoding, detect_format
from privseg.uploads import upload_folder, upload_name


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
router = APIRouter(prefix="/v1", responses=ERRORS)
# SQLite integers are 64-bit signed: larger ids are refused as invalid instead of overflowing.
MAX_ID = 2**62
IdParam = Annotated[int, PathParam(ge=1, le=MAX_ID)]


def _json(result: dict[str, Any]) -> Response:
    # Releases are plain JSON already: skip FastAPI's generic encoder, which walks every cell.
    return Response(json.dumps(result), media_type="application/json")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- admin -------------------------------------------------------------------------------------------
def _recompute(dep: Deployment) -> None:
    """Recompute a stale snapshot after ingestion, after the response has gone out."""
    fresh = dep.for_request()
    try:
        stale = engine.staleness(
            fresh.store, engine.latest(fresh.store.conn), policy_hash=fresh.categories.content_hash
        )
        if stale and definitions.active(fresh.store.conn):
            engine.compute_snapshot(store=fresh.store, compiler=fresh.compiler(), keyset=fresh.keyset)
    finally:
        fresh.close()


@router.post("/ingest/{kind}", tags=["admin"])
async def ingest(
    kind: Literal["profiles", "events"],
    request: Request,
    dep: DepDep,
    _who: Admin,
    background: BackgroundTasks,
    filename: str = Query(
        description="Source file name; its ending gives the format (.csv, .csv.gz, .parquet, .ndjson)."
    ),
    mode: Annotated[
        Literal["patch", "replace"],
        Query(
            description="Profiles: patch updates only the columns the file has; replace makes the file "
            "these people's whole profile."
        ),
    ] = "patch",
    as_of: Annotated[
        datetime | None, Query(description="Reference time for retention and ages (default now).")
    ] = None,
    separator: Annotated[
        str | None, Query(max_length=1, description="CSV separator (default: detected).")
    ] = None,
    encoding: Annotated[str, Query(max_length=32, description="CSV text encoding.")] = "utf-8",
) -> list[dict[str, Any]]:
    """Upload one batch as the raw request body. It is streamed to a private temporary file (never
    held in memory), validated and stored all-or-nothing; the snapshot is recomputed in the background."""
    name = upload_name(filename)
    if kind == "events" and mode != "patch":
        raise InvalidInput("mode: replace applies to profiles only")
    check_encoding(encoding)  # before the body is read
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    detect_format(Path(name))  # refuse an unknown format before reading the body
    limit = dep.settings.max_upload_bytes
    # A private folder per upload, so the file keeps its own name (errors name it) and nothing clashes.
    with upload_folder(dep.settings.uploads_path) as folder:
        tmp = folder / name
        size = 0
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"the upload exceeds the limit of {limit} bytes (PRIVSEG_MAX_UPLOAD_BYTES)"
                    )
                fh.write(chunk)
        if size == 0:
            raise InvalidInput(f"{name}: the upload is empty")
        results = await run_in_threadpool(
            ingest_files,
            store=dep.store,
            keyset=dep.keyset,
            policy=dep.ingest_policy,
            kind=kind,
            paths=[tmp],
            now=as_of,
            max_decompressed_bytes=dep.settings.max_decompressed_bytes,
            mode=mode,
            separator=separator,
            encoding=encoding,
        )
    if any(r.stored for r in results):
        background.add_task(_recompute, request.app.state.deployment)
    return [{**r.__dict__, "source": name} for r in results]


@router.get("/store", tags=["admin"])
def store_status(dep: DepDep, _who: Admin) -> dict[str, Any]:
    return dep.store.status()


class ErasureBody(_Body):
    id: str = Field(min_length=1, description="The data subject's raw identifier (never logged or stored).")


@router.post("/erase", tags=["admin"])
def erase(body: ErasureBody, dep: DepDep, _who: Admin) -> dict[str, Any]:
    result = erase_subject(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id=body.id)
    return {**result.__dict__, "found": result.found}


@router.get("/keys", tags=["admin"])
def key_status(dep: DepDep, _who: Admin) -> dict[str, Any]:
    return {**dep.keyset.describe(), "store_key_version": dep.store.key_version()}


@router.get("/snapshots", tags=["admin", "marketer"])
def snapshot_status(dep: DepDep, who: AdminOrMarketer) -> dict[str, Any]:
    snap = engine.latest(dep.store.conn)
    reasons = engine.staleness(dep.store, snap, policy_hash=dep.categories.content_hash)
    info = None if snap is None else snap.public()
    if info is not None and snap is not None and who.role == "admin":
        # Admins see the exact head count (store-level, an operator's figure); marketers do not: two
        # snapshots apart, it shows someone joined or left.
        info["people"] = snap.people
    return {"snapshot": info, "stale": bool(reasons), "reasons": reasons}


@router.post("/snapshots", tags=["admin"])
def recompute(dep: DepDep, _who: Admin) -> dict[str, Any]:
    snap, timings = engine.compute_snapshot(store=dep.store, compiler=dep.compiler(), keyset=dep.keyset)
    return {"snapshot": snap.public() | {"people": snap.people}, "timings": timings}


class ApiKeyBody(_Body):
    role: apikeys.Role
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    partner: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$")


@router.get("/apikeys", tags=["admin"])
def list_keys(dep: DepDep, _who: Admin) -> list[dict[str, Any]]:
    return apikeys.listing(dep.store.conn)


@router.post("/apikeys", tags=["admin"], status_code=201)
def create_key(body: ApiKeyBody, dep: DepDep, _who: Admin) -> dict[str, Any]:
    key, token = apikeys.create(
        dep.store.conn, dep.keyset, role=body.role, name=body.name, partner=body.partner
    )
    return {**key.__dict__, "token": token, "note": "shown once; only a keyed hash is stored"}


@router.delete("/apikeys/{key_id}", tags=["admin"], status_code=204)
def revoke_key(key_id: IdParam, dep: DepDep, _who: Admin) -> None:
    apikeys.revoke(dep.store.conn, dep.keyset, key_id)


# -- marketer ------------------------------------------------------------------------------------------
@router.get("/segments", tags=["marketer"])
def list_segments(dep: DepDep, _who: Marketer) -> list[dict[str, Any]]:
    """Active definitions; a segment's ``category`` is its effective one (derived from what it reads)."""
    compiler = dep.compiler()
    out = []
    for s in definitions.active(dep.store.conn).values():
        row = dict(s.__dict__)
        if s.kind == "segment":
            row["category"] = list(compiler.effective(s.id).categories)
        out.append(row)
    return out


@router.post("/segments", tags=["marketer", "admin"])
async def apply_segments(request: Request, dep: DepDep, who: AdminOrMarketer) -> list[dict[str, Any]]:
    """Apply segment and trait definitions (a segment, a list, or {segments, traits}), all or none.
    The caller owns new definitions; only the owner or an admin may change existing ones."""
    try:
        doc = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("the body is not valid JSON") from None
    docs = definitions.split_document(doc, "request body")
    results = await run_in_threadpool(
        definitions.apply_documents,
        dep.store.conn,
        dep.keyset,
        docs,
        schema=dep.schema,
        categories=dep.categories,
        actor=who.actor,
    )
    return [r.__dict__ for r in results]


@router.delete("/segments/{segment_id}", tags=["marketer", "admin"])
def retire_segment(segment_id: str, dep: DepDep, who: AdminOrMarketer) -> dict[str, Any]:
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
    return dict(r.__dict__)


@router.get("/segments/{segment_id}/explain", tags=["marketer"])
def explain(segment_id: str, dep: DepDep, _who: Marketer) -> dict[str, str]:
    compiler = dep.compiler()
    if segment_id not in compiler.defs:
        raise NotFound(f"no active segment {segment_id!r}")
    return {"segment": segment_id, "explanation": compiler.explain(segment_id)}


class CohortBody(_Body):
    segments: list[str] = Field(min_length=1, max_length=20)
    breakdown: list[str] = Field(default_factory=list, max_length=4)
    measures: list[Measure] = Field(default_factory=lambda: list[Measure](["count"]), min_length=1)
    spend_event: str = "purchase"
    spend_where: dict[str, Any] = Field(default_factory=dict)
    spend_window_days: int = Field(365, ge=1, le=3650)
    dry_run: bool = False


@router.post("/reports/cohort", tags=["marketer"])
def cohort_report(body: CohortBody, dep: DepDep, who: Marketer) -> Response:
    req = release.CohortReportRequest(**body.model_dump(), recipient=who.principal)
    return _json(release.cohort_report(dep, req))


class LiftBody(_Body):
    treatment: str
    control: str
    conversion: str
    dry_run: bool = False


@router.post("/reports/lift", tags=["marketer"])
def lift_report(body: LiftBody, dep: DepDep, who: Marketer) -> Response:
    return _json(release.lift(dep, release.LiftRequest(**body.model_dump(), recipient=who.principal)))


class MovementBody(_Body):
    segments: list[str] = Field(min_length=2, max_length=6)
    from_snapshot: int = Field(ge=1, le=MAX_ID)
    to_snapshot: int | None = Field(None, ge=1, le=MAX_ID)
    dry_run: bool = False


@router.post("/reports/movement", tags=["marketer"])
def movement_report(body: MovementBody, dep: DepDep, who: Marketer) -> Response:
    return _json(release.movement(dep, release.MovementRequest(**body.model_dump(), recipient=who.principal)))


@router.get("/budget/me", tags=["marketer"])
def my_budget(dep: DepDep, who: Marketer) -> list[dict[str, Any]]:
    return ledger.budget_of(dep.store.conn, dep.categories, who.principal, datetime.now(UTC))


# -- compliance ------------------------------------------------------------------------------------------
@router.get("/policies", tags=["compliance"])
def policies(dep: DepDep, _who: Compliance) -> dict[str, Any]:
    cats = dep.categories
    return {
        "policy_hash": cats.content_hash,
        "categories": {n: c.model_dump(mode="json") for n, c in cats.categories.items()},
        "ingest": dep.ingest_policy.model_dump(mode="json"),
    }


class PolicyCandidate(_Body):
    categories: dict[str, dict[str, Any]] = Field(description="Category name -> the YAML document, as JSON.")


@router.post("/policies/validate", tags=["compliance"])
def validate_policies(body: PolicyCandidate, dep: DepDep, _who: Compliance) -> dict[str, Any]:
    """Check a candidate policy set without loading it."""
    problems = candidate_findings(body.categories, dep.schema)
    return {"valid": not problems, "findings": problems}


@router.get("/budget", tags=["compliance"])
def budget(dep: DepDep, _who: Compliance) -> list[dict[str, Any]]:
    return ledger.status(dep.store.conn, dep.categories, datetime.now(UTC))


@router.get("/audit", tags=["compliance"])
def audit_log(
    dep: DepDep,
    _who: Compliance,
    after: int = Query(0, ge=0, le=MAX_ID),
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    return [e.__dict__ for e in audit.entries(dep.store.conn, after=after, limit=limit)]


@router.get("/audit/verify", tags=["compliance"])
def audit_verify(dep: DepDep, _who: Compliance) -> dict[str, Any]:
    """The HMAC chain, and the ledger against the audited charges."""
    return audit.verify_all(dep.store.conn, dep.keyset).__dict__


@router.get("/audit/anchor", tags=["compliance"])
def audit_anchor(dep: DepDep, _who: Compliance) -> dict[str, Any]:
    """A signed head of the audit log: keep it outside the server; `privseg audit verify --anchor`
    then detects entries cut from the end."""
    return audit.anchor(dep.store.conn, dep.keyset)


@router.get("/releases/{release_id}", tags=["compliance"])
def release_metadata(release_id: IdParam, dep: DepDep, _who: Compliance) -> dict[str, Any]:
    """What was released to whom, at what cost and under which policy; not the released values."""
    return release.metadata(dep.store.conn, release_id)


# -- partner ----------------------------------------------------------------------------------------------
@router.get("/audiences", tags=["partner"])
def grants(dep: DepDep, who: Partner) -> list[dict[str, Any]]:
    """The segments this partner may receive audiences for (its own grants only)."""
    return release.partner_grants(dep, who.principal)


class AudienceBody(_Body):
    segment: str = Field(description="A segment the partner is granted (see GET /v1/audiences).")
    breakdown: list[str] = Field(
        default_factory=lambda: ["region"],
        min_length=1,
        max_length=4,
        description="Profile dimensions of the cells, within the category's allowed ones. "
        "Default: ['region'].",
        json_schema_extra={"default": ["region"]},
    )
    dry_run: bool = Field(False, description="Price and plan only; spend nothing.")


@router.post("/audiences", tags=["partner"])
def audience(body: AudienceBody, dep: DepDep, who: Partner) -> Response:
    req = release.PartnerAudienceRequest(**body.model_dump(), partner=who.principal)
    return _json(release.partner_audience(dep, req))
