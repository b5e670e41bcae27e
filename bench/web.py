"""The web step of ``bench/run.py``: the audit console's pages on a year of history.

``bench_web(ctx)`` (``python bench/run.py --only web``; skipped by ``--quick``):

1. A fresh embedded PostgreSQL, loaded fast (fsync and autovacuum off) with bench/scale.py's
   generator and sizes (``--scale-updates``, ``--scale-attempts``: 10 million updates, 30 million
   attempt rows over the last 365 days; its ``Plan``, ``prepare_partitions``, ``load_history``),
   the report rollup run for the year and 1,000 pending rows on top: ``web_big``. ``web_empty``
   has the same schema, its own 1,000 pending rows and copies of the rows the measured pages show
   (the timeline's update with its attempts, the lists' rows, the exported day), so that both
   render the same pages and the ratio is the cost of the table's size. VACUUM ANALYZE, then
   restarted durable (fsync on, autovacuum on).
2. One console process per database, as an operator starts it (``python -m relay web --listen
   127.0.0.1:PORT``, ``RELAY_DATABASE_URL``), its sessions logging their statements' durations.
   Each page is requested over loopback with httpx (one keep-alive client per console, cookie and
   CSRF field as a browser has them), ``WARMUP`` times on each, then ``--web-repeat`` times on
   big and empty in turn: the time until the whole body is read, median and p95; the statements'
   time per request from the server's log; the console's CPU.
3. A third console on big with auto_explain: each page once more, the plans (EXPLAIN ANALYZE,
   BUFFERS) of the statements it ran, for the report of a page that misses its target.

Figures are returned (and recorded by bench/run.py in bench/results/web.json and the "Web
console" section of latest.md), never asserted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import math
import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import benchlib as bl
import scale
from benchlib import BenchError, say

SECTION = "## Web console"  # its section of bench/results/latest.md, kept by runs without the step
TARGET_MS = 150.0  # the issue: each page answers in at most 150 ms
REPEAT = 30  # measured requests per page and database
WARMUP = 2
# Between two requests, as a person clicking leaves: back to back on one keep-alive connection
# (under ~40 ms apart), a response the console writes in two sends waits for the client's delayed
# ACK (see back_to_back()), which a person never meets.
PAUSE = 0.1
LISTED = 50  # action ids pasted into the search box
DAYS_AGO = 200  # the timeline's update and the day of the date-range list
LIST_TARGET = "marketplace-eu"
DEAD_CODE = scale.DEAD_CODE
RARE_CODE = "HTTP_404"  # one of the four dead codes: 0.25% of the rows
ABSENT_CODE = "HTTP_429"  # no row has it: the list reads its bounded scan and stops
REDRIVE_TARGET = "default"
LOAD_SETTINGS = {
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "autovacuum": "off",
    "maintenance_work_mem": "1GB",
}
MEASURE_SETTINGS = {"max_wal_size": "16GB", "checkpoint_timeout": "30min"}
LOG_STATEMENTS = "-c log_min_duration_statement=0"
EXPLAIN = LOG_STATEMENTS + " " + scale.ServerLog.EXPLAIN.replace("log_min_duration=20", "log_min_duration=0")
_DURATION = re.compile(
    r"\] (\w+): LOG:  duration: ([0-9.]+) ms\s+(?:(parse|bind|execute|statement)[^:]*:\s*)?(.*)"
)


# -- the console process ------------------------------------------------------------------------
class Console:
    """``python -m relay web --listen 127.0.0.1:PORT`` on one database, stopped by its pid."""

    def __init__(self, name: str, url: str, log_dir: Path, pgoptions: str) -> None:
        self.name = name
        self.port = bl.free_port()
        self.env = bl.child_env(RELAY_DATABASE_URL=url, PGOPTIONS=pgoptions)
        self.log_path = log_dir / f"web-{name}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Console:
        """Start it and wait until it says where it listens and the port answers."""
        self.proc = subprocess.Popen(
            [bl.PYTHON, "-m", "relay", "web", "--listen", f"127.0.0.1:{self.port}"],
            cwd=bl.REPO,
            env=self.env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"web console ({self.name}) exited {self.proc.returncode}: {self.log_tail()}"
                )
            if "outbox-relay web: http" in self.log_tail(20_000):
                bl.wait_port(self.port, max(1.0, deadline - time.monotonic()))
                return self
            time.sleep(0.05)
        raise BenchError(f"web console ({self.name}) not ready in {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def cpu(self) -> float:
        return bl.proc_cpu(self.proc.pid) if self.proc else 0.0

    def rss_mb(self) -> float:
        return (bl.proc_status_kb(self.proc.pid, "VmRSS") or 0) / 1024 if self.proc else 0.0

    def stop(self) -> None:
        bl.stop_process(self.proc, signal.SIGTERM, 20)


# -- the pages ----------------------------------------------------------------------------------
class Request:
    """One page as the bench asks for it: method, path (per database when they differ), form."""

    def __init__(
        self,
        key: str,
        label: str,
        path: str | dict[str, str],
        *,
        method: str = "GET",
        form: dict[str, str] | None = None,
        expect: int = 200,
        stream: bool = False,
        runs: list[str] | None = None,
    ) -> None:
        self.key, self.label, self.method, self.form = key, label, method, form
        self.paths = path if isinstance(path, dict) else {"big": path, "empty": path}
        self.expect, self.stream = expect, stream
        self.runs = runs or []  # the statements (relay/web/queries.sql, the store's) it runs

    def send(self, client: Any, db: str, csrf: str | None) -> dict[str, Any]:
        """Send it once; the time to the whole body (and, streamed, to its first byte)."""
        path = self.paths[db]
        form = {**self.form, "csrf": csrf or ""} if self.form is not None else None
        started = time.perf_counter()
        first = None
        if self.stream:
            with client.stream(self.method, path, data=form) as answer:
                size = 0
                lines = 0
                for chunk in answer.iter_raw():
                    if first is None and chunk:
                        first = time.perf_counter()
                    size += len(chunk)
                    lines += chunk.count(b"\n")
                ended = time.perf_counter()
                status, body = answer.status_code, b""
        else:
            answer = client.request(self.method, path, data=form)
            ended = time.perf_counter()
            status, body, size = answer.status_code, answer.content, len(answer.content)
            lines = 0
        if status != self.expect:
            text = body.decode(errors="replace")
            found = re.search(r"<main.*?</main>", text, re.DOTALL)
            raise BenchError(
                f"web {self.key} on {db}: {self.method} {path} answered {status}, not {self.expect}: "
                f"{(found.group(0) if found else text)[:400]}"
            )
        out: dict[str, Any] = {"ms": 1000 * (ended - started), "bytes": size}
        if first is not None:
            out["first_byte_ms"] = 1000 * (first - started)
        if self.stream:
            out["csv_rows"] = max(0, lines - 1)
        else:
            out["table_rows"] = len(re.findall(rb"<tr[ >]", body)) - body.count(b"<thead><tr")
            out["location"] = answer.headers.get("location")
        return out


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(runs: list[dict[str, Any]], key: str = "ms") -> dict[str, Any]:
    times = [r[key] for r in runs]
    return {
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
        "runs_ms": [round(t, 2) for t in times],
    }


# -- the server's log ---------------------------------------------------------------------------
class StatementLog:
    """Statement durations the console sessions log (``log_min_duration_statement=0``), by database
    (``log_line_prefix`` names it)."""

    PREFIX = "%m [%p] %d: "

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def since(self, offset: int) -> dict[str, list[tuple[float, str, bool]]]:
        """Each database's statements logged after ``offset``: (ms, text, whether it is a statement's
        last step: ``execute`` of the extended protocol, or a simple query), in order."""
        found: dict[str, list[tuple[float, str, bool]]] = {}
        with contextlib.suppress(OSError), self.path.open("rb") as fh:
            fh.seek(offset)
            last: list[tuple[float, str, bool]] | None = None
            for line in fh.read().decode(errors="replace").splitlines():
                m = _DURATION.search(line)
                if m and not m.group(4).startswith("plan:"):
                    last = found.setdefault(m.group(1), [])
                    last.append((float(m.group(2)), m.group(4), m.group(3) in (None, "execute", "statement")))
                elif m:
                    last = None
                elif last and line.startswith("\t") and len(last[-1][1]) < 200:
                    ms, text, done = last[-1]
                    last[-1] = (ms, f"{text} {line.strip()}"[:200], done)
                else:
                    last = None
        return found


# -- loading ------------------------------------------------------------------------------------
def _columns(conn: Any, table: str) -> list[str]:
    rows = conn.execute(
        "select column_name from information_schema.columns where table_schema = 'outbox'"
        " and table_name = %s and is_generated = 'NEVER' order by ordinal_position",
        (table,),
    ).fetchall()
    return [r[0] for r in rows]


def copy_updates(src_url: str, dst_url: str, ids: list[int]) -> int:
    """Copy updates (not their attempts) by id with COPY, ids kept, triggers off."""
    import psycopg
    from psycopg import sql

    if not ids:
        return 0
    with psycopg.connect(src_url) as src, psycopg.connect(dst_url, autocommit=True) as dst:
        dst.execute("set session_replication_role = replica")
        cols = sql.SQL(", ").join(map(sql.Identifier, _columns(src, "action_status_updates")))
        out = sql.SQL(
            "copy (select {} from outbox.action_status_updates where id = any({})) to stdout"
        ).format(cols, sql.Literal(sorted(set(ids))))
        into = sql.SQL("copy outbox.action_status_updates ({}) from stdin").format(cols)
        with src.cursor() as sc, dst.cursor() as dc, sc.copy(out) as reader, dc.copy(into) as writer:
            for data in reader:
                writer.write(data)
    return len(set(ids))


def choose(plan: scale.Plan, big: str) -> dict[str, Any]:
    """What the pages ask for, read from big: the update of the timeline (retried ~200 days ago,
    with its many attempts), a prefix that a few action ids start with, 50 action ids spread over
    the year, the day ~200 days ago; and the ids of every row the pages show (copied into empty)."""
    import psycopg

    g = plan.g_at(DAYS_AGO, "retried")
    day = (plan.now - dt.timedelta(days=DAYS_AGO)).date()
    with psycopg.connect(big, autocommit=True) as conn:
        row = conn.execute(
            "select id, action_id, requests from outbox.action_status_updates where id = %s", (g + 1,)
        ).fetchone()
        if row is None:
            raise BenchError(f"web: update {g + 1} is missing from the loaded history")
        update_id, action_id, requests = row
        length = max(1, round(math.log(max(16, plan.updates / 10), 16)))  # ~10 action ids start with it
        prefix = action_id[:length]
        like = prefix + "%"
        matches = conn.execute(
            "select id from outbox.action_status_updates where action_id like %s", (like,)
        ).fetchall()
        spread = [k * plan.updates // LISTED + 7 for k in range(LISTED)]
        listed = conn.execute(
            "select id, action_id from outbox.action_status_updates where id = any(%s) order by id",
            ([i + 1 for i in spread],),
        ).fetchall()
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        day_ids = conn.execute(
            "select id from outbox.action_status_updates where created_at >= %s and created_at < %s",
            (start, start + dt.timedelta(days=1)),
        ).fetchall()
        dead_code = conn.execute(
            "select id from outbox.action_status_updates where state = 'dead' and last_error_code = %s"
            " order by dead_at desc, id desc limit 60",
            (DEAD_CODE,),
        ).fetchall()
        delivered = conn.execute(
            "select id from outbox.action_status_updates where state = 'delivered' and target = %s"
            " order by created_at desc, id desc limit 60",
            (LIST_TARGET,),
        ).fetchall()
        rare = conn.execute(
            "select id from (select id, last_error_code from outbox.action_status_updates"
            " order by created_at desc, id desc limit 25000) as s where last_error_code = %s",
            (RARE_CODE,),
        ).fetchall()
        dead_filter = conn.execute(
            "select count(*) from outbox.action_status_updates where state = 'dead' and target = %s"
            " and last_error_code = %s",
            (REDRIVE_TARGET, DEAD_CODE),
        ).fetchone()
    copied = {r[0] for rows in (matches, listed, day_ids, dead_code, delivered, rare) for r in rows}
    copied.discard(update_id)
    return {
        "update_id": update_id,
        "action_id": action_id,
        "attempts": requests,
        "created_days_ago": DAYS_AGO,
        "prefix": prefix,
        "prefix_matches": len(matches),
        "listed": [r[1] for r in listed],
        "day": day.isoformat(),
        "day_updates": len(day_ids),
        "list_target": LIST_TARGET,
        "dead_code": DEAD_CODE,
        "rare_code": RARE_CODE,
        "rare_code_in_newest_25000": len(rare),
        "absent_code": ABSENT_CODE,
        "redrive_filter": {"target": REDRIVE_TARGET, "code": DEAD_CODE, "dead_rows_big": dead_filter[0]},
        "copied_ids": sorted(copied),
    }


def load(
    ctx: Any, server: Any, plan: scale.Plan, out: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """Both databases loaded, the pages' rows copied into empty, VACUUM ANALYZE."""
    import psycopg

    admin = server.url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in ("web_big", "web_empty"):
            conn.execute(f"create database {name}")
        out["postgresql"] = conn.execute("select current_setting('server_version')").fetchone()[0]
    urls = {"big": server.url("web_big"), "empty": server.url("web_empty")}
    for url in urls.values():
        bl.migrate(url)
        out.setdefault("partitions", scale.prepare_partitions(url))
    started = time.monotonic()
    out["load"] = scale.load_history(urls["big"], plan, "big")
    with psycopg.connect(urls["big"], autocommit=True) as conn:
        if scale._has_function(conn, "rollup_reports"):  # as the daemon's maintenance job has all year
            t = time.monotonic()
            out["load"]["rollup_days"] = conn.execute(
                "select count(*) from outbox.rollup_reports(1000)"
            ).fetchone()[0]
            out["load"]["rollup_s"] = round(time.monotonic() - t, 1)
        top = conn.execute("select max(id) from outbox.action_status_updates").fetchone()[0]
        out["schema_version"] = conn.execute("select max(version) from outbox.schema_migrations").fetchone()[
            0
        ]
    scale.add_pending(urls["big"])
    with psycopg.connect(urls["empty"], autocommit=True) as conn:  # its own pending rows after big's ids
        conn.execute(
            "select setval(pg_get_serial_sequence('outbox.action_status_updates', 'id'), %s)", (top,)
        )
    scale.add_pending(urls["empty"])
    chosen = choose(plan, urls["big"])
    scale._copy_rows(urls["big"], urls["empty"], [chosen["update_id"]])  # with its attempts
    out["copied_to_empty"] = 1 + copy_updates(urls["big"], urls["empty"], chosen.pop("copied_ids"))
    out["load_s"] = round(time.monotonic() - started, 1)
    out["vacuum_analyze_s"] = {name: scale._vacuum_analyze(url) for name, url in urls.items()}
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("checkpoint")
    return urls, chosen


