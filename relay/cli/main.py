"""The command line: parse, load settings once, run one command, turn errors into one line.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. Errors are one
line on stderr, never a traceback.

Parsing needs argparse and :mod:`relay.settings` only. A command's code, and the libraries it
uses (SQLAlchemy and psycopg, httpx, APScheduler, prometheus_client), are imported when that
command runs, so ``--help`` and usage errors answer at once and each command loads only what it
uses (tests/test_cli_startup.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from relay import __version__
from relay.cli import commands
from relay.cli.commands import Handler, lazy
from relay.errors import ConfigError, RelayError
from relay.settings import DEFAULT_TARGET, Settings, load_settings

if TYPE_CHECKING:
    from relay.pg.migrations import MigrationReport

# Commands whose module is imported only when they are used, options and all: (name, module,
# the one-line help `outbox-relay --help` shows). The module's ``register(command)`` adds the
# command's options when it runs; its help text must be this one (tests/test_cli_startup.py).
LAZY_COMMANDS = (
    (
        "sandbox",
        "relay.dev.sandbox.command",
        "a local stand-in for the Mirakl Connect API, with fault injection",
    ),
    (
        "demo",
        "relay.dev.demo.command",
        "see it work end to end: a throwaway PostgreSQL, the sandbox and the relay",
    ),
    (
        "web",
        "relay.web.command",
        "the audit console: find any action and its timeline, overview, dead letters and redrive",
    ),
    ("completion", "relay.cli.completion", "print a shell completion script (bash, zsh or fish)"),
    ("man", "relay.cli.manpage", "print the manual page (roff): outbox-relay man | man -l -"),
)

DESCRIPTION = """\
Deliver Mirakl Connect action outcomes from a PostgreSQL outbox, exactly once.

Applications write outcomes into outbox.action_status_updates (or call
outbox.enqueue_action_status) in the same transaction as their own change; `run` reports
each one with PUT /v1/orders/actions/{action_id}, retries transient failures, and records
every attempt for operators and auditors.

first steps:
  outbox-relay demo                      see it all work on a throwaway database
  outbox-relay migrate                   create or upgrade the outbox schema
  outbox-relay check                     configuration, database, schema and token in one go
  outbox-relay run                       the daemon (systemd: see systemd/outbox-relay.service)

configuration: --config FILE (or RELAY_CONFIG), then RELAY_* variables, e.g.
  RELAY_DATABASE_URL=postgresql://relay_svc@db/app  RELAY_API_TOKEN_FILE=/run/secrets/token
"""


CONFIG_HELP = "TOML configuration file (default: $RELAY_CONFIG); before or after the command"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2.

    A command's parser made with ``module=`` is filled in (description, options, handler) by
    that module's ``register`` the first time it parses or shows its help.
    """

    def __init__(self, *args: Any, module: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module
        if " " in self.prog:  # a command's parser: `outbox-relay status --config F` works too
            self.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"outbox-relay: {message} (see --help)\n")
        raise SystemExit(2)

    def _load(self) -> None:
        if self._module is None:
            return
        module, self._module = self._module, None
        name = self.prog.rpartition(" ")[2]

        def command(command_name: str, handler: Handler, help_text: str, description: str = "") -> _Parser:
            if command_name != name:  # another command of the same module
                return _Parser(prog=f"outbox-relay {command_name}")
            self.description = description or help_text
            self.set_defaults(handler=handler)
            return self

        importlib.import_module(module).register(command)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def _error_arg(value: str) -> dict[str, str]:
    code, sep, message = value.partition("=")
    if not sep or not code or not message:
        raise argparse.ArgumentTypeError(f"expected CODE=MESSAGE, got {value!r}")
    return {"code": code, "message": message}


# -- commands that live here ---------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from relay.cli.database import run_with_store
    from relay.pg.migrations import migrate
    from relay.pg.store import Store

    if args.roles_sql:
        from relay.pg.roles import roles_sql

        sys.stdout.write(roles_sql())
        return 0

    def notice(line: str) -> None:  # what the migrations tell, e.g. a role the user may not create
        sys.stderr.write(f"outbox-relay: PostgreSQL {line}\n")
        sys.stderr.flush()

    async def work(store: Store) -> tuple[MigrationReport, list[str]]:
        done = await migrate(store, dry_run=args.dry_run)
        return done, await store.missing_roles()

    report, missing = run_with_store(
        settings, work, application_name="outbox-relay", role=None, notices=notice
    )
    _migrated(args, report)
    if missing:
        _missing_roles(settings, missing)
    return 0


