"""Fixtures of the chaos scenarios: an in-process sandbox, a harness, a private PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.dev.embedded import EmbeddedPostgres
from relay.dev.sandbox.server import Faults, Sandbox, SandboxConfig
from tests.chaos.kit import Harness
from tests.relaykit import create_migrated_database

PRIVATE_DB = "chaos"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # A few milliseconds per PUT, so that requests are really in flight when something breaks.
    with Sandbox(SandboxConfig(seed=11, faults=Faults(latency=0.005))) as sb:
        yield sb


@pytest.fixture
def chaos(database_url: str, sandbox: Sandbox, tmp_path: Path) -> Iterator[Harness]:
    """A harness on a fresh database of the shared session server (never stopped here)."""
    harness = Harness(database_url, sandbox, tmp_path)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def private_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, free to stop, restart or crowd; a migrated ``chaos`` database."""
    pg = EmbeddedPostgres(fsync=False).start()
    try:
        create_migrated_database(pg.url("postgres"), PRIVATE_DB, pg.url(PRIVATE_DB))
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def private_chaos(private_pg: EmbeddedPostgres, sandbox: Sandbox, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(private_pg.url(PRIVATE_DB), sandbox, tmp_path)
    try:
        yield harness
    finally:
        harness.close()
