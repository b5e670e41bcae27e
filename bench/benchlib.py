"""Helpers shared by the benchmarks: processes, /proc readings, nginx, PostgreSQL, the relay.

Everything here starts processes of its own and stops exactly those (by pid), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
_T0 = time.monotonic()

ECHO_MODULE_PATHS = (
    "/usr/lib/nginx/modules/ngx_http_echo_module.so",
    "/usr/share/nginx/modules/ngx_http_echo_module.so",
)
CODES = ["ORDER_IN_WRONG_STATE", "DATA_NOT_FOUND", "OTHER", "UNAVAILABLE"]


class BenchError(RuntimeError):
    """A benchmark could not run (missing tool, process died, time limit)."""


def say(message: str) -> None:
    """One progress line, with the seconds since the run started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for our Python children: no RELAY_* from outside, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def stop_process(
    proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 20.0
) -> None:
    """Stop one process we started: ``sig``, then SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


# -- /proc -----------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_ppid(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its direct children that are alive now."""
    total = proc_cpu(root)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and proc_ppid(int(entry.name)) == root:
            total += proc_cpu(int(entry.name))
    return total


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# -- the machine -----------------------------------------------------------------------------
def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    nginx = None
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True)
        match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
        nginx = match.group(1) if match else None
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "httpx": _version("httpx"),
        "httpcore": _version("httpcore"),
        "sniffio": _version("sniffio"),
        "anyio": _version("anyio"),
        "uvloop": _version("uvloop"),
        "psycopg": _version("psycopg"),
        "sqlalchemy": _version("SQLAlchemy"),
        "nginx": nginx,
    }


