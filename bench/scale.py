"""The scale step of ``bench/run.py``: a year of history, and the commands an operator runs on it.

``bench_scale(ctx)`` (``python bench/run.py --only scale``; skipped by ``--quick``):

1. A fresh embedded PostgreSQL, loaded fast (fsync off, autovacuum off) and then restarted
   durable (fsync on, autovacuum on) before anything is measured. Three databases:
   ``scale_big`` (latest schema; ``--scale-updates`` updates and ``--scale-attempts`` attempt rows
   over the last 365 days, 1,000 pending rows on top), ``scale_empty`` (the same schema, only the
   1,000 pending rows and copies of the few rows the audit and ``dead list`` show) and
   ``scale_upgrade`` (migrated to 0005 only, ``--scale-upgrade-attempts`` attempt rows).
2. The claim, ``status``, ``audit``, ``dead list``, ``audit --from/--to --csv``, each measured on
   both databases, interleaved; then one retention cycle under a writer and an attempt-insert probe,
   with the locks it held; the tables' dead tuples and sizes along the way.
3. ``outbox-relay migrate`` from 0005 to the latest schema on ``scale_upgrade``, under the same
   writer and probe.

Figures are returned (and recorded by bench/run.py), never asserted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib as bl
from benchlib import BenchError, say

SECTION = "## Scale"  # its section of bench/results/latest.md, kept by runs without the scale step
SIZES = {"updates": 10_000_000, "attempts": 30_000_000, "upgrade_attempts": 10_000_000}
PENDING = 1000
BATCH = 500_000  # updates per load statement (with their attempts)
REPEAT = 5  # runs of each command per database
QUERY_REPEAT = 50
DEAD_CODE = "ORDER_IN_WRONG_STATE"
RETENTION = "90d"
PROBE_INTERVAL = 0.01  # the writer and the probe: one insert each per 10 ms
LOCK_SAMPLE = 0.05
OUTBOX_RELAY = [bl.PYTHON, "-m", "relay"]
TARGETS = ("default", "marketplace-eu", "marketplace-us")  # 80%, 15%, 5%
REPORT_CODES = ["ORDER_IN_WRONG_STATE", "DATA_NOT_FOUND", "OTHER", "UNAVAILABLE", "INVALID_INPUT"]
# A dead row's last attempt: (error code, HTTP status, what the relay would write as last_error)
DEAD_CODES = [
    (
        "ORDER_IN_WRONG_STATE",
        400,
        "400 Bad Request: ORDER_IN_WRONG_STATE: the order is in a state that does not allow the action",
    ),
    ("HTTP_404", 404, "404 Not Found: the action is unknown to the API"),
    ("UNAVAILABLE", 503, "503 Service Unavailable: retries exhausted"),
    ("INVALID_INPUT", 400, "400 Bad Request: INVALID_INPUT: the request body was refused"),
]

MODES = [  # PostgreSQL's table lock modes, weakest first
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]
COUNTS = (
    "select (select count(*) from outbox.action_status_updates),"
    + " (select count(*) from outbox.delivery_attempts)"
)

# -- the generator ----------------------------------------------------------------------------
# Row g (0-based) of the history, everything derived from g: id g + 1; created at t0 + g * span / n
# (so ids grow with time, as in real life); g % 100 = 0: dead (1%), 1..4: delivered after retries
# (4%), else delivered at the first attempt (95%); 10% of the reports FAILED with 1-3 errors; targets
# 80 / 15 / 5 %. Retried and dead rows share the attempts beyond one per update: k each, an outage's
# worth of backoff (at most 5 minutes apart, and never later than now).
ROWS = """
select g, x.h, x.m,
       md5(%(prefix)s || g)::uuid::text as action_id,
       case when (x.h / 100000) %% 20 < 16 then 'default'
            when (x.h / 100000) %% 20 < 19 then 'marketplace-eu' else 'marketplace-us' end as target,
       case when x.h %% 10 = 0 then 'FAILED' else 'SUCCESS' end as status,
       case when x.h %% 10 <> 0 then '[]'::jsonb
            when (x.h / 10) %% 3 = 0 then jsonb_build_array(
                jsonb_build_object('code', (%(codes)s::text[])[1 + (x.h / 30) %% 5], 'message', 'reason 1'))
            when (x.h / 10) %% 3 = 1 then jsonb_build_array(
                jsonb_build_object('code', (%(codes)s::text[])[1 + (x.h / 30) %% 5], 'message', 'reason 1'),
                jsonb_build_object('code', (%(codes)s::text[])[1 + (x.h / 150) %% 5], 'message', 'reason 2'))
            else jsonb_build_array(
                jsonb_build_object('code', (%(codes)s::text[])[1 + (x.h / 30) %% 5], 'message', 'reason 1'),
                jsonb_build_object('code', (%(codes)s::text[])[1 + (x.h / 150) %% 5], 'message', 'reason 2'),
                jsonb_build_object('code', (%(codes)s::text[])[1 + (x.h / 750) %% 5], 'message', 'reason 3'))
       end as errors,
       case when x.m = 0 then 'dead' when x.m < 5 then 'retried' else 'first' end as cls,
       y.k, y.created,
       least(interval '5 minutes', (%(now)s::timestamptz - y.created) / (y.k + 1)) as step,
       (%(dead_codes)s::text[])[1 + (x.h / 7) %% 4] as dead_code,
       (%(dead_http)s::int[])[1 + (x.h / 7) %% 4] as dead_http,
       (%(dead_errors)s::text[])[1 + (x.h / 7) %% 4] as dead_error
from generate_series(cast(%(lo)s as bigint), cast(%(hi)s as bigint)) as g
cross join lateral (select hashint8(g)::bigint & 2147483647 as h, g %% 100 as m) as x
cross join lateral (
    select case when x.m < 5
                then 1 + %(per)s + case when (g / 100) * 5 + x.m < %(rem)s then 1 else 0 end
                else 1 end as k,
           %(t0)s::timestamptz + (g::float8 / %(n)s) * %(span)s::interval as created
) as y
"""

INSERT_UPDATES = """
insert into outbox.action_status_updates
    ({id_col}action_id, status, errors, target, state, attempts, requests, created_at, next_attempt_at,
     delivered_at, dead_at, last_error, last_http_status{extra_cols}){overriding}
select {id_val}r.action_id, r.status, r.errors, r.target,
       case when r.cls = 'dead' then 'dead' else 'delivered' end, r.k, r.k, r.created,
       r.created + interval '20 ms' + (r.k - 1) * r.step,
       case when r.cls <> 'dead' then r.created + interval '55 ms' + (r.k - 1) * r.step end,
       case when r.cls = 'dead' then r.created + interval '55 ms' + (r.k - 1) * r.step end,
       case when r.cls = 'dead' then r.dead_error end,
       case when r.cls = 'dead' then r.dead_http else 204 end{extra_vals}
from ({rows}) as r
"""

INSERT_ATTEMPTS = """
insert into outbox.delivery_attempts
    (update_id, action_id, target, attempt, started_at, duration_ms, http_status, outcome, error_code,
     error_message, relay_id, reached_api)
select r.g + 1, r.action_id, r.target, j, r.created + interval '20 ms' + (j - 1) * r.step, 35.0,
       case when j < r.k then 503 when r.cls = 'dead' then r.dead_http else 204 end,
       case when j < r.k then 'retry' when r.cls = 'dead' then 'dead' else 'delivered' end,
       case when j < r.k then 'UNAVAILABLE' when r.cls = 'dead' then r.dead_code end,
       case when j < r.k then '503 Service Unavailable' when r.cls = 'dead' then r.dead_error end,
       'relay-' || (r.h %% 2), 'answered'
