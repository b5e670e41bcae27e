"""Every bad setting is one line on stderr naming the key and what is accepted, and exit 2.

Each case runs ``outbox-relay`` as a real process (a TOML file, ``RELAY_*`` variables or command-line
flags) and compares the whole of stderr with the exact line, so a traceback, a second line or a
silently accepted value fails the case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.relaykit import cli

# (TOML file or None, RELAY_* variables, command line after the config or None for `check`, message)
CASES = [
    pytest.param(
        'targets = "x"\n',
        {},
        None,
        "targets: expected a table ([targets]), got 'x'",
        id="toml-targets-string",
    ),
    pytest.param("retry = 5\n", {}, None, "retry: expected a table ([retry]), got 5", id="toml-retry-number"),
    pytest.param(
        "breaker = [1, 2]\n",
        {},
        None,
        "breaker: expected a table ([breaker]), got [1, 2]",
        id="toml-breaker-list",
    ),
    pytest.param(
        '[targets]\ndefault = "x"\n',
        {},
        None,
        "targets.default: expected a table ([targets.default]), got 'x'",
        id="toml-target-string",
    ),
    pytest.param(
        "poll_interval = inf\n",
        {},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got inf",
        id="toml-poll-inf",
    ),
    pytest.param(
        "poll_interval = nan\n",
        {},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got nan",
        id="toml-poll-nan",
    ),
    pytest.param(
        "poll_interval = 0\n",
        {},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got 0",
        id="toml-poll-zero",
    ),
    pytest.param(
        'poll_interval = "2h"\n',
        {},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got '2h'",
        id="toml-poll-2h",
    ),
    pytest.param(
        "lease = inf\n",
        {},
        None,
        "lease: expected a duration from 1s to 1d (e.g. 30s, 5m, 6h), got inf",
        id="toml-lease-inf",
    ),
    pytest.param(
        "lease = 0.5\n",
        {},
        None,
        "lease: expected a duration from 1s to 1d (e.g. 30s, 5m, 6h), got 0.5",
        id="toml-lease-half",
    ),
    pytest.param(
        "lease = true\n",
        {},
        None,
        "lease: expected a duration from 1s to 1d (e.g. 30s, 5m, 6h), got True",
        id="toml-lease-bool",
    ),
    pytest.param(
        "shutdown_timeout = nan\n",
        {},
        None,
        "shutdown_timeout: expected a duration from 0s to 1h (e.g. 30s, 5m, 6h), got nan",
        id="toml-shutdown-nan",
    ),
    pytest.param(
        'shutdown_timeout = "-1s"\n',
        {},
        None,
        "shutdown_timeout: expected a duration from 0s to 1h (e.g. 30s, 5m, 6h), got '-1s'",
        id="toml-shutdown-negative",
    ),
    pytest.param(
        "batch_size = 0\n",
        {},
        None,
        "batch_size: expected a whole number from 1 to 10000, got 0",
        id="toml-batch-zero",
    ),
    pytest.param(
        "batch_size = 2.5\n",
        {},
        None,
        "batch_size: expected a whole number from 1 to 10000, got 2.5",
        id="toml-batch-float",
    ),
    pytest.param(
        "batch_size = 1000000\n",
        {},
        None,
        "batch_size: expected a whole number from 1 to 10000, got 1000000",
        id="toml-batch-huge",
    ),
    pytest.param(
        "max_concurrency = 100000000000000000000\n",
        {},
        None,
        "max_concurrency: expected a whole number from 1 to 10000, got 100000000000000000000",
        id="toml-concurrency-1e20",
    ),
    pytest.param(
        'max_concurrency = "many"\n',
        {},
        None,
        "max_concurrency: expected a whole number from 1 to 10000, got 'many'",
        id="toml-concurrency-string",
    ),
    pytest.param(
        "request_timeout = inf\n",
        {},
        None,
        "request_timeout: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got inf",
        id="toml-request-timeout-inf",
    ),
    pytest.param(
        'request_timeout = "2h"\n',
        {},
        None,
        "request_timeout: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got '2h'",
        id="toml-request-timeout-2h",
    ),
    pytest.param(
        "rate_limit = -1\n",
        {},
        None,
        "rate_limit: expected a number from 0.001 to 1e+06, got -1",
        id="toml-rate-negative",
    ),
    pytest.param(
        "rate_limit = inf\n",
        {},
        None,
        "rate_limit: expected a number from 0.001 to 1e+06, got inf",
        id="toml-rate-inf",
    ),
    pytest.param(
        'retention = "30m"\n',
        {},
        None,
        "retention: expected a duration from 1h to 3650d (e.g. 30s, 5m, 6h), got '30m'",
        id="toml-retention-30m",
    ),
    pytest.param(
        "retention = inf\n",
        {},
        None,
        "retention: expected a duration from 1h to 3650d (e.g. 30s, 5m, 6h), got inf",
        id="toml-retention-inf",
    ),
    pytest.param(
        "[retry]\nmax_delay = inf\n",
        {},
        None,
        "retry.max_delay: expected a duration from 1ms to 1w (e.g. 30s, 5m, 6h), got inf",
        id="toml-retry-max-delay-inf",
    ),
    pytest.param(
        "[retry]\nbase_delay = 0\n",
        {},
        None,
        "retry.base_delay: expected a duration from 1ms to 1d (e.g. 30s, 5m, 6h), got 0",
        id="toml-retry-base-zero",
    ),
    pytest.param(
        '[retry]\nbase_delay = "10s"\nmax_delay = "1s"\n',
        {},
        None,
        "retry: max_delay must be at least base_delay",
        id="toml-retry-max-below-base",
    ),
    pytest.param(
        "[retry]\nmax_attempts = 0\n",
        {},
        None,
        "retry.max_attempts: expected a whole number from 1 to 1000, got 0",
        id="toml-retry-attempts-zero",
    ),
    pytest.param(
        "[retry]\nmax_attempts = 1000000\n",
        {},
        None,
        "retry.max_attempts: expected a whole number from 1 to 1000, got 1000000",
        id="toml-retry-attempts-huge",
    ),
    pytest.param(
        '[retry]\nmax_age = "400d"\n',
        {},
        None,
        "retry.max_age: expected a duration from 1s to 365d (e.g. 30s, 5m, 6h), got '400d'",
        id="toml-retry-max-age-400d",
    ),
    pytest.param(
        "[breaker]\nfailure_threshold = 0\n",
        {},
        None,
        "breaker.failure_threshold: expected a whole number from 1 to 1000000, got 0",
        id="toml-breaker-threshold-zero",
    ),
    pytest.param(
        "[breaker]\nopen_for = nan\n",
        {},
        None,
        "breaker.open_for: expected a duration from 10ms to 1d (e.g. 30s, 5m, 6h), got nan",
        id="toml-breaker-open-for-nan",
    ),
    pytest.param(
        '[breaker]\nopen_for = "10s"\nmax_open_for = "1s"\n',
        {},
        None,
        "breaker: max_open_for must be at least open_for",
        id="toml-breaker-max-below-open",
    ),
    pytest.param(
        "[targets.eu]\nrequest_timeout = 0\n",
        {},
        None,
        "targets.eu.request_timeout: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got 0",
        id="toml-target-timeout-zero",
    ),
    pytest.param(
        "[targets.eu]\nmax_concurrency = 100000\n",
        {},
        None,
        "targets.eu.max_concurrency: expected a whole number from 1 to 10000, got 100000",
        id="toml-target-concurrency-huge",
    ),
    pytest.param(
        'retention_include_dead = "no"\n',
        {},
        None,
        "retention_include_dead: expected true or false (a TOML boolean, unquoted), got 'no'",
        id="toml-include-dead-string-no",
    ),
    pytest.param(
        "retention_include_dead = 1\n",
        {},
        None,
        "retention_include_dead: expected true or false (a TOML boolean, unquoted), got 1",
        id="toml-include-dead-number",
    ),
    pytest.param(
        'retention_include_dead = "true"\n',
        {},
        None,
        "retention_include_dead: expected true or false (a TOML boolean, unquoted), got 'true'",
        id="toml-include-dead-string-true",
    ),
    pytest.param(
        'database_url = "postgresql://relay@db:notaport/app"\n',
        {},
        None,
        "database_url: the port must be a number from 1 to 65535",
        id="toml-db-port-word",
    ),
    pytest.param(
        'database_url = "postgresql+a.b://relay@db/app"\n',
        {},
        None,
        "database_url: expected postgresql://[user[:password]@][host][:port][/dbname][?param=value&...] (scheme postgresql, postgres or postgresql+psycopg)",
        id="toml-db-scheme-dotted",
    ),
    pytest.param(
        'database_url = "mysql://relay@db/app"\n',
        {},
        None,
        "database_url: expected postgresql://[user[:password]@][host][:port][/dbname][?param=value&...] (scheme postgresql, postgres or postgresql+psycopg)",
        id="toml-db-mysql",
    ),
    pytest.param(
        None,
        {"RELAY_POLL_INTERVAL": "99999999999999999999"},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got '99999999999999999999'",
        id="env-poll-huge",
    ),
    pytest.param(
        None,
        {"RELAY_POLL_INTERVAL": "inf"},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got 'inf'",
        id="env-poll-inf",
    ),
    pytest.param(
        None,
        {"RELAY_POLL_INTERVAL": "soon"},
        None,
        "poll_interval: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got 'soon'",
        id="env-poll-word",
    ),
    pytest.param(
        None,
        {"RELAY_LEASE": "nan"},
        None,
        "lease: expected a duration from 1s to 1d (e.g. 30s, 5m, 6h), got 'nan'",
        id="env-lease-nan",
    ),
    pytest.param(
        None,
        {"RELAY_LEASE": "2d"},
        None,
        "lease: expected a duration from 1s to 1d (e.g. 30s, 5m, 6h), got '2d'",
        id="env-lease-2d",
    ),
    pytest.param(
        None,
        {"RELAY_SHUTDOWN_TIMEOUT": "2h"},
        None,
        "shutdown_timeout: expected a duration from 0s to 1h (e.g. 30s, 5m, 6h), got '2h'",
        id="env-shutdown-2h",
    ),
    pytest.param(
        None,
        {"RELAY_BATCH_SIZE": "-5"},
        None,
        "batch_size: expected a whole number from 1 to 10000, got '-5'",
        id="env-batch-negative",
    ),
    pytest.param(
        None,
        {"RELAY_BATCH_SIZE": "1.5"},
        None,
        "batch_size: expected a whole number from 1 to 10000, got '1.5'",
        id="env-batch-float",
    ),
    pytest.param(
        None,
        {"RELAY_MAX_CONCURRENCY": "100000000000000000000"},
        None,
        "max_concurrency: expected a whole number from 1 to 10000, got '100000000000000000000'",
        id="env-concurrency-1e20",
    ),
    pytest.param(
        None,
        {"RELAY_RATE_LIMIT": "fast"},
        None,
        "rate_limit: expected a number from 0.001 to 1e+06, got 'fast'",
        id="env-rate-word",
    ),
    pytest.param(
        None,
        {"RELAY_RATE_LIMIT": "nan"},
        None,
        "rate_limit: expected a number from 0.001 to 1e+06, got 'nan'",
        id="env-rate-nan",
    ),
    pytest.param(
        None,
        {"RELAY_REQUEST_TIMEOUT": "0"},
        None,
        "request_timeout: expected a duration from 10ms to 1h (e.g. 30s, 5m, 6h), got '0'",
        id="env-request-timeout-zero",
    ),
    pytest.param(
        None,
        {"RELAY_RETENTION": "1m"},
        None,
        "retention: expected a duration from 1h to 3650d (e.g. 30s, 5m, 6h), got '1m'",
        id="env-retention-1m",
    ),
    pytest.param(
        None,
        {"RELAY_RETRY_BASE_DELAY": "inf"},
        None,
        "retry.base_delay: expected a duration from 1ms to 1d (e.g. 30s, 5m, 6h), got 'inf'",
        id="env-retry-base-inf",
    ),
    pytest.param(
        None,
        {"RELAY_RETRY_MAX_DELAY": "30d"},
        None,
        "retry.max_delay: expected a duration from 1ms to 1w (e.g. 30s, 5m, 6h), got '30d'",
        id="env-retry-max-delay-30d",
    ),
    pytest.param(
        None,
        {"RELAY_RETRY_MAX_ATTEMPTS": "ten"},
        None,
        "retry.max_attempts: expected a whole number from 1 to 1000, got 'ten'",
        id="env-retry-attempts-word",
    ),
    pytest.param(
        None,
        {"RELAY_RETRY_MAX_AGE": "0"},
        None,
        "retry.max_age: expected a duration from 1s to 365d (e.g. 30s, 5m, 6h), got '0'",
        id="env-retry-max-age-zero",
    ),
    pytest.param(
        None,
        {"RELAY_METRICS_LISTEN": "127.0.0.1:http"},
        None,
        "metrics_listen: expected host:port, got '127.0.0.1:http'",
        id="env-metrics-port-word",
    ),
    pytest.param(
        None,
        {"RELAY_METRICS_LISTEN": "127.0.0.1:70000"},
        None,
        "metrics_listen: expected host:port, got '127.0.0.1:70000'",
        id="env-metrics-port-big",
    ),
    pytest.param(
        None,
        {"RELAY_LOG_FORMAT": "xml"},
        None,
        "log_format: expected text or json, got 'xml'",
        id="env-log-format",
    ),
    pytest.param(
        None,
        {"RELAY_LOG_LEVEL": "loud"},
        None,
        "log_level: expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'",
        id="env-log-level",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "postgresql://relay:pw@db:notaport/app"},
        None,
        "database_url: the port must be a number from 1 to 65535",
        id="env-db-port-word",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "postgresql+a.b://relay:pw@db/app"},
        None,
        "database_url: expected postgresql://[user[:password]@][host][:port][/dbname][?param=value&...] (scheme postgresql, postgres or postgresql+psycopg)",
        id="env-db-scheme-dotted",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "postgresql://relay:pw@[::1/app"},
        None,
        "database_url: expected postgresql://[user[:password]@][host][:port][/dbname][?param=value&...]",
        id="env-db-bracket",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "postgresql://relay:pw@db/app?port=x"},
        None,
        "database_url: the port must be a number from 1 to 65535",
        id="env-db-query-port",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "postgresql://relay:pw@db:0/app"},
        None,
        "database_url: the port must be a number from 1 to 65535",
        id="env-db-port-zero",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "postgresql://relay:pw@db/app?colour=blue"},
        None,
        "database_url: unknown connection parameter 'colour'",
        id="env-db-unknown-param",
    ),
    pytest.param(
        None,
        {"RELAY_DATABASE_URL": "http://relay:pw@db/app"},
        None,
        "database_url: expected postgresql://[user[:password]@][host][:port][/dbname][?param=value&...] (scheme postgresql, postgres or postgresql+psycopg)",
        id="env-db-http",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than", "0"],
        "argument --older-than: expected a duration from 1h to 36500d (e.g. 30s, 5m, 6h), got '0' (see --help)",
        id="flag-purge-zero",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than", "30m"],
        "argument --older-than: expected a duration from 1h to 36500d (e.g. 30s, 5m, 6h), got '30m' (see --help)",
        id="flag-purge-30m",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than", "inf"],
        "argument --older-than: expected a duration from 1h to 36500d (e.g. 30s, 5m, 6h), got 'inf' (see --help)",
        id="flag-purge-inf",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than=-1d"],
        "argument --older-than: expected a duration from 1h to 36500d (e.g. 30s, 5m, 6h), got '-1d' (see --help)",
        id="flag-purge-negative",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than", "old"],
        "argument --older-than: expected a duration from 1h to 36500d (e.g. 30s, 5m, 6h), got 'old' (see --help)",
        id="flag-purge-word",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than", "30d", "--batch-size", "0"],
        "argument --batch-size: expected a whole number from 1 to 1000000, got '0' (see --help)",
        id="flag-purge-batch-zero",
    ),
    pytest.param(
        None,
        {},
        ["purge", "--older-than", "30d", "--batch-size", "99999999999999999999"],
        "argument --batch-size: expected a whole number from 1 to 1000000, got '99999999999999999999' (see --help)",
        id="flag-purge-batch-huge",
    ),
    pytest.param(
        None,
        {},
        ["dead", "list", "--limit", "all"],
        "argument --limit: expected a whole number from 1 to 1000000, got 'all' (see --help)",
        id="flag-dead-limit-word",
    ),
    pytest.param(
        None,
        {},
        ["dead", "list", "--since", "nan"],
        "argument --since: expected a duration such as 30s, 5m or 6h, got 'nan' (see --help)",
        id="flag-dead-since-nan",
    ),
]


def test_the_table_is_large_and_covers_all_three_sources() -> None:
    assert len(CASES) >= 50
    sources = {("toml" if c.values[0] is not None else "flag" if c.values[2] else "env") for c in CASES}
    assert sources == {"toml", "env", "flag"}


@pytest.mark.parametrize(("toml", "env", "argv", "message"), CASES)
def test_a_bad_setting_is_one_line_and_exit_2(
    tmp_path: Path, toml: str | None, env: dict[str, str], argv: list[str] | None, message: str
) -> None:
    config: list[str] = []
    if toml is not None:
        path = tmp_path / "relay.toml"
        path.write_text(toml, encoding="utf-8")
        config = ["--config", str(path)]
    result = cli(*config, *(argv or ["check"]), env=env, timeout=120)
    assert "Traceback" not in result.stderr
    assert result.stderr == f"outbox-relay: {message}\n"
    assert result.returncode == 2
    assert result.stdout == ""
