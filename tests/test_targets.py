"""Targets end to end: OAuth renewal, a token endpoint outage, auth pauses, the circuit breaker,
the rate limit, several targets, secrets that never leak, and plain-http refusal.

Real PostgreSQL (the session's embedded server), the sandbox API in-process on loopback, and the
relay either in-process (:class:`relay.service.daemon.Relay` or :class:`relay.core.engine.Engine`) or as a
``python -m relay run`` subprocess where its logs matter. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from relay.core.engine import Engine
from relay.core.flow import BreakerState
from relay.dev.sandbox.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Sandbox, SandboxConfig
from relay.errors import ConfigError
from relay.pg.store import Store
from relay.service.daemon import Relay
from relay.settings import Secret, Settings, check_url, load_settings
from tests.relaykit import (
    cli,
    expected_bodies,
    relay_env,
    relay_settings,
    sample_updates,
    seed_rows,
    start_relay_process,
    states,
    until,
)

Updates = list[tuple[str, str, list[dict[str, str]]]]


# -- helpers ----------------------------------------------------------------------------------


def rows(url: str, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


async def arows(url: str, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    return await asyncio.to_thread(rows, url, sql, params)


async def astates(url: str) -> dict[str, int]:
    return await asyncio.to_thread(states, url)


def all_final(url: str, total: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        s = await astates(url)
        return s.get("delivered", 0) + s.get("dead", 0) == total

    return check


async def produce(url: str, updates: Updates, per_tick: int, tick: float, target: str = "default") -> float:
    """Enqueue ``per_tick`` rows per transaction every ``tick`` seconds, as an application would."""
    start = time.monotonic()
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for n, i in enumerate(range(0, len(updates), per_tick)):
            async with conn.cursor() as cur:
                await cur.executemany(
                    "select outbox.enqueue_action_status(%s, %s, %s::jsonb, %s)",
                    [(a, s, json.dumps(e), target) for a, s, e in updates[i : i + per_tick]],
                )
            await conn.commit()
            await asyncio.sleep(max(0.0, start + (n + 1) * tick - time.monotonic()))
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def relay_running(settings: Settings, heartbeat: float = 0.5) -> AsyncIterator[Relay]:
    """The daemon in this event loop. ``WATCHDOG_USEC`` without ``NOTIFY_SOCKET`` (so nothing
    is sent anywhere) only shortens the heartbeat that writes ``outbox.relay_targets`` (10 s)."""
    relay = Relay(replace(settings, systemd={"WATCHDOG_USEC": str(int(heartbeat * 2_000_000))}))
    task = asyncio.create_task(relay.run())

    def ready() -> bool:
        if task.done():
            task.result()  # raises what run() raised
            raise AssertionError("the relay stopped on its own")
        return relay.listening.is_set()

    try:
        await until(ready, 20, "the relay to listen")
        yield relay
    finally:
        relay.stop_event.set()
        await asyncio.wait_for(task, 30)


def oauth_env(database_url: str, sandbox: Sandbox, secret_file: Path, **extra: str) -> dict[str, str]:
    env = relay_env(database_url, sandbox.url, **extra)
    del env["RELAY_API_TOKEN"]
    env.update(
        RELAY_OAUTH_CLIENT_ID=DEFAULT_CLIENT_ID,
        RELAY_OAUTH_CLIENT_SECRET_FILE=str(secret_file),
        RELAY_OAUTH_TOKEN_URL=sandbox.token_url,
    )
    return env


def client_secret_file(tmp_path: Path, secret: str = DEFAULT_CLIENT_SECRET) -> Path:
    path = tmp_path / "oauth-client-secret"
    path.write_text(secret + "\n")
    return path


def put_times(sandbox: Sandbox) -> list[float]:
    return sorted(r.time for r in list(sandbox.requests) if r.method == "PUT")


def max_in_window(times: Sequence[float], window: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- 1. OAuth: renewal ahead of expiry, and a 401 renews once ---------------------------------


@pytest.mark.timeout(120)
async def test_oauth_tokens_renewed_ahead_and_a_revoked_token_renews_once(
    database_url: str, tmp_path: Path
) -> None:
    lifetime = 3.0  # the sandbox says expires_in=3; the relay renews at 80%, after 2.4 s
    with Sandbox(SandboxConfig(token_lifetime=lifetime, seed=1)) as sb:
        issued = sb.issued_tokens
        settings = load_settings(None, oauth_env(database_url, sb, client_secret_file(tmp_path)))
        updates = sample_updates(1000, prefix="oauth")
        async with relay_running(settings):
            started = time.monotonic()
            producer = asyncio.create_task(produce(database_url, updates, per_tick=10, tick=0.1))
            # The first token, then its scheduled renewal (at 80% of its life, while rows flow).
            await until(lambda: len(issued) >= 2, 20, "a scheduled token renewal", interval=0.01)
            # Revoke 1 s after that token was issued (the scenario's timing, not a wait for a
            # result): requests in flight all carry it, and the relay believes it good for 1.4 s
            # more, so the next requests meet a 401.
            await asyncio.sleep(1.0)
            revoked_at = time.time()
            sb.revoke_tokens()
            produced_in = await producer
            await until(all_final(database_url, 1000), 40, "1000 rows delivered")
            elapsed = time.monotonic() - started

    assert await astates(database_url) == {"delivered": 1000}
    assert sb.applied == expected_bodies(updates) and sb.duplicates == 0
    token_times = sorted(r.time for r in sb.requests if r.method == "POST")
    assert len(token_times) == sb.token_requests == len(issued)
    # A handful, not one per request: about elapsed / 2.4 s renewals, plus the forced one.
    assert 3 <= sb.token_requests <= elapsed / (0.8 * lifetime) + 4, (sb.token_requests, elapsed)
    # Single flight: the wave of 401s after the revocation caused exactly one token request.
    assert sum(revoked_at <= t < revoked_at + 1.2 for t in token_times) == 1, (revoked_at, token_times)
    unauthorized = sb.status_counts[401]
    assert unauthorized >= 1
    attempts = rows(
        database_url,
        "select u.action_id, u.attempts, array_agg(d.outcome || ':' || coalesce(d.http_status, 0)"
        "  order by d.attempt) from outbox.action_status_updates u"
        " join outbox.delivery_attempts d on d.update_id = u.id group by u.id",
    )
    by_row = {a: (n, seq) for a, n, seq in attempts}
    assert all(n == 1 for n, _ in by_row.values())  # the 401 consumed no attempt
    reauthed = {a: seq for a, (_, seq) in by_row.items() if seq != ["delivered:204"]}
    # Each 401 renewed the token and the same row was sent again at once, and delivered.
    assert reauthed and all(seq == ["reauth:401", "delivered:204"] for seq in reauthed.values()), reauthed
    assert len(reauthed) == unauthorized
    print(
        f"\n[oauth] 1000 rows produced in {produced_in:.1f}s, all delivered after {elapsed:.1f}s; "
        f"token requests {sb.token_requests}; 401s {unauthorized}, each retried once and delivered"
    )


# -- 2. The token endpoint down for a while ----------------------------------------------------

COUNTS = (
    "select count(*) filter (where state = 'delivered'), count(*) filter (where state = 'dead'),"
    " max(attempts) filter (where state <> 'delivered'),"
    " count(*) filter (where state in ('pending', 'in_flight')) from outbox.action_status_updates"
)


@pytest.mark.timeout(120)
async def test_token_endpoint_down_rows_wait_uncharged_then_deliver(
    database_url: str, tmp_path: Path
) -> None:
    with Sandbox(SandboxConfig(token_lifetime=2.0, seed=1)) as sb:
        settings = load_settings(None, oauth_env(database_url, sb, client_secret_file(tmp_path)))
        warm = sample_updates(50, prefix="warm")
        during = sample_updates(300, seed=8, prefix="during")
        async with relay_running(settings) as relay:
            await asyncio.to_thread(seed_rows, database_url, warm)
            await until(all_final(database_url, 50), 20, "the warm-up rows")
            sb.token_endpoint_down(True)
            down_at = time.monotonic()
            # The scenario, not a wait for a result: the rows come once the last token has expired
            # (issued at the last successful token request, for 2 s): what is measured is rows that
            # find no token at all. (A request that straddles the expiry is
            # test_a_401_when_the_token_cannot_be_renewed_is_never_the_rows_own below.)
            issued_at = max(r.time for r in list(sb.requests) if r.method == "POST" and r.status == 200)
            await asyncio.sleep(max(0.0, issued_at + 2.0 + 0.3 - time.time()))
            producer = asyncio.create_task(produce(database_url, during, per_tick=15, tick=0.2))
            # The first try without a token pauses the target.
            lane = relay.engine.lanes["default"]
            await until(lambda: lane.state()[0] != "serving", 20, "the target to pause without a token")
            lane_state = relay.engine.lane_states()[0]
            # Every probe (open_for, 2 s, after the pause, then 4 s, ...) tries for a token, fails
            # and opens the breaker again. The window runs from one failed probe to the next, so
            # that the relay did try to send during it (a window without a try would prove nothing).
            paused_at = lane.breaker.opened_at
            await until(lambda: lane.breaker.opened_at not in (None, paused_at), 20, "a first probe")
            probe_at = lane.breaker.opened_at
            first = await arows(database_url, COUNTS)
            await until(lambda: lane.breaker.opened_at not in (None, probe_at), 20, "a second probe")
            second = await arows(database_url, COUNTS)
            lane_after = relay.engine.lane_states()[0]
            token_failures = sb.token_requests
            sb.token_endpoint_down(False)
            down_for = time.monotonic() - down_at
            await producer
            took = await until(all_final(database_url, 350), 30, "every row delivered")

    # Nothing was delivered, charged or dead-lettered since the endpoint went down ...
    assert first[0][:3] == (50, 0, 0), first
    assert first[0][3] > 0  # ... though rows were waiting to be sent,
    # ... nor during the window between two probes, while more rows came.
    assert second[0][:3] == (50, 0, 0), second
    assert second[0][3] >= first[0][3], (first, second)
    # Paused for want of a token, and still not serving at the window's end: a pause, not a charge.
    assert "cannot get a token" in (lane_state[2] or ""), lane_state
    assert lane_after[1] in ("paused", "probing"), lane_after
    assert await astates(database_url) == {"delivered": 350}
    charged = rows(
        database_url,
        "select u.action_id, d.attempt, d.outcome, d.http_status, d.error_code, d.started_at"
        " from outbox.delivery_attempts d join outbox.action_status_updates u on u.id = d.update_id"
        " where u.attempts <> 1 order by d.id",
    )
    assert rows(database_url, "select max(attempts), min(attempts) from outbox.action_status_updates") == [
        (1, 1)
    ], charged
    assert max(sb.apply_count.values()) == 1 and sb.duplicates == 0
    print(
        f"\n[token down] endpoint down {down_for:.1f}s; {second[0][3]} rows waited pending with 0 attempts "
        f"through two failed probes; {token_failures} token requests in all; all delivered {took:.1f}s "
        "after it came back"
    )


@pytest.mark.timeout(120)
async def test_a_401_when_the_token_cannot_be_renewed_is_never_the_rows_own(
    database_url: str, tmp_path: Path
) -> None:
    """The race a token's expiry makes: a request meets a 401 while another, sent after it began,
    was accepted, and the token endpoint is down. The engine is put in that state (``accepted_at``
    ahead: some request begun later was accepted); the 401s then pause the target and charge no
    row, since without a token that works the refusal cannot be told to be the row's own."""
    with Sandbox(SandboxConfig(token_lifetime=3600.0, seed=4)) as sb:
        settings = load_settings(None, oauth_env(database_url, sb, client_secret_file(tmp_path)))
        store = Store(settings.require_database_url())
        engine = Engine(settings, store)
        try:
            await asyncio.to_thread(seed_rows, database_url, sample_updates(5, prefix="warm"))
            warm_done = all_final(database_url, 5)

            async def warm() -> bool:
                await engine.run_once()
                return await warm_done()

            await until(warm, 30, "the warm-up rows")
            sb.token_endpoint_down(True)
            sb.revoke_tokens()
            lane = engine.lanes["default"]
            lane.accepted_at = time.monotonic() + 3600.0
            await asyncio.to_thread(seed_rows, database_url, sample_updates(10, seed=3, prefix="expired"))

            async def paused() -> bool:
                await engine.run_once()
                return lane.state()[0] != "serving"

            await until(paused, 30, "the pause")
            await engine.run_once()  # what was in flight is recorded
        finally:
            await engine.close()
            await store.close()
    refused = rows(
        database_url,
        "select d.outcome, d.http_status from outbox.delivery_attempts d"
        " join outbox.action_status_updates u on u.id = d.update_id where u.action_id like 'expired-%%'",
    )
    assert refused and {status for _, status in refused} == {401}, refused
    assert "retry" not in {outcome for outcome, _ in refused}, refused  # none judged the row's own
    charged = rows(
        database_url,
        "select count(*) from outbox.action_status_updates where action_id like 'expired-%%' and attempts > 0",
    )
    assert charged == [(0,)]
    assert lane.breaker.state == BreakerState.OPEN