from ({rows}) as r cross join lateral generate_series(1, r.k) as j
"""


class Plan:
    """How ``updates`` rows and ``attempts`` attempt rows are laid out (see ROWS)."""

    def __init__(
        self, updates: int, attempts: int, now: dt.datetime, days: int = 365, prefix: str = "scale-"
    ) -> None:
        if updates < 100 or attempts < updates:
            raise BenchError(
                f"scale: need at least 100 updates and as many attempts ({updates:,} / {attempts:,})"
            )
        self.updates = updates
        self.attempts = attempts
        self.prefix = prefix
        self.now = now
        self.t0 = now - dt.timedelta(days=days)
        self.span = dt.timedelta(days=days) - dt.timedelta(minutes=10)
        self.special = (updates // 100) * 5 + min(updates % 100, 5)  # retried + dead rows
        extra = attempts - updates
        self.per, self.rem = divmod(extra, self.special)

    def params(self, lo: int, hi: int) -> dict[str, Any]:
        return {
            "lo": lo,
            "hi": hi,
            "prefix": self.prefix,
            "n": self.updates,
            "t0": self.t0,
            "span": self.span,
            "now": self.now,
            "per": self.per,
            "rem": self.rem,
            "codes": REPORT_CODES,
            "dead_codes": [c[0] for c in DEAD_CODES],
            "dead_http": [c[1] for c in DEAD_CODES],
            "dead_errors": [c[2] for c in DEAD_CODES],
        }

    def g_at(self, days_ago: float, cls: str) -> int:
        """A row of class ``cls`` created about ``days_ago`` days ago."""
        g = int(self.updates * (1 - days_ago / 365)) // 100 * 100
        return g + {"dead": 0, "retried": 1, "first": 50}[cls]


def _has_column(conn: Any, table: str, column: str) -> bool:
    row = conn.execute(
        "select 1 from information_schema.columns where table_schema = 'outbox' and table_name = %s"
        " and column_name = %s",
        (table, column),
    ).fetchone()
    return row is not None


def _has_function(conn: Any, name: str) -> bool:
    row = conn.execute("select to_regproc(%s) is not null", (f"outbox.{name}",)).fetchone()
    return bool(row and row[0])


def _secondary_indexes(conn: Any, table: str) -> tuple[list[str], list[str]]:
    """DROP and CREATE statements for the table's indexes and unique constraints, except its
    primary key (ids are loaded in order: appending to it is cheap)."""
    drops, creates = [], []
    for name, definition, constraint, contype in conn.execute(
        """
        select i.relname, pg_get_indexdef(x.indexrelid), c.conname, c.contype
        from pg_index x join pg_class i on i.oid = x.indexrelid
        left join pg_constraint c on c.conindid = x.indexrelid and c.conrelid = x.indrelid
        where x.indrelid = %s::regclass
        """,
        (f"outbox.{table}",),
    ).fetchall():
        if contype == "p":
            continue
        if constraint:
            cdef = conn.execute(
                "select pg_get_constraintdef(oid) from pg_constraint"
                " where conname = %s and conrelid = %s::regclass",
                (constraint, f"outbox.{table}"),
            ).fetchone()[0]
            drops.append(f"alter table outbox.{table} drop constraint {constraint}")
            creates.append(f"alter table outbox.{table} add constraint {constraint} {cdef}")
        else:
            drops.append(f"drop index outbox.{name}")
            creates.append(definition.replace(" ON ONLY ", " ON "))
    return drops, creates


def updates_sql(conn: Any, keep_ids: bool) -> str:
    """INSERT_UPDATES for this database's schema (``last_error_code`` from 0006 on), with the
    generator's ids or the table's own."""
    extra_cols = extra_vals = ""
    if _has_column(conn, "action_status_updates", "last_error_code"):
        extra_cols, extra_vals = ", last_error_code", ", case when r.cls = 'dead' then r.dead_code end"
    return INSERT_UPDATES.format(
        rows=ROWS,
        overriding=" overriding system value" if keep_ids else "",
        id_col="id, " if keep_ids else "",
        id_val="r.g + 1, " if keep_ids else "",
        extra_cols=extra_cols,
        extra_vals=extra_vals,
    )


def load_history(url: str, plan: Plan, label: str) -> dict[str, Any]:
    """The history rows of ``plan`` into the database at ``url`` (triggers off, secondary indexes
    built afterwards); returns the seconds each part took."""
    import psycopg

    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")  # bulk load: no row triggers
        conn.execute("set maintenance_work_mem = '1GB'")
        conn.execute("set max_parallel_maintenance_workers = 2")
        conn.execute("set synchronous_commit = off")
        insert_updates = updates_sql(conn, keep_ids=True)
        attempts_sql = INSERT_ATTEMPTS.format(rows=ROWS)
        dropped: list[str] = []
        for table in ("action_status_updates", "delivery_attempts"):
            drops, creates = _secondary_indexes(conn, table)
            for statement in drops:
                conn.execute(statement)
            dropped += creates
        started = time.monotonic()
        for lo in range(0, plan.updates, BATCH):
            hi = min(plan.updates, lo + BATCH) - 1
            conn.execute(insert_updates, plan.params(lo, hi))
            say(f"  {label}: {hi + 1:,}/{plan.updates:,} updates ({time.monotonic() - started:.0f}s)")
        out["updates_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        for lo in range(0, plan.updates, BATCH):
            hi = min(plan.updates, lo + BATCH) - 1
            conn.execute(attempts_sql, plan.params(lo, hi))
            say(
                f"  {label}: attempts of {hi + 1:,}/{plan.updates:,} updates "
                f"({time.monotonic() - started:.0f}s)"
            )
        out["attempts_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        for statement in dropped:
            conn.execute(statement)
        out["indexes_s"] = round(time.monotonic() - started, 1)
        conn.execute(
            "select setval(pg_get_serial_sequence('outbox.action_status_updates', 'id'),"
            " (select max(id) from outbox.action_status_updates))"
        )
        conn.execute("set session_replication_role = origin")
        counts = conn.execute(
            "select (select count(*) from outbox.action_status_updates),"
            " (select count(*) from outbox.delivery_attempts)"
        ).fetchone()
        out["updates"], out["attempts"] = int(counts[0]), int(counts[1])
    say(
        f"  {label}: {out['updates']:,} updates and {out['attempts']:,} attempts in "
        f"{out['updates_s'] + out['attempts_s'] + out['indexes_s']:.0f}s "
        f"(updates {out['updates_s']}s, attempts {out['attempts_s']}s, indexes {out['indexes_s']}s)"
    )
    return out


PENDING_SQL = """
insert into outbox.action_status_updates (action_id, status, errors, target)
select 'pending-' || %(tag)s || '-' || i, 'SUCCESS', '[]'::jsonb,
       case when i %% 20 < 16 then 'default' when i %% 20 < 19 then 'marketplace-eu' else 'marketplace-us' end
