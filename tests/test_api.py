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
    import httpx2

    from tests.conftest import running_server

    with running_server(dep.settings) as (base, proc):
        response = httpx2.get(f"{base}/readyz", timeout=5)
        assert response.status_code == 200 and response.json()["ready"] is True
    assert proc.poll() is not None  # stopped, and (checked by the helper) cleanly
