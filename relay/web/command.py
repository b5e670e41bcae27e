"""``outbox-relay web``: the audit console, a process of its own (never inside the daemon).

Only argparse and the settings at import: the web stack (Starlette, uvicorn, Jinja2; the ``web``
extra) is imported when the console starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

from relay.errors import ConfigError, RelayError, SchemaError
from relay.settings import Secret, Settings, host_port, is_loopback_host

log = logging.getLogger("relay.web")

HELP = "the audit console: find any action and its timeline, overview, dead letters and redrive"
DESCRIPTION = """\
Serve the web audit console: find an action by id, by the start of one or from a pasted list,
and read its whole timeline (each request with its HTTP status, the API's code, message and
kept body, re-queues with who and why, whether a request may have reached the API); lists of
updates by state, target, status, error code and UTC days, newest first, with a CSV export; an
overview (rows per state and target, the oldest waiting row, deliveries and dead letters per
minute over 24 hours, live relays and paused targets); dead letters by error code and their
redrive (select rows or a whole group, a dry-run count, a reason, a confirmation: the rules of
`dead retry`).

It connects with web_database_url (RELAY_WEB_DATABASE_URL), else database_url: that role decides
what it may do. With outbox_auditor it is read only (no redrive control; a redrive request is
answered 403); with outbox_operator it may redrive.

It listens on 127.0.0.1:8089 unless --listen (or web_listen) says otherwise. Any address other
than loopback needs a sign-in token: create one with --new-token and put the hash it prints in
web_token_hash (RELAY_WEB_TOKEN_HASH). Put it behind a TLS reverse proxy when it leaves the host.
Needs the web extra: pip install 'outbox-relay[web]'.

examples:
  outbox-relay web
  RELAY_WEB_DATABASE_URL=postgresql://auditor@db/app outbox-relay web --listen 127.0.0.1:8090
  outbox-relay web --new-token
  RELAY_WEB_TOKEN_HASH=sha256:... outbox-relay web --listen 0.0.0.0:8089"""


def listen_address(text: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` (also ``demo --web``), a usage error when malformed."""
    try:
        return host_port(text, "--listen")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--listen: ")) from None


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("web", cmd_web, HELP, DESCRIPTION)
    p.add_argument(
        "--listen",
        type=listen_address,
        metavar="HOST:PORT",
        help="where to serve (default: web_listen, else 127.0.0.1:8089); not loopback: needs web_token_hash",
    )
    p.add_argument(
        "--new-token",
        action="store_true",
        help="print a new sign-in token and the web_token_hash line for it, then exit",
    )


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    if args.new_token:
        from relay.web.security import new_token, token_hash

        token = new_token()
        print(f"token (give it to the console's users; it is not stored anywhere): {token}")
        print(f'config file:  web_token_hash = "{token_hash(token)}"')
        print(f"or variable:  RELAY_WEB_TOKEN_HASH={token_hash(token)}")
        return 0
    host, port = args.listen or settings.web_listen
    if not is_loopback_host(host) and settings.web_token_hash is None:
        raise ConfigError(
            f"web: listening on {host}:{port} (not loopback) needs a sign-in token: set web_token_hash "
            "(RELAY_WEB_TOKEN_HASH) to what `outbox-relay web --new-token` prints"
        )
    url = settings.web_database_url or settings.database_url
    if url is None:
        raise ConfigError(
            "web: no database configured: set RELAY_WEB_DATABASE_URL (web_database_url, or the "
            "web-database-url credential), else RELAY_DATABASE_URL"
        )
    require_web_stack()
    from relay.service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_plain)
    sock = bind(host, port)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return asyncio.run(serve(url, settings, sock))
    except _Stopped:
        return 0  # SIGTERM (systemctl stop): open requests finished, connections closed
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Stopped(Exception):
    """SIGTERM, raised where uvicorn hands the signal back once it has stopped serving."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def _plain(record: logging.LogRecord) -> bool:
    """uvicorn's records carry a terminal-coloured copy of the message: not for the log."""
    record.__dict__.pop("color_message", None)
    return True


def require_web_stack() -> None:
    """The web extra is installed, or a one-line error saying how to install it."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"web: the console needs the web extra ({exc.name} is missing): pip install 'outbox-relay[web]'"
        ) from None


def bind(host: str, port: int) -> socket.socket:
    """The console's listening socket (bound here, so a taken port is one line, not a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RelayError(f"web: cannot listen on {host}:{port}: {reason}") from None
    # Accepted connections inherit it: a page's body goes out with its headers instead of waiting
    # for the browser's delayed ACK (40 ms a request on a kept-alive connection; asyncio sets it
    # only on sockets created with IPPROTO_TCP, which create_server's are not).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def serve(
    url: Secret,
    settings: Settings,
    sock: socket.socket,
    ready: Callable[[str], None] | None = None,
    announce: bool = True,
) -> int:
    """Serve the console on ``sock`` until SIGINT/SIGTERM; ``ready`` is told its address and,
    with ``announce``, it is printed on stdout."""
    import uvicorn

    from relay.pg.store import Store
    from relay.web.app import create_app
    from relay.web.data import capabilities
    from relay.web.security import Guard

    store = Store(url, pool_size=4, application_name="outbox-relay web")
    try:
        if await store.schema_version() == 0:
            raise SchemaError("the outbox schema is missing: run `outbox-relay migrate`")
        caps = await capabilities(store)
        host, port = sock.getsockname()[:2]
        loopback = is_loopback_host(host)
        app = create_app(
            store, Guard(settings.web_token_hash), loopback_only=loopback and not settings.web_token_hash
        )
        shown = f"[{host}]" if ":" in host else host
        address = f"http://{shown}:{port}/"
        rights = "redrive allowed" if caps.may_redrive else "read only"
        log.info(
            "web console listening",
            extra={
                "address": address,
                "role": caps.role,
                "rights": rights,
                "sign_in": bool(settings.web_token_hash),
            },
        )
        if announce:
            print(
                f"outbox-relay web: {address} (database role {caps.role}: {rights}); Ctrl-C stops it",
                flush=True,
            )
        if ready:
            ready(address)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=True,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        try:
            await uvicorn.Server(config).serve(sockets=[sock])
        finally:
            log.info("web console stopped")
        return 0
    finally:
        await store.close()
        sys.stdout.flush()
