"""Health that means progress, and pauses that escalate: a real daemon object on a real database.

The engine is made to look stuck or paused through the state the daemon reads: ``engine.running``,
a lane's breaker and ``paused_since``, and the daemon's own clock moved ahead of the engine's last
``progress_at`` (a read-only reading). One test makes a drain really stuck, on an API that answers
one byte at a time and never finishes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.cli.ops import collect_status
from relay.service import daemon
from relay.service.daemon import Relay, pause_alerts_due, stall_after
from relay.service.metrics import MetricsServer
from relay.settings import Settings, load_settings
from tests.relaykit import relay_settings, seed_rows, states

NO_API = "http://127.0.0.1:9"  # never reached by the state-based tests


# -- the two pure rules ----------------------------------------------------------------------
def test_stall_after_is_the_lease_plus_30_seconds() -> None:
    assert stall_after(Settings()) == 90.0  # the default lease, 60 s
    assert stall_after(load_settings(None, {"RELAY_LEASE": "2"})) == 32.0


@pytest.mark.parametrize(
    ("seconds", "due"),
    [
        (0.0, 0),
        (299.9, 0),
        (300.0, 1),
        (899.0, 1),
        (900.0, 2),
        (3599.0, 2),
        (3600.0, 3),
        (7199.0, 3),
        (7200.0, 4),
        (10800.0, 5),
        (86400.0, 26),
    ],
)
def test_pause_alerts_at_5_min_15_min_1_h_then_hourly(seconds: float, due: int) -> None:
    assert pause_alerts_due(seconds) == due


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "n.sock"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes
        pytest.skip(f"tmp_path too long for an AF_UNIX socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock`` (sd_notify sends synchronously: they are all there)."""
    out: list[str] = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def closed(relay: Relay) -> None:
    await relay.engine.close()
    await relay.store.close()
    relay.notifier.close()


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relay.daemon" and r.getMessage().startswith(text)]


def extra(record: logging.LogRecord, *names: str) -> tuple[object, ...]:
    """The record's structured fields (``extra=``) by name."""
    return tuple(record.__dict__[n] for n in names)


class Ahead:
    """``time.monotonic()`` moved ahead by ``seconds``: the daemon's clock, for a test that wants
    the engine's last progress to be that much older than it is."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.seconds


async def wait_for(predicate: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        await asyncio.sleep(0.05)


# -- a drain without progress ----------------------------------------------------------------
async def test_a_drain_without_progress_fails_health_and_starves_the_watchdog(
    database_url: str, notify_socket: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = notify_socket
    clock = Ahead()
    relay = Relay(
        relay_settings(database_url, NO_API, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000"), monotonic=clock
    )
    server = MetricsServer(relay.metrics, "127.0.0.1", 0, relay.health)
    await server.start()
    caplog.set_level(logging.INFO, logger="relay.daemon")
    try:
        bound = stall_after(relay.settings)
        assert bound == 38.0  # RELAY_LEASE=8 (tests.relaykit) + 30
        relay.engine.running = True  # a drain is running; its last progress was at start-up
        clock.seconds = bound - 5
        assert await relay.health() == (True, "ok")
        await relay.heartbeat()
        assert "WATCHDOG=1" in received(sock)

        clock.seconds = 95
        healthy, reason = await relay.health()
        assert not healthy
        assert re.fullmatch(r"no progress for 9[56]s while a drain is running \(bound 38s\)", reason), reason
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            answer = await http.get("/healthz")
        assert answer.status_code == 503 and answer.text.startswith("no progress for 9")
        await relay.heartbeat()
        await relay.heartbeat()
        sent = received(sock)
        assert len(sent) == 2, sent  # two status lines, no WATCHDOG=1
        assert all(
            re.match(r"STATUS=delivered or dead-lettered 0 rows; stalled: no progress for 9", m) for m in sent
        )
        stalled = messages(caplog, "drain stalled")
        assert len(stalled) == 1 and stalled[0].levelno == logging.ERROR  # once, not per check
        assert messages(caplog, "drain progress resumed") == []

        clock.seconds = 0  # as if the engine had made progress just now
        assert await relay.health() == (True, "ok")
        await relay.heartbeat()
        sent = received(sock)
        assert "WATCHDOG=1" in sent and not any("stalled" in m for m in sent)
        resumed = messages(caplog, "drain progress resumed")
        assert len(resumed) == 1 and resumed[0].levelno == logging.INFO
        assert len(messages(caplog, "drain stalled")) == 1
    finally:
        relay.engine.running = False
        await server.stop()
        await closed(relay)


async def test_after_a_long_idle_time_the_clock_starts_with_the_drain(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay with nothing to do makes no progress for hours; its next drain is not stuck for
    that. Here the drain's first claim waits on a slow database."""
    clock = Ahead()
    relay = Relay(relay_settings(database_url, NO_API), monotonic=clock)
    caplog.set_level(logging.INFO, logger="relay.daemon")
    answer = asyncio.Event()
    claim = relay.store.claim

    async def slow_claim(*args: object, **kwargs: object) -> object:
        await answer.wait()
        return await claim(*args, **kwargs)  # type: ignore[arg-type]

    relay.store.claim = slow_claim  # type: ignore[method-assign]
    try:
        clock.seconds = 3600  # the last progress was an hour ago
        drain = asyncio.create_task(relay._drain())  # the drain job, as the scheduler runs it
        await wait_for(lambda: relay.engine.running, 10, "the drain to start")
        assert await relay.health() == (True, "ok")
        bound = stall_after(relay.settings)
        clock.seconds += bound + 1  # the claim has now taken longer than the bound
        healthy, reason = await relay.health()
        assert not healthy and reason.startswith(f"no progress for {bound + 1:.0f}s"), reason
        answer.set()
        await asyncio.wait_for(drain, 10)
        assert not relay.engine.running and relay.last_drain_at is not None
        assert await relay.health() == (True, "ok")
        assert [r.levelno for r in messages(caplog, "drain")] == [logging.ERROR, logging.INFO]
    finally:
        answer.set()
        await closed(relay)


