"""The partitioned ledger (migration 0006): partitions made ahead, rows routed, retention by
partition keeping what must stay, the report rollup against a brute-force count, and the upgrade
of a 0.1.0 database with its data."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.core.retention import cycle, maintain
from relay.pg.migrations import available
from relay.pg.store import Store
from relay.settings import Secret
from tests.relaykit import cli, wait_until

DAY = 86400.0
ATTEMPT_COLUMNS = (
    "id, update_id, action_id, target, attempt, started_at, duration_ms, http_status, outcome, "
    "error_code, error_message, response_body, relay_id, reached_api, db_role"
)


def _month(d: datetime) -> str:
    return f"delivery_attempts_{d.year:04d}_{d.month:02d}"


def _add_months(d: datetime, n: int) -> datetime:
    m = d.month - 1 + n
    return d.replace(
        year=d.year + m // 12, month=m % 12 + 1, day=1, hour=0, minute=0, second=0, microsecond=0
    )


def _partition_of(db: psycopg.Connection, attempt_id: int) -> str:
    row = db.execute(
        "select tableoid::regclass::text from outbox.delivery_attempts where id = %s", (attempt_id,)
    ).fetchone()
    assert row is not None
    return str(row[0]).removeprefix("outbox.")


def _update(
    db: psycopg.Connection,
    action_id: str,
    *,
    state: str,
    at: datetime,
    status: str = "SUCCESS",
    errors: list[dict[str, str]] | None = None,
    requests: int = 1,
) -> int:
    """A row as the relay leaves it, finished (or last tried) at ``at``, with ``requests`` attempts
    dated up to ``at`` (as the owner, who may write history)."""
    row = db.execute(
        "select outbox.enqueue_action_status(%s, %s, %s::jsonb)",
        (action_id, status, json.dumps(errors or [])),
    ).fetchone()
    assert row is not None
    uid = int(row[0])
    db.execute(
        "update outbox.action_status_updates set state = %s, attempts = %s, requests = %s, created_at = %s, "
        "delivered_at = case when %s = 'delivered' then %s::timestamptz end, "
        "dead_at = case when %s = 'dead' then %s::timestamptz end, "
        "next_attempt_at = %s where id = %s",
        (state, requests, requests, at - timedelta(minutes=requests), state, at, state, at, at, uid),
    )
    for n in range(1, requests + 1):
        last = n == requests
        outcome = {"delivered": "delivered", "dead": "dead"}.get(state, "retry") if last else "retry"
        db.execute(
            "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, "
            "duration_ms, http_status, outcome, error_code, relay_id, reached_api) "
            "values (%s, %s, 'default', %s, %s, 12.5, %s, %s, %s, 'r1', 'answered')",
            (
                uid,
                action_id,
                n,
                at - timedelta(minutes=requests - n),
                204 if outcome == "delivered" else 400 if outcome == "dead" else 503,
                outcome,
                None
                if outcome == "delivered"
                else "ORDER_IN_WRONG_STATE"
                if outcome == "dead"
                else "HTTP_503",
            ),
        )
    return uid


def _attempts_of(db: psycopg.Connection, uid: int) -> list[tuple[Any, ...]]:
    return db.execute(
        f"select {ATTEMPT_COLUMNS} from outbox.delivery_attempts where update_id = %s order by id", (uid,)
    ).fetchall()


# -- partitions -----------------------------------------------------------------------------
def test_partitions_exist_for_this_month_and_the_next_two_and_rows_land_in_their_month(
    db: psycopg.Connection,
) -> None:
    now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
    names = [r[0] for r in db.execute("select name from outbox.attempt_partitions where not is_default")]
    assert names == [_month(_add_months(now, k)) for k in range(3)]
    assert db.execute("select name from outbox.attempt_partitions where is_default").fetchall() == [
        ("delivery_attempts_default",)
    ]
    uid = _update(db, "a-now", state="delivered", at=now)
    (attempt,) = db.execute("select id from outbox.delivery_attempts where update_id = %s", (uid,)).fetchone()  # type: ignore[misc]
    assert _partition_of(db, attempt) == _month(now)
    # ensuring again creates nothing
    assert db.execute("select * from outbox.ensure_attempt_partitions(2)").fetchall() == []


def test_a_row_no_partition_covers_lands_in_the_default_and_moves_when_its_month_is_made(
    db: psycopg.Connection,
) -> None:
    now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
    long_ago = now - timedelta(days=3 * 365)
    uid = _update(db, "a-old", state="delivered", at=long_ago, requests=3)
    before = _attempts_of(db, uid)
    assert {_partition_of(db, a[0]) for a in before} == {"delivery_attempts_default"}
    made = [r[0] for r in db.execute("select * from outbox.ensure_attempt_partitions(2, %s)", (long_ago,))]
    assert made[0] == _month(long_ago) and len(made) >= 36
    assert _attempts_of(db, uid) == before, "every column of every row kept"
    assert {_partition_of(db, a[0]) for a in before} == {_month(long_ago)}
    assert db.execute("select count(*) from outbox.delivery_attempts_default").fetchone() == (0,)


def test_ensure_refuses_nonsense_arguments(db: psycopg.Connection) -> None:
    for args in ("(-1)", "(25)", "(2, now() - interval '30 years')"):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            db.execute(f"select * from outbox.ensure_attempt_partitions{args}")


# -- retention by partition -----------------------------------------------------------------
async def test_retention_drops_old_partitions_whole_and_keeps_the_attempts_of_rows_still_held(
    database_url: str, store: Store
) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        db.execute("select * from outbox.ensure_attempt_partitions(2, %s)", (now - timedelta(days=200),))
        old = now - timedelta(days=120)
        gone = [_update(db, f"old-delivered-{i}", state="delivered", at=old, requests=2) for i in range(20)]
        dead = _update(db, "old-dead", state="dead", at=old, requests=3)
        retrying = _update(db, "old-retrying", state="pending", at=old, requests=4)
        recent = _update(db, "recent", state="delivered", at=now - timedelta(days=2))
        kept_before = {uid: _attempts_of(db, uid) for uid in (dead, retrying, recent)}
        partitions_before = [r[0] for r in db.execute("select name from outbox.attempt_partitions")]
        total_before = db.execute("select count(*) from outbox.delivery_attempts").fetchone()[0]  # type: ignore[index]

    seen: list[tuple[str, int, int]] = []
    done = await cycle(store, 30 * DAY, False, 7, dropped=lambda *step: seen.append(step))

    cutoff = now - timedelta(days=30)
    with psycopg.connect(database_url, autocommit=True) as db:
        parts = db.execute("select name, to_time from outbox.attempt_partitions").fetchall()
        assert all(to_time is None or to_time > cutoff for _, to_time in parts), (
            "every partition that ended before the cutoff dropped"
        )
        dropped = sorted(set(partitions_before) - {name for name, _ in parts})
        assert dropped == sorted(
            name for name, _, _ in done.partitions if name != "delivery_attempts_default"
        )
        assert _month(old) in dropped
        assert done.updates == 20, (
            "the delivered rows, not the dead one (include_dead off) nor the pending one"
        )
        assert db.execute(
            "select count(*) from outbox.action_status_updates where action_id like 'old-delivered-%%'"
        ).fetchone() == (0,)
        assert db.execute(
            "select count(*) from outbox.delivery_attempts where update_id = any(%s)", (gone,)
        ).fetchone() == (0,)
        for uid, rows in kept_before.items():
            assert _attempts_of(db, uid) == rows, f"update {uid} keeps every attempt row, unchanged"
        assert {_partition_of(db, a[0]) for a in kept_before[dead]} == {"delivery_attempts_default"}
        kept = sum(k for _, _, k in done.partitions)
        assert kept == 3 + 4
        total_after = db.execute("select count(*) from outbox.delivery_attempts").fetchone()[0]  # type: ignore[index]
        assert total_before - total_after == 20 * 2 == done.attempts
    assert seen == done.partitions

    # the dead row purged later (include_dead): its kept attempts go with the default partition
    again = await cycle(store, 30 * DAY, True, 100)
    assert again.updates == 1 and again.partitions == [("delivery_attempts_default", 3, 0)]
    with psycopg.connect(database_url) as db:
        assert _attempts_of(db, retrying) == kept_before[retrying]
        assert db.execute("select count(*) from outbox.delivery_attempts_default").fetchone() == (4,)
    assert (await cycle(store, 30 * DAY, True, 100)).partitions == []


def test_a_retention_step_killed_midway_changes_nothing(database_url: str) -> None:
    """The backend running drop_old_attempts is terminated while it holds the partition: the
    transaction rolls back, every row is where it was, and the next run completes."""
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        old = now - timedelta(days=100)
        db.execute("select * from outbox.ensure_attempt_partitions(2, %s)", (old,))
        kept = _update(db, "held", state="pending", at=old, requests=2)
        db.execute(
            "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, "
            "duration_ms, outcome, relay_id) select 0, 'orphan-' || g, 'default', 1, %s, 1, 'delivered', 'r' "
            "from generate_series(1, 20000) g",
            (old,),
        )
        before = db.execute(
            "select tableoid::regclass::text, count(*) from outbox.delivery_attempts group by 1 order by 1"
        ).fetchall()
        blocker = psycopg.connect(database_url)  # a reader of the ledger: the step's detach waits for it
        blocker.execute("select * from outbox.delivery_attempts limit 1")

        worker = psycopg.connect(database_url, autocommit=True)
        pid = worker.info.backend_pid
        errors: list[BaseException] = []

        def step() -> None:
            try:
                worker.execute("select * from outbox.drop_old_attempts('30 days')")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=step)
        thread.start()
        try:
            assert wait_until(
                lambda: (
                    db.execute(
                        "select count(*) from pg_locks where pid = %s and not granted", (pid,)
                    ).fetchone()[0]  # type: ignore[index]
                    > 0
                ),
                20,
            ), "the retention step never waited"
        finally:
            db.execute("select pg_terminate_backend(%s)", (pid,))
            thread.join(20)
            blocker.close()
        assert errors and isinstance(errors[0], psycopg.OperationalError)
        after = db.execute(
            "select tableoid::regclass::text, count(*) from outbox.delivery_attempts group by 1 order by 1"
        ).fetchall()
        assert after == before
        assert db.execute(
            "select count(*) from outbox.delivery_attempts where update_id = %s", (kept,)
        ).fetchone() == (2,)
        steps = db.execute("select * from outbox.drop_old_attempts('30 days')").fetchall()
        assert steps == [(_month(old), 20002, 2)]


def test_purge_keeps_a_delivered_row_until_its_day_is_counted(db: psycopg.Connection) -> None:
    """A delivered row is purged once its UTC day ended more than an hour ago (the rollup counts
    it first), however small older_than is."""
    now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
    young = now - timedelta(minutes=61)  # older than the 1 hour asked, in a day that has rarely ended
    day_end = datetime.combine(young.astimezone(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    countable = day_end <= now - timedelta(hours=1)
    _update(db, "young", state="delivered", at=young)
    _update(db, "counted", state="delivered", at=now - timedelta(days=2))
    rows = db.execute("select updates from outbox.purge_finished('1 hour', false, 100)").fetchall()
    assert rows == [(2 if countable else 1,)]
    left = [r[0] for r in db.execute("select action_id from outbox.action_status_updates")]
    assert left == ([] if countable else ["young"])


# -- the report rollup ----------------------------------------------------------------------
def _brute_force(rows: list[tuple[date, str, str, list[str]]]) -> Counter[tuple[date, str, str, str | None]]:
    counts: Counter[tuple[date, str, str, str | None]] = Counter()
    for day, target, status, codes in rows:
        counts[(day, target, status, None)] += 1
        for code in set(codes):
            counts[(day, target, status, code)] += 1
    return counts


def test_the_report_matches_a_brute_force_count_before_and_after_rollup_and_retention(
    database_url: str,
) -> None:
    rng = random.Random(15)
    codes = ["ORDER_IN_WRONG_STATE", "DATA_NOT_FOUND", "OTHER", "UNAVAILABLE"]
    written: list[tuple[date, str, str, list[str]]] = []
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        db.execute("select * from outbox.ensure_attempt_partitions(2, %s)", (now - timedelta(days=10),))
        for i in range(400):
            at = now - timedelta(days=rng.randrange(0, 8), hours=rng.random() * 23)
            target = rng.choice(["default", "eu", "us.east"])
            failed = rng.random() < 0.4
            errors = (
                [{"code": rng.choice(codes), "message": f"m{k}"} for k in range(rng.randint(1, 3))]
                if failed
                else []
            )
            uid = _update(
                db,
                f"r-{i}",
                state="delivered",
                at=at,
                status="FAILED" if failed else "SUCCESS",
                errors=errors,
            )
            db.execute("update outbox.action_status_updates set target = %s where id = %s", (target, uid))
            written.append(
                (
                    at.astimezone(UTC).date(),
                    target,
                    "FAILED" if failed else "SUCCESS",
                    [e["code"] for e in errors],
                )
            )
        _update(db, "dead-one", state="dead", at=now - timedelta(days=3))  # not a report
        expected = _brute_force(written)

        def report() -> Counter[tuple[date, str, str, str | None]]:
            got: Counter[tuple[date, str, str, str | None]] = Counter()
            for day, target, status, code, n in db.execute(
                "select day, target, status, error_code, reports from outbox.delivery_report"
            ):
                got[(day, target, status, code)] += n
            return got

        assert db.execute("select count(*) from outbox.report_days").fetchone() == (0,)
        assert report() == expected, "all counted live before any rollup"
        rolled = db.execute("select day, reports from outbox.rollup_reports(3)").fetchall()
        assert len(rolled) == 3
        assert report() == expected, "rolled days and live days together"
        db.execute("select * from outbox.rollup_reports(31)")
        last = db.execute("select max(day) from outbox.report_days").fetchone()[0]  # type: ignore[index]
        assert last is not None and last < (now - timedelta(hours=1)).astimezone(UTC).date()
        assert report() == expected
        assert set(db.execute("select rolled from outbox.delivery_report").fetchall()) <= {(True,), (False,)}
        # a month's question, as an auditor asks it
        first = min(d for d, *_ in written)
        by_code = dict(
            db.execute(
                "select coalesce(error_code, '*'), sum(reports)::bigint from outbox.delivery_report "
                "where day between %s and %s and status = 'FAILED' group by 1",
                (first, first + timedelta(days=30)),
            ).fetchall()
        )
        assert by_code["*"] == sum(1 for r in written if r[2] == "FAILED")
        for code in codes:
            assert by_code.get(code, 0) == sum(1 for r in written if code in r[3])
        purged = db.execute("select updates from outbox.purge_finished('1 hour', false, 1000)").fetchone()
        assert purged is not None and purged[0] > 0
        assert report() == expected, "retention deletes rows, not what was reported"


def test_two_rollups_at_once_count_each_day_once(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        for i in range(30):
            _update(db, f"d-{i}", state="delivered", at=now - timedelta(days=1 + i % 5))

    async def both() -> list[list[tuple[date, int]]]:
        stores = [Store(Secret(database_url), pool_size=1) for _ in range(2)]
        try:
            return list(await asyncio.gather(*(s.rollup_reports(31) for s in stores)))
        finally:
            for s in stores:
                await s.close()

    first, second = asyncio.run(both())
    days = [d for d, _ in first + second]
    assert len(days) == len(set(days)) >= 5
    with psycopg.connect(database_url) as db:
        assert db.execute("select sum(reports) from outbox.report_days").fetchone() == (30,)


# -- the relay's part -----------------------------------------------------------------------
async def test_maintenance_creates_missing_partitions_and_counts_ended_days(
    database_url: str, store: Store
) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        ahead = [_month(_add_months(now, k)) for k in (1, 2)]
        for name in ahead:
            db.execute(f"drop table outbox.{name}")
        _update(db, "yesterday", state="delivered", at=now - timedelta(days=2))
    done = await maintain(store)
    assert done.partitions == ahead
    assert done.days >= 1
    assert (await maintain(store)).partitions == []


def test_the_relay_role_may_run_maintenance_and_write_attempts_but_not_touch_partitions(
    db: psycopg.Connection,
) -> None:
    db.execute("create role relay_user login in role outbox_relay")
    now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
    uid = _update(db, "held", state="pending", at=now)
    with db.transaction():
        db.execute("set local role relay_user")
        db.execute("select * from outbox.ensure_attempt_partitions(3)")
        db.execute("select * from outbox.rollup_reports()")
        db.execute(
            "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, "
            "duration_ms, outcome, relay_id) values (%s, 'held', 'default', 2, now(), 1, 'retry', 'r')",
            (uid,),
        )
        db.execute("update outbox.action_status_updates set last_error_code = 'X' where false")
    for statement in (
        f"delete from outbox.{_month(now)}",
        f"select * from outbox.{_month(now)}",
        "delete from outbox.delivery_attempts",
        "insert into outbox.delivery_attempts (id, update_id, action_id, target, attempt, started_at, "
        "duration_ms, outcome, relay_id) values (1, 1, 'a', 'default', 1, now(), 1, 'retry', 'r')",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("set local role relay_user")
            db.execute(statement)


# -- the upgrade from 0.1.0 -----------------------------------------------------------------
def _migrate_to(url: str, version: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create schema outbox")
        conn.execute(
            "create table outbox.schema_migrations (version integer primary key, name text not null, "
            "checksum text not null, applied_at timestamptz not null default now())"
        )
        for m in available():
            if m.version > version:
                break
            with conn.transaction():
                conn.execute(m.sql)  # type: ignore[arg-type]
                conn.execute(
                    "insert into outbox.schema_migrations (version, name, checksum) values (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )


def test_a_0_1_0_database_is_converted_with_every_row(empty_database_url: str) -> None:
    url = empty_database_url
    _migrate_to(url, 5)
    with psycopg.connect(url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        uids = [
            _update(db, f"u-{i}", state=state, at=now - timedelta(days=days), requests=requests)
            for i, (state, days, requests) in enumerate(
                [
                    ("delivered", 400, 1),
                    ("delivered", 40, 3),
                    ("dead", 20, 2),
                    ("pending", 1, 2),
                    ("delivered", 0, 1),
                ]
            )
        ]
        ahead = now + timedelta(days=200)  # a relay's clock far ahead: beyond the 0.1.0 partition
        db.execute(
            "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, duration_ms, "
            "outcome, relay_id) values (%s, 'u-4', 'default', 2, %s, 1, 'retry', 'r')",
            (uids[4], ahead),
        )
        before = db.execute(f"select {ATTEMPT_COLUMNS} from outbox.delivery_attempts order by id").fetchall()
        top = max(r[0] for r in before)

    result = cli("migrate", env={"RELAY_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr

    with psycopg.connect(url, autocommit=True) as db:
        assert (
            db.execute(f"select {ATTEMPT_COLUMNS} from outbox.delivery_attempts order by id").fetchall()
            == before
        )
        parts = dict(db.execute("select name, to_time from outbox.attempt_partitions").fetchall())
        first_of_next = _add_months(now.astimezone(UTC), 1)
        assert parts["delivery_attempts_legacy"] == first_of_next
        where = dict(
            db.execute("select id, tableoid::regclass::text from outbox.delivery_attempts").fetchall()
        )
        assert {v for k, v in where.items() if k != top} == {"outbox.delivery_attempts_legacy"}
        assert where[top] in ("outbox.delivery_attempts_default", f"outbox.{_month(ahead)}")
        assert db.execute(
            "select count(*) from pg_constraint where conrelid = 'outbox.delivery_attempts'::regclass and contype = 'f'"
        ).fetchone() == (0,)
        new = _update(db, "after", state="delivered", at=now)
        (new_id,) = db.execute(
            "select min(id) from outbox.delivery_attempts where update_id = %s", (new,)
        ).fetchone()  # type: ignore[misc]
        assert new_id > top, "ids continue after the 0.1.0 table's"
        assert db.execute(
            "select action_id, last_error_code from outbox.action_status_updates where last_error_code is not null"
        ).fetchall() == [("u-2", "ORDER_IN_WRONG_STATE")]
        db.execute("create role auditor_user login in role outbox_auditor")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("set local role auditor_user")
            db.execute("delete from outbox.delivery_attempts")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("set local role auditor_user")
            db.execute("select count(*) from outbox.delivery_attempts_legacy")
    audit = cli("audit", "u-1", "--json", env={"RELAY_DATABASE_URL": url})
    assert audit.returncode == 0, audit.stderr
    assert [a["attempt"] for a in json.loads(audit.stdout)["updates"][0]["attempts"]] == [1, 2, 3]
    dead = cli("dead", "list", "--code", "order_in_wrong_state", "--json", env={"RELAY_DATABASE_URL": url})
    assert dead.returncode == 0, dead.stderr
    assert [d["action_id"] for d in json.loads(dead.stdout)["dead"]] == ["u-2"]


def test_dead_retry_by_code_finds_rows_recorded_without_last_error_code(db: psycopg.Connection) -> None:
    """Rows recorded by a relay older than 0006 (a rolling upgrade) have no last_error_code:
    --code falls back to the last attempt's code."""
    now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
    uid = _update(db, "old-relay", state="dead", at=now - timedelta(hours=3), requests=2)
    assert db.execute(
        "select last_error_code from outbox.action_status_updates where id = %s", (uid,)
    ).fetchone() == (None,)
    rows = db.execute(
        "select action_id from outbox.requeue_dead(0, 10, 'test', null, null, 'order_in_wrong_state')"
    ).fetchall()
    assert rows == [("old-relay",)]


