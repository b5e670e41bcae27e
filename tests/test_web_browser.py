"""The audit console in a real browser: Debian's headless Chromium driven by Selenium.

One browser for the module. Most tests read one scenario, made once by a real relay process
against the hostile API stand-in (``tests/hostile_api.py``): a few hundred deliveries, dead
letters under three error codes, an update delivered at its fourth request, and a row whose
action id and API message are markup. The redrive test has a database, a sandbox and a relay of
its own. Screenshots go to pytest's tmp dir, and to ``docs/`` with OUTBOX_RELAY_DOCS_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from relay.dev.sandbox.server import Sandbox, SandboxConfig
from tests.conftest import TEMPLATE, Server
from tests.hostile_api import Behaviour, HostileApi
from tests.relaykit import (
    login_roles,
    relay_env,
    sample_updates,
    seed_rows,
    start_relay_process,
    states,
    url_as,
    wait_until,
    web_console,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WIDTH, HEIGHT = 1280, 900
DOCS = Path(__file__).resolve().parents[1] / "docs"
COOKIE = "relay_console"

HOSTILE_ID = "<img/src=x/onerror=alert(1)>"
HOSTILE_MESSAGE = "<script>alert(2)</script>"
FOUR = "four-attempts-0001"  # answered 503 three times, then accepted
DELIVERED = 300
PAUSED = 12  # updates waiting for the paused target "eu"


def api_error(status: int, code: str, message: str, times: int | None = None) -> Behaviour:
    body = f'{{"code":"{code}","message":"{message}","errors":[]}}'.encode()
    return Behaviour(status, body, (("Content-Type", "application/json"),), times=times)


def web_env(database_url: str, login: str) -> dict[str, str]:
    """The console's variables: it connects as ``login`` (RELAY_WEB_DATABASE_URL)."""
    return {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_WEB_DATABASE_URL": url_as(database_url, login),
        "RELAY_LOG_LEVEL": "WARNING",
    }


def count(database_url: str, sql: str, *params: Any) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(sql, params).fetchone()
        return int(row[0]) if row else 0


def update_id(database_url: str, action_id: str) -> int:
    return count(database_url, "select id from outbox.action_status_updates where action_id = %s", action_id)


def screenshot(browser: WebDriver, tmp_dir: Path, name: str) -> None:
    """Save the window as ``name`` in the test's tmp dir, and in docs/ when asked to."""
    path = tmp_dir / name
    page = browser.execute_script("return [document.documentElement.scrollHeight, outerHeight - innerHeight]")
    browser.set_window_size(WIDTH, min(page[0] + page[1], 2 * HEIGHT))  # the whole page, 1280 wide
    try:
        assert browser.save_screenshot(str(path)), f"no screenshot saved as {path}"
    finally:
        browser.set_window_size(WIDTH, HEIGHT)
    assert path.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("OUTBOX_RELAY_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)


def no_dialog(browser: WebDriver) -> None:
    """No alert is open: none once the page has loaded, nor after waiting for one a while."""
    WebDriverWait(browser, 10).until(lambda b: b.execute_script("return document.readyState") == "complete")
    with pytest.raises(TimeoutException):
        WebDriverWait(browser, 1).until(expected_conditions.alert_is_present())
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018


def no_markup_from_data(browser: WebDriver) -> None:
    """The page has no script (the console serves none) and no image (these pages show none)."""
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.TAG_NAME, "img") == []


def find_by_search_box(browser: WebDriver, base: str, text: str) -> None:
    browser.get(base)
    browser.find_element(By.ID, "q").send_keys(text)
    browser.find_element(By.CSS_SELECTOR, "header form.search button[type=submit]").click()
    WebDriverWait(browser, 30).until(
        lambda b: "/updates/" in b.current_url and b.find_elements(By.ID, "action-id")
    )


