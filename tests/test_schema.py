"""The SQL surface: what PostgreSQL accepts and refuses, inside the writer's transaction."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import psycopg.errors
import pytest

INSERT = (
    "insert into outbox.action_status_updates (action_id, status, errors, target) values (%s, %s, %s, %s)"
)
E = [{"code": "OTHER", "message": "failed"}]


def _insert(
    db: psycopg.Connection, action_id: Any, status: Any, errors: Any = "[]", target: Any = "default"
) -> None:
    payload = errors if isinstance(errors, str) or errors is None else json.dumps(errors)
    db.execute(INSERT, (action_id, status, payload, target))


# (action_id, status, errors, target, constraint, words in the message)
INVALID: list[tuple[Any, Any, Any, Any, str, str]] = [
    ("", "SUCCESS", "[]", "default", "action_id_length", "action_id must not be empty"),
    ("x" * 256, "SUCCESS", "[]", "default", "action_id_length", "at most 255"),
    ("has space", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("tab\there", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("new\nline", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("nbsp\u00a0id", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("em\u2003space", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("bell\u0007", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("del\u007f", "SUCCESS", "[]", "default", "action_id_printable", "whitespace or control"),
    ("a-1", "success", "[]", "default", "status_known", "status must be SUCCESS or FAILED"),
    ("a-1", "DONE", "[]", "default", "status_known", "status must be SUCCESS or FAILED"),
    ("a-1", "", "[]", "default", "status_known", "status must be SUCCESS or FAILED"),
    ("a-1", "FAILED", "[]", "default", "failed_requires_errors", "FAILED requires at least one error"),
    ("a-1", "SUCCESS", E, "default", "success_has_no_errors", "SUCCESS must not carry errors"),
    ("a-1", "FAILED", '{"code": "OTHER"}', "default", "errors_is_array", "errors must be a JSON array"),
    ("a-1", "FAILED", '"OTHER"', "default", "errors_is_array", "errors must be a JSON array"),
    ("a-1", "FAILED", '["OTHER"]', "default", "error_shape", "errors[0] must be an object"),
    (
        "a-1",
        "FAILED",
        [{"code": "OTHER", "message": "m", "field": "x"}],
        "default",
        "error_shape",
        'unknown key "field"',
    ),
    ("a-1", "FAILED", [{"message": "m"}], "default", "error_code_known", "errors[0].code must be a string"),
    ("a-1", "FAILED", [{"code": 7, "message": "m"}], "default", "error_code_known", "code must be a string"),
    (
        "a-1",
        "FAILED",
        [{"code": "OUT_OF_STOK", "message": "m"}],
        "default",
        "error_code_known",
        'unknown error code "OUT_OF_STOK"',
    ),
    (
        "a-1",
        "FAILED",
        [{"code": "other", "message": "m"}],
        "default",
        "error_code_known",
        'unknown error code "other"',
    ),
    ("a-1", "FAILED", [*E, {"code": "NOPE", "message": "m"}], "default", "error_code_known", "errors[1]"),
    (
        "a-1",
        "FAILED",
        [{"code": "OTHER"}],
        "default",
        "error_message_valid",
        "message must be a non-empty string",
    ),
    (
        "a-1",
        "FAILED",
        [{"code": "OTHER", "message": ""}],
        "default",
        "error_message_valid",
        "non-empty string",
    ),
    (
        "a-1",
        "FAILED",
        [{"code": "OTHER", "message": "   "}],
        "default",
        "error_message_valid",
        "non-empty string",
    ),
    (
        "a-1",
        "FAILED",
        [{"code": "OTHER", "message": 42}],
        "default",
        "error_message_valid",
        "non-empty string",
    ),
    (
        "a-1",
        "FAILED",
        [{"code": "OTHER", "message": "m" * 2001}],
        "default",
        "error_message_valid",
        "at most 2000",
    ),
    ("a-1", "SUCCESS", "[]", "", "target_name", "is not a valid name"),
    ("a-1", "SUCCESS", "[]", "bad target", "target_name", "is not a valid name"),
]


@pytest.mark.parametrize(("action_id", "status", "errors", "target", "constraint", "words"), INVALID)
def test_invalid_rows_are_refused_with_a_named_reason(
    db: psycopg.Connection, action_id: Any, status: Any, errors: Any, target: Any, constraint: str, words: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _insert(db, action_id, status, errors, target)
    assert caught.value.diag.constraint_name == constraint
    assert words in (caught.value.diag.message_primary or "")


@pytest.mark.parametrize(
    ("column", "value"),
    [("action_id", None), ("status", None), ("errors", None), ("target", None)],
)
def test_nulls_are_refused(db: psycopg.Connection, column: str, value: None) -> None:
    row = {"action_id": "a-1", "status": "SUCCESS", "errors": "[]", "target": "default", column: value}
    with pytest.raises(psycopg.errors.NotNullViolation) as caught:
        _insert(db, row["action_id"], row["status"], row["errors"], row["target"])
    assert caught.value.diag.message_primary == f"{column} must not be null"


def test_a_bad_row_rolls_back_the_whole_writer_transaction(db: psycopg.Connection) -> None:
    db.execute("create table shop_orders (id int primary key, state text)")
    with pytest.raises(psycopg.errors.CheckViolation), db.transaction():
        db.execute("insert into shop_orders values (1, 'accepted')")
        _insert(db, "ok-1", "SUCCESS")
        _insert(db, "bad-1", "FAILED", "[]")
    assert db.execute("select count(*) from shop_orders").fetchone() == (0,)
    assert db.execute("select count(*) from outbox.action_status_updates").fetchone() == (0,)


def test_relay_columns_cannot_be_forged_into_an_inconsistent_state(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        db.execute(
            "insert into outbox.action_status_updates (action_id, status, state) values ('a', 'SUCCESS', 'delivered')"
        )
    assert caught.value.diag.constraint_name == "delivered_at_iff_delivered"
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        db.execute(
            "insert into outbox.action_status_updates (action_id, status, state) values ('a', 'SUCCESS', 'lost')"
        )
    assert caught.value.diag.constraint_name == "state_known"


VALID_IDS = [
    "1ba5fc4b-c4fd-4251-880b-3052e301bbd4",
    "accept-action-123",
    "a/b/c",
    "what?x=1&y=2",
    "frag#ment",
    "already%2Fencoded",
    "..",
    "../../etc/passwd",
    "commande-é-日本-🚚",
    "x" * 255,
    "a",
]


@pytest.mark.parametrize("action_id", VALID_IDS)
def test_valid_edge_case_ids_are_stored_exactly(db: psycopg.Connection, action_id: str) -> None:
    _insert(db, action_id, "SUCCESS")
    assert db.execute("select action_id from outbox.action_status_updates").fetchone() == (action_id,)


def test_failed_with_all_thirteen_codes(db: psycopg.Connection) -> None:
    codes = [r[0] for r in db.execute("select code from outbox.error_codes order by code")]
    assert len(codes) == 13
    errors = [{"code": c, "message": f"reason {i} " + "é" * 10} for i, c in enumerate(codes)]
    _insert(db, "many-errors", "FAILED", errors)
    stored = db.execute("select errors from outbox.action_status_updates").fetchone()
    assert stored is not None and stored[0] == errors


def test_message_of_exactly_2000_characters_is_accepted(db: psycopg.Connection) -> None:
    _insert(db, "long", "FAILED", [{"code": "OTHER", "message": "é" * 2000}])
    assert db.execute("select count(*) from outbox.action_status_updates").fetchone() == (1,)


def test_operators_add_an_error_code_with_one_insert(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        _insert(db, "x-1", "FAILED", [{"code": "PARCEL_LOST", "message": "lost"}])
    db.execute("insert into outbox.error_codes (code, description) values ('PARCEL_LOST', 'lost in transit')")
    _insert(db, "x-1", "FAILED", [{"code": "PARCEL_LOST", "message": "lost"}])


def test_defaults(db: psycopg.Connection) -> None:
    db.execute("insert into outbox.action_status_updates (action_id, status) values ('d-1', 'SUCCESS')")
    row = db.execute(
        "select errors, target, state, attempts, next_attempt_at <= now(), delivered_at, dead_at "
        "from outbox.action_status_updates"
    ).fetchone()
    assert row == ([], "default", "pending", 0, True, None, None)


def test_target_and_action_id_are_unique_together(db: psycopg.Connection) -> None:
    _insert(db, "u-1", "SUCCESS", "[]", "default")
    _insert(db, "u-1", "SUCCESS", "[]", "other")
    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        _insert(db, "u-1", "SUCCESS", "[]", "default")
    assert caught.value.diag.constraint_name == "action_status_updates_target_action_id_key"


# -- outbox.enqueue_action_status -------------------------------------------------------------
def _enqueue(db: psycopg.Connection, *args: Any) -> int:
    placeholders = ", ".join(["%s"] * len(args))
    row = db.execute(f"select outbox.enqueue_action_status({placeholders})", args).fetchone()
    assert row is not None
    return int(row[0])


def test_enqueue_identical_repeat_returns_the_same_id(db: psycopg.Connection) -> None:
    first = _enqueue(db, "e-1", "FAILED", json.dumps(E))
    again = _enqueue(db, "e-1", "FAILED", json.dumps(E))
    assert first == again
    assert db.execute("select count(*) from outbox.action_status_updates").fetchone() == (1,)


def test_enqueue_defaults_and_named_arguments(db: psycopg.Connection) -> None:
    a = _enqueue(db, "e-2", "SUCCESS")
    row = db.execute(
        "select outbox.enqueue_action_status(action_id => 'e-3', status => 'SUCCESS', target => 'eu')"
    ).fetchone()
    assert row is not None and row[0] > a
    assert db.execute(
        "select target from outbox.action_status_updates where id = %s", (row[0],)
    ).fetchone() == ("eu",)


@pytest.mark.parametrize(
    ("first_status", "first_errors", "second_status", "second_errors", "what"),
    [
        ("SUCCESS", "[]", "FAILED", json.dumps(E), "its status is SUCCESS, not FAILED"),
        ("FAILED", json.dumps(E), "SUCCESS", "[]", "its status is FAILED, not SUCCESS"),
        (
            "FAILED",
            json.dumps(E),
            "FAILED",
            json.dumps([{"code": "OTHER", "message": "x"}]),
            "the same status (FAILED) with different errors",
        ),
    ],
)
def test_enqueue_conflicting_repeat_names_the_action_and_what_differs(
    db: psycopg.Connection,
    first_status: str,
    first_errors: str,
    second_status: str,
    second_errors: str,
    what: str,
) -> None:
    _enqueue(db, "c-1", first_status, first_errors)
    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        _enqueue(db, "c-1", second_status, second_errors)
    assert caught.value.diag.message_primary == (
        f'action "c-1" already has a different outcome queued for target "default": {what}'
    )


def test_enqueue_refuses_invalid_rows_like_insert(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _enqueue(db, "bad", "FAILED", "[]")
    assert caught.value.diag.message_primary == "FAILED requires at least one error"


def test_commit_notifies_the_relay(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener, psycopg.connect(database_url) as writer:
        listener.execute("listen outbox_action_status")
        with writer.transaction():
            _enqueue(writer, "n-1", "SUCCESS")
            _enqueue(writer, "n-2", "SUCCESS")
            assert list(listener.notifies(timeout=0.2)) == []  # nothing before commit
        got = list(listener.notifies(timeout=2, stop_after=1))
        assert [n.channel for n in got] == ["outbox_action_status"]


# -- bounded rows: at most 100 errors, at most 64 KiB of them as JSON text -------------------
def _json_bytes(db: psycopg.Connection, errors: list[dict[str, str]]) -> int:
    row = db.execute("select octet_length(%s::jsonb::text)", (json.dumps(errors),)).fetchone()
    assert row is not None
    return int(row[0])


def test_fifty_thousand_errors_are_refused_inside_the_writers_transaction(db: psycopg.Connection) -> None:
    db.execute("create table shop_orders (id int primary key, state text)")
    flood = [{"code": "OTHER", "message": f"e{i}"} for i in range(50_000)]
    with pytest.raises(psycopg.errors.CheckViolation) as caught, db.transaction():
        db.execute("insert into shop_orders values (1, 'accepted')")
        _enqueue(db, "flood", "FAILED", json.dumps(flood))
    assert caught.value.diag.constraint_name == "errors_count"
    assert caught.value.diag.message_primary == "errors has 50000 entries; at most 100 are allowed"
    assert db.execute("select count(*) from shop_orders").fetchone() == (0,)
    assert db.execute("select count(*) from outbox.action_status_updates").fetchone() == (0,)


def test_one_hundred_errors_are_accepted_and_one_more_is_not(db: psycopg.Connection) -> None:
    hundred = [{"code": "OTHER", "message": f"line {i} refused"} for i in range(100)]
    _insert(db, "hundred", "FAILED", hundred)
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _insert(db, "hundred-and-one", "FAILED", [*hundred, {"code": "OTHER", "message": "one more"}])
    assert caught.value.diag.message_primary == "errors has 101 entries; at most 100 are allowed"
    assert db.execute("select action_id from outbox.action_status_updates").fetchall() == [("hundred",)]


def test_errors_of_exactly_64_kib_are_accepted_and_one_byte_more_is_not(db: psycopg.Connection) -> None:
    errors = [{"code": "OTHER", "message": "m" * 1600} for _ in range(40)]
    missing = 65536 - _json_bytes(db, errors)
    assert 0 < missing < 400
    errors[-1]["message"] += "m" * missing
    assert _json_bytes(db, errors) == 65536
    _insert(db, "at-the-limit", "FAILED", errors)
    errors[-1]["message"] += "m"
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _insert(db, "over-the-limit", "FAILED", errors)
    assert caught.value.diag.constraint_name == "errors_size"
    assert caught.value.diag.message_primary == (
        "errors is 65537 bytes long as JSON text; at most 65536 (64 KiB) are allowed"
    )


def test_the_sandbox_accepts_exactly_the_error_codes_the_schema_seeds(db: psycopg.Connection) -> None:
    """Two lists of one API fact: the schema's seed (SQL, which operators may extend) and the
    codes the sandbox accepts as the real API does. They must not drift apart."""
    from relay.dev.sandbox import ERROR_CODES

    seeded = {row[0] for row in db.execute("select code from outbox.error_codes")}
    assert len(seeded) == 13
    assert seeded == ERROR_CODES
