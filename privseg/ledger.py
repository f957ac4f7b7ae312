"""The privacy budget ledger: one row per spend, checked and written in one write transaction.

Budgets are rolling: what a recipient (and all recipients together) spent on a category within the
policy's period. ``charge`` must run inside :func:`privseg.db.transaction` (BEGIN IMMEDIATE), so two
concurrent requests cannot both see the same remaining budget: the second waits for the first's
commit and then sees its charge.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from privseg.errors import BudgetExhausted
from privseg.policy.categories import OBJECTIVES, CategoryPolicy, CategorySet, Objective

MICRO = 1_000_000


def to_micro(epsilon: float) -> int:
    return round(epsilon * MICRO)


def from_micro(micro: int) -> float:
    return micro / MICRO


def spent_micro(
    conn: sqlite3.Connection,
    *,
    category: str,
    since: datetime,
    recipient: str | None = None,
    objective: Objective | None = None,
) -> int:
    """What was charged to ``category`` at or after ``since`` (by ``recipient``, for ``objective``).

    The day totals (``ledger_days``) hold every day after the one ``since`` falls in; the ledger itself
    only that day's charges from ``since`` on. The sum is the same as over every charge of the period
    (``at`` is compared as text, as it is stored: the day is its first ten characters)."""
    since_at = since.isoformat()
    day = since_at[:10]
    # Every `at` of that day is below day + "U" ("...T..." < "...U"), every later one above it.
    filters, args = "", []
    if recipient is not None:
        filters += " AND recipient = ?"
        args.append(recipient)
    if objective is not None:
        # A release over segments of both objectives is recorded as "brand,performance" and counts
        # against both.
        filters += " AND instr(',' || objectives || ',', ?) > 0"
        args.append(f",{objective},")
    query = (
        "SELECT (SELECT COALESCE(SUM(epsilon_micro), 0) FROM ledger_days WHERE category = ? AND day > ?"
        f"{filters}) + (SELECT COALESCE(SUM(epsilon_micro), 0) FROM ledger WHERE category = ? AND at >= ? "
        f"AND at < ?{filters})"
    )
    return int(
        conn.execute(query, [category, day, *args, category, since_at, day + "U", *args]).fetchone()[0]
    )


@dataclass(frozen=True)
class Remaining:
    recipient_micro: int
    category_micro: int
    # What is left of each objective's share the release is charged to (empty without a split).
    objective_micro: dict[Objective, int] = field(default_factory=dict)

    @property
    def micro(self) -> int:
        return min(self.recipient_micro, self.category_micro, *self.objective_micro.values())


def objectives_key(objectives: Iterable[str]) -> str:
    """How a release's objectives are recorded in the ledger: sorted, comma-joined."""
    return ",".join(sorted(set(objectives)))


def remaining(
    conn: sqlite3.Connection,
    policy: CategoryPolicy,
    recipient: str,
    now: datetime,
    objectives: Iterable[Objective] = (),
) -> Remaining:
    """What ``recipient`` may still spend on ``policy``'s category now, for a release charged to
    ``objectives`` (the objectives of its segments), under the category's split if it has one."""
    since = now - timedelta(days=policy.budget.period_days)
    mine = spent_micro(conn, category=policy.name, since=since, recipient=recipient)
    everyone = spent_micro(conn, category=policy.name, since=since)
    per_objective: dict[Objective, int] = {}
    if policy.budget.objectives:
        for objective in sorted(set(objectives)):
            spent = spent_micro(
                conn, category=policy.name, since=since, recipient=recipient, objective=objective
            )
            per_objective[objective] = to_micro(policy.budget.objective_cap(objective)) - spent
    return Remaining(
        to_micro(policy.budget.per_recipient) - mine,
        to_micro(policy.budget.category_cap) - everyone,
        per_objective,
    )


def charge(
    conn: sqlite3.Connection,
    *,
    policy: CategoryPolicy,
    recipient: str,
    epsilon_micro: int,
    delta: float,
    release_id: int,
    policy_hash: str,
    now: datetime,
    objectives: Iterable[Objective] = (),
) -> None:
    """Record a spend, or raise BudgetExhausted naming what remains. Call inside a write transaction."""
    if not conn.in_transaction:
        raise RuntimeError("ledger.charge must run inside a write transaction")
    objectives = tuple(objectives)
    left = remaining(conn, policy, recipient, now, objectives)
    for objective, micro in left.objective_micro.items():
        if epsilon_micro > micro:
            raise BudgetExhausted(
                f"this release costs epsilon {from_micro(epsilon_micro):g} but recipient {recipient!r} has "
                f"{from_micro(max(micro, 0)):g} left of its {objective} budget for {policy.name!r} "
                f"({policy.budget.objective_cap(objective):g} per {policy.budget.period_days}-day period: "
                f"{policy.budget.objectives.get(objective, 0.0):g} of {policy.budget.per_recipient:g})"
            )
    if epsilon_micro > left.recipient_micro or epsilon_micro > left.category_micro:
        which = "recipient" if epsilon_micro > left.recipient_micro else "category-wide"
        raise BudgetExhausted(
            f"this release costs epsilon {from_micro(epsilon_micro):g} but the {which} budget for "
            f"{policy.name!r} has {from_micro(max(left.micro, 0)):g} left in the current "
            f"{policy.budget.period_days}-day period (recipient {recipient!r}: "
            f"{from_micro(max(left.recipient_micro, 0)):g} of {policy.budget.per_recipient:g}; "
            f"all recipients: "
            f"{from_micro(max(left.category_micro, 0)):g} of {policy.budget.category_cap:g})"
        )
    conn.execute(
        "INSERT INTO ledger (at, recipient, category, epsilon_micro, delta, release_id, policy_hash, "
        "objectives) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            now.isoformat(),
            recipient,
            policy.name,
            epsilon_micro,
            delta,
            release_id,
            policy_hash,
            objectives_key(objectives),
        ),
    )


