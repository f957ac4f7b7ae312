"""Budget sums read the ledger's day totals: the same numbers as summing every charge of the period."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from privseg import audit, db, ledger
from privseg.policy.categories import OBJECTIVES, read_categories
from tests.conftest import AS_OF, POLICIES, database_before

RECIPIENTS = ("growth_team", "crm_team", "brand_team")
OBJECTIVE_KEYS = ("", "brand", "performance", "brand,performance")
CATEGORIES = ("general", "cannabis")


def _charges(rng: random.Random, n: int) -> list[tuple[str, str, str, str, int]]:
    """(at, recipient, category, objectives, epsilon_micro), spread over 70 days before AS_OF, a few
    at midnight exactly and a few just before it (the edges of a day's total)."""
    out = []
    for _ in range(n):
        at = AS_OF - timedelta(days=rng.randrange(70), seconds=rng.randrange(86_400))
        pick = rng.random()
        if pick < 0.1:
            at = at.replace(hour=0, minute=0, second=0, microsecond=0)
        elif pick < 0.2:
            at = at.replace(hour=23, minute=59, second=59, microsecond=999_999)
        elif pick < 0.6:
            at = at.replace(microsecond=rng.randrange(1_000_000))
        out.append(
            (
                at.isoformat(),
                rng.choice(RECIPIENTS),
                rng.choice(CATEGORIES),
                rng.choice(OBJECTIVE_KEYS),
                rng.randrange(1, 2_000_000),
            )
        )
    return out


def _record(conn: sqlite3.Connection, charges: list[tuple[str, str, str, str, int]]) -> None:
    with db.transaction(conn):
        for n, (at, recipient, category, objectives, micro) in enumerate(charges):
            conn.execute(
                "INSERT INTO ledger (at, recipient, category, epsilon_micro, delta, release_id, policy_hash, "
                "objectives) VALUES (?, ?, ?, ?, 0.0, ?, 'h', ?)",
                (at, recipient, category, micro, n, objectives),
            )


def _expected(
    charges: list[tuple[str, str, str, str, int]],
    category: str,
    since: datetime,
    recipient: str | None = None,
    objective: str | None = None,
) -> int:
    """The definition: every charge at or after ``since``, compared as instants."""
    return sum(
        micro
        for at, who, cat, objectives, micro in charges
        if cat == category
        and datetime.fromisoformat(at) >= since
        and recipient in (None, who)
        and (objective is None or objective in objectives.split(","))
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_budget_sums_equal_the_sum_of_every_charge_in_the_period(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    charges = _charges(rng, 600)
    conn = db.connect(tmp_path / "privseg.db")
    # Two batches: totals made by the trigger on top of totals already there.
    _record(conn, charges[:300])
    _record(conn, charges[300:])
    # Period starts at every edge that matters: exactly at a charge, a microsecond either side, the
    # midnights, and arbitrary instants.
    starts = [AS_OF - timedelta(days=d) for d in (0, 1, 29, 30, 31, 69, 70, 71)]
    for at, *_ in rng.sample(charges, 40):
        instant = datetime.fromisoformat(at)
        starts += [instant, instant - timedelta(microseconds=1), instant + timedelta(microseconds=1)]
        starts.append(instant.replace(hour=0, minute=0, second=0, microsecond=0))
    starts += [AS_OF - timedelta(seconds=rng.randrange(80 * 86_400)) for _ in range(40)]
    for since in starts:
        for category in CATEGORIES:
            got = ledger.spent_micro(conn, category=category, since=since)
            assert got == _expected(charges, category, since), (category, since)
            recipient = rng.choice(RECIPIENTS)
            objective = rng.choice(OBJECTIVES)
            got = ledger.spent_micro(conn, category=category, since=since, recipient=recipient)
            assert got == _expected(charges, category, since, recipient), (category, since, recipient)
            got = ledger.spent_micro(
                conn, category=category, since=since, recipient=recipient, objective=objective
            )
            assert got == _expected(charges, category, since, recipient, objective)
    assert audit.check_day_totals(conn) is None


def test_status_counts_spend_and_charges_per_recipient_in_the_period(tmp_path: Path) -> None:
    rng = random.Random(7)
    charges = _charges(rng, 400)
    conn = db.connect(tmp_path / "privseg.db")
    _record(conn, charges)
    categories = read_categories(POLICIES)
    for now in (AS_OF, AS_OF - timedelta(days=20, seconds=rng.randrange(86_400))):
        for row in ledger.status(conn, categories, now):
            name = str(row["category"])
            since = now - timedelta(days=categories.categories[name].budget.period_days)
            in_period = [c for c in charges if c[2] == name and datetime.fromisoformat(c[0]) >= since]
            per_recipient = {
                r["recipient"]: (r["spent"], r["releases"])
                for r in row["recipients"]  # type: ignore[attr-defined]
            }
            assert per_recipient == {
                who: (
                    ledger.from_micro(sum(c[4] for c in in_period if c[1] == who)),
                    sum(1 for c in in_period if c[1] == who),
                )
                for who in {c[1] for c in in_period}
            }
            assert row["category_spent"] == ledger.from_micro(sum(c[4] for c in in_period))


def test_an_upgrade_totals_the_charges_already_in_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = database_before(path, "CREATE TABLE ledger_days")
    charges = _charges(random.Random(11), 200)
    _record(conn, charges)
    conn.close()
    migrated = db.connect(path)
    assert audit.check_day_totals(migrated) is None
    since = AS_OF - timedelta(days=30, hours=5)
    assert ledger.spent_micro(migrated, category="general", since=since) == _expected(
        charges, "general", since
    )
    # Charges after the upgrade add to the backfilled totals.
    more = _charges(random.Random(12), 50)
    _record(migrated, more)
    assert audit.check_day_totals(migrated) is None
    assert ledger.spent_micro(migrated, category="general", since=since) == _expected(
        charges + more, "general", since
    )


def test_day_totals_cannot_be_lowered_and_an_edit_around_the_triggers_is_found(tmp_path: Path) -> None:
    # A hostile operator with the database lowers what a recipient spent to release past its budget.
    conn = db.connect(tmp_path / "privseg.db")
    _record(conn, _charges(random.Random(5), 100))
    before = ledger.spent_micro(conn, category="general", since=AS_OF - timedelta(days=30))
    for statement in (
        "UPDATE ledger_days SET epsilon_micro = 1",
        "UPDATE ledger_days SET day = '1999-01-01'",
        "DELETE FROM ledger_days",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="only grow"), db.transaction(conn):
            conn.execute(statement)
    assert ledger.spent_micro(conn, category="general", since=AS_OF - timedelta(days=30)) == before
    with db.transaction(conn):
        conn.execute("DROP TRIGGER ledger_days_only_grow")
        conn.execute("UPDATE ledger_days SET epsilon_micro = 1 WHERE category = 'general'")
    assert ledger.spent_micro(conn, category="general", since=AS_OF - timedelta(days=30)) < before
    problem = audit.check_day_totals(conn)
    assert problem is not None and "'general'" in problem and "differs from its charges" in problem


def test_a_sum_reads_one_day_of_charges_not_the_period(tmp_path: Path) -> None:
    # What makes a charge's cost independent of how much was charged before: the ledger part of a sum
    # is bounded to the day the period starts in (and read from an index), the rest are day totals.
    conn = db.connect(tmp_path / "privseg.db")
    _record(conn, _charges(random.Random(3), 50))
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        ledger.spent_micro(conn, category="general", since=AS_OF - timedelta(days=30), recipient="crm_team")
        ledger.spent_micro(conn, category="general", since=AS_OF - timedelta(days=30))
    finally:
        conn.set_trace_callback(None)
    (mine, everyone) = (s for s in seen if "FROM ledger" in s)
    for statement in (mine, everyone):
        details = [str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {statement}")]
        ledger_part = [d for d in details if d.startswith("SEARCH ledger ")]
        assert len(ledger_part) == 1 and "at>? AND at<?" in ledger_part[0], details
        tables = [d for d in details if d.split(" ")[1:2] in (["ledger"], ["ledger_days"])]
        assert len(tables) == 2 and all(d.startswith("SEARCH") for d in tables), details


def test_a_charge_timestamp_in_utc_is_totalled_on_its_utc_day(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "privseg.db")
    at = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    _record(conn, [(at.isoformat(), "crm_team", "general", "", 5)])
    assert conn.execute("SELECT day, epsilon_micro, charges FROM ledger_days").fetchall() == [
        ("2026-03-01", 5, 1)
    ]
