"""What the daemon writes to the journal: a progress line while rows move (none while idle), a
failed start that says it failed, no APScheduler timing noise on a slow start, and a metrics
address that is taken named by its setting.

The daemon runs in this event loop where the test needs a shorter progress interval (an internal
constructor argument) or a busy start; as ``outbox-relay run`` in a subprocess where the operator's
view is its exit code and output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent

from relay.dev.sandbox.server import Sandbox, SandboxConfig
from relay.service.daemon import Relay
from relay.service.logs import TextFormatter
from relay.settings import load_settings
from tests.relaykit import cli, relay_env, relay_settings, sample_updates, seed_rows, states, until

NO_API = "http://127.0.0.1:9"


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[None]:
    """``relay.run()`` in this event loop, stopped (and awaited) on the way out."""
    task = asyncio.create_task(relay.run())

    def started() -> bool:
        if task.done():
            task.result()
            raise AssertionError("the relay stopped on its own")
        return relay.scheduler.running and relay.listening.is_set()

    try:
        await until(started, 20, "the relay to start")
        yield
    finally:
        relay.stop_event.set()
        await asyncio.wait_for(task, 30)


def job_runs(relay: Relay, job_id: str) -> list[float]:
    """A list that grows by one each time the scheduler finishes running ``job_id``."""
    runs: list[float] = []

    def listener(event: JobExecutionEvent) -> None:
        if event.job_id == job_id:
            runs.append(time.monotonic())

    relay.scheduler.add_listener(listener, EVENT_JOB_EXECUTED)
    return runs


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relay.daemon" and r.getMessage() == "progress"]


# -- progress --------------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_a_progress_line_when_rows_moved_and_none_while_idle(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.daemon")
    with Sandbox(SandboxConfig(seed=1)) as sb:
        relay = Relay(relay_settings(database_url, sb.url), progress_every=0.2)
        runs = job_runs(relay, "progress")
        async with running(relay):
            await until(lambda: len(runs) >= 3, 20, "the progress job to run while idle")
            assert progress_lines(caplog) == []

            await asyncio.to_thread(seed_rows, database_url, sample_updates(30, prefix="progress"))
            await until(
                lambda: sum(r.__dict__["delivered"] for r in progress_lines(caplog)) == 30,
                30,
                "progress lines counting the 30 rows delivered",
            )
            seen, ran = len(progress_lines(caplog)), len(runs)
            await until(lambda: len(runs) >= ran + 3, 20, "the progress job to run while idle again")
            assert len(progress_lines(caplog)) == seen

    assert states(database_url) == {"delivered": 30}
    records = progress_lines(caplog)
    assert all(r.levelno == logging.INFO for r in records)
    assert sum(r.__dict__["dead"] for r in records) == 0
    last = records[-1]
    # The backlog is read from PostgreSQL when the line is written: rows the engine has just
    # settled may not be recorded yet, so the last line may still count some of them pending.
    assert 0 <= last.__dict__["pending"] <= 30, last.__dict__
    line = TextFormatter().format(last)
    assert re.search(
        r" INFO relay\.daemon progress delivered=\d+ dead=0 pending=\d+ oldest_pending=\S+$",
        line,
    ), line


# -- failed starts ---------------------------------------------------------------------------
def test_a_failed_start_logs_the_failure_not_a_clean_stop(empty_database_url: str) -> None:
    result = cli("run", env=relay_env(empty_database_url, NO_API, RELAY_LOG_LEVEL="INFO"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r" ERROR relay\.daemon start failed error=.*outbox-relay migrate", result.stderr), (
        result.stderr
    )
    assert " stopped " not in result.stderr and "delivered_or_dead" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("outbox-relay: schema is at version 0")


def test_a_taken_metrics_address_names_metrics_listen_and_exits_2(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            "run",
            env=relay_env(
                database_url, NO_API, RELAY_LOG_LEVEL="INFO", RELAY_METRICS_LISTEN=f"127.0.0.1:{port}"
            ),
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"outbox-relay: metrics_listen 127.0.0.1:{port}: address already in use"
        " (another process listens there: stop it or choose another port)"
    )
    assert " stopped " not in result.stderr


# -- APScheduler on a slow start ---------------------------------------------------------------
def test_every_job_runs_late_rather_than_being_skipped(tmp_path: Path) -> None:
    settings = load_settings(
        None, {"RELAY_DATABASE_URL": "postgresql://x@127.0.0.1/x", "RELAY_RETENTION": "30d"}
    )

    async def jobs() -> list[tuple[str, object, bool]]:
        relay = Relay(settings)
        relay.add_jobs()
        relay.scheduler.start(paused=True)  # the jobs as the scheduler holds them, none run
        found = [(j.id, j.misfire_grace_time, j.coalesce) for j in relay.scheduler.get_jobs()]
        relay.scheduler.shutdown(wait=False)
        await relay.store.close()
        return found

    found = asyncio.run(jobs())
    assert sorted(job for job, _, _ in found) == [
        "drain",
        "heartbeat",
        "maintenance",
        "progress",
        "purge",
        "share",
    ]
    assert all(grace is None and coalesce for _, grace, coalesce in found), found


class _Slow(logging.Handler):
    """Holds the event loop for ``seconds`` when the daemon logs ``ready``: after the jobs were
    added, before the scheduler starts, as a slow start would."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.held = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "relay.daemon" and record.getMessage() == "ready":
            time.sleep(self.seconds)
            self.held = True


@pytest.mark.timeout(60)
async def test_a_slow_start_logs_nothing_about_missed_jobs(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="apscheduler")
    caplog.set_level(logging.INFO, logger="relay.daemon")  # the slow handler sees "ready"
    relay = Relay(relay_settings(database_url, NO_API))
    heartbeats = job_runs(relay, "heartbeat")
    slow = _Slow(2.0)  # APScheduler's default grace is 1 s
    logging.getLogger("relay.daemon").addHandler(slow)
    try:
        async with running(relay):
            await until(lambda: len(heartbeats) >= 1, 20, "the first heartbeat")
    finally:
        logging.getLogger("relay.daemon").removeHandler(slow)
    assert slow.held, "the start was not slowed down"
    noise = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("apscheduler") and "missed" in r.getMessage()
    ]
    assert noise == []
