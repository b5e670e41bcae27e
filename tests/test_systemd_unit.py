"""The systemd unit and the example configuration files under systemd/."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay import settings as settings_module
from relay.settings import DEFAULT_TARGET, Settings, TargetSettings, load_settings

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "outbox-relay.service"
ENV_EXAMPLE = SYSTEMD_DIR / "outbox-relay.env.example"
CONFIG_EXAMPLE = SYSTEMD_DIR / "config.toml.example"
SETTINGS_SOURCE = Path(settings_module.__file__)

MAX_EXPOSURE = 1.5


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


def _unit_for_verify(tmp_path: Path, extra: str = "") -> Path:
    """A copy of the unit whose ExecStart= names an executable that exists here.

    ``systemd-analyze verify`` checks that ExecStart='s binary exists; /usr/local/bin/outbox-relay
    is where ``pip install`` puts the script on a real host, but not on this test machine, so the
    copy runs ``sys.executable -m relay run`` instead. Nothing else is changed.
    """
    text = UNIT.read_text(encoding="utf-8")
    original = "ExecStart=/usr/local/bin/outbox-relay run\n"
    assert text.count(original) == 1
    text = text.replace(original, f"ExecStart={sys.executable} -m relay run\n{extra}")
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


# --- systemd-analyze -----------------------------------------------------------------------------


def test_security_exposure_is_low() -> None:
    result = _analyze("security", "--offline=yes", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure score in the output (rc={result.returncode}):\n{output}"
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{output}"


def test_verify_is_clean(tmp_path: Path) -> None:
    copy = _unit_for_verify(tmp_path)
    result = _analyze("verify", str(copy))
    output = (result.stdout + result.stderr).strip()
    about_unit = [line for line in output.splitlines() if "outbox-relay" in line or str(tmp_path) in line]
    assert about_unit == [], output
    assert result.returncode == 0, output


def test_verify_would_notice_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: verify does report problems in the copied unit."""
    copy = _unit_for_verify(tmp_path, extra="NoSuchDirective=1\n")
    result = _analyze("verify", str(copy))
    output = result.stdout + result.stderr
    assert "NoSuchDirective" in output, output


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
    for key in ("PrivateNetwork", "IPAddressDeny", "IPAddressAllow"):
        assert key not in service


def test_graceful_shutdown_fits_in_the_stop_timeout() -> None:
    service = _directives(UNIT)["Service"]
    stop = settings_module.parse_duration(service["TimeoutStopSec"][0], "TimeoutStopSec")
    assert Settings().shutdown_timeout < stop


def test_credentials_match_what_settings_reads() -> None:
    creds = [v.partition(":") for v in _directives(UNIT)["Service"]["LoadCredential"]]
    assert [ident for ident, _, _ in creds] == ["database-url", "api-token", "oauth-client-secret"]
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
