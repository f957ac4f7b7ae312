"""Scale benchmark: the same 2,000-segment workload on the local engine, the sharded engine and Spark.

    .venv/bin/pip install -q -e '.[bench,spark]'
    .venv/bin/python benchmarks/scale.py --customers 1000000 --engines local sharded spark
    .venv/bin/python benchmarks/scale.py --customers 10000000 --engines sharded --memory-gb 6

A store of N customers (about 10 events each) is built from the demo generator in files of at most
1M customers (generated, ingested, deleted one after the other: nothing holds the whole population),
then each engine computes the memberships of the segments benchmark's definitions into Parquet parts,
each in its own process. Reported: seconds, the peak resident memory of the whole process tree
(driver, JVM and Python workers for Spark; sampled from /proc), the ratio to the local engine, and
whether the memberships are identical cell by cell to the local engine's (when it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table, run_phase, write_results

HERE = Path(__file__).resolve()
PART = 1_000_000
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)


class TreeRss:
    """Peak of the summed resident memory of this process and all its descendants."""

    def __init__(self, interval: float = 0.2) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def _tree() -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._rss(p) for p in self._tree()))
            self._stop.wait(interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1024**2


def _home(customers: int) -> Path:
    return RESULTS / f"scale-home-{customers}"


def _deployment(customers: int) -> Any:
    from privseg.deployment import Deployment
    from privseg.settings import Settings

    home = _home(customers)
    return Deployment(
        Settings(home=home, keyset=home / "keyset.json", policy_dir=HERE.parent.parent / "policies")
    )


def phase_setup(customers: int) -> dict[str, Any]:
    from privseg.demo_data import generate
    from privseg.ingest.files import ingest_files
    from privseg.keyset import create_keyset

    home = _home(customers)
    done = home / "setup.json"
    if done.exists():
        return dict(json.loads(done.read_text()))
    shutil.rmtree(home, ignore_errors=True)
    create_keyset(home / "keyset.json", "bench")
    dep = _deployment(customers)
    t = time.perf_counter()
    events = 0
    for i, first in enumerate(range(0, customers, PART)):
        with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
            files = generate(
                Path(tmp),
                customers=min(PART, customers - first),
                seed=42 + i,
                as_of=AS_OF,
                first_id=first + 1,
            )
            events += files.event_rows
            for kind, path in (("profiles", files.customers), ("events", files.events)):
                ingest_files(
                    store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=[path]
                )
        print(
            f"part {i}: {first + PART:,} customers stored ({time.perf_counter() - t:.0f}s)", file=sys.stderr
        )
    result = {
        "as_of": (AS_OF + timedelta(seconds=1)).isoformat(),
        "events": events,
        "seconds": time.perf_counter() - t,
    }
    done.write_text(json.dumps(result))
    return result


def phase_engine(
    customers: int, engine: str, size: int, as_of: str, out: Path, memory_gb: float
) -> dict[str, Any]:
    from benchmarks.segments import definitions
    from privseg.segments.compiler import Compiler
    from privseg.segments.engine import local_runner
    from privseg.segments.parser import Parser
    from privseg.segments.sharded import sharded_runner

    dep = _deployment(customers)
    parser = Parser(dep.schema, set(dep.categories.categories))
    segs = {d["id"]: parser.segment(d, d["id"]) for d in definitions(size)}
    compiler = Compiler(schema=dep.schema, categories=dep.categories, segments=segs, traits={})
    if engine == "local":
        runner = local_runner
    elif engine == "sharded":
        runner = sharded_runner(memory_gb=memory_gb)
    else:
        from privseg.spark.runner import spark_runner

        runner = spark_runner(master="local[2]")
    out.mkdir(parents=True)
    rss = TreeRss()
    t = time.perf_counter()
    timings = runner(compiler, dep.store, datetime.fromisoformat(as_of), out, lambda m: None)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_tree_rss_mb": rss.stop(), **{f"t_{k}": v for k, v in timings.items()}}


def identical(a: Path, b: Path) -> bool:
    import polars as pl

    from privseg.segments import staging

    x = pl.concat([pl.read_parquet(p) for p in staging.parts(a)]).sort("pid")
    y = pl.concat([pl.read_parquet(p) for p in staging.parts(b)]).sort("pid").select(x.columns)
    return x.equals(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--engines", nargs="+", default=["local", "sharded", "spark"])
    ap.add_argument("--memory-gb", type=float, default=4.0, help="the sharded engine's memory budget")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="", help=argparse.SUPPRESS)
    ap.add_argument("--as-of", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        if args.phase == "setup":
            result = phase_setup(args.customers)
        else:
            result = phase_engine(
                args.customers, args.engine, args.size, args.as_of, args.out, args.memory_gb
            )
        print(json.dumps(result))
        return

    setup = run_phase(HERE, "setup", "--customers", str(args.customers))
    results: dict[str, Any] = {"customers": args.customers, "events": setup["events"], "engines": {}}
    rows = []
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        outs = {}
        for engine in args.engines:
            outs[engine] = Path(tmp) / engine
            common = ["--customers", str(args.customers), "--size", str(args.size), "--as-of", setup["as_of"]]
            r = run_phase(
                HERE,
                "engine",
                *common,
                "--engine",
                engine,
                "--out",
                str(outs[engine]),
                "--memory-gb",
                str(args.memory_gb),
            )
            results["engines"][engine] = r
            print(f"{engine}: {r['seconds']:.1f}s, peak {r['peak_tree_rss_mb']:.0f} MB", flush=True)
        base = results["engines"].get("local")
        for engine, r in results["engines"].items():
            same = identical(outs["local"], outs[engine]) if base and engine != "local" else None
            r["identical_to_local"] = same
            rows.append(
                [
                    engine,
                    f"{args.customers:,}",
                    f"{setup['events']:,}",
                    f"{r['seconds']:.1f}",
                    f"{r['peak_tree_rss_mb']:.0f}",
                    f"{r['seconds'] / base['seconds']:.2f}" if base else "-",
                    f"{r['peak_tree_rss_mb'] / base['peak_tree_rss_mb']:.2f}" if base else "-",
                    "-" if same is None else same,
                    r.get("t_groups", r.get("t_partitions", 1)),
                ]
            )
    print(f"\nscale benchmark: {args.size} segments, memory budget {args.memory_gb} GB (sharded)")
    print_table(
        [
            "engine",
            "customers",
            "events",
            "seconds",
            "peak MB",
            "time/local",
            "memory/local",
            "identical",
            "groups",
        ],
        rows,
    )
    path = write_results(f"scale-{args.customers}", results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
