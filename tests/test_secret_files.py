"""Secrets at rest: secret files open to group or other users are refused (systemd credentials are
accepted as they are), and a config file holding a secret inline must not be readable by all."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.settings import load_settings
from tests.relaykit import cli


def _write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def _refused(path: Path, name: str, mode: int) -> str:
    return (
        f"outbox-relay: {name}: {path} has mode {mode:04o}, refused: group or other users can access "
        f"it; run chmod 600 {path}\n"
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_token_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    token = _write(tmp_path / "token", "tok\n", mode)
    result = cli("check", env={"RELAY_API_TOKEN_FILE": str(token)})
    assert (result.returncode, result.stderr) == (2, _refused(token, "RELAY_API_TOKEN_FILE", mode))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_token_file_is_accepted(tmp_path: Path, mode: int) -> None:
    token = _write(tmp_path / "token", "tok\n", mode)
    loaded = load_settings(None, {"RELAY_API_TOKEN_FILE": str(token)})
    assert loaded.targets["default"].token is not None
    assert loaded.targets["default"].token.reveal() == "tok"


def test_every_kind_of_secret_file_is_checked(tmp_path: Path) -> None:
    secret = _write(tmp_path / "client-secret", "s3cret\n", 0o644)
    config = _write(
        tmp_path / "relay.toml",
        f'[targets.eu]\noauth_client_id = "id"\noauth_client_secret_file = "{secret}"\n',
        0o644,
    )
    result = cli("--config", str(config), "check")
    assert (result.returncode, result.stderr) == (
        2,
        _refused(secret, "targets.eu.oauth_client_secret_file", 0o644),
    )

    db_url = _write(tmp_path / "database-url", "postgresql://relay:pw@db/app\n", 0o640)
    result = cli("check", env={"RELAY_DATABASE_URL_FILE": str(db_url)})
    assert (result.returncode, result.stderr) == (2, _refused(db_url, "RELAY_DATABASE_URL_FILE", 0o640))
    config = _write(tmp_path / "db.toml", f'database_url_file = "{db_url}"\n', 0o644)
    result = cli("--config", str(config), "check")
    assert (result.returncode, result.stderr) == (2, _refused(db_url, "database_url_file", 0o640))


def test_systemd_credentials_are_accepted_as_they_are(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    _write(creds / "api-token", "from-credential\n", 0o644)
    _write(creds / "eu.api-token", "eu-token\n", 0o644)
    _write(creds / "database-url", "postgresql://relay:pw@db/app\n", 0o644)
    config = _write(
        tmp_path / "relay.toml", f'[targets.eu]\ntoken_file = "{creds / "eu.api-token"}"\n', 0o644
    )
    loaded = load_settings(str(config), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert loaded.targets["default"].token is not None and loaded.targets["eu"].token is not None
    assert loaded.targets["default"].token.reveal() == "from-credential"
    assert loaded.targets["eu"].token.reveal() == "eu-token"
    assert loaded.database_url is not None and loaded.database_url.reveal() == "postgresql://relay:pw@db/app"
    # outside the credentials directory the same mode is refused
    elsewhere = _write(tmp_path / "eu.api-token", "eu-token\n", 0o644)
    config.write_text(f'[targets.eu]\ntoken_file = "{elsewhere}"\n', encoding="utf-8")
    result = cli("--config", str(config), "check", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert (result.returncode, result.stderr) == (2, _refused(elsewhere, "targets.eu.token_file", 0o644))


INLINE = {
    "targets.default.token": '[targets.default]\ntoken = "tok"\n',
    "targets.eu.oauth_client_secret": '[targets.eu]\noauth_client_id = "id"\noauth_client_secret = "s3cret"\n',
    "database_url": 'database_url = "postgresql://relay:pw@db/app"\n',
    "proxy": 'proxy = "https://relay:pr0xy@proxy.example.com"\n',
    "targets.eu.proxy": '[targets.eu]\nproxy = "https://relay:pr0xy@proxy.example.com"\n',
}


@pytest.mark.parametrize("key", list(INLINE))
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o646])
def test_an_inline_secret_in_a_world_readable_config_is_refused(tmp_path: Path, key: str, mode: int) -> None:
    config = _write(tmp_path / "relay.toml", INLINE[key], mode)
    result = cli("--config", str(config), "check")
    assert result.returncode == 2
    assert result.stderr == (
        f"outbox-relay: config file {config}: holds the secret {key} inline but has mode {mode:04o}, readable "
        f"by every user; run chmod 600 {config} (or 640 for a group), or move the secret to a *_file setting\n"
    )


@pytest.mark.parametrize("key", list(INLINE))
@pytest.mark.parametrize("mode", [0o640, 0o600])
def test_an_inline_secret_in_a_private_or_group_readable_config_is_accepted(
    tmp_path: Path, key: str, mode: int
) -> None:
    config = _write(tmp_path / "relay.toml", INLINE[key], mode)
    assert load_settings(str(config), {}).targets["default"] is not None


def test_a_world_readable_config_without_inline_secrets_is_fine(tmp_path: Path) -> None:
    token = _write(tmp_path / "token", "tok\n", 0o600)
    config = _write(
        tmp_path / "relay.toml",
        f'database_url = "postgresql://relay@db/app"\n'
        f'proxy = "https://proxy.example.com"\n[targets.default]\ntoken_file = "{token}"\n',
        0o644,
    )
    loaded = load_settings(str(config), {})
    assert loaded.targets["default"].token is not None and loaded.targets["default"].token.reveal() == "tok"
