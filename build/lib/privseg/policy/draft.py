"""``privseg policy draft``: a first ingest policy written from sample files, for review.

Every column gets a proposal and a comment saying why, so compliance reviews choices rather than
writing YAML from nothing. The draft never copies a value that could single a person out: category
values are listed only when at least :data:`MIN_VALUE_ROWS` rows (and 1% of the sample) share them,
rarer ones are counted, not named; numbers get no bounds taken from the data (an exact maximum can be
one person's income); postal codes get no region map (that must come from a public table). What a
column holds is judged on a sample of the first :data:`SAMPLE_ROWS` rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from privseg.errors import InvalidInput
from privseg.ingest.sources import read_source

SAMPLE_ROWS = 100_000
MIN_VALUE_ROWS = 10  # a category value is listed only if at least this many rows have it
MAX_CATEGORY_VALUES = 30
_TRUE_FALSE = {"true", "false", "t", "f", "yes", "no", "y", "n", "0", "1"}
_EMAIL = r"^[^\s@]+@[^\s@]+\.[^\s@]+$"
_PHONE = r"^\+?[\d\s().\-]{7,}$"
_IP = r"^\d{1,3}(\.\d{1,3}){3}$"
_DATE = r"^\d{4}-\d{2}-\d{2}$"
_TIMESTAMP = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}"
_NAME_WORDS = re.compile(
    r"(^|_)(first|last|full|given|family|sur)?_?name$|^name$|address|street|city|email|e_mail|phone|mobile|"
    r"(^|_)ip(_|$)|user_agent|ssn|passport|iban",
    re.IGNORECASE,
)
_ID_WORDS = re.compile(r"^(id|customer_?id|user_?id|client_?id|member_?id|contact_?id)$", re.IGNORECASE)
_BIRTH = re.compile(r"birth|dob", re.IGNORECASE)
_POSTAL = re.compile(r"zip|postal|postcode", re.IGNORECASE)
_INCOME = re.compile(r"income|salary", re.IGNORECASE)
_EVENT_TYPE = re.compile(r"event_?type|^event$|^type$|^action$", re.IGNORECASE)
_SNAKE = re.compile(r"[^a-z0-9]+")


@dataclass
class Proposal:
    column: str
    section: str  # identity | drop | generalize | attribute | timestamp
    spec: str = ""  # the YAML flow mapping for generalize/attribute
    why: list[str] = field(default_factory=list)


def _share(values: pl.Series, pattern: str) -> float:
    present = values.drop_nulls()
    if present.len() == 0:
        return 0.0
    share = present.str.contains(pattern).mean()
    return float(share) if isinstance(share, int | float) else 0.0


def _domain(values: pl.Series) -> tuple[list[str], int] | None:
    """The frequent values (listed) and how many rare ones there are, if the column looks categorical."""
    present = values.drop_nulls()
    if present.len() == 0:
        return None
    counts = present.value_counts(sort=True)
    frequent = counts.filter(pl.col("count") >= MIN_VALUE_ROWS)
    if frequent.height == 0 or frequent.height > MAX_CATEGORY_VALUES:
        return None
    covered = int(frequent.get_column("count").sum())
    if covered < 0.9 * present.len():  # mostly rare values: free text or an identifier, not a category
        return None
    return sorted(str(v) for v in frequent.get_column(values.name)), counts.height - frequent.height


def _flow(values: list[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def _quote(v: str) -> str:
    return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", v) and v.lower() not in _TRUE_FALSE else repr(v)


def _propose(name: str, values: pl.Series, *, events: bool) -> Proposal:
    present = values.drop_nulls()
    n = max(present.len(), 1)
    unique_share = present.n_unique() / n
    if _NAME_WORDS.search(name) or _share(values, _EMAIL) > 0.5 or _share(values, _IP) > 0.5:
        return Proposal(
            name, "drop", why=["a direct identifier (by its name or its values): dropped at the door"]
        )
    if _POSTAL.search(name):
        return Proposal(
            name,
            "drop",
            why=[
                "a postal code: a quasi-identifier. Dropped here; to keep it, generalize it to a region with",
                "a public prefix map (see privseg's shipped ingest.yaml), never the code itself",
            ],
        )
    is_date = _share(values, _DATE) > 0.9 or _share(values, _TIMESTAMP) > 0.9
    if not is_date and _share(values, _PHONE) > 0.8 and not _share(values, r"^\d+$") > 0.8:
        return Proposal(name, "drop", why=["looks like phone numbers: dropped at the door"])
    if events and _share(values, _TIMESTAMP) > 0.9:
        return Proposal(name, "timestamp", why=["ISO 8601 timestamps"])
    lowered = set(present.str.to_lowercase().unique().to_list())
    if lowered and lowered <= _TRUE_FALSE:
        return Proposal(name, "attribute", "{type: bool}", ["true/false values"])
    if _share(values, _DATE) > 0.9:
        if _BIRTH.search(name):
            return Proposal(
                name,
                "generalize",
                "{to: age_band, from_type: date, edges: [18, 25, 35, 45, 55, 65]}",
                ["a birth date: a quasi-identifier, stored only as an age band"],
            )
        return Proposal(
            name, "attribute", "{type: date}", ["dates (YYYY-MM-DD); a date can narrow who it is: review"]
        )
    numbers = present.cast(pl.Float64, strict=False)
    if numbers.null_count() == 0 and present.len() > 0:
        whole = bool((numbers == numbers.round()).all())
        if _BIRTH.search(name) and whole and bool(numbers.is_between(1890, 2030).all()):
            return Proposal(
                name,
                "generalize",
                "{to: age_band, from_type: year, edges: [18, 25, 35, 45, 55, 65], out_of_range: refuse}",
                [
                    "birth years: stored only as an age band (the age reached in the reference year); an",
                    "impossible age refuses the file (out_of_range: unknown stores it as unknown instead)",
                ],
            )
        if _INCOME.search(name):
            return Proposal(
                name,
                "generalize",
                f"{{to: {_snake(name)}_band, edges: [25000, 50000, 100000], "
                "labels: [lt_25k, 25k_50k, 50k_100k, gt_100k]}",
                ["an income: stored only as a band; the edges are public round numbers, review them"],
            )
        if unique_share > 0.95 and present.len() > 20 and whole:
            return Proposal(name, "drop", why=["a number unique to almost every row: likely an identifier"])
        low = " min: 0," if bool((numbers >= 0).all()) else ""
        kind = "int" if whole else "float"
        return Proposal(
            name,
            "attribute",
            f"{{type: {kind},{low} out_of_range: refuse}}",
            ["numbers; add a public max (none is taken from the data: an exact maximum can be one person's)"],
        )
    if events and _EVENT_TYPE.search(name):
        domain = _domain(values)
        if domain is not None:
            return Proposal(
                name,
                "event_type",
                f"{{type: category, values: {_flow(domain[0])}, required: true}}",
                [f"the event type ({len(domain[0])} frequent values)"],
            )
    domain = _domain(values)
    if domain is not None:
        listed, rare = domain
        why = [f"a category: the {len(listed)} values at least {MIN_VALUE_ROWS} rows share"]
        if rare:
            why.append(
                f"{rare} rarer value(s) are not listed (they could single someone out); list the ones to keep"
            )
            why.append("under fold: {other: [...]} (with other among the values) or the file is refused")
        return Proposal(name, "attribute", f"{{type: category, values: {_flow(listed)}}}", why)
    items = _list_domain(values)
    if items is not None:
        return Proposal(
            name,
            "attribute",
            f"{{type: list, separator: ';', values: {_flow(items)}}}",
            ["lists of frequent values separated by ';'"],
        )
    if unique_share > 0.5:
        return Proposal(name, "drop", why=["free text, mostly unique: likely identifying; dropped"])
    return Proposal(
        name,
        "drop",
        why=["free text: dropped; to keep it, declare {type: string, max_length: 64} after review"],
    )


def _list_domain(values: pl.Series) -> list[str] | None:
    present = values.drop_nulls()
    if present.len() == 0 or _share(values, ";") < 0.05:
        return None
    items = present.str.split(";").explode().str.strip_chars()
    domain = _domain(items.filter(items != "").alias(values.name))
    return None if domain is None else domain[0]


def _snake(name: str) -> str:
    return _SNAKE.sub("_", name.lower()).strip("_") or "value"


def _identity(frame: pl.DataFrame) -> tuple[str, str]:
    for name in frame.columns:
        if _ID_WORDS.match(name):
            break
    else:
        unique = [c for c in frame.columns if frame.get_column(c).drop_nulls().n_unique() == frame.height]
        if not unique:
            raise InvalidInput("policy draft: no column identifies each row (name the identity column)")
        name = unique[0]
    values = frame.get_column(name)
    kind = (
        "email"
        if _share(values, _EMAIL) > 0.5
        else "phone"
        if _share(values, _PHONE) > 0.8
        else "customer_number"
    )
    return name, kind


def _sample(path: Path, separator: str | None, encoding: str) -> pl.DataFrame:
    frame = read_source(path, separator=separator, encoding=encoding)
    return frame.head(SAMPLE_ROWS).select(pl.all().cast(pl.String))


def draft(
    profiles: Path, events: Path | None = None, *, separator: str | None = None, encoding: str = "utf-8"
) -> str:
    """The draft ingest policy (YAML with comments) for these sample files."""
    prof = _sample(profiles, separator, encoding)
    id_col, id_type = _identity(prof)
    out = [
        f"# Draft ingest policy, written by `privseg policy draft` from {profiles.name}"
        + (f" and {events.name}" if events else "")
        + ".",
        "# Review every line before use: each proposal says why it was made. No value that could single a",
        "# person out was copied here (rare category values are counted, not named; no bounds come from",
        "# the data).",
        "version: 1",
        "",
        f"identity:\n  column: {_quote(id_col)}\n  type: {id_type}    # normalized, then pseudonymized",
        "",
        "# Events older than this (counted from --as-of) are not stored.",
        "retention_days: 730",
        "",
        "profiles:",
        *_section([_propose(c, prof.get_column(c), events=False) for c in prof.columns if c != id_col]),
        "",
        "events:",
    ]
    if events is None:
        out += [
            "  timestamp: ts",
            "  attributes:",
            "    event_type: {type: category, values: [purchase], required: true}  # no sample given: edit",
        ]
        return "\n".join(out) + "\n"
    ev = _sample(events, separator, encoding)
    if id_col not in ev.columns:
        raise InvalidInput(
            f"{events.name}: has no column {id_col!r} (the identity column of {profiles.name})"
        )
    proposals = [_propose(c, ev.get_column(c), events=True) for c in ev.columns if c != id_col]
    ts = [p for p in proposals if p.section == "timestamp"]
    if not ts:
        raise InvalidInput(f"{events.name}: no column holds ISO 8601 timestamps")
    if not any(p.section == "event_type" for p in proposals):
        raise InvalidInput(
            f"{events.name}: no column looks like an event type (a category named e.g. event_type)"
        )
    out.append(f"  timestamp: {_quote(ts[0].column)}    # {ts[0].why[0]}")
    out += _section([p for p in proposals if p is not ts[0]], events=True)
    return "\n".join(out) + "\n"


def _section(proposals: list[Proposal], *, events: bool = False) -> list[str]:
    if events:  # events carry no generalizations: a quasi-identifier there is dropped
        for p in proposals:
            if p.section == "generalize":
                p.section, p.why = "drop", [*p.why, "(events cannot generalize: dropped)"]
    drops = [p for p in proposals if p.section == "drop"]
    out = ["  # Direct identifiers and other columns not kept: accepted in a file, dropped before storing."]
    if drops:
        out.append("  drop:")
        out += [f"    - {_quote(p.column)}    # {' '.join(p.why)}" for p in drops]
    else:
        out.append("  drop: []")
    general = [p for p in proposals if p.section == "generalize"]
    if general:
        out.append("  # Quasi-identifiers, stored only in coarse public form.")
        out.append("  generalize:")
        for p in general:
            out += [f"    # {line}" for line in p.why]
            out.append(f"    {_quote(p.column)}: {p.spec}")
    out.append("  attributes:")
    attrs = [p for p in proposals if p.section in ("attribute", "event_type")]
    for p in attrs:
        name = "event_type" if p.section == "event_type" else p.column
        out += [f"    # {line}" for line in p.why]
        if p.section == "event_type" and p.column != "event_type":
            out.append(
                f"    # (the file calls it {p.column!r}: rename the column to event_type before ingesting)"
            )
        out.append(f"    {_quote(name)}: {p.spec}")
    if not attrs:
        out.append("    {}")
    return out
