"""Request-scoped dependencies: a deployment per request, and who is calling (API key -> role)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from privseg import apikeys
from privseg.apikeys import FailureRecorder, Principal, Role
from privseg.deployment import Deployment
from privseg.errors import NotPermitted, Unauthenticated


# The dependencies are coroutines: FastAPI runs a plain function's dependency on a worker thread, and
# the thread hops (enter and exit of the deployment, the key check, the endpoint) were a fifth of a
# cached report's CPU (py-spy, benchmarks/server.py). What they do on the event loop is short: lend a
# pooled connection, one indexed SELECT for the key. Writes (a failure's audit entry) go to a thread.
async def get_deployment(request: Request) -> AsyncIterator[Deployment]:
    dep: Deployment = request.app.state.deployment.for_request()
    try:
        yield dep
    finally:
        dep.close()


DepDep = Annotated[Deployment, Depends(get_deployment)]


# Declared as FastAPI's bearer scheme, so the OpenAPI document states how to authenticate (and Swagger
# gets its Authorize button); the checks themselves stay ours (prefix, keyed-hash lookup, audit).
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key issued by `privseg apikey create`: `Authorization: Bearer psk_...`.",
)


def scope_header(scope: Scope, name: bytes) -> bytes | None:
    """A header's first value in an ASGI scope (lower-case ``name``), as a route reads it with
    Starlette's ``Headers.get``: middleware and route must agree on which of two values counts."""
    return next((v for k, v in scope["headers"] if k.lower() == name), None)


def bearer_token(header: str) -> str | None:
    """The API key of an ``Authorization: Bearer psk_...`` header, or None if there is none."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token.startswith(apikeys.PREFIX) else None


def scope_bearer_token(scope: Scope) -> str | None:
    """:func:`bearer_token` of an ASGI request's first ``Authorization`` header (for middleware)."""
    return bearer_token((scope_header(scope, b"authorization") or b"").decode("latin-1"))


def require(*roles: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency admitting only API keys of the given roles."""

    async def dependency(
        request: Request,
        dep: DepDep,
        _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Principal:
        failures: FailureRecorder = request.app.state.auth_failures
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            await run_in_threadpool(
                failures.record,
                dep.store.conn,
                dep.keyset,
                "missing or malformed bearer token",
                request.url.path,
            )
            raise Unauthenticated("send an API key as 'Authorization: Bearer psk_...'")
        who = apikeys.authenticate(dep.store.conn, dep.keyset, token)
        if who is None:
            await run_in_threadpool(
                failures.record, dep.store.conn, dep.keyset, "unknown or revoked key", request.url.path
            )
            raise Unauthenticated("the API key is unknown or revoked")
        if who.role not in roles:
            raise NotPermitted(f"this route is for {', '.join(roles)} keys; this key is a {who.role} key")
        return who

    return dependency


Admin = Annotated[Principal, Depends(require("admin"))]
Marketer = Annotated[Principal, Depends(require("marketer"))]
Compliance = Annotated[Principal, Depends(require("compliance"))]
Partner = Annotated[Principal, Depends(require("partner"))]
AdminOrMarketer = Annotated[Principal, Depends(require("admin", "marketer"))]
Intake = Annotated[Principal, Depends(require("intake"))]
