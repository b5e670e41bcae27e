"""The one settings object: read from a TOML file and ``RELAY_*`` variables, validated once.

Nothing else in the package reads ``os.environ`` for configuration. Secrets are held in
:class:`Secret`, whose ``repr`` and ``str`` never show the value.

Precedence, lowest first: built-in defaults, the TOML file (``--config`` or
``RELAY_CONFIG``), environment variables. Secrets come from ``*_file`` keys, from
``RELAY_*`` variables, or from systemd credentials in ``$CREDENTIALS_DIRECTORY``
(``database-url``, ``api-token``, ``oauth-client-secret``; for a named target
``NAME.api-token`` and ``NAME.oauth-client-secret``).

Credentials are checked here, once, so a bad one stops the relay at start-up with one line that
names the setting and never shows the value: a token or client id is printable ASCII without
whitespace (it goes into an HTTP header or a form), a client secret has no control characters.
A proxy is only ever the explicit ``proxy`` setting (the HTTP clients ignore ``HTTP_PROXY`` and
friends), checked like a base URL; it may carry a user and password, so it is a :class:`Secret`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError

DEFAULT_API_BASE_URL = "https://miraklconnect.com/api/channel-platform"
DEFAULT_OAUTH_TOKEN_URL = "https://auth.mirakl.net/oauth/token"  # noqa: S105 (a URL, not a secret)
DEFAULT_TARGET = "default"
# The metrics label value of every target not configured (relay.metrics.UNCONFIGURED).
RESERVED_TARGET = "unconfigured"
TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

TOKEN_RULE = "must be printable ASCII without spaces or control characters"  # noqa: S105
SECRET_FILE_LIMIT = 64 * 1024  # bytes read of a secret file: a token is far smaller
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1, lone surrogates

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class Secret:
    """A secret string: shown as ``'***'`` everywhere, revealed only on purpose."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(value: object, name: str) -> float:
    """Seconds from a number or a string like ``250ms``, ``30s``, ``5m``, ``6h``, ``30d``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration such as 30s, 5m or 6h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ConfigError(f"{name}: expected a duration such as 30s, 5m or 6h, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{name}: must not be negative, got {value!r}")
    return seconds


def _positive_int(value: object, name: str) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        number = -1
    if number < 1:
        raise ConfigError(f"{name}: expected a whole number of at least 1, got {value!r}")
    return number


def _positive_float(value: object, name: str) -> float:
    try:
        number = float(str(value).strip()) if not isinstance(value, bool) else -1.0
    except ValueError:
        number = -1.0
    if not number > 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")
    return number


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_token_text(value: str) -> bool:
    """A bearer token or client id: one or more characters 0x21-0x7E (printable ASCII, no space)."""
    return _TOKEN_TEXT.fullmatch(value) is not None


def _token_text(value: str, name: str) -> str:
    if not is_token_text(value):
        raise ConfigError(f"{name}: {TOKEN_RULE}")
    return value


def _secret_text(value: str, name: str) -> str:
    if not value or _CONTROL.search(value):
        raise ConfigError(f"{name}: must be non-empty, without control characters")
    return value


def check_proxy(url: str, name: str) -> Secret | None:
    """A proxy URL: ``https://`` (or ``http://`` to a loopback host), ``[user:password@]host[:port]``.

    Messages name the setting and at most the scheme and host: never the user or password.
    An empty value means no proxy (a target can so opt out of a top-level default).
    """
    if not url.strip():
        return None
    parts = urlsplit(url.strip())
    try:
        host, _port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"{name}: expected https://[user:password@]host[:port]") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{name}: expected an https:// proxy URL (http:// only on a loopback host)")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ConfigError(
            f"{name}: plain http:// is refused for non-loopback proxy host {host!r}; use https://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{name}: a proxy URL has no path, query or fragment")
    return Secret(url.strip())


def check_url(url: str, name: str) -> str:
    """Refuse anything but ``https://`` URLs, except ``http://`` to a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an https:// URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{name}: plain http:// is refused for non-loopback host {parts.hostname!r}; use https://"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}: must not carry a query or fragment: {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True)
class RetrySettings:
    """Backoff: exponential with jitter from ``base_delay`` to ``max_delay``; dead after
    ``max_attempts`` attempts or once the row is older than ``max_age`` (seconds)."""

    base_delay: float = 2.0
    max_delay: float = 600.0
    max_attempts: int = 20
    max_age: float = 12 * 3600.0


@dataclass(frozen=True)
class BreakerSettings:
    """Circuit breaker: opens after ``failure_threshold`` consecutive transient failures,
    stays open ``open_for`` seconds (doubling up to ``max_open_for``), then one probe decides."""

    failure_threshold: int = 5
    open_for: float = 2.0
    max_open_for: float = 15.0


