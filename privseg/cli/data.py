"""Commands over the data: keys, ingestion, the store, erasure, re-identification, demo data."""

from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from privseg.cli.shell import (
    EncodingOpt,
    Files,
    JsonOpt,
    SeparatorOpt,
    _deployment,
    _emit,
    _progress,
    app,
    ingest_app,
    keys_app,
    store_app,
)
from privseg.errors import InvalidInput

if TYPE_CHECKING:
    from privseg.batches import Kind
    from privseg.ingest.result import Mode


@keys_app.command("init")
def keys_init(
    namespace: Annotated[
        str, typer.Option(help="Deployment namespace bound into every pseudonym.")
    ] = "default",
) -> None:
    """Create the keyset (mode 0600). Refuses to overwrite an existing one."""
    from privseg.keyset import create_keyset
    from privseg.settings import Settings

    settings = Settings()
    ks = create_keyset(settings.keyset, namespace)
    typer.echo(f"created keyset {settings.keyset} (namespace {ks.namespace!r}, key version {ks.primary})")


@keys_app.command("rotate")
def keys_rotate(as_json: JsonOpt = False) -> None:
    """Add a pseudonym key version and re-pseudonymize the whole store with it (atomically)."""
    from privseg import maintenance

    dep = _deployment()
    result = maintenance.rotate_keys(
        store=dep.store, keyset_path=dep.settings.keyset, policy=dep.ingest_policy
    )
    how = "finished an interrupted rotation" if result.resumed else "rotated"
    text = (
        f"{how}: pseudonyms now use key version {result.to_version} "
        f"({result.batches_rewritten} batches rewritten)"
    )
    _emit(asdict(result), as_json, text)


@keys_app.command("retire")
def keys_retire(as_json: JsonOpt = False) -> None:
    """Delete old pseudonym key versions that no batch or kept snapshot uses any more (after a
    completed rotation). The audit key is not rotated: the log's chain is verified with it."""
    from privseg import maintenance

    dep = _deployment()
    retired = maintenance.retire_keys(store=dep.store, keyset_path=dep.settings.keyset)
    text = f"retired key versions {retired}" if retired else "no unused key versions to retire"
    _emit({"retired": retired}, as_json, text)


@keys_app.command("status")
def keys_status(as_json: JsonOpt = False) -> None:
    """Key versions and creation times (never key bytes), and the version the store uses."""
    dep = _deployment()
    info = {**dep.keyset.describe(), "store_key_version": dep.store.key_version()}
    _emit(info, as_json)


AsOfOpt = Annotated[
    datetime | None,
    typer.Option(
        "--as-of",
        help="Reference time for retention and ages (default now, UTC): load a historical export as of "
        "its own time.",
    ),
]


def _ingest(
    kind: Kind,
    files: list[Path],
    as_json: bool,
    as_of: datetime | None,
    separator: str | None,
    encoding: str,
    mode: Mode = "patch",
) -> None:
    from privseg.ingest.files import ingest_files

    dep = _deployment()
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    with _progress(as_json) as progress:
        results = ingest_files(
            store=dep.store,
            keyset=dep.keyset,
            policy=dep.ingest_policy,
            kind=kind,
            paths=files,
            now=as_of,
            max_decompressed_bytes=dep.settings.max_decompressed_bytes,
            mode=mode,
            separator=separator.replace("\\t", "\t") if separator else None,
            encoding=encoding,
            progress=progress,
        )
    _emit([asdict(r) for r in results], as_json, "\n".join(r.message for r in results))


@ingest_app.command("profiles")
def ingest_profiles(
    files: Files,
    mode: Annotated[
        str,
        typer.Option(
            help="patch: update only the columns the file has, for the people it has (default); "
            "replace: the file is these people's whole profile (columns it lacks become unknown).",
        ),
    ] = "patch",
    as_of: AsOfOpt = None,
    separator: SeparatorOpt = None,
    encoding: EncodingOpt = "utf-8",
    as_json: JsonOpt = False,
) -> None:
    """Ingest customer profiles: per person and per column, the latest batch wins."""
    if mode not in ("patch", "replace"):
        raise InvalidInput("--mode must be patch or replace")
    how: Mode = "replace" if mode == "replace" else "patch"
    _ingest("profiles", files, as_json, as_of, separator, encoding, how)


