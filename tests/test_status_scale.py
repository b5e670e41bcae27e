"""``outbox-relay status`` on a big table: no statement of it scans ``action_status_updates``.

The table is filled with generate_series as its owner would (200,000 rows, mostly delivered, as
a year of history looks), analyzed, and the command's statements are explained: every figure
comes through an index (the partial indexes, the loose scan over the (target, action_id) index),
and the figures the command prints are compared with a brute-force count of the same rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg

from relay.pg.store import driver_sql, queries
from tests.relaykit import cli

ROWS = 200_000  # target "default": 1% dead, 30 pending, 3 in flight, the rest delivered
EU_ROWS = 300  # target "eu": small enough to be counted exactly
FILL = """
insert into outbox.action_status_updates
    (action_id, status, target, state, attempts, requests, created_at, next_attempt_at,
     delivered_at, dead_at, claim_token, claimed_by)
select %(target)s || '-' || g, 'SUCCESS', %(target)s, s.state, 1, 1,
       now() - interval '300 days' * (1 - g::float8 / %(n)s) - interval '2 hours', now(),
       case when s.state = 'delivered' then now() - interval '300 days' * (1 - g::float8 / %(n)s) end,
       case when s.state = 'dead' then now() - interval '300 days' * (1 - g::float8 / %(n)s) end,
       case when s.state = 'in_flight' then gen_random_uuid() end,
       case when s.state = 'in_flight' then 'relay-a' end
from generate_series(1, %(n)s) g
cross join lateral (
    select case when g > %(n)s - 3 then 'in_flight'
                when g > %(n)s - 33 then 'pending'
                when g %% 100 = 7 then 'dead'
                else 'delivered' end as state
) s
"""


def fill(db: psycopg.Connection, target: str, n: int) -> None:
    db.execute("set session_replication_role = replica")  # the owner's bulk load: no triggers
    try:
        db.execute(FILL, {"target": target, "n": n})
    finally:
        db.execute("reset session_replication_role")


def brute_force(db: psycopg.Connection) -> dict[str, dict[str, int]]:
    """What status reports, counted by reading every row."""
    rows = db.execute(
        """select target,
                  count(*) filter (where state = 'pending'),
                  count(*) filter (where state = 'in_flight'),
                  count(*) filter (where state = 'delivered'),
                  count(*) filter (where state = 'dead'),
                  count(*) filter (where state = 'delivered' and delivered_at > now() - interval '1 hour'),
                  count(*) filter (where state = 'dead' and dead_at > now() - interval '1 hour')
           from outbox.action_status_updates group by target"""
    ).fetchall()
    keys = ("pending", "in_flight", "delivered", "dead", "delivered_last_hour", "dead_last_hour")
    return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


STATUS_STATEMENTS = sorted(
    name for name in queries() if name.startswith("ops_status_") and name != "ops_status_delivered_plan"
)  # ops_status_delivered_plan is an EXPLAIN itself: it runs nothing


def status(database_url: str) -> dict[str, dict[str, Any]]:
    result = cli("status", "--json", env={"RELAY_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    return {t["target"]: t for t in json.loads(result.stdout)["targets"]}


def test_status_reads_a_big_table_through_its_indexes_and_counts_right(
    database_url: str, db: psycopg.Connection
) -> None:
    fill(db, "default", ROWS)
    db.execute(
        """update outbox.action_status_updates set delivered_at = now() - interval '10 minutes'
           where target = 'default' and state = 'delivered' and id % 1000 = 1"""
    )
    db.execute("vacuum analyze outbox.action_status_updates")

    # One target: its dead rows are all of them.
    truth = brute_force(db)
    got = status(database_url)
    assert list(got) == ["default"]
    for key in ("pending", "in_flight", "dead", "delivered_last_hour", "dead_last_hour"):
        assert got["default"][key] == truth["default"][key], key
    assert truth["default"]["dead"] == ROWS // 100 and truth["default"]["delivered_last_hour"] >= 190

    fill(db, "eu", EU_ROWS)
    db.execute(
        "update outbox.action_status_updates set dead_at = now() - interval '5 minutes' "
        "where target = 'eu' and state = 'dead'"
    )
    db.execute("vacuum analyze outbox.action_status_updates")
    truth = brute_force(db)
    assert set(truth) == {"default", "eu"}

    # No statement of the command reads the table from end to end.
    params = {"target": "eu", "limit": 10_000}
    assert "ops_status_target_names" in STATUS_STATEMENTS and len(STATUS_STATEMENTS) >= 5
    for name in STATUS_STATEMENTS:
        row = db.execute("explain (format json) " + driver_sql(name), params).fetchone()
        assert row is not None
        nodes = list(plan_nodes(row[0][0]["Plan"]))
        scans = [n for n in nodes if n.get("Relation Name") == "action_status_updates"]
        assert scans, (name, nodes)
        assert not [n for n in scans if n["Node Type"] == "Seq Scan"], (name, row[0])

    got = status(database_url)
    assert list(got) == ["default", "eu"]
    for target in ("default", "eu"):
        for key in ("pending", "in_flight", "dead", "delivered_last_hour", "dead_last_hour"):
            assert got[target][key] == truth[target][key], (target, key)
    d, eu = got["default"], got["eu"]
    assert (eu["delivered"], eu["delivered_exact"]) == (truth["eu"]["delivered"], True)
    assert d["delivered_exact"] is False  # estimated: about 197,967
    assert abs(d["delivered"] - truth["default"]["delivered"]) < truth["default"]["delivered"] * 0.05
    assert (d["dead"], eu["dead"], eu["dead_last_hour"]) == (ROWS // 100, EU_ROWS // 100, EU_ROWS // 100)

    human = cli("status", env={"RELAY_DATABASE_URL": database_url})
    assert human.returncode == 0, human.stderr
    line = next(x for x in human.stdout.splitlines() if x.startswith("default "))
    assert re.search(rf"\s~{d['delivered']:,}\s+{ROWS // 100}\s", line), line
    eu_line = next(x for x in human.stdout.splitlines() if x.startswith("eu "))
    assert f" {truth['eu']['delivered']} " in eu_line and "~" not in eu_line, eu_line
    assert "~: estimated from the planner's statistics (the other figures are exact)" in human.stdout
