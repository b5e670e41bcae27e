"""What a request may ask, checked before anything runs: query strings and form fields.

Everything here comes from a browser, so from anyone: a value outside its rule is refused with
:class:`BadRequest` (the page answers 400 and says which field), never passed on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from relay.errors import BadRequest

STATES = ("pending", "in_flight", "delivered", "dead")
STATUSES = ("SUCCESS", "FAILED")
TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # the schema's target_name rule
CODE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
MAX_IDS = 200  # action ids pasted into the search box
MAX_SELECTED = 1000  # updates ticked for one redrive
REASON_MAX = 500
FAR_PAST = "-infinity"
FAR_FUTURE = "infinity"


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: rows strictly older than (at, id)."""

    at: datetime
    id: int

    def text(self) -> str:
        return f"{self.at.astimezone(UTC).isoformat()}_{self.id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        at, _, ident = text.rpartition("_")
        try:
            when = datetime.fromisoformat(at)
            if when.tzinfo is None or not ident.isdigit() or len(ident) > 19:
                raise ValueError
            return cls(when, int(ident))
        except ValueError:
            raise BadRequest("before: not a page position this console made") from None


@dataclass(frozen=True)
class ListFilter:
    state: str | None = None
    target: str | None = None
    status: str | None = None
    code: str | None = None
    day_from: date | None = None
    day_to: date | None = None

    @property
    def from_at(self) -> datetime | str:
        return datetime.combine(self.day_from, datetime.min.time(), UTC) if self.day_from else FAR_PAST

    @property
    def to_at(self) -> datetime | str:
        if self.day_to is None:
            return FAR_FUTURE
        return datetime.combine(self.day_to, datetime.min.time(), UTC) + timedelta(days=1)

    def query(self) -> dict[str, str]:
        """The filter as query-string fields (for links: next page, CSV export)."""
        pairs = {
            "state": self.state,
            "target": self.target,
            "status": self.status,
            "code": self.code,
            "from": self.day_from.isoformat() if self.day_from else None,
            "to": self.day_to.isoformat() if self.day_to else None,
        }
        return {k: v for k, v in pairs.items() if v}


def _one(fields: Mapping[str, str], name: str) -> str | None:
    value = fields.get(name, "").strip()
    return value or None


def _day(fields: Mapping[str, str], name: str) -> date | None:
    value = _one(fields, name)
    if value is None:
        return None
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: expected a day as YYYY-MM-DD") from None


def target(fields: Mapping[str, str]) -> str | None:
    value = _one(fields, "target")
    if value is not None and not TARGET.fullmatch(value):
        raise BadRequest("target: not a target name (letters, digits, _ . -; at most 63)")
    return value


def code(fields: Mapping[str, str]) -> str | None:
    value = _one(fields, "code")
    if value is not None and not CODE.fullmatch(value):
        raise BadRequest("code: not an error code (letters, digits, _ . : -; at most 100)")
    return value


def list_filter(fields: Mapping[str, str]) -> ListFilter:
    state = _one(fields, "state")
    if state is not None and state not in STATES:
        raise BadRequest(f"state: expected one of {', '.join(STATES)}")
    status = _one(fields, "status")
    if status is not None and status.upper() not in STATUSES:
        raise BadRequest("status: expected SUCCESS or FAILED")
    day_from, day_to = _day(fields, "from"), _day(fields, "to")
    if day_from and day_to and day_from > day_to:
        raise BadRequest("from: must not be after to")
    return ListFilter(
        state=state,
        target=target(fields),
        status=status.upper() if status else None,
        code=code(fields),
        day_from=day_from,
        day_to=day_to,
    )


def cursor(fields: Mapping[str, str]) -> Cursor | None:
    value = _one(fields, "before")
    return Cursor.parse(value) if value else None


def action_ids(text: str) -> list[str]:
    """The search box: one action id, a prefix, or a pasted list (spaces, commas, new lines)."""
    found = [part for part in re.split(r"[\s,;]+", text) if part]
    if not found:
        raise BadRequest("q: type an action id, the start of one, or paste a list")
    if len(found) > MAX_IDS:
        raise BadRequest(f"q: at most {MAX_IDS} action ids at once")
    if any(len(part) > 255 for part in found):
        raise BadRequest("q: an action id has at most 255 characters")
    return list(dict.fromkeys(found))


def selected_ids(values: Sequence[str]) -> list[int]:
    if len(values) > MAX_SELECTED:
        raise BadRequest(f"id: at most {MAX_SELECTED} updates at once")
    try:
        ids = [int(v) for v in values]
    except ValueError:
        raise BadRequest("id: expected update ids") from None
    if any(not 0 < i < 2**63 for i in ids):
        raise BadRequest("id: expected update ids")
    return sorted(set(ids))


def reason(fields: Mapping[str, str]) -> str:
    value = " ".join(fields.get("reason", "").split())
    if not value:
        raise BadRequest("reason: say why these dead updates are sent again (kept with each row)")
    if len(value) > REASON_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise BadRequest(f"reason: at most {REASON_MAX} printable characters")
    return value
