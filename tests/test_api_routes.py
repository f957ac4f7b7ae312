"""The HTTP API over a temporary deployment: every route x every kind of caller, errors, isolation."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from privseg import apikeys, audit
from privseg.api.app import create_app
from privseg.deployment import Deployment
from privseg.segments.language import DefinitionError
from tests.conftest import prepare

ROLES = ("admin", "marketer", "compliance", "partner")

# route -> (method, allowed roles, a request body or params that passes validation)
MATRIX: dict[str, tuple[str, set[str], dict[str, Any]]] = {
    "/v1/ingest/{kind}": (
        "POST",
        {"admin"},
        {
            "path": "/v1/ingest/events",
            "params": {"filename": "e.csv"},
            "content": b"customer_id,ts,event_type\nC1,2026-05-01T00:00:00Z,purchase\n",
        },
    ),
    "/v1/store": ("GET", {"admin"}, {}),
    "/v1/erase": ("POST", {"admin"}, {"json": {"id": "C_nobody"}}),
    "/v1/keys": ("GET", {"admin"}, {}),
    "/v1/snapshots": ("GET", {"admin", "marketer"}, {}),
    "/v1/snapshots#post": ("POST", {"admin"}, {"path": "/v1/snapshots"}),
    "/v1/apikeys": ("GET", {"admin"}, {}),
    "/v1/apikeys#post": (
        "POST",
        {"admin"},
        {"path": "/v1/apikeys", "json": {"role": "marketer", "name": "crm_team"}},
    ),
    "/v1/apikeys/{key_id}": ("DELETE", {"admin"}, {"path": "/v1/apikeys/999"}),
    "/v1/segments": ("GET", {"marketer"}, {}),
    "/v1/segments#post": (
        "POST",
        {"admin", "marketer"},
        {
            "path": "/v1/segments",
            "json": {
                "id": "x_new",
                "category": "general",
                "objective": "brand",
                "where": {"event": {"type": "purchase", "where": {"product_category": {"eq": "home"}}}},
            },
        },
    ),
    "/v1/segments/{segment_id}": ("DELETE", {"admin", "marketer"}, {"path": "/v1/segments/no_such_segment"}),
    "/v1/segments/{segment_id}/explain": (
        "GET",
        {"marketer"},
        {"path": "/v1/segments/cart_abandoners_7d/explain"},
    ),
    "/v1/reports/cohort": (
        "POST",
        {"marketer"},
        {"json": {"segments": ["cart_abandoners_7d"], "dry_run": True}},
    ),
    "/v1/reports/lift": (
        "POST",
        {"marketer"},
        {
            "json": {
                "treatment": "spring_test_treatment",
                "control": "control_group_10pct",
                "conversion": "coupon_responders",
                "dry_run": True,
            }
        },
    ),
    "/v1/reports/movement": (
        "POST",
        {"marketer"},
        {
            "json": {
                "segments": ["engaged_not_ready", "cart_abandoners_7d"],
                "from_snapshot": 1,
                "dry_run": True,
            }
        },
    ),
    "/v1/reports/insight": (
        "POST",
        {"marketer"},
        {"json": {"segment": "frequent_buyers", "attributes": ["age_band"], "dry_run": True}},
    ),
    "/v1/reports/trend": (
        "POST",
        {"marketer"},
        {"json": {"segment": "frequent_buyers", "period": "week", "periods": 4, "dry_run": True}},
    ),
    "/v1/reports/personas": (
        "POST",
        {"marketer"},
        {
            "json": {
                "segment": "frequent_buyers",
                "features": [
                    {
                        "name": "orders",
                        "event": {"type": "purchase", "where": {"product_category": {"eq": "home"}}},
                        "measure": "count",
                        "min": 0,
                        "max": 20,
                    }
                ],
                "dry_run": True,
            }
        },
    ),
    "/v1/intake/batch": (
        "POST",
        {"intake"},
        {
            "json": {
                "batch": [
                    {
                        "type": "track",
                        "messageId": "m-1",
                        "userId": "C1",
                        "event": "Order Completed",
                        "properties": {"revenue": 10, "category": "home"},
                        "timestamp": "2026-05-30T10:00:00Z",
                    }
                ]
            }
        },
    ),
    "/v1/budget/me": ("GET", {"marketer"}, {}),
    "/v1/policies": ("GET", {"compliance"}, {}),
    "/v1/policies/validate": ("POST", {"compliance"}, {"json": {"categories": {}}}),
    "/v1/budget": ("GET", {"compliance"}, {}),
    "/v1/audit": ("GET", {"compliance"}, {}),
    "/v1/audit/verify": ("GET", {"compliance"}, {}),
    "/v1/audit/anchor": ("GET", {"compliance"}, {}),
    "/v1/releases/{release_id}": ("GET", {"compliance"}, {"path": "/v1/releases/1"}),
    "/v1/audiences": ("GET", {"partner"}, {}),
    "/v1/audiences#post": (
        "POST",
        {"partner"},
        {
            "path": "/v1/audiences",
            "json": {"segment": "hearing_aid_interest_55plus", "breakdown": ["age_band"], "dry_run": True},
        },
    ),
    "/v1/audiences/insight": (
        "POST",
        {"partner"},
        {"json": {"segment": "hearing_aid_interest_55plus", "attributes": ["age_band"], "dry_run": True}},
    ),
}


@pytest.fixture
def api(dep: Deployment, demo_files) -> tuple[TestClient, dict[str, str], Deployment]:  # type: ignore[no-untyped-def]
    prepare(dep, demo_files.customers, demo_files.events)
    tokens = {
        "admin": apikeys.create(dep.store.conn, dep.keyset, role="admin", name="ops")[1],
        "marketer": apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="growth_team")[1],
        "compliance": apikeys.create(dep.store.conn, dep.keyset, role="compliance", name="dpo")[1],
        "partner": apikeys.create(
            dep.store.conn, dep.keyset, role="partner", name="alpha", partner="adnet_alpha"
        )[1],
        "intake": apikeys.create(dep.store.conn, dep.keyset, role="intake", name="pipeline")[1],
        "other_partner": apikeys.create(
            dep.store.conn, dep.keyset, role="partner", name="beta", partner="adnet_beta"
        )[1],
    }
    return TestClient(create_app(dep), raise_server_exceptions=False), tokens, dep


def _call(client: TestClient, route: str, method: str, spec: dict[str, Any], headers: dict[str, str]) -> Any:
    kwargs = {k: v for k, v in spec.items() if k in ("json", "params", "content")}
    return client.request(method, spec.get("path", route.split("#")[0]), headers=headers, **kwargs)


def _problem(response: Any) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = response.json()
    assert body["type"].startswith("https://privseg.dev/problems/") and body["status"] == response.status_code
    return body  # type: ignore[no-any-return]


def test_the_matrix_covers_every_route(api: tuple[TestClient, dict[str, str], Deployment]) -> None:
    # From the OpenAPI document: the routes a client can see are the ones that must be covered.
    paths = create_app(api[2]).openapi()["paths"]
    routes = {(path, m.upper()) for path, ops in paths.items() if path.startswith("/v1") for m in ops}
    covered = {(key.split("#")[0], method) for key, (method, _, _) in MATRIX.items()}
    assert routes == covered


def test_no_two_routes_answer_the_same_request() -> None:
    # The app includes its routers hot ones first (api/routes/__init__.py): that is safe only while
    # no request can match two routes, whatever the order. Each route's path with its parameters
    # filled in must match no other route of a shared method (a literal segment where another route
    # has a parameter is caught from the literal's side).
    import re

    from fastapi.routing import APIRoute

    from privseg.api.routes import ops, routers
    from privseg.console import admin, auth, compliance, marketer, partner, releases

    console = (auth, marketer, releases, compliance, partner, admin)
    routes = [
        route
        for router in (*routers(), ops.router, *(m.router for m in console))
        for route in router.routes
        if isinstance(route, APIRoute)
    ]
    assert len(routes) > 50
    clashes = [
        (a.path, b.path)
        for a in routes
        for b in routes
        if a is not b and a.methods & b.methods and b.path_regex.match(re.sub(r"\{[^}]+\}", "x1", a.path))
    ]
    assert clashes == []


@pytest.mark.parametrize("route", sorted(MATRIX))
def test_every_route_admits_exactly_its_roles(
    api: tuple[TestClient, dict[str, str], Deployment], route: str
) -> None:
    client, tokens, _dep = api
    method, allowed, spec = MATRIX[route]
    callers: dict[str, dict[str, str]] = {
        "nobody": {},
        "malformed": {"Authorization": "Bearer nonsense"},
        "wrong scheme": {"Authorization": f"Basic {tokens['admin']}"},
        "unknown key": {"Authorization": "Bearer psk_" + "A" * 43},
        **{role: {"Authorization": f"Bearer {tokens[role]}"} for role in ROLES},
    }
    for caller, headers in callers.items():
        response = _call(client, route, method, spec, headers)
        if caller in allowed:
            assert response.status_code not in (401, 403), (route, caller, response.text)
            assert response.status_code < 500, (route, caller, response.text)
        elif caller in ROLES:
            assert response.status_code == 403, (route, caller, response.status_code)
            assert _problem(response)["type"].endswith("/not-permitted")
        else:
            assert response.status_code == 401, (route, caller, response.status_code)
            assert _problem(response)["type"].endswith("/unauthenticated")


def test_failed_authentication_is_audited_without_the_token(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, _tokens, dep = api
    secret = "psk_" + "Z" * 43
    client.get("/v1/store", headers={"Authorization": f"Bearer {secret}"})
    entry = audit.entries(dep.store.conn, limit=1000)[-1]
    assert entry.event == "auth_failed" and entry.details["path"] == "/v1/store"
    db = b"".join(p.read_bytes() for p in dep.settings.home.glob("privseg.db*"))
    assert secret.encode() not in db and b"Z" * 43 not in db


def test_partners_see_only_their_own_grants(api: tuple[TestClient, dict[str, str], Deployment]) -> None:
    client, tokens, dep = api
    alpha = client.get("/v1/audiences", headers={"Authorization": f"Bearer {tokens['partner']}"}).json()
    beta = client.get("/v1/audiences", headers={"Authorization": f"Bearer {tokens['other_partner']}"}).json()
    assert "hearing_aid_interest_55plus" in {g["segment"] for g in alpha}
    assert "hearing_aid_interest_55plus" not in {g["segment"] for g in beta}
    refused = client.post(
        "/v1/audiences",
        json={"segment": "hearing_aid_interest_55plus", "breakdown": ["age_band"]},
        headers={"Authorization": f"Bearer {tokens['other_partner']}"},
    )
    assert refused.status_code == 403 and "adnet_beta" in _problem(refused)["detail"]
    # The server first looks for a stored release on its event loop; a refusal found there is left to
    # the release path, which audits it.
    last = audit.entries(dep.store.conn, limit=1000)[-1]
    assert last.event == "refusal" and last.details["recipient"] == "adnet_beta"


def test_reports_go_to_the_callers_own_identity_and_budget(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, tokens, _dep = api
    h = {"Authorization": f"Bearer {tokens['marketer']}"}
    out = client.post(
        "/v1/reports/cohort", json={"segments": ["cart_abandoners_7d"], "breakdown": ["age_band"]}, headers=h
    )
    assert (
        out.status_code == 200
        and out.json()["recipient"] == "growth_team"
        and out.json()["charged_epsilon"] == 0.5
    )
    smuggled = client.post(
        "/v1/reports/cohort", json={"segments": ["cart_abandoners_7d"], "recipient": "crm_team"}, headers=h
    )
    assert smuggled.status_code == 422 and "recipient" in _problem(smuggled)["detail"]
    mine = client.get("/v1/budget/me", headers=h).json()
    general = {"category": "general", "remaining_epsilon": 9.5, "per_recipient": 10.0, "period_days": 30}
    assert general | {"objectives": {}} in mine  # no split by objective in the shipped policies
    meta = client.get("/v1/releases/1", headers={"Authorization": f"Bearer {tokens['compliance']}"}).json()
    assert meta["recipient"] == "growth_team" and meta["epsilon"] == 0.5 and "results" not in meta


def test_bad_input_is_a_clear_problem_and_stores_nothing(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, tokens, dep = api
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    marketer = {"Authorization": f"Bearer {tokens['marketer']}"}
    batches = len(dep.store.batches())
    cases = [
        (
            client.post(
                "/v1/reports/cohort",
                content=b"{not json",
                headers={**marketer, "content-type": "application/json"},
            ),
            422,
            None,
        ),
        (
            client.post(
                "/v1/reports/cohort",
                json={"segments": ["cart_abandoners_7d"], "colour": "red"},
                headers=marketer,
            ),
            422,
            "colour",
        ),
        (client.post("/v1/reports/cohort", json={"segments": []}, headers=marketer), 422, "segments"),
        (client.post("/v1/reports/cohort", json={"segments": ["nope"]}, headers=marketer), 404, "nope"),
        (
            client.post(
                "/v1/reports/cohort",
                content=b"x" * (1024 * 1024 + 1),
                headers={**marketer, "content-type": "application/json"},
            ),
            413,
            None,
        ),
        (client.post("/v1/segments", content=b"\xff\xfe", headers=marketer), 422, "JSON"),
        (
            client.post(
                "/v1/ingest/profiles", params={"filename": "p.csv"}, content=b"\x00\xff" * 500, headers=admin
            ),
            422,
            "UTF-8",
        ),
        (
            client.post("/v1/ingest/profiles", params={"filename": "p.xlsx"}, content=b"x", headers=admin),
            422,
            "unknown file type",
        ),
        (
            client.post("/v1/ingest/profiles", params={"filename": "p.csv"}, content=b"", headers=admin),
            422,
            "empty",
        ),
        (
            client.post(
                "/v1/ingest/profiles",
                params={"filename": "p.csv"},
                content=b"customer_id,ssn\nC1,123\n",
                headers=admin,
            ),
            422,
            "ssn",
        ),
        (client.get("/v1/no-such-route", headers=admin), 404, None),
        # JSON as Python reads it admits Infinity and NaN: a persona bound of -Infinity scaled every
        # value to NaN and failed the release after its charge.
        (
            client.post(
                "/v1/reports/personas",
                content=b'{"segment": "frequent_buyers", "features": [{"name": "orders", "measure": "count", '
                b'"event": {"type": "purchase"}, "min": -Infinity, "max": 20}]}',
                headers={**marketer, "content-type": "application/json"},
            ),
            422,
            "min",
        ),
    ]
    for response, status, needle in cases:
        body = _problem(response)
        assert response.status_code == status, (status, response.text)
        if needle:
            assert needle in body["detail"], body
        assert "Traceback" not in response.text and "SELECT" not in response.text
    assert len(dep.store.batches()) == batches
    assert dep.store.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 0  # nothing charged
    assert not list((dep.settings.home / "uploads").glob("*"))  # temporary uploads are removed


def test_uploads_are_pseudonymized_and_responses_hold_no_identifier(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, tokens, dep = api
    body = b"customer_id,email,gender\nC9000001,secret.person@example.com,female\n"
    response = client.post(
        "/v1/ingest/profiles",
        params={"filename": "new.csv"},
        content=body,
        headers={"Authorization": f"Bearer {tokens['admin']}"},
    )
    assert response.status_code == 200 and response.json()[0]["rows"] == 1
    text = response.text + json.dumps(
        client.get("/v1/store", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()
    )
    assert "C9000001" not in text and "secret.person" not in text
    erased = client.post(
        "/v1/erase", json={"id": "C9000001"}, headers={"Authorization": f"Bearer {tokens['admin']}"}
    )
    assert erased.json()["profile_rows"] == 1 and "C9000001" not in erased.text
    stored = b"".join(p.read_bytes() for p in dep.settings.home.rglob("*") if p.is_file())
    assert b"C9000001" not in stored and b"secret.person" not in stored


def test_oversized_truncated_and_mistyped_uploads(dep: Deployment, demo_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gzip

    from privseg.settings import Settings

    small = Settings(**{**dep.settings.model_dump(), "max_upload_bytes": 10_000})
    limited = Deployment(small)
    token = apikeys.create(limited.store.conn, limited.keyset, role="admin", name="ops")[1]
    client = TestClient(create_app(limited), raise_server_exceptions=False)
    h = {"Authorization": f"Bearer {token}"}
    big = client.post(
        "/v1/ingest/profiles",
        params={"filename": "c.csv"},
        content=demo_files.customers.read_bytes(),
        headers=h,
    )
    assert big.status_code == 413 and "PRIVSEG_MAX_UPLOAD_BYTES" in _problem(big)["detail"]
    whole = gzip.compress(b"customer_id,gender\n" + b"".join(b"C%d,male\n" % i for i in range(200)))
    cut = client.post(
        "/v1/ingest/profiles", params={"filename": "p.csv.gz"}, content=whole[: len(whole) // 2], headers=h
    )
    assert cut.status_code == 422 and "truncated" in _problem(cut)["detail"]
    marketer = apikeys.create(limited.store.conn, limited.keyset, role="marketer", name="growth_team")[1]
    wrong_type = client.post(
        "/v1/reports/cohort",
        content=b'{"segments": ["x"]}',
        headers={"Authorization": f"Bearer {marketer}", "content-type": "text/plain"},
    )
    assert wrong_type.status_code == 422 and _problem(wrong_type)
    assert limited.store.batches() == []
    assert not list((small.home / "uploads").glob("*"))
    limited.close()


def test_marketers_get_no_exact_head_counts(api: tuple[TestClient, dict[str, str], Deployment]) -> None:
    client, tokens, _dep = api
    seen_by_marketer = client.get(
        "/v1/snapshots", headers={"Authorization": f"Bearer {tokens['marketer']}"}
    ).json()
    seen_by_admin = client.get("/v1/snapshots", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()
    assert "people" not in seen_by_marketer["snapshot"] and seen_by_admin["snapshot"]["people"] == 2000


def test_no_response_carries_key_material(api: tuple[TestClient, dict[str, str], Deployment]) -> None:
    import base64

    client, tokens, dep = api
    doc = json.loads(dep.settings.keyset.read_text())
    secrets = [k["key"] for k in doc["pseudonym_keys"]] + [doc["audit_key"]]
    needles = secrets + [base64.b64decode(s).hex() for s in secrets] + [s[:16] for s in secrets]
    seen = []
    for route, (method, allowed, spec) in MATRIX.items():
        for role in allowed:
            seen.append(_call(client, route, method, spec, {"Authorization": f"Bearer {tokens[role]}"}).text)
    seen.append(client.get("/readyz").text + client.get("/openapi.json").text)
    text = "\n".join(seen)
    assert len(seen) > len(MATRIX)
    for needle in needles:
        assert needle not in text
    for token in tokens.values():  # API tokens are shown once, at creation, and never again
        assert token not in text


def _typed(schema: dict[str, Any], doc: dict[str, Any]) -> bool:
    """A schema that says something: a named model, a typed array of them, or a union of such."""
    if "$ref" in schema:
        target = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return bool(target.get("properties")) and target.get("type") == "object"
    if schema.get("type") == "array":
        return _typed(schema["items"], doc)
    if "anyOf" in schema or "oneOf" in schema:
        return all(_typed(s, doc) for s in schema.get("anyOf", schema.get("oneOf")))
    return False


def test_every_operation_declares_its_security_its_response_and_its_problem_errors(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    doc = create_app(api[2]).openapi()
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert (
        scheme
        == {
            "type": "http",
            "scheme": "bearer",
            "description": scheme["description"],
        }
        and "psk_" in scheme["description"]
    )
    problem = "#/components/schemas/Problem"
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, op in ops.items():
            assert op.get("security") == [{"apiKey": []}], (path, method)
            ok = {k: v for k, v in op["responses"].items() if k.startswith("2")}
            assert len(ok) == 1, (path, method)
            ((status, answer),) = ok.items()
            if status != "204":  # no content
                assert _typed(answer["content"]["application/json"]["schema"], doc), (path, method)
            if "requestBody" in op:
                body = op["requestBody"]["content"]
                schema = body.get("application/json", {}).get("schema")
                # A JSON body is a typed model (uploads are raw files, streamed).
                assert schema is None or _typed(schema, doc), (path, method)
            for status in ("401", "403", "404", "409", "413", "422", "429", "500"):
                content = op["responses"][status]["content"]
                assert content["application/problem+json"]["schema"]["$ref"] == problem, (
                    path,
                    method,
                    status,
                )


def test_a_401_says_how_to_authenticate(api: tuple[TestClient, dict[str, str], Deployment]) -> None:
    client, _tokens, _dep = api
    for headers in ({}, {"Authorization": "Bearer psk_" + "A" * 43}, {"Authorization": "Basic x"}):
        r = client.get("/v1/store", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="privseg"'


def test_metrics_are_for_admins_and_count_without_naming_anyone(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, tokens, _dep = api
    h = {role: {"Authorization": f"Bearer {tokens[role]}"} for role in ROLES}
    body = {"segments": ["cart_abandoners_7d"], "breakdown": ["age_band"]}
    assert client.post("/v1/reports/cohort", json=body, headers=h["marketer"]).status_code == 200
    assert client.post("/v1/reports/cohort", json=body, headers=h["marketer"]).json()["cached"]
    client.get("/v1/releases/999999", headers=h["compliance"])
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=h["marketer"]).status_code == 403
    r = client.get("/metrics", headers=h["admin"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'privseg_epsilon_charged_total{category="general"}' in text
    assert 'privseg_release_cache_hits_total{kind="cohort_report"}' in text
    assert 'privseg_release_seconds_count{kind="cohort_report"}' in text
    assert 'route="/v1/releases/{release_id}"' in text and "999999" not in text  # templates, not paths
    assert "k1." not in text and "psk_" not in text


def test_requests_carry_an_id_and_an_access_line_without_the_raw_path(
    api: tuple[TestClient, dict[str, str], Deployment], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    client, tokens, _dep = api
    h = {"Authorization": f"Bearer {tokens['compliance']}"}
    with caplog.at_level(logging.INFO, logger="privseg.access"):
        kept = client.get("/v1/releases/424242", headers={**h, "X-Request-ID": "trace-7.a_b"})
        replaced = client.get("/v1/budget", headers={**h, "X-Request-ID": "jane@example.com"})
    assert kept.headers["x-request-id"] == "trace-7.a_b"
    assert len(replaced.headers["x-request-id"]) == 32 and "jane" not in replaced.headers["x-request-id"]
    lines = [r for r in caplog.records if r.name == "privseg.access"]
    assert [(r.route, r.status) for r in lines] == [("/v1/releases/{release_id}", 404), ("/v1/budget", 200)]
    assert not any("424242" in r.getMessage() or "jane" in r.getMessage() for r in lines)


def test_json_logs_are_one_object_per_line() -> None:
    import json
    import logging

    from privseg.deployment import JsonFormatter

    record = logging.LogRecord("privseg.access", logging.INFO, __file__, 1, "GET %s", ("/v1/x",), None)
    record.request_id = "abc"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "GET /v1/x" and doc["request_id"] == "abc" and doc["level"] == "INFO"


def test_routes_hold_no_sql() -> None:
    from pathlib import Path

    api_dir = Path(__file__).resolve().parent.parent / "privseg" / "api"
    offenders = [p.name for p in api_dir.glob("*.py") if ".execute(" in p.read_text()]
    assert offenders == []  # SQL lives in the domain modules the routes call


def test_a_deeply_nested_definition_is_refused_without_a_server_error(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    # A hostile marketer nests `not` until the parsers' recursion gives up: every depth is a problem
    # response (4xx), nothing is stored, and the server keeps answering.
    client, tokens, dep = api
    headers = {"Authorization": f"Bearer {tokens['marketer']}", "content-type": "application/json"}
    before = dep.store.conn.execute("SELECT COUNT(*) FROM definitions").fetchone()[0]
    for depth in (150, 1_000, 50_000):
        where = '{"not": ' * depth + '{"segment": "no_such_segment"}' + "}" * depth
        body = '{"id": "deep", "objective": "brand", "where": ' + where + "}"
        r = client.post("/v1/segments", content=body.encode(), headers=headers)
        assert r.status_code in (400, 422), (depth, r.status_code)
        assert _problem(r)["status"] == r.status_code
    assert dep.store.conn.execute("SELECT COUNT(*) FROM definitions").fetchone()[0] == before
    assert client.get("/v1/segments", headers={"Authorization": headers["Authorization"]}).status_code == 200


@pytest.mark.parametrize(
    ("failure", "logged", "never"),
    [
        # A library's message may quote what it choked on: only the type is logged.
        (RuntimeError("could not parse 'secret.person@example.com'"), "RuntimeError", "secret.person"),
        # privseg's own messages never carry data, and name what to fix.
        (
            DefinitionError("segment 'lapsed': where.property.income: unknown field"),
            "DefinitionError: segment 'lapsed': where.property.income: unknown field",
            None,
        ),
    ],
)
def test_a_snapshot_refresh_failing_after_an_upload_is_logged_without_data_and_the_upload_stands(
    api: tuple[TestClient, dict[str, str], Deployment],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
    logged: str,
    never: str | None,
) -> None:
    _client, tokens, dep = api

    def fail(self: Deployment) -> None:
        raise failure

    monkeypatch.setattr(Deployment, "recompute_if_stale", fail)
    # Raising server exceptions: a failure escaping the background task would fail this request.
    client = TestClient(create_app(dep), raise_server_exceptions=True)
    before = len(dep.store.batches("profiles"))
    with caplog.at_level(logging.INFO):
        response = client.post(
            "/v1/ingest/profiles",
            params={"filename": "new.csv"},
            content=b"customer_id,gender\nC9000002,female\n",
            headers={"Authorization": f"Bearer {tokens['admin']}"},
        )
    assert response.status_code == 200 and response.json()[0]["stored"] is True
    assert len(dep.store.batches("profiles")) == before + 1
    lines = [r.getMessage() for r in caplog.records if "snapshot refresh failed" in r.getMessage()]
    assert lines == [f"snapshot refresh failed: {logged}"]
    assert never is None or never not in caplog.text


def test_the_periodic_refresher_logs_a_failure_as_the_upload_path_does(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    from privseg.api.app import SnapshotRefresher

    def fail(self: Deployment) -> None:
        raise DefinitionError("segment 'lapsed': where.property.income: unknown field")

    monkeypatch.setattr(Deployment, "recompute_if_stale", fail)
    refresher = SnapshotRefresher(dep, 0.01)
    with caplog.at_level(logging.INFO):
        refresher.start()
        try:
            deadline = time.monotonic() + 10
            while "snapshot refresh failed" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            refresher.stop()
    assert "snapshot refresh failed: DefinitionError: segment 'lapsed': where.property.income" in caplog.text


def test_validating_a_candidate_names_the_stored_definitions_it_would_leave_uncomputable(
    api: tuple[TestClient, dict[str, str], Deployment],
) -> None:
    client, tokens, dep = api
    compliance = {"Authorization": f"Bearer {tokens['compliance']}"}
    current = client.get("/v1/policies", headers=compliance).json()["categories"]
    same = client.post("/v1/policies/validate", json={"categories": current}, headers=compliance).json()
    assert same == {"valid": True, "findings": [], "unbuildable_definitions": []}
    # Dropping a category a stored segment declares: a valid set, which would stop every snapshot.
    fewer = {name: doc for name, doc in current.items() if name != "hearing_aids"}
    checked = client.post("/v1/policies/validate", json={"categories": fewer}, headers=compliance).json()
    assert checked["valid"] is True and checked["findings"] == []
    assert [u.split(":")[0] for u in checked["unbuildable_definitions"]] == [
        "segment 'hearing_aid_interest_55plus'"
    ]
    assert checked["unbuildable_definitions"][0].startswith(
        "segment 'hearing_aid_interest_55plus': v1.category: unknown category 'hearing_aids'"
    )
    # Nothing was loaded: the policies in force are unchanged.
    assert client.get("/v1/policies", headers=compliance).json()["categories"] == current
    assert dep.categories.content_hash == client.get("/v1/policies", headers=compliance).json()["policy_hash"]


def test_the_snapshot_status_says_which_definitions_stop_the_next_snapshot(
    api: tuple[TestClient, dict[str, str], Deployment], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from privseg import deployment as deployment_module
    from privseg.segments import definitions

    _client, tokens, dep = api
    # Worked out once per definition versions and policies, not on every status request.
    monkeypatch.setattr(deployment_module, "_BLOCKED", {})
    worked_out: list[int] = []
    real_unbuildable = definitions.unbuildable

    def counted(*args: Any, **kwargs: Any) -> list[str]:
        worked_out.append(1)
        return real_unbuildable(*args, **kwargs)

    monkeypatch.setattr(definitions, "unbuildable", counted)
    defs = tmp_path / "defs.yaml"
    defs.write_text(
        "segments:\n  - {id: new_signups, category: general, objective: brand,\n"
        "     where: {property: {signup_date: {gte: 2026-01-01}}}}\n"
    )
    definitions.apply(
        dep.store.conn, dep.keyset, [defs], schema=dep.schema, categories=dep.categories, actor="admin:ops"
    )
    # The policies change under the running deployment: the ingest policy no longer keeps signup dates.
    changed = tmp_path / "policies"
    shutil.copytree(dep.settings.policy_dir, changed)
    ingest = (changed / "ingest.yaml").read_text()
    (changed / "ingest.yaml").write_text(ingest.replace("    signup_date: {type: date}\n", ""))
    moved = Deployment(dep.settings.model_copy(update={"policy_dir": changed}))
    try:
        client = TestClient(create_app(moved), raise_server_exceptions=False)
        for role in ("admin", "marketer"):
            status = client.get("/v1/snapshots", headers={"Authorization": f"Bearer {tokens[role]}"}).json()
            assert status["stale"] is True
            assert status["reasons"][-1].startswith("no snapshot can be computed under the policies in force")
            assert "segment 'new_signups': v1.where.property.signup_date" in status["reasons"][-1]
        assert len(worked_out) == 1  # two requests, one answer
        # Retired (the fix the status asks for), it no longer blocks: the answer follows the versions
        # (a segment applied after keeps the snapshot stale, so that the status has reasons to show).
        definitions.retire(
            moved.store.conn,
            moved.keyset,
            "segment",
            "new_signups",
            schema=moved.schema,
            categories=moved.categories,
            actor="admin:ops",
        )
        fine = tmp_path / "fine.yaml"
        fine.write_text(
            "segments:\n  - {id: women, category: general, objective: brand,\n"
            "     where: {property: {gender: {eq: female}}}}\n"
        )
        definitions.apply(
            moved.store.conn,
            moved.keyset,
            [fine],
            schema=moved.schema,
            categories=moved.categories,
            actor="admin:ops",
        )
        status = client.get("/v1/snapshots", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()
        assert status["stale"] is True
        assert status["reasons"] == ["segment or trait definitions changed since it was computed"]
        assert len(worked_out) == 2  # new versions, worked out again
    finally:
        moved.close()
