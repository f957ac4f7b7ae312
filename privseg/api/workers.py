"""How many worker processes the server runs: light (no web framework), so the CLI can show and
check the option without importing the server."""

from __future__ import annotations

import os

MAX_WORKERS = 64


def default_workers() -> int:
    """One worker per core this process may run on (its CPU affinity, which a container's cpuset
    narrows), at most :data:`MAX_WORKERS`: a fresh release is CPU work (OpenDP's noise, the exact
    counts), so one process would leave the other cores idle."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