def submit(browser: WebDriver, button_id: str, shows: str) -> WebElement:
    """Click a form's button and wait for the page it leads to, which has an element `shows`.

    A click returns once the browser has sent the form, not once the answer is shown; the
    element to look for exists only on the next page."""
    browser.find_element(By.ID, button_id).click()
    try:
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, shows))
    except TimeoutException:
        page = browser.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"no #{shows} after clicking #{button_id}; {browser.current_url} shows: {page[:2000]}")
    return browser.find_element(By.ID, shows)


def form_post(base: str, path: str, cookie: str, fields: dict[str, Any]) -> httpx.Response:
    """A POST as a script would forge it: the browser's own cookie, the fields given."""
    return httpx.post(
        base.rstrip("/") + path,
        content=urlencode(fields, doseq=True),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        cookies={COOKIE: cookie},
        timeout=10,
    )


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    for program in (CHROMIUM, CHROMEDRIVER):
        if not os.access(program, os.X_OK):
            pytest.skip(f"{program} is absent (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.unhandled_prompt_behavior = "ignore"  # an alert stays open for the test to see
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def module_database(pg_server: Server) -> Iterator[str]:
    """A migrated database for the whole module (the scenario is made once)."""
    name = f"w_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.admin_url, autocommit=True) as admin:
        admin.execute(f"create database {name} template {TEMPLATE}")
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.admin_url, autocommit=True) as admin:
            admin.execute(f"drop database if exists {name} with (force)")


@dataclass
class Scenario:
    database_url: str
    console: str  # the operator's console (a login in outbox_operator)
    api: HostileApi
    dead: int


@pytest.fixture(scope="module")
def scenario(
    module_database: str, logins: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """A live relay (``relay-a``) that delivered a few hundred updates, dead-lettered some under
    three codes, delivered ``FOUR`` at its fourth request, and holds a second target (``eu``)
    paused, its updates waiting; the operator's console on that database."""
    logs = tmp_path_factory.mktemp("scenario")
    behaviours = {
        "four-": api_error(503, "UNAVAILABLE", "the service is busy, try again", times=3),
        "late-": api_error(400, "ORDER_IN_WRONG_STATE", "the order is already shipped"),
        "<img": api_error(400, "INVALID_INPUT", HOSTILE_MESSAGE),
        "eu-": api_error(401, "UNAUTHORIZED", "the token was revoked"),
    }
    updates = sample_updates(DELIVERED - 1, prefix="ord")
    updates += [(FOUR, "SUCCESS", [])]
    dead = [(f"unknown-{i:04d}", "SUCCESS", []) for i in range(6)]
    dead += [(f"late-{i:04d}", "FAILED", [{"code": "OTHER", "message": "out of stock"}]) for i in range(4)]
    dead += [(HOSTILE_ID, "SUCCESS", [])]
    waiting = [(f"eu-{i:04d}", "SUCCESS", []) for i in range(PAUSED)]
    with HostileApi(behaviours) as api:
        config = logs / "relay.toml"  # a second target, whose token the API refuses: paused
        config.write_text(f'[targets.eu]\nbase_url = "{api.url}"\ntoken = "revoked-token"\n')
        env = relay_env(module_database, api.url, RELAY_ID="relay-a", RELAY_CONFIG=str(config))
        relay = start_relay_process(env, logs / "relay.log")
        try:
            seed_rows(module_database, updates + dead)
            seed_rows(module_database, waiting, target="eu")

            def settled() -> bool:
                now = states(module_database)
                finished = now.get("delivered") == DELIVERED and now.get("dead") == len(dead)
                return finished and now.get("pending", 0) + now.get("in_flight", 0) == PAUSED

            assert wait_until(settled, 60), (
                f"{states(module_database)} {(logs / 'relay.log').read_text()[-2000:]}"
            )
            with web_console(
                web_env(module_database, logins["outbox_operator"]), logs / "web.log"
            ) as console:
                assert wait_until(lambda: "paused" in httpx.get(console, timeout=10).text, 30)
                yield Scenario(module_database, console, api, len(dead))
        finally:
            relay.terminate()
            relay.wait(15)


@pytest.fixture(scope="module")
def logins(pg_server: Server) -> Iterator[dict[str, str]]:
    """A login role in outbox_operator only and one in outbox_auditor only, as deployed."""
    tag = uuid.uuid4().hex[:6]
    names = {
        group: f"web_{group.removeprefix('outbox_')}_{tag}" for group in ("outbox_operator", "outbox_auditor")
    }
    with login_roles(pg_server.admin_url, {login: group for group, login in names.items()}):
        yield names


# -- the auditor's and the operator's checks ------------------------------------------------------


def test_an_action_found_by_id_shows_its_four_requests(
    browser: WebDriver, scenario: Scenario, tmp_path: Path
) -> None:
    assert scenario.api.requests[FOUR] == 4
    find_by_search_box(browser, scenario.console, FOUR)
    assert browser.current_url.endswith(f"/updates/{update_id(scenario.database_url, FOUR)}")
    assert browser.find_element(By.ID, "action-id").text == FOUR
    assert browser.find_element(By.ID, "state").text == "delivered"
    attempts = browser.find_elements(By.CSS_SELECTOR, "#timeline li.attempt")
    assert [a.find_element(By.CSS_SELECTOR, ".pill").text for a in attempts] == ["retry"] * 3 + ["delivered"]
    heads = [a.find_element(By.CSS_SELECTOR, ".head").text for a in attempts]
    for n, head in enumerate(heads, start=1):
        assert f"request {n}" in head
        assert ("HTTP 204" if n == 4 else "HTTP 503") in head
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#timeline li.attempt .msg")] == [
        "the service is busy, try again"
    ] * 3
    assert browser.find_element(By.CSS_SELECTOR, "#timeline li.delivered").text.endswith("delivered")
    screenshot(browser, tmp_path, "console-timeline.png")


