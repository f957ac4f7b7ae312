"""The ``privseg`` command line: a thin shell over the service modules (as is ``privseg.api``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from privseg.errors import InvalidInput, NotFound, PrivsegError

if TYPE_CHECKING:  # the command modules are imported by the commands that use them: a fast --help
    from privseg.deployment import Deployment
    from privseg.ingest import Mode
    from privseg.segments.definitions import Applied
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
segments_app = typer.Typer(no_args_is_help=True, help="Define, explain and compute segments.")
app.add_typer(keys_app, name="keys")
app.add_typer(ingest_app, name="ingest")
app.add_typer(store_app, name="store")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.add_typer(segments_app, name="segments")


def _version(show: bool) -> None:
    if show:
        from privseg import __version__

        typer.echo(f"privseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """privseg: privacy-preserving customer segmentation. Only differentially private aggregates leave."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
Files = Annotated[list[Path], typer.Argument(help="Files to ingest, all or none.", show_default=False)]


def _deployment() -> Deployment:
    from privseg.deployment import Deployment, configure_logging
    from privseg.settings import Settings

    settings = Settings()
    configure_logging(settings)
    return Deployment(settings)


def _governed() -> Deployment:
    """A deployment for a command that acts under the policies: they are loaded first, and a policy
    set not seen before is recorded in the audit log."""
    dep = _deployment()
    dep.record_policies()
    return dep


@contextmanager
def _progress(as_json: bool) -> Iterator[Callable[[str], None]]:
    """A status line on a terminal (stderr) for long work; nothing when not a TTY or with --json."""
    if as_json or not sys.stderr.isatty():
        yield lambda _message: None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        yield lambda message: status.update(message)


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


SeparatorOpt = Annotated[
    str | None,
    typer.Option(help="CSV field separator (default: detected among comma, semicolon, tab and pipe)."),
]
EncodingOpt = Annotated[
    str, typer.Option(help="CSV text encoding: utf-8 (a byte-order mark is fine) or e.g. latin-1.")
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
    from privseg.ingest import ingest_files

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
    """Check the audit log's HMAC chain, the ledger against the audited charges, and the anchors;
    names the first problem. Exit code 1 if anything was tampered with."""
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
    """Validate the whole policy set and explain every finding. Exit 1 if the set would be refused."""
    from privseg.category_policy import findings, read_categories
    from privseg.ingest_policy import load_ingest_policy
    from privseg.schema import Schema
    from privseg.settings import Settings

    policy_dir = directory or Settings().policy_dir
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
    _emit({"ok": not problems, "findings": problems, "policy_hash": cats.content_hash}, as_json, text)
    if problems:
        raise typer.Exit(1)


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
    from privseg.policy_draft import draft

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
    from privseg.category_policy import diff, read_categories

    changes = diff(read_categories(old), read_categories(new))
    text = "\n".join(changes) if changes else "no differences in category policies"
    _emit({"changes": changes, "looser": [c for c in changes if "LOOSER" in c]}, as_json, text)


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
    text = "\n".join(
        f"{s.kind:<8} {s.id:<32} v{s.version:<3} {cats[(s.kind, s.id)]:<24} owner {s.owner}" for s in rows
    )
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
            store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=as_of, progress=progress
        )
    text = (
        f"snapshot {snap.id}: {len(snap.segments)} segments over {snap.people} people at {snap.as_of} "
        f"({timings['features_count']:.0f} distinct features; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "features_count")
        + ")"
    )
    _emit({**asdict(snap), "timings": timings}, as_json, text)


@segments_app.command("status")
def segments_status(as_json: JsonOpt = False) -> None:
    """The latest snapshot and whether it is stale."""
    from privseg.segments import engine

    dep = _deployment()
    snap = engine.latest(dep.store.conn)
    reasons = engine.staleness(dep.store, snap, policy_hash=dep.categories.content_hash)
    info = {"snapshot": None if snap is None else asdict(snap), "stale": bool(reasons), "reasons": reasons}
    text = (
        "no snapshot yet"
        if snap is None
        else f"snapshot {snap.id} at {snap.as_of}: {len(snap.segments)} segments"
    )
    text += "; stale: " + "; ".join(reasons) if reasons else "; current"
    _emit(info, as_json, text)


