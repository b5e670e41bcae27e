"""The HTTP edge against a hostile server on loopback (:mod:`tests.hostile_api`), no mocks.

Every hostile answer comes back promptly as a normal :class:`~relay.core.classify.Answer`: a bounded
body, strings that are storable, classified by its status; memory stays flat whatever the body
(4 MB, a gzip bomb, 100,000-deep JSON); one deadline bounds a request however slowly the server
drips; proxy variables are ignored and the ``proxy`` setting is used; the token endpoint gets
the same treatment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.connect.client import BODY_KEEP, DEADLINE_EXCEEDED, RETRY_AFTER_LIMIT, ApiClient, truncate_body
from relay.core.classify import Answer, Verdict, classify
from relay.errors import AuthError
from relay.settings import OAuthSettings, RetrySettings, Secret, TargetSettings, load_settings
from tests.hostile_api import (
    Behaviour,
    HostileApi,
    deep_json,
    drip,
    gzip_bomb,
    html_502,
    huge_body,
    invalid_utf8,
    lone_surrogate,
    long_retry_after,
    nul_escapes,
    raw_nul_html,
)

TIMEOUT = 1.0  # request_timeout of the targets in this module
MARGIN = 1.0  # what a deadline may overrun on a busy two-core machine
MB = 1024 * 1024
BODY = b'{"status":"SUCCESS"}'


def _json(status: int, text: bytes, **headers: str) -> Behaviour:
    return Behaviour(status, text, (("Content-Type", "application/json"), *headers.items()))


SMALL_ERROR = b'{"code":"INVALID_INPUT","message":"deflated but fine","errors":[]}'
HOSTILE: dict[str, Behaviour] = {
    "nul-": nul_escapes(),
    "rawnul-": raw_nul_html(),
    "surrogate-": lone_surrogate(),
    "badutf8-": invalid_utf8(),
    "huge-": huge_body(),
    "bomb-": gzip_bomb(),
    "deep-": deep_json(),
    "html502-": html_502(),
    "retryafter-": long_retry_after(),
    "deflate-": replace(_json(400, zlib.compress(SMALL_ERROR)), headers=(("Content-Encoding", "deflate"),)),
    "rawdeflate-": replace(
        _json(400, zlib.compressobj(wbits=-15).compress(SMALL_ERROR) + b"\x03\x00"),
        headers=(("Content-Encoding", "deflate"),),
    ),
    "brotli-": replace(
        _json(400, b"\x1b\x2a\x00\xf8not really brotli"), headers=(("Content-Encoding", "br"),)
    ),
    "drip-": drip(every=0.2),
    "driphead-": drip(every=0.2, head=True),
}


@pytest.fixture(scope="module")
def api() -> Iterator[HostileApi]:
    with HostileApi(HOSTILE) as server:
        yield server


@contextlib.asynccontextmanager
async def api_client(target: TargetSettings) -> AsyncIterator[ApiClient]:
    client = ApiClient(target)
    try:
        yield client
    finally:
        await client.aclose()


def hostile_target(url: str, **settings: Any) -> TargetSettings:
    return TargetSettings("hostile", base_url=url, **{"request_timeout": TIMEOUT, **settings})


def assert_storable(text: str | None, limit: int | None = None) -> None:
    if text is None:
        return
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogate
    if limit is not None:
        assert len(text) <= limit


def decide(answer: Answer) -> Any:
    now = datetime.now(UTC)
    return classify(
        answer,
        attempts=0,
        earlier_unknown=False,
        created_at=now,
        now=now,
        policy=RetrySettings(),
        rand=lambda: 0.5,
        can_reauth=False,
    )


# -- every hostile answer: prompt, bounded, storable, classified by its status ------------------


@pytest.mark.parametrize(
    ("prefix", "status", "verdict"),
    [
        ("nul-", 400, Verdict.DEAD),
        ("rawnul-", 500, Verdict.RETRY),
        ("surrogate-", 400, Verdict.DEAD),
        ("badutf8-", 400, Verdict.DEAD),
        ("huge-", 500, Verdict.RETRY),
        ("bomb-", 503, Verdict.RETRY),
        ("deep-", 400, Verdict.DEAD),
        ("html502-", 502, Verdict.RETRY),
        ("retryafter-", 429, Verdict.RETRY),
        ("deflate-", 400, Verdict.DEAD),
        ("rawdeflate-", 400, Verdict.DEAD),
        ("brotli-", 400, Verdict.DEAD),
        ("ok-", 204, Verdict.DELIVERED),
    ],
)
async def test_a_hostile_answer_is_bounded_storable_and_classified_by_status(
    api: HostileApi, prefix: str, status: int, verdict: Verdict
) -> None:
    action_id = f"{prefix}1"
    async with api_client(hostile_target(api.url)) as client:
        started = time.monotonic()
        sent = await client.put(action_id, BODY, "tok")
        took = time.monotonic() - started
    answer = sent.answer
    assert answer.status == status
    assert took < TIMEOUT + MARGIN
    assert len(answer.body) <= BODY_KEEP
    assert_storable(answer.retry_after, RETRY_AFTER_LIMIT)
    assert_storable(answer.transport_error)
    stored = truncate_body(answer.body)
    assert_storable(stored)
    assert stored is None or len(stored.encode()) <= 4096
    decision = decide(answer)
    assert decision.verdict == verdict
    for text in (decision.error_code, decision.error_message, decision.reason):
        assert_storable(text)
    assert api.requests[action_id] == 1
    assert api.seen[-1].headers["accept-encoding"] == "identity"


async def test_what_is_kept_of_each_body(api: HostileApi) -> None:
    async with api_client(hostile_target(api.url)) as client:
        kept = {p: (await client.put(f"{p}2", BODY, None)).answer for p in ("huge-", "bomb-", "deflate-")}
        kept["brotli-"] = (await client.put("brotli-2", BODY, None)).answer
        kept["retryafter-"] = (await client.put("retryafter-2", BODY, None)).answer
        after = (await client.put("ok-2", BODY, None)).answer  # the same client, a fresh connection
    assert kept["huge-"].body == huge_body().body[:BODY_KEEP]
    assert kept["bomb-"].body == bytes(BODY_KEEP)  # inflated, but only this far
    assert kept["deflate-"].body == SMALL_ERROR
    assert decide(kept["deflate-"]).error_code == "INVALID_INPUT"
    assert kept["brotli-"].body == b""  # an encoding we do not decode: no body
    assert kept["retryafter-"].retry_after is not None
    assert kept["retryafter-"].retry_after.startswith("120 ")
    assert after.status == 204


# -- memory --------------------------------------------------------------------------------------


def _kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


@dataclass
class PeakRss:
    """How far this process's resident memory rose above where it was, at its peak, in bytes.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs``); where that is not
    allowed, a thread samples VmRSS every millisecond instead.
    """

    growth: int = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            sampler = None
        except OSError:
            sampler = _Sampler()
        before = _kb("VmRSS")
        try:
            yield
        finally:
            peak = _kb("VmHWM") if sampler is None else sampler.stop()
            self.growth = max(0, peak - before) * 1024


class _Sampler:
    def __init__(self) -> None:
        self.peak = _kb("VmRSS")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _kb("VmRSS"))

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _kb("VmRSS"))


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")


@needs_proc
async def test_the_meter_sees_what_a_plain_client_would_do(api: HostileApi) -> None:
    """Not vacuous: httpx on its own inflates the bomb, and the meter shows it."""
    meter = PeakRss()
    async with httpx.AsyncClient(trust_env=False) as plain:
        with meter.measure():
            response = await plain.put(f"{api.url}/v1/orders/actions/bomb-plain", content=BODY)
            size = len(response.content)
            del response
    assert size == 200 * MB
    assert meter.growth > 150 * MB, meter.growth


@needs_proc
@pytest.mark.parametrize("prefix", ["huge-", "bomb-", "deep-"])
async def test_memory_stays_flat(api: HostileApi, prefix: str) -> None:
    meter = PeakRss()
    async with api_client(hostile_target(api.url)) as client:
        await client.put("ok-warm-up", BODY, None)  # TLS context, imports, first connection
        with meter.measure():
            for n in range(3):
                sent = await client.put(f"{prefix}mem-{n}", BODY, None)
                assert sent.answer.status is not None
                assert len(sent.answer.body) <= BODY_KEEP
    assert meter.growth < 50 * MB, meter.growth


# -- one deadline per request ----------------------------------------------------------------------


async def test_a_dripping_body_ends_at_the_deadline_with_the_status_and_what_came(api: HostileApi) -> None:
    async with api_client(hostile_target(api.url)) as client:
        started = time.monotonic()
        answer = (await client.put("drip-1", BODY, None)).answer
        took = time.monotonic() - started
    assert TIMEOUT * 0.9 <= took < TIMEOUT + MARGIN
    assert answer.status == 200  # the API did answer
    assert answer.transport_error is None
    assert 0 < len(answer.body) < 20 and set(answer.body) == {ord("y")}


async def test_dripping_headers_are_a_deadline_transport_error(api: HostileApi) -> None:
    async with api_client(hostile_target(api.url)) as client:
        started = time.monotonic()
        answer = (await client.put("driphead-1", BODY, None)).answer
        took = time.monotonic() - started
    assert TIMEOUT * 0.9 <= took < TIMEOUT + MARGIN
    assert answer == Answer(status=None, transport_error=DEADLINE_EXCEEDED, maybe_sent=True)
    assert decide(answer).outcome_unknown is True


async def test_a_connection_never_established_is_not_sent(api: HostileApi) -> None:
    """TLS to a server that never says a word: the deadline ends the handshake."""
    async with api_client(hostile_target(f"https://127.0.0.1:{api.port}")) as client:
        started = time.monotonic()
        answer = (await client.put("tls-1", BODY, None)).answer
        took = time.monotonic() - started
    assert took < TIMEOUT + MARGIN
    assert answer == Answer(status=None, transport_error=DEADLINE_EXCEEDED, maybe_sent=False)


async def test_the_callers_cancellation_propagates(api: HostileApi) -> None:
    async with api_client(hostile_target(api.url, request_timeout=30.0)) as client:
        task = asyncio.create_task(client.put("drip-cancel", BODY, None))
        assert await api.until(lambda: api.requests["drip-cancel"] == 1, 10)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < MARGIN


async def test_a_timeout_of_the_caller_is_not_turned_into_an_answer(api: HostileApi) -> None:
    async with api_client(hostile_target(api.url, request_timeout=30.0)) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await client.put("drip-outer", BODY, None)
        assert time.monotonic() - started < 0.5 + MARGIN


# -- proxies ---------------------------------------------------------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


async def test_proxy_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    with HostileApi() as target, HostileApi() as proxy:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy", "REQUEST_METHOD"):
            monkeypatch.delenv(name, raising=False)
        # The control: httpx left to itself does go through the proxy.
        async with httpx.AsyncClient() as plain:
            control = await plain.put(f"{target.url}/v1/orders/actions/control-1", content=BODY)
        assert control.status_code == 204
        assert proxy.requests["control-1"] == 1 and target.requests["control-1"] == 0

        oauth = OAuthSettings("client-1", Secret("secret-1"), target.token_url)
        async with api_client(hostile_target(target.url, oauth=oauth)) as client:
            token = await client.tokens.token()
            sent = await client.put("env-1", BODY, token)
        assert token == "hostile-token-1" and sent.answer.status == 204
        assert target.token_requests == 1 and target.requests["env-1"] == 1
        assert proxy.token_requests == 0 and proxy.request_total == 1  # the control only


async def test_the_proxy_setting_is_used_for_puts_and_tokens(tmp_path: Path) -> None:
    with HostileApi() as proxy:
        nowhere = "http://127.0.0.1:9"  # nothing listens: only the proxy can answer
        config = tmp_path / "relay.toml"
        config.write_text(
            f'proxy = "http://relay:pr0xy-pw@127.0.0.1:{proxy.port}"\n'
            f'[targets.default]\nbase_url = "{nowhere}/api"\n'
            f'oauth_client_id = "client-1"\noauth_client_secret = "secret-1"\n'
            f'oauth_token_url = "{nowhere}/oauth/token"\n'
        )
        target = load_settings(str(config), {}).targets["default"]
        assert "pr0xy-pw" not in repr(target)
        async with api_client(replace(target, request_timeout=TIMEOUT)) as client:
            token = await client.tokens.token()
            sent = await client.put("via-1", BODY, token)
        assert sent.answer.status == 204 and proxy.requests["via-1"] == 1 and proxy.token_requests == 1
        token_request, put_request = list(proxy.seen)
        assert token_request.target == f"{nowhere}/oauth/token"
        assert put_request.target == f"{nowhere}/api/v1/orders/actions/via-1"
        credentials = base64.b64encode(b"relay:pr0xy-pw").decode()
        assert put_request.headers["proxy-authorization"] == f"Basic {credentials}"


# -- the token endpoint: the same deadline, a cap, printable tokens ---------------------------------


def _oauth_target(api: HostileApi) -> TargetSettings:
    return hostile_target(api.url, oauth=OAuthSettings("client-1", Secret("s3cret-value"), api.token_url))


async def _token_failure(token: Behaviour) -> tuple[AuthError, float]:
    with HostileApi(token=token) as api:
        async with api_client(_oauth_target(api)) as client:
            started = time.monotonic()
            with pytest.raises(AuthError) as info:
                await client.tokens.token()
            return info.value, time.monotonic() - started


@pytest.mark.parametrize("head", [False, True], ids=["body", "headers"])
async def test_a_dripping_token_endpoint_fails_at_the_deadline(head: bool) -> None:
    error, took = await _token_failure(drip(every=0.2, head=head))
    assert TIMEOUT * 0.9 <= took < TIMEOUT + MARGIN
    assert "DeadlineExceeded" in str(error) and "/oauth/token" in str(error)


@needs_proc
@pytest.mark.parametrize(
    "answer",
    [
        _json(200, b'{"access_token":"tok","padding":"' + b"x" * 64 * 1024 + b'"}'),
        gzip_bomb(status=200),
        replace(gzip_bomb(status=200), headers=(("Content-Encoding", "br"),)),
    ],
    ids=["64 KiB", "gzip bomb", "brotli"],
)
async def test_a_token_answer_past_the_cap_is_refused(answer: Behaviour) -> None:
    meter = PeakRss()
    with meter.measure():
        error, took = await _token_failure(answer)
    assert "larger than 16 KiB" in str(error)
    assert took < TIMEOUT + MARGIN
    assert meter.growth < 50 * MB, meter.growth


@pytest.mark.parametrize("token", ["leak me", "leak\\r\\nX-Evil: 1", "le\\u00e4k", "leak\\u0000"])
async def test_an_access_token_that_is_not_printable_ascii_is_refused(token: str) -> None:
    error, _ = await _token_failure(_json(200, f'{{"access_token":"{token}","expires_in":60}}'.encode()))
    assert "access_token must be printable ASCII" in str(error)
    assert "leak" not in str(error) and "le\u00e4k" not in str(error)


async def test_outside_text_in_token_errors_is_storable() -> None:
    error, _ = await _token_failure(_json(400, b'{"error":"invalid\\u0000client\\ud800"}'))
    assert_storable(str(error))
    assert str(error).endswith("HTTP 400")


# -- the hostile API itself: what end-to-end tests rely on ------------------------------------------


def test_the_hostile_api_answers_like_the_api_unless_told_otherwise() -> None:
    behaviours = {"lost-": replace(html_502(), apply=True, times=1), "never-": html_502()}
    with HostileApi(behaviours) as api, httpx.Client(base_url=api.url, trust_env=False) as http:

        def put(action_id: str) -> httpx.Response:
            return http.put(f"/api/v1/orders/actions/{action_id}", content=BODY)

        assert put("a-1").status_code == 204
        repeat = put("a-1")
        assert repeat.status_code == 400 and repeat.json()["code"] == "ACTION_ALREADY_FINAL"
        assert put("unknown-1").json()["code"] == "NOT_FOUND"
        # Apply then misbehave, once: the next request finds the action final.
        assert put("lost-1").status_code == 502 and "lost-1" in api.applied
        assert put("lost-1").json()["code"] == "ACTION_ALREADY_FINAL"
        # A behaviour without apply never applies; without times it always misbehaves.
        assert [put("never-1").status_code for _ in range(3)] == [502, 502, 502]
        assert api.requests == {"a-1": 2, "unknown-1": 1, "lost-1": 2, "never-1": 3}
        assert api.applied == {"a-1": {"status": "SUCCESS"}, "lost-1": {"status": "SUCCESS"}}
        assert api.apply_count == 2 and api.duplicates == 2
        assert api.wait_for(lambda: api.request_total == 8, 1)


def test_the_hostile_api_stops_by_itself_mid_drip() -> None:
    with HostileApi({"drip-": drip(every=1.0, size=3600)}) as api:
        done = threading.Event()

        def hang() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.put(f"{api.url}/v1/orders/actions/drip-1", content=BODY, timeout=60, trust_env=False)
            done.set()

        client = threading.Thread(target=hang)
        client.start()
        assert api.wait_for(lambda: api.requests["drip-1"] == 1, 10)
        started = time.monotonic()
    assert time.monotonic() - started < 2  # close() returned without waiting for the hour-long drip
    assert done.wait(10)  # and the client saw its connection end
    client.join()
