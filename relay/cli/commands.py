"""The operator commands' options and help: ``status``, ``audit``, ``dead list|retry``, ``purge``, ``check``.

Only argparse and :mod:`relay.settings` here. What the commands do is in :mod:`relay.cli.ops`,
imported when one of them runs (:func:`lazy`): listing or mistyping a command never loads the
database driver or the HTTP client.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable
from datetime import date

from relay.errors import ConfigError
from relay.settings import DAY, PURGE_BATCH, PURGE_MIN_AGE, RETRY_BATCH, Settings, parse_duration, whole_in

Handler = Callable[[argparse.Namespace, Settings], int]


def lazy(module: str, name: str) -> Handler:
    """A handler that imports ``module`` and runs its ``name`` only when the command is used."""

    def handler(args: argparse.Namespace, settings: Settings) -> int:
        function: Handler = getattr(importlib.import_module(module), name)
        return function(args, settings)

    return handler


def _ops(name: str) -> Handler:
    return lazy("relay.cli.ops", name)


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("duration: ")) from None


def _positive(text: str) -> int:
    try:
        return whole_in(text, "n", 1, 1_000_000)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("n: ")) from None


PURGE_MAX_AGE = 100 * 365 * DAY  # `purge --older-than` at most 36500d


def _older_than(text: str) -> float:
    """``purge --older-than``: at least PURGE_MIN_AGE (one hour), so a slip cannot empty the outbox."""
    try:
        seconds = parse_duration(text, "age")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 12h or 30d, got {text!r}") from None
    if seconds < PURGE_MIN_AGE:
        rule = "must be at least 1h (rows finished within the last hour are never purged)"
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    if seconds > PURGE_MAX_AGE:
        raise argparse.ArgumentTypeError(f"must be at most 36500d, got {text!r}")
    return seconds


def _day(text: str) -> date:
    """``audit --from/--to``: a UTC day, ``YYYY-MM-DD``."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, got {text!r}") from None


