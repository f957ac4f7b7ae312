"""Stored releases answered ahead of the framework (api/stored_releases.py): only what the route would
answer the same way, and everything else handed to the route untouched."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from privseg import apikeys, audit, metrics, release
from privseg.api.app import create_app
from privseg.api.stored_releases import StoredReleases
from privseg.deployment import Deployment
from tests.conftest import prepare

ROUTE = "/v1/reports/cohort"
BODY = {"segments": ["cart_abandoners_7d"], "breakdown": ["age_band"]}


@pytest.fixture
def served(dep: Deployment, demo_files) -> tuple[TestClient, dict[str, str], Deployment]:  # type: ignore[no-untyped-def]
    prepare(dep, demo_files.customers, demo_files.events)
    tokens = {
        "marketer": apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="growth_team")[1],
        "other_marketer": apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="crm_team")[1],
        # A partner whose identity is spelt as the marketer's: only the role tells the two apart.
        "namesake_partner": apikeys.create(
            dep.store.conn, dep.keyset, role="partner", name="namesake", partner="growth_team"
        )[1],
        "partner": apikeys.create(
            dep.store.conn, dep.keyset, role="partner", name="alpha", partner="adnet_alpha"
        )[1],
    }
    client = TestClient(create_app(dep), raise_server_exceptions=False)
    first = client.post(ROUTE, json=BODY, headers=_bearer(tokens["marketer"]))
    assert first.status_code == 200 and not first.json()["cached"]
    return client, tokens, dep


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class _Route:
    """The app behind the middleware: records what reaches it and answers 418."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})


Headers = list[tuple[bytes, bytes]]


def _through(
    dep: Deployment, body: bytes, headers: Headers, *, path: str = ROUTE, method: str = "POST"
) -> tuple[_Route, list[Message]]:
    """One request through the middleware alone, its body in two chunks; what reached the route
    and what was sent."""
    route, sent = _Route(), list[Message]()
    chunks = [body[:5], body[5:]]

    async def receive() -> Message:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(StoredReleases(route, dep)(scope, receive, send))
    return route, sent


