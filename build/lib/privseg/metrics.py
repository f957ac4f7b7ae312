"""Prometheus metrics of this process (``GET /metrics``, admin key): operational counts only.

Nothing here is about a person or a segment's size: requests by route and status, release latency,
epsilon charged per category (compliance sees the same in the ledger), cache hits, and rows ingested
per kind (what an admin sees in `privseg store status`). With several server processes each keeps
its own counters (no multiprocess mode).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "privseg_http_requests",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
RELEASE_SECONDS = Histogram(
    "privseg_release_seconds",
    "Time to compute a fresh (charged) release, by kind.",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EPSILON_CHARGED = Counter(
    "privseg_epsilon_charged", "Epsilon charged to the ledger, by category.", ["category"], registry=REGISTRY
)
CACHE_HITS = Counter(
    "privseg_release_cache_hits",
    "Identical releases served from the cache (charged nothing).",
    ["kind"],
    registry=REGISTRY,
)
INGEST_ROWS = Counter(
    "privseg_ingest_rows", "Rows stored by ingestion, by kind.", ["kind"], registry=REGISTRY
)


def exposition() -> bytes:
    """The metrics in Prometheus' text format."""
    return generate_latest(REGISTRY)
