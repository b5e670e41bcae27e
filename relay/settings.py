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

import math
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from relay.errors import ConfigError

DEFAULT_API_BASE_URL = "https://miraklconnect.com/api/channel-platform"
DEFAULT_OAUTH_TOKEN_URL = "https://auth.mirakl.net/oauth/token"  # noqa: S105 (a URL, not a secret)
DEFAULT_TARGET = "default"
# The metrics label value of every target not configured (relay.service.metrics.UNCONFIGURED).
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


def _show(seconds: float) -> str:
    """A duration in the largest unit that divides it: ``10ms``, ``30s``, ``1h``, ``365d``."""
    if seconds == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def parse_duration(value: object, name: str) -> float:
    """Seconds from a number or a string like ``250ms``, ``30s``, ``5m``, ``6h``, ``30d``."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if not isinstance(value, int) or abs(value) < 10**18 else math.inf
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(f"{name}: expected a duration such as 30s, 5m or 6h, got {_brief(value)}")
    if seconds < 0:
        raise ConfigError(f"{name}: must not be negative, got {_brief(value)}")
    return seconds


def _brief(value: object) -> str:
    """``repr`` of an operator's value, cut short (a 10 MB string must not become the message)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def duration_in(value: object, name: str, low: float, high: float) -> float:
    """A duration from ``low`` to ``high`` seconds (both included); one line naming both."""
    rule = f"expected a duration from {_show(low)} to {_show(high)} (e.g. 30s, 5m, 6h)"
    try:
        seconds = parse_duration(value, name)
    except ConfigError:
        raise ConfigError(f"{name}: {rule}, got {_brief(value)}") from None
    if not low <= seconds <= high:
        raise ConfigError(f"{name}: {rule}, got {_brief(value)}")
    return seconds


def whole_in(value: object, name: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high``: a TOML integer, or digits in a variable or flag."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,19}\s*", value):
        number = int(value)
    if number is None or not low <= number <= high:
        raise ConfigError(f"{name}: expected a whole number from {low} to {high}, got {_brief(value)}")
    return number


