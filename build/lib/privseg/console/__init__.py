"""The web console: server-rendered pages for marketers, compliance officers, ad partners and admins,
served by the API's own process under /ui, over the same services and with the same role checks.
No CDN: the only script and style are this package's own small files; charts are SVG rendered on the
server."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from privseg.console import admin, auth, compliance, marketer, partner, releases, web
from privseg.errors import InvalidInput, NotFound, PrivsegError


def install(app: FastAPI) -> None:
    """Add the console's pages and static files to ``app``."""
    for module in (auth, marketer, releases, compliance, partner, admin):
        app.include_router(module.router)
    app.mount(web.PREFIX + "/static", StaticFiles(directory=web.HERE / "static"), name="console-static")


def is_console(request: Request) -> bool:
    path = request.url.path
    return path == web.PREFIX or path.startswith(web.PREFIX + "/")


def handle(request: Request, exc: Exception) -> Response | None:
    """The console's answer to an error raised under /ui (a page, not problem+json), or None for
    requests that are not the console's."""
    if not is_console(request):
        return None
    if isinstance(exc, web.SignInRequired):
        return web.sign_in_redirect(request)
    if isinstance(exc, RequestValidationError):
        fields = sorted({".".join(str(p) for p in e.get("loc", ())[1:]) for e in exc.errors()})
        return web.error_page(request, InvalidInput(f"invalid {', '.join(fields)}"))
    if isinstance(exc, PrivsegError):
        return web.error_page(request, exc)
    return None


def not_found(request: Request) -> Response:
    return web.error_page(request, NotFound("no such page"))
