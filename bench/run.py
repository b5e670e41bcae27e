#!/usr/bin/env python3
"""Run every benchmark on this machine: ``python bench/run.py [--quick] [--profile]``.

Writes ``bench/results/latest.json`` and ``bench/results/latest.md`` and prints the table.
The benchmarks (bench/README.md says more):

- endpoints: our own nginx on 127.0.0.1, one endpoint answering 204 at once, one after 50 ms;
- raw limit: the same PUTs from httpx with no database, with the relay's client settings (a)
  and the best settings found (b), in the same run;
- drain: pending rows (70% SUCCESS, 30% FAILED) drained by ``python -m relay run``;
- latency: rows committed one by one at 200/s, commit to request received;
- claim: the claim statement's time with 0 .. 5 million finished rows, and with stale statistics;
- soak: 200,000 rows through one relay, its RSS along the way;
- scale (bench/scale.py; not with --quick): a year of history (10 million updates, 30 million
  attempt rows), the claim and the operators' commands on it beside an empty database, one
  retention cycle and the upgrade from 0005;
- web (bench/web.py; not with --quick): each page of the audit console (`outbox-relay web`) on the
  scale step's year of history beside an empty database, against the 150 ms target.

Figures are printed, never asserted. Each benchmark stops what it started, even on error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import benchlib as bl  # noqa: E402
import scale  # noqa: E402
import web  # noqa: E402
from benchlib import BenchError, say  # noqa: E402

FULL = {
    "raw_seconds": 4.0,
    "raw_warmup": 1.0,
    "drain_rows": 20_000,
    "latency_seconds": 20.0,
    "claim_sizes": [0, 1_000_000, 5_000_000],
    "claim_reps": 300,
    "stale_rows": 100_000,
    "soak_rows": 200_000,
    "variants": True,
    "raw_repeats": 3,
    "drain_repeats": 2,
    "scale_updates": scale.SIZES["updates"],
    "scale_attempts": scale.SIZES["attempts"],
    "scale_upgrade_attempts": scale.SIZES["upgrade_attempts"],
    "web_repeat": web.REPEAT,
}
QUICK = {
    "raw_seconds": 2.0,
    "raw_warmup": 0.5,
    "drain_rows": 5_000,
    "latency_seconds": 10.0,
    "claim_sizes": [0, 200_000],
    "claim_reps": 100,
    "stale_rows": 20_000,
    "soak_rows": 20_000,
    "variants": False,
    "raw_repeats": 2,
    "drain_repeats": 2,
}
PENDING_FOR_CLAIM = 1000
CLAIM_LIMIT = 100
LATENCY_RATE = 200.0
BENCHES = ("raw", "drain", "latency", "claim", "soak", "scale", "web")


class Context:
    def __init__(self, sizes: dict[str, Any], profile: bool, quiet_wait: float) -> None:
        self.sizes = sizes
        self.profile = profile
        self.quiet_wait = quiet_wait
        self.quiet_budget = 10 * quiet_wait  # all waits of one run together
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.nginx: bl.Nginx | None = None
        self.pg: bl.Postgres | None = None
        self.results: dict[str, Any] = {}
        self.errors: list[dict[str, str]] = []

    def quiet(self) -> float | None:
        """Before a measurement: wait (bounded) while other processes load the machine."""
        wait = min(self.quiet_wait, self.quiet_budget)
        if wait <= 0:
            return None

        def ours() -> float:
            return (self.pg.cpu() if self.pg else 0.0) + (self.nginx.worker_cpu() if self.nginx else 0.0)

        started = time.monotonic()
        try:
            return bl.wait_quiet(wait, own=ours)
        finally:
            self.quiet_budget -= max(0.0, time.monotonic() - started - 1.0)


# == raw limit =================================================================================
def relay_client_settings() -> tuple[str, int, str]:
    """The relay's own client settings, read from the relay: one-connection AsyncClients, as many
    as its default ``max_concurrency``, on asyncio's own event loop (what ``outbox-relay run`` uses)."""
    from relay.settings import TargetSettings

    return ("async-clients", TargetSettings("default").max_concurrency, "asyncio")


RAW_RELAY = relay_client_settings()


