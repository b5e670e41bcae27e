"""What no answer, no database refusal and no cancellation can do: lose or block other results.

Real PostgreSQL, the sandbox API on loopback. Refusals come from PostgreSQL itself: a CHECK
constraint a test adds, a row deleted under the relay's feet, a row lock that holds a write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from relay.connect.client import ApiClient
from relay.core.engine import Engine
from relay.core.recorder import Recorder
from relay.dev.sandbox.server import DEFAULT_TOKEN, Faults, Sandbox, SandboxConfig
from relay.pg.store import AttemptRecord, ClaimedRow, RowResult, Store
from relay.settings import Secret
from tests.hostile_api import Behaviour, HostileApi
from tests.relaykit import (
    cli,
    relay_env,
    relay_settings,
    sample_updates,
    seed_rows,
    start_relay_process,
    states,
    wait_until,
)


def _attempt(row: ClaimedRow, message: str | None = None) -> AttemptRecord:
    return AttemptRecord(
        update_id=row.id,
        claim_token=row.token,
        action_id=row.action_id,
        target=row.target,
        attempt=row.requests + 1,
        started_at=datetime.now(UTC),
        duration_ms=1.0,
        http_status=204,
        outcome="delivered",
        error_code=None,
        error_message=message,
        response_body=None,
    )


def _delivered(row: ClaimedRow) -> RowResult:
    return RowResult(
        row.id, row.token, "delivered", requests=1, charged=1, http_status=204, action_id=row.action_id
    )


async def _claim(store: Store, n: int, send_now: int = 0) -> list[ClaimedRow]:
    return await store.claim("default", n, 30.0, uuid.uuid4(), "test-relay", send_now)


async def test_a_result_postgresql_refuses_is_released_and_every_other_result_lands(
    database_url: str, db: psycopg.Connection, store: Store
) -> None:
    seed_rows(database_url, sample_updates(20))
    # A rule the relay knows nothing of: PostgreSQL refuses one attempt row, and with it the batch.
    db.execute("alter table outbox.delivery_attempts add constraint no_evil check (error_message <> 'EVIL')")
    rows = await _claim(store, 20, send_now=20)
    counted: list[str] = []
    recorder = Recorder(store, "test-relay", 100, counted.append)
    for i, row in enumerate(rows):
        recorder.add(_delivered(row), [_attempt(row, "EVIL" if i == 7 else None)])
    recorded = await recorder.flush()
    assert recorded == 20  # 19 results, plus the release of the refused one
    assert states(database_url) == {"delivered": 19, "pending": 1}
    assert counted == ["default"] and recorder.refused == 1
    refused = db.execute(
        "select action_id, outcome_unknown, last_error, requests, claim_token from outbox.action_status_updates "
        "where state = 'pending'"
    ).fetchone()
    assert refused is not None and refused[0] == rows[7].action_id
    assert refused[1] is True  # the request was answered but its answer is lost: may have landed
    assert refused[2].startswith("the result could not be recorded") and "no_evil" in refused[2]
    assert refused[3] == 1 and refused[4] is None
    attempts = db.execute(
        "select outcome, error_code from outbox.delivery_attempts where update_id = %s", (rows[7].id,)
    ).fetchall()
    assert attempts == [("unknown", "UNRECORDABLE")]
    assert db.execute("select count(*) from outbox.delivery_attempts").fetchone() == (20,)


async def test_a_row_deleted_while_in_flight_does_not_block_the_batch(
    database_url: str, db: psycopg.Connection, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    seed_rows(database_url, sample_updates(10))
    rows = await _claim(store, 10, send_now=10)
    db.execute("delete from outbox.action_status_updates where id = %s", (rows[3].id,))
    dropped: list[str] = []
    unwritable: list[str] = []
    recorder = Recorder(store, "test-relay", 100, unwritable.append, dropped.append)
    for row in rows:
        recorder.add(_delivered(row), [_attempt(row)])
    with caplog.at_level(logging.WARNING, logger="relay.engine"):
        assert await recorder.flush() == 9
    assert states(database_url) == {"delivered": 9}
    assert recorder.results == [] and recorder.attempts == []  # nothing kept to block the next flush
    assert db.execute("select count(*) from outbox.delivery_attempts").fetchone() == (9,)
    # Dropped in the one statement, not refused and retried row by row; reported once.
    assert dropped == ["default"] and recorder.gone == 1
    assert unwritable == [] and recorder.refused == 0
    lines = [r.getMessage() for r in caplog.records]
    assert [
        getattr(r, "rows", None) for r in caplog.records if r.getMessage().startswith("results dropped")
    ] == [1]
    assert not any("one by one" in m or "lease ran out" in m for m in lines)


async def test_attempt_rows_of_rows_the_database_lost_are_dropped_with_the_rest_written(
    database_url: str, db: psycopg.Connection, store: Store
) -> None:
    # What a promoted standby looks like to a relay that claimed on the old primary: the rows
    # never replicated are not there at all, and only attempt rows (a retry's) may come back.
    seed_rows(database_url, sample_updates(6))
    rows = await _claim(store, 6, send_now=6)
    db.execute("delete from outbox.action_status_updates where id = any(%s)", ([rows[0].id, rows[5].id],))
    dropped: list[str] = []
    recorder = Recorder(store, "test-relay", 100, dropped=dropped.append)
    for row in rows[:3]:
        recorder.add(_delivered(row), [_attempt(row)])
    for row in rows[3:]:
        recorder.add(None, [_attempt(row)])
    assert await recorder.flush() == 2
    assert sorted(dropped) == ["default", "default"] and recorder.gone == 2
    written = db.execute("select update_id from outbox.delivery_attempts order by update_id").fetchall()
    assert [w[0] for w in written] == [r.id for r in rows[1:5]]
    assert await recorder.flush() == 0 and recorder.gone == 2  # nothing kept, nothing counted twice


async def test_results_for_a_row_whose_id_now_names_another_action_are_dropped(
    database_url: str, db: psycopg.Connection, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # After a failover the promoted standby's sequence can hand a lost row's id to a new row.
    seed_rows(database_url, sample_updates(2))
    rows = await _claim(store, 2, send_now=2)
    db.execute("delete from outbox.action_status_updates where id = %s", (rows[0].id,))
    db.execute(
        "insert into outbox.action_status_updates (id, action_id, status) overriding system value "
        "values (%s, 'someone-else', 'SUCCESS')",
        (rows[0].id,),
    )
    dropped: list[str] = []
    recorder = Recorder(store, "test-relay", 100, dropped=dropped.append)
    recorder.add(_delivered(rows[0]), [_attempt(rows[0])])
    recorder.add(_delivered(rows[1]), [_attempt(rows[1])])
    assert await recorder.flush() == 1
    assert dropped == ["default"] and recorder.gone == 1
    # A row released unsent (a result without attempt rows) is recognised by its action too.
    recorder.add(RowResult(rows[0].id, rows[0].token, "pending", action_id=rows[0].action_id), [])
    with caplog.at_level(logging.WARNING, logger="relay.engine"):
        assert await recorder.flush() == 0
    assert recorder.gone == 2
    assert not any("lease ran out" in r.getMessage() for r in caplog.records)
    other = db.execute(
        "select state, claim_token from outbox.action_status_updates where id = %s", (rows[0].id,)
    ).fetchone()
    assert other == ("pending", None)  # the new row is untouched
    written = db.execute("select update_id, action_id from outbox.delivery_attempts").fetchall()
    assert written == [(rows[1].id, rows[1].action_id)]  # nothing recorded against the other action


async def test_a_write_cancelled_midway_still_lands(
    database_url: str, db: psycopg.Connection, store: Store
) -> None:
    seed_rows(database_url, sample_updates(5))
    rows = await _claim(store, 5, send_now=5)
    recorder = Recorder(store, "test-relay", 100)
    for row in rows:
        recorder.add(_delivered(row), [_attempt(row)])
    with psycopg.connect(database_url) as blocker:
        blocker.execute("select 1 from outbox.action_status_updates where id = %s for update", (rows[0].id,))
        flush = asyncio.create_task(recorder.flush())
        # Wait until the write is really waiting for the lock, then cancel its caller.
        waiting = await asyncio.to_thread(
            wait_until,
            lambda: (
                db.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()"
                ).fetchone()
                == (1,)
            ),
            30,
        )
        assert waiting
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        blocker.rollback()
    await recorder.settle()
    assert states(database_url) == {"delivered": 5}
    assert db.execute("select count(*) from outbox.delivery_attempts").fetchone() == (5,)


async def test_only_a_row_marked_as_sent_is_ambiguous_after_its_lease_ran_out(
    database_url: str, db: psycopg.Connection, store: Store
) -> None:
    seed_rows(database_url, sample_updates(4))
    first = await _claim(store, 4, send_now=2)
    assert sorted(r.marked for r in first) == [False, False, True, True]
    db.execute("update outbox.action_status_updates set next_attempt_at = now() - interval '1 second'")
    again = await store.claim("default", 4, 30.0, uuid.uuid4(), "second-relay", 0)
    by_id = {r.id: r for r in again}
    for row in first:
        assert by_id[row.id].outcome_unknown is row.marked
        assert by_id[row.id].requests == (1 if row.marked else 0)
    lost = db.execute(
        "select update_id, attempt, outcome, error_code, relay_id, http_status from outbox.delivery_attempts"
    ).fetchall()
    assert sorted(lost) == sorted(
        (r.id, 1, "unknown", "LeaseExpired", "test-relay", None) for r in first if r.marked
    )


async def test_an_unknown_id_held_but_never_sent_ends_dead_not_delivered(
    database_url: str, db: psycopg.Connection, store: Store
) -> None:
    seed_rows(database_url, [("unknown-held", "SUCCESS", []), ("unknown-sent", "SUCCESS", [])])
    rows = await store.claim("default", 2, 30.0, uuid.uuid4(), "dead-relay", 0)
    sent = next(r for r in rows if r.action_id == "unknown-sent")
    assert await store.mark_sending([(sent.id, sent.token)]) == {sent.id}
    # The relay holding both dies; its lease runs out.
    db.execute("update outbox.action_status_updates set next_attempt_at = now() - interval '1 second'")
    with Sandbox(SandboxConfig()) as sb:
        settings = relay_settings(database_url, sb.url)
        engine = Engine(settings, store)
        try:
            await engine.run_once()
        finally:
            await engine.close()
    final = dict(db.execute("select action_id, state from outbox.action_status_updates").fetchall())
    assert final == {"unknown-held": "dead", "unknown-sent": "delivered"}
    outcomes = db.execute(
        "select u.action_id, d.attempt, d.outcome from outbox.delivery_attempts d "
        "join outbox.action_status_updates u on u.id = d.update_id order by 1, 2"
    ).fetchall()
    assert outcomes == [
        ("unknown-held", 1, "dead"),
        ("unknown-sent", 1, "unknown"),
        ("unknown-sent", 2, "delivered_earlier"),
    ]


async def test_a_requeued_dead_row_gets_a_fresh_retry_budget(
    database_url: str, db: psycopg.Connection
) -> None:
    seed_rows(database_url, [("old-1", "SUCCESS", [])])
    db.execute(
        "update outbox.action_status_updates set created_at = now() - interval '3 days', state = 'dead', "
        "dead_at = now() - interval '2 days', attempts = 20, requests = 20"
    )
    db.execute(
        "update outbox.action_status_updates set state = 'pending', dead_at = null, attempts = 0, "
        "requeued_at = now(), next_attempt_at = now()"
    )  # what `outbox-relay dead retry` does (tests/test_ops.py covers the command itself)
    with Sandbox(SandboxConfig(faults=Faults(p503=1.0))) as sb:
        settings = relay_settings(database_url, sb.url)  # retry.max_age: 12 h
        store = Store(Secret(database_url))
        engine = Engine(settings, store)
        try:
            await engine.run_once()
        finally:
            await engine.close()
            await store.close()
    row = db.execute("select state, attempts, last_error from outbox.action_status_updates").fetchone()
    assert row is not None
    assert row[:2] == ("pending", 1), row  # not dead: its budget counts from the re-queue
    assert "retrying" in row[2]


async def test_a_request_cut_off_at_shutdown_leaves_an_unknown_attempt_row(
    database_url: str, db: psycopg.Connection
) -> None:
    seed_rows(database_url, sample_updates(6))
    with Sandbox(SandboxConfig(faults=Faults(p_apply_hang=1.0, hang_seconds=30))) as sb:
        settings = relay_settings(database_url, sb.url, RELAY_REQUEST_TIMEOUT="20", RELAY_LEASE="60")
        store = Store(Secret(database_url))
        engine = Engine(settings, store)
        try:
            drain = asyncio.create_task(engine.run_once())
            assert await asyncio.to_thread(wait_until, lambda: len(sb.applied) == 6, 30)
            await engine.shutdown(grace=0.2)
            await asyncio.wait_for(drain, 30)
        finally:
            await engine.close()
            await store.close()
    rows = db.execute(
        "select state, outcome_unknown, requests, claim_token, sending_at from outbox.action_status_updates"
    ).fetchall()
    assert rows == [("pending", True, 1, None, None)] * 6
    attempts = db.execute(
        "select attempt, outcome, error_code, http_status from outbox.delivery_attempts"
    ).fetchall()
    assert attempts == [(1, "unknown", "Cancelled", None)] * 6


async def test_a_refusal_only_some_rows_get_is_theirs_and_never_pauses_the_target(
    database_url: str, db: psycopg.Connection
) -> None:
    forbidden = [(f"denied-{i}", "SUCCESS", []) for i in range(3)]
    seed_rows(database_url, forbidden + sample_updates(200))
    with Sandbox(SandboxConfig(seed=6)) as sb:
        settings = relay_settings(database_url, sb.url, RELAY_RETRY_MAX_ATTEMPTS="3")
        store = Store(Secret(database_url))
        engine = Engine(settings, store)
        try:
            for _ in range(300):
                await engine.run_once()
                if set(states(database_url)) <= {"delivered", "dead"}:
                    break
                await asyncio.sleep(0.05)
        finally:
            await engine.close()
            await store.close()
    assert states(database_url) == {"delivered": 200, "dead": 3}
    assert max(sb.apply_count.values()) == 1
    dead = db.execute(
        "select action_id, attempts, last_http_status, last_error from outbox.action_status_updates "
        "where state = 'dead' order by 1"
    ).fetchall()
    for action_id, attempts, status, last_error in dead:
        assert action_id.startswith("denied-") and (attempts, status) == (3, 403)
        assert "gave up after 3 attempts" in last_error and "FORBIDDEN" in last_error
    bodies = db.execute(
        "select count(*) from outbox.delivery_attempts where http_status = 403 and response_body like '%FORBIDDEN%'"
    ).fetchone()
    assert bodies is not None and bodies[0] >= 9  # every refusal recorded with the API's answer


@pytest.mark.chaos
def test_after_kill_9_only_requests_that_left_are_ambiguous(database_url: str, tmp_path: Path) -> None:
    ids = [f"unknown-{i:02d}" for i in range(10)]  # the API answers 404 for every one of them
    slow = Behaviour(404, b"", drip=1.0, drip_head=True)  # a head that takes seconds to arrive
    with HostileApi({"unknown-": slow}) as api:
        first = start_relay_process(
            relay_env(
                database_url,
                api.url,
                RELAY_MAX_CONCURRENCY="2",
                RELAY_REQUEST_TIMEOUT="3",
                RELAY_LEASE="5",
                RELAY_ID="killed",
            ),
            tmp_path / "killed.log",
        )
        try:
            seed_rows(database_url, [(a, "SUCCESS", []) for a in ids])
            # Two requests in flight (concurrency 2), two more rows claimed and waiting for a slot.
            assert api.wait_for(lambda: api.request_total == 2, 30), (tmp_path / "killed.log").read_text()
            first.send_signal(signal.SIGKILL)
            first.wait(15)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(15)
        reached = {a for a, n in api.requests.items() if n}
        with psycopg.connect(database_url) as conn:
            in_flight = "select action_id from outbox.action_status_updates where state = 'in_flight'"
            held = {a for (a,) in conn.execute(in_flight).fetchall()}
        api.behaviours.clear()  # from now on the API answers at once: 404
        second = start_relay_process(
            relay_env(database_url, api.url, RELAY_ID="second"), tmp_path / "second.log"
        )
        try:
            assert wait_until(lambda: set(states(database_url)) <= {"delivered", "dead"}, 60)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    assert len(reached) == 2 and reached < held and len(held) == 4
    with psycopg.connect(database_url) as conn:
        final = dict(conn.execute("select action_id, state from outbox.action_status_updates").fetchall())
        attempts = conn.execute(
            "select u.action_id, d.attempt, d.outcome, d.error_code, d.reached_api, d.relay_id "
            "from outbox.delivery_attempts d join outbox.action_status_updates u on u.id = d.update_id "
            "order by 1, 2"
        ).fetchall()
    # A request that left may have been applied: the 404 then means delivered, as the contract says.
    # A row the killed relay held but never sent is not ambiguous: its 404 means dead.
    assert final == {a: "delivered" if a in reached else "dead" for a in ids}
    for a in reached:
        assert [r[1:] for r in attempts if r[0] == a] == [
            (1, "unknown", "LeaseExpired", "maybe", "killed"),
            (2, "delivered_earlier", "NOT_FOUND", "answered", "second"),
        ]
    for a in set(ids) - reached:
        assert [r[1:] for r in attempts if r[0] == a] == [(1, "dead", "NOT_FOUND", "answered", "second")]
    audit = cli("audit", sorted(reached)[0], "--json", env={"RELAY_DATABASE_URL": database_url})
    assert audit.returncode == 0, audit.stderr
    (update,) = json.loads(audit.stdout)["updates"]
    assert [a["reached_api"] for a in update["attempts"]] == ["maybe", "answered"]


class _SlowTokens:
    """A token source whose fetch (or, with ``first_stale``, whose renewal after the API refused the
    stale first token with a 401) takes ``cost`` seconds of the engine's clock: an OAuth endpoint
    that answers slowly."""

    can_renew = True

    def __init__(self, clock: _Clock, cost: float, good: str, *, first_stale: bool) -> None:
        self.clock, self.cost, self.good = clock, cost, good
        self.first_stale = first_stale
        self.fetches = 0

    async def token(self) -> str | None:
        self.fetches += 1
        if self.first_stale:
            return "stale-token"  # at once: the time goes on the renewal
        self.clock.offset += self.cost
        return self.good

    async def renew(self, rejected: str | None) -> str | None:
        self.fetches += 1
        self.clock.offset += self.cost
        return self.good


class _Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)


@pytest.mark.parametrize("where", ["token fetch", "401 renewal"])
async def test_no_request_leaves_when_the_token_used_up_the_lease(
    database_url: str, db: psycopg.Connection, where: str
) -> None:
    seed_rows(database_url, [("slow-token-1", "SUCCESS", [])])
    clock = _Clock()
    with Sandbox(SandboxConfig()) as sb:
        # lease 8 s, request deadline 2 s: a request needs 3 s of lease when it leaves.
        settings = relay_settings(database_url, sb.url)
        store = Store(Secret(database_url))
        client = ApiClient(settings.targets["default"])
        client.tokens = _SlowTokens(clock, 6.0, DEFAULT_TOKEN, first_stale=where == "401 renewal")
        engine = Engine(settings, store, clients={"default": client}, clock=clock)
        try:
            await engine.run_once()
        finally:
            await engine.close()
            await store.close()
        puts = [r for r in sb.requests if r.method == "PUT"]
    row = db.execute(
        "select state, requests, attempts, claim_token, sending_at from outbox.action_status_updates"
    ).fetchone()
    attempts = db.execute("select outcome, http_status from outbox.delivery_attempts").fetchall()
    if where == "token fetch":
        assert puts == [] and attempts == []  # 6 s of an 8 s lease went on the token: not sent
        assert row == ("pending", 0, 0, None, None)
    else:
        assert [r.status for r in puts] == [401]  # the renewal took 6 s: the second PUT stayed home
        assert attempts == [("reauth", 401)]
        assert row == ("pending", 1, 0, None, None)