# -- measuring ----------------------------------------------------------------------------------
def pages(chosen: dict[str, Any], second: dict[str, str]) -> list[Request]:
    day, code, target = chosen["day"], chosen["dead_code"], chosen["list_target"]
    return [
        Request(
            "overview", "/ (overview)", "/", runs=["ops status_targets", "live_relays", "web_capabilities"]
        ),
        Request("chart", "/chart.svg (24 h per minute)", "/chart.svg", runs=["web_per_minute"]),
        Request(
            "find_id",
            "/find?q=ACTION_ID (303 to its update)",
            f"/find?q={chosen['action_id']}",
            expect=303,
            runs=["web_find_ids"],
        ),
        Request(
            "update",
            f"/updates/ID (its timeline: {chosen['attempts']} attempts)",
            f"/updates/{chosen['update_id']}",
            runs=["web_update", "web_update_attempts", "web_update_requeues", "web_capabilities"],
        ),
        Request(
            "find_prefix",
            f"/find?q=PREFIX ({len(chosen['prefix'])} characters, {chosen['prefix_matches']} matches)",
            f"/find?q={chosen['prefix']}",
            runs=["web_find_ids", "web_find_prefix"],
        ),
        Request(
            "find_list",
            f"/find?q=a pasted list of {len(chosen['listed'])} ids",
            "/find?" + _query({"q": "\n".join(chosen["listed"])}),
            runs=["web_find_ids"],
        ),
        Request(
            "updates", "/updates (first page)", "/updates", runs=["web_updates_page", "web_capabilities"]
        ),
        Request(
            "updates_page2",
            "/updates?before=CURSOR (page 2)",
            second,
            runs=["web_updates_page", "web_capabilities"],
        ),
        Request(
            "dead_code",
            f"/updates?state=dead&code={code}",
            "/updates?" + _query({"state": "dead", "code": code}),
            runs=["web_dead_page", "web_capabilities"],
        ),
        Request(
            "day",
            f"/updates?from=DAY&to=DAY ({DAYS_AGO} days ago)",
            "/updates?" + _query({"from": day, "to": day}),
            runs=["web_updates_page", "web_capabilities"],
        ),
        Request(
            "delivered_target",
            f"/updates?state=delivered&target={target}",
            "/updates?" + _query({"state": "delivered", "target": target}),
            runs=["web_updates_page", "web_capabilities"],
        ),
        Request(
            "rare_code",
            f"/updates?code={chosen['rare_code']} (0.25% of the rows)",
            "/updates?" + _query({"code": chosen["rare_code"]}),
            runs=["web_updates_page", "web_capabilities"],
        ),
        Request(
            "absent_code",
            f"/updates?code={chosen['absent_code']} (no row: the bounded scan)",
            "/updates?" + _query({"code": chosen["absent_code"]}),
            runs=["web_updates_page", "web_capabilities"],
        ),
        Request(
            "dead", "/dead (dead letters by code)", "/dead", runs=["web_dead_groups", "web_capabilities"]
        ),
        Request(
            "redrive_preview",
            f"POST /redrive/preview (dry run: scope filter, {REDRIVE_TARGET} / {code})",
            "/redrive/preview",
            method="POST",
            form={"scope": "filter", "target": REDRIVE_TARGET, "code": code},
            runs=["web_capabilities", "ops_dead_count"],
        ),
        Request(
            "csv_day",
            f"/updates.csv?from=DAY&to=DAY ({chosen['day_updates']:,} rows)",
            "/updates.csv?" + _query({"from": day, "to": day}),
            stream=True,
            runs=["web_updates_page, pages of 1,000"],
        ),
    ]


