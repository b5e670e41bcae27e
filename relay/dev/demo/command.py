"""``outbox-relay demo``: an embedded PostgreSQL, the sandbox API and the relay, end to end.

Needs no configuration: it ignores ``RELAY_*`` variables and the config file, and builds its own
settings for a throwaway PostgreSQL (the ``embedded`` extra) and an in-process sandbox with
faults switched on. Seven steps, one line each on stdout (stderr with ``--json``, so that stdout
holds only the JSON summary):

1. start PostgreSQL in a new temporary folder (or ``--data-dir``);
2. migrate it;
3. start the sandbox with some 503s, 429s, dropped connections and "applied, then 500" answers;
4. play the application: each outcome is written with plain SQL in its own transaction, together
   with a change to a toy ``demo.shop_orders`` table, and one bad write is refused by PostgreSQL
   (its order change rolls back with it). The SQL of this step is the application's, not the
   relay's, which is why it lives here and not in a ``queries.sql``;
5. run the relay in-process until every row is delivered or dead, one progress line a second;
6. print the summary and the audit of a row that needed retries;
7. clean up: stop everything and delete the folder, unless ``--keep``.

Exit 0 when every row ended delivered or dead, nothing was applied twice and the sandbox and the
database agree; 1 otherwise; 130 after Ctrl-C (clean-up still happens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, TextIO

from relay.cli import report
from relay.dev.sandbox import Faults
from relay.errors import ConfigError, DatabaseError, RelayError
from relay.settings import Settings, is_loopback_host, load_settings

if TYPE_CHECKING:
    from relay.dev.embedded import EmbeddedPostgres
    from relay.dev.sandbox import Sandbox
    from relay.pg.store import Store

MARKER = "outbox-relay-demo.json"  # written into the demo's folder; `--stop` insists on it
RELAY_LOG = "relay.log"
SANDBOX_LOG = "sandbox-requests.jsonl"
UNKNOWN_PREFIX = "unknown-"
MAX_ROWS = 100_000
WRITERS = 4  # application connections writing at once

# What goes wrong at the sandbox, per PUT (see relay/dev/sandbox/faults.py).
FAULTS = Faults(p503=0.05, p429=0.03, retry_after=1, p_close=0.02, p_apply_500=0.02, latency=0.005)

# The relay's settings for the demo: short retry delays, a quick fallback poll.
RELAY_ENV = {
    "RELAY_POLL_INTERVAL": "0.25s",
    "RELAY_RETRY_BASE_DELAY": "0.2s",
    "RELAY_RETRY_MAX_DELAY": "2s",
    "RELAY_REQUEST_TIMEOUT": "5s",
    "RELAY_LEASE": "30s",
    "RELAY_SHUTDOWN_TIMEOUT": "5s",
    "RELAY_LOG_LEVEL": "WARNING",
    "RELAY_LOG_FORMAT": "text",
    "RELAY_ID": "demo-relay",
}

# (word in the action id, the order's state once the action succeeded)
_ACTIONS = [("accept", "accepted"), ("ship", "shipped"), ("cancel", "cancelled"), ("refund", "refunded")]
_FAILURES = [
    ("ORDER_IN_WRONG_STATE", "order {order} was cancelled by the customer"),
    ("DATA_NOT_FOUND", "no stock left for SKU-{order}"),
    ("CARRIER_NOT_SUPPORTED", "carrier 'pigeon-post' is not supported for order {order}"),
    ("WAREHOUSE_ID_NOT_FOUND", "warehouse W{order} does not exist"),
    ("OTHER", "the payment provider declined the refund of order {order}"),
]

TRY_SQL = """\
select state, count(*) from outbox.action_status_updates group by state;
select * from outbox.delivery_audit where action_id = '{action}';
select attempt, started_at, http_status, outcome, error_code
  from outbox.delivery_attempts where action_id = '{action}' order by attempt;