# -- 3. 403 on every request: the target pauses, then resumes by itself -----------------------


@pytest.mark.timeout(120)
async def test_forbidden_pauses_the_target_without_charging_and_resumes(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay")
    with Sandbox(SandboxConfig(seed=1)) as sb:
        sb.force_status(403)
        settings = relay_settings(database_url, sb.url)
        updates = sample_updates(100, prefix="forbidden")

        def paused_row() -> list[tuple[Any, ...]]:
            return rows(
                database_url,
                "select state, reason from outbox.relay_targets where target = 'default' and state = 'paused'",
            )

        async with relay_running(settings):
            await asyncio.to_thread(seed_rows, database_url, updates)
            await until(lambda: asyncio.to_thread(lambda: bool(paused_row())), 20, "relay_targets: paused")
            t_paused = time.monotonic()
            ((_, reason),) = await asyncio.to_thread(paused_row)

            status: dict[str, Any] = {}

            async def status_says_paused() -> bool:
                result = await asyncio.to_thread(
                    cli, "status", "--json", env={"RELAY_DATABASE_URL": database_url}
                )
                assert result.returncode == 0, result.stderr
                status.update({t["target"]: t for t in json.loads(result.stdout)["targets"]}["default"])
                return bool(status["paused"])

            await until(status_says_paused, 20, "`status --json` to show the pause", interval=0.3)
            await asyncio.sleep(max(0.0, t_paused + 4.0 - time.monotonic()))
            held = await arows(
                database_url,
                "select count(*), max(attempts), count(*) filter (where state in ('pending', 'in_flight'))"
                " from outbox.action_status_updates",
            )
            # Counted from the attempt rows, not the sandbox's counter: on a loaded machine the
            # burst sent before the first 403 came back can still be queued at the sandbox when
            # the pause shows up. Every request that started after the first 403 arrived is a
            # request made while paused.
            ((probes, probe_window),) = await arows(
                database_url,
                "with first as (select min(started_at + duration_ms * interval '1 millisecond') as t"
                "               from outbox.delivery_attempts where outcome = 'paused')"
                " select count(*) filter (where started_at > first.t),"
                "        extract(epoch from clock_timestamp() - first.t)::float8"
                " from outbox.delivery_attempts, first group by first.t",
            )
            sb.force_status(None)
            resumed_at = time.monotonic()
            await until(all_final(database_url, 100), 30, "delivery to resume")
            resumed_in = time.monotonic() - resumed_at
            await until(
                lambda: asyncio.to_thread(
                    lambda: rows(database_url, "select state from outbox.relay_targets") == [("serving",)]
                ),
                10,
                "relay_targets: serving again",
            )

    assert "403" in reason and "FORBIDDEN" in reason, reason
    assert status["paused"] is True and "403" in status["pause_reason"], status
    assert status["pending"] + status["in_flight"] == 100 and status["delivered"] == 0
    assert held == [(100, 0, 100)]  # nothing delivered, no attempt consumed
    # While paused, only a probe every couple of seconds at most reaches the API (backing off).
    assert 1 <= probes <= probe_window / 2.0 + 2, (probes, probe_window)
    assert await astates(database_url) == {"delivered": 100}
    assert rows(database_url, "select max(attempts), min(attempts) from outbox.action_status_updates") == [
        (1, 1)
    ]
    assert rows(
        database_url,
        "select count(*) from outbox.delivery_attempts where outcome = 'paused' and http_status = 403",
    ) == [(sb.status_counts[403],)]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.getMessage() == "target paused"]
    assert errors and "403" in errors[0].reason  # type: ignore[attr-defined]
    print(
        f"\n[403] paused with reason {reason!r}; {sb.status_counts[403]} requests answered 403 "
        f"({probes} in the {probe_window:.1f}s after the pause showed); resumed, all 100 delivered "
        f"{resumed_in:.1f}s after the API answered again, attempts 1 each"
    )


