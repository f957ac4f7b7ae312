"""A release as a table, per kind: the text alternative of its chart and its CSV. Suppressed cells are
rows marked suppressed with no count, never 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Table = tuple[list[str], list[list[Any]]]
INSIGHT_KINDS = {"audience_insight", "partner_insight"}  # per attribute, shares and affinity


def table(released: dict[str, Any], suppressed: dict[str, list[str]]) -> Table:
    """The release as a table: header, rows."""
    kind = released["kind"]
    if kind in INSIGHT_KINDS:
        return _insight(released, suppressed)
    special: dict[str, Callable[[dict[str, Any]], Table]] = {
        "ab_lift": _lift,
        "personas": _personas,
        "trend": _trend,
    }
    if kind in special:
        return special[kind](released)
    return _cells(released, suppressed)


def _lift(released: dict[str, Any]) -> Table:
    header = ["arm", "segment", "size", "converted", "rate"]
    if released.get("suppressed"):
        return header, [["(suppressed)", released.get("note", ""), "", "", ""]]
    rows: list[list[Any]] = []
    for arm in ("treatment", "control"):
        a = released[arm]
        rows.append([arm, released["arms"][arm], a["size"], a["converted"], round(a["rate"], 4)])
    lift, interval = released.get("lift"), released.get("lift_interval_95")
    rows.append(["lift", "", "", "", "" if lift is None else round(lift, 4)])
    if interval:
        rows.append(["lift 95% interval", "", "", "", f"{interval[0]:.4f} .. {interval[1]:.4f}"])
    return header, rows


def _personas(released: dict[str, Any]) -> Table:
    names = released["features"]
    rows = []
    for p in released["personas"]:
        center = [round(p["center"][n], 3) for n in names] if p["center"] else ["" for _ in names]
        size = p["size"] if p["size"] is not None else ""
        rows.append([p["persona"], size, *center, "shown" if p["center"] else "suppressed"])
    return ["persona", "size", *names, "status"], rows


def _trend(released: dict[str, Any]) -> Table:
    header = ["period_start", "count", "interval_95_low", "interval_95_high"]
    header += ["running_total", "running_total_95_low", "running_total_95_high"]
    rows = []
    for p in released["points"]:
        total: tuple[Any, ...] = ("", "", "")
        if p.get("cumulative") is not None:
            total = (p["cumulative"], *(round(v, 1) for v in p["cumulative_interval_95"]))
        rows.append([p["period_start"][:10], p["count"], *(round(v, 1) for v in p["interval_95"]), *total])
    return header, rows


def _cells(released: dict[str, Any], suppressed: dict[str, list[str]]) -> Table:
    dims = ["from", "to"] if released["kind"] == "segment_movement" else list(released["breakdown"])
    extra = sorted(
        {k for seg in released["results"] for c in seg["cells"] for k in c} - {*dims, "count", "interval_95"}
    )
    header = ["segment", *dims, "count", "interval_95_low", "interval_95_high", *extra, "status"]
    blank = ["" for _ in extra]
    rows = []
    for seg in released["results"]:
        for c in seg["cells"]:
            lo, hi = (round(v, 1) for v in c["interval_95"])
            cell = [seg["segment"], *(c[d] for d in dims), c["count"], lo, hi]
            rows.append([*cell, *(_flat(c.get(k)) for k in extra), "shown"])
        for label in suppressed.get(seg["segment"], []):
            rows.append([seg["segment"], *label.split(", "), "", "", "", *blank, "suppressed"])
        if seg["segment"] not in suppressed and seg["suppressed_cells"]:
            count = f"{seg['suppressed_cells']} suppressed"
            rows.append([seg["segment"], *("" for _ in dims), "", "", "", *blank, count])
    return header, rows


def _insight(released: dict[str, Any], suppressed: dict[str, list[str]]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "attribute",
        "value",
        "count",
        "share",
        "base_share",
        "affinity",
        "affinity_95_low",
        "affinity_95_high",
        "status",
    ]
    rows: list[list[Any]] = []
    for a in released["attributes"]:
        for c in a["cells"]:
            lo, hi = c["affinity_interval_95"] or ("", "")
            rows.append(
                [
                    a["attribute"],
                    c["value"],
                    c["count"],
                    *(_round(c[k]) for k in ("share", "base_share", "affinity")),
                    _round(lo),
                    _round(hi),
                    "shown",
                ]
            )
        rows.extend(
            [a["attribute"], v, "", "", "", "", "", "", "suppressed"]
            for v in suppressed.get(a["attribute"], [])
        )
    return header, rows


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else ("" if value is None else value)


def _flat(value: Any) -> Any:
    if isinstance(value, list):
        return " .. ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "" if value is None else value
