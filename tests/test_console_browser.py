"""The web console in a real headless Chromium (Debian's package, driven by Playwright) against a
real `privseg serve` on a free loopback port: one server and one browser for the module.

Every page a test visits is screenshotted into test-artifacts/console/ (git-ignored). No page may log
a console error or throw, except the expected "403" of a page a role is refused.
"""

from __future__ import annotations

import csv
import re
import shutil
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from privseg import apikeys, ledger
from privseg.demo_data import generate
from privseg.deployment import Deployment
from privseg.keyset import create_keyset
from tests.conftest import (
    AS_OF,
    PROFILE_HEADER,
    REPO,
    make_settings,
    prepare,
    profile_row,
    running_server,
    write_csv,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "console"
# As the machine's notes say: without these, Chromium phones home at start and on this closed network
# every attempt is refused (noise, and minutes lost).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Site:
    base: str
    tokens: dict[str, str]
    dep: Deployment
    browser: Browser


@dataclass
class Tab:
    """A browser tab of one user, with every console error and uncaught exception it saw."""

    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)
    allowed: tuple[str, ...] = ()  # substrings of errors this test expects (a refused page's 403)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run does)")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    ARTIFACTS.mkdir(parents=True)
    root = tmp_path_factory.mktemp("browser")
    settings = make_settings(root)
    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    files = generate(root / "demo", customers=12_000, seed=5, as_of=AS_OF)
    # Two snapshots a week apart, so that movement between them can be released.
    prepare(dep, files.customers, files.events, snapshots=(AS_OF - timedelta(days=7), AS_OF))
    tokens = {}
    for role, name, partner in (
        ("marketer", "growth_team", None),
        ("compliance", "dpo", None),
        ("partner", "adnet", "adnet_alpha"),
        ("admin", "ops", None),
    ):
        tokens[role] = apikeys.create(dep.store.conn, dep.keyset, role=role, name=name, partner=partner)[1]
    with running_server(settings) as (base, _proc), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield Site(base, tokens, dep, browser)
        finally:
            browser.close()
            dep.close()


def open_tab(site: Site) -> Tab:
    context = site.browser.new_context(
        accept_downloads=True, base_url=site.base, viewport={"width": 1200, "height": 900}
    )
    page = context.new_page()
    tab = Tab(page, context)
    page.on("console", lambda m: tab.errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: tab.errors.append(f"exception: {exc}"))
    return tab


@pytest.fixture
def tabs(site: Site) -> Iterator[list[Tab]]:
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        tab.context.close()
    assert [e for t in opened for e in t.unexpected_errors()] == []


