"""How ``database_url`` becomes libpq's keywords (:func:`relay.settings.database_params`).

Parsed by the relay itself, without SQLAlchemy: the same keywords the released parser gave for
every form below, plus several hosts (libpq's comma-separated ``host`` and ``port``).
"""

from __future__ import annotations

import pytest

from relay.errors import ConfigError
from relay.settings import Secret, database_params


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (
            "postgresql://u:p%40ss@h:5432/db",
            {"user": "u", "password": "p@ss", "host": "h", "port": "5432", "dbname": "db"},
        ),
        (
            "postgres://u@h/db?sslmode=require",
            {"user": "u", "host": "h", "dbname": "db", "sslmode": "require"},
        ),
        (
            "postgresql+psycopg://u:pw@localhost/db",
            {"user": "u", "password": "pw", "host": "localhost", "dbname": "db"},
        ),
        # a raw "/" or ":" in the password needs no encoding; "@" ends it
        ("postgresql://u:p/s:s@h/db", {"user": "u", "password": "p/s:s", "host": "h", "dbname": "db"}),
        (
            "postgresql://u:a%20b%25c@[::1]:5433/d%2Fb",
            {"user": "u", "password": "a b%c", "host": "::1", "port": "5433", "dbname": "d/b"},
        ),
        ("postgresql:///db?host=/run/postgresql", {"dbname": "db", "host": "/run/postgresql"}),
        ("postgresql://%2Frun%2Fpostgresql/db", {"host": "/run/postgresql", "dbname": "db"}),
        ("postgresql://u:pä@h/dé", {"user": "u", "password": "pä", "host": "h", "dbname": "dé"}),
        ("postgresql://u:p%ZZ@h/db", {"user": "u", "password": "p%ZZ", "host": "h", "dbname": "db"}),
        (
            "postgresql://h/db?application_name=a&application_name=b",
            {"host": "h", "dbname": "db", "application_name": "a,b"},
        ),
        ("postgresql://", {}),
        (
            "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
            {
                "user": "u",
                "host": "h1,h2",
                "port": "5432,5433",
                "dbname": "db",
                "target_session_attrs": "read-write",
            },
        ),
        ("postgresql://h1,[::1]:6432/db", {"host": "h1,::1", "port": ",6432", "dbname": "db"}),
    ],
)
def test_a_url_gives_libpq_its_keywords(url: str, params: dict[str, str]) -> None:
    assert database_params(Secret(url)) == params


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://h:abc/db", "database_url: the port must be a number from 1 to 65535"),
        ("postgresql://h1:5432,h2:99999/db", "database_url: the port must be a number from 1 to 65535"),
        ("postgresql://h:/db", "database_url: the port must be a number from 1 to 65535"),
        ("postgresql://h/db?port=x", "database_url: the port must be a number from 1 to 65535"),
        ("postgresql://h/db?foo=1", "database_url: unknown connection parameter 'foo'"),
        ("postgresql://u:pw@[::1/db", "database_url: expected postgresql://"),
        ("postgresql://u:pw@h/d\x00b", "database_url: expected postgresql://"),
        ("mysql://u:pw@h/db", "database_url: expected postgresql://"),
        ("h:5432/db", "database_url: expected postgresql://"),
    ],
)
def test_a_bad_url_is_refused_without_quoting_it(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        database_params(Secret(url))
    assert str(caught.value).startswith(message)
    assert "pw" not in str(caught.value).replace("password", "")
