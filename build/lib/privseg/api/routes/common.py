"""What several route modules share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam

from privseg.db import MAX_ID

V1 = "/v1"
IdParam = Annotated[int, PathParam(ge=1, le=MAX_ID)]
