"""Sign-in and sign-out. An API key is presented once, in a POSTed form, and exchanged for a session
cookie; the key itself is never stored in the browser, never rendered back, never logged."""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import Response

from privseg import apikeys, audit, sessions
from privseg.apikeys import FailureRecorder
from privseg.console import web
from privseg.console.web import COOKIE, LOGIN_COOKIE, PREFIX, Anyone, Dep
from privseg.db import transaction

router = APIRouter(include_in_schema=False)
SIGNIN_SECONDS = 600  # a sign-in form is good for this long


def _signin_form(request: Request, dep: Dep, error: str | None = None, status: int = 200) -> Response:
    # Sign-in CSRF (login CSRF): the form's token is derived from a nonce in a SameSite=Strict cookie,
    # so another site cannot sign a browser in under its own key.
    nonce = secrets.token_urlsafe(24)
    response = web.render(
        request,
        "login.html",
        status_code=status,
        csrf=sessions.csrf_token(dep.keyset, "signin:" + nonce),
        error=error,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=SIGNIN_SECONDS,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=web.is_https(request),
    )
    return response


@router.get(PREFIX)
@router.get(PREFIX + "/")
def home(request: Request, dep: Dep) -> Response:
    token = request.cookies.get(COOKIE)
    idle = timedelta(minutes=dep.settings.console_idle_minutes)
    session = sessions.find(dep.store.conn, dep.keyset, token, idle=idle, now=web.now()) if token else None
    return web.redirect("/login") if session is None else web.redirect(web.HOME[session.principal.role])


@router.get(PREFIX + "/login")
def signin_form(request: Request, dep: Dep) -> Response:
    return _signin_form(request, dep)


@router.post(PREFIX + "/login")
async def signin(request: Request, dep: Dep) -> Response:
    form = await request.form()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    presented = str(form.get(web.CSRF_FIELD) or "")
    expected = sessions.csrf_token(dep.keyset, "signin:" + nonce)
    if not nonce or not web.same_origin(request) or not hmac.compare_digest(presented, expected):
        return _signin_form(request, dep, "The sign-in form expired or came from elsewhere: try again.", 403)
    token = str(form.get("api_key") or "").strip()
    failures: FailureRecorder = request.app.state.auth_failures
    who = (
        apikeys.authenticate(dep.store.conn, dep.keyset, token) if token.startswith(apikeys.PREFIX) else None
    )
    if who is None:
        failures.record(
            dep.store.conn, dep.keyset, "console sign-in with an unknown or revoked key", request.url.path
        )
        return _signin_form(request, dep, "That API key is unknown or revoked.", 401)
    if who.role not in web.NAVIGATION:
        return _signin_form(request, dep, "This key is for a data pipeline, not for the console.", 403)
    settings = dep.settings
    lifetime = timedelta(hours=settings.console_max_hours)
    session_token = sessions.start(dep.store.conn, dep.keyset, who, lifetime=lifetime, now=web.now())
    with transaction(dep.store.conn):
        audit.append(dep.store.conn, dep.keyset, "console_signin", {"key": who.key_id, "role": who.role})
    response = web.redirect(web.HOME[who.role])
    response.set_cookie(
        COOKIE,
        session_token,
        max_age=int(lifetime.total_seconds()),
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=web.is_https(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


@router.post(PREFIX + "/logout")
async def signout(request: Request, dep: Dep, session: Anyone) -> Response:
    await web.checked_form(request, session)
    sessions.end(dep.store.conn, dep.keyset, request.cookies.get(COOKIE, ""))
    who = session.principal
    with transaction(dep.store.conn):
        audit.append(dep.store.conn, dep.keyset, "console_signout", {"key": who.key_id, "role": who.role})
    response = web.redirect("/login")
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response
