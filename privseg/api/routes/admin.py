"""Admin routes: uploads, the store, erasure, keys, snapshots, API keys."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request
from starlette.concurrency import run_in_threadpool

from privseg import apikeys
from privseg.api.deps import Admin, AdminOrMarketer, DepDep
from privseg.api.routes.common import V1, IdParam
from privseg.api.schemas import (
    ERRORS,
    ApiKeyBody,
    ApiKeyRow,
    CreatedKey,
    Erased,
    ErasureBody,
    Ingested,
    KeyStatus,
    Recomputed,
    SnapshotInfo,
    SnapshotStatus,
    StoreStatus,
)
from privseg.errors import InvalidInput
from privseg.ingest.files import ingest_files
from privseg.ingest.sources import check_encoding, detect_format
from privseg.ingest.uploads import receive, upload_folder, upload_name
from privseg.maintenance import erase_subject
from privseg.segments import engine

router = APIRouter(prefix=V1, responses=ERRORS, tags=["admin"])


@router.post("/ingest/{kind}")
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
) -> list[Ingested]:
    """Upload one batch as the raw request body. It is streamed to a private temporary file (never
    held in memory), validated and stored all-or-nothing; the snapshot is recomputed in the background."""
    name = upload_name(filename)
    if kind == "events" and mode != "patch":
        raise InvalidInput("mode: replace applies to profiles only")
    check_encoding(encoding)  # before the body is read
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    detect_format(Path(name))  # refuse an unknown format before reading the body
    # A private folder per upload, so the file keeps its own name (errors name it) and nothing clashes.
    with upload_folder(dep.settings.uploads_path) as folder:
        tmp = folder / name
        await receive(request.stream(), tmp, dep.settings.max_upload_bytes)
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
        background.add_task(request.app.state.deployment.refresh_snapshot)
    return [Ingested.model_validate(asdict(replace(r, source=name))) for r in results]


@router.get("/store")
def store_status(dep: DepDep, _who: Admin) -> StoreStatus:
    """Batches, rows and people per kind; never a person."""
    return StoreStatus.model_validate(dep.store.status())


@router.post("/erase")
def erase(body: ErasureBody, dep: DepDep, _who: Admin) -> Erased:
    """Data-subject erasure by raw identifier (pseudonymized on the fly, never stored or logged)."""
    result = erase_subject(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id=body.id)
    return Erased(**asdict(result), found=result.found)


@router.get("/keys")
def key_status(dep: DepDep, _who: Admin) -> KeyStatus:
    """The keyset's versions and the store's; never key bytes."""
    return KeyStatus.model_validate({**dep.keyset.describe(), "store_key_version": dep.store.key_version()})


# Unset fields stay out: a marketer's answer has no `people` key at all.
@router.get("/snapshots", tags=["marketer"], response_model_exclude_unset=True)
def snapshot_status(dep: DepDep, who: AdminOrMarketer) -> SnapshotStatus:
    """The latest membership snapshot and whether it is stale (never a segment's size)."""
    snap = engine.latest(dep.store.conn)
    reasons = dep.staleness(snap)
    info = None
    if snap is not None:
        # Admins see the exact head count (store-level, an operator's figure); marketers do not: two
        # snapshots apart, it shows someone joined or left.
        info = SnapshotInfo.model_validate(
            snap.public() | ({"people": snap.people} if who.role == "admin" else {})
        )
    return SnapshotStatus(snapshot=info, stale=bool(reasons), reasons=reasons)


@router.post("/snapshots")
def recompute(dep: DepDep, _who: Admin) -> Recomputed:
    """Recompute the membership snapshot of every active segment now."""
    snap, timings = engine.compute_snapshot(
        store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, runner=dep.snapshot_runner()
    )
    return Recomputed(
        snapshot=SnapshotInfo.model_validate(snap.public() | {"people": snap.people}), timings=timings
    )


@router.get("/apikeys")
def list_keys(dep: DepDep, _who: Admin) -> list[ApiKeyRow]:
    """Every API key (never a token)."""
    return [ApiKeyRow.model_validate(row) for row in apikeys.listing(dep.store.conn)]


@router.post("/apikeys", status_code=201)
def create_key(body: ApiKeyBody, dep: DepDep, _who: Admin) -> CreatedKey:
    """Create an API key; its token is in this response only."""
    key, token = apikeys.create(
        dep.store.conn, dep.keyset, role=body.role, name=body.name, partner=body.partner
    )
    return CreatedKey(**asdict(key), token=token, note="shown once; only a keyed hash is stored")


@router.delete("/apikeys/{key_id}", status_code=204)
def revoke_key(key_id: IdParam, dep: DepDep, _who: Admin) -> None:
    """Revoke an API key."""
    apikeys.revoke(dep.store.conn, dep.keyset, key_id)
