"""One HTTP exchange read without trusting the other side: one deadline, a bounded body.

httpx's timeouts are per phase (connect, write, each read): a server that drips one byte a
second holds a request for ever. And ``response.content`` inflates a gzip body to whatever size
the server chose. :func:`exchange` therefore

* runs connect + send + wait + body under one :func:`asyncio.timeout` (httpx's per-phase timeouts
  stay as a second line);
* reads the answer as a stream of raw bytes (``aiter_raw``) and keeps at most ``keep`` bytes of
  it, inflating gzip/deflate itself with ``max_length`` so no more than ``keep + 1`` decoded
  bytes are ever produced; any other content coding keeps no body at all;
* stops reading as soon as it has enough and closes the response (the connection is then
  discarded, which costs one new connection, not memory).

It never raises for what the server or the network did: a :class:`Reply` says what arrived
(status and headers, the body kept so far) and what went wrong (an httpx error, or the deadline).
The caller's own cancellation, and any timeout that is not this one, propagate untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, cast

import httpx

__all__ = ["Reply", "exchange"]

# Raw bytes read past which a compressed body is given up even if it decoded to little: a stream
# of empty deflate blocks would otherwise be read until the deadline.
RAW_FACTOR = 8
RAW_MIN = 64 * 1024


@dataclass
class Reply:
    """What one exchange produced, as far as it got."""

    status: int | None = None  # set once the status line and headers arrived
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    body: bytes = b""  # at most ``keep`` decoded bytes; b"" for an unknown content coding
    over_limit: bool = False  # the body went on past ``keep`` (or could not be decoded to a bound)
    error: httpx.HTTPError | None = None  # the transport failed (before or after the status)
    timed_out: bool = False  # the overall deadline expired (before or after the status)
    phase: str = ""  # the last connection phase seen: "", "connecting" or "exchanging"

    @property
    def maybe_sent(self) -> bool:
        """False only when the request was still setting up its connection when it stopped.

        A transport that reports no phases (a test's mock) counts as maybe sent: the cautious side.
        """
        return self.phase != "connecting"


class _Body:
    """The decoded body, kept up to ``keep`` bytes; ``done`` once reading on is pointless."""

    def __init__(self, content_encoding: str, keep: int) -> None:
        self.keep = keep
        self.data = bytearray()
        self.more = False
        self.done = False
        self._raw = 0
        self._raw_limit = max(RAW_FACTOR * keep, RAW_MIN)
        self._deflate = False
        self._inflate: Any = None  # zlib's decompress object (its class is private)
        coding = content_encoding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._deflate = True
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
        elif coding not in ("", "identity"):  # br, zstd, a chain, anything unknown: keep nothing
            self.more = self.done = True

    def feed(self, chunk: bytes) -> None:
        first = self._raw == 0
        self._raw += len(chunk)
        room = self.keep - len(self.data)
        if self._inflate is None:
            out = chunk[: room + 1]
        else:
            try:
                out = self._inflate.decompress(chunk, room + 1)  # max_length: never more than this
            except zlib.error:
                if not (first and self._deflate):
                    self.done = True  # corrupt: keep what decoded so far
                    return
                # "deflate" is meant to be zlib-wrapped, but some servers send it raw.
                self._deflate = False
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                self._raw = 0
                self.feed(chunk)
                return
            if self._inflate.eof:
                self.done = True
        self.data += out[:room]
        if len(out) > room or self._raw >= self._raw_limit:
            self.more = self.done = True


async def _read(response: httpx.Response, body: _Body) -> None:
    if body.done:
        return
    # aiter_raw is an async generator: close it at once when we stop early.
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            body.feed(chunk)
            if body.done:
                return


async def exchange(client: httpx.AsyncClient, request: httpx.Request, *, within: float, keep: int) -> Reply:
    """Send ``request`` and read its answer, all within ``within`` seconds, keeping ``keep`` bytes."""
    reply = Reply()
    setting_up: list[Any] = []  # the TCP stream while TLS is being set up on it

    async def trace(event: str, info: dict[str, Any]) -> None:
        # connection.connect_tcp / connection.start_tls / proxy.start_tls: still setting up;
        # http11.* / http2.*: request bytes may be on their way (a proxy's CONNECT counts too).
        reply.phase = "connecting" if event.startswith(("connection.", "proxy.")) else "exchanging"
        if event == "connection.connect_tcp.complete":
            setting_up[:] = [info.get("return_value")]

    request.extensions = {**request.extensions, "trace": trace}
    body: _Body | None = None
    deadline = asyncio.timeout(within)
    try:
        async with deadline:
            response = await client.send(request, stream=True)
            try:
                reply.status, reply.headers = response.status_code, response.headers
                if response.is_stream_consumed:  # built in memory (a test's transport), decoded
                    body = _Body("identity", keep)
                    body.feed(response.content)
                else:
                    body = _Body(response.headers.get("Content-Encoding", ""), keep)
                    await _read(response, body)
            finally:
                await response.aclose()
    except httpx.HTTPError as exc:
        reply.error = exc
    except TimeoutError:
        if not deadline.expired():
            raise  # someone else's timeout
        reply.timed_out = True
    finally:
        if body is not None:
            reply.body, reply.over_limit = bytes(body.data), body.more
        if reply.phase == "connecting" and setting_up:
            await _abandon(setting_up[0])
    return reply


async def _abandon(stream: Any) -> None:
    """Close a connection cancelled while its TLS handshake ran.

    httpcore closes the TCP stream when ``start_tls`` raises an ``Exception``, but not when it is
    cancelled (our deadline, or the caller's): the socket would wait for the garbage collector.
    Closing an already closed stream is harmless.
    """
    with contextlib.suppress(Exception):
        await stream.aclose()
