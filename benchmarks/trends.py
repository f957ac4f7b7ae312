"""Trend accuracy benchmark: the error of a running total of first events under three eps-DP
mechanisms, measured on demo data over many OpenDP draws, against the theory.

    .venv/bin/python benchmarks/trends.py [--customers 20000] [--draws 100]

For each window (period, T), on the exact per-period counts of first purchases by a segment's members:
  direct      the T running totals released directly (a person moves every later total: d_in = T);
  increments  the T per-period counts (d_in = 1), running totals summed afterwards (sqrt(T) noises);
  tree        the binary-tree mechanism: dyadic block sums (d_in = L levels), a total sums <= L blocks.
Reports the root-mean-square error of the running totals (over periods and draws), its theoretical
value (discrete Laplace variance 2q/(1-q)^2, q = e^(-1/scale), times the number of noises summed), and
which mechanism privseg's plan picks. Offline: nothing is charged or released; demo data only.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_results

AS_OF = datetime(2026, 6, 1, 12, tzinfo=UTC)
WINDOWS = [("week", 12), ("week", 52), ("day", 366), ("day", 1000), ("day", 3660)]
WHERE = {"product_category": {"not_in_or_unknown": ["hearing_aids", "cannabis", "sexual_health"]}}


def _deployment(root: Path, customers: int) -> Any:
    from privseg.demo_data import generate
    from privseg.deployment import Deployment
    from privseg.ingest.files import ingest_files
    from privseg.keyset import create_keyset
    from privseg.segments import definitions, engine
    from privseg.settings import Settings

    repo = Path(__file__).resolve().parent.parent
    settings = Settings(
        home=root / "home", keyset=root / "keys" / "keyset.json", policy_dir=repo / "policies"
    )
    create_keyset(settings.keyset, "bench")
    dep = Deployment(settings)
    files = generate(root / "demo", customers=customers, seed=7, as_of=AS_OF)
    for kind, path in (("profiles", files.customers), ("events", files.events)):
        ingest_files(
            store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=[path], now=AS_OF
        )
    examples = repo / "privseg" / "segments" / "examples"
    definitions.apply(
        dep.store.conn,
        dep.keyset,
        [examples / "traits.yaml", examples / "segments.yaml"],
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    engine.compute_snapshot(store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF)
    return dep


def evaluate(increments: list[int], leaves: int, epsilon: float, draws: int) -> list[dict[str, Any]]:
    from privseg.release.kinds.trend import levels, noise_variance, prefix_nodes, tree_nodes
    from privseg.release.plan import Vector

    t = len(increments)
    truth = np.cumsum(np.array(increments, dtype=float))
    used = [prefix_nodes(i + 1, leaves) for i in range(t)]
    out = []
    for name, vector, exact, noises in (
        ("direct", Vector("direct", t, epsilon), [int(v) for v in truth], [1] * t),
        ("increments", Vector("increments", 1, epsilon), increments, list(range(1, t + 1))),
        (
            "tree",
            Vector("tree", levels(leaves), epsilon),
            tree_nodes(increments, leaves),
            [len(u) for u in used],
        ),
    ):
        measurement = vector.measurement()
        errors = []
        for _ in range(draws):
            noisy = np.array(measurement(exact), dtype=float)
            if name == "direct":
                totals = noisy
            elif name == "increments":
                totals = np.cumsum(noisy)
            else:
                totals = np.array([noisy[u].sum() for u in used])
            errors.append(totals - truth)
        err = np.array(errors)
        theory = math.sqrt(float(np.mean(noises)) * noise_variance(vector.scale))
        out.append(
            {
                "mechanism": name,
                "d_in": vector.sensitivity,
                "rmse": float(np.sqrt(np.mean(err**2))),
                "theory_rmse": theory,
                "max_abs_error": float(np.mean(np.abs(err).max(axis=1))),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--draws", type=int, default=100)
    args = parser.parse_args()

    from privseg import release
    from privseg.release.kinds.trend import TrendPlan, per_period

    with tempfile.TemporaryDirectory() as tmp:
        dep = _deployment(Path(tmp), args.customers)
        ctx = dep.release_context()
        rows, results = [], []
        for period, t in WINDOWS:
            req = release.TrendRequest(
                segment="frequent_buyers", where=WHERE, period=period, periods=t, dry_run=True
            )
            plan = release.plan(ctx, req, "growth_team")
            assert isinstance(plan, TrendPlan)
            increments = per_period(ctx, plan)
            for r in evaluate(increments, plan.leaves, plan.counts.epsilon, args.draws):
                picked = r["mechanism"] == plan.counts.name
                results.append(
                    {"period": period, "periods": t, "people": sum(increments), "picked": picked, **r}
                )
                rows.append(
                    [
                        period,
                        t,
                        sum(increments),
                        r["mechanism"] + (" *" if picked else ""),
                        r["d_in"],
                        f"{r['rmse']:.1f}",
                        f"{r['theory_rmse']:.1f}",
                        f"{r['rmse'] / r['theory_rmse']:.3f}",
                        f"{r['max_abs_error']:.1f}",
                    ]
                )
        dep.close()
    print_table(
        [
            "period",
            "T",
            "people",
            "mechanism (* = picked)",
            "d_in",
            "RMSE",
            "theory",
            "RMSE/theory",
            "mean max |err|",
        ],
        rows,
    )
    path = write_results(
        "trends", {"customers": args.customers, "draws": args.draws, "epsilon": 0.5, "results": results}
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
