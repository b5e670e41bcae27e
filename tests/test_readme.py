"""The README is the user's manual: its commands, SQL and references must stay true to the code."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psycopg
import pytest

from relay.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[embedded]' && .venv/bin/outbox-relay demo"
)
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"


def section(title: str) -> str:
    """The text under ``## title``, up to the next second-level heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str) -> list[list[str]]:
    """Indented (4 spaces) and fenced code blocks, as lists of lines."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(lines[i + 1 : end])
            i = end + 1
        elif line.startswith("    ") and line.strip():
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            blocks.append(block)
        else:
            i += 1
    return blocks


def fenced(language: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)]


# -- quick start and CI ----------------------------------------------------------------------
def test_quick_start_is_two_one_line_commands_demo_then_tests() -> None:
    blocks = code_blocks(section("Quick start"))
    assert blocks == [[DEMO_COMMAND], [TEST_COMMAND]]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    extract = next(line for line in CI_RUN.splitlines() if line.startswith("cmd=$("))
    result = subprocess.run(
        ["bash", "-c", extract + '\nprintf "%s" "$cmd"'], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == TEST_COMMAND
    assert 'bash -c "$cmd"' in CI_RUN
    # Only one README line can ever match, so moving text around cannot change what CI runs.
    pattern = re.compile(r"^    (python3 -m venv \.venv && .*pytest.*)$", re.MULTILINE)
    assert pattern.findall(README) == [TEST_COMMAND]


# -- the references match the code -----------------------------------------------------------
def test_every_environment_variable_and_config_key_is_documented() -> None:
    from relay import settings

    source = (ROOT / "relay" / "settings.py").read_text(encoding="utf-8")
    variables = set(re.findall(r'"(RELAY_[A-Z_]+)"', source))
    assert len(variables) >= 20
    reference = section("Configuration reference")
    assert sorted(v for v in variables if f"`{v}`" not in reference) == []
    keys = set(settings._TOP_KEYS) | set(settings._TARGET_KEYS)
    keys |= {
        "base_delay",
        "max_delay",
        "max_attempts",
        "max_age",
        "failure_threshold",
        "open_for",
        "max_open_for",
    }
    keys -= {"retry", "breaker", "targets"}
    assert sorted(k for k in keys if f"`{k}`" not in reference) == []
    for credential in ("database-url", "api-token", "oauth-client-secret", "NAME.api-token"):
        assert f"`{credential}`" in reference


def test_every_command_is_documented() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None and {"migrate", "run", "demo", "status"} <= set(commands)
    table = section("Command line")
    assert sorted(c for c in commands if f"| `{c}" not in table) == []


def test_every_schema_object_and_rule_is_documented() -> None:
    schema = (ROOT / "schema" / "schema.sql").read_text(encoding="utf-8")
    objects = set(re.findall(r"create (?:table|view|function) (outbox\.\w+)", schema))
    assert {
        "outbox.action_status_updates",
        "outbox.delivery_audit",
        "outbox.enqueue_action_status",
    } <= objects
    internal = {
        "outbox.validate_action_status_update",
        "outbox.notify_relay",
        "outbox.check_state_transition",
        "outbox.record_requeue",
        "outbox.refuse_history_change",
    }  # trigger functions
    surface = section("The SQL surface")
    assert sorted(o for o in objects - internal if f"`{o}" not in surface) == []
    rules = set(re.findall(r"bad := '(\w+)'", schema))
    assert len(rules) >= 9
    assert sorted(r for r in rules if f"`{r}`" not in surface) == []
    columns = re.search(r"create table outbox\.action_status_updates \((.*?)\n\);", schema, re.DOTALL)
    assert columns
    names = {m.group(1) for m in re.finditer(r"^    (\w+)\s+\w", columns.group(1), re.MULTILINE)} - {
        "constraint"
    }
    assert len(names) >= 19
    assert sorted(n for n in names if f"`{n}`" not in surface) == []
    roles = {"outbox_writer", "outbox_relay", "outbox_operator", "outbox_auditor"}
    assert all(f"`{r}`" in surface for r in roles)


def test_every_index_is_documented() -> None:
    schema = (ROOT / "schema" / "schema.sql").read_text(encoding="utf-8")
    indexes = set(re.findall(r"^create (?:unique )?index (\w+)", schema, re.MULTILINE))
    assert {"action_status_updates_action_id_pattern", "action_status_updates_created_at"} <= indexes
    surface = section("The SQL surface")
    assert sorted(i for i in indexes if f"`{i}`" not in surface) == []


def test_the_hint_postgres_gives_points_at_a_real_section() -> None:
    schema = (ROOT / "schema" / "schema.sql").read_text(encoding="utf-8")
    hint = re.search(r"See README\.md, \"([^\"]+)\"", schema)
    assert hint
    section(hint.group(1))


# -- the examples run ------------------------------------------------------------------------
def _expected_error(block: str) -> str | None:
    match = re.search(r"^-- ERROR:\s+(.+)$", block, re.MULTILINE)
    return match.group(1).strip() if match else None


def test_every_sql_example_runs_as_documented(database_url: str) -> None:
    blocks = fenced("sql")
    assert len(blocks) >= 10
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("create table orders (id integer primary key, state text not null)")
        conn.execute("insert into orders values (42, 'new')")
        for block in blocks:
            expected = _expected_error(block)
            if expected is not None:
                with pytest.raises(psycopg.Error) as refused:
                    conn.execute(block)
                assert refused.value.diag.message_primary == expected, block
            elif "create role" in block:
                # Roles belong to the whole server: try them, then leave no trace.
                with pytest.raises(_Rollback), conn.transaction():
                    conn.execute(block)
                    granted = conn.execute(
                        "select count(*) from pg_auth_members m join pg_roles r on r.oid = m.roleid "
                        "where r.rolname in ('outbox_writer', 'outbox_relay', 'outbox_auditor')"
                    ).fetchone()
                    assert granted is not None and granted[0] >= 3
                    raise _Rollback
            elif " concurrently " in block:
                # CREATE INDEX CONCURRENTLY runs alone, outside a transaction: as psql sends it.
                for statement in filter(str.strip, block.split(";")):
                    conn.execute(statement)  # type: ignore[call-overload]
            else:
                conn.execute(block)
        assert conn.execute("select state from orders where id = 42").fetchone() == ("accepted",)
        audited = conn.execute(
            "select status, state from outbox.delivery_audit where action_id = 'accept-action-123'"
        ).fetchall()
        assert audited == [("FAILED", "pending")]
        assert conn.execute(
            "select count(*) from outbox.action_status_updates where action_id = 'accept-action-124'"
        ).fetchone() == (0,)
        assert conn.execute(
            "select count(*) from outbox.error_codes where code = 'PARCEL_LOST'"
        ).fetchone() == (1,)
        assert conn.execute(
            "select count(*) from outbox.action_status_updates where action_id = 'cancel-action-9'"
        ).fetchone() == (1,)


class _Rollback(Exception):
    pass
