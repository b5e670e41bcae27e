"""What the console's pages show, read through the store's named queries (``relay/web/queries.sql``).

Every function takes the :class:`~relay.pg.store.Store` and plain values already checked by
:mod:`relay.web.forms`; none builds SQL. Lists are pages of a keyset: :class:`Page` says where
the next one starts (``next_cursor``), or that the reading stopped after ``scan`` rows of the
index without filling the page (``stopped_at``: a rare filter costs bounded time per page).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from relay.core.redrive import Requeued, retry_dead
from relay.pg.store import NamedQueries
from relay.web.forms import Cursor, ListFilter

if TYPE_CHECKING:
    from relay.pg.store import Store

QUERIES = NamedQueries("relay.web")

FIND_LIMIT = 200  # updates shown for a prefix or a pasted list
PAGE = 50  # rows per page of a list
SCAN = 20_000  # index entries read at most per page of a filtered list
SCAN_TABLE = 5_000  # the same when each entry read visits the table at random (dead rows by status)
CHART_MINUTES = 24 * 60


@dataclass(frozen=True)
class Capabilities:
    role: str
    may_redrive: bool


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_cursor: Cursor | None = None
    stopped_at: datetime | None = None  # read `scanned` rows back to this time without filling the page
    scanned: int = 0


@dataclass
class Timeline:
    update: dict[str, Any]
    attempts: list[dict[str, Any]]
    requeues: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reached_api(self) -> str:
        """``yes`` (an answer came back), ``maybe`` (a request may have been applied unseen), ``no``."""
        seen = {a["reached_api"] for a in self.attempts}
        if "answered" in seen:
            return "yes"
        if "maybe" in seen or self.update["outcome_unknown"]:
            return "maybe"
        return "no"


async def capabilities(store: Store) -> Capabilities:
    row = (await store.fetch(QUERIES, "web_capabilities"))[0]
    return Capabilities(role=str(row["role"]), may_redrive=bool(row["may_redrive"]))


def like_pattern(prefix: str) -> str:
    """``prefix`` as a LIKE pattern that matches only itself followed by anything."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def find(store: Store, action_ids: Sequence[str]) -> tuple[list[dict[str, Any]], bool]:
    """Updates of the given action ids; for one id with no exact match, those it starts. Returns
    the rows and whether they were found by prefix."""
    rows = await store.fetch(QUERIES, "web_find_ids", {"action_ids": list(action_ids), "limit": FIND_LIMIT})
    if rows or len(action_ids) != 1:
        return rows, False
    prefix = action_ids[0]
    params = {"prefix": prefix, "pattern": like_pattern(prefix), "limit": FIND_LIMIT}
    found = await store.fetch(QUERIES, "web_find_prefix", params)
    return sorted(found, key=lambda r: (r["action_id"], r["target"])), True


async def timeline(store: Store, update_id: int) -> Timeline | None:
    found = await store.fetch(QUERIES, "web_update", {"id": update_id})
    if not found:
        return None
    update = found[0]
    attempts = await store.fetch(QUERIES, "web_update_attempts", {"id": update_id})
    requeues = await store.fetch(QUERIES, "web_update_requeues", {"id": update_id})
    events: list[dict[str, Any]] = [{"at": update["created_at"], "kind": "written"}]
    events += [{"at": a["started_at"], "kind": "attempt", "attempt": a} for a in attempts]
    events += [{"at": r["requeued_at"], "kind": "requeue", "requeue": r} for r in requeues]
    if update["delivered_at"] is not None:
        events.append({"at": update["delivered_at"], "kind": "delivered"})
    if update["dead_at"] is not None:
        events.append({"at": update["dead_at"], "kind": "dead"})
    order = {"written": 0, "requeue": 1, "attempt": 2, "delivered": 3, "dead": 3}
    events.sort(key=lambda e: (e["at"], order[e["kind"]]))
    return Timeline(update, attempts, requeues, events)


async def updates_page(
    store: Store, flt: ListFilter, cursor: Cursor | None, page: int = PAGE, scan: int = SCAN
) -> Page:
    """One page of updates, newest first (dead ones by when they died), reading at most ``scan``
    rows of the index."""
    params: dict[str, Any] = {
        "target": flt.target,
        "status": flt.status,
        "code": flt.code,
        "from_at": flt.from_at,
        "before_at": cursor.at if cursor else flt.to_at,
        "before_id": cursor.id if cursor else 0,
        "scan": scan,
        "page_plus": page + 1,
    }
    if flt.state == "dead":
        if flt.status:  # the status is not in the dead rows' index: each row read visits the table
            params["scan"] = scan = min(scan, SCAN_TABLE)
        found = await store.fetch(QUERIES, "web_dead_page", params)
    else:
        found = await store.fetch(QUERIES, "web_updates_page", {**params, "state": flt.state})
    hits = [r for r in found if r["hit"]]
    edge = next((r for r in found if int(r["n"]) == scan), None)
    if len(hits) > page:
        last = hits[page - 1]
        return Page(hits[:page], Cursor(last["position_at"], int(last["id"])))
    if edge is not None:  # read `scan` rows without filling the page: go on from the oldest read
        cursor = Cursor(edge["position_at"], int(edge["id"]))
        return Page(hits, cursor, stopped_at=edge["position_at"], scanned=scan)
    return Page(hits)


async def dead_groups(store: Store) -> list[dict[str, Any]]:
    return await store.fetch(QUERIES, "web_dead_groups")


async def dead_selected(store: Store, ids: Sequence[int]) -> list[dict[str, Any]]:
    return await store.fetch(QUERIES, "web_dead_selected", {"ids": list(ids)})


async def per_minute(store: Store, minutes: int = CHART_MINUTES) -> list[dict[str, Any]]:
    return await store.fetch(QUERIES, "web_per_minute", {"minutes": minutes})


async def redrive(
    store: Store, *, ids: Sequence[int], target: str | None, code: str | None, reason: str
) -> Requeued:
    """Re-queue the ticked dead updates (by target and action id: each exactly that row) or every
    dead update of the filter, through the same code as ``outbox-relay dead retry``."""
    if not ids:
        return await retry_dead(store, action_ids=None, target=target, code=code, reason=reason)
    by_target: dict[str, list[str]] = {}
    for row in await dead_selected(store, ids):
        by_target.setdefault(str(row["target"]), []).append(str(row["action_id"]))
    done = Requeued()
    for name, action_ids in sorted(by_target.items()):
        part = await retry_dead(store, action_ids=action_ids, target=name, code=None, reason=reason)
        done.count += part.count
        done.action_ids |= part.action_ids
    return done
