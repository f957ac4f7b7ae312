"""The audit chain detects an edited, a deleted and a reordered entry, naming the first bad one."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from privseg import audit
from privseg.db import transaction
from privseg.deployment import Deployment
from privseg.errors import AuditTampered


def _fill(dep: Deployment, n: int = 5) -> None:
    for i in range(n):
        with transaction(dep.store.conn):
            audit.append(dep.store.conn, dep.keyset, "test", {"i": i})


def _as_attacker(dep: Deployment) -> sqlite3.Connection:
    """Someone with write access to the database file: the triggers are no obstacle to them."""
    conn = sqlite3.connect(dep.settings.db_path, isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    return conn


def test_an_untouched_chain_verifies(dep: Deployment) -> None:
    _fill(dep)
    result = audit.verify(dep.store.conn, dep.keyset)
    assert result.ok and result.entries == 5 and result.first_bad_seq is None


def test_edited_entry_is_detected(dep: Deployment) -> None:
    _fill(dep)
    _as_attacker(dep).execute("UPDATE audit SET details = ? WHERE seq = 3", (json.dumps({"i": 99}),))
    result = audit.verify(dep.store.conn, dep.keyset)
    assert not result.ok and result.first_bad_seq == 3 and "altered" in (result.problem or "")


def test_deleted_entry_is_detected(dep: Deployment) -> None:
    _fill(dep)
    _as_attacker(dep).execute("DELETE FROM audit WHERE seq = 2")
    result = audit.verify(dep.store.conn, dep.keyset)
    assert not result.ok and result.first_bad_seq == 2 and "missing" in (result.problem or "")


def test_deleted_and_renumbered_entry_is_detected(dep: Deployment) -> None:
    _fill(dep)
    conn = _as_attacker(dep)
    conn.execute("DELETE FROM audit WHERE seq = 2")
    conn.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 2")
    result = audit.verify(dep.store.conn, dep.keyset)
    assert not result.ok and result.first_bad_seq == 2


def test_reordered_entries_are_detected(dep: Deployment) -> None:
    _fill(dep)
    conn = _as_attacker(dep)
    conn.execute("UPDATE audit SET seq = -1 WHERE seq = 2")
    conn.execute("UPDATE audit SET seq = 2 WHERE seq = 4")
    conn.execute("UPDATE audit SET seq = 4 WHERE seq = -1")
    result = audit.verify(dep.store.conn, dep.keyset)
    assert not result.ok and result.first_bad_seq == 2


def test_a_forged_mac_without_the_key_fails(dep: Deployment) -> None:
    _fill(dep, 2)
    conn = _as_attacker(dep)
    conn.execute("UPDATE audit SET mac = ? WHERE seq = 2", ("f" * 64,))
    assert audit.verify(dep.store.conn, dep.keyset).first_bad_seq == 2


def test_append_outside_a_transaction_is_refused(dep: Deployment) -> None:
    with pytest.raises(RuntimeError, match="inside a write transaction"):
        audit.append(dep.store.conn, dep.keyset, "test", {})


@pytest.mark.parametrize(
    ("failure", "logged", "never"),
    [
        (AuditTampered("entry 7 does not chain to entry 6"), "AuditTampered: entry 7 does not", None),
        (RuntimeError("disk said 'C1234567'"), "RuntimeError", "C1234567"),
    ],
)
def test_a_failed_anchor_is_logged_by_its_privseg_message_or_else_its_type_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: Exception, logged: str, never: str | None
) -> None:
    def head() -> dict[str, object]:
        raise failure

    writer = audit.AnchorWriter(tmp_path / "anchors.jsonl", 3600, head)
    with caplog.at_level(logging.ERROR):
        writer._write()  # what start, each interval and stop do
    assert f"could not write an audit anchor to {tmp_path / 'anchors.jsonl'}: {logged}" in caplog.text
    assert never is None or never not in caplog.text
    assert not (tmp_path / "anchors.jsonl").exists()
