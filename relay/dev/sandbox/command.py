"""`outbox-relay sandbox`: the sandbox's options, and serving until a signal."""

from __future__ import annotations

import argparse
import math
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from relay.dev.sandbox.faults import Faults
from relay.dev.sandbox.server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TOKEN,
    Sandbox,
    SandboxConfig,
    _default_clients,
)
from relay.errors import ConfigError
from relay.settings import Settings


def cmd_sandbox(args: argparse.Namespace, settings: Settings) -> int:
    return run_from_args(args)


def register(command: Callable[..., Any]) -> None:
    parser = command(
        "sandbox",
        cmd_sandbox,
        "a local stand-in for the Mirakl Connect API, with fault injection",
        "Serve PUT /v1/orders/actions/{id} and an OAuth2 token endpoint on loopback, behaving like\n"
        "the real API (401, 400 with the API's error body, 404 for unknown ids, ACTION_ALREADY_FINAL\n"
        "for repeats, 204), with optional faults. Point RELAY_API_BASE_URL at it.\n\n"
        "example:\n  outbox-relay sandbox --port 8080 --p503 0.1 --p429 0.05 --latency-ms 50 \\\n"
        "      --log requests.jsonl",
    )
    parser.set_defaults(needs_settings=False)
    add_arguments(parser)


# -- options ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options to ``parser`` (the main CLI's ``sandbox`` command)."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; 0.0.0.0 lets other machines in, "
        "and the sandbox has no TLS)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8080,
        help="TCP port (default: %(default)s; 0 picks a free one, shown in the first line printed)",
    )
    parser.add_argument(
        "--token",
        action="append",
        metavar="TOKEN",
        help=f"a static bearer token to accept; repeat for several (default: {DEFAULT_TOKEN}). "
        "Point the relay's RELAY_API_TOKEN at it",
    )
    parser.add_argument(
        "--oauth-client",
        action="append",
        metavar="ID:SECRET",
        help=f"an OAuth2 client that may get tokens from /oauth/token; repeat for several "
        f"(default: {DEFAULT_CLIENT_ID}:{DEFAULT_CLIENT_SECRET})",
    )
    parser.add_argument(
        "--token-lifetime",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long an issued token is accepted; a few seconds exercises token renewal "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--unknown-prefix",
        default="unknown-",
        metavar="PREFIX",
        help="action ids starting with PREFIX get 404 ACTION_NOT_FOUND, as expired or unknown "
        "actions do; an empty string turns this off (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the fault draws: each action meets the same faults on every run (default: random)",
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        metavar="FILE",
        help="append one JSON line per request to FILE (never a token or secret)",
    )
    _add_fault_arguments(
        parser.add_argument_group(
            "fault injection",
            "Each PUT with a valid token draws its fault, in this order: close, 503, 429, apply-500, "
            "apply-hang. Probabilities go from 0 (never) to 1 (always).",
        )
    )


def _add_fault_arguments(group: argparse._ArgumentGroup) -> None:
    def probability(flag: str, help_text: str) -> None:
        group.add_argument(flag, type=float, default=0.0, metavar="P", help=help_text + " (default: 0)")

    probability("--p503", "answer 503 UNAVAILABLE without applying: a transient outage")
    probability("--p429", "answer 429 with Retry-After without applying: rate limiting")
    group.add_argument(
        "--retry-after",
        type=int,
        default=1,
        metavar="SECONDS",
        help="the Retry-After sent with 429 answers (default: %(default)s)",
    )
    probability(
        "--p-close",
        "close the connection without any answer, without applying: the relay sees "
        "a transport error and must send again",
    )
    probability(
        "--p-apply-500",
        "apply the update, then answer 500: the retry must accept the "
        "400 ACTION_ALREADY_FINAL that follows as delivered",
    )
    probability(
        "--p-apply-hang",
        "apply the update, then hold the connection for --hang-seconds "
        "and close it unanswered: the relay times out although the update landed",
    )
    group.add_argument(
        "--hang-seconds",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long --p-apply-hang holds a connection; make it longer than the relay's request "
        "timeout (default: %(default)s)",
    )
    group.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="milliseconds added to every authorized PUT, to see concurrency at work (default: %(default)s)",
    )


def _parse_client(value: str) -> tuple[str, str]:
    client_id, colon, secret = value.partition(":")
    if not colon or not client_id or not secret:
        raise ConfigError(f"--oauth-client: expected ID:SECRET, got {value!r}")
    return client_id, secret


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """The :class:`SandboxConfig` for options added by :func:`add_arguments`; ConfigError if invalid."""
    latency_ms: float = args.latency_ms
    if not 0.0 <= latency_ms < math.inf:
        raise ConfigError(f"--latency-ms: expected zero or more milliseconds, got {latency_ms!r}")
    faults = Faults(
        p503=args.p503,
        p429=args.p429,
        retry_after=args.retry_after,
        p_close=args.p_close,
        p_apply_500=args.p_apply_500,
        p_apply_hang=args.p_apply_hang,
        hang_seconds=args.hang_seconds,
        latency=latency_ms / 1000.0,
    )
    tokens: list[str] | None = args.token
    clients: list[str] | None = args.oauth_client
    return SandboxConfig(
        host=args.host,
        port=args.port,
        tokens=tuple(tokens) if tokens else (DEFAULT_TOKEN,),
        oauth_clients=dict(_parse_client(c) for c in clients) if clients else _default_clients(),
        token_lifetime=args.token_lifetime,
        unknown_prefix=args.unknown_prefix,
        faults=faults,
        seed=args.seed,
        log_path=args.log,
    )


def format_summary(summary: Mapping[str, Any]) -> str:
    """One human line for :meth:`Sandbox.summary`."""
    by_status = " ".join(f"{k}={v}" for k, v in summary["by_status"].items()) or "-"
    by_fault = " ".join(f"{k}={v}" for k, v in summary["by_fault"].items()) or "-"
    return (
        f"sandbox summary: {summary['requests']} requests, {summary['applied']} applied, "
        f"{summary['duplicates']} duplicates refused, {summary['token_requests']} token requests; "
        f"by status: {by_status}; by fault: {by_fault}"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then print a summary. Call it from the main thread."""
    config = config_from_args(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Sandbox(config) as sandbox:
            print(sandbox.banner(), flush=True)
            while not stop.wait(0.5):
                pass
            summary = sandbox.summary()
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    print(format_summary(summary), flush=True)
    return 0
