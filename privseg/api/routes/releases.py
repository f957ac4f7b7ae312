"""One POST route per release kind, made from the registry: a new kind gets its route, request body,
response schema and role check without touching this file."""

# No `from __future__ import annotations`: the endpoints' annotations are set at run time.

from typing import Annotated, Any, Union

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from privseg import release
from privseg.api.deps import DepDep, require
from privseg.api.routes.common import V1
from privseg.api.schemas import ERRORS
from privseg.apikeys import Principal
from privseg.release.models import DryRun


def _add(router: APIRouter, kind: release.ReleaseKind[Any, Any]) -> None:
    async def endpoint(body: Any, dep: Any, who: Any) -> Response:
        # Releases are plain JSON already (a cached one is sent as stored): FastAPI's generic encoder,
        # which walks every cell, is skipped. Their schema is still declared (response_model) and
        # tests check responses against it. A stored release was already looked for on the event
        # loop, before the framework (api/stored_releases.py): what reaches this route computes,
        # charges, audits or is refused, on a worker thread (a release stored since is served there
        # from the cache all the same).
        text = await run_in_threadpool(release.run_json, dep.release_context(), body, who.principal)
        return Response(text, media_type="application/json")

    endpoint.__name__ = kind.name
    endpoint.__doc__ = (
        f"{kind.summary} The recipient is the caller's own identity; `dry_run` prices the release "
        "without spending. An identical request on the same snapshot returns the stored release "
        "and spends nothing."
    )
    endpoint.__annotations__ = {
        "body": kind.request,
        "dep": DepDep,
        # The role is the kind's recipient (api/stored_releases.py checks the same before answering).
        "who": Annotated[Principal, Depends(require(kind.recipient))],
        "return": Response,
    }
    router.add_api_route(
        kind.route,
        endpoint,
        methods=["POST"],
        tags=[kind.recipient],
        response_model=Union[kind.response, DryRun],  # noqa: UP007  (a run-time union of classes)
    )


def make_router() -> APIRouter:
    """The release routes of every kind registered now (called when the app is made)."""
    router = APIRouter(prefix=V1, responses=ERRORS)
    for kind in release.KINDS.values():
        _add(router, kind)
    return router
