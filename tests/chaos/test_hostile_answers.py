"""Hostile answers against a real relay process: nothing the API sends can stop delivery.

One ``outbox-relay run`` process, the hostile loopback API (tests/hostile_api.py), and a table
where most rows are ordinary and some get an answer built to hurt: NUL in JSON and raw, a lone
surrogate, invalid UTF-8, 4 MB, a gzip bomb, 100,000-deep nesting, an HTML 502, a body dripped
one byte a second, headers dripped, a Retry-After of 8 KB. Each hostile row must end in the state
the contract's answer table gives, with an attempt row for every request the API saw; every
ordinary row is delivered once; the process never restarts; its peak RSS stays under 150 MB.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from tests.hostile_api import (
    Behaviour,
    HostileApi,
    deep_json,
    drip,
    gzip_bomb,
    html_502,
    huge_body,
    invalid_utf8,
    lone_surrogate,
    long_retry_after,
    nul_escapes,
    raw_nul_html,
)
from tests.relaykit import relay_env, sample_updates, seed_rows, start_relay_process, wait_until

pytestmark = pytest.mark.chaos

ROWS_PER_CLASS = 10
ORDINARY = 300
RSS_LIMIT_MB = 150

# prefix -> (what the API sends, the final state the answer table gives, outcomes of its attempts)
# 4xx other than ACTION_ALREADY_FINAL: dead at once. 5xx, drips cut by the deadline, 429: retried;
# the answers that applied the action first are then refused as ACTION_ALREADY_FINAL, which after
# an unknown outcome means delivered (delivered_earlier).
CLASSES: dict[str, tuple[Behaviour, str, list[str]]] = {
    "nuljson-": (nul_escapes(), "dead", ["dead"]),
    "nulhtml-": (replace(raw_nul_html(), apply=True, times=1), "delivered", ["retry", "delivered_earlier"]),
    "surrogate-": (lone_surrogate(), "dead", ["dead"]),
    "badutf8-": (invalid_utf8(), "dead", ["dead"]),
    "huge-": (replace(huge_body(), apply=True, times=1), "delivered", ["retry", "delivered_earlier"]),
    "bomb-": (replace(gzip_bomb(), apply=True, times=1), "delivered", ["retry", "delivered_earlier"]),
    "deep-": (deep_json(), "dead", ["dead"]),
    "html502-": (replace(html_502(), times=1), "delivered", ["retry", "delivered"]),
    "dripbody-": (replace(drip(status=200), apply=True), "delivered", ["delivered"]),
    "driphead-": (
        replace(drip(status=200, head=True), apply=True, times=1),
        "delivered",
        ["retry", "delivered_earlier"],
    ),
    "retryafter-": (replace(long_retry_after(), times=1), "delivered", ["retry", "delivered"]),
}


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_hostile_answers_never_stop_delivery(database_url: str, tmp_path: Path) -> None:
    hostile = {
        f"{prefix}{i:02d}": expected for prefix, expected in CLASSES.items() for i in range(ROWS_PER_CLASS)
    }
    ordinary = sample_updates(ORDINARY, prefix="plain")
    with HostileApi({prefix: behaviour for prefix, (behaviour, _, _) in CLASSES.items()}) as api:
        env = relay_env(database_url, api.url, RELAY_LOG_LEVEL="INFO", RELAY_RETRY_MAX_ATTEMPTS="10")
        log_path = tmp_path / "relay.log"
        proc = start_relay_process(env, log_path)
        try:
            # Hostile rows first, interleaved with ordinary ones: they compete for the same claims.
            rows = [(action_id, "SUCCESS", []) for action_id in hostile]
            seed_rows(
                database_url,
                rows[: len(rows) // 2] + ordinary[:150] + rows[len(rows) // 2 :] + ordinary[150:],
            )
            started = time.monotonic()

            def finished() -> bool:
                with psycopg.connect(database_url) as conn:
                    row = conn.execute(
                        "select count(*) filter (where state in ('pending', 'in_flight')) "
                        "from outbox.action_status_updates"
                    ).fetchone()
                return row is not None and row[0] == 0

            done = wait_until(finished, 120, interval=0.2)
            took = time.monotonic() - started
            assert proc.poll() is None, log_path.read_text()
            peak_mb = _peak_rss_mb(proc.pid)
            assert done, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        seen = dict(api.requests)
        applied = set(api.applied)
        duplicates = api.duplicates

    log = log_path.read_text(encoding="utf-8", errors="replace")
    with psycopg.connect(database_url) as conn:
        states = dict(conn.execute("select action_id, state from outbox.action_status_updates").fetchall())
        outcomes: dict[str, list[str]] = {}
        for action_id, outcome in conn.execute(
            "select u.action_id, d.outcome from outbox.delivery_attempts d "
            "join outbox.action_status_updates u on u.id = d.update_id order by u.action_id, d.attempt, d.id"
        ):
            outcomes.setdefault(action_id, []).append(outcome)
        nul = conn.execute(
            "select count(*) from outbox.delivery_attempts where position(chr(65533) in coalesce(response_body, '')) > 0"
        ).fetchone()

    lost = [a for a, _, _ in ordinary if states.get(a) != "delivered" or a not in applied]
    wrong = {
        a: (states.get(a), outcomes.get(a))
        for a, (_, state, outs) in hostile.items()
        if states.get(a) != state or outcomes.get(a) != outs
    }
    unrecorded = {a: (n, len(outcomes.get(a, []))) for a, n in seen.items() if n != len(outcomes.get(a, []))}
    restarts = sum(1 for line in log.splitlines() if "relay.daemon" in line and " starting" in line) - 1
    print(
        f"\n[hostile] rows {len(hostile) + ORDINARY} ({len(hostile)} hostile answers of {len(CLASSES)} kinds), "
        f"lost {len(lost)} of {ORDINARY} ordinary, hostile rows in the wrong end state {len(wrong)}, "
        f"requests without an attempt row: {len(unrecorded)}, duplicates refused {duplicates}, "
        f"relay restarts {restarts}, peak RSS {peak_mb:.0f} MB, drained in {took:.1f}s"
    )
    for prefix, (_, state, outs) in CLASSES.items():
        mine = [a for a in hostile if a.startswith(prefix)]
        print(
            f"[hostile] {prefix.rstrip('-'):<11} rows {len(mine)}, requests {sum(seen.get(a, 0) for a in mine)}, "
            f"end states {sorted({str(states.get(a)) for a in mine})} (expected {state}), attempts {outs}"
        )
    assert not lost, lost[:5]
    assert not wrong, wrong
    assert not unrecorded, unrecorded  # every request the API saw left exactly one attempt row
    assert restarts == 0
    assert peak_mb < RSS_LIMIT_MB
    assert nul is not None and nul[0] > 0  # the invalid bytes were stored, replaced, not refused
    assert "Traceback" not in log
    assert os.path.getsize(log_path) < 2_000_000  # no log line carries a body