# -- 4. An API outage: 503s, then connection refused; the breaker spares the API and the rows -


@pytest.mark.timeout(120)
async def test_api_outage_breaker_limits_requests_and_attempts(database_url: str) -> None:
    sb1 = Sandbox(SandboxConfig(seed=1)).start()
    sb2: Sandbox | None = None
    try:
        port = sb1.port
        settings = relay_settings(database_url, sb1.url, RELAY_RETRY_MAX_ATTEMPTS="20")
        warm = sample_updates(50, prefix="warm")
        outage_a = sample_updates(200, seed=8, prefix="outage-a")
        outage_b = sample_updates(100, seed=9, prefix="outage-b")
        async with relay_running(settings) as relay:
            lane = relay.engine.lanes["default"]
            await asyncio.to_thread(seed_rows, database_url, warm)
            await until(all_final(database_url, 50), 20, "the warm-up rows")

            sb1.force_status(503)
            t0 = time.monotonic()
            await asyncio.to_thread(seed_rows, database_url, outage_a)
            await until(lambda: lane.breaker.state != BreakerState.CLOSED, 10, "the breaker to open", 0.01)
            opened_wall = time.time()
            reason = lane.breaker.reason
            await asyncio.sleep(max(0.0, t0 + 5.0 - time.monotonic()))

            await asyncio.to_thread(sb1.stop)  # now: connection refused
            refused_wall = time.time()
            await asyncio.to_thread(seed_rows, database_url, outage_b)
            await asyncio.sleep(max(0.0, t0 + 10.0 - time.monotonic()))

            sb2 = Sandbox(SandboxConfig(port=port, seed=2)).start()
            back_wall = time.time()
            outage = time.monotonic() - t0
            took = await until(all_final(database_url, 350), 40, "every row delivered after the outage")

    finally:
        sb1.stop()
        if sb2 is not None:
            sb2.stop()

    answered_503 = sb1.status_counts[503]
    refused = rows(
        database_url,
        "select count(*) from outbox.delivery_attempts where http_status is null"
        " and started_at >= to_timestamp(%s) and started_at < to_timestamp(%s)",
        (refused_wall, back_wall),
    )[0][0]
    after_open = sum(1 for r in sb1.requests if r.method == "PUT" and r.time > opened_wall + 0.5) + refused
    total_outage = answered_503 + refused
    assert await astates(database_url) == {"delivered": 350}
    max_attempts, mean_attempts = rows(
        database_url,
        "select max(attempts), avg(attempts)::float from outbox.action_status_updates where action_id like 'outage-%%'",
    )[0]
    assert max_attempts <= 5, max_attempts
    # Without a breaker, 300 rows retrying every <= 0.5 s for 10 s would make thousands of
    # requests (and reach max_attempts); with it: one burst, then probes.
    assert total_outage <= 100, (answered_503, refused)
    assert after_open <= (back_wall - opened_wall) / 2.0 + 1, after_open
    assert set(sb1.applied) == {a for a, _, _ in warm}
    assert sb2.applied == expected_bodies(outage_a + outage_b) and sb2.duplicates == 0
    assert reason and "consecutive transient failures" in reason
    print(
        f"\n[outage] {outage:.1f}s outage: {answered_503} requests answered 503 + {refused} refused "
        f"connections ({after_open} after the breaker opened); all 350 delivered {took:.1f}s after "
        f"the API came back; attempts max {max_attempts}, mean {mean_attempts:.2f} (max_attempts 20)"
    )


