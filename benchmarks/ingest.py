"""Ingestion benchmark: privseg ingest vs plain Polars read+write and a naive AES-SIV loop.

    .venv/bin/python benchmarks/ingest.py --customers 1000000 [--repeat 3]

Phases run in separate processes (peak memory per phase); plain and privseg run --repeat times,
alternated, and the ratio is the median of the pairs' ratios. In the same run it measures:
  plain   Polars read_csv + write_parquet of the same files (the floor any ingest pays);
  plain_tuned  the same, with the jemalloc options privseg gives Polars (privseg/__init__.py), so
          that what the setting buys each side is told apart;
  naive   a per-row AESSIV.encrypt loop over every identifier cell (no dictionary, no normalization);
  privseg the full ingest: validate, generalize, pseudonymize, write, fsync, commit, audit.
Each run also records how much CPU the rest of the box used meanwhile (other processes, hypervisor
steal): a pair where either side ran on a busy box is not a quiet measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    QUIET_PCT,
    median_run,
    peak_rss_mb,
    print_table,
    quiet,
    read_through,
    run_phase,
    write_results,
)

HERE = Path(__file__).resolve()


def phase_generate(out: Path, customers: int) -> dict[str, float]:
    from privseg.demo_data import generate

    t = time.perf_counter()
    files = generate(out, customers=customers, seed=42)
    return {"seconds": time.perf_counter() - t, "rows": files.customer_rows + files.event_rows}


def phase_plain(data: Path) -> dict[str, float]:
    import polars as pl

    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for name in ("customers", "events"):
            df = pl.read_csv(data / f"{name}.csv")
            df.write_parquet(Path(tmp) / f"{name}.parquet", compression="zstd")
            rows += df.height
        return {"seconds": time.perf_counter() - t, "rows": rows}


def phase_plain_tuned(data: Path) -> dict[str, float]:
    """:func:`phase_plain` with the allocator options privseg sets: privseg is imported before Polars
    loads, as in privseg's own processes."""
    import privseg  # noqa: F401

    return phase_plain(data)


def phase_naive(data: Path) -> dict[str, float]:
    import polars as pl
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    cipher = AESSIV(AESSIV.generate_key(512))
    ad = [b"bench"]
    ids = pl.concat(
        [
            pl.read_csv(data / f"{n}.csv", columns=["customer_id"]).get_column("customer_id")
            for n in ("customers", "events")
        ]
    ).to_list()
    t = time.perf_counter()
    out = [cipher.encrypt(v.encode(), ad) for v in ids]
    return {"seconds": time.perf_counter() - t, "rows": len(out)}


def phase_siv(data: Path) -> dict[str, float]:
    """Pseudonyms of every distinct customer id: the stock AESSIV loop (the reference, and what a
    competent implementer would write) against the batched AES-SIV; both must give the same tokens."""
    import polars as pl

    from privseg.keyset import create_keyset
    from privseg.pseudonym import IdType, Pseudonymizer, normalize_expr

    ids = pl.read_csv(data / "customers.csv", columns=["customer_id"]).get_column("customer_id")
    ids = pl.select(normalize_expr(pl.lit(ids.cast(pl.String)), IdType.CUSTOMER_NUMBER)).to_series().unique()
    with tempfile.TemporaryDirectory() as tmp:
        pz = Pseudonymizer(create_keyset(Path(tmp) / "keyset.json", "bench"), IdType.CUSTOMER_NUMBER)
        t = time.perf_counter()
        stock = pz._seal_many(ids.cast(pl.Binary).to_list())
        t_stock = time.perf_counter() - t
        t = time.perf_counter()
        batched, _keys = pz._seal_batched(ids)
        t_batched = time.perf_counter() - t
    assert batched.equals(stock), "the batched AES-SIV differs from the stock one"
    return {"seconds": t_batched, "stock_seconds": t_stock, "rows": ids.len()}


def phase_privseg(data: Path) -> dict[str, float]:
    from privseg.deployment import Deployment
    from privseg.ingest.files import ingest_files
    from privseg.keyset import create_keyset
    from privseg.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(
            home=root / "home", keyset=root / "keyset.json", policy_dir=HERE.parent.parent / "policies"
        )
        create_keyset(settings.keyset, "bench")
        dep = Deployment(settings)
        rows = 0
        split: dict[str, float] = {}
        t = time.perf_counter()
        for kind, name in (("profiles", "customers"), ("events", "events")):
            t_kind = time.perf_counter()
            (r,) = ingest_files(
                store=dep.store,
                keyset=dep.keyset,
                policy=dep.ingest_policy,
                kind=kind,
                paths=[data / f"{name}.csv"],
            )
            split[f"{kind}_seconds"] = time.perf_counter() - t_kind
            rows += r.rows + r.expired_events
        return {"seconds": time.perf_counter() - t, "rows": rows, **split}


def _by_time_dir(data: Path) -> Path:
    return data.with_name(f"{data.name}-by-time")


def phase_by_time(data: Path) -> dict[str, float]:
    """The same files with the events sorted by time (a customer's events spread over the file), made
    once beside ``data``."""
    import polars as pl

    out = _by_time_dir(data)
    if not (out / "events.csv").exists():
        out.mkdir(exist_ok=True)
        (out / "customers.csv").write_bytes((data / "customers.csv").read_bytes())
        events = pl.read_csv(data / "events.csv", infer_schema=False)
        events.sort("ts", maintain_order=True).write_csv(out / "events.csv.tmp")
        (out / "events.csv.tmp").rename(out / "events.csv")
    return {"seconds": 0.0, "rows": 0}


