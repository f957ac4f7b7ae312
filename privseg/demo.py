"""``privseg demo``: the whole pipeline on embedded defaults, from nothing to a populated store."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from privseg import audit, release
from privseg.batches import Kind
from privseg.demo_data import generate
from privseg.deployment import Deployment
from privseg.errors import InvalidInput
from privseg.ingest.files import ingest_files
from privseg.keyset import create_keyset
from privseg.segments import definitions, engine

EXAMPLES = Path(__file__).resolve().parent / "segments" / "examples"


def _ingest_files(dep: Deployment, data_dir: Path) -> Iterator[str]:
    customers_csv, events_csv = data_dir / "customers.csv", data_dir / "events.csv"
    for f in (customers_csv, events_csv):
        if not f.is_file():
            raise InvalidInput(f"{f}: missing (the demo expects customers.csv and events.csv)")
    sources: tuple[tuple[Kind, Path], ...] = (("profiles", customers_csv), ("events", events_csv))
    for kind, path in sources:
        for r in ingest_files(
            store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=[path]
        ):
            yield f"ingest: {r.message}"
            if r.stored:
                yield f"        dropped {list(r.dropped_columns)}; generalized {list(r.generalized_columns)}"


def run(dep: Deployment, *, customers: int, seed: int, data_dir: Path | None) -> Iterator[str]:
    """Yield human-readable progress lines; raise PrivsegError on failure."""
    settings = dep.settings
    if not settings.keyset.exists():
        ks = create_keyset(settings.keyset, "demo")
        yield f"keys: created {settings.keyset} (mode 0600, namespace {ks.namespace!r})"
    else:
        yield f"keys: using {settings.keyset}"
    yield from _load(dep, customers=customers, seed=seed, data_dir=data_dir)
    yield from _summary(dep)
    yield from _segments(dep)
    yield from _releases(dep)


def _load(dep: Deployment, *, customers: int, seed: int, data_dir: Path | None) -> Iterator[str]:
    if data_dir is not None:
        yield from _ingest_files(dep, data_dir)
    elif dep.store.batches():
        yield "demo data: the store already holds data; nothing generated"
    else:
        # Generated outside the state directory and deleted once ingested: the files hold raw
        # identifiers (synthetic, but a deployment must not get used to keeping such files around).
        with tempfile.TemporaryDirectory(prefix="privseg-demo-") as tmp:
            files = generate(Path(tmp), customers=customers, seed=seed)
            yield (
                f"demo data: generated {files.customer_rows} customers and {files.event_rows} events "
                "(synthetic, with raw identifiers) in a temporary directory"
            )
            yield from _ingest_files(dep, Path(tmp))
        yield "demo data: the raw files were deleted after ingestion (only pseudonymized data is kept)"


def _summary(dep: Deployment) -> Iterator[str]:
    status = dep.store.status()
    yield "store (pseudonymized; raw identifiers are not stored):"
    for kind in ("profiles", "events"):
        s = status[kind]
        counts = f"{s['batches']} batch(es), {s['rows']} rows, {s['people']} people"
        yield f"  {kind:<8} {counts}, {s['bytes']} bytes"
    if "first" in status["events"]:
        yield f"  events span {status['events']['first']} .. {status['events']['last']}"
    profiles = dep.store.scan_profiles()
    if profiles is not None:
        yield "  profile columns: " + ", ".join(profiles.collect_schema().names())
    yield f"  pseudonym key version: k{status['key_version']}, namespace {status['namespace']!r}"


def _segments(dep: Deployment) -> Iterator[str]:
    dep.record_policies()
    results = definitions.apply(
        dep.store.conn,
        dep.keyset,
        [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml"],
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    changed = sum(r.status != "unchanged" for r in results)
    yield f"segments: {len(results)} example definitions ({changed} new or changed)"
    latest = engine.latest(dep.store.conn)
    if engine.staleness(dep.store, latest, policy_hash=dep.categories.content_hash):
        snap, timings = engine.compute_snapshot(
            store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, runner=dep.snapshot_runner()
        )
        seconds = sum(v for k, v in timings.items() if k != "features_count")
        yield (
            f"snapshot {snap.id}: {len(snap.segments)} segments evaluated over {snap.people} people in "
            f"{seconds:.2f}s; memberships stay on the server, sizes leave only as DP releases"
        )
    else:
        assert latest is not None
        yield f"snapshot {latest.id} is current (rerunning the demo spends no budget: releases are cached)"
    yield "  try: privseg segments explain hearing_aid_interest_55plus"


def _releases(dep: Deployment) -> Iterator[str]:
    # The only way numbers leave: differentially private, thresholded, charged to the ledger.
    ctx = dep.release_context()
    report = release.run(
        ctx,
        release.CohortReportRequest(
            segments=["cart_abandoners_7d", "engaged_not_ready"], breakdown=["age_band"]
        ),
        "growth_team",
    )
    yield "cohort report (marketer growth_team):"
    yield from ("  " + line for line in release.text(report).splitlines())
    audience = release.run(
        ctx,
        release.PartnerAudienceRequest(segment="hearing_aid_interest_55plus", breakdown=["age_band"]),
        "adnet_alpha",
    )
    yield "partner audience (ad partner adnet_alpha, stigmatized category hearing_aids):"
    yield from ("  " + line for line in release.text(audience).splitlines())
    verdict = audit.verify(dep.store.conn, dep.keyset)
    yield f"audit log: {verdict.entries} entries, chain {'verified' if verdict.ok else 'BROKEN'}"
    yield "next: `privseg budget`, `privseg audit show`, `privseg report --help`, `privseg serve`"