def _scan() -> int | None:
    """The console's bound on the rows a filtered list reads per page (relay/web/data.py)."""
    with contextlib.suppress(ImportError):
        from relay.web.data import SCAN

        return SCAN
    return None


def _query(fields: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(fields)


def csrf_of(client: Any) -> str:
    """The CSRF field a page carries for this client's cookie (as a browser's form would send it)."""
    body = client.get("/dead").text
    found = re.search(r'name="csrf" value="([^"]+)"', body)
    if not found:
        raise BenchError("web: no csrf field in /dead")
    return html.unescape(found.group(1))


def second_page(client: Any, db: str) -> str:
    body = client.get("/updates").text
    found = re.search(r'<a href="([^"]+)" id="next"', body)
    if not found:
        raise BenchError(f"web: /updates on {db} has no link to a second page")
    return html.unescape(found.group(1))


def measure_page(
    ctx: Any,
    page: Request,
    clients: dict[str, Any],
    consoles: dict[str, Console],
    csrf: dict[str, str],
    log: StatementLog,
    dbname: dict[str, str],
    repeat: int,
) -> dict[str, Any]:
    for db, client in clients.items():
        for _ in range(WARMUP):
            page.send(client, db, csrf[db])
            time.sleep(PAUSE)
    ctx.quiet()
    runs: dict[str, list[dict[str, Any]]] = {db: [] for db in clients}
    window = bl.CpuWindow(**{f"console_{db}": c.cpu for db, c in consoles.items()})
    offset = log.mark()
    for _ in range(repeat):
        for db, client in clients.items():
            runs[db].append(page.send(client, db, csrf[db]))
            time.sleep(PAUSE)
    usage = window.read()
    time.sleep(0.1)  # the server writes its log lines as the statements end
    statements = log.since(offset)
    out: dict[str, Any] = {
        "label": page.label,
        "method": page.method,
        "path": page.paths["big"],
        "statements_run": page.runs,
        "other_cores": usage["other_cores"],
        "steal_cores": usage["steal_cores"],
    }
    for db, rs in runs.items():
        fig = summary(rs)
        if page.stream:
            fig["first_byte"] = summary(rs, "first_byte_ms")
            fig["csv_rows"] = rs[0]["csv_rows"]
        else:
            fig["table_rows"] = rs[0]["table_rows"]
            if rs[0].get("location"):
                fig["location"] = rs[0]["location"]
        fig["bytes"] = rs[0]["bytes"]
        logged = statements.get(dbname[db], [])
        fig["statements_per_request"] = round(sum(done for _, _, done in logged) / repeat, 1)
        fig["statements_ms_per_request"] = round(sum(ms for ms, _, _ in logged) / repeat, 2)
        slowest: dict[str, float] = {}
        for ms, text, _ in logged:  # parse, bind and execute each logged: the slowest step of each
            key = " ".join(text.split())[:160]
            slowest[key] = max(slowest.get(key, 0.0), ms)
        fig["slowest_statements"] = sorted(((round(v, 2), k) for k, v in slowest.items()), reverse=True)[:4]
        fig["console_cpu_ms_per_request"] = round(1000 * usage["cpu_s"][f"console_{db}"] / repeat, 2)
        if page.paths[db] != page.paths["big"]:
            fig["path"] = page.paths[db]
        out[db] = fig
    key = "first_byte" if page.stream else None
    big = out["big"][key] if key else out["big"]
    empty = out["empty"][key] if key else out["empty"]
    out["ratio"] = round(big["median_ms"] / empty["median_ms"], 2) if empty["median_ms"] else None
    out["met"] = big["median_ms"] <= TARGET_MS
    out["p95_met"] = big["p95_ms"] <= TARGET_MS
    say(
        f"  {page.label}: big {big['median_ms']} ms (p95 {big['p95_ms']}), empty {empty['median_ms']} ms "
        f"(p95 {empty['p95_ms']}); statements {out['big']['statements_ms_per_request']} ms "
        f"({out['empty']['statements_ms_per_request']} ms); other load {usage['other_cores']} cores"
    )
    return out


def listening_socket_options() -> dict[str, Any]:
    """What the console's listening socket (relay/web/command.py ``bind``) carries."""
    import socket

    from relay.web.command import bind

    with contextlib.suppress(OSError), bind("127.0.0.1", 0) as probe:
        return {
            "listening_socket_proto": probe.proto,
            "tcp_nodelay": bool(probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)),
        }
    return {}


