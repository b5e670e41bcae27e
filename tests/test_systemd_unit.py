"""The systemd unit and the example configuration files under systemd/."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from relay import settings as settings_module
from relay.settings import DEFAULT_TARGET, Settings, TargetSettings, load_settings
from tests.conftest import Server
from tests.relaykit import cli, free_port, login_roles, wait_until

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "outbox-relay.service"
TEMPLATE = SYSTEMD_DIR / "outbox-relay@.service"
WEB_UNIT = SYSTEMD_DIR / "outbox-relay-web.service"
ENV_EXAMPLE = SYSTEMD_DIR / "outbox-relay.env.example"
CONFIG_EXAMPLE = SYSTEMD_DIR / "config.toml.example"
SETTINGS_SOURCE = Path(settings_module.__file__)

# `systemd-analyze security --offline=yes` gave 1.1 before IPAddressDeny=, SocketBind*=, LimitCORE=
# and Memory*= were added, and 1.1 after (systemd 252): the new lines must not make it worse.
MAX_EXPOSURE = 1.1
# Peak RSS measured with the default settings: 68 MB idle, 75 MB over the 200,000-row soak and in
# the hostile-answers test (README "Performance" and "Reliability").
MEASURED_PEAK_MB = 75
# The audit console's, against `outbox-relay demo --rows 2000 --keep`'s database: 48 MB idle,
# 51 MB after 400 page loads, 60 MB over 3,000 page loads from 8 clients at once.
WEB_MEASURED_PEAK_MB = 60
# Each unit, its measured peak RSS and the figures its comment must state.
MEMORY = {UNIT: (MEASURED_PEAK_MB, ("68 MB",)), WEB_UNIT: (WEB_MEASURED_PEAK_MB, ("48 MB", "51 MB"))}
# The relay's unit and the console's: the checks that hold for both run over both.
UNITS = pytest.mark.parametrize("unit", [UNIT, WEB_UNIT], ids=["relay", "web"])


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
    )
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [_systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def _directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values...]}}``; repeated keys keep every value in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit_for_verify(tmp_path: Path, extra: str = "", unit: Path = UNIT) -> Path:
    """A copy of the unit whose ExecStart= names an executable that exists here.

    ``systemd-analyze verify`` checks that ExecStart='s binary exists; /usr/local/bin/outbox-relay
    is where ``pip install`` puts the script on a real host, but not on this test machine, so the
    copy runs ``sys.executable -m relay COMMAND`` instead (``run``, ``web``). Nothing else is changed.
    """
    text = unit.read_text(encoding="utf-8")
    found = re.findall(r"^ExecStart=/usr/local/bin/outbox-relay (\w+)\n", text, flags=re.MULTILINE)
    assert len(found) == 1, found
    original = f"ExecStart=/usr/local/bin/outbox-relay {found[0]}\n"
    text = text.replace(original, f"ExecStart={sys.executable} -m relay {found[0]}\n{extra}")
    copy = tmp_path / unit.name
    copy.write_text(text, encoding="utf-8")
    return copy


# --- systemd-analyze -----------------------------------------------------------------------------


@UNITS
def test_security_exposure_is_low(unit: Path) -> None:
    result = _analyze("security", "--offline=yes", str(unit))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure score in the output (rc={result.returncode}):\n{output}"
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{output}"


@UNITS
def test_verify_is_clean(tmp_path: Path, unit: Path) -> None:
    copy = _unit_for_verify(tmp_path, unit=unit)
    result = _analyze("verify", str(copy))
    output = (result.stdout + result.stderr).strip()
    about_unit = [line for line in output.splitlines() if "outbox-relay" in line or str(tmp_path) in line]
    assert about_unit == [], output
    assert result.returncode == 0, output


@UNITS
def test_verify_would_notice_a_broken_unit(tmp_path: Path, unit: Path) -> None:
    """The check above is not vacuous: verify does report problems in the copied unit."""
    copy = _unit_for_verify(tmp_path, extra="NoSuchDirective=1\n", unit=unit)
    result = _analyze("verify", str(copy))
    output = result.stdout + result.stderr
    assert "NoSuchDirective" in output, output


@pytest.mark.parametrize(
    ("line", "reported"),
    [
        ("LimitCORE=x", "x"),
        ("MemoryMax=lots", "lots"),
        ("IPAddressDeny=169.254.0.0/99", "169.254.0.0/99"),
        ("SocketBindAllow=tcp:notaport", "tcp:notaport"),
    ],
)
@UNITS
def test_verify_would_notice_a_bad_hardening_value(
    tmp_path: Path, line: str, reported: str, unit: Path
) -> None:
    """systemd ignores a value it cannot parse (the unit still starts, unhardened); verify says so,
    so test_verify_is_clean would catch a typo in the lines it protects."""
    copy = _unit_for_verify(tmp_path, extra=f"{line}\n", unit=unit)
    result = _analyze("verify", str(copy))
    output = result.stdout + result.stderr
    about = [text.split(str(copy), 1)[1] for text in output.splitlines() if str(copy) in text]
    assert len(about) == 1 and "ignoring" in about[0] and reported in about[0], output


# --- the unit's settings ------------------------------------------------------------------------


def test_unit_service_settings() -> None:
    service = _directives(UNIT)["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/outbox-relay run",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartSec": "5s",
        "RestartPreventExitStatus": "2",
        "TimeoutStopSec": "30s",
        "KillSignal": "SIGTERM",
        "DynamicUser": "yes",
        "EnvironmentFile": "-/etc/outbox-relay/outbox-relay.env",
        "Environment": "RELAY_CONFIG=/etc/outbox-relay/config.toml",
        "MemoryDenyWriteExecute": "yes",
        "ProtectSystem": "strict",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], (key, service.get(key))
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # The API must stay reachable: no network namespace and no IP allow-list.
    for key in ("PrivateNetwork", "IPAddressAllow"):
        assert key not in service


# --- least privilege and secrets at rest ---------------------------------------------------------


@UNITS
def test_no_core_dumps(unit: Path) -> None:
    """A core dump would hold the database URL and the API token in clear."""
    assert _directives(unit)["Service"]["LimitCORE"] == ["0"]


def _megabytes(value: str) -> float:
    match = re.fullmatch(r"(\d+)([KMG]?)", value)
    assert match, f"not a plain size: {value!r}"
    factor = {"": 1 / 2**20, "K": 1 / 2**10, "M": 1, "G": 2**10}[match.group(2)]
    return int(match.group(1)) * factor


@UNITS
def test_memory_is_capped_with_room_above_the_measured_peak(unit: Path) -> None:
    peak, figures = MEMORY[unit]
    service = _directives(unit)["Service"]
    assert len(service["MemoryHigh"]) == len(service["MemoryMax"]) == 1
    high, limit = _megabytes(service["MemoryHigh"][0]), _megabytes(service["MemoryMax"][0])
    # Throttling starts well above the peak (page cache and socket buffers count too)...
    assert high >= 2 * peak, high
    # ...and below the kill limit, which leaves at least 3 x the peak...
    assert high < limit, (high, limit)
    assert limit >= 3 * peak, limit
    # ...but still catches a leak long before it hurts the host.
    assert limit <= 1024, limit
    # The reasoning is written next to the figures, with the figures it rests on.
    text = unit.read_text(encoding="utf-8")
    for figure in (*figures, f"{peak} MB"):
        assert figure in text, figure


def _denied(unit: Path = UNIT) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    values = " ".join(_directives(unit)["Service"]["IPAddressDeny"]).split()
    # Prefixes only: "any", "localhost", "link-local" or "multicast" would be easy to widen by mistake.
    keywords = [value for value in values if not re.fullmatch(r"[0-9A-Fa-f.:/]+", value)]
    assert keywords == [], f"IPAddressDeny= takes prefixes only here, not {keywords}"
    return [ipaddress.ip_network(value) for value in values]


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "169.254.0.1", "fe80::1"])
@UNITS
def test_link_local_and_metadata_addresses_are_denied(address: str, unit: Path) -> None:
    ip = ipaddress.ip_address(address)
    assert any(ip in network for network in _denied(unit)), address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # a local PostgreSQL or proxy
        "::1",
        "10.1.2.3",  # a database or proxy on a private network
        "172.16.5.4",
        "192.168.1.10",
        "fd12:3456::1",  # a unique-local IPv6 network other than AWS's metadata address
        "104.18.30.1",  # a CDN in front of the API
        "2606:4700::6810:1e01",
    ],
)
@UNITS
def test_the_api_and_the_database_stay_reachable(address: str, unit: Path) -> None:
    ip = ipaddress.ip_address(address)
    assert not any(ip in network for network in _denied(unit)), address


@UNITS
def test_ip_deny_list_holds_only_link_local_and_metadata_prefixes(unit: Path) -> None:
    link_local = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10")]
    metadata = {ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128")}
    for network in _denied(unit):
        inside = any(
            network.network_address in outer and network.broadcast_address in outer for outer in link_local
        )
        assert inside or network in metadata, network
    assert set(link_local) | metadata <= set(_denied(unit))


def _metrics_port_of_the_examples() -> int:
    config = re.findall(r'^# metrics_listen = "([^"]+)"$', CONFIG_EXAMPLE.read_text(encoding="utf-8"), re.M)
    env = re.findall(r"e\.g\. (\S+:\d+)\. Default: off", ENV_EXAMPLE.read_text(encoding="utf-8"))
    ports = {settings_module.host_port(value)[1] for value in config + env}
    assert len(ports) == 1 and config and env, (config, env)
    return ports.pop()


def test_binding_is_denied_but_for_the_metrics_port() -> None:
    service = _directives(UNIT)["Service"]
    assert service["SocketBindDeny"] == ["any"]
    assert service["SocketBindAllow"] == [f"tcp:{_metrics_port_of_the_examples()}"]
    # The port is what the examples show; an operator who picks another must change the unit.
    assert "must change this line" in UNIT.read_text(encoding="utf-8")
    assert Settings().metrics_listen is None  # metrics are off unless configured


def test_graceful_shutdown_fits_in_the_stop_timeout() -> None:
    service = _directives(UNIT)["Service"]
    stop = settings_module.parse_duration(service["TimeoutStopSec"][0], "TimeoutStopSec")
    assert Settings().shutdown_timeout < stop


@pytest.mark.parametrize(
    ("unit", "idents"),
    [
        (UNIT, ["database-url", "api-token", "oauth-client-secret"]),
        # The console gets its own URL only, never the relay's database-url or API secrets.
        (WEB_UNIT, ["web-database-url"]),
    ],
    ids=["relay", "web"],
)
def test_credentials_match_what_settings_reads(unit: Path, idents: list[str]) -> None:
    creds = [v.partition(":") for v in _directives(unit)["Service"]["LoadCredential"]]
    assert [ident for ident, _, _ in creds] == idents
    source_code = SETTINGS_SOURCE.read_text(encoding="utf-8")
    for ident, _, source in creds:
        # Bare names (searched in /etc/credstore/ and skipped when absent), never absolute
        # paths, which systemd 252 treats as fatal when the file is missing.
        assert source == f"outbox-relay.{ident}", source
        assert ident in source_code, ident


def test_credentials_reach_settings(tmp_path: Path) -> None:
    """What LoadCredential= puts in $CREDENTIALS_DIRECTORY is what load_settings picks up."""
    (tmp_path / "database-url").write_text("postgresql://relay:pw@db/app\n", encoding="utf-8")
    (tmp_path / "api-token").write_text("tok\n", encoding="utf-8")
    loaded = load_settings(str(CONFIG_EXAMPLE), environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert loaded.require_database_url().reveal() == "postgresql://relay:pw@db/app"
    token = loaded.targets[DEFAULT_TARGET].token
    assert token is not None and token.reveal() == "tok"


# --- the example configuration -------------------------------------------------------------------


def _without_relay_id(value: Settings) -> Settings:
    return dataclasses.replace(value, relay_id="x")


def test_config_example_loads_as_is_with_the_defaults() -> None:
    loaded = load_settings(str(CONFIG_EXAMPLE), environ={})
    assert _without_relay_id(loaded) == _without_relay_id(Settings())
    assert dict(loaded.targets) == {DEFAULT_TARGET: TargetSettings(DEFAULT_TARGET)}


def test_config_example_shows_every_key() -> None:
    text = CONFIG_EXAMPLE.read_text(encoding="utf-8")
    shown = set(re.findall(r"^(?:# )?([a-z_]+) = ", text, flags=re.MULTILINE))
    keys = (settings_module._TOP_KEYS - {"retry", "breaker", "targets"}) | settings_module._TARGET_KEYS
    keys |= {f.name for f in dataclasses.fields(settings_module.RetrySettings)}
    keys |= {f.name for f in dataclasses.fields(settings_module.BreakerSettings)}
    assert keys - shown == set()
    for table in ("[retry]", "[breaker]", "[targets.default]", "# [targets.eu]"):
        assert f"\n{table}\n" in text, table


def test_config_example_second_target_loads_when_uncommented(tmp_path: Path) -> None:
    text = CONFIG_EXAMPLE.read_text(encoding="utf-8")
    block = text[text.index("# [targets.eu]") :]
    uncommented = re.sub(r"^# (\[targets\.eu\]|[a-z_]+ = .*)$", r"\1", block, flags=re.MULTILINE)
    config = tmp_path / "config.toml"
    config.write_text(text.replace(block, uncommented), encoding="utf-8")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "eu.oauth-client-secret").write_text("eu-secret\n", encoding="utf-8")

    loaded = load_settings(str(config), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    eu = loaded.targets["eu"]
    assert eu.auth_kind == "oauth"
    assert eu.oauth is not None and eu.oauth.client_id == "eu-client-id"
    assert eu.oauth.client_secret.reveal() == "eu-secret"
    assert (eu.max_concurrency, eu.rate_limit) == (16, 20.0)
    assert loaded.targets[DEFAULT_TARGET].auth_kind == "none"


# --- the example environment file ---------------------------------------------------------------


def _env_lines() -> list[tuple[str, str]]:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert not re.search(r"^RELAY_", text, flags=re.MULTILINE), "every variable must stay commented"
    return re.findall(r"^#(RELAY_[A-Z_]+)=(.*)$", text, flags=re.MULTILINE)


def test_env_example_lists_every_variable_once() -> None:
    names = [name for name, _ in _env_lines()]
    known = set(re.findall(r'"(RELAY_[A-Z_]+)"', SETTINGS_SOURCE.read_text(encoding="utf-8")))
    assert len(names) == len(set(names))
    assert known - {"RELAY_"} <= set(names), known - set(names)
    assert set(names) <= known


def test_env_example_defaults_are_the_real_defaults() -> None:
    env = {name: value for name, value in _env_lines() if value and name != "RELAY_CONFIG"}
    assert len(env) >= 10  # the regex did find the documented defaults
    loaded = load_settings(None, environ=env)
    assert _without_relay_id(loaded) == _without_relay_id(Settings())


def test_env_example_config_path_matches_the_unit() -> None:
    config = dict(_env_lines())["RELAY_CONFIG"]
    assert _directives(UNIT)["Service"]["Environment"] == [f"RELAY_CONFIG={config}"]


# --- the template unit: several relays on one host ---------------------------------------------

# What outbox-relay@.service may set differently from outbox-relay.service; everything else (the
# hardening, credentials, timeouts, memory) must be the same, line for line.
TEMPLATE_OWN = {"Description", "Environment", "EnvironmentFile", "SocketBindAllow"}


def _instance_for_verify(tmp_path: Path, extra: str = "") -> Path:
    """The template copied as :func:`_unit_for_verify` does, and the path of its instance 1."""
    copy = _unit_for_verify(tmp_path, extra, TEMPLATE)
    return copy.with_name("outbox-relay@1.service")


def test_template_verify_is_clean(tmp_path: Path) -> None:
    instance = _instance_for_verify(tmp_path)
    result = _analyze("verify", str(instance))
    output = (result.stdout + result.stderr).strip()
    about_unit = [line for line in output.splitlines() if "outbox-relay" in line or str(tmp_path) in line]
    assert about_unit == [], output
    assert result.returncode == 0, output


def test_template_verify_would_notice_a_broken_unit(tmp_path: Path) -> None:
    instance = _instance_for_verify(tmp_path, extra="NoSuchDirective=1\n")
    result = _analyze("verify", str(instance))
    output = result.stdout + result.stderr
    assert "NoSuchDirective" in output, output


def test_template_security_exposure_is_as_low_as_the_units(tmp_path: Path) -> None:
    instance = _instance_for_verify(tmp_path)
    result = _analyze("security", "--offline=yes", str(instance))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure score in the output (rc={result.returncode}):\n{output}"
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_template_is_the_unit_but_for_the_instances_own_lines() -> None:
    unit, template = _directives(UNIT), _directives(TEMPLATE)
    assert template.keys() == unit.keys()
    for section, directives in unit.items():
        same = {k: v for k, v in template[section].items() if k not in TEMPLATE_OWN}
        assert same == {k: v for k, v in directives.items() if k not in TEMPLATE_OWN}, section
    service = template["Service"]
    assert service["Environment"] == [*unit["Service"]["Environment"], "RELAY_ID=%H-%i"]
    assert service["EnvironmentFile"] == [
        *unit["Service"]["EnvironmentFile"],
        "-/etc/outbox-relay/outbox-relay@%i.env",
    ]
    assert "%i" in template["Unit"]["Description"][0]


def test_template_allows_one_metrics_port_per_instance() -> None:
    (allowed,) = _directives(TEMPLATE)["Service"]["SocketBindAllow"]
    low, _, high = allowed.removeprefix("tcp:").partition("-")
    assert int(low) == _metrics_port_of_the_examples() and int(high) - int(low) + 1 >= 2
    assert _directives(TEMPLATE)["Service"]["SocketBindDeny"] == ["any"]


# --- the audit console's unit -------------------------------------------------------------------

# What outbox-relay-web.service sets differently from outbox-relay.service: how it starts and stops
# (no sd_notify, no watchdog), its credential, its port, its memory. The sandboxing is the relay's,
# line for line.
WEB_OWN = {
    "Description",
    "Type",
    "NotifyAccess",
    "ExecStart",
    "TimeoutStartSec",
    "WatchdogSec",
    "TimeoutStopSec",
    "LoadCredential",
    "SocketBindAllow",
    "MemoryHigh",
    "MemoryMax",
}
WEB_COMMAND = Path(settings_module.__file__).parent / "web" / "command.py"


def test_web_unit_is_sandboxed_as_the_relays_unit() -> None:
    unit, web = _directives(UNIT), _directives(WEB_UNIT)
    assert web.keys() == unit.keys()
    for section, directives in unit.items():
        same = {k: v for k, v in web[section].items() if k not in WEB_OWN}
        assert same == {k: v for k, v in directives.items() if k not in WEB_OWN}, section


def test_web_unit_service_settings() -> None:
    service = _directives(WEB_UNIT)["Service"]
    expected = {
        "Type": "exec",
        "ExecStart": "/usr/local/bin/outbox-relay web",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "KillSignal": "SIGTERM",
        "DynamicUser": "yes",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], (key, service.get(key))
    # The console sends no sd_notify: a watchdog or NotifyAccess= would kill or confuse it.
    for key in ("WatchdogSec", "NotifyAccess", "PrivateNetwork", "IPAddressAllow"):
        assert key not in service, key


def _web_port_of_the_examples() -> set[int]:
    config = re.findall(r'^# web_listen = "([^"]+)"$', CONFIG_EXAMPLE.read_text(encoding="utf-8"), re.M)
    env = re.findall(r"^#RELAY_WEB_LISTEN=(\S+)$", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M)
    assert config and env, (config, env)
    return {settings_module.host_port(value)[1] for value in config + env}


def test_web_binding_is_denied_but_for_the_consoles_default_port() -> None:
    service = _directives(WEB_UNIT)["Service"]
    port = Settings().web_listen[1]
    assert service["SocketBindDeny"] == ["any"]
    assert service["SocketBindAllow"] == [f"tcp:{port}"]
    # The default is the port the examples show, and the comment says what to do for another one.
    assert _web_port_of_the_examples() == {port}
    assert "must change this line" in WEB_UNIT.read_text(encoding="utf-8")


def test_web_graceful_shutdown_fits_in_the_stop_timeout() -> None:
    """uvicorn lets open requests finish for timeout_graceful_shutdown seconds after SIGTERM."""
    found = re.findall(r"timeout_graceful_shutdown=(\d+)", WEB_COMMAND.read_text(encoding="utf-8"))
    assert len(found) == 1, found
    stop = settings_module.parse_duration(
        _directives(WEB_UNIT)["Service"]["TimeoutStopSec"][0], "TimeoutStopSec"
    )
    assert int(found[0]) < stop


@pytest.fixture
def auditor_login(pg_server: Server) -> Iterator[str]:
    with login_roles(pg_server.admin_url, {"unit_web_auditor": "outbox_auditor"}):
        yield "unit_web_auditor"


def test_the_console_runs_as_the_unit_starts_it_and_stops_cleanly(
    database_url: str, auditor_login: str, tmp_path: Path
) -> None:
    """The unit's environment (its config file, a credentials directory holding only
    web-database-url): the console serves as that login, and SIGTERM ends it before
    TimeoutStopSec with a status systemd counts as a clean stop, so Restart= does not fire."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    login = make_url(database_url).set(username=auditor_login, password="not-a-secret")
    (creds / "web-database-url").write_text(login.render_as_string(hide_password=False), encoding="utf-8")
    port = free_port()
    env = {
        "RELAY_CONFIG": str(CONFIG_EXAMPLE),
        "CREDENTIALS_DIRECTORY": str(creds),
        "RELAY_WEB_LISTEN": f"127.0.0.1:{port}",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out, log = tmp_path / "web.out", tmp_path / "web.log"
    with out.open("wb") as out_file, log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "web"], env={**base, **env}, stdout=out_file, stderr=log_file
        )
    try:
        announced = f"outbox-relay web: http://127.0.0.1:{port}/ (database role {auditor_login}: read only)"
        started = wait_until(lambda: announced in out.read_text() or proc.poll() is not None, 30)
        assert started and proc.poll() is None, out.read_text() + log.read_text()
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "read only" in page.text
        stop = settings_module.parse_duration(
            _directives(WEB_UNIT)["Service"]["TimeoutStopSec"][0], "TimeoutStopSec"
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(stop)
        # status 0: uvicorn stopped, then our SIGTERM handler ended the process after closing the pool
        assert proc.returncode == 0, (proc.returncode, log.read_text())
        assert "web console stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_console_without_its_credential_stops_the_unit(tmp_path: Path) -> None:
    """No web-database-url (the relay's database-url is not passed to the console): exit status 2,
    which RestartPreventExitStatus= turns into a stopped unit, with one line saying why."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    done = cli("web", env={"RELAY_CONFIG": str(CONFIG_EXAMPLE), "CREDENTIALS_DIRECTORY": str(creds)})
    assert done.returncode == 2, done
    assert (
        done.stderr.startswith("outbox-relay: web: no database configured") and done.stderr.count("\n") == 1
    )
    assert "Traceback" not in done.stderr


# What MemoryDenyWriteExecute= asks of the kernel, in the process itself: PR_SET_MDWE with
# PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+; systemd uses a seccomp filter to the same effect). The
# wrapper proves the policy bites (a writable and executable mapping is refused), then runs the
# command line as the unit does.
_UNDER_MDWE = """
import ctypes, mmap, os, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("no-mdwe", os.strerror(ctypes.get_errno()), flush=True)
    raise SystemExit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("w+x refused", flush=True)
sys.argv = ["outbox-relay", *sys.argv[1:]]
runpy.run_module("relay", run_name="__main__", alter_sys=True)
"""


def test_the_console_serves_under_memory_deny_write_execute(
    database_url: str, auditor_login: str, tmp_path: Path
) -> None:
    """MemoryDenyWriteExecute=yes would make the console fail at the first page that needs W+X
    memory (a JIT, a ctypes trampoline, a C extension that writes code): every kind of page loads."""
    login = make_url(database_url).set(username=auditor_login, password="not-a-secret")
    port = free_port()
    env = {
        "RELAY_WEB_DATABASE_URL": login.render_as_string(hide_password=False),
        "RELAY_WEB_LISTEN": f"127.0.0.1:{port}",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out, log = tmp_path / "web.out", tmp_path / "web.log"
    with out.open("wb") as out_file, log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", _UNDER_MDWE, "web"], env={**base, **env}, stdout=out_file, stderr=log_file
        )
    try:
        wait_until(lambda: "outbox-relay web: http" in out.read_text() or proc.poll() is not None, 30)
        if out.read_text().startswith("no-mdwe"):
            pytest.skip(f"this kernel has no PR_SET_MDWE: {out.read_text().strip()}")
        assert out.read_text().startswith("w+x refused\n"), out.read_text() + log.read_text()
        assert proc.poll() is None, log.read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, follow_redirects=True) as web:
            for path in (
                "/",
                "/chart.svg",
                "/dead",
                "/updates",
                "/updates?state=dead",
                "/updates.csv",
                "/find?q=nothing-like-this",
                "/static/console.css",
            ):
                answer = web.get(path)
                assert answer.status_code == 200, (path, answer.status_code, log.read_text()[-2000:])
        assert proc.poll() is None, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
