"""The relay behind PgBouncer in transaction mode, as an operator runs it: every command through
the pooler, the daemon polling without LISTEN or woken through ``listen_database_url``; and what
``check`` says about the connection. PgBouncer is the session's (``pgbouncer_server``, tests/pgbouncer.py);
the tests' own bookkeeping connects directly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from relay.dev.sandbox.server import Sandbox, SandboxConfig
from relay.pg.migrations import latest_version
from relay.pg.store import HealthProbe, Store
from relay.settings import Secret
from tests.pgbouncer import PgBouncer
from tests.relaykit import cli, relay_env, relay_processes, start_relay_process, states, wait_until

POLLING_LINE = re.compile(
    r"connection pooler: no LISTEN wake-ups; polling every poll_interval.*listen_database_url"
)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(seed=5)) as sb:
        yield sb


@pytest.fixture
def relays() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Relay processes the test started; any still running at the end are killed."""
    with relay_processes() as procs:
        yield procs


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def _scalar(url: str, sql: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return row[0] if row else None


def _state_of(url: str, action_id: str) -> str | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "select state from outbox.action_status_updates where action_id = %s", (action_id,)
        ).fetchone()
    return str(row[0]) if row else None


def _cli_process(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m relay ARGS`` started in the background, as :func:`tests.relaykit.cli` runs it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "relay", *args],
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _advisory_locks(url: str) -> int:
    return int(str(_scalar(url, "select count(*) from pg_locks where locktype = 'advisory'")))


# -- the session ---------------------------------------------------------------------------------
async def test_a_store_through_pgbouncer_sees_the_pooler_and_a_direct_one_does_not(
    database_url: str, bouncer_url: str
) -> None:
    for url, pooled in ((database_url, False), (bouncer_url, True)):
        store = Store(Secret(url), pool_size=2)
        try:
            for _ in range(12):  # past psycopg's prepare_threshold (5): prepared statements would break
                assert await store.schema_version() == latest_version()
            assert store.pooler is pooled
        finally:
            await store.close()


async def test_the_health_probe_works_through_pgbouncer_and_leaves_no_session_setting(
    database_url: str, bouncer_url: str
) -> None:
    """The probe's 2 s statement timeout is set inside its transaction: PgBouncer refuses the
    ``options`` startup parameter, and a session setting would stay on a pooled server connection."""
    for url in (database_url, bouncer_url):
        probe = HealthProbe(Secret(url))
        try:
            await probe.ping()
            await probe.ping()
            conn = probe._conn
            assert conn is not None
            timeout = await (await conn.execute("show statement_timeout")).fetchone()
            assert timeout == ("0",)
        finally:
            await probe.close()


def test_an_application_writes_through_pgbouncer_with_prepared_statements_off(
    database_url: str, bouncer_url: str
) -> None:
    """README "PgBouncer": the Python API on the application's own connections through the
    pooler, interleaved, past psycopg's prepare_threshold; one refused row rolls back alone."""
    import relay

    with (
        psycopg.connect(bouncer_url, prepare_threshold=None) as one,
        psycopg.connect(bouncer_url, prepare_threshold=None) as two,
    ):
        for i in range(10):
            for conn, name in ((one, "one"), (two, "two")):
                with conn.transaction():
                    relay.enqueue(conn, f"app-{name}-{i}", "SUCCESS")
        with pytest.raises(relay.InvalidUpdate), one.transaction():
            relay.enqueue(one, "app-bad", "FAILED", [])
    assert states(database_url) == {"pending": 20}


