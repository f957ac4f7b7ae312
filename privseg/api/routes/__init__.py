"""The /v1 routes, one module per role. Thin: each checks the caller's role, then calls the same
service function the CLI calls. The recipient of a release is always the caller's own identity."""

from fastapi import APIRouter

from privseg.api.routes import admin, compliance, intake, marketer, partner, releases


def routers() -> tuple[APIRouter, ...]:
    """Every /v1 router. Each carries the /v1 prefix itself: the app includes them one level deep, so
    a request's route template (metrics, access log) is the full path."""
    return (
        admin.router,
        marketer.router,
        releases.make_router(),
        compliance.router,
        partner.router,
        intake.router,
    )


__all__ = ["routers"]
