"""`outbox-relay sandbox`: the command-line face of :mod:`relay.dev.sandbox.server`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from relay.settings import Settings


def cmd_sandbox(args: argparse.Namespace, settings: Settings) -> int:
    from relay.dev.sandbox.server import run_from_args

    return run_from_args(args)


def register(command: Callable[..., Any]) -> None:
    from relay.dev.sandbox.server import add_arguments

    parser = command(
        "sandbox", cmd_sandbox, "a local stand-in for the Mirakl Connect API, with fault injection",
        "Serve PUT /v1/orders/actions/{id} and an OAuth2 token endpoint on loopback, behaving like\n"
        "the real API (401, 400 with the API's error body, 404 for unknown ids, ACTION_ALREADY_FINAL\n"
        "for repeats, 204), with optional faults. Point RELAY_API_BASE_URL at it.\n\n"
        "example:\n  outbox-relay sandbox --port 8080 --p503 0.1 --p429 0.05 --latency-ms 50 \\\n"
        "      --log requests.jsonl",
    )  # fmt: skip
    parser.set_defaults(needs_settings=False)
    add_arguments(parser)
