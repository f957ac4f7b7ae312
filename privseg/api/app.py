"""The FastAPI application: routes under /v1, health endpoints, and one place that turns every error
into an RFC 9457 problem+json response with a stable ``type``.

No response ever carries a stack trace, SQL, key material or an input value: validation problems
name the field and what is wrong with it, never what was sent.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privseg import __version__, audit, console, metrics
from privseg.api.limits import BodyLimit
from privseg.api.routes import ops, routers
from privseg.api.schemas import Problem
from privseg.api.stored_releases import StoredReleases
from privseg.apikeys import FailureRecorder
from privseg.deployment import Deployment, configure_logging
from privseg.errors import PrivsegError, loggable
from privseg.ingest import uploads
from privseg.maintenance import compact_intake
from privseg.settings import Settings

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


def anchor_writer(dep: Deployment) -> audit.AnchorWriter | None:
    """The periodic signed audit heads of a server (PRIVSEG_AUDIT_ANCHOR_FILE), or None if unset."""
    if dep.settings.audit_anchor_file is None:
        return None

    def head() -> dict[str, Any]:
        fork = dep.for_request()
        try:
            return audit.anchor(fork.store.conn, fork.keyset)
        finally:
            fork.close()

    return audit.AnchorWriter(
        dep.settings.audit_anchor_file, dep.settings.audit_anchor_interval_seconds, head
    )


INTAKE_MERGE_AT = 50  # intake batches before the refresher merges them


def warm_release_cache(dep: Deployment) -> None:
    """The latest snapshot's release dimensions, and the recent breakdowns' cell codes and segment
    counts (release_data.warm), built now (on a background thread) rather than in the first fresh
    releases: over HTTP with two workers, the requests that reached a cold worker waited ~2.7 s for
    it (benchmarks/server.py, fresh reports at concurrency 8)."""
    if not dep.settings.warm_release_cache:
        return
    from privseg.release import data as release_data

    fork = dep.for_request()
    try:
        release_data.warm(fork.release_context())
    except Exception as exc:  # a release will build it (and say why it cannot); say what, not the data
        log.warning("release cache warm-up failed: %s", loggable(exc))
    finally:
        fork.close()


class SnapshotRefresher:
    """Recomputes a stale snapshot every ``interval`` seconds in the background (live intake appends
    events all day). Readers keep using the current snapshot until the new one is recorded; writers are
    serialized by the store's lock, so several workers refreshing at once cost time, not correctness."""

    def __init__(self, dep: Deployment, interval: float) -> None:
        self.dep, self.interval = dep, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="privseg-snapshot-refresh", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            fork = self.dep.for_request()
            try:
                # Live intake adds one small batch per call: merge them before the store grows wide.
                compact_intake(store=fork.store, keyset=fork.keyset, at_least=INTAKE_MERGE_AT)
                fork.recompute_if_stale()
                warm_release_cache(self.dep)
            except Exception as exc:  # keep refreshing; say what failed, never data
                log.error("snapshot refresh failed: %s", loggable(exc))
            finally:
                fork.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _freeze_startup_objects() -> None:
    """Keep what start-up made (modules, the app, its models and routes: ~110k objects per worker)
    out of the cyclic garbage collector's full passes. Under load, the objects of requests in flight
    survive the young collections, and each second or so they add up to a full pass over everything:
    50-64 ms per pass per worker, during which that worker answers nothing (gc callbacks in a
    worker under wrk, /healthz at concurrency 32). Frozen, the passes took 1.3-1.6 ms, and /healthz's
    p99 fell from 59-83 ms to 12-21 ms. Nothing frozen is lost: it stays freed by reference counting,
    and only cycles among start-up objects would wait for :func:`gc.unfreeze` at shutdown."""
    gc.collect()
    gc.freeze()