def test_a_stored_release_is_sent_before_the_route_as_the_release_path_gives_it(
    served: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    _client, tokens, dep = served
    body = json.dumps(BODY).encode()
    headers = [(b"authorization", f"Bearer {tokens['marketer']}".encode())]
    headers.append((b"content-type", b"application/json"))
    route, sent = _through(dep, body, headers)
    assert route.bodies == []  # answered here
    assert sent[0]["status"] == 200 and (b"content-type", b"application/json") in sent[0]["headers"]
    expected = release.run_json(dep.release_context(), release.CohortReportRequest(**BODY), "growth_team")
    assert sent[1]["body"] == expected.encode() and json.loads(expected)["cached"] is True
    # No content type is JSON to the route too.
    route, sent = _through(dep, body, headers[:1])
    assert route.bodies == [] and sent[1]["body"] == expected.encode()


@pytest.mark.parametrize(
    "case",
    [
        "no key",
        "unknown key",
        "partner key",
        "partner key with the marketer's identity",
        "another marketer",
        "partner key first, marketer key second",
        "form content type",
        "not JSON",
        "nested past the recursion limit",
        "a field the route refuses",
        "not released yet",
        "dry run",
        "GET",
        "another path",
    ],
)
def test_anything_the_route_might_judge_otherwise_reaches_it_with_its_body(
    served: tuple[TestClient, dict[str, str], Deployment], case: str
) -> None:
    _client, tokens, dep = served
    marketer = (b"authorization", f"Bearer {tokens['marketer']}".encode())
    json_type = (b"content-type", b"application/json")
    body, headers, path, method = json.dumps(BODY).encode(), [marketer, json_type], ROUTE, "POST"
    if case == "no key":
        headers = [json_type]
    elif case == "unknown key":
        headers = [(b"authorization", b"Bearer psk_" + b"A" * 43), json_type]
    elif case == "partner key":
        headers = [(b"authorization", f"Bearer {tokens['partner']}".encode()), json_type]
    elif case == "partner key with the marketer's identity":
        headers = [(b"authorization", f"Bearer {tokens['namesake_partner']}".encode()), json_type]
    elif case == "another marketer":  # its own release is not stored: growth_team's is not its to see
        headers = [(b"authorization", f"Bearer {tokens['other_marketer']}".encode()), json_type]
    elif case == "partner key first, marketer key second":  # the route reads the first
        headers = [(b"authorization", f"Bearer {tokens['partner']}".encode()), marketer, json_type]
    elif case == "form content type":
        headers = [marketer, (b"content-type", b"application/x-www-form-urlencoded")]
    elif case == "not JSON":
        body = body[:-1]
    elif case == "nested past the recursion limit":
        body = b'{"segments": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    elif case == "a field the route refuses":
        body = json.dumps({**BODY, "recipient": "growth_team"}).encode()
    elif case == "not released yet":
        body = json.dumps({**BODY, "breakdown": ["region"]}).encode()
    elif case == "dry run":
        body = json.dumps({**BODY, "dry_run": True}).encode()
    elif case == "GET":
        method = "GET"
    else:
        path = "/v1/reports/lift"
    route, sent = _through(dep, body, headers, path=path, method=method)
    assert route.bodies == [body] and [m["status"] for m in sent if "status" in m] == [418]


def test_over_http_a_repeat_is_cached_logged_and_counted_and_refusals_stay_the_routes(
    served: tuple[TestClient, dict[str, str], Deployment], caplog: pytest.LogCaptureFixture
) -> None:
    client, tokens, dep = served
    hits = metrics.REGISTRY.get_sample_value("privseg_release_cache_hits_total", {"kind": "cohort_report"})
    with caplog.at_level(logging.INFO, logger="privseg.access"):
        again = client.post(ROUTE, json=BODY, headers=_bearer(tokens["marketer"]))
    assert again.status_code == 200 and again.json()["cached"] and again.json()["charged_epsilon"] == 0
    assert (
        metrics.REGISTRY.get_sample_value("privseg_release_cache_hits_total", {"kind": "cohort_report"})
        == (hits or 0) + 1
    )
    assert len(again.headers["x-request-id"]) == 32
    assert [
        (getattr(r, "route", None), getattr(r, "status", None))
        for r in caplog.records
        if r.name == "privseg.access"
    ] == [(ROUTE, 200)]
    # Another marketer sending the same body gets its own release, charged to its own budget.
    other = client.post(ROUTE, json=BODY, headers=_bearer(tokens["other_marketer"])).json()
    assert other["recipient"] == "crm_team" and not other["cached"] and other["charged_epsilon"] == 0.5
    # A revoked key gets nothing, and the failure is audited as on every route.
    key_id = next(k["id"] for k in apikeys.listing(dep.store.conn) if k["name"] == "growth_team")
    apikeys.revoke(dep.store.conn, dep.keyset, int(str(key_id)))
    revoked = client.post(ROUTE, json=BODY, headers=_bearer(tokens["marketer"]))
    assert revoked.status_code == 401 and revoked.headers["content-type"] == "application/problem+json"
    entry = audit.entries(dep.store.conn, limit=1000)[-1]
    assert entry.event == "auth_failed" and entry.details["path"] == ROUTE


def test_a_failure_ahead_of_the_route_is_the_routes_to_answer(
    served: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, tokens, dep = served
    # A keyset file another user can read is refused: the middleware meets the error, hands the
    # request on, and the route answers it as a problem, without key material.
    dep.settings.keyset.chmod(0o644)
    answer = client.post(ROUTE, json=BODY, headers=_bearer(tokens["marketer"]))
    assert answer.status_code >= 400 and answer.headers["content-type"] == "application/problem+json"
    assert "chmod 600" in answer.json()["detail"]
    secrets = _long_strings(json.loads(dep.settings.keyset.read_text()))
    assert secrets and not any(secret in answer.text for secret in secrets)


def _long_strings(doc: Any) -> list[str]:
    """Every string of 32 characters or more in a JSON document (the keyset's encoded keys)."""
    if isinstance(doc, str):
        return [doc] if len(doc) >= 32 else []
    values = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    return [s for v in values for s in _long_strings(v)]
