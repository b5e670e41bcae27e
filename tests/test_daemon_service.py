"""The daemon as an operator sees it: /metrics and /healthz, and sd_notify in order."""

from __future__ import annotations

import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.dev.embedded import EmbeddedPostgres
from relay.dev.sandbox.server import Sandbox, SandboxConfig
from tests.relaykit import (
    create_migrated_database,
    relay_env,
    sample_updates,
    seed_rows,
    start_relay_process,
    states,
    wait_until,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A server of this test's own: it gets stopped."""
    pg = EmbeddedPostgres(fsync=False).start()
    try:
        create_migrated_database(pg.url("postgres"), "relay", pg.url("relay"))
        yield pg
    finally:
        pg.cleanup()


def test_metrics_move_during_a_drain_and_healthz_follows_the_database(
    own_pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    port = _free_port()
    url = own_pg.url("relay")
    with Sandbox(SandboxConfig()) as sb:
        env = relay_env(url, sb.url, RELAY_METRICS_LISTEN=f"127.0.0.1:{port}")
        proc = start_relay_process(env, tmp_path / "relay.log")
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: _get(base + "/healthz") == 200, 30), (
                tmp_path / "relay.log"
            ).read_text()
            before = _samples(httpx.get(base + "/metrics").text)
            assert before.get(("outbox_relay_delivered_total", (("target", "default"),)), 0.0) == 0.0
            seed_rows(url, sample_updates(300))
            assert wait_until(lambda: states(url).get("delivered") == 300, 60)
            after = _samples(httpx.get(base + "/metrics").text)
            assert after[("outbox_relay_delivered_total", (("target", "default"),))] == 300.0
            assert (
                after[("outbox_relay_requests_total", (("outcome", "delivered"), ("target", "default")))]
                == 300.0
            )
            assert after[("outbox_relay_commit_to_delivery_seconds_count", (("target", "default"),))] == 300.0
            assert after[("outbox_relay_last_drain_timestamp_seconds", ())] > 0

            own_pg.stop()
            assert wait_until(lambda: _get(base + "/healthz") == 503, 30)
            reason = httpx.get(base + "/healthz", timeout=15).text
            assert "database" in reason
            own_pg.start()
            assert wait_until(lambda: _get(base + "/healthz") == 200, 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=15).status_code
    except httpx.HTTPError:
        return 0


def test_sd_notify_messages_arrive_in_order(database_url: str, tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="notify-"))
    path = sock_dir / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(30)
    with Sandbox(SandboxConfig()) as sb:
        env = relay_env(database_url, sb.url, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="2000000")
        proc = start_relay_process(env, tmp_path / "relay.log")
        messages: list[str] = []
        try:
            while not any(m.startswith("WATCHDOG=1") for m in messages):
                messages.append(server.recv(4096).decode())
            proc.send_signal(signal.SIGTERM)
            while not any(m.startswith("STOPPING=1") for m in messages):
                messages.append(server.recv(4096).decode())
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            server.close()
    kinds = [m.split("=", 1)[0] for m in messages]
    assert kinds[0] == "READY", messages
    assert "STATUS=relaying for 1 target(s)" in messages[0]
    assert kinds.index("WATCHDOG") > 0
    assert kinds[-1] == "STOPPING"
    assert any(m.startswith("STATUS=delivered or dead-lettered") for m in messages)