@pytest.mark.timeout(120)
async def test_without_the_breaker_the_same_outage_hammers_the_api(database_url: str, tmp_path: Path) -> None:
    """The baseline for the test above: the breaker practically off, 503s for 3 s."""
    config = tmp_path / "relay.toml"
    config.write_text("[breaker]\nfailure_threshold = 1000000\n")
    with Sandbox(SandboxConfig(seed=1)) as sb:
        sb.force_status(503)
        env = relay_env(database_url, sb.url, RELAY_RETRY_MAX_ATTEMPTS="20", RELAY_CONFIG=str(config))
        async with relay_running(load_settings(None, env)):
            await asyncio.to_thread(seed_rows, database_url, sample_updates(300, prefix="outage"))
            await until(lambda: sb.status_counts[503] > 0, 10, "the first 503")
            first = sb.status_counts[503]
            # At least one retry per row within 3 s, against <= 2 probes with the breaker.
            seconds = await until(lambda: sb.status_counts[503] - first >= 300, 3.0, "300 more requests")
            hammered = sb.status_counts[503] - first
    print(
        f"\n[no breaker] {hammered} requests to the failing API in {seconds:.1f}s ({hammered / seconds:.0f}/s)"
    )


# -- 5. The rate limit --------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_rate_limit_respected_within_ten_percent(database_url: str) -> None:
    rate, total = 50, 700
    with Sandbox(SandboxConfig(seed=1)) as sb:
        settings = relay_settings(database_url, sb.url, RELAY_RATE_LIMIT=str(rate), RELAY_LEASE="30")
        seed_rows(database_url, sample_updates(total, prefix="rate"))
        store = Store(settings.require_database_url())
        engine = Engine(settings, store)
        try:
            started = time.monotonic()
            while (await astates(database_url)).get("delivered", 0) < total:
                assert time.monotonic() - started < 60, "rate-limited drain took too long"
                await engine.run_once()
        finally:
            await engine.close()
            await store.close()

    times = put_times(sb)
    assert len(times) == total and sb.status_counts[204] == total
    busiest = max_in_window(times, 10.0)
    first_window = sum(1 for t in times if t < times[0] + 10.0)
    span = times[-1] - times[0]
    assert busiest <= rate * 10 * 1.1, busiest
    assert first_window >= rate * 10 * 0.9, first_window
    assert abs((total - 1) / span - rate) <= rate * 0.1, span
    print(
        f"\n[rate] limit {rate}/s: busiest 10 s window {busiest} requests, first 10 s {first_window}; "
        f"{total} requests over {span:.2f}s = {(total - 1) / span:.1f}/s"
    )


