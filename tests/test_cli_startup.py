"""Start-up of the command line: each command imports only what it uses.

Behaviour, not timing (``bench/cli.py`` measures the time): ``--help``, usage errors and
``import relay`` load none of the heavy libraries; ``status`` loads the database driver but not
SQLAlchemy, the HTTP client, the scheduler or the metrics library; the daemon loads neither
SQLAlchemy (which is for applications: ``relay.enqueue``, ``relay.tables``), nor the development
tools, nor the operator commands' rendering.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"sqlalchemy", "psycopg", "httpx", "apscheduler", "prometheus_client"}

# Runs SNIPPET (which may set ``code``), prints what is in sys.modules as the last line of
# stderr, exits with ``code``.
PROBE = """
import json, sys
code = 0
try:
    {snippet}
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
sys.exit(code)
"""


def probe(snippet: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, set[str]]:
    """Run ``snippet`` in a fresh interpreter with ``args``: exit code, stdout, stderr, modules loaded."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(snippet=snippet), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "COLUMNS": "100", **(env or {})},
        timeout=60,
    )
    stderr, _, modules = result.stderr.rpartition("\nMODULES ")
    assert modules, result.stderr
    return result.returncode, result.stdout, stderr.strip(), set(json.loads(modules))


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, set[str]]:
    return probe("from relay.cli.main import main; code = main(sys.argv[1:])", *args, env=env)


def heavy(modules: set[str]) -> set[str]:
    return {m.partition(".")[0] for m in modules} & HEAVY


def test_help_loads_no_heavy_library_and_still_lists_every_command() -> None:
    code, out, err, modules = run_cli("--help")
    assert code == 0, err
    assert heavy(modules) == set()
    assert not {m for m in modules if m.startswith(("relay.dev", "relay.cli.ops", "relay.service"))}
    assert "outbox-relay demo" in out and "RELAY_DATABASE_URL" in out
    for command in (
        "migrate",
        "enqueue",
        "run",
        "status",
        "audit",
        "dead",
        "purge",
        "check",
        "sandbox",
        "demo",
    ):
        assert f"\n    {command} " in out, command


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["dead"], "the following arguments are required: SUBCOMMAND"),
        (["purge", "--older-than", "5m"], "--older-than"),
        (["enqueue", "x"], "--status"),
    ],
)
def test_a_usage_error_is_one_line_exit_2_and_loads_no_heavy_library(args: list[str], says: str) -> None:
    code, out, err, modules = run_cli(*args)
    assert code == 2
    assert out == "" and len(err.splitlines()) == 1 and says in err, err
    assert err.startswith("outbox-relay: ") and err.endswith("(see --help)")
    assert heavy(modules) == set()


def test_import_relay_loads_no_heavy_library() -> None:
    code, _, err, modules = probe("import relay")
    assert code == 0, err
    assert heavy(modules) == set()


@pytest.mark.parametrize(("command", "option"), [("sandbox", "--p503"), ("demo", "--rows")])
def test_the_development_commands_load_their_options_when_used(command: str, option: str) -> None:
    code, out, err, modules = run_cli(command, "--help")
    assert code == 0, err
    assert option in out and "example" in out
    assert heavy(modules) == set()


@pytest.mark.parametrize(("name", "module", "help_text"), cli.LAZY_COMMANDS)
def test_the_lazy_commands_help_is_their_modules_own(name: str, module: str, help_text: str) -> None:
    """``outbox-relay --help`` shows main's copy of a lazy command's one-line help; it must be the
    one its module registers."""
    seen: list[tuple[str, str]] = []

    def command(name: str, handler: Callable[..., int], help_text: str, description: str = "") -> Any:
        seen.append((name, help_text))
        return cli._Parser(prog=name)

    importlib.import_module(module).register(command)
    assert seen == [(name, help_text)]


def test_status_loads_the_database_driver_only(database_url: str) -> None:
    code, out, err, modules = run_cli("status", env={"RELAY_DATABASE_URL": database_url})
    assert code == 0, err
    assert "schema: version" in out
    assert heavy(modules) == {"psycopg"}
    assert not {m for m in modules if m.startswith(("relay.dev", "relay.service", "relay.connect"))}


def test_the_daemon_loads_neither_the_development_tools_nor_the_operator_views() -> None:
    code, _, err, modules = probe(
        "from relay.cli.main import build_parser; build_parser().parse_args(['run']); import relay.service.daemon"
    )
    assert code == 0, err
    assert heavy(modules) == HEAVY - {"sqlalchemy"}
    assert not {m for m in modules if m.startswith(("relay.dev", "relay.cli.ops", "relay.cli.report"))}
