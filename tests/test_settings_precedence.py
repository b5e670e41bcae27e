"""One precedence rule for every setting: a ``RELAY_*`` variable overrides the config file.

For each variable: the file says X, the variable says Y, the effective setting is Y.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay import settings as settings_module
from relay.settings import Settings, load_settings
from tests.relaykit import relay_env, start_relay_process, wait_until


def _file(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return str(path)


# variable: (file text, variable value or a function of tmp_path, the effective value, expected)
Getter = Callable[[Settings], Any]
d = "targets.default"
CASES: dict[str, tuple[str, str, Getter, Any]] = {
    "RELAY_POLL_INTERVAL": ("poll_interval = 7\n", "3s", lambda s: s.poll_interval, 3.0),
    "RELAY_BATCH_SIZE": ("batch_size = 7\n", "3", lambda s: s.batch_size, 3),
    "RELAY_MAX_CONCURRENCY": (
        "max_concurrency = 7\n",
        "3",
        lambda s: s.targets["default"].max_concurrency,
        3,
    ),
    "RELAY_RATE_LIMIT": ("rate_limit = 7\n", "3", lambda s: s.targets["default"].rate_limit, 3.0),
    "RELAY_REQUEST_TIMEOUT": (
        "request_timeout = 7\n",
        "3",
        lambda s: s.targets["default"].request_timeout,
        3.0,
    ),
    "RELAY_LEASE": ("lease = 70\n", "30", lambda s: s.lease, 30.0),
    "RELAY_SHUTDOWN_TIMEOUT": ("shutdown_timeout = 7\n", "3", lambda s: s.shutdown_timeout, 3.0),
    "RELAY_METRICS_LISTEN": (
        'metrics_listen = "127.0.0.1:9001"\n',
        "127.0.0.1:9002",
        lambda s: s.metrics_listen,
        ("127.0.0.1", 9002),
    ),
    "RELAY_LOG_FORMAT": ('log_format = "json"\n', "text", lambda s: s.log_format, "text"),
    "RELAY_LOG_LEVEL": ('log_level = "ERROR"\n', "debug", lambda s: s.log_level, "DEBUG"),
    "RELAY_RETENTION": ('retention = "30d"\n', "2d", lambda s: s.retention, 2 * 86400.0),
    "RELAY_CA_BUNDLE": (
        'ca_bundle = "{tmp}/file-ca.pem"\n',
        "{tmp}/env-ca.pem",
        lambda s: str(s.targets["default"].ca_bundle),
        "{tmp}/env-ca.pem",
    ),
    "RELAY_ID": ('relay_id = "from-file"\n', "from-env", lambda s: s.relay_id, "from-env"),
    "RELAY_WEB_LISTEN": (
        'web_listen = "127.0.0.1:9101"\n',
        "127.0.0.1:9102",
        lambda s: s.web_listen,
        ("127.0.0.1", 9102),
    ),
    "RELAY_WEB_TOKEN_HASH": (
        f'web_token_hash = "sha256:{"a" * 64}"\n',
        f"sha256:{'B' * 64}",
        lambda s: s.web_token_hash,
        f"sha256:{'b' * 64}",
    ),
    "RELAY_WEB_DATABASE_URL": (
        'web_database_url = "postgresql://file@db/app"\n',
        "postgresql://env@db/app",
        lambda s: s.web_database_url.reveal(),
        "postgresql://env@db/app",
    ),
    "RELAY_WEB_DATABASE_URL_FILE": (
        'web_database_url = "postgresql://file@db/app"\n',
        "{tmp}/env-db-url",
        lambda s: s.web_database_url.reveal(),
        "postgresql://from-env-file@db/app",
    ),
    "RELAY_RETRY_BASE_DELAY": ("[retry]\nbase_delay = 7\n", "3", lambda s: s.retry.base_delay, 3.0),
    "RELAY_RETRY_MAX_DELAY": ("[retry]\nmax_delay = 700\n", "300", lambda s: s.retry.max_delay, 300.0),
    "RELAY_RETRY_MAX_ATTEMPTS": ("[retry]\nmax_attempts = 7\n", "3", lambda s: s.retry.max_attempts, 3),
    "RELAY_RETRY_MAX_AGE": ("[retry]\nmax_age = 7000\n", "3000", lambda s: s.retry.max_age, 3000.0),
    "RELAY_API_BASE_URL": (
        f'[{d}]\nbase_url = "https://file.example"\n',
        "https://env.example",
        lambda s: s.targets["default"].base_url,
        "https://env.example",
    ),
    # the bug this test was written for: token_file in the file used to win over RELAY_API_TOKEN
    "RELAY_API_TOKEN": (
        f'[{d}]\ntoken_file = "{{tmp}}/file-token"\n',
        "env-token",
        lambda s: s.targets["default"].token.reveal(),
        "env-token",
    ),
    "RELAY_API_TOKEN_FILE": (
        f'[{d}]\ntoken = "file-token"\n',
        "{tmp}/env-token",
        lambda s: s.targets["default"].token.reveal(),
        "token-from-env-file",
    ),
    "RELAY_OAUTH_CLIENT_ID": (
        f'[{d}]\noauth_client_id = "file-id"\noauth_client_secret = "s3cret"\n',
        "env-id",
        lambda s: s.targets["default"].oauth.client_id,
        "env-id",
    ),
    "RELAY_OAUTH_CLIENT_SECRET_FILE": (
        f'[{d}]\noauth_client_id = "id"\noauth_client_secret = "file-secret"\n',
        "{tmp}/env-secret",
        lambda s: s.targets["default"].oauth.client_secret.reveal(),
        "secret-from-env-file",
    ),
    "RELAY_OAUTH_TOKEN_URL": (
        f'[{d}]\noauth_client_id = "id"\noauth_client_secret = "s"\n'
        'oauth_token_url = "https://file.example/token"\n',
        "https://env.example/token",
        lambda s: s.targets["default"].oauth.token_url,
        "https://env.example/token",
    ),
    "RELAY_PROXY": (
        'proxy = "https://file-proxy.example"\n',
        "https://env-proxy.example",
        lambda s: s.targets["default"].proxy.reveal(),
        "https://env-proxy.example",
    ),
    "RELAY_DATABASE_URL": (
        'database_url = "postgresql://file@db/app"\n',
        "postgresql://env@db/app",
        lambda s: s.database_url.reveal(),
        "postgresql://env@db/app",
    ),
    "RELAY_DATABASE_URL_FILE": (
        'database_url = "postgresql://file@db/app"\n',
        "{tmp}/env-db-url",
        lambda s: s.database_url.reveal(),
        "postgresql://from-env-file@db/app",
    ),
}


def test_every_variable_is_covered() -> None:
    variables = {
        *settings_module._ENV_TOP,
        *settings_module._ENV_RETRY,
        *settings_module._ENV_DEFAULT_TARGET,
        "RELAY_DATABASE_URL",
        "RELAY_DATABASE_URL_FILE",
        "RELAY_WEB_DATABASE_URL",
        "RELAY_WEB_DATABASE_URL_FILE",
    }
    assert set(CASES) == variables


@pytest.mark.parametrize("variable", sorted(CASES))
def test_the_variable_overrides_the_file(tmp_path: Path, variable: str) -> None:
    for name, text in [
        ("file-ca.pem", "ca"),
        ("env-ca.pem", "ca"),
        ("file-token", "token-from-file"),
        ("env-token", "token-from-env-file"),
        ("env-secret", "secret-from-env-file"),
        ("env-db-url", "postgresql://from-env-file@db/app"),
    ]:
        _file(tmp_path / name, text + "\n")
    text, value, effective, expected = CASES[variable]
    tmp = str(tmp_path)
    config = _file(tmp_path / "relay.toml", text.replace("{tmp}", tmp))
    from_file = effective(load_settings(config, {}))
    loaded = load_settings(config, {variable: value.replace("{tmp}", tmp)})
    expected = expected.replace("{tmp}", tmp) if isinstance(expected, str) else expected
    assert from_file != expected  # the file alone says something else
    assert effective(loaded) == expected


def test_an_empty_metrics_variable_turns_off_the_files_metrics_server(
    tmp_path: Path, database_url: str
) -> None:
    """``RELAY_METRICS_LISTEN=`` (set, empty) wins over the file's ``metrics_listen``: the relay
    starts without a metrics server. Without the variable the file's server answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _file(tmp_path / "relay.toml", f'metrics_listen = "127.0.0.1:{port}"\n')

    def serving(relay_id: str) -> bool:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "select 1 from outbox.relay_targets where relay_id = %s", (relay_id,)
            ).fetchone()
        return row is not None

    def up(relay_id: str, relay: subprocess.Popen[bytes]) -> bool:
        return serving(relay_id) or relay.poll() is not None

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    for relay_id, extra in (("with-file-metrics", {}), ("metrics-off", {"RELAY_METRICS_LISTEN": ""})):
        env = relay_env(database_url, "http://127.0.0.1:9", RELAY_CONFIG=config, RELAY_ID=relay_id, **extra)
        relay = start_relay_process(env, tmp_path / f"{relay_id}.log")
        try:
            assert wait_until(partial(up, relay_id, relay), 30), relay_id
            assert relay.poll() is None, (tmp_path / f"{relay_id}.log").read_text()
            # the metrics server starts before the first heartbeat is written
            assert answers() is (relay_id == "with-file-metrics"), relay_id
        finally:
            relay.terminate()
            relay.wait(30)
