"""The release kinds. Each kind is one module in release/kinds/ that registers a :class:`ReleaseKind`;
the engine reaches kinds only through :data:`KINDS`, so adding one touches nothing else."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from privseg.release.context import ReleaseContext
from privseg.release.plan import ReleasePlan


class ReleaseRequest(BaseModel):
    """What every release request has. The recipient is not part of it: it is the caller's identity
    (the API key's principal, or the CLI's --recipient), passed next to the request."""

    # No Infinity or NaN (Python's JSON reads both): a bound of -Infinity made a persona's scaled
    # features NaN, which failed the release after its charge.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dry_run: bool = Field(False, description="Plan and price the release without spending anything.")


Req = TypeVar("Req", bound=ReleaseRequest)
Plan = TypeVar("Plan", bound=ReleasePlan)
Noisy = Mapping[str, Any]
# Draws OpenDP noise for one planned vector (by name), once: the adaptive path's only source of noise.
NoiseFn = Callable[[str, list[int]], list[int]]


@dataclass(frozen=True)
class ReleaseKind(Generic[Req, Plan]):
    name: str
    route: str  # its API path under /v1 (POST)
    summary: str  # one line for the API documentation and the CLI help
    request: type[Req]  # the body of the API route and the options of the CLI command
    response: type[BaseModel]  # the released document, as the API documents it
    recipient: Literal["marketer", "partner"]  # who may receive it
    # Policy checks, cells and the sensitivity of every vector (argued in the kind's module).
    plan: Callable[[ReleaseContext, Req, str], Plan]
    # The exact vectors, by name, in the order of plan.keys: never returned, only noised.
    exact: Callable[[ReleaseContext, Plan], dict[str, list[int]]]
    # Post-processing of the noisy vectors into the released document (suppression, intervals).
    result: Callable[[Plan, Noisy], dict[str, Any]]
    # The body of the release as terminal lines.
    text: Callable[[dict[str, Any]], list[str]]
    # For kinds whose later vectors depend on earlier noisy ones (DP k-means): computes the exact
    # vectors itself, round by round, drawing each planned vector's noise once through the engine's
    # NoiseFn, and returns what `result` post-processes. None: `exact`, then noise on every vector.
    adaptive: Callable[[ReleaseContext, Plan, NoiseFn], dict[str, Any]] | None = None
    # Exact work `exact` would otherwise do after the charge, started while the charge commits (on a
    # thread of its own): it must not touch the database (the request's connection is in the charge's
    # transaction) and leaves its results in memory only. None: nothing to start ahead.
    ahead: Callable[[ReleaseContext, Plan], None] | None = None
    # Its segments are a set (each reported on its own): the same ones listed in another order are the
    # same release, served from the cache instead of charged again.
    unordered: bool = False


KINDS: dict[str, ReleaseKind[Any, Any]] = {}


def register(kind: ReleaseKind[Req, Plan]) -> ReleaseKind[Req, Plan]:
    if kind.name in KINDS:
        raise ValueError(f"release kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def for_request(req: ReleaseRequest) -> ReleaseKind[Any, Any]:
    for kind in KINDS.values():
        if type(req) is kind.request:
            return kind
    raise TypeError(f"no release kind takes a {type(req).__name__}")