def number_in(value: object, name: str, low: float, high: float) -> float:
    """A finite number from ``low`` to ``high``."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value) if not isinstance(value, int) or abs(value) < 10**18 else math.inf
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*", value):
        number = float(value)
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise ConfigError(f"{name}: expected a number from {low:g} to {high:g}, got {_brief(value)}")
    return number


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def boolean(value: object, name: str, from_env: bool = False) -> bool:
    """A TOML boolean, or (from a variable) true/false/1/0/yes/no/on/off in any case."""
    if isinstance(value, bool):
        return value
    if from_env and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    accepted = "true/false/1/0/yes/no/on/off" if from_env else "true or false (a TOML boolean, unquoted)"
    raise ConfigError(f"{name}: expected {accepted}, got {_brief(value)}")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress

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


DAY = 86400.0
# Every number's range: key -> (kind, minimum, maximum, default). The README's table is this one.
RANGES: dict[str, tuple[str, float, float, float | None]] = {
    "poll_interval": ("duration", 0.01, 3600.0, 5.0),
    "batch_size": ("whole", 1, 10_000, 100),
    "lease": ("duration", 1.0, DAY, 60.0),
    "shutdown_timeout": ("duration", 0.0, 3600.0, 20.0),
    "retention": ("duration", 3600.0, 3650 * DAY, None),
    "request_timeout": ("duration", 0.01, 3600.0, 10.0),
    "max_concurrency": ("whole", 1, 10_000, 64),
    "rate_limit": ("number", 0.001, 1_000_000.0, None),
    "retry.base_delay": ("duration", 0.001, DAY, 2.0),
    "retry.max_delay": ("duration", 0.001, 7 * DAY, 600.0),
    "retry.max_attempts": ("whole", 1, 1000, 20),
    "retry.max_age": ("duration", 1.0, 365 * DAY, 12 * 3600.0),
    "breaker.failure_threshold": ("whole", 1, 1_000_000, 5),
    "breaker.open_for": ("duration", 0.01, DAY, 2.0),
    "breaker.max_open_for": ("duration", 0.01, DAY, 15.0),
}
PURGE_MIN_AGE = 3600.0  # `purge --older-than` and `retention`: never younger than one hour
RETRY_BATCH = 500  # dead rows re-queued per transaction (`dead retry`, the web console)
PURGE_BATCH = 1000  # rows deleted per transaction by `purge` (--batch-size) and the retention job


def ranged(key: str, value: object, name: str | None = None) -> Any:
    """``value`` checked against ``RANGES[key]``; ``name`` is what the message calls it."""
    kind, low, high, default = RANGES[key]
    value = default if value is None else value
    label = name or key
    if kind == "duration":
        return duration_in(value, label, low, high)
    if kind == "whole":
        return whole_in(value, label, int(low), int(high))
    return number_in(value, label, low, high)


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
    # A direct connection (no pooler) for LISTEN wake-ups, when database_url goes through a
    # transaction-mode pooler such as PgBouncer; None: LISTEN on database_url, unless it is pooled.
    listen_database_url: Secret | None = None
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
    # The web console (`outbox-relay web`): its own database URL (its role decides what it may
    # do; None: database_url), where it listens, and the SHA-256 of its sign-in token (None: no
    # sign-in, allowed on loopback only).
    web_database_url: Secret | None = None
    web_listen: tuple[str, int] = ("127.0.0.1", 8089)
    web_token_hash: str | None = None
    # What systemd told us: NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID (empty outside systemd).
    systemd: Mapping[str, str] = field(default_factory=dict)

    def require_database_url(self) -> Secret:
        if self.database_url is None:
            raise ConfigError(
                "no database configured: set RELAY_DATABASE_URL or database_url in the config file"
            )
        return self.database_url


_TOP_KEYS = {
    "database_url",
    "database_url_file",
    "listen_database_url",
    "listen_database_url_file",
    "web_database_url",
    "web_database_url_file",
    "web_listen",
    "web_token_hash",
    "poll_interval",
    "batch_size",
    "max_concurrency",
    "rate_limit",
    "request_timeout",
    "lease",
    "shutdown_timeout",
    "metrics_listen",
    "log_format",
    "log_level",
    "retention",
    "retention_include_dead",
    "relay_id",
    "retry",
    "breaker",
    "targets",
    "ca_bundle",
    "proxy",
}
_TARGET_KEYS = {
    "base_url",
    "token",
    "token_file",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_client_secret_file",
    "oauth_token_url",
    "request_timeout",
    "max_concurrency",
    "rate_limit",
    "ca_bundle",
    "proxy",
}


SECRET_FILE_RULE = "refused: group or other users can access it"  # noqa: S105


def _private(fh: Any, path: str, name: str, env: Mapping[str, str]) -> None:
    """Refuse a secret file that group or other users can read or write, as ssh and PostgreSQL do
    for key files; a systemd credential (under $CREDENTIALS_DIRECTORY) is accepted as it is."""
    info = os.fstat(fh.fileno())
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o077:
        return
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        try:
            if Path(path).resolve().is_relative_to(Path(directory).resolve()):
                return
        except (OSError, ValueError):
            pass
    mode = stat.S_IMODE(info.st_mode)
    raise ConfigError(f"{name}: {path} has mode {mode:04o}, {SECRET_FILE_RULE}; run chmod 600 {path}")


def _read_secret_file(path: str, name: str, env: Mapping[str, str] | None = None) -> Secret:
    """The stripped text of a secret file, read up to SECRET_FILE_LIMIT bytes (not /dev/zero).

    Unless ``env`` is None (a systemd credential), the file must be private to its owner."""
    try:
        with open(path, "rb") as fh:
            if env is not None:
                _private(fh, path, name, env)
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
    import tomllib  # only with a configuration file: not on every command's start-up

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table ([{where}]), got {_brief(value)}")
    return dict(value)


_DB_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
_DB_RULE = "expected postgresql://[user[:password]@][host][:port][/dbname][?param=value&...]"


# scheme://[user[:password]@][host[:port][,host[:port]...]][/dbname][?query]; the password may hold
# any character but "@" (a "/" or ":" in it need not be encoded), a host may be [an:IPv6:address].
_DB_URL = re.compile(
    r"(?:(?P<user>[^:/@?]*)(?::(?P<password>[^@]*))?@)?(?P<hosts>[^/?]*)(?:/(?P<dbname>[^?]*))?(?:\?(?P<query>.*))?",
    re.DOTALL,
)
_DB_HOST = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::(?P<port>.*))?", re.DOTALL)


def database_params(url: Secret, name: str = "database_url") -> dict[str, str]:
    """The libpq keywords of a ``postgresql://`` URL, percent-decoded exactly once; messages
    call it ``name`` (the key or variable it came from).

    Nothing here renders the URL back into text: a password with ``%``, ``@``, ``/``, spaces or
    non-ASCII letters reaches libpq as it was meant. Messages never quote the URL. Several
    hosts (``host1:5432,host2:5432``) become libpq's comma-separated ``host`` and ``port``.
    """
    from psycopg import ProgrammingError
    from psycopg.conninfo import make_conninfo

    text = url.reveal().strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _DB_SCHEMES:
        raise ConfigError(f"{name}: {_DB_RULE} (scheme postgresql, postgres or postgresql+psycopg)")
    parts = _DB_URL.fullmatch(rest)
    if parts is None or "\x00" in text:
        raise ConfigError(f"{name}: {_DB_RULE}")
    params: dict[str, str] = {}
    hosts, ports = [], []
    for item in parts["hosts"].split(",") if parts["hosts"] else ():
        host = _DB_HOST.fullmatch(item)
        if host is None:
            raise ConfigError(f"{name}: {_DB_RULE}")
        hosts.append(unquote(host["ipv6"] if host["ipv6"] is not None else host["name"]))
        port = host["port"]
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"{name}: the port must be a number from 1 to 65535")
        ports.append(port or "")
    for key, value in (
        ("host", ",".join(hosts)),
        ("user", parts["user"]),
        ("password", parts["password"]),
        ("dbname", parts["dbname"]),
    ):
        if value:
            params[key] = value if key == "host" else unquote(value)
    if any(ports):
        params["port"] = ",".join(ports)
    given: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts["query"] or ""):
        given.setdefault(key, []).append(value)
    for key, values in given.items():
        try:
            make_conninfo("", **{key: "1"})
        except ProgrammingError:
            raise ConfigError(f"{name}: unknown connection parameter {_brief(key)}") from None
        params[key] = ",".join(values)
    for port_text in params.get("port", "").split(",") if "port" in params else ():
        if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise ConfigError(f"{name}: the port must be a number from 1 to 65535")
    return params


def _inline_secret(doc: Mapping[str, Any]) -> str | None:
    """The first key of the config document that holds a secret inline, or None."""
    for url_key in ("database_url", "listen_database_url", "web_database_url"):
        url = doc.get(url_key)
        if isinstance(url, str):
            try:
                if database_params(Secret(url)).get("password"):
                    return url_key
            except ConfigError:
                pass
    proxies = [("proxy", doc.get("proxy"))]
    targets = doc.get("targets")
    for name, table in targets.items() if isinstance(targets, dict) else ():
        if isinstance(table, dict):
            for key in ("token", "oauth_client_secret"):
                if key in table:
                    return f"targets.{name}.{key}"
            proxies.append((f"targets.{name}.proxy", table.get("proxy")))
    for key, proxy in proxies:
        if isinstance(proxy, str):
            try:
                if urlsplit(proxy.strip()).password:
                    return key
            except ValueError:
                pass
    return None


def _inline_secrets_private(path: str, doc: Mapping[str, Any]) -> None:
    """A config file holding a secret inline must not be readable by every user (0640 is fine:
    systemd setups use root:outbox-relay 0640)."""
    key = _inline_secret(doc)
    if key is None:
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o006:
        raise ConfigError(
            f"config file {path}: holds the secret {key} inline but has mode {mode:04o}, readable by "
            f"every user; run chmod 600 {path} (or 640 for a group), or move the secret to a *_file setting"
        )


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


WEB_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def web_token_hash(value: str, name: str = "web_token_hash") -> str:
    """``sha256:`` and 64 lowercase hex digits: the SHA-256 of the console's sign-in token."""
    text = value.strip().lower()
    if not WEB_TOKEN_HASH.fullmatch(text):
        raise ConfigError(
            f"{name}: expected sha256: and 64 hex digits (make one with `outbox-relay web --new-token`)"
        )
    return text


