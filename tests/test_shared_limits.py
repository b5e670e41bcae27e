"""Several relays of one database share one set of limits (relay/core/peers.py).

Relays run as ``outbox-relay run`` processes against the sandbox on loopback, which records
every request with its time: the rate is read where it matters, at the API. A relay that is
"alive but slow" or "holding a pause" is played by this test through the store (a real
``outbox.relay_targets`` row and real claims), so its timing is ours to choose.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from relay.core.peers import ALIVE_SECONDS
from relay.dev.sandbox.server import Faults, Sandbox, SandboxConfig
from relay.pg.store import Store
from relay.service.daemon import HEARTBEAT_SECONDS
from relay.settings import Secret
from tests.relaykit import relay_env, sample_updates, seed_rows, start_relay_process, states, wait_until

RATE = 30
ROWS = 900


def _puts(sb: Sandbox) -> list[float]:
    return sorted(r.time for r in list(sb.requests) if r.method == "PUT")


def busiest(times: list[float], window: float) -> tuple[int, float]:
    """The most requests in any window of ``window`` seconds, and when that window starts."""
    best, at, start = 0, 0.0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        if end - start + 1 > best:
            best, at = end - start + 1, times[start]
    return best, at


def _in_window(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _live_relays(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select count(distinct relay_id) from outbox.relay_targets where heartbeat_at > now() - interval '3 s'"
        ).fetchone()
    return int(row[0]) if row else 0


def _claimed_by(url: str, relay_id: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select id from outbox.action_status_updates where state = 'in_flight' and claimed_by = %s",
            (relay_id,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def _undelivered(url: str, ids: list[int]) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select count(*) from outbox.action_status_updates where id = any(%s) and state <> 'delivered'",
            (ids,),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.timeout(240)
def test_three_relays_share_one_rate_limit_and_two_take_over_a_killed_ones_share(
    database_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Three relays, rate_limit 30, 900 rows: at most 330 requests in any 10 s window; one
    relay killed (-9) mid-run: the two left deliver the rest at more than two thirds of the rate
    once they see it gone (figure: seconds from the kill until they send at the full rate)."""
    seed_rows(database_url, sample_updates(ROWS, prefix="share"))
    with Sandbox(SandboxConfig(seed=3)) as sb:
        for i in range(3):
            env = relay_env(database_url, sb.url, RELAY_ID=f"share-{i}", RELAY_RATE_LIMIT=str(RATE))
            procs.append(start_relay_process(env, tmp_path / f"relay-{i}.log"))
        assert wait_until(lambda: _live_relays(database_url) == 3, 60), "three relays never registered"
        assert wait_until(lambda: states(database_url).get("delivered", 0) >= ROWS // 3, 120)
        victim = procs[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(15)
        killed_at = time.time()
        assert wait_until(lambda: states(database_url).get("delivered", 0) == ROWS, 120), states(database_url)
        times = _puts(sb)
    assert max(sb.apply_count.values()) == 1
    window, window_at = busiest(times, 10.0)
    # Takeover: the first 2 s window after the kill carrying more than the full rate's 90 %.
    takeover = next(
        (
            t - killed_at
            for t in times
            if t > killed_at and _in_window(times, t, t + 2.0) >= 0.9 * 2 * RATE and t + 2.0 <= times[-1]
        ),
        None,
    )
    after = [t for t in times if t > killed_at + ALIVE_SECONDS + 2.0]
    rate_after = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 else 0.0
    print(
        f"\n[shared limits] 3 relays, rate_limit {RATE}, {ROWS} rows: busiest 10 s window {window} requests "
        f"(bound {RATE * 11}; it starts {window_at - times[0]:.1f} s after the first request, the kill came "
        f"{killed_at - times[0]:.1f} s after it); one killed: full rate again {takeover if takeover is None else round(takeover, 1)} s "
        f"after the kill (heartbeat interval {HEARTBEAT_SECONDS:g} s), rate after the takeover {rate_after:.1f}/s, "
        f"duplicates sent {sb.duplicates}"
    )
    assert window <= RATE * 11
    assert rate_after > RATE * 2 / 3
    assert takeover is not None


@pytest.mark.timeout(180)
def test_a_killed_relays_claims_are_delivered_by_the_other_long_before_its_lease_ends(
    database_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Two relays under load, default lease (60 s); one gets kill -9 while it holds claims: the
    other delivers them within two heartbeat intervals (figure: seconds from the kill)."""
    seed_rows(database_url, sample_updates(3000, prefix="dead"))
    with Sandbox(SandboxConfig(seed=4, faults=Faults(latency=0.05))) as sb:
        for name in ("live", "doomed"):
            env = relay_env(database_url, sb.url, RELAY_ID=name, RELAY_LEASE="60", RELAY_MAX_CONCURRENCY="8")
            procs.append(start_relay_process(env, tmp_path / f"{name}.log"))
        assert wait_until(lambda: len(_claimed_by(database_url, "doomed")) > 0, 60), "no claims to kill"
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(15)
        killed = time.monotonic()
        held = _claimed_by(database_url, "doomed")
        assert held
        assert wait_until(lambda: _undelivered(database_url, held) == 0, 55), "the dead relay's rows waited"
        took = time.monotonic() - killed
        assert wait_until(lambda: states(database_url).get("delivered", 0) == 3000, 120)
    print(
        f"\n[dead relay] kill -9 of one of two relays: its {len(held)} claimed rows delivered {took:.1f} s later; "
        f"duplicates sent {sb.duplicates}"
    )
    assert took <= 2 * HEARTBEAT_SECONDS, (tmp_path / "live.log").read_text()[-3000:]
    assert max(sb.apply_count.values()) == 1


async def _fake_relay(url: str, relay_id: str, rows: int, state: str = "serving") -> tuple[Store, list[int]]:
    """A relay played by the test: its heartbeat row and ``rows`` claims under a 60 s lease."""
    store = Store(Secret(url), pool_size=1)
    await store.heartbeat(relay_id, [("default", state, None)])
    claimed = await store.claim("default", rows, 60.0, uuid.uuid4(), relay_id)
    return store, [r.id for r in claimed]


@pytest.mark.timeout(120)
async def test_a_slow_but_alive_relay_keeps_its_claims_and_loses_them_once_it_stops(
    database_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A relay that holds rows long but keeps its heartbeat fresh keeps its claims while a live
    relay runs beside it; once its heartbeat stops, the live relay delivers them."""
    seed_rows(database_url, sample_updates(20, prefix="slow"))
    store, held = await _fake_relay(database_url, "slow-relay", 5)
    assert len(held) == 5
    try:
        with Sandbox(SandboxConfig(seed=5)) as sb:
            env = relay_env(database_url, sb.url, RELAY_ID="live", RELAY_LEASE="60")
            procs.append(start_relay_process(env, tmp_path / "live.log"))
            # The live relay delivers the rest, then runs three times the bound a dead relay is
            # released after beside the slow one, whose heartbeat is kept fresh.
            give_up, kept_since = time.monotonic() + 60, None
            while kept_since is None or time.monotonic() - kept_since < 3 * ALIVE_SECONDS:
                assert time.monotonic() < give_up, states(database_url)
                await store.heartbeat("slow-relay", [("default", "serving", None)])
                if (
                    kept_since is None
                    and (await asyncio.to_thread(states, database_url)).get("delivered") == 15
                ):
                    kept_since = time.monotonic()
                await asyncio.sleep(0.5)
            assert await asyncio.to_thread(states, database_url) == {"delivered": 15, "in_flight": 5}
            assert sorted(await asyncio.to_thread(_claimed_by, database_url, "slow-relay")) == sorted(held)
            stopped = time.monotonic()
            assert await asyncio.to_thread(
                wait_until, lambda: states(database_url) == {"delivered": 20}, 2 * HEARTBEAT_SECONDS + 10
            ), states(database_url)
            took = time.monotonic() - stopped
        assert {r.action_id for r in sb.requests if r.method == "PUT"} >= {f"slow-{i:06d}" for i in range(20)}
        print(
            f"\n[slow relay] kept its 5 claims while alive; delivered {took:.1f} s after its heartbeat stopped"
        )
    finally:
        await store.close()


def _target_row(url: str, relay_id: str) -> tuple[str, str | None] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select state, reason from outbox.relay_targets where relay_id = %s and target = 'default'",
            (relay_id,),
        ).fetchone()
    return (str(row[0]), row[1]) if row else None


@pytest.mark.timeout(120)
async def test_a_pause_held_by_a_live_relay_is_followed_until_that_relay_serves_again(
    database_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Another relay's breaker is open for the target: this relay sends nothing, not even a probe,
    while that relay holds the pause, and resumes as soon as it serves again."""
    seed_rows(database_url, sample_updates(10, prefix="pause"))
    store = Store(Secret(database_url), pool_size=1)
    reason = "5 consecutive transient failures"
    try:
        await store.heartbeat("leader", [("default", "paused", reason)], {"default": 30.0})
        with Sandbox(SandboxConfig(seed=6)) as sb:
            env = relay_env(database_url, sb.url, RELAY_ID="follower")
            procs.append(start_relay_process(env, tmp_path / "follower.log"))

            def following() -> bool:
                row = _target_row(database_url, "follower")
                return row is not None and row[0] == "paused" and "paused by relay leader" in (row[1] or "")

            for _ in range(3 * int(ALIVE_SECONDS)):  # the leader stays alive: its pause holds
                await store.heartbeat("leader", [("default", "paused", reason)], {"default": 30.0})
                assert await asyncio.to_thread(wait_until, following, 30)
                await asyncio.sleep(0.5)
            assert sb.request_total == 0
            assert await asyncio.to_thread(states, database_url) == {"pending": 10}
            await store.heartbeat("leader", [("default", "serving", None)])  # its probe went through
            assert await asyncio.to_thread(wait_until, lambda: states(database_url) == {"delivered": 10}, 30)
            assert _target_row(database_url, "follower") == ("serving", None)
    finally:
        await store.close()


@pytest.mark.timeout(120)
async def test_a_dead_relays_pause_runs_out_and_the_follower_probes_itself(
    database_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The relay holding the pause dies (its heartbeat stops): the follower's pause runs out and
    it probes the target itself, which serves: everything is delivered."""
    seed_rows(database_url, sample_updates(10, prefix="orphan"))
    store = Store(Secret(database_url), pool_size=1)
    try:
        await store.heartbeat("leader", [("default", "paused", "credentials refused")], {"default": 4.0})
        with Sandbox(SandboxConfig(seed=7)) as sb:
            env = relay_env(database_url, sb.url, RELAY_ID="follower")
            procs.append(start_relay_process(env, tmp_path / "follower.log"))
            assert await asyncio.to_thread(
                wait_until, lambda: states(database_url) == {"delivered": 10}, 60
            ), states(database_url)
        assert sb.request_total >= 10
        log = (tmp_path / "follower.log").read_text()
        assert "paused by relay leader" in log and "Traceback" not in log
    finally:
        await store.close()
