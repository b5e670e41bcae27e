"""Bearer tokens for the API: none, a static token (optionally re-read from its file), or
OAuth2 client credentials with single-flight renewal ahead of expiry.

Secrets and tokens never appear in an exception message, a ``repr`` or a log record: the
only thing logged is ``token renewed, expires in Ns`` at DEBUG (logger ``relay.connect.auth``).

What comes from outside is checked here as it enters: a token re-read from its file, and the
token endpoint's answer, must be printable ASCII without whitespace (they go into a header); the
endpoint's answer is read within the target's ``request_timeout`` overall and at most
:data:`TOKEN_BODY_LIMIT` bytes of it (:mod:`relay.connect.wire`); every piece of outside text that reaches
an :class:`~relay.errors.AuthError` message has been through :mod:`relay.sanitize`. Whatever goes
wrong, the caller sees an ``AuthError`` and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from relay.connect.wire import exchange
from relay.errors import AuthError
from relay.sanitize import one_line, storable
from relay.settings import TOKEN_RULE, OAuthSettings, Secret, TargetSettings, is_token_text

__all__ = ["NoToken", "OAuthToken", "StaticToken", "TokenSource", "token_source"]

log = logging.getLogger("relay.auth")

DEFAULT_EXPIRES_IN = 3600.0
FAILURE_BACKOFF_FIRST = 1.0
FAILURE_BACKOFF_MAX = 60.0
TOKEN_BODY_LIMIT = 16 * 1024  # bytes of a token endpoint's answer; a larger one is refused
TOKEN_FILE_LIMIT = 16 * 1024  # bytes of a token file
DEFAULT_TIMEOUT = 10.0  # seconds for one token request, unless the target says otherwise
_OAUTH_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # shown only when it is one of these


class TokenSource(Protocol):
    """Where a target's bearer token comes from.

    ``renew(rejected)`` is called after the API answered 401 to a request carrying
    ``rejected``. It returns the token to use from now on; if another task already renewed
    since ``rejected`` was handed out, that newer token is returned without a new fetch.
    The result may equal ``rejected`` when nothing fresher is available (a static token, a
    token file that did not change): the caller should then treat the 401 as persistent.
    """

    can_renew: bool

    async def token(self) -> str | None: ...

    async def renew(self, rejected: str | None) -> str | None: ...


class NoToken:
    """No ``Authorization`` header at all (a sandbox, or a proxy that adds it)."""

    can_renew = False

    async def token(self) -> str | None:
        return None

    async def renew(self, rejected: str | None) -> str | None:
        return None

    def __repr__(self) -> str:
        return "NoToken()"


class StaticToken:
    """A fixed bearer token; with a ``path``, a 401 makes it re-read the file (rotation)."""

    def __init__(self, secret: Secret | None, path: Path | None = None) -> None:
        self._value: str | None = secret.reveal() if secret is not None else None
        self._path = path
        self.can_renew = path is not None
        self._lock = asyncio.Lock()

    async def _read(self) -> str:
        assert self._path is not None
        path = storable(self._path, 500)
        try:
            data = await asyncio.to_thread(_read_head, self._path, TOKEN_FILE_LIMIT + 1)
        except OSError as exc:
            raise AuthError(
                f"token file {path}: cannot read it: {one_line(exc.strerror or type(exc).__name__, 200)}"
            ) from None
        except ValueError:  # a NUL in the path
            raise AuthError(f"token file {path}: not a usable file name") from None
        if len(data) > TOKEN_FILE_LIMIT:
            raise AuthError(f"token file {path}: larger than {TOKEN_FILE_LIMIT // 1024} KiB")
        value = _utf8(data)  # not decoded inside an except: the error would keep the bytes
        if value is None:
            raise AuthError(f"token file {path}: not UTF-8 text")
        if not value:
            raise AuthError(f"token file {path} is empty")
        if not is_token_text(value):
            raise AuthError(f"token file {path}: the token {TOKEN_RULE}")
        return value

    async def token(self) -> str | None:
        if self._value is None and self._path is not None:
            async with self._lock:
                if self._value is None:
                    self._value = await self._read()
        return self._value

    async def renew(self, rejected: str | None) -> str | None:
        if self._path is None:
            return self._value
        async with self._lock:
            if self._value is not None and self._value != rejected:
                return self._value
            value = await self._read()
            if value != self._value:
                log.debug("token re-read from %s", self._path)
            self._value = value
            return value

    def __repr__(self) -> str:
        return f"StaticToken(path={str(self._path) if self._path else None!r})"


class OAuthToken:
    """OAuth2 client credentials (``grant_type=client_credentials``), renewed ahead of expiry.

    Renewal: a token living ``L`` seconds is renewed ``min(margin, L / 5)`` seconds before
    it expires, i.e. at ``L - margin`` for long-lived tokens (3599 s → after 3299 s) and at
    80% of its life for short ones (3 s → after 2.4 s). The lifetime counts from when the
    request was sent.

    Single flight: one :class:`asyncio.Lock` guards every fetch, and callers re-check after
    taking it, so any number of concurrent callers cause one POST.

    Failures (transport error, no complete answer within ``timeout`` seconds, an answer larger
    than :data:`TOKEN_BODY_LIMIT`, non-200, unusable JSON, no usable ``access_token``) raise
    :class:`~relay.errors.AuthError` naming the token URL and HTTP status. After a failure
    the endpoint is left alone for 1 s, doubling per consecutive failure up to 60 s; within
    that time a call that needs a fetch fails at once. When a proactive renewal fails while
    the current token is still within its lifetime, that token keeps being used (a WARNING
    is logged) until it expires or the API rejects it.
    """

    can_renew = True

    def __init__(
        self,
        settings: OAuthSettings,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
        margin: float = 300.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if margin < 0:
            raise ValueError(f"margin must not be negative, got {margin!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self._settings = settings
        self._timeout = float(timeout)
        self._http = http
        self._clock = clock
        self._margin = float(margin)
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self._expires_at = 0.0
        self._failures = 0
        self._blocked_until = 0.0
        self._last_error = ""

    @property
    def token_url(self) -> str:
        return self._settings.token_url

    def renew_lead(self, lifetime: float) -> float:
        """Seconds before expiry at which a token living ``lifetime`` seconds is renewed."""
        return min(self._margin, lifetime / 5.0)

    def _fresh(self, now: float) -> bool:
        return self._token is not None and now < self._renew_at

    async def token(self) -> str | None:
        if self._fresh(self._clock()):
            return self._token
        async with self._lock:
            now = self._clock()
            if self._fresh(now):
                return self._token
            usable = self._token is not None and now < self._expires_at
            if usable and now < self._blocked_until:
                return self._token  # renewal failed recently; the current token still lives
            try:
                return await self._fetch(now)
            except AuthError as exc:
                if usable:
                    log.warning("%s; using the current token until it expires", exc)
                    return self._token
                raise

    async def renew(self, rejected: str | None) -> str | None:
        async with self._lock:
            if self._token is not None and self._token != rejected:
                return self._token
            self._token = None  # the API refused it: never hand it out again
            return await self._fetch(self._clock())

    async def _fetch(self, now: float) -> str:
        """POST to the token endpoint (the caller holds the lock)."""
        url = self._settings.token_url
        if now < self._blocked_until:
            raise AuthError(
                f"token endpoint {url} failed {self._failures} time(s) in a row ({self._last_error}); "
                f"next try in {self._blocked_until - now:.1f}s"
            )
        try:
            token, lifetime = await self._request(url)
        except AuthError as exc:
            self._failures += 1
            backoff = min(FAILURE_BACKOFF_MAX, FAILURE_BACKOFF_FIRST * 2.0 ** min(self._failures - 1, 16))
            self._blocked_until = self._clock() + backoff
            self._last_error = str(exc).removeprefix(f"token endpoint {url}: ")
            raise
        self._failures = 0
        self._blocked_until = 0.0
        self._last_error = ""
        self._token = token
        self._expires_at = now + lifetime
        self._renew_at = self._expires_at - self.renew_lead(lifetime)
        log.debug("token renewed, expires in %ds", round(lifetime))
        return token

    async def _request(self, url: str) -> tuple[str, float]:
        secret = self._settings.client_secret.reveal()
        form = {
            "grant_type": "client_credentials",
            "client_id": self._settings.client_id,
            "client_secret": secret,
        }
        request = self._http.build_request("POST", url, data=form, headers={"Accept": "application/json"})
        reply = await exchange(self._http, request, within=self._timeout, keep=TOKEN_BODY_LIMIT)
        if reply.timed_out:
            raise AuthError(f"token endpoint {url}: DeadlineExceeded (no answer within {self._timeout:g}s)")
        if reply.error is not None:
            detail = str(reply.error).replace(secret, "***") if secret else str(reply.error)
            detail = f": {one_line(detail, 200)}" if detail.strip() else ""
            name = one_line(type(reply.error).__name__, 64)
            raise AuthError(f"token endpoint {url}: {name}{detail}")
        status = reply.status
        if reply.over_limit:
            raise AuthError(
                f"token endpoint {url}: HTTP {status} but the answer is larger than "
                f"{TOKEN_BODY_LIMIT // 1024} KiB (or in an unsupported encoding)"
            )
        body: Any
        try:
            body = json.loads(reply.body)
        except (ValueError, RecursionError):
            body = None
        if status != 200:
            code = body.get("error") if isinstance(body, dict) else None
            sane = isinstance(code, str) and _OAUTH_ERROR_CODE.fullmatch(code)
            hint = f" ({one_line(code, 64)})" if sane else ""
            raise AuthError(f"token endpoint {url}: HTTP {status}{hint}")
        if not isinstance(body, dict):
            raise AuthError(f"token endpoint {url}: HTTP {status} but the body is not a JSON object")
        token = body.get("access_token")
        if not isinstance(token, str) or not token.strip():
            raise AuthError(f"token endpoint {url}: HTTP {status} but no access_token in the answer")
        if not is_token_text(token.strip()):
            raise AuthError(f"token endpoint {url}: HTTP {status} but the access_token {TOKEN_RULE}")
        return token.strip(), _lifetime(body.get("expires_in"))

    def __repr__(self) -> str:
        return f"OAuthToken(token_url={self._settings.token_url!r}, client_id={self._settings.client_id!r})"


def _lifetime(value: object) -> float:
    """``expires_in`` read leniently: a positive number or numeric string, else one hour."""
    if isinstance(value, bool):
        return DEFAULT_EXPIRES_IN
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            return DEFAULT_EXPIRES_IN
    else:
        return DEFAULT_EXPIRES_IN
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_EXPIRES_IN


def _utf8(data: bytes) -> str | None:
    """The stripped text of ``data``, or None when it is not UTF-8."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _read_head(path: Path, size: int) -> bytes:
    """At most ``size`` bytes of a file: a token file that is /dev/zero must not fill memory."""
    with path.open("rb") as fh:
        return fh.read(size)


def token_source(target: TargetSettings, http: httpx.AsyncClient) -> TokenSource:
    """The token source a target's settings call for; ``http`` should not trust the environment
    (``trust_env=False``) and carry the target's proxy, as :class:`relay.connect.client.ApiClient`'s does."""
    if target.oauth is not None:
        return OAuthToken(target.oauth, http, timeout=target.request_timeout)
    if target.token is not None or target.token_file is not None:
        return StaticToken(target.token, target.token_file)
    return NoToken()