def host_port(value: str, name: str = "metrics_listen") -> tuple[str, int]:
    """``host:port`` (metrics_listen, web_listen, --listen); an empty host is 127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: expected host:port, got {value!r}")
    return (host.strip("[]") or "127.0.0.1", int(port))


def _target(
    name: str,
    table: Mapping[str, Any],
    defaults: Mapping[str, Any],
    env: Mapping[str, str],
    variables: Mapping[str, str] | None = None,
) -> TargetSettings:
    """One target from its table (over the top-level ``defaults``); ``variables`` names the
    ``RELAY_*`` variable each key came from, if one did: messages name what the user set."""
    where = f"targets.{name}"
    named = variables or {}

    def label(key: str) -> str:
        return named.get(key, f"{where}.{key}")

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
        token = Secret(_token_text(str(merged["token"]), label("token")))
    if "token_file" in merged:
        token_file = Path(str(merged["token_file"]))
        token = _read_secret_file(str(token_file), label("token_file"), env)
        _token_text(token.reveal(), label("token_file"))
    if token is None and (token := _credential(env, f"{prefix}api-token")) is not None:
        _token_text(token.reveal(), f"credential {prefix}api-token")

    oauth: OAuthSettings | None = None
    if "oauth_client_id" in merged:
        client_id = _token_text(str(merged["oauth_client_id"]), label("oauth_client_id"))
        secret: Secret | None = None
        secret_name = f"credential {prefix}oauth-client-secret"
        if "oauth_client_secret" in merged:
            secret, secret_name = Secret(str(merged["oauth_client_secret"])), f"{where}.oauth_client_secret"
        if "oauth_client_secret_file" in merged:
            secret_name = label("oauth_client_secret_file")
            secret = _read_secret_file(str(merged["oauth_client_secret_file"]), secret_name, env)
        secret = secret or _credential(env, f"{prefix}oauth-client-secret")
        if secret is None:
            raise ConfigError(
                f"{where}: oauth_client_id is set but no client secret "
                "(oauth_client_secret_file, RELAY_OAUTH_CLIENT_SECRET_FILE or credential oauth-client-secret)"
            )
        _secret_text(secret.reveal(), secret_name)
        token_url = check_url(
            str(merged.get("oauth_token_url", DEFAULT_OAUTH_TOKEN_URL)), label("oauth_token_url")
        )
        oauth = OAuthSettings(client_id, secret, token_url)
        if token is not None:
            raise ConfigError(f"{where}: configure either a static token or OAuth, not both")

    rate = merged.get("rate_limit")
    ca_bundle = merged.get("ca_bundle")
    if ca_bundle is not None and not Path(str(ca_bundle)).is_file():
        raise ConfigError(f"{label('ca_bundle')}: no such file {ca_bundle!r}")
    return TargetSettings(
        name=name,
        base_url=check_url(str(merged.get("base_url", DEFAULT_API_BASE_URL)), label("base_url")),
        token=token,
        token_file=token_file,
        oauth=oauth,
        request_timeout=ranged("request_timeout", merged.get("request_timeout"), label("request_timeout")),
        max_concurrency=ranged("max_concurrency", merged.get("max_concurrency"), label("max_concurrency")),
        rate_limit=None if rate in (None, 0, "0", "") else ranged("rate_limit", rate, label("rate_limit")),
        ca_bundle=Path(str(ca_bundle)) if ca_bundle else None,
        proxy=check_proxy(str(merged.get("proxy", "")), label("proxy")),
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
    "RELAY_WEB_LISTEN": "web_listen",
    "RELAY_WEB_TOKEN_HASH": "web_token_hash",
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
# A variable for one form of a secret replaces the file's other form of it (token vs token_file).
_OTHER_FORM = {
    "token": "token_file",
    "token_file": "token",
    "oauth_client_secret_file": "oauth_client_secret",
}
# Keys of the top level that also serve as defaults for every target.
_TARGET_DEFAULT_KEYS = ("request_timeout", "max_concurrency", "rate_limit", "ca_bundle", "proxy")
# Variables that carry a token or client id: checked under their own name (the value never shown).
_ENV_TOKEN_TEXT = ("RELAY_API_TOKEN", "RELAY_OAUTH_CLIENT_ID")


# The variables of each database URL setting: the URL, and a file holding it.
_DATABASE_URL_VARIABLES = {
    "database_url": ("RELAY_DATABASE_URL", "RELAY_DATABASE_URL_FILE"),
    "listen_database_url": ("RELAY_LISTEN_DATABASE_URL", "RELAY_LISTEN_DATABASE_URL_FILE"),
    "web_database_url": ("RELAY_WEB_DATABASE_URL", "RELAY_WEB_DATABASE_URL_FILE"),
}


def _database_url(env: Mapping[str, str], top: Mapping[str, Any], key: str, credential: str) -> Secret | None:
    """A database URL setting (``database_url``, ``listen_database_url``), first found of: its
    variable, its ``_FILE`` variable, the key, the ``_file`` key, the systemd credential.
    Checked here, at start-up: a bad URL is one line naming where it came from."""
    var, file_var = _DATABASE_URL_VARIABLES[key]
    url: Secret | None
    source = key
    if env.get(var):
        url, source = Secret(env[var]), var
    elif env.get(file_var):
        source = file_var
        url = _read_secret_file(env[source], source, env)
    elif key in top:
        url = Secret(str(top[key]))
    elif f"{key}_file" in top:
        source = f"{key}_file"
        url = _read_secret_file(str(top[source]), source, env)
    else:
        url, source = _credential(env, credential), f"credential {credential}"
    if url is not None:
        database_params(url, source)
    return url


def load_settings(config: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the file named by ``config`` (or ``RELAY_CONFIG``) and ``environ``."""
    env = os.environ if environ is None else environ
    path = config or env.get("RELAY_CONFIG")
    doc: dict[str, Any] = _load_toml(path) if path else {}
    _check_keys(doc, _TOP_KEYS, "config")
    if path:
        _inline_secrets_private(path, doc)

    # What a variable set, messages call by the variable's name: `RELAY_BATCH_SIZE: expected ...`.
    named: dict[str, str] = {}  # setting ("batch_size", "retry.max_age") -> the variable that set it
    top = {k: v for k, v in doc.items() if k not in ("retry", "breaker", "targets")}
    for var, key in _ENV_TOP.items():
        if env.get(var, "") != "":
            top[key], named[key] = env[var], var
    if "RELAY_METRICS_LISTEN" in env and not env["RELAY_METRICS_LISTEN"].strip():
        top["metrics_listen"] = ""  # set but empty: no metrics server, whatever the file says
    retry_table = _table(doc.get("retry", {}), "retry")
    _check_keys(retry_table, {"base_delay", "max_delay", "max_attempts", "max_age"}, "retry")
    for var, key in _ENV_RETRY.items():
        if env.get(var, "") != "":
            retry_table[key], named[f"retry.{key}"] = env[var], var

    def label(key: str) -> str:
        return named.get(key, key)

    breaker_table = _table(doc.get("breaker", {}), "breaker")
    _check_keys(breaker_table, {"failure_threshold", "open_for", "max_open_for"}, "breaker")

    targets_doc: dict[str, dict[str, Any]] = {
        str(k): _table(v, f"targets.{k}") for k, v in _table(doc.get("targets", {}), "targets").items()
    }
    default_table = targets_doc.setdefault(DEFAULT_TARGET, {})
    for var in _ENV_TOKEN_TEXT:
        if env.get(var, "") != "":
            _token_text(env[var], var)
    default_named: dict[str, str] = {}
    for var, key in _ENV_DEFAULT_TARGET.items():
        if env.get(var, "") != "":
            default_table.pop(_OTHER_FORM.get(key, ""), None)
            default_table[key], default_named[key] = env[var], var
    # A variable overrides the file's other kind of auth; both kinds in variables is an error.
    env_token = env.get("RELAY_API_TOKEN_FILE") or env.get("RELAY_API_TOKEN")
    env_oauth = env.get("RELAY_OAUTH_CLIENT_ID")
    if env_token and not env_oauth:
        default_table.pop("oauth_client_id", None)
    if env_oauth and not env_token:
        default_table.pop("token", None)
        default_table.pop("token_file", None)
    for key in ("request_timeout", "max_concurrency"):
        if key in top:
            ranged(key, top[key], label(key))  # named as the key it was given as, not as a target's
    if top.get("rate_limit") not in (None, 0, "0", ""):
        ranged("rate_limit", top["rate_limit"], label("rate_limit"))
    target_defaults = {k: top[k] for k in _TARGET_DEFAULT_KEYS if k in top}

    def target_variables(name: str, table: Mapping[str, Any]) -> dict[str, str]:
        inherited = {k: named[k] for k in _TARGET_DEFAULT_KEYS if k in named and k not in table}
        return {**inherited, **(default_named if name == DEFAULT_TARGET else {})}

    targets = {
        name: _target(name, table, target_defaults, env, target_variables(name, table))
        for name, table in targets_doc.items()
    }

    database_url = _database_url(env, top, "database_url", "database-url")
    listen_database_url = _database_url(env, top, "listen_database_url", "listen-database-url")
    web_database_url = _database_url(env, top, "web_database_url", "web-database-url")

    base_delay = ranged("retry.base_delay", retry_table.get("base_delay"), label("retry.base_delay"))
    max_delay = ranged("retry.max_delay", retry_table.get("max_delay"), label("retry.max_delay"))
    if max_delay < base_delay:
        raise ConfigError("retry: max_delay must be at least base_delay")
    retry = RetrySettings(
        base_delay=base_delay,
        max_delay=max_delay,
        max_attempts=ranged(
            "retry.max_attempts", retry_table.get("max_attempts"), label("retry.max_attempts")
        ),
        max_age=ranged("retry.max_age", retry_table.get("max_age"), label("retry.max_age")),
    )
    open_for = ranged("breaker.open_for", breaker_table.get("open_for"))
    max_open_for = ranged("breaker.max_open_for", breaker_table.get("max_open_for"))
    if max_open_for < open_for:
        raise ConfigError("breaker: max_open_for must be at least open_for")
    breaker = BreakerSettings(
        failure_threshold=ranged("breaker.failure_threshold", breaker_table.get("failure_threshold")),
        open_for=open_for,
        max_open_for=max_open_for,
    )

    log_format = str(top.get("log_format", "text")).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"{label('log_format')}: expected text or json, got {log_format!r}")
    log_level = str(top.get("log_level", "INFO")).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            f"{label('log_level')}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}"
        )
    retention = top.get("retention")
    extra: dict[str, Any] = {}
    if top.get("relay_id"):
        extra["relay_id"] = str(top["relay_id"])
    if top.get("web_listen"):
        extra["web_listen"] = host_port(str(top["web_listen"]), label("web_listen"))
    return Settings(
        database_url=database_url,
        listen_database_url=listen_database_url,
        web_database_url=web_database_url,
        web_token_hash=(
            web_token_hash(str(top["web_token_hash"]), label("web_token_hash"))
            if top.get("web_token_hash")
            else None
        ),
        targets=targets,
        retry=retry,
        breaker=breaker,
        poll_interval=ranged("poll_interval", top.get("poll_interval"), label("poll_interval")),
        batch_size=ranged("batch_size", top.get("batch_size"), label("batch_size")),
        lease=ranged("lease", top.get("lease"), label("lease")),
        shutdown_timeout=ranged("shutdown_timeout", top.get("shutdown_timeout"), label("shutdown_timeout")),
        metrics_listen=(
            host_port(str(top["metrics_listen"]), label("metrics_listen"))
            if top.get("metrics_listen")
            else None
        ),
        log_format=log_format,
        log_level=log_level,
        retention=None if retention in (None, "") else ranged("retention", retention, label("retention")),
        retention_include_dead=boolean(top.get("retention_include_dead", False), "retention_include_dead"),
        systemd={k: env[k] for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID") if k in env},
        **extra,
    )
