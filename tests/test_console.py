"""The web console over HTTP (no browser): sessions, CSRF, roles, what each page may show, and the
release path. Browser tests of the same pages are in test_console_browser.py."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from privseg import apikeys, ledger
from privseg.api.app import create_app
from privseg.console import web
from privseg.console.releases import _cell
from privseg.demo_data import DemoFiles
from privseg.deployment import Deployment
from privseg.keyset import create_keyset
from tests.conftest import make_settings, prepare

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    dep: Deployment
    tokens: dict[str, str]  # role -> API key token (growth_team is the marketer)

    def client(self, base_url: str = "http://127.0.0.1") -> TestClient:
        return TestClient(create_app(self.dep), base_url=base_url, follow_redirects=False)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, demo_files: DemoFiles) -> Iterator[Console]:
    settings = make_settings(tmp_path_factory.mktemp("console"))
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    prepare(dep, demo_files.customers, demo_files.events)
    tokens = {}
    for role, name, partner in (
        ("marketer", "growth_team", None),
        ("compliance", "dpo", None),
        ("partner", "adnet", "adnet_alpha"),
        ("admin", "ops", None),
    ):
        tokens[role] = apikeys.create(dep.store.conn, dep.keyset, role=role, name=name, partner=partner)[1]
    tokens["crm"] = apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="crm_team")[1]
    yield Console(dep, tokens)
    dep.close()


def sign_in(client: TestClient, token: str) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    page = client.get("/ui/login")
    response = client.post("/ui/login", data={"api_key": token, "csrf": CSRF.findall(page.text)[0]})
    assert response.status_code == 303, response.text
    home = client.get(response.headers["location"])
    assert home.status_code == 200
    return CSRF.findall(home.text)[0]


def audit_events(dep: Deployment) -> list[str]:
    return [r[0] for r in dep.store.conn.execute("SELECT event FROM audit ORDER BY seq")]


def test_sign_in_sets_a_strict_http_only_session_cookie_and_never_shows_the_key(console: Console) -> None:
    client = console.client()
    page = client.get("/ui/login")
    assert "psk_" not in page.text.replace("<code>psk_</code>", "")
    response = client.post(
        "/ui/login", data={"api_key": console.tokens["marketer"], "csrf": CSRF.findall(page.text)[0]}
    )
    assert response.status_code == 303 and response.headers["location"] == "/ui/segments"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(web.COOKIE + "="))
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= attributes
    assert "secure" not in attributes  # plain http on loopback; see the https test
    session_token = cookie.split(";")[0].split("=", 1)[1]
    # The database holds only a keyed hash of the session token, never the token or the API key.
    raw = (
        Path(console.dep.settings.db_path).read_bytes()
        + Path(str(console.dep.settings.db_path) + "-wal").read_bytes()
    )
    assert session_token.encode() not in raw and console.tokens["marketer"].encode() not in raw
    for path in ("/ui/segments", "/ui/budget", "/ui/release/cohort_report", "/ui/segments/edit"):
        body = client.get(path).text
        assert console.tokens["marketer"] not in body and session_token not in body
    assert audit_events(console.dep)[-1] == "console_signin"


def test_the_session_cookie_is_secure_over_https(console: Console) -> None:
    client = console.client("https://console.example")
    page = client.get("/ui/login")
    assert "secure" in page.headers["set-cookie"].lower()
    response = client.post(
        "/ui/login", data={"api_key": console.tokens["compliance"], "csrf": CSRF.findall(page.text)[0]}
    )
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(web.COOKIE + "="))
    assert "secure" in cookie.lower()


def test_a_wrong_key_is_refused_audited_and_not_echoed(console: Console) -> None:
    client = console.client()
    page = client.get("/ui/login")
    wrong = "psk_" + "A" * 43
    response = client.post("/ui/login", data={"api_key": wrong, "csrf": CSRF.findall(page.text)[0]})
    assert response.status_code == 401 and wrong not in response.text
    assert web.COOKIE + "=" not in response.headers.get("set-cookie", "")
    assert audit_events(console.dep)[-1] == "auth_failed"


def test_sign_in_needs_the_forms_own_token(console: Console) -> None:
    """Login CSRF: a form posted from elsewhere (no nonce cookie, or the wrong token) signs nobody in."""
    client = console.client()
    refused = client.post("/ui/login", data={"api_key": console.tokens["marketer"], "csrf": "x" * 64})
    assert refused.status_code == 403 and web.COOKIE + "=" not in refused.headers.get("set-cookie", "")
    page = client.get("/ui/login")
    forged = client.post(
        "/ui/login",
        data={"api_key": console.tokens["marketer"], "csrf": CSRF.findall(page.text)[0]},
        headers={"origin": "http://evil.example"},
    )
    assert forged.status_code == 403


def test_pages_without_a_session_redirect_to_sign_in_and_reveal_nothing(console: Console) -> None:
    client = console.client()
    for path in (
        "/ui/segments",
        "/ui/ledger",
        "/ui/audit",
        "/ui/admin",
        "/ui/releases/1",
        "/ui/releases/1/csv",
    ):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/ui/login", path
    assert client.post("/ui/release/cohort_report", data={"segments": "frequent_buyers"}).status_code == 303


def _pages(dep: Deployment) -> list[str]:
    return [
        "/ui/segments",
        "/ui/segments/frequent_buyers/history",
        "/ui/segments/edit",
        "/ui/release/cohort_report",
        "/ui/release/ab_lift",
        "/ui/release/segment_movement",
        "/ui/release/partner_audience",
        "/ui/release/audience_insight",
        "/ui/release/partner_insight",
        "/ui/release/trend",
        "/ui/release/personas",
        "/ui/budget",
        "/ui/policies",
        "/ui/ledger",
        "/ui/audit",
        "/ui/audiences",
        "/ui/admin",
        "/ui/admin/upload",
        "/ui/admin/apikeys",
        "/ui/releases",
    ]


# Which role may open which page: the same roles as the /v1 routes of the same data.
ALLOWED = {
    "marketer": {
        "/ui/segments",
        "/ui/segments/frequent_buyers/history",
        "/ui/segments/edit",
        "/ui/release/cohort_report",
        "/ui/release/ab_lift",
        "/ui/release/segment_movement",
        "/ui/release/audience_insight",
        "/ui/release/trend",
        "/ui/release/personas",
        "/ui/budget",
        "/ui/releases",
    },
    "compliance": {"/ui/policies", "/ui/ledger", "/ui/audit", "/ui/releases"},
    "partner": {
        "/ui/audiences",
        "/ui/release/partner_audience",
        "/ui/release/partner_insight",
        "/ui/releases",
    },
    "admin": {"/ui/admin", "/ui/admin/upload", "/ui/admin/apikeys"},
}


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_opens_its_own_pages_only_even_by_url(console: Console, role: str) -> None:
    client = console.client()
    sign_in(client, console.tokens[role])
    for path in _pages(console.dep):
        status = client.get(path).status_code
        assert status == (200 if path in ALLOWED[role] else 403), (role, path, status)
    # The navigation bar lists exactly the role's pages.
    nav = re.findall(
        r'<nav aria-label="pages">(.*?)</nav>', client.get(next(iter(ALLOWED[role]))).text, re.S
    )[0]
    assert {f"/ui{h}" for h in re.findall(r'href="/ui([^"]+)"', nav)} <= ALLOWED[role]


def test_state_changes_need_the_sessions_csrf_token_and_this_origin(console: Console) -> None:
    dep = console.dep
    client = console.client()
    csrf = sign_in(client, console.tokens["marketer"])
    spend = {"segments": "frequent_buyers", "breakdown": "age_band", "measures": "count", "action": "spend"}
    before = ledger.charges(dep.store.conn, recipient="growth_team")
    for data, headers in (
        (spend, {}),  # no token
        ({**spend, "csrf": "0" * 64}, {}),  # a wrong one
        ({**spend, "csrf": csrf}, {"origin": "http://evil.example"}),  # right token, other site
    ):
        response = client.post("/ui/release/cohort_report", data=data, headers=headers)
        assert response.status_code == 403, response.text
        assert "security token" in response.text
    assert ledger.charges(dep.store.conn, recipient="growth_team") == before  # nothing spent
    # Another session's token is no good either.
    other = console.client()
    other_csrf = sign_in(other, console.tokens["crm"])
    assert client.post("/ui/release/cohort_report", data={**spend, "csrf": other_csrf}).status_code == 403
    assert client.post("/ui/logout", data={}).status_code == 403  # sign-out is a state change too


def test_dry_run_spends_nothing_spend_charges_once_and_a_repeat_is_the_stored_release(
    console: Console,
) -> None:
    dep = console.dep
    client = console.client()
    csrf = sign_in(client, console.tokens["crm"])
    form = {"segments": "frequent_buyers", "breakdown": "region", "measures": "count", "csrf": csrf}
    before = len(ledger.charges(dep.store.conn, recipient="crm_team"))
    priced = client.post("/ui/release/cohort_report", data={**form, "action": "dry_run"})
    assert priced.status_code == 200 and "Releases like this left" in priced.text
    assert re.search(r'id="more">about \d+<', priced.text)
    assert len(ledger.charges(dep.store.conn, recipient="crm_team")) == before
    spent = client.post("/ui/release/cohort_report", data={**form, "action": "spend"})
    assert spent.status_code == 303
    release_id = int(spent.headers["location"].rsplit("/", 1)[1])
    charges = ledger.charges(dep.store.conn, recipient="crm_team")
    assert len(charges) == before + 1 and charges[0].release_id == release_id
    again = client.post("/ui/release/cohort_report", data={**form, "action": "spend"})
    assert again.headers["location"] == spent.headers["location"]
    assert len(ledger.charges(dep.store.conn, recipient="crm_team")) == before + 1
    view = client.get(f"/ui/releases/{release_id}")
    assert view.status_code == 200 and '<img src="data:image/svg+xml;base64,' in view.text
    assert "nothing was charged" not in view.text  # the view reads the release, it is not a new one
    csv_text = client.get(f"/ui/releases/{release_id}/csv")
    assert csv_text.headers["content-disposition"].startswith("attachment")
    rows = [r.split(",") for r in csv_text.text.strip().splitlines()]
    assert rows[0][:3] == ["segment", "region", "count"] and rows[0][-1] == "status"
    # Every public cell is there once: shown with a count, or marked suppressed with no count (never 0).
    regions = [r[1] for r in rows[1:]]
    assert len(regions) == len(set(regions)) == len(dep.schema.profile["region"].values or ()) + 1
    for r in rows[1:]:
        assert (r[-1] == "shown" and int(r[2]) >= 1) or (r[-1] == "suppressed" and r[2] == "")


def test_a_release_is_readable_by_its_recipient_only_and_compliance_sees_no_values(console: Console) -> None:
    owner = console.client()
    csrf = sign_in(owner, console.tokens["marketer"])
    form = {"segments": "frequent_buyers", "breakdown": "gender", "measures": "count", "csrf": csrf}
    release_id = owner.post("/ui/release/cohort_report", data={**form, "action": "spend"}).headers["location"]
    release_id = release_id.rsplit("/", 1)[1]
    other = console.client()
    sign_in(other, console.tokens["crm"])
    for path in (f"/ui/releases/{release_id}", f"/ui/releases/{release_id}/csv"):
        assert other.get(path).status_code == 404  # like one that does not exist
    assert f">{release_id}<" not in other.get("/ui/releases").text
    partner = console.client()
    sign_in(partner, console.tokens["partner"])
    assert partner.get(f"/ui/releases/{release_id}").status_code == 404
    compliance = console.client()
    sign_in(compliance, console.tokens["compliance"])
    record = compliance.get(f"/ui/releases/{release_id}")
    assert record.status_code == 200 and "growth_team" in record.text
    assert "interval_95" not in record.text and "data:image" not in record.text
    assert compliance.get(f"/ui/releases/{release_id}/csv").status_code == 403


def test_sessions_end_at_sign_out_on_revocation_when_idle_and_at_expiry(console: Console) -> None:
    dep = console.dep
    admin = console.client()
    admin_csrf = sign_in(admin, console.tokens["admin"])
    key, token = apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="temp_team")

    client = console.client()
    csrf = sign_in(client, token)
    assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    assert client.get("/ui/segments").status_code == 303  # signed out
    assert audit_events(dep)[-1] == "console_signout"

    sign_in(client, token)
    response = admin.post(f"/ui/admin/apikeys/{key.key_id}/revoke", data={"csrf": admin_csrf})
    assert response.status_code == 303
    assert client.get("/ui/segments").status_code == 303  # the key is revoked: so is its session

    _, token = apikeys.create(dep.store.conn, dep.keyset, role="marketer", name="temp_team2")
    sign_in(client, token)
    idle = dep.settings.console_idle_minutes
    past = (datetime.now(UTC) - timedelta(minutes=idle + 1)).isoformat()
    with sqlite3.connect(dep.settings.db_path) as conn:
        conn.execute("UPDATE console_sessions SET last_seen = ?", (past,))
    assert client.get("/ui/segments").status_code == 303  # idle too long

    sign_in(client, token)
    with sqlite3.connect(dep.settings.db_path) as conn:
        conn.execute("UPDATE console_sessions SET expires_at = ?", (datetime.now(UTC).isoformat(),))
    assert client.get("/ui/segments").status_code == 303  # past its absolute expiry
    assert admin.get("/ui/admin").status_code == 303  # every session expired (the update hit all)


def test_the_editor_checks_without_writing_and_names_the_path(console: Console) -> None:
    dep = console.dep
    client = console.client()
    csrf = sign_in(client, console.tokens["marketer"])
    versions = dep.store.conn.execute("SELECT COUNT(*) FROM definitions").fetchone()[0]
    audited = len(audit_events(dep))
    bad = "id: mine\nobjective: performance\nwhere:\n  event:\n    type: purchase\n    count: {gte: x}\n"
    answer = client.post("/ui/segments/validate", data={"text": bad, "csrf": csrf}).json()
    assert answer["ok"] is False and "where.event" in answer["error"] and "mine" in answer["error"]
    good = (
        "id: mine\nobjective: performance\nwhere:\n  event:\n    type: purchase\n    last: 30d\n"
        "    where: {product_category: {not_in_or_unknown: [hearing_aids, cannabis, sexual_health]}}\n"
    )
    answer = client.post("/ui/segments/validate", data={"text": good, "csrf": csrf}).json()
    assert answer == {
        "ok": True,
        "results": [{"kind": "segment", "id": "mine", "version": 1, "status": "created"}],
    }
    assert dep.store.conn.execute("SELECT COUNT(*) FROM definitions").fetchone()[0] == versions
    assert len(audit_events(dep)) == audited
    assert client.post("/ui/segments/validate", data={"text": good}).status_code == 403  # CSRF
    applied = client.post("/ui/segments/edit", data={"text": good, "csrf": csrf})
    assert applied.status_code == 200 and "segment mine: created (v1)" in applied.text
    assert audit_events(dep)[-1] == "definitions_applied"


def test_an_admin_upload_needs_its_header_token_and_never_echoes_identifiers(
    console: Console, tmp_path: Path
) -> None:
    from tests.conftest import PROFILE_HEADER, profile_row, write_csv

    dep = console.dep
    client = console.client()
    csrf = sign_in(client, console.tokens["admin"])
    source = write_csv(tmp_path / "more.csv", PROFILE_HEADER, [profile_row(f"ZZ{i:05d}") for i in range(30)])
    body = source.read_bytes()
    batches = dep.store.conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    refused = client.post("/ui/admin/upload/profiles?filename=more.csv", content=body)
    assert refused.status_code == 403
    assert dep.store.conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == batches
    stored = client.post(
        "/ui/admin/upload/profiles?filename=more.csv", content=body, headers={web.CSRF_HEADER: csrf}
    )
    assert (
        stored.status_code == 200
        and stored.json()["ok"] is True
        and stored.json()["results"][0]["rows"] == 30
    )
    assert "ZZ00001" not in stored.text and "example.com" not in stored.text
    assert dep.store.conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == batches + 1
    bad = client.post(
        "/ui/admin/upload/profiles?filename=x.exe", content=b"1", headers={web.CSRF_HEADER: csrf}
    )
    assert bad.status_code == 422 and bad.json()["ok"] is False


def test_a_new_api_key_is_a_download_never_a_page(console: Console) -> None:
    client = console.client()
    csrf = sign_in(client, console.tokens["admin"])
    response = client.post("/ui/admin/apikeys", data={"role": "marketer", "name": "new_team", "csrf": csrf})
    assert response.status_code == 200 and response.headers["content-disposition"].startswith("attachment")
    assert response.headers["content-type"].startswith("text/plain")
    token = response.text.split()[0]
    assert token.startswith("psk_") and token not in client.get("/ui/admin/apikeys").text
    assert apikeys.authenticate(console.dep.store.conn, console.dep.keyset, token) is not None


def test_console_pages_carry_a_strict_content_security_policy(console: Console) -> None:
    client = console.client()
    page = client.get("/ui/login")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and " style=" not in page.text  # no inline code or style
    assert client.get("/ui/static/console.js").status_code == 200
    # Unknown console pages answer as pages; the API keeps its problem+json.
    missing = client.get("/ui/nowhere")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert client.get("/v1/nowhere").headers["content-type"] == "application/problem+json"
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


def test_compliance_sees_the_policy_diff_marked_and_the_log_verified(console: Console) -> None:
    client = console.client()
    csrf = sign_in(client, console.tokens["compliance"])
    policies = client.get("/ui/policies").text
    assert "stigmatized" in policies and "epsilon_per_release" in policies
    cannabis = console.dep.categories.categories["cannabis"].model_dump()

    looser = yaml.safe_dump({"cannabis": {**cannabis, "min_cohort_size": cannabis["min_cohort_size"] - 1}})
    answer = client.post("/ui/policies", data={"candidate": looser, "csrf": csrf}).text
    assert re.search(r'<li class="looser">cannabis: min_cohort_size .*LOOSER', answer)
    verified = client.get("/ui/audit?verify=true").text
    assert "The log is intact" in verified
    filtered = client.get("/ui/audit?event=console_signin").text
    table = re.findall(r'<table id="audit-entries">(.*?)</table>', filtered, re.S)[0]
    kinds = set(re.findall(r"<tr><td>\d+</td><td>[^<]*</td><td>([a-z_]+)</td>", table))
    assert kinds == {"console_signin"}
    mentioning = client.get("/ui/audit?mentions=crm_team").text
    assert "crm_team" in re.findall(r'<table id="audit-entries">(.*?)</table>', mentioning, re.S)[0]


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted() -> None:
    assert _cell("=HYPERLINK(1)") == "'=HYPERLINK(1)" and _cell("@x") == "'@x" and _cell("-1+1") == "'-1+1"
    assert _cell(-3) == -3 and _cell("north") == "north"


def test_authored_text_is_escaped_wherever_it_is_shown(console: Console) -> None:
    """A hostile marketer writes markup into a definition; the library, the history and the audit
    browser show it as text (and the CSP would refuse an inline script anyway)."""
    client = console.client()
    csrf = sign_in(client, console.tokens["crm"])
    payload = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    text = (
        "id: crm_probe\nobjective: brand\ndescription: " + json.dumps(payload) + "\nwhere:\n"
        "  event:\n    type: purchase\n    last: 30d\n"
        "    where: {product_category: {not_in_or_unknown: [hearing_aids, cannabis, sexual_health]}}\n"
    )
    assert client.post("/ui/segments/edit", data={"text": text, "csrf": csrf}).status_code == 200
    for path in ("/ui/segments", "/ui/segments/crm_probe/history"):
        page = client.get(path).text
        assert "crm_probe" in page and "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;img src=x" in client.get("/ui/segments/crm_probe/history").text


def test_the_audit_page_says_when_the_log_was_tampered_with(dep: Deployment) -> None:
    _, token = apikeys.create(dep.store.conn, dep.keyset, role="compliance", name="dpo")
    client = TestClient(create_app(dep), base_url="http://127.0.0.1", follow_redirects=False)
    sign_in(client, token)
    assert "The log is intact" in client.get("/ui/audit?verify=true").text
    with sqlite3.connect(dep.settings.db_path) as conn:  # an insider with the database edits an entry
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute(
            'UPDATE audit SET details = \'{"key": 99, "role": "admin"}\' WHERE event = \'apikey_created\''
        )
    page = client.get("/ui/audit?verify=true").text
    assert "does not verify" in page and "The log is intact" not in page


def test_release_forms_are_made_from_request_models_and_round_trip() -> None:
    from starlette.datastructures import FormData

    from privseg import release
    from privseg.console import forms
    from privseg.errors import InvalidInput

    widgets = {f.name: f.widget for f in forms.fields(release.CohortReportRequest, ["a", "b"], ["age_band"])}
    assert widgets == {
        "segments": "multiselect",
        "breakdown": "checkboxes",
        "measures": "checkboxes",
        "spend_event": "text",
        "spend_where": "json",
        "spend_window_days": "number",
    }
    trend = {f.name: f for f in forms.fields(release.TrendRequest, ["a"], [])}
    assert trend["period"].widget == "select" and trend["period"].choices == [
        "day",
        "week",
        "month",
        "quarter",
    ]
    movement = {f.name: f for f in forms.fields(release.MovementRequest, ["a", "b"], [])}
    assert movement["segments"].widget == "ordered" and movement["segments"].slots == 6
    posted = FormData(
        [("segments", "b"), ("segments", "a"), ("breakdown", "age_band"), ("spend_where", '{"x": 1}')]
    )
    req = forms.parse(release.CohortReportRequest, posted, dry_run=True)
    assert req.segments == ["b", "a"] and req.dry_run and req.spend_where == {"x": 1}
    again = forms.parse(release.CohortReportRequest, FormData(forms.hidden(req)), dry_run=False)
    assert again.model_dump(exclude={"dry_run"}) == req.model_dump(exclude={"dry_run"})
    with pytest.raises(InvalidInput, match="spend_where: not valid JSON"):
        forms.parse(
            release.CohortReportRequest, FormData([("segments", "a"), ("spend_where", "{")]), dry_run=True
        )
    with pytest.raises(InvalidInput, match="segments"):
        forms.parse(release.CohortReportRequest, FormData([]), dry_run=True)


def test_a_marketer_releases_personas_from_a_json_form(console: Console) -> None:
    client = console.client()
    csrf = sign_in(client, console.tokens["marketer"])
    general = {"product_category": {"not_in_or_unknown": ["hearing_aids", "cannabis", "sexual_health"]}}
    features = [
        {
            "name": "orders",
            "event": {"type": "purchase", "where": general},
            "measure": "count",
            "min": 0,
            "max": 20,
        }
    ]
    form = {
        "segment": "lapsed_customers",
        "features": json.dumps(features),
        "k": "2",
        "iterations": "2",
        "csrf": csrf,
    }
    priced = client.post("/ui/release/personas", data={**form, "action": "dry_run"})
    assert priced.status_code == 200 and "Releases like this left" in priced.text
    spent = client.post("/ui/release/personas", data={**form, "action": "spend"})
    assert spent.status_code == 303
    view = client.get(spent.headers["location"]).text
    assert '<th scope="col">orders</th>' in view and ("shown" in view or "suppressed" in view)
    broken = client.post("/ui/release/personas", data={**form, "features": "[{", "action": "dry_run"})
    assert broken.status_code == 422 and "features: not valid JSON" in broken.text


def test_the_persona_chart_places_released_centers_and_leaves_out_suppressed_ones() -> None:
    from privseg.console import charts

    released = {
        "feature_specs": [{"name": "orders", "min": 0, "max": 20}, {"name": "spend", "min": 0, "max": 2000}],
        "personas": [
            {"persona": 0, "size": 120, "center": {"orders": 5.0, "spend": 500.0}},
            {"persona": 1, "size": None, "center": None},
            {"persona": 2, "size": 80, "center": {"orders": 15.0, "spend": 100.0}},
        ],
    }
    figure = charts.personas(released)
    assert figure is not None and figure.src.startswith("data:image/svg+xml;base64,")
    assert "2 released persona centers" in figure.alt
    import base64

    svg = base64.b64decode(figure.src.split(",", 1)[1]).decode()
    assert "persona 0 (120 people)" in svg and "persona 2 (80 people)" in svg and "persona 1" not in svg
    assert charts.personas({**released, "personas": [released["personas"][1]]}) is None
