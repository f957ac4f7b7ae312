"""Marketer pages: the segment library (words, owner, effective category, history), the segment
editor (validated as the author types, applied all or nothing) and the marketer's own budget."""

from __future__ import annotations

from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from privseg import ledger
from privseg.console import charts, web
from privseg.console.web import PREFIX, Dep, Marketer
from privseg.deployment import Deployment
from privseg.errors import NotFound, PrivsegError
from privseg.segments import definitions
from privseg.segments.language import DefinitionError
from privseg.sessions import Session
from privseg.yamltext import parse_yaml

router = APIRouter(prefix=PREFIX, include_in_schema=False)
MAX_EDITOR_BYTES = 256 * 1024


@router.get("/segments")
def library(request: Request, dep: Dep, _who: Marketer) -> Response:
    compiler = dep.compiler()
    rows = [
        {
            "id": s.id,
            "owner": s.owner,
            "version": s.version,
            "categories": list(compiler.effective(s.id).categories),
            "words": compiler.explain(s.id),
        }
        for (kind, _), s in sorted(definitions.active(dep.store.conn).items())
        if kind == "segment"
    ]
    return web.render(request, "segments.html", rows=rows)


@router.get("/segments/{segment_id}/history")
def segment(request: Request, segment_id: str, dep: Dep, _who: Marketer) -> Response:
    compiler = dep.compiler()
    if segment_id not in compiler.defs:
        raise NotFound(f"no active segment {segment_id!r}")
    versions = [
        {
            "version": s.version,
            "at": s.created_at,
            "editor": s.editor,
            "yaml": yaml.safe_dump(s.body, sort_keys=False),
        }
        for s in reversed(definitions.history(dep.store.conn, "segment", segment_id))
    ]
    return web.render(
        request,
        "segment.html",
        id=segment_id,
        words=compiler.explain(segment_id),
        categories=list(compiler.effective(segment_id).categories),
        versions=versions,
    )


@router.get("/segments/edit")
def editor(request: Request, dep: Dep, _who: Marketer, id: str = "") -> Response:
    text = ""
    stored = definitions.active(dep.store.conn).get(("segment", id))
    if stored is not None:
        text = yaml.safe_dump(stored.body, sort_keys=False)
    return web.render(request, "editor.html", text=text, results=None, error=None)


def _documents(text: str) -> list[definitions.Document]:
    if len(text.encode()) > MAX_EDITOR_BYTES:
        raise DefinitionError(f"the definition is larger than {MAX_EDITOR_BYTES} bytes")
    try:
        doc = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DefinitionError(f"editor: not valid YAML{where}") from None
    return definitions.split_document(doc, "editor")


def _apply(dep: Deployment, session: Session, text: str, *, dry_run: bool) -> list[dict[str, Any]]:
    results = definitions.apply_documents(
        dep.store.conn,
        dep.keyset,
        _documents(text),
        schema=dep.schema,
        categories=dep.categories,
        actor=session.principal.actor,
        dry_run=dry_run,
    )
    return [{"kind": r.kind, "id": r.id, "version": r.version, "status": r.status} for r in results]


@router.post("/segments/validate")
async def validate(request: Request, dep: Dep, session: Marketer) -> JSONResponse:
    """The editor's live check (JSON for its script): what applying would do, or the first problem
    with its path. Writes nothing."""
    form = await web.checked_form(request, session)
    try:
        results = await run_in_threadpool(_apply, dep, session, str(form.get("text") or ""), dry_run=True)
    except PrivsegError as exc:
        return JSONResponse({"ok": False, "error": exc.message}, headers=web.SECURITY_HEADERS)
    return JSONResponse({"ok": True, "results": results}, headers=web.SECURITY_HEADERS)


@router.post("/segments/edit")
async def apply(request: Request, dep: Dep, session: Marketer) -> Response:
    form = await web.checked_form(request, session)
    text = str(form.get("text") or "")
    try:
        results = await run_in_threadpool(_apply, dep, session, text, dry_run=False)
    except PrivsegError as exc:
        return web.render(
            request, "editor.html", status_code=exc.status, text=text, results=None, error=exc.message
        )
    return web.render(request, "editor.html", text=text, results=results, error=None)


@router.get("/budget")
def budget(request: Request, dep: Dep, session: Marketer) -> Response:
    rows = ledger.budget_of(dep.store.conn, dep.categories, session.principal.principal, web.now())
    bars = [
        {
            "label": str(r["category"]),
            "remaining": float(str(r["remaining_epsilon"])),
            "spent": max(float(str(r["per_recipient"])) - float(str(r["remaining_epsilon"])), 0.0),
        }
        for r in rows
    ]
    figure = charts.budget(bars, "Your privacy budget per category (epsilon)") if bars else None
    return web.render(request, "budget.html", rows=rows, figure=figure)
