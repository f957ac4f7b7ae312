"""End to end against a real `privseg serve` on 127.0.0.1 (a free port) with two worker processes,
started and stopped here: ingest over HTTP, define segments, report as a marketer, fetch an audience as
a partner, verify the audit log as compliance; then 64 concurrent report requests against one budget,
served by both processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from privseg.settings import Settings
from tests.conftest import REPO, deployment_env, make_settings, run_cli, running_server

EXAMPLES = REPO / "privseg" / "segments" / "examples"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, str], Settings, Path, int]]:
    root = tmp_path_factory.mktemp("e2e")
    settings = make_settings(root)
    run_cli(settings, "keys", "init", "--namespace", "e2e")
    tokens = {}
    for role, extra in (
        ("admin", ["--name", "ops"]),
        ("marketer", ["--name", "growth_team"]),
        ("compliance", ["--name", "dpo"]),
        ("partner", ["--name", "alpha", "--partner", "adnet_alpha"]),
    ):
        out = run_cli(settings, "apikey", "create", "--role", role, *extra).stdout.strip().splitlines()
        tokens[role] = out[-1]
    data = root / "data"
    run_cli(settings, "demo-data", "--customers", "3000", "--seed", "4", "--out", str(data))
    with running_server(settings, log_level="INFO", workers=2) as (base, proc):
        yield base, tokens, settings, data, proc.pid


def _h(tokens: dict[str, str], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[role]}"}


def test_end_to_end_over_http(server: tuple[str, dict[str, str], Settings, Path, int]) -> None:
    base, tokens, settings, data, _pid = server
    with httpx2.Client(base_url=base, timeout=120) as c:
        # Segments first, so that ingestion triggers the background recompute.
        docs = {
            **yaml.safe_load((EXAMPLES / "traits.yaml").read_text()),
            **yaml.safe_load((EXAMPLES / "segments.yaml").read_text()),
        }
        applied = c.post("/v1/segments", json=docs, headers=_h(tokens, "marketer"))
        assert applied.status_code == 200 and len(applied.json()) == 18
        for kind, name in (("profiles", "customers.csv"), ("events", "events.csv")):
            with open(data / name, "rb") as fh:  # streamed from disk, as a big upload would be
                r = c.post(
                    f"/v1/ingest/{kind}", params={"filename": name}, content=fh, headers=_h(tokens, "admin")
                )
            assert r.status_code == 200 and r.json()[0]["stored"], r.text
        deadline = time.monotonic() + 60
        while True:
            status = c.get("/v1/snapshots", headers=_h(tokens, "marketer")).json()
            if status["snapshot"] is not None and not status["stale"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        dry = c.post(
            "/v1/reports/cohort",
            json={"segments": ["cart_abandoners_7d"], "breakdown": ["age_band"], "dry_run": True},
            headers=_h(tokens, "marketer"),
        )
        assert dry.status_code == 200 and dry.json()["would_charge_epsilon"] == 0.5
        report = c.post(
            "/v1/reports/cohort",
            json={"segments": ["cart_abandoners_7d"], "breakdown": ["age_band"]},
            headers=_h(tokens, "marketer"),
        )
        assert report.status_code == 200 and report.json()["charged_epsilon"] == 0.5
        assert report.json()["results"][0]["cells"], report.json()
        grants = c.get("/v1/audiences", headers=_h(tokens, "partner")).json()
        assert "hearing_aid_interest_55plus" in {g["segment"] for g in grants}
        aud = c.post(
            "/v1/audiences",
            json={"segment": "hearing_aid_interest_55plus", "breakdown": ["age_band"]},
            headers=_h(tokens, "partner"),
        )
        assert aud.status_code == 200 and aud.json()["kind"] == "partner_audience"
        verify = c.get("/v1/audit/verify", headers=_h(tokens, "compliance")).json()
        assert verify["ok"] and verify["entries"] > 5
        budget = c.get("/v1/budget", headers=_h(tokens, "compliance")).json()
        spent = {row["category"]: row["category_spent"] for row in budget}
        assert spent["general"] == 0.5 and spent["hearing_aids"] == 0.25
    # Nothing raw in the server's log either.
    log = settings.log_file.read_text()  # type: ignore[union-attr]
    assert "C000000001" not in log and "@example" not in log


def _workers(supervisor: int) -> list[int]:
    """The worker processes (multiprocessing spawns, not e.g. a resource tracker) under the server's
    supervisor, from Linux /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == supervisor and b"spawn_main" in command and b"resource_tracker" not in command:
            children.append(int(stat.parent.name))
    return children