from generate_series(1, %(n)s) as i
"""


def add_pending(url: str, n: int = PENDING) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PENDING_SQL, {"tag": uuid.uuid4().hex[:6], "n": n})


def prepare_partitions(url: str) -> dict[str, Any]:
    """Monthly partitions for the year (the latest schema only): a database that has run the
    partitioned schema for a year has one per month. An empty legacy partition (a database created
    at the latest schema has nothing from 0.1.0) is dropped first, so that it does not cover them."""
    import psycopg

    out: dict[str, Any] = {"partitioned": False}
    with psycopg.connect(url, autocommit=True) as conn:
        if not _has_function(conn, "ensure_attempt_partitions"):
            return out
        out["partitioned"] = True
        legacy = conn.execute("select to_regclass('outbox.delivery_attempts_legacy') is not null").fetchone()
        if legacy and legacy[0]:
            rows = conn.execute("select count(*) from outbox.delivery_attempts_legacy").fetchone()
            if rows and rows[0] == 0:
                conn.execute(
                    "alter table outbox.delivery_attempts detach partition outbox.delivery_attempts_legacy"
                )
                conn.execute("drop table outbox.delivery_attempts_legacy")
                out["dropped_empty_legacy"] = True
        made = conn.execute(
            "select outbox.ensure_attempt_partitions(2, now() - interval '13 months')"
        ).fetchall()
        out["created"] = [r[0] for r in made]
    return out


def apply_migrations_up_to(url: str, version: int) -> None:
    """The schema as of ``version`` (0001 .. version), recorded as ``outbox-relay migrate`` does."""
    import psycopg

    from relay.pg.migrations import available
    from relay.pg.store import queries

    with psycopg.connect(url) as conn:
        conn.execute(queries()["migrations_bootstrap"])
        for m in available()[:version]:
            conn.execute(m.sql.encode())
            conn.execute(
                "insert into outbox.schema_migrations (version, name, checksum) values (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
        conn.commit()


# -- measuring commands ---------------------------------------------------------------------
_DURATION = re.compile(r"duration: ([0-9.]+) ms\s+(?:(parse|bind|execute|statement)[^:]*:\s*)?(.*)")


class ServerLog:
    """Statement durations the server logs for sessions started with PGOPTIONS below."""

    PGOPTIONS = "-c log_min_duration_statement=0"
    # One more run, not measured: the plans (EXPLAIN ANALYZE) of its statements that took 20 ms or more.
    EXPLAIN = (
        "-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=20"
        " -c auto_explain.log_analyze=on -c auto_explain.log_buffers=on"
        " -c auto_explain.log_nested_statements=on"
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self.plans: list[list[str]] = []

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def since(self, offset: int) -> tuple[float, list[tuple[float, str]]]:
        """Total statement time (ms) logged after ``offset`` and each statement's time."""
        with contextlib.suppress(OSError), self.path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
            found: list[tuple[float, str]] = []
            plan: list[str] | None = None
            for line in text.splitlines():
                m = _DURATION.search(line)
                if m and m.group(3).startswith("plan:"):  # auto_explain's: not a statement of its own
                    plan = [line[m.start() :]]
                    self.plans.append(plan)
                elif m:
                    plan = None
                    found.append((float(m.group(1)), f"{m.group(2) or ''} {m.group(3)}".strip()))
                elif line.startswith("\t") and plan is not None:
                    plan.append(line.rstrip())
                elif found and line.startswith("\t") and len(found[-1][1]) < 160:
                    found[-1] = (found[-1][0], f"{found[-1][1]} {line.strip()}"[:160])
                else:
                    plan = None
            return sum(d for d, _ in found), found
        return 0.0, []

    def take_plans(self) -> list[str]:
        plans, self.plans = self.plans, []
        return ["\n".join(p)[:6000] for p in plans]


def run_command(
    args: list[str], url: str, log: ServerLog | None, timeout: float = 600.0, explain: bool = False
) -> dict[str, Any]:
    """``outbox-relay ARGS`` once: exit code, wall seconds, bytes written, statement time."""
    env = bl.child_env(RELAY_DATABASE_URL=url, RELAY_LOG_LEVEL="WARNING")
    if log:
        env["PGOPTIONS"] = ServerLog.PGOPTIONS + (" " + ServerLog.EXPLAIN if explain else "")
    offset = log.mark() if log else 0
    started = time.perf_counter()
    proc = subprocess.run([*OUTBOX_RELAY, *args], cwd=bl.REPO, env=env, capture_output=True, timeout=timeout)
    wall = time.perf_counter() - started
    out: dict[str, Any] = {
        "exit": proc.returncode,
        "wall_s": round(wall, 4),
        "stdout_bytes": len(proc.stdout),
        "stdout_lines": proc.stdout.count(b"\n"),
        "stderr": proc.stderr.decode(errors="replace")[-3000:],
    }
    if log:
        time.sleep(0.05)  # the server writes its log lines as the statements end
        total, statements = log.since(offset)
        out["queries_ms"] = round(total, 3)
        out["statements"] = sorted(statements, reverse=True)[:6]
    return out


def compare_command(
    ctx: Any, args: list[str], urls: dict[str, str], log: ServerLog, expect: tuple[int, ...] = (0,)
) -> dict[str, Any]:
    """The command on each database, interleaved, ``REPEAT`` times (after one warm-up each)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for url in urls.values():
        run_command(args, url, None)  # warm-up: page cache, byte-compiled modules
    ctx.quiet()
    window = bl.CpuWindow()
    for _ in range(REPEAT):
        for name, url in urls.items():
            run = run_command(args, url, log)
            if run["exit"] not in expect:
                raise BenchError(
                    f"outbox-relay {' '.join(args)} on {name} exited {run['exit']}: {run['stderr']}"
                )
            runs[name].append(run)
    usage = window.read()
    out: dict[str, Any] = {"command": "outbox-relay " + " ".join(args)}
    log.take_plans()
    run_command(args, urls["big"], log, explain=True)
    out["plans_big"] = log.take_plans()
    for name, rs in runs.items():
        walls = sorted(r["wall_s"] for r in rs)
        queries = sorted(r["queries_ms"] for r in rs)
        slowest = max(rs, key=lambda r: r["queries_ms"])
        out[name] = {
            "wall_s": round(statistics.median(walls), 3),
            "runs_wall_s": walls,
            "queries_ms": round(statistics.median(queries), 2),
            "runs_queries_ms": queries,
            "stdout_lines": rs[0]["stdout_lines"],
            "stdout_bytes": rs[0]["stdout_bytes"],
            "statements_slowest_run": slowest["statements"],
        }
    if "big" in out and "empty" in out:
        out["ratio_wall"] = round(out["big"]["wall_s"] / out["empty"]["wall_s"], 2)
    out["other_cores"] = usage["other_cores"]
    out["steal_cores"] = usage["steal_cores"]
    say(
        f"  {out['command']}: {out['big']['wall_s']} s (queries {out['big']['queries_ms']} ms) vs empty "
        f"{out['empty']['wall_s']} s ({out['empty']['queries_ms']} ms); "
        f"other load {usage['other_cores']} cores"
    )
    return out


def compare_query(ctx: Any, sql: str, params: Any, urls: dict[str, str]) -> dict[str, Any]:
    """One SQL statement on each database, interleaved, ``QUERY_REPEAT`` times, median; and its
    EXPLAIN (ANALYZE, BUFFERS) on the big one."""
    import psycopg

    conns = {name: psycopg.connect(url, autocommit=True) for name, url in urls.items()}
    try:
        times: dict[str, list[float]] = {name: [] for name in urls}
        rows: dict[str, int] = {}
        ctx.quiet()
        window = bl.CpuWindow()
        for i in range(QUERY_REPEAT + 5):
            for name, conn in conns.items():
                started = time.perf_counter()
                rows[name] = len(conn.execute(sql, params).fetchall())
                if i >= 5:
                    times[name].append(1000 * (time.perf_counter() - started))
        usage = window.read()
        plan = conns["big"].execute("explain (analyze, buffers) " + sql, params).fetchall()
        out: dict[str, Any] = {"query": " ".join(sql.split()), "other_cores": usage["other_cores"]}
        for name, ts in times.items():
            out[name] = {
                "median_ms": round(statistics.median(ts), 3),
                "max_ms": round(max(ts), 3),
                "rows": rows[name],
            }
        out["explain_big"] = [r[0] for r in plan]
        say(
            f"  query {out['query'][:70]}: {out['big']['median_ms']} ms "
            f"vs empty {out['empty']['median_ms']} ms"
        )
        return out
    finally:
        for conn in conns.values():
            conn.close()


# -- sizes and dead tuples --------------------------------------------------------------------
SIZES_SQL = """
with tables as (
    select c.oid, c.relname, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = 'outbox' and c.relkind in ('r', 'p') and not c.relispartition
), parts as (
    select t.relname as table_name, p.relid
    from tables t cross join lateral pg_partition_tree(t.oid) p where p.isleaf and t.relkind = 'p'
    union all
    select t.relname, t.oid from tables t where t.relkind = 'r'
)
select table_name, sum(pg_total_relation_size(relid))::bigint, sum(pg_relation_size(relid))::bigint,
       sum(pg_indexes_size(relid))::bigint, count(*)
