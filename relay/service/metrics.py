"""Prometheus metrics and a tiny HTTP server for ``/metrics`` and ``/healthz``.

:class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one), so any
number of relays can live in one process (tests do). The engine reports through the
methods ``request``, ``delivered``, ``dead``, ``circuit``, ``unwritable`` and ``dropped`` (its
``Observer``); the daemon adds ``backlog`` (from :meth:`relay.pg.store.Store.backlog`),
``target_paused`` (from :meth:`relay.core.engine.Engine.paused_for`, at each heartbeat) and
``drained``.

:class:`MetricsServer` is plain asyncio: ``GET /metrics`` answers the text exposition format,
``GET /healthz`` answers ``200 ok`` or ``503`` with the reason the health callback gives,
anything else ``404``. One request per connection; nothing else is read or served.

Label values are bounded by the configuration, never by what writers put in the outbox: with
``targets`` given, a target not configured is reported under the one label value
``unconfigured`` (backlogs summed, the oldest age the largest), so made-up target names cannot
grow the number of series.

The server holds at most ``max_connections`` connections. A client has ``read_timeout``
seconds to send its request head; when the cap is reached, a new connection takes the place
of the oldest one still waiting for its head (one that has sent its request is never cut off
for a newcomer), or is closed at once when every held connection is being answered. Failed
``accept()`` calls (out of descriptors) pause accepting briefly and are logged at most once
per ``ACCEPT_LOG_EVERY`` seconds, with the count of those not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relay.settings import RESERVED_TARGET

log = logging.getLogger("relay.metrics")

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DELIVERY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
CIRCUIT_STATES = {
    "closed": 0,
    "serving": 0,
    "half_open": 1,
    "half-open": 1,
    "probing": 1,
    "open": 2,
    "paused": 2,
}

Health = Callable[[], Awaitable[tuple[bool, str]]]
UNCONFIGURED = RESERVED_TARGET  # the label value of every target not in the configuration


class Backlog(Protocol):
    """One target's backlog (:class:`relay.pg.store.TargetBacklog`)."""

    @property
    def target(self) -> str: ...
    @property
    def pending(self) -> int: ...
    @property
    def oldest_pending_seconds(self) -> float: ...