def test_a_relay_delivers_while_retention_drops_months_and_nothing_is_lost_or_doubled(
    database_url: str, tmp_path: Path
) -> None:
    """The relay makes the missing partitions at start, then delivers 1,500 rows while an
    operator's retention drops six old months under it: every delivered row has exactly one
    attempt row, none was applied twice, the rows retention must keep are all there."""
    from relay.dev.sandbox.server import Sandbox, SandboxConfig
    from tests.relaykit import (
        relay_env,
        relay_processes,
        sample_updates,
        seed_rows,
        start_relay_process,
        states,
    )

    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        ahead = _month(_add_months(now, 2))
        db.execute(f"drop table outbox.{ahead}")
        db.execute("select * from outbox.ensure_attempt_partitions(0, %s)", (now - timedelta(days=220),))
        held = [
            _update(db, f"held-{i}", state="dead", at=now - timedelta(days=40 + 30 * i), requests=3)
            for i in range(6)
        ]
        kept = {uid: _attempts_of(db, uid) for uid in held}
        for k in range(6):
            db.execute(
                "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, "
                "duration_ms, outcome, relay_id) select -g, 'gone-' || g, 'default', 1, %s, 1, 'delivered', 'r' "
                "from generate_series(1, 30000) g",
                (now - timedelta(days=45 + 30 * k),),
            )
    updates = sample_updates(1500, prefix="live")
    log = tmp_path / "relay.log"
    with Sandbox(SandboxConfig(seed=5)) as sandbox, relay_processes() as procs:
        procs.append(start_relay_process(relay_env(database_url, sandbox.url, RELAY_LOG_LEVEL="INFO"), log))

        def partitions() -> set[str]:
            with psycopg.connect(database_url) as db:
                return {r[0] for r in db.execute("select name from outbox.attempt_partitions")}

        assert wait_until(lambda: ahead in partitions(), 30), (
            "the maintenance job made next months' partitions"
        )
        seed_rows(database_url, updates)
        dropped: list[tuple[str, int, int]] = []

        async def retention() -> None:
            store = Store(Secret(database_url), pool_size=1)
            try:
                while states(database_url).get("delivered", 0) < 1500:
                    dropped.extend((await cycle(store, 30 * DAY, False, 100)).partitions)
                    await asyncio.sleep(0.05)
            finally:
                await store.close()

        async def bounded() -> None:
            await asyncio.wait_for(retention(), 120)

        asyncio.run(bounded())
        assert states(database_url) == {"delivered": 1500, "dead": 6}
        applied_twice = sandbox.duplicates
    assert applied_twice == 0
    assert len([p for p, _, _ in dropped if p != "delivery_attempts_default"]) >= 6
    with psycopg.connect(database_url) as db:
        assert db.execute(
            "select count(*), count(distinct update_id) from outbox.delivery_attempts where action_id like 'live-%%'"
        ).fetchone() == (1500, 1500), "one attempt row per delivered row: none lost, none written twice"
        for uid, rows in kept.items():
            assert _attempts_of(db, uid) == rows
        assert db.execute(
            "select count(*) from outbox.delivery_attempts where action_id like 'gone-%%'"
        ).fetchone() == (0,)
    text = log.read_text()
    assert "attempt partitions created" in text and ahead in text
    assert " ERROR " not in text and "Traceback" not in text, text[-2000:]