# -- every command through PgBouncer --------------------------------------------------------------
def test_the_operator_commands_and_the_daemon_work_through_pgbouncer(
    pgbouncer_server: PgBouncer,
    empty_database_url: str,
    sandbox: Sandbox,
    relays: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    direct = empty_database_url
    pooled = pgbouncer_server.url(direct)
    env = relay_env(pooled, sandbox.url, RELAY_POLL_INTERVAL="0.5", RELAY_LOG_LEVEL="INFO")

    # migrate: two runs at once, both through the pooler; no lock left on a server connection
    runs = [_cli_process("migrate", env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    applied = [line for out, _ in outputs for line in out.splitlines() if line.startswith("applied ")]
    assert len(applied) == latest_version()  # each migration applied once, by one of the two
    assert _scalar(direct, "select max(version) from outbox.schema_migrations") == latest_version()
    assert _advisory_locks(direct) == 0
    again = cli("migrate", env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing to apply" in again.stdout

    # enqueue (more rows than psycopg's prepare_threshold), one of them for an unknown action (dead)
    ids = [f"bounce-{i}" for i in range(8)]
    for action_id in [*ids, "unknown-1"]:
        done = cli("enqueue", action_id, "--status", "SUCCESS", env=env)
        assert done.returncode == 0, done.stderr

    # run: the daemon delivers through the pooler, polling (it says so once)
    log = tmp_path / "relay.log"
    relays.append(start_relay_process(env, log))
    assert wait_until(lambda: states(direct) == {"delivered": 8, "dead": 1}, 60, 0.2), (
        states(direct),
        log.read_text(),
    )
    late = cli("enqueue", "bounce-late", "--status", "SUCCESS", env=env)
    assert late.returncode == 0, late.stderr
    assert wait_until(lambda: _state_of(direct, "bounce-late") == "delivered", 30, 0.2), log.read_text()
    assert set(sandbox.applied) == {*ids, "bounce-late"}
    assert max(sandbox.apply_count.values()) == 1

    # status, audit
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert status.stderr == ""
    counts = {(t["target"], t["delivered_last_hour"]) for t in json.loads(status.stdout)["targets"]}
    assert counts == {("default", 9)}
    audit = cli("audit", "bounce-3", "--json", env=env)
    assert audit.returncode == 0, audit.stderr
    [entry] = json.loads(audit.stdout)["updates"]
    assert entry["update"]["state"] == "delivered"
    assert [a["outcome"] for a in entry["attempts"]] == ["delivered"]

    # dead retry: re-queued through the pooler; the polling daemon sends it again (404 again: dead)
    requeued = cli("dead", "retry", "unknown-1", "--reason", "through pgbouncer", env=env)
    assert requeued.returncode == 0, requeued.stderr
    assert "re-queued 1 dead update(s)" in requeued.stdout
    assert wait_until(
        lambda: (
            _scalar(
                direct,
                "select count(*) from outbox.delivery_attempts a join outbox.action_status_updates u "
                "on u.id = a.update_id where u.action_id = 'unknown-1'",
            )
            == 2
            and _state_of(direct, "unknown-1") == "dead"
        ),
        30,
        0.2,
    ), log.read_text()
    assert _stop(relays[0]) == 0
    text = log.read_text()
    assert len(POLLING_LINE.findall(text)) == 1, text
    assert re.search(r"polling every poll_interval.*poll_interval=500ms", text), text

    # purge: delivered rows made old, deleted through the pooler with their attempts
    with psycopg.connect(direct, autocommit=True) as conn:
        conn.execute(
            "update outbox.action_status_updates set delivered_at = now() - interval '40 days', "
            "created_at = now() - interval '41 days' where state = 'delivered'"
        )
    purged = cli("purge", "--older-than", "30d", "--batch-size", "4", env=env)
    assert purged.returncode == 0, purged.stderr
    assert "purged 9 delivered update(s)" in purged.stdout
    assert states(direct) == {"dead": 1}

    # check: the pooler and the polling are named
    checked = cli("check", env=env)
    assert checked.returncode == 0, checked.stderr
    port = pgbouncer_server.port
    assert f"ok  connection: 127.0.0.1:{port}, through a connection pooler" in checked.stdout
    assert "ok  LISTEN: none: database_url goes through a connection pooler" in checked.stdout
    assert "polls every 500ms (poll_interval)" in checked.stdout
    data = {c["name"]: c for c in json.loads(cli("check", "--json", env=env).stdout)["checks"]}
    assert data["connection"]["pooler"] is True
    assert data["connection"]["hosts"] == [f"127.0.0.1:{port}"]
    assert (data["listen"]["via"], data["listen"]["poll_interval_seconds"]) == ("none", 0.5)
    assert _advisory_locks(direct) == 0


# -- LISTEN on a direct connection -------------------------------------------------------------------
def test_a_relay_behind_pgbouncer_is_woken_through_listen_database_url(
    database_url: str,
    bouncer_url: str,
    sandbox: Sandbox,
    relays: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """poll_interval 5 min: a row enqueued after the first drain is delivered within seconds only
    if the NOTIFY reached the relay, on the direct listen_database_url connection."""
    env = relay_env(
        bouncer_url,
        sandbox.url,
        RELAY_POLL_INTERVAL="300",
        RELAY_LISTEN_DATABASE_URL=database_url,
        RELAY_LOG_LEVEL="INFO",
    )
    log = tmp_path / "relay.log"
    enqueued = cli("enqueue", "first", "--status", "SUCCESS", env=env)
    assert enqueued.returncode == 0, enqueued.stderr
    relays.append(start_relay_process(env, log))
    assert wait_until(lambda: _state_of(database_url, "first") == "delivered", 60, 0.1), log.read_text()
    assert wait_until(lambda: " ready" in log.read_text(), 30, 0.1), log.read_text()
    for i in range(3):  # each row is sent long before the next poll (5 min away)
        action_id = f"woken-{i}"
        enqueued = cli("enqueue", action_id, "--status", "SUCCESS", env=env)
        assert enqueued.returncode == 0, enqueued.stderr
        assert wait_until(lambda a=action_id: _state_of(database_url, a) == "delivered", 30, 0.05), (
            log.read_text()
        )
    assert _stop(relays[0]) == 0
    assert not POLLING_LINE.search(log.read_text())
    listener = conninfo_to_dict(database_url)
    checked = cli("check", "--json", env=env)
    assert checked.returncode == 0, checked.stderr
    listen = {c["name"]: c for c in json.loads(checked.stdout)["checks"]}["listen"]
    assert listen["ok"] is True
    assert (listen["via"], listen["hosts"]) == (
        "listen_database_url",
        [f"{listener['host']}:{listener['port']}"],
    )
    assert listen["detail"] == (
        f"LISTEN works on a connection of its own on listen_database_url "
        f"({listener['host']}:{listener['port']}) (wake-ups)"
    )


# -- the listen_database_url setting ---------------------------------------------------------------
def test_listen_database_url_comes_from_its_variable_its_file_or_the_config_file(tmp_path: Path) -> None:
    from relay.settings import load_settings

    secret_file = tmp_path / "listen-url"
    secret_file.write_text("postgresql://relay:from-file@db-file/app\n")
    secret_file.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text('listen_database_url = "postgresql://relay@db-config/app"\n')
    base = {"RELAY_DATABASE_URL": "postgresql://relay@pgbouncer:6432/app"}

    def listen_url(env: dict[str, str], path: Path | None = None) -> str | None:
        settings = load_settings(str(path) if path else None, {**base, **env})
        return settings.listen_database_url.reveal() if settings.listen_database_url else None

    assert listen_url({}) is None
    assert listen_url({}, config) == "postgresql://relay@db-config/app"
    assert listen_url({"RELAY_LISTEN_DATABASE_URL_FILE": str(secret_file)}, config) == (
        "postgresql://relay:from-file@db-file/app"
    )
    assert (
        listen_url(
            {
                "RELAY_LISTEN_DATABASE_URL": "postgresql://relay@db-env/app",
                "RELAY_LISTEN_DATABASE_URL_FILE": str(secret_file),
            },
            config,
        )
        == "postgresql://relay@db-env/app"
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "listen-database-url").write_text("postgresql://relay@db-credential/app\n")
    assert listen_url({"CREDENTIALS_DIRECTORY": str(credentials)}) == "postgresql://relay@db-credential/app"


def test_a_bad_listen_database_url_is_one_line_and_exit_2_without_the_password(tmp_path: Path) -> None:
    env = {"RELAY_DATABASE_URL": "postgresql://relay@127.0.0.1:1/app"}
    bad = cli("check", env={**env, "RELAY_LISTEN_DATABASE_URL": "mysql://relay:s3cret-pw@db/app"})
    assert bad.returncode == 2
    assert bad.stderr.startswith("outbox-relay: RELAY_LISTEN_DATABASE_URL: expected postgresql://")
    assert len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "s3cret-pw" not in bad.stdout + bad.stderr
    open_file = tmp_path / "listen-url"
    open_file.write_text("postgresql://relay:s3cret-pw@db/app\n")
    open_file.chmod(0o644)
    refused = cli("run", env={**env, "RELAY_LISTEN_DATABASE_URL_FILE": str(open_file)})
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        f"outbox-relay: RELAY_LISTEN_DATABASE_URL_FILE: {open_file} has mode 0644"
    )
    config = tmp_path / "config.toml"
    config.write_text('listen_database_url = "postgresql://relay:s3cret-pw@db/app"\n')
    config.chmod(0o644)
    inline = cli("check", "--config", str(config), env=env)
    assert inline.returncode == 2
    assert "holds the secret listen_database_url inline" in inline.stderr
    assert "s3cret-pw" not in refused.stderr + inline.stdout + inline.stderr


def test_check_names_the_listen_connection_it_could_not_open_without_its_password(database_url: str) -> None:
    env = {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_API_TOKEN": "static-secret-token",
        "RELAY_LISTEN_DATABASE_URL": "postgresql://relay:s3cret-pw@127.0.0.1:1/app",
    }
    result = cli("check", env=env)
    assert result.returncode == 1
    [failed] = [line for line in result.stderr.splitlines() if line.startswith("FAIL ")]
    assert failed.startswith("FAIL LISTEN connection on listen_database_url (127.0.0.1:1): database error:")
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_a_listen_database_url_through_the_pooler_is_refused_by_check_and_the_relay_polls(
    database_url: str,
    bouncer_url: str,
    pgbouncer_server: PgBouncer,
    sandbox: Sandbox,
    relays: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A LISTEN through PgBouncer is accepted and then hears nothing: check fails (exit 2) and
    names the setting; the daemon says so once and polls."""
    env = relay_env(
        bouncer_url,
        sandbox.url,
        RELAY_POLL_INTERVAL="0.5",
        RELAY_LISTEN_DATABASE_URL=bouncer_url,
        RELAY_API_TOKEN="sandbox-token",
    )
    checked = cli("check", env=env)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert (
        f"FAIL LISTEN connection on listen_database_url (127.0.0.1:{pgbouncer_server.port}): "
        "listen_database_url goes through a connection pooler: LISTEN needs a direct connection"
    ) in checked.stderr
    log = tmp_path / "relay.log"
    relays.append(start_relay_process(env, log))
    for action_id in ("polled-1", "polled-2"):
        assert cli("enqueue", action_id, "--status", "SUCCESS", env=env).returncode == 0
    assert wait_until(lambda: states(database_url) == {"delivered": 2}, 60, 0.1), log.read_text()
    assert _stop(relays[0]) == 0
    text = log.read_text()
    assert text.count("no LISTEN wake-ups; polling every poll_interval") == 1, text
    assert "listen_database_url goes through a connection pooler" in text
