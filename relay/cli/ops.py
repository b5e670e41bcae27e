"""Operator and auditor commands: ``status``, ``audit``, ``dead list|retry``, ``purge``, ``check``.

Each command opens one small pool, runs a few named queries (``queries.sql``), prints an aligned
table (or ``--json``) and closes it. Errors are :mod:`relay.errors` exceptions; the command line
prints them as one line. :func:`purge` is also what the daemon's retention job runs.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from relay.cli import report
from relay.connect.client import ApiClient
from relay.core.retention import PURGE_BATCH, purge
from relay.errors import ConfigError, NotFound, RelayError, SchemaError
from relay.pg.migrations import latest_version
from relay.pg.store import Store
from relay.settings import (
    DAY,
    PURGE_MIN_AGE,
    Settings,
    TargetSettings,
    duration_in,
    parse_duration,
    whole_in,
)

T = TypeVar("T")

FRESH_HEARTBEAT = 120.0  # a relay_targets row younger than this belongs to a live relay
PAUSED_STATES = ("paused", "probing")  # relay_targets states of a target that is not serving
RETRY_BATCH = 500


async def _using_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    store = Store(settings.require_database_url(), pool_size=1, application_name="outbox-relay ops")
    try:
        return await work(store)
    finally:
        await store.close()


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


def _older_than(text: str) -> float:
    """``purge --older-than``: at least PURGE_MIN_AGE (one hour), so a slip cannot empty the outbox."""
    try:
        return duration_in(text, "age", PURGE_MIN_AGE, 100 * 365 * DAY)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("age: ")) from None


# -- status ---------------------------------------------------------------------------------
async def collect_status(store: Store, now: datetime | None = None) -> dict[str, Any]:
    """What ``status --json`` prints.

    A target is paused when a live relay reports it ``paused`` or ``probing`` (a probe decides
    whether it resumes); ``paused_since`` is the earliest ``since`` of those rows (the heartbeat
    keeps ``since`` while the state stays the same) and ``paused_seconds`` its age by ``now``
    (this host's clock unless given).
    """
    version = await store.schema_version()
    if version == 0:
        raise SchemaError("the outbox schema is missing: run `outbox-relay migrate`")
    now = now or datetime.now(UTC)
    counts = {r["target"]: r for r in await store.status_targets()}
    live = await store.live_relays(FRESH_HEARTBEAT)
    names = sorted(set(counts) | {r["target"] for r in live})
    targets = []
    for name in names:
        row = counts.get(name, {})
        serving = [r for r in live if r["target"] == name]
        pausing = [r for r in serving if r["state"] in PAUSED_STATES]
        reasons = sorted({r["reason"] or "no reason given" for r in pausing})
        since: datetime | None = min((r["since"] for r in pausing), default=None)
        targets.append({
            "target": name,
            **{k: int(row.get(k) or 0) for k in ("pending", "in_flight", "delivered", "dead")},
            "oldest_pending_seconds": row.get("oldest_pending_seconds"),
            "delivered_last_hour": int(row.get("delivered_last_hour") or 0),
            "dead_last_hour": int(row.get("dead_last_hour") or 0),
            "served_by": sorted({r["relay_id"] for r in serving}),
            "paused": bool(pausing),
            "pause_reason": "; ".join(reasons) or None,
            "paused_since": since,
            "paused_seconds": None if since is None else max((now - since).total_seconds(), 0.0),
        })  # fmt: skip
    relays: dict[str, dict[str, Any]] = {}
    for r in live:
        entry = relays.setdefault(r["relay_id"], {"relay_id": r["relay_id"], "targets": [], "ages": []})
        entry["targets"].append(r["target"])
        entry["ages"].append(r["heartbeat_age_seconds"])
    return {
        "schema_version": version,
        "schema_latest": latest_version(),
        "targets": targets,
        "relays": [
            {"relay_id": k, "targets": v["targets"], "heartbeat_age_seconds": min(v["ages"])}
            for k, v in sorted(relays.items())
        ],
    }


def render_status(data: dict[str, Any]) -> str:
    version, latest = data["schema_version"], data["schema_latest"]
    if version < latest:
        schema = f"schema: version {version}, BEHIND (latest {latest}): run `outbox-relay migrate`"
    elif version > latest:
        schema = f"schema: version {version}, newer than this outbox-relay knows ({latest}): upgrade it"
    else:
        schema = f"schema: version {version} (up to date)"
    lines = [schema, ""]
    if not data["targets"]:
        lines.append("no updates and no live relays yet")
    else:
        rows = []
        for t in data["targets"]:
            waiting = t["pending"] + t["in_flight"]
            paused = f"paused {report.age(t['paused_seconds'], subsecond=False)}"
            state = paused if t["paused"] else "serving" if t["served_by"] else "-"
            state = "UNSERVED" if state == "-" and waiting else state
            rows.append([
                t["target"], t["pending"], t["in_flight"], t["delivered"], t["dead"],
                report.age(t["oldest_pending_seconds"]), t["delivered_last_hour"], t["dead_last_hour"],
                ", ".join(t["served_by"]) or "-", state,
            ])  # fmt: skip
        headers = ["TARGET", "PENDING", "IN FLIGHT", "DELIVERED", "DEAD", "OLDEST", "DELIVERED 1H", "DEAD 1H",
                   "SERVED BY", "STATE"]  # fmt: skip
        lines.append(report.table(headers, rows))
    notes = []
    for t in data["targets"]:
        if t["paused"]:
            span = report.age(t["paused_seconds"], subsecond=False)
            notes.append(f"paused: {t['target']} for {span}: {report.clean(t['pause_reason'])}")
        elif not t["served_by"] and t["pending"] + t["in_flight"]:
            waiting = t["pending"] + t["in_flight"]
            notes.append(f"unserved: {t['target']} has {waiting} row(s) waiting but no live relay serves it")
    if notes:
        lines += ["", *notes]
    lines.append("")
    if data["relays"]:
        rows = [[r["relay_id"], ", ".join(r["targets"]), report.age(r["heartbeat_age_seconds"]) + " ago"]
                for r in data["relays"]]  # fmt: skip
        lines.append(report.table(["RELAY", "TARGETS", "HEARTBEAT"], rows))
    else:
        lines.append(f"no live relays (none with a heartbeat in the last {report.age(FRESH_HEARTBEAT)})")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    data = asyncio.run(_using_store(settings, collect_status))
    print(report.dumps(data) if args.json else render_status(data))
    return 0


# -- audit ----------------------------------------------------------------------------------
def render_audit(entries: list[dict[str, Any]]) -> str:
    blocks = []
    for entry in entries:
        u = entry["update"]
        text = [f"update {u['id']}: action {report.clean(u['action_id'])} for target {u['target']}",
                report.fields(u)]  # fmt: skip
        if entry["attempts"]:
            rows = [
                [a["attempt"], report.when(a["started_at"]), round(a["duration_ms"]), a["http_status"],
                 a["reached_api"], a["outcome"], a["error_code"], a["relay_id"],
                 report.clean(a["error_message"], 60), report.clean(a["response_body"], 60)]
                for a in entry["attempts"]
            ]  # fmt: skip
            headers = ["#", "STARTED", "MS", "HTTP", "REACHED API", "OUTCOME", "CODE", "RELAY", "MESSAGE",
                       "RESPONSE BODY"]  # fmt: skip
            text += ["", report.table(headers, rows, indent="  ")]
        else:
            text += ["", "  no attempts yet"]
        blocks.append("\n".join(text))
    return "\n\n".join(blocks)


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    updates = asyncio.run(_using_store(settings, lambda s: s.audit(args.action_id, args.target)))
    if not updates:
        where = f" for target {report.clean(args.target)}" if args.target else ""
        raise NotFound(f"no update for action id {report.clean(args.action_id)!r}{where}")
    if args.json:
        print(report.dumps({"action_id": args.action_id, "updates": updates}))
    else:
        print(render_audit(updates))
    return 0


# -- dead letters ---------------------------------------------------------------------------
def cmd_dead_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = asyncio.run(_using_store(settings, lambda s: s.dead_list(
        since=args.since, target=args.target, code=args.code, limit=args.limit)))  # fmt: skip
    if args.json:
        print(report.dumps({"count": len(rows), "limit": args.limit, "dead": rows}))
        return 0
    if not rows:
        print("no dead updates" + (" match" if args.since or args.target or args.code else ""))
        return 0
    table = [[report.when(r["dead_at"]), r["target"], report.clean(r["action_id"], 40), r["status"],
              r["attempts"], r["last_http_status"], r["last_error_code"], report.clean(r["last_error"], 70)]
             for r in rows]  # fmt: skip
    print(report.table(["DEAD AT", "TARGET", "ACTION ID", "STATUS", "ATTEMPTS", "HTTP", "CODE", "LAST ERROR"],
                       table))  # fmt: skip
    more = f"; the newest {args.limit} are shown, --limit N for more" if len(rows) == args.limit else ""
    print(f"\n{len(rows)} dead update(s){more}. Re-queue: outbox-relay dead retry ACTION_ID ... | --all")
    return 0


@dataclass
class Requeued:
    count: int = 0
    action_ids: set[str] = field(default_factory=set)  # only collected when action ids were named


def requeue_reason(reason: str | None, now: datetime | None = None) -> str:
    """``"<reason> (by <os user> at <UTC time>)"``, as stored in ``requeue_reason``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown user"
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{reason or 'manual retry'} (by {user} at {stamp})"


async def retry_dead(
    store: Store,
    *,
    action_ids: list[str] | None,
    target: str | None,
    code: str | None,
    reason: str,
    batch_size: int = RETRY_BATCH,
) -> Requeued:
    """Put matching dead rows back to pending, ``batch_size`` per transaction, then wake the relays."""
    done = Requeued()
    after = 0
    while True:
        batch = await store.dead_retry_batch(
            after=after, reason=reason, limit=batch_size, action_ids=action_ids, target=target, code=code
        )
        if not batch:
            break
        done.count += len(batch)
        if action_ids:
            done.action_ids.update(r["action_id"] for r in batch)
        after = max(r["id"] for r in batch)
    if done.count:
        await store.notify_relays()
    return done


def cmd_dead_retry(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.action_ids) == bool(args.all):
        raise ConfigError("dead retry: give one or more ACTION_IDs, or --all (not both)")
    ids: list[str] | None = args.action_ids or None
    if args.dry_run:
        n = asyncio.run(_using_store(settings, lambda s: s.dead_count(
            action_ids=ids, target=args.target, code=args.code)))  # fmt: skip
        print(f"would re-queue {n} dead update(s) (dry run: nothing changed)")
        return 0
    reason = requeue_reason(args.reason)
    done = asyncio.run(_using_store(settings, lambda s: retry_dead(
        s, action_ids=ids, target=args.target, code=args.code, reason=reason)))  # fmt: skip
    print(f"re-queued {done.count} dead update(s)" + ("; relays notified" if done.count else ""))
    missing = sorted(set(ids or ()) - done.action_ids)
    if missing:
        shown = ", ".join(repr(report.clean(m, 60)) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFound(f"no dead update matches action id(s) {shown}{more}")
    return 0


# -- retention ------------------------------------------------------------------------------
def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    what = "delivered and dead" if args.include_dead else "delivered"
    span = report.age(args.older_than)
    if args.dry_run:
        updates, attempts = asyncio.run(_using_store(
            settings, lambda s: s.purge_count(args.older_than, args.include_dead)))  # fmt: skip
        print(f"would purge {updates} {what} update(s) older than {span} with {attempts} attempt(s) "
              "(dry run: nothing changed)")  # fmt: skip
        return 0
    seen: list[str] = []
    attempts_total = 0

    def progress(batch: int, updates: int, attempts: int) -> None:
        nonlocal attempts_total
        attempts_total += attempts
        seen.append(f"batch {batch}: deleted {updates} update(s) and {attempts} attempt(s)")
        if batch == 2:
            sys.stderr.write(seen[0] + "\n")
        if batch >= 2:
            sys.stderr.write(seen[-1] + "\n")
            sys.stderr.flush()

    total = asyncio.run(
        _using_store(
            settings,
            lambda s: purge(s, args.older_than, args.include_dead, args.batch_size, progress=progress),
        )
    )
    print(f"purged {total} {what} update(s) older than {span} and {attempts_total} attempt(s) "
          f"in {len(seen)} batch(es)")  # fmt: skip
    return 0


# -- check ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    configuration: bool = False  # a failure that is the configuration's fault (exit 2)


def _public_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


async def _check_token(target: TargetSettings) -> Check:
    name = f"target {target.name}"
    if target.auth_kind == "none":
        return Check(name, False, f"{name}: no credentials (set a token or OAuth client)", configuration=True)
    client = ApiClient(target)  # the relay's own client: same TLS, proxy and deadline rules
    try:
        token = await client.tokens.token()
    except RelayError as exc:
        return Check(name, False, f"{name}: {exc}")
    finally:
        await client.aclose()
    if not token:
        return Check(name, False, f"{name}: the token is empty", configuration=True)
    if target.oauth is not None:
        return Check(name, True, f"{name}: OAuth token obtained from {_public_url(target.oauth.token_url)}")
    return Check(name, True, f"{name}: static token present")


async def _check_database(settings: Settings) -> list[Check]:
    try:
        url = settings.require_database_url()
    except ConfigError as exc:
        return [Check("database", False, str(exc), configuration=True)]
    store = Store(url, pool_size=1, application_name="outbox-relay check")
    try:
        try:
            server = await store.server_version()
        except RelayError as exc:
            return [Check("database", False, f"database unreachable: {exc}")]
        checks = [Check("database", True, f"database reachable (PostgreSQL {server})")]
        try:
            version = await store.schema_version()
        except RelayError as exc:
            return [*checks, Check("schema", False, f"schema: {exc}")]
    finally:
        await store.close()
    latest = latest_version()
    if version < latest:
        checks.append(Check("schema", False, f"schema behind: version {version}, latest {latest}; "
                                             "run `outbox-relay migrate`"))  # fmt: skip
    elif version > latest:
        checks.append(Check("schema", False, f"schema version {version} is newer than this outbox-relay "
                                             f"knows ({latest}): upgrade outbox-relay"))  # fmt: skip
    else:
        checks.append(Check("schema", True, f"schema up to date (version {version})"))
    return checks


async def run_checks(settings: Settings) -> list[Check]:
    kinds = ", ".join(
        f"{t.name} ({t.auth_kind}, {_public_url(t.base_url)})" for t in settings.targets.values()
    )
    checks = [Check("configuration", True, f"configuration loaded: target(s) {kinds}")]
    checks += await _check_database(settings)
    checks += await asyncio.gather(*(_check_token(t) for t in settings.targets.values()))
    return checks


def _scrub(text: str, settings: Settings) -> str:
    """Belt and braces for error details, which quote other software: no secret of the settings
    reaches the terminal even if a library put it in a message."""
    secrets = []
    if settings.database_url is not None:
        parts = urlsplit(settings.database_url.reveal())
        secrets += [parts.password, *parse_qs(parts.query).get("password", [])]
    for t in settings.targets.values():
        secrets.append(t.token.reveal() if t.token else None)
        secrets.append(t.oauth.client_secret.reveal() if t.oauth else None)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    checks = [c if c.ok else Check(c.name, False, _scrub(c.detail, settings), c.configuration)
              for c in asyncio.run(run_checks(settings))]  # fmt: skip
    problems = [c for c in checks if not c.ok]
    if args.json:
        listed = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]
        print(report.dumps({"ok": not problems, "checks": listed}))
    else:
        for c in checks:
            if c.ok:
                print(f"ok  {c.detail}", flush=True)
    for c in problems:
        sys.stderr.write(f"FAIL {c.detail}\n")
    if not problems:
        return 0
    return 2 if any(c.configuration for c in problems) else 1


# -- registration ---------------------------------------------------------------------------
def _dead_usage(args: argparse.Namespace, settings: Settings) -> int:
    raise ConfigError("dead: choose `dead list` or `dead retry` (see outbox-relay dead --help)")


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the operator commands to the command line (called by :mod:`relay.cli.main`)."""
    p = command(
        "status", cmd_status, "rows per target and state, backlog age, paused targets, live relays",
        "Per target: rows pending, in flight, delivered and dead; the age of the oldest row waiting;\n"
        "deliveries and dead letters in the last hour; the relays serving it (heartbeat in the last\n"
        "2 minutes) and whether one paused it, since when and why. Also the schema version.\n\n"
        "examples:\n  outbox-relay status\n"
        "  outbox-relay status --json | jq '.targets[] | select(.paused or .served_by == [])'",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")

    p = command(
        "audit", cmd_audit, "an update and every HTTP attempt made for it",
        "Show every column of outbox.delivery_audit for the action (one row per target it was sent\n"
        "to) and every attempt in order: start, duration, HTTP status, whether it reached the API\n"
        "(answered; maybe: no answer, it may have been applied; no: it never left), outcome, error,\n"
        "response body (cut short here; complete with --json), relay. Exit 1 when the action is\n"
        "unknown.\n\n"
        "example:\n  outbox-relay audit 1ba5fc4b-c4fd-4a52-9c43-0c3e6ea3b2a3 --json",
    )  # fmt: skip
    p.add_argument("action_id", metavar="ACTION_ID", help="the action id the application enqueued")
    p.add_argument("--target", metavar="NAME", help="only this target")
    p.add_argument("--json", action="store_true", help="machine-readable output, attempts in full")

    dead = command(
        "dead", _dead_usage, "inspect and re-queue dead updates",
        "Dead updates were refused by the API (or ran out of attempts or time). `dead list` shows\n"
        "them with their last error; `dead retry` puts them back to pending, attempts counted afresh.\n\n"
        "examples:\n  outbox-relay dead list --since 1d --code ORDER_IN_WRONG_STATE\n"
        "  outbox-relay dead retry --all --code UNAVAILABLE --reason 'API fixed' --dry-run",
    )  # fmt: skip
    sub = dead.add_subparsers(dest="dead_command", metavar="SUBCOMMAND", required=True,
                              parser_class=type(dead))  # fmt: skip
    p = sub.add_parser(
        "list", help="dead updates, newest first", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dead updates, newest first, with the last HTTP status, the error code of the\n"
        "last attempt (the API's code such as INVALID_INPUT, or a transport error name) and the\n"
        "last error.\n\nexample:\n  outbox-relay dead list --since 6h --target default --code INVALID_INPUT",
    )  # fmt: skip
    p.set_defaults(handler=cmd_dead_list)
    p.add_argument("--since", type=_duration, metavar="DURATION", help="died within DURATION (30m, 6h, 7d)")
    p.add_argument("--code", metavar="CODE", help="the last attempt's error code (case-insensitive)")
    p.add_argument("--target", metavar="NAME", help="only this target")
    p.add_argument("--limit", type=_positive, default=100, metavar="N", help="at most N rows (default 100)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "retry", help="put dead updates back to pending",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Put dead updates back to pending: due now, attempts counted afresh, the reason\n"
        "recorded in requeue_reason with your user name and the time. Only dead rows are touched;\n"
        f"{RETRY_BATCH} rows per transaction; the relays are woken up afterwards.\n\n"
        "examples:\n  outbox-relay dead retry 1ba5fc4b-c4fd 77aa01c2-9e10 --reason 'order fixed'\n"
        "  outbox-relay dead retry --all --target default --code UNAVAILABLE --dry-run",
    )  # fmt: skip
    p.set_defaults(handler=cmd_dead_retry)
    p.add_argument("action_ids", nargs="*", metavar="ACTION_ID", help="the actions to re-queue")
    p.add_argument("--all", action="store_true", help="every dead update (narrow with --code/--target)")
    p.add_argument("--code", metavar="CODE", help="only those whose last attempt had this error code")
    p.add_argument("--target", metavar="NAME", help="only this target")
    p.add_argument("--reason", metavar="TEXT", help="why, kept in requeue_reason (default: manual retry)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be re-queued")

    p = command(
        "purge", cmd_purge, "delete old delivered (and dead) updates with their attempts",
        "Retention: delete delivered updates (and dead ones with --include-dead) that finished more\n"
        "than DURATION ago, with their attempts, in small transactions that skip rows in use. Pending\n"
        "and in-flight updates are never touched; DURATION is at least 1h. The daemon does the same\n"
        "hourly when `retention` is configured.\n\n"
        "examples:\n  outbox-relay purge --older-than 30d --dry-run\n"
        "  outbox-relay purge --older-than 90d --include-dead",
    )  # fmt: skip
    p.add_argument("--older-than", type=_older_than, required=True, metavar="DURATION",
                   help="finished longer ago than this (e.g. 30d, 12h); at least 1h")  # fmt: skip
    p.add_argument("--include-dead", action="store_true", help="also delete dead updates")
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument("--batch-size", type=_positive, default=PURGE_BATCH, metavar="N",
                   help="rows per transaction (default %(default)s)")  # fmt: skip

    p = command(
        "check", cmd_check, "configuration, database, schema and tokens in one go",
        "Check that the configuration loads (targets and auth kinds are named, secrets never), the\n"
        "database answers, the schema is up to date, and every target can get a token (OAuth: one\n"
        "is fetched). One line per check; problems on stderr. Exit 0 when all is well, 2 when the\n"
        "configuration is at fault, 1 otherwise.\n\n"
        "example:\n  RELAY_DATABASE_URL=postgresql://relay@db/app \\\n"
        "  RELAY_API_TOKEN_FILE=/run/secrets/token outbox-relay check",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
