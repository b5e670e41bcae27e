"""The console's statements on a big table: each page reads through an index, and a bounded number
of rows, whatever the history holds (bench/web.py measures the times at 10 million updates).

200,000 updates over 300 days (1% dead) are loaded as the table's owner would, analyzed, and each
statement of relay/web/queries.sql (and the dry-run count) is explained with the values the pages
send: no sequential scan of action_status_updates, the index each page is written for, and, run
for real, the rows each scan hands up stay within a page or the scan bound.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from relay.pg.store import NamedQueries, driver_sql
from relay.web import data
from tests.test_status_scale import ROWS, fill, plan_nodes

WEB = NamedQueries("relay.web")
FAR = datetime(9999, 1, 1, tzinfo=UTC)
NONE = {"state": None, "target": None, "status": None, "code": None}


def page(**over: Any) -> dict[str, Any]:
    return {
        **NONE,
        "from_at": "-infinity",
        "before_at": "infinity",
        "before_id": 0,
        "scan": data.SCAN,
        "page_plus": data.PAGE + 1,
        **over,
    }


# A page's rows, plus what an incremental sort reads ahead on (dead_at) before ordering by id
# within equal times: up to 32 rows.
PAGE_READ = data.PAGE + 1 + 32

CASES: list[tuple[str, str, dict[str, Any], str, int]] = [
    # (case, statement, parameters, index it must use, most rows a scan of the table may hand up)
    ("first page", "web_updates_page", page(), "action_status_updates_created_at", PAGE_READ),
    ("a common filter", "web_updates_page", page(state="delivered"), "action_status_updates_created_at", 200),
    (
        "a filter matching nothing",
        "web_updates_page",
        page(code="NO_SUCH_CODE"),
        "action_status_updates_created_at",
        data.SCAN,
    ),
    (
        "one day, 200 days ago",
        "web_updates_page",
        page(
            from_at=datetime.now(UTC) - timedelta(days=200), before_at=datetime.now(UTC) - timedelta(days=199)
        ),
        "action_status_updates_created_at",
        data.PAGE + 1,
    ),
    ("dead rows", "web_dead_page", page(), "action_status_updates_dead", PAGE_READ),
    (
        "dead rows, a code matching nothing",
        "web_dead_page",
        page(code="NO_SUCH_CODE"),
        "action_status_updates_dead",
        data.SCAN,
    ),
    ("dead rows by code", "web_dead_groups", {}, "action_status_updates_dead", ROWS // 100),
    (
        "a prefix",
        "web_find_prefix",
        {"prefix": "default-1", "pattern": "default-1%", "limit": 200},
        "action_status_updates_action_id_pattern",
        200,
    ),
    (
        "a pasted list",
        "web_find_ids",
        {"action_ids": [f"default-{i}" for i in range(1, 51)], "limit": 200},
        "action_status_updates_action_id_pattern",
        50,
    ),
    ("the chart", "web_per_minute", {"minutes": 1440}, "action_status_updates_delivered_at", ROWS // 100),
]


@pytest.fixture(scope="module")
def big(pg_server: Any) -> Any:
    from tests.conftest import TEMPLATE, _scratch_database

    with _scratch_database(pg_server, "ws", TEMPLATE) as url, psycopg.connect(url, autocommit=True) as db:
        fill(db, "default", ROWS)
        db.execute(
            "update outbox.action_status_updates set last_error_code = 'ORDER_IN_WRONG_STATE' where state = 'dead'"
        )
        db.execute("vacuum analyze outbox.action_status_updates")
        yield db


@pytest.mark.parametrize(("case", "name", "params", "index", "most"), CASES, ids=[c[0] for c in CASES])
def test_each_page_reads_through_its_index_and_a_bounded_number_of_rows(
    big: psycopg.Connection, case: str, name: str, params: dict[str, Any], index: str, most: int
) -> None:
    row = big.execute("explain (analyze, format json) " + WEB.driver(name), params).fetchone()
    assert row is not None
    nodes = list(plan_nodes(row[0][0]["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name") == "action_status_updates"]
    assert scans, (case, nodes)
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], (case, row[0])
    if index:
        assert index in {n.get("Index Name") for n in nodes}, (case, row[0])
    read = max(n["Actual Rows"] * n.get("Actual Loops", 1) for n in scans)
    assert read <= most, (case, read, row[0])


def test_the_dead_rows_pages_and_the_dry_run_count_never_visit_the_table(big: psycopg.Connection) -> None:
    """Dead rows are scattered through the table: their lists, groups and the redrive's dry run read
    only action_status_updates_dead (which carries target, last_error_code and id)."""
    statements = [
        (WEB.driver("web_dead_groups"), {}),
        (driver_sql("ops_dead_count"), {"target": "default", "code": "order_in_wrong_state", "since": None}),
    ]
    for sql, params in statements:
        row = big.execute("explain (format json) " + sql, params).fetchone()
        assert row is not None
        scans = [
            n for n in plan_nodes(row[0][0]["Plan"]) if n.get("Relation Name") == "action_status_updates"
        ]
        assert scans and {n["Node Type"] for n in scans} == {"Index Only Scan"}, row[0]
        assert {n["Index Name"] for n in scans} == {"action_status_updates_dead"}
    counted = big.execute(
        driver_sql("ops_dead_count"), {"target": "default", "code": "order_in_wrong_state", "since": None}
    ).fetchone()
    assert counted == (ROWS // 100,)
