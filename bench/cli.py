#!/usr/bin/env python3
"""CLI start-up and daemon memory: ``python bench/cli.py [--baseline REF]``.

What an operator waits for when typing a command, and what the daemon holds in memory:

- ``outbox-relay --help`` and a usage error (``outbox-relay frobnicate``, exit 2);
- ``outbox-relay status``, ``audit ACTION_ID`` and ``dead list`` against a local database (an
  embedded PostgreSQL, fsync on, holding the rows of the drains below);
- ``outbox-relay run``: its RSS once ready and idle (``VmRSS``), and its peak (``VmHWM``) over a
  drain of 20,000 rows (2% of them unknown to the API, so they end dead) against the sandbox
  (``outbox-relay sandbox``).

Each command runs ``--repeat`` times (default 5) under ``/usr/bin/time``; the medians of wall
time and maximum RSS are reported, every run is kept in the JSON. With ``--baseline REF`` the
code at git REF (exported with ``git archive``) is measured too, interleaved with this checkout
run by run, so load from other processes hits both alike. Both trees are byte-compiled first,
as an installed wheel is, so neither pays for compiling the relay's own modules. The same
``outbox-relay`` script runs both, each with its tree first on ``PYTHONPATH``.

Writes ``bench/results/cli.json`` and the "CLI start-up and daemon memory" section of
``bench/results/latest.md`` (``bench/run.py`` keeps that section when it rewrites the file).
Figures are printed and recorded, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import benchlib as bl  # noqa: E402
from benchlib import BenchError, say  # noqa: E402

TIME = "/usr/bin/time"
TIME_FORMAT = "%e %U %S %M"  # wall s, user s, system s, max RSS kB
OUTBOX_RELAY = Path(sys.executable).with_name("outbox-relay")
SECTION = bl.CLI_SECTION
DEAD_SHARE = 0.02
IDLE_SETTLE = 2.0  # seconds after the relay is ready before its idle RSS is read

# (label, argv, expected exit code, target in seconds or None); in argv, ``{relay}`` is the
# outbox-relay script, ``{python}`` this interpreter, ``{action_id}`` an update in the database.
# The ``import`` lines are floors: what any database command, and the daemon, must import.
COMMANDS: list[tuple[str, list[str], int, float | None]] = [
    ("`outbox-relay --help`", ["{relay}", "--help"], 0, 0.2),
    ("`outbox-relay frobnicate` (usage error)", ["{relay}", "frobnicate"], 2, 0.2),
    ("`outbox-relay status`", ["{relay}", "status"], 0, 0.4),
    ("`outbox-relay audit ACTION_ID`", ["{relay}", "audit", "{action_id}"], 0, 0.4),
    ("`outbox-relay dead list`", ["{relay}", "dead", "list"], 0, 0.4),
    ("floor: `python -c 'import relay.pg.store'`", ["{python}", "-c", "import relay.pg.store"], 0, None),
    (
        "floor: `python -c 'import relay.service.daemon'`",
        ["{python}", "-c", "import relay.service.daemon"],
        0,
        None,
    ),
]
IDLE_TARGET_MB = 55.0
PEAK_TARGET_MB = 60.0


class Tree:
    """One version of the relay's code: this checkout, or a baseline exported from git."""

    def __init__(self, name: str, label: str, path: Path) -> None:
        self.name = name
        self.label = label
        self.path = path

    def env(self, **extra: str) -> dict[str, str]:
        return bl.child_env(PYTHONPATH=str(self.path), **extra)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=bl.REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def this_checkout(name: str) -> Tree:
    sha = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "relay"))
    return Tree(name, f"this checkout, {sha}" + (" + uncommitted changes" if dirty else ""), bl.REPO)


def export(ref: str, into: Path) -> Tree:
    sha = git("rev-parse", "--short", ref)
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", sha], cwd=bl.REPO, capture_output=True, check=True, timeout=120
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=120)
    return Tree("before", sha, into)