from parts group by table_name order by 2 desc
"""
INDEX_SIZES_SQL = """
with idx as (
    select i.indexrelid, ic.relname as index_name, t.relname as table_name, ic.relkind
    from pg_index i join pg_class ic on ic.oid = i.indexrelid join pg_class t on t.oid = i.indrelid
    join pg_namespace n on n.oid = t.relnamespace
    where n.nspname = 'outbox' and not ic.relispartition
), leaves as (
    select idx.table_name, idx.index_name, p.relid
    from idx cross join lateral pg_partition_tree(idx.indexrelid) p where idx.relkind = 'I' and p.isleaf
    union all
    select table_name, index_name, indexrelid from idx where relkind = 'i'
)
select table_name, index_name, sum(pg_relation_size(relid))::bigint
from leaves group by table_name, index_name order by 3 desc
"""


def sizes(url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        tables = {
            r[0]: {"total_bytes": r[1], "heap_bytes": r[2], "indexes_bytes": r[3], "partitions": r[4]}
            for r in conn.execute(SIZES_SQL).fetchall()
        }
        indexes = [
            {"table": r[0], "index": r[1], "bytes": r[2]} for r in conn.execute(INDEX_SIZES_SQL).fetchall()
        ]
        db = conn.execute("select pg_database_size(current_database())").fetchone()[0]
    return {"tables": tables, "indexes": indexes, "database_bytes": db}


def updates_health(url: str) -> dict[str, Any]:
    """action_status_updates: live and dead tuples (statistics), heap and total size."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select pg_stat_force_next_flush()")
        row = conn.execute(
            "select n_live_tup, n_dead_tup, pg_relation_size(relid), pg_total_relation_size(relid),"
            " last_vacuum, last_autovacuum"
            " from pg_stat_user_tables where schemaname = 'outbox' and relname = 'action_status_updates'"
        ).fetchone()
        indexes = dict(
            conn.execute(
                "select indexrelid::regclass::text, pg_relation_size(indexrelid) from pg_index"
                " where indrelid = 'outbox.action_status_updates'::regclass order by 1"
            ).fetchall()
        )
    return {
        "indexes_bytes": indexes,
        "n_live_tup": row[0],
        "n_dead_tup": row[1],
        "heap_bytes": row[2],
        "total_bytes": row[3],
        "last_vacuum": str(row[4]) if row[4] else None,
        "last_autovacuum": str(row[5]) if row[5] else None,
    }


# -- writers and lock samples during a long operation ------------------------------------------
class Watch:
    """While an operation runs: a writer inserting one update per 10 ms, a probe inserting one
    attempt row per 10 ms (as the relay records one), each insert's time; and samples of pg_locks
    held or awaited by every other session (the operation's)."""

    def __init__(self, url: str, probe_update_id: int) -> None:
        self.url = url
        self.probe_update_id = probe_update_id
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.waits: dict[str, list[float]] = {"writer": [], "probe": []}
        self.errors: list[str] = []
        self.ours: set[int] = set()
        self.locks: dict[tuple[str, str, bool], list[float]] = {}
        self.samples = 0
        self.t0 = 0.0

    def __enter__(self) -> Watch:
        self.t0 = time.monotonic()
        for name, target in (("writer", self._writer), ("probe", self._probe), ("locks", self._sampler)):
            thread = threading.Thread(target=self._guard, args=(name, target), daemon=True)
            thread.start()
            self.threads.append(thread)
        deadline = time.monotonic() + 10
        while len(self.ours) < 3 and time.monotonic() < deadline and not self.errors:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(30)
        self._name_new_relations()

    def _name_new_relations(self) -> None:
        """Relations created inside the operation's transaction had no name in the samples (only
        their oid): named now that it has committed (those dropped since stay an oid)."""
        import psycopg

        oids = {int(key[0].split(":")[1]) for key in self.locks if key[0].split(":")[1].isdigit()}
        if not oids:
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            names = dict(
                conn.execute(
                    "select oid::bigint, relname from pg_class where oid = any(%s)", (list(oids),)
                ).fetchall()
            )
        renamed: dict[tuple[str, str, bool], list[float]] = {}
        for (rel, mode, granted), seen in self.locks.items():
            who, _, name = rel.partition(":")
            if name.isdigit():
                name = (
                    f"{names[int(name)]} (created by it)"
                    if int(name) in names
                    else f"oid {name} (dropped since)"
                )
            renamed.setdefault((f"{who}:{name}", mode, granted), []).extend(seen)
        self.locks = {k: sorted(v) for k, v in renamed.items()}

    def _guard(self, name: str, target: Callable[[Any], None]) -> None:
        import psycopg

        try:
            with psycopg.connect(self.url, autocommit=True, application_name=f"scale-{name}") as conn:
                self.ours.add(conn.info.backend_pid)
                target(conn)
        except Exception as exc:  # recorded, reported with the figures
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:300])

    def _paced(self, conn: Any, name: str, sql: str, params: Callable[[int], Any]) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            started = time.perf_counter()
            conn.execute(sql, params(n))
            self.waits[name].append(time.perf_counter() - started)
            n += 1
            next_at += PROBE_INTERVAL
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def _writer(self, conn: Any) -> None:
        tag = uuid.uuid4().hex[:8]
        self._paced(
            conn,
            "writer",
            "insert into outbox.action_status_updates (action_id, status, target)"
            " values (%s, 'SUCCESS', 'default')",
            lambda n: (f"watch-{tag}-{n}",),
        )

    def _probe(self, conn: Any) -> None:
        self._paced(
            conn,
            "probe",
            "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at,"
            " duration_ms, http_status, outcome, relay_id, reached_api)"
            " values (%s, 'watch-probe', 'default', %s, now(), 30.0, 503, 'retry', 'scale-probe',"
            " 'answered')",
            lambda n: (self.probe_update_id, n + 1),
        )

    def _sampler(self, conn: Any) -> None:
        while not self.stop_event.is_set():
            at = time.monotonic() - self.t0
            rows = conn.execute(
                "select l.pid, coalesce(c.relname, l.relation::text, l.locktype), l.mode, l.granted,"
                " a.backend_type"
                " from pg_locks l left join pg_class c on c.oid = l.relation"
                " left join pg_stat_activity a on a.pid = l.pid"
                " where l.pid <> pg_backend_pid() and l.locktype in ('relation', 'advisory')"
                " and (c.oid is null or c.relnamespace = 'outbox'::regnamespace)"
                " and l.database = (select oid from pg_database where datname = current_database())"
            ).fetchall()
            self.samples += 1
            for pid, rel, mode, granted, backend in rows:
                who = (
                    "watch"
                    if pid in self.ours
                    else "autovacuum"
                    if backend == "autovacuum worker"
                    else "operation"
                )
                if who == "watch" and granted:
                    continue
                key = (f"{who}:{rel}", mode, bool(granted))
                self.locks.setdefault(key, []).append(at)
            time.sleep(LOCK_SAMPLE)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": self.errors, "lock_samples": self.samples}
        for name, ws in self.waits.items():
            ws = sorted(ws)
            out[name] = {
                "inserts": len(ws),
                "max_ms": round(1000 * ws[-1], 1) if ws else None,
                "p99_ms": round(1000 * ws[int(0.99 * (len(ws) - 1))], 2) if ws else None,
                "median_ms": round(1000 * statistics.median(ws), 2) if ws else None,
            }
        locks = []
        for (rel, mode, granted), seen in self.locks.items():
            longest = run = LOCK_SAMPLE
            for a, b in itertools.pairwise(seen):
                run = run + (b - a) if b - a < 4 * LOCK_SAMPLE else LOCK_SAMPLE
                longest = max(longest, run)
            locks.append(
                {
                    "relation": rel,
                    "mode": mode,
                    "granted": granted,
                    "first_s": round(seen[0], 2),
                    "last_s": round(seen[-1], 2),
                    "samples": len(seen),
                    "longest_held_s": round(longest, 2),
                }
            )
        out["locks"] = sorted(locks, key=_lock_order)
        return out