def status(conn: sqlite3.Connection, categories: CategorySet, now: datetime) -> list[dict[str, object]]:
    """Spend and remaining budget per category and recipient within each category's period."""
    out: list[dict[str, object]] = []
    for name, policy in sorted(categories.categories.items()):
        since = now - timedelta(days=policy.budget.period_days)
        since_at = since.isoformat()
        rows = conn.execute(  # as spent_micro: the days after since's, then that day's charges
            "SELECT recipient, SUM(spent), SUM(charges) FROM ("
            "SELECT recipient, epsilon_micro AS spent, charges FROM ledger_days "
            "WHERE category = ? AND day > ? UNION ALL SELECT recipient, epsilon_micro, 1 FROM ledger "
            "WHERE category = ? AND at >= ? AND at < ?) GROUP BY recipient ORDER BY recipient",
            (name, since_at[:10], name, since_at, since_at[:10] + "U"),
        ).fetchall()
        total = sum(int(r[1]) for r in rows)
        out.append(
            {
                "category": name,
                "period_days": policy.budget.period_days,
                "category_cap": policy.budget.category_cap,
                "category_spent": from_micro(total),
                "category_remaining": from_micro(to_micro(policy.budget.category_cap) - total),
                "objective_shares": dict(policy.budget.objectives),
                "recipients": [
                    {
                        "recipient": r[0],
                        "spent": from_micro(int(r[1])),
                        "releases": int(r[2]),
                        "remaining": from_micro(to_micro(policy.budget.per_recipient) - int(r[1])),
                        "objectives": _by_objective(conn, policy, r[0], since),
                    }
                    for r in rows
                ],
            }
        )
    return out


def _by_objective(
    conn: sqlite3.Connection, policy: CategoryPolicy, recipient: str, since: datetime
) -> dict[str, dict[str, float]]:
    """Spent and left per objective of a category that splits its budget (empty if it does not)."""
    out: dict[str, dict[str, float]] = {}
    for objective in OBJECTIVES if policy.budget.objectives else ():
        spent = spent_micro(conn, category=policy.name, since=since, recipient=recipient, objective=objective)
        out[objective] = {
            "spent": from_micro(spent),
            "remaining": from_micro(to_micro(policy.budget.objective_cap(objective)) - spent),
        }
    return out


def next_credit(
    conn: sqlite3.Connection, policy: CategoryPolicy, now: datetime, recipient: str | None = None
) -> datetime | None:
    """When budget next comes back: the oldest charge still in the rolling period leaves it then.
    None when nothing is spent."""
    since = now - timedelta(days=policy.budget.period_days)
    query, args = (
        "SELECT MIN(at) FROM ledger WHERE category = ? AND at >= ?",
        [policy.name, since.isoformat()],
    )
    if recipient is not None:
        query += " AND recipient = ?"
        args.append(recipient)
    oldest = conn.execute(query, args).fetchone()[0]
    return (
        None if oldest is None else datetime.fromisoformat(oldest) + timedelta(days=policy.budget.period_days)
    )


@dataclass(frozen=True)
class Charge:
    at: str
    category: str
    recipient: str
    epsilon: float
    release_id: int


def charges(
    conn: sqlite3.Connection,
    *,
    category: str | None = None,
    recipient: str | None = None,
    since: datetime | None = None,
    limit: int = 500,
) -> list[Charge]:
    """Ledger rows, newest first (who spent what, on which category, for which release)."""
    query, args = "SELECT at, category, recipient, epsilon_micro, release_id FROM ledger WHERE 1 = 1", []
    for column, value in (("category", category), ("recipient", recipient)):
        if value is not None:
            query += f" AND {column} = ?"
            args.append(value)
    if since is not None:
        query += " AND at >= ?"
        args.append(since.isoformat())
    rows = conn.execute(query + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
    return [Charge(r[0], r[1], r[2], from_micro(int(r[3])), int(r[4])) for r in rows]


def budget_of(
    conn: sqlite3.Connection, categories: CategorySet, recipient: str, now: datetime
) -> list[dict[str, object]]:
    """What one marketer may still spend, per category it receives releases for."""
    out: list[dict[str, object]] = []
    for name, policy in sorted(categories.categories.items()):
        if recipient in policy.recipients.marketers:
            left = remaining(conn, policy, recipient, now)
            since = now - timedelta(days=policy.budget.period_days)
            out.append(
                {
                    "category": name,
                    "remaining_epsilon": from_micro(max(left.micro, 0)),
                    "per_recipient": policy.budget.per_recipient,
                    "period_days": policy.budget.period_days,
                    "objectives": {
                        o: max(v["remaining"], 0.0)
                        for o, v in _by_objective(conn, policy, recipient, since).items()
                    },
                }
            )
    return out
