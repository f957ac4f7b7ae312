"""Commands that release DP aggregates (reports, audiences, movement, lift) and show the budget."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from privseg.cli.shell import (
    JsonOpt,
    _deployment,
    _emit,
    _governed,
    _table,
    app,
)
from privseg.errors import InvalidInput, describe_validation_error

if TYPE_CHECKING:
    pass


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


@app.command("insight")
def insight_cmd(
    segment: Annotated[str, typer.Option("--segment", "-s", help="Segment id.")],
    attribute: Annotated[
        list[str], typer.Option("--attribute", "-a", help="Profile attribute, each on its own (repeatable).")
    ],
    recipient: Annotated[str | None, typer.Option(help="Marketer receiving the insight.")] = None,
    partner: Annotated[
        str | None, typer.Option(help="Ad partner receiving it instead (granted segments).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Audience insight for lookalikes: each attribute's DP shares in a segment and its affinity index
    against the whole consenting base (1 = as common as in the base), with intervals."""
    from privseg import release

    if (recipient is None) == (partner is None):
        raise InvalidInput("name exactly one receiver: --recipient MARKETER or --partner PARTNER")
    model = release.InsightRequest if partner is None else release.PartnerInsightRequest
    req = model(segment=segment, attributes=attribute, dry_run=dry_run)
    result = release.run(_governed().release_context(), req, recipient or partner or "")
    _emit(result, as_json, release.text(result))


@app.command("trend")
def trend_cmd(
    segment: Annotated[str, typer.Option("--segment", "-s", help="Whose events count (segment id).")],
    recipient: Annotated[str, typer.Option(help="Marketer receiving the trend.")],
    event: Annotated[str, typer.Option(help="Event type counted.")] = "purchase",
    where: Annotated[
        str | None, typer.Option(help="JSON event-field conditions (the segment language's).")
    ] = None,
    measure: Annotated[
        str,
        typer.Option(help="first: first events per period (binary tree); active: people active per period."),
    ] = "first",
    period: Annotated[str, typer.Option(help="day, week, month or quarter (calendar, UTC).")] = "week",
    periods: Annotated[int, typer.Option(help="How many closed periods, ending at the snapshot.")] = 12,
    start: Annotated[
        str | None,
        typer.Option(
            help="YYYY-MM-DD: a continual trend from this date's period over --periods; charged once."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A DP trend: people per calendar period over a window, as one release (first events through the
    binary-tree mechanism, whose error grows with log T rather than T)."""
    from pydantic import ValidationError  # (here: the CLI's start-up does not import pydantic)

    from privseg import release

    try:
        conditions = json.loads(where) if where else {}
    except json.JSONDecodeError:
        raise InvalidInput("--where is not valid JSON") from None
    fields = {"segment": segment, "event": event, "where": conditions, "measure": measure}
    try:
        req = release.TrendRequest.model_validate(
            fields | {"period": period, "periods": periods, "start": start, "dry_run": dry_run}
        )
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc)) from None
    result = release.run(_governed().release_context(), req, recipient)
    _emit(result, as_json, release.text(result))


@app.command("personas")
def personas_cmd(
    segment: Annotated[str, typer.Option("--segment", "-s", help="Whose behaviour (segment id).")],
    feature: Annotated[
        list[str],
        typer.Option(
            "--feature",
            "-f",
            help='JSON feature (repeatable): {"name": "orders", "event": {"type": "purchase", '
            '"last": "365d"}, "measure": "count", "min": 0, "max": 30}',
        ),
    ],
    recipient: Annotated[str, typer.Option(help="Marketer receiving the personas.")],
    k: Annotated[int, typer.Option(help="How many personas.")] = 4,
    iterations: Annotated[int, typer.Option(help="Lloyd rounds (each costs epsilon / iterations).")] = 5,
    seed: Annotated[int, typer.Option(help="Picks the data-independent starting centers.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Price and plan only; spend nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """DP personas: k behavioural centers by differentially private k-means over chosen features."""
    from pydantic import ValidationError  # (here: the CLI's start-up does not import pydantic)

    from privseg import release

    try:
        features = [json.loads(f) for f in feature]
    except json.JSONDecodeError:
        raise InvalidInput("--feature is not valid JSON") from None
    body = {"segment": segment, "features": features, "k": k, "iterations": iterations, "seed": seed}
    try:
        req = release.PersonaRequest.model_validate(body | {"dry_run": dry_run})
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc)) from None
    result = release.run(_governed().release_context(), req, recipient)
    _emit(result, as_json, release.text(result))


@app.command("budget")
def budget(as_json: JsonOpt = False) -> None:
    """Privacy budget spent and remaining, per category and recipient, in the current periods."""
    from privseg import ledger

    dep = _deployment()
    rows = ledger.status(dep.conn, dep.categories, datetime.now(UTC))
    table: list[list[Any]] = []
    for c in rows:
        table.append(
            [
                c["category"],
                "(all)",
                f"{c['category_spent']:g}",
                f"{c['category_remaining']:g}",
                "",
                c["period_days"],
            ]
        )
        for r in c["recipients"]:  # type: ignore[attr-defined]
            table.append(["", r["recipient"], f"{r['spent']:g}", f"{r['remaining']:g}", r["releases"], ""])
            for objective, o in r["objectives"].items():  # a category that splits its budget
                table.append(["", f"  {objective}", f"{o['spent']:g}", f"{o['remaining']:g}", "", ""])
    columns = ["category", "recipient", "epsilon spent", "epsilon left", "releases", "period (days)"]
    _emit(rows, as_json, None if as_json else _table(columns, table))