@dataclass(frozen=True)
class OAuthSettings:
    client_id: str
    client_secret: Secret
    token_url: str = DEFAULT_OAUTH_TOKEN_URL


@dataclass(frozen=True)
class TargetSettings:
    """One API target: where updates for ``target = name`` are sent, and how."""

    name: str
    base_url: str = DEFAULT_API_BASE_URL
    token: Secret | None = None
    token_file: Path | None = None
    oauth: OAuthSettings | None = None
    request_timeout: float = 10.0
    max_concurrency: int = 64
    rate_limit: float | None = None
    ca_bundle: Path | None = None
    proxy: Secret | None = None  # http(s)://[user:password@]host:port; never from the environment

    @property
    def auth_kind(self) -> str:
        return "oauth" if self.oauth else "token" if (self.token or self.token_file) else "none"


@dataclass(frozen=True)
class Settings:
    database_url: Secret | None = None
    targets: Mapping[str, TargetSettings] = field(
        default_factory=lambda: {DEFAULT_TARGET: TargetSettings(DEFAULT_TARGET)}
    )
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    poll_interval: float = 5.0
    batch_size: int = 100
    lease: float = 60.0
    shutdown_timeout: float = 20.0
    metrics_listen: tuple[str, int] | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    retention: float | None = None
    retention_include_dead: bool = False
    relay_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # What systemd told us: NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID (empty outside systemd).
    systemd: Mapping[str, str] = field(default_factory=dict)

    def require_database_url(self) -> Secret:
        if self.database_url is None:
            raise ConfigError(
                "no database configured: set RELAY_DATABASE_URL or database_url in the config file"
            )
        return self.database_url


_TOP_KEYS = {
    "database_url", "database_url_file", "poll_interval", "batch_size", "max_concurrency",
    "rate_limit", "request_timeout", "lease", "shutdown_timeout", "metrics_listen",
    "log_format", "log_level", "retention", "retention_include_dead", "relay_id",
    "retry", "breaker", "targets", "ca_bundle", "proxy",
}  # fmt: skip
_TARGET_KEYS = {
    "base_url", "token", "token_file", "oauth_client_id", "oauth_client_secret",
    "oauth_client_secret_file", "oauth_token_url", "request_timeout", "max_concurrency",
    "rate_limit", "ca_bundle", "proxy",
}  # fmt: skip


