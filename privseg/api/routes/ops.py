"""Operations: liveness, readiness and Prometheus metrics (outside /v1)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from privseg import metrics
from privseg.api.deps import Admin
from privseg.api.schemas import ERRORS
from privseg.deployment import Deployment
from privseg.errors import PrivsegError

router = APIRouter(tags=["ops"])


@router.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
def prometheus_metrics(_who: Admin) -> PlainTextResponse:
    """Prometheus metrics (admin key; scrape with `authorization: {credentials: psk_...}`)."""
    return PlainTextResponse(metrics.exposition(), media_type="text/plain; version=0.0.4")


# A coroutine: a plain function would hop to a worker thread and back for a constant.
@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Readiness: keyset, policies and store can be opened. ``warm``: this worker has built its
    release caches since it started (a cold worker answers correctly, its first fresh reports slower)."""
    dep: Deployment = request.app.state.deployment
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
    warmer = getattr(request.app.state, "release_warmer", None)
    warm = warmer is None or not warmer.is_alive()
    return JSONResponse({"ready": ready, "warm": warm, "checks": checks}, status_code=200 if ready else 503)
