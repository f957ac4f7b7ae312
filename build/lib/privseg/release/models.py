"""The documents a release returns, as the API documents them. Built by the kinds as plain JSON
(a release is stored and served as JSON); these models give them a schema that tests check responses
against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReleaseHeader(BaseModel):
    kind: str
    recipient: str
    category: str = Field(description="The category whose (strictest) rules the release is made under.")
    charged_categories: list[str] = Field(description="Every category whose budget is charged.")
    segments: list[str]
    breakdown: list[str]
    cells_per_segment: int
    epsilon: float = Field(description="The privacy cost of the release (sum over its noisy vectors).")
    delta: float
    noise_scale: float = Field(description="Scale of the discrete Laplace noise on each count.")
    interval_95_half_width: float = Field(description="A count is within +/- this of the truth, 95%.")
    min_cohort_size: int = Field(description="Cells whose noisy count is below this are suppressed.")
    allowed_dimensions: list[str]
    max_dimensions: int
    snapshot: int
    as_of: str
    policy_hash: str


class DryRun(ReleaseHeader):
    """What a release would cost and how accurate it would be; nothing is spent."""

    dry_run: bool
    would_charge_epsilon: float = Field(description="0 when an identical release is cached.")
    cached: bool
    remaining_epsilon: float = Field(description="The least budget left among the charged categories.")
    # Present when the request asks for them (spend measures, a movement's earlier snapshot).
    model_config = ConfigDict(extra="allow")


class Released(ReleaseHeader):
    release_id: int
    cached: bool = Field(description="True when this is the stored answer to an identical request.")
    charged_epsilon: float = Field(description="What this call spent (0 for a cached answer).")


class Cell(BaseModel):
    """One cell: its dimension values, keyed by dimension name, then the noisy figures."""

    model_config = ConfigDict(extra="allow")
    count: int = Field(description="Noisy number of people (never below the minimum cohort size).")
    interval_95: list[float] = Field(min_length=2, max_length=2)


class SegmentCells(BaseModel):
    segment: str
    cells: list[Cell]
    suppressed_cells: int = Field(description="Cells not shown: their noisy count is below the minimum.")