class HeldApi:
    """An API that answers every PUT with 204, but only once ``answer`` is set."""

    def __init__(self) -> None:
        self.requests = 0
        self.answer = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> HeldApi:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests += 1
                await self.answer.wait()
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


@pytest.fixture
async def held_api() -> AsyncIterator[HeldApi]:
    async with HeldApi() as api:
        yield api


async def test_a_drain_stuck_on_a_database_write_is_reported_and_recovers(
    database_url: str,
    notify_socket: tuple[socket.socket, str],
    held_api: HeldApi,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Really stuck: once the API has answered, another transaction holds the row's lock, so the
    write of the result waits (PostgreSQL has no reason to give up) and the drain with it. The
    requests themselves cannot hang: each has one deadline. The slack is cut to 3 s so that the
    test takes seconds rather than the 30 s it would."""
    sock, path = notify_socket
    monkeypatch.setattr(daemon, "STALL_SLACK", 3.0)
    settings = relay_settings(
        database_url,
        held_api.url,
        RELAY_LEASE="4",
        RELAY_REQUEST_TIMEOUT="2",
        RELAY_SHUTDOWN_TIMEOUT="1",
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="400000",
    )
    seed_rows(database_url, [("stuck-1", "SUCCESS", [])])
    relay = Relay(settings)
    assert stall_after(settings) == 7.0
    caplog.set_level(logging.INFO, logger="relay.daemon")
    loop = asyncio.get_running_loop()
    running = asyncio.create_task(relay.run())
    locker = await psycopg.AsyncConnection.connect(database_url)
    try:
        await wait_for(lambda: held_api.requests == 1, 30, "the request to reach the API")
        await locker.execute(
            "select 1 from outbox.action_status_updates where action_id = 'stuck-1' for update"
        )
        held_api.answer.set()
        assert relay.engine.running
        assert await relay.health() == (True, "ok")

        deadline = time.monotonic() + 30
        while (answer := await relay.health())[0]:
            assert time.monotonic() < deadline, "still healthy after 30 s"
            await asyncio.sleep(0.1)
        assert re.fullmatch(r"no progress for \d+s while a drain is running \(bound 7s\)", answer[1])
        assert relay.engine.running and relay.last_drain_at is None

        # From the first status line that names the stall on, the watchdog is no longer fed.
        heard: list[str] = []

        def hear(enough: Callable[[], bool]) -> bool:
            heard.extend(received(sock))
            return enough()

        def after_stall() -> list[str]:
            first = next((i for i, m in enumerate(heard) if m.startswith("STATUS=") and "stalled" in m), None)
            return [] if first is None else heard[first:]

        await wait_for(lambda: hear(lambda: bool(after_stall())), 10, "a status line naming the stall")
        await wait_for(
            lambda: hear(lambda: sum(m.startswith("STATUS=") for m in after_stall()) >= 4),
            10,
            "three more heartbeats",
        )
        assert "WATCHDOG=1" not in after_stall(), heard
        assert relay.engine.running and relay.last_drain_at is None

        await locker.rollback()  # the write goes through
        await wait_for(lambda: relay.last_drain_at is not None, 30, "the stuck drain to finish")
        assert await relay.health() == (True, "ok")
        await wait_for(lambda: "WATCHDOG=1" in received(sock), 10, "the watchdog to be fed again")
        await wait_for(lambda: states(database_url) == {"delivered": 1}, 30, "the row to be delivered")
    finally:
        await locker.close()
        held_api.answer.set()
        relay.stop_event.set()
        await asyncio.wait_for(running, 30)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    stalled = messages(caplog, "drain stalled")
    assert len(stalled) == 1 and stalled[0].levelno == logging.ERROR
    resumed = messages(caplog, "drain progress resumed")
    assert len(resumed) == 1 and resumed[0].levelno == logging.INFO


# -- pauses that last ------------------------------------------------------------------------
def paused_gauge(relay: Relay, target: str) -> float:
    for family in text_string_to_metric_families(relay.metrics.exposition().decode()):
        for s in family.samples:
            if s.name == "outbox_relay_target_paused_seconds" and s.labels == {"target": target}:
                return float(s.value)
    raise AssertionError(f"no outbox_relay_target_paused_seconds for {target}")


async def test_a_long_pause_is_logged_at_5_min_and_15_min_not_every_heartbeat(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay(relay_settings(database_url, NO_API))
    lane = relay.engine.lanes["default"]
    caplog.set_level(logging.INFO, logger="relay.daemon")
    try:
        await relay.heartbeat()
        assert paused_gauge(relay, "default") == 0.0

        lane.breaker.trip("HTTP 403 from the API: forbidden", 3600)
        lane.paused_since = time.monotonic() - 250  # paused, but not for long yet
        await relay.heartbeat()
        assert messages(caplog, "target still paused") == []
        assert 250 <= paused_gauge(relay, "default") < 260

        lane.paused_since = time.monotonic() - 400
        await relay.heartbeat()
        await relay.heartbeat()
        alerts = messages(caplog, "target still paused")
        assert len(alerts) == 1
        alert = alerts[0]
        assert alert.levelno == logging.ERROR
        assert extra(alert, "target", "reason", "paused_for") == (
            "default",
            "HTTP 403 from the API: forbidden",
            "6m40s",
        )
        assert 400 <= paused_gauge(relay, "default") < 410

        lane.paused_since = time.monotonic() - 1000  # past 15 minutes
        await relay.heartbeat()
        await relay.heartbeat()
        alerts = messages(caplog, "target still paused")
        assert [extra(a, "paused_for") for a in alerts] == [("6m40s",), ("16m40s",)]

        status = await collect_status(relay.store)  # the heartbeat wrote the state
        assert [(t["target"], t["paused"], t["pause_reason"]) for t in status["targets"]] == [
            ("default", True, "HTTP 403 from the API: forbidden")
        ]

        lane.breaker.record_success()  # the target serves again: nothing new here
        lane.paused_since = None
        await relay.heartbeat()
        assert len(messages(caplog, "target still paused")) == 2
        assert paused_gauge(relay, "default") == 0.0

        lane.breaker.trip("HTTP 401 from the API: credentials refused", 3600)  # a new pause starts over
        lane.paused_since = time.monotonic() - 301
        await relay.heartbeat()
        alerts = messages(caplog, "target still paused")
        assert len(alerts) == 3
        assert extra(alerts[-1], "reason", "paused_for") == (
            "HTTP 401 from the API: credentials refused",
            "5m01s",
        )
    finally:
        await closed(relay)
