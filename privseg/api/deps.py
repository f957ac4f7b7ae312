"""Request-scoped dependencies: a deployment per request, and who is calling (API key -> role)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request

from privseg import apikeys, audit
from privseg.apikeys import Principal, Role
from privseg.db import transaction
from privseg.deployment import Deployment
from privseg.errors import NotPermitted, Unauthenticated


def get_deployment(request: Request) -> Iterator[Deployment]:
    dep: Deployment = request.app.state.deployment.for_request()
    try:
        yield dep
    finally:
        dep.close()


DepDep = Annotated[Deployment, Depends(get_deployment)]


def _audit_failure(dep: Deployment, reason: str, path: str) -> None:
    # The token itself is never recorded, only that a failure happened and where.
    with transaction(dep.store.conn):
        audit.append(dep.store.conn, dep.keyset, "auth_failed", {"reason": reason, "path": path})


def require(*roles: Role) -> Callable[[Request, Deployment], Principal]:
    """A dependency admitting only API keys of the given roles."""

    def dependency(request: Request, dep: DepDep) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.startswith(apikeys.PREFIX):
            _audit_failure(dep, "missing or malformed bearer token", request.url.path)
            raise Unauthenticated("send an API key as 'Authorization: Bearer psk_...'")
        who = apikeys.authenticate(dep.store.conn, dep.keyset, token.strip())
        if who is None:
            _audit_failure(dep, "unknown or revoked key", request.url.path)
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
