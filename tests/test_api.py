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
