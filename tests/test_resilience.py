"""Resilience: kill -9, several relays, PostgreSQL restarts, SIGTERM, lost leases, odd action ids.

Real PostgreSQL; the relay runs as a real ``python -m relay run`` subprocess where the scenario
is about the process, in-process otherwise; the sandbox API always runs in this process, so its
counters (``applied``, ``apply_count``, ``duplicates``, ``requests``) are read directly. Every
test prints one line of figures (``pytest -s`` shows it). Waits poll state with generous
timeouts; no assertion depends on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import pytest

from relay.connect.client import ApiClient, Sent
from relay.core.engine import Engine
from relay.dev.embedded import EmbeddedPostgres
from relay.dev.sandbox.server import Faults, Sandbox, SandboxConfig
from relay.pg.migrations import migrate
from relay.pg.store import Store
from relay.settings import Secret, TargetSettings
from tests.relaykit import (
    expected_bodies,
    relay_env,
    relay_processes,
    relay_settings,
    sample_updates,
    seed_rows,
    start_relay_process,
    states,
    wait_until,
)

pytestmark = pytest.mark.chaos

DRAIN_TIMEOUT = 180.0  # seconds: generous, the machine is shared


# -- helpers -----------------------------------------------------------------------------------
def _query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


def _scalar(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return _query(url, sql, params)[0][0]


def _held_by(url: str, pid: int) -> set[str]:
    """Action ids in flight under a claim of the relay process ``pid`` (relay_id is host:pid)."""
    rows = _query(
        url,
        "select action_id from outbox.action_status_updates where state = 'in_flight' and claimed_by like %s",
        (f"%:{pid}",),
    )
    return {r[0] for r in rows}


def _all_delivered(url: str, n: int) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(psycopg.Error):
            return states(url) == {"delivered": n}
        return False

    return check


def _db_errors(path: Path) -> int:
    """Lines in a relay log about a database error (how often the relay noticed the fault)."""
    try:
        return sum("database error" in line for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM a relay we started and wait for it; SIGKILL only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    return int(proc.returncode)


def _sandbox(**faults: Any) -> Sandbox:
    return Sandbox(SandboxConfig(seed=3, faults=Faults(**faults))).start()


def _via(relay_url: str, database_url: str) -> str:
    """How the relay reached the database, for the figures' line."""
    return "" if relay_url == database_url else " via pgbouncer"


def _check_bodies(sandbox: Sandbox, updates: list[tuple[str, str, list[dict[str, str]]]]) -> None:
    assert sandbox.applied == expected_bodies(updates)
    assert max(sandbox.apply_count.values()) == 1