def back_to_back(ctx: Any, page: Request, client: Any, csrf: str, repeat: int) -> dict[str, Any]:
    """``page`` on big, requests ``PAUSE`` apart and back to back, interleaved in pairs: back to
    back, a console's answers would wait for the client's delayed ACK if it wrote them in two
    sends without TCP_NODELAY (asyncio does not set it on a socket made by create_server)."""

    for _ in range(WARMUP):
        page.send(client, "big", csrf)
        time.sleep(PAUSE)
    ctx.quiet()
    paused, back = [], []
    for _ in range(repeat):
        time.sleep(PAUSE)
        paused.append(page.send(client, "big", csrf))
        back.append(page.send(client, "big", csrf))
    out = {"label": page.label, "paused": summary(paused), "back_to_back": summary(back)}
    out["stall_ms"] = round(out["back_to_back"]["median_ms"] - out["paused"]["median_ms"], 1)
    out.update(listening_socket_options())
    say(
        f"  {page.label} on big: {out['paused']['median_ms']} ms {PAUSE * 1000:.0f} ms apart, "
        f"{out['back_to_back']['median_ms']} ms back to back"
    )
    return out


def plans(page: Request, client: Any, csrf: str, log: scale.ServerLog) -> list[str]:
    """The plans of the statements ``page`` runs on big (auto_explain in the console's sessions),
    each statement's text cut to its first line."""
    page.send(client, "big", csrf)
    time.sleep(PAUSE)
    log.take_plans()
    offset = log.mark()
    page.send(client, "big", csrf)
    time.sleep(0.2)
    log.since(offset)
    found = []
    taken, log.plans = log.plans, []
    for lines in taken:
        start = next((i for i, line in enumerate(lines) if "Query Text:" in line), None)
        end = next((i for i, line in enumerate(lines) if "Query Parameters:" in line), None)
        if start is not None:
            stop = end if end is not None else start + 1
            lines = [*lines[:start], lines[start][:200] + " ...", *lines[stop:]]
        found.append("\n".join(lines)[:8000])
    return found