@ingest_app.command("events")
def ingest_events(
    files: Files,
    as_of: AsOfOpt = None,
    separator: SeparatorOpt = None,
    encoding: EncodingOpt = "utf-8",
    as_json: JsonOpt = False,
) -> None:
    """Ingest behavioural events (events past retention, counted from --as-of, are dropped)."""
    _ingest("events", files, as_json, as_of, separator, encoding)


@ingest_app.command("intake")
def ingest_intake(
    batch: Annotated[
        Path, typer.Argument(help="A Segment / RudderStack batch JSON file ({'batch': [...]}).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Ingest one live-intake batch from a file, exactly as POST /v1/intake/batch does (a replay or a
    backfill of what a pipeline sent: messages stored before are not stored again)."""
    import json

    from pydantic import ValidationError

    from privseg.errors import describe_validation_error
    from privseg.ingest.intake import IntakeBatch, ingest_batch

    try:
        doc = json.loads(batch.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"{batch}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{batch}: not a JSON document ({type(exc).__name__})") from None
    try:
        body = IntakeBatch.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInput(f"{batch}: {describe_validation_error(exc)}") from None
    dep = _deployment()
    result = ingest_batch(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, batch=body)
    text = (
        f"{batch.name}: {result.stored} event(s) and {result.profiles} profile patch(es) stored; "
        f"{result.duplicates} duplicate(s), {result.skipped} skipped, {result.expired} past retention"
    )
    _emit(asdict(result), as_json, text)


@store_app.command("status")
def store_status(as_json: JsonOpt = False) -> None:
    """Batches, rows and people per kind. Never lists a person."""
    _emit(_deployment().store.status(), as_json)


@store_app.command("compact")
def store_compact(as_json: JsonOpt = False) -> None:
    """Merge profile batches and drop events past the retention limit."""
    from privseg import maintenance

    dep = _deployment()
    result = maintenance.compact(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy)
    _emit(asdict(result), as_json)


@app.command("erase")
def erase(
    raw_id: Annotated[
        str,
        typer.Option(
            "--id",
            help="The data subject's raw identifier, or '-' to read it from standard input "
            "(keeps it out of shell history and the process list).",
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Erase a data subject from every batch. The audit log records the erasure, not the person."""
    from privseg import maintenance

    if raw_id == "-":
        raw_id = sys.stdin.readline().rstrip("\n")
    dep = _deployment()
    result = maintenance.erase_subject(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id=raw_id
    )
    text = (
        f"erased: {result.profile_rows} profile rows and {result.event_rows} event rows "
        f"from {result.batches_rewritten} batches, and the person from "
        f"{result.snapshots_rewritten} snapshot(s)"
        if result.found
        else "no data for that identifier; nothing erased"
    )
    _emit({**asdict(result), "found": result.found}, as_json, text)


@app.command("reidentify")
def reidentify_cmd(
    pseudonym: Annotated[
        str, typer.Option(help="The pseudonym (k<version>.<...>) to turn back into an identifier.")
    ],
    reason: Annotated[str, typer.Option(help="Why (audited). E.g. a data-subject access request reference.")],
) -> None:
    """For the key holder (compliance): decrypt one pseudonym. Audited with the reason; never over HTTP."""
    from privseg import maintenance

    dep = _deployment()
    identifier = maintenance.reidentify(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, pseudonym=pseudonym, reason=reason
    )
    typer.echo(identifier)


@app.command("demo-data")
def demo_data(
    customers: Annotated[int, typer.Option(min=1, help="How many customers.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same people).")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("demo-data"),
) -> None:
    """Write synthetic customers.csv and events.csv, with raw identifiers, for demos and benchmarks."""
    from privseg.demo_data import generate

    files = generate(out, customers=customers, seed=seed)
    typer.echo(
        f"wrote {files.customer_rows} customers to {files.customers} "
        f"and {files.event_rows} events to {files.events}"
    )


@app.command("demo")
def demo_cmd(
    customers: Annotated[
        int, typer.Option(min=1, help="Customers to generate if no data is given.")
    ] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed for the demo data.")] = 7,
    data: Annotated[
        Path | None, typer.Option(help="Directory with customers.csv and events.csv (default: generate).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline on embedded defaults: keys, demo data, ingestion, segments, summary."""
    from privseg import demo

    dep = _deployment()
    lines = demo.run(dep, customers=customers, seed=seed, data_dir=data)
    if as_json:
        _emit({"steps": list(lines)}, as_json)
        return
    for line in lines:
        typer.echo(line)