def _dead_usage(args: argparse.Namespace, settings: Settings) -> int:
    raise ConfigError("dead: choose `dead list` or `dead retry` (see outbox-relay dead --help)")


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the operator commands to the command line (called by :mod:`relay.cli.main`)."""
    p = command(
        "status",
        _ops("cmd_status"),
        "rows per target and state, backlog age, paused targets, live relays",
        "Per target: rows pending, in flight, delivered and dead; the age of the oldest row waiting;\n"
        "deliveries and dead letters in the last hour; the relays serving it (heartbeat in the last\n"
        "2 minutes) and whether one paused it, since when and why. Also the schema version.\n"
        "Read through indexes, never by scanning the table: every figure is exact except a target's\n"
        "delivered total past 10,000 rows, the planner's estimate, shown ~12,345,678 (--json:\n"
        "delivered_exact false).\n\n"
        "examples:\n  outbox-relay status\n"
        "  outbox-relay status --json | jq '.targets[] | select(.paused or .served_by == [])'",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")

    p = command(
        "audit",
        _ops("cmd_audit"),
        "an update and every HTTP attempt made for it; or what was reported between two days",
        "audit ACTION_ID: every column of outbox.delivery_audit for the action (one row per target\n"
        "it was sent to) and every attempt in order: start, duration, HTTP status, whether it reached\n"
        "the API (answered; maybe: no answer, it may have been applied; no: it never left), outcome,\n"
        "error, response body (cut short here; complete with --json or --csv), relay. Exit 1 when the\n"
        "action is unknown.\n\n"
        "audit --from DAY --to DAY: what was reported between two UTC days (inclusive), per target,\n"
        "status and error code, from outbox.delivery_report (days rolled up by the relay, the others\n"
        "counted live), with a total per status. A FAILED report counts once under each of its\n"
        "error codes; the error code column empty (or null) is every report of that status.\n\n"
        "examples:\n  outbox-relay audit 1ba5fc4b-c4fd-4a52-9c43-0c3e6ea3b2a3 --json\n"
        "  outbox-relay audit --from 2026-11-01 --to 2026-11-30 --csv > november.csv",
    )
    p.add_argument("action_id", metavar="ACTION_ID", nargs="?", help="the action id the application enqueued")
    p.add_argument("--from", dest="day_from", type=_day, metavar="DAY", help="first UTC day (YYYY-MM-DD)")
    p.add_argument("--to", dest="day_to", type=_day, metavar="DAY", help="last UTC day (YYYY-MM-DD)")
    p.add_argument("--target", metavar="NAME", help="only this target")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="machine-readable output, attempts in full")
    shape.add_argument(
        "--csv", action="store_true", help="RFC 4180 CSV with a header row (one row per attempt or figure)"
    )

    dead = command(
        "dead",
        _dead_usage,
        "inspect and re-queue dead updates",
        "Dead updates were refused by the API (or ran out of attempts or time). `dead list` shows\n"
        "them with their last error; `dead retry` puts them back to pending, attempts counted afresh.\n\n"
        "examples:\n  outbox-relay dead list --since 1d --code ORDER_IN_WRONG_STATE\n"
        "  outbox-relay dead retry --all --code UNAVAILABLE --reason 'API fixed' --dry-run",
    )
    sub = dead.add_subparsers(
        dest="dead_command", metavar="SUBCOMMAND", required=True, parser_class=type(dead)
    )
    p = sub.add_parser(
        "list",
        help="dead updates, newest first",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dead updates, newest first, with the last HTTP status, the error code of the\n"
        "last attempt (the API's code such as INVALID_INPUT, or a transport error name) and the\n"
        "last error.\n\nexample:\n  outbox-relay dead list --since 6h --target default --code INVALID_INPUT",
    )
    p.set_defaults(handler=_ops("cmd_dead_list"))
    p.add_argument("--since", type=_duration, metavar="DURATION", help="died within DURATION (30m, 6h, 7d)")
    p.add_argument("--code", metavar="CODE", help="the last attempt's error code (case-insensitive)")
    p.add_argument("--target", metavar="NAME", help="only this target")
    p.add_argument("--limit", type=_positive, default=100, metavar="N", help="at most N rows (default 100)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "retry",
        help="put dead updates back to pending",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Put dead updates back to pending: due now, attempts counted afresh, the reason\n"
        "recorded in requeue_reason with your user name and the time. Only dead rows are touched;\n"
        f"{RETRY_BATCH} rows per transaction; the relays are woken up afterwards.\n\n"
        "examples:\n  outbox-relay dead retry 1ba5fc4b-c4fd 77aa01c2-9e10 --reason 'order fixed'\n"
        "  outbox-relay dead retry --all --target default --code UNAVAILABLE --dry-run",
    )
    p.set_defaults(handler=_ops("cmd_dead_retry"))
    p.add_argument("action_ids", nargs="*", metavar="ACTION_ID", help="the actions to re-queue")
    p.add_argument("--all", action="store_true", help="every dead update (narrow with --code/--target)")
    p.add_argument("--code", metavar="CODE", help="only those whose last attempt had this error code")
    p.add_argument("--target", metavar="NAME", help="only this target")
    p.add_argument("--reason", metavar="TEXT", help="why, kept in requeue_reason (default: manual retry)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be re-queued")

    p = command(
        "purge",
        _ops("cmd_purge"),
        "delete old delivered (and dead) updates, drop old attempt partitions",
        "Retention: delete delivered updates (and dead ones with --include-dead) that finished more\n"
        "than DURATION ago, in small transactions that skip rows in use, once their day is counted in\n"
        "outbox.delivery_report (every ended day is rolled up first); then drop the monthly\n"
        "partitions of outbox.delivery_attempts that ended more than DURATION ago, keeping the\n"
        "attempts of updates that remain. Prints the partitions dropped and the attempt rows dropped\n"
        "and kept; progress on stderr. Pending and in-flight updates are never touched; DURATION is\n"
        "at least 1h. The daemon does the same hourly when `retention` is configured.\n\n"
        "examples:\n  outbox-relay purge --older-than 30d --dry-run\n"
        "  outbox-relay purge --older-than 90d --include-dead",
    )
    p.add_argument(
        "--older-than",
        type=_older_than,
        required=True,
        metavar="DURATION",
        help="finished longer ago than this (e.g. 30d, 12h); at least 1h",
    )
    p.add_argument("--include-dead", action="store_true", help="also delete dead updates")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only count the updates and list the attempt partitions that would go",
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=PURGE_BATCH,
        metavar="N",
        help="rows per transaction (default %(default)s)",
    )

    p = command(
        "check",
        _ops("cmd_check"),
        "configuration, database, schema and tokens in one go",
        "Check, without side effects, that the configuration loads (targets and auth kinds are\n"
        "named, secrets never), the database answers, the schema is up to date, the group roles\n"
        "exist, the database user may do what the relay does (outbox_relay), LISTEN works on a\n"
        "connection of its own, and every target has a token: a static one is only present, an\n"
        "OAuth one is fetched. --probe also asks the API: one PUT per target for an action id that\n"
        "cannot exist (outbox-relay-probe-<uuid>), whose 404 proves the token and the route.\n"
        "One line per check, saying what it proved; problems on stderr. Exit 0 when all is well,\n"
        "2 when the configuration (or a missing role or grant) is at fault, 1 otherwise.\n\n"
        "examples:\n  RELAY_DATABASE_URL=postgresql://relay_svc@db/app \\\n"
        "  RELAY_API_TOKEN_FILE=/run/secrets/token outbox-relay check --probe\n"
        "  RELAY_DATABASE_URL=postgresql://relay_svc@db/app RELAY_OAUTH_CLIENT_ID=my-client \\\n"
        "  RELAY_OAUTH_CLIENT_SECRET_FILE=/run/secrets/client-secret outbox-relay check --probe",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--probe",
        action="store_true",
        help="also PUT one update per target for an action id that cannot exist: a 404 proves the "
        "token and the route",
    )