def bench_web(ctx: Any) -> dict[str, Any]:
    import httpx
    import psycopg

    from relay.dev.embedded import EmbeddedPostgres

    n_updates = ctx.sizes.get("scale_updates", scale.SIZES["updates"])
    n_attempts = ctx.sizes.get("scale_attempts", scale.SIZES["attempts"])
    repeat = ctx.sizes.get("web_repeat", REPEAT)
    plan = scale.Plan(n_updates, n_attempts, dt.datetime.now(dt.UTC))
    server = EmbeddedPostgres(fsync=False, settings=LOAD_SETTINGS)
    out: dict[str, Any] = {
        "updates_requested": n_updates,
        "attempts_requested": n_attempts,
        "repeat": repeat,
        "warmup": WARMUP,
        "target_ms": TARGET_MS,
        "mix": "bench/scale.py's year of history: 95% delivered at the first attempt, 4% after retries, "
        "1% dead; targets 80/15/5%",
        "versions": {m: bl._version(m) for m in ("starlette", "uvicorn", "Jinja2", "httpx", "psycopg")},
        "measure_settings": "fsync on, synchronous_commit on, autovacuum on, shared_buffers 128MB",
        "scan": _scan(),
    }
    consoles: dict[str, Console] = {}
    clients: dict[str, Any] = {}
    try:
        say(f"web: loading {n_updates:,} updates / {n_attempts:,} attempts (fsync off while loading)")
        server.start()
        urls, chosen = load(ctx, server, plan, out)
        out["chosen"] = chosen
        say(f"web: loaded in {out['load_s']}s; restarting durable (fsync on, autovacuum on)")
        server.stop()
        os.sync()
        server.fsync = True
        server.settings = MEASURE_SETTINGS
        server.start()
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute(f"alter system set log_line_prefix = '{StatementLog.PREFIX}'")
            conn.execute("select pg_reload_conf()")
        out["sizes_big"] = scale.sizes(urls["big"])
        log = StatementLog(server.base_dir / "server.log")
        for db, url in urls.items():
            consoles[db] = Console(db, url, ctx.tmp, LOG_STATEMENTS).start()
            clients[db] = httpx.Client(base_url=consoles[db].base, timeout=120.0)
        out["console_rss_ready_mb"] = {db: round(c.rss_mb(), 1) for db, c in consoles.items()}
        csrf = {db: csrf_of(c) for db, c in clients.items()}
        second = {db: second_page(c, db) for db, c in clients.items()}
        dbname = {"big": "web_big", "empty": "web_empty"}
        measured: dict[str, Any] = {}
        for page in pages(chosen, second):
            measured[page.key] = measure_page(ctx, page, clients, consoles, csrf, log, dbname, repeat)
        out["pages"] = measured
        dead = next(p for p in pages(chosen, second) if p.key == "dead")
        out["back_to_back"] = back_to_back(ctx, dead, clients["big"], csrf["big"], repeat)
        out["console_rss_after_mb"] = {db: round(c.rss_mb(), 1) for db, c in consoles.items()}
        for db in list(consoles):
            clients.pop(db).close()
            consoles.pop(db).stop()
        say("web: the plans of each page's statements on big (auto_explain)")
        explain_log = scale.ServerLog(server.base_dir / "server.log")
        consoles["explain"] = Console("explain", urls["big"], ctx.tmp, EXPLAIN).start()
        clients["explain"] = httpx.Client(base_url=consoles["explain"].base, timeout=120.0)
        token = csrf_of(clients["explain"])
        explain_second = second_page(clients["explain"], "big")
        for page in pages(chosen, {"big": explain_second, "empty": explain_second}):
            measured[page.key]["plans_big"] = plans(page, clients["explain"], token, explain_log)
        return out
    finally:
        for client in clients.values():
            client.close()
        for console in consoles.values():
            console.stop()
        server.cleanup()


