"""Prometheus metrics and a tiny HTTP server for ``/metrics`` and ``/healthz``.

:class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one), so any
number of relays can live in one process (tests do). The engine reports through the
methods ``request``, ``delivered``, ``dead``, ``circuit`` and ``unwritable`` (its
``Observer``); the daemon adds ``backlog`` (from :meth:`relay.store.Store.backlog`),
``target_paused`` (from :meth:`relay.engine.Engine.paused_for`, at each heartbeat) and
``drained``.

:class:`MetricsServer` is plain asyncio: ``GET /metrics`` answers the text exposition format,
``GET /healthz`` answers ``200 ok`` or ``503`` with the reason the health callback gives,
anything else ``404``. One request per connection; nothing else is read or served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger("relay.metrics")

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DELIVERY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
CIRCUIT_STATES = {
    "closed": 0, "serving": 0,
    "half_open": 1, "half-open": 1, "probing": 1,
    "open": 2, "paused": 2,
}  # fmt: skip

Health = Callable[[], Awaitable[tuple[bool, str]]]


class Metrics:
    """The relay's metrics, in a registry of their own (``self.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "outbox_relay_requests", "HTTP requests made, by outcome (delivery_attempts.outcome).",
            ["target", "outcome"], registry=r,
        )  # fmt: skip
        self._request_seconds = Histogram(
            "outbox_relay_request_duration_seconds", "Duration of HTTP requests to the API.",
            ["target"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self._delivered = Counter("outbox_relay_delivered", "Updates delivered.", ["target"], registry=r)
        self._dead = Counter("outbox_relay_dead", "Updates that went dead.", ["target"], registry=r)
        self._commit_to_delivery = Histogram(
            "outbox_relay_commit_to_delivery_seconds",
            "Time from an update's commit (created_at) to its delivery.",
            ["target"], buckets=DELIVERY_BUCKETS, registry=r,
        )  # fmt: skip
        self._pending = Gauge(
            "outbox_relay_pending", "Updates not yet final (pending or in flight).", ["target"], registry=r
        )
        self._oldest = Gauge(
            "outbox_relay_oldest_pending_seconds",
            "Age of the oldest update not yet final (since written or re-queued).", ["target"], registry=r,
        )  # fmt: skip
        self._circuit = Gauge(
            "outbox_relay_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open (paused).",
            ["target"], registry=r,
        )  # fmt: skip
        self._paused = Gauge(
            "outbox_relay_target_paused_seconds",
            "How long the target has not been serving (breaker open or credentials refused); 0 when serving.",
            ["target"], registry=r,
        )  # fmt: skip
        self._unwritable = Counter(
            "outbox_relay_results_unwritable",
            "Row results (state and attempt rows) the database refused to store, by target.",
            ["target"], registry=r,
        )  # fmt: skip
        self._last_drain = Gauge(
            "outbox_relay_last_drain_timestamp_seconds",
            "When the last drain finished (Unix time).",
            registry=r,
        )

    def request(self, target: str, outcome: str, seconds: float) -> None:
        """One HTTP request made; ``outcome`` is what its ``delivery_attempts`` row says."""
        self._requests.labels(target, outcome).inc()
        self._request_seconds.labels(target).observe(max(seconds, 0.0))

    def delivered(self, target: str, commit_to_delivery_seconds: float) -> None:
        self._delivered.labels(target).inc()
        self._commit_to_delivery.labels(target).observe(max(commit_to_delivery_seconds, 0.0))

    def dead(self, target: str) -> None:
        self._dead.labels(target).inc()

    def circuit(self, target: str, state: str) -> None:
        """``closed``/``serving`` 0, ``half_open``/``probing`` 1, ``open``/``paused`` 2."""
        try:
            value = CIRCUIT_STATES[str(state).lower()]
        except KeyError:
            raise ValueError(f"unknown circuit state {state!r}") from None
        self._circuit.labels(target).set(value)

    def unwritable(self, target: str) -> None:
        """One row result the database refused to store."""
        self._unwritable.labels(target).inc()

    def target_paused(self, target: str, seconds: float) -> None:
        """Seconds ``target`` has not been serving (paused or probing); 0 while it serves."""
        self._paused.labels(target).set(max(seconds, 0.0))

    def backlog(self, target: str, pending: int, oldest_seconds: float) -> None:
        self._pending.labels(target).set(pending)
        self._oldest.labels(target).set(oldest_seconds)

    def drained(self) -> None:
        self._last_drain.set(time.time())

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        data: bytes = generate_latest(self.registry)
        return data


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            503: "Service Unavailable"}  # fmt: skip


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP/1.1, one request per connection."""

    READ_TIMEOUT = 10.0
    MAX_HEAD = 16384

    def __init__(self, metrics: Metrics, host: str, port: int, health: Health) -> None:
        self.metrics = metrics
        self.host = host
        self._port = port
        self.health = health
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port listened on (the actual one when 0 was asked for)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port, limit=self.MAX_HEAD)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            status, content_type, body, head_only = await self._answer(reader)
            reason = _REASONS.get(status, "")
            headers = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n"
            )
            if status == 405:
                headers += "Allow: GET, HEAD\r\n"
            writer.write(headers.encode("ascii") + b"\r\n" + (b"" if head_only else body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.READ_TIMEOUT)
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        text = "text/plain; charset=utf-8"
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, text, b"bad request\n", False
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz"):
            return 404, text, b"not found\n", method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n", False
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition(), method == "HEAD"
        try:
            healthy, reason = await asyncio.wait_for(self.health(), self.READ_TIMEOUT)
        except TimeoutError:
            healthy, reason = False, "health check timed out"
        except Exception as exc:  # the callback's failure is itself the answer
            log.warning("health check raised %s", type(exc).__name__)
            healthy, reason = False, f"health check failed: {type(exc).__name__}"
        body = (("ok" if healthy else reason or "unhealthy") + "\n").encode("utf-8", "replace")
        return (200 if healthy else 503), text, body, method == "HEAD"