def _print_load(runs: dict[str, list[dict[str, Any]]], quiet_pairs: list[bool | None]) -> None:
    """What the rest of the box did during each run: a pair is only as good as its busier side."""
    if any(q is None for q in quiet_pairs):
        print("box load: not known here (no /proc/stat)")
        return
    loads = [
        f"{b['others_cpu_pct'] + b['steal_pct']:.0f}/{p['others_cpu_pct'] + p['steal_pct']:.0f}"
        for b, p in zip(runs["plain"], runs["privseg"], strict=True)
    ]
    print(
        f"box load per pair, others' CPU + steal in % of the box (plain/privseg): {', '.join(loads)}; "
        f"{sum(bool(q) for q in quiet_pairs)} of {len(quiet_pairs)} pairs quiet (< {QUIET_PCT:.0f}% each)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--data", type=Path, default=None, help="reuse demo data here (generated if missing)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow naive loop")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of plain and privseg, alternated; the ratio is the median of each pair's ratio",
    )
    ap.add_argument(
        "--event-order",
        choices=["customer", "time"],
        default="customer",
        help="events as generated (grouped by customer) or sorted by time, as most exports are",
    )
    args = ap.parse_args()

    if args.phase:
        phases = {
            "generate": lambda: phase_generate(args.data, args.customers),
            "plain": lambda: phase_plain(args.data),
            "plain_tuned": lambda: phase_plain_tuned(args.data),
            "naive": lambda: phase_naive(args.data),
            "privseg": lambda: phase_privseg(args.data),
            "siv": lambda: phase_siv(args.data),
            "by_time": lambda: phase_by_time(args.data),
        }
        result = phases[args.phase]()
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    data = args.data or (HERE.parent / "results" / f"demo-{args.customers}")
    results: dict[str, dict[str, Any]] = {}
    if not (data / "events.csv").exists():
        results["generate"] = run_phase(
            HERE, "generate", "--data", str(data), "--customers", str(args.customers)
        )
    if args.event_order == "time":
        # In its own process, like every phase: a child forked from a large parent would report the
        # parent's memory as its own peak.
        run_phase(HERE, "by_time", "--data", str(data), "--customers", str(args.customers))
        data = _by_time_dir(data)
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    # Both sides read the same two files; neither's first run pays the disk alone.
    read_through([data / "customers.csv", data / "events.csv"])
    # Alternated, so that a slow spell of the box (a neighbour on the host) falls on both sides of a
    # pair rather than on one phase's runs.
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "plain_tuned": [], "privseg": []}
    for _ in range(args.repeat):
        for phase, done in runs.items():
            done.append(run_phase(HERE, phase, "--data", str(data), "--customers", str(args.customers)))
    results |= {phase: median_run(done) for phase, done in runs.items()}
    pair_ratios = [p["seconds"] / b["seconds"] for b, p in zip(runs["plain"], runs["privseg"], strict=True)]
    tuned_ratios = [
        p["seconds"] / t["seconds"] for t, p in zip(runs["plain_tuned"], runs["privseg"], strict=True)
    ]
    quiet_pairs = [quiet(b) and quiet(p) for b, p in zip(runs["plain"], runs["privseg"], strict=True)]
    if not args.skip_naive:
        results["naive"] = run_phase(HERE, "naive", "--data", str(data), "--customers", str(args.customers))

    siv = run_phase(HERE, "siv", "--data", str(data), "--customers", str(args.customers))
    plain = results["plain"]["seconds"]
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['seconds']:.2f}",
                " ".join(f"{v:.2f}" for v in r.get("runs_seconds", [r["seconds"]])),
                f"{r['rows'] / r['seconds'] / 1e6:.2f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['seconds'] / plain:.2f}" if name != "generate" else "-",
            ]
        )
    print(f"\ningest benchmark: {args.customers} customers, events by {args.event_order}, data in {data}")
    print_table(["phase", "median s", "runs s", "M rows/s", "peak RSS MB", "x plain"], rows)
    ratio = statistics.median(pair_ratios)
    print(
        f"\nprivseg / plain, median of {len(pair_ratios)} alternated pairs: {ratio:.2f}x "
        f"(pairs: {', '.join(f'{r:.2f}' for r in pair_ratios)})"
    )
    tuned = statistics.median(tuned_ratios)
    print(
        f"privseg / plain with privseg's allocator setting: {tuned:.2f}x "
        f"(pairs: {', '.join(f'{r:.2f}' for r in tuned_ratios)})"
    )
    _print_load(runs, quiet_pairs)
    p = results["privseg"]
    print(
        f"privseg split (median run): profiles {p['profiles_seconds']:.2f} s, "
        f"events {p['events_seconds']:.2f} s"
    )
    print(f"\npseudonyms of {siv['rows']:,} distinct ids (identical tokens checked)")
    print_table(
        ["path", "seconds", "M ids/s", "x batched"],
        [
            [
                "stock AESSIV loop",
                f"{siv['stock_seconds']:.2f}",
                f"{siv['rows'] / siv['stock_seconds'] / 1e6:.2f}",
                f"{siv['stock_seconds'] / siv['seconds']:.2f}",
            ],
            ["batched AES-SIV", f"{siv['seconds']:.2f}", f"{siv['rows'] / siv['seconds'] / 1e6:.2f}", "1.00"],
        ],
    )
    results["siv"] = siv
    path = write_results(
        "ingest",
        {
            "customers": args.customers,
            "event_order": args.event_order,
            "results": results,
            "runs": runs,
            "ratio_privseg_to_plain": ratio,
            "pair_ratios": pair_ratios,
            "ratio_privseg_to_plain_tuned": tuned,
            "pair_ratios_tuned": tuned_ratios,
            "quiet_pairs": quiet_pairs,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