# -- 6. Two targets, two servers; an unconfigured target is left alone ------------------------


@pytest.mark.timeout(120)
async def test_each_target_reaches_only_its_own_server(database_url: str, tmp_path: Path) -> None:
    with (
        Sandbox(SandboxConfig(tokens=("token-default",), seed=1)) as sb_default,
        Sandbox(SandboxConfig(tokens=("token-eu",), seed=2)) as sb_eu,
    ):
        (tmp_path / "default.token").write_text("token-default\n")
        (tmp_path / "eu.token").write_text("token-eu\n")
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[targets.default]\nbase_url = "{sb_default.url}"\ntoken_file = "{tmp_path / "default.token"}"\n\n'
            f'[targets.eu]\nbase_url = "{sb_eu.url}"\ntoken_file = "{tmp_path / "eu.token"}"\n'
        )
        env = relay_env(database_url, "unused")
        for key in ("RELAY_API_BASE_URL", "RELAY_API_TOKEN"):
            del env[key]
        settings = load_settings(str(config), env)
        assert sorted(settings.targets) == ["default", "eu"]

        # The same action ids for both targets, with different outcomes, plus ids of their own.
        for_default = sample_updates(50, seed=1, prefix="shared") + sample_updates(50, seed=3, prefix="dflt")
        for_eu = sample_updates(50, seed=2, prefix="shared") + sample_updates(50, seed=4, prefix="eu")
        for_us = sample_updates(20, seed=5, prefix="us")
        seed_rows(database_url, for_default, target="default")
        seed_rows(database_url, for_eu, target="eu")
        seed_rows(database_url, for_us, target="us")

        store = Store(settings.require_database_url())
        engine = Engine(settings, store)
        try:
            for _ in range(100):
                await engine.run_once()
                if (await astates(database_url)).get("delivered", 0) == 200:
                    break
                await asyncio.sleep(0.05)
            for _ in range(3):  # a few more rounds: 'us' stays unclaimed
                await engine.run_once()
        finally:
            await engine.close()
            await store.close()

    assert sb_default.applied == expected_bodies(for_default)
    assert sb_eu.applied == expected_bodies(for_eu)
    shared = [a for a, _, _ in for_default if a.startswith("shared")]
    assert any(sb_default.applied[a] != sb_eu.applied[a] for a in shared)  # each got its own outcome
    assert sb_default.request_total == 100 and sb_eu.request_total == 100
    per_target = rows(
        database_url,
        "select target, state, count(*), max(attempts), max(requests), count(claimed_by), count(claim_token)"
        " from outbox.action_status_updates group by 1, 2 order by 1, 2",
    )
    assert per_target == [
        ("default", "delivered", 100, 1, 1, 0, 0),
        ("eu", "delivered", 100, 1, 1, 0, 0),
        ("us", "pending", 20, 0, 0, 0, 0),
    ]
    assert rows(
        database_url,
        "select count(*) from outbox.delivery_attempts where target = 'us' or action_id like 'us-%%'",
    ) == [(0,)]
    print(
        "\n[targets] default: 100 rows to its server, eu: 100 to its own, us (unconfigured): 20 left pending"
    )


# -- 7. Secrets never leak ----------------------------------------------------------------------


