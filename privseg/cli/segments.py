"""Commands over segment definitions and membership snapshots (`privseg segments ...`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from privseg.cli.shell import (
    JsonOpt,
    _deployment,
    _emit,
    _governed,
    _progress,
    _table,
    segments_app,
)
from privseg.errors import NotFound

if TYPE_CHECKING:
    from privseg.segments.definitions import Applied


def _applied_text(results: list[Applied]) -> str:
    return "\n".join(f"{r.kind} {r.id}: {r.status} (v{r.version})" for r in results)


@segments_app.command("apply")
def segments_apply(
    files: Annotated[list[Path], typer.Argument(help="YAML/JSON definition files (all or none).")],
    as_json: JsonOpt = False,
) -> None:
    """Validate and store definitions; each change becomes a new version. Nothing is applied on error."""
    from privseg.segments import definitions

    dep = _governed()
    results = definitions.apply(
        dep.store.conn,
        dep.keyset,
        files,
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    _emit([asdict(r) for r in results], as_json, _applied_text(results))


@segments_app.command("retire")
def segments_retire(
    def_id: Annotated[str, typer.Argument(help="The segment (or, with --trait, trait) to retire.")],
    trait: Annotated[bool, typer.Option("--trait", help="Retire a trait rather than a segment.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retire a definition (a new, retired version; its history is kept). Refused while in use."""
    from privseg.segments import definitions

    dep = _governed()
    r = definitions.retire(
        dep.store.conn,
        dep.keyset,
        "trait" if trait else "segment",
        def_id,
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    _emit(asdict(r), as_json, _applied_text([r]))


@segments_app.command("examples")
def segments_examples(
    apply: Annotated[
        bool, typer.Option("--apply", help="Apply them (traits and segments as one set).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the paths of the shipped example definitions (traits first), or apply them as one set."""
    from privseg import demo
    from privseg.segments import definitions

    files = [demo.EXAMPLES / "traits.yaml", demo.EXAMPLES / "segments.yaml"]
    if not apply:
        typer.echo(" ".join(str(f) for f in files))
        return
    dep = _governed()
    # Examples that read what this deployment's ingest policy lacks are skipped and said so.
    docs, skipped = definitions.fitting(
        definitions.read_documents(files), schema=dep.schema, categories=dep.categories
    )
    results = definitions.apply_documents(
        dep.store.conn,
        dep.keyset,
        docs,
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    text = "\n".join([_applied_text(results), *(f"skipped {why}" for why in skipped)])
    _emit({"applied": [asdict(r) for r in results], "skipped": skipped}, as_json, text)


@segments_app.command("list")
def segments_list(as_json: JsonOpt = False) -> None:
    """Active segments and traits with their versions."""
    from privseg.segments import definitions

    dep = _deployment()
    rows = list(definitions.active(dep.store.conn).values())
    compiler = dep.compiler()
    cats = {
        (s.kind, s.id): "+".join(compiler.effective(s.id).categories) if s.kind == "segment" else ""
        for s in rows
    }
    table = [[s.kind, s.id, s.version, cats[(s.kind, s.id)], s.owner] for s in rows]
    text = _table(["kind", "id", "version", "category", "owner"], table) if rows else ""
    _emit(
        [asdict(s) | {"category": cats[(s.kind, s.id)] or None} for s in rows],
        as_json,
        text or "(no definitions)",
    )


@segments_app.command("show")
def segments_show(
    segment_id: str, version: Annotated[int | None, typer.Option(help="A past version.")] = None
) -> None:
    """The stored definition (JSON) of a segment or trait."""
    from privseg.segments import definitions

    dep = _deployment()
    found = definitions.history(dep.store.conn, "segment", segment_id) or definitions.history(
        dep.store.conn, "trait", segment_id
    )
    chosen = [s for s in found if version is None or s.version == version]
    if not chosen:
        raise NotFound(f"no segment or trait {segment_id!r}" + (f" version {version}" if version else ""))
    typer.echo(json.dumps({"version": chosen[-1].version, **chosen[-1].body}, indent=2))


@segments_app.command("explain")
def segments_explain(segment_id: str, as_json: JsonOpt = False) -> None:
    """What a segment means, in words, and why its category is what it is."""
    compiler = _deployment().compiler()
    if segment_id not in compiler.defs:
        raise NotFound(f"no active segment {segment_id!r}")
    text = compiler.explain(segment_id)
    eff = compiler.effective(segment_id)
    info = {
        "segment": segment_id,
        "categories": list(eff.categories),
        "because": [t.describe() for t in eff.taints],
        "explanation": text,
    }
    _emit(info, as_json, text)


@segments_app.command("compute")
def segments_compute(
    as_of: Annotated[
        datetime | None, typer.Option(help="Resolve time windows against this instant (default now, UTC).")
    ] = None,
    engine_name: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="local (whole store in memory), sharded (a few person shards at a time, bounded memory) "
            "or spark; default PRIVSEG_ENGINE.",
        ),
    ] = None,
    spark_master: Annotated[
        str | None, typer.Option(help="Spark master URL for --engine spark (default PRIVSEG_SPARK_MASTER).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the membership snapshot of every active segment. Prints no segment sizes: exact
    counts leave only as differentially private releases."""
    from privseg.segments import engine

    dep = _governed()
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    with _progress(as_json) as progress:
        snap, timings = engine.compute_snapshot(
            store=dep.store,
            compiler=dep.compiler(),
            keyset=dep.keyset,
            as_of=as_of,
            progress=progress,
            runner=dep.snapshot_runner(engine_name, spark_master=spark_master),
        )
    text = (
        f"snapshot {snap.id}: {len(snap.segments)} segments over {snap.people} people at {snap.as_of} "
        f"({timings['features_count']:.0f} distinct features; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k not in ("features_count", "groups"))
        + ")"
    )
    _emit({**asdict(snap), "timings": timings}, as_json, text)


@segments_app.command("status")
def segments_status(as_json: JsonOpt = False) -> None:
    """The latest snapshot and whether it is stale."""
    from privseg.segments import engine

    dep = _deployment()
    snap = engine.latest(dep.store.conn)
    reasons = dep.staleness(snap)
    info = {"snapshot": None if snap is None else asdict(snap), "stale": bool(reasons), "reasons": reasons}
    text = (
        "no snapshot yet"
        if snap is None
        else f"snapshot {snap.id} at {snap.as_of}: {len(snap.segments)} segments"
    )
    text += "; stale: " + "; ".join(reasons) if reasons else "; current"
    _emit(info, as_json, text)