def test_concurrent_reports_never_overspend(server: tuple[str, dict[str, str], Settings, Path, int]) -> None:
    base, tokens, _settings, _data, supervisor = server
    # Two worker processes answer: the ledger's guarantees must hold across processes, not threads.
    assert len(_workers(supervisor)) == 2, _workers(supervisor)
    import itertools

    general = [
        "discount_seekers",
        "coupon_responders",
        "frequent_buyers",
        "high_spenders",
        "lapsed_customers",
        "rfm_champions",
        "rfm_at_risk",
        "view_then_cart_1d",
        "engaged_not_ready",
        "control_group_10pct",
    ]
    distinct = [list(c) for c in itertools.combinations(general, 2)][:32]
    repeated = [["frequent_buyers"]] * 32  # one request asked 32 times
    requests = [*distinct, *repeated]
    results: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def one(segments: list[str]) -> None:
        with httpx2.Client(base_url=base, timeout=120) as c:
            r = c.post("/v1/reports/cohort", json={"segments": segments}, headers=_h(tokens, "marketer"))
        with lock:
            results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=one, args=(segs,)) for segs in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 64
    assert all(code < 500 for code, _ in results), [r for r in results if r[0] >= 500]
    charged = sum(body.get("charged_epsilon", 0) for code, body in results if code == 200)
    cached = [body for code, body in results if code == 200 and body.get("cached")]
    assert all(body["charged_epsilon"] == 0 for body in cached)
    refused = [body for code, body in results if code == 429]
    assert all("left" in body["detail"] for body in refused)
    with httpx2.Client(base_url=base, timeout=30) as c:
        ledger = c.get("/v1/budget", headers=_h(tokens, "compliance")).json()
    growth = next(
        r
        for row in ledger
        if row["category"] == "general"
        for r in row["recipients"]
        if r["recipient"] == "growth_team"
    )
    # The e2e test already spent 0.5; the budget is 10: never more, and these requests filled it.
    assert growth["spent"] <= 10.0 and growth["spent"] == pytest.approx(0.5 + charged)
    assert growth["spent"] == pytest.approx(10.0)
    # Every charge the two workers made is audited, and in the day total the budget sums read.
    with httpx2.Client(base_url=base, timeout=30) as c:
        verified = c.get("/v1/audit/verify", headers=_h(tokens, "compliance")).json()
    assert verified["ok"], verified


def test_graceful_shutdown_finishes_the_request_in_flight(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    run_cli(settings, "keys", "init")
    created = run_cli(settings, "apikey", "create", "--role", "admin", "--name", "ops")
    token = created.stdout.strip().splitlines()[-1]
    data = tmp_path / "d"
    run_cli(settings, "demo-data", "--customers", "500", "--out", str(data))
    payload = (data / "customers.csv").read_bytes()
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def slow_body() -> Iterator[bytes]:
        for i in range(0, len(payload), 4096):
            if i == 4096 * 5:
                started.set()  # the server is now reading this request
            time.sleep(0.01)
            yield payload[i : i + 4096]

    with running_server(settings, workers=2) as (base, proc):

        def upload() -> None:
            r = httpx2.post(
                f"{base}/v1/ingest/profiles",
                params={"filename": "customers.csv"},
                content=slow_body(),
                headers={"Authorization": f"Bearer {token}"},
                timeout=120,
            )
            outcome["status"], outcome["body"] = r.status_code, r.json()

        t = threading.Thread(target=upload)
        t.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)  # while the upload is still streaming in
        t.join(timeout=120)
    assert outcome["status"] == 200 and outcome["body"][0]["rows"] == 500
    status = run_cli(settings, "store", "status", "--json").stdout
    assert '"rows": 500' in status  # the batch the server finished while stopping is stored


