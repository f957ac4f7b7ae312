"""Releases in the console, for every registered kind alike: a form made from the kind's request
model, a dry run (epsilon, interval, budget left, "about N more like this"), then the spend, which
goes through the same engine as the API (charge before noise, cache, audit) with the viewer's own
identity as recipient. A recipient may read and download its own releases again (as stored: no new
noise, no new charge); compliance sees release metadata only, never values (as in the API)."""

from __future__ import annotations

import csv
import io
import math
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as FastPath
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from privseg import release
from privseg.console import charts, forms, web
from privseg.console.tables import INSIGHT_KINDS, table
from privseg.console.web import PREFIX, Dep, MarketerOrPartner, MarketerPartnerOrCompliance
from privseg.db import MAX_ID
from privseg.deployment import Deployment
from privseg.errors import NotFound, NotPermitted, PrivsegError
from privseg.release import scope
from privseg.release.registry import ReleaseKind
from privseg.segments import definitions
from privseg.sessions import Session

router = APIRouter(prefix=PREFIX, include_in_schema=False)
ReleaseId = Annotated[int, FastPath(ge=1, le=MAX_ID)]
CELL_KINDS = {"cohort_report", "partner_audience"}  # results are cells of a profile breakdown


def _kind(name: str, session: Session) -> ReleaseKind[Any, Any]:
    kind = release.KINDS.get(name)
    if kind is None:
        raise NotFound(f"no release kind {name!r}")
    if kind.recipient != session.principal.role:
        raise NotPermitted(
            f"{name} releases are for {kind.recipient} users; you are signed in as {session.principal.role}"
        )
    return kind


def _choices(dep: Deployment, session: Session) -> tuple[list[str], list[str]]:
    """The segments the viewer may name (a partner: its grants) and the breakdown dimensions."""
    if session.principal.role == "partner":
        segments = [
            g.segment
            for g in release.partner_grants(dep.compiler(), dep.categories, session.principal.principal)
        ]
    else:
        segments = sorted(i for k, i in definitions.active(dep.store.conn) if k == "segment")
    dimensions = sorted({d for p in dep.categories.categories.values() for d in p.allowed_dimensions()})
    return segments, dimensions


def _form(
    request: Request,
    dep: Deployment,
    session: Session,
    kind: ReleaseKind[Any, Any],
    *,
    values: dict[str, list[str]] | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    segments, dimensions = _choices(dep, session)
    return web.render(
        request,
        "release_form.html",
        status_code=status,
        kind=kind,
        fields=forms.fields(kind.request, segments, dimensions),
        values=values or {},
        error=error,
    )


@router.get("/release/{name}")
def release_form(request: Request, name: str, dep: Dep, session: MarketerOrPartner) -> Response:
    kind = _kind(name, session)
    values = {k: request.query_params.getlist(k) for k in request.query_params}
    return _form(request, dep, session, kind, values=values)


@router.post("/release/{name}")
async def release_post(request: Request, name: str, dep: Dep, session: MarketerOrPartner) -> Response:
    kind = _kind(name, session)
    form = await web.checked_form(request, session)
    spend = form.get("action") == "spend"
    values = {k: [str(v) for v in form.getlist(k)] for k in form if k not in (web.CSRF_FIELD, "action")}
    try:
        req = forms.parse(kind.request, form, dry_run=not spend)
        result = await run_in_threadpool(release.run, dep.release_context(), req, session.principal.principal)
    except PrivsegError as exc:
        return _form(request, dep, session, kind, values=values, error=exc.message, status=exc.status)
    if spend:
        return web.redirect(f"/releases/{result['release_id']}")
    cost = result["would_charge_epsilon"]
    more = None if cost <= 0 else math.floor(result["remaining_epsilon"] / cost + 1e-9)
    return web.render(
        request, "dry_run.html", kind=kind, price=result, more=more, hidden=forms.hidden(req), values=values
    )


@router.get("/releases")
def releases(request: Request, dep: Dep, session: MarketerPartnerOrCompliance) -> Response:
    who = session.principal
    # Compliance sees every release's metadata (GET /v1/releases/{id}); others their own.
    rows = release.listing(dep.store.conn, recipient=None if who.role == "compliance" else who.principal)
    return web.render(request, "releases.html", rows=rows)


def suppressed_cells(dep: Deployment, released: dict[str, Any]) -> dict[str, list[str]]:
    """Per segment, the labels of the cells the release suppressed: the breakdown's public cells
    that it does not show (never shown as 0)."""
    if released["kind"] in INSIGHT_KINDS:
        return {
            a["attribute"]: [
                v
                for (v,) in scope.domain(dep.schema, [a["attribute"]])
                if v not in {c["value"] for c in a["cells"]}
            ]
            for a in released["attributes"]
        }
    if released["kind"] not in CELL_KINDS:
        return {}
    cells = [", ".join(k) or "all" for k in scope.domain(dep.schema, released["breakdown"])]
    out = {}
    for seg in released["results"]:
        shown = {charts.cell_label(c, released["breakdown"]) for c in seg["cells"]}
        out[seg["segment"]] = [c for c in cells if c not in shown]
    return out


def _figure(released: dict[str, Any], suppressed: dict[str, list[str]]) -> charts.Figure | None:
    kind = released["kind"]
    if kind in CELL_KINDS:
        return charts.cells(released, suppressed)
    if kind == "ab_lift":
        return charts.lift(released)
    if kind in INSIGHT_KINDS:
        return charts.affinity(released)
    if kind == "trend":
        return charts.trend(released)
    if kind == "personas":
        return charts.personas(released)
    if kind == "segment_movement":
        return charts.movement(released)
    return None


@router.get("/releases/{release_id}")
def release_view(
    request: Request, release_id: ReleaseId, dep: Dep, session: MarketerPartnerOrCompliance
) -> Response:
    if session.principal.role == "compliance":
        return web.render(request, "release_record.html", record=release.metadata(dep.store.conn, release_id))
    released = release.released(dep.store.conn, release_id, session.principal.principal)
    suppressed = suppressed_cells(dep, released)
    return web.render(
        request,
        "release.html",
        r=released,
        figure=_figure(released, suppressed),
        table=table(released, suppressed),
        release_id=release_id,
        verdict=lift_verdict(released),
    )


def lift_verdict(released: dict[str, Any]) -> tuple[str, bool] | None:
    """What an A/B lift release says, in words, and whether its interval includes 0."""
    if released["kind"] != "ab_lift" or released.get("suppressed"):
        return None
    lift, interval = released.get("lift"), released.get("lift_interval_95")
    if lift is None or not interval:
        return ("No lift can be stated: the control arm shows no conversions.", True)
    lo, hi = interval
    includes = lo <= 0 <= hi
    verdict = (
        "the interval includes 0, so this test shows no evidence of an effect"
        if includes
        else "the interval excludes 0"
    )
    return (f"Lift {lift:+.1%} (95% interval {lo:+.1%} to {hi:+.1%}): {verdict}.", includes)


def _cell(value: Any) -> Any:
    # A spreadsheet runs a text cell that starts with one of these as a formula (CSV injection):
    # segment ids and labels are authored text, so such a cell is quoted as text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@router.get("/releases/{release_id}/csv")
def release_csv(release_id: ReleaseId, dep: Dep, session: MarketerOrPartner) -> Response:
    released = release.released(dep.store.conn, release_id, session.principal.principal)
    header, rows = table(released, suppressed_cells(dep, released))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return Response(
        buf.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={
            **web.SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="privseg-release-{release_id}.csv"',
        },
    )
