"""A local stand-in for the Mirakl Connect ``updateActionStatus`` API, with fault injection.

It serves, on plain HTTP (loopback by default), what the relay talks to:

``PUT /v1/orders/actions/{action_id}``
    The path segment is percent-decoded exactly once. Checks, in this order: a valid
    ``Authorization: Bearer`` token (static, or issued by the token endpoint and not yet
    expired) else 401; a forced status (:meth:`Sandbox.force_status`); injected faults;
    the body (``status`` SUCCESS/FAILED, ``errors`` as the API documents them) else 400
    ``INVALID_INPUT``; ids starting with ``forbidden_prefix`` get 403 ``FORBIDDEN`` (a token
    that may not report on that one action); ids starting with ``unknown_prefix`` get 404
    ``ACTION_NOT_FOUND``; an
    action already applied gets 400 ``ACTION_ALREADY_FINAL``; anything else is applied: 204.
``POST /oauth/token``
    OAuth2 client credentials (form fields, or HTTP Basic for the client). Tokens expire
    after ``token_lifetime`` seconds.
``GET /_sandbox/summary`` and ``GET /_sandbox/applied``
    Read the state from another process. These admin requests are not recorded or counted.

Faults (:mod:`relay.dev.sandbox.faults`) shape the answers; the command line is
:mod:`relay.dev.sandbox.command`.

Standard library only: the demo, the tests and users trialling an integration run it as is.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import math
import random
import re
import secrets
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast
from urllib.parse import parse_qs, unquote

from relay.dev.sandbox.faults import (
    FAULT_429,
    FAULT_503,
    FAULT_APPLY_500,
    FAULT_APPLY_HANG,
    FAULT_CLOSE,
    FAULT_FORCED,
    Faults,
)
from relay.errors import ConfigError

# The codes the API accepts; the schema seeds the same list (a test keeps both equal).
ERROR_CODES = frozenset(
    {
        "INVALID_INPUT",
        "DATA_NOT_FOUND",
        "UNEXPECTED",
        "UNAVAILABLE",
        "TOO_MANY_REQUEST",
        "ACTION_NOT_SUPPORTED",
        "ORDER_IN_WRONG_STATE",
        "RETURN_IN_WRONG_STATE",
        "OTHER",
        "CARRIER_NOT_SUPPORTED",
        "MISSING_CARRIER",
        "WAREHOUSE_ID_NOT_FOUND",
        "WAREHOUSE_ID_REQUIRED",
    }
)
SCOPE = "connect-channel-platform:order-action:upsert"
ACTION_PATH_PREFIX = "/v1/orders/actions/"
TOKEN_PATH = "/oauth/token"  # noqa: S105
SUMMARY_PATH = "/_sandbox/summary"
APPLIED_PATH = "/_sandbox/applied"
MAX_BODY_BYTES = 1 << 20

# Sandbox credentials: public on purpose, printed at start.
DEFAULT_TOKEN = "sandbox-token"  # noqa: S105
DEFAULT_CLIENT_ID = "sandbox-client"
DEFAULT_CLIENT_SECRET = "sandbox-secret"  # noqa: S105

_FORCED_CODES = {
    400: "INVALID_INPUT",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    429: "TOO_MANY_REQUEST",
    500: "UNEXPECTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}
_CONTENT_LENGTH = re.compile(r"^\s*[0-9]{1,12}\s*$")
_CHUNK_SIZE = re.compile(rb"^\s*([0-9A-Fa-f]{1,8})\s*(;.*)?$", re.DOTALL)


def _default_clients() -> dict[str, str]:
    return {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox listens, whom it lets in, and what goes wrong."""

    host: str = "127.0.0.1"
    port: int = 0
    tokens: tuple[str, ...] = (DEFAULT_TOKEN,)
    oauth_clients: Mapping[str, str] = field(default_factory=_default_clients)
    token_lifetime: float = 3600.0
    unknown_prefix: str = "unknown-"
    forbidden_prefix: str = "denied-"  # ids the token may not report on: 403, the row's own
    faults: Faults = field(default_factory=Faults)
    seed: int | None = None
    log_path: str | Path | None = None
    max_records: int = 200_000  # RequestRecords kept in Sandbox.requests (oldest dropped); counts stay exact

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: expected 0 to 65535, got {self.port!r}")
        if not 0.0 < self.token_lifetime < math.inf:
            raise ConfigError(
                f"--token-lifetime: expected a positive number of seconds, got {self.token_lifetime!r}"
            )
        for token in self.tokens:
            if not token or any(c.isspace() for c in token):
                raise ConfigError(f"--token: a bearer token is non-empty and has no spaces, got {token!r}")
        if self.max_records < 0:
            raise ConfigError(f"max_records: expected zero or more, got {self.max_records!r}")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the sandbox saw it. The bearer token and client secrets are never kept."""

    time: float  # Unix time when the request line was read
    method: str
    path: str  # the raw path; a query string, if any, is replaced by "?..."
    action_id: str | None  # the decoded id for /v1/orders/actions/{id}
    status: int | None  # None: the connection was closed without an answer
    fault: str | None  # one of the FAULT_* names, when one shaped the answer
    has_authorization: bool  # whether an Authorization header was sent
    duration_ms: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "time": round(self.time, 6),
                "method": self.method,
                "path": self.path,
                "action_id": self.action_id,
                "status": self.status,
                "fault": self.fault,
                "has_authorization": self.has_authorization,
                "duration_ms": round(self.duration_ms, 3),
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the sandbox decided for one PUT before looking at its body."""

    forced: int | None
    fault: str | None
    latency: float
    retry_after: int
    hang_seconds: float


