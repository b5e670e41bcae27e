"""``outbox-relay audit --from DAY --to DAY``: what was reported between two days, per target,
status and error code, as an auditor runs it; and ``audit ACTION_ID --csv``.

Rows are written over a week, some days counted in the rollup (``outbox.rollup_reports``), the
others still counted live by ``outbox.delivery_report``; the command's figures are compared with a
count of the rows this test wrote, before and after retention deleted the old ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from tests.relaykit import cli

CODES = ["INVALID_INPUT", "ORDER_IN_WRONG_STATE", "UNAVAILABLE", "SHOP_CLOSED"]  # the last one added below
HOSTILE_TARGET = 'x,"y"'
HOSTILE_CODE = 'A,"B"\r\nC\n=1+2'
Key = tuple[str, str, str | None]  # target, status, error code (None: every report of the status)


def cli_bytes(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The command's output as bytes: a CSV's CRLF and the line ends inside its fields, untouched."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, env={**base, **env}, timeout=60
    )


def parse_csv(data: bytes) -> list[list[str]]:
    assert data.endswith(b"\r\n")
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def write_week(db: psycopg.Connection, now: datetime) -> list[tuple[str, str, list[str], date]]:
    """Delivered updates over the last seven UTC days (today included), two targets, a tenth
    FAILED with one to three error codes; some pending and dead rows, which are never reports.
    Returns (target, status, codes, day) of each delivered one."""
    rnd = random.Random(15)
    db.execute("insert into outbox.error_codes (code) values ('SHOP_CLOSED')")  # an operator's addition
    written: list[tuple[str, str, list[str], date]] = []
    rows: list[tuple[Any, ...]] = []
    for k in range(6, -1, -1):
        midday = datetime.combine((now - timedelta(days=k)).date(), datetime.min.time(), UTC) + timedelta(
            hours=12
        )
        for i in range(rnd.randint(15, 30)):
            at = now - timedelta(minutes=2, seconds=i) if k == 0 else midday + timedelta(seconds=i)
            target = "eu" if rnd.random() < 0.3 else "default"
            failed = rnd.random() < 0.25
            codes = rnd.sample(CODES, rnd.randint(1, 3)) if failed else []
            state = "delivered" if i % 9 else rnd.choice(["pending", "dead"])
            rows.append((f"w{k}-{i}", "FAILED" if failed else "SUCCESS", codes, target, state, at))
            if state == "delivered":
                written.append((target, "FAILED" if failed else "SUCCESS", codes, at.astimezone(UTC).date()))
    db.execute("set session_replication_role = replica")  # the owner's bulk load: no triggers
    try:
        with db.cursor() as cur:
            cur.executemany(
                """insert into outbox.action_status_updates
                       (action_id, status, errors, target, state, attempts, requests, created_at,
                        delivered_at, dead_at)
                   values (%s, %s, %s::jsonb, %s, %s, 1, 1, %s - interval '1 minute',
                           case when %s = 'delivered' then %s::timestamptz end,
                           case when %s = 'dead' then %s::timestamptz end)""",
                [
                    (
                        a,
                        s,
                        json.dumps([{"code": c, "message": f"{c} said"} for c in codes]),
                        t,
                        st,
                        at,
                        st,
                        at,
                        st,
                        at,
                    )
                    for a, s, codes, t, st, at in rows
                ],
            )
    finally:
        db.execute("reset session_replication_role")
    return written


Figure = tuple[int, bool, int]  # reports, every day of them rolled up, reports counted live


def brute_force(
    written: list[tuple[str, str, list[str], date]], first: date, last: date, rolled_days: set[date]
) -> dict[Key, Figure]:
    """Reports per (target, status, code), whether every day of the figure was rolled up, and how
    many were counted live."""
    counts: dict[Key, int] = defaultdict(int)
    live: dict[Key, int] = defaultdict(int)
    for target, status, codes, day in written:
        if first <= day <= last:
            for key in [(target, status, None), *((target, status, c) for c in codes)]:
                counts[key] += 1
                live[key] += day not in rolled_days
    return {k: (n, live[k] == 0, live[k]) for k, n in counts.items()}


def figures(rows: list[dict[str, Any]]) -> dict[Key, Figure]:
    found = {
        (r["target"], r["status"], r["error_code"]): (r["reports"], r["rolled"], r["live_reports"])
        for r in rows
    }
    assert len(found) == len(rows)  # one row per figure
    return found


def test_audit_between_two_days_matches_the_rows_written(database_url: str, db: psycopg.Connection) -> None:
    now = datetime.now(UTC)
    today = now.date()
    written = write_week(db, now)
    rolled = db.execute("select day from outbox.rollup_reports(3) order by day").fetchall()
    rolled_days = {r[0] for r in rolled}
    assert rolled_days == {today - timedelta(days=k) for k in (6, 5, 4)}  # the rest is counted live
    # A figure an operator put into the rollup by hand: hostile text in a target and a code.
    db.execute(
        "insert into outbox.daily_reports (day, target, status, error_code, reports) values (%s, %s, 'FAILED', %s, 7)",
        (today - timedelta(days=5), HOSTILE_TARGET, HOSTILE_CODE),
    )
    first, last = today - timedelta(days=5), today - timedelta(days=1)
    expected = brute_force(written, first, last, rolled_days)
    expected[(HOSTILE_TARGET, "FAILED", HOSTILE_CODE)] = (7, True, 0)
    assert any(rolled for _, rolled, _ in expected.values())
    assert any(0 < live < n for n, _, live in expected.values())  # figures partly rolled up
    assert any(code is not None for _, _, code in expected) and len({t for t, _, _ in expected}) == 3

    env = {"RELAY_DATABASE_URL": database_url, "PGOPTIONS": "-c role=outbox_auditor"}
    span = ["--from", first.isoformat(), "--to", last.isoformat()]
    result = cli("audit", *span, "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["day_from"], data["day_to"], data["target"]) == (first.isoformat(), last.isoformat(), None)
    assert figures(data["rows"]) == expected
    totals: dict[str, int] = defaultdict(int)
    for (_, status, code), (n, _, _) in expected.items():
        if code is None:
            totals[status] += n
    assert data["totals"] == dict(sorted(totals.items()))

    # CSV for auditors: RFC 4180, the hostile text back as it was written.
    out = cli_bytes("audit", *span, "--csv", env=env)
    assert out.returncode == 0, out.stderr
    header, *rows = parse_csv(out.stdout)
    assert header == ["target", "status", "error_code", "reports", "rolled", "live_reports"]
    booleans = {"true": True, "false": False}
    assert {(t, s, c or None): (int(n), booleans[r], int(v)) for t, s, c, n, r, v in rows} == expected
    assert len(rows) == len(expected)

    # The human view: a table and a total per status, every cell on one line.
    human = cli("audit", *span, env=env)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == f"reports from {first} to {last} (UTC days, inclusive)"
    for status, n in totals.items():
        assert any(line.split() == [status, str(n)] for line in lines), (status, n, lines)
    assert any(line.split() == ["total", str(sum(totals.values()))] for line in lines)
    assert "\r" not in human.stdout and any('A,"B" C =1+2' in line for line in lines)
    table = [x for x in lines if x.startswith(("default ", "eu ", 'x,"y" '))]
    assert len(table) == len(expected)
    for (target, status, code), (n, rolled, live) in expected.items():
        shown = "yes" if rolled else "no (counted live)" if live == n else f"partly ({live} counted live)"
        code_shown = "(all)" if code is None else " ".join(code.split())
        assert any(
            line.split() == [target, status, *code_shown.split(), str(n), *shown.split()] for line in table
        ), (
            target,
            status,
            code,
            shown,
        )

    # One target.
    only_eu = json.loads(cli("audit", *span, "--target", "eu", "--json", env=env).stdout)
    assert figures(only_eu["rows"]) == {k: v for k, v in expected.items() if k[0] == "eu"}

    # Retention deletes the delivered rows of counted days; the figures stay.
    purge = cli("purge", "--older-than", "1h", env={"RELAY_DATABASE_URL": database_url})
    assert purge.returncode == 0, purge.stderr
    old = db.execute(
        "select count(*) from outbox.action_status_updates where state = 'delivered' and delivered_at < %s",
        (datetime.combine(today - timedelta(days=1), datetime.min.time(), UTC),),
    ).fetchone()
    assert old == (0,) and sum(1 for w in written if w[3] < today - timedelta(days=1)) > 50
    after = json.loads(cli("audit", *span, "--json", env=env).stdout)
    assert {k: f[0] for k, f in figures(after["rows"]).items()} == {k: f[0] for k, f in expected.items()}


def test_audit_refuses_a_bad_range_in_one_line(database_url: str) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    for args, message in [
        (
            ["--from", "2026-13-01", "--to", "2026-12-01"],
            "argument --from: expected a day as YYYY-MM-DD, got '2026-13-01' (see --help)",
        ),
        (
            ["--from", "2026-12-01", "--to", "1/12/2026"],
            "argument --to: expected a day as YYYY-MM-DD, got '1/12/2026' (see --help)",
        ),
        (["--from", "2026-12-02", "--to", "2026-12-01"], "audit: --from 2026-12-02 is after --to 2026-12-01"),
        (["--from", "2026-12-01"], "audit: give an ACTION_ID, or both --from DAY and --to DAY"),
        ([], "audit: give an ACTION_ID, or both --from DAY and --to DAY"),
        (
            ["act-1", "--from", "2026-12-01", "--to", "2026-12-01"],
            "audit: give an ACTION_ID or --from DAY --to DAY, not both",
        ),
    ]:
        result = cli("audit", *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.splitlines() == [f"outbox-relay: {message}"], args
        assert result.stdout == ""
    both = cli("audit", "--from", "2026-12-01", "--to", "2026-12-01", "--csv", "--json", env=env)
    assert both.returncode == 2 and len(both.stderr.splitlines()) == 1, both.stderr
    empty = cli("audit", "--from", "2020-01-01", "--to", "2020-01-31", env=env)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "no reports from 2020-01-01 to 2020-01-31 (UTC days, inclusive)"
    none = cli_bytes("audit", "--from", "2020-01-01", "--to", "2020-01-31", "--csv", env=env)
    assert none.stdout == b"target,status,error_code,reports,rolled,live_reports\r\n"


def test_audit_of_an_action_as_csv_keeps_every_character(database_url: str, db: psycopg.Connection) -> None:
    action = 'act,"1";=2'  # commas and quotes are allowed in action ids
    errors = [{"code": "INVALID_INPUT", "message": 'bad, "very"\nbad'}]
    (uid,) = db.execute(
        "select outbox.enqueue_action_status(%s, 'FAILED', %s::jsonb, 'default')",
        (action, json.dumps(errors)),
    ).fetchone() or (None,)
    db.execute(
        "select outbox.enqueue_action_status(%s, 'FAILED', %s::jsonb, 'eu')", (action, json.dumps(errors))
    )
    messages = ['first, "one"\r\nsecond line', None]
    bodies = ['{"message": "a,b\\n\\"c\\""}\n', "\x1b[31m,\r"]
    for n, (message, body) in enumerate(zip(messages, bodies, strict=True), start=1):
        db.execute(
            """insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at,
                   duration_ms, http_status, outcome, error_code, error_message, response_body, relay_id,
                   reached_api)
               values (%s, %s, 'default', %s, now() - make_interval(secs => 10 - %s), 5.5, 400, 'retry',
                       'INVALID_INPUT', %s, %s, 'relay-a', 'answered')""",
            (uid, action, n, n, message, body),
        )
    env = {"RELAY_DATABASE_URL": database_url, "PGOPTIONS": "-c role=outbox_auditor"}
    result = cli_bytes("audit", action, "--csv", env=env)
    assert result.returncode == 0, result.stderr
    header, *rows = parse_csv(result.stdout)
    columns = [c.name for c in db.execute("select * from outbox.delivery_audit limit 0").description or []]
    assert header[: len(columns)] == columns
    assert header[len(columns) :] == [
        "attempt", "started_at", "duration_ms", "http_status", "reached_api", "outcome",
        "error_code", "error_message", "response_body", "relay_id",
    ]  # fmt: skip
    got = [dict(zip(header, r, strict=True)) for r in rows]
    assert [(r["target"], r["attempt"]) for r in got] == [("default", "1"), ("default", "2"), ("eu", "")]
    assert {r["action_id"] for r in got} == {action}
    assert [r["error_message"] for r in got] == [messages[0], "", ""]
    assert [r["response_body"] for r in got] == [*bodies, ""]
    assert json.loads(got[0]["errors"]) == errors
    assert got[0]["id"] == str(uid) and got[0]["state"] == "pending" and got[2]["outcome"] == ""
