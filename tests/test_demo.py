"""`outbox-relay demo`, run as a user would: no configuration, a real PostgreSQL, faults on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.dev.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT = 30.0  # the demo must finish well within this on a 2-core machine

# Deliberately wrong settings in the environment: the demo must ignore them.
MISLEADING_ENV = {
    "RELAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/nowhere",
    "RELAY_API_BASE_URL": "https://api.example.invalid/api",
    "RELAY_API_TOKEN": "not-the-sandbox-token",
}


def _env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return {**base, **MISLEADING_ENV}


def demo(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "demo", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def demo_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """The demo running, its output (stderr too) a pipe to read line by line; killed if the test
    leaves it running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder for the demo's database, outside pytest's tmp_path: a pytest session starting
    meanwhile resets /tmp/pytest-of-USER to 0700, which would lock the server's user out."""
    folder = Path(tempfile.mkdtemp(prefix="outbox-relay-demo-test-"))
    try:
        yield folder
    finally:
        for data in (folder / "pg", folder / "demo"):
            if (data / "data" / "postmaster.pid").exists():
                EmbeddedPostgres(data_dir=data).stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


def _one(conn: psycopg.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_json_summary_matches_the_kept_database(scratch: Path) -> None:
    folder = scratch / "pg"
    started = time.monotonic()
    result = demo("--json", "--rows", "200", "--keep", "--data-dir", str(folder))
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert took < TIME_LIMIT, f"the demo took {took:.1f}s"
    summary = json.loads(result.stdout)  # stdout holds the JSON only; progress went to stderr
    assert "[6/7] summary" in result.stderr
    assert summary["ok"] is True and summary["rows"] == 200
    assert summary["pending"] == 0 and summary["applied_twice"] == 0
    assert summary["applied_not_delivered"] == []
    assert summary["delivered"] + summary["dead"] == 200
    assert summary["retries"] > 0, "with faults on, some rows must have needed a retry"
    assert summary["sandbox"]["requests"] == summary["requests"]
    assert summary["sandbox"]["repeats_refused"] == summary["sandbox"]["repeats_after_unknown"]
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"]
    assert summary["refused_insert"] == {
        "constraint": "failed_requires_errors",
        "message": "FAILED requires at least one error",
        "rolled_back": True,
    }
    assert summary["data_dir"] == str(folder.resolve())

    with psycopg.connect(summary["database_url"]) as conn:
        states: dict[str, int] = dict(
            conn.execute("select state, count(*) from outbox.action_status_updates group by 1").fetchall()
        )
        assert states == {
            k: v for k, v in (("delivered", summary["delivered"]), ("dead", summary["dead"])) if v
        }
        assert _one(conn, "select count(*) from outbox.delivery_attempts") == summary["requests"]
        assert (
            _one(conn, "select count(*) from outbox.delivery_attempts where outcome = 'retry'")
            == summary["retries"]
        )
        assert (
            _one(conn, "select count(*) from outbox.delivery_attempts where outcome = 'delivered_earlier'")
            == summary["delivered_earlier"]
        )
        # Every request was recorded under the row's own sequence: 1, 2, ... without gaps.
        assert (
            _one(
                conn,
                """
            select count(*) from (
                select update_id, max(attempt) as top, count(*) as n, count(distinct attempt) as d
                from outbox.delivery_attempts group by update_id) per
            where top <> n or d <> n""",
            )
            == 0
        )
        # The dead rows are the unknown actions, refused with 404; the rest were unknown too,
        # but a 404 after a lost answer counts as delivered (listed in the summary).
        dead = conn.execute(
            "select action_id, last_http_status from outbox.action_status_updates where state = 'dead'"
        ).fetchall()
        assert all(a.startswith("unknown-") and s == 404 for a, s in dead)
        unknown = _one(
            conn, "select count(*) from outbox.action_status_updates where action_id like 'unknown-%'"
        )
        assert unknown == 5 == len(dead) + len(summary["delivered_on_404"])
        latency = conn.execute(
            "select 1000 * percentile_cont(0.5) within group (order by extract(epoch from delivered_at "
            "- created_at)::double precision) from outbox.action_status_updates where state = 'delivered'"
        ).fetchone()
        assert latency is not None and abs(latency[0] - summary["latency_ms"]["p50"]) < 0.1
        # The application's own change went with every outcome, and not with the refused one.
        assert _one(conn, "select count(*) from demo.shop_orders where state <> 'new'") == 200
        assert _one(conn, "select state from demo.shop_orders where id = 201") == "new"
        assert (
            _one(
                conn,
                "select count(*) from outbox.action_status_updates where action_id = 'refund-action-201'",
            )
            == 0
        )
        audited = summary["audited_action_id"]
        assert audited is not None
        assert (
            _one(conn, f"select requests from outbox.action_status_updates where action_id = '{audited}'") > 1
        )

    stopped = demo("--stop", str(folder), timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not folder.exists()
    port = int(re.search(r":(\d+)/", summary["database_url"]).group(1))  # type: ignore[union-attr]
    assert _refused(port)


def test_human_output_walks_the_seven_steps_and_cleans_up(scratch: Path) -> None:
    folder = scratch / "demo"
    result = demo("--rows", "30", "--data-dir", str(folder), "--seed", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    steps = re.findall(r"^\[(\d)/7\]", out, re.MULTILINE)
    assert steps == ["1", "2", "3", "4", "5", "6", "7"]
    assert "FAILED requires at least one error [constraint failed_requires_errors]" in out
    assert "all done" in out
    assert re.search(r"^ +applied twice +0 ", out, re.MULTILINE)
    assert "select * from outbox.delivery_audit where action_id = " in out
    assert result.stderr == ""
    if os.geteuid() == 0:  # it says what it changed on the machine, and changed no more
        assert "run as root: PostgreSQL runs as the system user embedded_postgres; changed for it:" in out
        assert f"chmod go+x {scratch} (was 0700)" in out  # the fixture's folder: traversable, not listable
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o711
        assert f"chown embedded_postgres {folder}" in out
    else:
        assert "run as root" not in out
    assert not folder.exists(), "the folder the demo created must be gone"
    port = int(re.search(r"PostgreSQL started on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert _refused(port)


def test_ctrl_c_while_the_relay_runs_still_cleans_up(scratch: Path) -> None:
    folder = scratch / "demo"
    with demo_process("--rows", "1500", "--data-dir", str(folder)) as proc:
        lines: list[str] = []
        for line in proc.stdout or ():
            lines.append(line)
            if line.startswith("[5/7]"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
        out = "".join(lines) + rest
        assert proc.returncode == 130, out
        assert "interrupted: cleaning up" in out
        assert "[6/7]" not in out
        assert "Traceback" not in out
        assert not folder.exists()
        port = int(re.search(r"PostgreSQL started on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
        assert _refused(port)


def test_web_leaves_the_console_on_the_demos_data_until_ctrl_c(scratch: Path) -> None:
    """`demo --web`: the console answers on the printed address with the audited row's timeline
    and the dead letters; Ctrl-C stops it and the demo cleans up as usual (exit 0)."""
    import httpx

    from tests.relaykit import free_port

    folder = scratch / "demo"
    port = free_port()
    with demo_process("--rows", "60", "--data-dir", str(folder), "--web", f"127.0.0.1:{port}") as proc:
        lines: list[str] = []
        for line in proc.stdout or ():
            lines.append(line)
            if "dead letters: http" in line:
                break
        out = "".join(lines)
        assert f"the audit console is serving the demo's data: http://127.0.0.1:{port}/" in out, out
        found = re.search(r"the row audited above: (\S+find\?q=(\S+))", out)
        assert found, out
        with httpx.Client(timeout=20) as web:
            timeline = web.get(found.group(1), follow_redirects=True)
            assert timeline.status_code == 200
            assert f'id="action-id">{found.group(2)}</span>' in timeline.text
            assert len(re.findall(r"<strong>request \d+</strong>", timeline.text)) >= 2  # it needed retries
            dead = web.get(f"http://127.0.0.1:{port}/dead")
            assert dead.status_code == 200 and "No dead updates" not in dead.text
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        out += rest
        assert proc.returncode == 0, out
        assert "the console stopped" in out and "[7/7] cleaned up" in out
        assert "Traceback" not in out
        assert not folder.exists()
        assert _refused(port)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "0"], "--rows: expected 1 to 100000, got 0"),
        (["--web", "0.0.0.0:8089"], "the demo's console listens on loopback only, got '0.0.0.0:8089'"),
        (["--stop", "{tmp}"], "not a folder made by `outbox-relay demo`"),
        (["--data-dir", "{tmp}"], "not an empty folder"),
        (["--stop", "{tmp}", "--keep"], "--stop DIR takes no other option"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "something").write_text("mine")
    result = demo(*(a.replace("{tmp}", str(tmp_path)) for a in args), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "something").read_text() == "mine"


def test_the_same_seed_gives_the_same_counts(scratch: Path) -> None:
    """Faults depend on (seed, action id, attempt), not on the order requests arrive in."""

    def counts(folder: str) -> dict[str, Any]:
        result = demo("--json", "--rows", "150", "--seed", "3", "--data-dir", str(scratch / folder))
        assert result.returncode == 0, result.stdout + result.stderr
        s = json.loads(result.stdout)
        keys = ("delivered", "dead", "retries", "requests", "delivered_earlier", "delivered_on_404", "seed")
        return {**{k: s[k] for k in keys}, "by_fault": s["sandbox"]["by_fault"]}

    first = counts("pg")
    assert first["retries"] > 0 and len(first["by_fault"]) >= 3  # faults were on
    assert counts("demo") == first