def test_markup_in_an_action_id_and_an_api_message_is_shown_as_text(
    browser: WebDriver, scenario: Scenario
) -> None:
    find_by_search_box(browser, scenario.console, HOSTILE_ID)
    no_dialog(browser)
    assert browser.current_url.endswith(f"/updates/{update_id(scenario.database_url, HOSTILE_ID)}")
    assert browser.find_element(By.ID, "action-id").text == HOSTILE_ID
    assert browser.find_element(By.CSS_SELECTOR, "#timeline li.attempt .msg").text == HOSTILE_MESSAGE
    last_error = browser.find_element(By.XPATH, "//dt[.='last error']/following-sibling::dd[1]")
    assert last_error.text == f"INVALID_INPUT HTTP 400 INVALID_INPUT: {HOSTILE_MESSAGE}"
    no_markup_from_data(browser)
    # the same row in a list and in the search's own page, also as text only
    browser.get(scenario.console + "updates?" + urlencode({"state": "dead", "code": "INVALID_INPUT"}))
    no_dialog(browser)
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#rows td.id a")] == [HOSTILE_ID]
    no_markup_from_data(browser)
    browser.get(scenario.console + "find?" + urlencode({"q": "<img"}))
    no_dialog(browser)
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#rows td.id a")] == [HOSTILE_ID]
    no_markup_from_data(browser)


def test_the_overview(browser: WebDriver, scenario: Scenario, tmp_path: Path) -> None:
    browser.get(scenario.console)
    assert browser.find_element(By.ID, "total-delivered").text == str(DELIVERED)
    assert browser.find_element(By.ID, "total-dead").text == str(scenario.dead)
    assert "relay-a" in browser.find_element(By.ID, "relays").text
    targets = {
        row.find_element(By.TAG_NAME, "a").text: row.find_elements(By.TAG_NAME, "td")[1].text
        for row in browser.find_elements(By.CSS_SELECTOR, "#targets tbody tr")
    }
    assert targets["default"] == "serving"
    assert targets["eu"].startswith("paused HTTP 401 UNAUTHORIZED: the token was revoked")
    chart = browser.find_element(By.CSS_SELECTOR, "img.chart")
    assert browser.execute_script("return arguments[0].naturalWidth", chart) > 0  # the SVG loaded
    screenshot(browser, tmp_path, "console-overview.png")
    browser.get(scenario.console + "dead")
    codes = {
        row.find_elements(By.TAG_NAME, "td")[1].text
        for row in browser.find_elements(By.CSS_SELECTOR, "#groups tbody tr")
    }
    assert codes == {"NOT_FOUND", "ORDER_IN_WRONG_STATE", "INVALID_INPUT"}


