"""Server benchmark: cached and fresh (charging) cohort reports over HTTP on loopback, at concurrency
1, 8 and 32, against the same release called in-process in the same run.

    .venv/bin/python benchmarks/server.py --customers 1000000

Uses the store benchmarks/segments.py built (and the 20 segments benchmarks/release.py applied), and
a copy of policies/ with large budgets so that fresh requests are not refused mid-run. Reports
requests/s, p50 and p99 latency, and the ratio of HTTP p50 to in-process p50. Where `wrk` is installed
it also loads the server from wrk (a C client that takes far less CPU from the two cores than the
Python client): fresh reports at concurrency 8 and 32 (each body sent once; a cached reply counts as
an error), the cached report and `/healthz` (the framework's floor) at 32, with how busy the box was
during each wrk run and its CPU time per request (a CPU-bound server's rate is its CPUs over that).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import box_cpu, large_budget_policies, ledger_rows, print_table, write_results
from benchmarks.release import _prepare
from benchmarks.segments import _bench_home

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load(
    base: str, token: str, bodies: list[dict[str, Any]], concurrency: int, expect_fresh: bool
) -> tuple[float, list[float], int]:
    import httpx2

    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    queue = list(bodies)

    def worker() -> None:
        nonlocal errors
        with httpx2.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                t = time.perf_counter()
                r = c.post("/v1/reports/cohort", json=body)
                dt = time.perf_counter() - t
                bad = r.status_code != 200 or (expect_fresh and r.json().get("cached"))
                with lock:
                    latencies.append(dt)
                    errors += bool(bad)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, errors


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


# Fresh reports from wrk: each thread walks its own share of distinct bodies (thread i sends bodies i,
# i + threads, ...), and replies marked cached are counted (a body sent twice, or released by an earlier
# run, is not a fresh report: reported as errors).
_WRK_FRESH_SCRIPT = """
local bodies = {%s}
local threads, started = {}, 0
function setup(thread)
  started = started + 1
  thread:set("id", started)
  table.insert(threads, thread)
end
function init(args)
  position, cached = id, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer %s"
