"""A paused target as the operator sees it: one log line per change, ``status`` current at once,
probes that back off, and a reason that reads as the API wrote it.

The relay runs as ``python -m relay run`` (its log is what an operator reads) against the sandbox
on loopback, with a static token read from a file: the sandbox refuses it with its
``missing, invalid or expired bearer token``, and writing the right token into the file (as an
operator rotating it would) lets the next probe through.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from pathlib import Path

import pytest

from relay.dev.sandbox.server import DEFAULT_TOKEN, Sandbox, SandboxConfig
from relay.service.daemon import HEARTBEAT_SECONDS
from tests.relaykit import cli, relay_env, sample_updates, seed_rows, start_relay_process, states, until


def status_of(database_url: str) -> dict[str, object]:
    result = cli("status", "--json", env={"RELAY_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    targets: dict[str, dict[str, object]] = {t["target"]: t for t in json.loads(result.stdout)["targets"]}
    return targets.get("default", {})


def lines(log_path: Path, text: str) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if text in line]


@pytest.mark.timeout(150)
async def test_a_refused_token_is_one_pause_in_the_log_shown_by_status_at_once_and_probed_less_and_less(
    database_url: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text("revoked-0123456789")
    token_file.chmod(0o600)
    config = tmp_path / "relay.toml"
    # Probes after 1 s, then 2, 4, 8 s (max_open_for), each a second after the pause ends (the
    # row that probes is due then): gaps of 2, 3, 5, 9 s. A fixed period would give 2, 2, 2, 2.
    config.write_text('[breaker]\nopen_for = "1s"\nmax_open_for = "8s"\n')
    log_path = tmp_path / "relay.log"
    with Sandbox(SandboxConfig(seed=1)) as sb:
        env = relay_env(
            database_url,
            sb.url,
            RELAY_CONFIG=str(config),
            RELAY_API_TOKEN_FILE=str(token_file),
            RELAY_LOG_LEVEL="INFO",
            RELAY_POLL_INTERVAL="0.1",
        )
        del env["RELAY_API_TOKEN"]
        await asyncio.to_thread(seed_rows, database_url, sample_updates(1, prefix="refused"))
        proc = start_relay_process(env, log_path)
        try:
            await until(lambda: bool(lines(log_path, "target paused")), 30, "the pause in the log")

            # The heartbeat writes outbox.relay_targets every 10 s; the pause shows well before.
            async def status_says(paused: bool) -> bool:
                return (await asyncio.to_thread(status_of, database_url)).get("paused") is paused

            await until(lambda: status_says(True), HEARTBEAT_SECONDS / 2, "`status` to show the pause")

            def put_times() -> list[float]:
                return [r.time for r in list(sb.requests) if r.method == "PUT"]

            await until(lambda: len(put_times()) >= 4, 40, "three probes after the first refusal")
            refused = put_times()
            assert all(r.status == 401 for r in list(sb.requests) if r.method == "PUT")

            token_file.write_text(DEFAULT_TOKEN)  # the operator puts the right token in place
            await until(lambda: bool(lines(log_path, "target resumed")), 40, "the target to resume")
            await until(lambda: status_says(False), HEARTBEAT_SECONDS / 2, "`status` to show it serving")
            assert await asyncio.to_thread(states, database_url) == {"delivered": 1}
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, log_path.read_text()

    # One line per change: paused (ERROR, with the API's words unmasked), then resumed.
    paused = lines(log_path, "target paused")
    assert len(paused) == 1, paused
    assert " ERROR " in paused[0]
    assert "missing, invalid or expired bearer token: credentials refused" in paused[0], paused[0]
    assert "***" not in paused[0]
    assert len(lines(log_path, "target resumed")) == 1
    assert not [
        line for line in log_path.read_text().splitlines() if " ERROR " in line and line not in paused
    ]
    # Probes back off: each gap longer than the one before.
    gaps = [b - a for a, b in itertools.pairwise(refused)][:3]
    assert len(gaps) == 3 and all(later > earlier + 0.5 for earlier, later in itertools.pairwise(gaps)), gaps
