"""Partner pages: the partner's grants (what it may receive audiences for). Audiences themselves are
released through the generic release pages (console/releases.py), as the partner's own."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from privseg import release
from privseg.console import web
from privseg.console.web import PREFIX, Dep, Partner

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/audiences")
def grants(request: Request, dep: Dep, session: Partner) -> Response:
    rows = release.partner_grants(dep.compiler(), dep.categories, session.principal.principal)
    return web.render(request, "audiences.html", grants=rows)
