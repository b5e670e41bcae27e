"""The package's layering, checked from the source: which part of relay/ may import which.

    kernel (errors, settings, sanitize, ...)   imports nothing else of relay
    pg (PostgreSQL edge), connect (HTTP edge)  the kernel
    core (the delivery core)                   the kernel and both edges
    service (daemon, metrics, logs)            all of the above
    cli (the operator's surface)               all of the above; dev only inside a command
    web (the audit console)                    all of the above and cli; nothing imports it
                                               (the command line loads it by name)
    dev (sandbox, demo, embedded PostgreSQL)   anything; and nothing but cli imports it

Every import counts, also the ones inside functions, except where noted for cli. A real import
of the daemon's module proves the same at run time: it loads nothing from dev or cli.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
LAYERS = ("core", "pg", "connect", "service", "cli", "web", "dev")
MAY_IMPORT = {
    "kernel": {"kernel"},
    "pg": {"kernel", "pg"},
    "connect": {"kernel", "connect"},
    "core": {"kernel", "core", "pg", "connect"},
    "service": {"kernel", "core", "pg", "connect", "service"},
    "cli": {"kernel", "core", "pg", "connect", "service", "cli"},
    "web": {"kernel", "core", "pg", "connect", "service", "cli", "web"},
    "dev": {"kernel", "core", "pg", "connect", "service", "cli", "web", "dev"},
    "facade": {"kernel", "pg"},  # relay/__init__.py: the public Python API, imported lazily
}


def layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "relay":
        return None
    if len(parts) == 1:
        return "facade"
    return parts[1] if parts[1] in LAYERS else "kernel"


def layer_of_file(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__main__":
        return "cli"  # python -m relay is the command line
    if parts[-1] == "__init__":
        parts.pop()
    return layer_of_module(".".join(parts)) or "kernel"


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, whether at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            # "from relay.cli import report" imports relay.cli.report: judge the deepest name
            found += [(name, node.lineno, id(node) in top) for name in names]
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer_and_the_layers_exist() -> None:
    found = {layer_of_file(path) for path in modules()}
    assert found == {*LAYERS, "kernel", "facade"}, found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_a_module_imports_only_what_its_layer_may(path: Path) -> None:
    layer = layer_of_file(path)
    wrong = []
    for name, line, top_level in imports(path):
        target = layer_of_module(name)
        if target is None or target in MAY_IMPORT[layer]:
            continue
        if layer == "cli" and target == "dev" and not top_level:
            continue  # `outbox-relay demo` and `sandbox` load the tooling when they run
        wrong.append(f"line {line}: {layer} imports {name} ({target})")
    assert not wrong, wrong


def test_the_layering_rules_can_fail() -> None:
    """The checker itself: a service module importing the CLI, or the store importing logs."""
    assert layer_of_module("relay.cli.ops") not in MAY_IMPORT["service"]
    assert layer_of_module("relay.service.logs") not in MAY_IMPORT["pg"]
    assert layer_of_module("relay.dev.sandbox") not in MAY_IMPORT["core"]
    assert layer_of_module("relay.errors") in MAY_IMPORT["connect"]
    assert layer_of_module("relay.web.app") not in MAY_IMPORT["cli"]


def test_the_daemon_loads_nothing_from_the_tooling_or_the_cli() -> None:
    code = (
        "import sys, relay.service.daemon\n"
        "print(sorted(m for m in sys.modules if m.startswith(('relay.dev', 'relay.cli'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


SQLALCHEMY_USERS = {"relay/pg/writer.py", "relay/pg/tables.py"}  # where applications and auditors meet us


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_only_the_application_api_imports_sqlalchemy(path: Path) -> None:
    """The daemon and the operator commands run on psycopg alone (docs/architecture.md)."""
    name = str(path.relative_to(PACKAGE.parent))
    users = [line for module, line, _ in imports(path) if module.split(".")[0] == "sqlalchemy"]
    if name in SQLALCHEMY_USERS:
        assert users, f"{name} is listed as a SQLAlchemy user but imports none of it"
    else:
        assert not users, f"{name} imports sqlalchemy on line(s) {users}"


def test_the_architecture_map_names_every_module() -> None:
    """docs/architecture.md shows every module and query file of the package by its path."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = [p for p in sorted(PACKAGE.rglob("*")) if p.suffix in (".py", ".sql") and p.name != "__init__.py"]
    assert len(files) > 30
    missing = [
        str(p.relative_to(PACKAGE.parent)) for p in files if f"`{p.relative_to(PACKAGE.parent)}`" not in page
    ]
    assert not missing, missing