def _problem(path: str, message: str) -> dict[str, Any]:
    return {"field": path, "message": message, "extensions": {}}


def validate_update(body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parse an updateActionStatus body; return it and the API-style problems found (empty: valid)."""
    try:
        update = json.loads(body)
    except (ValueError, RecursionError):
        update = None
    if not isinstance(update, dict):
        return {}, [_problem("$", "the body must be a JSON object")]
    return update, _update_problems(update)


def _update_problems(update: dict[str, Any]) -> list[dict[str, Any]]:
    status = update.get("status")
    errors = update.get("errors")
    if status not in ("SUCCESS", "FAILED"):
        return [_problem("$.status", "status must be SUCCESS or FAILED")]
    if errors is None:
        errors = []
    if not isinstance(errors, list):
        return [_problem("$.errors", "errors must be an array")]
    if status == "FAILED" and not errors:
        return [_problem("$.errors", "errors is required, and not empty, when status is FAILED")]
    if status == "SUCCESS" and errors:
        return [_problem("$.errors", "a SUCCESS carries no errors")]
    problems: list[dict[str, Any]] = []
    for index, error in enumerate(errors):
        problems.extend(_error_problems(f"$.errors[{index}]", error))
    return problems


def _error_problems(where: str, error: object) -> list[dict[str, Any]]:
    if not isinstance(error, dict):
        return [_problem(where, "each error is an object with a code and a message")]
    problems = []
    code = error.get("code")
    if not isinstance(code, str) or code not in ERROR_CODES:
        problems.append(_problem(f"{where}.code", f"code must be one of {', '.join(sorted(ERROR_CODES))}"))
    message = error.get("message")
    if not isinstance(message, str) or not message:
        problems.append(_problem(f"{where}.message", "message must be a non-empty string"))
    return problems


def action_id_from_path(raw_path: str) -> str | None:
    """The action id of ``/v1/orders/actions/{id}``, decoded once; None for any other path."""
    if not raw_path.startswith(ACTION_PATH_PREFIX) or "?" in raw_path or "#" in raw_path:
        return None
    segment = raw_path[len(ACTION_PATH_PREFIX) :]
    if not segment or "/" in segment:
        return None
    return unquote(segment)


def _recorded_path(raw_path: str) -> str:
    path, query_mark, _ = raw_path.partition("?")
    return path + ("?..." if query_mark else "")


class Sandbox:
    """The sandbox server. ``Sandbox(config).start()`` (or ``with Sandbox(config) as sb:``).

    The public attributes below are the state tests read; they change under a lock, are
    cleared in place by :meth:`reset`, and are safe to read once the traffic has stopped.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        self._faults = self.config.faults
        self._forced_status: int | None = None
        self._token_down = False
        self._static_tokens = frozenset(self.config.tokens)
        self._issued: dict[str, float] = {}  # access token -> time.monotonic() expiry
        self.issued_tokens: list[str] = []  # every access token handed out (sandbox tokens, not secrets)
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._log_lock = threading.Lock()
        self._log_file: IO[str] | None = None
        self.applied: dict[str, dict[str, Any]] = {}  # action id -> the body applied
        self.apply_count: Counter[str] = Counter()  # never above 1: a repeat is refused
        self.duplicates = 0  # PUTs refused with ACTION_ALREADY_FINAL
        self.duplicate_count: Counter[str] = Counter()  # the same, per action id
        self.requests: list[RequestRecord] = []  # the latest config.max_records requests
        self.request_total = 0  # every recorded request, even those dropped from `requests`
        self.status_counts: Counter[int | None] = Counter()  # None: closed without an answer
        self.fault_counts: Counter[str] = Counter()
        self.puts: Counter[str] = Counter()  # PUTs past the auth check, per action id
        self.token_requests = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Listen and serve in a background thread; return self."""
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("a Sandbox starts once")
        log_file = self._open_log()
        server_class = _Server6 if ":" in self.config.host else _Server
        try:
            self._server = server_class((self.config.host, self.config.port), self)
        except OSError as exc:
            if log_file is not None:
                log_file.close()
            where = f"{self.config.host}:{self.config.port}"
            raise ConfigError(f"sandbox: cannot listen on {where}: {exc.strerror or exc}") from exc
        self._log_file = log_file
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="sandbox", daemon=True
        )
        self._thread.start()
        return self

    def _open_log(self) -> IO[str] | None:
        if self.config.log_path is None:
            return None
        try:
            return open(self.config.log_path, "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise ConfigError(f"--log: cannot open {self.config.log_path}: {exc.strerror or exc}") from exc

    def stop(self) -> None:
        """Stop serving, drop open connections, wake hanging requests. Idempotent."""
        server, self._server = self._server, None
        self._stopping.set()
        if server is None:
            return
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        with self._log_lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> Sandbox:
        return self if self._server is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the sandbox is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The API base URL: PUT ``{url}/v1/orders/actions/{id}``."""
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    # -- switches --------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults

    def force_status(self, status: int | None) -> None:
        """Answer every authorized PUT with ``status`` (nothing applied); None turns it off."""
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"force_status: expected an HTTP status from 200 to 599, got {status!r}")
        with self._lock:
            self._forced_status = status

    def token_endpoint_down(self, down: bool = True) -> None:
        """Make ``POST /oauth/token`` answer 503 (True) or work again (False)."""
        self._token_down = down

    def revoke_tokens(self) -> None:
        """Forget every issued access token (static ones stay): the next use gets a 401."""
        with self._lock:
            self._issued.clear()

    def reset(self) -> None:
        """Forget what was applied and recorded, and re-seed the fault draws. Switches stay."""
        with self._lock:
            self._rng.seed(self.config.seed)
            self.applied.clear()
            self.apply_count.clear()
            self.duplicates = 0
            self.duplicate_count.clear()
            self.requests.clear()
            self.request_total = 0
            self.status_counts.clear()
            self.fault_counts.clear()
            self.puts.clear()
            self.token_requests = 0

    # -- reports ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counts: requests, applied, duplicates, token requests, by status, by fault."""
        with self._lock:
            by_status = {_status_key(s): n for s, n in self.status_counts.items()}
            return {
                "requests": self.request_total,
                "applied": len(self.applied),
                "duplicates": self.duplicates,
                "max_apply_count": max(self.apply_count.values(), default=0),
                "token_requests": self.token_requests,
                "by_status": dict(sorted(by_status.items())),
                "by_fault": dict(sorted(self.fault_counts.items())),
            }

    def applied_report(self) -> dict[str, Any]:
        """Applied action ids with their apply counts, and refused repeats per id."""
        with self._lock:
            return {
                "count": len(self.applied),
                "applied": dict(self.apply_count),
                "duplicates": dict(self.duplicate_count),
            }

    def banner(self) -> str:
        """One line: where the sandbox listens and which (sandbox) credentials it accepts."""
        clients = ", ".join(f"{cid}:{secret}" for cid, secret in self.config.oauth_clients.items())
        return (
            f"sandbox listening: base URL {self.url}  token URL {self.token_url}  "
            f"bearer tokens: {', '.join(self.config.tokens) or '(none)'}  "
            f"OAuth clients (id:secret): {clients or '(none)'}"
        )

    # -- used by the request handler -------------------------------------------------------

    def _bearer_is_valid(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        if token in self._static_tokens:
            return True
        expiry = self._issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    def _client_is_valid(self, client_id: str, secret: str) -> bool:
        expected = self.config.oauth_clients.get(client_id)
        return expected is not None and hmac.compare_digest(expected.encode(), secret.encode())

    def _issue_token(self) -> tuple[str, int]:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            expired = [t for t, expiry in self._issued.items() if expiry <= now]
            for old in expired:
                del self._issued[old]
            self._issued[token] = now + self.config.token_lifetime
            self.issued_tokens.append(token)
        return token, max(1, int(self.config.token_lifetime))

    def _plan(self, action_id: str) -> _Plan:
        """The answer's plan for one PUT. With a seed, its fault depends only on the seed, the
        action id and how many PUTs that action had: the same for every run, in whatever order
        concurrent requests arrive (so a seeded demo reproduces its counts)."""
        with self._lock:
            faults, forced = self._faults, self._forced_status
            self.puts[action_id] += 1
            seed = self.config.seed
            rng = self._rng if seed is None else random.Random(f"{seed}/{action_id}/{self.puts[action_id]}")
            fault = None if forced is not None else faults.draw(rng)
        return _Plan(forced, fault, faults.latency, faults.retry_after, faults.hang_seconds)

    def _is_forbidden(self, action_id: str) -> bool:
        prefix = self.config.forbidden_prefix
        return bool(prefix) and action_id.startswith(prefix)

    def _is_unknown(self, action_id: str) -> bool:
        prefix = self.config.unknown_prefix
        return bool(prefix) and action_id.startswith(prefix)

    def _apply(self, action_id: str, update: dict[str, Any]) -> bool:
        with self._lock:
            if action_id in self.applied:
                self.duplicates += 1
                self.duplicate_count[action_id] += 1
                return False
            self.applied[action_id] = update
            self.apply_count[action_id] += 1
            return True

    def _record(self, record: RequestRecord) -> None:
        limit = self.config.max_records
        with self._lock:
            self.request_total += 1
            self.status_counts[record.status] += 1
            if record.fault is not None:
                self.fault_counts[record.fault] += 1
            if record.path == TOKEN_PATH and record.method == "POST":
                self.token_requests += 1
            self.requests.append(record)
            if len(self.requests) > limit:
                del self.requests[: len(self.requests) - limit + limit // 10]
        if self._log_file is not None:
            self._write_log(record.to_json() + "\n")

    def _write_log(self, line: str) -> None:
        with self._log_lock:
            if self._log_file is not None:
                self._log_file.write(line)

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


def _status_key(status: int | None) -> str:
    return "no_answer" if status is None else str(status)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() closes idle keep-alive connections itself
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up in DNS, which can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away; not worth a traceback
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MiraklConnectSandbox/1"
    sys_version = ""
    timeout = 120.0  # an idle keep-alive connection is closed after this
    wbufsize = -1  # buffered: one write per response (flushed by handle_one_request)
    disable_nagle_algorithm = True

    _status: int | None = None
    _fault: str | None = None

    @property
    def _sandbox(self) -> Sandbox:
        return cast(_Server, self.server).sandbox

    def setup(self) -> None:
        super().setup()
        self._sandbox._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._sandbox._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing per request on stderr: the request log and the records say it all."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- one request -----------------------------------------------------------------------

    def _handle(self) -> None:
        started, wall = time.monotonic(), time.time()
        self._status, self._fault = None, None
        action_id = None
        body = self._read_body()
        if body is not None:
            action_id = self._route(body)
        if self.path in (SUMMARY_PATH, APPLIED_PATH):
            return
        record = RequestRecord(
            time=wall,
            method=self.command,
            path=_recorded_path(self.path),
            action_id=action_id,
            status=self._status,
            fault=self._fault,
            has_authorization="Authorization" in self.headers,
            duration_ms=(time.monotonic() - started) * 1000.0,
        )
        self._sandbox._record(record)

    def _route(self, body: bytes) -> str | None:
        """Answer the request; return the action id it was about, if any."""
        if self.path.startswith(ACTION_PATH_PREFIX):
            action_id = action_id_from_path(self.path)
            if action_id is None:
                self._not_found()
            elif self.command != "PUT":
                self._method_not_allowed("PUT")
            else:
                self._put_action(action_id, body)
            return action_id
        if self.path == TOKEN_PATH:
            if self.command == "POST":
                self._post_token(body)
            else:
                self._method_not_allowed("POST")
        elif self.path in (SUMMARY_PATH, APPLIED_PATH):
            self._admin()
        else:
            self._not_found()
        return None

    def _put_action(self, action_id: str, body: bytes) -> None:
        sandbox = self._sandbox
        if not sandbox._bearer_is_valid(self.headers.get("Authorization")):
            headers = {"WWW-Authenticate": 'Bearer realm="sandbox"'}
            self._api_error(401, "UNAUTHORIZED", "missing, invalid or expired bearer token", headers=headers)
            return
        plan = sandbox._plan(action_id)
        if plan.latency > 0:
            sandbox._stopping.wait(plan.latency)
        if plan.forced is not None:
            self._answer_forced(plan.forced, plan.retry_after)
        elif plan.fault in (FAULT_CLOSE, FAULT_503, FAULT_429):
            self._answer_unapplied_fault(plan.fault, plan.retry_after)
        else:
            self._update(action_id, body, plan)

    def _update(self, action_id: str, body: bytes, plan: _Plan) -> None:
        update, problems = validate_update(body)
        if problems:
            self._api_error(400, "INVALID_INPUT", "the request body is invalid", problems)
        elif self._sandbox._is_forbidden(action_id):
            self._api_error(403, "FORBIDDEN", f"this token may not report on action {action_id!r}")
        elif self._sandbox._is_unknown(action_id):
            self._api_error(404, "ACTION_NOT_FOUND", f"action {action_id!r} does not exist or has expired")
        elif not self._sandbox._apply(action_id, update):
            self._api_error(400, "ACTION_ALREADY_FINAL", f"action {action_id!r} already has a final status")
        elif plan.fault == FAULT_APPLY_500:
            self._fault = FAULT_APPLY_500
            self._api_error(500, "UNEXPECTED", "injected fault: applied, then failed to answer")
        elif plan.fault == FAULT_APPLY_HANG:
            self._fault = FAULT_APPLY_HANG
            self._sandbox._stopping.wait(plan.hang_seconds)
            self.close_connection = True
        else:
            self._send(204)

    def _answer_forced(self, status: int, retry_after: int) -> None:
        self._fault = FAULT_FORCED
        if status < 300:
            self._send(status)
            return
        headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
        code = _FORCED_CODES.get(status, f"HTTP_{status}")
        self._api_error(status, code, f"forced answer {status} (sandbox force_status)", headers=headers)

    def _answer_unapplied_fault(self, fault: str, retry_after: int) -> None:
        self._fault = fault
        if fault == FAULT_CLOSE:
            self.close_connection = True  # no answer at all; the body was read, so a clean FIN
        elif fault == FAULT_503:
            self._api_error(503, "UNAVAILABLE", "injected fault: service unavailable")
        else:
            headers = {"Retry-After": str(retry_after)}
            self._api_error(429, "TOO_MANY_REQUEST", "injected fault: too many requests", headers=headers)

    def _post_token(self, body: bytes) -> None:
        sandbox = self._sandbox
        if sandbox._token_down:
            down = {"error": "temporarily_unavailable", "error_description": "token endpoint is down"}
            self._send_json(503, down, {"Retry-After": "1"})
            return
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        grant_type = form.get("grant_type", [""])[0]
        client_id, secret = self._client_credentials(form)
        if grant_type != "client_credentials":
            error = "invalid_request" if not grant_type else "unsupported_grant_type"
            self._send_json(400, {"error": error, "error_description": "grant_type=client_credentials"})
        elif not sandbox._client_is_valid(client_id, secret):
            self._send_json(401, {"error": "invalid_client"})
        else:
            token, expires_in = sandbox._issue_token()
            answer = {"token_type": "Bearer", "access_token": token, "expires_in": expires_in, "scope": SCOPE}
            self._send_json(200, answer, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _client_credentials(self, form: dict[str, list[str]]) -> tuple[str, str]:
        """The client id and secret: form fields, else HTTP Basic (RFC 6749 section 2.3.1)."""
        if "client_id" in form:
            return form["client_id"][0], form.get("client_secret", [""])[0]
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return "", ""
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        client_id, _, secret = decoded.partition(":")
        return unquote(client_id), unquote(secret)

    def _admin(self) -> None:
        if self.command not in ("GET", "HEAD"):
            self._method_not_allowed("GET")
        elif self.path == SUMMARY_PATH:
            self._send_json(200, self._sandbox.summary())
        else:
            self._send_json(200, self._sandbox.applied_report())

    def _not_found(self) -> None:
        self._api_error(404, "NOT_FOUND", f"no such resource: {self.command} {_recorded_path(self.path)}")

    def _method_not_allowed(self, allowed: str) -> None:
        message = f"{self.command} is not allowed here; use {allowed}"
        self._api_error(405, "METHOD_NOT_ALLOWED", message, headers={"Allow": allowed})

    # -- the request body ------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The whole body; None when it could not be read (answered, or the client left)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        if not _CONTENT_LENGTH.match(raw_length):
            self._refuse_body(400, "invalid Content-Length")
            return None
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            self._refuse_body(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return None
        return body

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            match = _CHUNK_SIZE.match(self.rfile.readline(1024))
            if match is None:
                self._refuse_body(400, "invalid chunked body")
                return None
            size = int(match.group(1), 16)
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                self._refuse_body(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
                return None
            chunk = self.rfile.read(size + 2)  # the data and its CRLF
            if len(chunk) < size + 2:
                self.close_connection = True
                return None
            chunks.append(chunk[:size])
        for _ in range(100):  # trailer fields, up to the blank line
            if self.rfile.readline(65537).strip() == b"":
                break
        return b"".join(chunks)

    def _refuse_body(self, status: int, message: str) -> None:
        code = "PAYLOAD_TOO_LARGE" if status == 413 else "INVALID_INPUT"
        self._api_error(status, code, message, headers={"Connection": "close"})

    # -- answers ---------------------------------------------------------------------------

    def _api_error(
        self,
        status: int,
        code: str,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._send_json(status, {"code": code, "message": message, "errors": errors or []}, headers)

    def _send_json(
        self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._send(status, body, headers)

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self._status = status
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 204:
            if body:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors (bad request line, unknown method, ...) in the API's JSON shape."""
        reason = message or self.responses.get(code, ("error",))[0]
        self._api_error(code, "HTTP_ERROR", reason, headers={"Connection": "close"})
