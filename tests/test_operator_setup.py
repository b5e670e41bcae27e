"""The operator's first steps, run as the README gives them: migrate as a database owner that may
not create roles, create the roles as a superuser, `check` (with and without --probe), and the
errors a user without the right role meets in `run`, `check` and `enqueue`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from relay.dev.embedded import EmbeddedPostgres
from relay.dev.sandbox.server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Sandbox, SandboxConfig
from relay.pg.migrations import latest_version
from tests.conftest import Server
from tests.relaykit import cli, relay_env

GROUPS = ("outbox_writer", "outbox_relay", "outbox_operator", "outbox_auditor")


def url_as(url: str, login: str) -> str:
    return make_url(url).set(username=login, password="not-a-secret").render_as_string(hide_password=False)


# -- a cluster without the group roles ---------------------------------------------------------
@pytest.fixture(scope="module")
def bare() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of its own: the shared one has the group roles already."""
    pg = EmbeddedPostgres(fsync=False).start()
    try:
        yield pg
    finally:
        pg.cleanup()


def test_roles_the_owner_cannot_create_are_named_with_the_statements_that_create_them(
    bare: EmbeddedPostgres,
) -> None:
    admin = bare.url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("create role app_owner login password 'not-a-secret' nocreaterole")
        conn.execute("create database shop owner app_owner")
    owner = {"RELAY_DATABASE_URL": url_as(bare.url("shop"), "app_owner"), "RELAY_API_TOKEN": "t0ken"}

    migrated = cli("migrate", env=owner)
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema is at version {latest_version()}" in migrated.stdout
    stderr = migrated.stderr.splitlines()
    for role in GROUPS:  # PostgreSQL's own notices, as the migrations raise them
        notice = f"outbox-relay: PostgreSQL NOTICE: role {role} does not exist and app_owner may not create it; ask a DBA"
        assert notice in stderr
    assert stderr[-2:] == [
        "outbox-relay: role(s) outbox_writer, outbox_relay, outbox_operator, outbox_auditor do not exist, "
        "so nothing is granted to them: their members would get `permission denied for schema outbox`",
        'outbox-relay: as a superuser, run the "Group roles" block of schema/schema.sql in this database '
        "(it creates the roles and their grants): outbox-relay migrate --roles-sql | psql -d shop",
    ]

    checked = cli("check", env=owner)
    assert checked.returncode == 2
    assert checked.stderr.splitlines() == [
        "FAIL roles missing: outbox_writer, outbox_relay, outbox_operator, outbox_auditor; as a superuser, "
        'run `outbox-relay migrate --roles-sql | psql -d shop` (README "Roles")'
    ]
    assert "ok  schema up to date" in checked.stdout

    # A DBA created outbox_relay by hand and gave it to the relay's user, but ran no grants.
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("create role outbox_relay nologin")
        conn.execute("create role relay_svc login password 'not-a-secret' in role outbox_relay")
    relay = {**owner, "RELAY_DATABASE_URL": url_as(bare.url("shop"), "relay_svc")}
    ungranted = cli("check", env=relay)
    assert ungranted.returncode == 2
    failures = ungranted.stderr.splitlines()
    assert failures[0].startswith("FAIL schema: permission denied for schema outbox: relay_svc needs")
    assert failures[1].startswith("FAIL roles missing: outbox_writer, outbox_operator, outbox_auditor;")
    assert failures[2] == (
        "FAIL privileges: relay_svc lacks delete on outbox.relay_targets, execute on "
        "outbox.ensure_attempt_partitions, execute on outbox.rollup_reports "
        "and 12 more: relay_svc is a member of outbox_relay, which was never granted them: as a superuser, "
        "run `outbox-relay migrate --roles-sql | psql -d shop`"
    )

    # The superuser runs exactly what migrate printed, in that database.
    block = cli("migrate", "--roles-sql", env=owner)
    assert block.returncode == 0 and block.stdout.startswith("-- Group roles")
    with psycopg.connect(bare.url("shop"), autocommit=True) as conn:
        conn.execute(block.stdout.encode())

    fixed = cli("check", env=relay)
    assert fixed.returncode == 0, fixed.stderr
    assert "ok  roles outbox_writer, outbox_relay, outbox_operator, outbox_auditor exist" in fixed.stdout
    assert (
        "ok  privileges: relay_svc may do what the relay does (is a member of outbox_relay)" in fixed.stdout
    )
    again = cli("migrate", env=owner)
    assert again.returncode == 0 and again.stderr == "", again.stderr


# -- a user without the role it needs ----------------------------------------------------------
@pytest.fixture(scope="module")
def outsiders(pg_server: Server) -> Iterator[dict[str, str]]:
    """Login roles: ``none`` belongs to no group role, ``relay`` only to outbox_relay."""
    tag = uuid.uuid4().hex[:8]
    names = {"none": f"t_nobody_{tag}", "relay": f"t_relaysvc_{tag}"}
    with psycopg.connect(pg_server.admin_url, autocommit=True) as admin:
        admin.execute(f"create role {names['none']} login password 'not-a-secret'")
        admin.execute(f"create role {names['relay']} login password 'not-a-secret' in role outbox_relay")
    try:
        yield names
    finally:
        with psycopg.connect(pg_server.admin_url, autocommit=True) as admin:
            for name in names.values():
                admin.execute(f"drop role if exists {name}")