def _missing_roles(settings: Settings, missing: list[str]) -> None:
    """Which roles are missing, and the one command a superuser runs to create them and their grants."""
    from relay.settings import database_params

    database = database_params(settings.require_database_url()).get("dbname") or "DATABASE"
    sys.stderr.write(
        f"outbox-relay: role(s) {', '.join(missing)} do not exist, so nothing is granted to them: "
        "their members would get `permission denied for schema outbox`\n"
        'outbox-relay: as a superuser, run the "Group roles" block of schema/schema.sql in this database '
        "(it creates the roles and their grants): "
        f"outbox-relay migrate --roles-sql | psql -d {database}\n"
    )


def _migrated(args: argparse.Namespace, report: MigrationReport) -> None:
    if args.dry_run:
        if report.pending:
            for m in report.pending:
                print(f"would apply {m.path.name}")
        else:
            print(f"schema is up to date (version {report.version}); nothing to apply")
        return
    for m in report.applied:
        print(f"applied {m.path.name}")
    if not report.applied:
        print(f"schema is up to date (version {report.version}); nothing to apply")
    else:
        print(f"schema is at version {report.version}")


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from relay.cli.database import run_with_store

    errors = args.error or []
    row_id = run_with_store(
        settings,
        lambda store: store.enqueue(args.action_id, args.status, errors, args.target),
        application_name="outbox-relay",
        role="outbox_writer",
    )
    if args.json:
        document = {"id": row_id, "action_id": args.action_id, "target": args.target}
        print(json.dumps(document, indent=2, default=str, ensure_ascii=False))
    else:
        print(f"enqueued {args.action_id} ({args.status}) for target {args.target} as row {row_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-relay", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"outbox-relay {__version__}")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, handler: Handler, help_text: str, description: str = "") -> _Parser:
        p: _Parser = sub.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    p = command(
        "migrate",
        cmd_migrate,
        "create or upgrade the outbox schema",
        "Apply the pending schema/ migrations in order, one transaction each, under an advisory\n"
        "lock (concurrent runs are safe). Running it again is a no-op. PostgreSQL's notices go to\n"
        "stderr; when the group roles are missing (the user may not create roles), it says so and\n"
        "how a superuser creates them:\n\n"
        "  outbox-relay migrate --roles-sql | psql -d app    # as a superuser",
    )
    p.add_argument("--dry-run", action="store_true", help="only list the migrations that would run")
    p.add_argument(
        "--roles-sql",
        action="store_true",
        help="print the statements a superuser runs when migrate could not create the group roles "
        '(the "Group roles" block of schema/schema.sql) and exit',
    )

    p = command(
        "enqueue",
        cmd_enqueue,
        "write one update, as an application would",
        "Write one outcome through outbox.enqueue_action_status. An identical repeat is a no-op;\n"
        "a different outcome for the same action is refused.\n\n"
        "example:\n  outbox-relay enqueue 1ba5fc4b-c4fd --status FAILED \\\n"
        "      --error ORDER_IN_WRONG_STATE='already shipped'",
    )
    p.add_argument("action_id", metavar="ACTION_ID", help="the action id from the command event")
    p.add_argument(
        "--status", required=True, choices=["SUCCESS", "FAILED"], help="the action's final outcome"
    )
    p.add_argument(
        "--error",
        action="append",
        type=_error_arg,
        metavar="CODE=MESSAGE",
        help="an error of a FAILED outcome (repeatable); CODE must be in outbox.error_codes",
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help="API target name (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the new row as JSON")

    command(
        "run",
        lazy("relay.service.daemon", "cmd_run"),
        "run the relay daemon",
        "Claim pending updates, PUT them to the API, record every attempt. Stops cleanly on\n"
        "SIGTERM/SIGINT: in-flight requests finish within shutdown_timeout, the rest is released.",
    )
    commands.register(command)
    for name, module, help_text in LAZY_COMMANDS:
        sub.add_parser(
            name, help=help_text, module=module, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        # demo and sandbox build their own configuration: a stray RELAY_* must not stop them.
        settings = load_settings(args.config) if getattr(args, "needs_settings", True) else Settings()
        code: int = args.handler(args, settings)
        return code
    except RelayError as exc:
        sys.stderr.write(f"outbox-relay: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except OSError as exc:
        sys.stderr.write(f"outbox-relay: {exc}\n")
        return 1


# What a shell shows for a program ended by SIGPIPE (128 + 13): `outbox-relay audit --csv | head`.
EXIT_READER_GONE = 141


def _reader_gone() -> int:
    """The reader of our output went away (`| head`): stop quietly, as a C program killed by
    SIGPIPE would, and send what is still buffered nowhere, so the exit flush cannot fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def run() -> NoReturn:
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _reader_gone()
    sys.exit(code)


__all__ = ["ConfigError", "build_parser", "main"]
