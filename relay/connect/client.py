"""The HTTP edge: one ``httpx.AsyncClient`` per target, one PUT per update, an ``Answer`` back.

No status logic here (that is :mod:`relay.core.classify`); this module only builds the request,
sends it, and says what came back or which transport error happened.

What comes back is not trusted (:mod:`relay.connect.wire` reads it): one deadline of
``request_timeout`` seconds covers connect + send + wait + body, at most :data:`BODY_KEEP`
bytes of body are kept (never inflated past that), and every string put in an
:class:`~relay.core.classify.Answer` has been through :mod:`relay.sanitize`. If the deadline expires
after the status line arrived, the API did answer: the answer is that status with the body read
so far. Before it, the answer is the transport error ``DeadlineExceeded``.

The clients ignore ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY`` and the SSL
variables (``trust_env=False``): a proxy is the target's explicit ``proxy`` setting, used for the
PUTs and for the token endpoint alike.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from relay import __version__
from relay.connect.answer import Answer
from relay.connect.auth import TokenSource, token_source
from relay.connect.wire import Reply, exchange
from relay.sanitize import one_line, storable_bytes
from relay.settings import TargetSettings

RESPONSE_BODY_LIMIT = 4096  # what is stored of a response body (delivery_attempts.response_body)
BODY_KEEP = 8192  # what is read of it: enough for classify to parse an error, never more
RETRY_AFTER_LIMIT = 64  # characters kept of a Retry-After header
ERROR_NAME_LIMIT = 64
DEADLINE_EXCEEDED = "DeadlineExceeded"  # Answer.transport_error when the overall deadline expired

# Errors raised before a single byte of the request could reach the server (a ProxyError is a
# refused CONNECT: the request itself never left).
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.ProxyError,
)


def action_path(action_id: str) -> str:
    """The request path, with the id percent-encoded as exactly one path segment.

    ``quote(safe="")`` encodes ``/ ? # %`` and everything non-ASCII; a segment made only of
    dots (``.``, ``..``) is encoded too, so no client or proxy can treat it as a dot-segment.
    """
    segment = quote(action_id, safe="")
    if set(action_id) == {"."}:
        segment = "%2E" * len(action_id)
    return f"/v1/orders/actions/{segment}"


def request_body(status: str, errors: list[dict[str, str]]) -> bytes:
    """The JSON body exactly as stored: a SUCCESS is ``{"status": "SUCCESS"}``."""
    payload: dict[str, Any] = {"status": status}
    if errors:
        payload["errors"] = errors
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def truncate_body(body: bytes) -> str | None:
    """The stored form of a response body: storable text of at most RESPONSE_BODY_LIMIT bytes."""
    return storable_bytes(body, RESPONSE_BODY_LIMIT) or None


@dataclass(frozen=True)
class Sent:
    """One request's answer plus when it started and how long it took."""

    answer: Answer
    started_at: datetime
    duration_ms: float


def ssl_context(target: TargetSettings) -> ssl.SSLContext:
    """Certificate verification always on; the target's CA bundle when it names one."""
    context = ssl.create_default_context(cafile=str(target.ca_bundle) if target.ca_bundle else None)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def proxy(target: TargetSettings, context: ssl.SSLContext) -> httpx.Proxy | None:
    """The target's proxy; an https:// one is verified like the target (``ca_bundle`` or system)."""
    if target.proxy is None:
        return None
    url = target.proxy.reveal()
    return httpx.Proxy(url, ssl_context=context if url.lower().startswith("https:") else None)


class ApiClient:
    """Sends updates to one target.

    Each concurrent request gets its own one-connection ``httpx.AsyncClient`` (kept and reused,
    most recently used first): measured on loopback, 64 such clients send about 4x more PUTs
    per second than one client with a 64-connection pool, whose bookkeeping dominates.
    The caller bounds concurrency; this class never holds more clients than were busy at once.
    """

    def __init__(self, target: TargetSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.target = target
        self._transport = transport
        self._ssl = ssl_context(target)
        # A test's own transport replaces the network, the proxy included (httpx would send
        # everything through the proxy's transport and bypass the one given).
        self._proxy = proxy(target, self._ssl) if transport is None else None
        self._idle: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []
        self.http = self._new_client()  # for the token endpoint
        self.tokens: TokenSource = token_source(target, self.http)

    def _new_client(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.target.request_timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30.0),
            verify=self._ssl,
            follow_redirects=False,
            transport=self._transport,
            proxy=self._proxy,
            trust_env=False,
            headers={
                "User-Agent": f"outbox-relay/{__version__}",
                "Accept": "application/json",
                "Accept-Encoding": "identity",
            },
        )
        self._all.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._all:
            await client.aclose()
        self._all.clear()
        self._idle.clear()

    async def put(self, action_id: str, body: bytes, token: str | None) -> Sent:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = self.target.base_url + action_path(action_id)
        client = self._idle.pop() if self._idle else self._new_client()
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        try:
            request = client.build_request("PUT", url, content=body, headers=headers)
            reply = await exchange(client, request, within=self.target.request_timeout, keep=BODY_KEEP)
        finally:
            self._idle.append(client)
        return Sent(answer(reply), started_at, (time.perf_counter() - start) * 1000.0)


def answer(reply: Reply) -> Answer:
    """The :class:`Answer` for one exchange: a status, once one arrived, wins over any error."""
    if reply.status is not None:
        retry_after = reply.headers.get("Retry-After")
        return Answer(
            status=reply.status,
            body=reply.body,
            retry_after=None if retry_after is None else one_line(retry_after, RETRY_AFTER_LIMIT),
        )
    if reply.error is not None:
        return Answer(
            status=None,
            transport_error=one_line(type(reply.error).__name__, ERROR_NAME_LIMIT),
            maybe_sent=reply.maybe_sent and not isinstance(reply.error, _NOT_SENT),
        )
    return Answer(status=None, transport_error=DEADLINE_EXCEEDED, maybe_sent=reply.maybe_sent)
