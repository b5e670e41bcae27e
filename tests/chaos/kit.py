"""The steady-load chaos harness: a writer thread, relays as real processes, the accounting.

A scenario builds a :class:`Harness` (``chaos`` fixture), starts relays and a :class:`Writer`,
does something unpleasant, and finally calls :meth:`Harness.settle`, which stops the writer,
waits for every committed row to be delivered, stops the relays with SIGTERM and counts:

* ``rows``: rows whose commit succeeded (a failed commit is retried with the same rows, so a
  commit whose answer was lost is found again, never counted twice: the enqueue function
  accepts an identical repeat);
* ``lost``: committed rows that did not end ``delivered`` in the database with their body
  applied by the sandbox;
* ``applied_twice``: actions the sandbox applied more than once (its ``apply_count``);
* ``duplicates_sent``: PUTs the sandbox refused as ``ACTION_ALREADY_FINAL``; each such row must
  have been recorded as delivered by a ``delivered_earlier`` attempt.

After a failover (``settle(survivor=True)``) the database is the promoted standby, which may not
hold every row the writer saw commit on the old primary: ``rows`` counts the committed rows it
holds, ``not_held`` the others (lost with the old primary, the application's change with them).
A held row may also end ``dead`` because the API already applied it from the old primary
(``ALREADY_FINAL_UNRECORDED`` in its ``last_error``): counted in ``dead_already_final``, and not
lost when the sandbox applied it exactly once with its body.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy.engine import make_url

from relay.core.classify import ALREADY_FINAL_UNRECORDED
from relay.dev.sandbox.server import Sandbox
from tests.relaykit import CODES, relay_env

RELAY_APP = "outbox-relay%"  # application_name of every relay connection (pool and listener)
WRITER_APP = "chaos-writer"

_WRITE = """
select outbox.enqueue_action_status(x.a, x.s, x.e, 'default')
from unnest(%s::text[], %s::text[], %s::jsonb[]) as x(a, s, e)
"""


def database_name(url: str) -> str:
    name = make_url(url).database
    assert name
    return name


def admin_url(url: str) -> str:
    """The same server's ``postgres`` database (for ALTER DATABASE and the like)."""
    return make_url(url).set(database="postgres").render_as_string(hide_password=False)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