select action_id, last_http_status, last_error from outbox.delivery_audit where state = 'dead';
select outcome, http_status, count(*) from outbox.delivery_attempts group by 1, 2 order by 3 desc;
select id, state, last_action_id from demo.shop_orders order by id limit 5;"""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived; clean up and exit 130."""


# -- the sample data ------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleUpdate:
    order_id: int
    action_id: str
    status: str
    errors: list[dict[str, str]]
    order_state: str
    plain_insert: bool  # written with INSERT INTO outbox.action_status_updates, not the function


def sample_updates(rows: int, rng: random.Random) -> list[SampleUpdate]:
    """``rows`` outcomes: about 70% SUCCESS, the rest FAILED with errors, a few for unknown actions."""
    unknown = set(rng.sample(range(rows), min(5, rows // 10)))
    width = max(4, len(str(rows)))
    out = []
    for i in range(rows):
        order = i + 1
        word, done_state = _ACTIONS[i % len(_ACTIONS)]
        action_id = f"{word}-action-{order:0{width}d}"
        if i in unknown:
            out.append(SampleUpdate(order, UNKNOWN_PREFIX + action_id, "SUCCESS", [], done_state, False))
            continue
        if rng.random() < 0.7:
            status, errors, state = "SUCCESS", [], done_state
        else:
            picked = rng.sample(_FAILURES, 2 if rng.random() < 0.1 else 1)
            status, state = "FAILED", f"{word}_failed"
            errors = [{"code": code, "message": text.format(order=order)} for code, text in picked]
        out.append(SampleUpdate(order, action_id, status, errors, state, plain_insert=i % 10 == 9))
    return out


# -- the application side: plain SQL, as any application would write it --------------------
_APP_SETUP = """
create schema if not exists demo;
create table demo.shop_orders (
    id             integer primary key,
    state          text not null default 'new',
    last_action_id text,
    updated_at     timestamptz not null default now()
)"""
_APP_ORDERS = "insert into demo.shop_orders (id) select generate_series(1, %s)"
_APP_CHANGE = "update demo.shop_orders set state = %s, last_action_id = %s, updated_at = now() where id = %s"
_APP_ENQUEUE = "select outbox.enqueue_action_status(%s, %s, %s)"
_APP_INSERT = "insert into outbox.action_status_updates (action_id, status, errors) values (%s, %s, %s)"


@dataclass
class Refusal:
    constraint: str | None
    message: str
    rolled_back: bool


@contextlib.asynccontextmanager
async def _app_errors() -> AsyncIterator[None]:
    """The application's database errors, as one line for the command line."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseError(f"the demo application's write failed: {first}") from exc


async def app_setup(url: str, orders: int) -> None:
    import psycopg

    async with _app_errors(), await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute(_APP_SETUP)
        await conn.execute(_APP_ORDERS, (orders,))
        await conn.commit()


async def app_write(url: str, updates: list[SampleUpdate]) -> None:
    """Each outcome in its own transaction, with the order change it belongs to."""
    import psycopg
    from psycopg.types.json import Jsonb

    async def writer(part: list[SampleUpdate]) -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            for u in part:
                async with conn.transaction():
                    await conn.execute(_APP_CHANGE, (u.order_state, u.action_id, u.order_id))
                    sql = _APP_INSERT if u.plain_insert else _APP_ENQUEUE
                    await conn.execute(sql, (u.action_id, u.status, Jsonb(u.errors)))

    async with _app_errors():
        await asyncio.gather(*(writer(updates[k::WRITERS]) for k in range(WRITERS)))


async def app_bad_write(url: str, order_id: int) -> Refusal | None:
    """A FAILED outcome without errors: PostgreSQL refuses it, and the order change rolls back."""
    import psycopg
    import psycopg.errors

    action_id = f"refund-action-{order_id}"
    refusal: Refusal | None = None
    async with _app_errors(), await psycopg.AsyncConnection.connect(url) as conn:
        try:
            async with conn.transaction():
                await conn.execute(_APP_CHANGE, ("refunded", action_id, order_id))
                await conn.execute(_APP_ENQUEUE, (action_id, "FAILED", "[]"))
        except psycopg.errors.IntegrityError as exc:
            refusal = Refusal(exc.diag.constraint_name, exc.diag.message_primary or str(exc), False)
        if refusal is not None:
            cur = await conn.execute("select state from demo.shop_orders where id = %s", (order_id,))
            row = await cur.fetchone()
            await conn.rollback()
            refusal.rolled_back = row is not None and row[0] == "new"
    return refusal


# -- the demo -------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What step 6 found; ``ok`` decides the exit code."""

    counts: dict[str, int]
    figures: dict[str, Any]
    sandbox: dict[str, Any]
    applied_twice: int
    lost: list[str]
    delivered_on_404: list[str]
    dead_unknown: int
    elapsed: float
    audit: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        left = self.counts["pending"] + self.counts["in_flight"]
        return left == 0 and self.applied_twice == 0 and not self.lost


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rows: int = args.rows
        self.keep: bool = args.keep
        self.web: tuple[str, int] | None = getattr(args, "web", None)
        self.audited: str | None = None
        self.json: bool = args.json
        self.seed: int = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.timeout: float = 60.0 + self.rows / 50.0
        self.out: TextIO = sys.stderr if self.json else sys.stdout
        self.started = time.monotonic()
        if args.data_dir is not None:
            folder = Path(args.data_dir).expanduser().resolve()
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise ConfigError(
                    f"--data-dir {folder}: not an empty folder; give a new or empty one "
                    "(a database kept by `demo --keep` stops with `outbox-relay demo --stop DIR`)"
                )
            self.created_dir = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
        else:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="outbox-relay-demo-")).resolve()
            self.created_dir = True
        self.dir = folder
        self.pg: EmbeddedPostgres | None = None
        self.sandbox: Sandbox | None = None
        self.url = ""
        self._log_file: IO[str] | None = None

    # -- output ----------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, number: int, text: str) -> None:
        self.say(f"[{number}/7] {text}")

    def detail(self, text: str) -> None:
        self.say("      " + text)

    # -- steps -----------------------------------------------------------------------------
    def run(self) -> int:
        from relay.dev.embedded import EmbeddedPostgres

        self.say("outbox-relay demo: a throwaway PostgreSQL, the sandbox API and the relay, end to end")
        logging.getLogger("psycopg").setLevel(logging.ERROR)  # no driver chatter on Ctrl-C
        pg = self.pg = EmbeddedPostgres(data_dir=self.dir, fsync=True, keep=True)
        pg.start()
        self.url = pg.url("postgres")
        marker = {"database_url": self.url, "port": pg.port, "created": datetime.now(UTC).isoformat()}
        (self.dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        self.step(
            1,
            f"PostgreSQL started on 127.0.0.1:{pg.port}, data in {pg.data_dir} "
            f"({time.monotonic() - self.started:.1f}s)",
        )
        if pg.root_changes:
            from relay.dev.embedded import SERVER_USER

            self.detail(f"run as root: PostgreSQL runs as the system user {SERVER_USER}; changed for it:")
            for change in pg.root_changes:
                self.detail(f"  {change}")
        code = asyncio.run(self._async_steps())
        if self.web is not None:
            self._console(*self.web)
        return code

    def _console(self, host: str, port: int) -> None:
        """``--web``: the audit console on the demo's database until Ctrl-C (then step 7)."""
        from urllib.parse import urlencode

        from relay.errors import RelayError
        from relay.settings import Secret
        from relay.web.command import bind, serve

        try:
            sock = bind(host, port)
        except RelayError:
            if port != WEB_PORT:
                raise
            sock = bind(host, 0)  # the usual port is taken: any free one
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # no line per page on the demo's screen

        def ready(address: str) -> None:
            self.say(f"      the audit console is serving the demo's data: {address}")
            if self.audited:
                self.detail(f"the row audited above: {address}find?{urlencode({'q': self.audited})}")
            self.detail(f"dead letters: {address}dead   Ctrl-C stops it and cleans up")

        with contextlib.suppress(KeyboardInterrupt, Interrupted):
            asyncio.run(serve(Secret(self.url), Settings(), sock, ready=ready, announce=False))
        self.say("the console stopped")

    async def _async_steps(self) -> int:
        from relay.dev.sandbox import DEFAULT_TOKEN, Sandbox, SandboxConfig
        from relay.pg.migrations import migrate
        from relay.pg.store import Store
        from relay.settings import Secret

        store = Store(Secret(self.url), pool_size=1, application_name="outbox-relay demo")
        try:
            migrated = await migrate(store)
            names = ", ".join(m.path.name for m in migrated.applied) or "nothing to apply"
            self.step(2, f"schema migrated: {names} (version {migrated.version})")

            config = SandboxConfig(
                unknown_prefix=UNKNOWN_PREFIX, faults=FAULTS, seed=self.seed, log_path=self.dir / SANDBOX_LOG
            )
            sandbox = self.sandbox = Sandbox(config).start()
            self.step(3, f"sandbox API on {sandbox.url}, with faults: {describe_faults()}")

            outcome = await self._write_and_deliver(store, sandbox, DEFAULT_TOKEN)
        finally:
            await store.close()
        return self._finish(outcome)

    async def _write_and_deliver(
        self, store: Store, sandbox: Sandbox, token: str
    ) -> tuple[Outcome, Refusal | None]:
        rng = random.Random(self.seed)
        updates = sample_updates(self.rows, rng)
        bad_order = self.rows + 1
        self.step(
            4,
            f"the application writes {self.rows} outcomes, each in its own transaction "
            "with its demo.shop_orders change",
        )
        began = time.monotonic()
        await app_setup(self.url, bad_order)
        await app_write(self.url, updates)
        unknown = [u.action_id for u in updates if u.action_id.startswith(UNKNOWN_PREFIX)]
        failed = sum(u.status == "FAILED" for u in updates)
        plain = sum(u.plain_insert for u in updates)
        succeeded = len(updates) - failed - len(unknown)
        self.detail(
            f"{succeeded} SUCCESS, {failed} FAILED with errors, {len(unknown)} for actions the API does not "
            f"know ({UNKNOWN_PREFIX}...), in {time.monotonic() - began:.1f}s"
        )
        self.detail(f"{len(updates) - plain} through outbox.enqueue_action_status(), {plain} by plain INSERT")
        refusal = await app_bad_write(self.url, bad_order)
        if refusal is None:
            self.detail("a bad write (FAILED without errors) was NOT refused: the schema is wrong")
        else:
            kept = "is still 'new': rolled back with it" if refusal.rolled_back else "was NOT rolled back"
            self.detail(
                f"a bad write is refused inside its transaction: {refusal.message} "
                f"[constraint {refusal.constraint}]"
            )
            self.detail(f"and the order change made in the same transaction: order {bad_order} {kept}")
        outcome = await self._deliver(store, sandbox, token)
        return outcome, refusal

    def _settings(self, api_url: str, token: str) -> Settings:
        env = {
            "RELAY_DATABASE_URL": self.url,
            "RELAY_API_BASE_URL": api_url,
            "RELAY_API_TOKEN": token,
            **RELAY_ENV,
        }
        return load_settings(None, environ=env)

    async def _deliver(self, store: Store, sandbox: Sandbox, token: str) -> Outcome:
        from relay.dev.demo import figures
        from relay.service.daemon import Relay
        from relay.service.logs import configure_logging

        settings = self._settings(sandbox.url, token)
        log_path = self.dir / RELAY_LOG
        self._log_file = log_path.open("a", encoding="utf-8")
        configure_logging(settings.log_level, settings.log_format, stream=self._log_file)
        self.step(5, f"relay started in-process (none ran while the rows were written); log: {log_path}")
        relay = Relay(settings)  # its settings carry no NOTIFY_SOCKET: no sd_notify from the demo
        began = time.monotonic()
        task = asyncio.create_task(relay.run())
        elapsed = 0.0
        next_line = began + 1.0
        try:
            while True:
                await asyncio.wait({task}, timeout=0.1)
                if task.done() or relay.stop_event.is_set():
                    break
                counts = await figures.counts(store)
                now = time.monotonic()
                left = counts["pending"] + counts["in_flight"]
                if left == 0:
                    elapsed = now - began
                    self.detail(progress_line(elapsed, counts) + "  all done")
                    break
                if now - began > self.timeout:
                    elapsed = now - began
                    self.detail(progress_line(elapsed, counts) + f"  gave up after {self.timeout:.0f}s")
                    break
                if now >= next_line:
                    self.detail(progress_line(now - began, counts))
                    next_line += 1.0
        finally:
            interrupted = relay.stop_event.is_set()  # only a signal sets it before this line
            relay.stop_event.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), settings.shutdown_timeout + 10.0)
            _restore_interrupts()
        failure = task.exception() if task.done() and not task.cancelled() else None
        if failure is not None:
            raise failure
        if interrupted:
            raise Interrupted()
        return await self._collect(store, sandbox, elapsed or time.monotonic() - began)

    async def _collect(self, store: Store, sandbox: Sandbox, elapsed: float) -> Outcome:
        from relay.dev.demo import figures as read

        counts = await read.counts(store)
        figures = await read.summary(store)
        rows = await read.outcomes(store)
        seen = sandbox.summary()
        applied = dict(sandbox.apply_count)
        delivered = {r["action_id"] for r in rows if r["state"] == "delivered"}
        on_404 = [r["action_id"] for r in rows if r["delivered_on_404"]]
        dead = [r["action_id"] for r in rows if r["state"] == "dead"]
        dead_unknown = sum(1 for action_id in dead if action_id.startswith(UNKNOWN_PREFIX))
        # Every repeat the API refused must have followed an attempt whose answer was lost
        # (recorded as delivered_earlier); anything else is an update sent twice for nothing.
        needless = max(0, int(seen["duplicates"]) - int(figures["already_final_after_unknown"]))
        applied_twice = sum(1 for n in applied.values() if n > 1) + needless
        lost = sorted(set(applied) - delivered)
        example = await read.retried_example(store)
        audit = await store.audit(example) if example else []
        self.audited = example or None
        return Outcome(counts, figures, seen, applied_twice, lost, on_404, dead_unknown, elapsed, audit)

    # -- step 6 ----------------------------------------------------------------------------
    def _finish(self, result: tuple[Outcome, Refusal | None]) -> int:
        outcome, refusal = result
        total = time.monotonic() - self.started
        self.step(6, "summary")
        self._print_summary(outcome, total)
        data = self._json(outcome, refusal, total)
        ok = outcome.ok and refusal is not None and refusal.rolled_back
        if not ok:
            self.say("the demo FAILED: " + "; ".join(problems(outcome, refusal)))
        if self.keep:
            self._print_keep(outcome)
        if self.json:
            print(json.dumps(data, indent=2), flush=True)
        return 0 if ok else 1

    def _print_summary(self, o: Outcome, total: float) -> None:
        c, f, s = o.counts, o.figures, o.sandbox
        left = c["pending"] + c["in_flight"]
        earlier = int(f["delivered_earlier"])
        others = c["dead"] - o.dead_unknown
        lines = [
            (
                "delivered",
                str(c["delivered"]),
                f"{earlier} of them confirmed by the repeat after a lost answer (outcome delivered_earlier)"
                if earlier
                else "",
            ),
            (
                "dead",
                str(c["dead"]),
                (f"{o.dead_unknown} {UNKNOWN_PREFIX}... ids refused with 404" if o.dead_unknown else "")
                + (f"; {others} other(s): see `outbox-relay dead list`" if others else ""),
            ),
            ("pending", str(left), f"{c['in_flight']} in flight: NOT FINISHED" if left else ""),
            ("retries", str(f["retries"]), "attempts with outcome 'retry'"),
            ("requests", str(f["requests"]), "HTTP requests, one outbox.delivery_attempts row each"),
            (
                "applied twice",
                str(o.applied_twice),
                f"the sandbox applied {s['applied']}, refused {s['duplicates']} repeats with "
                f"ACTION_ALREADY_FINAL ({f['already_final_after_unknown']} after a lost answer)",
            ),
            (
                "elapsed",
                f"{o.elapsed:.1f} s",
                f"relay start to last row settled; the whole demo: {total:.1f} s",
            ),
            (
                "latency p50",
                fmt_ms(f["latency_p50_ms"]),
                "commit to delivery (delivered_at - created_at), including the wait for the relay to start",
            ),
            ("latency p95", fmt_ms(f["latency_p95_ms"]), ""),
        ]
        width = max(len(name) for name, _, _ in lines)
        vwidth = max(len(v) for _, v, _ in lines)
        for name, value, note in lines:
            self.detail(f"{name.ljust(width)}  {value.rjust(vwidth)}" + (f"   {note}" if note else ""))
        for action_id in o.delivered_on_404:
            self.detail(
                f"note: {action_id} counted delivered, not dead: an earlier attempt's answer was lost, "
                "so the 404 that followed reads as 'it landed' (contract: 404 after an unknown outcome)"
            )
        self.say()
        if o.audit:
            self._print_audit(o.audit[0])
        else:
            self.detail("no row needed a retry this time")
        self.say()
        action = o.audit[0]["update"]["action_id"] if o.audit else "accept-action-0001"
        where = "in psql" if self.keep else "in psql (run the demo with --keep to keep the database)"
        self.detail(f"SQL to try {where}:")
        for line in TRY_SQL.format(action=action).splitlines():
            self.detail("  " + line)

    def _print_audit(self, entry: dict[str, Any]) -> None:
        u = entry["update"]
        took = u["time_to_deliver"].total_seconds() if u["time_to_deliver"] is not None else None
        self.detail(
            f"audit of {report.clean(u['action_id'])} ({u['status']}): {u['state']} after "
            f"{len(entry['attempts'])} requests, {fmt_ms(took * 1000 if took is not None else None)} after "
            "commit (`outbox-relay audit ACTION_ID` shows the same)"
        )
        rows = [
            [
                a["attempt"],
                a["started_at"].astimezone(UTC).strftime("%H:%M:%S.%f")[:-3],
                round(a["duration_ms"]),
                a["http_status"],
                a["outcome"],
                a["error_code"],
            ]
            for a in entry["attempts"]
        ]
        headers = ["#", "TIME (UTC)", "MS", "HTTP", "OUTCOME", "ERROR CODE"]
        self.say(report.table(headers, rows, indent="        "))

    def _print_keep(self, o: Outcome) -> None:
        assert self.pg is not None
        action = o.audit[0]["update"]["action_id"] if o.audit else "accept-action-0001"
        self.say()
        self.say("the database is still running (--keep); the relay and the sandbox have stopped.")
        self.detail(f"connect:  {self.pg.psql_command('postgres')}")
        self.detail(f"or:       export RELAY_DATABASE_URL='{self.url}'")
        self.detail("then:     outbox-relay status")
        self.detail(f"          outbox-relay audit {action}")
        self.detail("          outbox-relay dead list")
        self.detail(f"logs:     {self.dir / RELAY_LOG}, {self.dir / SANDBOX_LOG}, {self.dir / 'server.log'}")
        self.detail(f"stop it:  outbox-relay demo --stop {self.dir}   (stops PostgreSQL, deletes the folder)")

    def _json(self, o: Outcome, refusal: Refusal | None, total: float) -> dict[str, Any]:
        f, s = o.figures, o.sandbox
        data: dict[str, Any] = {
            "ok": o.ok and refusal is not None and refusal.rolled_back,
            "rows": self.rows,
            "seed": self.seed,
            "delivered": o.counts["delivered"],
            "dead": o.counts["dead"],
            "pending": o.counts["pending"] + o.counts["in_flight"],
            "in_flight": o.counts["in_flight"],
            "retries": int(f["retries"]),
            "requests": int(f["requests"]),
            "delivered_earlier": int(f["delivered_earlier"]),
            "delivered_on_404": o.delivered_on_404,
            "applied_twice": o.applied_twice,
            "applied_not_delivered": o.lost,
            "sandbox": {
                "requests": s["requests"],
                "applied": s["applied"],
                "repeats_refused": s["duplicates"],
                "repeats_after_unknown": int(f["already_final_after_unknown"]),
                "by_status": s["by_status"],
                "by_fault": s["by_fault"],
            },
            "elapsed_seconds": round(o.elapsed, 3),
            "total_seconds": round(total, 3),
            "latency_ms": {"p50": rounded(f["latency_p50_ms"]), "p95": rounded(f["latency_p95_ms"])},
            "refused_insert": None
            if refusal is None
            else {
                "constraint": refusal.constraint,
                "message": refusal.message,
                "rolled_back": refusal.rolled_back,
            },
            "audited_action_id": o.audit[0]["update"]["action_id"] if o.audit else None,
        }
        if self.keep and self.pg is not None:
            data.update(
                database_url=self.url,
                data_dir=str(self.dir),
                psql=self.pg.psql_command("postgres"),
                stop=f"outbox-relay demo --stop {self.dir}",
            )
        return data

    # -- step 7 ----------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Stop the sandbox and, unless --keep, the database; delete the folder. Never raises."""
        if self._log_file is not None:
            root = logging.getLogger()
            for handler in [h for h in root.handlers if getattr(h, "stream", None) is self._log_file]:
                root.removeHandler(handler)
            self._log_file.close()
            self._log_file = None
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                self.sandbox.stop()
        if self.keep:
            if self.pg is not None:
                self.step(
                    7,
                    "the relay and the sandbox stopped; PostgreSQL keeps running (--keep): "
                    f"outbox-relay demo --stop {self.dir}",
                )
            return
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop("fast")
        if self.created_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for child in list(self.dir.iterdir()) if self.dir.is_dir() else []:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        what = "the relay, the sandbox and PostgreSQL stopped"
        self.step(
            7,
            f"cleaned up: {what}; {self.dir} deleted"
            if self.created_dir
            else f"cleaned up: {what}; {self.dir} emptied",
        )


