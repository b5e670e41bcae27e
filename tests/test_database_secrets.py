"""A database password with URL-special characters works for every connection (LISTEN included)
and never appears in any output: percent-encoded in RELAY_DATABASE_URL, decoded exactly once.

The server here checks passwords (scram-sha-256 over TCP); the session's server trusts everyone.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import psycopg
import pytest

from relay.dev.embedded import EmbeddedPostgres
from relay.dev.sandbox.server import Sandbox, SandboxConfig
from tests.relaykit import cli, create_migrated_database, relay_env, seed_rows, start_relay_process, states

PASSWORDS = {
    "space": "change me now",
    "percent": "100%pure%20",
    "hash": "pass#word#1",
    "question": "pass?word?1",
    "ampersand": "pass&word&1",
    "equals": "pass=word=1",
    "at": "pass@word@1",
    "slash": "pass/word/1",
    "colon": "pass:word:1",
    "non-ascii": "pässwörd-ñ",
    "quotes": 'it\'s a \\ "pass"',
}


def _forms(password: str) -> set[str]:
    return {password, quote(password, safe=""), quote(password), quote_plus(password)}


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(fsync=False)
    pg.init()
    (pg.data_dir / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n",
        encoding="utf-8",
    )
    pg.start()
    try:
        create_migrated_database(pg.url("postgres"), "relay", pg.url("relay"))
        with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
            for n, password in enumerate(PASSWORDS.values()):
                conn.execute(
                    psycopg.sql.SQL("create role {} login superuser password {}").format(
                        psycopg.sql.Identifier(f"relay_{n}"), psycopg.sql.Literal(password)
                    )
                )
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(seed=5)) as sb:
        yield sb


def _url(pg: EmbeddedPostgres, name: str, password: str) -> str:
    n = list(PASSWORDS).index(name)
    return f"postgresql://relay_{n}:{quote(password, safe='')}@127.0.0.1:{pg.port}/relay"


def _wait_for(predicate: object, timeout: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _no_password(text: str, password: str) -> None:
    for form in _forms(password):
        assert form not in text


@pytest.mark.parametrize("name", list(PASSWORDS))
def test_listen_works_and_the_password_never_shows(
    server: EmbeddedPostgres, sandbox: Sandbox, tmp_path: Path, name: str
) -> None:
    password = PASSWORDS[name]
    url = _url(server, name, password)
    env = relay_env(
        url, sandbox.url, RELAY_POLL_INTERVAL="60s", RELAY_LOG_LEVEL="INFO", RELAY_LOG_FORMAT="json"
    )
    checked = cli("check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "database reachable" in checked.stdout
    admin = server.url("relay")
    log = tmp_path / "relay.log"
    started = time.monotonic()
    proc = start_relay_process(env, log)
    try:
        assert _wait_for(lambda: '"msg": "ready"' in log.read_text(encoding="utf-8"), 30), log.read_text()
        # the first drain runs at start; this row is delivered by it or by the NOTIFY it sends
        seed_rows(admin, [(f"{name}-1", "SUCCESS", [])])
        assert _wait_for(lambda: states(admin).get("delivered", 0) >= 1, 20)
        # the first drain is over; the next poll is 60 s after start: only NOTIFY can deliver this one
        seed_rows(admin, [(f"{name}-2", "SUCCESS", [])])
        assert _wait_for(lambda: states(admin).get("delivered", 0) >= 2, 25)
        assert time.monotonic() - started < 55  # before the first poll after start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    output = log.read_text(encoding="utf-8")
    assert "LISTEN connection lost" not in output
    assert proc.returncode == 0, output
    _no_password(output + checked.stdout + checked.stderr, password)


@pytest.mark.parametrize("name", ["space", "percent", "at", "non-ascii"])
def test_a_wrong_password_is_reported_without_it(server: EmbeddedPostgres, tmp_path: Path, name: str) -> None:
    wrong = PASSWORDS[name] + "-wrong"
    url = _url(server, name, wrong)
    env = relay_env(url, "http://127.0.0.1:9", RELAY_LOG_LEVEL="INFO")
    checked = cli("check", env=env)
    assert checked.returncode == 1
    assert "password authentication failed" in checked.stderr
    migrated = cli("migrate", env=env)
    assert migrated.returncode == 1 and "password authentication failed" in migrated.stderr
    log = tmp_path / "relay.log"
    proc = start_relay_process(env, log)
    try:
        assert _wait_for(lambda: "waiting for the database" in log.read_text(encoding="utf-8"), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    output = (
        log.read_text(encoding="utf-8") + checked.stdout + checked.stderr + migrated.stdout + migrated.stderr
    )
    assert "password authentication failed" in output
    for password in (wrong, PASSWORDS[name]):
        _no_password(output, password)


def test_an_unreachable_host_is_reported_without_the_password(tmp_path: Path) -> None:
    password = PASSWORDS["space"]
    url = f"postgresql://relay:{quote(password, safe='')}@127.0.0.1:1/relay?connect_timeout=2"
    env = relay_env(url, "http://127.0.0.1:9", RELAY_LOG_LEVEL="INFO")
    checked = cli("check", env=env)
    migrated = cli("migrate", env=env)
    log = tmp_path / "relay.log"
    proc = start_relay_process(env, log)
    try:
        assert _wait_for(lambda: "waiting for the database" in log.read_text(encoding="utf-8"), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert checked.returncode == 1 and "database unreachable" in checked.stderr
    assert migrated.returncode == 1 and "127.0.0.1" in migrated.stderr
    _no_password(log.read_text(encoding="utf-8") + checked.stderr + migrated.stderr, password)


def test_the_old_round_trip_would_have_broken_the_password() -> None:
    """Why the URL is never re-rendered: SQLAlchemy's rendering leaves a space or '%' as is, which
    libpq then decodes again."""
    from sqlalchemy.engine import make_url

    from relay.pg.store import libpq_conninfo
    from relay.settings import Secret

    url = "postgresql://u:" + quote("100%pure%20 x", safe="") + "@db/app"
    rendered = make_url(url).render_as_string(hide_password=False)
    try:
        broken = psycopg.conninfo.conninfo_to_dict(rendered).get("password")
    except psycopg.ProgrammingError as exc:  # libpq refuses it, quoting the password in its message
        broken = None
        assert "pure" in str(exc)
    assert broken != "100%pure%20 x"
    assert psycopg.conninfo.conninfo_to_dict(libpq_conninfo(Secret(url)))["password"] == "100%pure%20 x"
