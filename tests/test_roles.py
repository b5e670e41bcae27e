"""The four group roles get what they need and nothing more, each tried through its own login.

Every test connects as a login role that is a member of one group role (created here, dropped
afterwards), exactly as a deployment would: ``create role relay_svc login ... in role outbox_relay``.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import psycopg.errors
import pytest

from relay.cli.ops import purge, retry_dead
from relay.core.retention import cycle
from relay.dev.sandbox.server import Sandbox, SandboxConfig
from relay.pg.migrations import available, migrate
from relay.pg.store import AttemptRecord, RowResult, Store
from relay.settings import Secret
from tests.conftest import Server
from tests.relaykit import (
    login_roles,
    relay_env,
    sample_updates,
    seed_rows,
    start_relay_process,
    states,
    url_as,
    wait_until,
)

GROUPS = ("outbox_writer", "outbox_relay", "outbox_operator", "outbox_auditor")
Logins = dict[str, str]  # group role (or "outsider") -> login role


@pytest.fixture(scope="module")
def logins(pg_server: Server) -> Iterator[Logins]:
    """One login role per group role, plus an outsider that belongs to none."""
    tag = uuid.uuid4().hex[:8]
    names = {group: f"t_{group.removeprefix('outbox_')}_{tag}" for group in GROUPS}
    names["outsider"] = f"t_outsider_{tag}"
    members = {login: (None if group == "outsider" else group) for group, login in names.items()}
    with login_roles(pg_server.admin_url, members):
        yield names


def seed(db: psycopg.Connection) -> dict[str, int]:
    """As the owner: p-1 pending, f-1 in flight under a live lease, d-1 dead, v-1 delivered two
    days ago, each finished row with one attempt."""
    ids: dict[str, int] = {}
    for name, status in (("p-1", "SUCCESS"), ("f-1", "SUCCESS"), ("d-1", "FAILED"), ("v-1", "SUCCESS")):
        errors = [] if status == "SUCCESS" else [{"code": "OTHER", "message": "refused"}]
        row = db.execute(
            "select outbox.enqueue_action_status(%s, %s, %s::jsonb)", (name, status, json.dumps(errors))
        ).fetchone()
        assert row is not None
        ids[name] = row[0]
    db.execute(
        "update outbox.action_status_updates set state = 'in_flight', claim_token = gen_random_uuid(), "
        "claimed_by = 'relay-x', next_attempt_at = now() + interval '10 minutes' where id = %s",
        (ids["f-1"],),
    )
    db.execute(
        "update outbox.action_status_updates set state = 'dead', dead_at = now() - interval '2 days', "
        "attempts = 1, requests = 1 where id = %s",
        (ids["d-1"],),
    )
    db.execute(
        "update outbox.action_status_updates set state = 'delivered', delivered_at = now() - interval '2 days', "
        "attempts = 1, requests = 1 where id = %s",
        (ids["v-1"],),
    )
    for name, outcome, code in (("d-1", "dead", "INVALID_INPUT"), ("v-1", "delivered", None)):
        db.execute(
            """insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at,
                   duration_ms, http_status, outcome, error_code, relay_id, reached_api)
               values (%s, %s, 'default', 1, now() - interval '2 days', 5, 400, %s, %s, 'relay-x', 'answered')""",
            (ids[name], name, outcome, code),
        )
    return ids


@pytest.fixture
def seeded(db: psycopg.Connection) -> dict[str, int]:
    return seed(db)


ATTEMPT = (
    "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, duration_ms, "
    "outcome, relay_id{extra}) select id, action_id, target, 9, now(), 1, 'retry', 'forged'{value} "
    "from outbox.action_status_updates where action_id = 'v-1'"
)
PRIV = psycopg.errors.InsufficientPrivilege
CHECK = psycopg.errors.CheckViolation
U = "update outbox.action_status_updates set "

# (group, statement, the refusal): what each role must not do.
FORBIDDEN: list[tuple[str, str, type[psycopg.Error]]] = [
    # the relay: only claims, results under a claim, attempts (as itself), heartbeats, reads
    ("outbox_relay", U + "state = 'delivered', delivered_at = now() where action_id = 'p-1'", CHECK),
    ("outbox_relay", U + "state = 'dead', dead_at = now() where action_id = 'p-1'", CHECK),
    ("outbox_relay", U + "last_error = 'x' where action_id = 'p-1'", CHECK),
    ("outbox_relay", U + "state = 'pending', delivered_at = null where action_id = 'v-1'", CHECK),
    (
        "outbox_relay",
        U + "claim_token = gen_random_uuid(), claimed_by = 'thief' where action_id = 'f-1'",
        CHECK,
    ),
    ("outbox_relay", U + "attempts = 0, requests = 0 where action_id = 'v-1'", CHECK),
    ("outbox_relay", U + "state = 'pending', dead_at = null, attempts = 0 where action_id = 'd-1'", PRIV),
    ("outbox_relay", U + "requeue_reason = 'x' where action_id = 'd-1'", PRIV),
    ("outbox_relay", U + "requeued_at = now() where action_id = 'd-1'", PRIV),
    ("outbox_relay", U + "requeued_by = 'someone' where action_id = 'd-1'", PRIV),
    ("outbox_relay", U + "status = 'FAILED'", PRIV),
    ("outbox_relay", U + "action_id = 'other'", PRIV),
    ("outbox_relay", "delete from outbox.action_status_updates where action_id = 'v-1'", PRIV),
    ("outbox_relay", "delete from outbox.delivery_attempts", PRIV),
    ("outbox_relay", "update outbox.delivery_attempts set outcome = 'delivered'", PRIV),
    ("outbox_relay", "truncate outbox.delivery_attempts", PRIV),
    ("outbox_relay", ATTEMPT.format(extra=", db_role", value=", 'someone else'"), PRIV),
    (
        "outbox_relay",
        "insert into outbox.action_status_updates (action_id, status) values ('x', 'SUCCESS')",
        PRIV,
    ),
    ("outbox_relay", "select * from outbox.requeue_dead(0, 10, 'relay wants it')", PRIV),
    ("outbox_relay", "select outbox.enqueue_action_status('x', 'SUCCESS')", PRIV),
    ("outbox_relay", "select * from outbox.requeues", PRIV),
    # the writer: writes outcomes and reads their state, nothing else
    ("outbox_writer", "select * from outbox.delivery_attempts", PRIV),
    ("outbox_writer", "select claim_token from outbox.action_status_updates", PRIV),
    ("outbox_writer", "select * from outbox.requeues", PRIV),
    ("outbox_writer", U + "state = 'dead', dead_at = now()", PRIV),
    ("outbox_writer", U + "attempts = 0", PRIV),
    ("outbox_writer", "delete from outbox.action_status_updates", PRIV),
    (
        "outbox_writer",
        "insert into outbox.action_status_updates (action_id, status, state, delivered_at) "
        "values ('f', 'SUCCESS', 'delivered', now())",
        PRIV,
    ),
    ("outbox_writer", "insert into outbox.error_codes values ('MINE', '')", PRIV),
    ("outbox_writer", "select * from outbox.purge_finished('30 days', true, 10)", PRIV),
    ("outbox_writer", "select * from outbox.requeue_dead(0, 10, 'x')", PRIV),
    # the auditor: reads, writes nothing
    ("outbox_auditor", "select outbox.enqueue_action_status('a-9', 'SUCCESS')", PRIV),
    (
        "outbox_auditor",
        "insert into outbox.action_status_updates (action_id, status) values ('a-9', 'SUCCESS')",
        PRIV,
    ),
    ("outbox_auditor", U + "last_error = 'x'", PRIV),
    ("outbox_auditor", U + "state = 'pending', dead_at = null where action_id = 'd-1'", PRIV),
    ("outbox_auditor", "delete from outbox.delivery_attempts", PRIV),
    ("outbox_auditor", ATTEMPT.format(extra="", value=""), PRIV),
    ("outbox_auditor", "insert into outbox.error_codes values ('MINE', '')", PRIV),
    ("outbox_auditor", "delete from outbox.relay_targets", PRIV),
    ("outbox_auditor", "select * from outbox.purge_finished('30 days', true, 10)", PRIV),
    ("outbox_auditor", "select * from outbox.requeue_dead(0, 10, 'x')", PRIV),
    # the operator: re-queues, purges through the function, reads; never rewrites history
    ("outbox_operator", "update outbox.delivery_attempts set outcome = 'delivered'", PRIV),
    ("outbox_operator", "delete from outbox.delivery_attempts", PRIV),
    ("outbox_operator", ATTEMPT.format(extra="", value=""), PRIV),
    ("outbox_operator", "delete from outbox.action_status_updates where action_id = 'v-1'", PRIV),
    ("outbox_operator", "delete from outbox.requeues", PRIV),
    ("outbox_operator", "update outbox.requeues set reason = 'x'", PRIV),
    (
        "outbox_operator",
        "insert into outbox.requeues (update_id, action_id, target, requeued_at, requeued_by, "
        "attempts) select id, action_id, target, now(), 'someone', 0 "
        "from outbox.action_status_updates",
        PRIV,
    ),
    ("outbox_operator", U + "state = 'delivered', delivered_at = now() where action_id = 'p-1'", PRIV),
    ("outbox_operator", U + "next_attempt_at = now() where action_id = 'p-1'", CHECK),
    ("outbox_operator", U + "state = 'pending' where action_id = 'v-1'", CHECK),
    ("outbox_operator", U + "requeued_by = 'someone else' where action_id = 'd-1'", PRIV),
    ("outbox_operator", U + "claim_token = null where action_id = 'f-1'", PRIV),
    (
        "outbox_operator",
        "insert into outbox.action_status_updates (action_id, status) values ('o', 'SUCCESS')",
        PRIV,
    ),
    ("outbox_operator", "select outbox.enqueue_action_status('o-9', 'SUCCESS')", PRIV),
    ("outbox_operator", "delete from outbox.error_codes where code = 'OTHER'", PRIV),
    # a login in no outbox role: nothing at all
    ("outsider", "select * from outbox.purge_finished('30 days', true, 10)", PRIV),
    ("outsider", "select * from outbox.requeue_dead(0, 10, 'x')", PRIV),
    ("outsider", "select outbox.enqueue_action_status('o-9', 'SUCCESS')", PRIV),
    ("outsider", "select * from outbox.delivery_audit", PRIV),
]


@pytest.mark.parametrize(("group", "sql", "refusal"), FORBIDDEN)
def test_each_role_is_refused_what_it_must_not_do(
    database_url: str,
    db: psycopg.Connection,
    seeded: dict[str, int],
    logins: Logins,
    group: str,
    sql: str,
    refusal: type[psycopg.Error],
) -> None:
    before = _everything(db)
    with psycopg.connect(url_as(database_url, logins[group]), autocommit=True) as conn:
        with pytest.raises(refusal) as caught:
            conn.execute(sql)
        assert conn.execute("select current_user").fetchone() == (logins[group],)
    if refusal is CHECK:
        assert caught.value.diag.constraint_name == "state_transition"
        assert f"(as {logins[group]})" in (caught.value.diag.message_primary or "")
    assert _everything(db) == before


def _everything(db: psycopg.Connection) -> list[tuple[object, ...]]:
    return db.execute(
        """select 'u', to_jsonb(u)::text from outbox.action_status_updates u
           union all select 'a', to_jsonb(a)::text from outbox.delivery_attempts a
           union all select 'r', to_jsonb(r)::text from outbox.requeues r
           union all select 'c', code from outbox.error_codes
           order by 1, 2"""
    ).fetchall()


def test_the_messages_say_what_was_refused(database_url: str, seeded: dict[str, int], logins: Logins) -> None:
    with psycopg.connect(url_as(database_url, logins["outbox_relay"]), autocommit=True) as relay:
        with pytest.raises(CHECK) as caught:
            relay.execute(U + "state = 'delivered', delivered_at = now() where action_id = 'p-1'")
        assert caught.value.diag.message_primary == (
            f"row {seeded['p-1']} may not go from pending to delivered this way (as {logins['outbox_relay']}): "
            "a pending row changes only when it is claimed (in_flight, with a new claim token); "
            "its result is then recorded under that claim"
        )
        with pytest.raises(PRIV) as denied:
            relay.execute(U + "state = 'pending', dead_at = null, attempts = 0 where action_id = 'd-1'")
        assert denied.value.diag.message_primary == (
            f"only outbox_operator may put dead row {seeded['d-1']} back to pending, not {logins['outbox_relay']}"
        )


def test_history_stays_append_only_even_for_a_role_granted_more_by_mistake(
    database_url: str, db: psycopg.Connection, seeded: dict[str, int], logins: Logins
) -> None:
    login = logins["outsider"]
    db.execute(f"grant usage on schema outbox to {login}")
    db.execute(
        f"grant select, update, delete, truncate on outbox.delivery_attempts, outbox.requeues to {login}"
    )
    before = _everything(db)
    with psycopg.connect(url_as(database_url, login), autocommit=True) as conn:
        for table, sql, verb in (
            ("delivery_attempts", "delete from outbox.delivery_attempts", "delete"),
            ("delivery_attempts", "update outbox.delivery_attempts set outcome = 'delivered'", "update"),
            ("delivery_attempts", "truncate outbox.delivery_attempts", "truncate"),
            ("requeues", "delete from outbox.requeues", "delete"),
        ):
            with pytest.raises(PRIV) as refused:
                conn.execute(sql)
            assert refused.value.diag.message_primary == (
                f"outbox.{table} is append-only: {login} may not {verb} its rows"
            )
    assert _everything(db) == before


# -- what each role does --------------------------------------------------------------------
async def test_the_relay_claims_records_heartbeats_and_purges_with_only_its_role(
    database_url: str, db: psycopg.Connection, seeded: dict[str, int], logins: Logins
) -> None:
    login = logins["outbox_relay"]
    for name in ("r-ok", "r-dead", "r-retry", "r-lost"):
        db.execute("select outbox.enqueue_action_status(%s, 'SUCCESS')", (name,))
    # r-lost: another relay sent it and died; its lease has run out
    db.execute(
        "update outbox.action_status_updates set state = 'in_flight', claim_token = gen_random_uuid(), "
        "claimed_by = 'relay-gone', sending_at = now() - interval '2 minutes', "
        "next_attempt_at = now() - interval '1 minute' where action_id = 'r-lost'"
    )
    store = Store(Secret(url_as(database_url, login)), pool_size=1)
    try:
        token = uuid.uuid4()
        claimed = await store.claim("default", 10, 30.0, token, "relay-t", send_now=1)
        by_name = {row.action_id: row for row in claimed}
        assert set(by_name) == {"p-1", "r-ok", "r-dead", "r-retry", "r-lost"}  # f-1's lease is still live
        assert by_name["r-lost"].outcome_unknown
        assert await store.mark_sending([(row.id, token) for row in claimed]) == {row.id for row in claimed}
        now = datetime.now(UTC)
        results = [
            RowResult(by_name["r-ok"].id, token, "delivered", charged=1, requests=1, http_status=204),
            RowResult(
                by_name["r-dead"].id,
                token,
                "dead",
                charged=1,
                requests=1,
                http_status=400,
                last_error="HTTP 400 INVALID_INPUT",
            ),
            RowResult(
                by_name["r-retry"].id,
                token,
                "pending",
                retry_at=now + timedelta(minutes=5),
                charged=1,
                requests=1,
                http_status=503,
                last_error="HTTP 503",
            ),
        ]
        attempts = [
            AttemptRecord(r.id, token, name, "default", 1, now, 3.0, r.http_status, outcome, None, None, None)
            for r, name, outcome in zip(
                results, ("r-ok", "r-dead", "r-retry"), ("delivered", "dead", "retry"), strict=True
            )
        ]
        assert await store.record(results, attempts, "relay-t") == 3
        stale = RowResult(seeded["f-1"], token, "delivered", charged=1, requests=1)  # not its claim
        assert await store.record([stale], [], "relay-t") == 0
        await store.heartbeat("relay-t", [("default", "serving", None)])
        # Several relays: a shared pause written, read by another relay, and claims released.
        await store.heartbeat("relay-t", [("default", "paused", "refused")], {"default": 30.0})
        (peer,) = await store.peers("relay-u", {"default": None}, 5.0, 60.0)
        assert peer.relay_id == "relay-t" and peer.alive and 0 < (peer.paused_for or 0) <= 30
        assert sum((await store.release_claims(["relay-t"])).values()) >= 1
        assert await purge(store, 86400.0, True, 1) == 2  # v-1 and d-1, finished two days ago
        assert (await cycle(store, 86400.0, True, 1)).updates == 0  # and drop_old_attempts may run
        await store.forget_relay("relay-t")
    finally:
        await store.close()
    states: dict[str, str] = dict(
        db.execute("select action_id, state from outbox.action_status_updates").fetchall()
    )
    assert states == {
        "p-1": "in_flight",
        "f-1": "in_flight",
        "r-ok": "delivered",
        "r-dead": "dead",
        "r-retry": "pending",
        "r-lost": "in_flight",
    }
    written = db.execute(
        "select action_id, outcome, db_role, relay_id from outbox.delivery_attempts d "
        "where exists (select 1 from outbox.action_status_updates u where u.id = d.update_id) order by action_id"
    ).fetchall()
    assert written == [
        ("r-dead", "dead", login, "relay-t"),
        ("r-lost", "unknown", login, "relay-gone"),
        ("r-ok", "delivered", login, "relay-t"),
        ("r-retry", "retry", login, "relay-t"),
    ]
    assert db.execute("select count(*) from outbox.relay_targets").fetchone() == (0,)


def test_the_daemon_runs_with_only_the_relay_role(database_url: str, tmp_path: Path, logins: Logins) -> None:
    login = logins["outbox_relay"]
    updates = sample_updates(200, prefix="svc")
    seed_rows(database_url, updates)
    log = tmp_path / "relay.log"
    with Sandbox(SandboxConfig()) as sb:
        env = relay_env(url_as(database_url, login), sb.url, RELAY_RETENTION="30d", RELAY_ID="relay-svc")
        proc = start_relay_process(env, log)
        try:
            assert wait_until(lambda: states(database_url).get("delivered") == 200, 60), log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
    assert code == 0, log.read_text()
    assert sb.duplicates == 0 and len(sb.applied) == 200
    with psycopg.connect(database_url) as db:
        written = db.execute("select db_role, relay_id, count(*) from outbox.delivery_attempts group by 1, 2")
        assert written.fetchall() == [(login, "relay-svc", 200)]
        assert db.execute("select count(*) from outbox.relay_targets").fetchone() == (0,)  # forgotten at stop


async def test_the_operator_requeues_and_purges_and_the_database_names_who(
    database_url: str, db: psycopg.Connection, seeded: dict[str, int], logins: Logins
) -> None:
    login = logins["outbox_operator"]
    store = Store(Secret(url_as(database_url, login)), pool_size=1)
    try:
        assert [r["action_id"] for r in await store.dead_list()] == ["d-1"]
        done = await retry_dead(
            store, action_ids=["d-1"], target=None, code="invalid_input", reason="fixed (by x)"
        )
        assert (done.count, done.action_ids) == (1, {"d-1"})
        assert await purge(store, 86400.0, True, 10) == 1  # v-1; d-1 is pending again
    finally:
        await store.close()
    row = db.execute(
        "select state, attempts, dead_at, requeued_by, requeue_reason, requeued_at > now() - interval '1 minute' "
        "from outbox.action_status_updates where id = %s",
        (seeded["d-1"],),
    ).fetchone()
    assert row == ("pending", 0, None, login, "fixed (by x)", True)
    ledger = db.execute(
        "select update_id, action_id, requeued_by, reason, attempts, dead_at < now() - interval '1 day' "
        "from outbox.requeues"
    ).fetchall()
    assert ledger == [(seeded["d-1"], "d-1", login, "fixed (by x)", 1, True)]
    audit = db.execute("select requeued_by from outbox.delivery_audit where action_id = 'd-1'").fetchone()
    assert audit == (login,)
    assert db.execute("select action_id from outbox.action_status_updates order by 1").fetchall() == [
        ("d-1",),
        ("f-1",),
        ("p-1",),
    ]
    with psycopg.connect(url_as(database_url, login), autocommit=True) as conn:
        conn.execute("insert into outbox.error_codes (code, description) values ('PARCEL_LOST', 'lost')")
        for table in (
            "action_status_updates",
            "delivery_attempts",
            "requeues",
            "relay_targets",
            "delivery_audit",
            "error_codes",
            "schema_migrations",
        ):
            conn.execute(f"select * from outbox.{table}")


def test_the_writer_enqueues_and_reads_state(database_url: str, logins: Logins) -> None:
    with psycopg.connect(url_as(database_url, logins["outbox_writer"]), autocommit=True) as conn:
        conn.execute(
            'select outbox.enqueue_action_status(\'w-1\', \'FAILED\', \'[{"code":"OTHER","message":"m"}]\')'
        )
        conn.execute("insert into outbox.action_status_updates (action_id, status) values ('w-2', 'SUCCESS')")
        rows = conn.execute("select action_id, state, attempts from outbox.action_status_updates order by id")
        assert rows.fetchall() == [("w-1", "pending", 0), ("w-2", "pending", 0)]


@pytest.mark.parametrize(
    "table",
    [
        "action_status_updates",
        "delivery_attempts",
        "delivery_audit",
        "error_codes",
        "schema_migrations",
        "relay_targets",
        "requeues",
    ],
)
def test_the_auditor_reads_everything(
    database_url: str, seeded: dict[str, int], logins: Logins, table: str
) -> None:
    with psycopg.connect(url_as(database_url, logins["outbox_auditor"]), autocommit=True) as conn:
        conn.execute(f"select * from outbox.{table}")


def test_every_function_has_a_fixed_search_path(db: psycopg.Connection) -> None:
    loose = db.execute(
        """select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
           where n.nspname = 'outbox'
             and not coalesce('search_path=pg_catalog, pg_temp' = any(p.proconfig), false)
           order by 1"""
    ).fetchall()
    assert loose == []
    definers = db.execute(
        """select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
           where n.nspname = 'outbox' and p.prosecdef order by 1"""
    ).fetchall()
    assert definers == [
        ("drop_old_attempts",),
        ("ensure_attempt_partitions",),
        ("purge_finished",),
        ("record_requeue",),
        ("rollup_reports",),
    ]


# -- 0002 to 0003 ---------------------------------------------------------------------------
async def test_a_database_at_0002_with_data_migrates_to_0003_and_keeps_working(
    empty_database_url: str, logins: Logins
) -> None:
    owner = Store(Secret(empty_database_url), pool_size=1)
    try:
        async with owner.migration_session() as session:
            await session.applied()
            for m in available()[:2]:
                await session.apply(m.version, m.name, m.checksum, m.sql)
        with psycopg.connect(empty_database_url, autocommit=True) as db:
            ids = seed(db)
            db.execute(
                "update outbox.action_status_updates set requeue_reason = 'old reason (by ops)' "
                "where id = %s",
                (ids["d-1"],),
            )
            relay_could_delete = db.execute(
                "select has_table_privilege('outbox_relay', 'outbox.action_status_updates', 'DELETE')"
            ).fetchone()
            assert relay_could_delete == (True,)
        report = await migrate(owner)
        assert [m.version for m in report.applied] == list(range(3, len(available()) + 1))  # 0003 and later
        assert await owner.schema_version() == len(available())
    finally:
        await owner.close()
    with psycopg.connect(empty_database_url, autocommit=True) as db:
        kept = db.execute(
            "select action_id, state, requeue_reason, requeued_by from outbox.action_status_updates order by 1"
        ).fetchall()
        assert kept == [
            ("d-1", "dead", "old reason (by ops)", None),
            ("f-1", "in_flight", None, None),
            ("p-1", "pending", None, None),
            ("v-1", "delivered", None, None),
        ]
        assert db.execute(
            "select action_id, db_role from outbox.delivery_attempts order by 1"
        ).fetchall() == [("d-1", None), ("v-1", None)]  # written before 0003: no role is made up for them
        privileges = db.execute(
            """select has_table_privilege('outbox_relay', 'outbox.action_status_updates', 'DELETE'),
                      has_table_privilege('outbox_relay', 'outbox.delivery_attempts', 'DELETE'),
                      has_column_privilege('outbox_relay', 'outbox.action_status_updates', 'requeue_reason', 'UPDATE'),
                      has_function_privilege('outbox_operator',
                          'outbox.requeue_dead(bigint, integer, text, text[], text, text)', 'EXECUTE')"""
        ).fetchone()
        assert privileges == (False, False, False, True)
    relay = Store(Secret(url_as(empty_database_url, logins["outbox_relay"])), pool_size=1)
    try:
        token = uuid.uuid4()
        claimed = await relay.claim("default", 10, 30.0, token, "relay-m")
        assert [row.action_id for row in claimed] == ["p-1"]
        result = RowResult(claimed[0].id, token, "delivered", charged=1, requests=1, http_status=204)
        attempt = AttemptRecord(
            claimed[0].id,
            token,
            "p-1",
            "default",
            1,
            datetime.now(UTC),
            2.0,
            204,
            "delivered",
            None,
            None,
            None,
        )
        assert await relay.record([result], [attempt], "relay-m") == 1
    finally:
        await relay.close()
    operator = Store(Secret(url_as(empty_database_url, logins["outbox_operator"])), pool_size=1)
    try:
        done = await retry_dead(operator, action_ids=["d-1"], target=None, code=None, reason="after 0003")
        assert done.count == 1
        assert await purge(operator, 86400.0, False, 100) == 1  # v-1
    finally:
        await operator.close()
    with psycopg.connect(empty_database_url, autocommit=True) as db:
        assert db.execute(
            "select action_id, state, requeued_by from outbox.action_status_updates order by 1"
        ).fetchall() == [
            ("d-1", "pending", logins["outbox_operator"]),
            ("f-1", "in_flight", None),
            ("p-1", "delivered", None),
        ]