# -- 1. kill -9 --------------------------------------------------------------------------------
def test_kill_9_during_a_drain_loses_nothing_and_resends_only_rows_in_flight(
    database_url: str, relay_url: str, tmp_path: Path
) -> None:
    n, kills = 5000, 4
    updates = sample_updates(n, seed=11, prefix="kill")
    seed_rows(database_url, updates)
    rng = random.Random(2024)
    segment = n // (kills + 1)
    # Kill points, one at a random place in each of the first `kills` fifths of the drain.
    thresholds = [i * segment + rng.randint(segment // 10, segment * 9 // 10) for i in range(kills)]
    in_flight_before: list[int] = []
    held_counts: list[int] = []
    rescued: Counter[str] = Counter()  # action id -> kills it was held at
    started = time.monotonic()
    with _sandbox(latency=0.002) as sandbox, relay_processes() as procs:
        env = relay_env(
            relay_url, sandbox.url, RELAY_LEASE="3", RELAY_REQUEST_TIMEOUT="1", RELAY_MAX_CONCURRENCY="32"
        )
        for i, threshold in enumerate(thresholds):
            log = tmp_path / f"relay-{i}.log"
            proc = start_relay_process(env, log)
            procs.append(proc)
            reached = wait_until(
                lambda t=threshold, p=proc: len(sandbox.applied) >= t or p.poll() is not None,
                timeout=DRAIN_TIMEOUT,
                interval=0.01,
            )
            assert reached and proc.poll() is None, f"relay {i} stopped or stalled:\n{_tail(log)}"
            in_flight_before.append(
                _scalar(
                    database_url,
                    "select count(*) from outbox.action_status_updates where state = 'in_flight'",
                )
            )
            proc.kill()
            assert proc.wait(10) == -signal.SIGKILL
            # The process is gone: the rows still claimed by it are exactly what it held.
            held = _held_by(database_url, proc.pid)
            held_counts.append(len(held))
            rescued.update(held)
        log = tmp_path / "relay-last.log"
        last = start_relay_process(env, log)
        procs.append(last)
        drained = wait_until(_all_delivered(database_url, n), timeout=DRAIN_TIMEOUT, interval=0.2)
        assert drained, f"not drained: {states(database_url)}\n{_tail(log)}"
        assert _stop(last) == 0, _tail(log)
        elapsed = time.monotonic() - started
        summary = sandbox.summary()
        duplicates = sandbox.duplicates
        duplicate_count = dict(sandbox.duplicate_count)
        _check_bodies(sandbox, updates)

    delivered = states(database_url).get("delivered", 0)
    earlier = _scalar(
        database_url, "select count(*) from outbox.delivery_attempts where outcome = 'delivered_earlier'"
    )
    print(
        f"\n[kill -9{_via(relay_url, database_url)}] rows={n} kills={kills} at_applied={thresholds} delivered={delivered} "
        f"lost={n - delivered} in_flight_before_kill={in_flight_before} "
        f"held_by_killed={held_counts} duplicate_puts={duplicates} "
        f"(bound {sum(held_counts)}) delivered_earlier={earlier} requests={summary['requests']} "
        f"max_apply_count={summary['max_apply_count']} elapsed={elapsed:.1f}s"
    )
    assert delivered == n
    claimed = "select count(*) from outbox.action_status_updates where claim_token is not null"
    assert _scalar(database_url, claimed) == 0
    # Only rows held by a killed relay may be sent twice, each at most once per kill it lived through.
    assert duplicates <= sum(held_counts)
    assert all(count <= rescued[action_id] for action_id, count in duplicate_count.items())
    assert earlier <= duplicates


# -- 2. several relays ---------------------------------------------------------------------------
def test_three_relays_on_one_database_share_the_work_and_send_each_row_once(
    database_url: str, relay_url: str, tmp_path: Path
) -> None:
    n = 2400
    updates = sample_updates(n, seed=12, prefix="three")
    started = time.monotonic()
    with _sandbox(latency=0.005) as sandbox, relay_processes() as procs:
        env = relay_env(relay_url, sandbox.url, RELAY_MAX_CONCURRENCY="16", RELAY_BATCH_SIZE="20")
        logs = [tmp_path / f"relay-{i}.log" for i in range(3)]
        procs.extend(start_relay_process(env, log) for log in logs)
        # All three are up (each writes a heartbeat when it starts) before the rows arrive.
        up = wait_until(
            lambda: _scalar(database_url, "select count(distinct relay_id) from outbox.relay_targets") == 3,
            timeout=60,
            interval=0.1,
        )
        assert up, "\n".join(_tail(log) for log in logs)
        seed_rows(database_url, updates)
        drained = wait_until(_all_delivered(database_url, n), timeout=DRAIN_TIMEOUT, interval=0.2)
        assert drained, f"not drained: {states(database_url)}\n" + "\n".join(_tail(log) for log in logs)
        codes = [_stop(proc) for proc in procs]
        elapsed = time.monotonic() - started
        summary = sandbox.summary()
        duplicates = sandbox.duplicates
        _check_bodies(sandbox, updates)

    per_relay = dict(
        _query(
            database_url,
            "select relay_id, count(*) from outbox.delivery_attempts group by relay_id order by relay_id",
        )
    )
    outcomes = dict(_query(database_url, "select outcome, count(*) from outbox.delivery_attempts group by 1"))
    pids = {f":{p.pid}" for p in procs}
    print(
        f"\n[3 relays{_via(relay_url, database_url)}] rows={n} delivered={states(database_url).get('delivered', 0)} "
        f"per_relay={sorted(per_relay.values())} duplicate_puts={duplicates} "
        f"requests={summary['requests']} attempts={outcomes} elapsed={elapsed:.1f}s"
    )
    assert codes == [0, 0, 0]
    assert duplicates == 0
    assert summary["requests"] == n
    assert outcomes == {"delivered": n}
    assert len(per_relay) == 3 and all(count > 0 for count in per_relay.values())
    assert {relay_id[relay_id.rindex(":") :] for relay_id in per_relay} == pids


# -- 3. the database goes away ------------------------------------------------------------------
@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, which it may stop and start (never the shared one)."""
    # Not under tmp_path: pytest resets its base directory to mode 0700 whenever another session
    # starts, which would lock out the unprivileged user the server runs as (when we are root).
    server = EmbeddedPostgres(fsync=False).start()
    try:
        yield server
    finally:
        server.cleanup()


def _migrated_database(server: EmbeddedPostgres, name: str) -> str:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"create database {name}")
    url = server.url(name)

    async def setup() -> None:
        store = Store(Secret(url), pool_size=1)
        try:
            await migrate(store)
        finally:
            await store.close()

    asyncio.run(setup())
    return url


def test_postgresql_restarted_mid_drain_the_same_relay_process_finishes(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    n = 3000
    url = _migrated_database(own_server, "restarts")
    updates = sample_updates(n, seed=13, prefix="pgrestart")
    seed_rows(url, updates)
    lease = 4.0
    # The first outage outlasts the lease: claims run out while answers wait in the relay's memory.
    restarts_at = [(n // 4, lease + 1.0), (n // 2, 0.0)]
    down_for: list[float] = []
    started = time.monotonic()
    log = tmp_path / "relay.log"
    with _sandbox(latency=0.005) as sandbox, relay_processes() as procs:
        env = relay_env(url, sandbox.url, RELAY_LEASE=str(lease), RELAY_REQUEST_TIMEOUT="1")
        proc = start_relay_process(env, log)
        procs.append(proc)
        for threshold, outage in restarts_at:
            reached = wait_until(
                lambda t=threshold: len(sandbox.applied) >= t or proc.poll() is not None,
                timeout=DRAIN_TIMEOUT,
                interval=0.01,
            )
            assert reached and proc.poll() is None, _tail(log)
            t0 = time.monotonic()
            own_server.stop()
            time.sleep(outage)  # the outage itself, not a wait for a result
            own_server.start()
            down_for.append(time.monotonic() - t0)
        drained = wait_until(_all_delivered(url, n), timeout=DRAIN_TIMEOUT, interval=0.2)
        assert drained, f"not drained: {states(url)}\n{_tail(log)}"
        assert proc.poll() is None, "the relay process must survive the restarts"
        assert _stop(proc) == 0, _tail(log)
        elapsed = time.monotonic() - started
        summary = sandbox.summary()
        duplicates = sandbox.duplicates
        _check_bodies(sandbox, updates)

    outcomes = dict(_query(url, "select outcome, count(*) from outbox.delivery_attempts group by 1"))
    print(
        f"\n[pg restart] rows={n} restarts={len(restarts_at)} at_applied={[t for t, _ in restarts_at]} "
        f"down_for={[round(d, 1) for d in down_for]}s delivered={states(url).get('delivered', 0)} "
        f"duplicate_puts={duplicates} requests={summary['requests']} attempts={outcomes} "
        f"relay_db_error_lines={_db_errors(log)} elapsed={elapsed:.1f}s"
    )
    assert _db_errors(log) > 0  # the relay did see the database go away
    assert duplicates == 0
    assert summary["max_apply_count"] == 1


def test_relay_backends_terminated_mid_drain_the_same_relay_process_finishes(
    database_url: str, tmp_path: Path
) -> None:
    n = 3000
    updates = sample_updates(n, seed=14, prefix="terminate")
    seed_rows(database_url, updates)
    terminate_at = [n // 6, n // 3, n // 2, 2 * n // 3]
    terminated: list[int] = []
    started = time.monotonic()
    log = tmp_path / "relay.log"
    with _sandbox(latency=0.005) as sandbox, relay_processes() as procs:
        env = relay_env(database_url, sandbox.url, RELAY_LEASE="4", RELAY_REQUEST_TIMEOUT="1")
        proc = start_relay_process(env, log)
        procs.append(proc)
        for threshold in terminate_at:
            reached = wait_until(
                lambda t=threshold: len(sandbox.applied) >= t or proc.poll() is not None,
                timeout=DRAIN_TIMEOUT,
                interval=0.01,
            )
            assert reached and proc.poll() is None, _tail(log)
            killed = _query(
                database_url,
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name like 'outbox-relay%%' and datname = current_database()",
            )
            terminated.append(sum(1 for (ok,) in killed if ok))
        drained = wait_until(_all_delivered(database_url, n), timeout=DRAIN_TIMEOUT, interval=0.2)
        assert drained, f"not drained: {states(database_url)}\n{_tail(log)}"
        assert proc.poll() is None, "the relay process must survive losing its connections"
        assert _stop(proc) == 0, _tail(log)
        elapsed = time.monotonic() - started
        summary = sandbox.summary()
        duplicates = sandbox.duplicates
        _check_bodies(sandbox, updates)

    outcomes = dict(_query(database_url, "select outcome, count(*) from outbox.delivery_attempts group by 1"))
    print(
        f"\n[pg_terminate_backend] rows={n} rounds={len(terminate_at)} backends_terminated={terminated} "
        f"delivered={states(database_url).get('delivered', 0)} duplicate_puts={duplicates} "
        f"requests={summary['requests']} attempts={outcomes} relay_db_error_lines={_db_errors(log)} "
        f"elapsed={elapsed:.1f}s"
    )
    assert sum(terminated) >= len(terminate_at)  # each round hit at least one of the relay's backends
    assert duplicates == 0
    assert summary["max_apply_count"] == 1


def test_a_failed_drain_is_tried_again_before_the_next_poll(database_url: str, tmp_path: Path) -> None:
    """After a failover the relay's pooled sessions are dead while its LISTEN connection already
    works again: the wake-up's drain fails once on a dead session, and the next try must not
    wait for the poll interval (60 s here) or for another commit."""
    updates = sample_updates(20, seed=15, prefix="retry-drain")
    log = tmp_path / "relay.log"
    with _sandbox(latency=0.0) as sandbox, relay_processes() as procs:
        env = relay_env(database_url, sandbox.url, RELAY_POLL_INTERVAL="60")
        proc = start_relay_process(env, log)
        procs.append(proc)
        seed_rows(database_url, updates[:1])
        assert wait_until(_all_delivered(database_url, 1), timeout=30, interval=0.05), _tail(log)
        # The pool's sessions end (the listener's and the health check's stay).
        killed = _query(
            database_url,
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where application_name = 'outbox-relay' and datname = current_database()",
        )
        assert any(ok for (ok,) in killed)
        started = time.monotonic()
        seed_rows(database_url, updates[1:])  # one commit: one wake-up
        drained = wait_until(_all_delivered(database_url, len(updates)), timeout=30, interval=0.05)
        assert drained, f"not drained: {states(database_url)}\n{_tail(log)}"
        seconds = time.monotonic() - started
        assert proc.poll() is None
        assert _stop(proc) == 0, _tail(log)
        text = log.read_text()
    print(f"\n[drain retry] rows={len(updates)} drained_after_dead_sessions_s={seconds:.1f}")
    assert "drain failed; retrying" in text  # the wake-up's drain did meet a dead session


# -- 4. SIGTERM ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("latency", "in_time"),
    [(1.5, True), (8.0, False)],
    ids=["answers-within-shutdown-timeout", "answers-after-shutdown-timeout"],
)
def test_sigterm_mid_drain_exits_0_in_time_and_leaves_nothing_in_flight(
    database_url: str, tmp_path: Path, latency: float, in_time: bool
) -> None:
    n, concurrency, shutdown_timeout, margin = 200, 8, 5.0, 4.0
    updates = sample_updates(n, seed=15, prefix="sigterm")
    seed_rows(database_url, updates)
    log = tmp_path / "relay.log"
    with _sandbox(latency=latency) as sandbox, relay_processes() as procs:
        env = relay_env(
            database_url,
            sandbox.url,
            RELAY_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
            RELAY_REQUEST_TIMEOUT=str(latency + 4),
            RELAY_LEASE=str(latency + 30),
            RELAY_MAX_CONCURRENCY=str(concurrency),
        )
        proc = start_relay_process(env, log)
        procs.append(proc)
        # Requests are in flight: the sandbox has received `concurrency` PUTs it is sitting on.
        busy = wait_until(
            lambda: (
                _scalar(
                    database_url,
                    "select count(*) from outbox.action_status_updates where state = 'in_flight'",
                )
                >= 2 * concurrency
                or proc.poll() is not None
            ),
            timeout=60,
            interval=0.05,
        )
        assert busy and proc.poll() is None, _tail(log)
        if in_time:  # let a first wave finish so the signal lands while the second is in flight
            assert wait_until(lambda: len(sandbox.applied) >= concurrency, timeout=60, interval=0.02)
        applied_at_signal = len(sandbox.applied)
        in_flight_at_signal = _scalar(
            database_url, "select count(*) from outbox.action_status_updates where state = 'in_flight'"
        )
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(shutdown_timeout + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 30 s after the shutdown timeout:\n{_tail(log)}")
        took = time.monotonic() - t0
        if not in_time:
            sandbox.stop()  # wakes the requests it sits on: they land now rather than later
            wait_until(lambda: len(sandbox.applied) >= concurrency, timeout=15)
        applied = set(sandbox.applied)
        sent_meanwhile = len(applied) - applied_at_signal
        requests = sandbox.summary()["requests"]

    rows = _query(
        database_url,
        "select action_id, state, requests, outcome_unknown, claim_token is null "
        "from outbox.action_status_updates",
    )
    by_state: dict[str, int] = {}
    for _, state, _, _, _ in rows:
        by_state[state] = by_state.get(state, 0) + 1
    delivered = {a for a, state, *_ in rows if state == "delivered"}
    unknown = {a for a, state, _, u, _ in rows if state == "pending" and u}
    untouched = [r for r in rows if r[1] == "pending" and not r[3]]
    print(
        f"\n[SIGTERM latency={latency}s] rows={n} in_flight_at_signal={in_flight_at_signal} "
        f"answered_after_signal={sent_meanwhile} exit={code} took={took:.1f}s "
        f"(shutdown_timeout={shutdown_timeout}s) states={by_state} pending_outcome_unknown={len(unknown)} "
        f"requests={requests}"
    )
    assert code == 0, _tail(log)
    assert took <= shutdown_timeout + margin
    assert by_state.get("in_flight", 0) == 0
    assert all(r[4] for r in rows)  # no claim token left behind
    if in_time:
        # Every request that was answered is recorded; everything else went back to pending unsent.
        assert delivered == applied
        assert sent_meanwhile > 0
        assert not unknown
        assert all(r[2] == 0 for r in untouched)
    else:
        # The requests cut off by the shutdown timeout may have landed (here they did): pending
        # with outcome unknown, for the next claim to find out. Rows that were still waiting for
        # a free slot were never sent: released as they were.
        assert not delivered
        assert unknown == applied
        assert len(unknown) == concurrency
        assert all(r[2] == 0 for r in untouched)
        # Each request cut off has its attempt row: outcome unknown, may have reached the API.
        cut_off = _query(
            database_url,
            "select u.action_id, d.outcome, d.reached_api from outbox.delivery_attempts d "
            "join outbox.action_status_updates u on u.id = d.update_id",
        )
        assert sorted(cut_off) == sorted((a, "unknown", "maybe") for a in unknown)


# -- 5. a lease that runs out while its request is in flight ------------------------------------
class _HeldAnswers(ApiClient):
    """Sends each request at once (so it lands), then keeps its answer from the engine until
    ``release``.

    Stands for what no request deadline bounds (a process paused after the answer arrived, a
    stalled event loop): the relay hears its answer long after its lease ran out.
    """

    def __init__(self, target: TargetSettings) -> None:
        super().__init__(target)
        self.answered = asyncio.Event()
        self.release = asyncio.Event()
        self.statuses: list[int | None] = []

    async def put(self, action_id: str, body: bytes, token: str | None) -> Sent:
        sent = await super().put(action_id, body, token)
        self.statuses.append(sent.answer.status)
        self.answered.set()
        await self.release.wait()
        return sent


async def _until(predicate: Callable[[], bool], within: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def test_a_late_answer_after_the_lease_ran_out_is_discarded(database_url: str) -> None:
    seed_rows(database_url, [("late-1", "SUCCESS", [])])
    sandbox = _sandbox()
    try:
        # Relay A: a 2 s lease; the request timeout leaves the margin the engine insists on.
        settings_a = relay_settings(
            database_url, sandbox.url, RELAY_LEASE="2", RELAY_REQUEST_TIMEOUT="0.5", RELAY_ID="relay-a"
        )
        held = _HeldAnswers(settings_a.targets["default"])
        store_a = Store(settings_a.require_database_url())
        engine_a = Engine(settings_a, store_a, clients={"default": held})
        settings_b = relay_settings(database_url, sandbox.url, RELAY_ID="relay-b")
        store_b = Store(settings_b.require_database_url())
        engine_b = Engine(settings_b, store_b)
        try:
            run_a = asyncio.create_task(engine_a.run_once())
            await asyncio.wait_for(held.answered.wait(), 30)  # A's PUT landed: 204, answer held
            assert sandbox.apply_count["late-1"] == 1
            expired = await _until(
                lambda: _scalar(
                    database_url,
                    "select next_attempt_at < now() from "
                    "outbox.action_status_updates where action_id = 'late-1'",
                ),
                within=30,
            )
            assert expired
            # B claims the row whose lease ran out: outcome unknown, so the API's refusal means delivered.
            assert await asyncio.wait_for(engine_b.run_once(), 30) == 1
            after_b = _query(
                database_url,
                "select state, last_http_status, requests, attempts, outcome_unknown, claim_token, "
                "delivered_at from outbox.action_status_updates where action_id = 'late-1'",
            )
            held.release.set()  # A hears its 204 now, after B's result is in
            await asyncio.wait_for(run_a, 30)
        finally:
            held.release.set()
            for engine, store in ((engine_a, store_a), (engine_b, store_b)):
                await engine.close()
                await store.close()
        duplicates = sandbox.duplicates
        statuses = [(r.action_id, r.status) for r in sandbox.requests]
    finally:
        sandbox.stop()

    final = _query(
        database_url,
        "select state, last_http_status, requests, attempts, outcome_unknown, claim_token, delivered_at "
        "from outbox.action_status_updates where action_id = 'late-1'",
    )
    attempts = _query(
        database_url,
        "select relay_id, attempt, http_status, outcome from outbox.delivery_attempts order by id",
    )
    print(
        f"\n[late answer] sandbox={statuses} duplicates={duplicates} held_answer={held.statuses} "
        f"attempts={attempts} row_after_b={after_b[0][:5]} row_final={final[0][:5]}"
    )
    assert statuses == [("late-1", 204), ("late-1", 400)]
    # B's claim counted A's marked request (requests 2) and wrote an attempt row saying it may have
    # reached the API; B's own request is attempt 2.
    assert after_b[0][:5] == ("delivered", 400, 2, 1, True)
    assert final == after_b  # A's late 204 changed nothing on the update
    assert attempts == [
        ("relay-a", 1, None, "unknown"),
        ("relay-b", 2, 400, "delivered_earlier"),
        ("relay-a", 1, 204, "superseded"),
    ]


# -- 6. action ids that look like paths, queries, fragments ------------------------------------
ODD_IDS = [
    "a/b",
    "/leading",
    "trailing/",
    "a//b",
    "a?b=c",
    "?",
    "a#frag",
    "#",
    "a%2Fb",
    "%2F",
    "%",
    "%25",
    "%zz",
    "..",
    ".",
    "...",
    "../../v1/orders",
    "./x",
    "x/..",
    "café",
    "日本",
    "🚀📦",
    "e\u0301",
    "a+b",
    "a;b=c",
    "a&b",
    "a=b",
    "~user",
    "@host",
    "a:b",
    "[::1]",
    "a\\b",
    '"quoted"',
    "<tag>",
    "{x}",
    "|",
    "^",
    "`",
    "'",
    "plain-id-123",
]


async def test_odd_action_ids_travel_as_exactly_one_path_segment(database_url: str) -> None:
    assert len(set(ODD_IDS)) == len(ODD_IDS)
    updates = [(action_id, "SUCCESS", []) for action_id in ODD_IDS]
    seed_rows(database_url, updates)
    with _sandbox() as sandbox:
        settings = relay_settings(database_url, sandbox.url)
        store = Store(settings.require_database_url())
        engine = Engine(settings, store)
        try:
            await engine.run_once()
        finally:
            await engine.close()
            await store.close()
        records = list(sandbox.requests)
        applied = dict(sandbox.applied)

    bad_paths = []
    for record in records:
        parts = record.path.split("/")
        segment = parts[-1]
        if (
            len(parts) != 5
            or parts[:4] != ["", "v1", "orders", "actions"]
            or not segment
            or "?" in record.path
            or unquote(segment) != record.action_id
            or segment.strip(".") == ""
        ):
            bad_paths.append(record.path)
    print(
        f"\n[odd ids] ids={len(ODD_IDS)} requests={len(records)} applied={len(applied)} "
        f"statuses={sorted({r.status for r in records})} bad_paths={bad_paths} "
        f"e.g. {records[0].path if records else '-'}"
    )
    assert states(database_url) == {"delivered": len(ODD_IDS)}
    assert set(applied) == set(ODD_IDS)
    assert sorted(r.action_id for r in records) == sorted(ODD_IDS)  # type: ignore[type-var]
    assert all(r.status == 204 for r in records)
    assert bad_paths == []


# -- 7. results reach the database while their lease lasts ---------------------------------------
async def test_a_slow_api_does_not_make_a_single_relay_resend_answered_rows(database_url: str) -> None:
    """Results wait in memory for a batch; with a slow API a batch takes longer than the lease.
    Answered rows must be recorded before their lease runs out, or they are claimed and sent again."""
    n = 80
    updates = sample_updates(n, seed=17, prefix="slow")
    seed_rows(database_url, updates)
    with _sandbox(latency=0.2) as sandbox:
        settings = relay_settings(
            database_url, sandbox.url, RELAY_LEASE="3", RELAY_REQUEST_TIMEOUT="1", RELAY_MAX_CONCURRENCY="4"
        )
        store = Store(settings.require_database_url())
        engine = Engine(settings, store)
        started = time.monotonic()
        try:
            await asyncio.wait_for(engine.run_once(), 120)
        finally:
            await engine.close()
            await store.close()
        elapsed = time.monotonic() - started
        duplicates = sandbox.duplicates
        requests = sandbox.summary()["requests"]
        _check_bodies(sandbox, updates)

    outcomes = dict(_query(database_url, "select outcome, count(*) from outbox.delivery_attempts group by 1"))
    print(
        f"\n[slow API, one relay] rows={n} requests={requests} duplicate_puts={duplicates} "
        f"attempts={outcomes} elapsed={elapsed:.1f}s (lease 3s)"
    )
    assert states(database_url) == {"delivered": n}
    assert duplicates == 0
    assert outcomes == {"delivered": n}