class Writer:
    """An application committing ``rate`` rows per second, ``per_tx`` rows per transaction.

    A failed commit did not happen: the same rows are committed again (after reconnecting)
    until it works, so ``committed`` holds exactly the rows the database accepted. The
    schedule does not catch up after an outage: the load stays steady, not bursty.
    """

    def __init__(
        self, url: str, *, rate: float = 100.0, per_tx: int = 5, prefix: str = "chaos", seed: int = 1
    ):
        self.url = url
        self.rate = rate
        self.per_tx = per_tx
        self.prefix = prefix
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-writer", daemon=True)
        self.committed: dict[str, dict[str, Any]] = {}  # action id -> the body the API must get
        self.max_id = 0
        self.failed_commits = 0
        self.errors: Counter[str] = Counter()
        self.abandoned: list[str] = []  # rows of a batch still failing when told to stop
        self.crashed: BaseException | None = None
        self._give_up_after = 60.0

    def start(self) -> Writer:
        self._thread.start()
        return self

    def stop(self, give_up_after: float = 60.0) -> None:
        """Finish the batch being written (retrying up to ``give_up_after`` seconds) and stop."""
        self._give_up_after = give_up_after
        self._stop.set()
        self._thread.join(give_up_after + 15.0)
        assert not self._thread.is_alive(), "the writer did not stop"
        assert self.crashed is None, f"the writer crashed: {self.crashed!r}"

    def mark(self) -> int:
        """The highest id committed so far: rows up to it were written before this moment."""
        with self._lock:
            return self.max_id

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.committed)

    def _make(self, seq: int) -> tuple[str, str, list[dict[str, str]]]:
        action_id = f"{self.prefix}-{seq:07d}"
        if self._rng.random() < 0.7:
            return action_id, "SUCCESS", []
        n = self._rng.randint(1, 2)
        return (
            action_id,
            "FAILED",
            [{"code": self._rng.choice(CODES), "message": f"why {seq}.{k}"} for k in range(n)],
        )

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by stop()
            self.crashed = exc

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        period = self.per_tx / self.rate
        next_at = time.monotonic()
        seq = 0
        batch: list[tuple[str, str, list[dict[str, str]]]] | None = None
        failing_since: float | None = None
        try:
            while True:
                if batch is None:
                    if self._stop.is_set():
                        return
                    wait = next_at - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        return
                    next_at = max(next_at + period, time.monotonic() - period)
                    batch = [self._make(seq + i) for i in range(self.per_tx)]
                    seq += self.per_tx
                try:
                    if conn is None:
                        conn = psycopg.connect(
                            self.url, autocommit=True, connect_timeout=3, application_name=WRITER_APP
                        )
                    with conn.transaction():
                        ids = conn.execute(
                            _WRITE,
                            (
                                [a for a, _, _ in batch],
                                [s for _, s, _ in batch],
                                [Jsonb(e) for _, _, e in batch],
                            ),
                        ).fetchall()
                except psycopg.Error as exc:
                    self.failed_commits += 1
                    self.errors[_first_line(exc)] += 1
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            conn.close()
                        conn = None
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if self._stop.is_set() and now - failing_since > self._give_up_after:
                        self.abandoned.extend(a for a, _, _ in batch)
                        return
                    time.sleep(0.2)
                    continue
                failing_since = None
                with self._lock:
                    for action_id, status, errors in batch:
                        self.committed[action_id] = {
                            "status": status,
                            **({"errors": errors} if errors else {}),
                        }
                    self.max_id = max(self.max_id, *(int(r[0]) for r in ids))
                batch = None
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()


class RelayProcess:
    """``python -m relay run`` as a child process, logging to one file across restarts."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = {**env, "RELAY_ID": name}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> RelayProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run"],
                env={**base, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None and self.alive, f"relay {self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)
        self.kills += 1

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


class Probe:
    """A reconnecting autocommit connection for the test's own queries (survives restarts)."""

    def __init__(self, url: str, application_name: str = "chaos-probe") -> None:
        self.url = url
        self.application_name = application_name
        self._conn: psycopg.Connection | None = None

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        for attempt in range(2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.url, autocommit=True, connect_timeout=3, application_name=self.application_name
                    )
                return self._conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def execute(self, sql: str, params: Any = None) -> None:
        """A statement that returns no rows (or whose rows do not matter)."""
        for attempt in range(2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.url, autocommit=True, connect_timeout=3, application_name=self.application_name
                    )
                self._conn.execute(sql, params)
                return
            except psycopg.OperationalError:
                self.close()
                if attempt:
                    raise

    def one(self, sql: str, params: Any = None) -> Any:
        return self.query(sql, params)[0][0]

    def try_one(self, sql: str, params: Any = None) -> Any:
        """Like :meth:`one`, None while the database is unreachable."""
        try:
            return self.one(sql, params)
        except psycopg.OperationalError:
            return None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


class Repeater:
    """Calls ``action`` every ``every`` seconds in a thread until stopped; counts what it returns."""

    def __init__(self, action: Callable[[], int], every: float, name: str) -> None:
        self.action = action
        self.every = every
        self.total = 0
        self.calls = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Repeater:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.total += self.action()
                self.calls += 1
                self._stop.wait(self.every)
        except BaseException as exc:  # reported by stop()
            self.failure = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.failure is None, f"{self._thread.name} failed: {self.failure!r}"


