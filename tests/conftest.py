"""Shared fixtures: a deployment over a temporary directory, small demo data, file writers."""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from privseg.demo_data import DemoFiles, generate
from privseg.deployment import Deployment
from privseg.keyset import create_keyset
from privseg.settings import Settings

if TYPE_CHECKING:
    import polars as pl

    from privseg.segments.engine import Runner, Snapshot

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
AS_OF = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def make_settings(root: Path) -> Settings:
    return Settings(
        home=root / "home",
        keyset=root / "keys" / "keyset.json",
        policy_dir=POLICIES,
        log_file=root / "logs" / "privseg.log",
        # Beside the test's state, not the default folder under /tmp: a test run left ~40 empty ones.
        upload_dir=root / "uploads",
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def dep(settings: Settings) -> Iterator[Deployment]:
    create_keyset(settings.keyset, "test")
    d = Deployment(settings)
    yield d
    d.close()


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> DemoFiles:
    """2,000 synthetic customers with raw identifiers (read-only: copy before modifying)."""
    return generate(tmp_path_factory.mktemp("demo"), customers=2_000, seed=11, as_of=AS_OF)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


PROFILE_HEADER = [
    "customer_id",
    "email",
    "birth_date",
    "postal_code",
    "gender",
    "interests",
    "consent_marketing",
]


def profile_row(cid: str, **over: str) -> list[str]:
    base = {
        "customer_id": cid,
        "email": f"{cid.lower()}@example.com",
        "birth_date": "1980-05-17",
        "postal_code": "94110",
        "gender": "female",
        "interests": "travel;hearing_aids",
        "consent_marketing": "true",
    }
    base.update(over)
    return [base[h] for h in PROFILE_HEADER]


EVENT_HEADER = ["customer_id", "ts", "event_type", "product_category", "value", "campaign"]


def event_row(cid: str, **over: str) -> list[str]:
    base = {
        "customer_id": cid,
        "ts": "2026-05-30T10:00:00Z",
        "event_type": "purchase",
        "product_category": "electronics",
        "value": "19.99",
        "campaign": "spring_sale",
    }
    base.update(over)
    return [base[h] for h in EVENT_HEADER]


def deployment_env(settings: Settings, *, log_level: str) -> dict[str, str]:
    """The environment that gives a privseg subprocess this deployment's settings (and the server's
    default worker count: a PRIVSEG_WORKERS of the shell running the tests is not passed on)."""
    return {
        **{k: v for k, v in os.environ.items() if k != "PRIVSEG_WORKERS"},
        "PRIVSEG_HOME": str(settings.home),
        "PRIVSEG_KEYSET": str(settings.keyset),
        "PRIVSEG_POLICY_DIR": str(settings.policy_dir),
        "PRIVSEG_LOG_FILE": str(settings.log_file),
        "PRIVSEG_LOG_LEVEL": log_level,
        "PRIVSEG_UPLOAD_DIR": str(settings.uploads_path),
    }


def run_cli(
    settings: Settings, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m privseg`` in a subprocess with this deployment's environment."""
    env = deployment_env(settings, log_level="DEBUG")
    proc = subprocess.run(
        [sys.executable, "-m", "privseg", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=300,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"privseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


EXAMPLES = REPO / "privseg" / "segments" / "examples"


def prepare(
    dep: Deployment, customers: Path, events: Path, snapshots: tuple[datetime, ...] = (AS_OF,)
) -> None:
    """Ingest demo files as of AS_OF, apply the shipped example segments, compute a snapshot as of
    each of ``snapshots`` (in order: the last is the latest)."""
    from privseg.ingest.files import ingest_files
    from privseg.segments import definitions, engine

    ingest_files(
        store=dep.store,
        keyset=dep.keyset,
        policy=dep.ingest_policy,
        kind="profiles",
        paths=[customers],
        now=AS_OF,
    )
    ingest_files(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="events", paths=[events], now=AS_OF
    )
    definitions.apply(
        dep.store.conn,
        dep.keyset,
        [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml"],
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    for as_of in snapshots:
        engine.compute_snapshot(store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=as_of)


@pytest.fixture
def patched(dep: Deployment, demo_files: DemoFiles, tmp_path: Path) -> Deployment:
    """The demo store with the example segments (every leaf kind: windows, sequences, traits,
    buckets, references) and no snapshot, plus a patch batch of profiles: engines that split the
    work must merge profiles across batches exactly as the store does."""
    import polars as pl

    from privseg.ingest.files import ingest_files

    prepare(dep, demo_files.customers, demo_files.events, snapshots=())
    customers = pl.read_csv(demo_files.customers, infer_schema=False)
    patch = customers.head(300).select("customer_id", pl.lit("hearing_aids;travel").alias("interests"))
    path = tmp_path / "patch.csv"
    patch.write_csv(path)
    ingest_files(store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="profiles", paths=[path])
    assert len(dep.store.batches("profiles")) == 2
    return dep


def snapshot_with(dep: Deployment, runner: Runner) -> tuple[Snapshot, dict[str, float]]:
    """A snapshot of ``dep``'s active segments at AS_OF, computed by ``runner``."""
    from privseg.segments import engine

    return engine.compute_snapshot(
        store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF, runner=runner
    )


def by_pid(members: pl.DataFrame) -> pl.DataFrame:
    """Memberships in a canonical order (columns by name, rows by pid): engines may order both
    differently, cell-by-cell comparisons must not care."""
    return members.select(sorted(members.columns)).sort("pid")


@contextmanager
def running_server(
    settings: Settings,
    log_level: str = "WARNING",
    workers: int | None = 1,
    cores: set[int] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`privseg serve` on a free loopback port for the duration of the block; yields (base URL, process).
    ``workers`` None: the server's default; ``cores``: the CPU affinity it starts with; ``env``: more
    environment variables."""
    import signal
    import socket
    import time

    import httpx2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**deployment_env(settings, log_level=log_level), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "privseg", "serve", "--port", str(port)]
        + ([] if workers is None else ["--workers", str(workers)]),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("privseg serve did not become ready")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it handled.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)


def database_before(path: Path, marker: str) -> sqlite3.Connection:
    """A database at ``path`` migrated up to, not including, the migration whose script contains
    ``marker``: the schema an older privseg left, for upgrade tests."""
    from privseg import db

    conn = sqlite3.connect(path, isolation_level=None)
    upgrade = next(i for i, script in enumerate(db._MIGRATIONS) if marker in script)
    for number, script in enumerate(db._MIGRATIONS[:upgrade], start=1):
        for statement in db._statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    return conn
