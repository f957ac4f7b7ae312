"""Commands for compliance and operations: the audit log, policies, API keys, the server."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from privseg.api.workers import MAX_WORKERS, default_workers
from privseg.cli.shell import (
    EncodingOpt,
    JsonOpt,
    SeparatorOpt,
    _deployment,
    _emit,
    _governed,
    _table,
    app,
    audit_app,
    group,
    policy_app,
)
from privseg.errors import InvalidInput

if TYPE_CHECKING:
    from privseg.policy.categories import CategorySet
    from privseg.schema import Schema


@audit_app.command("anchor")
def audit_anchor(
    out: Annotated[
        Path | None, typer.Option(help="Append the signed head to this file (0600) instead of printing it.")
    ] = None,
) -> None:
    """A signed head of the audit log (entry count, last MAC, time). Keep it outside the server:
    `audit verify --anchor FILE` then detects entries cut from the end of the log."""
    from privseg import audit

    dep = _deployment()
    head = audit.anchor(dep.store.conn, dep.keyset)
    if out is None:
        typer.echo(json.dumps(head, sort_keys=True))
    else:
        audit.append_anchor(out, head)
        typer.echo(f"anchored {head['entries']} entries to {out}")


@audit_app.command("verify")
def audit_verify(
    anchor: Annotated[
        Path | None, typer.Option(help="Anchor file (from `audit anchor`): the log must still extend each.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the audit log's HMAC chain, the ledger against the audited charges, the ledger's day
    totals against its charges, and the anchors; names the first problem. Exit code 1 if anything was
    tampered with."""
    from privseg import audit

    dep = _deployment()
    anchors = audit.read_anchors(anchor) if anchor is not None else []
    result = audit.verify_all(dep.store.conn, dep.keyset, anchors)
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
    from privseg import audit

    dep = _deployment()
    rows = audit.entries(dep.store.conn, after=after, limit=limit)
    text = "\n".join(f"{e.seq:>6} {e.at} {e.event:<14} {json.dumps(e.details, sort_keys=True)}" for e in rows)
    _emit([asdict(e) for e in rows], as_json, text or "(no entries)")


