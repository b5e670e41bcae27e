"""Bearer tokens: static and file-backed tokens, OAuth2 client credentials over a mock transport."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from relay.connect.auth import NoToken, OAuthToken, StaticToken, token_source
from relay.errors import AuthError
from relay.settings import OAuthSettings, Secret, TargetSettings
from tests.relaykit import until

TOKEN_URL = "https://auth.example.test/oauth/token"
CLIENT_ID = "connector-42"
CLIENT_SECRET = "s3cr3t-Cl1ent-VALUE-x9"


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class TokenServer:
    """A mock token endpoint: hands out tok-1, tok-2, ... and records every request."""

    def __init__(self, expires_in: object = 3599, status: int = 200) -> None:
        self.requests: list[httpx.Request] = []
        self.expires_in = expires_in
        self.status = status
        self.gate: asyncio.Event | None = None
        self.fail_with: Exception | None = None
        self.body: bytes | None = None

    @property
    def issued(self) -> int:
        return len(self.requests)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if self.body is not None:
            return httpx.Response(self.status, content=self.body)
        payload: dict[str, object] = {
            "token_type": "Bearer",
            "access_token": f"tok-{self.issued}",
            "scope": "connect-channel-platform:order-action:upsert",
            "something_new": {"nested": True},
        }
        if self.expires_in is not None:
            payload["expires_in"] = self.expires_in
        return httpx.Response(self.status, json=payload)


def oauth_settings() -> OAuthSettings:
    return OAuthSettings(CLIENT_ID, Secret(CLIENT_SECRET), TOKEN_URL)


def make_source(
    server: TokenServer, clock: FakeClock | None = None, margin: float = 300.0
) -> tuple[OAuthToken, httpx.AsyncClient, FakeClock]:
    clock = clock or FakeClock()
    http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    return OAuthToken(oauth_settings(), http, clock=clock, margin=margin), http, clock


# --- no token, static token -----------------------------------------------------------------


async def test_no_token() -> None:
    source = NoToken()
    assert source.can_renew is False
    assert await source.token() is None
    assert await source.renew(None) is None


async def test_static_token_without_a_file_cannot_renew() -> None:
    source = StaticToken(Secret("static-abc"), None)
    assert source.can_renew is False
    assert await source.token() == "static-abc"
    assert await source.renew("static-abc") == "static-abc"
    assert "static-abc" not in repr(source)


async def test_static_token_file_is_reread_on_renew(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    path.write_text("first-token\n")
    source = StaticToken(Secret("first-token"), path)
    assert source.can_renew is True
    assert await source.token() == "first-token"
    path.write_text("  second-token \n")  # rotated
    assert await source.token() == "first-token"  # no re-read until a 401
    assert await source.renew("first-token") == "second-token"
    assert await source.token() == "second-token"
    # Another task still holding the old token gets the new one, without a re-read.
    path.write_text("third-token")
    assert await source.renew("first-token") == "second-token"
    assert await source.renew("second-token") == "third-token"
    assert repr(source) == f"StaticToken(path={str(path)!r})"


async def test_static_token_read_lazily_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("from-file")
    source = StaticToken(None, path)
    assert await source.token() == "from-file"


async def test_static_token_renew_unchanged_file_returns_the_same_token(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("same")
    source = StaticToken(Secret("same"), path)
    assert await source.renew("same") == "same"


@pytest.mark.parametrize("content", [None, "", "   \n"])
async def test_static_token_file_problems_raise_auth_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "tok"
    if content is not None:
        path.write_text(content)
    source = StaticToken(Secret("old-secret-token"), path)
    with pytest.raises(AuthError) as info:
        await source.renew("old-secret-token")
    assert str(path) in str(info.value)
    assert "old-secret-token" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"rotated secret\n", "must be printable ASCII"),
        (b"rotated\r\nX-Injected: 1", "must be printable ASCII"),
        ("rotated-s\u00e9cret".encode(), "must be printable ASCII"),
        (b"rotated\x00secret", "must be printable ASCII"),
        (b"rotated-\xff\xfe", "not UTF-8 text"),
        (b"rotated" * 4096, "larger than 16 KiB"),
    ],
    ids=["space", "crlf", "non-ascii", "nul", "not utf-8", "huge"],
)
async def test_a_reread_token_file_must_hold_a_sane_token(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "tok"
    path.write_bytes(content)
    source = StaticToken(Secret("old-token"), path)
    with pytest.raises(AuthError, match=fragment) as info:
        await source.renew("old-token")
    text = str(info.value)
    assert text.startswith(f"token file {path}") and "\n" not in text
    assert "rotated" not in text and "Injected" not in text
    rendered = "".join(traceback.format_exception(info.value)) + repr(info.value.__context__)
    assert "rotated" not in rendered and "Injected" not in rendered


async def test_a_token_file_that_is_a_directory_is_an_auth_error(tmp_path: Path) -> None:
    source = StaticToken(None, tmp_path)
    with pytest.raises(AuthError, match="cannot read it"):
        await source.token()


async def test_static_token_concurrent_renews_agree(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("new")
    source = StaticToken(Secret("old"), path)
    results = await asyncio.gather(*(source.renew("old") for _ in range(50)))
    assert set(results) == {"new"}


# --- OAuth: request shape, parsing ------------------------------------------------------------


async def test_request_shape() -> None:
    server = TokenServer()
    source, http, _ = make_source(server)
    async with http:
        assert await source.token() == "tok-1"
    assert server.issued == 1
    request = server.requests[0]
    assert request.method == "POST"
    assert str(request.url) == TOKEN_URL
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "authorization" not in request.headers
    assert parse_qs(request.content.decode()) == {
        "grant_type": ["client_credentials"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }
    assert source.can_renew is True


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        (3599, 3599.0),
        ("120", 120.0),
        (7.5, 7.5),
        (None, 3600.0),  # missing
        ("soon", 3600.0),
        (0, 3600.0),
        (-5, 3600.0),
        (True, 3600.0),
        ([1], 3600.0),
    ],
)
async def test_expires_in_is_read_leniently(expires_in: object, lifetime: float) -> None:
    server = TokenServer(expires_in=expires_in)
    source, http, clock = make_source(server, margin=300.0)
    lead = min(300.0, lifetime / 5)
    async with http:
        await source.token()
        clock.advance(lifetime - lead - 0.01)
        assert await source.token() == "tok-1"
        clock.advance(0.02)
        assert await source.token() == "tok-2"
    assert server.issued == 2


# --- OAuth: renewal timing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "margin", "renew_after"),
    [
        (3599, 300.0, 3299.0),  # the usual Mirakl token: 5 minutes ahead
        (3600, 60.0, 3540.0),
        (1500, 300.0, 1200.0),  # where the two rules meet
        (600, 300.0, 480.0),  # short: at 80% of its life
        (1000, 300.0, 800.0),  # lead is min(margin, lifetime / 5)
        (3, 300.0, 2.4),
        (10, 0.0, 10.0),
    ],
)
async def test_renewal_timing(expires_in: int, margin: float, renew_after: float) -> None:
    server = TokenServer(expires_in=expires_in)
    source, http, clock = make_source(server, margin=margin)
    start = clock.now
    async with http:
        assert await source.token() == "tok-1"
        clock.now = start + renew_after - 0.001
        assert await source.token() == "tok-1"
        assert server.issued == 1
        clock.now = start + renew_after
        assert await source.token() == "tok-2"
        assert server.issued == 2
        # The new token's life counts from its own fetch.
        clock.now = start + 2 * renew_after - 0.001
        assert await source.token() == "tok-2"
    assert server.issued == 2


# --- OAuth: single flight --------------------------------------------------------------------


async def test_a_thousand_concurrent_callers_cause_one_post() -> None:
    server = TokenServer()
    server.gate = asyncio.Event()
    source, http, _ = make_source(server)
    async with http:
        tasks = [asyncio.create_task(source.token()) for _ in range(1000)]
        # The first caller is waiting on the endpoint; the others have all run meanwhile.
        await until(lambda: server.issued >= 1, 10, "the first token request", interval=0)
        await asyncio.sleep(0)
        assert server.issued == 1
        server.gate.set()
        results = await asyncio.gather(*tasks)
    assert set(results) == {"tok-1"}
    assert server.issued == 1


async def test_renew_is_single_flight() -> None:
    server = TokenServer()
    source, http, _ = make_source(server)
    async with http:
        first = await source.token()
        assert first == "tok-1"
        server.gate = asyncio.Event()
        tasks = [asyncio.create_task(source.renew(first)) for _ in range(200)]
        # The renewal is held at the endpoint while the other callers wait behind it.
        await until(lambda: server.issued >= 2, 10, "the renewal's token request", interval=0)
        await asyncio.sleep(0)
        assert server.issued == 2
        server.gate.set()
        results = await asyncio.gather(*tasks)
        assert set(results) == {"tok-2"}
        assert server.issued == 2
        # A late 401 for the old token does not fetch again.
        assert await source.renew("tok-1") == "tok-2"
        assert server.issued == 2
        # A 401 for the current token does.
        assert await source.renew("tok-2") == "tok-3"
        assert await source.token() == "tok-3"
    assert server.issued == 3


async def test_renew_before_any_token_fetches_one() -> None:
    server = TokenServer()
    source, http, _ = make_source(server)
    async with http:
        assert await source.renew(None) == "tok-1"
        assert await source.renew(None) == "tok-1"  # someone (we) already renewed
    assert server.issued == 1


# --- OAuth: failures and backoff -------------------------------------------------------------


async def test_failure_backoff_doubles_to_a_minute() -> None:
    server = TokenServer(status=500)
    source, http, clock = make_source(server)
    expected_backoffs = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    async with http:
        for n, backoff in enumerate(expected_backoffs, start=1):
            with pytest.raises(AuthError, match="HTTP 500"):
                await source.token()
            assert server.issued == n
            clock.advance(backoff - 0.01)
            for _ in range(3):  # within the backoff: fail at once, no request
                with pytest.raises(AuthError, match="next try in"):
                    await source.token()
                with pytest.raises(AuthError):
                    await source.renew(None)
            assert server.issued == n
            clock.advance(0.01)
        server.status = 200
        assert await source.token() == f"tok-{len(expected_backoffs) + 1}"
        # Success resets the backoff: the next failure waits 1 s again.
        server.status = 503
        with pytest.raises(AuthError, match="HTTP 503"):
            await source.renew(f"tok-{len(expected_backoffs) + 1}")
        clock.advance(1.0)
        server.status = 200
        assert await source.token() == f"tok-{len(expected_backoffs) + 3}"


async def test_concurrent_callers_after_a_failure_do_not_hammer() -> None:
    server = TokenServer(status=502)
    server.gate = asyncio.Event()
    source, http, _ = make_source(server)
    async with http:
        tasks = [asyncio.create_task(source.token()) for _ in range(100)]
        # The failing request is held at the endpoint while the other callers wait behind it.
        await until(lambda: server.issued >= 1, 10, "the first token request", interval=0)
        await asyncio.sleep(0)
        assert server.issued == 1
        server.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert server.issued == 1


async def test_failed_proactive_renewal_keeps_the_live_token(caplog: pytest.LogCaptureFixture) -> None:
    server = TokenServer(expires_in=3600)
    source, http, clock = make_source(server, margin=300.0)
    caplog.set_level(logging.DEBUG, logger="relay.auth")
    async with http:
        assert await source.token() == "tok-1"
        clock.advance(3400.0)  # due for renewal, still valid for 200 s
        server.status = 500
        assert await source.token() == "tok-1"
        assert server.issued == 2
        assert any(r.levelno == logging.WARNING for r in caplog.records)
        clock.advance(0.5)
        assert await source.token() == "tok-1"  # within the backoff: no request, no new warning
        assert server.issued == 2
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        clock.advance(200.0)  # now expired, endpoint still failing
        with pytest.raises(AuthError, match="HTTP 500"):
            await source.token()
        assert server.issued == 3


async def test_renew_after_401_never_returns_the_rejected_token() -> None:
    server = TokenServer()
    source, http, clock = make_source(server)
    async with http:
        assert await source.token() == "tok-1"
        server.status = 500
        with pytest.raises(AuthError):
            await source.renew("tok-1")
        with pytest.raises(AuthError):
            await source.token()  # the rejected token is not handed out again
        clock.advance(1.0)
        server.status = 200
        assert await source.token() == "tok-3"


def _failure_cases() -> list[tuple[str, int, bytes | None, Exception | None, str]]:
    echo = json.dumps({"error": "invalid_client", "client_secret": CLIENT_SECRET}).encode()
    leaky = json.dumps({"access_token": "", "hint": CLIENT_SECRET}).encode()
    return [
        ("401 echoing the secret", 401, echo, None, "HTTP 401 (invalid_client)"),
        ("500 html", 500, b"<html>" + CLIENT_SECRET.encode() + b"</html>", None, "HTTP 500"),
        ("200 not json", 200, b"access_token=tok-leak&" + CLIENT_SECRET.encode(), None, "not a JSON object"),
        ("200 json list", 200, b'["tok-leak"]', None, "not a JSON object"),
        ("200 empty token", 200, leaky, None, "no access_token"),
        ("200 token not a string", 200, b'{"access_token": 12345}', None, "no access_token"),
        ("transport", 200, None, httpx.ConnectError(f"refused {CLIENT_SECRET}"), "ConnectError"),
        ("timeout", 200, None, httpx.ReadTimeout("timed out"), "ReadTimeout"),
    ]


@pytest.mark.parametrize(
    ("status", "body", "error", "fragment"),
    [case[1:] for case in _failure_cases()],
    ids=[case[0] for case in _failure_cases()],
)
async def test_failure_messages_name_the_url_and_status_but_no_secret(
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes | None,
    error: Exception | None,
    fragment: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = TokenServer(status=status)
    server.body = body
    server.fail_with = error
    source, http, _ = make_source(server)
    async with http:
        with pytest.raises(AuthError) as first:
            await source.token()
        with pytest.raises(AuthError) as second:  # the backoff message
            await source.token()
    for exc in (first.value, second.value):
        text = str(exc) + repr(exc)
        rendered = "".join(traceback.format_exception(exc))  # with any chained exceptions
        assert CLIENT_SECRET not in rendered and "tok-leak" not in rendered
        assert TOKEN_URL in text
        assert fragment in text
        assert CLIENT_SECRET not in text
        assert "tok-leak" not in text
    assert CLIENT_SECRET not in caplog.text


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        (b'{"error": "invalid_client"}', " (invalid_client)"),
        (b'{"error": "invalid\\u0000client"}', ""),  # a NUL once parsed: not shown
        (b'{"error": "\\ud800"}', ""),
        (b'{"error": "x\\r\\nLeak: 1"}', ""),
        (b'{"error": "' + b"e" * 200 + b'"}', ""),
    ],
)
async def test_oauth_error_codes_are_shown_only_when_sane(body: bytes, hint: str) -> None:
    server = TokenServer(status=401)
    server.body = body
    source, http, _ = make_source(server)
    async with http:
        with pytest.raises(AuthError) as info:
            await source.token()
    assert str(info.value) == f"token endpoint {TOKEN_URL}: HTTP 401{hint}"


async def test_the_token_request_has_a_deadline() -> None:
    server = TokenServer()
    server.gate = asyncio.Event()  # never set: the endpoint never answers
    http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    source = OAuthToken(oauth_settings(), http, timeout=0.2)
    async with http:
        with pytest.raises(AuthError, match="DeadlineExceeded"):
            await source.token()
    with pytest.raises(ValueError, match="timeout must be positive"):
        OAuthToken(oauth_settings(), http, timeout=0)


async def test_secret_and_tokens_never_logged_or_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = TokenServer(expires_in=3)
    source, http, clock = make_source(server)
    async with http:
        tokens = [await source.token()]
        clock.advance(2.5)
        tokens.append(await source.token())
        tokens.append(await source.renew(tokens[-1]))
        server.status = 500
        clock.advance(10.0)
        with pytest.raises(AuthError) as info:
            await source.token()
    assert tokens == ["tok-1", "tok-2", "tok-3"]
    assert "token renewed, expires in 3s" in caplog.text
    renewals = [r for r in caplog.records if r.name == "relay.auth" and "renewed" in r.getMessage()]
    assert len(renewals) == 3 and all(r.levelno == logging.DEBUG for r in renewals)
    shown = caplog.text + str(info.value) + repr(info.value) + repr(source)
    for record in caplog.records:
        shown += repr(record.args) + repr(record.__dict__)
    assert CLIENT_SECRET not in shown
    for token in tokens:
        assert token is not None and token not in shown
    assert CLIENT_ID in repr(source) and TOKEN_URL in repr(source)


# --- choosing a source -----------------------------------------------------------------------


async def test_token_source_follows_the_target_settings(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("file-token")
    async with httpx.AsyncClient(transport=httpx.MockTransport(TokenServer())) as http:
        assert isinstance(token_source(TargetSettings("a"), http), NoToken)
        static = token_source(TargetSettings("b", token=Secret("t")), http)
        assert isinstance(static, StaticToken) and static.can_renew is False
        filed = token_source(TargetSettings("c", token=Secret("file-token"), token_file=path), http)
        assert isinstance(filed, StaticToken) and filed.can_renew is True
        oauth = token_source(TargetSettings("d", oauth=oauth_settings()), http)
        assert isinstance(oauth, OAuthToken)
        assert await oauth.token() == "tok-1"
