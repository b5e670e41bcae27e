"""``outbox-relay run``: APScheduler wiring, LISTEN wake-ups, signals, sd_notify.

The drain job runs on an interval (``poll_interval``, the fallback) with ``max_instances=1``
and coalescing; a dedicated LISTEN connection wakes it as soon as a writer commits. Losing
that connection only costs latency: polling goes on while it reconnects. Behind a
transaction-mode pooler (PgBouncer) LISTEN has no session to live on: the listener uses
``listen_database_url`` (a direct connection) when set; without it the relay says so once in
its log and polls (:meth:`Relay.listener`).

Health (``/healthz``, and whether the heartbeat feeds the systemd watchdog) means progress: a
drain that runs is healthy only while it keeps making progress (:func:`stall_after`); when none
runs, the last one must have completed recently. A target paused for long is logged again on
a schedule (:func:`pause_alerts_due`), and its pause shows in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from bisect import bisect_right
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from relay.core import peers
from relay.core.engine import Engine, Observer
from relay.durations import human_duration
from relay.errors import ConfigError, DatabaseError, PermissionDenied, RelayError, SchemaError
from relay.pg.migrations import latest_version
from relay.pg.store import Store
from relay.service.logs import configure_logging
from relay.service.metrics import Metrics, MetricsServer
from relay.service.sdnotify import Notifier
from relay.settings import Settings

log = logging.getLogger("relay.daemon")

HEARTBEAT_SECONDS = 10.0
# How often (seconds) the journal gets a ``progress`` line, when something was delivered or
# dead-lettered since the last one.
PROGRESS_SECONDS = 60.0
MAINTENANCE_SECONDS = 3600.0  # attempt partitions made ahead and ended days counted, at start and hourly
# What a drain may go without progress on top of the lease: a slow database write (stall_after).
STALL_SLACK = 30.0
# A target paused this long (seconds) is logged again: at 5 min, 15 min, 1 h, then every hour.
PAUSE_ALERTS = (300.0, 900.0, 3600.0)
PAUSE_ALERT_EVERY = 3600.0
# While the database is away (a restart, a failover), the LISTEN connection is tried again
# after 0.2 s, doubling up to this many seconds; each try wakes the drain. Measured with
# tests/chaos/test_failover.py: with 5 s, a promotion 10 s after the crash waited up to 5 s for
# the next try (the drain's own retry is the poll interval, 5 s by default); with 1 s, the
# first delivery on the new primary comes about a second after the promotion. A try is one
# connection attempt, refused at once by a host that is down.
LISTEN_RETRY_MAX = 1.0
# A failed drain is tried again after this many seconds, doubling up to the poll interval,
# instead of only at the next poll: the first failure after a failover is often one dead pooled
# session (the pool then drops the others), and the rows the new primary holds need no commit
# to be claimed.
DRAIN_RETRY_FIRST = 0.2


def stall_after(settings: Settings) -> float:
    """Seconds a running drain may go without progress before it counts as stuck: the lease + 30.

    Progress is what the engine records in ``progress_at``: a claim that returned rows, an
    answer or transport error received, results written. No single row can legitimately hold
    a drain longer than its lease: a row is never sent when what is left of its lease cannot
    cover the request timeout, and every answer (or timeout) counts as progress. The 30 s
    absorb a slow database write of the results. Past this bound ``/healthz`` answers 503 and
    the systemd watchdog is no longer fed, so systemd restarts a wedged relay.
    """
    return settings.lease + STALL_SLACK


def pause_alerts_due(paused_for: float) -> int:
    """How many ``target still paused`` errors a pause of ``paused_for`` seconds has earned.

    0 before 5 minutes, 1 from 5 minutes, 2 from 15 minutes, 3 from one hour, then one more per
    hour (4 at 2 h, 5 at 3 h, ...). The heartbeat logs whenever this count goes up, so each step
    is logged once however often the heartbeat runs, and a missed step is not logged twice.
    """
    due = bisect_right(PAUSE_ALERTS, paused_for)
    if paused_for >= PAUSE_ALERTS[-1]:
        due += int((paused_for - PAUSE_ALERTS[-1]) // PAUSE_ALERT_EVERY)
    return due


class _SkipNoise(logging.Filter):
    """A drain that is already running absorbs the next tick, and a job that starts late (a slow
    start, a busy event loop) simply runs late: neither is worth a warning. (Our jobs are added
    with ``misfire_grace_time=None``, so APScheduler does not skip them; this keeps its
    ``was missed by`` out of the log should one ever be.)"""

    NOISE = ("maximum number of running instances reached", "was missed by")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


# APScheduler's loggers that speak of our jobs' timing (a filter is not inherited by children).
_SCHEDULER_LOGGERS = ("apscheduler", "apscheduler.scheduler", "apscheduler.executors.default")


def metrics_listen_error(host: str, port: int, exc: OSError) -> str:
    """The one line for a metrics address that cannot be listened on, naming the setting."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = "address already in use (another process listens there: stop it or choose another port)"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges: choose a port from 1024)"
    else:
        why = (exc.strerror or str(exc)).lower()
    return f"metrics_listen {address}: {why}"


