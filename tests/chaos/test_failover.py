"""Failover to a promoted standby, under a steady load, with two real PostgreSQL servers.

A primary and a streaming standby made from it with ``pg_basebackup -R`` (each an
:class:`~relay.dev.embedded.EmbeddedPostgres` of its own). The writer and the relay (a real
``python -m relay run`` process) both use the multi-host URL an operator would give them,
``postgresql://…@primary,standby/chaos?target_session_attrs=read-write``, and libpq walks the
hosts. The relay runs with the production ``poll_interval`` (5 s), so the figures are what an
operator gets. Each scenario prints one line of figures::

    chaos failover: rows=N not_held=K lost=0 applied_twice=0 ... first_delivery_s=X relay_restarts=0

* ``rows``: rows committed and acknowledged that the surviving server holds; ``not_held``:
  rows the writer saw commit on the old primary that never reached the standby (lost with the
  application's own change: an asynchronous standby's price, see the README);
* ``lost``: held rows that did not end delivered with their body applied once, or ``dead``
  because the API already held their final status (applied once, from the old primary);
* ``dead_already_final``: those dead rows; ``dropped``: results the relay dropped for rows the
  survivor does not hold (the sum over its ``results dropped`` log lines, equal to its
  ``outbox_relay_results_dropped_total``);
* ``first_delivery_s``: from the promotion until the first delivery recorded on the new primary;
* ``relay_restarts``: the relay process is the same from start to end.

Durations: a CI length by default, longer loads with ``CHAOS_FULL_DURATIONS=1``;
``CHAOS_FAILOVER_DECIDE_S`` sets the seconds from the crash to the promotion (1 by default: 10
gives a first delivery about 1 s after the promotion, as the README says).
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.dev.embedded import EmbeddedPostgres
from relay.dev.sandbox.server import Faults, Sandbox
from tests.chaos.conftest import PRIVATE_DB
from tests.chaos.kit import RELAY_APP, WRITER_APP, Harness, Probe, Repeater
from tests.relaykit import create_migrated_database

pytestmark = pytest.mark.chaos

FULL = os.environ.get("CHAOS_FULL_DURATIONS") == "1"

RATE = 100.0  # rows committed per second by the writer
WARM_UP_S = 6.0 if FULL else 3.0  # load before the failover
LAG_S = 2.0  # the standby's WAL receiver stopped this long before the crash: it lags behind
DECIDE_S = float(os.environ.get("CHAOS_FAILOVER_DECIDE_S", "1.0"))  # crash to promotion
BACKLOG_S = 1.0  # slow answers before the lag starts: a backlog of rows the standby holds
AFTER_S = 20.0 if FULL else 4.0  # load after the promotion, before settling
READ_ONLY_S = 30.0 if FULL else 6.0  # load while the old primary is back read-only
SLOW_ANSWER_S = 1.5  # the API's answers around the crash: requests are in flight then
CONCURRENCY = 8  # the relay's max_concurrency: slow answers leave rows pending
LATENCY = 0.005
DROPPED = re.compile(r"results dropped: rows not in this database .* rows=(\d+)")
METRIC = re.compile(r"^outbox_relay_results_dropped_total\{[^}]*\} (\S+)$", re.MULTILINE)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pair() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """A primary with a migrated ``chaos`` database and its streaming standby, both running."""
    primary = EmbeddedPostgres(fsync=False).start()
    standby: EmbeddedPostgres | None = None
    try:
        create_migrated_database(primary.url("postgres"), PRIVATE_DB, primary.url(PRIVATE_DB))
        standby = primary.standby().start()
        yield primary, standby
    finally:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()


@pytest.fixture
def ha(
    pair: tuple[EmbeddedPostgres, EmbeddedPostgres], sandbox: Sandbox, tmp_path: Path
) -> Iterator[Harness]:
    primary, standby = pair
    url = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{PRIVATE_DB}"
        "?target_session_attrs=read-write"
    )
    harness = Harness(url, sandbox, tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def _streaming(standby: EmbeddedPostgres) -> bool:
    probe = Probe(standby.url(PRIVATE_DB), "chaos-standby")
    try:
        return bool(probe.one("select count(*) = 1 from pg_stat_wal_receiver where status = 'streaming'"))
    finally:
        probe.close()


def _stop_replication(standby: EmbeddedPostgres) -> None:
    """The standby stops receiving WAL (and keeps what it has): from now on it lags."""
    probe = Probe(standby.url(), "chaos-standby")
    try:
        probe.execute("alter system set primary_conninfo = ''")
        probe.execute("select pg_reload_conf()")
        deadline = time.monotonic() + 10
        while probe.one("select count(*) from pg_stat_wal_receiver"):
            assert time.monotonic() < deadline, "the standby's WAL receiver did not stop"
            time.sleep(0.05)
    finally:
        probe.close()


def _promote(standby: EmbeddedPostgres, chaos: Harness) -> tuple[float, object]:
    """Promote; (monotonic time, the new primary's clock) just after."""
    standby.promote()
    promoted = time.monotonic()
    return promoted, chaos.probe.one("select now()")


def _first_delivery(chaos: Harness, since: float, db_since: object, timeout: float = 60.0) -> float:
    """Seconds from ``since`` until the new primary records a delivery made after ``db_since``."""
    sql = "select exists (select 1 from outbox.action_status_updates where delivered_at >= %s)"
    deadline = time.monotonic() + timeout
    while not chaos.probe.try_one(sql, (db_since,)):
        assert time.monotonic() < deadline, (
            f"no delivery on the new primary within {timeout:.0f} s:\n{chaos.log_tail(30)}"
        )
        time.sleep(0.02)
    return time.monotonic() - since


def _metric_dropped(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(v) for v in METRIC.findall(text))


def test_failover_to_a_promoted_standby_under_load(
    ha: Harness, pair: tuple[EmbeddedPostgres, EmbeddedPostgres], sandbox: Sandbox
) -> None:
    """The primary crashes (``immediate``) while the standby lags by ``LAG_S`` of load and
    requests are in flight; the standby is promoted ``DECIDE_S`` later.

    The API answers slowly for ``BACKLOG_S`` before the lag, so a backlog of pending rows
    reaches the standby; during the first half of the lag it answers at once, and the relay
    sends that backlog (the survivor holds those rows pending, the API has applied them); during
    the second half it answers slowly again, so requests for rows the standby never received
    are in flight when the primary crashes. Those rows are gone from the database; the relay
    drops the results it still held for them (one log line per write, counted in the metric),
    delivers everything the survivor holds, and each row the API had already applied from the
    old primary ends dead with the reason that says so (or delivered, when the survivor knew
    its request may have left)."""
    chaos = ha
    primary, standby = pair
    metrics_port = _free_port()
    relay = chaos.relay(
        "chaos-ha",
        RELAY_POLL_INTERVAL="5",
        RELAY_LEASE="4",
        RELAY_MAX_CONCURRENCY=str(CONCURRENCY),
        RELAY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
    )
    chaos.wait_listening(1)
    assert _streaming(standby)
    writer = chaos.start_writer(rate=RATE, seed=21)
    time.sleep(WARM_UP_S)
    sandbox.set_faults(Faults(latency=SLOW_ANSWER_S))
    time.sleep(BACKLOG_S)
    _stop_replication(standby)
    cut = writer.mark()  # rows above it never reach the standby
    sandbox.set_faults(Faults(latency=LATENCY))
    time.sleep(LAG_S / 2)
    sandbox.set_faults(Faults(latency=SLOW_ANSWER_S))
    time.sleep(LAG_S / 2)
    # Crash only once requests for rows the standby never received are on their way.
    sending = (
        "select count(*) from outbox.action_status_updates "
        "where id > %s and state = 'in_flight' and sending_at is not null"
    )
    deadline = time.monotonic() + 30
    while not chaos.probe.one(sending, (cut,)):
        assert time.monotonic() < deadline, (
            f"no request in flight for a row the standby lacks:\n{chaos.log_tail()}"
        )
        time.sleep(0.02)
    primary.stop("immediate")
    time.sleep(DECIDE_S)
    sandbox.set_faults(Faults(latency=LATENCY))
    promoted, db_promoted = _promote(standby, chaos)
    first_delivery = _first_delivery(chaos, promoted, db_promoted)
    time.sleep(AFTER_S)
    assert relay.alive
    dropped_metric = _metric_dropped(metrics_port)
    outcome = chaos.settle(survivor=True)
    log = relay.log_text()
    dropped = [int(n) for n in DROPPED.findall(log)]
    print(
        "\n"
        + outcome.line(
            "failover",
            not_held=len(outcome.not_held),
            dead_already_final=outcome.dead_already_final,
            dropped=sum(dropped),
            first_delivery_s=first_delivery,
            relay_restarts=relay.starts - 1,
            writer_failed_commits=writer.failed_commits,
        )
    )
    outcome.check(duplicates_allowed=True)
    assert relay.starts == 1  # the same process from start to end
    assert outcome.not_held, "the lagging standby holds every row: the scenario lost nothing to lose"
    assert outcome.dead_already_final > 0, "no row was sent during the lag: the scenario missed its case"
    # Results held for rows the survivor does not have: dropped, one line per write, counted.
    assert dropped and all(n > 0 for n in dropped), f"no 'results dropped' line:\n{log[-3000:]}"
    assert sum(dropped) <= len(outcome.not_held)
    assert dropped_metric == sum(dropped)
    assert "delivery_attempts_update_id_fkey" not in log
    # The promoted standby's sequence hands lost rows' ids to new rows: no attempt row of a lost
    # row may be recorded against the new row that took its id.
    mismatched = chaos.probe.one(
        "select count(*) from outbox.delivery_attempts d "
        "join outbox.action_status_updates u on u.id = d.update_id where d.action_id <> u.action_id"
    )
    assert mismatched == 0
    assert "one by one" not in log  # dropped in the statement, never refused and retried


def test_old_primary_back_read_only_is_never_written(
    ha: Harness, pair: tuple[EmbeddedPostgres, EmbeddedPostgres]
) -> None:
    """After a failover the old primary comes back read-only (nothing demoted it; it starts
    with ``default_transaction_read_only=on``) while the relay runs on the promoted standby.
    The relay's and the writer's sessions are cut meanwhile, so both walk the host list again
    with the old primary first: libpq skips it (``target_session_attrs=read-write``). Sampled
    every 0.1 s, no relay session ever runs a statement there, and no write refused as read-only
    ("cannot execute … in a read-only transaction") reaches the relay's log."""
    chaos = ha
    primary, standby = pair
    relay = chaos.relay("chaos-ha", RELAY_POLL_INTERVAL="5", RELAY_LEASE="4")
    chaos.wait_listening(1)
    assert _streaming(standby)
    chaos.start_writer(rate=RATE, seed=22)
    time.sleep(WARM_UP_S)
    primary.stop("immediate")
    time.sleep(DECIDE_S)
    promoted, db_promoted = _promote(standby, chaos)
    first_delivery = _first_delivery(chaos, promoted, db_promoted)
    primary.start(read_only=True)
    old = Probe(primary.url(PRIVATE_DB), "chaos-old-primary")
    assert old.one("show default_transaction_read_only") == "on"
    seen: list[str] = []

    def sample() -> int:
        rows = old.query(
            "select application_name from pg_stat_activity where application_name like %s and query <> ''",
            (RELAY_APP,),
        )
        seen.extend(str(r[0]) for r in rows)
        return 1

    sampler = Repeater(sample, 0.1, "chaos-old-primary-sampler").start()
    chaos.extras.append(sampler.stop)
    cut = chaos.terminate() + chaos.terminate(WRITER_APP)
    assert cut > 0
    walked_at, db_walked = time.monotonic(), chaos.probe.one("select now()")
    resumed = _first_delivery(chaos, walked_at, db_walked)
    time.sleep(READ_ONLY_S)
    sampler.stop()
    old.close()
    outcome = chaos.settle(survivor=True)
    log = relay.log_text()
    print(
        "\n"
        + outcome.line(
            "old_primary_read_only",
            not_held=len(outcome.not_held),
            dead_already_final=outcome.dead_already_final,
            first_delivery_s=first_delivery,
            resumed_after_cut_s=resumed,
            samples=sampler.calls,
            relay_statements_on_old_primary=len(seen),
            relay_restarts=relay.starts - 1,
        )
    )
    outcome.check(duplicates_allowed=True)
    assert sampler.calls >= 10
    assert seen == [], f"relay sessions ran statements on the read-only old primary: {sorted(set(seen))}"
    # libpq's "session is read-only" (a host skipped) may appear; a refused write may not.
    assert "read-only transaction" not in log, log[-3000:]
    assert relay.starts == 1