def _lock_order(lk: dict[str, Any]) -> tuple[Any, ...]:
    """Waits first, then named relations before those known by oid only (a temporary table of
    the operation's own), the strongest modes, the longest held first."""
    return (
        lk["granted"],
        " oid " in lk["relation"].replace(":", " "),
        -MODES.index(lk["mode"]) if lk["mode"] in MODES else 0,
        -lk["longest_held_s"],
        lk["relation"],
    )


def _drop_partitions(url: str) -> dict[str, Any]:
    """``outbox.drop_old_attempts`` until it has nothing left to do, as the relay's cycle calls it."""
    import psycopg

    steps = []
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(1000):
            started = time.perf_counter()
            row = conn.execute(
                "select * from outbox.drop_old_attempts(%s::interval)", (_interval(RETENTION),)
            ).fetchone()
            if row is None:
                break
            steps.append(
                {
                    "partition": row[0],
                    "attempts": row[1],
                    "kept": row[2],
                    "s": round(time.perf_counter() - started, 3),
                }
            )
    return {"steps": steps}


def _interval(duration: str) -> str:
    return duration.replace("d", " days").replace("h", " hours")


def watch_call(
    label: str, url: str, fn: Callable[[], dict[str, Any]], probe_update_id: int
) -> dict[str, Any]:
    """``fn()`` under Watch: its wall time and result, the writers' waits, the locks."""
    with Watch(url, probe_update_id) as watch:
        time.sleep(0.5)
        window = bl.CpuWindow()
        started = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - started
        usage = window.read()
        time.sleep(0.5)
    out = {"label": label, "wall_s": round(wall, 3), **result, **watch.report()}
    out["other_cores"] = usage["other_cores"]
    out["steal_cores"] = usage["steal_cores"]
    say(
        f"  {label}: {wall:.1f}s; longest insert wait: writer {out['writer']['max_ms']} ms, "
        f"attempt probe {out['probe']['max_ms']} ms"
    )
    return out


def timed_with_watch(
    label: str, url: str, args: list[str], probe_update_id: int, timeout: float
) -> dict[str, Any]:
    """``outbox-relay ARGS`` under Watch; wall time, its output, the writers' waits, the locks."""
    with Watch(url, probe_update_id) as watch:
        time.sleep(0.5)  # the writers run at their pace before the operation starts
        window = bl.CpuWindow()
        run = run_command(args, url, None, timeout=timeout)
        usage = window.read()
        time.sleep(0.5)
    out = {"label": label, "command": "outbox-relay " + " ".join(args), **run, **watch.report()}
    out["other_cores"] = usage["other_cores"]
    out["steal_cores"] = usage["steal_cores"]
    say(
        f"  {label}: {run['wall_s']:.1f}s (exit {run['exit']}); longest insert wait: writer "
        f"{out['writer']['max_ms']} ms, attempt probe {out['probe']['max_ms']} ms"
    )
    if run["exit"] != 0:
        raise BenchError(f"{out['command']} exited {run['exit']}: {run['stderr']}")
    return out


# -- the step ------------------------------------------------------------------------------------
def _copy_rows(src_url: str, dst_url: str, ids: list[int]) -> None:
    """Copy updates (and their attempt rows) from one database to the other, ids kept."""
    import psycopg

    if not ids:
        return
    with psycopg.connect(src_url) as src, psycopg.connect(dst_url, autocommit=True) as dst:
        dst.execute("set session_replication_role = replica")
        for table, key in (("action_status_updates", "id"), ("delivery_attempts", "update_id")):
            cols = src.execute(
                "select column_name, data_type from information_schema.columns where table_schema = 'outbox'"
                " and table_name = %s and is_generated = 'NEVER' and not (column_name = 'id' and %s)"
                " order by ordinal_position",
                (table, table == "delivery_attempts"),
            ).fetchall()
            names = ", ".join(c for c, _ in cols)
            texts = ", ".join(f"{c}::text" if t in ("json", "jsonb") else c for c, t in cols)
            values = ", ".join(f"%s::{t}" if t in ("json", "jsonb") else "%s" for _, t in cols)
            rows = src.execute(f"select {texts} from outbox.{table} where {key} = any(%s)", (ids,)).fetchall()
            overriding = " overriding system value" if table == "action_status_updates" else ""
            with dst.cursor() as cur:
                cur.executemany(f"insert into outbox.{table} ({names}){overriding} values ({values})", rows)


def _vacuum_analyze(url: str) -> float:
    import psycopg

    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum (analyze) outbox.action_status_updates")
        conn.execute("vacuum (analyze) outbox.delivery_attempts")
        conn.execute("analyze")
    return round(time.monotonic() - started, 1)