class Relay:
    """The daemon: one engine, one scheduler, one listener.

    ``monotonic`` is the clock the health check compares the engine's ``progress_at`` with
    (``time.monotonic``; tests move it ahead instead of waiting).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        observer: Observer | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        progress_every: float = PROGRESS_SECONDS,
    ) -> None:
        self.settings = settings
        self.monotonic = monotonic
        self.progress_every = progress_every
        self.store = Store(
            settings.require_database_url(),
            pool_size=4,
            role="outbox_relay",
            listen_url=settings.listen_database_url,
        )
        self.metrics = Metrics(targets=settings.targets)
        self.engine = Engine(
            settings, self.store, observer=observer or self.metrics, on_state_change=self._lane_changed
        )
        self.metrics_server: MetricsServer | None = None
        self.notifier = Notifier(settings.systemd)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.stop_event = asyncio.Event()
        self.listening = asyncio.Event()
        self._drain_due = False
        self._drain_failures = 0
        self._drain_task: asyncio.Task[object] | None = None
        self._woken: asyncio.Task[None] | None = None  # a strong reference to the last wake-up
        self.last_drain_at: datetime | None = None
        self._drain_started: float | None = None  # time.monotonic() when the last drain began
        self._stalled_from: float | None = None  # last progress before the stall being reported
        self._pause_alerts: dict[str, int] = {}  # target -> pause_alerts_due() already logged
        self._probe_failing = False  # the health check's last database check failed
        self._states_lock = asyncio.Lock()  # one outbox.relay_targets write at a time, in order
        self._states_due = False  # a write of the targets' states is scheduled
        self._states_task: asyncio.Task[None] | None = None
        self._closing = False  # past this, no more state writes (the relay's rows are removed)
        self._reported = (0, 0)  # engine.delivered, engine.dead at the last progress line
        self._ready = False  # start-up finished: READY=1 was sent
        self._start_failed = False

    # -- wake-ups --------------------------------------------------------------------------
    def wake(self) -> None:
        """Run the drain job now, or let the running one claim again.

        The job's function is started directly on the event loop rather than by rescheduling
        it through APScheduler: measured with bench/run.py --only latency, that path cost about
        0.4 ms of the commit-to-request time. The interval job stays the fallback and skips a
        tick while a drain runs.
        """
        self.engine.poke()
        if self.engine.running or self._drain_due or self.stop_event.is_set() or not self.scheduler.running:
            return
        self._drain_due = True
        self._woken = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        self._drain_due = False
        if self.engine.running:  # a wake-up and a tick met: the running drain claims again
            self.engine.poke()
            return
        self._drain_task = asyncio.current_task()
        if self.stop_event.is_set():
            return
        try:
            self._drain_started = self.monotonic()
            await self.engine.run_once()
            self.last_drain_at = datetime.now(UTC)
            self.metrics.drained()
            self._wake_for_retries()
            if self._drain_failures:
                log.info("database reachable again; draining")
            self._drain_failures = 0
        except RelayError as exc:
            self._drain_failures += 1
            if self._drain_failures in (1, 10) or self._drain_failures % 100 == 0:
                log.error(
                    "drain failed; retrying", extra={"error": str(exc), "failures": self._drain_failures}
                )
            self._retry_drain()

    def _retry_drain(self) -> None:
        """The next try of a failed drain: sooner than the poll while failures are few."""
        delay = DRAIN_RETRY_FIRST * 2 ** min(self._drain_failures - 1, 16)
        if delay < self.settings.poll_interval and not self.stop_event.is_set():
            asyncio.get_running_loop().call_later(delay, self.wake)

    def _wake_for_retries(self) -> None:
        """Retries this relay scheduled sooner than the next poll get a wake-up of their own."""
        due, self.engine.next_due = self.engine.next_due, None
        if due is None:
            return
        delay = (due - datetime.now(UTC)).total_seconds()
        if delay < self.settings.poll_interval:
            asyncio.get_running_loop().call_later(max(delay, 0.0) + 0.005, self.wake)

    def listener(self) -> asyncio.Task[None] | None:
        """The LISTEN task; None behind a pooler without ``listen_database_url``.

        Asked once the store has opened a session (:meth:`wait_for_database`), which tells
        whether a pooler is in between (:attr:`relay.pg.store.Store.pooler`): a LISTEN through
        a transaction-mode pooler is accepted and then never hears a notification, since the
        server connection it ran on goes back to the pooler's pool."""
        if self.store.pooler and self.settings.listen_database_url is None:
            log.warning(
                "database_url goes through a connection pooler: no LISTEN wake-ups; polling every "
                "poll_interval; set listen_database_url to a direct connection for wake-ups",
                extra={"poll_interval": human_duration(self.settings.poll_interval)},
            )
            return None
        return asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        delay = 0.2
        while not self.stop_event.is_set():
            try:
                async for _ in self.store.listen(self.listening):
                    delay = 0.2
                    self.wake()
            except ConfigError as exc:  # listen_database_url goes through a pooler: no retry cures it
                self.listening.clear()
                log.warning(
                    "no LISTEN wake-ups; polling every poll_interval",
                    extra={"error": str(exc), "poll_interval": human_duration(self.settings.poll_interval)},
                )
                return
            except RelayError as exc:
                self.listening.clear()
                log.warning("LISTEN connection lost; polling meanwhile", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)
            self.wake()  # notifications sent while we were away are lost: look now

    def drain_problem(self) -> str | None:
        """Why the drain job is unhealthy, or None when it is healthy.

        While a drain runs: it made progress within :func:`stall_after` seconds (counted from
        the drain's start at the earliest, since an idle relay has no progress to show).
        Otherwise: the drain job completed recently. The first time a stall is seen it is
        logged at ERROR, and once at INFO when progress resumes (or the drain ends).
        """
        if self.engine.running:
            last = self.engine.progress_at
            if self._drain_started is not None:
                last = max(last, self._drain_started)
            idle, bound = self.monotonic() - last, stall_after(self.settings)
            if idle > bound:
                if self._stalled_from is None:
                    self._stalled_from = last
                    log.error(
                        "drain stalled: no progress while a drain is running",
                        extra={"no_progress_for": human_duration(idle), "bound": human_duration(bound)},
                    )
                return f"no progress for {int(idle)}s while a drain is running (bound {bound:g}s)"
        if self._stalled_from is not None:
            stalled_for = self.monotonic() - self._stalled_from
            self._stalled_from = None
            log.info("drain progress resumed", extra={"no_progress_for": human_duration(stalled_for)})
        if self.engine.running:
            return None
        if self.last_drain_at is not None and (
            (datetime.now(UTC) - self.last_drain_at).total_seconds()
            < max(3 * self.settings.poll_interval, 30.0)
        ):
            return None
        return "the drain job has not completed recently"

    def drain_healthy(self) -> bool:
        """The drain job completed recently, or is running and making progress."""
        return self.drain_problem() is None

    async def health(self) -> tuple[bool, str]:
        """For ``/healthz``: the database answers and the drain job is healthy (:meth:`drain_problem`).

        The database is checked on a connection of its own (:class:`relay.pg.store.HealthProbe`),
        never one of the delivery pool's. When it fails the answer is ``database unreachable`` and nothing
        of the driver's message (which can name the host, port, user and database): the reason
        goes to the log, once when the database becomes unreachable.
        """
        try:
            await self.store.probe.ping()
        except RelayError as exc:
            if not self._probe_failing:
                self._probe_failing = True
                log.warning("health check: database unreachable", extra={"error": str(exc)})
            return False, "database unreachable"
        if self._probe_failing:
            self._probe_failing = False
            log.info("health check: database reachable again")
        problem = self.drain_problem()
        if problem is not None:
            return False, problem
        return True, "ok"

    async def heartbeat(self) -> None:
        """One heartbeat (the scheduler runs it every few seconds; tests call it directly).

        Writes the targets' states to ``outbox.relay_targets``, refreshes the backlog and pause
        gauges, logs long pauses again (:func:`pause_alerts_due`), feeds the systemd watchdog
        only while the drain job is healthy, and sets the status line.
        """
        try:
            states = await self._write_states()
            self.metrics.backlogs(await self.store.backlog(list(self.settings.targets)))
        except RelayError as exc:
            states = self.engine.lane_states()
            log.debug("heartbeat failed", extra={"error": str(exc)})
        paused_for = self.engine.paused_for()
        for name in self.engine.lanes:
            self.metrics.target_paused(name, paused_for.get(name, 0.0))
        self._escalate_pauses(paused_for, {name: reason for name, _, reason in states})
        problem = self.drain_problem()
        if problem is None:
            self.notifier.watchdog()
        paused = [name for name, state, _ in states if state != "serving"]
        summary = f"delivered or dead-lettered {self.engine.finished} rows"
        summary += f"; paused: {', '.join(paused)}" if paused else ""
        summary += f"; stalled: {problem}" if self._stalled_from is not None else ""
        self.notifier.status(summary)

    async def _write_states(self) -> list[tuple[str, str, str | None]]:
        """Write the targets' states to ``outbox.relay_targets``; the states are read under the
        lock, so a later write never carries older states than an earlier one."""
        async with self._states_lock:
            states = self.engine.lane_states()
            await self.store.heartbeat(self.settings.relay_id, states, peers.own_pauses(self.engine))
            return states

    async def share(self) -> None:
        """Presence and shared limits (:mod:`relay.core.peers`; the scheduler runs it every
        second, tests call it directly): touch this relay's rows, divide the rate limits among
        the live relays, follow their pauses, and release the claims of dead ones."""
        try:
            rows = await self.store.peers(
                self.settings.relay_id,
                peers.own_pauses(self.engine),
                peers.ALIVE_SECONDS,
                self.settings.lease,
            )
        except RelayError as exc:
            log.debug("reading the other relays failed", extra={"error": str(exc)})
            return
        dead = peers.apply(self.engine, rows)
        released = await self._release_claims(dead) if dead else ""
        if released:
            log.warning(
                "released the claims of a relay that stopped",
                extra={"relays": ", ".join(dead), "rows": released},
            )

    async def _release_claims(self, relay_ids: list[str]) -> str:
        """Make the rows these relays hold due (and wake the drain); the rows released per target,
        as ``target=n, ...``, or an empty string."""
        try:
            released = await self.store.release_claims(relay_ids)
        except RelayError as exc:
            log.debug("releasing claims failed", extra={"error": str(exc)})
            return ""
        if released and self.scheduler.running:
            self.wake()
        return ", ".join(f"{target}={n}" for target, n in released.items())

    async def join(self) -> None:
        """Before the first drain: release what an earlier process of this relay id still held,
        register with the other relays and, when a target has a rate limit, wait
        :data:`relay.core.peers.JOIN_SECONDS` so that they lower their share before we send."""
        released = await self._release_claims([self.settings.relay_id])
        if released:
            log.warning("released the claims of this relay's last run", extra={"rows": released})
        try:
            await self._write_states()
        except RelayError as exc:
            log.debug("registering with the other relays failed", extra={"error": str(exc)})
            return
        if any(t.rate_limit for t in self.settings.targets.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), peers.JOIN_SECONDS)
        await self.share()

    def _lane_changed(self, target: str, state: str) -> None:
        """The engine saw a target change state: ``status`` shows it now, not at the next heartbeat."""
        if self._states_due or self._closing or not self.scheduler.running:
            return
        self._states_due = True
        self._states_task = asyncio.get_running_loop().create_task(self._write_states_now())

    async def _write_states_now(self) -> None:
        self._states_due = False  # a change from here on schedules another write
        try:
            await self._write_states()
        except RelayError as exc:
            log.debug("writing the targets' states failed", extra={"error": str(exc)})

    async def progress(self) -> None:
        """One ``progress`` line (INFO) when rows were delivered or dead-lettered since the last
        one: how many, and the backlog left (pending rows and the oldest one's age) of the
        configured targets. Nothing while idle."""
        delivered, dead = self.engine.delivered, self.engine.dead
        if (delivered, dead) == self._reported:
            return
        fields: dict[str, object] = {
            "delivered": delivered - self._reported[0],
            "dead": dead - self._reported[1],
        }
        self._reported = (delivered, dead)
        try:
            backlog = await self.store.backlog(list(self.settings.targets))
        except RelayError as exc:
            log.debug("progress: backlog unavailable", extra={"error": str(exc)})
        else:
            mine = [b for b in backlog if b.target in self.settings.targets]
            fields["pending"] = sum(b.pending for b in mine)
            fields["oldest_pending"] = human_duration(
                max((b.oldest_pending_seconds for b in mine), default=0.0)
            )
        log.info("progress", extra=fields)

    def _escalate_pauses(self, paused_for: dict[str, float], reasons: dict[str, str | None]) -> None:
        """``target still paused`` at ERROR each time a pause reaches its next step; a target
        that serves again starts over (the engine logs ``target resumed``)."""
        for name in [n for n in self._pause_alerts if n not in paused_for]:
            del self._pause_alerts[name]
        for name, seconds in sorted(paused_for.items()):
            due = pause_alerts_due(seconds)
            if due > self._pause_alerts.get(name, 0):
                self._pause_alerts[name] = due
                log.error(
                    "target still paused",
                    extra={
                        "target": name,
                        "reason": reasons.get(name),
                        "paused_for": human_duration(seconds),
                    },
                )

    # -- lifecycle -------------------------------------------------------------------------
    async def wait_for_database(self) -> None:
        """Block until the database answers and the schema is current (systemd READY gate).

        An unreachable database is waited for; a schema behind, or a user without the privileges
        the relay needs (:class:`PermissionDenied`, which names the grant), ends the start: no
        wait cures a configuration error."""
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                version = await self.store.schema_version()
                if version < latest_version():
                    raise SchemaError(
                        f"schema is at version {version}, this relay needs {latest_version()}: "
                        "run `outbox-relay migrate`"
                    )
                return
            except (SchemaError, PermissionDenied):
                raise
            except DatabaseError as exc:
                log.warning("waiting for the database", extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop_event.set)
        for name in _SCHEDULER_LOGGERS:
            logging.getLogger(name).addFilter(_SkipNoise())
        targets = ", ".join(f"{t.name}={t.base_url}" for t in self.settings.targets.values())
        log.info("starting", extra={"relay_id": self.settings.relay_id, "targets": targets})
        listener: asyncio.Task[None] | None = None
        try:
            await self.wait_for_database()
            await self.join()
            if self.stop_event.is_set():
                return
            self.add_jobs()
            if self.settings.metrics_listen is not None:
                host, port = self.settings.metrics_listen
                self.metrics_server = MetricsServer(self.metrics, host, port, self.health)
                try:
                    await self.metrics_server.start()
                except OSError as exc:
                    raise ConfigError(metrics_listen_error(host, port, exc)) from exc
                log.info("metrics listening", extra={"address": f"{host}:{self.metrics_server.port}"})
            listener = self.listener()
            if listener is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.listening.wait(), 5.0)
            # READY before the first job runs, so systemd sees READY=1 before any STATUS=.
            self.notifier.ready(f"relaying for {len(self.settings.targets)} target(s)")
            log.info("ready", extra={"relay_id": self.settings.relay_id})
            self._ready = True
            self.scheduler.start()
            await self.stop_event.wait()
            log.info("shutting down", extra={"timeout": self.settings.shutdown_timeout})
            self.notifier.stopping()
        except Exception as exc:
            if not self._ready:  # the error, not a "stopped" summary that reads as a clean stop
                self._start_failed = True
                log.error("start failed", extra={"error": str(exc)})
            raise
        finally:
            await self._shutdown(listener)

    def add_jobs(self) -> None:
        """The scheduler's jobs: drain (the fallback to LISTEN), heartbeat, share (the other
        relays), progress, maintenance (partitions, report rollup), retention.

        Each runs however late it comes (``misfire_grace_time=None``) and late runs coalesce
        into one: a slow start or a busy event loop delays a job, never skips it, and APScheduler
        has nothing to warn about.
        """
        now = datetime.now(UTC)
        timely = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        self.scheduler.add_job(
            self._drain,
            "interval",
            seconds=self.settings.poll_interval,
            id="drain",
            next_run_time=now,
            **timely,
        )
        self.scheduler.add_job(
            self.heartbeat,
            "interval",
            seconds=self._heartbeat_seconds(),
            id="heartbeat",
            next_run_time=now,
            **timely,
        )
        self.scheduler.add_job(
            self.share, "interval", seconds=peers.PRESENCE_SECONDS, id="share", next_run_time=now, **timely
        )
        self.scheduler.add_job(
            self.progress, "interval", seconds=self.progress_every, id="progress", **timely
        )
        self._add_maintenance_job(now)
        self._add_retention_job()

    def _heartbeat_seconds(self) -> float:
        interval = self.notifier.watchdog_interval()
        return min(HEARTBEAT_SECONDS, interval) if interval else HEARTBEAT_SECONDS

    async def maintain(self) -> None:
        """The maintenance job: next months' attempt partitions, and ended days counted into the
        report rollup (relay/core/retention.py). A failure is logged and tried again next hour:
        rows still land (in the default partition) without it."""
        from relay.core.retention import maintain

        try:
            done = await maintain(self.store)
        except RelayError as exc:
            log.error("maintenance failed", extra={"error": str(exc)})
            return
        if done.partitions:
            log.info("attempt partitions created", extra={"partitions": ",".join(done.partitions)})
        if done.days:
            log.info("report days counted", extra={"days": done.days})

    def _add_maintenance_job(self, now: datetime) -> None:
        self.scheduler.add_job(
            self.maintain,
            "interval",
            seconds=MAINTENANCE_SECONDS,
            id="maintenance",
            next_run_time=now,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    def _add_retention_job(self) -> None:
        if self.settings.retention is None:
            return
        from relay.core.retention import cycle

        async def purge() -> None:
            try:
                assert self.settings.retention is not None
                done = await cycle(
                    self.store, self.settings.retention, self.settings.retention_include_dead, 1000
                )
                log.info(
                    "retention purge done",
                    extra={
                        "rows": done.updates,
                        "partitions_dropped": ",".join(p for p, _, _ in done.partitions) or "-",
                        "attempts_dropped": done.attempts,
                        "attempts_kept": sum(kept for _, _, kept in done.partitions),
                    },
                )
            except RelayError as exc:
                log.error("retention purge failed", extra={"error": str(exc)})

        self.scheduler.add_job(
            purge, "cron", minute=17, id="purge", max_instances=1, coalesce=True, misfire_grace_time=None
        )

    async def _shutdown(self, listener: asyncio.Task[None] | None) -> None:
        # Pause, not shut down: shutting the scheduler down cancels a running drain mid-write.
        if self.scheduler.running:
            self.scheduler.pause()
        self.engine.stop()
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, RelayError):
                await listener
        await self.engine.shutdown(self.settings.shutdown_timeout)
        if self._drain_task is not None and not self._drain_task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, RelayError):
                await asyncio.wait_for(self._drain_task, 5.0)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        self._closing = True
        if self._states_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._states_task
        with contextlib.suppress(RelayError):
            await self.store.forget_relay(self.settings.relay_id)
        await self.engine.close()
        await self.store.close()
        self.notifier.close()
        if self._start_failed:
            return
        log.info(
            "stopped",
            extra={
                "delivered_or_dead": self.engine.finished,
                "delivered": self.engine.delivered,
                "dead": self.engine.dead,
            },
        )


def cmd_run(args: object, settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    relay = Relay(settings)
    asyncio.run(relay.run())
    return 0