def test_two_relays_making_partitions_at_once_make_each_once(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        for k in (1, 2):
            db.execute(f"drop table outbox.{_month(_add_months(now, k))}")

    async def both() -> list[list[str]]:
        stores = [Store(Secret(database_url), pool_size=1) for _ in range(2)]
        try:
            return list(await asyncio.gather(*(s.ensure_partitions(6) for s in stores)))
        finally:
            for s in stores:
                await s.close()

    made = [name for names in asyncio.run(both()) for name in names]
    assert sorted(made) == [_month(_add_months(now, k)) for k in range(1, 7)]


def test_the_big_table_procedure_lets_the_migration_skip_its_index_build(empty_database_url: str) -> None:
    """README "Upgrading to 0006": the column and the index made beforehand (CONCURRENTLY) are
    kept by the migration, which builds nothing; an index a failed concurrent build left (invalid)
    is dropped and built again."""
    from tests.test_readme import section

    upgrading = section("Upgrading").split("### Upgrading to 0006: the partitioned ledger", 1)[1]
    block = re.search(r"```sql\n(.*?)```", upgrading, re.DOTALL)
    assert block and "concurrently" in block.group(1)
    for invalid in (False, True):
        url = empty_database_url
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("drop schema if exists outbox cascade")
        _migrate_to(url, 5)
        with psycopg.connect(url, autocommit=True) as db:
            now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
            _update(db, "dead-before", state="dead", at=now - timedelta(days=3), requests=2)
            for statement in block.group(1).split(";"):
                if statement.strip():
                    db.execute(statement)  # type: ignore[call-overload]
            made = db.execute("select to_regclass('outbox.action_status_updates_dead')::oid").fetchone()[0]  # type: ignore[index]
            if invalid:
                db.execute("update pg_index set indisvalid = false where indexrelid = %s", (made,))
        result = cli("migrate", env={"RELAY_DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        with psycopg.connect(url) as db:
            now_oid, valid = db.execute(
                "select indexrelid, indisvalid from pg_index "
                "where indexrelid = to_regclass('outbox.action_status_updates_dead')"
            ).fetchone()  # type: ignore[misc]
            assert valid and (now_oid != made) == invalid
            assert db.execute("select to_regclass('outbox.action_status_updates_dead_at')").fetchone() == (
                None,
            )
            assert db.execute(
                "select last_error_code from outbox.action_status_updates where action_id = 'dead-before'"
            ).fetchone() == ("ORDER_IN_WRONG_STATE",)


def test_check_warns_when_next_months_partition_is_missing(database_url: str) -> None:
    env = {"RELAY_DATABASE_URL": database_url, "RELAY_API_TOKEN": "t0ken"}
    with psycopg.connect(database_url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        for k in (1, 2):
            db.execute(f"drop table outbox.{_month(_add_months(now, k))}")
    result = cli("check", env=env)
    assert result.returncode == 0, result.stderr
    assert "ok  attempt partitions: 1 monthly, through" in result.stdout
    assert (
        "warn no attempt partition for next month yet: the relays' maintenance job has not run"
        in result.stdout
    )
