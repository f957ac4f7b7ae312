"""Versioned segment and trait definitions in SQLite: apply, list, show.

``apply`` validates every file (schema, operators, categories, references, cycles) together with the
definitions already active, and only then writes: a new version for each definition whose content
changed, all in one transaction with its audit entry. Nothing is applied if anything is wrong.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from privseg import audit
from privseg.db import transaction
from privseg.errors import Conflict, NotFound, NotPermitted
from privseg.keyset import Keyset
from privseg.policy.categories import CategorySet
from privseg.schema import Schema
from privseg.segments import persona_source
from privseg.segments.compiler import Compiler, references, traits_used
from privseg.segments.language import DefinitionError, SegmentDef, TraitDef
from privseg.segments.parser import Parser
from privseg.yamltext import parse_yaml

DefKind = Literal["segment", "trait"]
ADMIN_CLI = "admin:cli"  # the actor of definitions applied from the command line


def may_edit(actor: str, owner: str) -> bool:
    """Only the owner of a definition, or an admin, may change or retire it."""
    return actor.startswith("admin:") or actor == owner


@dataclass(frozen=True)
class Stored:
    kind: DefKind
    id: str
    version: int
    body: dict[str, Any]
    created_at: str
    owner: str = ADMIN_CLI  # "marketer:<principal>" or "admin:<name>"
    editor: str = ADMIN_CLI  # who wrote this version
    retired: bool = False


@dataclass(frozen=True)
class Applied:
    kind: DefKind
    id: str
    version: int
    status: Literal["created", "updated", "unchanged", "retired"]


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
            doc = parse_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DefinitionError(f"{path}: no such file") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DefinitionError(f"{path}: not valid YAML or JSON: {exc}") from None
        out += split_document(doc, path.name)
    return out


_COLUMNS = "kind, id, version, body, created_at, owner, editor, retired"


def _stored(row: tuple[Any, ...]) -> Stored:
    k, i, v, b, c, o, e, r = row
    return Stored(k, i, int(v), json.loads(b), c, o, e, bool(r))


def latest(conn: sqlite3.Connection) -> dict[tuple[DefKind, str], Stored]:
    """The newest version of every definition, retired ones included."""
    rows = conn.execute(
        f"SELECT {', '.join('d.' + c for c in _COLUMNS.split(', '))} FROM definitions d "
        "JOIN (SELECT kind, id, MAX(version) AS v FROM definitions GROUP BY kind, id) m "
        "ON d.kind = m.kind AND d.id = m.id AND d.version = m.v ORDER BY d.kind, d.id"
    ).fetchall()
    return {(r[0], r[1]): _stored(r) for r in rows}


def objectives(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, str]:
    """The objective of each active segment among ``ids`` (newest version, not retired): read for
    those segments only (the release engine asks on every charge)."""
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        "SELECT d.id, d.body FROM definitions d JOIN (SELECT id, MAX(version) AS v FROM definitions "
        f"WHERE kind = 'segment' AND id IN ({marks}) GROUP BY id) m ON d.kind = 'segment' AND d.id = m.id "
        "AND d.version = m.v WHERE d.retired = 0",
        list(ids),
    ).fetchall()
    return {str(i): str(json.loads(body).get("objective")) for i, body in rows}


_SCHEMA_GAPS = ("unknown event type", "unknown event field", "unknown profile attribute")


def fitting(
    docs: list[Document], *, schema: Schema, categories: CategorySet
) -> tuple[list[Document], list[str]]:
    """The documents this deployment's ingest policy can serve, and why each other one cannot: one
    that names an event type, event field or attribute the policy lacks, or that uses one skipped."""
    parser = Parser(schema, set(categories.categories))
    kept: dict[tuple[DefKind, str], tuple[Document, set[str], set[str]]] = {}
    skipped: dict[tuple[DefKind, str], str] = {}
    for kind, doc, where in docs:
        name = str(doc.get("name" if kind == "trait" else "id", where)) if isinstance(doc, dict) else where
        try:
            parsed = parser.trait(doc, where) if kind == "trait" else parser.segment(doc, where)
        except DefinitionError as exc:
            if not any(gap in exc.message for gap in _SCHEMA_GAPS):
                raise  # a broken definition is an error, not a gap of this deployment
            skipped[(kind, name)] = exc.message
            continue
        if isinstance(parsed, SegmentDef):
            kept[(kind, name)] = ((kind, doc, where), references(parsed.root), traits_used(parsed.root))
        else:
            kept[(kind, name)] = ((kind, doc, where), set(), set())
    while True:
        gone_segments = {i for k, i in skipped if k == "segment"}
        gone_traits = {i for k, i in skipped if k == "trait"}
        users = [key for key, (_d, refs, uses) in kept.items() if refs & gone_segments or uses & gone_traits]
        if not users:
            break
        for key in users:
            skipped[key] = "uses a definition skipped because this deployment lacks what it reads"
            del kept[key]
    return [d for d, _r, _t in kept.values()], [f"{k} {i}: {why}" for (k, i), why in skipped.items()]


def active(conn: sqlite3.Connection) -> dict[tuple[DefKind, str], Stored]:
    """The newest version of every definition that is not retired."""
    return {k: s for k, s in latest(conn).items() if not s.retired}


def history(conn: sqlite3.Connection, kind: DefKind, def_id: str) -> list[Stored]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM definitions WHERE kind = ? AND id = ? ORDER BY version", (kind, def_id)
    ).fetchall()
    return [_stored(r) for r in rows]


def build_compiler(
    stored: dict[tuple[DefKind, str], Stored], *, schema: Schema, categories: CategorySet
) -> Compiler:
    parser = Parser(schema, set(categories.categories))
    traits: dict[str, TraitDef] = {}
    segments: dict[str, SegmentDef] = {}
    for s in stored.values():
        _parse_into(parser, s, traits, segments)
    return Compiler(schema=schema, categories=categories, segments=segments, traits=traits)


def _parse_into(
    parser: Parser, s: Stored, traits: dict[str, TraitDef], segments: dict[str, SegmentDef]
) -> None:
    """Parse a stored definition into ``traits`` or ``segments``; its errors name it as
    "segment 'x' v1 (...)" (see :func:`_own`)."""
    where = f"{s.kind} {s.id!r} v{s.version}"
    if s.kind == "trait":
        traits[s.id] = parser.trait(s.body, where)
    else:
        segments[s.id] = parser.segment(s.body, where)


def unbuildable(
    stored: dict[tuple[DefKind, str], Stored], *, schema: Schema, categories: CategorySet
) -> list[str]:
    """Why each stored definition that a snapshot under these policies could not compute fails, one
    line each, sorted (empty: every one builds). A snapshot computes every active definition at once,
    so a single one of these stops every snapshot: an ingest policy that dropped an attribute a
    segment reads, or a trait, event type or category a definition names. Definitions that use a
    failing one are listed too. Nothing is written."""
    parser = Parser(schema, set(categories.categories))
    why: dict[tuple[DefKind, str], str] = {}
    traits: dict[str, TraitDef] = {}
    segments: dict[str, SegmentDef] = {}
    for key, s in sorted(stored.items()):
        try:
            _parse_into(parser, s, traits, segments)
        except DefinitionError as exc:
            why[key] = exc.message
    # What a snapshot does with each segment: compile it (with everything it references) and derive
    # its effective categories. All at once first (the benchmark's 2,000 segments: 0.6 s); if that
    # fails, one at a time, each with only what it references (0.3-0.5 s at 2,000; a compiler over
    # every definition for each segment took 15.7 s), so that each failure is named by its own segment.
    if not why and _builds(Compiler(schema=schema, categories=categories, segments=segments, traits=traits)):
        return []
    as_of = datetime.now(UTC)
    failed: dict[str, str] = {}
    refs = {sid: references(seg.root) for sid, seg in segments.items()}
    for sid in sorted(segments):
        needed, todo = set(), [sid]
        while todo:
            if (at := todo.pop()) in segments and at not in needed:
                needed.add(at)
                todo += refs[at]
        own = Compiler(
            schema=schema, categories=categories, segments={n: segments[n] for n in needed}, traits=traits
        )
        try:
            own.compile(as_of, only={sid})
            own.effective(sid)
        except DefinitionError as exc:
            failed[sid] = exc.message
    why |= {("segment", sid): message for sid, message in failed.items()}
    for sid in failed:  # one that fails through what it uses is told so, not given that one's error
        root = segments[sid].root
        gone = [f"segment {r!r}" for r in sorted(references(root)) if ("segment", r) in why]
        gone += [f"trait {t!r}" for t in sorted(traits_used(root)) if ("trait", t) in why]
        if gone:
            why[("segment", sid)] = f"uses {', '.join(gone)}, which cannot be built"
    return [
        f"{kind} {def_id!r}: {_own(kind, def_id, reason)}" for (kind, def_id), reason in sorted(why.items())
    ]


def _builds(compiler: Compiler) -> bool:
    """Whether a snapshot could compile every segment of ``compiler`` and derive its categories."""
    try:
        compiler.compile(datetime.now(UTC))
        for sid in compiler.defs:
            compiler.effective(sid)
    except DefinitionError:
        return False
    return True


def _own(kind: DefKind, def_id: str, message: str) -> str:
    """``message`` without the name of the definition it is about (the line already starts with it):
    the parser's "segment 'x' v1 (segment 'x').where..." becomes "v1.where...", the compiler's
    "segment 'x': where..." becomes "where..."."""
    name = f"{kind} {def_id!r}"
    if message.startswith(f"{name}: "):
        return message[len(name) + 2 :]
    if message.startswith(f"{name} v") and f" ({name})" in message:
        version, rest = message[len(name) + 1 :].split(f" ({name})", 1)
        return version + rest
    return message


def apply(
    conn: sqlite3.Connection,
    keyset: Keyset,
    paths: list[Path],
    *,
    schema: Schema,
    categories: CategorySet,
    actor: str,
) -> list[Applied]:
    """Apply the definitions in files (see :func:`apply_documents`)."""
    return apply_documents(
        conn, keyset, read_documents(paths), schema=schema, categories=categories, actor=actor
    )


def apply_documents(
    conn: sqlite3.Connection,
    keyset: Keyset,
    docs: list[Document],
    *,
    schema: Schema,
    categories: CategorySet,
    actor: str,
    dry_run: bool = False,
) -> list[Applied]:
    """Validate the documents together with every active definition, then write a new version of
    each changed one, all in one transaction with its audit entry, or nothing. ``dry_run``: validate
    and say what would change, writing nothing (the console's editor checks as the author types).

    ``actor`` (``marketer:<principal>`` or ``admin:<name>``) becomes the owner of new definitions;
    changing an existing one is refused unless the actor owns it or is an admin. A declared category
    looser than what a segment reads is refused, naming the leaf that reads the stricter data."""
    parser = Parser(schema, set(categories.categories))
    incoming: dict[tuple[DefKind, str], tuple[dict[str, Any], str]] = {}
    for kind, raw, where in docs:
        doc = persona_source.fill(conn, raw, actor, where)
        parsed = parser.trait(doc, where) if kind == "trait" else parser.segment(doc, where)
        key: tuple[DefKind, str] = (kind, parsed.name if isinstance(parsed, TraitDef) else parsed.id)
        if key in incoming:
            raise DefinitionError(f"{where}: {kind} {key[1]!r} is defined twice ({incoming[key][1]})")
        incoming[key] = (doc, where)

    with nullcontext() if dry_run else transaction(conn):
        newest = latest(conn)
        merged = active(conn)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for key, (doc, _where) in incoming.items():
            prev = newest.get(key)
            if prev is None:
                version, owner = 1, actor
            elif prev.retired:
                version, owner = prev.version + 1, actor
            else:
                version, owner = prev.version + (canonical(prev.body) != canonical(doc)), prev.owner
            merged[key] = Stored(key[0], key[1], version, doc, now, owner, actor)
        changed = [k for k in incoming if newest.get(k) is None or newest[k].version != merged[k].version]
        for key in changed:
            prev = newest.get(key)
            if prev is not None and not prev.retired and not may_edit(actor, prev.owner):
                raise NotPermitted(
                    f"{key[0]} {key[1]!r} belongs to {prev.owner}; only its owner or an admin may change it"
                )
        # References, traits, consent attributes, cycles and declared categories are checked over
        # the whole new set.
        try:
            compiler = build_compiler(merged, schema=schema, categories=categories)
            compiler.check(
                compiler.dependents(
                    {i for k, i in changed if k == "segment"}, {i for k, i in changed if k == "trait"}
                )
            )
        except DefinitionError as exc:
            # A stored definition that the policies in force no longer serve fails every change,
            # whoever makes it: say which, and what to do, rather than only the first error met.
            blocking = unbuildable(active(conn), schema=schema, categories=categories)
            if not blocking:
                raise
            raise DefinitionError(
                f"{exc.message} (stored definitions that the policies in force no longer serve block "
                f"every change until they are changed or retired: {'; '.join(blocking)})"
            ) from None
        results: list[Applied] = []
        for key in incoming:
            prev, new = newest.get(key), merged[key]
            if key not in changed:
                results.append(Applied(key[0], key[1], new.version, "unchanged"))
                continue
            if not dry_run:
                _insert(conn, new)
            status: Literal["created", "updated"] = "created" if prev is None or prev.retired else "updated"
            results.append(Applied(key[0], key[1], new.version, status))
        if changed and not dry_run:
            audit.append(
                conn,
                keyset,
                "definitions_applied",
                {
                    "editor": actor,
                    "changed": [f"{k}:{i}@v{merged[(k, i)].version}" for k, i in changed],
                    "owners": sorted({merged[k].owner for k in changed}),
                },
            )
    return results


def _insert(conn: sqlite3.Connection, s: Stored) -> None:
    conn.execute(
        "INSERT INTO definitions (kind, id, version, body, created_at, owner, editor, retired) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (s.kind, s.id, s.version, canonical(s.body), s.created_at, s.owner, s.editor, int(s.retired)),
    )


def retire(
    conn: sqlite3.Connection,
    keyset: Keyset,
    kind: DefKind,
    def_id: str,
    *,
    schema: Schema,
    categories: CategorySet,
    actor: str,
) -> Applied:
    """Retire a definition (its owner or an admin): a new, retired version; history is kept. Refused
    while an active definition still references it."""
    with transaction(conn):
        current = active(conn)
        prev = current.get((kind, def_id))
        if prev is None:
            raise NotFound(f"no active {kind} {def_id!r}")
        if not may_edit(actor, prev.owner):
            raise NotPermitted(
                f"{kind} {def_id!r} belongs to {prev.owner}; only its owner or an admin may retire it"
            )
        rest = {k: v for k, v in current.items() if k != (kind, def_id)}
        try:
            build_compiler(rest, schema=schema, categories=categories).check()
        except DefinitionError as exc:
            raise Conflict(f"{kind} {def_id!r} is still used: {exc.message}") from None
        now = datetime.now(UTC).isoformat(timespec="seconds")
        new = Stored(kind, def_id, prev.version + 1, prev.body, now, prev.owner, actor, retired=True)
        _insert(conn, new)
        audit.append(
            conn,
            keyset,
            "definition_retired",
            {"editor": actor, "definition": f"{kind}:{def_id}@v{new.version}"},
        )
    return Applied(kind, def_id, new.version, "retired")