def _read_secret_file(path: str, name: str) -> Secret:
    """The stripped text of a secret file, read up to SECRET_FILE_LIMIT bytes (not /dev/zero)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError:  # a NUL in the path
        raise ConfigError(f"{name}: not a usable file name") from None
    if len(data) > SECRET_FILE_LIMIT:
        raise ConfigError(f"{name}: {path} is larger than {SECRET_FILE_LIMIT // 1024} KiB")
    try:
        value: str | None = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        value = None  # raised below, outside the except: the error would keep the secret's bytes
    if value is None:
        raise ConfigError(f"{name}: {path} is not UTF-8 text")
    if not value:
        raise ConfigError(f"{name}: {path} is empty")
    return Secret(value)


def _credential(env: Mapping[str, str], name: str) -> Secret | None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return _read_secret_file(str(path), f"credential {name}") if path.is_file() else None


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _metrics_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics_listen: expected host:port, got {value!r}")
    return (host.strip("[]") or "127.0.0.1", int(port))


def _target(
    name: str,
    table: Mapping[str, Any],
    defaults: Mapping[str, Any],
    env: Mapping[str, str],
) -> TargetSettings:
    where = f"targets.{name}"
    if not TARGET_NAME.match(name):
        raise ConfigError(f"{where}: a target name is 1-63 letters, digits, '_', '-' or '.'")
    if name == RESERVED_TARGET:
        raise ConfigError(
            f"{where}: the name {RESERVED_TARGET!r} is reserved (metrics export every "
            "target not configured under it)"
        )
    _check_keys(table, _TARGET_KEYS, where)
    merged = {**defaults, **table}
    prefix = "" if name == DEFAULT_TARGET else f"{name}."

    token: Secret | None = None
    token_file: Path | None = None
    if "token" in merged:
        token = Secret(_token_text(str(merged["token"]), f"{where}.token"))
    if "token_file" in merged:
        token_file = Path(str(merged["token_file"]))
        token = _read_secret_file(str(token_file), f"{where}.token_file")
        _token_text(token.reveal(), f"{where}.token_file")
    if token is None and (token := _credential(env, f"{prefix}api-token")) is not None:
        _token_text(token.reveal(), f"credential {prefix}api-token")

    oauth: OAuthSettings | None = None
    if "oauth_client_id" in merged:
        client_id = _token_text(str(merged["oauth_client_id"]), f"{where}.oauth_client_id")
        secret: Secret | None = None
        secret_name = f"credential {prefix}oauth-client-secret"
        if "oauth_client_secret" in merged:
            secret, secret_name = Secret(str(merged["oauth_client_secret"])), f"{where}.oauth_client_secret"
        if "oauth_client_secret_file" in merged:
            secret_name = f"{where}.oauth_client_secret_file"
            secret = _read_secret_file(str(merged["oauth_client_secret_file"]), secret_name)
        secret = secret or _credential(env, f"{prefix}oauth-client-secret")
        if secret is None:
            raise ConfigError(
                f"{where}: oauth_client_id is set but no client secret "
                "(oauth_client_secret_file, RELAY_OAUTH_CLIENT_SECRET_FILE or credential oauth-client-secret)"
            )
        _secret_text(secret.reveal(), secret_name)
        token_url = check_url(
            str(merged.get("oauth_token_url", DEFAULT_OAUTH_TOKEN_URL)), f"{where}.oauth_token_url"
        )
        oauth = OAuthSettings(client_id, secret, token_url)
        if token is not None:
            raise ConfigError(f"{where}: configure either a static token or OAuth, not both")

    rate = merged.get("rate_limit")
    ca_bundle = merged.get("ca_bundle")
    if ca_bundle is not None and not Path(str(ca_bundle)).is_file():
        raise ConfigError(f"{where}.ca_bundle: no such file {ca_bundle!r}")
    return TargetSettings(
        name=name,
        base_url=check_url(str(merged.get("base_url", DEFAULT_API_BASE_URL)), f"{where}.base_url"),
        token=token,
        token_file=token_file,
        oauth=oauth,
        request_timeout=_positive_float(
            parse_duration(merged.get("request_timeout", 10.0), f"{where}.request_timeout"),
            f"{where}.request_timeout",
        ),
        max_concurrency=_positive_int(merged.get("max_concurrency", 64), f"{where}.max_concurrency"),
        rate_limit=None if rate in (None, 0, "0", "") else _positive_float(rate, f"{where}.rate_limit"),
        ca_bundle=Path(str(ca_bundle)) if ca_bundle else None,
        proxy=check_proxy(str(merged.get("proxy", "")), f"{where}.proxy"),
    )


_ENV_TOP = {
    "RELAY_POLL_INTERVAL": "poll_interval",
    "RELAY_BATCH_SIZE": "batch_size",
    "RELAY_MAX_CONCURRENCY": "max_concurrency",
    "RELAY_RATE_LIMIT": "rate_limit",
    "RELAY_REQUEST_TIMEOUT": "request_timeout",
    "RELAY_LEASE": "lease",
    "RELAY_SHUTDOWN_TIMEOUT": "shutdown_timeout",
    "RELAY_METRICS_LISTEN": "metrics_listen",
    "RELAY_LOG_FORMAT": "log_format",
    "RELAY_LOG_LEVEL": "log_level",
    "RELAY_RETENTION": "retention",
    "RELAY_CA_BUNDLE": "ca_bundle",
    "RELAY_ID": "relay_id",
}
_ENV_RETRY = {
    "RELAY_RETRY_BASE_DELAY": "base_delay",
    "RELAY_RETRY_MAX_DELAY": "max_delay",
    "RELAY_RETRY_MAX_ATTEMPTS": "max_attempts",
    "RELAY_RETRY_MAX_AGE": "max_age",
}
_ENV_DEFAULT_TARGET = {
    "RELAY_API_BASE_URL": "base_url",
    "RELAY_API_TOKEN": "token",
    "RELAY_API_TOKEN_FILE": "token_file",
    "RELAY_OAUTH_CLIENT_ID": "oauth_client_id",
    "RELAY_OAUTH_CLIENT_SECRET_FILE": "oauth_client_secret_file",
    "RELAY_OAUTH_TOKEN_URL": "oauth_token_url",
    "RELAY_PROXY": "proxy",
}
# Keys of the top level that also serve as defaults for every target.
_TARGET_DEFAULT_KEYS = ("request_timeout", "max_concurrency", "rate_limit", "ca_bundle", "proxy")
# Variables that carry a token or client id: checked under their own name (the value never shown).
_ENV_TOKEN_TEXT = ("RELAY_API_TOKEN", "RELAY_OAUTH_CLIENT_ID")


def load_settings(config: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the file named by ``config`` (or ``RELAY_CONFIG``) and ``environ``."""
    env = os.environ if environ is None else environ
    path = config or env.get("RELAY_CONFIG")
    doc: dict[str, Any] = _load_toml(path) if path else {}
    _check_keys(doc, _TOP_KEYS, "config")

    top = {k: v for k, v in doc.items() if k not in ("retry", "breaker", "targets")}
    top.update({key: env[var] for var, key in _ENV_TOP.items() if env.get(var, "") != ""})
    retry_table = dict(doc.get("retry", {}))
    _check_keys(retry_table, {"base_delay", "max_delay", "max_attempts", "max_age"}, "retry")
    retry_table.update({key: env[var] for var, key in _ENV_RETRY.items() if env.get(var, "") != ""})
    breaker_table = dict(doc.get("breaker", {}))
    _check_keys(breaker_table, {"failure_threshold", "open_for", "max_open_for"}, "breaker")

    targets_doc: dict[str, dict[str, Any]] = {
        str(k): dict(v) for k, v in dict(doc.get("targets", {})).items()
    }
    default_table = targets_doc.setdefault(DEFAULT_TARGET, {})
    for var in _ENV_TOKEN_TEXT:
        if env.get(var, "") != "":
            _token_text(env[var], var)
    for var, key in _ENV_DEFAULT_TARGET.items():
        if env.get(var, "") != "":
            default_table[key] = env[var]
    # A variable overrides the file's other kind of auth; both kinds in variables is an error.
    env_token = env.get("RELAY_API_TOKEN_FILE") or env.get("RELAY_API_TOKEN")
    env_oauth = env.get("RELAY_OAUTH_CLIENT_ID")
    if env_token and not env_oauth:
        default_table.pop("oauth_client_id", None)
    if env_oauth and not env_token:
        default_table.pop("token", None)
        default_table.pop("token_file", None)
    target_defaults = {k: top[k] for k in _TARGET_DEFAULT_KEYS if k in top}
    targets = {
        name: _target(name, table, target_defaults, env) for name, table in targets_doc.items()
    }

    database_url: Secret | None = None
    if env.get("RELAY_DATABASE_URL"):
        database_url = Secret(env["RELAY_DATABASE_URL"])
    elif env.get("RELAY_DATABASE_URL_FILE"):
        database_url = _read_secret_file(env["RELAY_DATABASE_URL_FILE"], "RELAY_DATABASE_URL_FILE")
    elif "database_url" in top:
        database_url = Secret(str(top["database_url"]))
    elif "database_url_file" in top:
        database_url = _read_secret_file(str(top["database_url_file"]), "database_url_file")
    else:
        database_url = _credential(env, "database-url")
    if database_url is not None and urlsplit(database_url.reveal()).scheme.split("+")[0] not in (
        "postgresql",
        "postgres",
    ):
        raise ConfigError("database_url: expected a postgresql:// URL")

    base_delay = parse_duration(retry_table.get("base_delay", 2.0), "retry.base_delay")
    max_delay = parse_duration(retry_table.get("max_delay", 600.0), "retry.max_delay")
    if base_delay <= 0 or max_delay < base_delay:
        raise ConfigError("retry: need 0 < base_delay <= max_delay")
    retry = RetrySettings(
        base_delay=base_delay,
        max_delay=max_delay,
        max_attempts=_positive_int(retry_table.get("max_attempts", 20), "retry.max_attempts"),
        max_age=_positive_float(
            parse_duration(retry_table.get("max_age", 12 * 3600.0), "retry.max_age"), "retry.max_age"
        ),
    )
    breaker = BreakerSettings(
        failure_threshold=_positive_int(
            breaker_table.get("failure_threshold", 5), "breaker.failure_threshold"
        ),
        open_for=_positive_float(
            parse_duration(breaker_table.get("open_for", 2.0), "breaker.open_for"), "breaker.open_for"
        ),
        max_open_for=_positive_float(
            parse_duration(breaker_table.get("max_open_for", 15.0), "breaker.max_open_for"),
            "breaker.max_open_for",
        ),
    )

    log_format = str(top.get("log_format", "text")).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {log_format!r}")
    log_level = str(top.get("log_level", "INFO")).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    retention = top.get("retention")
    extra: dict[str, Any] = {}
    if top.get("relay_id"):
        extra["relay_id"] = str(top["relay_id"])
    return Settings(
        database_url=database_url,
        targets=targets,
        retry=retry,
        breaker=breaker,
        poll_interval=_positive_float(
            parse_duration(top.get("poll_interval", 5.0), "poll_interval"), "poll_interval"
        ),
        batch_size=_positive_int(top.get("batch_size", 100), "batch_size"),
        lease=_positive_float(parse_duration(top.get("lease", 60.0), "lease"), "lease"),
        shutdown_timeout=parse_duration(top.get("shutdown_timeout", 20.0), "shutdown_timeout"),
        metrics_listen=_metrics_listen(str(top["metrics_listen"])) if top.get("metrics_listen") else None,
        log_format=log_format,
        log_level=log_level,
        retention=None if retention in (None, "") else parse_duration(retention, "retention"),
        retention_include_dead=bool(top.get("retention_include_dead", False)),
        systemd={k: env[k] for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID") if k in env},
        **extra,
    )
