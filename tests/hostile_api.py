"""A hostile stand-in for the API: raw HTTP/1.1 on loopback that answers with exactly the bytes a
test asks for, and otherwise like the real API.

Per action id prefix, a :class:`Behaviour` says what goes on the wire: any status, headers
(latin-1 bytes included), a body of any size or encoding, the head and/or body dripped one byte at
a time. Ready-made ones: :func:`nul_escapes`, :func:`raw_nul_html`, :func:`lone_surrogate`,
:func:`invalid_utf8`, :func:`huge_body`, :func:`gzip_bomb`, :func:`deep_json`, :func:`html_502`,
:func:`drip`, :func:`long_retry_after`. Action ids no behaviour claims are answered as the real API
does: 204 and applied the first time, 400 ``ACTION_ALREADY_FINAL`` on a repeat, 404
``NOT_FOUND`` for ids starting with ``unknown-``.

For end-to-end tests with the engine, a behaviour can *apply then misbehave*
(``apply=True``: the action is recorded as applied before the hostile answer goes out, as when
the API did the work but the answer got lost) and misbehave only the first ``times`` requests of
each action (then the API's rules take over), so a test can assert exactly one application per
action (:attr:`HostileApi.applied`, :attr:`HostileApi.requests`)::

    with HostileApi({"bomb-": replace(gzip_bomb(), apply=True, times=1)}) as api:
        settings = relay_settings(database_url, api.url)
        ...  # run the engine
        assert api.wait_for(lambda: "bomb-1" in api.applied, 10)
        assert api.requests["bomb-1"] == 2  # the bomb, then 400 ACTION_ALREADY_FINAL

``POST /oauth/token`` (:attr:`HostileApi.token_url`) hands out ``hostile-token-N`` unless
``token=`` gives a behaviour for it. A request in absolute form (``PUT http://host/...``, as sent
to a proxy) is served too, and every request is recorded in :attr:`HostileApi.seen`, so the same
class stands in for a proxy that answers by itself.

It runs an asyncio loop in a thread of its own, so sync and async tests use it alike (``with`` or
``async with``). Everything is bounded: the head of a request (16 KiB), its body (1 MiB), requests
per connection (1,000), idle time on a connection (30 s), the record of requests (10,000); a drip
ends with its body. Closing stops the loop, cancels every connection and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import zlib
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "Behaviour",
    "HostileApi",
    "Seen",
    "deep_json",
    "drip",
    "gzip_bomb",
    "html_502",
    "huge_body",
    "invalid_utf8",
    "lone_surrogate",
    "long_retry_after",
    "nul_escapes",
    "raw_nul_html",
]

ACTIONS = "/v1/orders/actions/"
TOKEN_PATH = "/oauth/token"
HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 1024 * 1024
REQUESTS_PER_CONNECTION = 1000
IDLE_TIMEOUT = 30.0
SEEN_LIMIT = 10_000


@dataclass(frozen=True)
class Behaviour:
    """What the server sends for one request."""

    status: int = 204
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()  # sent as latin-1, so obs-text bytes are possible
    content_length: int | None = None  # declared length; None: len(body); -1: none (close-delimited)
    drip: float = 0.0  # seconds between body bytes (0: all at once)
    drip_head: bool = False  # drip the status line and headers too, at the same pace
    apply: bool = False  # record the action as applied before answering
    times: int | None = None  # misbehave for the first N requests of each action; None: always
    close: bool = False  # close the connection after the answer


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    target: str  # the request-target as sent: origin form, or absolute form through a proxy
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    action_id: str | None


def _json(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _error(status: int, code: str, message: str) -> Behaviour:
    body = _json({"code": code, "message": message, "errors": []})
    return Behaviour(status, body, (("Content-Type", "application/json"),))


# -- ready-made hostile answers ------------------------------------------------------------------


def nul_escapes() -> Behaviour:
    """400 JSON whose code and message carry ``\\u0000`` escapes (NUL once parsed)."""
    body = b'{"code":"INVALID\\u0000INPUT","message":"bad\\u0000value\\u0000","errors":[]}'
    return Behaviour(400, body, (("Content-Type", "application/json"),))


def raw_nul_html() -> Behaviour:
    """500 with an HTML error page holding raw 0x00 bytes."""
    body = b"<html><body>\x00\x00<h1>Internal\x00Error</h1>\x00</body></html>"
    return Behaviour(500, body, (("Content-Type", "text/html"),))


def lone_surrogate() -> Behaviour:
    """400 JSON whose message is the escape of a lone surrogate (unencodable once parsed)."""
    body = b'{"code":"INVALID_INPUT","message":"bad \\ud800 value","errors":[]}'
    return Behaviour(400, body, (("Content-Type", "application/json"),))


def invalid_utf8() -> Behaviour:
    """400 with bytes that are not UTF-8 (latin-1 and stray continuation bytes)."""
    body = b'{"code":"INVALID_INPUT","message":"caf\xe9 \xff\xfe \x80","errors":[]}'
    return Behaviour(400, body, (("Content-Type", "application/json"),))


@functools.cache
def _big(size: int) -> bytes:
    return b"<p>" + b"x" * (size - 7) + b"</p>\n"


def huge_body(size: int = 4 * 1024 * 1024) -> Behaviour:
    """500 with a plain body of ``size`` bytes (4 MB by default)."""
    return Behaviour(500, _big(size), (("Content-Type", "text/html"),))


@functools.cache
def _bomb(inflated: int) -> bytes:
    """Zeros, gzip-compressed: 200 MB inflate from about 200 KB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    parts = [packer.compress(chunk) for _ in range(inflated // len(chunk))]
    return b"".join([*parts, packer.flush()])


def gzip_bomb(inflated: int = 200 * 1024 * 1024, status: int = 503) -> Behaviour:
    """``Content-Encoding: gzip`` whatever the request said, ~200 KB on the wire, 200 MB inflated."""
    headers = (("Content-Type", "application/json"), ("Content-Encoding", "gzip"))
    return Behaviour(status, _bomb(inflated), headers)


def deep_json(depth: int = 100_000, status: int = 400) -> Behaviour:
    """A JSON body nested ``depth`` deep: ``[[[[...]]]]``."""
    return Behaviour(status, b"[" * depth + b"]" * depth, (("Content-Type", "application/json"),))


def html_502() -> Behaviour:
    """What a load balancer says when the API is down."""
    body = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
    return Behaviour(502, body, (("Content-Type", "text/html"),))


def drip(status: int = 200, size: int = 1000, every: float = 1.0, head: bool = False) -> Behaviour:
    """The status line and headers at once (or dripped too, ``head=True``), then one body byte
    every ``every`` seconds: ``size`` bytes declared, so a client without a deadline waits."""
    return Behaviour(status, b"y" * size, (("Content-Type", "text/plain"),), drip=every, drip_head=head)


def long_retry_after(status: int = 429) -> Behaviour:
    """A ``Retry-After`` of 8 KB, with latin-1 bytes that are not UTF-8."""
    value = "120" + " \xff\xfe" * 2700
    return Behaviour(status, b"", (("Retry-After", value),))


# -- the server -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class HostileApi:
    """The server; see the module docstring. ``url`` is the API base URL to configure."""

    def __init__(
        self,
        behaviours: Mapping[str, Behaviour] | None = None,
        *,
        token: Behaviour | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.behaviours = dict(behaviours or {})
        self.token = token
        self.host = host
        self.port = 0
        self.requests: Counter[str] = Counter()  # requests per action id
        self.applied: dict[str, Any] = {}  # action id -> the JSON body that applied it
        self.duplicates = 0  # PUTs answered 400 ACTION_ALREADY_FINAL
        self.token_requests = 0
        self.seen: deque[Seen] = deque(maxlen=SEEN_LIMIT)
        self._changed = threading.Condition()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # -- what tests read --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def apply_count(self) -> int:
        """How many actions have been applied (each at most once, as the real API does)."""
        return len(self.applied)

    @property
    def request_total(self) -> int:
        return sum(self.requests.values())

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (checked after every request), at most ``timeout`` s."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    async def until(self, predicate: Callable[[], bool], within: float) -> bool:
        """:meth:`wait_for` for async tests (waits in a thread, the test's loop stays free)."""
        return await asyncio.to_thread(self.wait_for, predicate, within)

    # -- start and stop -------------------------------------------------------------------

    def __enter__(self) -> HostileApi:
        self._thread = threading.Thread(target=self._run, name="hostile-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the hostile API did not start")
        if self._failure is not None:
            raise RuntimeError("the hostile API failed to start") from self._failure
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> HostileApi:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the hostile API did not stop within 10 s")
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ (or lost if it came later)
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, self.host, 0, limit=HEAD_LIMIT)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            for _ in range(REQUESTS_PER_CONNECTION):
                request = await asyncio.wait_for(_read_request(reader), IDLE_TIMEOUT)
                if request is None or not await self._answer(request, writer):
                    break
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or sent nonsense: so does this connection
        except asyncio.CancelledError:
            pass  # the server is closing; asyncio's stream callback would log a cancelled task
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        behaviour = self._decide(request)
        await _send(writer, behaviour)
        return not behaviour.close and request.headers.get("connection", "").lower() != "close"

    def _decide(self, request: _Request) -> Behaviour:
        """Record the request and pick the answer (in the server's thread, under the lock)."""
        path = urlsplit(request.target).path if "://" in request.target else request.target
        path = path.partition("?")[0]
        at = path.find(ACTIONS)  # after whatever prefix the base URL has
        action_id = unquote(path[at + len(ACTIONS) :]) if at >= 0 else None
        with self._changed:
            try:
                self.seen.append(
                    Seen(request.method, request.target, request.headers, request.body, action_id)
                )
                if request.method == "POST" and path.endswith(TOKEN_PATH):
                    self.token_requests += 1
                    return self.token or self._fresh_token()
                if action_id is None or request.method != "PUT":
                    return _error(404, "NOT_FOUND", "no such resource")
                self.requests[action_id] += 1
                behaviour = self._behaviour_for(action_id)
                if behaviour is not None and (
                    behaviour.times is None or self.requests[action_id] <= behaviour.times
                ):
                    if behaviour.apply:
                        self._apply(action_id, request.body)
                    return behaviour
                return self._like_the_api(action_id, request.body)
            finally:
                self._changed.notify_all()

    def _behaviour_for(self, action_id: str) -> Behaviour | None:
        matches = [prefix for prefix in self.behaviours if action_id.startswith(prefix)]
        return self.behaviours[max(matches, key=len)] if matches else None

    def _like_the_api(self, action_id: str, body: bytes) -> Behaviour:
        if action_id.startswith("unknown-"):
            return _error(404, "NOT_FOUND", f"action {action_id!r} does not exist")
        if action_id in self.applied:
            self.duplicates += 1
            return _error(400, "ACTION_ALREADY_FINAL", f"action {action_id!r} already has a final status")
        self._apply(action_id, body)
        return Behaviour(204)

    def _apply(self, action_id: str, body: bytes) -> None:
        if action_id not in self.applied:
            try:
                self.applied[action_id] = json.loads(body)
            except ValueError:
                self.applied[action_id] = body

    def _fresh_token(self) -> Behaviour:
        payload = {
            "access_token": f"hostile-token-{self.token_requests}",
            "token_type": "Bearer",
            "expires_in": 3600,
        }
        return Behaviour(200, _json(payload), (("Content-Type", "application/json"),))


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """One request, or None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")  # LimitOverrunError (a ValueError) past 16 KiB
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not supported")
    length = int(headers.get("content-length", "0"))
    if not 0 <= length <= BODY_LIMIT:
        raise ValueError("request body too large")
    body = await reader.readexactly(length)
    return _Request(method, target, headers, body)


def _head(behaviour: Behaviour) -> bytes:
    try:
        reason = HTTPStatus(behaviour.status).phrase
    except ValueError:
        reason = "Whatever"
    lines = [f"HTTP/1.1 {behaviour.status} {reason}"]
    length = len(behaviour.body) if behaviour.content_length is None else behaviour.content_length
    if behaviour.status not in (204, 304) and length >= 0:
        lines.append(f"Content-Length: {length}")
    if behaviour.close or length < 0:
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in behaviour.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send(writer: asyncio.StreamWriter, behaviour: Behaviour) -> None:
    head = _head(behaviour)
    body = b"" if behaviour.status in (204, 304) else behaviour.body
    if behaviour.drip_head and behaviour.drip > 0:
        await _drip(writer, head, behaviour.drip)
    else:
        writer.write(head)
    if behaviour.drip > 0:
        await writer.drain()
        await _drip(writer, body, behaviour.drip)
    else:
        writer.write(body)
        await writer.drain()


async def _drip(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        await asyncio.sleep(every)
