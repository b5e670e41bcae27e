"""The command line: parse, load settings once, run one command, turn errors into one line.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from relay import __version__
from relay.errors import ConfigError, RelayError
from relay.settings import DEFAULT_TARGET, Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]

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
  RELAY_DATABASE_URL=postgresql://relay@db/app  RELAY_API_TOKEN_FILE=/run/secrets/token
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"outbox-relay: {message} (see --help)\n")
        raise SystemExit(2)


def _error_arg(value: str) -> dict[str, str]:
    code, sep, message = value.partition("=")
    if not sep or not code or not message:
        raise argparse.ArgumentTypeError(f"expected CODE=MESSAGE, got {value!r}")
    return {"code": code, "message": message}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False))


# -- commands that live here ---------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from relay.pg.migrations import migrate
    from relay.pg.store import Store

    async def go() -> int:
        store = Store(settings.require_database_url(), pool_size=1)
        try:
            report = await migrate(store, dry_run=args.dry_run)
        finally:
            await store.close()
        if args.dry_run:
            if report.pending:
                for m in report.pending:
                    print(f"would apply {m.path.name}")
            else:
                print(f"schema is up to date (version {report.version}); nothing to apply")
            return 0
        for m in report.applied:
            print(f"applied {m.path.name}")
        if not report.applied:
            print(f"schema is up to date (version {report.version}); nothing to apply")
        else:
            print(f"schema is at version {report.version}")
        return 0

    return asyncio.run(go())


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from relay.pg.store import Store

    errors = args.error or []

    async def go() -> int:
        store = Store(settings.require_database_url(), pool_size=1)
        try:
            row_id = await store.enqueue(args.action_id, args.status, errors, args.target)
        finally:
            await store.close()
        if args.json:
            _print_json({"id": row_id, "action_id": args.action_id, "target": args.target})
        else:
            print(f"enqueued {args.action_id} ({args.status}) for target {args.target} as row {row_id}")
        return 0

    return asyncio.run(go())


def _lazy(module: str, name: str) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        import importlib

        function: Handler = getattr(importlib.import_module(module), name)
        return function(args, settings)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-relay", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"outbox-relay {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $RELAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, handler: Handler, help_text: str, description: str = "") -> _Parser:
        p: _Parser = sub.add_parser(
            name, help=help_text, description=description or help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        p.set_defaults(handler=handler)
        return p

    p = command(
        "migrate", cmd_migrate, "create or upgrade the outbox schema",
        "Apply the pending schema/ migrations in order, one transaction each, under an advisory\n"
        "lock (concurrent runs are safe). Running it again is a no-op.",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="only list the migrations that would run")

    p = command(
        "enqueue", cmd_enqueue, "write one update, as an application would",
        "Write one outcome through outbox.enqueue_action_status. An identical repeat is a no-op;\n"
        "a different outcome for the same action is refused.\n\n"
        "example:\n  outbox-relay enqueue 1ba5fc4b-c4fd --status FAILED \\\n"
        "      --error ORDER_IN_WRONG_STATE='already shipped'",
    )  # fmt: skip
    p.add_argument("action_id", metavar="ACTION_ID", help="the action id from the command event")
    p.add_argument(
        "--status", required=True, choices=["SUCCESS", "FAILED"], help="the action's final outcome"
    )
    p.add_argument(
        "--error", action="append", type=_error_arg, metavar="CODE=MESSAGE",
        help="an error of a FAILED outcome (repeatable); CODE must be in outbox.error_codes",
    )  # fmt: skip
    p.add_argument("--target", default=DEFAULT_TARGET, help="API target name (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the new row as JSON")

    command(
        "run", _lazy("relay.service.daemon", "cmd_run"), "run the relay daemon",
        "Claim pending updates, PUT them to the API, record every attempt. Stops cleanly on\n"
        "SIGTERM/SIGINT: in-flight requests finish within shutdown_timeout, the rest is released.",
    )  # fmt: skip
    for extra in _EXTRA_COMMANDS:
        extra(command)
    return parser


# Other modules register their commands here: each is called with the `command` factory.
_EXTRA_COMMANDS: list[Callable[[Callable[..., _Parser]], None]] = []


def _register_optional() -> None:
    for module in ("relay.cli.ops", "relay.dev.sandbox.command", "relay.dev.demo.command"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        register = getattr(mod, "register", None)
        if register is not None and register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(register)


def main(argv: Sequence[str] | None = None) -> int:
    _register_optional()
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
    except OSError as exc:
        sys.stderr.write(f"outbox-relay: {exc}\n")
        return 1


def run() -> NoReturn:
    sys.exit(main())


__all__ = ["ConfigError", "build_parser", "main"]