# -- helpers --------------------------------------------------------------------------------
def describe_faults(f: Faults = FAULTS) -> str:
    return (
        f"{f.p503:.0%} 503, {f.p429:.0%} 429 (Retry-After: {f.retry_after}), {f.p_close:.0%} connection "
        f"dropped, {f.p_apply_500:.0%} applied-then-500, {f.latency * 1000:.0f} ms latency"
    )


def progress_line(seconds: float, counts: dict[str, int]) -> str:
    return (
        f"{seconds:5.1f}s  delivered {counts['delivered']:>5}  dead {counts['dead']:>3}  "
        f"pending {counts['pending'] + counts['in_flight']:>5}"
    )


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)


def problems(o: Outcome, refusal: Refusal | None) -> list[str]:
    found = []
    left = o.counts["pending"] + o.counts["in_flight"]
    if left:
        found.append(f"{left} row(s) still pending or in flight")
    if o.applied_twice:
        found.append(f"{o.applied_twice} update(s) sent again after the API had accepted them")
    if o.lost:
        found.append(f"{len(o.lost)} update(s) applied by the API but not recorded as delivered")
    if refusal is None:
        found.append("PostgreSQL accepted an invalid row")
    elif not refusal.rolled_back:
        found.append("the business change of a refused row was not rolled back")
    return found


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _restore_interrupts() -> None:
    """After the relay ran: Ctrl-C and SIGTERM interrupt the demo again (the relay took them over)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sig)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let the clean-up finish even if Ctrl-C is pressed again."""
    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