def signed_in(site: Site, tabs: list[Tab], role: str) -> Tab:
    tab = open_tab(site)
    tabs.append(tab)
    page = tab.page
    page.goto("/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.fill("#api_key", site.tokens[role])
    page.click("button[type=submit]")
    expect(page.locator(".who")).to_contain_text(role)
    return tab


def remaining(tab: Tab, category: str, shot: str | None = None) -> float:
    """The budget left, read from the budget page in a second tab (the first keeps its form)."""
    page = tab.context.new_page()
    page.on("console", lambda m: tab.errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    try:
        page.goto("/ui/budget")
        expect(page.locator("figure img")).to_be_visible()
        if shot:
            page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
        row = page.locator("tbody tr", has=page.locator(f"td:text-is('{category}')"))
        return float(row.locator("td").nth(1).inner_text())
    finally:
        page.close()


def test_a_marketer_goes_from_sign_in_to_a_charted_downloaded_report(site: Site, tabs: list[Tab]) -> None:
    tab = open_tab(site)
    tabs.append(tab)
    page = tab.page
    page.goto("/ui/")
    tab.shot("01-sign-in")
    page.fill("#api_key", site.tokens["marketer"])
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/segments$"))
    expect(page.locator("table")).to_contain_text("frequent_buyers")
    tab.shot("02-marketer-segment-library")
    page.click("a:text-is('frequent_buyers')")
    expect(page.locator("h2")).to_contain_text("Version history")
    tab.shot("03-marketer-segment-history")

    # The editor checks as the author types, naming the path of the problem.
    page.goto("/ui/segments/edit")
    page.fill("#text", "id: draft\nobjective: brand\nwhere:\n  event: {type: purchase, count: {gte: many}}\n")
    expect(page.locator("#check")).to_contain_text("where.event")
    tab.shot("04-marketer-editor-live-error")

    before = remaining(tab, "general", "05-marketer-budget-before")

    page.goto("/ui/release/cohort_report")
    page.select_option("#f-segments", ["cart_abandoners_7d", "lapsed_customers"])
    page.check("input[name=breakdown][value=age_band]")
    page.click("button[value=dry_run]")
    expect(page.locator("#more")).to_contain_text("about")
    expect(page.locator("#would-charge")).to_contain_text("epsilon 0.5")
    tab.shot("06-marketer-report-dry-run")
    assert remaining(tab, "general") == before  # pricing spent nothing
    page.click("button.spend")
    expect(page.locator("figure img")).to_be_visible()
    expect(page.locator("figcaption")).to_contain_text("People per age_band")
    rows = page.locator("#release-table tbody tr")
    assert rows.count() == 2 * 8  # two segments x (7 age bands + unknown): shown or marked suppressed
    tab.shot("07-marketer-report-chart")
    with page.expect_download() as download:
        page.click("#csv")
    saved = ARTIFACTS / "report.csv"
    download.value.save_as(saved)
    table = list(csv.reader(saved.read_text().splitlines()))
    assert table[0][:3] == ["segment", "age_band", "count"] and len(table) == 1 + 16
    shown = [r for r in table[1:] if r[-1] == "shown"]
    assert shown and all(int(r[2]) >= 50 for r in shown)  # the general minimum cohort size
    assert all(r[2] == "" for r in table[1:] if r[-1] == "suppressed")
    assert remaining(tab, "general", "08-marketer-budget-after") == pytest.approx(before - 0.5)

    page.goto("/ui/release/ab_lift")
    page.select_option("#f-treatment", "spring_test_treatment")
    page.select_option("#f-control", "control_group_10pct")
    page.select_option("#f-conversion", "coupon_responders")
    page.click("button[value=dry_run]")
    page.click("button.spend")
    expect(page.locator("h1")).to_contain_text("ab lift")
    expect(page.locator("#verdict")).to_contain_text("Lift")
    expect(page.locator("#release-table")).to_contain_text("treatment")
    tab.shot("09-marketer-ab-lift")

    page.goto("/ui/release/segment_movement")
    page.select_option("#f-segments-1", "engaged_not_ready")  # states in order: the first one wins
    page.select_option("#f-segments-2", "cart_abandoners_7d")
    page.fill("#f-from_snapshot", "1")
    page.click("button[value=dry_run]")
    page.click("button.spend")
    expect(page.locator("figcaption")).to_contain_text("Movement between snapshots")
    expect(page.locator("#release-table tbody tr").first).to_contain_text(
        "engaged_not_ready -> cart_abandoners_7d"
    )
    tab.shot("10-marketer-movement")
    page.goto("/ui/release/audience_insight")
    page.select_option("#f-segment", "lapsed_customers")
    page.check("input[name=attributes][value=age_band]")
    page.check("input[name=attributes][value=region]")
    page.click("button[value=dry_run]")
    page.click("button.spend")
    expect(page.locator("figcaption")).to_contain_text("Affinity of lapsed_customers")
    expect(page.locator("#release-table thead")).to_contain_text("affinity")
    tab.shot("11-marketer-audience-insight")
    page.goto("/ui/release/trend")
    page.select_option("#f-segment", "lapsed_customers")
    page.fill(
        "#f-where",
        '{"product_category": {"not_in_or_unknown": ["hearing_aids", "cannabis", "sexual_health"]}}',
    )
    page.select_option("#f-period", "month") if page.locator("select#f-period").count() else page.fill(
        "#f-period", "month"
    )
    page.fill("#f-periods", "6")
    page.click("button[value=dry_run]")
    page.click("button.spend")
    expect(page.locator("figcaption")).to_contain_text("summed increments")
    expect(page.locator("#release-table tbody tr")).to_have_count(6)
    tab.shot("12-marketer-trend")
    page.goto("/ui/releases")
    expect(page.locator("tbody tr")).to_have_count(5)
    tab.shot("13-marketer-my-releases")


def test_compliance_answers_who_spent_what_on_cannabis_and_whether_the_log_is_intact(
    site: Site, tabs: list[Tab]
) -> None:
    marketer = signed_in(site, tabs, "marketer").page
    marketer.goto("/ui/release/cohort_report")
    marketer.select_option("#f-segments", ["cannabis_curious"])
    marketer.click("button[value=dry_run]")
    expect(marketer.locator("dd").first).to_contain_text("cannabis")
    marketer.click("button.spend")
    release_id = int(marketer.url.rsplit("/", 1)[1])

    tab = signed_in(site, tabs, "compliance")
    page = tab.page
    expect(page).to_have_url(re.compile(r"/ui/policies$"))
    expect(page.locator("#policy-cannabis .stigmatized")).to_be_visible()
    tab.shot("20-compliance-policies")

    page.goto("/ui/ledger")
    page.select_option("#category", "cannabis")
    page.click("button:text-is('Show')")
    charge = page.locator("#charges tbody tr", has=page.locator(f"a:text-is('{release_id}')"))
    expect(charge).to_contain_text("growth_team")
    expect(charge).to_contain_text("0.25")
    expect(page.locator("figure img")).to_have_count(3)  # caps, per recipient, over time
    expect(page.locator("figcaption").nth(2)).to_contain_text("growth_team: 0.25 in all")
    tab.shot("21-compliance-ledger-cannabis")

    page.goto("/ui/audit")
    page.click("button[name=verify]")
    expect(page.locator("#verification")).to_contain_text("The log is intact")
    page.select_option("#event", "release")
    page.click("button:text-is('Filter')")
    expect(page.locator("#audit-entries")).to_contain_text("cannabis_curious")
    tab.shot("22-compliance-audit-verified")

    page.goto("/ui/releases")
    expect(page.locator("tbody")).to_contain_text("cannabis_curious")
    tab.shot("23-compliance-releases")
    page.goto(f"/ui/releases/{release_id}")
    expect(page.locator("dl")).to_contain_text("growth_team")
    assert page.locator("figure").count() == 0  # metadata only, never the values
    tab.shot("24-compliance-release-record")

    page.goto("/ui/policies")
    cannabis = site.dep.categories.categories["cannabis"].model_dump()
    looser = {**cannabis, "min_cohort_size": 20}  # looser than cannabis's 100, and than general's 50
    page.fill("#candidate-text", yaml.safe_dump({"cannabis": looser}))
    page.click("button:text-is('Check and compare')")
    change = page.locator("#changes li.looser")
    expect(change).to_contain_text("min_cohort_size 100 -> 20")
    expect(page.locator("#candidate-findings")).to_contain_text("looser than general")
    assert change.evaluate("e => getComputedStyle(e).color") == "rgb(183, 28, 28)"  # in red
    tab.shot("25-compliance-policy-diff")


def test_a_partner_collects_audiences_and_cannot_open_other_pages(site: Site, tabs: list[Tab]) -> None:
    tab = signed_in(site, tabs, "partner")
    page = tab.page
    expect(page).to_have_url(re.compile(r"/ui/audiences$"))
    grants = page.locator("tbody tr")
    assert grants.count() >= 1
    tab.shot("30-partner-grants")
    grants.first.locator("a", has_text="Request audience").click()
    page.click("button[value=dry_run]")
    page.click("button.spend")
    expect(page.locator("figure img")).to_be_visible()
    expect(page.locator("#release-table thead")).to_contain_text("share")
    tab.shot("31-partner-audience")
    page.goto("/ui/audiences")
    grants.first.locator("a", has_text="Insight for lookalikes").click()
    page.check("input[name=attributes][value=age_band]")
    page.click("button[value=dry_run]")
    page.click("button.spend")
    expect(page.locator("figcaption")).to_contain_text("Affinity of")
    tab.shot("32-partner-insight")
    page.goto("/ui/releases")
    expect(page.locator("tbody tr")).to_have_count(2)
    tab.shot("33-partner-my-audiences")
    tab.allowed = ("status of 403",)  # the refused pages below
    for path in ("/ui/segments", "/ui/ledger", "/ui/audit", "/ui/admin", "/ui/release/cohort_report"):
        response = page.goto(path)
        assert response is not None and response.status == 403, path
        expect(page.locator(".error")).to_contain_text("signed in as partner")
    tab.shot("34-partner-refused-page")


def test_an_admin_uploads_with_progress_and_manages_keys(site: Site, tabs: list[Tab], tmp_path: Path) -> None:
    tab = signed_in(site, tabs, "admin")
    page = tab.page
    expect(page.locator("#stale")).to_be_visible()
    tab.shot("40-admin-store")
    source = write_csv(
        tmp_path / "new_customers.csv", PROFILE_HEADER, [profile_row(f"NEW{i:05d}") for i in range(200)]
    )
    page.goto("/ui/admin/upload")
    page.set_input_files("#file", str(source))
    page.click("button:text-is('Upload')")
    expect(page.locator("#upload-result")).to_contain_text("stored, 200 rows")
    assert page.locator("#progress").evaluate("e => e.value") == 100
    assert "NEW00001" not in page.content()
    tab.shot("41-admin-upload-done")
    page.goto("/ui/admin/apikeys")
    page.fill("#name", "brand_team")
    with page.expect_download() as download:
        page.click("button:text-is('Create and download')")
    token = Path(download.value.path()).read_text().split()[0]
    assert token.startswith("psk_") and token not in page.content()
    page.goto("/ui/admin/apikeys")
    expect(page.locator("#keys")).to_contain_text("brand_team")
    tab.shot("42-admin-api-keys")


class _Attacker(BaseHTTPRequestHandler):
    """Another site: its page posts a spend form to the console as soon as it loads."""

    target = ""

    def do_GET(self) -> None:
        body = (
            f'<html><body><form id="f" method="post" action="{self.target}/ui/release/cohort_report">'
            '<input name="segments" value="high_spenders"><input name="action" value="spend">'
            '<input name="csrf" value="guess"></form>'
            "<script>document.getElementById('f').submit()</script></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def test_a_cross_site_form_spends_nothing(site: Site, tabs: list[Tab]) -> None:
    tab = signed_in(site, tabs, "marketer")
    tab.allowed = ("status of 403",)
    _Attacker.target = site.base
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Another origin (another port): the browser treats it as another site's page.
    attacker = ThreadingHTTPServer(("127.0.0.1", port), _Attacker)
    thread = threading.Thread(target=attacker.serve_forever, daemon=True)
    thread.start()
    reader = Deployment(site.dep.settings)
    try:
        before = len(ledger.charges(reader.store.conn))
        tab.page.goto(f"http://127.0.0.1:{port}/")
        tab.page.wait_for_load_state("networkidle")
        # Refused: the SameSite=Strict cookie stays home (sign-in asked), and the token is wrong anyway.
        assert "/ui/" in tab.page.url
        expect(tab.page.locator("h1")).to_have_text(re.compile("Sign in|Not permitted"))
        tab.shot("50-cross-site-form-refused")
        assert len(ledger.charges(reader.store.conn)) == before
    finally:
        attacker.shutdown()
        attacker.server_close()
        reader.close()


def test_an_expired_session_is_refused(site: Site, tabs: list[Tab]) -> None:
    tab = signed_in(site, tabs, "compliance")
    with sqlite3.connect(site.dep.settings.db_path) as conn:
        conn.execute("UPDATE console_sessions SET expires_at = ?", (datetime.now(UTC).isoformat(),))
    tab.page.goto("/ui/ledger")
    expect(tab.page).to_have_url(re.compile(r"/ui/login$"))
    tab.shot("60-expired-session-sign-in")
