"""The HTTP edge: one ``httpx.AsyncClient`` per target, one PUT per update, an ``Answer`` back.

No status logic here (that is :mod:`relay.classify`); this module only builds the request,
sends it, and says what came back or which transport error happened.
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
from relay.auth import TokenSource, token_source
from relay.classify import Answer
from relay.settings import TargetSettings

RESPONSE_BODY_LIMIT = 4096

# Errors raised before a single byte of the request could reach the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


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
    if not body:
        return None
    text = body[:RESPONSE_BODY_LIMIT].decode("utf-8", errors="replace")
    while len(text.encode()) > RESPONSE_BODY_LIMIT:
        text = text[:-1]
    return text


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


class ApiClient:
    """Sends updates to one target.

    Each concurrent request gets its own one-connection ``httpx.AsyncClient`` (kept and reused,
    most recently used first): measured on loopback, 64 such clients send about 4x more PUTs
    per second than one client with a 64-connection pool, whose bookkeeping dominates.
    The caller bounds concurrency; this class never holds more clients than were busy at once.
    """

    def __init__(
        self, target: TargetSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.target = target
        self._transport = transport
        self._ssl = ssl_context(target)
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
            headers={"User-Agent": f"outbox-relay/{__version__}", "Accept": "application/json"},
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
            response = await client.put(url, content=body, headers=headers)
            answer = Answer(
                status=response.status_code,
                body=response.content,
                retry_after=response.headers.get("Retry-After"),
            )
        except httpx.HTTPError as exc:
            answer = Answer(
                status=None,
                transport_error=type(exc).__name__,
                maybe_sent=not isinstance(exc, _NOT_SENT),
            )
        finally:
            self._idle.append(client)
        return Sent(answer, started_at, (time.perf_counter() - start) * 1000.0)
