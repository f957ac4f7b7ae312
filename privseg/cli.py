"""The ``privseg`` command line: a thin shell over the service modules (as is ``privseg.api``)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from privseg import audit, demo, maintenance
from privseg.deployment import Deployment, configure_logging
from privseg.errors import PrivsegError
from privseg.ingest import ingest_files
from privseg.keyset import create_keyset
from privseg.settings import Settings
from privseg.store import Kind

# pretty_exceptions would print local variables of every frame, key material included.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
keys_app = typer.Typer(no_args_is_help=True, help="Create, rotate and inspect the keyset.")
ingest_app = typer.Typer(
    no_args_is_help=True, help="Ingest profiles or events (CSV, CSV.gz, Parquet, NDJSON)."
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain the pseudonymized store.")
audit_app = typer.Typer(no_args_is_help=True, help="Read and verify the tamper-evident audit log.")
policy_app = typer.Typer(no_args_is_help=True, help="Check policy files.")
app.add_typer(keys_app, name="keys")
app.add_typer(ingest_app, name="ingest")
app.add_typer(store_app, name="store")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
Files = Annotated[list[Path], typer.Argument(help="Files to ingest, all or none.", show_default=False)]


def _deployment() -> Deployment:
    settings = Settings()
    configure_logging(settings)
    return Deployment(settings)


def _emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text if text is not None else json.dumps(data, indent=2, default=str))


@keys_app.command("init")
def keys_init(
    namespace: Annotated[
        str, typer.Option(help="Deployment namespace bound into every pseudonym.")
    ] = "default",
) -> None:
    """Create the keyset (mode 0600). Refuses to overwrite an existing one."""
    settings = Settings()
    ks = create_keyset(settings.keyset, namespace)
    typer.echo(f"created keyset {settings.keyset} (namespace {ks.namespace!r}, key version {ks.primary})")


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Add a pseudonym key version and re-pseudonymize the whole store with it (atomically)."""
    dep = _deployment()
    result = maintenance.rotate_keys(
        store=dep.store, keyset_path=dep.settings.keyset, policy=dep.ingest_policy
    )
    how = "finished an interrupted rotation" if result.resumed else "rotated"
    typer.echo(
        f"{how}: pseudonyms now use key version {result.to_version} "
        f"({result.batches_rewritten} batches rewritten)"
    )


@keys_app.command("status")
def keys_status(as_json: JsonOpt = False) -> None:
    """Key versions and creation times (never key bytes), and the version the store uses."""
    dep = _deployment()
    info = {**dep.keyset.describe(), "store_key_version": dep.store.key_version()}
    _emit(info, as_json)


def _ingest(kind: Kind, files: list[Path], as_json: bool) -> None:
    dep = _deployment()
    results = ingest_files(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=files
    )
    _emit([asdict(r) for r in results], as_json, "\n".join(r.message for r in results))


@ingest_app.command("profiles")
def ingest_profiles(files: Files, as_json: JsonOpt = False) -> None:
    """Ingest customer profiles (upserted per person: the latest batch wins)."""
    _ingest("profiles", files, as_json)


@ingest_app.command("events")
def ingest_events(files: Files, as_json: JsonOpt = False) -> None:
    """Ingest behavioural events."""
    _ingest("events", files, as_json)


@store_app.command("status")
def store_status(as_json: JsonOpt = False) -> None:
    """Batches, rows and people per kind. Never lists a person."""
    _emit(_deployment().store.status(), as_json)


@store_app.command("compact")
def store_compact(as_json: JsonOpt = False) -> None:
    """Merge profile batches and drop events past the retention limit."""
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
) -> None:
    """Erase a data subject from every batch. The audit log records the erasure, not the person."""
    if raw_id == "-":
        raw_id = sys.stdin.readline().rstrip("\n")
    dep = _deployment()
    result = maintenance.erase_subject(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, raw_id=raw_id
    )
    if result.found:
        typer.echo(
            f"erased: {result.profile_rows} profile rows and {result.event_rows} event rows "
            f"from {result.batches_rewritten} batches"
        )
    else:
        typer.echo("no data for that identifier; nothing erased")


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
) -> None:
    """Run the whole pipeline on embedded defaults: keys, demo data, ingestion, summary."""
    dep = _deployment()
    for line in demo.run(dep, customers=customers, seed=seed, data_dir=data):
        typer.echo(line)


@audit_app.command("verify")
def audit_verify(as_json: JsonOpt = False) -> None:
    """Check the audit log's HMAC chain; names the first bad entry. Exit code 1 if tampered."""
    dep = _deployment()
    result = audit.verify(dep.store.conn, dep.keyset)
    text = (
        f"audit log OK: {result.entries} entries verified"
        if result.ok
        else f"AUDIT LOG TAMPERED: {result.problem} (first bad entry: {result.first_bad_seq})"
    )
    _emit(asdict(result), as_json, text)
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    after: Annotated[int, typer.Option(help="Show entries after this sequence number.")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Print audit entries (they never hold identifiers or released values)."""
    dep = _deployment()
    rows = audit.entries(dep.store.conn, after=after, limit=limit)
    text = "\n".join(f"{e.seq:>6} {e.at} {e.event:<14} {json.dumps(e.details, sort_keys=True)}" for e in rows)
    _emit([asdict(e) for e in rows], as_json, text or "(no entries)")


@policy_app.command("check")
def policy_check(
    directory: Annotated[
        Path | None, typer.Argument(help="Policy directory (default: PRIVSEG_POLICY_DIR).")
    ] = None,
) -> None:
    """Validate the policy files; explains every finding."""
    from privseg.ingest_policy import load_ingest_policy

    settings = Settings()
    policy_dir = directory or settings.policy_dir
    load_ingest_policy(policy_dir / "ingest.yaml")
    typer.echo(f"{policy_dir / 'ingest.yaml'}: OK")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the HTTP API (uvicorn) on embedded defaults."""
    import uvicorn

    from privseg.api.app import create_app

    dep = _deployment()
    uvicorn.run(create_app(dep), host=host, port=port, log_config=None, timeout_graceful_shutdown=30)


def main() -> None:
    try:
        app()
    except PrivsegError as exc:
        typer.echo(f"error ({exc.code}): {exc.message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
