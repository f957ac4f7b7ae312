"""The FastAPI application: routes under /v1, health endpoints, and one place that turns every error
into an RFC 9457 problem+json response with a stable ``type``.

No response ever carries a stack trace, SQL, key material or an input value: validation problems
name the field and what is wrong with it, never what was sent.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from privseg import __version__, audit, metrics
from privseg.api.deps import Admin, FailureRecorder
from privseg.api.limits import BodyLimit
from privseg.api.routes import routers
from privseg.api.schemas import ERRORS, Problem
from privseg.deployment import Deployment
from privseg.errors import PrivsegError
from privseg.ingest import uploads

log = logging.getLogger(__name__)
access = logging.getLogger("privseg.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
PROBLEM_BASE = "https://privseg.dev/problems/"
JSON_BODY_LIMIT = 1024 * 1024  # every route but uploads takes small JSON bodies


def problem(status: int, code: str, title: str, detail: str) -> JSONResponse:
    """An RFC 9457 problem response with a stable ``type`` per error class. A 401 says how to
    authenticate (RFC 9110: ``WWW-Authenticate``)."""
    return JSONResponse(
        {"type": PROBLEM_BASE + code, "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
        headers={"WWW-Authenticate": 'Bearer realm="privseg"'} if status == 401 else None,
    )


def create_app(deployment: Deployment | None = None) -> FastAPI:
    dep = deployment or Deployment()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Raw uploads a killed server left behind (identifiers included) go before anything else.
        uploads.clear_stale(dep.settings.uploads_path)
        # Policies are loaded (and a new set audited) once, here: requests only read them.
        dep.record_policies()
        writer = None
        if dep.settings.audit_anchor_file is not None:
            writer = audit.AnchorWriter(
                dep.settings.audit_anchor_file, dep.settings.audit_anchor_interval_seconds, _head
            )
            writer.start()
        try:
            yield
        finally:
            if writer is not None:
                writer.stop()

    def _head() -> dict[str, Any]:
        fork = dep.for_request()
        try:
            return audit.anchor(fork.store.conn, fork.keyset)
        finally:
            fork.close()

    app = FastAPI(
        title="privseg", version=__version__, openapi_url="/openapi.json", docs_url="/docs", lifespan=lifespan
    )
    app.state.deployment = dep
    for router in routers():
        app.include_router(router)
    openapi = app.openapi

    def openapi_with_problems() -> dict[str, Any]:
        # Every operation documents its problem+json errors by reference to this one schema.
        if app.openapi_schema is None:
            schema = openapi()
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = (
                Problem.model_json_schema()
            )
        return app.openapi_schema or openapi()

    app.openapi = openapi_with_problems  # type: ignore[method-assign]

    app.state.auth_failures = FailureRecorder()
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT)

    @app.middleware("http")
    async def _access(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # A caller's request id is kept if it is a plain token, else one is made: it ties the access log
        # line, the response and the caller's own logs together.
        given = request.headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        started = time.perf_counter()
        response = await call_next(request)
        # The route template (/v1/releases/{release_id}), never the path itself: paths can carry anything.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        ms = round((time.perf_counter() - started) * 1000, 1)
        access.info(
            "%s %s %d %.1f ms [%s]",
            request.method,
            route,
            response.status_code,
            ms,
            request_id,
            extra={
                "request_id": request_id,
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "ms": ms,
            },
        )
        response.headers["X-Request-ID"] = request_id
        return response

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses=ERRORS)
    def prometheus_metrics(_who: Admin) -> PlainTextResponse:
        """Prometheus metrics (admin key; scrape with `authorization: {credentials: psk_...}`)."""
        return PlainTextResponse(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(PrivsegError)
    async def _privseg_error(_request: Request, exc: PrivsegError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.title, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        ]
        return problem(422, "invalid-request", "Invalid request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, f"http-{exc.status_code}", "HTTP error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s while serving a request", type(exc).__name__)  # no message: it may hold data
        return problem(500, "internal", "Internal error", "the server could not complete the request")

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Readiness: keyset, policies and store can be opened."""
        checks: dict[str, str] = {}
        probe_dep = dep.for_request()
        try:
            for name, probe in (
                ("keyset", lambda: probe_dep.keyset),
                ("ingest_policy", lambda: probe_dep.ingest_policy),
                ("category_policies", lambda: probe_dep.categories),
                ("store", lambda: probe_dep.store.key_version()),
            ):
                try:
                    probe()
                    checks[name] = "ok"
                except PrivsegError as exc:
                    checks[name] = exc.code  # the code only: messages can name paths
        finally:
            probe_dep.close()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    return app
