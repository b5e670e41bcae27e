"""Install as README "Run as a service" says: a wheel built from the checkout, installed into a
fresh venv outside it, migrates a database with the schema it carries, and brings the README
that the systemd unit's ``Documentation=`` names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from relay.pg.migrations import latest_version

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "outbox-relay.service"
VENV = "/opt/outbox-relay"  # where README "Run as a service" installs it


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PYTHON", "VIRTUAL_ENV"))}
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_wheel_installed_outside_the_checkout_migrates_and_ships_its_docs(
    tmp_path: Path, empty_database_url: str
) -> None:
    built = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", built, ROOT, cwd=tmp_path)
    [wheel] = built.glob("outbox_relay-*.whl")

    venv = tmp_path / "opt-outbox-relay"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    # The dependencies come from the test environment's site-packages, after the venv's own: the
    # relay package itself is the wheel's (the checkout's editable hook is not read from there).
    site = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = _run(python, "-c", "import relay; print(relay.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    command = venv / "bin" / "outbox-relay"
    migrated = _run(command, "migrate", cwd=tmp_path, env={"RELAY_DATABASE_URL": empty_database_url})
    assert migrated.stdout.splitlines()[-1] == f"schema is at version {latest_version()}"
    roles = _run(command, "migrate", "--roles-sql", cwd=tmp_path)
    assert roles.stdout.startswith("-- Group roles") and roles.stdout.endswith("end $$;\n")

    # Documentation= names the README installed with the package, at the README's venv path.
    [doc] = re.findall(r"^Documentation=file:(\S+)$", UNIT.read_text(encoding="utf-8"), re.MULTILINE)
    assert doc.startswith(VENV + "/")
    installed = venv / doc.removeprefix(VENV + "/")
    assert installed.read_text(encoding="utf-8") == (ROOT / "README.md").read_text(encoding="utf-8")
    assert (
        venv / "share" / "outbox-relay" / "systemd" / "outbox-relay.service"
    ).read_bytes() == UNIT.read_bytes()
    # Every file of systemd/ (the units, the console's included, and the examples), as it is.
    shipped = sorted(path.name for path in (ROOT / "systemd").iterdir())
    assert "outbox-relay-web.service" in shipped
    for name in shipped:
        installed_unit = venv / "share" / "outbox-relay" / "systemd" / name
        assert installed_unit.read_bytes() == (ROOT / "systemd" / name).read_bytes(), name