class DrainClock:
    """Times several faults at once: for each :meth:`mark`, the seconds until every row committed
    before it was delivered (a background thread polls the oldest unfinished row)."""

    _OLDEST = (
        "select coalesce(min(id), 9223372036854775807) from outbox.action_status_updates "
        "where state in ('pending', 'in_flight')"
    )

    def __init__(self, url: str) -> None:
        self._probe = Probe(url, "chaos-clock")
        self._lock = threading.Lock()
        self._open: list[tuple[int, float]] = []
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-drain-clock", daemon=True)
        self._thread.start()

    def mark(self, max_id: int) -> None:
        with self._lock:
            self._open.append((max_id, time.monotonic()))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                oldest = self._probe.try_one(self._OLDEST)
                now = time.monotonic()
                if oldest is not None:
                    with self._lock:
                        done = [(m, t) for m, t in self._open if m < oldest]
                        self._open = [(m, t) for m, t in self._open if m >= oldest]
                        self.seconds.extend(now - t for _, t in done)
                self._stop.wait(0.1)
        finally:
            self._probe.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def finish(self, timeout: float = 90.0) -> float:
        """Wait for every mark to drain; the longest time any took."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                left = len(self._open)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self._stop.set()
        self._thread.join(10)
        assert not left, f"{left} marks not drained within {timeout:.0f} s"
        return max(self.seconds, default=0.0)


@dataclass
class Outcome:
    rows: int
    lost: list[str]
    applied_twice: list[str]
    duplicates_sent: int
    duplicated_not_recorded: list[str]  # refused repeats whose row has no delivered_earlier attempt
    dead: int
    unexpected: list[str]  # rows in the database the writer never saw commit
    wrong_body: list[str]
    resent_after_delivery: list[str]  # refused repeats of rows whose 204 had been recorded
    delivered_earlier: int
    unknown_outcome_rows: int
    max_attempts: int
    max_requests: int
    relay_exit_codes: dict[str, int | None] = field(default_factory=dict)
    not_held: list[str] = field(default_factory=list)  # committed, not on the survivor of a failover
    dead_already_final: int = 0  # dead: the API already held the row's final status (failover)

    def line(self, name: str, **extra: Any) -> str:
        def fmt(value: Any) -> str:
            return f"{value:.1f}" if isinstance(value, float) else str(value)

        figures = {
            "rows": self.rows,
            "lost": len(self.lost),
            "applied_twice": len(self.applied_twice),
            "duplicates_sent": self.duplicates_sent,
            **extra,
            "delivered_earlier": self.delivered_earlier,
            "dead": self.dead,
            "max_attempts": self.max_attempts,
        }
        return f"chaos {name}: " + " ".join(f"{k}={fmt(v)}" for k, v in figures.items())

    def check(self, *, duplicates_allowed: bool) -> None:
        assert self.rows > 0
        assert not self.lost, f"{len(self.lost)} committed rows not delivered, e.g. {self.lost[:5]}"
        assert not self.applied_twice, f"applied more than once: {self.applied_twice[:5]}"
        assert not self.wrong_body, f"applied with another body: {self.wrong_body[:5]}"
        assert not self.unexpected, f"rows nobody saw commit: {self.unexpected[:5]}"
        assert self.dead == self.dead_already_final, "rows went dead"
        assert not self.duplicated_not_recorded, (
            f"repeats refused as ACTION_ALREADY_FINAL but not recorded as delivered_earlier: "
            f"{self.duplicated_not_recorded[:5]}"
        )
        assert not self.resent_after_delivery, (
            f"sent again after the delivery was recorded: {self.resent_after_delivery[:5]}"
        )
        if not duplicates_allowed:
            assert self.duplicates_sent == 0, "nothing was killed or cut, yet updates were sent twice"
        bad_exits = {name: rc for name, rc in self.relay_exit_codes.items() if rc != 0}
        assert not bad_exits, f"relays did not stop cleanly on SIGTERM: {bad_exits}"


class Harness:
    """One scenario's moving parts; :meth:`close` (the fixture's teardown) stops what is left."""

    def __init__(self, url: str, sandbox: Sandbox, log_dir: Path) -> None:
        self.url = url
        self.sandbox = sandbox
        self.log_dir = log_dir
        self.relays: list[RelayProcess] = []
        self.writer: Writer | None = None
        self.probe = Probe(url)
        self.extras: list[Callable[[], object]] = []

    # -- parts -----------------------------------------------------------------------------
    def relay(self, name: str, **env: str) -> RelayProcess:
        proc = RelayProcess(name, relay_env(self.url, self.sandbox.url, **env), self.log_dir / f"{name}.log")
        self.relays.append(proc.start())
        return proc

    def start_writer(self, **kwargs: Any) -> Writer:
        self.writer = Writer(self.url, **kwargs).start()
        return self.writer

    def relay_connections(self) -> int:
        return int(
            self.probe.one(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and application_name like %s",
                (RELAY_APP,),
            )
        )

    def wait_listening(self, relays: int, timeout: float = 60.0) -> None:
        """Until ``relays`` relays hold their LISTEN connection to this database (they are ready)."""
        deadline = time.monotonic() + timeout
        sql = (
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and application_name = 'outbox-relay listener'"
        )
        while int(self.probe.one(sql)) < relays:
            assert time.monotonic() < deadline, (
                f"relays not listening after {timeout:.0f} s:\n{self.log_tail()}"
            )
            time.sleep(0.1)

    def terminate(self, application_name_like: str = RELAY_APP) -> int:
        """pg_terminate_backend on this database's sessions whose application_name matches."""
        return int(
            self.probe.one(
                "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity "
                "where datname = current_database() and application_name like %s and pid <> pg_backend_pid()",
                (application_name_like,),
            )
        )

    # -- waiting ---------------------------------------------------------------------------
    def drained_upto(self, max_id: int) -> bool:
        left = self.probe.try_one(
            "select count(*) from outbox.action_status_updates where id <= %s and state <> 'delivered'",
            (max_id,),
        )
        return bool(left == 0)

    def seconds_to_drain(self, max_id: int, since: float, timeout: float = 90.0) -> float:
        """Seconds from ``since`` (monotonic) until every row with id <= ``max_id`` is delivered."""
        deadline = time.monotonic() + timeout
        while not self.drained_upto(max_id):
            assert time.monotonic() < deadline, (
                f"rows committed before the fault were not all delivered within {timeout:.0f} s: "
                f"{self.states()}; relay logs:\n{self.log_tail()}"
            )
            time.sleep(0.1)
        return time.monotonic() - since

    def seconds_to_resume(self, max_id: int, since: float, timeout: float = 90.0) -> float:
        """Seconds from ``since`` until some row with id > ``max_id`` (committed after) is delivered."""
        deadline = time.monotonic() + timeout
        sql = (
            "select exists (select 1 from outbox.action_status_updates where id > %s and state = 'delivered')"
        )
        while not self.probe.try_one(sql, (max_id,)):
            assert time.monotonic() < deadline, (
                f"nothing new delivered within {timeout:.0f} s:\n{self.log_tail()}"
            )
            time.sleep(0.05)
        return time.monotonic() - since

    def states(self) -> dict[str, int]:
        try:
            rows = self.probe.query("select state, count(*) from outbox.action_status_updates group by 1")
        except psycopg.Error as exc:
            return {"unreachable": 0, _first_line(exc): 0}
        return {str(s): int(n) for s, n in rows}

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {r.name}\n" + "\n".join(r.log_text().splitlines()[-lines:]) for r in self.relays
        )

    def db_now(self) -> Any:
        return self.probe.one("select now()")

    def delivered_between(self, start: Any, end: Any) -> int:
        return int(
            self.probe.one(
                "select count(*) from outbox.action_status_updates "
                "where delivered_at >= %s and delivered_at < %s",
                (start, end),
            )
        )

    # -- the end ---------------------------------------------------------------------------
    def settle(self, timeout: float = 120.0, *, survivor: bool = False) -> Outcome:
        """Stop the writer, wait until every committed row is final, stop the relays, count.

        ``survivor``: the database is what a failover left (see the module docstring)."""
        assert self.writer is not None
        for relay in self.relays:
            assert relay.alive, (
                f"relay {relay.name} exited (code {relay.proc and relay.proc.returncode}):\n{relay.log_text()[-3000:]}"
            )
        self.writer.stop()
        committed = dict(self.writer.committed)
        deadline = time.monotonic() + timeout
        while True:
            s = self.states()
            enough = survivor or sum(s.values()) >= len(committed)
            if s.get("pending", 0) == 0 and s.get("in_flight", 0) == 0 and enough:
                break
            assert time.monotonic() < deadline, f"not drained within {timeout:.0f} s: {s}\n{self.log_tail()}"
            time.sleep(0.2)
        exit_codes = {r.name: r.stop() for r in self.relays}
        rows = dict(self.probe.query("select action_id, state from outbox.action_status_updates"))
        earlier = {
            a
            for (a,) in self.probe.query(
                "select distinct u.action_id from outbox.delivery_attempts d "
                "join outbox.action_status_updates u on u.id = d.update_id where d.outcome = 'delivered_earlier'"
            )
        }
        recorded_204 = {
            a
            for (a,) in self.probe.query(
                "select distinct u.action_id from outbox.delivery_attempts d "
                "join outbox.action_status_updates u on u.id = d.update_id where d.outcome = 'delivered'"
            )
        }
        max_attempts, max_requests, unknown = self.probe.query(
            "select coalesce(max(attempts), 0), coalesce(max(requests), 0), count(*) filter (where outcome_unknown) "
            "from outbox.action_status_updates"
        )[0]
        applied = dict(self.sandbox.applied)
        counts = dict(self.sandbox.apply_count)
        duplicated = dict(self.sandbox.duplicate_count)
        not_held: list[str] = []
        final_elsewhere: set[str] = set()
        if survivor:
            not_held = sorted(a for a in committed if a not in rows)
            committed = {a: body for a, body in committed.items() if a in rows}
            final_elsewhere = {
                a
                for (a,) in self.probe.query(
                    "select action_id from outbox.action_status_updates "
                    "where state = 'dead' and strpos(last_error, %s) > 0",
                    (ALREADY_FINAL_UNRECORDED,),
                )
                if counts.get(a) == 1  # applied once, from the old primary
            }
            duplicated = {a: n for a, n in duplicated.items() if a not in final_elsewhere}

        def ended_well(a: str) -> bool:
            return a in applied and (rows.get(a) == "delivered" or a in final_elsewhere)

        return Outcome(
            rows=len(committed),
            lost=sorted(a for a in committed if not ended_well(a)),
            applied_twice=sorted(a for a, n in counts.items() if n > 1),
            duplicates_sent=self.sandbox.duplicates,
            duplicated_not_recorded=sorted(a for a in duplicated if a not in earlier),
            dead=sum(1 for s in rows.values() if s == "dead"),
            unexpected=sorted(a for a in rows if a not in committed and a not in self.writer.abandoned),
            wrong_body=sorted(a for a, body in committed.items() if a in applied and applied[a] != body),
            resent_after_delivery=sorted(a for a in duplicated if a in recorded_204),
            delivered_earlier=len(earlier),
            unknown_outcome_rows=int(unknown),
            max_attempts=int(max_attempts),
            max_requests=int(max_requests),
            relay_exit_codes=exit_codes,
            not_held=not_held,
            dead_already_final=len(final_elsewhere),
        )

    def close(self) -> None:
        for action in reversed(self.extras):
            with contextlib.suppress(Exception):
                action()
        if self.writer is not None and self.writer._thread.is_alive():
            self.writer._stop.set()
            self.writer._give_up_after = 0.0
            self.writer._thread.join(10)
        for relay in self.relays:
            if relay.alive:
                assert relay.proc is not None
                relay.proc.kill()
                relay.proc.wait(15)
        self.probe.close()


@contextlib.contextmanager
def idle_connections(url: str, n: int) -> Iterator[list[psycopg.Connection]]:
    """``n`` open, idle sessions against ``url``, closed on exit."""
    conns: list[psycopg.Connection] = []
    try:
        for _ in range(n):
            conns.append(psycopg.connect(url, autocommit=True, application_name="chaos-idle"))
        yield conns
    finally:
        for conn in conns:
            with contextlib.suppress(psycopg.Error):
                conn.close()
