"""Metrics and the /metrics + /healthz server, read back the way Prometheus would."""

from __future__ import annotations

import asyncio
import inspect
import time

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.core.engine import Observer
from relay.pg.store import Store
from relay.service.metrics import Metrics, MetricsServer
from tests.relaykit import until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class Health:
    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (True, "")
        self.raise_: bool = False

    async def __call__(self) -> tuple[bool, str]:
        if self.raise_:
            raise RuntimeError("boom")
        return self.answer


async def test_metrics_are_served_and_move() -> None:
    metrics = Metrics()
    Metrics()  # a second instance has its own registry: no duplicate-timeseries error
    health = Health()
    server = MetricsServer(metrics, "127.0.0.1", 0, health)
    await server.start()
    try:
        assert server.port > 0
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            before = parse((await http.get("/metrics")).text)
            assert (
                "outbox_relay_requests_total",
                frozenset({("target", "default"), ("outcome", "delivered")}),
            ) not in before

            metrics.request("default", "delivered", 0.120)
            metrics.request("default", "delivered", 0.020)
            metrics.request("default", "retry", 0.600)
            metrics.delivered("default", 0.003)
            metrics.delivered("default", 7200.0)
            metrics.dead("eu")
            metrics.circuit("default", "open")
            metrics.circuit("eu", "half_open")
            metrics.circuit("other", "closed")
            metrics.backlog("default", 7, 42.5)
            metrics.target_paused("default", 0.0)
            metrics.target_paused("eu", 432.5)
            metrics.unwritable("eu")
            metrics.unwritable("eu")
            metrics.dropped("default")
            metrics.drained()

            response = await http.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain; version=")
            s = parse(response.text)
    finally:
        await server.stop()

    assert get(s, "outbox_relay_requests_total", target="default", outcome="delivered") == 2
    assert get(s, "outbox_relay_requests_total", target="default", outcome="retry") == 1
    assert get(s, "outbox_relay_request_duration_seconds_count", target="default") == 3
    assert get(s, "outbox_relay_request_duration_seconds_sum", target="default") == pytest.approx(0.74)
    assert get(s, "outbox_relay_request_duration_seconds_bucket", target="default", le="0.025") == 1
    assert get(s, "outbox_relay_delivered_total", target="default") == 2
    assert get(s, "outbox_relay_dead_total", target="eu") == 1
    delivery = "outbox_relay_commit_to_delivery_seconds_bucket"
    assert get(s, delivery, target="default", le="0.001") == 0
    assert get(s, delivery, target="default", le="0.005") == 1
    assert get(s, delivery, target="default", le="3600.0") == 1  # buckets end at one hour
    assert get(s, delivery, target="default", le="+Inf") == 2
    assert get(s, "outbox_relay_circuit_state", target="default") == 2
    assert get(s, "outbox_relay_circuit_state", target="eu") == 1
    assert get(s, "outbox_relay_circuit_state", target="other") == 0
    assert get(s, "outbox_relay_pending", target="default") == 7
    assert get(s, "outbox_relay_oldest_pending_seconds", target="default") == 42.5
    assert get(s, "outbox_relay_target_paused_seconds", target="default") == 0
    assert get(s, "outbox_relay_target_paused_seconds", target="eu") == 432.5
    assert get(s, "outbox_relay_results_unwritable_total", target="eu") == 2
    assert ("outbox_relay_results_unwritable_total", frozenset({("target", "default")})) not in s
    assert get(s, "outbox_relay_results_dropped_total", target="default") == 1
    assert abs(get(s, "outbox_relay_last_drain_timestamp_seconds") - time.time()) < 60


async def test_healthz_follows_the_callback_and_other_paths_are_404() -> None:
    health = Health()
    server = MetricsServer(Metrics(), "127.0.0.1", 0, health)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            ok = await http.get("/healthz")
            assert (ok.status_code, ok.text) == (200, "ok\n")
            health.answer = (False, "database unreachable")
            bad = await http.get("/healthz")
            assert (bad.status_code, bad.text) == (503, "database unreachable\n")
            health.raise_ = True
            broken = await http.get("/healthz")
            assert (broken.status_code, broken.text) == (503, "health check failed: RuntimeError\n")
            assert (await http.get("/")).status_code == 404
            assert (await http.get("/metrics/../etc/passwd")).status_code == 404
            assert (await http.post("/metrics", content=b"x")).status_code == 405
            head = await http.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            assert (await http.get("/metrics?name[]=x")).status_code == 200
    finally:
        await server.stop()


async def test_stop_closes_idle_connections_and_the_port() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, Health())
    await server.start()
    port = server.port
    reader, idle = await asyncio.open_connection("127.0.0.1", port)  # connects, sends nothing
    await until(lambda: server.open_connections == 1, 10, "the server to hold the idle connection")
    await asyncio.wait_for(server.stop(), 2.0)
    assert server.open_connections == 0
    assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed by the server, unanswered
    idle.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_garbage_request_is_400() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, Health())
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"HELLO\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 2.0)
        writer.close()
    finally:
        await server.stop()
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_metrics_is_the_engines_observer() -> None:
    """Every method the engine reports through exists on Metrics with the same signature."""
    for name, declared in inspect.getmembers(Observer, inspect.isfunction):
        if not name.startswith("_"):
            assert inspect.signature(getattr(Metrics, name)) == inspect.signature(declared), name


def test_unknown_circuit_state_is_refused() -> None:
    with pytest.raises(ValueError, match="sideways"):
        Metrics().circuit("default", "sideways")


async def test_store_backlog_feeds_the_gauges(db: psycopg.Connection, store: Store) -> None:
    def add(action_id: str, target: str, state: str, minutes: int) -> None:
        db.execute("select outbox.enqueue_action_status(%s, 'SUCCESS', '[]', %s)", (action_id, target))
        db.execute(
            """update outbox.action_status_updates
               set state = %(s)s, created_at = now() - make_interval(mins => %(m)s),
                   delivered_at = case when %(s)s = 'delivered' then now() end,
                   claim_token = case when %(s)s = 'in_flight' then gen_random_uuid() end
               where action_id = %(a)s and target = %(t)s""",
            {"s": state, "m": minutes, "a": action_id, "t": target},
        )

    add("a", "default", "pending", 3)
    add("b", "default", "pending", 1)
    add("c", "default", "delivered", 60)
    add("d", "eu", "in_flight", 2)
    add("e", "eu", "delivered", 90)
    backlog = await store.backlog(["default", "eu", "idle"])
    assert [(b.target, b.pending) for b in backlog] == [("default", 2), ("eu", 1), ("idle", 0)]
    assert 180 <= backlog[0].oldest_pending_seconds < 200
    assert 120 <= backlog[1].oldest_pending_seconds < 140
    assert backlog[2].oldest_pending_seconds == 0.0
    assert [b.target for b in await store.backlog()] == ["default", "eu"]

    metrics = Metrics()
    for b in backlog:
        metrics.backlog(b.target, b.pending, b.oldest_pending_seconds)
    s = parse(metrics.exposition().decode())
    assert get(s, "outbox_relay_pending", target="default") == 2
    assert get(s, "outbox_relay_pending", target="idle") == 0