def redrive_controls(browser: WebDriver, base: str, dead_id: int) -> dict[str, int]:
    """How many redrive controls the dead letters' pages show: ticks and buttons."""
    found: dict[str, int] = {}
    browser.get(base + "updates?state=dead")
    found["checkboxes"] = len(browser.find_elements(By.CSS_SELECTOR, "input[type=checkbox]"))
    found["forms"] = len(browser.find_elements(By.CSS_SELECTOR, "form[action^='/redrive']"))
    buttons = browser.find_elements(By.TAG_NAME, "button")
    found["buttons"] = sum("Redrive" in b.text for b in buttons)
    for page in ("dead", f"updates/{dead_id}"):
        browser.get(base + page)
        found["forms"] += len(browser.find_elements(By.CSS_SELECTOR, "form[action^='/redrive']"))
        found["buttons"] += sum("Redrive" in b.text for b in browser.find_elements(By.TAG_NAME, "button"))
    return found


def test_the_auditor_sees_no_redrive_control_and_a_forged_one_is_refused(
    browser: WebDriver, scenario: Scenario, logins: dict[str, str], tmp_path: Path
) -> None:
    dead_id = update_id(scenario.database_url, "late-0000")
    operator = redrive_controls(browser, scenario.console, dead_id)
    assert operator == {"checkboxes": scenario.dead, "forms": 1 + 3 + 1, "buttons": 1 + 3 + 1}
    with web_console(web_env(scenario.database_url, logins["outbox_auditor"]), tmp_path / "web.log") as base:
        assert redrive_controls(browser, base, dead_id) == {"checkboxes": 0, "forms": 0, "buttons": 0}
        assert "read only" in browser.find_element(By.CSS_SELECTOR, "header .role").text
        browser.get(base + "login")
        csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")
        cookie = browser.get_cookie(COOKIE)
        assert cookie is not None and csrf
        fields = {"csrf": csrf, "scope": "selected", "id": [dead_id], "reason": "forged"}
        preview = form_post(base, "/redrive/preview", cookie["value"], fields)
        assert preview.status_code == 403, preview.text
        assert "may not re-queue" in preview.text
        redrive = form_post(base, "/redrive", cookie["value"], fields)
        assert redrive.status_code == 403, redrive.text
        group = form_post(
            base, "/redrive", cookie["value"], {**fields, "scope": "filter", "target": "default"}
        )
        assert group.status_code == 403, group.text
    assert states(scenario.database_url)["dead"] == scenario.dead
    assert count(scenario.database_url, "select count(*) from outbox.requeues") == 0


def test_a_post_without_the_csrf_token_is_refused(browser: WebDriver, scenario: Scenario) -> None:
    dead_id = update_id(scenario.database_url, "late-0001")
    browser.get(scenario.console + f"updates/{dead_id}")
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")
    cookie = browser.get_cookie(COOKIE)
    assert cookie is not None and csrf
    fields = {"scope": "selected", "id": [dead_id], "reason": "no token"}
    # the same cookie with the page's token is accepted (a dry run: nothing changes) ...
    dry_run = form_post(scenario.console, "/redrive/preview", cookie["value"], {**fields, "csrf": csrf})
    assert dry_run.status_code == 200, dry_run.text
    # ... without the token, or with a wrong one, refused
    for bad in ({}, {"csrf": ""}, {"csrf": "0" * len(csrf)}):
        for path in ("/redrive/preview", "/redrive"):
            answer = form_post(scenario.console, path, cookie["value"], {**fields, **bad})
            assert answer.status_code == 403, (path, bad, answer.text)
            assert "this form is stale or did not come from the console" in answer.text
    assert states(scenario.database_url)["dead"] == scenario.dead
    assert count(scenario.database_url, "select count(*) from outbox.requeues") == 0