def bench_scale(ctx: Any, measure_claims: Callable[[list[str], int], list[dict[str, Any]]]) -> dict[str, Any]:
    import psycopg

    from relay.dev.embedded import EmbeddedPostgres

    n_updates = ctx.sizes.get("scale_updates", SIZES["updates"])
    n_attempts = ctx.sizes.get("scale_attempts", SIZES["attempts"])
    n_upgrade = ctx.sizes.get("scale_upgrade_attempts", SIZES["upgrade_attempts"])
    now = dt.datetime.now(dt.UTC)
    plan = Plan(n_updates, n_attempts, now)
    upgrade_plan = Plan(max(100, n_upgrade // 3), n_upgrade, now) if n_upgrade else None
    load_settings = {
        "max_wal_size": "16GB",
        "checkpoint_timeout": "30min",
        "autovacuum": "off",
        "maintenance_work_mem": "1GB",
    }
    server = EmbeddedPostgres(fsync=False, settings=load_settings)
    out: dict[str, Any] = {
        "updates_requested": n_updates,
        "attempts_requested": n_attempts,
        "mix": "95% delivered at the first attempt, 4% delivered after retries, 1% dead; 10% of the "
        "reports FAILED with 1-3 errors; targets 80/15/5%; the attempts beyond one per update go to "
        f"the retried and dead rows ({1 + plan.per} or {2 + plan.per} each, at most 5 minutes apart)",
        "load_settings": {
            **load_settings,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        },
        "measure_settings": "fsync on, synchronous_commit on, autovacuum on, shared_buffers 128MB",
    }
    try:
        say(f"scale: loading {n_updates:,} updates / {n_attempts:,} attempts (fsync off while loading)")
        server.start()
        admin = server.url("postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in ("scale_big", "scale_empty", "scale_upgrade"):
                conn.execute(f"create database {name}")
            out["postgresql"] = conn.execute("select current_setting('server_version')").fetchone()[0]
        urls = {"empty": server.url("scale_empty"), "big": server.url("scale_big")}
        for url in urls.values():
            bl.migrate(url)
            out.setdefault("partitions", prepare_partitions(url))
        started = time.monotonic()
        out["load"] = load_history(urls["big"], plan, "big")
        if out["partitions"].get("partitioned"):
            with psycopg.connect(urls["big"], autocommit=True) as conn:
                t = time.monotonic()
                if _has_function(conn, "rollup_reports"):  # as the maintenance job has done all year
                    days = conn.execute("select count(*) from outbox.rollup_reports(1000)").fetchone()[0]
                    out["load"]["rollup_days"] = days
                    out["load"]["rollup_s"] = round(time.monotonic() - t, 1)
                    say(f"  big: rolled up {days} days of reports in {out['load']['rollup_s']}s")
        for url in urls.values():
            add_pending(url)
        # The rows the audit and dead list show, copied into the empty database: both answer alike.
        audit_g = plan.g_at(200, "retried")
        audited = f"{uuid.UUID(_md5(f'scale-{audit_g}'))}"
        with psycopg.connect(urls["big"]) as conn:
            dead_ids = [
                r[0]
                for r in conn.execute(
                    "select u.id from outbox.action_status_updates u join outbox.delivery_attempts d"
                    " on d.update_id = u.id and d.attempt = u.requests"
                    " where u.state = 'dead' and u.dead_at > now() - interval '7 days' and d.error_code = %s"
                    " order by u.dead_at desc limit 100",
                    (DEAD_CODE,),
                ).fetchall()
            ]
        _copy_rows(urls["big"], urls["empty"], [audit_g + 1, *dead_ids])
        out["audited_action"] = {"action_id": audited, "update_id": audit_g + 1, "created_days_ago": 200}
        out["dead_in_last_7d_with_code"] = len(dead_ids)
        if upgrade_plan:
            url = server.url("scale_upgrade")
            apply_migrations_up_to(url, 5)
            out["upgrade_load"] = load_history(url, upgrade_plan, "upgrade (0005)")
            add_pending(url)
        out["load_s"] = round(time.monotonic() - started, 1)
        vac = {name: _vacuum_analyze(url) for name, url in urls.items()}
        if upgrade_plan:
            vac["upgrade"] = _vacuum_analyze(server.url("scale_upgrade"))
        out["vacuum_analyze_s"] = vac
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("checkpoint")
        say(f"scale: loaded in {out['load_s']}s; restarting durable (fsync on, autovacuum on)")
        server.stop()
        os.sync()
        server.fsync = True
        server.settings = {"max_wal_size": "16GB", "checkpoint_timeout": "30min"}
        server.start()
        log = ServerLog(server.base_dir / "server.log")
        out["sizes_big"] = sizes(urls["big"])
        out["sizes_empty"] = sizes(urls["empty"])
        out["per_million"] = per_million(out["sizes_big"], out["load"])
        measure(ctx, out, urls, log, audited, measure_claims)
        retention(ctx, out, urls["big"], plan)
        if upgrade_plan:
            upgrade(ctx, out, server.url("scale_upgrade"))
        return out
    finally:
        server.cleanup()


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def per_million(found: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    tables = found["tables"]
    out = {}
    for table, count in (("action_status_updates", load["updates"]), ("delivery_attempts", load["attempts"])):
        if table in tables and count:
            out[table] = {
                "rows": count,
                "total_mb_per_million": round(tables[table]["total_bytes"] / 1048576 / (count / 1e6), 1),
                "heap_mb_per_million": round(tables[table]["heap_bytes"] / 1048576 / (count / 1e6), 1),
                "indexes_mb_per_million": round(tables[table]["indexes_bytes"] / 1048576 / (count / 1e6), 1),
            }
    return out


def measure(
    ctx: Any,
    out: dict[str, Any],
    urls: dict[str, str],
    log: ServerLog,
    audited: str,
    measure_claims: Callable[[list[str], int], list[dict[str, Any]]],
) -> None:
    say("scale: the claim, big vs empty (interleaved)")
    ctx.quiet()
    window = bl.CpuWindow()
    e, b = measure_claims([urls["empty"], urls["big"]], 300)
    usage = window.read()
    b["empty"] = e
    b["ratio_to_empty"] = round(b["median_ms"] / e["median_ms"], 2)
    b["other_cores"], b["steal_cores"] = usage["other_cores"], usage["steal_cores"]
    out["claim"] = b
    say(f"  claim: {b['median_ms']} ms vs {e['median_ms']} ms empty ({b['ratio_to_empty']} x)")
    cmds = out["commands"] = {}
    cmds["status"] = compare_command(ctx, ["status"], urls, log)
    cmds["status_json"] = compare_command(ctx, ["status", "--json"], urls, log)
    cmds["audit"] = compare_command(ctx, ["audit", audited], urls, log)
    cmds["dead_list"] = compare_command(
        ctx, ["dead", "list", "--code", DEAD_CODE, "--since", "7d"], urls, log
    )
    month_from, month_to = _last_full_month()
    out["month"] = {"from": month_from, "to": month_to}
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(urls["big"]) as conn:
            row = conn.execute(
                "select count(*) from outbox.action_status_updates"
                " where state = 'delivered' and delivered_at >= %s::date and delivered_at < %s::date + 1",
                (month_from, month_to),
            ).fetchone()
            out["month"]["delivered_updates"] = row[0]
    if _audit_has_range():
        cmds["audit_range_csv"] = compare_command(
            ctx, ["audit", "--from", month_from, "--to", month_to, "--csv"], urls, log
        )
    else:
        out["month"]["note"] = "this checkout's `audit` has no --from/--to: not measured"
    queries = out["queries"] = {}
    queries["delivery_audit"] = compare_query(
        ctx, "select * from outbox.delivery_audit where action_id = %s", (audited,), urls
    )
    import psycopg

    with psycopg.connect(urls["big"]) as conn:
        has_report = conn.execute("select to_regclass('outbox.delivery_report') is not null").fetchone()[0]
    if has_report:
        queries["delivery_report_month"] = compare_query(
            ctx,
            "select status, error_code, sum(reports) from outbox.delivery_report"
            " where day between %s and %s group by 1, 2",
            (month_from, month_to),
            urls,
        )


def _last_full_month() -> tuple[str, str]:
    """The first and the last day (inclusive, as `audit --from --to` takes them) of last month."""
    last = dt.datetime.now(dt.UTC).date().replace(day=1) - dt.timedelta(days=1)
    return last.replace(day=1).isoformat(), last.isoformat()


def _audit_has_range() -> bool:
    proc = subprocess.run(
        [*OUTBOX_RELAY, "audit", "--help"], cwd=bl.REPO, env=bl.child_env(), capture_output=True, text=True
    )
    return "--from" in proc.stdout and "--csv" in proc.stdout


def retention(ctx: Any, out: dict[str, Any], url: str, plan: Plan) -> None:
    """One retention cycle on the big database, under the writer and the probe."""
    import psycopg

    say(f"scale: one retention cycle (older than {RETENTION}) under a writer and an attempt probe")
    with psycopg.connect(url, autocommit=True) as conn:
        probe_id = conn.execute(
            "select min(id) from outbox.action_status_updates where state = 'pending'"
        ).fetchone()[0]
        before_counts = conn.execute(COUNTS).fetchone()
    with psycopg.connect(url, autocommit=True) as conn:  # the claims' rolled-back leftovers
        conn.execute("vacuum outbox.action_status_updates")
    ret: dict[str, Any] = {"older_than": RETENTION, "health_before": updates_health(url)}
    ctx.quiet()
    args = ["purge", "--older-than", RETENTION, "--include-dead"]
    ret["cycle"] = timed_with_watch("retention cycle", url, args, probe_id, timeout=3600)
    with psycopg.connect(url, autocommit=True) as conn:
        has_drop = _has_function(conn, "drop_old_attempts")
    if has_drop:  # what the command left of the attempt partitions' retention, one per transaction
        ret["partition_drop"] = watch_call("partition drop", url, lambda: _drop_partitions(url), probe_id)
    with psycopg.connect(url, autocommit=True) as conn:
        after_counts = conn.execute(COUNTS).fetchone()
        if has_drop:
            ret["partitions_left"] = [
                r[0] for r in conn.execute("select name from outbox.attempt_partitions").fetchall()
            ]
    ret["updates_before"], ret["attempts_before"] = before_counts
    ret["updates_after"], ret["attempts_after"] = after_counts
    ret["health_after"] = updates_health(url)
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum outbox.action_status_updates")
    ret["vacuum_s"] = round(time.monotonic() - started, 1)
    ret["health_after_vacuum"] = updates_health(url)
    # Write as many rows again (finished ones, as the history's): does the table grow?
    purged = int(before_counts[0]) - int(after_counts[0])
    ret["rewritten"] = max(0, purged)
    if purged > 0:
        started = time.monotonic()
        refill = Plan(max(100, purged), max(100, purged), dt.datetime.now(dt.UTC), days=1, prefix="refill-")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("set session_replication_role = replica")
            sql = updates_sql(conn, keep_ids=False)
            for lo in range(0, refill.updates, BATCH):
                hi = min(refill.updates, lo + BATCH) - 1
                conn.execute(sql, refill.params(lo, hi))
            conn.execute("set session_replication_role = origin")
        ret["rewrite_s"] = round(time.monotonic() - started, 1)
        ret["health_after_rewrite"] = updates_health(url)
    ret["sizes_after"] = sizes(url)
    out["retention"] = ret
    h0, h1, h2 = ret["health_before"], ret["health_after"], ret["health_after_vacuum"]
    h3 = ret.get("health_after_rewrite", h2)
    say(
        f"  action_status_updates: {h0['total_bytes'] / 1048576:.0f} MB / {h0['n_dead_tup']} dead before, "
        f"{h1['total_bytes'] / 1048576:.0f} MB / {h1['n_dead_tup']} dead after, "
        f"{h2['total_bytes'] / 1048576:.0f} MB / {h2['n_dead_tup']} after VACUUM, "
        f"{h3['total_bytes'] / 1048576:.0f} MB after {purged:,} rows written again"
    )


def upgrade(ctx: Any, out: dict[str, Any], url: str) -> None:
    """``outbox-relay migrate`` from 0005, under the writer and the probe."""
    import psycopg

    say("scale: outbox-relay migrate from 0005 on the upgrade copy")
    with psycopg.connect(url, autocommit=True) as conn:
        probe_id = conn.execute(
            "select min(id) from outbox.action_status_updates where state = 'pending'"
        ).fetchone()[0]
        version = conn.execute("select max(version) from outbox.schema_migrations").fetchone()[0]
        counts = conn.execute(COUNTS).fetchone()
    up: dict[str, Any] = {"from_version": version, "updates": counts[0], "attempts": counts[1]}
    up["sizes_before"] = sizes(url)
    ctx.quiet()
    up["migrate"] = timed_with_watch("migrate 0005 -> latest", url, ["migrate"], probe_id, timeout=3600)
    with psycopg.connect(url, autocommit=True) as conn:
        up["to_version"] = conn.execute("select max(version) from outbox.schema_migrations").fetchone()[0]
        up["attempts_after"] = conn.execute("select count(*) from outbox.delivery_attempts").fetchone()[0]
    up["sizes_after"] = sizes(url)
    out["upgrade"] = up


# -- the report ---------------------------------------------------------------------------------
def mb(value: Any) -> str:
    return "n/a" if value is None else f"{value / 1048576:,.0f} MB"


def markdown(s: dict[str, Any]) -> list[str]:
    """The scale section of bench/results/latest.md."""
    load = s.get("load", {})
    lines = [
        "",
        f"## Scale: {load.get('updates', 0):,} updates and {load.get('attempts', 0):,} attempt rows "
        "over a year",
        "",
        f"{s['mix']}. Loaded in {s.get('load_s')} s ({_settings(s['load_settings'])}); measured with "
        f'{s["measure_settings"]} after VACUUM ANALYZE. "empty": the same schema holding only the '
        f"{PENDING:,} pending rows and copies of the rows the audit and `dead list` show. "
        f"Commands: median of {REPEAT} runs each, interleaved; queries: median of {QUERY_REPEAT}.",
        "",
    ]
    lines += bl.md_table(
        ["figure", "target", "result", "met"],
        [
            [
                t["name"],
                t["target"],
                t["value"],
                "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**"),
            ]
            for t in targets(s)
        ],
    )
    lines += [""]
    rows = []
    claim = s.get("claim")
    if claim:
        rows.append(
            [
                f"claim (`updates_claim`, limit {100})",
                f"{claim['median_ms']} ms",
                f"{claim['empty']['median_ms']} ms",
                f"{claim['ratio_to_empty']} x",
                "-",
                f"{claim['other_cores']} / {claim['steal_cores']}",
            ]
        )
    for c in s.get("commands", {}).values():
        rows.append(
            [
                f"`{c['command']}`",
                f"{c['big']['wall_s']} s",
                f"{c['empty']['wall_s']} s",
                f"{c.get('ratio_wall')} x",
                f"{c['big']['queries_ms']} ms ({c['empty']['queries_ms']} ms)",
                f"{c['other_cores']} / {c['steal_cores']}",
            ]
        )
    for q in s.get("queries", {}).values():
        rows.append(
            [
                f"`{q['query'][:90]}`",
                f"{q['big']['median_ms']} ms",
                f"{q['empty']['median_ms']} ms",
                f"{q['big']['median_ms'] / q['empty']['median_ms']:.2f} x"
                if q["empty"]["median_ms"]
                else "n/a",
                "-",
                f"{q['other_cores']} / -",
            ]
        )
    lines += bl.md_table(
        ["measure", "big", "empty", "ratio", "queries' time big (empty)", "other load / steal (cores)"], rows
    )
    for c in s.get("commands", {}).values():
        top = c["big"]["statements_slowest_run"][:1]
        if c["big"]["queries_ms"] >= 100 and top:
            lines += [
                "",
                f"Where `{c['command']}`'s statement time goes (its slowest run): {top[0][0]:.0f} ms in "
                f"`{' '.join(top[0][1].split())[:150]}...`; its plan (EXPLAIN ANALYZE, by auto_explain in "
                "one more run) is in scale.json, `plans_big`.",
            ]
    month = s.get("month")
    if month:
        lines += [
            "",
            f"The month {month['from']} .. {month['to']} holds "
            f"{month.get('delivered_updates', 0):,} delivered updates.",
        ]
    ret = s.get("retention")
    if ret:
        c = ret["cycle"]
        lines += [
            "",
            f"### Retention cycle: `{c['command']}`",
            "",
            f"{c['wall_s']:.1f} s; updates {ret['updates_before']:,} -> {ret['updates_after']:,}, attempts "
            f"{ret['attempts_before']:,} -> {ret['attempts_after']:,}. Meanwhile one update inserted per "
            f"10 ms: longest {c['writer']['max_ms']} ms (p99 {c['writer']['p99_ms']} ms, "
            f"{c['writer']['inserts']:,} inserts); one attempt row inserted per 10 ms: longest "
            f"{c['probe']['max_ms']} ms (p99 {c['probe']['p99_ms']} ms).",
            "",
        ]
        hs = [
            ("before", ret["health_before"]),
            ("after the cycle", ret["health_after"]),
            (f"after VACUUM ({ret['vacuum_s']} s)", ret["health_after_vacuum"]),
        ]
        if "health_after_rewrite" in ret:
            hs.append((f"after {ret['rewritten']:,} rows written again", ret["health_after_rewrite"]))
        lines += bl.md_table(
            ["action_status_updates", "live tuples", "dead tuples", "heap", "indexes", "with indexes"],
            [
                [
                    n,
                    f"{h['n_live_tup']:,}",
                    f"{h['n_dead_tup']:,}",
                    mb(h["heap_bytes"]),
                    mb(sum(h["indexes_bytes"].values())),
                    mb(h["total_bytes"]),
                ]
                for n, h in hs
            ],
        )
        lines += ["", "Locks the cycle held (sampled every 50 ms):", ""]
        lines += _locks_table(c)
        said = re.findall(r"dropped (\S+): ([\d,]+) attempt row\(s\), ([\d,]+) kept", c.get("stderr", ""))
        if said:
            lines += ["", "The attempt partitions it dropped (its last lines of output):", ""]
            lines += bl.md_table(["partition", "rows", "kept"], [list(x) for x in said])
        d = ret.get("partition_drop")
        if d and d["steps"]:
            dropped = sum(st["attempts"] - st["kept"] for st in d["steps"])
            kept = sum(st["kept"] for st in d["steps"])
            longest = max((st["s"] for st in d["steps"]), default=0.0)
            lines += [
                "",
                f"Then `outbox.drop_old_attempts('{_interval(RETENTION)}')` until nothing is left (what the "
                f"command left of it): {len(d['steps'])} steps in {d['wall_s']:.1f} s, the longest "
                f"{longest} s; {dropped:,} attempt rows dropped, {kept:,} kept. Meanwhile the writer waited "
                f"at most {d['writer']['max_ms']} ms, the attempt probe {d['probe']['max_ms']} ms.",
                "",
            ]
            lines += bl.md_table(
                ["partition", "rows", "kept", "seconds"],
                [[st["partition"], f"{st['attempts']:,}", f"{st['kept']:,}", st["s"]] for st in d["steps"]],
            )
            lines += ["", "Locks held meanwhile:", ""]
            lines += _locks_table(d)
    up = s.get("upgrade")
    if up:
        m = up["migrate"]
        lines += [
            "",
            f"### Upgrade: `outbox-relay migrate` {up['from_version']} -> {up['to_version']}, "
            f"{up['attempts']:,} attempt rows ({up['updates']:,} updates)",
            "",
            f"{m['wall_s']:.1f} s. Meanwhile one update inserted per 10 ms: longest "
            f"{m['writer']['max_ms']} ms; "
            f"one attempt row per 10 ms (the relay's record): longest {m['probe']['max_ms']} ms.",
            "",
        ]
        lines += _locks_table(m)
    sz = s.get("sizes_big")
    if sz:
        lines += ["", "### Sizes (big database)", ""]
        lines += bl.md_table(
            ["table", "with indexes", "heap", "indexes", "partitions"],
            [
                [t, mb(v["total_bytes"]), mb(v["heap_bytes"]), mb(v["indexes_bytes"]), v["partitions"]]
                for t, v in sz["tables"].items()
            ],
        )
        lines += [""]
        lines += bl.md_table(
            ["index", "table", "size"], [[i["index"], i["table"], mb(i["bytes"])] for i in sz["indexes"]]
        )
        pm = s.get("per_million", {})
        if pm:
            lines += [""]
            lines += bl.md_table(
                ["per million rows", "with indexes", "heap", "indexes"],
                [
                    [
                        t,
                        f"{v['total_mb_per_million']} MB",
                        f"{v['heap_mb_per_million']} MB",
                        f"{v['indexes_mb_per_million']} MB",
                    ]
                    for t, v in pm.items()
                ],
            )
    return lines


def _settings(found: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in found.items())


def _locks_table(run: dict[str, Any]) -> list[str]:
    rows = [
        [
            lk["relation"],
            lk["mode"],
            "held" if lk["granted"] else "**waited**",
            f"{lk['longest_held_s']} s",
            f"{lk['first_s']}-{lk['last_s']} s",
        ]
        for lk in sorted(run["locks"], key=_lock_order)[:25]
    ]
    lines = bl.md_table(["relation", "mode", "", "longest stretch", "seen (s after start)"], rows)
    if len(run["locks"]) > 25:
        lines.append(f"| ... {len(run['locks']) - 25} weaker or shorter ones in latest.json | | | | |")
    return lines


def targets(s: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets for the scale step, each with the measured value and met / missed."""
    out: list[dict[str, Any]] = []
    if not s:
        return out
    rows = f"{s.get('load', {}).get('updates', 0):,} updates"

    def add(name: str, target: str, value: str, met: bool | None) -> None:
        out.append({"name": f"{name} ({rows})", "target": target, "value": value, "met": met})

    claim = s.get("claim")
    if claim:
        add(
            "claim / empty table",
            "<= 1.2 x",
            f"{claim['ratio_to_empty']:.2f} x ({claim['median_ms']} vs {claim['empty']['median_ms']} ms)",
            claim["ratio_to_empty"] <= 1.2,
        )
    cmds = s.get("commands", {})
    st = cmds.get("status")
    if st:
        big, empty = st["big"]["wall_s"], st["empty"]["wall_s"]
        add(
            "`outbox-relay status`",
            "<= 0.5 s and <= 2 x empty",
            f"{big} s, {st['ratio_wall']} x empty ({empty} s); queries {st['big']['queries_ms']} ms",
            big <= 0.5 and big <= 2 * empty,
        )
    q = s.get("queries", {}).get("delivery_audit")
    if q:
        add(
            "`delivery_audit where action_id = ...`",
            "<= 20 ms",
            f"{q['big']['median_ms']} ms",
            q["big"]["median_ms"] <= 20,
        )
    au = cmds.get("audit")
    if au:
        add(
            "`outbox-relay audit ACTION_ID`: queries (command)",
            "<= 20 ms",
            f"{au['big']['queries_ms']} ms ({au['big']['wall_s']} s)",
            au["big"]["queries_ms"] <= 20,
        )
    dl = cmds.get("dead_list")
    if dl:
        add(
            "`dead list --code X --since 7d`: queries (command)",
            "<= 100 ms",
            f"{dl['big']['queries_ms']} ms ({dl['big']['wall_s']} s)",
            dl["big"]["queries_ms"] <= 100,
        )
    ar = cmds.get("audit_range_csv")
    if ar:
        add(
            "`audit --from --to --csv`, one month",
            "< 2 s",
            f"{ar['big']['wall_s']} s (queries {ar['big']['queries_ms']} ms)",
            ar["big"]["wall_s"] < 2,
        )
    ret = s.get("retention")
    if ret:
        h0, h3 = ret["health_before"], ret.get("health_after_rewrite")
        add(
            "retention cycle: `purge`",
            "seconds; locks",
            f"{ret['cycle']['wall_s']:.1f} s; writer waited <= {ret['cycle']['writer']['max_ms']} ms, "
            f"attempt probe <= {ret['cycle']['probe']['max_ms']} ms",
            None,
        )
        d = ret.get("partition_drop")
        if d and d["steps"]:
            add(
                "retention cycle: attempt partitions dropped",
                "seconds; locks",
                f"{d['wall_s']:.1f} s ({len(d['steps'])} steps); "
                f"writer waited <= {d['writer']['max_ms']} ms, "
                f"attempt probe <= {d['probe']['max_ms']} ms",
                None,
            )
        if h3:
            add(
                "action_status_updates heap after purge + VACUUM + as many rows again",
                "no growth",
                f"heap {mb(h0['heap_bytes'])} -> {mb(h3['heap_bytes'])}; with indexes "
                f"{mb(h0['total_bytes'])} -> {mb(h3['total_bytes'])}",
                h3["heap_bytes"] <= 1.05 * h0["heap_bytes"],
            )
    up = s.get("upgrade")
    if up:
        m = up["migrate"]
        add(
            f"migrate 0005 -> {up['to_version']} with {up['attempts']:,} attempts",
            "seconds; waits",
            f"{m['wall_s']:.1f} s; writer waited <= {m['writer']['max_ms']} ms, "
            f"attempt insert <= {m['probe']['max_ms']} ms",
            None,
        )
    return out
