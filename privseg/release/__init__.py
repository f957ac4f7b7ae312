"""Releases: the only way numbers leave privseg.

Every kind (release/kinds/) is one module declaring its request, its plan with the sensitivity
argument, its exact aggregation and its post-processing; the engine (release/engine.py) plans,
charges, draws OpenDP noise, suppresses and caches for all of them.
"""

from privseg.release.context import ReleaseContext
from privseg.release.engine import (
    PENDING_TIMEOUT,
    cache_key,
    dry_run,
    plan,
    release,
    run,
    run_json,
    stored_json,
    text,
)
from privseg.release.kinds.ab_lift import LiftRequest
from privseg.release.kinds.audience_insight import InsightRequest, PartnerInsightRequest
from privseg.release.kinds.cohort_report import CohortReportRequest, Measure
from privseg.release.kinds.partner_audience import PartnerAudienceRequest
from privseg.release.kinds.persona import PersonaRequest
from privseg.release.kinds.segment_movement import MovementRequest
from privseg.release.kinds.trend import TrendRequest
from privseg.release.plan import ALPHA, ReleasePlan, Vector
from privseg.release.records import listing, metadata, partner_grants, released
from privseg.release.registry import KINDS, ReleaseKind, ReleaseRequest

__all__ = [
    "ALPHA",
    "KINDS",
    "PENDING_TIMEOUT",
    "CohortReportRequest",
    "InsightRequest",
    "LiftRequest",
    "Measure",
    "MovementRequest",
    "PartnerAudienceRequest",
    "PartnerInsightRequest",
    "PersonaRequest",
    "ReleaseContext",
    "ReleaseKind",
    "ReleasePlan",
    "ReleaseRequest",
    "TrendRequest",
    "Vector",
    "cache_key",
    "dry_run",
    "listing",
    "metadata",
    "partner_grants",
    "plan",
    "release",
    "released",
    "run",
    "run_json",
    "stored_json",
    "text",
]
