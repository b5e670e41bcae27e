"""Metrics and /healthz whose cost nobody else chooses: a real database, real loopback HTTP.

Series are bounded by the configured targets (every other name is ``unconfigured``); the server
holds a bounded number of connections, closes the silent ones, survives running out of
descriptors without flooding the log; ``/healthz`` names no host, port or user, and checks the
database on a connection of its own, outside the delivery pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.cli.ops import collect_status
from relay.service.daemon import Relay
from relay.service.metrics import UNCONFIGURED, Metrics, MetricsServer
from relay.settings import ConfigError, TargetSettings, load_settings
from tests.relaykit import relay_settings

NO_API = "http://127.0.0.1:9"  # never reached: nothing is delivered here
MADE_UP = 5000


async def ok() -> tuple[bool, str]:
    return True, "ok"


async def shut(relay: Relay) -> None:
    await relay.engine.close()
    await relay.store.close()
    relay.notifier.close()


@pytest.fixture
async def server_for() -> AsyncIterator[list[MetricsServer]]:
    """Servers started by a test, stopped after it."""
    servers: list[MetricsServer] = []
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


# -- 1. series bounded by the configuration ---------------------------------------------------
async def test_made_up_targets_share_one_unconfigured_series(
    database_url: str, db: psycopg.Connection, server_for: list[MetricsServer]
) -> None:
    base = relay_settings(database_url, NO_API)
    settings = dataclasses.replace(
        base, targets={"default": base.targets["default"], "eu": TargetSettings("eu", base_url=NO_API)}
    )
    configured = set(settings.targets)
    with db.transaction():  # as an application would: the writer role, one statement
        db.execute("set local role outbox_writer")
        db.execute(
            "insert into outbox.action_status_updates (action_id, status, target) "
            "select 'made-up-' || i, 'SUCCESS', 'made-up-' || i from generate_series(1, %s) i",
            (MADE_UP,),
        )
        db.execute(
            "insert into outbox.action_status_updates (action_id, status, target) "
            "select 'second-' || i, 'SUCCESS', 'made-up-' || i from generate_series(1, 40) i"
        )
        db.execute(
            "insert into outbox.action_status_updates (action_id, status, target) "
            "select 'ours-' || i, 'SUCCESS', 'default' from generate_series(1, 3) i"
        )
    # Some unconfigured rows are final (not counted), one is two hours old (the oldest age).
    db.execute(
        "update outbox.action_status_updates set state = 'delivered', delivered_at = now() "
        "where action_id like 'made-up-%' and split_part(action_id, '-', 3)::int between 1000 and 1099"
    )
    db.execute(
        "update outbox.action_status_updates set created_at = now() - interval '2 hours' "
        "where target = 'made-up-77' and action_id = 'made-up-77'"
    )
    expected_sql = """select count(*), extract(epoch from now() - min(coalesce(requeued_at, created_at)))
                      from outbox.action_status_updates
                      where state in ('pending', 'in_flight') and target <> all(%s)"""
    row = db.execute(expected_sql, (sorted(configured),)).fetchone()
    assert row is not None
    expected_pending, oldest_before = int(row[0]), float(row[1])
    assert expected_pending == MADE_UP + 40 - 100

    relay = Relay(settings)
    try:
        await relay.heartbeat()
        server = MetricsServer(relay.metrics, "127.0.0.1", 0, ok)
        server_for.append(server)
        await server.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
            answer = await http.get("/metrics")
        row = db.execute(expected_sql, (sorted(configured),)).fetchone()
        assert row is not None
        oldest_after = float(row[1])
        status = await collect_status(relay.store)
    finally:
        await shut(relay)
    assert answer.status_code == 200

    # Series per metric: for every other label combination, at most one per configured target
    # plus `unconfigured`; no label value but those.
    targets_seen: dict[tuple[str, frozenset[tuple[str, str]]], set[str]] = defaultdict(set)
    samples = 0
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            samples += 1
            if "target" in s.labels:
                others = frozenset((k, v) for k, v in s.labels.items() if k != "target")
                targets_seen[(s.name, others)].add(s.labels["target"])
                if not others:
                    values[(s.name, s.labels["target"])] = s.value
    assert targets_seen, "no series with a target label at all"
    for key, names in targets_seen.items():
        assert names <= configured | {UNCONFIGURED}, (key, sorted(names)[:5])
        assert len(names) <= len(configured) + 1, key
    assert samples < 200, samples  # 5,000 made-up targets made 10,000 series before

    assert values[("outbox_relay_pending", UNCONFIGURED)] == expected_pending  # the sum
    assert values[("outbox_relay_pending", "default")] == 3
    assert values[("outbox_relay_pending", "eu")] == 0
    oldest = values[("outbox_relay_oldest_pending_seconds", UNCONFIGURED)]  # the largest age
    assert 7200 <= oldest_before <= oldest <= oldest_after < 7200 + 600

    # The operator's view still names every target.
    listed = {t["target"]: t for t in status["targets"]}
    assert {f"made-up-{i}" for i in range(1, MADE_UP + 1)} | {"default"} <= set(listed)
    assert listed["made-up-7"]["pending"] == 2 and listed["made-up-1000"]["delivered"] == 1


def test_unconfigured_is_not_a_target_name(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[targets.unconfigured]\nbase_url = "http://127.0.0.1:9"\n')
    with pytest.raises(ConfigError, match=r"targets\.unconfigured: the name 'unconfigured' is reserved"):
        load_settings(str(config), {})


# -- 2. connections: a cap, a read deadline, accept() errors that do not flood the log -------
async def test_idle_connections_cannot_starve_healthz_and_are_closed_after_the_deadline(
    server_for: list[MetricsServer], caplog: pytest.LogCaptureFixture
) -> None:
    cap, read_timeout, idle_count = 32, 3.0, 220
    server = MetricsServer(Metrics(), "127.0.0.1", 0, ok, max_connections=cap, read_timeout=read_timeout)
    server_for.append(server)
    await server.start()
    caplog.set_level(logging.INFO, logger="relay.metrics")

    opened: list[float] = []
    closed_at: list[float | None] = [None] * idle_count
    writers: list[asyncio.StreamWriter] = []
    watchers: list[asyncio.Task[None]] = []

    async def watch(i: int, reader: asyncio.StreamReader) -> None:
        with suppress(ConnectionError):
            await reader.read()
        closed_at[i] = time.monotonic()

    try:
        for i in range(idle_count):  # connect and send nothing
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            opened.append(time.monotonic())
            writers.append(writer)
            watchers.append(asyncio.create_task(watch(i, reader)))
            assert server.open_connections <= cap
        deadline = time.monotonic() + 30
        while server.accepted < idle_count:
            assert time.monotonic() < deadline, f"only {server.accepted} of {idle_count} accepted"
            await asyncio.sleep(0.01)
        assert server.open_connections == cap

        # A new client is answered at once, not after the silent ones' deadline.
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=MetricsServer.HEALTH_TIMEOUT) as http:
            answer = await http.get(f"http://127.0.0.1:{server.port}/healthz")
        took = time.monotonic() - started
        assert (answer.status_code, answer.text) == (200, "ok\n")
        assert took < read_timeout, took

        # Every silent connection is closed: cut off for newcomers, or at its deadline.
        deadline = time.monotonic() + read_timeout + 30
        while any(t is None for t in closed_at):
            assert time.monotonic() < deadline, f"{closed_at.count(None)} idle connections still open"
            await asyncio.sleep(0.05)
        assert server.open_connections == 0
    finally:
        for writer in writers:
            writer.close()
        await asyncio.gather(*watchers, return_exceptions=True)
    lived = [c - o for c, o in zip(closed_at, opened, strict=True) if c is not None]
    at_deadline = [t for t in lived if t >= read_timeout - 0.05]
    # The healthz client took the place of one more: the last cap - 1 waited out their deadline.
    assert len(at_deadline) == cap - 1, sorted(lived)[-cap - 2 :]
    assert max(lived) < read_timeout + 20
    assert server.shed == idle_count - (cap - 1)
    assert server.accept_errors == 0
    assert [r for r in caplog.records if "cannot accept" in r.getMessage()] == []


async def test_a_connection_that_sent_its_request_is_not_cut_off(server_for: list[MetricsServer]) -> None:
    """When every held connection is being answered, the newcomer is the one refused."""
    release = asyncio.Event()

    async def slow() -> tuple[bool, str]:
        await release.wait()
        return True, "ok"

    server = MetricsServer(Metrics(), "127.0.0.1", 0, slow, max_connections=2)
    server_for.append(server)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
        pending = [asyncio.create_task(http.get("/healthz")) for _ in range(2)]
        deadline = time.monotonic() + 10
        while server.open_connections < 2 or server._waiting:
            assert time.monotonic() < deadline, "the two requests were not read"
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            refused = await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            refused = b""
        writer.close()
        assert refused == b"" and server.shed == 1
        release.set()
        answers = await asyncio.gather(*pending)
    assert [(a.status_code, a.text) for a in answers] == [(200, "ok\n")] * 2


CHILD = textwrap.dedent(
    """
    import asyncio, logging, os, resource, sys
    from relay.service.metrics import Metrics, MetricsServer

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))

    async def ok():
        return True, "ok"

    async def main():
        server = MetricsServer(Metrics(), "127.0.0.1", 0, ok)
        await server.start()
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print(server.port, flush=True)
        while server.accept_errors < int(sys.argv[1]):
            await asyncio.sleep(0.05)
        for fd in hog:
            os.close(fd)
        print("freed", server.accept_errors, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_out_of_descriptors_logs_once_per_interval_and_recovers(tmp_path: Path) -> None:
    """RLIMIT_NOFILE lowered in a child, every descriptor taken: accept() fails (EMFILE) many
    times, the log says so once; descriptors back, the waiting requests are answered."""
    failures = 30
    stderr = tmp_path / "child.err"
    with stderr.open("wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(failures)], stdout=subprocess.PIPE, stderr=err, text=True
        )
    clients: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        started = time.monotonic()
        for _ in range(20):  # queued by the kernel while the child cannot accept
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(c)
        freed = child.stdout.readline().split()
        starved_for = time.monotonic() - started
        assert freed[0] == "freed" and int(freed[1]) >= failures, freed
        for c in clients:
            answer = b""
            while chunk := c.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nok\n"), answer
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for c in clients:
            c.close()
        child.terminate()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    lines = [line for line in stderr.read_text().splitlines() if "cannot accept" in line]
    assert 1 <= len(lines) <= 1 + int(starved_for // MetricsServer.ACCEPT_LOG_EVERY), lines


# -- 3 and 4. /healthz: no connection details, and a connection of its own --------------------
async def test_healthz_says_database_unreachable_without_host_port_or_user(
    server_for: list[MetricsServer], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the database is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    user, database = "zq_health_user", "zq_health_db"
    down = f"postgresql://{user}:secret-pw@127.0.0.1:{port}/{database}"
    relay = Relay(relay_settings(down, NO_API))
    relay.last_drain_at = datetime.now(UTC)
    caplog.set_level(logging.INFO, logger="relay.daemon")
    try:
        server = MetricsServer(relay.metrics, "127.0.0.1", 0, relay.health)
        server_for.append(server)
        await server.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
            answers = [await http.get("/healthz") for _ in range(3)]
    finally:
        await shut(relay)
    for answer in answers:
        assert (answer.status_code, answer.text) == (503, "database unreachable\n")
        for secret in (user, database, str(port), "127.0.0.1", "localhost", "secret-pw"):
            assert secret not in answer.text
    logged = [r for r in caplog.records if r.getMessage() == "health check: database unreachable"]
    assert len(logged) == 1  # the reason is in the log, once
    assert str(port) in str(logged[0].__dict__["error"])


async def test_healthz_uses_its_own_connection_not_the_delivery_pool(
    database_url: str, db: psycopg.Connection, server_for: list[MetricsServer]
) -> None:
    relay = Relay(relay_settings(database_url, NO_API))
    relay.last_drain_at = datetime.now(UTC)
    pool = relay.store.pool
    size = pool.size
    assert size >= 1
    server = MetricsServer(relay.metrics, "127.0.0.1", 0, relay.health)
    server_for.append(server)
    await server.start()

    async def hammer(requests: int) -> list[int]:
        """``requests`` /healthz, 8 at a time; the pool's checked-out count sampled meanwhile."""
        seen: list[int] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                seen.append(pool.checked_out)
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", timeout=30, limits=limits
        ) as http:
            answers = await asyncio.gather(*(http.get("/healthz") for _ in range(requests)))
        done.set()
        await sampler
        assert [(a.status_code, a.text) for a in answers] == [(200, "ok\n")] * requests
        return seen

    try:
        async with AsyncExitStack() as held:
            for _ in range(size):  # every connection of the delivery pool, taken
                await held.enter_async_context(pool.connection())
            assert pool.checked_out == size
            with pytest.raises(TimeoutError):  # delivery itself would have to wait now
                await asyncio.wait_for(relay.store.ping(), 1.0)
            seen = await hammer(60)
            assert len(seen) > 1 and set(seen) == {size}
        seen = await hammer(60)
        assert len(seen) > 1 and set(seen) == {0}
        health_sessions = db.execute(
            "select count(*) from pg_stat_activity where application_name = 'outbox-relay health'"
        ).fetchone()
        assert health_sessions == (1,)
    finally:
        await shut(relay)
