"""Run every benchmark at one size and write one JSON summary with each benchmark's own results.

    .venv/bin/pip install -q -e '.[bench,spark]'
    .venv/bin/python benchmarks/run_all.py --customers 1000000
    .venv/bin/python benchmarks/run_all.py --customers 100000 --only segments release scale

Each benchmark runs in its own process, in an order where later ones reuse the stores earlier ones
built (release after segments, server after release). Each still measures its baseline in its own run
and reports its ratio; this script only sequences them and gathers their JSON results (printed as
``results: PATH`` by each) into ``benchmarks/results/run_all-<time>.json``. A failing benchmark is
recorded with its exit code and the tail of its error output, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_results

HERE = Path(__file__).resolve().parent
RESULT_LINE = re.compile(r"^results: (\S+\.json)\s*$", re.MULTILINE)


def plan(customers: int) -> dict[str, list[str]]:
    """Every benchmark and its arguments at ``customers``, in the order they must run."""
    n = str(customers)
    return {
        "cli_startup": [],
        "ingest": ["--customers", n, "--skip-naive"],
        "ingest_by_time": ["--customers", n, "--skip-naive", "--event-order", "time"],
        "segments": ["--customers", n, "--sizes", "20", "200", "2000"],
        "release": ["--customers", n],
        "server": ["--customers", n, "--workers", "1"],
        # The figures issue 12's server bars are judged by: the server's default worker count (one per
        # core, within the CPU quota; server.py asks privseg for it rather than counting cores again).
        "server_workers": ["--customers", n],
        "scale": ["--customers", n],
        "trends": ["--customers", str(min(customers, 20_000))],
        "intake": ["--batches", str(max(100, min(customers // 100, 10_000)))],
    }


def run(name: str, args: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    # A variant of a benchmark (ingest_by_time, server_workers) runs its script.
    script = HERE / f"{name.removesuffix('_by_time').removesuffix('_workers')}.py"
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    entry: dict[str, Any] = {"args": args, "seconds": round(seconds, 1), "exit_code": out.returncode}
    found = RESULT_LINE.findall(out.stdout)
    if out.returncode == 0 and found:
        path = Path(found[-1])
        entry["results_file"] = str(path)
        entry["results"] = json.loads(path.read_text())
    else:
        entry["error_tail"] = (out.stderr or out.stdout)[-2000:]
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--only", nargs="+", default=None, help="run only these benchmarks (in the usual order)")
    args = ap.parse_args()
    benchmarks = plan(args.customers)
    unknown = set(args.only or []) - set(benchmarks)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {sorted(unknown)}; known: {list(benchmarks)}")
    summary: dict[str, Any] = {"customers": args.customers, "benchmarks": {}}
    rows = []
    for name, bench_args in benchmarks.items():
        if args.only and name not in args.only:
            continue
        print(f"{name} {' '.join(bench_args)} ...", flush=True)
        entry = run(name, bench_args)
        summary["benchmarks"][name] = entry
        rows.append([name, entry["seconds"], entry["exit_code"] == 0, entry.get("results_file", "-")])
    print()
    print_table(["benchmark", "seconds", "ok", "results"], rows)
    print(f"results: {write_results('run_all', summary)}")
    if any(not ok for _name, _s, ok, _f in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
