"""The public job-queue chaos benchmark's repeated-kill scenario, ported: kill -9 one of two
relays every 20 s and start it again, under a steady load, with the default lease (60 s).

Each kill takes a relay that holds rows at that moment: the one drawn if it does, else the other
(waiting up to HOLD_WAIT_S for one to): on one core the relay already running can take every row
for a while, and a kill of an idle relay would prove nothing.

A killed relay's claims are released by the live one as soon as it sees the dead one's heartbeat
stop (relay/core/peers.py), not when the lease runs out. Each start gets a new relay id, as with
the default ``relay_id`` (host:pid). It prints::

    chaos repeated_kill: rows=N lost=0 applied_twice=0 ... kills=K held_at_kills=H leased_at_end=L resent=R
    release_s=X

``held_at_kills``: rows the killed processes held; ``leased_at_end``: those still claimed when
the load stopped (20 s after the last kill); ``resent``: those sent again; ``release_s``: the
longest, over all kills, from a kill until every row it held was delivered (database clock).
"""

from __future__ import annotations

import os
import random
import time

import pytest

from relay.dev.sandbox.server import Faults
from tests.chaos.kit import Harness, RelayProcess

pytestmark = pytest.mark.chaos

FULL = os.environ.get("CHAOS_FULL_DURATIONS") == "1"
RATE = 100.0
KILL_EVERY_S = 20.0  # as in the benchmark
KILLS = 10 if FULL else 2
LEASE_S = 60.0  # the default lease, as in the benchmark
WARM_UP_S = 5.0
HOLD_WAIT_S = 20.0  # at most this long for a relay holding rows before a kill


def first_holding(chaos: Harness, relays: list[RelayProcess]) -> RelayProcess | None:
    """The first of ``relays`` that holds rows in flight (under its current relay id), waiting
    up to HOLD_WAIT_S for one to; None if none did."""
    sql = "select count(*) from outbox.action_status_updates where state = 'in_flight' and claimed_by = %s"
    deadline = time.monotonic() + HOLD_WAIT_S
    while True:
        for relay in relays:
            if int(chaos.probe.one(sql, (relay.env["RELAY_ID"],))):
                return relay
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def test_kill9_and_restart_one_of_two_relays_every_20_s(chaos: Harness) -> None:
    # 200 ms per PUT: about 20 rows in flight at 100 rows/s, so that each kill catches some.
    chaos.sandbox.set_faults(Faults(latency=0.2))
    relays = [chaos.relay("kill-a"), chaos.relay("kill-b")]
    for r in relays:
        r.env["RELAY_ID"] = f"{r.name}.1"
        r.env.pop("RELAY_LEASE", None)  # the default lease
    for r in relays:  # started again with their own ids
        r.stop()
        r.start()
    chaos.wait_listening(2)
    chaos.start_writer(rate=RATE, seed=14)
    time.sleep(WARM_UP_S)
    rng = random.Random(14)
    held: list[tuple[object, list[int], object]] = []  # (kill time, rows it held, their lease end)
    killed: list[str] = []
    for _ in range(KILLS):  # a kill, then the 20 s until the next one (or the end)
        drawn = rng.choice(relays)
        order = [drawn, *(r for r in relays if r is not drawn)]
        victim = first_holding(chaos, order) or drawn
        victim.kill9()
        killed_at = chaos.db_now()
        dead_id = victim.env["RELAY_ID"]
        killed.append(dead_id)
        rows = chaos.probe.query(
            "select id, next_attempt_at from outbox.action_status_updates "
            "where state = 'in_flight' and claimed_by = %s",
            (dead_id,),
        )
        lease_end = max((r[1] for r in rows), default=None)
        held.append((killed_at, [int(r[0]) for r in rows], lease_end))
        victim.env["RELAY_ID"] = f"{victim.name}.{victim.starts + 1}"
        victim.start()
        time.sleep(KILL_EVERY_S)
    leased_at_end = int(
        chaos.probe.one(
            "select count(*) from outbox.action_status_updates where state = 'in_flight' "
            "and claimed_by = any(%s) and next_attempt_at > now()",
            (killed,),
        )
    )
    all_held = [i for _, ids, _ in held for i in ids]
    outcome = chaos.settle()
    resent = int(
        chaos.probe.one(
            "select count(*) from outbox.action_status_updates where id = any(%s) and requests > 1",
            (all_held,),
        )
    )
    ids = [i for _, rows, _ in held for i in rows]
    killed_at = [k for k, rows, _ in held for _ in rows]
    leases = [lease for _, rows, lease in held for _ in rows]
    late, release_s = chaos.probe.query(
        "select count(*) filter (where u.delivered_at >= h.lease_end), "
        "coalesce(extract(epoch from max(u.delivered_at - h.killed_at)), 0)::float "
        "from outbox.action_status_updates u "
        "join unnest(%s::bigint[], %s::timestamptz[], %s::timestamptz[]) as h(id, killed_at, lease_end) "
        "on h.id = u.id",
        (ids, killed_at, leases),
    )[0]
    print(
        "\n"
        + outcome.line(
            "repeated_kill",
            kills=len(held),
            held_at_kills=len(all_held),
            leased_at_end=leased_at_end,
            resent=resent,
            release_s=release_s,
        )
    )
    outcome.check(duplicates_allowed=True)
    assert all_held, "no kill caught a relay holding rows"
    assert late == 0, f"{late} rows delivered only after the killed relay's lease ran out"
    assert leased_at_end == 0