def _dump_outbox(url: str) -> str:
    relations = rows(
        url,
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'outbox' and c.relkind in ('r', 'v', 'm', 'p') order by 1",
    )
    assert {"action_status_updates", "delivery_attempts", "relay_targets"} <= {r for (r,) in relations}
    out = []
    for (name,) in relations:
        out += [r for (r,) in rows(url, f'select row_to_json(t)::text from outbox."{name}" t')]
    return "\n".join(out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("auth", "log_format"), [("token", "text"), ("token", "json"), ("oauth", "text"), ("oauth", "json")]
)
async def test_secrets_never_leak(database_url: str, tmp_path: Path, auth: str, log_format: str) -> None:
    static_token = "tok-" + secrets.token_urlsafe(24)
    client_secret = "cs-" + secrets.token_urlsafe(24)
    db_password = "s3cr3t-pw-" + secrets.token_hex(8)
    url = make_url(database_url).set(password=db_password).render_as_string(hide_password=False)
    assert db_password in url
    config = SandboxConfig(
        tokens=(static_token,), oauth_clients={"relay-client": client_secret}, token_lifetime=2.0, seed=1
    )
    with Sandbox(config) as sb:
        issued = sb.issued_tokens
        api_url = sb.url
        env = relay_env(
            url, sb.url, RELAY_LOG_LEVEL="DEBUG", RELAY_LOG_FORMAT=log_format, WATCHDOG_USEC="2000000"
        )
        if auth == "oauth":
            del env["RELAY_API_TOKEN"]
            env.update(
                RELAY_OAUTH_CLIENT_ID="relay-client",
                RELAY_OAUTH_CLIENT_SECRET_FILE=str(client_secret_file(tmp_path, client_secret)),
                RELAY_OAUTH_TOKEN_URL=sb.token_url,
            )
        else:
            env["RELAY_API_TOKEN"] = static_token
        log_path = tmp_path / "relay.log"
        started = time.monotonic()
        proc = start_relay_process(env, log_path)
        total = 0
        try:
            ok = [
                *sample_updates(20, prefix="ok"),
                ("unknown-1", "SUCCESS", []),
                ("unknown-2", "SUCCESS", []),
            ]
            seed_rows(url, ok)
            total += len(ok)
            await until(all_final(url, total), 30, "the first rows")
            for status, prefix in ((500, "e500"), (401, "e401"), (403, "e403")):
                sb.force_status(status)
                batch = sample_updates(5, prefix=prefix)
                seed_rows(url, batch)
                total += len(batch)

                async def answered(status: int = status) -> bool:
                    return sb.status_counts[status] > 0

                await until(answered, 20, f"a {status} answer")
            sb.force_status(None)
            if auth == "oauth":  # and the token endpoint down for a moment: its errors get logged
                sb.token_endpoint_down(True)
                # The scenario, not a wait for a result: the last token (2 s) expires, so the
                # rows seeded next need a new one.
                await asyncio.sleep(2.2)
                batch = sample_updates(5, prefix="nt")
                seed_rows(url, batch)
                total += len(batch)
                await until(
                    lambda: "cannot get a token" in log_path.read_text(), 20, "a token failure logged"
                )
                sb.token_endpoint_down(False)
            await until(all_final(url, total), 40, "every row final")
            (final_at,) = (await arows(url, "select now()"))[0]
            heartbeat = "select count(*) from outbox.relay_targets where heartbeat_at > %s"
            await until(
                lambda: asyncio.to_thread(lambda: rows(url, heartbeat, (final_at,))[0][0] > 0),
                20,
                "a heartbeat after the last row was final",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0

        relay_done = time.monotonic()
        # The operators' commands, once per auth kind (the log format does not change them).
        ops_env = {k: v for k, v in env.items() if k != "WATCHDOG_USEC"}
        commands = (
            [
                ("status",),
                ("status", "--json"),
                ("audit", "e401-000000"),
                ("audit", "e500-000000", "--json"),
                ("dead", "list", "--json"),
                ("check",),
            ]
            if log_format == "text"
            else []
        )
        results = await asyncio.gather(*(asyncio.to_thread(cli, *args, env=ops_env) for args in commands))
        for args, result in zip(commands, results, strict=True):
            assert result.returncode == 0, (args, result.stderr)
        outputs = [r.stdout + r.stderr for r in results]
        ops_took = time.monotonic() - relay_done

    logs = log_path.read_text()
    dump = _dump_outbox(database_url)
    # The scenario really happened, and the logs are the DEBUG ones.
    assert states(database_url) == {"delivered": total - 2, "dead": 2}
    assert {401, 403, 500} <= set(sb.status_counts)
    assert "target paused" in logs and "DEBUG" in logs
    if log_format == "json":
        parsed = [json.loads(line) for line in logs.splitlines() if line.strip()]
        assert parsed and all(isinstance(p, dict) and "msg" in p for p in parsed)
    secrets_ = {"database password": db_password}
    if auth == "oauth":
        assert len(issued) >= 3 and sb.status_counts[401] >= 1
        assert "token renewed" in logs
        secrets_["client secret"] = client_secret
        secrets_.update({f"issued token {i}": t for i, t in enumerate(issued)})
    else:
        secrets_["static token"] = static_token
    # The places searched do hold what is not secret (so a leak there would have been seen).
    assert api_url in logs and "unknown-1" in logs
    assert "e401-000000" in dump and "forced answer 403" in dump
    if outputs:  # the operators' commands ran (text logs only): they show the real figures
        shown = {t["target"]: t for t in json.loads(results[1].stdout)["targets"]}["default"]
        assert (shown["delivered"], shown["dead"]) == (total - 2, 2), shown
        assert "e401-000000" in outputs[2]
    places = {"relay logs": logs, "outbox tables": dump, "ops commands": "\n".join(outputs)}
    leaks = [
        (what, where) for what, secret in secrets_.items() for where, text in places.items() if secret in text
    ]
    assert not leaks, leaks
    print(
        f"\n[secrets {auth}/{log_format}] {len(logs.splitlines())} log lines, {len(dump.splitlines())} outbox rows, "
        f"{len(outputs)} ops outputs checked for {len(secrets_)} secrets: none found "
        f"(relay {relay_done - started:.1f}s, ops commands {ops_took:.1f}s)"
    )


# -- 8. Plain http:// to a non-loopback host is refused at start-up ----------------------------


@pytest.mark.parametrize(
    "setting",
    [
        {"RELAY_API_BASE_URL": "http://miraklconnect.example.com/api/channel-platform"},
        {"RELAY_OAUTH_TOKEN_URL": "http://auth.example.com/oauth/token", "RELAY_OAUTH_CLIENT_ID": "c"},
        {"toml": '[targets.eu]\nbase_url = "http://10.1.2.3:8080/api"\ntoken = "t"\n'},
    ],
    ids=["base-url", "token-url", "toml-target"],
)
def test_plain_http_to_a_remote_host_is_refused_at_startup(
    database_url: str, tmp_path: Path, setting: dict[str, str]
) -> None:
    secret = client_secret_file(tmp_path)
    env = {"RELAY_DATABASE_URL": database_url, "RELAY_API_TOKEN": "t", **setting}
    if "RELAY_OAUTH_CLIENT_ID" in env:
        del env["RELAY_API_TOKEN"]
        env["RELAY_OAUTH_CLIENT_SECRET_FILE"] = str(secret)
    if "toml" in env:
        (tmp_path / "relay.toml").write_text(env.pop("toml"))
        env["RELAY_CONFIG"] = str(tmp_path / "relay.toml")
    started = time.monotonic()
    result = cli("run", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("outbox-relay: "), result.stderr
    assert "plain http:// is refused" in lines[0] and "https://" in lines[0]
    assert time.monotonic() - started < 20


def test_a_static_token_and_oauth_both_in_variables_is_a_configuration_error(tmp_path: Path) -> None:
    env = {
        "RELAY_API_TOKEN": "t0ken",
        "RELAY_OAUTH_CLIENT_ID": "client",
        "RELAY_OAUTH_CLIENT_SECRET_FILE": str(client_secret_file(tmp_path)),
    }
    with pytest.raises(ConfigError, match="either a static token or OAuth, not both"):
        load_settings(None, env)
    # Each variable still overrides the other kind of auth set in the file.
    config = tmp_path / "relay.toml"
    config.write_text('[targets.default]\ntoken = "from-file"\n')
    assert (
        load_settings(str(config), {k: v for k, v in env.items() if k != "RELAY_API_TOKEN"})
        .targets["default"]
        .auth_kind
        == "oauth"
    )
    config.write_text(
        f'[targets.default]\noauth_client_id = "c"\noauth_client_secret_file = "{env["RELAY_OAUTH_CLIENT_SECRET_FILE"]}"\n'
    )
    assert load_settings(str(config), {"RELAY_API_TOKEN": "t0ken"}).targets["default"].auth_kind == "token"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8080", True),
        ("http://127.9.9.9", True),
        ("http://[::1]:8080/api", True),
        ("http://localhost:8080", True),
        ("https://miraklconnect.com/api/channel-platform", True),
        ("http://localhost.example.com", False),
        ("http://127.0.0.1.nip.io", False),
        ("http://0.0.0.0:8080", False),
        ("http://[::ffff:10.0.0.1]", False),
        ("http://192.168.1.10", False),
    ],
)
def test_only_loopback_hosts_may_use_plain_http(url: str, allowed: bool) -> None:
    if allowed:
        assert check_url(url, "base_url") == url
    else:
        with pytest.raises(ConfigError, match="plain http:// is refused"):
            check_url(url, "base_url")


