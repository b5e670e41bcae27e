"""Pure answer classification: the answer table of the public contract (section 2) as code.

:func:`classify` turns what one HTTP request produced (:class:`Answer`) into what to do with the
row (:class:`Decision`). It does no I/O, reads no clock and never raises on odd input: bodies
are parsed leniently and statuses nobody expected are retried.

=====================================================  =========  =======  ==========  =========
answer                                                 verdict    charged  unknown     transient
=====================================================  =========  =======  ==========  =========
2xx                                                    delivered  yes      no          no
400 ``ACTION_ALREADY_FINAL`` / 404, earlier unknown    delivered  yes      no          no
400 ``ACTION_ALREADY_FINAL``, no earlier unknown       dead (1)   yes      no          no
other 400, 404, other 4xx                              dead       yes      no          no
401 (can renew the token)                              reauth     no       no          no
401 (cannot renew), 403, while others are refused too  pause      no       no          no
401, 403, while other rows of the target are accepted  retry      yes      no          no
408, 425, 429                                          retry      yes      no          yes
5xx                                                    retry      yes      yes         yes
no response, maybe sent / certainly not sent           retry      yes      yes / no    yes
anything else (1xx, 3xx, ...)                          retry      yes      no          yes
=====================================================  =========  =======  ==========  =========

(1) The API holds a final status this database has no record of sending: the reason says so
(:data:`ALREADY_FINAL_UNRECORDED`), so an operator can tell it from an ordinary refusal. It is
what a delivery recorded only on a primary lost in a failover looks like.

A retry becomes ``dead`` once :func:`relay.core.retry.give_up_reason` says so for the attempt just made.
A refusal (401/403) is the whole target's unless the caller saw the API accept another row of the
same target after this request started (``others_accepted``): then it is this row's own, charged,
retried with backoff and dead once the row's budget is spent, with the API's answer recorded.

Every string in a :class:`Decision` is storable (:mod:`relay.sanitize`): the API's ``code`` and
``message`` are cleaned and capped where they are parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from relay.connect.answer import Answer
from relay.core import retry
from relay.sanitize import one_line, storable
from relay.settings import RetrySettings

__all__ = ["ALREADY_FINAL", "ALREADY_FINAL_UNRECORDED", "Answer", "Decision", "Verdict", "classify"]

ALREADY_FINAL = "ACTION_ALREADY_FINAL"
ALREADY_FINAL_UNRECORDED = (
    "the API already holds a final status for this action that this database has no record of"
    " delivering (for instance a delivery recorded on a primary lost in a failover)"
)
MESSAGE_LIMIT = 500
CODE_LIMIT = 100
_RETRYABLE_4XX = frozenset({408, 425, 429})


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    REAUTH = "reauth"
    PAUSE = "pause"


@dataclass(frozen=True)
class Decision:
    """What to do with the row after one request, and what to record about that request."""

    verdict: Verdict
    outcome: str  # delivery_attempts.outcome: delivered, delivered_earlier, retry, dead, reauth, paused
    charged: bool  # counts toward the row's attempts (and max_attempts)
    outcome_unknown: bool  # the request may have been applied without us seeing the answer
    retry_at: datetime | None  # for RETRY: when to try again
    error_code: str | None  # the API's code, the transport error name, or "HTTP_<status>"
    error_message: str | None  # the API's message (at most 500 chars), or a transport description
    reason: str  # one human-readable line for last_error
    transient: bool  # counts as a failure for the target's circuit breaker
    throttled: bool = False  # the API asked us to slow down (429): lower the target's rate


def classify(
    answer: Answer,
    *,
    attempts: int,
    earlier_unknown: bool,
    created_at: datetime,
    now: datetime,
    policy: RetrySettings,
    rand: Callable[[], float],
    can_reauth: bool,
    others_accepted: bool = False,
) -> Decision:
    """Decide what one answer means for its row.

    ``attempts`` is the number of attempts already charged before this request;
    ``earlier_unknown`` is whether an earlier attempt of this row ended with an unknown outcome.
    A status, when present, wins over ``transport_error``.
    """
    status = answer.status
    if status is None:
        name = answer.transport_error or "NoResponse"
        sent = "the request may have reached the server" if answer.maybe_sent else "the request was not sent"
        unknown = ", outcome unknown" if answer.maybe_sent else ""
        failure = _Failure(name, f"no response ({name}); {sent}", f"{name} (no response{unknown})")
        return _retry(failure, answer, attempts, created_at, now, policy, rand, unknown=answer.maybe_sent)

    api_code, api_message = _api_error(answer.body)
    code = api_code or f"HTTP_{status}"
    describe = _describe(status, api_code, api_message)

    def settled(verdict: Verdict, outcome: str, reason: str, *, charged: bool = True) -> Decision:
        return Decision(
            verdict=verdict,
            outcome=outcome,
            charged=charged,
            outcome_unknown=False,
            retry_at=None,
            error_code=code,
            error_message=api_message,
            reason=reason,
            transient=False,
        )

    if 200 <= status < 300:
        return replace(settled(Verdict.DELIVERED, "delivered", describe), error_code=None, error_message=None)
    if earlier_unknown and (status == 404 or (status == 400 and api_code == ALREADY_FINAL)):
        reason = f"{describe}: an earlier attempt with an unknown outcome was delivered"
        return settled(Verdict.DELIVERED, "delivered_earlier", reason)
    if status == 400 and api_code == ALREADY_FINAL:
        return settled(Verdict.DEAD, "dead", f"{describe}: {ALREADY_FINAL_UNRECORDED}")
    if status == 401 and can_reauth:
        return settled(Verdict.REAUTH, "reauth", f"{describe}: renewing the token", charged=False)
    if status in (401, 403) and others_accepted:
        failure = _Failure(
            code, api_message, f"{describe}: refused for this row only (other rows were accepted)"
        )
        decision = _retry(failure, answer, attempts, created_at, now, policy, rand, unknown=False)
        return replace(decision, transient=False)
    if status in (401, 403):
        why = "credentials refused" if status == 401 else "token lacks permission"
        return settled(Verdict.PAUSE, "paused", f"{describe}: {why}, pausing the target", charged=False)
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return settled(Verdict.DEAD, "dead", describe)
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        failure = _Failure(code, api_message, describe)
        decision = _retry(failure, answer, attempts, created_at, now, policy, rand, unknown=status >= 500)
        return replace(decision, throttled=status == 429)
    # 1xx, 3xx, out-of-range statuses: nothing the API documents; retry, without assuming it landed.
    failure = _Failure(code, api_message, f"{describe} (unexpected status)")
    return _retry(failure, answer, attempts, created_at, now, policy, rand, unknown=False)


@dataclass(frozen=True)
class _Failure:
    """What a retryable failure records: error code, error message, one-line description."""

    code: str
    message: str | None
    describe: str


class ProbeVerdict(StrEnum):
    """What one ``PUT`` for an action id that cannot exist (``outbox-relay check --probe``) proves."""

    PROVEN = "proven"  # 404, as for any unknown action: the token and the route work
    REFUSED = "refused"  # 401/403: the API refused the credentials
    NO_ANSWER = "no_answer"  # transport error, timeout
    UNEXPECTED = "unexpected"  # anything else: reported as it came


def probe_verdict(answer: Answer) -> ProbeVerdict:
    """How ``check --probe`` reads the API's answer to its unknown action id."""
    if answer.status is None:
        return ProbeVerdict.NO_ANSWER
    if answer.status == 404:
        return ProbeVerdict.PROVEN
    if answer.status in (401, 403):
        return ProbeVerdict.REFUSED
    return ProbeVerdict.UNEXPECTED