def _lifespan(dep: Deployment, anchors: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Raw uploads a killed server left behind (identifiers included) go before anything else.
        uploads.clear_stale(dep.settings.uploads_path)
        # Policies are loaded (and a new set audited) once, here: requests only read them, and share
        # what is derived from them (the sensitivity index was built again for every request).
        dep.record_policies()
        dep.sensitivity  # noqa: B018 -- built now, shared by every request's deployment
        app.state.release_warmer = threading.Thread(
            target=warm_release_cache, args=(dep,), name="privseg-release-warm", daemon=True
        )
        app.state.release_warmer.start()
        writer = anchor_writer(dep) if anchors else None
        if writer is not None:
            writer.start()
        interval = dep.settings.snapshot_refresh_seconds
        refresher = SnapshotRefresher(dep, interval) if interval > 0 else None
        if refresher is not None:
            refresher.start()
        _freeze_startup_objects()
        try:
            yield
        finally:
            gc.unfreeze()
            if refresher is not None:
                refresher.stop()
            if writer is not None:
                writer.stop()

    return lifespan


def _document_problems(app: FastAPI) -> None:
    """Every operation documents its problem+json errors by reference to this one schema."""
    openapi = app.openapi

    def openapi_with_problems() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = openapi()
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = (
                Problem.model_json_schema()
            )
        return app.openapi_schema or openapi()

    app.openapi = openapi_with_problems  # type: ignore[method-assign]


class AccessLog:
    """One access-log line and one metrics count per request, with a request id in the response.

    Plain ASGI (not Starlette's BaseHTTPMiddleware, which costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A caller's request id is kept if it is a plain token, else one is made: it ties the access
        # log line, the response and the caller's own logs together.
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        started, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The route template (/v1/releases/{release_id}), never the path: paths can carry anything.
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            metrics.REQUESTS.labels(route, method, str(status)).inc()
            ms = round((time.perf_counter() - started) * 1000, 1)
            extra = {"request_id": request_id, "method": method, "route": route, "status": status, "ms": ms}
            access.info("%s %s %d %.1f ms [%s]", method, route, status, ms, request_id, extra=extra)


async def _privseg_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PrivsegError)
    if (page := console.handle(request, exc)) is not None:
        return page
    return problem(exc.status, exc.code, exc.title, exc.message)


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    page = console.handle(request, exc)
    assert page is not None  # only console pages raise it
    return page


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if (page := console.handle(request, exc)) is not None:
        return page
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
    return problem(422, "invalid-request", "Invalid request", "; ".join(parts))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and console.is_console(request):
        return console.not_found(request)
    return problem(exc.status_code, f"http-{exc.status_code}", "HTTP error", str(exc.detail))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected %s while serving a request", type(exc).__name__)  # no message: it may hold data
    return problem(500, "internal", "Internal error", "the server could not complete the request")


def create_app(deployment: Deployment | None = None, *, anchors: bool = True) -> FastAPI:
    """The app over ``deployment``. ``anchors``: write the periodic audit anchors from this process
    (a multi-worker server writes them once, from the supervisor)."""
    dep = deployment or Deployment()
    app = FastAPI(
        title="privseg",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url="/docs",
        lifespan=_lifespan(dep, anchors),
    )
    app.state.deployment = dep
    app.state.auth_failures = FailureRecorder()
    for router in (*routers(), ops.router):
        app.include_router(router)
    console.install(app)
    _document_problems(app)
    app.add_middleware(StoredReleases, deployment=dep)  # inside BodyLimit: sees only bounded bodies
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT)
    app.add_middleware(AccessLog)  # added last: the outermost, so it sees every answer
    app.add_exception_handler(PrivsegError, _privseg_error)
    app.add_exception_handler(console.web.SignInRequired, _sign_in_required)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


def worker_app() -> FastAPI:
    """The app of one worker process of ``privseg serve --workers N`` (uvicorn's factory): settings
    from the environment, like the supervisor's. Workers share nothing but the database and the store,
    whose transactions and locks already serialize charges, releases and batches across processes."""
    settings = Settings()
    configure_logging(settings)
    return create_app(Deployment(settings), anchors=False)
