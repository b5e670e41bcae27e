"""The audit console over HTTP: `outbox-relay web` as a real process on loopback, a real database.

Pages are read as a browser would (cookies kept by an httpx client); what they show is compared
with the database. The browser itself (rendering, dialogs, clicking through a redrive) is in
tests/test_web_browser.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from relay.pg.store import Store
from relay.settings import Secret
from relay.web import data, forms
from relay.web.chart import per_minute_svg
from tests.conftest import TEMPLATE, Server, _scratch_database
from tests.relaykit import cli, free_port, login_roles, url_as, web_console

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HOSTILE_ID = "<img/src=x/onerror=alert(1)>"
HOSTILE_MESSAGE = "<script>alert(2)</script>"
HOSTILE_BODY = '</pre><script>alert(3)</script>{"message": "\u202eevil"}'
T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


def insert(conn: psycopg.Connection, **row: Any) -> int:
    """One update as the relay would have left it (written by the table's owner)."""
    row.setdefault("status", "SUCCESS")
    row.setdefault("errors", "[]" if row["status"] == "SUCCESS" else '[{"code": "OTHER", "message": "m"}]')
    state = row.setdefault("state", "delivered")
    created = row.setdefault("created_at", T0)
    if state == "delivered":
        row.setdefault("delivered_at", created + timedelta(seconds=1))
    if state == "dead":
        row.setdefault("dead_at", created + timedelta(seconds=2))
    if state != "pending":
        row.setdefault("attempts", 1)
        row.setdefault("requests", row["attempts"])
    cols = ", ".join(row)
    marks = ", ".join(f"%({k})s" for k in row)
    found = conn.execute(
        f"insert into outbox.action_status_updates ({cols}) values ({marks}) returning id", row
    ).fetchone()
    assert found is not None
    return int(found[0])


def attempt(conn: psycopg.Connection, update_id: int, n: int, **row: Any) -> None:
    action_id, target = conn.execute(
        "select action_id, target from outbox.action_status_updates where id = %s", (update_id,)
    ).fetchone()  # type: ignore[misc]
    row = {
        "update_id": update_id,
        "action_id": action_id,
        "target": target,
        "attempt": n,
        "started_at": T0 + timedelta(seconds=n),
        "duration_ms": 12.5,
        "http_status": 503,
        "outcome": "retry",
        "relay_id": "relay-a",
        "reached_api": "answered",
        **row,
    }
    cols = ", ".join(row)
    conn.execute(
        f"insert into outbox.delivery_attempts ({cols}) values ({', '.join(f'%({k})s' for k in row)})", row
    )


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert found, "no csrf field on the page"
    return found.group(1)


def text_of(html: str) -> str:
    """The page's visible text (tags removed, entities decoded), to compare with stored values."""
    return unescape(re.sub(r"<[^>]+>", " ", html))


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {"RELAY_DATABASE_URL": url, "RELAY_LOG_LEVEL": "INFO", **extra}


# -- one console over a seeded database, for the read-only checks ---------------------------
@pytest.fixture(scope="module")
def seeded(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with _scratch_database(pg_server, "w", TEMPLATE) as url, psycopg.connect(url, autocommit=True) as conn:
        ids: dict[str, int] = {}
        # 130 delivered rows over three days, many sharing one created_at (keyset ties)
        for i in range(130):
            created = T0 - timedelta(hours=(i // 10) * 6)
            target = "default" if i % 3 else "eu"
            ids[f"row-{i:03d}"] = insert(conn, action_id=f"row-{i:03d}", target=target, created_at=created)
        for i in range(7):
            ids[f"dead-{i}"] = insert(
                conn,
                action_id=f"dead-{i}",
                status="FAILED",
                state="dead",
                created_at=T0 - timedelta(days=1, minutes=i),
                last_error_code="ORDER_IN_WRONG_STATE" if i % 2 else "INVALID_INPUT",
                last_http_status=400,
                last_error="refused",
            )
        ids["hostile"] = insert(
            conn,
            action_id=HOSTILE_ID,
            state="dead",
            status="FAILED",
            last_error=HOSTILE_MESSAGE,
            last_error_code="INVALID_INPUT",
            attempts=4,
            requests=4,
        )
        for n in range(1, 5):
            attempt(
                conn,
                ids["hostile"],
                n,
                outcome="dead" if n == 4 else "retry",
                http_status=400 if n == 4 else 503,
                error_code="INVALID_INPUT" if n == 4 else "UNAVAILABLE",
                error_message=HOSTILE_MESSAGE,
                response_body=HOSTILE_BODY,
                reached_api="maybe" if n == 2 else "answered",
            )
        for name in ("a%b-1", "a_b-2", "axb-3", "a\\b-4"):
            ids[name] = insert(conn, action_id=name)
        log = tmp_path_factory.mktemp("web") / "console.log"
        with web_console(env_for(url), log) as address:
            yield {"url": url, "address": address, "ids": ids, "log": log}


@pytest.fixture
def browser(seeded: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=seeded["address"], timeout=20) as client:
        yield client


PAGES = [
    "/",
    "/chart.svg",
    "/updates",
    "/updates?state=dead",
    "/dead",
    "/find?q=row-0",
    "/static/console.css",
]


@pytest.mark.parametrize("path", [*PAGES, "/updates/1", "/nowhere", "/updates?state=bogus"])
def test_every_answer_carries_the_security_headers(browser: httpx.Client, path: str) -> None:
    answer = browser.get(path)
    assert answer.status_code in (200, 400, 404)
    assert answer.headers["content-security-policy"] == CSP
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-frame-options"] == "DENY"
    assert "server" not in answer.headers


def test_pages_have_no_script_and_only_local_assets(browser: httpx.Client) -> None:
    for path in PAGES[:-1]:
        body = browser.get(path).text
        assert "<script" not in body.lower()
        assert not re.search(r'(?:src|href)="(?:https?:)?//', body), path  # nothing from the internet


def test_a_cookie_is_httponly_and_samesite_strict(seeded: dict[str, Any]) -> None:
    answer = httpx.get(seeded["address"])
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("relay_console=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_a_foreign_host_name_is_refused_on_loopback(seeded: dict[str, Any]) -> None:
    """A DNS-rebinding page (evil.example resolving to 127.0.0.1) cannot read the console."""
    answer = httpx.get(seeded["address"], headers={"Host": "evil.example"})
    assert answer.status_code == 400
    assert "row-0" not in answer.text
    port = seeded["address"].rstrip("/").rpartition(":")[2]
    assert httpx.get(seeded["address"], headers={"Host": f"localhost:{port}"}).status_code == 200


def test_hostile_values_are_text_everywhere(browser: httpx.Client, seeded: dict[str, Any]) -> None:
    update = seeded["ids"]["hostile"]
    for path in (f"/updates/{update}", "/updates?state=dead", "/find?q=%3Cimg", "/dead"):
        body = browser.get(path).text
        assert HOSTILE_ID not in body and HOSTILE_MESSAGE not in body and "<script>alert(3)" not in body
        assert "<img" not in body.lower()
    page = browser.get(f"/updates/{update}").text
    shown = text_of(page)
    assert HOSTILE_ID in shown and HOSTILE_MESSAGE in shown
    assert "</pre><script>alert(3)</script>" in shown
    assert "\u202e" not in page and "\\u202eevil" in shown  # a bidi override is shown, not applied


def test_find_by_id_redirects_to_the_timeline_with_every_request(
    browser: httpx.Client, seeded: dict[str, Any]
) -> None:
    update = seeded["ids"]["hostile"]
    answer = browser.get("/find", params={"q": HOSTILE_ID})
    assert answer.status_code == 303 and answer.headers["location"] == f"/updates/{update}"
    page = browser.get(f"/updates/{update}").text
    assert len(re.findall(r"<strong>request \d</strong>", page)) == 4
    assert "4 requests" in page
    assert "maybe: a request may have been applied" not in page  # an answer came: it reached the API
    assert "yes: the API answered" in page


def test_find_by_prefix_takes_like_characters_literally(browser: httpx.Client) -> None:
    def found(q: str) -> list[str]:
        answer = browser.get("/find", params={"q": q}, follow_redirects=True)
        return sorted(re.findall(r'<td class="id"><a href="/updates/\d+">([^<]+)</a>', answer.text))

    assert found("a%") == ["a%b-1"]
    assert found("a_") == ["a_b-2"]
    assert found("a\\") == ["a\\b-4"]
    assert found("ax") == ["axb-3"]
    assert found("a") == ["a%b-1", "a\\b-4", "a_b-2", "axb-3"]


def test_the_longest_list_the_search_takes_reaches_it(browser: httpx.Client) -> None:
    """200 action ids of 255 characters (a 51 KB query string) are read, not refused by the server."""
    ids = [f"{i:03d}-" + "x" * 251 for i in range(forms.MAX_IDS)]
    page = browser.get("/find", params={"q": " ".join(ids)})
    assert page.status_code == 200
    assert f"Not found ({forms.MAX_IDS})" in page.text


def test_a_pasted_list_shows_what_was_found_and_names_what_was_not(browser: httpx.Client) -> None:
    page = browser.get("/find", params={"q": "row-001, row-002\nnot-there\trow-003"}).text
    assert sorted(re.findall(r">(row-00\d)</a>", page)) == ["row-001", "row-002", "row-003"]
    assert "Not found (1)" in page and "not-there" in page


def walk(browser: httpx.Client, path: str) -> tuple[list[int], int]:
    """Every update id the list shows, following its next links; and the number of pages."""
    ids: list[int] = []
    pages = 0
    while path:
        page = browser.get(path)
        assert page.status_code == 200, page.text
        pages += 1
        ids += [int(i) for i in re.findall(r'<td class="id"><a href="/updates/(\d+)">', page.text)]
        nxt = re.search(r'<a href="([^"]+)" id="next">', page.text)
        path = unescape(nxt.group(1)) if nxt else ""
        assert pages < 50
    return ids, pages


@pytest.mark.parametrize(
    ("query", "where"),
    [
        ("", "true"),
        ("target=eu", "target = 'eu'"),
        ("state=dead", "state = 'dead'"),
        (
            "state=dead&code=order_in_wrong_state",
            "state = 'dead' and last_error_code = 'ORDER_IN_WRONG_STATE'",
        ),
        ("status=FAILED", "status = 'FAILED'"),
        ("from=2026-11-01&to=2026-11-01", "created_at >= '2026-11-01Z' and created_at < '2026-11-02Z'"),
        (
            "from=2026-11-02&to=2026-11-02&target=default",
            "created_at >= '2026-11-02Z' and target = 'default'",
        ),
    ],
)
def test_lists_page_by_keyset_newest_first_and_show_each_row_once(
    browser: httpx.Client, seeded: dict[str, Any], query: str, where: str
) -> None:
    dead = "state = 'dead'" in where
    order = "dead_at desc, id desc" if dead else "created_at desc, id desc"
    with psycopg.connect(seeded["url"]) as conn:
        expected = [
            r[0]
            for r in conn.execute(
                f"select id from outbox.action_status_updates where {where} order by {order}"
            )
        ]
    ids, pages = walk(browser, "/updates?" + query)
    assert ids == expected
    assert pages == max(1, -(-len(expected) // data.PAGE))


def test_the_csv_export_is_the_whole_list_exactly(browser: httpx.Client, seeded: dict[str, Any]) -> None:
    answer = browser.get("/updates.csv", params={"state": "dead"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert "attachment" in answer.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    with psycopg.connect(seeded["url"]) as conn:
        expected = conn.execute(
            "select id, action_id, last_error from outbox.action_status_updates where state = 'dead' "
            "order by dead_at desc, id desc"
        ).fetchall()
    assert [(int(r["id"]), r["action_id"], r["last_error"]) for r in rows] == expected
    assert HOSTILE_ID in {r["action_id"] for r in rows}


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/updates?state=bogus", 400, "state: expected one of"),
        ("/updates?from=2026-13-01", 400, "from: expected a day"),
        ("/updates?from=2026-11-03&to=2026-11-01", 400, "from: must not be after to"),
        ("/updates?before=nonsense", 400, "before: not a page position"),
        ("/updates?before=2026-11-01T00:00:00_12", 400, "before: not a page position"),  # no time zone
        ("/updates?target=" + "x" * 70, 400, "target: not a target name"),
        ("/updates?code=%3Cb%3E", 400, "code: not an error code"),
        ("/find?q=" + "+".join(f"id-{i}" for i in range(201)), 400, "at most 200 action ids"),
        ("/find?q=" + "x" * 256, 400, "at most 255 characters"),
        ("/updates/999999999", 404, "no update 999999999"),
        ("/updates/99999999999999999999999", 404, "no update"),
        ("/nowhere", 404, "Not Found"),
    ],
)
def test_bad_requests_are_answered_with_what_is_wrong(
    browser: httpx.Client, seeded: dict[str, Any], path: str, status: int, says: str
) -> None:
    answer = browser.get(path)
    assert answer.status_code == status
    assert says in unescape(answer.text)
    assert "Traceback" not in answer.text
    assert "ERROR" not in seeded["log"].read_text(errors="replace")  # nothing failed inside


def test_a_form_too_large_or_not_a_form_is_refused(browser: httpx.Client) -> None:
    csrf = csrf_of(browser.get("/dead").text)
    big = browser.post("/redrive/preview", data={"csrf": csrf, "scope": "filter", "x": "y" * 70_000})
    assert big.status_code == 413
    as_json = browser.post("/redrive/preview", json={"csrf": csrf})
    assert as_json.status_code == 400


def test_the_chart_counts_each_minute_and_is_an_svg_image(
    seeded: dict[str, Any], browser: httpx.Client
) -> None:
    answer = browser.get("/chart.svg")
    assert answer.headers["content-type"].startswith("image/svg+xml")
    import xml.etree.ElementTree as ET

    root = ET.fromstring(answer.text)  # noqa: S314 -- our own answer
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}polygon")) == 2


def test_the_chart_draws_what_it_is_given() -> None:
    minutes = [T0 + timedelta(minutes=i) for i in range(181)]
    rows = [
        {"minute": m, "delivered": (i % 7) * 10, "dead": 1 if i == 42 else 0} for i, m in enumerate(minutes)
    ]
    svg = per_minute_svg(rows)
    total = sum(r["delivered"] for r in rows)
    assert total > 5000
    assert f"Delivered per minute: {total:,} in 24 h, at most 60 a minute" in svg
    assert "Dead letters per minute: 1 in 24 h, at most 1 a minute" in svg
    assert svg.count(">12:00</text>") == 1
    assert ">15:00</text>" not in svg  # the last minute: its label would be cut at the right edge
    longer = per_minute_svg(
        [*rows, *({"minute": T0 + timedelta(minutes=i), "delivered": 0, "dead": 0} for i in range(181, 240))]
    )
    assert longer.count(">12:00</text>") == 1 and longer.count(">15:00</text>") == 1


async def test_per_minute_counts_match_a_count_of_the_rows(database_url: str, db: psycopg.Connection) -> None:
    now = db.execute("select date_trunc('minute', now())").fetchone()[0]  # type: ignore[index]
    for i in range(30):
        insert(
            db,
            action_id=f"m-{i}",
            created_at=now - timedelta(minutes=i % 5),
            delivered_at=now - timedelta(minutes=i % 5),
        )
    insert(db, action_id="old", created_at=now - timedelta(days=2), delivered_at=now - timedelta(days=2))
    insert(
        db, action_id="d-1", state="dead", status="FAILED", created_at=now, dead_at=now - timedelta(minutes=3)
    )
    store = Store(Secret(database_url))
    try:
        rows = await data.per_minute(store)
    finally:
        await store.close()
    assert len(rows) == data.CHART_MINUTES
    counted = {r["minute"]: (r["delivered"], r["dead"]) for r in rows if r["delivered"] or r["dead"]}
    assert counted == {now - timedelta(minutes=k): (6, 1 if k == 3 else 0) for k in range(5)}


async def test_a_page_that_reads_its_whole_scan_says_where_it_stopped_and_goes_on(
    database_url: str, db: psycopg.Connection
) -> None:
    """A filter matching rare rows: each page reads at most `scan` rows and the next page carries
    on from the oldest one read; walking every page gives exactly the matching rows."""
    wanted = []
    for i in range(60):
        code = "RARE" if i % 13 == 0 else None
        row = insert(db, action_id=f"s-{i}", created_at=T0 - timedelta(minutes=i), last_error_code=code)
        if code:
            wanted.append(row)
    store = Store(Secret(database_url))
    try:
        flt = forms.list_filter({"code": "rare"})
        seen: list[int] = []
        cursor = None
        stops = 0
        for _ in range(40):
            page = await data.updates_page(store, flt, cursor, page=2, scan=7)
            seen += [int(r["id"]) for r in page.rows]
            if page.stopped_at is not None:
                stops += 1
                assert page.scanned == 7
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        await store.close()
    assert seen == wanted
    assert stops > 0


# -- changes: CSRF, redrive, roles -------------------------------------------------------------
def dead_rows(
    conn: psycopg.Connection, n: int, target: str = "default", code: str = "INVALID_INPUT"
) -> list[int]:
    return [
        insert(
            conn,
            action_id=f"{target}-dead-{i}",
            target=target,
            status="FAILED",
            state="dead",
            last_error_code=code,
            created_at=T0 + timedelta(seconds=i),
        )
        for i in range(n)
    ]


def row_states(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute("select id, state from outbox.action_status_updates").fetchall())  # type: ignore[arg-type]


def test_a_post_without_the_right_csrf_field_changes_nothing(
    database_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    ids = dead_rows(db, 3)
    before = row_states(db)
    with (
        web_console(env_for(database_url), tmp_path / "web.log") as address,
        httpx.Client(base_url=address) as web,
    ):
        page = web.get("/updates?state=dead").text
        token = csrf_of(page)
        form = {"scope": "selected", "id": [str(i) for i in ids], "reason": "r"}
        assert web.post("/redrive", data=form).status_code == 403  # no csrf
        assert web.post("/redrive", data={**form, "csrf": "0" * 64}).status_code == 403
        with httpx.Client(base_url=address) as other:  # another browser's cookie with this token
            other.get("/")
            assert other.post("/redrive", data={**form, "csrf": token}).status_code == 403
        cross = web.post("/redrive", data={**form, "csrf": token}, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        assert row_states(db) == before
        done = web.post("/redrive", data={**form, "csrf": token})
        assert done.status_code == 200, done.text
    assert {row_states(db)[i] for i in ids} == {"pending"}
    assert "web request refused" in (tmp_path / "web.log").read_text()


def test_redrive_of_ticked_rows_takes_exactly_those_rows(
    database_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Same action ids in two targets, one ticked row no longer dead: only the ticked dead rows
    go back to pending, each with the reason, who and when, as `dead retry` records them."""
    default = dead_rows(db, 4)
    eu = dead_rows(db, 4, target="eu")
    delivered = insert(db, action_id="done-1")
    ticked = [default[0], default[2], eu[1], delivered]
    before = row_states(db)
    with (
        web_console(env_for(database_url), tmp_path / "web.log") as address,
        httpx.Client(base_url=address) as web,
    ):
        token = csrf_of(web.get("/updates?state=dead").text)
        form = {"csrf": token, "scope": "selected", "id": [str(i) for i in ticked]}
        preview = web.post("/redrive/preview", data=form)
        assert preview.status_code == 200
        assert re.search(r'<strong id="count">3</strong>', preview.text)
        assert "1 of the ticked updates are no longer dead" in preview.text
        assert row_states(db) == before  # the dry run changed nothing
        assert web.post("/redrive", data={**form, "reason": "  "}).status_code == 400
        assert row_states(db) == before
        done = web.post("/redrive", data={**form, "reason": "order fixed in the ERP"})
        assert re.search(r'<strong id="requeued">3</strong>', done.text)
    after = row_states(db)
    changed = {i for i in after if after[i] != before[i]}
    assert changed == {default[0], default[2], eu[1]}
    assert all(after[i] == "pending" for i in changed)
    kept = db.execute(
        "select update_id, reason, requeued_by from outbox.requeues order by update_id"
    ).fetchall()
    assert [k[0] for k in kept] == sorted(changed)
    assert all(
        k[1].startswith("order fixed in the ERP (by the web console, from 127.0.0.1, at ") for k in kept
    )
    assert {k[2] for k in kept} == {db.execute("select current_user").fetchone()[0]}  # type: ignore[index]
    assert "dead updates re-queued from the web console" in (tmp_path / "web.log").read_text()


def test_redrive_of_a_group_counts_first_then_takes_the_group(
    database_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    group = dead_rows(db, 5, code="UNAVAILABLE")
    others = [
        *dead_rows(db, 2, target="eu", code="UNAVAILABLE"),
        insert(db, action_id="x", state="dead", status="FAILED", last_error_code="OTHER"),
    ]
    with (
        web_console(env_for(database_url), tmp_path / "web.log") as address,
        httpx.Client(base_url=address) as web,
    ):
        page = web.get("/dead").text
        assert page.count("Redrive all") == 3
        form = {"csrf": csrf_of(page), "scope": "filter", "target": "default", "code": "unavailable"}
        preview = web.post("/redrive/preview", data=form)
        assert re.search(r'<strong id="count">5</strong>', preview.text)
        done = web.post("/redrive", data={**form, "reason": "API back"})
        assert re.search(r'<strong id="requeued">5</strong>', done.text)
    states = row_states(db)
    assert {states[i] for i in group} == {"pending"}
    assert {states[i] for i in others} == {"dead"}


@pytest.fixture
def auditor(pg_server: Server) -> Iterator[str]:
    with login_roles(pg_server.admin_url, {"web_auditor_login": "outbox_auditor"}):
        yield "web_auditor_login"


def test_an_auditors_console_shows_no_redrive_and_refuses_one(
    database_url: str, db: psycopg.Connection, tmp_path: Path, auditor: str
) -> None:
    ids = dead_rows(db, 3)
    env = env_for(
        "postgresql://nobody@127.0.0.1:1/none", RELAY_WEB_DATABASE_URL=url_as(database_url, auditor)
    )
    with web_console(env, tmp_path / "web.log") as address, httpx.Client(base_url=address) as web:
        assert "read only" in (tmp_path / "web.out").read_text()
        pages = [web.get(p).text for p in ("/updates?state=dead", "/dead", f"/updates/{ids[0]}", "/")]
        for page in pages:
            assert 'type="checkbox"' not in page and "Redrive" not in page and "/redrive" not in page
            assert "read only" in page
        assert 'name="csrf"' not in "".join(pages)  # no form to post anything
        form = {"csrf": "0" * 64, "scope": "selected", "id": [str(i) for i in ids], "reason": "forged"}
        for path in ("/redrive/preview", "/redrive"):
            answer = web.post(path, data=form)
            assert answer.status_code == 403
            assert "may not re-queue dead updates" in unescape(answer.text)
        group = web.post("/redrive", data={**form, "scope": "filter", "target": "default"})
        assert group.status_code == 403
    assert {row_states(db)[i] for i in ids} == {"dead"}


def test_a_privilege_taken_while_the_console_runs_is_a_403_page_that_says_so(
    database_url: str, db: psycopg.Connection, pg_server: Server, tmp_path: Path, auditor: str
) -> None:
    """The auditor's role is revoked from the console's login while it runs: each page is the
    database's refusal as a 403 naming the login (not a 503 or a 500), and the console keeps
    serving once the role is granted back."""
    ids = dead_rows(db, 1)
    env = env_for(url_as(database_url, auditor))
    with (
        web_console(env, tmp_path / "web.log") as address,
        httpx.Client(base_url=address, timeout=30) as web,
        psycopg.connect(pg_server.admin_url, autocommit=True) as admin,
    ):
        assert web.get(f"/updates/{ids[0]}").status_code == 200
        admin.execute(f"revoke outbox_auditor from {auditor}")
        try:
            for path in ("/", f"/updates/{ids[0]}", "/updates?state=dead", "/dead"):
                answer = web.get(path)
                assert answer.status_code == 403, (path, answer.status_code)
                said = unescape(answer.text)
                assert "permission denied" in said and auditor in said, said
        finally:
            admin.execute(f"grant outbox_auditor to {auditor}")
        assert web.get(f"/updates/{ids[0]}").status_code == 200


# -- signing in ------------------------------------------------------------------------------
TOKEN = "correct-horse-battery-staple-token-0123456789"
TOKEN_HASH = "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()


def test_with_a_token_hash_every_page_needs_a_sign_in(database_url: str, tmp_path: Path) -> None:
    env = env_for(database_url, RELAY_WEB_TOKEN_HASH=TOKEN_HASH)
    port = free_port()
    with (
        web_console(env, tmp_path / "web.log", listen=f"0.0.0.0:{port}"),
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as web,
    ):
        first = web.get("/updates?state=dead")
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=%2Fupdates%3Fstate%3Ddead"
        assert web.get("/updates.csv").status_code == 303
        login = web.get("/login")
        token = csrf_of(login.text)
        wrong = web.post("/login", data={"csrf": token, "token": "guess", "next": "/"})
        assert wrong.status_code == 401
        assert web.get("/").status_code == 303
        evil = web.post("/login", data={"csrf": token, "token": TOKEN, "next": "//evil.example/x"})
        assert evil.status_code == 303 and evil.headers["location"] == "/"
        assert web.get("/").status_code == 200  # signed in (a new cookie: the old one is not reused)
        assert web.get("/updates?state=dead").status_code == 200
        page = web.get("/").text
        out = web.post("/logout", data={"csrf": csrf_of(page)})
        assert out.status_code == 303
        assert web.get("/").status_code == 303
    with web_console(env, tmp_path / "web2.log") as address:
        assert (
            httpx.get(address + "updates.csv", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
            == 200
        )
        assert httpx.get(address, headers={"Authorization": "Bearer nope"}).status_code == 303
        assert (
            httpx.post(address + "redrive", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
        )
    logs = (tmp_path / "web.log").read_text() + (tmp_path / "web2.log").read_text()
    assert TOKEN not in logs and "web sign-in refused" in logs and "web sign-in " in logs


# -- the command -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--listen", "0.0.0.0:8089"],
            {},
            "outbox-relay: web: listening on 0.0.0.0:8089 (not loopback) needs a sign-in token: set "
            "web_token_hash (RELAY_WEB_TOKEN_HASH) to what `outbox-relay web --new-token` prints",
        ),
        (
            [],
            {"RELAY_WEB_TOKEN_HASH": "md5:abc"},
            "outbox-relay: RELAY_WEB_TOKEN_HASH: expected sha256: and 64 hex digits (make one with "
            "`outbox-relay web --new-token`)",
        ),
        (
            [],
            {"RELAY_WEB_LISTEN": "nowhere"},
            "outbox-relay: RELAY_WEB_LISTEN: expected host:port, got 'nowhere'",
        ),
        (
            ["--listen", "host-without-port"],
            {},
            "outbox-relay: argument --listen: expected host:port, got 'host-without-port' (see --help)",
        ),
        (
            [],
            {"RELAY_WEB_DATABASE_URL": "mysql://x@y/z"},
            None,
        ),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str | None
) -> None:
    done = cli("web", *args, env={"RELAY_DATABASE_URL": "postgresql://u@127.0.0.1:1/db", **env})
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("outbox-relay: "), done.stderr
    if message:
        assert lines[0] == message


def test_a_port_in_use_or_a_database_without_the_schema_is_one_line(empty_database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("web", "--listen", f"127.0.0.1:{port}", env={"RELAY_DATABASE_URL": empty_database_url})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"outbox-relay: web: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    done = cli("web", "--listen", f"127.0.0.1:{free_port()}", env={"RELAY_DATABASE_URL": empty_database_url})
    assert done.returncode != 0
    assert (
        done.stderr.strip().splitlines()[-1]
        == "outbox-relay: the outbox schema is missing: run `outbox-relay migrate`"
    )


def test_new_token_prints_a_token_and_its_hash_and_the_hash_signs_it_in() -> None:
    done = cli("web", "--new-token", env={})
    assert done.returncode == 0
    token = re.search(r"it is not stored anywhere\): (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert f'web_token_hash = "{digest}"' in done.stdout
    assert f"RELAY_WEB_TOKEN_HASH={digest}" in done.stdout
    assert len(token) >= 40
    again = cli("web", "--new-token", env={})
    assert token not in again.stdout


def test_the_console_survives_its_database_refusing_it_and_comes_back(
    database_url: str, db: psycopg.Connection, pg_server: Server, tmp_path: Path
) -> None:
    """The database ends every session of the console and refuses new ones: pages answer 503
    with a message that names no host or user (the log has the driver's words), the process stays
    up, and once the database takes connections again the same pages are served."""
    dead_rows(db, 1)
    name = make_url(database_url).database
    with (
        web_console(env_for(database_url), tmp_path / "web.log") as address,
        httpx.Client(base_url=address, timeout=30) as web,
        psycopg.connect(pg_server.admin_url, autocommit=True) as admin,
    ):
        assert web.get("/").status_code == 200
        admin.execute(f"alter database {name} with allow_connections false")
        try:
            cut = admin.execute(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                "where application_name = 'outbox-relay web'"
            ).fetchone()[0]  # type: ignore[index]
            assert cut >= 1
            down = web.get("/dead")
            assert down.status_code == 503
            assert "the database did not answer this page" in down.text
            assert "127.0.0.1" not in down.text and "postgres" not in down.text
        finally:
            admin.execute(f"alter database {name} with allow_connections true")
        answers = []
        while len(answers) < 5 and 200 not in answers:
            answers.append(web.get("/dead").status_code)
        assert answers[-1] == 200, answers
        assert web.get("/").status_code == 200
    assert "web page failed" in (tmp_path / "web.log").read_text()
