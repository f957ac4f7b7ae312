"""What every console page shares: templates, the signed-in viewer and its role check, CSRF checks on
every state-changing request, the page headers (CSP and friends), and HTML error pages.

The console is a shell like the API: a page checks the viewer's role exactly as the API route of the
same data does, then calls the same service function.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData

from privseg import sessions
from privseg.apikeys import Role
from privseg.deployment import Deployment
from privseg.errors import NotPermitted, PrivsegError
from privseg.sessions import Session

PREFIX = "/ui"
COOKIE = "privseg_session"
LOGIN_COOKIE = "privseg_signin"  # the sign-in form's nonce (its CSRF token is derived from it)
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
HERE = Path(__file__).parent

# Only the project's own files: no CDN, no inline script or style (charts are SVG images).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on its own forms.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

# The pages of each role, for the navigation bar: (path under /ui, label).
NAVIGATION: dict[Role, tuple[tuple[str, str], ...]] = {
    "marketer": (
        ("/segments", "Segments"),
        ("/segments/edit", "Segment editor"),
        ("/release/cohort_report", "Report builder"),
        ("/release/ab_lift", "A/B lift"),
        ("/release/segment_movement", "Movement"),
        ("/release/audience_insight", "Insight"),
        ("/release/trend", "Trends"),
        ("/release/personas", "Personas"),
        ("/releases", "My releases"),
        ("/budget", "My budget"),
    ),
    "compliance": (
        ("/policies", "Policies"),
        ("/ledger", "Budget ledger"),
        ("/audit", "Audit log"),
        ("/releases", "Releases"),
    ),
    "partner": (
        ("/audiences", "Audiences"),
        ("/release/partner_insight", "Insight"),
        ("/releases", "My audiences"),
    ),
    "admin": (("/admin", "Store"), ("/admin/upload", "Uploads"), ("/admin/apikeys", "API keys")),
}
HOME: dict[Role, str] = {role: pages[0][0] for role, pages in NAVIGATION.items()}  # under PREFIX

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


class SignInRequired(Exception):
    """No live session: the page answers with a redirect to the sign-in form."""


def open_deployment(request: Request) -> Iterator[Deployment]:
    """The request's deployment (a pooled connection), closed when the response is done."""
    dep: Deployment = request.app.state.deployment.for_request()
    request.state.dep = dep
    try:
        yield dep
    finally:
        dep.close()


Dep = Annotated[Deployment, Depends(open_deployment)]


def now() -> datetime:
    return datetime.now(UTC)


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    session: Session | None = getattr(request.state, "session", None)
    html = templates.get_template(template).render(
        prefix=PREFIX,
        session=session,
        who=None if session is None else session.principal,
        nav=() if session is None else NAVIGATION[session.principal.role],
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def redirect(path: str) -> RedirectResponse:
    """A 303 to a console page (after a POST: the browser then GETs it)."""
    return RedirectResponse(PREFIX + path, status_code=303, headers=SECURITY_HEADERS)


def viewer(*roles: Role) -> Callable[..., Session]:
    """A dependency admitting a live session of one of ``roles`` (the same roles as the API route
    that serves the same data). No session: redirect to sign-in. Another role: 403."""

    def dependency(request: Request, dep: Dep) -> Session:
        token = request.cookies.get(COOKIE)
        settings = dep.settings
        session = (
            sessions.find(
                dep.store.conn,
                dep.keyset,
                token,
                idle=timedelta(minutes=settings.console_idle_minutes),
                now=now(),
            )
            if token
            else None
        )
        if session is None:
            raise SignInRequired
        request.state.session = session
        if session.principal.role not in roles:
            raise NotPermitted(
                f"this page is for {', '.join(roles)} users; you are signed in as {session.principal.role}"
            )
        return session

    return dependency


def same_origin(request: Request) -> bool:
    """A browser's Origin (or Referer) must be this server's: a form posted from another site is
    refused even before its CSRF token is looked at."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # not a browser (or one that sends neither): the CSRF token decides
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


async def checked_form(request: Request, session: Session) -> FormData:
    """The posted form, if its CSRF token (form field or X-CSRF-Token header) is the session's."""
    form = await request.form()
    _require_token(
        request, session, str(form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""), "form"
    )
    return form


def check_csrf_header(request: Request, session: Session) -> None:
    """For requests whose body is not a form (uploads): the token comes in X-CSRF-Token."""
    _require_token(request, session, request.headers.get(CSRF_HEADER, ""), "request")


def _require_token(request: Request, session: Session, presented: str, what: str) -> None:
    if not same_origin(request) or not hmac.compare_digest(presented, session.csrf):
        raise NotPermitted(f"the {what}'s security token is missing or stale: reload the page and try again")


def error_page(request: Request, exc: PrivsegError) -> Response:
    """An error raised by a console page, as HTML (API routes answer problem+json instead)."""
    return render(request, "error.html", status_code=exc.status, title=exc.title, detail=exc.message)


def sign_in_redirect(request: Request) -> Response:
    response = redirect("/login")
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


Marketer = Annotated[Session, Depends(viewer("marketer"))]
Compliance = Annotated[Session, Depends(viewer("compliance"))]
Partner = Annotated[Session, Depends(viewer("partner"))]
Admin = Annotated[Session, Depends(viewer("admin"))]
MarketerOrPartner = Annotated[Session, Depends(viewer("marketer", "partner"))]
MarketerPartnerOrCompliance = Annotated[Session, Depends(viewer("marketer", "partner", "compliance"))]
Anyone = Annotated[Session, Depends(viewer("admin", "marketer", "compliance", "partner"))]
