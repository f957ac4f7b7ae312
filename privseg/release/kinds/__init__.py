"""The release kinds; importing this package registers them all (see release/registry.py)."""

from privseg.release.kinds import (
    ab_lift,
    audience_insight,
    cohort_report,
    partner_audience,
    persona,
    segment_movement,
    trend,
)

__all__ = [
    "ab_lift",
    "audience_insight",
    "cohort_report",
    "partner_audience",
    "persona",
    "segment_movement",
    "trend",
]
