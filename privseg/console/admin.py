"""Admin pages: store and snapshot status with a recompute button, uploads (streamed, with progress
in the browser), and API keys (a new key's token is handed over once, as a file download: it is
never rendered into a page)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from privseg import apikeys
from privseg.console import web
from privseg.console.web import PREFIX, Admin, Dep
from privseg.db import MAX_ID
from privseg.errors import InvalidInput, PrivsegError
from privseg.ingest.files import ingest_files
from privseg.ingest.sources import detect_format
from privseg.ingest.uploads import receive, upload_folder, upload_name
from privseg.segments import engine

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/admin")
def store(request: Request, dep: Dep, _who: Admin) -> Response:
    snap = engine.latest(dep.store.conn)
    reasons = dep.staleness(snap)
    return web.render(
        request,
        "admin.html",
        status=dep.store.status(),
        snapshot=None if snap is None else snap.public() | {"people": snap.people},
        stale=reasons,
        keys=dep.keyset.describe(),
    )


@router.post("/admin/recompute")
async def recompute(request: Request, dep: Dep, session: Admin) -> Response:
    await web.checked_form(request, session)
    await run_in_threadpool(
        engine.compute_snapshot,
        store=dep.store,
        compiler=dep.compiler(),
        keyset=dep.keyset,
        runner=dep.snapshot_runner(),
    )
    return web.redirect("/admin")


@router.get("/admin/upload")
def upload_form(request: Request, _dep: Dep, _who: Admin) -> Response:
    return web.render(request, "upload.html")


@router.post("/admin/upload/{kind}")
async def upload(
    request: Request,
    kind: Literal["profiles", "events"],
    dep: Dep,
    session: Admin,
    background: BackgroundTasks,
    filename: Annotated[str, Query(max_length=255)],
    mode: Literal["patch", "replace"] = "patch",
) -> JSONResponse:
    """The browser's upload (the file as the raw body, CSRF token in a header): streamed to a private
    temporary file and ingested all or nothing, exactly like POST /v1/ingest/{kind}."""
    web.check_csrf_header(request, session)
    try:
        name = upload_name(filename)
        if kind == "events" and mode != "patch":
            raise InvalidInput("mode: replace applies to profiles only")
        detect_format(FilePath(name))
        with upload_folder(dep.settings.uploads_path) as folder:
            await receive(request.stream(), folder / name, dep.settings.max_upload_bytes)
            results = await run_in_threadpool(
                ingest_files,
                store=dep.store,
                keyset=dep.keyset,
                policy=dep.ingest_policy,
                kind=kind,
                paths=[folder / name],
                max_decompressed_bytes=dep.settings.max_decompressed_bytes,
                mode=mode,
            )
    except PrivsegError as exc:
        return JSONResponse(
            {"ok": False, "error": exc.message}, status_code=exc.status, headers=web.SECURITY_HEADERS
        )
    if any(r.stored for r in results):
        background.add_task(request.app.state.deployment.refresh_snapshot)
    body = [asdict(replace(r, source=name)) for r in results]
    return JSONResponse({"ok": True, "results": body}, headers=web.SECURITY_HEADERS)


@router.get("/admin/apikeys")
def keys(request: Request, dep: Dep, _who: Admin) -> Response:
    return web.render(request, "apikeys.html", keys=apikeys.listing(dep.store.conn), error=None)


@router.post("/admin/apikeys")
async def create_key(request: Request, dep: Dep, session: Admin) -> Response:
    form = await web.checked_form(request, session)
    try:
        key, token = apikeys.create(
            dep.store.conn,
            dep.keyset,
            role=str(form.get("role") or ""),
            name=str(form.get("name") or "")[:128],
            partner=str(form.get("partner") or "")[:128] or None,
        )
    except PrivsegError as exc:
        return web.render(
            request,
            "apikeys.html",
            status_code=exc.status,
            keys=apikeys.listing(dep.store.conn),
            error=exc.message,
        )
    body = f"{token}\n# privseg API key {key.key_id}: role {key.role}, acts as {key.principal}. Shown once.\n"
    return Response(
        body,
        media_type="text/plain; charset=utf-8",
        headers={
            **web.SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="privseg-apikey-{key.key_id}.txt"',
        },
    )


@router.post("/admin/apikeys/{key_id}/revoke")
async def revoke_key(
    request: Request, key_id: Annotated[int, Path(ge=1, le=MAX_ID)], dep: Dep, session: Admin
) -> Response:
    await web.checked_form(request, session)
    apikeys.revoke(dep.store.conn, dep.keyset, key_id)
    return web.redirect("/admin/apikeys")