# -- the command ----------------------------------------------------------------------------
def stop_kept(folder_arg: str) -> int:
    """``demo --stop DIR``: stop a database left running by ``demo --keep`` and delete its folder."""
    from relay.dev.embedded import EmbeddedPostgres

    folder = Path(folder_arg).expanduser().resolve()
    if not (folder / MARKER).is_file():
        raise ConfigError(f"--stop {folder}: not a folder made by `outbox-relay demo` (no {MARKER} in it)")
    EmbeddedPostgres(data_dir=folder).stop("fast")
    shutil.rmtree(folder)
    print(f"stopped the demo's PostgreSQL and deleted {folder}")
    return 0


WEB_PORT = 8089


def _listen(text: str) -> tuple[str, int]:
    from relay.web.command import listen_address as parse

    host, port = parse(text)
    if not is_loopback_host(host):
        raise argparse.ArgumentTypeError(f"the demo's console listens on loopback only, got {text!r}")
    return host, port


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """The handler. ``settings`` (from the environment) is ignored on purpose: the demo makes its own."""
    if args.stop is not None:
        if args.keep or args.data_dir is not None:
            raise ConfigError("--stop DIR takes no other option")
        return stop_kept(args.stop)
    if not 1 <= args.rows <= MAX_ROWS:
        raise ConfigError(f"--rows: expected 1 to {MAX_ROWS}, got {args.rows}")
    if args.web is not None:
        from relay.web.command import require_web_stack

        require_web_stack()
    demo = Demo(args)
    previous_term = None
    with contextlib.suppress(ValueError):
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    code = 1
    try:
        code = demo.run()
    except (KeyboardInterrupt, Interrupted):
        demo.say("\ninterrupted: cleaning up")
        code = 130
    except RelayError:
        demo.say("the demo stopped on an error (below); cleaning up")
        raise
    finally:
        with _signals_ignored():
            demo.cleanup()
        if previous_term is not None:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, previous_term)
    return code


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the command line (called by :mod:`relay.cli.main`)."""
    p = command(
        "demo",
        cmd_demo,
        "see it work end to end: a throwaway PostgreSQL, the sandbox and the relay",
        "Start a throwaway PostgreSQL (the 'embedded' extra) and the sandbox API with some faults on,\n"
        "write sample outcomes the way an application does (plain SQL, one transaction each, with a\n"
        "business change beside them), run the relay until every row is delivered or dead, print a\n"
        "summary and the audit of a row that needed retries, then clean everything up.\n"
        "Needs no configuration: RELAY_* variables and --config are ignored. Run as root, it runs\n"
        "PostgreSQL as the system user embedded_postgres and says what it changed for it.\n\n"
        "Exit 0 when every row ended delivered or dead and nothing was sent twice; 1 otherwise.\n\n"
        "examples:\n  outbox-relay demo\n  outbox-relay demo --rows 2000 --keep\n"
        "  outbox-relay demo --json | jq .latency_ms\n  outbox-relay demo --stop /tmp/outbox-relay-demo-XXXX",
    )
    p.set_defaults(needs_settings=False)
    p.add_argument(
        "--rows", type=int, default=300, metavar="N", help="sample outcomes to write (default %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a new or empty folder for the database (default: a temporary folder)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the database running afterwards and print how to connect and stop it",
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON on stdout (progress goes to stderr)"
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed for the sample data and the faults: the same seed gives the same counts",
    )
    p.add_argument("--stop", metavar="DIR", help="stop a database left by --keep and delete its folder")
    p.add_argument(
        "--web",
        nargs="?",
        const=f"127.0.0.1:{WEB_PORT}",
        type=_listen,
        metavar="HOST:PORT",
        help="afterwards, serve the audit console on the demo's data until Ctrl-C (default "
        f"127.0.0.1:{WEB_PORT}, or a free port when that one is taken); needs the web extra",
    )
