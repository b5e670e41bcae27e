"""Operator and auditor commands: ``status``, ``audit``, ``dead list|retry``, ``purge``, ``check``.

Each command opens one small pool (:mod:`relay.cli.database`), runs a few named queries
(``queries.sql``), prints an aligned table (or ``--json``, or for ``audit`` ``--csv``) and closes
it. Their options are in :mod:`relay.cli.commands`. Errors are :mod:`relay.errors` exceptions;
the command line prints them as one line. ``purge`` runs :mod:`relay.core.retention`, as the
daemon's retention job does.

What the commands return has a fixed shape (:class:`Status`, :class:`AuditEntry`,
:class:`Report`, :class:`DeadLetter`): ``--json`` prints exactly those keys, in that order.
None of them scans a whole table: they read through the partial indexes, the report rollup and
the attempt partitions' catalog.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

from relay.cli import report
from relay.cli.database import open_store, run_with_store
from relay.core.redrive import Requeued as Requeued
from relay.core.redrive import retry_dead as retry_dead  # `dead retry`, and the web console
from relay.core.retention import cycle
from relay.core.retention import purge as purge  # the daemon's and tests' name for it
from relay.durations import human_duration
from relay.errors import ConfigError, NotFound, PermissionDenied, RelayError, SchemaError
from relay.redact import scrub_secrets
from relay.settings import Settings, TargetSettings

if TYPE_CHECKING:
    from relay.connect.client import ApiClient
    from relay.core.retention import Retained
    from relay.pg.store import Store

FRESH_HEARTBEAT = 120.0  # a relay_targets row younger than this belongs to a live relay
PAUSED_STATES = ("paused", "probing")  # relay_targets states of a target that is not serving


# -- what the commands return ---------------------------------------------------------------
class TargetStatus(TypedDict):
    target: str
    pending: int
    in_flight: int
    delivered: int
    delivered_exact: bool
    dead: int
    oldest_pending_seconds: float | None
    delivered_last_hour: int
    dead_last_hour: int
    served_by: list[str]
    paused: bool
    pause_reason: str | None
    paused_since: datetime | None
    paused_seconds: float | None


class LiveRelay(TypedDict):
    relay_id: str
    targets: list[str]
    heartbeat_age_seconds: float


class Status(TypedDict):
    """``status --json``."""

    schema_version: int
    schema_latest: int
    targets: list[TargetStatus]
    relays: list[LiveRelay]


class Attempt(TypedDict):
    attempt: int
    started_at: datetime
    duration_ms: float
    http_status: int | None
    reached_api: str | None
    outcome: str
    error_code: str | None
    error_message: str | None
    response_body: str | None
    relay_id: str


class AuditEntry(TypedDict):
    """One update of ``audit``: every column of ``outbox.delivery_audit`` (which grows with the
    schema, so it stays a mapping) and its attempts in order."""

    update: dict[str, Any]
    attempts: list[Attempt]


class DeadLetter(TypedDict):
    """One row of ``dead list``."""

    id: int
    action_id: str
    target: str
    status: str
    attempts: int
    created_at: datetime
    dead_at: datetime
    last_http_status: int | None
    last_error_code: str | None
    last_error: str | None


# -- status ---------------------------------------------------------------------------------
async def collect_status(
    store: Store, now: datetime | None = None, live: list[dict[str, Any]] | None = None
) -> Status:
    """What ``status --json`` prints.

    A target is paused when a live relay reports it ``paused`` or ``probing`` (a probe decides
    whether it resumes); ``paused_since`` is the earliest ``since`` of those rows (the heartbeat
    keeps ``since`` while the state stays the same) and ``paused_seconds`` its age by ``now``
    (this host's clock unless given).

    Every figure is exact but ``delivered``, which is the planner's estimate for a target with
    many delivered rows (``delivered_exact`` false; :meth:`~relay.pg.store.Store.status_targets`):
    nothing here scans the table.
    """
    from relay.pg.migrations import latest_version

    version = await store.schema_version()
    if version == 0:
        raise SchemaError("the outbox schema is missing: run `outbox-relay migrate`")
    now = now or datetime.now(UTC)
    counts = {r["target"]: r for r in await store.status_targets()}
    if live is None:  # the web overview reads them itself, for its per-target rows
        live = await store.live_relays(FRESH_HEARTBEAT)
    names = sorted(set(counts) | {r["target"] for r in live})
    targets: list[TargetStatus] = []
    for name in names:
        row = counts.get(name, {})
        serving = [r for r in live if r["target"] == name]
        pausing = [r for r in serving if r["state"] in PAUSED_STATES]
        reasons = sorted({r["reason"] or "no reason given" for r in pausing})
        since: datetime | None = min((r["since"] for r in pausing), default=None)
        targets.append(
            TargetStatus(
                target=name,
                pending=int(row.get("pending") or 0),
                in_flight=int(row.get("in_flight") or 0),
                delivered=int(row.get("delivered") or 0),
                delivered_exact=bool(row.get("delivered_exact", True)),
                dead=int(row.get("dead") or 0),
                oldest_pending_seconds=row.get("oldest_pending_seconds"),
                delivered_last_hour=int(row.get("delivered_last_hour") or 0),
                dead_last_hour=int(row.get("dead_last_hour") or 0),
                served_by=sorted({r["relay_id"] for r in serving}),
                paused=bool(pausing),
                pause_reason="; ".join(reasons) or None,
                paused_since=since,
                paused_seconds=None if since is None else max((now - since).total_seconds(), 0.0),
            )
        )
    relays: dict[str, tuple[list[str], list[float]]] = {}
    for r in live:
        served, ages = relays.setdefault(r["relay_id"], ([], []))
        served.append(r["target"])
        ages.append(r["heartbeat_age_seconds"])
    return Status(
        schema_version=version,
        schema_latest=latest_version(),
        targets=targets,
        relays=[
            LiveRelay(relay_id=k, targets=served, heartbeat_age_seconds=min(ages))
            for k, (served, ages) in sorted(relays.items())
        ],
    )


def render_status(data: Status) -> str:
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
            paused = f"paused {human_duration(t['paused_seconds'])}"
            state = paused if t["paused"] else "serving" if t["served_by"] else "-"
            state = "UNSERVED" if state == "-" and waiting else state
            rows.append(
                [
                    t["target"],
                    t["pending"],
                    t["in_flight"],
                    t["delivered"] if t["delivered_exact"] else report.Approx(t["delivered"]),
                    t["dead"],
                    human_duration(t["oldest_pending_seconds"]),
                    t["delivered_last_hour"],
                    t["dead_last_hour"],
                    ", ".join(t["served_by"]) or "-",
                    state,
                ]
            )
        headers = [
            "TARGET",
            "PENDING",
            "IN FLIGHT",
            "DELIVERED",
            "DEAD",
            "OLDEST",
            "DELIVERED 1H",
            "DEAD 1H",
            "SERVED BY",
            "STATE",
        ]
        lines.append(report.table(headers, rows))
    notes = []
    if any(not t["delivered_exact"] for t in data["targets"]):
        notes.append("~: estimated from the planner's statistics (the other figures are exact)")
    for t in data["targets"]:
        if t["paused"]:
            span = human_duration(t["paused_seconds"])
            notes.append(f"paused: {t['target']} for {span}: {report.clean(t['pause_reason'])}")
        elif not t["served_by"] and t["pending"] + t["in_flight"]:
            waiting = t["pending"] + t["in_flight"]
            notes.append(f"unserved: {t['target']} has {waiting} row(s) waiting but no live relay serves it")
    if notes:
        lines += ["", *notes]
    lines.append("")
    if data["relays"]:
        rows = [
            [r["relay_id"], ", ".join(r["targets"]), human_duration(r["heartbeat_age_seconds"]) + " ago"]
            for r in data["relays"]
        ]
        lines.append(report.table(["RELAY", "TARGETS", "HEARTBEAT"], rows))
    else:
        lines.append(f"no live relays (none with a heartbeat in the last {human_duration(FRESH_HEARTBEAT)})")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    data = run_with_store(settings, collect_status)
    print(report.dumps(data) if args.json else render_status(data))
    return 0


# -- audit ----------------------------------------------------------------------------------
def _attempt(row: Mapping[str, Any]) -> Attempt:
    return Attempt(
        attempt=row["attempt"],
        started_at=row["started_at"],
        duration_ms=row["duration_ms"],
        http_status=row["http_status"],
        reached_api=row["reached_api"],
        outcome=row["outcome"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        response_body=row["response_body"],
        relay_id=row["relay_id"],
    )


async def audit_entries(store: Store, action_id: str, target: str | None = None) -> list[AuditEntry]:
    """Every update of the action (one per target; only ``target``'s when given) with its attempts."""
    return [
        AuditEntry(update=entry["update"], attempts=[_attempt(a) for a in entry["attempts"]])
        for entry in await store.audit(action_id, target)
    ]


AUDIT_WIDTH = 100  # columns the human view of `audit` fits in (--json is complete)
FINISHED = ("delivered", "dead")  # states in which next_attempt_at means nothing


def render_audit(entries: list[AuditEntry]) -> str:
    """Each update's columns, then its attempts: one line each, followed by the relay, the
    message and the response body on lines of their own, cut to fit :data:`AUDIT_WIDTH`."""
    blocks = []
    for entry in entries:
        u = dict(entry["update"])
        if u.get("state") in FINISHED and "next_attempt_at" in u:
            u["next_attempt_at"] = None  # left over from the last claim: there is no next attempt
        width = max((len(k) for k in u), default=0)
        text = [
            report.clean(f"update {u['id']}: action {u['action_id']} for target {u['target']}", AUDIT_WIDTH),
            report.fields(u, limit=AUDIT_WIDTH - width - 4),
        ]
        if entry["attempts"]:
            headers = ["#", "STARTED", "MS", "HTTP", "REACHED", "OUTCOME", "CODE"]
            rows = [
                [
                    a["attempt"],
                    report.when(a["started_at"]),
                    round(a["duration_ms"]),
                    a["http_status"],
                    a["reached_api"],
                    a["outcome"],
                    report.clean(a["error_code"], 24),
                ]
                for a in entry["attempts"]
            ]
            lines = report.table(headers, rows, indent="  ").splitlines()
            text += ["", lines[0]]
            for a, line in zip(entry["attempts"], lines[1:], strict=True):
                text.append(line)
                details = (
                    ("relay", a["relay_id"]),
                    ("message", a["error_message"]),
                    ("body", a["response_body"]),
                )
                for label, detail in details:
                    if detail is not None:
                        prefix = f"       {label}: "
                        text.append(prefix + report.clean(detail, AUDIT_WIDTH - len(prefix)))
        else:
            text += ["", "  no attempts yet"]
        blocks.append("\n".join(text))
    return "\n\n".join(blocks)


def audit_csv(entries: list[AuditEntry]) -> str:
    """``audit ACTION_ID --csv``: one row per attempt with its update's columns (an update without
    attempts: one row, the attempt's columns empty). An attempt column named like an update column
    is prefixed ``attempt_``."""
    update_columns = list(dict.fromkeys(k for e in entries for k in e["update"]))
    attempt_columns = list(Attempt.__annotations__)
    headers = update_columns + [f"attempt_{k}" if k in update_columns else k for k in attempt_columns]
    rows: list[list[object]] = []
    for entry in entries:
        update: list[object] = [entry["update"].get(k) for k in update_columns]
        attempts: list[Mapping[str, object]] = list(entry["attempts"]) or [{}]
        rows += [update + [a.get(k) for k in attempt_columns] for a in attempts]
    return report.csv_text(headers, rows)


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    ranged = args.day_from is not None or args.day_to is not None
    if ranged or args.action_id is None:
        if args.action_id is not None:
            raise ConfigError("audit: give an ACTION_ID or --from DAY --to DAY, not both")
        return cmd_audit_report(args, settings)
    updates = run_with_store(settings, lambda s: audit_entries(s, args.action_id, args.target))
    if not updates:
        where = f" for target {report.clean(args.target)}" if args.target else ""
        raise NotFound(f"no update for action id {report.clean(args.action_id)!r}{where}")
    if args.json:
        print(report.dumps({"action_id": args.action_id, "updates": updates}))
    elif args.csv:
        sys.stdout.write(audit_csv(updates))
    else:
        print(render_audit(updates))
    return 0


# -- what was reported between two days ----------------------------------------------------
class ReportRow(TypedDict):
    """One figure of ``audit --from --to``: reports of ``status`` to ``target`` over the days;
    ``error_code`` None is every report of the status, else those carrying that error code.
    ``rolled``: every day of it was read from the rollup (``outbox.daily_reports``); false when
    some day was counted live from the updates (days the relay has not rolled up yet: today,
    yesterday until an hour past midnight UTC), ``live_reports`` of them."""

    target: str
    status: str
    error_code: str | None
    reports: int
    rolled: bool
    live_reports: int


class Report(TypedDict):
    """``audit --from --to --json``."""

    day_from: date
    day_to: date
    target: str | None
    rows: list[ReportRow]
    totals: dict[str, int]  # reports per status, all targets (or the one asked for)


async def delivery_report(store: Store, day_from: date, day_to: date, target: str | None = None) -> Report:
    rows = [
        ReportRow(
            target=r["target"],
            status=r["status"],
            error_code=r["error_code"],
            reports=int(r["reports"]),
            rolled=bool(r["rolled"]),
            live_reports=int(r["live_reports"]),
        )
        for r in await store.delivery_report(day_from, day_to, target)
    ]
    totals: dict[str, int] = {}
    for r in rows:
        if r["error_code"] is None:
            totals[r["status"]] = totals.get(r["status"], 0) + r["reports"]
    return Report(
        day_from=day_from, day_to=day_to, target=target, rows=rows, totals=dict(sorted(totals.items()))
    )


# --csv: target, status, error_code, reports, rolled, live_reports
REPORT_COLUMNS = list(ReportRow.__annotations__)


def _rolled(row: ReportRow) -> str:
    if row["rolled"]:
        return "yes"
    if row["live_reports"] >= row["reports"]:
        return "no (counted live)"
    return f"partly ({row['live_reports']} counted live)"


def render_report(data: Report) -> str:
    span = f"{data['day_from']} to {data['day_to']} (UTC days, inclusive)"
    where = f" for target {report.clean(data['target'])}" if data["target"] else ""
    if not data["rows"]:
        return f"no reports from {span}{where}"
    rows = [
        [
            r["target"],
            r["status"],
            "(all)" if r["error_code"] is None else report.clean(r["error_code"], 64),
            r["reports"],
            _rolled(r),
        ]
        for r in data["rows"]
    ]
    lines = [
        f"reports from {span}{where}",
        "",
        report.table(["TARGET", "STATUS", "ERROR CODE", "REPORTS", "ROLLED UP"], rows),
        "",
        report.table(
            ["STATUS", "REPORTS"],
            [*([k, v] for k, v in data["totals"].items()), ["total", sum(data["totals"].values())]],
        ),
    ]
    if any(r["error_code"] is not None for r in data["rows"]):
        lines += ["", "A FAILED report counts once under each of its error codes; (all) counts it once."]
    return "\n".join(lines)


def cmd_audit_report(args: argparse.Namespace, settings: Settings) -> int:
    day_from, day_to = args.day_from, args.day_to
    if day_from is None or day_to is None:
        raise ConfigError("audit: give an ACTION_ID, or both --from DAY and --to DAY")
    if day_from > day_to:
        raise ConfigError(f"audit: --from {day_from} is after --to {day_to}")
    data = run_with_store(settings, lambda s: delivery_report(s, day_from, day_to, args.target))
    if args.json:
        print(report.dumps(data))
    elif args.csv:
        rows = [[r[k] for k in REPORT_COLUMNS] for r in data["rows"]]  # type: ignore[literal-required]
        sys.stdout.write(report.csv_text(REPORT_COLUMNS, rows))
    else:
        print(render_report(data))
    return 0


# -- dead letters ---------------------------------------------------------------------------
async def dead_letters(
    store: Store, *, since: float | None, target: str | None, code: str | None, limit: int
) -> list[DeadLetter]:
    """Dead updates, newest first: died within ``since`` seconds, of ``target``, whose last
    attempt's error code is ``code`` (case-insensitive); at most ``limit``."""
    return [
        DeadLetter(
            id=r["id"],
            action_id=r["action_id"],
            target=r["target"],
            status=r["status"],
            attempts=r["attempts"],
            created_at=r["created_at"],
            dead_at=r["dead_at"],
            last_http_status=r["last_http_status"],
            last_error_code=r["last_error_code"],
            last_error=r["last_error"],
        )
        for r in await store.dead_list(since=since, target=target, code=code, limit=limit)
    ]


async def dead_page(
    store: Store, *, since: float | None, target: str | None, code: str | None, limit: int
) -> tuple[list[DeadLetter], int]:
    """:func:`dead_letters` and how many match in all (counted only when the page is full)."""
    rows = await dead_letters(store, since=since, target=target, code=code, limit=limit)
    if len(rows) < limit:
        return rows, len(rows)
    total = await store.dead_count(since=since, target=target, code=code)
    return rows, max(total, len(rows))  # rows that died between the two statements


def cmd_dead_list(args: argparse.Namespace, settings: Settings) -> int:
    rows, total = run_with_store(
        settings,
        lambda s: dead_page(s, since=args.since, target=args.target, code=args.code, limit=args.limit),
    )
    if args.json:
        print(report.dumps({"count": len(rows), "total": total, "limit": args.limit, "dead": rows}))
        return 0
    if not rows:
        print("no dead updates" + (" match" if args.since or args.target or args.code else ""))
        return 0
    table = [
        [
            report.when(r["dead_at"]),
            r["target"],
            report.clean(r["action_id"], 40),
            r["status"],
            r["attempts"],
            r["last_http_status"],
            r["last_error_code"],
            report.clean(r["last_error"], 70),
        ]
        for r in rows
    ]
    print(
        report.table(
            ["DEAD AT", "TARGET", "ACTION ID", "STATUS", "ATTEMPTS", "HTTP", "CODE", "LAST ERROR"], table
        )
    )
    requeue = "Re-queue: outbox-relay dead retry ACTION_ID ... | --all"
    if total > len(rows):
        print(f"\nshowing the newest {len(rows)} of {total} dead updates (--limit {args.limit}).\n{requeue}")
    else:
        print(f"\n{total} dead update(s). {requeue}")
    return 0


def requeue_reason(reason: str | None, now: datetime | None = None) -> str:
    """``"<reason> (by <os user> at <UTC time>)"``, as stored in ``requeue_reason``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown user"
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{reason or 'manual retry'} (by {user} at {stamp})"


def cmd_dead_retry(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.action_ids) == bool(args.all):
        raise ConfigError("dead retry: give one or more ACTION_IDs, or --all (not both)")
    ids: list[str] | None = args.action_ids or None
    if args.dry_run:
        n = run_with_store(
            settings, lambda s: s.dead_count(action_ids=ids, target=args.target, code=args.code)
        )
        print(f"would re-queue {n} dead update(s) (dry run: nothing changed)")
        return 0
    reason = requeue_reason(args.reason)
    done = run_with_store(
        settings, lambda s: retry_dead(s, action_ids=ids, target=args.target, code=args.code, reason=reason)
    )
    print(f"re-queued {done.count} dead update(s)" + ("; relays notified" if done.count else ""))
    missing = sorted(set(ids or ()) - done.action_ids)
    if missing:
        shown = ", ".join(repr(report.clean(m, 60)) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFound(f"no dead update matches action id(s) {shown}{more}")
    return 0


# -- retention ------------------------------------------------------------------------------
async def purge_preview(
    store: Store, older_than: float, include_dead: bool
) -> tuple[int, list[tuple[str, int]]]:
    """What ``purge --dry-run`` reports: the updates it would delete, the attempt partitions it
    would drop with their estimated rows."""
    return await store.purge_count(older_than, include_dead), await store.purge_partitions(older_than)


def render_dropped(partitions: list[tuple[str, int, int]], span: str) -> list[str]:
    """The attempt partitions a purge dropped, and the attempt rows dropped and kept."""
    if not partitions:
        return [f"attempt partitions: none ended more than {span} ago"]
    lines = []
    for name, rows, kept in partitions:
        if name == DEFAULT_PARTITION:
            lines.append(f"deleted {rows:,} attempt row(s) of {name} whose update is gone")
        else:
            lines.append(
                f"dropped partition {name}: {rows:,} attempt row(s), {kept:,} kept (their update remains)"
            )
    dropped = sum(rows - kept for _, rows, kept in partitions)
    kept = sum(kept for _, _, kept in partitions)
    lines.append(f"attempt rows: {dropped:,} dropped, {kept:,} kept")
    return lines


DEFAULT_PARTITION = "delivery_attempts_default"  # outbox.delivery_attempts' partition for stray rows


@dataclass
class ProgressLines:
    """Progress lines of a long run on stderr: none for a single step, every step (the first
    too) once there is a second."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= 2:
            sys.stderr.write("\n".join(self.lines[-2 if len(self.lines) == 2 else -1 :]) + "\n")
            sys.stderr.flush()


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    what = "delivered and dead" if args.include_dead else "delivered"
    span = human_duration(args.older_than)
    if args.dry_run:
        updates, partitions = run_with_store(
            settings, lambda s: purge_preview(s, args.older_than, args.include_dead)
        )
        print(f"would purge {updates:,} {what} update(s) older than {span}")
        if partitions:
            about = sum(rows for _, rows in partitions)
            listed = ", ".join(f"{name} (about {rows:,} rows)" for name, rows in partitions)
            print(
                f"would drop {len(partitions)} attempt partition(s) that ended more than {span} ago, "
                f"about {about:,} attempt row(s) (rows of updates that remain are kept): {listed}"
            )
        else:
            print(f"would drop no attempt partition (none ended more than {span} ago)")
        print("(dry run: nothing changed)")
        return 0
    batches, drops = ProgressLines(), ProgressLines()

    def progress(batch: int, updates: int, attempts: int) -> None:
        batches.add(f"batch {batch}: deleted {updates} update(s)")

    def dropped(name: str, rows: int, kept: int) -> None:
        drops.add(f"dropped {name}: {rows} attempt row(s), {kept} kept")

    def retain(store: Store) -> Awaitable[Retained]:
        # cycle() counts every ended day into the rollup first, so every delivered row past the
        # cutoff can go and the partitions dropped keep only the attempts of updates still there.
        return cycle(
            store, args.older_than, args.include_dead, args.batch_size, progress=progress, dropped=dropped
        )

    done = run_with_store(settings, retain)
    print(f"purged {done.updates:,} {what} update(s) older than {span} in {len(batches.lines)} batch(es)")
    print("\n".join(render_dropped(done.partitions, span)))
    return 0


# -- check ----------------------------------------------------------------------------------
RELAY_ROLE = "outbox_relay"  # what the daemon's user needs (README "Roles")
PROBE_PREFIX = "outbox-relay-probe-"  # `check --probe`: an action id no connector ever has
LISTEN_WITHIN = 15.0  # seconds the LISTEN connection has to answer


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    configuration: bool = False  # a failure that is the configuration's fault (exit 2)
    warning: str | None = None  # passed, but something the operator should change
    fields: Mapping[str, Any] | None = None  # more for --json (connection, listen)


def _public_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _roles_cure(settings: Settings) -> str:
    """The one command a superuser runs to create the group roles and their grants."""
    from relay.settings import database_params

    database = database_params(settings.require_database_url()).get("dbname") or "DATABASE"
    return f"as a superuser, run `outbox-relay migrate --roles-sql | psql -d {database}`"


def _listing(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


async def _check_token(target: TargetSettings, probe: bool) -> Check:
    """What can be proved of the target's credentials: a static token is only present; an OAuth
    token is obtained (the client credentials work); with ``probe`` the API is asked
    (:func:`_probe`)."""
    name = f"target {target.name}"
    if target.auth_kind == "none":
        return Check(name, False, f"{name}: no credentials (set a token or OAuth client)", configuration=True)
    from relay.connect.client import ApiClient

    client = ApiClient(target)  # the relay's own client: same TLS, proxy and deadline rules
    try:
        try:
            token = await client.tokens.token()
        except RelayError as exc:
            return Check(name, False, f"{name}: {exc}")
        if not token:
            return Check(name, False, f"{name}: the token is empty", configuration=True)
        if target.oauth is not None:
            source = f"OAuth token obtained from {_public_url(target.oauth.token_url)}"
            unproved = "not tried on the API"
        else:
            source, unproved = "static token present", "not verified"
        if not probe:
            return Check(name, True, f"{name}: {source} ({unproved}; use --probe)")
        return await _probe(client, target, token, source)
    finally:
        await client.aclose()


async def _probe(client: ApiClient, target: TargetSettings, token: str, source: str) -> Check:
    """One ``PUT`` for an action id that cannot exist (``outbox-relay-probe-<uuid>``): a 404
    proves the token and the route; 401/403 means the API refused the token; anything else is
    reported as it came. Nothing can be applied: no action has that id."""
    import uuid

    from relay.connect.client import action_path, request_body
    from relay.core.classify import ProbeVerdict, probe_verdict

    name = f"target {target.name}"
    action_id = f"{PROBE_PREFIX}{uuid.uuid4()}"
    where = f"PUT {_public_url(target.base_url)}{action_path(action_id)}"
    answer = (await client.put(action_id, request_body("SUCCESS", []), token)).answer
    said = f": {report.clean(answer.body.decode('utf-8', 'replace'), 120)}" if answer.body else ""
    verdict = probe_verdict(answer)
    if verdict == ProbeVerdict.PROVEN:
        return Check(
            name, True, f"{name}: {source}; the API took it: {where} answered 404, as for any unknown action"
        )
    if verdict == ProbeVerdict.REFUSED:
        return Check(
            name, False, f"{name}: the API refused the token: {where} answered {answer.status}{said}"
        )
    if verdict == ProbeVerdict.NO_ANSWER:
        return Check(name, False, f"{name}: {where}: no answer ({answer.transport_error})")
    return Check(
        name, False, f"{name}: {where} answered {answer.status}, not the 404 of an unknown action{said}"
    )


async def _check_listen(store: Store, settings: Settings) -> Check:
    """LISTEN on a connection of its own, as the daemon's wake-ups do (nothing is notified): on
    ``listen_database_url`` when set; not at all behind a pooler without it (the relay polls)."""
    import asyncio

    from relay.cli.connection import listen_plan

    plan = listen_plan(settings, store.pooler)
    fields = plan.fields()
    if plan.via == "none":
        return Check("listen", True, f"LISTEN: none: {plan.polling}", warning=plan.polling, fields=fields)

    ready = asyncio.Event()

    async def listen() -> None:
        async for _ in store.listen(ready):
            pass

    task = asyncio.create_task(listen())
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=LISTEN_WITHIN, return_when=asyncio.FIRST_COMPLETED)
        failed = task.exception() if task.done() else None
    finally:
        for t in (task, waiter):
            t.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    where = f" on listen_database_url ({', '.join(plan.hosts)})" if plan.via == "listen_database_url" else ""
    if ready.is_set():
        return Check(
            "listen", True, f"LISTEN works on a connection of its own{where} (wake-ups)", fields=fields
        )
    if failed is not None:
        return Check(
            "listen",
            False,
            f"LISTEN connection{where}: {failed}",
            configuration=isinstance(failed, ConfigError),
            fields=fields,
        )
    return Check(
        "listen",
        False,
        f"LISTEN connection{where}: no answer within {human_duration(LISTEN_WITHIN)}",
        fields=fields,
    )


async def _check_roles(store: Store, settings: Settings) -> list[Check]:
    """The group roles exist, and the connected user may do what the daemon does."""
    from relay.pg.store import GROUP_ROLES, quote_role

    missing = await store.missing_roles()
    if missing:
        detail = f'roles missing: {", ".join(missing)}; {_roles_cure(settings)} (README "Roles")'
        checks = [Check("roles", False, detail, configuration=True)]
    else:
        checks = [Check("roles", True, f"roles {', '.join(GROUP_ROLES)} exist")]
    found = await store.privileges(RELAY_ROLE, retention=settings.retention is not None)
    if not found.found:
        return checks
    user = quote_role(found.user)
    if not found.missing:
        why = (
            "owns the outbox schema"
            if found.owner
            else f"is a member of {RELAY_ROLE}"
            if found.member
            else "has them"
        )
        checks.append(Check("privileges", True, f"privileges: {user} may do what the relay does ({why})"))
        return checks
    lacks = f"privileges: {user} lacks {_listing(found.missing)}"
    if found.member:
        cure = f"{user} is a member of {RELAY_ROLE}, which was never granted them: {_roles_cure(settings)}"
    elif found.member is None:
        cure = f"role {RELAY_ROLE} does not exist: {_roles_cure(settings)}, then grant {RELAY_ROLE} to {user}"
    else:
        cure = f'grant {RELAY_ROLE} to {user} (as a superuser; README "Roles")'
    checks.append(Check("privileges", False, f"{lacks}: {cure}", configuration=True))
    return checks


async def _check_database(settings: Settings) -> list[Check]:
    from relay.cli.connection import describe
    from relay.pg.migrations import latest_version

    try:
        settings.require_database_url()
    except ConfigError as exc:
        return [Check("database", False, str(exc), configuration=True)]
    async with open_store(settings, "outbox-relay check", role=RELAY_ROLE) as store:
        try:
            server = await store.server_version()
        except RelayError as exc:
            return [Check("database", False, f"database unreachable: {exc}")]
        checks = [Check("database", True, f"database reachable (PostgreSQL {server})")]
        connection = describe(settings, store.pooler)
        checks.append(
            Check(
                "connection", True, connection.detail, warning=connection.warning, fields=connection.fields()
            )
        )
        latest = latest_version()
        try:
            version = await store.schema_version()
        except RelayError as exc:
            checks.append(Check("schema", False, f"schema: {exc}", isinstance(exc, PermissionDenied)))
        else:
            if version < latest:
                behind = f"schema behind: version {version}, latest {latest}; run `outbox-relay migrate`"
                checks.append(Check("schema", False, behind))
            elif version > latest:
                ahead = f"schema version {version} is newer than this outbox-relay knows ({latest})"
                ahead += ": upgrade outbox-relay"
                checks.append(Check("schema", False, ahead))
            else:
                checks.append(Check("schema", True, f"schema up to date (version {version})"))
                checks.append(await _check_ledger(store))
        try:
            checks += await _check_roles(store, settings)
        except RelayError as exc:
            checks.append(Check("roles", False, f"roles: {exc}"))
        checks.append(await _check_listen(store, settings))
    return checks


async def _check_ledger(store: Store) -> Check:
    """The attempt partitions the relays' maintenance job makes: next month's must exist, and the
    default partition (rows no month covers) should be empty."""
    try:
        ledger = await store.ledger()
    except RelayError as exc:
        return Check("ledger", False, f"attempt partitions: {exc}")
    until = ledger["covered_until"]
    detail = (
        f"attempt partitions: {ledger['partitions']} monthly, through {until:%Y-%m-%d}"
        if until is not None
        else "attempt partitions: none monthly"
    )
    warning = None
    if until is None or ledger["short"]:
        warning = (
            "no attempt partition for next month yet: the relays' maintenance job has not run (is a relay "
            "running, and may it EXECUTE outbox.ensure_attempt_partitions?); attempts land in the default "
            "partition meanwhile"
        )
    elif ledger["default_rows"] > 0:
        warning = (
            f"the default attempt partition holds about {ledger['default_rows']} rows (a relay's clock "
            "off, or attempts kept from dropped months); retention deletes them one by one"
        )
    return Check("ledger", True, detail, warning=warning)


_AUTH = {"none": "no credentials"}


async def run_checks(settings: Settings, probe: bool = False) -> list[Check]:
    import asyncio

    kinds = ", ".join(
        f"{t.name} ({_AUTH.get(t.auth_kind, t.auth_kind)}, {_public_url(t.base_url)})"
        for t in settings.targets.values()
    )
    checks = [Check("configuration", True, f"configuration loaded: target(s) {kinds}")]
    checks += await _check_database(settings)
    checks += await asyncio.gather(*(_check_token(t, probe) for t in settings.targets.values()))
    return checks


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    checks = [
        c if c.ok else Check(c.name, False, scrub_secrets(c.detail, settings), c.configuration)
        for c in asyncio.run(run_checks(settings, probe=args.probe))
    ]
    problems = [c for c in checks if not c.ok]
    if args.json:
        listed = [{"name": c.name, "ok": c.ok, "detail": c.detail, **(c.fields or {})} for c in checks]
        print(report.dumps({"ok": not problems, "checks": listed}))
    else:
        for c in checks:
            if c.ok:
                print(f"ok  {c.detail}", flush=True)
                if c.warning and c.name != "listen":  # the listen line says it already
                    print(f"warn {c.warning}", flush=True)
    for c in problems:
        sys.stderr.write(f"FAIL {c.detail}\n")
    if not problems:
        return 0
    return 2 if any(c.configuration for c in problems) else 1