def test_run_without_outbox_relay_stops_at_once_naming_the_grant(
    database_url: str, outsiders: dict[str, str]
) -> None:
    user = outsiders["none"]
    env = relay_env(url_as(database_url, user), "http://127.0.0.1:9")
    result = cli("run", env=env, timeout=60)  # it used to wait for the database forever
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"outbox-relay: permission denied for schema outbox: {user} needs the outbox_relay role: "
        f'grant outbox_relay to {user} (as a superuser; README "Roles")'
    )


def test_check_names_the_grant_the_relays_user_lacks(database_url: str, outsiders: dict[str, str]) -> None:
    user = outsiders["none"]
    env = {"RELAY_DATABASE_URL": url_as(database_url, user), "RELAY_API_TOKEN": "t0ken"}
    result = cli("check", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"FAIL schema: permission denied for schema outbox: {user} needs the outbox_relay role: "
        f'grant outbox_relay to {user} (as a superuser; README "Roles")',
        f"FAIL privileges: {user} lacks delete on outbox.relay_targets, execute on "
        "outbox.ensure_attempt_partitions, execute on outbox.rollup_reports and 12 more: "
        f'grant outbox_relay to {user} (as a superuser; README "Roles")',
    ]
    member = cli("check", env={**env, "RELAY_DATABASE_URL": url_as(database_url, outsiders["relay"])})
    assert member.returncode == 0, member.stderr
    assert (
        f"ok  privileges: {outsiders['relay']} may do what the relay does (is a member of outbox_relay)"
        in (member.stdout)
    )


def test_enqueue_as_the_relays_user_names_outbox_writer(database_url: str, outsiders: dict[str, str]) -> None:
    user = outsiders["relay"]
    result = cli(
        "enqueue", "act-1", "--status", "SUCCESS", env={"RELAY_DATABASE_URL": url_as(database_url, user)}
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"outbox-relay: permission denied for function enqueue_action_status: {user} needs the outbox_writer "
        f'role: grant outbox_writer to {user} (as a superuser; README "Roles")'
    ]


# -- check --probe --------------------------------------------------------------------------------
def test_check_probe_proves_the_token_and_the_route(database_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text(DEFAULT_CLIENT_SECRET)
    config = SandboxConfig(unknown_prefix="outbox-relay-probe-")
    with Sandbox(config) as sandbox:
        env = {"RELAY_DATABASE_URL": database_url, "RELAY_API_BASE_URL": sandbox.url}
        plain = cli("check", env={**env, "RELAY_API_TOKEN": "sandbox-token"})
        assert plain.returncode == 0, plain.stderr
        assert "ok  target default: static token present (not verified; use --probe)" in plain.stdout
        assert sandbox.requests == []  # without --probe the API is never asked

        probed = cli("check", "--probe", env={**env, "RELAY_API_TOKEN": "sandbox-token"})
        assert probed.returncode == 0, probed.stderr
        [put] = sandbox.requests
        assert put.method == "PUT" and put.status == 404
        assert put.action_id is not None and put.action_id.startswith("outbox-relay-probe-")
        assert (
            f"ok  target default: static token present; the API took it: PUT {sandbox.url}"
            f"/v1/orders/actions/{put.action_id} answered 404, as for any unknown action"
        ) in probed.stdout.splitlines()

        refused = cli("check", "--probe", env={**env, "RELAY_API_TOKEN": "wrong-token"})
        assert refused.returncode == 1
        [line] = refused.stderr.splitlines()
        assert line.startswith(
            f"FAIL target default: the API refused the token: PUT {sandbox.url}/v1/orders/actions/"
            "outbox-relay-probe-"
        )
        assert " answered 401: " in line and "wrong-token" not in line

        oauth = {
            **env,
            "RELAY_OAUTH_CLIENT_ID": DEFAULT_CLIENT_ID,
            "RELAY_OAUTH_CLIENT_SECRET_FILE": str(secret),
            "RELAY_OAUTH_TOKEN_URL": sandbox.token_url,
        }
        by_oauth = cli("check", "--probe", env=oauth)
        assert by_oauth.returncode == 0, by_oauth.stderr
        assert (
            f"ok  target default: OAuth token obtained from {sandbox.token_url}; the API took it: PUT "
            in (by_oauth.stdout)
        )


def test_check_probe_reports_any_other_answer_as_it_came(database_url: str) -> None:
    with Sandbox(SandboxConfig()) as sandbox:  # it applies any id it does not know: 200
        env = {
            "RELAY_DATABASE_URL": database_url,
            "RELAY_API_BASE_URL": sandbox.url,
            "RELAY_API_TOKEN": "sandbox-token",
        }
        result = cli("check", "--probe", env=env)
        base = sandbox.url
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"FAIL target default: PUT {base}/v1/orders/actions/outbox-relay-probe-")
    assert re.search(r" answered 2\d\d, not the 404 of an unknown action$", line), line


def test_check_without_credentials_does_not_call_the_target_ok(database_url: str) -> None:
    result = cli("check", env={"RELAY_DATABASE_URL": database_url})
    assert result.returncode == 2
    assert "ok  configuration loaded: target(s) default (no credentials, https://" in result.stdout
    assert "(none, " not in result.stdout
