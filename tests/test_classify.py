"""Table-driven tests of ``relay.core.classify``: every row of the contract's answer table."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import product
from typing import Any

import pytest

from relay.core.classify import Answer, Decision, ProbeVerdict, Verdict, classify, probe_verdict
from relay.settings import RetrySettings

POLICY = RetrySettings(base_delay=2.0, max_delay=60.0, max_attempts=5, max_age=3600.0)
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
CREATED = NOW - timedelta(minutes=10)
ALMOST_ONE = math.nextafter(1.0, 0.0)


def const(value: float) -> Callable[[], float]:
    return lambda: value


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def decide(
    answer: Answer,
    *,
    attempts: int = 0,
    earlier_unknown: bool = False,
    created_at: datetime = CREATED,
    rand: Callable[[], float] = lambda: 0.0,
    can_reauth: bool = True,
    others_accepted: bool = False,
) -> Decision:
    return classify(
        answer,
        others_accepted=others_accepted,
        attempts=attempts,
        earlier_unknown=earlier_unknown,
        created_at=created_at,
        now=NOW,
        policy=POLICY,
        rand=rand,
        can_reauth=can_reauth,
    )


ALREADY_FINAL = body(code="ACTION_ALREADY_FINAL", message="The action already has a final status")
INVALID_INPUT = body(code="INVALID_INPUT", message="errors[0].code is not supported")
NOT_FOUND = body(code="DATA_NOT_FOUND", message="Action not found")
HTML = b"<html><body><h1>502 Bad Gateway</h1></body></html>"

D, R, X, A, P = Verdict.DELIVERED, Verdict.RETRY, Verdict.DEAD, Verdict.REAUTH, Verdict.PAUSE


# One row per answer: (answer, earlier_unknown, can_reauth) ->
# (verdict, outcome, charged, outcome_unknown, transient, error_code)
ANSWER_TABLE = [
    # 2xx
    pytest.param(Answer(204), False, True, (D, "delivered", True, False, False, None), id="204"),
    pytest.param(Answer(200, b"{}"), False, True, (D, "delivered", True, False, False, None), id="200"),
    pytest.param(Answer(202, HTML), False, True, (D, "delivered", True, False, False, None), id="202 html"),
    pytest.param(Answer(204), True, True, (D, "delivered", True, False, False, None), id="204 after unknown"),
    # 400 ACTION_ALREADY_FINAL / 404 after an earlier unknown outcome
    pytest.param(
        Answer(400, ALREADY_FINAL),
        True,
        True,
        (D, "delivered_earlier", True, False, False, "ACTION_ALREADY_FINAL"),
        id="400 final after unknown",
    ),
    pytest.param(
        Answer(404, NOT_FOUND),
        True,
        True,
        (D, "delivered_earlier", True, False, False, "DATA_NOT_FOUND"),
        id="404 after unknown",
    ),
    pytest.param(
        Answer(404),
        True,
        True,
        (D, "delivered_earlier", True, False, False, "HTTP_404"),
        id="404 empty body after unknown",
    ),
    pytest.param(
        Answer(404, HTML),
        True,
        True,
        (D, "delivered_earlier", True, False, False, "HTTP_404"),
        id="404 html after unknown",
    ),
    # 400 any other case, 404 without earlier unknown, other 4xx
    pytest.param(
        Answer(400, ALREADY_FINAL),
        False,
        True,
        (X, "dead", True, False, False, "ACTION_ALREADY_FINAL"),
        id="400 final without earlier unknown",
    ),
    pytest.param(
        Answer(400, INVALID_INPUT),
        True,
        True,
        (X, "dead", True, False, False, "INVALID_INPUT"),
        id="400 invalid after unknown",
    ),
    pytest.param(
        Answer(400, INVALID_INPUT),
        False,
        True,
        (X, "dead", True, False, False, "INVALID_INPUT"),
        id="400 invalid",
    ),
    pytest.param(Answer(400), True, True, (X, "dead", True, False, False, "HTTP_400"), id="400 empty"),
    pytest.param(
        Answer(404, NOT_FOUND), False, True, (X, "dead", True, False, False, "DATA_NOT_FOUND"), id="404"
    ),
    *[
        pytest.param(
            Answer(status),
            earlier,
            True,
            (X, "dead", True, False, False, f"HTTP_{status}"),
            id=f"{status}{' after unknown' if earlier else ''}",
        )
        for status in (402, 405, 406, 409, 410, 411, 412, 413, 414, 415, 418, 421, 422, 423, 451, 499)
        for earlier in (False, True)
    ],
    # 401 / 403
    pytest.param(Answer(401), False, True, (A, "reauth", False, False, False, "HTTP_401"), id="401 oauth"),
    pytest.param(
        Answer(401, body(code="UNAUTHORIZED")),
        True,
        True,
        (A, "reauth", False, False, False, "UNAUTHORIZED"),
        id="401 oauth after unknown",
    ),
    pytest.param(Answer(401), False, False, (P, "paused", False, False, False, "HTTP_401"), id="401 static"),
    pytest.param(Answer(403), False, True, (P, "paused", False, False, False, "HTTP_403"), id="403 oauth"),
    pytest.param(Answer(403), False, False, (P, "paused", False, False, False, "HTTP_403"), id="403 static"),
    # 408, 425, 429: retry, the API said it did not do it
    *[
        pytest.param(Answer(s), False, True, (R, "retry", True, False, True, f"HTTP_{s}"), id=f"{s}")
        for s in (408, 425, 429)
    ],
    pytest.param(
        Answer(429, body(code="TOO_MANY_REQUESTS")),
        True,
        True,
        (R, "retry", True, False, True, "TOO_MANY_REQUESTS"),
        id="429 with code",
    ),
    # 5xx: retry, the request may have been applied
    *[
        pytest.param(Answer(s), False, True, (R, "retry", True, True, True, f"HTTP_{s}"), id=f"{s}")
        for s in (500, 501, 502, 503, 504, 599)
    ],
    pytest.param(
        Answer(500, body(code="UNEXPECTED", message="boom")),
        False,
        True,
        (R, "retry", True, True, True, "UNEXPECTED"),
        id="500 with code",
    ),
    # no response
    pytest.param(
        Answer(None, transport_error="ReadTimeout"),
        False,
        True,
        (R, "retry", True, True, True, "ReadTimeout"),
        id="read timeout",
    ),
    pytest.param(
        Answer(None, transport_error="WriteTimeout"),
        False,
        True,
        (R, "retry", True, True, True, "WriteTimeout"),
        id="write timeout",
    ),
    pytest.param(
        Answer(None, transport_error="RemoteProtocolError"),
        False,
        True,
        (R, "retry", True, True, True, "RemoteProtocolError"),
        id="connection closed without answer",
    ),
    pytest.param(
        Answer(None, transport_error="ConnectError", maybe_sent=False),
        False,
        True,
        (R, "retry", True, False, True, "ConnectError"),
        id="connect error",
    ),
    pytest.param(
        Answer(None, transport_error="ConnectTimeout", maybe_sent=False),
        False,
        True,
        (R, "retry", True, False, True, "ConnectTimeout"),
        id="connect timeout",
    ),
    pytest.param(
        Answer(None, transport_error="PoolTimeout", maybe_sent=False),
        False,
        True,
        (R, "retry", True, False, True, "PoolTimeout"),
        id="pool timeout",
    ),
    pytest.param(
        Answer(None), False, True, (R, "retry", True, True, True, "NoResponse"), id="nothing at all"
    ),
    # anything else: retry without assuming it landed
    *[
        pytest.param(Answer(s), False, True, (R, "retry", True, False, True, f"HTTP_{s}"), id=f"{s}")
        for s in (0, 100, 199, 300, 301, 302, 304, 307, 308, 600, 999, -1)
    ],
]


@pytest.mark.parametrize(("answer", "earlier_unknown", "can_reauth", "expected"), ANSWER_TABLE)
def test_answer_table(
    answer: Answer, earlier_unknown: bool, can_reauth: bool, expected: tuple[object, ...]
) -> None:
    decision = decide(answer, earlier_unknown=earlier_unknown, can_reauth=can_reauth)
    got = (
        decision.verdict,
        decision.outcome,
        decision.charged,
        decision.outcome_unknown,
        decision.transient,
        decision.error_code,
    )
    assert got == expected
    assert (decision.retry_at is not None) == (decision.verdict is Verdict.RETRY)
    assert decision.reason and "\n" not in decision.reason


# --- reasons and messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "earlier_unknown", "can_reauth", "reason", "message"),
    [
        pytest.param(Answer(204), False, True, "HTTP 204", None, id="delivered"),
        pytest.param(
            Answer(400, INVALID_INPUT),
            False,
            True,
            "HTTP 400 INVALID_INPUT: errors[0].code is not supported",
            "errors[0].code is not supported",
            id="dead with code and message",
        ),
        pytest.param(Answer(410), False, True, "HTTP 410", None, id="dead without body"),
        pytest.param(
            Answer(400, ALREADY_FINAL),
            True,
            True,
            "HTTP 400 ACTION_ALREADY_FINAL: The action already has a final status: "
            "an earlier attempt with an unknown outcome was delivered",
            "The action already has a final status",
            id="delivered earlier",
        ),
        pytest.param(
            Answer(400, ALREADY_FINAL),
            False,
            True,
            "HTTP 400 ACTION_ALREADY_FINAL: The action already has a final status: the API already holds"
            " a final status for this action that this database has no record of delivering"
            " (for instance a delivery recorded on a primary lost in a failover)",
            "The action already has a final status",
            id="already final without a record of delivering",
        ),
        pytest.param(Answer(401), False, True, "HTTP 401: renewing the token", None, id="reauth"),
        pytest.param(
            Answer(401),
            False,
            False,
            "HTTP 401: credentials refused, pausing the target",
            None,
            id="401 pause",
        ),
        pytest.param(
            Answer(403, body(code="FORBIDDEN", message="missing scope")),
            False,
            True,
            "HTTP 403 FORBIDDEN: missing scope: token lacks permission, pausing the target",
            "missing scope",
            id="403 pause",
        ),
        pytest.param(Answer(503), False, True, "HTTP 503, retrying in 1s", None, id="retry"),
        pytest.param(
            Answer(302), False, True, "HTTP 302 (unexpected status), retrying in 1s", None, id="unexpected"
        ),
        pytest.param(
            Answer(None, transport_error="ReadTimeout"),
            False,
            True,
            "ReadTimeout (no response, outcome unknown), retrying in 1s",
            "no response (ReadTimeout); the request may have reached the server",
            id="read timeout",
        ),
        pytest.param(
            Answer(None, transport_error="ConnectError", maybe_sent=False),
            False,
            True,
            "ConnectError (no response), retrying in 1s",
            "no response (ConnectError); the request was not sent",
            id="connect error",
        ),
    ],
)
def test_reason_and_message(
    answer: Answer, earlier_unknown: bool, can_reauth: bool, reason: str, message: str | None
) -> None:
    decision = decide(answer, earlier_unknown=earlier_unknown, can_reauth=can_reauth)
    assert decision.reason == reason
    assert decision.error_message == message


# --- when to retry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "attempts", "rand", "delay", "reason"),
    [
        pytest.param(Answer(503), 0, const(0.0), 1.0, "HTTP 503, retrying in 1s", id="first failure, low"),
        pytest.param(Answer(503), 0, const(ALMOST_ONE), 2.0, "HTTP 503, retrying in 2s", id="first, high"),
        pytest.param(Answer(503), 2, const(0.0), 4.0, "HTTP 503, retrying in 4s", id="third failure"),
        pytest.param(Answer(503), 3, const(0.5), 12.0, "HTTP 503, retrying in 12s", id="fourth, middle"),
        pytest.param(
            Answer(None, transport_error="ReadTimeout"),
            1,
            const(0.0),
            2.0,
            "ReadTimeout (no response, outcome unknown), retrying in 2s",
            id="timeout backs off too",
        ),
        pytest.param(
            Answer(429, retry_after="30"),
            0,
            const(0.0),
            30.0,
            "HTTP 429, retrying in 30s",
            id="Retry-After seconds",
        ),
        pytest.param(
            Answer(429, retry_after="2.5"),
            3,
            const(0.0),
            8.0,
            "HTTP 429, retrying in 8s",
            id="Retry-After below the backoff: the backoff",
        ),
        pytest.param(
            Answer(429, retry_after="3600"),
            0,
            const(0.0),
            60.0,
            "HTTP 429, retrying in 1m",
            id="Retry-After seconds capped at max_delay",
        ),
        pytest.param(
            Answer(503, retry_after="Wed, 01 May 2024 12:00:45 GMT"),
            0,
            const(0.0),
            45.0,
            "HTTP 503, retrying in 45s",
            id="Retry-After future date",
        ),
        pytest.param(
            Answer(503, retry_after="Wed, 01 May 2024 13:00:00 GMT"),
            0,
            const(0.0),
            60.0,
            "HTTP 503, retrying in 1m",
            id="Retry-After far date capped at max_delay",
        ),
        pytest.param(
            Answer(503, retry_after="Wed, 01 May 2024 11:59:00 GMT"),
            0,
            const(0.0),
            1.0,
            "HTTP 503, retrying in 1s",
            id="Retry-After past date: the backoff",
        ),
        pytest.param(
            Answer(503, retry_after="soon"),
            2,
            const(0.0),
            4.0,
            "HTTP 503, retrying in 4s",
            id="garbage Retry-After: backoff",
        ),
        pytest.param(
            Answer(503, retry_after="-10"),
            2,
            const(0.0),
            4.0,
            "HTTP 503, retrying in 4s",
            id="negative Retry-After: backoff",
        ),
        pytest.param(
            Answer(408, retry_after="7"),
            0,
            const(0.0),
            7.0,
            "HTTP 408, retrying in 7s",
            id="408 honours Retry-After",
        ),
        pytest.param(
            Answer(301, retry_after="5"),
            0,
            const(0.0),
            5.0,
            "HTTP 301 (unexpected status), retrying in 5s",
            id="unexpected status honours Retry-After",
        ),
    ],
)
def test_retry_at(
    answer: Answer, attempts: int, rand: Callable[[], float], delay: float, reason: str
) -> None:
    decision = decide(answer, attempts=attempts, rand=rand)
    assert decision.verdict is Verdict.RETRY
    assert decision.retry_at is not None
    assert (decision.retry_at - NOW).total_seconds() == pytest.approx(delay)
    assert decision.reason == reason


# --- giving up ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "attempts", "created_at", "reason", "unknown"),
    [
        pytest.param(
            Answer(503),
            4,
            CREATED,
            "gave up after 5 attempts; last failure: HTTP 503",
            True,
            id="5xx at max_attempts",
        ),
        pytest.param(
            Answer(429, retry_after="1"),
            4,
            CREATED,
            "gave up after 5 attempts; last failure: HTTP 429",
            False,
            id="429 at max_attempts despite Retry-After",
        ),
        pytest.param(
            Answer(None, transport_error="ReadTimeout"),
            7,
            CREATED,
            "gave up after 8 attempts; last failure: ReadTimeout (no response, outcome unknown)",
            True,
            id="timeout beyond max_attempts",
        ),
        pytest.param(
            Answer(None, transport_error="ConnectError", maybe_sent=False),
            4,
            CREATED,
            "gave up after 5 attempts; last failure: ConnectError (no response)",
            False,
            id="connect error at max_attempts",
        ),
        pytest.param(
            Answer(502, body(code="UNAVAILABLE", message="try later")),
            0,
            NOW - timedelta(hours=1),
            "gave up: older than 1h (retry.max_age); last failure: HTTP 502 UNAVAILABLE: try later",
            True,
            id="5xx at max_age",
        ),
        pytest.param(
            Answer(307),
            1,
            NOW - timedelta(days=2),
            "gave up: older than 1h (retry.max_age); last failure: HTTP 307 (unexpected status)",
            False,
            id="unexpected status past max_age",
        ),
    ],
)
def test_gives_up_into_dead(
    answer: Answer, attempts: int, created_at: datetime, reason: str, unknown: bool
) -> None:
    decision = decide(answer, attempts=attempts, created_at=created_at)
    assert decision.verdict is Verdict.DEAD
    assert decision.outcome == "dead"
    assert decision.retry_at is None
    assert decision.charged is True
    assert decision.transient is True
    assert decision.outcome_unknown is unknown
    assert decision.reason == reason


@pytest.mark.parametrize(
    ("answer", "attempts", "created_at", "verdict"),
    [
        pytest.param(Answer(503), 3, CREATED, Verdict.RETRY, id="one attempt left"),
        pytest.param(Answer(503), 0, NOW - timedelta(minutes=59), Verdict.RETRY, id="just under max_age"),
        pytest.param(Answer(204), 40, NOW - timedelta(days=9), Verdict.DELIVERED, id="late success counts"),
        pytest.param(
            Answer(404), 40, NOW - timedelta(days=9), Verdict.DELIVERED, id="late 404 after unknown counts"
        ),
        pytest.param(Answer(401), 40, NOW - timedelta(days=9), Verdict.REAUTH, id="401 never gives up"),
        pytest.param(Answer(403), 40, NOW - timedelta(days=9), Verdict.PAUSE, id="403 never gives up"),
    ],
)
def test_limits_only_end_retries(
    answer: Answer, attempts: int, created_at: datetime, verdict: Verdict
) -> None:
    decision = decide(answer, attempts=attempts, created_at=created_at, earlier_unknown=True)
    assert decision.verdict is verdict


# --- lenient bodies -----------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("status", "raw", "earlier_unknown", "verdict", "code", "message"),
    [
        pytest.param(400, b"", True, Verdict.DEAD, "HTTP_400", None, id="empty"),
        pytest.param(400, b"   \n", True, Verdict.DEAD, "HTTP_400", None, id="whitespace"),
        pytest.param(400, HTML, True, Verdict.DEAD, "HTTP_400", None, id="html"),
        pytest.param(502, HTML, False, Verdict.RETRY, "HTTP_502", None, id="html 5xx"),
        pytest.param(400, b"ACTION_ALREADY_FINAL", True, Verdict.DEAD, "HTTP_400", None, id="bare word"),
        pytest.param(400, b'["ACTION_ALREADY_FINAL"]', True, Verdict.DEAD, "HTTP_400", None, id="json list"),
        pytest.param(400, b'"ACTION_ALREADY_FINAL"', True, Verdict.DEAD, "HTTP_400", None, id="json string"),
        pytest.param(400, b"null", True, Verdict.DEAD, "HTTP_400", None, id="json null"),
        pytest.param(400, b"42", True, Verdict.DEAD, "HTTP_400", None, id="json number"),
        pytest.param(400, b'{"code": "ACTION_', True, Verdict.DEAD, "HTTP_400", None, id="truncated json"),
        pytest.param(400, b"\xff\xfe\x00{", True, Verdict.DEAD, "HTTP_400", None, id="not utf-8"),
        pytest.param(400, DEEP, True, Verdict.DEAD, "HTTP_400", None, id="absurdly nested"),
        pytest.param(
            400,
            body(
                code="ACTION_ALREADY_FINAL",
                message="final",
                errors=[{"field": "$", "extensions": {}}],
                traceId="abc",
                details={"new": True},
            ),
            True,
            Verdict.DELIVERED,
            "ACTION_ALREADY_FINAL",
            "final",
            id="unknown fields",
        ),
        pytest.param(
            400,
            body(code="SOMETHING_NEW", message="new rule"),
            True,
            Verdict.DEAD,
            "SOMETHING_NEW",
            "new rule",
            id="unknown code",
        ),
        pytest.param(
            503,
            body(code="BRAND_NEW_OUTAGE"),
            False,
            Verdict.RETRY,
            "BRAND_NEW_OUTAGE",
            None,
            id="unknown code on 5xx",
        ),
        pytest.param(
            400,
            body(code="action_already_final"),
            True,
            Verdict.DEAD,
            "action_already_final",
            None,
            id="code compared exactly",
        ),
        pytest.param(400, body(code=42, message=[1]), True, Verdict.DEAD, "HTTP_400", None, id="wrong types"),
        pytest.param(400, body(code="", message=""), True, Verdict.DEAD, "HTTP_400", None, id="empty str"),
        pytest.param(400, body(code=None), True, Verdict.DEAD, "HTTP_400", None, id="null code"),
        pytest.param(
            400,
            body(message="no code here"),
            True,
            Verdict.DEAD,
            "HTTP_400",
            "no code here",
            id="message only",
        ),
        pytest.param(
            400, body(code="X" * 1000), False, Verdict.DEAD, "X" * 99 + "…", None, id="huge code truncated"
        ),
    ],
)
def test_lenient_bodies(
    status: int, raw: bytes, earlier_unknown: bool, verdict: Verdict, code: str, message: str | None
) -> None:
    decision = decide(Answer(status, raw), earlier_unknown=earlier_unknown)
    assert decision.verdict is verdict
    assert decision.error_code == code
    assert decision.error_message == message


def test_long_message_is_truncated_to_500_characters() -> None:
    decision = decide(Answer(400, body(code="INVALID_INPUT", message="é" * 2000)))
    assert decision.error_message == "é" * 499 + "…"
    assert decision.reason == "HTTP 400 INVALID_INPUT: " + "é" * 499 + "…"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"code": "BAD\\u0000CODE", "message": "nul \\u0000 inside"}', id="NUL escapes"),
        pytest.param(b'{"code": "X", "message": "lone \\ud800 surrogate"}', id="lone surrogate"),
        pytest.param(b'{"code": "X", "message": "\\udfff\\ud800"}', id="reversed pair"),
        pytest.param(b"<html>\x00\x00 error</html>", id="raw NUL, not JSON"),
        pytest.param(b'{"code": "X", "message": "\xff\xfe bad utf-8"}', id="invalid UTF-8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="100,000-deep nesting"),
    ],
)
def test_every_string_of_a_hostile_body_is_storable(raw: bytes) -> None:
    decision = decide(Answer(400, raw))
    assert decision.verdict == Verdict.DEAD
    for text in (decision.error_code, decision.error_message, decision.reason):
        if text is not None:
            assert "\x00" not in text
            text.encode("utf-8")  # raises on a lone surrogate


def test_a_refusal_of_one_row_while_others_are_accepted_is_charged_and_ends_dead() -> None:
    answer = Answer(403, body(code="FORBIDDEN", message="not your store"))
    first = decide(answer, others_accepted=True)
    assert (first.verdict, first.charged, first.transient) == (Verdict.RETRY, True, False)
    assert "refused for this row only" in first.reason
    last = decide(answer, attempts=POLICY.max_attempts - 1, others_accepted=True)
    assert (last.verdict, last.error_code, last.error_message) == (
        Verdict.DEAD,
        "FORBIDDEN",
        "not your store",
    )
    target_wide = decide(answer, others_accepted=False)
    assert (target_wide.verdict, target_wide.charged) == (Verdict.PAUSE, False)


def test_multiline_message_becomes_one_line_in_the_reason() -> None:
    decision = decide(Answer(400, body(code="INVALID\nINPUT", message="line one\r\n\tline two")))
    assert decision.reason == "HTTP 400 INVALID INPUT: line one line two"
    assert decision.error_message == "line one\r\n\tline two"


# --- invariants over a grid ---------------------------------------------------------------------

GRID_STATUSES = [None, 0, 100, 200, 204, 301, 400, 401, 403, 404, 408, 409, 425, 429, 500, 503, 599, 600]
GRID_BODIES = [b"", HTML, ALREADY_FINAL, NOT_FOUND, b"[1]", body(code=1), body(message="m" * 900)]


@pytest.mark.parametrize("status", GRID_STATUSES)
@pytest.mark.parametrize("raw", GRID_BODIES)
def test_invariants(status: int | None, raw: bytes) -> None:
    outcomes = {"delivered", "delivered_earlier", "retry", "dead", "reauth", "paused"}
    flags = (False, True)
    for earlier, can_reauth, maybe_sent, attempts, jitter in product(
        flags, flags, flags, (0, 3, 4, 50), (0.0, ALMOST_ONE)
    ):
        error = "ReadTimeout" if status is None else None
        d = decide(
            Answer(status, raw, retry_after="3", transport_error=error, maybe_sent=maybe_sent),
            attempts=attempts,
            earlier_unknown=earlier,
            rand=const(jitter),
            can_reauth=can_reauth,
        )
        assert d.outcome in outcomes
        assert d.charged == (d.verdict not in (Verdict.REAUTH, Verdict.PAUSE))
        if d.verdict is Verdict.RETRY:
            assert d.retry_at is not None
            assert NOW <= d.retry_at <= NOW + timedelta(seconds=POLICY.max_delay)
            assert attempts + 1 < POLICY.max_attempts
        else:
            assert d.retry_at is None
        if d.verdict is Verdict.DELIVERED:
            assert not d.transient and not d.outcome_unknown
        assert d.error_message is None or len(d.error_message) <= 500
        assert d.reason and "\n" not in d.reason


@pytest.mark.parametrize(
    ("status", "throttled"), [(429, True), (503, False), (408, False), (204, False), (400, False)]
)
def test_only_429_asks_to_slow_down(status: int, throttled: bool) -> None:
    decision = classify(
        Answer(status=status),
        attempts=0,
        earlier_unknown=False,
        created_at=NOW,
        now=NOW,
        policy=POLICY,
        rand=lambda: 0.5,
        can_reauth=False,
    )
    assert decision.throttled is throttled


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (Answer(404, b'{"code": "DATA_NOT_FOUND"}'), ProbeVerdict.PROVEN),
        (Answer(401), ProbeVerdict.REFUSED),
        (Answer(403), ProbeVerdict.REFUSED),
        (Answer(204), ProbeVerdict.UNEXPECTED),
        (Answer(400, b"{}"), ProbeVerdict.UNEXPECTED),
        (Answer(503), ProbeVerdict.UNEXPECTED),
        (Answer(None, transport_error="ConnectError"), ProbeVerdict.NO_ANSWER),
    ],
)
def test_check_probe_reads_the_answer_to_an_unknown_action(answer: Answer, verdict: ProbeVerdict) -> None:
    assert probe_verdict(answer) == verdict
