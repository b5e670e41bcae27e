"""Shared helpers for end-to-end tests: settings for a sandbox, seeding rows, counting results."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from relay.settings import Settings, load_settings

CODES = ["ORDER_IN_WRONG_STATE", "DATA_NOT_FOUND", "OTHER", "UNAVAILABLE"]


def relay_env(database_url: str, api_url: str, **extra: str) -> dict[str, str]:
    env = {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_API_BASE_URL": api_url,
        "RELAY_API_TOKEN": "sandbox-token",
        "RELAY_POLL_INTERVAL": "0.5",
        "RELAY_RETRY_BASE_DELAY": "0.05",
        "RELAY_RETRY_MAX_DELAY": "0.5",
        "RELAY_REQUEST_TIMEOUT": "2",
        "RELAY_LEASE": "8",
        "RELAY_SHUTDOWN_TIMEOUT": "5",
        "RELAY_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


def relay_settings(database_url: str, api_url: str, **extra: str) -> Settings:
    return load_settings(None, relay_env(database_url, api_url, **extra))


def sample_updates(n: int, seed: int = 7, prefix: str = "act") -> list[tuple[str, str, list[dict[str, str]]]]:
    """n updates, about 70% SUCCESS and 30% FAILED with one to three errors."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        action_id = f"{prefix}-{i:06d}"
        if rng.random() < 0.7:
            out.append((action_id, "SUCCESS", []))
        else:
            errors = [
                {"code": rng.choice(CODES), "message": f"reason {i}.{k}"} for k in range(rng.randint(1, 3))
            ]
            out.append((action_id, "FAILED", errors))
    return out


def seed_rows(
    database_url: str, updates: Iterable[tuple[str, str, list[dict[str, str]]]], target: str = "default"
) -> None:
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "select outbox.enqueue_action_status(%s, %s, %s::jsonb, %s)",
            [(a, s, json.dumps(e), target) for a, s, e in updates],
        )


def states(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return dict(
            conn.execute("select state, count(*) from outbox.action_status_updates group by state").fetchall()
        )  # type: ignore[arg-type]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], within: float, what: str, interval: float = 0.05
) -> float:
    """In a coroutine: poll ``predicate`` (plain or async) until it holds; return the seconds it
    took. Fails the test, naming ``what``, when it still does not hold after ``within`` seconds."""
    start = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)


def start_relay_process(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "run"], env={**base, **env}, stdout=log, stderr=subprocess.STDOUT
        )


@contextlib.contextmanager
def relay_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Relay processes a test starts (append them); any still running at the end are killed."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def expected_bodies(updates: Iterable[tuple[str, str, list[dict[str, str]]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for action_id, status, errors in updates:
        body: dict[str, Any] = {"status": status}
        if errors:
            body["errors"] = errors
        out[action_id] = body
    return out


def create_migrated_database(admin_url: str, name: str, url: str) -> None:
    """Create database ``name`` (through ``admin_url``) and apply the migrations to it (``url``)."""
    from relay.pg.migrations import migrate
    from relay.pg.store import Store
    from relay.settings import Secret

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {name}")
        conn.execute(f"create database {name}")
    store = Store(Secret(url), pool_size=1)

    async def setup() -> None:
        try:
            await migrate(store)
        finally:
            await store.close()

    asyncio.run(setup())


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m relay ARGS`` as a user runs it: no RELAY_* from the test's own environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=timeout,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def web_console(env: dict[str, str], log_path: Path, listen: str | None = None) -> Iterator[str]:
    """``outbox-relay web`` in a process of its own (``env``: its RELAY_* variables); yields its
    address once it printed it (30 s deadline), stops it (SIGTERM, then kill) afterwards."""
    import signal

    listen = listen or f"127.0.0.1:{free_port()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out_path = log_path.with_suffix(".out")
    with log_path.open("ab") as log, out_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "web", "--listen", listen],
            env={**base, **env},
            stdout=out,
            stderr=log,
        )
    try:

        def address() -> str | None:
            for line in out_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("outbox-relay web: http"):
                    return line.split()[2]
            return None

        ok = wait_until(lambda: address() is not None or proc.poll() is not None, 30)
        found = address()
        if not ok or found is None:
            raise AssertionError(f"the console did not start: {log_path.read_text(errors='replace')[-2000:]}")
        yield found
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


LOGIN_PASSWORD = "not-a-secret"


@contextlib.contextmanager
def login_roles(admin_url: str, members: dict[str, str | None]) -> Iterator[dict[str, str]]:
    """Login roles as a deployment makes them (``create role NAME login ... in role GROUP``), for
    ``{login: group}`` (None: a member of no group); dropped afterwards with what they own."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for login, group in members.items():
            admin.execute(f"drop role if exists {login}")
            member = f" in role {group}" if group else ""
            admin.execute(f"create role {login} login password '{LOGIN_PASSWORD}'{member}")
    try:
        yield {login: login for login in members}
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            for login in members:
                admin.execute(f"drop owned by {login}")
                admin.execute(f"drop role if exists {login}")


def url_as(database_url: str, login: str) -> str:
    """``database_url`` with the login of :func:`login_roles` instead of its user."""
    from sqlalchemy.engine import make_url

    return make_url(database_url).set(username=login, password=LOGIN_PASSWORD).render_as_string(False)