# -- 9. Credentials are sane at load; proxies are explicit and checked like base URLs -----------

BAD_TOKENS = {
    "crlf": "tok\r\nX-Injected: 1",
    "non-ascii": "t\u00e9k-secret",
    "space": "tok secret",
    "nul": "tok\x00x",
}


def _one_line_naming(exc: ConfigError, setting: str, value: str) -> None:
    text = str(exc)
    assert "\n" not in text and "\r" not in text
    assert text.startswith(f"{setting}: "), text
    assert value not in text and value.strip() not in text


TOKEN_SOURCES = [
    "RELAY_API_TOKEN",
    "toml token",
    "token_file",
    "credential",
    "RELAY_OAUTH_CLIENT_ID",
    "toml client id",
]


@pytest.mark.parametrize(
    ("source", "value"),
    [
        pytest.param(source, value, id=f"{source}-{name}")
        for source in TOKEN_SOURCES
        for name, value in BAD_TOKENS.items()
        if not (source.startswith("RELAY_") and "\x00" in value)  # no NUL in an environment variable
    ],
)
def test_tokens_and_client_ids_must_be_printable_ascii(tmp_path: Path, source: str, value: str) -> None:
    env: dict[str, str] = {}
    config = tmp_path / "relay.toml"
    secret = client_secret_file(tmp_path)
    if source.startswith("RELAY_"):
        env[source] = value
        if source == "RELAY_OAUTH_CLIENT_ID":
            env["RELAY_OAUTH_CLIENT_SECRET_FILE"] = str(secret)
        setting = source
    elif source == "toml token":
        config.write_text(f"[targets.eu]\ntoken = {json.dumps(value)}\n")
        setting = "targets.eu.token"
    elif source == "toml client id":
        config.write_text(
            f'[targets.eu]\noauth_client_id = {json.dumps(value)}\noauth_client_secret_file = "{secret}"\n'
        )
        setting = "targets.eu.oauth_client_id"
    elif source == "token_file":
        (tmp_path / "tok").write_text(value + "\n")
        config.write_text(f'[targets.eu]\ntoken_file = "{tmp_path / "tok"}"\n')
        setting = "targets.eu.token_file"
    else:
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "eu.api-token").write_text(value)
        config.write_text("[targets.eu]\n")
        env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "creds")
        setting = "credential eu.api-token"
    with pytest.raises(
        ConfigError, match="must be printable ASCII without spaces or control characters"
    ) as info:
        load_settings(str(config) if config.exists() else None, env)
    _one_line_naming(info.value, setting, value)


