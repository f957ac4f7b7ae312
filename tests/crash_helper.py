"""Run one store operation in this process and SIGKILL it at a chosen point (used by test_store.py).

usage: python -m tests.crash_helper POINT OPERATION FILE
POINT: before_publish | after_publish | before_commit | none
OPERATION: ingest-profiles | ingest-events | rotate
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from privseg import audit, fsutil, maintenance, store
from privseg.deployment import Deployment
from privseg.ingest.files import ingest_files


def _die(*_args: Any, **_kwargs: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, operation, file = sys.argv[1], sys.argv[2], sys.argv[3]
    if point == "before_publish":  # the Parquet file is fully written under its temporary name
        store.fsutil.publish = _die  # type: ignore[attr-defined]
    elif point == "after_publish":  # renamed to its final name, manifest not yet touched
        original = fsutil.publish

        def publish_then_die(tmp: Path, final: Path) -> None:
            original(tmp, final)
            _die()

        store.fsutil.publish = publish_then_die  # type: ignore[attr-defined]
    elif point == "before_commit":  # manifest rows inserted inside the open transaction
        store.audit.append = _die  # type: ignore[attr-defined]
    elif point == "after_charge":  # the ledger charge has committed, no noise drawn yet
        import dataclasses

        from privseg.release import KINDS

        # The engine reaches the kind's exact aggregation through the registry, after the charge.
        KINDS["cohort_report"] = dataclasses.replace(KINDS["cohort_report"], exact=_die)
    dep = Deployment()
    if operation == "release":
        from privseg import release

        release.run(
            dep.release_context(),
            release.CohortReportRequest(segments=[file], breakdown=["age_band"]),
            "growth_team",
        )
        return
    if operation == "rotate":
        maintenance.rotate_keys(store=dep.store, keyset_path=dep.settings.keyset, policy=dep.ingest_policy)
    else:
        kind = operation.removeprefix("ingest-")
        ingest_files(
            store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=[Path(file)]
        )  # type: ignore[arg-type]
    _ = audit


if __name__ == "__main__":
    main()
