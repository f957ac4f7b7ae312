"""Persona leaves written as ``persona: {release: N, is: J}`` are filled in from the persona release
when the definition is applied: its features (events, measures, bounds) and its released centers
(suppressed ones as null). The stored definition holds them, so it means the same thing forever,
whatever happens to the release record. Only the release's own recipient (or an admin) may use it: a
marketer cannot build segments from another marketer's released personas."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from privseg.segments.language import DefinitionError


def fill(conn: sqlite3.Connection, doc: Any, actor: str, where: str) -> Any:
    """``doc`` with every short persona leaf filled in (a copy; other nodes unchanged)."""
    if isinstance(doc, list):
        return [fill(conn, item, actor, f"{where}[{i}]") for i, item in enumerate(doc)]
    if not isinstance(doc, dict):
        return doc
    out = {}
    for key, value in doc.items():
        here = f"{where}.{key}"
        if key == "persona" and isinstance(value, dict) and "release" in value and "centers" not in value:
            out[key] = {**value, **_from_release(conn, value["release"], actor, here)}
        else:
            out[key] = fill(conn, value, actor, here)
    return out


def _from_release(conn: sqlite3.Connection, release_id: Any, actor: str, here: str) -> dict[str, Any]:
    if not isinstance(release_id, int) or isinstance(release_id, bool) or release_id < 1:
        raise DefinitionError(f"{here}.release: expected a release id")
    row = conn.execute(
        "SELECT kind, recipient, result FROM releases WHERE id = ? AND status = 'done'", (release_id,)
    ).fetchone()
    role, _, principal = actor.partition(":")
    if row is None or row[0] != "personas" or (role != "admin" and row[1] != principal):
        # One answer for "no such release", "not personas" and "not yours": nothing to learn by probing.
        raise DefinitionError(f"{here}.release: no persona release {release_id} of yours")
    released = json.loads(row[2])
    specs = released["feature_specs"]
    names = [f["name"] for f in specs]
    centers = [None if p["center"] is None else [p["center"][n] for n in names] for p in released["personas"]]
    return {"features": specs, "centers": centers}
