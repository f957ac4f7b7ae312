"""Charts of released (already noisy) numbers: Vega-Lite specs built with Altair, rendered to SVG on
the server by vl-convert (no JavaScript, nothing fetched by the browser), shown as images with a text
alternative; every page also has the numbers as a table.

Charts draw only what was released: a suppressed cell is drawn as a labelled marker, never as a bar
of 0, and an interval is drawn as a whisker around its count.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

WIDTH = 560
SUPPRESSED = "suppressed"


@dataclass(frozen=True)
class Figure:
    title: str
    src: str  # a data: URI of the SVG
    alt: str


def _render(chart: Any, title: str, alt: str) -> Figure:
    import vl_convert

    svg = vl_convert.vegalite_to_svg(chart.to_dict())
    return Figure(title, "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode(), alt)


def cell_label(cell: dict[str, Any], breakdown: list[str]) -> str:
    return ", ".join(str(cell[d]) for d in breakdown) or "all"


def cells(released: dict[str, Any], suppressed: dict[str, list[str]]) -> Figure:
    """Noisy people per cell and segment with their 95% whiskers; ``suppressed`` (segment -> cell
    labels) are drawn as markers on the axis, labelled, with no bar."""
    import altair as alt

    breakdown = released["breakdown"]
    rows: list[dict[str, Any]] = []
    for seg in released["results"]:
        for cell in seg["cells"]:
            lo, hi = cell["interval_95"]
            label = cell_label(cell, breakdown)
            rows.append(
                {"segment": seg["segment"], "cell": label, "count": cell["count"], "lo": lo, "hi": hi}
            )
        for label in suppressed.get(seg["segment"], []):
            rows.append({"segment": seg["segment"], "cell": label, "count": None, "lo": None, "hi": None})
    x_title = " × ".join(breakdown) or "everyone"
    title = f"People per {x_title} (noisy counts, 95% intervals)"
    data = {"values": rows}
    x = alt.X("cell:N", title=x_title, sort=None)
    offset = alt.XOffset("segment:N")
    color = alt.Color("segment:N", title="segment")
    y = alt.Y("count:Q", title="people (noisy count)")
    bars = alt.Chart(data).mark_bar().transform_filter("datum.count != null").encode(x, offset, y, color)
    whiskers = (
        alt.Chart(data)
        .mark_errorbar(ticks=True, color="black")
        .transform_filter("datum.count != null")
        .encode(x, offset, alt.Y("lo:Q", title="people (noisy count)"), alt.Y2("hi:Q"))
    )
    marks = (
        alt.Chart(data)
        .mark_point(shape="cross", color="#777", size=60)
        .transform_filter("datum.count == null")
        .transform_calculate(zero="0")
        .encode(x, offset, alt.Y("zero:Q"))
    )
    chart = (bars + whiskers + marks).properties(title=title, width=WIDTH, height=260)
    n_sup = sum(len(v) for v in suppressed.values())
    alt_text = (
        f"Bar chart: noisy people per {x_title} for {len(released['results'])} segment(s); "
        f"{n_sup} suppressed cell(s) marked with a grey cross and no bar. The table below has the numbers."
    )
    return _render(chart, title, alt_text)


def lift(released: dict[str, Any]) -> Figure | None:
    """The lift and its 95% interval against a line at 0 (no effect): it is plain to see whether the
    interval includes 0."""
    import altair as alt

    if released.get("suppressed") or released.get("lift") is None or not released.get("lift_interval_95"):
        return None
    lo, hi = released["lift_interval_95"]
    row = {"what": "lift", "lift": released["lift"] * 100, "lo": lo * 100, "hi": hi * 100}
    data = {"values": [row]}
    x_title = "lift of the treatment over the control (%)"
    axis = alt.X("lift:Q", title=x_title)
    interval = (
        alt.Chart(data)
        .mark_rule(strokeWidth=3)
        .encode(alt.X("lo:Q", title=x_title), alt.X2("hi:Q"), alt.Y("what:N", title=None))
    )
    point = alt.Chart(data).mark_point(filled=True, size=120).encode(axis, alt.Y("what:N", title=None))
    zero = alt.Chart({"values": [{"x": 0}]}).mark_rule(color="#c00", strokeDash=[4, 4]).encode(alt.X("x:Q"))
    verdict = "includes 0: no evidence of an effect" if lo <= 0 <= hi else "excludes 0"
    title = f"Lift with its 95% interval ({verdict})"
    chart = (interval + point + zero).properties(title=title, width=WIDTH, height=80)
    alt_text = (
        f"Lift {row['lift']:+.1f}% with a 95% interval from {row['lo']:+.1f}% to {row['hi']:+.1f}%; "
        f"the dashed red line marks 0 (no effect); the interval {verdict}."
    )
    return _render(chart, title, alt_text)


def affinity(released: dict[str, Any]) -> Figure:
    """Affinity index per attribute value with its 95% interval, against a line at 1 (as common as in
    the base); suppressed cells are left out and listed in the table."""
    import altair as alt

    rows = [
        {
            "attribute": a["attribute"],
            "value": c["value"],
            "affinity": c["affinity"],
            "lo": c["affinity_interval_95"][0],
            "hi": c["affinity_interval_95"][1],
        }
        for a in released["attributes"]
        for c in a["cells"]
        if c["affinity"] is not None and c["affinity_interval_95"]
    ]
    y = alt.Y("value:N", title=None, sort=None)
    x_title = "affinity index (segment share / base share)"
    whiskers = alt.Chart().mark_rule().encode(alt.X("lo:Q", title=x_title), alt.X2("hi:Q"), y)
    points = alt.Chart().mark_point(filled=True, size=70).encode(alt.X("affinity:Q", title=x_title), y)
    one = alt.Chart().mark_rule(color="#c00", strokeDash=[4, 4]).encode(x=alt.datum(1))
    title = f"Affinity of {released['segment']} against the base (95% intervals)"
    chart = (
        alt.layer(whiskers, points, one, data={"values": rows})
        .properties(width=WIDTH - 140, height=alt.Step(18))
        .facet(row=alt.Row("attribute:N", title=None), title=title)
        .resolve_scale(y="independent")
    )
    over = [f"{r['attribute']}={r['value']}" for r in rows if r["lo"] > 1]
    alt_text = (
        f"Dot plot of the affinity index of {len(rows)} attribute values with their intervals; the dashed "
        "red line marks 1 (as common as in the base). Clearly over-represented: "
        + (", ".join(over) or "none")
        + ". The table below has the numbers."
    )
    return _render(chart, title, alt_text)


def trend(released: dict[str, Any]) -> Figure:
    """People per period with a 95% band (and, for first events, the running total with its band)."""
    import altair as alt

    rows = []
    for p in released["points"]:
        rows.append(
            {
                "period": p["period_start"],
                "series": "per period",
                "value": p["count"],
                "lo": p["interval_95"][0],
                "hi": p["interval_95"][1],
            }
        )
        if p.get("cumulative") is not None:
            lo, hi = p["cumulative_interval_95"]
            rows.append(
                {
                    "period": p["period_start"],
                    "series": "running total",
                    "value": p["cumulative"],
                    "lo": lo,
                    "hi": hi,
                }
            )
    what = "new people (first event)" if released["measure"] == "first" else "active people"
    x = alt.X("period:T", title=f"{released['period']} (UTC)")
    panels = []
    for series in dict.fromkeys(r["series"] for r in rows):
        base = alt.Chart({"values": rows}).transform_filter(f"datum.series == '{series}'")
        band = base.mark_area(opacity=0.25).encode(
            x, alt.Y("lo:Q", title=f"{what}, {series}"), alt.Y2("hi:Q")
        )
        line = base.mark_line(point=True).encode(x, alt.Y("value:Q", title=f"{what}, {series}"))
        panels.append((band + line).properties(width=WIDTH, height=160))
    title = f"{released['segments'][0]}: {what} per {released['period']} (noisy, 95% bands)"
    chart = alt.vconcat(*panels, title=title)
    alt_text = (
        f"Line chart{'s' if len(panels) > 1 else ''} of {what} per {released['period']} over "
        f"{len(released['points'])} periods with shaded 95% bands; {released['mechanism']}. "
        "The table below has the numbers."
    )
    return _render(chart, title, alt_text)


def personas(released: dict[str, Any]) -> Figure | None:
    """Each released persona's center, feature by feature, as a share of the feature's stated range
    (bars per persona), so personas with different units compare at a glance; sizes in the legend."""
    import altair as alt

    specs = {f["name"]: f for f in released.get("feature_specs", [])}
    rows = []
    for p in released["personas"]:
        if p["center"] is None:
            continue
        label = f"persona {p['persona']} ({p['size']} people)"
        for name, value in p["center"].items():
            lo, hi = specs[name]["min"], specs[name]["max"]
            rows.append(
                {"persona": label, "feature": name, "position": (value - lo) / (hi - lo), "value": value}
            )
    if not rows:
        return None
    chart = (
        alt.Chart({"values": rows})
        .mark_bar()
        .encode(
            alt.X(
                "position:Q",
                title="center within the feature's stated range (0 = min, 1 = max)",
                scale=alt.Scale(domain=[0, 1]),
            ),
            alt.Y("feature:N", title=None),
            alt.Color("persona:N", title=None),
            alt.YOffset("persona:N"),
        )
        .properties(title="Persona centers (noisy)", width=WIDTH - 160, height=alt.Step(14))
    )
    shown = len({r["persona"] for r in rows})
    alt_text = (
        f"Bars of {shown} released persona centers, one bar per feature and persona, placed within each "
        "feature's stated range; suppressed personas are left out. The table below has the values."
    )
    return _render(chart, "Persona centers (noisy)", alt_text)


def movement(released: dict[str, Any]) -> Figure:
    """Transitions between states as a heat map, each cell labelled with its noisy count."""
    import altair as alt

    (seg,) = released["results"]
    rows = [{"from": c["from"], "to": c["to"], "count": c["count"]} for c in seg["cells"]]
    order = [*released["segments"], "none"]
    data = {"values": rows}
    x = alt.X("to:N", title="state in the later snapshot", sort=order)
    y = alt.Y("from:N", title="state in the earlier snapshot", sort=order)
    heat = alt.Chart(data).mark_rect().encode(x, y, alt.Color("count:Q", title="people (noisy)"))
    labels = alt.Chart(data).mark_text(color="black").encode(x, y, alt.Text("count:Q"))
    title = "Movement between snapshots (noisy people per transition)"
    chart = (heat + labels).properties(title=title, width=WIDTH - 160, height=220)
    alt_text = (
        f"Heat map of {len(rows)} transitions between {len(order)} states; "
        f"{seg['suppressed_cells']} transition(s) suppressed (blank). The table below has the numbers."
    )
    return _render(chart, title, alt_text)


def budget(rows: list[dict[str, Any]], title: str) -> Figure:
    """Spent and remaining epsilon per bar (category, or category and recipient), stacked to the cap."""
    import altair as alt

    values = []
    for r in rows:
        values.append({"who": r["label"], "part": "spent", "epsilon": r["spent"]})
        values.append({"who": r["label"], "part": "remaining", "epsilon": max(r["remaining"], 0.0)})
    chart = (
        alt.Chart({"values": values})
        .mark_bar()
        .encode(
            alt.Y("who:N", title=None, sort=None),
            alt.X("epsilon:Q", title="privacy budget (epsilon)", stack="zero"),
            alt.Color(
                "part:N",
                title=None,
                sort=["spent", "remaining"],
                scale=alt.Scale(domain=["spent", "remaining"], range=["#d95f02", "#cfd8dc"]),
            ),
            alt.Order("order:Q"),
        )
        .transform_calculate(order="datum.part == 'spent' ? 0 : 1")
        .properties(title=title, width=WIDTH - 120, height=max(40, 28 * len(rows)))
    )
    alt_text = "Stacked bars: " + "; ".join(
        f"{r['label']}: spent {r['spent']:g} of {r['spent'] + max(r['remaining'], 0.0):g}" for r in rows
    )
    return _render(chart, title, alt_text)


def spend_over_time(points: list[dict[str, Any]], title: str) -> Figure:
    """Cumulative epsilon per recipient over time (``points``: at, recipient, cumulative)."""
    import altair as alt

    chart = (
        alt.Chart({"values": points})
        .mark_line(point=True, interpolate="step-after")
        .encode(
            alt.X("at:T", title="time (UTC)"),
            alt.Y("cumulative:Q", title="epsilon spent (cumulative)"),
            alt.Color("recipient:N", title="recipient"),
        )
        .properties(title=title, width=WIDTH, height=200)
    )
    last: dict[str, float] = {}
    for p in points:
        last[p["recipient"]] = p["cumulative"]
    alt_text = "Step lines of epsilon spent over time: " + "; ".join(
        f"{r}: {v:g} in all" for r, v in last.items()
    )
    return _render(chart, title, alt_text)
