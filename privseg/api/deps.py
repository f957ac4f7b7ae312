"""Request-scoped dependencies: a deployment per request, and who is calling (API key -> role)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


MAX_AUDITED_PATH = 128  # characters of a failed request's path kept in the audit entry


class FailureRecorder:
    """Failed authentications, recorded in the audit log without letting an outsider write to it at
    will: at most ``per_window`` entries per window (each with a truncated path, never the token);
    past that, one summary entry per window says how many more were seen."""

    def __init__(
        self, per_window: int = 20, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_window, self.window_seconds, self._clock = per_window, window_seconds, clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._recorded = 0
        self._suppressed = 0

    def record(self, dep: Deployment, reason: str, path: str) -> None:
        with self._lock:
            now = self._clock()
            entries: list[tuple[str, dict[str, object]]] = []
            if now - self._window_start >= self.window_seconds:
                if self._suppressed:
                    entries.append(
                        (
                            "auth_failed_suppressed",
                            {"count": self._suppressed, "window_seconds": self.window_seconds},
                        )
                    )
                self._window_start, self._recorded, self._suppressed = now, 0, 0
            if self._recorded < self.per_window:
                self._recorded += 1
                entries.append(("auth_failed", {"reason": reason, "path": path[:MAX_AUDITED_PATH]}))
            else:
                self._suppressed += 1
        if entries:
            with transaction(dep.store.conn):
                for event, details in entries:
                    audit.append(dep.store.conn, dep.keyset, event, details)


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
            failures.record(dep, "missing or malformed bearer token", request.url.path)
            raise Unauthenticated("send an API key as 'Authorization: Bearer psk_...'")
        who = apikeys.authenticate(dep.store.conn, dep.keyset, token)
        if who is None:
            failures.record(dep, "unknown or revoked key", request.url.path)
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