@app.command("report")
def report(
    segment: Annotated[list[str], typer.Option("--segment", "-s", help="Segment id (repeatable).")],
    recipient: Annotated[str, typer.Option(help="Marketer receiving the report (policy-checked).")],
    by: Annotated[list[str] | None, typer.Option("--by", help="Breakdown dimension (repeatable).")] = None,
    spend: Annotated[
        bool, typer.Option("--spend", help="Also release total and mean clipped spend.")
    ] = False,
    spend_event: Annotated[str, typer.Option(help="Event type whose value counts as spend.")] = "purchase",
    spend_where: Annotated[
        str | None,
        typer.Option(
            help="JSON event-field conditions on spend events, e.g. "
            '\'{"product_category": {"not_in_or_unknown": ["cannabis"]}}\' (unfiltered spend reads '
            "every stigmatized category's purchases)."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A differentially private cohort report: segment sizes (and breakdowns) with 95% intervals."""
    from privseg import release

    try:
        where = json.loads(spend_where) if spend_where else {}
    except json.JSONDecodeError:
        raise InvalidInput("--spend-where is not valid JSON") from None
    if not isinstance(where, dict):
        raise InvalidInput("--spend-where must be a JSON object: event field -> condition")
    dep = _governed()
    req = release.CohortReportRequest(
        segments=segment,
        breakdown=by or [],
        measures=["count", "spend"] if spend else ["count"],
        spend_event=spend_event,
        spend_where=where,
        dry_run=dry_run,
    )
    result = release.run(dep.release_context(), req, recipient)
    _emit(result, as_json, release.text(result))


@app.command("audience")
def audience(
    segment: Annotated[str, typer.Option("--segment", "-s", help="Segment id.")],
    partner: Annotated[str, typer.Option(help="Ad partner receiving the audience (policy-checked).")],
    by: Annotated[list[str] | None, typer.Option("--by", help="Breakdown dimension (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A thresholded partner audience: DP counts per cell and the segment's share of each cell."""
    from privseg import release

    dep = _governed()
    req = release.PartnerAudienceRequest(segment=segment, breakdown=by or ["region"], dry_run=dry_run)
    result = release.run(dep.release_context(), req, partner)
    _emit(result, as_json, release.text(result))


@app.command("movement")
def movement_cmd(
    segment: Annotated[list[str], typer.Option("--segment", "-s", help="Ordered states (repeatable).")],
    from_snapshot: Annotated[int, typer.Option(help="The earlier snapshot id (see segments status).")],
    recipient: Annotated[str, typer.Option(help="Marketer receiving the report.")],
    to_snapshot: Annotated[int | None, typer.Option(help="The later snapshot (default: latest).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A DP transition table: how many people moved between segments across two snapshots."""
    from privseg import release

    req = release.MovementRequest(
        segments=segment,
        from_snapshot=from_snapshot,
        to_snapshot=to_snapshot,
        dry_run=dry_run,
    )
    result = release.run(_governed().release_context(), req, recipient)
    _emit(result, as_json, release.text(result))


@app.command("lift")
def lift_cmd(
    treatment: Annotated[str, typer.Option(help="Segment of the treatment arm.")],
    control: Annotated[str, typer.Option(help="Segment of the control arm.")],
    conversion: Annotated[str, typer.Option(help="Segment whose members count as converted.")],
    recipient: Annotated[str, typer.Option(help="Marketer receiving the report.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A DP A/B lift report: conversions per arm and the lift, with an interval that includes the noise."""
    from privseg import release

    req = release.LiftRequest(treatment=treatment, control=control, conversion=conversion, dry_run=dry_run)
    result = release.run(_governed().release_context(), req, recipient)
    _emit(result, as_json, release.text(result))


@app.command("budget")
def budget(as_json: JsonOpt = False) -> None:
    """Privacy budget spent and remaining, per category and recipient, in the current periods."""
    from privseg import ledger

    dep = _deployment()
    rows = ledger.status(dep.store.conn, dep.categories, datetime.now(UTC))
    lines = []
    for c in rows:
        lines.append(
            f"{c['category']:<14} spent {c['category_spent']:g} of {c['category_cap']:g} "
            f"(last {c['period_days']} days)"
        )
        for r in c["recipients"]:  # type: ignore[attr-defined]
            lines.append(
                f"  {r['recipient']:<20} spent {r['spent']:g} in {r['releases']} release(s), "
                f"{r['remaining']:g} left"
            )
    _emit(rows, as_json, "\n".join(lines))


apikey_app = typer.Typer(no_args_is_help=True, help="Issue, list and revoke API keys.")
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
    text = "\n".join(
        f"{r['id']:>4} {r['role']:<10} {r['principal']:<20} {r['name']:<20} revoked={r['revoked_at']}"
        for r in rows
    )
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
) -> None:
    """Run the HTTP API (uvicorn) on embedded defaults."""
    import uvicorn

    from privseg.api.app import create_app

    dep = _governed()
    # Refuse to start on a bad policy set, a missing keyset or an unreadable store.
    dep.keyset, dep.ingest_policy  # noqa: B018
    typer.echo(
        f"privseg serving on http://{host}:{port} (OpenAPI at /docs); policy hash "
        f"{dep.categories.content_hash}, store key version {dep.store.key_version()}",
        err=True,
    )
    uvicorn.run(create_app(dep), host=host, port=port, log_config=None, timeout_graceful_shutdown=30)


def main() -> None:
    # Everything privseg writes (database, Parquet, logs, anchors) is its own: owner-only from creation.
    os.umask(0o077)
    try:
        app()
    except PrivsegError as exc:
        typer.echo(f"error ({exc.code}): {exc.message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
