"""Segment engine benchmark: privseg vs DuckDB on the same pseudonymized store.

    .venv/bin/pip install -q -e '.[bench]'
    .venv/bin/python benchmarks/segments.py --customers 1000000 --sizes 20 200 2000

Generates N segment definitions drawn from the leaf kinds (property, event count/sum with filters and
windows, recency, sequence, all/any/not), evaluates them with privseg's engine and with DuckDB (SQL
generated independently from the same definitions, one ``FILTER (WHERE ...)`` aggregate per feature)
over the same Parquet files, checks the memberships are identical, and reports seconds, peak memory
and the ratio privseg/DuckDB per size. Each engine runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mb, print_table, read_through, run_phase, write_results

HERE = Path(__file__).resolve()
TYPES = [
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "checkout",
    "purchase",
    "coupon_redeem",
    "email_open",
]
CATEGORIES = ["electronics", "home", "beauty", "fashion", "fitness", "travel", "hearing_aids", "cannabis"]
WINDOWS = [7, 14, 30, 60, 90, 180, 365]
AGE = ["<18", "18-24", "25-34", "35-44", "45-54", "55-64", "65+"]
REGIONS = ["new_england", "mid_atlantic", "south_atlantic", "southeast", "great_lakes", "pacific", "mountain"]
INTERESTS = ["fitness", "travel", "beauty", "electronics", "hearing_aids", "cannabis"]


# -- definitions ---------------------------------------------------------------------------------
def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choices(["property", "event", "recency", "sequence"], weights=[3, 6, 2, 1])[0]
    if kind == "property":
        attr = rng.choice(["age_band", "gender", "region", "interests"])
        if attr == "age_band":
            return {"property": {"age_band": {"in": rng.sample(AGE, rng.randint(1, 3))}}}
        if attr == "gender":
            return {"property": {"gender": {"eq": rng.choice(["female", "male"])}}}
        if attr == "region":
            return {"property": {"region": {"in": rng.sample(REGIONS, 2)}}}
        return {"property": {"interests": {"contains": rng.choice(INTERESTS)}}}
    if kind == "event":
        spec: dict[str, Any] = {"type": rng.choice(TYPES), "last": f"{rng.choice(WINDOWS)}d"}
        if rng.random() < 0.5:
            spec["where"] = {"product_category": {"eq": rng.choice(CATEGORIES)}}
        if rng.random() < 0.3:
            spec["type"] = "purchase"
            spec["sum"] = {"gte": rng.choice([50, 100, 250, 500, 1000])}
        else:
            spec["count"] = {"gte": rng.choice([1, 1, 2, 3, 5])}
        return {"event": spec}
    if kind == "recency":
        mode = rng.choice(["within", "not_within"])
        return {"recency": {"type": rng.choice(TYPES), mode: f"{rng.choice(WINDOWS)}d"}}
    return {
        "sequence": {
            "steps": [{"type": "product_view"}, {"type": rng.choice(["add_to_cart", "purchase"])}],
            "within": rng.choice(["1d", "2d"]),
            "last": f"{rng.choice([30, 60])}d",
        }
    }


def _node(rng: random.Random, depth: int) -> dict[str, Any]:
    if depth >= 2 or rng.random() < 0.35:
        leaf = _leaf(rng)
        return {"not": leaf} if rng.random() < 0.15 else leaf
    op = rng.choice(["all", "all", "any"])
    return {op: [_node(rng, depth + 1) for _ in range(rng.randint(2, 3))]}


STIGMATIZED = ["hearing_aids", "cannabis", "sexual_health"]


def _general_only(node: Any) -> Any:
    """The same tree reading no stigmatized data: every step excludes the stigmatized product
    categories (keeping events without one), stigmatized values become general ones."""
    if isinstance(node, list):
        return [_general_only(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _general_only(v) for k, v in node.items()}
    if "type" in out and out.get("type") in TYPES:  # an event step
        cat = out.get("where", {}).get("product_category", {}).get("eq")
        if cat is None or cat in STIGMATIZED:
            out["where"] = {"product_category": {"not_in_or_unknown": STIGMATIZED}}
    if out.get("contains") in STIGMATIZED:
        out["contains"] = "fitness"
    return out


def definitions(n: int, seed: int = 7, general_only: bool = False) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        # No declared category: each gets the one derived from what it reads (most read stigmatized
        # data, unless general_only pins every step to the general product categories).
        {
            "id": f"seg_{i:05d}",
            "objective": "performance",
            "where": _general_only(tree) if general_only else tree,
        }
        for i, tree in ((i, _node(rng, 0)) for i in range(n))
    ]


# -- DuckDB: SQL generated from the same definitions, independently of privseg's compiler -------------
class SqlBuilder:
    """``tuned=False``: one ``FILTER`` aggregate per feature over all events (every aggregate scans
    every event). ``tuned=True``: what a competent analyst writes: events split by type into tables
    once, one aggregate pass per type over its own rows, the per-type results joined to people."""

    def __init__(self, as_of: datetime, tuned: bool = False) -> None:
        self.as_of = as_of
        self.tuned = tuned
        self.features: dict[str, str] = {}  # sql aggregate -> alias
        self.sequences: dict[str, str] = {}  # sql subquery -> alias
        self.by_type: dict[str, dict[str, str]] = {}  # tuned: event type -> {aggregate -> alias}

    def _ts(self, days: int) -> str:
        return f"TIMESTAMPTZ '{(self.as_of - timedelta(days=days)).isoformat()}'"

    def _feature(self, sql: str, event_type: str | None = None) -> str:
        if not self.tuned or event_type is None:
            return self.features.setdefault(sql, f"f{len(self.features)}")
        aliases = self.by_type.setdefault(event_type, {})
        key = f"{event_type}|{sql}"
        alias = self.features.setdefault(key, f"f{len(self.features)}")
        aliases[sql] = alias
        return alias

    def _ref(self, alias: str) -> str:
        # Tuned: every per-type result is joined to people, and aliases are unique across them.
        return alias if self.tuned else f"f.{alias}"

    def table(self, event_type: str) -> str:
        return f"ev_{sorted(TYPES).index(event_type)}"

    @staticmethod
    def _q(v: str) -> str:
        return "'" + v.replace("'", "''") + "'"

    def expr(self, node: dict[str, Any]) -> str:
        ((key, body),) = node.items()
        if key in ("all", "any"):
            joiner = " AND " if key == "all" else " OR "
            return "(" + joiner.join(self.expr(c) for c in body) + ")"
        if key == "not":
            return f"(NOT {self.expr(body)})"
        if key == "property":
            ((attr, cond),) = body.items()
            ((op, value),) = cond.items()
            if op == "eq":
                return f"coalesce(p.{attr} = {self._q(value)}, false)"
            if op == "in":
                return f"coalesce(p.{attr} IN ({', '.join(self._q(v) for v in value)}), false)"
            return f"coalesce(list_contains(p.{attr}, {self._q(value)}), false)"
        if key == "event":
            cond = f"ts >= {self._ts(int(body['last'][:-1]))}"
            if not self.tuned:
                cond = f"event_type = {self._q(body['type'])} AND {cond}"
            if "where" in body:
                cond += f" AND product_category = {self._q(body['where']['product_category']['eq'])}"
            if "sum" in body:
                alias = self._feature(f"coalesce(sum(value) FILTER (WHERE {cond}), 0)", body["type"])
                return f"coalesce({self._ref(alias)}, 0) >= {body['sum']['gte']}"
            alias = self._feature(f"count(*) FILTER (WHERE {cond})", body["type"])
            return f"coalesce({self._ref(alias)}, 0) >= {body['count']['gte']}"
        if key == "recency":
            mode = "within" if "within" in body else "not_within"
            latest = (
                "max(ts)" if self.tuned else f"max(ts) FILTER (WHERE event_type = {self._q(body['type'])})"
            )
            alias = self._feature(latest, body["type"])
            recent = f"coalesce({self._ref(alias)} >= {self._ts(int(body[mode][:-1]))}, false)"
            return recent if mode == "within" else f"(NOT {recent})"
        assert key == "sequence"
        a, b = body["steps"][0]["type"], body["steps"][1]["type"]
        hours = int(body["within"][:-1]) * 24
        start = self._ts(int(body["last"][:-1]))
        if self.tuned:
            sub = (
                f"SELECT DISTINCT x.pid FROM {self.table(a)} x JOIN {self.table(b)} y ON x.pid = y.pid "
                f"AND y.ts >= x.ts AND y.ts <= x.ts + INTERVAL {hours} HOUR "
                f"WHERE x.ts >= {start} AND y.ts >= {start}"
            )
        else:
            sub = (
                f"SELECT DISTINCT x.pid FROM ev x JOIN ev y ON x.pid = y.pid AND y.ts >= x.ts "
                f"AND y.ts <= x.ts + INTERVAL {hours} HOUR "
                f"WHERE x.event_type = {self._q(a)} AND y.event_type = {self._q(b)} "
                f"AND x.ts >= {start} AND y.ts >= {start}"
            )
        alias = self.sequences.setdefault(sub, f"s{len(self.sequences)}")
        return f"(p.pid IN (SELECT pid FROM {alias}))"

    def query(self, defs: list[dict[str, Any]], consents: dict[str, list[str]]) -> str:
        """``consents``: the consent attributes each segment's (derived) categories require: a policy
        rule, which an analyst writing this SQL would have to apply too."""
        segs = [
            f"({self.expr(d['where'])}) AND "
            + " AND ".join(f"coalesce(p.{c}, false)" for c in consents[d["id"]])
            + f" AS {d['id']}"
            for d in defs
        ]
        seqs = "".join(f",\n{alias} AS ({sql})" for sql, alias in self.sequences.items())
        if self.tuned:
            ctes = [
                f"t{i} AS (SELECT pid, {', '.join(f'{sql} AS {alias}' for sql, alias in aggs.items())} "
                f"FROM {self.table(event_type)} GROUP BY pid)"
                for i, (event_type, aggs) in enumerate(sorted(self.by_type.items()))
            ]
            joins = "".join(f" LEFT JOIN t{i} USING (pid)" for i in range(len(ctes)))
            head = f"WITH {', '.join(ctes)}" if ctes else "WITH _none AS (SELECT 1)"
            return f"{head}{seqs}\nSELECT p.pid, {', '.join(segs)}\nFROM people p{joins}"
        feats = ",\n  ".join(f"{sql} AS {alias}" for sql, alias in self.features.items()) or "0 AS f_none"
        return (
            f"WITH f AS (SELECT pid,\n  {feats}\nFROM ev GROUP BY pid){seqs}\n"
            f"SELECT p.pid, {', '.join(segs)}\nFROM people p LEFT JOIN f USING (pid)"
        )


# -- phases ----------------------------------------------------------------------------------------
def _bench_home(customers: int) -> Path:
    return HERE.parent / "results" / f"segments-home-{customers}"


def _deployment(customers: int) -> Any:
    from privseg.deployment import Deployment
    from privseg.settings import Settings

    home = _bench_home(customers)
    return Deployment(
        Settings(home=home, keyset=home / "keyset.json", policy_dir=HERE.parent.parent / "policies")
    )


def phase_setup(customers: int) -> dict[str, Any]:
    from privseg.demo_data import generate
    from privseg.ingest.files import ingest_files
    from privseg.keyset import create_keyset

    data = HERE.parent / "results" / f"demo-{customers}"
    if not (data / "events.csv").exists():
        generate(data, customers=customers, seed=42)
    home = _bench_home(customers)
    if not (home / "keyset.json").exists():
        create_keyset(home / "keyset.json", "bench")
    dep = _deployment(customers)
    for kind, name in (("profiles", "customers"), ("events", "events")):
        ingest_files(
            store=dep.store,
            keyset=dep.keyset,
            policy=dep.ingest_policy,
            kind=kind,
            paths=[data / f"{name}.csv"],
        )
    events = dep.store.scan_events()
    assert events is not None
    import polars as pl

    last = events.select(pl.col("ts").max()).collect().item()
    # privseg and DuckDB read the same stored files: the first timed run must not read them from disk
    # while every later one finds them cached.
    read_through([dep.store.path_of(b) for b in dep.store.batches()])
    return {"as_of": (last + timedelta(seconds=1)).isoformat()}


def phase_privseg(customers: int, size: int, as_of: str, out: Path) -> dict[str, Any]:
    from privseg.segments import staging
    from privseg.segments.compiler import Compiler
    from privseg.segments.engine import membership
    from privseg.segments.parser import Parser

    dep = _deployment(customers)
    t = time.perf_counter()
    parser = Parser(dep.schema, set(dep.categories.categories))
    segs = {d["id"]: parser.segment(d, d["id"]) for d in definitions(size)}
    compiler = Compiler(schema=dep.schema, categories=dep.categories, segments=segs, traits={})
    t_cat = time.perf_counter()
    categories = {sid: compiler.effective(sid).categories for sid in segs}  # derived from what they read
    t_cat = time.perf_counter() - t_cat
    members, timings = membership(compiler, dep.store, datetime.fromisoformat(as_of))
    t_write = time.perf_counter()
    staging.write_members(members, out)  # timed, as DuckDB's COPY is: the same output work on both sides
    timings["write"] = time.perf_counter() - t_write
    seconds = time.perf_counter() - t
    stigmatized = sum(c != ("general",) for c in categories.values())
    return {
        "seconds": seconds,
        "t_categories": t_cat,
        "stigmatized_segments": stigmatized,
        **{f"t_{k}": v for k, v in timings.items()},
    }


def _consents(dep: Any, defs: list[dict[str, Any]]) -> dict[str, list[str]]:
    from privseg.segments.compiler import Compiler
    from privseg.segments.parser import Parser

    parser = Parser(dep.schema, set(dep.categories.categories))
    segs = {d["id"]: parser.segment(d, d["id"]) for d in defs}
    compiler = Compiler(schema=dep.schema, categories=dep.categories, segments=segs, traits={})
    return {sid: compiler.consent_attributes(sid) for sid in segs}


def phase_duckdb(customers: int, size: int, as_of: str, out: Path, tuned: bool = False) -> dict[str, Any]:
    import duckdb

    dep = _deployment(customers)
    profile_files = [str(dep.store.path_of(b)) for b in dep.store.batches("profiles")]
    event_files = [str(dep.store.path_of(b)) for b in dep.store.batches("events")]
    assert len(profile_files) == 1, "the baseline reads one profile batch (no upsert)"
    t = time.perf_counter()
    builder = SqlBuilder(datetime.fromisoformat(as_of), tuned=tuned)
    defs = definitions(size)
    sql = builder.query(defs, _consents(dep, defs))
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        f"CREATE TEMP VIEW ev AS SELECT * FROM read_parquet({event_files}) "
        f"WHERE ts <= TIMESTAMPTZ '{datetime.fromisoformat(as_of).isoformat()}'"
    )
    con.execute(
        f"CREATE TEMP VIEW people AS SELECT a.pid, pr.* EXCLUDE (pid) FROM "
        f"(SELECT pid FROM read_parquet({profile_files}) UNION SELECT DISTINCT pid FROM ev) a "
        f"LEFT JOIN read_parquet({profile_files}) pr USING (pid)"
    )
    if tuned:  # events split by type once (inside the timer)
        for event_type in TYPES:
            con.execute(
                f"CREATE TEMP TABLE {builder.table(event_type)} AS SELECT pid, ts, value, product_category "
                f"FROM ev WHERE event_type = {SqlBuilder._q(event_type)}"
            )
    con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet)")
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "features": len(builder.features), "sequences": len(builder.sequences)}


def compare(a: Path, b: Path) -> dict[str, Any]:
    import polars as pl

    x = pl.read_parquet(a).sort("pid")
    y = pl.read_parquet(b).sort("pid").select(x.columns)
    if x.height != y.height or not x.get_column("pid").equals(y.get_column("pid")):
        return {"identical": False, "why": "different people"}
    mismatched = {c: int((x.get_column(c) != y.get_column(c)).sum()) for c in x.columns[1:]}
    bad = {c: n for c, n in mismatched.items() if n}
    return {
        "identical": not bad,
        "mismatched_segments": len(bad),
        "mismatched_cells": sum(bad.values()),
        "examples": dict(list(bad.items())[:5]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 200, 2000])
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--as-of", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive DuckDB query (429 s at 2,000)")
    args = ap.parse_args()

    if args.phase:
        if args.phase == "setup":
            result = phase_setup(args.customers)
        elif args.phase == "privseg":
            result = phase_privseg(args.customers, args.size, args.as_of, args.out)
        else:
            result = phase_duckdb(args.customers, args.size, args.as_of, args.out, tuned=args.tuned)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    setup = run_phase(HERE, "setup", "--customers", str(args.customers))
    results: dict[str, Any] = {"as_of": setup["as_of"], "sizes": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            common = ["--customers", str(args.customers), "--size", str(size), "--as-of", setup["as_of"]]
            p_out = Path(tmp) / f"p{size}.parquet"
            p = run_phase(HERE, "privseg", *common, "--out", str(p_out))
            entry: dict[str, Any] = {"privseg": p}
            for variant in ("tuned",) + (() if args.skip_naive else ("naive",)):
                d_out = Path(tmp) / f"d{size}-{variant}.parquet"
                flags = ["--tuned"] if variant == "tuned" else []
                d = run_phase(HERE, "duckdb", *common, "--out", str(d_out), *flags)
                same = compare(p_out, d_out)
                entry[f"duckdb_{variant}"] = {**d, "comparison": same}
                rows.append(
                    [
                        size,
                        variant,
                        d["features"],
                        f"{p['seconds']:.2f}",
                        f"{p['peak_rss_mb']:.0f}",
                        f"{d['seconds']:.2f}",
                        f"{d['peak_rss_mb']:.0f}",
                        f"{p['seconds'] / d['seconds']:.2f}",
                        same["identical"],
                        f"{p['t_categories']:.2f}",
                        p["stigmatized_segments"],
                    ]
                )
                print(
                    f"size {size}: privseg {p['seconds']:.2f}s, duckdb ({variant}) {d['seconds']:.2f}s, "
                    f"identical={same['identical']}",
                    flush=True,
                )
            results["sizes"][size] = entry
    print(f"\nsegments benchmark: {args.customers} customers, as_of {setup['as_of']}")
    print_table(
        [
            "segments",
            "DuckDB query",
            "features",
            "privseg s",
            "privseg MB",
            "duckdb s",
            "duckdb MB",
            "privseg/duckdb",
            "identical",
            "categories s",
            "stigmatized",
        ],
        rows,
    )
    path = write_results("segments", {"customers": args.customers, **results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
