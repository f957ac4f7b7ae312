"""FastAPI application: health endpoints for now, and the problem+json mapping of PrivsegError."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from privseg import __version__
from privseg.deployment import Deployment
from privseg.errors import PrivsegError

PROBLEM_BASE = "https://privseg.dev/problems/"


def problem(status: int, code: str, title: str, detail: str) -> JSONResponse:
    """An RFC 9457 problem response with a stable ``type`` per error class."""
    return JSONResponse(
        {"type": PROBLEM_BASE + code, "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def create_app(deployment: Deployment | None = None) -> FastAPI:
    dep = deployment or Deployment()
    app = FastAPI(title="privseg", version=__version__, openapi_url="/openapi.json", docs_url="/docs")

    @app.exception_handler(PrivsegError)
    async def _privseg_error(_request: Request, exc: PrivsegError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.title, exc.message)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Readiness: keyset, ingest policy and store can be opened."""
        checks: dict[str, str] = {}
        for name, probe in (
            ("keyset", lambda: dep.keyset),
            ("ingest_policy", lambda: dep.ingest_policy),
            ("category_policies", lambda: dep.categories),
            ("store", lambda: dep.store.key_version()),
        ):
            try:
                probe()
                checks[name] = "ok"
            except PrivsegError as exc:
                checks[name] = exc.code  # the code only: messages can name paths
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    return app
