"""What several route modules share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam

V1 = "/v1"
# SQLite integers are 64-bit signed: larger ids are refused as invalid instead of overflowing.
MAX_ID = 2**62
IdParam = Annotated[int, PathParam(ge=1, le=MAX_ID)]