def _workers_of(pid: int) -> int:
    """The uvicorn worker processes under ``pid`` (each started by multiprocessing's spawn)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
    return sum(b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)


@pytest.mark.parametrize("cores", [None, {0}])
def test_the_server_runs_one_worker_per_core_it_may_use_by_default(
    tmp_path: Path, cores: set[int] | None
) -> None:
    from privseg.api.workers import default_workers

    settings = make_settings(tmp_path)
    run_cli(settings, "keys", "init")
    # Every core of this machine (within its cgroup's quota, see below), or the one it is narrowed to.
    usable = 1 if cores is not None else default_workers()
    with running_server(settings, workers=None, cores=cores) as (base, proc):
        assert httpx2.get(f"{base}/healthz", timeout=10).status_code == 200
        # One worker is the server process itself; several are children of a supervisor.
        assert _workers_of(proc.pid) == (0 if usable == 1 else usable)


def test_privseg_workers_sets_the_worker_count_where_the_command_line_is_fixed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    run_cli(settings, "keys", "init")
    # Narrowed to one core, the default would be one worker: the variable overrides it.
    with running_server(settings, workers=None, cores={0}, env={"PRIVSEG_WORKERS": "2"}) as (base, proc):
        assert httpx2.get(f"{base}/healthz", timeout=10).status_code == 200
        assert _workers_of(proc.pid) == 2


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_privseg_workers_is_refused_before_anything_starts(tmp_path: Path, value: str) -> None:
    settings = make_settings(tmp_path)
    run_cli(settings, "keys", "init")
    env = {**deployment_env(settings, log_level="WARNING"), "PRIVSEG_WORKERS": value}
    out = subprocess.run(
        [sys.executable, "-m", "privseg", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    assert "PRIVSEG_WORKERS" in out.stderr  # the error names where the bad value came from
    assert "serving" not in out.stderr


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cgroup": "0::/\n", "cpu.max": "200000 100000\n"}, 2.0),  # v2, docker --cpus 2
        ({"cgroup": "0::/\n", "cpu.max": "150000 100000\n"}, 1.5),
        ({"cgroup": "0::/\n", "cpu.max": "50000 100000\n"}, 0.5),  # half a core: one worker
        ({"cgroup": "0::/\n", "cpu.max": "max 100000\n"}, None),  # v2, no quota
        ({"cgroup": "0::/a/b\n", "a/b/cpu.max": "300000 100000\n"}, 3.0),  # v2, the named path
        (
            {"cgroup": "1:cpu:/\n", "cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "50000\n"},
            2.0,
        ),
        ({"cgroup": "1:cpu:/\n", "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cgroup": "4:memory:/x\n"}, None),  # no cpu controller
        ({"cgroup": "0::/\n", "cpu.max": "garbage\n"}, None),
        ({}, None),  # no /proc/self/cgroup (not Linux)
    ],
)
def test_the_default_worker_count_respects_the_cgroup_cpu_quota(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    import math
    import os

    from privseg.api.workers import cgroup_cpu_quota, default_workers

    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        path = tmp_path / "cgroup" if name == "cgroup" else root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cgroup_cpu_quota(root, tmp_path / "cgroup") == quota
    cores = len(os.sched_getaffinity(0))
    expected = cores if quota is None else max(1, min(cores, math.ceil(quota)))
    assert default_workers(root, tmp_path / "cgroup") == expected
