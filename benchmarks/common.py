"""Shared benchmark plumbing: run a phase in a fresh subprocess, read back its time and peak memory."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_phase(script: Path, phase: str, *args: str) -> dict[str, Any]:
    """Run ``script --phase PHASE ...`` in its own process so peak RSS is per phase."""
    out = subprocess.run(
        [sys.executable, str(script), "--phase", phase, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def peak_rss_mb() -> float:
    import resource

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
    payload = {"machine": {"python": platform.python_version(), "cpus": _cpus()}, **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


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