# -- rows ------------------------------------------------------------------------------------
def sample_updates(n: int, prefix: str, seed: int = 7) -> list[tuple[str, str, str]]:
    """``n`` (action_id, status, errors-json): 70% SUCCESS, 30% FAILED with one to three errors."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < 0.7:
            out.append((f"{prefix}-{i:07d}", "SUCCESS", "[]"))
        else:
            errors = [
                {"code": rng.choice(CODES), "message": f"reason {i}.{k}"} for k in range(rng.randint(1, 3))
            ]
            out.append((f"{prefix}-{i:07d}", "FAILED", json.dumps(errors)))
    return out


INSERT_ROWS = (
    "insert into outbox.action_status_updates (action_id, status, errors, target) "
    "select a, s, cast(e as jsonb), 'default' "
    "from unnest(cast(%s as text[]), cast(%s as text[]), cast(%s as text[])) as t(a, s, e)"
)


def insert_rows(conn: Any, rows: list[tuple[str, str, str]]) -> None:
    """Insert pending rows in one statement (the caller commits): one NOTIFY at commit."""
    conn.execute(INSERT_ROWS, ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))


# -- nginx -----------------------------------------------------------------------------------
def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def echo_module() -> str | None:
    return next((p for p in ECHO_MODULE_PATHS if Path(p).exists()), None)


def ensure_nginx() -> None:
    """nginx and its echo module, installed with apt-get when missing and we are root."""
    if Path(nginx_binary()).exists() and echo_module():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("nginx or libnginx-mod-http-echo missing: installing them with apt-get")
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx", "libnginx-mod-http-echo"],
            check=False,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not Path(nginx_binary()).exists() or not echo_module():
        raise BenchError(
            "the benchmarks need nginx and its echo module: "
            "apt-get install -y nginx libnginx-mod-http-echo (Debian/Ubuntu)"
        )


NGINX_CONF = """\
load_module {module};
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    # The fastest possible API: 204 at once (`return` answers in the rewrite phase).
    server {{
        listen 127.0.0.1:{fast};
        location /v1/orders/actions/ {{ return 204; }}
        location / {{ return 404; }}
    }}
    # 50 ms per request. `return` would answer before echo_sleep runs (rewrite phase comes
    # first), so the 204 is set by echo_status and the content phase sleeps first.
    server {{
        listen 127.0.0.1:{slow};
        location /v1/orders/actions/ {{ echo_sleep 0.05; echo_status 204; }}
        location / {{ return 404; }}
    }}
}}
"""


class Nginx:
    """Our own nginx: two endpoints on 127.0.0.1, its own config, pid and logs in a temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relay-bench-nginx-"))
        self.fast_port = free_port()
        self.slow_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def fast_url(self) -> str:
        return f"http://127.0.0.1:{self.fast_port}"

    @property
    def slow_url(self) -> str:
        return f"http://127.0.0.1:{self.slow_port}"

    def start(self) -> Nginx:
        ensure_nginx()
        conf = self.dir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(module=echo_module(), dir=self.dir, fast=self.fast_port, slow=self.slow_port)
        )
        test = subprocess.run(
            [nginx_binary(), "-t", "-c", str(conf), "-p", str(self.dir), "-e", str(self.dir / "error.log")],
            capture_output=True,
            text=True,
        )
        if test.returncode != 0:
            raise BenchError(f"nginx refused its config: {test.stderr.strip()[-500:]}")
        self.proc = subprocess.Popen(
            [nginx_binary(), "-c", str(conf), "-p", str(self.dir), "-e", str(self.dir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr.log").open("wb"),
        )
        wait_port(self.fast_port)
        wait_port(self.slow_port)
        return self

    def verify(self) -> dict[str, float]:
        """PUT once to each endpoint: 204 from both, about 50 ms from the slow one."""
        import httpx

        found: dict[str, float] = {}
        with httpx.Client() as client:
            for name, url in (("fast", self.fast_url), ("slow", self.slow_url)):
                times = []
                for i in range(5):
                    start = time.perf_counter()
                    answer = client.put(f"{url}/v1/orders/actions/check-{i}", content=b'{"status":"SUCCESS"}')
                    times.append(time.perf_counter() - start)
                    if answer.status_code != 204:
                        raise BenchError(f"nginx {name} endpoint answered {answer.status_code}, not 204")
                found[f"{name}_ms"] = round(1000 * sorted(times)[2], 3)
        if not 45 <= found["slow_ms"] <= 80:
            raise BenchError(f"the slow endpoint took {found['slow_ms']} ms, not about 50 ms")
        return found

    def worker_cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- PostgreSQL ------------------------------------------------------------------------------
class Postgres:
    """A fresh embedded PostgreSQL (fsync on) with a migrated template database."""

    TEMPLATE = "bench_template"

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        from relay.dev.embedded import EmbeddedPostgres

        self.server = EmbeddedPostgres(fsync=True, settings=settings)
        self._count = 0

    def start(self) -> Postgres:
        import psycopg

        self.server.start()
        with psycopg.connect(self.server.url("postgres"), autocommit=True) as conn:
            conn.execute(f"create database {self.TEMPLATE}")
        migrate(self.server.url(self.TEMPLATE))
        return self

    def fresh_database(self) -> str:
        """A new migrated database, copied from the template; returns its URL."""
        import psycopg

        self._count += 1
        name = f"bench_{self._count}"
        with psycopg.connect(self.server.url("postgres"), autocommit=True) as conn:
            conn.execute(f"create database {name} template {self.TEMPLATE}")
            conn.execute("checkpoint")
        return self.server.url(name)

    def version(self) -> str:
        import psycopg

        with psycopg.connect(self.server.url("postgres")) as conn:
            row = conn.execute("select current_setting('server_version')").fetchone()
            return str(row[0]) if row else "?"

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        return None

    def cpu(self) -> float:
        pid = self.postmaster_pid()
        return tree_cpu(pid) if pid else 0.0

    def stop(self) -> None:
        self.server.cleanup()


def migrate(url: str) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "relay", "migrate"],
        cwd=REPO,
        env=child_env(RELAY_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise BenchError(f"outbox-relay migrate failed: {(result.stderr or result.stdout).strip()[-500:]}")


# -- the relay -------------------------------------------------------------------------------
class Relay:
    """``python -m relay run`` (or ``command``) as a child process, with readings from /proc."""

    def __init__(
        self, database_url: str, api_url: str, log_dir: Path, *, command: list[str] | None = None, **env: str
    ) -> None:
        self.database_url = database_url
        self.command = command or [PYTHON, "-m", "relay", "run"]
        self.env = child_env(
            RELAY_DATABASE_URL=database_url,
            RELAY_API_BASE_URL=api_url,
            RELAY_API_TOKEN="bench-token",
            RELAY_LOG_LEVEL="WARNING",
            **env,
        )
        self.log_path = log_dir / f"relay-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Relay:
        """Start it and wait until its LISTEN connection is up (it is then idle and ready)."""
        import psycopg

        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                self.check_alive()
                row = conn.execute(
                    "select count(*) from pg_stat_activity where application_name = 'outbox-relay listener'"
                    " and datname = current_database()"
                ).fetchone()
                if row and row[0] > 0:
                    time.sleep(0.5)  # its first (empty) drain has run by now
                    return self
                time.sleep(0.05)
        raise BenchError(f"the relay did not become ready in {timeout:.0f}s: {self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the relay exited with code {self.proc.returncode}: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss_mb(self) -> float:
        return (proc_status_kb(self.pid, "VmRSS") or 0) / 1024

    def hwm_mb(self) -> float:
        return (proc_status_kb(self.pid, "VmHWM") or 0) / 1024

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 30)


def backlog(conn: Any) -> int:
    """Rows not final yet (uses the partial claimable index)."""
    row = conn.execute(
        "select count(*) from outbox.action_status_updates where state in ('pending', 'in_flight')"
    ).fetchone()
    return int(row[0])


@contextlib.contextmanager
def py_spy(pid: int, out: Path, rate: int = 250) -> Iterator[None]:
    """py-spy recording of ``pid`` (raw collapsed stacks) while the block runs, if py-spy exists."""
    exe = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(exe).exists():
        say("py-spy is not installed (pip install py-spy): no profile")
        yield
        return
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        stop_process(proc, signal.SIGINT, 20)


_LAYERS = (
    (
        "HTTP client (httpx, httpcore, h11, anyio, sniffio)",
        ("httpx/", "httpcore/", "h11/", "anyio/", "sniffio/"),
    ),
    ("database (psycopg, SQLAlchemy)", ("psycopg/", "sqlalchemy/", "psycopg_binary/")),
    ("scheduler (APScheduler)", ("apscheduler/",)),
    ("relay code", ("relay/",)),
    ("event loop (asyncio, selectors)", ("asyncio/", "selectors.py", "socket.py")),
)


def _layer(frame: str) -> str:
    for name, needles in _LAYERS:
        if any(n in frame for n in needles):
            return name
    return "other (stdlib: json, uuid, datetime, logging...)"


def summarize_profile(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: self and inclusive shares by function, self share by
    layer (the package of the innermost frame), and inclusive shares of the relay's functions."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    layers: dict[str, int] = {}
    total = 0
    if not collapsed.exists():
        return {"samples": 0, "self": [], "inclusive": [], "layers": [], "relay": []}
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if frames:
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
            layer = _layer(frames[-1])
            layers[layer] = layers.get(layer, 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count

    def ranked(counts: dict[str, int], n: int = top) -> list[tuple[str, float]]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [(name, round(100.0 * c / total, 1)) for name, c in items]

    relay_frames = {k: v for k, v in incl_counts.items() if "(relay/" in k}
    return {
        "samples": total,
        "self": ranked(self_counts),
        "inclusive": ranked({k: v for k, v in incl_counts.items() if v < 0.97 * total}),
        "layers": ranked(layers, 10),
        "relay": ranked(relay_frames, 20),
    }


# -- CPU accounting over a window --------------------------------------------------------------
def system_busy() -> float:
    """Busy CPU seconds of the whole machine so far (user, nice, system, irq, softirq)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / CLK_TCK


def steal_time() -> float:
    """CPU seconds this virtual machine's cores waited for the host (``steal`` in /proc/stat)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return vals[7] / CLK_TCK if len(vals) > 7 else 0.0


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CpuWindow:
    """CPU used by named sources over a window, and by everything else on the machine.

    ``other_cores`` is the machine's busy time minus ours, per second: other people's
    processes (other sessions' test suites) that competed for the same cores.
    """

    def __init__(self, **sources: Any) -> None:
        self.sources = {"bench": own_cpu, **sources}
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.sys0 = system_busy()
        self.steal0 = steal_time()
        self.v0 = {k: f() for k, f in self.sources.items()}

    def read(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        used = {k: f() - self.v0[k] for k, f in self.sources.items()}
        busy = system_busy() - self.sys0
        return {
            "elapsed_s": round(elapsed, 3),
            "cpu_s": {k: round(v, 3) for k, v in used.items()},
            "machine_busy_cores": round(busy / elapsed, 2) if elapsed else None,
            "other_cores": round(max(0.0, busy - sum(used.values())) / elapsed, 2) if elapsed else None,
            "steal_cores": round((steal_time() - self.steal0) / elapsed, 2) if elapsed else None,
        }


def wait_quiet(max_wait: float, threshold: float = 0.3, own: Any = None) -> float:
    """Wait (at most ``max_wait`` s) until processes not ours use less than ``threshold`` cores.

    ``own`` returns the CPU seconds of our idle processes (nginx, PostgreSQL), subtracted.
    Returns the last reading of the others' load, in cores.
    """
    deadline = time.monotonic() + max_wait
    noted = False
    while True:
        sys0, own0, t0 = system_busy(), (own() if own else 0.0) + own_cpu(), time.perf_counter()
        time.sleep(1.0)
        elapsed = time.perf_counter() - t0
        others = max(0.0, system_busy() - sys0 - ((own() if own else 0.0) + own_cpu() - own0)) / elapsed
        if others < threshold or time.monotonic() > deadline:
            if noted:
                say(
                    f"  machine {'quiet' if others < threshold else 'still busy'}: "
                    f"others use {others:.2f} cores"
                )
            return round(others, 2)
        if not noted:
            say(
                f"  waiting up to {max_wait:.0f}s for other processes to quiet down "
                f"(they use {others:.2f} cores)"
            )
            noted = True


# -- markdown --------------------------------------------------------------------------------
CLI_SECTION = "## CLI start-up and daemon memory"  # written by bench/cli.py, kept by bench/run.py


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def md_section(text: str, heading: str) -> str | None:
    """The section of ``text`` that starts with the line ``heading...``, up to the next ``## ``."""
    match = re.search(rf"^{re.escape(heading)}.*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(0) if match else None


def put_md_section(text: str, heading: str, section: str) -> str:
    """``text`` with its ``heading`` section replaced by ``section``, or ``section`` appended."""
    section = section.rstrip("\n") + "\n"
    old = md_section(text, heading)
    if old is None:
        return text.rstrip("\n") + "\n\n" + section if text.strip() else section
    start = text.index(old)
    rest = text[start + len(old) :]
    return text[:start] + section + ("\n" + rest if rest else "")
