"""Operator and auditor commands, run as an operator would, against a real PostgreSQL.

The database is filled the way relays would have left it: rows enqueued through
``outbox.enqueue_action_status``, then moved to delivered / in flight / dead with their
``delivery_attempts`` rows, plus ``relay_targets`` heartbeats.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import psycopg
import pytest

from relay.cli import report
from relay.cli.ops import collect_status, render_status, retry_dead
from relay.core.retention import purge
from relay.durations import human_duration
from relay.pg.migrations import latest_version
from relay.pg.store import Store, driver_sql
from relay.redact import scrub_secrets
from relay.settings import load_settings
from tests.relaykit import cli

LONG_BODY = '{"message": "' + "x" * 300 + ' END-OF-BODY"}'


def add(
    db: psycopg.Connection,
    action_id: str,
    target: str = "default",
    *,
    state: str = "pending",
    age: str = "0s",
    attempts: Sequence[tuple[str, int | None, str | None]] = (),
    status: str = "SUCCESS",
    message: str | None = None,
    body: str | None = None,
    unknown: bool = False,
) -> int:
    """One update as a relay would have left it: ``age`` ago it was delivered / went dead
    (or, while pending, was written); ``attempts`` are (outcome, http_status, error_code)."""
    errors = [] if status == "SUCCESS" else [{"code": "OTHER", "message": "refused by the shop"}]
    row = db.execute(
        "select outbox.enqueue_action_status(%s, %s, %s::jsonb, %s)",
        (action_id, status, json.dumps(errors), target),
    ).fetchone()
    assert row is not None
    uid: int = row[0]
    last = attempts[-1] if attempts else (None, None, None)
    db.execute(
        """update outbox.action_status_updates
           set state = %(state)s,
               created_at = now() - %(age)s::interval - interval '1 minute',
               delivered_at = case when %(state)s = 'delivered' then now() - %(age)s::interval end,
               dead_at = case when %(state)s = 'dead' then now() - %(age)s::interval end,
               claim_token = case when %(state)s = 'in_flight' then gen_random_uuid() end,
               claimed_by = case when %(state)s = 'in_flight' then 'relay-a' end,
               next_attempt_at = case when %(state)s = 'in_flight' then now() + interval '60 seconds'
                                      else now() end,
               attempts = %(n)s, requests = %(n)s, outcome_unknown = %(unknown)s,
               last_http_status = %(http)s, last_error = %(error)s
           where id = %(id)s""",
        {
            "state": state,
            "age": age,
            "n": len(attempts),
            "unknown": unknown,
            "http": last[1],
            "error": f"HTTP {last[1]} {last[2]}" if last[1] else None,
            "id": uid,
        },
    )
    if state == "pending":
        db.execute(
            "update outbox.action_status_updates set created_at = now() - %s::interval where id = %s",
            (age, uid),
        )
    for n, (outcome, http, code) in enumerate(attempts, start=1):
        final = n == len(attempts)
        db.execute(
            """insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at,
                   duration_ms, http_status, outcome, error_code, error_message, response_body, relay_id,
                   reached_api)
               values (%s, %s, %s, %s, now() - %s::interval - make_interval(secs => %s), 12.5, %s, %s, %s, %s, %s,
                       'relay-a', case when %s::integer is null then 'maybe' else 'answered' end)""",
            (
                uid,
                action_id,
                target,
                n,
                age,
                len(attempts) - n + 1,
                http,
                outcome,
                code,
                (message if final else None) or (f"{code} from the API" if code else None),
                body if final else None,
                http,
            ),
        )
    return uid


@pytest.fixture
def seeded(db: psycopg.Connection) -> dict[tuple[str, str], int]:
    """Two targets with delivered, pending, in-flight and dead rows, a target paused for 7 minutes,
    a stale relay."""
    ok = [("delivered", 204, None)]
    ids: dict[tuple[str, str], int] = {}

    def put(action_id: str, target: str = "default", **kw: Any) -> None:
        ids[(action_id, target)] = add(db, action_id, target, **kw)

    for name in ("old-1", "old-3", "old-4"):
        put(name, state="delivered", age="40 days", attempts=ok)
    put("old-2", state="delivered", age="40 days", attempts=[("retry", 503, "UNAVAILABLE"), *ok])
    put("fresh-1", state="delivered", age="1 minute", attempts=ok)
    put("both-1", state="delivered", age="2 minutes", attempts=ok)
    put("wait-1", state="pending", age="10 minutes", attempts=[("retry", 503, "UNAVAILABLE")])
    put("fly-1", state="in_flight", age="0s")
    put(
        "dead-a",
        state="dead",
        age="2 hours",
        status="FAILED",
        unknown=True,
        body=LONG_BODY,
        message="bad \x1b[31mred\x1b[0m input",
        attempts=[("retry", None, "ReadTimeout"), ("dead", 400, "INVALID_INPUT")],
    )
    put("dead-b", state="dead", age="40 days", attempts=[("dead", 404, "HTTP_404")])
    put("dead-c", state="dead", age="5 minutes", attempts=[("retry", 503, "UNAVAILABLE")] * 3)
    put("old-eu", "eu", state="delivered", age="40 days", attempts=ok)
    put("both-1", "eu", state="pending", age="5 minutes")
    put("dead-eu", "eu", state="dead", age="10 minutes", attempts=[("dead", 400, "ORDER_IN_WRONG_STATE")])
    db.execute(
        """insert into outbox.relay_targets (relay_id, target, state, reason, since, heartbeat_at) values
           ('relay-a', 'default', 'paused', 'HTTP 401 from the API: credentials refused',
            now() - interval '7 minutes', now()),
           ('relay-old', 'eu', 'serving', null, now() - interval '1 hour', now() - interval '10 minutes')"""
    )
    return ids


def snapshot(db: psycopg.Connection) -> dict[int, tuple[Any, ...]]:
    rows = db.execute(
        """select id, state, attempts, dead_at, delivered_at, next_attempt_at, requeue_reason
           from outbox.action_status_updates"""
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


# -- status ---------------------------------------------------------------------------------
def test_status_json_matches_the_database(database_url: str, seeded: dict[tuple[str, str], int]) -> None:
    result = cli("status", "--json", env={"RELAY_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema_version"] == data["schema_latest"] == latest_version()
    targets = {t["target"]: t for t in data["targets"]}
    assert list(targets) == ["default", "eu"]
    d, eu = targets["default"], targets["eu"]
    assert (d["pending"], d["in_flight"], d["delivered"], d["dead"]) == (1, 1, 6, 3)
    assert d["delivered_exact"] is True and eu["delivered_exact"] is True  # few rows: counted
    assert (eu["pending"], eu["in_flight"], eu["delivered"], eu["dead"]) == (1, 0, 1, 1)
    assert (d["delivered_last_hour"], d["dead_last_hour"]) == (2, 1)
    assert (eu["delivered_last_hour"], eu["dead_last_hour"]) == (0, 1)
    assert 600 <= d["oldest_pending_seconds"] < 660  # wait-1, written 10 minutes ago
    assert 300 <= eu["oldest_pending_seconds"] < 360
    assert d["paused"] is True and d["pause_reason"] == "HTTP 401 from the API: credentials refused"
    assert 420 <= d["paused_seconds"] < 480  # since the relay_targets row's `since`
    assert datetime.fromisoformat(d["paused_since"]) < datetime.now(UTC) - timedelta(minutes=6)
    assert eu["paused_seconds"] is None and eu["paused_since"] is None
    assert d["served_by"] == ["relay-a"]
    assert (
        eu["paused"] is False and eu["pause_reason"] is None and eu["served_by"] == []
    )  # relay-old is stale
    assert [r["relay_id"] for r in data["relays"]] == ["relay-a"]
    assert (
        data["relays"][0]["targets"] == ["default"] and 0 <= data["relays"][0]["heartbeat_age_seconds"] < 60
    )


def test_status_human_view(database_url: str, seeded: dict[tuple[str, str], int]) -> None:
    result = cli("status", env={"RELAY_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"schema: version {latest_version()} (up to date)" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("TARGET"))
    default = next(line for line in lines if line.startswith("default "))
    eu = next(line for line in lines if line.startswith("eu "))
    assert re.match(
        r"default\s+1\s+1\s+6\s+3\s+10m(\d\ds)?\s+2\s+1\s+relay-a\s+paused 7m(\d\ds)?$", default
    ), default
    assert re.match(r"eu\s+1\s+0\s+1\s+1\s+5m(\d\ds)?\s+0\s+1\s+-\s+UNSERVED$", eu), eu
    # aligned: right-aligned numbers end under their header
    end = header.index("DELIVERED 1H") + len("DELIVERED 1H")
    assert default[end - 1] == "2" and eu[end - 1] == "0"
    assert re.search(
        r"^paused: default for 7m(\d\ds)?: HTTP 401 from the API: credentials refused$", out, re.MULTILINE
    )
    assert "unserved: eu has 1 row(s) waiting but no live relay serves it" in out
    assert re.search(r"^relay-a\s+default\s+[\d.]+m?s ago$", out, re.MULTILINE)
    assert "relay-old" not in out


async def test_status_counts_a_pause_from_its_start_across_relays(
    db: psycopg.Connection, store: Store
) -> None:
    """Probing (one request decides whether the target is back) is still a pause; with several
    relays, the one paused longest says how long."""
    db.execute(
        """insert into outbox.relay_targets (relay_id, target, state, reason, since) values
           ('relay-a', 'default', 'paused', 'HTTP 403 from the API: forbidden', now() - interval '7 minutes'),
           ('relay-b', 'default', 'probing', '5 consecutive transient failures', now() - interval '20 minutes'),
           ('relay-a', 'eu', 'serving', null, now() - interval '2 hours'),
           ('relay-b', 'eu', 'probing', 'probe failed', now() - interval '12 seconds')"""
    )
    data = await collect_status(store)
    targets = {t["target"]: t for t in data["targets"]}
    d, eu = targets["default"], targets["eu"]
    assert d["paused"] is True and 1200 <= d["paused_seconds"] < 1260
    assert d["pause_reason"] == "5 consecutive transient failures; HTTP 403 from the API: forbidden"
    assert eu["paused"] is True and 12 <= eu["paused_seconds"] < 70
    out = render_status(data)
    assert re.search(r"^default\s.*relay-a, relay-b\s+paused 20m(\d\ds)?$", out, re.MULTILINE), out
    assert re.search(r"^paused: eu for \d+s: probe failed$", out, re.MULTILINE), out


def test_status_on_a_database_without_the_schema(empty_database_url: str) -> None:
    result = cli("status", env={"RELAY_DATABASE_URL": empty_database_url})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "outbox-relay: the outbox schema is missing: run `outbox-relay migrate`"
    ]


# -- audit ----------------------------------------------------------------------------------
def test_audit_shows_the_update_and_every_attempt_in_order(
    database_url: str, seeded: dict[tuple[str, str], int]
) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    result = cli("audit", "dead-a", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["action_id"] == "dead-a" and len(data["updates"]) == 1
    assert set(data["updates"][0]) == {"update", "attempts"}
    update, attempts = data["updates"][0]["update"], data["updates"][0]["attempts"]
    assert update["id"] == seeded[("dead-a", "default")]
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("select * from outbox.delivery_audit limit 0")
        columns = [c.name for c in cur.description or []]
    assert columns and list(update) == columns  # every column of the view, in its order
    assert (update["state"], update["status"], update["attempts"], update["last_http_status"]) == (
        "dead",
        "FAILED",
        2,
        400,
    )
    assert update["errors"] == [{"code": "OTHER", "message": "refused by the shop"}]
    assert [
        (a["attempt"], a["outcome"], a["http_status"], a["error_code"], a["reached_api"]) for a in attempts
    ] == [(1, "retry", None, "ReadTimeout", "maybe"), (2, "dead", 400, "INVALID_INPUT", "answered")]
    assert attempts[0]["started_at"] < attempts[1]["started_at"]
    assert attempts[1]["response_body"] == LONG_BODY and attempts[1]["relay_id"] == "relay-a"
    assert attempts[1]["duration_ms"] == 12.5

    human = cli("audit", "dead-a", env=env)
    assert human.returncode == 0, human.stderr
    out = human.stdout
    assert "\x1b" not in out and "bad \\x1b[31mred\\x1b[0m input" in out  # escaped, not obeyed
    assert "END-OF-BODY" not in out and report.ELLIPSIS in out  # the body is cut short
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[12]\s+\d{4}-", line)]
    assert [(r[0], r[4], r[5], r[6]) for r in rows] == [
        ("1", "-", "maybe", "retry"),
        ("2", "400", "answered", "dead"),
    ]
    for column in ("action_id", "time_to_deliver", "last_error", "requeue_reason"):
        assert re.search(rf"^\s+{column}\s", out, re.MULTILINE), column
    assert re.search(r"^\s+next_attempt_at\s+-$", out, re.MULTILINE)  # dead: no next attempt
    assert "relay: relay-a" in out and "message: bad" in out
    assert max(len(line) for line in out.splitlines()) <= 100  # a terminal's width; --json has it all


def test_audit_shows_every_target_of_an_action(database_url: str, seeded: dict[tuple[str, str], int]) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    data = json.loads(cli("audit", "both-1", "--json", env=env).stdout)
    assert [(e["update"]["target"], e["update"]["state"], len(e["attempts"])) for e in data["updates"]] == [
        ("default", "delivered", 1),
        ("eu", "pending", 0),
    ]
    assert data["updates"][0]["update"]["time_to_deliver"] == pytest.approx(60.0, abs=1.0)
    only_eu = json.loads(cli("audit", "both-1", "--target", "eu", "--json", env=env).stdout)
    assert [e["update"]["target"] for e in only_eu["updates"]] == ["eu"]
    human = cli("audit", "both-1", env=env).stdout
    assert "for target default" in human and "for target eu" in human and "no attempts yet" in human


def test_audit_of_an_unknown_action_is_exit_1_and_one_line(
    database_url: str, seeded: dict[tuple[str, str], int]
) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    result = cli("audit", "no-such-action", env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["outbox-relay: no update for action id 'no-such-action'"]
    assert result.stdout == ""
    wrong_target = cli("audit", "dead-a", "--target", "eu", env=env)
    assert wrong_target.returncode == 1 and "for target eu" in wrong_target.stderr


# -- dead letters ---------------------------------------------------------------------------
def test_dead_list_filters(database_url: str, seeded: dict[tuple[str, str], int]) -> None:
    env = {"RELAY_DATABASE_URL": database_url}

    def listed(*args: str) -> list[tuple[str, str]]:
        result = cli("dead", "list", "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        return [(r["action_id"], r["target"]) for r in json.loads(result.stdout)["dead"]]

    assert listed() == [
        ("dead-c", "default"),
        ("dead-eu", "eu"),
        ("dead-a", "default"),
        ("dead-b", "default"),
    ]
    assert listed("--code", "invalid_input") == [("dead-a", "default")]
    assert listed("--code", "HTTP_404") == [("dead-b", "default")]
    assert listed("--since", "1h") == [("dead-c", "default"), ("dead-eu", "eu")]
    assert listed("--target", "eu") == [("dead-eu", "eu")]
    assert listed("--limit", "2") == [("dead-c", "default"), ("dead-eu", "eu")]
    page = json.loads(cli("dead", "list", "--json", "--limit", "2", "--target", "default", env=env).stdout)
    assert (page["count"], page["total"], page["limit"]) == (2, 3, 2)
    whole = json.loads(cli("dead", "list", "--json", "--since", "1h", env=env).stdout)
    assert (whole["count"], whole["total"]) == (2, 2)
    recent = json.loads(cli("dead", "list", "--json", "--since", "1h", "--limit", "1", env=env).stdout)
    coded = json.loads(cli("dead", "list", "--json", "--code", "http_404", "--limit", "1", env=env).stdout)
    assert (recent["count"], recent["total"], coded["count"], coded["total"]) == (1, 2, 1, 1)
    limited = cli("dead", "list", "--limit", "2", "--target", "default", env=env)
    assert limited.returncode == 0, limited.stderr
    assert "showing the newest 2 of 3 dead updates (--limit 2)" in limited.stdout
    full = json.loads(cli("dead", "list", "--json", "--code", "INVALID_INPUT", env=env).stdout)["dead"][0]
    assert full["last_error"] == "HTTP 400 INVALID_INPUT" and full["last_http_status"] == 400
    assert full["last_error_code"] == "INVALID_INPUT"

    human = cli("dead", "list", "--target", "default", env=env)
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert lines[0].split() == [
        "DEAD",
        "AT",
        "TARGET",
        "ACTION",
        "ID",
        "STATUS",
        "ATTEMPTS",
        "HTTP",
        "CODE",
        "LAST",
        "ERROR",
    ]
    assert [line.split()[3] for line in lines[1:4]] == ["dead-c", "dead-a", "dead-b"]
    assert "3 dead update(s)" in human.stdout
    nothing = cli("dead", "list", "--code", "NO_SUCH_CODE", env=env)
    assert nothing.returncode == 0 and nothing.stdout.strip() == "no dead updates match"
    bad = cli("dead", "list", "--since", "yesterday", env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def test_dead_list_reads_the_error_code_kept_on_the_update(database_url: str, db: psycopg.Connection) -> None:
    """Since 0006 the relay keeps the last request's error code on the update (last_error_code):
    `dead list --code`, its count and `dead retry --code` read it there, newest first through the
    dead_at partial index; the attempts are looked up only for rows an older relay recorded."""
    codes = ["INVALID_INPUT", "UNAVAILABLE", "HTTP_404"]
    db.execute("set session_replication_role = replica")  # the owner's bulk load: no triggers
    db.execute(
        """insert into outbox.action_status_updates
               (action_id, status, state, attempts, requests, created_at, dead_at, last_error_code)
           select 'gen-' || g, 'SUCCESS', 'dead', 1, 1, now() - interval '90 days',
                  now() - interval '2 hours' - interval '60 days' * g / 20000, (%s::text[])[1 + g %% 3]
           from generate_series(1, 20000) g""",
        (codes,),
    )
    db.execute("reset session_replication_role")
    # Recorded by a relay older than 0006: no code on the update, only in the attempts.
    old_relay = add(db, "old-relay-1", state="dead", age="1 hour", attempts=[("dead", 400, "INVALID_INPUT")])
    add(db, "old-relay-2", state="dead", age="30 days", attempts=[("dead", 400, "INVALID_INPUT")])
    db.execute("vacuum analyze outbox.action_status_updates")
    assert db.execute(
        "select last_error_code from outbox.action_status_updates where id = %s", (old_relay,)
    ).fetchone() == (None,)

    def brute(since_days: float | None) -> list[str]:
        rows = db.execute(
            """select u.action_id from outbox.action_status_updates u
               where u.state = 'dead' and (%s::float8 is null or u.dead_at >= now() - %s::float8 * interval '1 day')
                 and coalesce(u.last_error_code, (select d.error_code from outbox.delivery_attempts d
                                                  where d.update_id = u.id order by d.attempt desc limit 1))
                     = 'INVALID_INPUT'
               order by u.dead_at desc, u.id desc""",
            (since_days, since_days),
        ).fetchall()
        return [r[0] for r in rows]

    env = {"RELAY_DATABASE_URL": database_url}
    week = brute(7)
    assert week[0] == "old-relay-1" and 700 < len(week) < 900
    result = cli(
        "dead", "list", "--code", "invalid_input", "--since", "7d", "--limit", "1000", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    assert [r["action_id"] for r in page["dead"]] == week and page["total"] == len(week)
    assert {r["last_error_code"] for r in page["dead"]} == {"INVALID_INPUT"}
    short = json.loads(
        cli("dead", "list", "--code", "INVALID_INPUT", "--limit", "5", "--json", env=env).stdout
    )
    assert [r["action_id"] for r in short["dead"]] == brute(None)[:5] and short["total"] == len(brute(None))
    assert "old-relay-2" in brute(None)
    dry = cli("dead", "retry", "--all", "--code", "invalid_input", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert (
        dry.stdout.strip() == f"would re-queue {len(brute(None))} dead update(s) (dry run: nothing changed)"
    )

    # The plan: newest first down the dead_at index, the attempts read for the one row without a code.
    params = {"since": 7 * 86400.0, "target": None, "code": "INVALID_INPUT", "limit": 100}
    row = db.execute("explain (analyze, format json) " + driver_sql("ops_dead_list"), params).fetchone()
    assert row is not None
    nodes = list(plan_nodes(row[0][0]["Plan"]))
    updates = [n for n in nodes if n.get("Relation Name") == "action_status_updates"]
    assert [n.get("Index Name") for n in updates] == ["action_status_updates_dead"], updates
    subplans = [n for n in nodes if n.get("Parent Relationship") == "SubPlan"]
    assert subplans and all(n["Actual Loops"] == 1 for n in subplans), subplans


def test_dead_retry_requeues_only_the_named_dead_rows(
    database_url: str, db: psycopg.Connection, seeded: dict[tuple[str, str], int]
) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    dry = cli("dead", "retry", "--all", "--dry-run", env=env)
    assert dry.returncode == 0 and "would re-queue 4 dead update(s)" in dry.stdout
    dry_code = cli("dead", "retry", "--all", "--code", "unavailable", "--dry-run", env=env)
    assert "would re-queue 1 dead update(s)" in dry_code.stdout
    before = snapshot(db)
    assert sum(1 for s in before.values() if s[0] == "dead") == 4  # dry runs changed nothing

    listener = psycopg.connect(database_url, autocommit=True)
    listener.execute("LISTEN outbox_action_status")
    result = cli("dead", "retry", "dead-a", "dead-eu", "--reason", "shop fixed the order", env=env)
    assert result.returncode == 0, result.stderr
    assert "re-queued 2 dead update(s)" in result.stdout
    assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1  # the relays were woken
    listener.close()

    after = snapshot(db)
    moved = {seeded[("dead-a", "default")], seeded[("dead-eu", "eu")]}
    for uid in moved:
        row = db.execute(
            """select state, attempts, dead_at, requeued_at is not null, requeue_reason, next_attempt_at <= now(),
                      requests, outcome_unknown
               from outbox.action_status_updates where id = %s""",
            (uid,),
        ).fetchone()
        assert row is not None
        state, attempts, dead_at, requeued, reason, due, requests, _ = row
        assert (state, attempts, dead_at, requeued, due) == ("pending", 0, None, True, True)
        assert requests >= 1  # requests made are history, not reset
        assert re.fullmatch(r"shop fixed the order \(by .+ at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", reason), (
            reason
        )
    unknown = db.execute(
        "select outcome_unknown from outbox.action_status_updates where id = %s",
        (seeded[("dead-a", "default")],),
    ).fetchone()
    assert unknown == (True,)  # kept: the next answer is still read knowing an earlier one may have landed
    assert {k: v for k, v in after.items() if k not in moved} == {
        k: v for k, v in before.items() if k not in moved
    }

    again = cli("dead", "retry", "dead-a", "no-such", env=env)  # no longer dead / unknown: nothing to do
    assert again.returncode == 1
    assert "re-queued 0 dead update(s)" in again.stdout
    assert again.stderr.strip().splitlines() == [
        "outbox-relay: no dead update matches action id(s) 'dead-a', 'no-such'"
    ]
    assert snapshot(db) == after

    both = cli("dead", "retry", "dead-b", "--all", env=env)
    neither = cli("dead", "retry", env=env)
    assert both.returncode == 2 and neither.returncode == 2 and "--all" in neither.stderr
    assert snapshot(db) == after


async def test_retry_dead_works_in_batches(database_url: str, db: psycopg.Connection, store: Store) -> None:
    for i in range(5):
        add(db, f"d-{i}", state="dead", age="1 hour", attempts=[("dead", 400, "INVALID_INPUT")])
    add(db, "d-other", "eu", state="dead", age="1 hour", attempts=[("dead", 400, "INVALID_INPUT")])
    done = await retry_dead(store, action_ids=None, target="default", code=None, reason="r", batch_size=2)
    assert done.count == 5
    other = db.execute(
        "select state from outbox.action_status_updates where action_id = 'd-other'"
    ).fetchone()
    assert other == ("dead",)  # another target: untouched
    named = await retry_dead(
        store, action_ids=["d-other", "d-1"], target=None, code=None, reason="r", batch_size=1
    )
    assert (named.count, named.action_ids) == (1, {"d-other"})
    states: dict[str, str] = dict(
        db.execute("select action_id, state from outbox.action_status_updates").fetchall()
    )
    assert states == {**{f"d-{i}": "pending" for i in range(5)}, "d-other": "pending"}


# -- retention ------------------------------------------------------------------------------
def test_purge_deletes_old_finished_rows_and_their_attempts_in_batches(
    database_url: str, db: psycopg.Connection, seeded: dict[tuple[str, str], int]
) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    old = [
        seeded[(a, t)]
        for a, t in [
            ("old-1", "default"),
            ("old-2", "default"),
            ("old-3", "default"),
            ("old-4", "default"),
            ("old-eu", "eu"),
        ]
    ]

    def attempts_of(ids: list[int]) -> int:
        row = db.execute(
            "select count(*) from outbox.delivery_attempts where update_id = any(%s)", (ids,)
        ).fetchone()
        return int(row[0]) if row else -1

    assert attempts_of(old) == 6
    dry = cli("purge", "--older-than", "30d", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "would purge 5 delivered update(s) older than 30d",
        "would drop no attempt partition (none ended more than 30d ago)",  # 40 days ago: the default one
        "(dry run: nothing changed)",
    ]
    before = snapshot(db)
    kept_attempts = attempts_of([k for k in before if k not in old])

    result = cli("purge", "--older-than", "30d", "--batch-size", "2", env=env)
    assert result.returncode == 0, result.stderr
    progress = result.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in progress] == ["batch 1", "batch 2", "batch 3"]
    assert result.stdout.splitlines() == [
        "purged 5 delivered update(s) older than 30d in 3 batch(es)",
        "deleted 6 attempt row(s) of delivery_attempts_default whose update is gone",
        "attempt rows: 6 dropped, 0 kept",
    ]
    after = snapshot(db)
    assert set(after) == set(before) - set(old)
    assert after == {k: v for k, v in before.items() if k not in old}
    assert attempts_of(old) == 0
    assert attempts_of(list(after)) == kept_attempts
    assert {v[0] for v in after.values()} == {"delivered", "pending", "in_flight", "dead"}

    one_batch = cli("purge", "--older-than", "30d", "--include-dead", env=env)
    assert one_batch.returncode == 0 and one_batch.stderr == ""  # one batch, one step: no progress lines
    assert one_batch.stdout.splitlines() == [
        "purged 1 delivered and dead update(s) older than 30d in 1 batch(es)",
        "deleted 1 attempt row(s) of delivery_attempts_default whose update is gone",
        "attempt rows: 1 dropped, 0 kept",
    ]
    dead_b, dead_a = seeded[("dead-b", "default")], seeded[("dead-a", "default")]
    remaining = snapshot(db)
    assert dead_b not in remaining and dead_a in remaining
    assert attempts_of([dead_b]) == 0 and attempts_of([dead_a]) == 2
    nothing = cli("purge", "--older-than", "30d", "--include-dead", env=env)
    assert nothing.returncode == 0 and nothing.stderr == "", nothing.stderr
    assert nothing.stdout.splitlines() == [
        "purged 0 delivered and dead update(s) older than 30d in 0 batch(es)",
        "attempt partitions: none ended more than 30d ago",
    ]


def test_purge_drops_the_attempt_partitions_that_ended_before_the_cutoff(
    database_url: str, db: psycopg.Connection
) -> None:
    """Attempts go by partition: `purge` drops every monthly partition that ended before the cutoff,
    keeping the rows of updates that remain (a dead row kept without --include-dead, a row still
    retried); `--dry-run` lists them with the planner's row estimates."""
    db.execute("select outbox.ensure_attempt_partitions(2, now() - interval '8 months')")
    retried = [("retry", 503, "UNAVAILABLE"), ("delivered", 204, None)]
    for age in (200, 150, 100, 45, 10):
        for i in range(3):
            add(db, f"d{age}-{i}", state="delivered", age=f"{age} days", attempts=retried)
    add(db, "dead-200", state="dead", age="200 days", attempts=[("dead", 400, "INVALID_INPUT")])
    add(db, "waiting", state="pending", age="150 days", attempts=[("retry", 503, "UNAVAILABLE")])
    db.execute("analyze outbox.delivery_attempts")
    doomed = db.execute(
        """select p.name, (select count(*) from outbox.delivery_attempts d
                           where d.started_at >= coalesce(p.from_time, '-infinity') and d.started_at < p.to_time),
                  (select count(*) from outbox.delivery_attempts d
                   where d.started_at >= coalesce(p.from_time, '-infinity') and d.started_at < p.to_time
                     and d.action_id in ('dead-200', 'waiting'))
           from outbox.attempt_partitions p
           where not p.is_default and p.to_time <= now() - interval '90 days'
           order by p.to_time"""
    ).fetchall()
    # 200 and 150 days ago: always in a partition that ended before the cutoff; 100 days: by the date
    assert len(doomed) >= 4 and sum(r[1] for r in doomed) in (3 * 2 * 2 + 2, 3 * 3 * 2 + 2)
    assert sum(r[2] for r in doomed) == 2  # dead-200's and waiting's attempts: kept

    edge = db.execute(  # where the last partition to drop ends
        "select max(to_time) from outbox.attempt_partitions where name = any(%s)", ([r[0] for r in doomed],)
    ).fetchone()
    assert edge is not None
    expected_left = db.execute(
        """select action_id, count(*) from outbox.delivery_attempts
           where started_at >= %s or action_id in ('dead-200', 'waiting') group by 1 order by 1""",
        edge,
    ).fetchall()
    assert ("d45-0", 2) in expected_left and ("d200-0", 2) not in expected_left

    env = {"RELAY_DATABASE_URL": database_url}
    dry = cli("purge", "--older-than", "90d", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    listed = ", ".join(f"{name} (about {rows:,} rows)" for name, rows, _ in doomed)
    about = sum(r[1] for r in doomed)
    assert dry.stdout.splitlines() == [
        "would purge 9 delivered update(s) older than 90d",
        f"would drop {len(doomed)} attempt partition(s) that ended more than 90d ago, about {about} attempt "
        f"row(s) (rows of updates that remain are kept): {listed}",
        "(dry run: nothing changed)",
    ]
    assert db.execute("select count(*) from outbox.delivery_attempts").fetchone() == (5 * 3 * 2 + 2,)

    result = cli("purge", "--older-than", "90d", env=env)
    assert result.returncode == 0, result.stderr
    lines = [
        f"dropped partition {name}: {rows} attempt row(s), {kept} kept (their update remains)"
        for name, rows, kept in doomed
    ]
    assert result.stdout.splitlines() == [
        "purged 9 delivered update(s) older than 90d in 1 batch(es)",
        *lines,
        f"attempt rows: {about - 2} dropped, 2 kept",
    ]
    assert result.stderr.splitlines() == [
        f"dropped {name}: {rows} attempt row(s), {kept} kept" for name, rows, kept in doomed
    ]
    names = {r[0] for r in db.execute("select name from outbox.attempt_partitions").fetchall()}
    assert not names & {r[0] for r in doomed}
    kept = db.execute("select action_id from outbox.delivery_attempts_default order by action_id").fetchall()
    assert kept == [("dead-200",), ("waiting",)]
    left = db.execute(
        "select action_id, count(*) from outbox.delivery_attempts group by 1 order by 1"
    ).fetchall()
    assert left == expected_left


def test_purge_skips_rows_held_by_another_transaction_and_never_waits(
    database_url: str, db: psycopg.Connection, seeded: dict[tuple[str, str], int]
) -> None:
    fly, old_1 = seeded[("fly-1", "default")], seeded[("old-1", "default")]
    with psycopg.connect(database_url) as holder:  # a relay mid-claim, and someone holding an old row
        holder.execute(
            "update outbox.action_status_updates set next_attempt_at = now() + interval '1 minute' "
            "where id = %s",
            (fly,),
        )
        holder.execute("select id from outbox.action_status_updates where id = %s for update", (old_1,))
        result = cli(
            "purge",
            "--older-than",
            "1h",
            "--include-dead",
            "--batch-size",
            "2",
            env={"RELAY_DATABASE_URL": database_url, "PGOPTIONS": "-c lock_timeout=5000"},
        )
        assert result.returncode == 0, result.stderr
        left = snapshot(db)
        holder.rollback()
    assert left[fly][0] == "in_flight"
    assert old_1 in left  # held: skipped, not waited for
    assert {v[0] for v in left.values()} == {"pending", "in_flight", "delivered", "dead"}
    young = {seeded[(a, "default")] for a in ("fresh-1", "both-1")}  # finished less than an hour ago
    assert {k for k, v in left.items() if v[0] == "delivered"} == {old_1} | young
    assert {k for k, v in left.items() if v[0] == "dead"} == {
        seeded[("dead-c", "default")],
        seeded[("dead-eu", "eu")],
    }


def test_purge_never_takes_rows_finished_less_than_an_hour_ago(
    database_url: str, db: psycopg.Connection, seeded: dict[tuple[str, str], int]
) -> None:
    before = snapshot(db)
    env = {"RELAY_DATABASE_URL": database_url}
    for args in (["--older-than", "59m"], ["--older-than", "0s", "--dry-run"]):
        refused = cli("purge", *args, "--include-dead", env=env)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [
            "outbox-relay: argument --older-than: must be at least 1h (rows finished within the last "
            f"hour are never purged), got '{args[1]}' (see --help)"
        ]
    for older_than in ("59 minutes", "0 seconds", None):  # the database refuses it too, whoever asks
        with pytest.raises(psycopg.errors.InvalidParameterValue) as caught:
            db.execute("select * from outbox.purge_finished(%s::interval, true, 100)", (older_than,))
        assert (caught.value.diag.message_primary or "").startswith(
            "older_than must be at least 1 hour, not "
        )
    assert snapshot(db) == before
    hour = "select * from outbox.purge_finished('1 hour', true, 100, %s)"
    # the floor itself is accepted; attempts go with their partition (0006), never counted here
    assert db.execute(hour, ("delivered",)).fetchone() == (5, 0, "dead", None)
    assert db.execute(hour, ("dead",)).fetchone() == (2, 0, None, None)  # dead-a (2 hours) and dead-b
    young = {
        seeded[(a, t)]
        for a, t in [("fresh-1", "default"), ("both-1", "default"), ("dead-c", "default"), ("dead-eu", "eu")]
    }
    assert young <= set(snapshot(db))


async def test_purge_function_for_the_daemon(db: psycopg.Connection, store: Store) -> None:
    for i in range(5):
        add(db, f"p-{i}", state="delivered", age="2 days", attempts=[("delivered", 204, None)])
    db.execute("update outbox.action_status_updates set delivered_at = '2020-01-01Z'")  # ties across batches
    add(db, "recent", state="delivered", age="1 hour", attempts=[("delivered", 204, None)])
    add(db, "waiting", state="pending", age="3 days")
    for i in range(3):
        add(db, f"x-{i}", state="dead", age="3 days", attempts=[("dead", 400, "INVALID_INPUT")])
    seen: list[tuple[int, int, int]] = []
    removed = await purge(store, 86400.0, False, 2, progress=lambda *a: seen.append(a))
    assert removed == 5
    assert seen == [(1, 2, 0), (2, 2, 0), (3, 1, 0)]  # attempts go with their partition

    def left() -> list[str]:
        rows = db.execute("select action_id from outbox.action_status_updates order by action_id").fetchall()
        return [r[0] for r in rows]

    assert left() == ["recent", "waiting", "x-0", "x-1", "x-2"]
    assert await purge(store, 86400.0, False, 1000) == 0
    assert await purge(store, 86400.0, True, 2) == 3
    assert left() == ["recent", "waiting"]
    with pytest.raises(ValueError):
        await store.purge_batch(86400.0, True, 10, "pending")


# -- roles ----------------------------------------------------------------------------------
def test_auditors_read_the_operator_requeues_and_the_relay_purges(
    database_url: str, db: psycopg.Connection, seeded: dict[tuple[str, str], int]
) -> None:
    auditor = {"RELAY_DATABASE_URL": database_url, "PGOPTIONS": "-c role=outbox_auditor"}
    for args in (
        ["status"],
        ["audit", "dead-a"],
        ["dead", "list"],
        ["purge", "--older-than", "1d", "--dry-run"],
    ):
        result = cli(*args, env=auditor)
        assert result.returncode == 0, (args, result.stderr)
    denied = cli("dead", "retry", "dead-a", env=auditor)  # a missing grant is the configuration's: exit 2
    assert denied.returncode == 2 and "permission denied" in denied.stderr
    assert "grant outbox_operator to outbox_auditor" in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1
    relay = {"RELAY_DATABASE_URL": database_url, "PGOPTIONS": "-c role=outbox_relay"}
    denied = cli("dead", "retry", "dead-a", env=relay)  # re-queueing is a person's decision
    assert denied.returncode == 2 and "permission denied for function requeue_dead" in denied.stderr
    operator = {"RELAY_DATABASE_URL": database_url, "PGOPTIONS": "-c role=outbox_operator"}
    retried = cli("dead", "retry", "dead-a", env=operator)
    assert retried.returncode == 0, retried.stderr
    by = db.execute(
        "select requeued_by from outbox.action_status_updates where id = %s", (seeded[("dead-a", "default")],)
    ).fetchone()
    assert by == ("outbox_operator",)
    purged = cli("purge", "--older-than", "30d", "--include-dead", env=relay)
    assert purged.returncode == 0, purged.stderr
    states = db.execute("select state, count(*) from outbox.action_status_updates group by state").fetchall()
    assert dict(states) == {"pending": 3, "in_flight": 1, "delivered": 2, "dead": 2}


# -- check ----------------------------------------------------------------------------------
class _TokenEndpoint(BaseHTTPRequestHandler):
    posts: list[dict[str, list[str]]] = []

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        type(self).posts.append(form)
        good = form.get("client_secret") == ["right-secret"]
        body = json.dumps(
            {"access_token": "issued-token-123", "expires_in": 60} if good else {"error": "invalid_client"}
        ).encode()
        self.send_response(200 if good else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def token_url() -> Iterator[str]:
    _TokenEndpoint.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/oauth/token"
    finally:
        server.shutdown()
        server.server_close()


def test_check_all_good_with_a_static_token(database_url: str) -> None:
    env = {"RELAY_DATABASE_URL": database_url, "RELAY_API_TOKEN": "static-secret-token"}
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    owner = params["user"]  # the test's user owns the schema
    with psycopg.connect(database_url) as conn:
        through = conn.execute(
            "select max(to_time) at time zone 'UTC' from outbox.attempt_partitions"
        ).fetchone()[0]  # type: ignore[index]
    result = cli("check", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "ok  configuration loaded: target(s) default (token, https://miraklconnect.com/api/channel-platform)",
        *[
            line
            for line in result.stdout.splitlines()
            if line.startswith("ok  database reachable (PostgreSQL ")
        ],
        f"ok  connection: {params['host']}:{params['port']}, direct to PostgreSQL",
        f"ok  schema up to date (version {latest_version()})",
        f"ok  attempt partitions: 3 monthly, through {through:%Y-%m-%d}",
        "ok  roles outbox_writer, outbox_relay, outbox_operator, outbox_auditor exist",
        f"ok  privileges: {owner} may do what the relay does (owns the outbox schema)",
        "ok  LISTEN works on a connection of its own (wake-ups)",
        "ok  target default: static token present (not verified; use --probe)",
    ]
    assert re.search(r"^ok  database reachable \(PostgreSQL \d+\.\d+\)$", result.stdout, re.MULTILINE)
    as_json = cli("check", "--json", env=env)
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and data["ok"] is True
    names = [
        "configuration",
        "database",
        "connection",
        "schema",
        "ledger",
        "roles",
        "privileges",
        "listen",
        "target default",
    ]
    assert [c["name"] for c in data["checks"]] == names
    by_name = {c["name"]: c for c in data["checks"]}
    hosts = [f"{params['host']}:{params['port']}"]
    assert {k: by_name["connection"][k] for k in ("hosts", "target_session_attrs", "pooler", "warning")} == {
        "hosts": hosts,
        "target_session_attrs": None,
        "pooler": False,
        "warning": None,
    }
    assert (by_name["listen"]["via"], by_name["listen"]["hosts"]) == ("direct", hosts)
    assert "static-secret-token" not in result.stdout + as_json.stdout


def test_check_names_each_host_of_a_multi_host_url_and_warns_unless_read_write(database_url: str) -> None:
    """Two hosts (here the same server twice: libpq takes the first that suits): check names
    each host:port and target_session_attrs, and warns when a standby could be chosen."""
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    host, port, db = params["host"], params["port"], params["dbname"]
    two = f"postgresql://{params['user']}:pass%20word@{host}:{port},{host}:{port}/{db}"
    env = {"RELAY_API_TOKEN": "static-secret-token"}
    loose = cli("check", env={**env, "RELAY_DATABASE_URL": two})
    assert loose.returncode == 0, loose.stderr
    where = f"{host}:{port}, {host}:{port}"
    assert f"ok  connection: {where} (target_session_attrs=any), direct to PostgreSQL" in loose.stdout
    assert (
        "warn database_url names 2 hosts with target_session_attrs=any (not set): the relay could "
        "connect to a standby; add ?target_session_attrs=read-write to the URL"
    ) in loose.stdout.splitlines()
    strict = cli(
        "check", "--json", env={**env, "RELAY_DATABASE_URL": f"{two}?target_session_attrs=read-write"}
    )
    assert strict.returncode == 0, strict.stderr
    connection = {c["name"]: c for c in json.loads(strict.stdout)["checks"]}["connection"]
    assert connection["hosts"] == [f"{host}:{port}", f"{host}:{port}"]
    assert (connection["target_session_attrs"], connection["warning"]) == ("read-write", None)
    assert (
        "pass word" not in loose.stdout + strict.stdout and "pass%20word" not in loose.stdout + strict.stdout
    )


def test_check_fetches_an_oauth_token(database_url: str, token_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("right-secret\n")
    env = {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_OAUTH_CLIENT_ID": "client-1",
        "RELAY_OAUTH_CLIENT_SECRET_FILE": str(secret),
        "RELAY_OAUTH_TOKEN_URL": token_url,
    }
    result = cli("check", env=env)
    assert result.returncode == 0, result.stderr
    assert (
        f"ok  target default: OAuth token obtained from {token_url} (not tried on the API; use --probe)"
        in result.stdout
    )
    assert "(oauth, " in result.stdout
    assert len(_TokenEndpoint.posts) == 1 and _TokenEndpoint.posts[0]["client_id"] == ["client-1"]
    assert "issued-token-123" not in result.stdout and "right-secret" not in result.stdout

    secret.write_text("wrong-secret\n")
    refused = cli("check", env=env)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"FAIL target default: token endpoint {token_url}: HTTP 401 (invalid_client)"
    ]
    assert "wrong-secret" not in refused.stdout + refused.stderr
    assert "ok  schema up to date" in refused.stdout  # the other checks still ran


def test_check_schema_behind_is_exit_1(empty_database_url: str) -> None:
    result = cli("check", env={"RELAY_DATABASE_URL": empty_database_url, "RELAY_API_TOKEN": "t0ken"})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"FAIL schema behind: version 0, latest {latest_version()}; run `outbox-relay migrate`"
    ]
    assert "ok  database reachable" in result.stdout and "ok  target default" in result.stdout


def test_check_configuration_problems_are_exit_2(database_url: str) -> None:
    no_credentials = cli("check", env={"RELAY_DATABASE_URL": database_url})
    assert no_credentials.returncode == 2
    assert no_credentials.stderr.splitlines() == [
        "FAIL target default: no credentials (set a token or OAuth client)"
    ]
    no_database = cli("check", env={"RELAY_API_TOKEN": "t0ken"})
    assert no_database.returncode == 2 and "RELAY_DATABASE_URL" in no_database.stderr
    bad = cli(
        "check", env={"RELAY_DATABASE_URL": database_url, "RELAY_API_BASE_URL": "http://api.example.com"}
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "plain http:// is refused" in bad.stderr


def test_check_unreachable_database_is_exit_1_without_the_password() -> None:
    env = {"RELAY_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/x", "RELAY_API_TOKEN": "t0ken"}
    result = cli("check", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("FAIL database unreachable: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hunter2" not in result.stdout + result.stderr


def test_error_details_never_carry_a_secret() -> None:
    settings = load_settings(
        None,
        {
            "RELAY_DATABASE_URL": "postgresql://u:pw-secret@db.example/app?password=qp-secret",
            "RELAY_API_TOKEN": "tok-secret",
        },
    )
    said = scrub_secrets("failed for pw-secret, qp-secret and tok-secret", settings)
    assert said == "failed for ***, *** and ***"


# -- help and formatting --------------------------------------------------------------------
@pytest.mark.parametrize(
    "command", [["status"], ["audit"], ["dead"], ["dead", "list"], ["dead", "retry"], ["purge"], ["check"]]
)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "example" in result.stdout and "outbox-relay " + " ".join(command) in result.stdout


def test_clean_keeps_terminals_safe() -> None:
    assert report.clean("a\nb\t\tc") == "a b c"
    assert report.clean("x\x1b[2Jy\u202ez") == "x\\x1b[2Jy\\u202ez"
    assert report.clean("abcdef", 4) == "abc" + report.ELLIPSIS
    assert report.clean(None) == "-"
    spans = (None, 0.25, 4.5, 42.9, 185, 3725, 7200, 30 * 86400, 86400 + 3600)
    assert [human_duration(s) for s in spans] == [
        "-",
        "250ms",
        "4.5s",
        "43s",
        "3m05s",
        "1h02m",
        "2h",
        "30d",
        "1d01h",
    ]
