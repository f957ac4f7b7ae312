"""Live intake: CDP pipelines post event batches (Segment / RudderStack batch JSON) with an intake key."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from privseg.api.deps import DepDep, Intake
from privseg.api.routes.common import V1
from privseg.api.schemas import ERRORS, IntakeAccepted
from privseg.ingest.intake import IntakeBatch, ingest_batch

router = APIRouter(prefix=V1, responses=ERRORS, tags=["intake"])


@router.post("/intake/batch")
def intake_batch(body: IntakeBatch, dep: DepDep, _who: Intake) -> IntakeAccepted:
    """Append a batch of tracked events (up to 500 messages): the mapped ones are pseudonymized and
    stored as one small batch, all or nothing; a message whose messageId was stored before is not
    stored again, so a pipeline may retry freely. The snapshot is refreshed by the server's schedule."""
    result = ingest_batch(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, batch=body)
    return IntakeAccepted.model_validate(asdict(result))