@policy_app.command("check")
def policy_check(
    directory: Annotated[
        Path | None, typer.Argument(help="Policy directory (default: PRIVSEG_POLICY_DIR).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate the whole policy set and explain every finding; with a deployment here (PRIVSEG_HOME),
    also name each stored segment or trait that a snapshot under this set could not compute. Exit 1 if
    the set would be refused, or would stop this deployment's snapshots."""
    from privseg.policy.categories import read_categories
    from privseg.policy.checks import findings
    from privseg.policy.ingest import load_ingest_policy
    from privseg.schema import Schema
    from privseg.settings import Settings

    settings = Settings()
    policy_dir = directory or settings.policy_dir
    schema = Schema.from_ingest_policy(load_ingest_policy(policy_dir / "ingest.yaml"))
    cats = read_categories(policy_dir)
    problems = findings(cats, schema)
    folder = policy_dir / "categories"
    text = f"{policy_dir / 'ingest.yaml'}: OK\n" + (
        f"{folder}: {len(problems)} finding(s); this policy set is refused:\n"
        + "\n".join(f"  - {p}" for p in problems)
        if problems
        else f"{folder}: OK, {len(cats.categories)} categories, policy hash {cats.content_hash}"
    )
    # A valid set can still stop a deployment: every snapshot computes every stored definition.
    checked = None if problems else _unbuildable_definitions(settings.db_path, schema, cats)
    if checked is not None:
        count, unbuildable = checked
        text += (
            f"\nstored definitions: {len(unbuildable)} of {count} could not be computed under this policy "
            "set; every snapshot would stop until they are changed or retired:\n"
            + "\n".join(f"  - {u}" for u in unbuildable)
            if unbuildable
            else f"\nstored definitions: OK, all {count} can be computed under this policy set"
        )
    elif not problems:
        text += f"\nstored definitions: not checked (no deployment at {settings.home})"
    broken = checked[1] if checked is not None else []
    _emit(
        {
            "ok": not problems and not broken,
            "findings": problems,
            "policy_hash": cats.content_hash,
            "definitions_checked": checked is not None,
            "unbuildable_definitions": broken,
        },
        as_json,
        text,
    )
    if problems or broken:
        raise typer.Exit(1)


def _unbuildable_definitions(
    db_path: Path, schema: Schema, cats: CategorySet
) -> tuple[int, list[str]] | None:
    """How many definitions this deployment keeps active, and those a snapshot under ``schema`` and
    ``cats`` could not compute; None when there is no deployment database (none is created)."""
    if not db_path.exists():
        return None
    from privseg.db import connect
    from privseg.segments.definitions import active, unbuildable

    conn = connect(db_path)
    try:
        stored = active(conn)
        return len(stored), unbuildable(stored, schema=schema, categories=cats)
    finally:
        conn.close()


@policy_app.command("draft")
def policy_draft(
    profiles: Annotated[Path, typer.Argument(help="A sample profiles file (CSV, Parquet, NDJSON).")],
    events: Annotated[Path | None, typer.Option(help="A sample events file.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the draft here (refuses to overwrite).")] = None,
    separator: SeparatorOpt = None,
    encoding: EncodingOpt = "utf-8",
) -> None:
    """Draft an ingest policy from sample files, every choice commented for review. No value that could
    single a person out is copied into it."""
    from privseg.policy.draft import draft

    text = draft(
        profiles,
        events,
        separator=separator.replace("\\t", "\t") if separator else None,
        encoding=encoding,
    )
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.exists():
        raise InvalidInput(f"{out}: exists; refusing to overwrite it")
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote a draft ingest policy to {out}: review it, then `privseg policy check`")


@policy_app.command("diff")
def policy_diff(old: Path, new: Path, as_json: JsonOpt = False) -> None:
    """What got looser or stricter between two policy directories."""
    from privseg.policy.categories import read_categories
    from privseg.policy.diff import diff

    changes = diff(read_categories(old), read_categories(new))
    text = "\n".join(changes) if changes else "no differences in category policies"
    _emit({"changes": changes, "looser": [c for c in changes if "LOOSER" in c]}, as_json, text)


apikey_app = group("Issue, list and revoke API keys.")
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
def apikey_create(
    role: Annotated[str, typer.Option(help="admin, marketer, compliance or partner.")],
    name: Annotated[str, typer.Option(help="Key name; for marketers, the marketer id releases go to.")],
    partner: Annotated[str | None, typer.Option(help="For partner keys: the partner id.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key. The token is printed once; only a keyed hash is stored."""
    from privseg import apikeys

    dep = _deployment()
    key, token = apikeys.create(dep.store.conn, dep.keyset, role=role, name=name, partner=partner)
    text = f"API key {key.key_id} ({key.role}, acting as {key.principal!r}); shown once:\n{token}"
    _emit({**asdict(key), "token": token}, as_json, text)


@apikey_app.command("list")
def apikey_list(as_json: JsonOpt = False) -> None:
    """API keys (never their tokens)."""
    from privseg import apikeys

    rows = apikeys.listing(_deployment().store.conn)
    columns = ["id", "role", "principal", "name", "created", "revoked"]
    table = [[r[c] for c in ("id", "role", "principal", "name", "created_at", "revoked_at")] for r in rows]
    text = _table(columns, table) if rows else ""
    _emit(rows, as_json, text or "(no keys)")


@apikey_app.command("revoke")
def apikey_revoke(key_id: int, as_json: JsonOpt = False) -> None:
    """Revoke an API key."""
    from privseg import apikeys

    dep = _deployment()
    apikeys.revoke(dep.store.conn, dep.keyset, key_id)
    _emit({"revoked": key_id}, as_json, f"revoked API key {key_id}")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_WORKERS,
            envvar="PRIVSEG_WORKERS",
            show_default="one per core this process may run on",
            help="Worker processes (every budget and cache guarantee holds across processes).",
        ),
    ] = None,
) -> None:
    """Run the HTTP API (uvicorn) on embedded defaults."""
    from privseg.api import serving

    workers = workers or default_workers()
    dep = _governed()
    # Refuse to start on a bad policy set, a missing keyset or an unreadable store.
    dep.keyset, dep.ingest_policy  # noqa: B018
    typer.echo(
        f"privseg serving on http://{host}:{port} (OpenAPI at /docs) with {workers} worker(s); policy hash "
        f"{dep.categories.content_hash}, store key version {dep.store.key_version()}",
        err=True,
    )
    serving.serve(dep, host=host, port=port, workers=workers)