def test_ten_dead_letters_redriven_with_a_reason_are_delivered_by_a_running_relay(
    browser: WebDriver, database_url: str, logins: dict[str, str], tmp_path: Path
) -> None:
    chosen = [f"redrive-{i:02d}" for i in range(10)]
    others = [f"keep-{i:02d}" for i in range(5)]
    reason = "the order service was fixed (INC-42)"
    operator = logins["outbox_operator"]
    with Sandbox(SandboxConfig()) as sandbox:
        sandbox.force_status(400)  # INVALID_INPUT for everything: all dead at their first request
        relay = start_relay_process(relay_env(database_url, sandbox.url), tmp_path / "relay.log")
        try:
            seed_rows(database_url, [(a, "SUCCESS", []) for a in chosen + others])
            assert wait_until(lambda: states(database_url) == {"dead": 15}, 30), states(database_url)
            sandbox.force_status(None)  # the API accepts them from now on
            seed_rows(database_url, [(f"unknown-{i:02d}", "SUCCESS", []) for i in range(3)])
            assert wait_until(lambda: states(database_url) == {"dead": 18}, 30), states(database_url)
            with psycopg.connect(database_url) as conn:
                ids = {
                    a: i for i, a in conn.execute("select id, action_id from outbox.action_status_updates")
                }
                before = conn.execute(
                    "select * from outbox.action_status_updates where not (action_id = any(%s)) order by id",
                    (chosen,),
                ).fetchall()
            puts_before = dict(sandbox.puts)
            with web_console(web_env(database_url, operator), tmp_path / "web.log") as base:
                browser.get(base + "updates?state=dead")
                for action_id in chosen:
                    browser.find_element(
                        By.CSS_SELECTOR, f"input[type=checkbox][value='{ids[action_id]}']"
                    ).click()
                assert submit(browser, "redrive-selected", shows="count").text == "10"
                listed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "ul.selected a")]
                assert sorted(listed) == chosen
                browser.find_element(By.ID, "reason").send_keys(reason)
                assert submit(browser, "confirm", shows="requeued").text == "10"

                def delivered() -> int:
                    sql = "select count(*) from outbox.action_status_updates where state = 'delivered'"
                    return count(database_url, sql)

                assert wait_until(lambda: delivered() == 10, 30), states(database_url)
                for action_id in chosen:
                    browser.get(base + f"updates/{ids[action_id]}")
                    assert browser.find_element(By.ID, "state").text == "delivered"
                    requeue = browser.find_element(By.CSS_SELECTOR, "#timeline li.requeue")
                    assert f"re-queued by {operator} (was dead since" in requeue.text
                    assert requeue.find_element(By.CSS_SELECTOR, ".msg").text.startswith(
                        reason + " (by the web console"
                    )
                    events = [
                        li.get_attribute("class")
                        for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")
                    ]
                    assert events == ["written", "attempt", "requeue", "attempt", "delivered"]
        finally:
            relay.terminate()
            relay.wait(15)
        puts_after = dict(sandbox.puts)
    assert states(database_url) == {"delivered": 10, "dead": 8}
    with psycopg.connect(database_url) as conn:
        requeued = conn.execute("select action_id, reason, requeued_by from outbox.requeues").fetchall()
        after = conn.execute(
            "select * from outbox.action_status_updates where not (action_id = any(%s)) order by id",
            (chosen,),
        ).fetchall()
    assert sorted(a for a, _, _ in requeued) == chosen  # exactly those ten, each once
    assert {(r.split(" (by the web console")[0], by) for _, r, by in requeued} == {(reason, operator)}
    assert after == before  # the other dead letters did not change
    assert {a: puts_after.get(a, 0) - puts_before.get(a, 0) for a in puts_after} == {
        **{a: 1 for a in chosen},
        **{a: 0 for a in puts_before if a not in chosen},
    }
    assert max(sandbox.apply_count.values()) == 1
