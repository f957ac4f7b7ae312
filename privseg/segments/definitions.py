"""Versioned segment and trait definitions in SQLite: apply, list, show.

``apply`` validates every file (schema, operators, categories, references, cycles) together with the
definitions already active, and only then writes: a new version for each definition whose content
changed, all in one transaction with its audit entry. Nothing is applied if anything is wrong.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from privseg import audit
from privseg.category_policy import CategorySet
from privseg.db import transaction
from privseg.keyset import Keyset
from privseg.segments.compiler import Compiler
from privseg.segments.language import DefinitionError, Parser, Schema, SegmentDef, TraitDef

DefKind = Literal["segment", "trait"]


@dataclass(frozen=True)
class Stored:
    kind: DefKind
    id: str
    version: int
    body: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Applied:
    kind: DefKind
    id: str
    version: int
    status: Literal["created", "updated", "unchanged"]


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)


Document = tuple[DefKind, dict[str, Any], str]  # (kind, definition, where it came from)


def split_document(doc: Any, source: str) -> list[Document]:
    """The definitions in one loaded document: a segment, a list of segments, or a mapping with
    ``segments:`` and/or ``traits:`` lists."""
    # Round-trip through JSON so that what is stored is exactly what is validated.
    doc = json.loads(json.dumps(doc, default=str))
    if isinstance(doc, dict) and ("segments" in doc or "traits" in doc):
        unknown = sorted(set(doc) - {"segments", "traits"})
        if unknown:
            raise DefinitionError(f"{source}: unknown top-level key(s) {unknown}")
        groups: list[tuple[DefKind, Any]] = [
            ("trait", doc.get("traits") or []),
            ("segment", doc.get("segments") or []),
        ]
    elif isinstance(doc, list):
        groups = [("segment", doc)]
    elif isinstance(doc, dict):
        groups = [("segment", [doc])]
    else:
        raise DefinitionError(f"{source}: expected a segment, a list of segments, or segments:/traits: lists")
    out: list[Document] = []
    for kind, items in groups:
        if not isinstance(items, list):
            raise DefinitionError(f"{source}: {kind}s must be a list")
        out += [(kind, item, f"{source}[{kind}s {i}]") for i, item in enumerate(items)]
    return out


def read_documents(paths: list[Path]) -> list[Document]:
    """Every definition in the files (YAML or JSON)."""
    out: list[Document] = []
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DefinitionError(f"{path}: no such file") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DefinitionError(f"{path}: not valid YAML or JSON: {exc}") from None
        out += split_document(doc, path.name)
    return out


def active(conn: sqlite3.Connection) -> dict[tuple[DefKind, str], Stored]:
    rows = conn.execute(
        "SELECT d.kind, d.id, d.version, d.body, d.created_at FROM definitions d "
        "JOIN (SELECT kind, id, MAX(version) AS v FROM definitions GROUP BY kind, id) m "
        "ON d.kind = m.kind AND d.id = m.id AND d.version = m.v ORDER BY d.kind, d.id"
    ).fetchall()
    return {(k, i): Stored(k, i, int(v), json.loads(b), c) for k, i, v, b, c in rows}


def history(conn: sqlite3.Connection, kind: DefKind, def_id: str) -> list[Stored]:
    rows = conn.execute(
        "SELECT kind, id, version, body, created_at FROM definitions "
        "WHERE kind = ? AND id = ? ORDER BY version",
        (kind, def_id),
    ).fetchall()
    return [Stored(k, i, int(v), json.loads(b), c) for k, i, v, b, c in rows]


def build_compiler(
    stored: dict[tuple[DefKind, str], Stored], *, schema: Schema, categories: CategorySet
) -> Compiler:
    parser = Parser(schema, set(categories.categories))
    traits: dict[str, TraitDef] = {}
    segments: dict[str, SegmentDef] = {}
    for (kind, def_id), s in stored.items():
        where = f"{kind} {def_id!r} v{s.version}"
        if kind == "trait":
            traits[def_id] = parser.trait(s.body, where)
        else:
            segments[def_id] = parser.segment(s.body, where)
    return Compiler(schema=schema, categories=categories, segments=segments, traits=traits)


def apply(
    conn: sqlite3.Connection,
    keyset: Keyset,
    paths: list[Path],
    *,
    schema: Schema,
    categories: CategorySet,
) -> list[Applied]:
    """Apply the definitions in files (see :func:`apply_documents`)."""
    return apply_documents(conn, keyset, read_documents(paths), schema=schema, categories=categories)


def apply_documents(
    conn: sqlite3.Connection,
    keyset: Keyset,
    docs: list[Document],
    *,
    schema: Schema,
    categories: CategorySet,
) -> list[Applied]:
    parser = Parser(schema, set(categories.categories))
    incoming: dict[tuple[DefKind, str], tuple[dict[str, Any], str]] = {}
    for kind, doc, where in docs:
        parsed = parser.trait(doc, where) if kind == "trait" else parser.segment(doc, where)
        key: tuple[DefKind, str] = (kind, parsed.name if isinstance(parsed, TraitDef) else parsed.id)
        if key in incoming:
            raise DefinitionError(f"{where}: {kind} {key[1]!r} is defined twice ({incoming[key][1]})")
        incoming[key] = (doc, where)

    with transaction(conn):
        current = active(conn)
        merged = dict(current)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for key, (doc, _where) in incoming.items():
            prev = current.get(key)
            version = 1 if prev is None else prev.version + (canonical(prev.body) != canonical(doc))
            merged[key] = Stored(key[0], key[1], version, doc, now)
        # References, traits, consent attributes and cycles are checked over the whole new set.
        build_compiler(merged, schema=schema, categories=categories).check()
        results: list[Applied] = []
        for key in incoming:
            prev, new = current.get(key), merged[key]
            if prev is not None and prev.version == new.version:
                results.append(Applied(key[0], key[1], new.version, "unchanged"))
                continue
            conn.execute(
                "INSERT INTO definitions (kind, id, version, body, created_at) VALUES (?, ?, ?, ?, ?)",
                (key[0], key[1], new.version, canonical(new.body), now),
            )
            results.append(Applied(key[0], key[1], new.version, "created" if prev is None else "updated"))
        changed = [f"{r.kind}:{r.id}@v{r.version}" for r in results if r.status != "unchanged"]
        if changed:
            audit.append(conn, keyset, "definitions_applied", {"changed": changed})
    return results