class Metrics:
    """The relay's metrics, in a registry of their own (``self.registry``).

    ``targets``: the configured target names. When given, every other name is exported as
    ``unconfigured``; when None (tests of the exposition itself), names are taken as they come.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, targets: Collection[str] | None = None
    ) -> None:
        self.targets = None if targets is None else frozenset(targets)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "outbox_relay_requests",
            "HTTP requests made, by outcome (delivery_attempts.outcome).",
            ["target", "outcome"],
            registry=r,
        )
        self._request_seconds = Histogram(
            "outbox_relay_request_duration_seconds",
            "Duration of HTTP requests to the API.",
            ["target"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._delivered = Counter("outbox_relay_delivered", "Updates delivered.", ["target"], registry=r)
        self._dead = Counter("outbox_relay_dead", "Updates that went dead.", ["target"], registry=r)
        self._commit_to_delivery = Histogram(
            "outbox_relay_commit_to_delivery_seconds",
            "Time from an update's commit (created_at) to its delivery.",
            ["target"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self._pending = Gauge(
            "outbox_relay_pending", "Updates not yet final (pending or in flight).", ["target"], registry=r
        )
        self._oldest = Gauge(
            "outbox_relay_oldest_pending_seconds",
            "Age of the oldest update not yet final (since written or re-queued).",
            ["target"],
            registry=r,
        )
        self._circuit = Gauge(
            "outbox_relay_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open (paused).",
            ["target"],
            registry=r,
        )
        self._paused = Gauge(
            "outbox_relay_target_paused_seconds",
            "How long the target has not been serving (breaker open or credentials refused); 0 when serving.",
            ["target"],
            registry=r,
        )
        self._unwritable = Counter(
            "outbox_relay_results_unwritable",
            "Row results (state and attempt rows) the database refused to store, by target.",
            ["target"],
            registry=r,
        )
        self._dropped = Counter(
            "outbox_relay_results_dropped",
            "Row results dropped because the database no longer holds the row (deleted while in flight,"
            " or lost with a primary that failed over), by target.",
            ["target"],
            registry=r,
        )
        self._last_drain = Gauge(
            "outbox_relay_last_drain_timestamp_seconds",
            "When the last drain finished (Unix time).",
            registry=r,
        )

    def label(self, target: str) -> str:
        """The label value ``target`` is exported under: its name if configured, else ``unconfigured``."""
        if self.targets is None or target in self.targets:
            return target
        return UNCONFIGURED

    def request(self, target: str, outcome: str, seconds: float) -> None:
        """One HTTP request made; ``outcome`` is what its ``delivery_attempts`` row says."""
        self._requests.labels(self.label(target), outcome).inc()
        self._request_seconds.labels(self.label(target)).observe(max(seconds, 0.0))

    def delivered(self, target: str, commit_to_delivery_seconds: float) -> None:
        self._delivered.labels(self.label(target)).inc()
        self._commit_to_delivery.labels(self.label(target)).observe(max(commit_to_delivery_seconds, 0.0))

    def dead(self, target: str) -> None:
        self._dead.labels(self.label(target)).inc()

    def circuit(self, target: str, state: str) -> None:
        """``closed``/``serving`` 0, ``half_open``/``probing`` 1, ``open``/``paused`` 2."""
        try:
            value = CIRCUIT_STATES[str(state).lower()]
        except KeyError:
            raise ValueError(f"unknown circuit state {state!r}") from None
        self._circuit.labels(self.label(target)).set(value)

    def unwritable(self, target: str) -> None:
        """One row result the database refused to store."""
        self._unwritable.labels(self.label(target)).inc()

    def dropped(self, target: str) -> None:
        """One row result dropped: the database does not hold the row."""
        self._dropped.labels(self.label(target)).inc()

    def target_paused(self, target: str, seconds: float) -> None:
        """Seconds ``target`` has not been serving (paused or probing); 0 while it serves."""
        self._paused.labels(self.label(target)).set(max(seconds, 0.0))

    def backlog(self, target: str, pending: int, oldest_seconds: float) -> None:
        """One target's backlog, set as given (see :meth:`backlogs` for a whole table's)."""
        self._pending.labels(self.label(target)).set(pending)
        self._oldest.labels(self.label(target)).set(oldest_seconds)

    def backlogs(self, rows: Iterable[Backlog]) -> None:
        """The backlog of every target at once (:meth:`relay.pg.store.Store.backlog`).

        Targets exported under the same label (every unconfigured one) are added up: their
        pending rows summed, their oldest age the largest. Each configured target, and
        ``unconfigured`` when targets are configured, is set even when it has no row (to 0).
        """
        pending: dict[str, int] = {}
        oldest: dict[str, float] = {}
        if self.targets is not None:
            for name in (*self.targets, UNCONFIGURED):
                pending[name], oldest[name] = 0, 0.0
        for row in rows:
            name = self.label(row.target)
            pending[name] = pending.get(name, 0) + row.pending
            oldest[name] = max(oldest.get(name, 0.0), row.oldest_pending_seconds)
        for name in sorted(pending):
            self._pending.labels(name).set(pending[name])
            self._oldest.labels(name).set(oldest[name])

    def drained(self) -> None:
        self._last_drain.set(time.time())

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        data: bytes = generate_latest(self.registry)
        return data


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP/1.1, one request per connection.

    ``max_connections`` bounds the connections held open (see the module's docstring);
    ``read_timeout`` is the time a client has to send its request head.
    """

    READ_TIMEOUT = 5.0  # to send the request head
    HEALTH_TIMEOUT = 5.0  # for the health callback to answer
    WRITE_TIMEOUT = 10.0  # for the client to take the answer
    MAX_CONNECTIONS = 32
    MAX_HEAD = 16384
    BACKLOG = 128
    ACCEPT_PAUSE = 0.1  # after a failed accept(), before the next one
    ACCEPT_LOG_EVERY = 10.0  # at most one log line about failed accept() calls this often

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        health: Health,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.metrics = metrics
        self.host = host
        self._port = port
        self.health = health
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self._socks: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        # Connection task -> its writer, in arrival order; ``_waiting``: those still waiting for
        # their request head (the first of them in ``_connections`` is the oldest).
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._waiting: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted so far
        self.shed = 0  # connections closed at once or cut off for a newcomer (the cap)
        self.accept_errors = 0  # failed accept() calls so far
        self._accept_logged_at: float | None = None
        self._accept_unlogged = 0

    @property
    def port(self) -> int:
        """The port listened on (the actual one when 0 was asked for)."""
        if self._socks:
            return int(self._socks[0].getsockname()[1])
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections held open right now (at most ``max_connections``)."""
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        port = self._port
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = port or sock.getsockname()[1]  # every address on the same port
                sock.listen(self.BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in self._socks:
                sock.close()
            self._socks = []
            raise
        self._acceptors = [asyncio.create_task(self._accept(sock)) for sock in self._socks]

    async def stop(self) -> None:
        if not self._socks:
            return
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self._socks:
            sock.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._socks, self._acceptors = [], []

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ...: wait for descriptors to free up
                self._accept_failed(exc)
                await asyncio.sleep(self.ACCEPT_PAUSE)
                continue
            if len(self._connections) >= self.max_connections and not self._make_room():
                self.shed += 1
                self.accepted += 1
                conn.close()
                continue
            try:
                conn.setblocking(False)
                reader, writer = await asyncio.open_connection(sock=conn, limit=self.MAX_HEAD)
            except OSError:
                conn.close()
                continue
            finally:
                self.accepted += 1  # counted once it is held (or gone), never in between
            task = asyncio.create_task(self._serve(reader, writer))
            self._connections[task] = writer
            self._waiting.add(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        self._waiting.discard(task)

    def _make_room(self) -> bool:
        """Cut off the oldest connection still waiting for its request head; False if none is."""
        for task, writer in self._connections.items():
            if task in self._waiting:
                self.shed += 1
                self._forget(task)
                writer.transport.abort()  # closed now, even if the task never got to run
                task.cancel()
                return True
        return False

    def _accept_failed(self, exc: OSError) -> None:
        self.accept_errors += 1
        now = time.monotonic()
        if self._accept_logged_at is not None and now - self._accept_logged_at < self.ACCEPT_LOG_EVERY:
            self._accept_unlogged += 1
            return
        log.warning(
            "metrics server cannot accept connections",
            extra={"error": exc.strerror or type(exc).__name__, "not_logged": self._accept_unlogged},
        )
        self._accept_logged_at, self._accept_unlogged = now, 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            await asyncio.wait_for(writer.drain(), self.WRITE_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        task = asyncio.current_task()
        if task is not None:
            self._waiting.discard(task)  # answering it now: never cut off for a newcomer
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
            healthy, reason = await asyncio.wait_for(self.health(), self.HEALTH_TIMEOUT)
        except TimeoutError:
            healthy, reason = False, "health check timed out"
        except Exception as exc:  # the callback's failure is itself the answer
            log.warning("health check raised %s", type(exc).__name__)
            healthy, reason = False, f"health check failed: {type(exc).__name__}"
        body = (("ok" if healthy else reason or "unhealthy") + "\n").encode("utf-8", "replace")
        return (200 if healthy else 503), text, body, method == "HEAD"