def compile_tree(tree: Tree) -> None:
    subprocess.run(
        [bl.PYTHON, "-m", "compileall", "-q", str(tree.path / "relay")],
        check=True,
        timeout=300,
        stdout=subprocess.DEVNULL,
    )


# -- one timed run -------------------------------------------------------------------------
def timed(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """``argv`` once under /usr/bin/time: exit code, wall and CPU seconds, max RSS in MB."""
    out = cwd / "time.out"
    proc = subprocess.run(
        [TIME, "-o", str(out), "-f", TIME_FORMAT, *argv],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    # With a non-zero exit, time writes "Command exited with non-zero status N" first.
    wall, user, system, rss_kb = out.read_text().strip().splitlines()[-1].split()
    return {
        "exit": proc.returncode,
        "wall_s": float(wall),
        "cpu_s": round(float(user) + float(system), 2),
        "rss_mb": round(int(rss_kb) / 1024, 1),
        "stderr": proc.stderr.decode(errors="replace")[-300:],
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
        "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 3),
        "rss_mb": round(statistics.median(r["rss_mb"] for r in runs), 1),
        "runs_wall_s": [r["wall_s"] for r in runs],
        "runs_rss_mb": [r["rss_mb"] for r in runs],
        "exit": runs[0]["exit"],
    }


def bench_commands(trees: list[Tree], url: str, action_id: str, repeat: int, tmp: Path) -> dict[str, Any]:
    """Every command ``repeat`` times per tree, interleaved: round by round, command by command."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    reference: list[dict[str, Any]] = []
    window = bl.CpuWindow()
    for _ in range(repeat):
        reference.append(timed([bl.PYTHON, "-c", "pass"], bl.child_env(), tmp))
        for label, template, expected, _ in COMMANDS:
            argv = [a.format(relay=OUTBOX_RELAY, python=bl.PYTHON, action_id=action_id) for a in template]
            for tree in trees:
                run = timed(argv, tree.env(RELAY_DATABASE_URL=url), tmp)
                if run["exit"] != expected:
                    raise BenchError(
                        f"{label} ({tree.name}) exited {run['exit']}, not {expected}: {run['stderr']}"
                    )
                runs.setdefault(label, {}).setdefault(tree.name, []).append(run)
    usage = window.read()
    return {
        "commands": {
            label: {name: summary(r) for name, r in by_tree.items()} for label, by_tree in runs.items()
        },
        "python_pass": summary(reference),
        "other_cores": usage["other_cores"],
        "steal_cores": usage["steal_cores"],
    }


# -- the daemon ----------------------------------------------------------------------------
class Sandbox:
    """``outbox-relay sandbox`` (this checkout's) on a free port, accepting the bench's token."""

    def __init__(self, log_dir: Path) -> None:
        self.port = bl.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "sandbox.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sandbox:
        self.proc = subprocess.Popen(
            [str(OUTBOX_RELAY), "sandbox", "--port", str(self.port), "--token", "bench-token"],
            cwd=bl.REPO,
            env=bl.child_env(),
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        bl.wait_port(self.port, 30.0)
        return self

    def stop(self) -> None:
        bl.stop_process(self.proc)


def drain_once(pg: bl.Postgres, sandbox: Sandbox, tree: Tree, rows: int, tmp: Path) -> dict[str, Any]:
    """A fresh database; the relay started idle; ``rows`` committed at once and drained."""
    import psycopg

    url = pg.fresh_database()
    relay = bl.Relay(url, sandbox.url, tmp, command=[str(OUTBOX_RELAY), "run"], PYTHONPATH=str(tree.path))
    try:
        relay.start()
        time.sleep(IDLE_SETTLE)
        idle = relay.rss_mb()
        prefix = uuid.uuid4().hex[:6]
        dead = int(rows * DEAD_SHARE)
        updates = bl.sample_updates(rows - dead, f"c{prefix}") + bl.sample_updates(dead, f"unknown-{prefix}")
        with psycopg.connect(url) as conn:
            bl.insert_rows(conn, updates)
            conn.commit()
        t0 = time.monotonic()
        deadline = t0 + max(300.0, rows / 20)
        with psycopg.connect(url, autocommit=True) as conn:
            while (left := bl.backlog(conn)) > 0:
                relay.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"drain ({tree.name}): {left} rows still pending at the time limit")
                time.sleep(0.1)
        elapsed = time.monotonic() - t0
        result = {
            "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": round(relay.hwm_mb(), 1),
            "rows": rows,
            "seconds": round(elapsed, 1),
            "database_url": url,
        }
        say(
            f"drain ({tree.name}): idle {result['idle_rss_mb']} MB, peak {result['peak_rss_mb']} MB, "
            f"{rows:,} rows in {elapsed:.1f} s"
        )
        return result
    finally:
        relay.stop()


def bench_daemon(
    pg: bl.Postgres, trees: list[Tree], rows: int, drains: int, quiet_wait: float, tmp: Path
) -> tuple[dict[str, Any], str]:
    """Drains per tree, interleaved; returns the figures and the URL of a drained database."""
    sandbox = Sandbox(tmp).start()
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in trees}
    try:
        for _ in range(drains):
            for tree in trees:
                bl.wait_quiet(quiet_wait, own=pg.cpu)
                runs[tree.name].append(drain_once(pg, sandbox, tree, rows, tmp))
    finally:
        sandbox.stop()
    figures = {
        name: {
            "idle_rss_mb": round(statistics.median(r["idle_rss_mb"] for r in rs), 1),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
            "runs_idle_rss_mb": [r["idle_rss_mb"] for r in rs],
            "runs_peak_rss_mb": [r["peak_rss_mb"] for r in rs],
            "runs_seconds": [r["seconds"] for r in rs],
        }
        for name, rs in runs.items()
    }
    return figures, runs[trees[-1].name][-1]["database_url"]


def seeded_database(pg: bl.Postgres, rows: int) -> str:
    """Without drains: a database holding ``rows`` pending updates."""
    import psycopg

    url = pg.fresh_database()
    with psycopg.connect(url) as conn:
        bl.insert_rows(conn, bl.sample_updates(rows, "cli"))
        conn.commit()
    return url


def some_action_id(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select action_id from outbox.action_status_updates order by id limit 1"
        ).fetchone()
    if row is None:
        raise BenchError("the database holds no update to audit")
    return str(row[0])


# -- report --------------------------------------------------------------------------------
def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return "met" if value <= target else "**missed**"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    trees = report["trees"]
    heads = [f"{t['name']} ({t['label']})" for t in trees]
    command = "python bench/cli.py" + (f" --baseline {report['baseline']}" if report["baseline"] else "")
    lines = [
        f"{SECTION} (`{command}`, {report['started_at']})",
        "",
        f"Machine: {m['cores']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
        f"Python {m['python']}, PostgreSQL {m.get('postgresql', 'n/a')} (embedded, fsync on), "
        f"SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, httpx {m['httpx']}. "
        f"Medians of {report['repeat']} runs under `/usr/bin/time` (wall time, 10 ms resolution; max RSS), "
        f"{'the trees interleaved run by run, ' if len(trees) > 1 else ''}relay's modules byte-compiled. "
        f"Other processes used {report['cli']['other_cores']} of the {m['cores']} cores meanwhile "
        f"(steal {report['cli']['steal_cores']}); `python -c pass` took "
        f"{report['cli']['python_pass']['wall_s']:.2f} s.",
        "",
    ]
    targets = {label: target for label, _, _, target in COMMANDS}
    lines += bl.md_table(
        ["command", "target", *heads, "met"],
        [
            [
                label,
                "" if targets.get(label) is None else f"<= {targets[label]} s",
                *(
                    f"{by_tree[t['name']]['wall_s']:.2f} s, {by_tree[t['name']]['rss_mb']:.1f} MB"
                    for t in trees
                ),
                _verdict(by_tree[trees[-1]["name"]]["wall_s"], targets.get(label)),
            ]
            for label, by_tree in report["cli"]["commands"].items()
        ],
    )
    lines += [
        "",
        "The floor rows run nothing: they import what any command that opens the database must "
        "(the store; since the relay runs on psycopg alone that is psycopg, 0.3 s of it on this "
        "machine; before, also SQLAlchemy's asyncio extension, which loads `sqlalchemy.orm`) and "
        "what the daemon must.",
    ]
    daemon = report.get("daemon")
    if daemon:
        last = daemon[trees[-1]["name"]]
        lines += [
            "",
            f"`outbox-relay run`, medians of {report['drains']} drain(s) of {report['rows']:,} rows "
            "against `outbox-relay sandbox`:",
            "",
        ]
        lines += bl.md_table(
            ["figure", "target", *heads, "met"],
            [
                [
                    "idle RSS (ready, no rows)",
                    f"<= {IDLE_TARGET_MB:.0f} MB",
                    *(f"{daemon[t['name']]['idle_rss_mb']:.1f} MB" for t in trees),
                    _verdict(last["idle_rss_mb"], IDLE_TARGET_MB),
                ],
                [
                    "peak RSS (VmHWM) over the drain",
                    f"<= {PEAK_TARGET_MB:.0f} MB",
                    *(f"{daemon[t['name']]['peak_rss_mb']:.1f} MB" for t in trees),
                    _verdict(last["peak_rss_mb"], PEAK_TARGET_MB),
                ],
            ],
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", metavar="REF", help="also measure the code at this git ref, interleaved"
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command per tree (default 5)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows per drain (default 20,000)")
    parser.add_argument("--drains", type=int, default=3, help="drains per tree, 0 for none (default 3)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measurement, wait up to this many seconds while other processes "
        "load the machine (default 20; 0: do not wait)",
    )
    parser.add_argument("--out", default=str(bl.RESULTS), help="directory for cli.json and latest.md")
    args = parser.parse_args()
    if not Path(TIME).exists():
        parser.error(f"{TIME} is missing (Debian/Ubuntu: apt-get install time)")
    if not OUTBOX_RELAY.exists():
        parser.error(f"{OUTBOX_RELAY} is missing: pip install -e '.[test]' in this interpreter's environment")
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = bl.machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-cli-"))
    pg: bl.Postgres | None = None
    try:
        trees = [this_checkout("after" if args.baseline else "now")]
        if args.baseline:
            trees.insert(0, export(args.baseline, tmp / "baseline"))
        for tree in trees:
            compile_tree(tree)
        say("trees: " + "; ".join(f"{t.name}: {t.label}" for t in trees))
        pg = bl.Postgres().start()
        machine["postgresql"] = pg.version()
        daemon = None
        if args.drains > 0:
            daemon, url = bench_daemon(pg, trees, args.rows, args.drains, args.quiet_wait, tmp)
        else:
            url = seeded_database(pg, args.rows)
        action_id = some_action_id(url)
        bl.wait_quiet(args.quiet_wait, own=pg.cpu)
        say(f"commands: {args.repeat} runs each per tree")
        cli = bench_commands(trees, url, action_id, args.repeat, tmp)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "baseline": args.baseline,
        "repeat": args.repeat,
        "rows": args.rows,
        "drains": args.drains,
        "machine": machine,
        "trees": [{"name": t.name, "label": t.label} for t in trees],
        "cli": cli,
        "daemon": daemon,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    latest = out / "latest.md"
    old = latest.read_text() if latest.exists() else ""
    latest.write_text(bl.put_md_section(old, SECTION, text))
    print()
    print(text)
    say(f"wrote {out / 'cli.json'} and the section of {latest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