def _retry(
    failure: _Failure,
    answer: Answer,
    attempts: int,
    created_at: datetime,
    now: datetime,
    policy: RetrySettings,
    rand: Callable[[], float],
    *,
    unknown: bool,
) -> Decision:
    """A transient failure: try again later, or ``dead`` once the policy gives up."""
    made = attempts + 1
    give_up = retry.give_up_reason(made, created_at, now, policy)
    if give_up is not None:
        verdict, retry_at, reason = Verdict.DEAD, None, f"{give_up}; last failure: {failure.describe}"
    else:
        delay = retry.retry_delay(made, policy, rand, retry.parse_retry_after(answer.retry_after, now))
        verdict, retry_at = Verdict.RETRY, now + timedelta(seconds=delay)
        reason = f"{failure.describe}, retrying in {retry.human_duration(delay)}"
    return Decision(
        verdict=verdict,
        outcome=verdict.value,
        charged=True,
        outcome_unknown=unknown,
        retry_at=retry_at,
        error_code=failure.code,
        error_message=failure.message,
        reason=reason,
        transient=True,
    )


def _api_error(body: bytes) -> tuple[str | None, str | None]:
    """The ``code`` and ``message`` of an API error body; ``None`` for anything missing or odd."""
    if not body:
        return None, None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, absurdly nested
        return None, None
    if not isinstance(doc, dict):
        return None, None
    code, message = doc.get("code"), doc.get("message")
    code = one_line(code, CODE_LIMIT) if isinstance(code, str) else None
    message = storable(message, MESSAGE_LIMIT) if isinstance(message, str) else None
    return code or None, message if message and message.strip() else None


def _describe(status: int, code: str | None, message: str | None) -> str:
    """``HTTP 400 INVALID_INPUT: message`` on one line; the parts that are missing left out."""
    text = f"HTTP {status}"
    if code:
        text += f" {' '.join(code.split())}"
    if message:
        text += f": {' '.join(message.split())}"
    return text