end
function request()
  local body = bodies[(position - 1) %% #bodies + 1]
  position = position + %d
  return wrk.format(nil, nil, nil, body)
end
function response(status, headers, body)
  if body:find('"cached": true', 1, true) then cached = cached + 1 end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("cached") end
  io.write(string.format("cached replies: %%d\\n", n))
end
"""
_WRK_THREADS = 2
_WRK_SECONDS = 10  # each wrk row's duration (the fresh rows' body count is sized for it)


def _wrk(
    url: str,
    concurrency: int,
    seconds: int,
    body: str | None = None,
    token: str = "",
    fresh: list[str] | None = None,
) -> dict[str, Any]:
    """Requests/s and latency percentiles from wrk (a C load generator: the Python client above
    saturates its own core long before the server does). ``body``: POST it as JSON; ``fresh``: POST
    each of these once instead (a cached reply counts as an error)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        if fresh is not None:
            listed = ", ".join(f"[[{b}]]" for b in fresh)
            fh.write(_WRK_FRESH_SCRIPT % (listed, token, _WRK_THREADS))
        elif body is not None:
            fh.write(_WRK_SCRIPT % (body, token))
        script = fh.name
    try:
        box0 = box_cpu()
        out = subprocess.run(
            ["wrk", f"-t{_WRK_THREADS}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", script, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        box1 = box_cpu()
    finally:
        os.unlink(script)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        return float(match.group(1)) * units[match.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    cached = re.search(r"cached replies:\s+(\d+)", out)
    assert rps, out
    assert fresh is None or cached, out
    requests = re.search(r"(\d+) requests in", out)
    assert requests, out
    load: dict[str, float] = {}
    if box0 is not None and box1 is not None:
        # The whole box: the server's workers, wrk (a small share) and anything else running. Busy
        # near 100% says the server is CPU-bound; CPU per request is then what limits its rate.
        busy, steal, total = (b - a for a, b in zip(box0, box1, strict=True))
        load = {
            "box_busy_pct": 100 * busy / total,
            "box_steal_pct": 100 * steal / total,
            "box_cpu_ms_per_request": 1000 * busy / max(int(requests.group(1)), 1),
        }
    return {
        "rps": float(rps.group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": (int(non2xx.group(1)) if non2xx else 0) + (int(cached.group(1)) if cached else 0),
        **load,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over repeated wrk runs of one row (errors: their sum), and the
    runs themselves."""
    merged: dict[str, Any] = {
        key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "errors"
    }
    return {**merged, "errors": sum(r["errors"] for r in runs), "runs": runs}


def _load_cells(r: dict[str, Any]) -> list[str]:
    if "box_busy_pct" not in r:
        return ["?", "?"]  # no /proc/stat here
    return [f"{r['box_busy_pct']:.0f} ({r['box_steal_pct']:.0f})", f"{r['box_cpu_ms_per_request']:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--fresh", type=int, default=40, help="fresh requests per concurrency level")
    ap.add_argument("--cached", type=int, default=200, help="cached requests per concurrency level")
    ap.add_argument("--wrk-runs", type=int, default=3, help="runs of each wrk row (medians reported)")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server worker processes (default: the server's: one per core)",
    )
    args = ap.parse_args()
    if args.workers is None:
        from privseg.api.workers import default_workers

        args.workers = default_workers()  # what the server picks; passed on, so the two cannot differ

    from privseg import apikeys, release
    from privseg.deployment import Deployment
    from privseg.segments import engine
    from privseg.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        home = _bench_home(args.customers)
        settings = Settings(
            home=home, keyset=home / "keyset.json", policy_dir=large_budget_policies(Path(tmp))
        )
        dep, seg_ids = _prepare(args.customers)  # 20 applied segments and a current snapshot
        dep.close()
        dep = Deployment(settings)
        # Under these policies (larger budgets) the snapshot must be computed again: a release refuses
        # a snapshot computed under another policy set.
        snap = engine.latest(dep.store.conn)
        if engine.staleness(dep.store, snap, policy_hash=dep.categories.content_hash):
            engine.compute_snapshot(store=dep.store, compiler=dep.compiler(), keyset=dep.keyset)
        token = apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="growth_team")[1]
        ledger_at_start = ledger_rows(dep.store.conn)
        # Random 10-segment sets, never repeated in a run: a "fresh" request must not hit the cache that
        # an earlier run left in the same store (the benchmark also counts any cached reply as an error).
        rng = random.Random(time.time_ns())
        seen: set[tuple[str, ...]] = set()

        def fresh_combos() -> Any:
            while True:
                combo = tuple(sorted(rng.sample(seg_ids, 10)))
                if combo in seen:
                    continue
                seen.add(combo)
                # Released by an earlier run of a benchmark on this store: not fresh any more.
                req = release.CohortReportRequest(segments=list(combo), breakdown=dims)
                if not release.dry_run(
                    dep.release_context(), release.plan(dep.release_context(), req, "growth_team")
                )["cached"]:
                    yield list(combo)

        combos = fresh_combos()
        dims = ["age_band", "region"]

        # In-process baseline, same service call, same kinds of request.
        inproc_fresh, inproc_cached, inproc_fresh_cpu = [], [], []
        for _ in range(args.fresh):
            req = release.CohortReportRequest(segments=next(combos), breakdown=dims)
            t, cpu = time.perf_counter(), time.process_time()
            first = release.run(dep.release_context(), req, "growth_team")
            inproc_fresh.append(time.perf_counter() - t)
            inproc_fresh_cpu.append(time.process_time() - cpu)  # every thread of this process
            assert not first["cached"]
            t = time.perf_counter()
            release.run(dep.release_context(), req, "growth_team")
            inproc_cached.append(time.perf_counter() - t)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "PRIVSEG_HOME": str(home),
            "PRIVSEG_KEYSET": str(settings.keyset),
            "PRIVSEG_POLICY_DIR": str(settings.policy_dir),
            "PRIVSEG_LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "privseg", "serve", "--port", str(port), "--workers", str(args.workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        rows, results = [], {}
        wrk_p99s: list[str] = []
        try:
            import httpx2

            while True:
                try:
                    if httpx2.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx2.TransportError:
                    time.sleep(0.2)
            # Each worker builds its release caches at start, on a thread: measure after that work (it
            # would take the CPU from the first phase). Ten warm answers in a row, each on a new
            # connection (any worker may take it).
            warm_in_a_row, deadline = 0, time.monotonic() + 300
            while warm_in_a_row < 10 and time.monotonic() < deadline:
                warm = httpx2.get(f"{base}/readyz", timeout=5).json().get("warm", True)
                warm_in_a_row = warm_in_a_row + 1 if warm else 0
                time.sleep(0.1 if warm else 0.5)
            cached_body = {"segments": next(combos), "breakdown": dims}
            httpx2.post(
                f"{base}/v1/reports/cohort",
                json=cached_body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=120,
            )
            for c in (1, 8, 32):
                fresh = [{"segments": next(combos), "breakdown": dims} for _ in range(args.fresh)]
                for kind, bodies in (("fresh", fresh), ("cached", [cached_body] * args.cached)):
                    wall, lat, errors = _load(base, token, bodies, c, expect_fresh=kind == "fresh")
                    base_p50 = statistics.median(inproc_fresh if kind == "fresh" else inproc_cached)
                    results[f"{kind}_c{c}"] = {
                        "rps": len(lat) / wall,
                        "p50": _pct(lat, 0.5),
                        "p99": _pct(lat, 0.99),
                        "errors": errors,
                        "inprocess_p50": base_p50,
                    }
                    rows.append(
                        [
                            kind,
                            c,
                            f"{len(lat) / wall:.1f}",
                            f"{_pct(lat, 0.5) * 1000:.1f}",
                            f"{_pct(lat, 0.99) * 1000:.1f}",
                            errors,
                            f"{base_p50 * 1000:.1f}",
                            f"{_pct(lat, 0.5) / base_p50:.2f}",
                            "-",
                            "-",
                        ]
                    )
            if shutil.which("wrk"):
                # Fresh (charged) reports from wrk, whose client takes little of the server's CPU (four
                # times as many distinct bodies as the Python client's rate at 8 would need: a body
                # sent twice would come back cached and count as an error); the same cached report;
                # and /healthz (the cheapest route of the same server: what the framework and uvicorn
                # cost) as its floor.
                report = f"{base}/v1/reports/cohort"
                runs: list[tuple[str, int, str, str | None, list[str] | None]] = []
                count = max(500, int(4 * results["fresh_c8"]["rps"] * _WRK_SECONDS))
                for c in (8, 32):
                    runs.append(("fresh (wrk)", c, report, None, None))
                runs.append(("cached (wrk)", 32, report, json.dumps(cached_body), None))
                runs.append(("healthz (wrk)", 32, f"{base}/healthz", None, None))
                for kind, c, url, body, _ in runs:
                    # Each row is run --wrk-runs times: a single 10-second p99 moved by a third
                    # between runs (18-27 ms for the cached row), more than the changes it judges.
                    repeats = []
                    for _ in range(args.wrk_runs):
                        bodies = (
                            [json.dumps({"segments": next(combos), "breakdown": dims}) for _ in range(count)]
                            if kind.startswith("fresh")
                            else None
                        )
                        repeats.append(_wrk(url, c, _WRK_SECONDS, body, token, fresh=bodies))
                    r = _median_run(repeats)
                    results[f"{kind.split()[0]}_wrk_c{c}"] = r
                    p99s = " / ".join(f"{x['p99'] * 1000:.1f}" for x in repeats)
                    wrk_p99s.append(f"{kind} c={c}: {p99s}")
                    rows.append(
                        [
                            kind,
                            c,
                            f"{r['rps']:.1f}",
                            f"{r['p50'] * 1000:.1f}",
                            f"{r['p99'] * 1000:.1f}",
                            r["errors"],
                            "-",
                            "-",
                            *_load_cells(r),
                        ]
                    )
            else:
                print("wrk not found (apt-get install wrk): the wrk rows are skipped", file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        print(
            f"\nserver benchmark: {args.customers} customers, 10 segments x {dims} per report, "
            f"loopback HTTP, {args.workers} worker(s)"
        )
        print_table(
            [
                "request",
                "concurrency",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "in-process p50 ms",
                "HTTP p50 / in-process p50",
                "box busy % (steal)",
                "box CPU ms / request",
            ],
            rows,
        )
        if wrk_p99s:
            print(f"wrk rows: each figure the median of {args.wrk_runs} runs; p99 ms of each run:")
            for line in wrk_p99s:
                print(f"  {line}")
        cpu_ms = 1000 * statistics.median(inproc_fresh_cpu)
        print(f"in-process fresh report: {cpu_ms:.1f} ms of CPU (median, all threads)")
        print(f"the store's ledger held {ledger_at_start:,} rows at the start")
        summary = {
            "customers": args.customers,
            "workers": args.workers,
            "results": results,
            "inprocess_fresh_cpu_ms": cpu_ms,
            "ledger_rows_at_start": ledger_at_start,
        }
        print(f"results: {write_results('server', summary)}")


if __name__ == "__main__":
    main()