def _unique(items: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return list(dict.fromkeys(items))


def raw_variants(full: bool) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    fast = [
        RAW_RELAY,
        ("async-clients", 64, "asyncio"),
        ("async-clients", 64, "uvloop"),
        ("async-clients", 1, "asyncio"),
        ("async-clients", 4, "asyncio"),
        ("async-clients", 4, "uvloop"),
        ("sync-threads", 1, "-"),
        ("sync-threads", 2, "-"),
    ]
    if full:
        fast += [
            ("async-clients", 16, "asyncio"),
            ("async-clients", 1, "uvloop"),
            ("async-clients", 16, "uvloop"),
            ("async-pool", 64, "asyncio"),
            ("sync-threads", 4, "-"),
        ]
    slow = [
        RAW_RELAY,
        ("async-clients", 64, "asyncio"),
        ("async-clients", 64, "uvloop"),
        ("sync-threads", 64, "-"),
    ]
    if full:
        slow += [("async-clients", 128, "asyncio"), ("async-clients", 128, "uvloop")]
    return _unique(fast), _unique(slow)


def describe_raw(mode: str, concurrency: int, loop: str) -> str:
    if mode == "async-clients":
        return f"{concurrency} x one-connection AsyncClient, {loop}"
    if mode == "async-pool":
        return f"one AsyncClient, pool of {concurrency}, {loop}"
    return f"{concurrency} thread(s) x sync Client"


def run_raw(ctx: Context, url: str, mode: str, concurrency: int, loop: str) -> dict[str, Any]:
    assert ctx.nginx is not None and ctx.nginx.proc is not None
    cmd = [
        bl.PYTHON,
        str(BENCH / "rawput.py"),
        "--url",
        url,
        "--mode",
        mode,
        "--concurrency",
        str(concurrency),
        "--loop",
        "uvloop" if loop == "uvloop" else "asyncio",
        "--seconds",
        str(ctx.sizes["raw_seconds"]),
        "--warmup",
        str(ctx.sizes["raw_warmup"]),
        "--nginx-pid",
        str(ctx.nginx.proc.pid),
    ]
    timeout = ctx.sizes["raw_seconds"] + ctx.sizes["raw_warmup"] + 60
    ctx.quiet()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=bl.child_env(), cwd=BENCH)
    if proc.returncode != 0:
        raise BenchError(f"rawput {mode} {concurrency} {loop} failed: {proc.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(mode=mode, concurrency=concurrency, loop=loop, label=describe_raw(mode, concurrency, loop))
    return result


def bench_raw(ctx: Context) -> dict[str, Any]:
    assert ctx.nginx is not None
    fast, slow = raw_variants(ctx.sizes["variants"])
    out: dict[str, Any] = {"fast": [], "slow": []}
    for name, url, variants in (("fast", ctx.nginx.fast_url, fast), ("slow", ctx.nginx.slow_url, slow)):
        for mode, conc, loop in variants:
            runs = []
            for _ in range(ctx.sizes["raw_repeats"]):
                try:
                    r = run_raw(ctx, url, mode, conc, loop)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    say(f"raw {name} {describe_raw(mode, conc, loop)}: skipped ({exc})")
                    break
                runs.append(r)
                say(
                    f"raw {name:4} {r['label']:45} {r['per_second']:8.1f} PUT/s  "
                    f"{r['cpu_s_per_1000']} CPU s/1000  (others used {r['usage']['other_cores']} cores)"
                )
            if runs:  # the best run is the one least disturbed by other processes
                best = max(runs, key=lambda r: r["per_second"])
                best["runs"] = [r["per_second"] for r in runs]
                out[name].append(best)
        if out[name]:
            relay = next(
                (r for r in out[name] if (r["mode"], r["concurrency"], r["loop"]) == RAW_RELAY), None
            )
            out[f"relay_settings_{name}"] = relay
            out[f"best_{name}"] = max(out[name], key=lambda r: r["per_second"])
    return out


# == drain =====================================================================================
def drain_once(
    ctx: Context, label: str, api_url: str, rows: int, env: dict[str, str], profile_to: Path | None = None
) -> dict[str, Any]:
    import psycopg

    assert ctx.pg is not None and ctx.nginx is not None
    url = ctx.pg.fresh_database()
    relay = bl.Relay(url, api_url, ctx.tmp, **env)
    nginx, pg = ctx.nginx, ctx.pg
    try:
        relay.start()
        rss_ready = relay.rss_mb()
        updates = bl.sample_updates(rows, prefix=f"d{uuid.uuid4().hex[:6]}")
        ctx.quiet()
        spy = bl.py_spy(relay.pid, profile_to) if profile_to else contextlib.nullcontext()
        with spy:
            with psycopg.connect(url) as conn:
                bl.insert_rows(conn, updates)
                window = bl.CpuWindow(relay=relay.cpu, postgres=pg.cpu, nginx=nginx.worker_cpu)
                conn.commit()
                t0 = time.time()
            deadline = time.monotonic() + max(120.0, rows / 40)
            next_note = time.monotonic() + 5
            with psycopg.connect(url, autocommit=True) as conn:
                while (left := bl.backlog(conn)) > 0:
                    relay.check_alive()
                    if time.monotonic() > deadline:
                        raise BenchError(f"drain {label}: {left} rows still pending at the time limit")
                    if time.monotonic() > next_note:
                        say(f"  {label}: {rows - left:,}/{rows:,} done")
                        next_note += 5
                    time.sleep(0.05)
                usage = window.read()
                row = conn.execute(
                    "select extract(epoch from max(delivered_at))::float8,"
                    " count(*) filter (where state = 'delivered'), count(*) filter (where state = 'dead')"
                    " from outbox.action_status_updates"
                ).fetchone()
                requests = conn.execute("select count(*) from outbox.delivery_attempts").fetchone()
        assert row is not None and requests is not None
        end, delivered, dead = row
        elapsed = float(end) - t0
        cpu = usage["cpu_s"]
        result = {
            "label": label,
            "rows": rows,
            "env": env,
            "delivered": delivered,
            "dead": dead,
            "requests": requests[0],
            "elapsed_s": round(elapsed, 3),
            "per_second": round(rows / elapsed, 1),
            "cpu_s_per_1000": round(1000 * cpu["relay"] / rows, 3),
            "postgres_cpu_s_per_1000": round(1000 * cpu["postgres"] / rows, 3),
            "nginx_cpu_s_per_1000": round(1000 * cpu["nginx"] / rows, 3),
            "relay_cores": round(cpu["relay"] / usage["elapsed_s"], 2),
            "rss_ready_mb": round(rss_ready, 1),
            "peak_rss_mb": round(relay.hwm_mb(), 1),
            "other_cores": usage["other_cores"],
            "steal_cores": usage.get("steal_cores"),
        }
        say(
            f"drain {label}: {result['per_second']:.0f}/s, {result['cpu_s_per_1000']} CPU s/1000, "
            f"peak RSS {result['peak_rss_mb']} MB (others used {usage['other_cores']} cores)"
        )
        return result
    finally:
        relay.stop()


def bench_drain(ctx: Context) -> dict[str, Any]:
    assert ctx.nginx is not None
    rows = ctx.sizes["drain_rows"]
    repeats = ctx.sizes["drain_repeats"]
    out: dict[str, Any] = {}
    for key, label, url in (
        ("fast_default", "204, defaults", ctx.nginx.fast_url),
        ("slow_default", "50 ms, defaults", ctx.nginx.slow_url),
    ):
        out[key] = _best([drain_once(ctx, label, url, rows, {}) for _ in range(repeats)])
    variants: list[dict[str, Any]] = []
    if ctx.sizes["variants"]:
        grid = [("16", "100"), ("32", "100"), ("64", "100"), ("128", "100"), ("64", "50"), ("64", "200")]
        for conc, batch in grid:
            env = {"RELAY_MAX_CONCURRENCY": conc, "RELAY_BATCH_SIZE": batch}
            with _recorded(ctx, f"drain variant {conc}/{batch}"):
                label = f"204, concurrency {conc}, batch {batch}"
                r = _best([drain_once(ctx, label, ctx.nginx.fast_url, rows, env) for _ in range(repeats)])
                r.update(endpoint="204", max_concurrency=int(conc), batch_size=int(batch))
                variants.append(r)
        for conc in ("128", "256"):
            env = {"RELAY_MAX_CONCURRENCY": conc}
            with _recorded(ctx, f"drain variant 50 ms {conc}"):
                label = f"50 ms, concurrency {conc}, batch 100"
                r = _best([drain_once(ctx, label, ctx.nginx.slow_url, rows, env) for _ in range(repeats)])
                r.update(endpoint="50 ms", max_concurrency=int(conc), batch_size=100)
                variants.append(r)
        if RAW_RELAY[2] == "uvloop":  # the relay runs on uvloop: measure it on asyncio's loop too
            shim = ctx.tmp / "no-uvloop"
            (shim / "uvloop").mkdir(parents=True, exist_ok=True)
            (shim / "uvloop" / "__init__.py").write_text('raise ImportError("hidden by bench/run.py")\n')
            env = {"PYTHONPATH": os.pathsep.join([str(shim), str(bl.REPO)])}
            for endpoint, url in (("204", ctx.nginx.fast_url), ("50 ms", ctx.nginx.slow_url)):
                with _recorded(ctx, f"drain variant {endpoint} asyncio loop"):
                    label = f"{endpoint}, defaults, relay on asyncio's loop (uvloop hidden)"
                    r = _best([drain_once(ctx, label, url, rows, env) for _ in range(repeats)])
                    r.update(endpoint=endpoint, loop="asyncio")
                    variants.append(r)
    out["variants"] = variants
    if ctx.profile:
        prof = ctx.tmp / "drain-204.collapsed"
        with _recorded(ctx, "drain profile"):
            drain_once(ctx, "204, defaults, under py-spy", ctx.nginx.fast_url, rows, {}, profile_to=prof)
            out["profile_204"] = bl.summarize_profile(prof)
            _save_profile("drain-204", prof, out["profile_204"])
    return out


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (the one least disturbed by other processes), with all rates."""
    best = max(runs, key=lambda r: r["per_second"])
    best["runs"] = [r["per_second"] for r in runs]
    return best


def _save_profile(name: str, collapsed: Path, summary: dict[str, Any]) -> None:
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"py-spy samples: {summary['samples']} (active only)", "", "self %  layer (innermost frame)"]
    lines += [f"{pct:6.1f}  {fn}" for fn, pct in summary["layers"]]
    lines += ["", "self %  function"]
    lines += [f"{pct:6.1f}  {fn}" for fn, pct in summary["self"]]
    lines += ["", "inclusive %  relay function"]
    lines += [f"{pct:6.1f}  {fn}" for fn, pct in summary["relay"]]
    lines += ["", "inclusive %  function (below the event loop)"]
    lines += [f"{pct:6.1f}  {fn}" for fn, pct in summary["inclusive"]]
    (bl.RESULTS / f"profile-{name}.txt").write_text("\n".join(lines) + "\n")
    say(f"profile written to bench/results/profile-{name}.txt")


# == latency ===================================================================================
def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def bench_latency(ctx: Context) -> dict[str, Any]:
    import psycopg

    assert ctx.pg is not None
    seconds = ctx.sizes["latency_seconds"]
    port = bl.free_port()
    received_file = ctx.tmp / "received.json"
    receiver = subprocess.Popen(
        [bl.PYTHON, str(BENCH / "receiver.py"), "--port", str(port), "--out", str(received_file)],
        env=bl.child_env(),
        stdout=subprocess.DEVNULL,
        stderr=(ctx.tmp / "receiver.log").open("wb"),
    )
    relay: bl.Relay | None = None
    profile: dict[str, Any] | None = None
    try:
        bl.wait_port(port)
        url = ctx.pg.fresh_database()
        relay = bl.Relay(url, f"http://127.0.0.1:{port}", ctx.tmp)
        relay.start()

        def insert(prefix: str, secs: float) -> dict[str, Any]:
            out = ctx.tmp / f"commits-{prefix}.json"
            proc = subprocess.run(
                [
                    bl.PYTHON,
                    str(BENCH / "inserter.py"),
                    "--url",
                    url,
                    "--rate",
                    str(LATENCY_RATE),
                    "--seconds",
                    str(secs),
                    "--prefix",
                    prefix,
                    "--out",
                    str(out),
                ],
                env=bl.child_env(),
                capture_output=True,
                text=True,
                timeout=secs + 60,
            )
            if proc.returncode != 0:
                raise BenchError(f"inserter failed: {proc.stderr.strip()[-400:]}")
            return dict(json.loads(out.read_text()))

        def settle() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                deadline = time.monotonic() + 30
                while bl.backlog(conn) and time.monotonic() < deadline:
                    time.sleep(0.05)

        insert("warm", 1.0)  # warm-up: connections, clients, prepared statements
        settle()
        ctx.quiet()
        say(
            f"latency: committing {int(LATENCY_RATE * seconds)} rows at {LATENCY_RATE:.0f}/s "
            f"for {seconds:.0f}s"
        )
        window = bl.CpuWindow(relay=relay.cpu, postgres=ctx.pg.cpu)
        written = insert("lat", seconds)
        settle()
        usage = window.read()
        if ctx.profile:  # a second pass under py-spy, not measured
            prof = ctx.tmp / "latency.collapsed"
            with bl.py_spy(relay.pid, prof):
                insert("prof", min(seconds, 10.0))
                settle()
            profile = bl.summarize_profile(prof)
            _save_profile("latency-200", prof, profile)
        stamps = _row_stamps(url)
        bl.stop_process(receiver, signal.SIGTERM, 10)
        received = json.loads(received_file.read_text())
    finally:
        if relay is not None:
            relay.stop()
        bl.stop_process(receiver, signal.SIGTERM, 10)
    first: dict[str, float] = {}
    for t, path in received:
        action_id = path.rsplit("/", 1)[-1]
        if action_id.startswith("lat-") and action_id not in first:
            first[action_id] = t
    commits: dict[str, float] = written["commits"]
    lat = sorted(1000 * (first[a] - t) for a, t in commits.items() if a in first)
    # Where the time goes, per row: the claim's and the record's statement times come from the
    # database (same clock), the PUT's start from the relay's own attempt row.
    legs: dict[str, list[float]] = {k: [] for k in LATENCY_LEGS}
    for action_id, (claimed, put_started, recorded) in stamps.items():
        if action_id in commits and action_id in first:
            legs["commit -> claim statement"].append(1000 * (claimed - commits[action_id]))
            legs["claim statement -> PUT started"].append(1000 * (put_started - claimed))
            legs["PUT started -> request received"].append(1000 * (first[action_id] - put_started))
            legs["request received -> result recorded"].append(1000 * (recorded - first[action_id]))
    breakdown = {}
    for name, values in legs.items():
        values.sort()
        breakdown[name] = {
            "p50_ms": round(percentile(values, 0.5), 3),
            "p99_ms": round(percentile(values, 0.99), 3),
        }
    result = {
        "rows": len(commits),
        "received": len(lat),
        "missing": len(commits) - len(lat),
        "rate": LATENCY_RATE,
        "achieved_rate": written["achieved_rate"],
        "late_rows": written["late_rows"],
        "commit_ms_p50": written["commit_ms_p50"],
        "commit_ms_p99": written["commit_ms_p99"],
        "p50_ms": round(percentile(lat, 0.50), 3),
        "p95_ms": round(percentile(lat, 0.95), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "max_ms": round(lat[-1], 3) if lat else None,
        "min_ms": round(lat[0], 3) if lat else None,
        "relay_cpu_s_per_1000": round(1000 * usage["cpu_s"]["relay"] / max(1, len(commits)), 3),
        "other_cores": usage["other_cores"],
        "steal_cores": usage.get("steal_cores"),
        "breakdown": breakdown,
        "profile": profile,
        "clock": "time.time() in the inserter after commit() returns, and in the receiver once the "
        "whole request is read; both on this machine's wall clock (microsecond resolution)",
    }
    say(
        f"latency: p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, "
        f"max {result['max_ms']} ms over {len(lat)} rows (commit itself p50 {result['commit_ms_p50']} ms)"
    )
    return result


LATENCY_LEGS = (
    "commit -> claim statement",
    "claim statement -> PUT started",
    "PUT started -> request received",
    "request received -> result recorded",
)


def _row_stamps(url: str) -> dict[str, tuple[float, float, float]]:
    """Per delivered row: when its claim ran (the lease's end minus the lease), when its PUT
    started, and when its result was recorded, as epoch seconds."""
    import psycopg

    lease = 60.0  # the relay's default RELAY_LEASE, which the benchmark does not change
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select u.action_id, extract(epoch from u.next_attempt_at)::float8 - %s,"
            " extract(epoch from d.started_at)::float8, extract(epoch from u.delivered_at)::float8"
            " from outbox.action_status_updates u join outbox.delivery_attempts d on d.update_id = u.id"
            " where u.state = 'delivered' and d.attempt = 1",
            (lease,),
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


# == claim scale ===============================================================================
LOAD_FINISHED = """
with ins as (
    insert into outbox.action_status_updates
        (action_id, status, errors, target, state, attempts, requests, created_at, next_attempt_at,
         delivered_at, last_http_status)
    select 'done-' || g,
           case when g %% 10 < 7 then 'SUCCESS' else 'FAILED' end,
           case when g %% 10 < 7 then '[]'::jsonb
                else jsonb_build_array(jsonb_build_object('code', 'OTHER', 'message', 'reason ' || g)) end,
           'default', 'delivered', 1, 1, ts, ts, ts + interval '40 ms', 204
    from generate_series(cast(%(lo)s as bigint), cast(%(hi)s as bigint)) as g,
         lateral (select now() - interval '60 days' + g * interval '100 ms' as ts) as t
    returning id, action_id, delivered_at
)
insert into outbox.delivery_attempts
    (update_id, action_id, target, attempt, started_at, duration_ms, http_status, outcome, relay_id)
select id, action_id, 'default', 1, delivered_at - interval '30 ms', 25.0, 204, 'delivered', 'bench-loader'
from ins
"""


def _plan_summary(plan: Any) -> tuple[list[str], list[str], int]:
    """Index names, node types and shared buffers (hit + read) of an EXPLAIN (FORMAT JSON) plan."""
    names: list[str] = []
    nodes: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Node Type" in node:
                nodes.append(f"{node['Node Type']} on {node.get('Relation Name', '-')}")
            if "Index Name" in node:
                names.append(node["Index Name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(plan["Plan"])
    buffers = int(plan["Plan"].get("Shared Hit Blocks", 0)) + int(plan["Plan"].get("Shared Read Blocks", 0))
    return sorted(set(names)), nodes, buffers


def _claim_params() -> dict[str, Any]:
    return {
        "target": "default",
        "limit": CLAIM_LIMIT,
        "lease": 60.0,
        "token": uuid.uuid4(),
        "relay_id": "bench",
        # As the relay's engine does with an idle lane: the first max_concurrency (64) rows are
        # marked as being sent in the same statement.
        "send_now": 64,
    }


def measure_claims(urls: list[str], reps: int) -> list[dict[str, Any]]:
    """The claim statement on each database in turn (interleaved, so that load from other
    processes hits all alike), each run in a transaction rolled back: nothing changes."""
    import psycopg

    from relay.pg.store import driver_sql

    sql = driver_sql("updates_claim")
    conns = [psycopg.connect(url) for url in urls]
    times: list[list[float]] = [[] for _ in urls]
    claimed = [0 for _ in urls]
    out = []
    try:
        for i in range(reps + 20):
            for k, conn in enumerate(conns):
                params = _claim_params()
                start = time.perf_counter()
                rows = conn.execute(sql, params).fetchall()
                elapsed = time.perf_counter() - start
                conn.rollback()
                if i >= 20:  # the first runs warm the cache and the prepared statement
                    times[k].append(elapsed * 1000)
                    claimed[k] = len(rows)
        for k, conn in enumerate(conns):
            cur = conn.execute("explain (analyze, buffers, format json) " + sql, _claim_params())
            plan = cur.fetchone()[0][0]  # type: ignore[index]
            conn.rollback()
            indexes, nodes, buffers = _plan_summary(plan)
            ts = sorted(times[k])
            out.append(
                {
                    "median_ms": round(statistics.median(ts), 3),
                    "p95_ms": round(percentile(ts, 0.95), 3),
                    "min_ms": round(ts[0], 3),
                    "rows_claimed": claimed[k],
                    "explain_execution_ms": round(plan.get("Execution Time", 0.0), 3),
                    "explain_planning_ms": round(plan.get("Planning Time", 0.0), 3),
                    "buffers": buffers,
                    "plan_indexes": indexes,
                    "plan_nodes": nodes,
                    "reps": reps,
                }
            )
    finally:
        for conn in conns:
            conn.close()
    return out


def bench_claim(ctx: Context) -> dict[str, Any]:
    """The claim with 0, 1M, 5M finished rows (and attempts) under 1,000 pending rows.

    Two databases: ``empty`` (only the 1,000 pending rows) and ``big``, which grows stage by
    stage. At every stage both are measured interleaved, and the ratio is taken between them.
    """
    import psycopg

    sizes = sorted(s for s in ctx.sizes["claim_sizes"] if s > 0)
    reps = ctx.sizes["claim_reps"]
    # A server of its own (the load writes gigabytes of WAL): a larger max_wal_size only
    # makes loading faster; the measured statement is the same.
    pg = bl.Postgres(settings={"max_wal_size": "8GB", "checkpoint_timeout": "30min"}).start()
    out: dict[str, Any] = {"limit": CLAIM_LIMIT, "pending": PENDING_FOR_CLAIM, "sizes": []}
    try:
        empty_url, big_url = pg.fresh_database(), pg.fresh_database()
        with (
            psycopg.connect(empty_url, autocommit=True) as empty,
            psycopg.connect(big_url, autocommit=True) as big,
        ):
            for conn in (empty, big):
                # Statistics change only when we say so (ANALYZE), never behind our back. A
                # partitioned table (delivery_attempts from 0006) takes the setting per partition.
                for table in ("action_status_updates", "delivery_attempts"):
                    leaves = conn.execute(
                        "select coalesce((select array_agg(relid::text) from pg_partition_tree(%s::regclass)"
                        " where isleaf), array[%s])",
                        (f"outbox.{table}", f"outbox.{table}"),
                    ).fetchone()[0]
                    for leaf in leaves:
                        conn.execute(f"alter table {leaf} set (autovacuum_enabled = false)")
            for conn in (empty, big):  # at stage 0 the two are alike: their ratio shows the noise
                with conn.transaction():
                    bl.insert_rows(conn, bl.sample_updates(PENDING_FOR_CLAIM, prefix="p0"))

            def stage(finished: int, extra: int = 0, analyze: bool = True) -> dict[str, Any]:
                if analyze:
                    for conn in (empty, big):
                        conn.execute("vacuum analyze outbox.action_status_updates")
                        conn.execute("vacuum analyze outbox.delivery_attempts")
                else:  # only the rolled-back claims' leftovers of the empty database
                    empty.execute("vacuum outbox.action_status_updates")
                empty.execute("checkpoint")
                ctx.quiet()
                e, b = measure_claims([empty_url, big_url], reps)
                b.update(
                    finished=finished,
                    table_mb=_table_mb(big),
                    empty=e,
                    ratio_to_empty=round(b["median_ms"] / e["median_ms"], 2),
                    buffers_ratio=round(b["buffers"] / e["buffers"], 2) if e["buffers"] else None,
                )
                if extra:
                    b["extra_pending_since_analyze"] = extra
                return b

            base = stage(0)
            base.update(load_s=0.0)
            out["sizes"].append(base)
            say(
                f"claim, empty table: median {base['empty']['median_ms']} ms, "
                f"{base['empty']['buffers']} buffers"
            )
            loaded = 0
            for size in sizes:
                started = time.monotonic()
                big.execute("set session_replication_role = replica")  # bulk load: no row triggers
                while loaded < size:
                    hi = min(size, loaded + 250_000)
                    big.execute(LOAD_FINISHED, {"lo": loaded + 1, "hi": hi})
                    loaded = hi
                    say(f"claim: loaded {loaded:,}/{size:,} finished rows (+ attempts)")
                big.execute("set session_replication_role = origin")
                load_s = time.monotonic() - started
                # The backlog on top: the newest rows, at the end of the table, as in real life.
                big.execute("delete from outbox.action_status_updates where state <> 'delivered'")
                with big.transaction():
                    bl.insert_rows(big, bl.sample_updates(PENDING_FOR_CLAIM, prefix=f"p{size}"))
                m = stage(size)
                m.update(load_s=round(load_s, 1))
                out["sizes"].append(m)
                say(
                    f"claim with {size:,} finished rows: median {m['median_ms']} ms "
                    f"vs {m['empty']['median_ms']} ms "
                    f"empty ({m['ratio_to_empty']} x), buffers {m['buffers']} vs {m['empty']['buffers']}, "
                    f"plan uses {', '.join(m['plan_indexes'])}"
                )
            # Stale statistics: a backlog that grew after the last ANALYZE.
            stale = ctx.sizes["stale_rows"]
            rows = bl.sample_updates(stale, prefix="stale")
            for i in range(0, stale, 20_000):
                with big.transaction():
                    bl.insert_rows(big, rows[i : i + 20_000])
            m = stage(loaded, extra=stale, analyze=False)
            out["stale"] = m
            say(
                f"claim with stale statistics (+{stale:,} pending since ANALYZE): median {m['median_ms']} ms "
                f"({m['ratio_to_empty']} x empty), plan: {'; '.join(m['plan_nodes'])}"
            )
        return out
    finally:
        pg.stop()


def _table_mb(conn: Any) -> float:
    row = conn.execute(
        "select (pg_total_relation_size('outbox.action_status_updates')"
        " + pg_total_relation_size('outbox.delivery_attempts')) / 1048576.0"
    ).fetchone()
    return round(float(row[0]), 1)


def bench_scale(ctx: Context) -> dict[str, Any]:
    return scale.bench_scale(ctx, measure_claims)


def bench_web(ctx: Context) -> dict[str, Any]:
    return web.bench_web(ctx)


# == soak ======================================================================================
def bench_soak(ctx: Context) -> dict[str, Any]:
    import psycopg

    assert ctx.pg is not None and ctx.nginx is not None
    total = ctx.sizes["soak_rows"]
    high = min(20_000, max(2_000, total // 10))
    low = high // 2
    url = ctx.pg.fresh_database()
    relay = bl.Relay(url, ctx.nginx.fast_url, ctx.tmp)
    samples: list[tuple[float, int, float]] = []
    try:
        relay.start()
        rss_ready = relay.rss_mb()
        updates = bl.sample_updates(total, prefix="soak")
        inserted = 0
        ctx.quiet()
        window = bl.CpuWindow(relay=relay.cpu, postgres=ctx.pg.cpu, nginx=ctx.nginx.worker_cpu)
        start = time.monotonic()
        deadline = start + total / 100 + 120
        next_sample = start
        next_note = start + 10
        with psycopg.connect(url) as writer, psycopg.connect(url, autocommit=True) as monitor:
            while True:
                now = time.monotonic()
                relay.check_alive()
                if now > deadline:
                    raise BenchError(f"soak: not finished within {deadline - start:.0f}s")
                left = bl.backlog(monitor)
                delivered = inserted - left
                if now >= next_sample:
                    samples.append((round(now - start, 2), delivered, round(relay.rss_mb(), 2)))
                    next_sample += 1.0
                if now >= next_note:
                    say(
                        f"  soak: {delivered:,}/{total:,} delivered, backlog {left:,}, "
                        f"RSS {relay.rss_mb():.1f} MB"
                    )
                    next_note += 10
                if inserted >= total and left == 0:
                    break
                if inserted < total and left < low:
                    n = min(high - left, total - inserted)
                    for i in range(inserted, inserted + n, 5_000):
                        bl.insert_rows(writer, updates[i : min(i + 5_000, inserted + n)])
                        writer.commit()
                    inserted += n
                time.sleep(0.2)
        usage = window.read()
        samples.append((round(time.monotonic() - start, 2), total, round(relay.rss_mb(), 2)))
        elapsed = usage["elapsed_s"]

        def rss_at(fraction: float) -> float:
            return next(s[2] for s in samples if s[1] >= fraction * total)

        result = {
            "rows": total,
            "backlog_kept": [low, high],
            "elapsed_s": elapsed,
            "per_second": round(total / elapsed, 1),
            "cpu_s_per_1000": round(1000 * usage["cpu_s"]["relay"] / total, 3),
            "rss_ready_mb": round(rss_ready, 1),
            "rss_10pct_mb": rss_at(0.10),
            "rss_50pct_mb": rss_at(0.50),
            "rss_end_mb": samples[-1][2],
            "peak_rss_mb": round(relay.hwm_mb(), 1),
            "other_cores": usage["other_cores"],
            "steal_cores": usage.get("steal_cores"),
            "samples": samples,
        }
        result["growth_10pct_to_end_mb"] = round(result["rss_end_mb"] - result["rss_10pct_mb"], 2)
        result["growth_50pct_to_end_mb"] = round(result["rss_end_mb"] - result["rss_50pct_mb"], 2)
        say(
            f"soak: {total:,} rows at {result['per_second']:.0f}/s; RSS ready {result['rss_ready_mb']} MB, "
            f"10% {result['rss_10pct_mb']}, 50% {result['rss_50pct_mb']}, end {result['rss_end_mb']} MB"
        )
        return result
    finally:
        relay.stop()


# == report ====================================================================================
def fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}" if isinstance(value, float | int) else str(value)
    return f"{text}{unit}"


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and met / missed."""
    targets: list[dict[str, Any]] = []

    def add(name: str, target: str, value: str, met: bool | None) -> None:
        targets.append({"name": name, "target": target, "value": value, "met": met})

    drain = results.get("drain", {})
    raw = results.get("raw", {})
    fast = drain.get("fast_default")
    raw_a = (raw.get("relay_settings_fast") or {}).get("per_second")
    raw_b = (raw.get("best_fast") or {}).get("per_second")
    if fast:
        add(
            "drain, 204 endpoint",
            ">= 1,500 deliveries/s",
            fmt(fast["per_second"], 0, "/s"),
            fast["per_second"] >= 1500,
        )
        if raw_a:
            ratio = fast["per_second"] / raw_a
            add("drain / raw limit (a), 204", ">= 0.8 x", f"{ratio:.2f} x", ratio >= 0.8)
        if raw_b:
            ratio = fast["per_second"] / raw_b
            add("drain / raw limit (b, best client), 204", ">= 0.8 x", f"{ratio:.2f} x", ratio >= 0.8)
        add(
            "CPU per 1,000 deliveries (204 drain)",
            "<= 0.6 s",
            fmt(fast["cpu_s_per_1000"], 3, " s"),
            fast["cpu_s_per_1000"] <= 0.6,
        )
        add("peak RSS (204 drain)", "<= 60 MB", fmt(fast["peak_rss_mb"], 1, " MB"), fast["peak_rss_mb"] <= 60)
    slow = drain.get("slow_default")
    if slow:
        add(
            "drain, 50 ms endpoint, defaults",
            ">= 1,000 deliveries/s",
            fmt(slow["per_second"], 0, "/s"),
            slow["per_second"] >= 1000,
        )
    lat = results.get("latency")
    if lat:
        add("commit to request p50 (200 rows/s)", "<= 2 ms", fmt(lat["p50_ms"], 2, " ms"), lat["p50_ms"] <= 2)
        add("commit to request p99 (200 rows/s)", "<= 8 ms", fmt(lat["p99_ms"], 2, " ms"), lat["p99_ms"] <= 8)
    claim = results.get("claim")
    if claim and claim.get("sizes"):
        last = claim["sizes"][-1]
        add(
            f"claim with {last['finished']:,} finished rows / empty table",
            "<= 1.2 x",
            f"{last['ratio_to_empty']:.2f} x ({last['median_ms']} vs {last['empty']['median_ms']} ms; "
            f"buffers {last['buffers']} vs {last['empty']['buffers']})",
            last["ratio_to_empty"] <= 1.2,
        )
        stale = claim.get("stale")
        if stale:
            seq = [n for n in stale["plan_nodes"] if n.startswith("Seq Scan")]
            ok = "action_status_updates_claimable" in stale["plan_indexes"] and not seq
            add(
                "claim with stale statistics: partial index, no seq scan",
                "action_status_updates_claimable",
                f"{', '.join(stale['plan_indexes']) or 'none'}; {stale['ratio_to_empty']:.2f} x empty",
                ok,
            )
    soak = results.get("soak")
    if soak:
        add(
            "RSS over the soak (10% -> end)",
            "flat: growth <= 3 MB",
            f"{soak['rss_10pct_mb']} -> {soak['rss_end_mb']} MB ({soak['growth_10pct_to_end_mb']:+.1f})",
            soak["growth_10pct_to_end_mb"] <= 3,
        )
        add("peak RSS (soak)", "<= 60 MB", fmt(soak["peak_rss_mb"], 1, " MB"), soak["peak_rss_mb"] <= 60)
    return targets


table = bl.md_table


def _load(figures: dict[str, Any]) -> str:
    """Other processes' CPU and the host's steal, in cores, during a measurement."""
    steal = figures.get("steal_cores")
    return f"{figures.get('other_cores')} / {steal if steal is not None else 'n/a'}"


def _ratio(value: float, base: dict[str, Any] | None) -> str:
    return f"{value / base['per_second']:.2f} x" if base and base.get("per_second") else "n/a"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    r = report["results"]
    command = "python bench/run.py" + (" --quick" if report["mode"] == "quick" else "")
    lines = [
        f"# outbox-relay benchmarks ({report['mode']} run, {report['started_at']})",
        "",
        f"`{command}` took {report['duration_s'] / 60:.1f} min. "
        "PostgreSQL: embedded, fsync on. Endpoints: nginx on 127.0.0.1.",
        "",
        "## Machine",
        "",
    ]
    lines += table(
        ["", ""],
        [
            ["cores", m["cores"]],
            ["CPU", m["cpu_model"]],
            ["RAM", f"{m['ram_gib']} GiB"],
            ["kernel", m["kernel"]],
            ["Python", m["python"]],
            ["PostgreSQL", m.get("postgresql", "n/a")],
            ["httpx", f"{m['httpx']} (httpcore {m['httpcore']}, anyio {m['anyio']}, sniffio {m['sniffio']})"],
            ["uvloop", m["uvloop"] or "not installed"],
            ["psycopg / SQLAlchemy", f"{m['psycopg']} / {m['sqlalchemy']}"],
            ["nginx", m["nginx"]],
        ],
    )
    lines += ["", "## Targets", ""]
    lines += table(
        ["figure", "target", "result", "met"],
        [
            [
                t["name"],
                t["target"],
                t["value"],
                "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**"),
            ]
            for t in report["targets"]
        ],
    )
    raw = r.get("raw") or {}
    if raw:
        rows = []
        for name, label in (("fast", "204"), ("slow", "50 ms")):
            for v in raw.get(name, []):
                tag = ""
                if v == raw.get(f"relay_settings_{name}"):
                    tag += " **(a) relay settings**"
                if v == raw.get(f"best_{name}"):
                    tag += " **(b) best**"
                usage = _load(v["usage"])
                runs = " / ".join(fmt(x) for x in v.get("runs", []))
                rows.append(
                    [label, v["label"] + tag, fmt(v["per_second"]), runs, fmt(v["cpu_s_per_1000"], 3), usage]
                )
        lines += ["", "## Raw limit: httpx alone, no database (same run)", ""]
        lines += table(
            [
                "endpoint",
                "client",
                "PUT/s (best run)",
                "all runs",
                "CPU s / 1,000",
                "other load / steal (cores)",
            ],
            rows,
        )
    drain = r.get("drain")
    if drain and drain.get("fast_default"):
        rows = []
        for d in filter(
            None, [drain.get("fast_default"), drain.get("slow_default"), *drain.get("variants", [])]
        ):
            key = "slow" if d["label"].startswith("50 ms") else "fast"
            rows.append(
                [
                    d["label"],
                    fmt(d["per_second"])
                    + (f" (runs {' / '.join(fmt(x) for x in d['runs'])})" if d.get("runs") else ""),
                    _ratio(d["per_second"], raw.get(f"relay_settings_{key}")),
                    _ratio(d["per_second"], raw.get(f"best_{key}")),
                    fmt(d["cpu_s_per_1000"], 3),
                    fmt(d["postgres_cpu_s_per_1000"], 3),
                    fmt(d["nginx_cpu_s_per_1000"], 3),
                    fmt(d["peak_rss_mb"], 1, " MB"),
                    _load(d),
                ]
            )
        lines += ["", f"## Drain: {drain['fast_default']['rows']:,} pending rows, `python -m relay run`", ""]
        lines += table(
            [
                "run",
                "deliveries/s",
                "vs raw (a)",
                "vs raw (b)",
                "relay CPU s / 1,000",
                "PostgreSQL CPU s / 1,000",
                "nginx CPU s / 1,000",
                "peak RSS",
                "other load / steal (cores)",
            ],
            rows,
        )
    lat = r.get("latency")
    if lat:
        lines += [
            "",
            f"## Latency: commit to request received, {lat['rate']:.0f} rows/s "
            f"for {lat['rows'] / lat['rate']:.0f} s",
            "",
        ]
        lines += table(
            [
                "rows",
                "received",
                "p50",
                "p95",
                "p99",
                "max",
                "commit() itself p50 / p99",
                "relay CPU s / 1,000",
                "other load / steal (cores)",
            ],
            [
                [
                    f"{lat['rows']:,}",
                    f"{lat['received']:,}",
                    f"{lat['p50_ms']} ms",
                    f"{lat['p95_ms']} ms",
                    f"{lat['p99_ms']} ms",
                    f"{lat['max_ms']} ms",
                    f"{lat['commit_ms_p50']} / {lat['commit_ms_p99']} ms",
                    lat["relay_cpu_s_per_1000"],
                    _load(lat),
                ]
            ],
        )
        lines += ["", f"Clock: {lat['clock']}.", ""]
        lines += table(
            ["leg", "p50", "p99"],
            [[k, f"{v['p50_ms']} ms", f"{v['p99_ms']} ms"] for k, v in lat.get("breakdown", {}).items()],
        )
    claim = r.get("claim")
    if claim and claim.get("sizes"):
        rows = []
        for c in [*claim["sizes"], claim.get("stale")]:
            if not c:
                continue
            name = f"{c['finished']:,}"
            if c.get("extra_pending_since_analyze"):
                extra = c["extra_pending_since_analyze"]
                name += f" + {extra:,} pending after the last ANALYZE (stale statistics)"
            rows.append(
                [
                    name,
                    fmt(c.get("table_mb"), 0, " MB"),
                    f"{c['median_ms']} ms",
                    f"{c['empty']['median_ms']} ms",
                    f"{c['ratio_to_empty']} x",
                    f"{c['buffers']} ({c['empty']['buffers']})",
                    f"{c['explain_execution_ms']} ms",
                    ", ".join(c["plan_indexes"]) or "none",
                    c["rows_claimed"],
                ]
            )
        lines += [
            "",
            f"## Claim: `updates_claim` (limit {claim['limit']}) over {claim['pending']:,} pending rows",
            "",
            "Each run in a transaction rolled back; measured interleaved with a table holding only the "
            'pending rows ("empty"), so that load from other processes hits both alike.',
            "",
        ]
        lines += table(
            [
                "finished rows (+ as many attempts)",
                "tables' size",
                "median",
                "empty table, same time",
                "ratio",
                "buffers (empty)",
                "EXPLAIN ANALYZE",
                "indexes used",
                "rows claimed",
            ],
            rows,
        )
    soak = r.get("soak")
    if soak:
        low, high = soak["backlog_kept"]
        lines += [
            "",
            f"## Soak: {soak['rows']:,} rows through one relay (backlog kept at {low:,}-{high:,})",
            "",
        ]
        lines += table(
            [
                "deliveries/s",
                "CPU s / 1,000",
                "RSS ready",
                "at 10%",
                "at 50%",
                "at end",
                "growth 10% -> end",
                "peak RSS",
                "other load / steal (cores)",
            ],
            [
                [
                    fmt(soak["per_second"]),
                    soak["cpu_s_per_1000"],
                    f"{soak['rss_ready_mb']} MB",
                    f"{soak['rss_10pct_mb']} MB",
                    f"{soak['rss_50pct_mb']} MB",
                    f"{soak['rss_end_mb']} MB",
                    f"{soak['growth_10pct_to_end_mb']:+.2f} MB",
                    f"{soak['peak_rss_mb']} MB",
                    _load(soak),
                ]
            ],
        )
    prof = (r.get("drain") or {}).get("profile_204")
    if prof:
        lines += ["", "## Profile of the relay during a 204 drain (py-spy, active samples)", ""]
        lines += table(
            ["self %", "layer (package of the innermost frame)"], [[p, f] for f, p in prof["layers"]]
        )
        lines += [""]
        lines += table(["inclusive %", "relay function"], [[p, f"`{f}`"] for f, p in prof["relay"][:12]])
        lines += [""]
        lines += table(["self %", "function"], [[p, f"`{f}`"] for f, p in prof["self"][:12]])
    if r.get("scale"):
        lines += scale.markdown(r["scale"])
    if r.get("web"):
        lines += web.markdown(r["web"])
    if report["errors"]:
        lines += ["", "## Benchmarks that failed", ""]
        lines += [f"- {e['bench']}: {e['error']}" for e in report["errors"]]
    lines += [
        "",
        '"other load" is the CPU used meanwhile by processes that are not part of the benchmark, '
        'in cores (of the machine\'s {}), and "steal" the time the host did not give this virtual '
        "machine's cores: figures taken under either are low.".format(m["cores"]),
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _recorded(ctx: Context, name: str):  # type: ignore[no-untyped-def]
    """Run a step; on failure record the error and go on with the next benchmark."""
    try:
        yield
    except Exception as exc:
        ctx.errors.append({"bench": name, "error": f"{type(exc).__name__}: {exc}"[:800]})
        say(f"{name} FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a fast check")
    parser.add_argument("--profile", action="store_true", help="also record a py-spy profile of a 204 drain")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {BENCHES}")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each measurement, wait up to this many seconds while other processes load the "
        "machine (default 60, 20 with --quick; 0: do not wait)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the benchmark and everything it starts at this much higher CPU priority (root only; "
        "on a machine shared with other work: fewer stolen cycles, but it slows the others down)",
    )
    parser.add_argument(
        "--scale-updates",
        type=int,
        default=scale.SIZES["updates"],
        help="scale step: updates in the year of history (default %(default)s)",
    )
    parser.add_argument(
        "--scale-attempts",
        type=int,
        default=scale.SIZES["attempts"],
        help="scale step: attempt rows in it, at least one per update (default %(default)s)",
    )
    parser.add_argument(
        "--scale-upgrade-attempts",
        type=int,
        default=scale.SIZES["upgrade_attempts"],
        help="scale step: attempt rows of the 0005 database that `migrate` upgrades "
        "(default %(default)s; 0: skip)",
    )
    parser.add_argument(
        "--web-repeat",
        type=int,
        default=web.REPEAT,
        help=f"web step: requests per page and database, after {web.WARMUP} warm-ups (default %(default)s)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (relay logs, raw data)")
    parser.add_argument("--out", default=str(bl.RESULTS), help="directory for latest.json and latest.md")
    args = parser.parse_args()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, -abs(args.nice))  # inherited by every child
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (20.0 if args.quick else 60.0)
    for step in ("scale", "web"):
        if args.quick and step in only:
            only.remove(step)
            say(f"{step}: skipped with --quick")
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update(
        scale_updates=args.scale_updates,
        scale_attempts=args.scale_attempts,
        scale_upgrade_attempts=args.scale_upgrade_attempts,
        web_repeat=args.web_repeat,
    )
    ctx = Context(sizes, args.profile, quiet_wait)
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = bl.machine_info()
    say(
        f"machine: {machine['cores']} cores, {machine['cpu_model']}, {machine['ram_gib']} GiB, "
        f"Python {machine['python']}, httpx {machine['httpx']}"
    )
    interrupted = False
    try:
        if {"raw", "drain", "latency", "soak"} & set(only):  # claim and scale need no endpoint
            ctx.nginx = bl.Nginx().start()
            machine["endpoint_check"] = ctx.nginx.verify()
            say(
                f"nginx up: 204 at {ctx.nginx.fast_url}, 50 ms at {ctx.nginx.slow_url} "
                f"{machine['endpoint_check']}"
            )
        if "raw" in only:
            with _recorded(ctx, "raw"):
                ctx.results["raw"] = bench_raw(ctx)
        if {"drain", "latency", "soak"} & set(only):
            ctx.pg = bl.Postgres().start()
            machine["postgresql"] = ctx.pg.version()
            say(f"PostgreSQL {machine['postgresql']} up (fsync on)")
        steps: list[tuple[str, Callable[[Context], dict[str, Any]]]] = [
            ("drain", bench_drain),
            ("latency", bench_latency),
            ("soak", bench_soak),
            ("claim", bench_claim),
            ("scale", bench_scale),
            ("web", bench_web),
        ]
        for name, step in steps:
            if name in only:
                say(f"== {name} ==")
                with _recorded(ctx, name):
                    ctx.results[name] = step(ctx)
    except KeyboardInterrupt:
        interrupted = True
        ctx.errors.append({"bench": "run", "error": "interrupted"})
    except BenchError as exc:
        ctx.errors.append({"bench": "setup", "error": str(exc)})
        say(f"cannot run the benchmarks: {exc}")
    finally:
        if ctx.pg is not None:
            ctx.pg.stop()
        if ctx.nginx is not None:
            ctx.nginx.stop()
        if args.keep_tmp:
            say(f"temp files kept in {ctx.tmp}")
        else:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    if "postgresql" not in machine:
        with contextlib.suppress(Exception):
            machine["postgresql"] = _embedded_version()
    report = {
        "mode": "quick" if args.quick else "full",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "sizes": ctx.sizes,
        "nice": -abs(args.nice),
        "machine": machine,
        "results": ctx.results,
        "targets": evaluate(ctx.results),
        "errors": ctx.errors,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    with contextlib.suppress(OSError):  # bench/cli.py's section stays until bench/cli.py replaces it
        kept = bl.md_section((out / "latest.md").read_text(), bl.CLI_SECTION)
        if kept:
            text = bl.put_md_section(text, bl.CLI_SECTION, kept)
    if "scale" in ctx.results:  # the scale step's figures also on their own: a run without it keeps them
        scale_report = {k: report[k] for k in ("mode", "started_at", "machine")}
        scale_report.update(results=ctx.results["scale"], targets=scale.targets(ctx.results["scale"]))
        (out / "scale.json").write_text(json.dumps(scale_report, indent=2, default=str) + "\n")
    else:
        with contextlib.suppress(OSError):
            kept = bl.md_section((out / "latest.md").read_text(), scale.SECTION)
            if kept:
                text = bl.put_md_section(text, scale.SECTION, kept)
    if "web" in ctx.results:  # the web step's figures also on their own, kept like the scale step's
        web_report = {k: report[k] for k in ("mode", "started_at", "machine")}
        web_report.update(results=ctx.results["web"], targets=web.targets(ctx.results["web"]))
        (out / "web.json").write_text(json.dumps(web_report, indent=2, default=str) + "\n")
    else:
        with contextlib.suppress(OSError):
            kept = bl.md_section((out / "latest.md").read_text(), web.SECTION)
            if kept:
                text = bl.put_md_section(text, web.SECTION, kept)
    (out / "latest.md").write_text(text)
    print()
    print(text)
    say(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    return 130 if interrupted else (1 if ctx.errors else 0)


def _embedded_version() -> str:
    from relay.dev.embedded import _bin_dir

    proc = subprocess.run([str(_bin_dir() / "postgres"), "--version"], capture_output=True, text=True)
    return proc.stdout.strip().split()[-1]


if __name__ == "__main__":
    raise SystemExit(main())
