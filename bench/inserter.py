"""The latency benchmark's writer: commits one row at a time at a steady rate.

Each row is its own transaction, written the recommended way (``outbox.enqueue_action_status``);
the commit time is ``time.time()`` right after ``commit()`` returns (the row is visible to
others from the server's commit, a few microseconds before). Rows are paced on an absolute
schedule (row i is due at start + i / rate), so a slow commit does not shift later rows.
Writes ``{"commits": {action_id: t}, ...}`` as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import psycopg

CODES = ["ORDER_IN_WRONG_STATE", "DATA_NOT_FOUND", "OTHER", "UNAVAILABLE"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--prefix", default="lat")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = random.Random(11)
    commits: dict[str, float] = {}
    commit_ms: list[float] = []
    late = 0
    total = int(args.rate * args.seconds)
    with psycopg.connect(args.url) as conn:
        conn.execute("select 1")
        conn.commit()
        start = time.perf_counter() + 0.05
        for i in range(total):
            due = start + i / args.rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.005:
                late += 1
            action_id = f"{args.prefix}-{i:06d}"
            if rng.random() < 0.7:
                status, errors = "SUCCESS", "[]"
            else:
                status = "FAILED"
                errors = json.dumps([{"code": rng.choice(CODES), "message": f"reason {i}"}])
            conn.execute(
                "select outbox.enqueue_action_status(%s, %s, cast(%s as jsonb), 'default')",
                (action_id, status, errors),
            )
            before = time.perf_counter()
            conn.commit()
            commits[action_id] = time.time()
            commit_ms.append((time.perf_counter() - before) * 1000)
        elapsed = time.perf_counter() - start
    commit_ms.sort()
    with open(args.out, "w") as fh:
        json.dump(
            {
                "commits": commits,
                "rows": total,
                "elapsed_s": round(elapsed, 3),
                "achieved_rate": round(total / elapsed, 1),
                "late_rows": late,
                "commit_ms_p50": round(commit_ms[len(commit_ms) // 2], 3) if commit_ms else None,
                "commit_ms_p99": round(commit_ms[int(len(commit_ms) * 0.99)], 3) if commit_ms else None,
            },
            fh,
        )


if __name__ == "__main__":
    main()