def test_sane_credentials_still_load(tmp_path: Path) -> None:
    token = "".join(chr(c) for c in range(0x21, 0x7F))  # every printable ASCII character
    config = tmp_path / "relay.toml"
    config.write_text(
        f"[targets.a]\ntoken = {json.dumps(token)}\n"
        f'[targets.b]\noauth_client_id = "id-1"\noauth_client_secret = "a secret with spaces and \u00e9"\n'
    )
    targets = load_settings(str(config), {}).targets
    assert targets["a"].token is not None and targets["a"].token.reveal() == token
    assert targets["b"].oauth is not None and targets["b"].oauth.client_secret.reveal().endswith("\u00e9")


@pytest.mark.parametrize("secret", ["line\nbreak", "tab\tbed", "esc\x1b[0m", "del\x7f", "c1\x85"])
def test_a_client_secret_with_control_characters_is_refused(tmp_path: Path, secret: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[targets.eu]\noauth_client_id = "id-1"\noauth_client_secret = {json.dumps(secret)}\n')
    with pytest.raises(ConfigError, match="without control characters") as info:
        load_settings(str(config), {})
    _one_line_naming(info.value, "targets.eu.oauth_client_secret", secret)


@pytest.mark.parametrize(
    ("content", "fragment"), [(b"\xff\xfe-not-utf8", "not UTF-8"), (b"x" * (65 * 1024), "larger than 64 KiB")]
)
def test_a_secret_file_that_is_not_text_is_refused(tmp_path: Path, content: bytes, fragment: str) -> None:
    (tmp_path / "tok").write_bytes(content)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_settings(None, {"RELAY_API_TOKEN_FILE": str(tmp_path / "tok")})
    assert str(info.value).startswith("RELAY_API_TOKEN_FILE: ")


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("token", ["tok\r\nX-Injected: 1", "t\u00e9k-secret"], ids=["crlf", "non-ascii"])
def test_a_bad_token_is_one_line_and_exit_2_without_the_token(command: str, token: str) -> None:
    result = cli(
        command, env={"RELAY_API_TOKEN": token, "RELAY_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr == (
        "outbox-relay: RELAY_API_TOKEN: must be printable ASCII without spaces or control characters\n"
    )
    for part in (token, "X-Injected", "k-secret"):
        assert part not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:3128", None),
        ("http://[::1]:3128/", None),
        ("https://proxy.example.com:8443", None),
        ("https://relay:pr0xy-pw@proxy.example.com", None),
        (
            "http://relay:pr0xy-pw@proxy.example.com:3128",
            "plain http:// is refused for non-loopback proxy host",
        ),
        ("socks5://relay:pr0xy-pw@127.0.0.1:1080", "expected an https:// proxy URL"),
        ("proxy.example.com:3128", "expected an https:// proxy URL"),
        ("https://relay:pr0xy-pw@proxy.example.com:99999", "expected https://[user:password@]host[:port]"),
        ("https://relay:pr0xy-pw@proxy.example.com/path", "no path, query or fragment"),
        ("https://relay:pr0xy-pw@proxy.example.com?x=1", "no path, query or fragment"),
    ],
)
def test_a_proxy_is_checked_like_a_base_url(tmp_path: Path, url: str, refused: str | None) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[targets.eu]\nproxy = "{url}"\n')
    if refused is None:
        proxy = load_settings(str(config), {}).targets["eu"].proxy
        assert proxy is not None and proxy.reveal() == url
        assert "pr0xy-pw" not in repr(load_settings(str(config), {}))
        return
    with pytest.raises(ConfigError, match=re.escape(refused)) as info:
        load_settings(str(config), {})
    assert str(info.value).startswith("targets.eu.proxy: ")
    assert "pr0xy-pw" not in str(info.value) and "\n" not in str(info.value)


def test_the_top_level_proxy_is_every_targets_default(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        'proxy = "https://proxy.example.com:8443"\n'
        '[targets.a]\n[targets.b]\nproxy = "https://other.example.com"\n[targets.c]\nproxy = ""\n'
    )
    targets = load_settings(str(config), {}).targets
    shown = {name: t.proxy.reveal() if t.proxy else None for name, t in targets.items()}
    assert shown == {
        "a": "https://proxy.example.com:8443",
        "b": "https://other.example.com",
        "c": None,
        "default": "https://proxy.example.com:8443",
    }
    env = {"RELAY_PROXY": "http://127.0.0.1:3128", "HTTPS_PROXY": "https://ignored.example.com"}
    assert load_settings(None, env).targets["default"].proxy == Secret("http://127.0.0.1:3128")
    assert (
        load_settings(None, {"HTTPS_PROXY": "https://ignored.example.com"}).targets["default"].proxy is None
    )
