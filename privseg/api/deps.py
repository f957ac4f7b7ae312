"""Request-scoped dependencies: a deployment per request, and who is calling (API key -> role)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from privseg import apikeys
from privseg.apikeys import FailureRecorder, Principal, Role
from privseg.deployment import Deployment
from privseg.errors import NotPermitted, Unauthenticated


def get_deployment(request: Request) -> Iterator[Deployment]:
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


def bearer_token(header: str) -> str | None:
    """The API key of an ``Authorization: Bearer psk_...`` header, or None if there is none."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token.startswith(apikeys.PREFIX) else None


def require(*roles: Role) -> Callable[..., Principal]:
    """A dependency admitting only API keys of the given roles."""

    def dependency(
        request: Request,
        dep: DepDep,
        _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Principal:
        failures: FailureRecorder = request.app.state.auth_failures
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            failures.record(dep.store.conn, dep.keyset, "missing or malformed bearer token", request.url.path)
            raise Unauthenticated("send an API key as 'Authorization: Bearer psk_...'")
        who = apikeys.authenticate(dep.store.conn, dep.keyset, token)
        if who is None:
            failures.record(dep.store.conn, dep.keyset, "unknown or revoked key", request.url.path)
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
