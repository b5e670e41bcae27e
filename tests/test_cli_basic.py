"""The command line's foundation: migrate, enqueue, configuration errors (run as a user would)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.relaykit import cli


def test_migrate_creates_the_schema_then_changes_nothing(empty_database_url: str) -> None:
    env = {"RELAY_DATABASE_URL": empty_database_url}
    first = cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_outbox.sql" in first.stdout
    second = cli("migrate", env=env)
    assert second.returncode == 0
    assert "nothing to apply" in second.stdout
    dry = cli("migrate", "--dry-run", env=env)
    assert dry.returncode == 0 and "up to date" in dry.stdout


def test_enqueue_writes_a_row_and_refuses_bad_ones_with_exit_2(database_url: str) -> None:
    env = {"RELAY_DATABASE_URL": database_url}
    ok = cli("enqueue", "act/1?x", "--status", "FAILED", "--error", "OTHER=out of stock", env=env)
    assert ok.returncode == 0, ok.stderr
    bad = cli("enqueue", "act-2", "--status", "FAILED", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "outbox-relay: FAILED requires at least one error"
    unknown = cli("enqueue", "act-3", "--status", "FAILED", "--error", "OUT_OF_STOK=x", env=env)
    assert unknown.returncode == 2
    assert 'unknown error code "OUT_OF_STOK"' in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    conflict = cli("enqueue", "act/1?x", "--status", "SUCCESS", env=env)
    assert conflict.returncode == 2
    assert 'action "act/1?x" already has a different outcome' in conflict.stderr
    assert "its status is FAILED, not SUCCESS" in conflict.stderr
    reworded = cli("enqueue", "act/1?x", "--status", "FAILED", "--error", "OTHER=sold out", env=env)
    assert reworded.returncode == 2
    assert reworded.stderr.strip().splitlines() == [
        'outbox-relay: action "act/1?x" already has a different outcome queued for target "default": '
        "the same status (FAILED) with different errors"
    ]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("select action_id, status, errors from outbox.action_status_updates").fetchall()
    assert rows == [("act/1?x", "FAILED", [{"code": "OTHER", "message": "out of stock"}])]


def test_bad_configuration_is_one_line_and_exit_2(tmp_path: object) -> None:
    cases = [
        ({"RELAY_BATCH_SIZE": "zero"}, "RELAY_BATCH_SIZE: "),
        ({"RELAY_API_BASE_URL": "http://api.example.com"}, "plain http:// is refused"),
        ({"RELAY_RETRY_MAX_DELAY": "soon"}, "RELAY_RETRY_MAX_DELAY: "),
        ({"RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT: "),
        ({"RELAY_CONFIG": "/nonexistent/relay.toml"}, "/nonexistent/relay.toml"),
    ]
    for env, words in cases:
        result = cli("migrate", env=env)
        assert result.returncode == 2, (env, result.stderr)
        assert words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr


def test_no_database_configured_is_a_config_error() -> None:
    result = cli("migrate")
    assert result.returncode == 2
    assert "RELAY_DATABASE_URL" in result.stderr


def test_unreachable_database_is_exit_1_and_hides_the_password() -> None:
    result = cli("migrate", env={"RELAY_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/x"})
    assert result.returncode == 1
    assert "hunter2" not in result.stderr and "hunter2" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_teaches() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "outbox-relay demo" in result.stdout and "RELAY_DATABASE_URL" in result.stdout
    usage = cli("enqueue", "x")
    assert usage.returncode == 2 and "--status" in usage.stderr


def test_config_goes_before_or_after_the_command(database_url: str, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'database_url = "{database_url}"\n', encoding="utf-8")
    for args in (
        ["--config", str(config), "status", "--json"],
        ["status", "--json", "--config", str(config)],
        ["dead", "list", "--config", str(config)],
        ["--config", "/no/such/file.toml", "status", "--config", str(config)],  # the later one wins
    ):
        result = cli(*args)
        assert result.returncode == 0, (args, result.stderr)
    lazy = cli("demo", "--stop", str(tmp_path), "--config", str(config))  # a lazily loaded command
    assert lazy.returncode == 2 and "unrecognized arguments" not in lazy.stderr
    assert "not a folder made by `outbox-relay demo`" in lazy.stderr
    missing = cli("status", "--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"outbox-relay: config file {tmp_path / 'missing.toml'}: ")


@pytest.mark.parametrize("args", [["web", "--new-token"], ["man"], ["completion", "bash"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(args: list[str]) -> None:
    """`outbox-relay ... | head`: when the reader has gone, the command stops with 141 (what a
    shell shows for SIGPIPE) and says nothing on stderr (it used to print `[Errno 32] Broken pipe`)."""
    import shlex

    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "relay", *args])
    done = subprocess.run(
        ["bash", "-c", f'{command} | true; echo "rc=${{PIPESTATUS[0]}}"'],
        capture_output=True,
        text=True,
        env=base,
        timeout=60,
    )
    assert done.stderr == ""
    assert done.stdout.strip() == "rc=141"  # `true` has exited before Python even started writing
