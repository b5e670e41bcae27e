import psycopg


def test_enqueue_roundtrip(db: psycopg.Connection) -> None:
    row = db.execute("select outbox.enqueue_action_status('a-1', 'SUCCESS')").fetchone()
    assert row is not None and row[0] > 0
