"""Shared benchmark plumbing: run a phase in a fresh subprocess, read back its time and peak memory, and
how busy the rest of the box was meanwhile."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_phase(script: Path, phase: str, *args: str) -> dict[str, Any]:
    """Run ``script --phase PHASE ...`` in its own process so peak RSS is per phase. The result also
    says how much of the box others used meanwhile (see :func:`box_load`)."""
    before = box_cpu(), _children_cpu(), time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), "--phase", phase, *args], capture_output=True, text=True, check=False
    )
    after = box_cpu(), _children_cpu(), time.perf_counter()
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, **box_load(before, after)}


def read_through(paths: list[Path]) -> int:
    """Read every file once, untimed, and return the bytes read: the first timed run of a series then
    finds its input in the page cache like the runs after it, instead of paying the disk alone (seen
    here: plain Polars' first ingest 23.7 s against 4.6 s for the next, and privseg's first
    20-segment run loading the store in 8.1 s against 0.6-1.0 s at the next sizes)."""
    total = 0
    buf = bytearray(1 << 22)
    for path in paths:
        with open(path, "rb") as fh:
            while n := fh.readinto(buf):
                total += n
    return total


# A phase counts as measured on a quiet box when the rest of the box (other processes, and the
# hypervisor's steal) took less than this share of its CPUs meanwhile.
QUIET_PCT = 5.0


def box_load(
    before: tuple[tuple[float, float, float] | None, float, float],
    after: tuple[tuple[float, float, float] | None, float, float],
) -> dict[str, float]:
    """Between two readings of (:func:`box_cpu`, this process's children's CPU seconds, wall time): the
    share of the box's CPUs that other processes used (busy time not spent by our children) and that
    the hypervisor stole, in percent of wall time x CPUs. Empty where /proc/stat is missing. On a
    virtual machine with noisy neighbours the same phase can take twice as long from one run to the
    next (seen here: plain Polars 3.9 to 7.9 s): these say which runs to trust."""
    (box0, cpu0, t0), (box1, cpu1, t1) = before, after
    if box0 is None or box1 is None:
        return {}
    capacity = (t1 - t0) * cpus()
    others = max(box1[0] - box0[0] - (cpu1 - cpu0), 0.0)
    steal = box1[1] - box0[1]
    return {
        "others_cpu_pct": round(100 * others / capacity, 1),
        "steal_pct": round(100 * steal / capacity, 1),
    }


def box_cpu() -> tuple[float, float, float] | None:
    """(busy, steal, all) CPU seconds of the whole box since boot, from /proc/stat (None where it is
    missing): two readings say how busy the box was between them."""
    fields = _cpu_line()
    if fields is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / hz, steal / hz, sum(fields) / hz


def _cpu_line() -> list[int] | None:
    """The first eight counters of /proc/stat's aggregate line (user .. steal), in clock ticks."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields + [0] * 8)[:8]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quiet(result: dict[str, Any]) -> bool | None:
    """Whether a phase ran on a quiet box (None: not known)."""
    if "others_cpu_pct" not in result:
        return None
    return bool(result["others_cpu_pct"] + result["steal_pct"] < QUIET_PCT)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of repeated runs of a phase: its time is the median time, its other figures are the
    lower middle run's, its peak RSS the highest of them, and every run's time is kept."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "runs_seconds": [round(r["seconds"], 3) for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    payload = {"machine": {"python": platform.python_version(), "cpus": cpus()}, **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def ledger_rows(conn: Any) -> int:
    """Rows in a store's ledger (every charged benchmark request adds one), recorded beside fresh
    figures. Budget sums read a period's day totals and one day's rows since the ledger kept day
    totals; before that they summed every row of the period, and fresh figures drifted down as a
    benchmark store aged (25.1 ms of CPU a fresh report at 32,000 rows, 15.6 ms after)."""
    return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])


def large_budget_policies(tmp: Path) -> Path:
    """A copy of policies/ under ``tmp`` whose budgets no benchmark run exhausts (each run spends real
    budget on its store: with the shipped budgets, a few runs in one 30-day period use it all up)."""
    import shutil

    import yaml

    target = tmp / "policies"
    shutil.copytree(Path(__file__).resolve().parent.parent / "policies", target)
    for f in (target / "categories").glob("*.yaml"):
        doc = yaml.safe_load(f.read_text())
        doc["budget"]["per_recipient"] = 100_000.0 if doc["name"] == "general" else 1.0
        doc["budget"]["category_cap"] = 1_000_000.0 if doc["name"] == "general" else 2.0
        f.write_text(yaml.safe_dump(doc))
    return target
