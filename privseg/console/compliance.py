"""Compliance pages: the policy set (every parameter with its help), its check results and the diff
of a candidate set; the budget ledger (charts, who spent what, when budget comes back); the audit log
with filters, its verification and a signed anchor."""

from __future__ import annotations

from contextlib import suppress
from datetime import timedelta
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from privseg import audit, ledger
from privseg.console import charts, web
from privseg.console.web import PREFIX, Compliance, Dep
from privseg.deployment import Deployment
from privseg.errors import PolicyError
from privseg.policy.categories import CategoryPolicy, CategorySet
from privseg.policy.checks import candidate_findings, findings
from privseg.policy.diff import diff
from privseg.yamltext import parse_yaml

router = APIRouter(prefix=PREFIX, include_in_schema=False)
MAX_CANDIDATE_BYTES = 256 * 1024


def parameters(model: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, value, help) of every parameter of a policy, from the model's own descriptions."""
    out: list[tuple[str, Any, str]] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.extend(parameters(value, f"{prefix}{name}."))
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, tuple) else value
            out.append((prefix + name, shown, info.description or ""))
    return out


@router.get("/policies")
def policies(request: Request, dep: Dep, _who: Compliance) -> Response:
    return _policies_page(request, dep)


def _policies_page(request: Request, dep: Deployment, **candidate: Any) -> Response:
    """The policy set in force, with a checked candidate's results when there is one."""
    cats = dep.categories
    return web.render(
        request,
        "policies.html",
        policy_hash=cats.content_hash,
        categories=[(p, parameters(p)) for _, p in sorted(cats.categories.items())],
        findings=findings(cats, dep.schema),
        **({"candidate": "", "changes": None, "candidate_findings": None, "error": None} | candidate),
    )


@router.post("/policies")
async def policy_diff(request: Request, dep: Dep, session: Compliance) -> Response:
    """A candidate (YAML: category name -> policy, for the categories it changes or adds) checked and
    compared with the set in force: what got looser is what a reviewer must look at."""
    form = await web.checked_form(request, session)
    text = str(form.get("candidate") or "")
    cats = dep.categories
    changes: list[str] | None = None
    problems: list[str] | None = None
    error = None
    try:
        if len(text.encode()) > MAX_CANDIDATE_BYTES:
            raise PolicyError(f"the candidate is larger than {MAX_CANDIDATE_BYTES} bytes")
        try:
            doc = parse_yaml(text)
        except yaml.YAMLError:
            raise PolicyError("candidate: not valid YAML") from None
        if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
            raise PolicyError("candidate: expected a mapping of category name -> category policy")
        documents = {name: p.model_dump() for name, p in cats.categories.items()} | {
            str(k): v for k, v in doc.items()
        }
        problems = candidate_findings(documents, dep.schema)
        # The diff is shown beside the findings whenever every document parses: a reviewer wants to
        # see what got looser even in a candidate that checks refuse.
        with suppress(ValidationError):
            candidate = CategorySet(
                {n: CategoryPolicy.model_validate(d) for n, d in documents.items()}, "candidate"
            )
            changes = diff(cats, candidate)
    except PolicyError as exc:
        error = exc.message
    return _policies_page(
        request, dep, candidate=text, changes=changes, candidate_findings=problems, error=error
    )


@router.get("/ledger")
def budget_ledger(
    request: Request, dep: Dep, _who: Compliance, category: str = "", days: int = 30
) -> Response:
    now = web.now()
    status = ledger.status(dep.store.conn, dep.categories, now)
    days = min(max(days, 1), 3650)
    picked = category if category in dep.categories.categories else None
    bars = [
        {
            "label": f"{s['category']} / {r['recipient']}",
            "spent": r["spent"],
            "remaining": r["remaining"],
        }
        for s in status
        if picked is None or s["category"] == picked
        for r in s["recipients"]  # type: ignore[attr-defined]
    ]
    caps = [
        {"label": str(s["category"]), "spent": s["category_spent"], "remaining": s["category_remaining"]}
        for s in status
        if picked is None or s["category"] == picked
    ]
    charges = ledger.charges(dep.store.conn, category=picked, since=now - timedelta(days=days))
    totals: dict[str, float] = {}
    points = []
    for c in reversed(charges):  # oldest first
        who = c.recipient if picked else f"{c.category} / {c.recipient}"
        totals[who] = totals.get(who, 0.0) + c.epsilon
        points.append({"at": c.at, "recipient": who, "cumulative": round(totals[who], 6)})
    period = f"{picked or 'every category'}, last {days} days"
    credits = {
        name: ledger.next_credit(dep.store.conn, policy, now)
        for name, policy in dep.categories.categories.items()
    }
    return web.render(
        request,
        "ledger.html",
        status=status,
        categories=sorted(dep.categories.categories),
        category=picked or "",
        days=days,
        credits=credits,
        charges=charges,
        over_time=charts.spend_over_time(points, f"Epsilon spent over time ({period})") if points else None,
        per_recipient=charts.budget(bars, "Spent and left per category and recipient (epsilon)")
        if bars
        else None,
        per_category=charts.budget(caps, "Spent and left of each category's cap (epsilon)") if caps else None,
    )


@router.get("/audit")
def audit_log(
    request: Request,
    dep: Dep,
    _who: Compliance,
    event: str = "",
    mentions: str = "",
    since: str = "",
    until: str = "",
    before: int = 0,
    verify: bool = False,
) -> Response:
    conn = dep.store.conn
    verification, anchors_checked = None, 0
    if verify:
        # The server's own anchor file (PRIVSEG_AUDIT_ANCHOR_FILE), when there is one: a log cut at its
        # end shows there.
        path = dep.settings.audit_anchor_file
        anchors = audit.read_anchors(path) if path is not None and path.exists() else []
        verification, anchors_checked = audit.verify_all(conn, dep.keyset, anchors), len(anchors)
    page = audit.search(
        conn,
        event=event or None,
        mentions=mentions[:128] or None,
        since=since[:32] or None,
        until=until[:32] or None,
        before=before if 0 < before < 2**62 else None,
        limit=100,
    )
    return web.render(
        request,
        "audit.html",
        entries=page,
        events=audit.event_kinds(conn),
        filters={"event": event, "mentions": mentions, "since": since, "until": until},
        verification=verification,
        anchors_checked=anchors_checked,
        anchor=audit.anchor(conn, dep.keyset) if verify else None,
        older=page[-1].seq if len(page) == 100 else None,
    )
