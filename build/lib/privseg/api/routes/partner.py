"""Partner routes: the partner's own grants. Audiences are released by releases.py."""

from __future__ import annotations

from fastapi import APIRouter

from privseg import release
from privseg.api.deps import DepDep, Partner
from privseg.api.routes.common import V1
from privseg.api.schemas import ERRORS
from privseg.release.records import Grant

router = APIRouter(prefix=V1, responses=ERRORS, tags=["partner"])


@router.get("/audiences")
def grants(dep: DepDep, who: Partner) -> list[Grant]:
    """The segments this partner may receive audiences for (its own grants only)."""
    return release.partner_grants(dep.compiler(), dep.categories, who.principal)
