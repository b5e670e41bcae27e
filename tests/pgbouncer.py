"""PgBouncer in transaction mode in front of the test PostgreSQL, for the tests that go through it.

Debian's ``pgbouncer`` (1.18: no prepared statements in transaction mode), started with a config
of its own in a temporary folder: ``pool_mode = transaction``, 127.0.0.1 on a free port, no unix
socket, ``auth_type = trust`` and one ``* = host=... port=...`` line, so every database of the
test server is reachable through it. PgBouncer refuses to run as root: then it runs as the
unprivileged user the embedded server runs as (:data:`relay.dev.embedded.SERVER_USER`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.dev.embedded import SERVER_USER


def binary() -> str | None:
    """The pgbouncer program, or None when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


def _params(url: str) -> dict[str, str]:
    return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgBouncer:
    """A running PgBouncer; :meth:`url` turns a direct URL into the same one through it."""

    port: int
    process: subprocess.Popen[bytes]
    folder: Path

    def url(self, direct_url: str) -> str:
        """``direct_url`` with its host and port replaced by PgBouncer's (same user, password, database)."""
        params = _params(direct_url)
        user = quote(params.get("user", ""), safe="")
        password = f":{quote(params['password'], safe='')}" if params.get("password") else ""
        credentials = f"{user}{password}@" if user else ""
        return f"postgresql://{credentials}127.0.0.1:{self.port}/{params.get('dbname', '')}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start(program: str, server_url: str, timeout: float = 20.0) -> PgBouncer:
    """PgBouncer in transaction mode in front of the server ``server_url`` names (any database)."""
    server = _params(server_url)
    host = server.get("host") or "127.0.0.1"
    if host.startswith("/"):
        raise RuntimeError("the test server listens on a unix socket only: PgBouncer needs its TCP port")
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    port = _free_port()
    user = server.get("user") or "postgres"
    password = server.get("password", "").replace('"', '""')
    (folder / "userlist.txt").write_text(f'"{user}" "{password}"\n')  # used to log in to the server
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={host} port={server.get('port') or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {folder / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 500\n"
        "default_pool_size = 20\n"
        "max_db_connections = 40\n"
        "server_reset_query =\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {folder / 'pgbouncer.log'}\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root:  # PgBouncer refuses root; the embedded server's user exists (EmbeddedPostgres made it)
        import pwd

        entry = pwd.getpwnam(SERVER_USER)
        folder.chmod(0o700)
        for path in [folder, *folder.iterdir()]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    process = subprocess.Popen(
        [program, str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=SERVER_USER if as_root else None,
        cwd=folder,
    )
    bouncer = PgBouncer(port, process, folder)
    deadline = time.monotonic() + timeout
    probe = make_conninfo(bouncer.url(server_url), connect_timeout=2)
    while True:
        try:
            with psycopg.connect(probe, autocommit=True) as conn:
                conn.execute("select 1")
            return bouncer
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = bouncer.log
                bouncer.stop()
                raise RuntimeError(f"pgbouncer did not start: {log[-800:]}") from None
            time.sleep(0.1)
