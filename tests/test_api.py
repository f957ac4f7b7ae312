from __future__ import annotations

from fastapi.testclient import TestClient

from privseg.api.app import create_app
from privseg.deployment import Deployment
from privseg.settings import Settings


def test_health_and_readiness(dep: Deployment) -> None:
    client = TestClient(create_app(dep))
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get("/openapi.json").status_code == 200


def test_not_ready_without_keys_reports_codes_only(settings: Settings) -> None:
    client = TestClient(create_app(Deployment(settings)))
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["keyset"] == "keyset-error"
    assert str(settings.keyset) not in ready.text


def test_privseg_serve_answers_on_loopback_and_stops(dep: Deployment) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PRIVSEG_HOME": str(dep.settings.home),
        "PRIVSEG_KEYSET": str(dep.settings.keyset),
        "PRIVSEG_POLICY_DIR": str(dep.settings.policy_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "privseg", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx2.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert response.status_code == 200 and response.json()["ready"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it handled.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