# -- the report ---------------------------------------------------------------------------------
def targets(s: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each page against the issue's 150 ms (the median; the p95 beside it)."""
    out: list[dict[str, Any]] = []
    for p in (s or {}).get("pages", {}).values():
        fig = p["big"]["first_byte"] if "first_byte" in p["big"] else p["big"]
        out.append(
            {
                "name": p["label"] + (" (first byte)" if "first_byte" in p["big"] else ""),
                "target": f"<= {TARGET_MS:.0f} ms",
                "value": f"{fig['median_ms']} ms (p95 {fig['p95_ms']} ms)",
                "met": p["met"],
            }
        )
    return out


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "**missed**")


def markdown(s: dict[str, Any]) -> list[str]:
    """The "Web console" section of bench/results/latest.md."""
    load, c, v = s.get("load", {}), s.get("chosen", {}), s["versions"]
    lines = [
        "",
        f"{SECTION}: each page at {load.get('updates', 0):,} updates and "
        f"{load.get('attempts', 0):,} attempt rows",
        "",
        f"`python -m relay web` (schema {s.get('schema_version')}; Starlette {v.get('starlette')}, "
        f"uvicorn {v.get('uvicorn')}, Jinja2 {v.get('Jinja2')}) on bench/scale.py's year of history "
        f"(loaded in {s.get('load_s')} s), measured with {s['measure_settings']}, beside a console on "
        f"an empty database (same schema, 1,000 pending rows and copies of the "
        f"{s.get('copied_to_empty', 0):,} rows the pages show). Each page over loopback with httpx "
        f"(keep-alive), to the whole body: {s['warmup']} warm-ups, then {s['repeat']} requests on big "
        f"and empty in turn, {PAUSE * 1000:.0f} ms apart; median and p95. Target: {TARGET_MS:.0f} ms "
        '(the median; the p95 beside it). "statements": their time per request, from the server\'s '
        'log; "console CPU": the console process\'s.',
    ]
    scan = s.get("scan")
    if scan and s.get("copied_to_empty", 0) + 1000 > scan:
        lines[-1] += (
            f" A list reads at most {scan:,} rows of its index per page (relay/web/data.py `SCAN`): "
            "with the exported day copied, the empty database holds more, so the lists by "
            "`created_at` read as many rows on both."
        )
    lines.append("")
    rows = []
    for p in s.get("pages", {}).values():
        big, empty = p["big"], p["empty"]
        if "first_byte" in big:
            b, e = big["first_byte"], empty["first_byte"]
            label = f"`{p['label']}`: first byte"
        else:
            b, e, label = big, empty, f"`{p['label']}`"
        shown = big.get("csv_rows", big.get("table_rows")) or "-"
        rows.append(
            [
                label,
                f"{b['median_ms']} / {b['p95_ms']} ms",
                f"{e['median_ms']} / {e['p95_ms']} ms",
                f"{p['ratio']} x" if p["ratio"] is not None else "n/a",
                _met(p["met"]) + ("" if p["p95_met"] else " (p95 **missed**)"),
                f"{big['statements_ms_per_request']} ms ({empty['statements_ms_per_request']} ms)",
                f"{big['console_cpu_ms_per_request']} ms",
                shown,
                f"{p['other_cores']} / {p['steal_cores']}",
            ]
        )
        if "first_byte" in big:
            ratio = round(big["median_ms"] / empty["median_ms"], 2) if empty["median_ms"] else "n/a"
            rows.append(
                [
                    f"`{p['label']}`: whole body",
                    f"{big['median_ms']} / {big['p95_ms']} ms",
                    f"{empty['median_ms']} / {empty['p95_ms']} ms",
                    f"{ratio} x",
                    "n/a (an export)",
                    "",
                    "",
                    f"{big['bytes']:,} bytes",
                    "",
                ]
            )
    lines += bl.md_table(
        [
            "page",
            "big: median / p95",
            "empty: median / p95",
            "ratio (medians)",
            f"<= {TARGET_MS:.0f} ms",
            "statements big (empty)",
            "console CPU big",
            "rows shown",
            "other load / steal (cores)",
        ],
        rows,
    )
    if c:
        redrive = c.get("redrive_filter", {})
        lines += [
            "",
            f"Asked: update {c.get('update_id')} ({c.get('attempts')} attempts, written "
            f"{c.get('created_days_ago')} days ago) by its action id; the prefix `{c.get('prefix')}` "
            f"({c.get('prefix_matches')} matches); {len(c.get('listed', []))} action ids spread over the "
            f"year; the day {c.get('day')} ({c.get('day_updates', 0):,} updates); the code "
            f"{c.get('rare_code')} ({c.get('rare_code_in_newest_25000')} of the newest 25,000 rows) and "
            f"{c.get('absent_code')} (none); the redrive dry run over "
            f"{redrive.get('dead_rows_big', 0):,} dead rows "
            f"({redrive.get('target')} / {redrive.get('code')}).",
        ]
    bb = s.get("back_to_back")
    if bb:
        lines += [
            "",
            f"Back to back: `{bb['label']}` on big answers in {bb['paused']['median_ms']} ms when requests "
            f"are {PAUSE * 1000:.0f} ms apart and in {bb['back_to_back']['median_ms']} ms when the next "
            f"leaves as soon as the last answer is read ({bb['stall_ms']} ms more). "
            + (
                "The console's listening socket sets TCP_NODELAY, which its connections inherit: the "
                "body of an answer leaves with its headers instead of waiting for the client's delayed "
                "ACK of them (40 ms a request before it did)."
                if bb.get("tcp_nodelay")
                else "The console's connections have no TCP_NODELAY (asyncio sets it only on IPPROTO_TCP "
                "sockets): the body waits for the client's delayed ACK of the headers."
            ),
        ]
    for p in s.get("pages", {}).values():
        top = p["big"]["slowest_statements"][:1]
        if (not p["met"] or not p["p95_met"]) and top:
            lines += [
                "",
                f"`{p['label']}` misses {TARGET_MS:.0f} ms (median {p['big']['median_ms']}, p95 "
                f"{p['big']['p95_ms']}): its statements take {p['big']['statements_ms_per_request']} ms "
                f"per request, the slowest step {top[0][0]} ms: `{top[0][1][:150]}`; the plans of its "
                "statements are in web.json (`plans_big`).",
            ]
    return lines
