"""Shell completion and the man page, generated from the parser, as an operator installs them.

The scripts and the page come from ``outbox-relay completion SHELL`` and ``outbox-relay man`` run
in a subprocess. What they must know is read here from the parser independently of the generator
(every lazy command loaded), so a new command or flag the generator misses fails a test. zsh,
fish and groff are not on every machine: those checks are skipped when the program is absent.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.cli import main as cli
from tests.relaykit import cli as run_cli

ROOT = Path(__file__).resolve().parent.parent


def parser_commands() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command path of the command line and its parser, lazy commands loaded."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def visit(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        parser.format_help()  # a lazy command adds its options when its help is first asked for
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    visit(child, (*path, name))

    visit(cli.build_parser(), ())
    return found


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]


COMMANDS = parser_commands()


def script(shell: str, tmp_path: Path) -> Path:
    result = run_cli("completion", shell)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    path = tmp_path / f"outbox-relay.{shell}"
    path.write_text(result.stdout, encoding="utf-8")
    return path


def test_the_parser_walk_sees_the_lazy_commands_options() -> None:
    assert {"demo", "sandbox", "completion", "man"} <= {p[0] for p in COMMANDS if p}
    assert "--rows" in flags(COMMANDS[("demo",)]) and "--p503" in flags(COMMANDS[("sandbox",)])
    assert ("dead", "list") in COMMANDS


# -- bash -----------------------------------------------------------------------------------
BASH_DRIVER = """
source "$1"
complete -p outbox-relay
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_outbox_relay
printf '%s\\n' "${COMPREPLY[@]}"
"""


def complete_bash(path: Path, *words: str, cwd: Path | None = None) -> tuple[str, list[str]]:
    """What bash proposes for the command line ``words`` (the last one being typed)."""
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", str(path), "outbox-relay", *words],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    registration, *proposed = result.stdout.splitlines()
    return registration, sorted(w for w in proposed if w)


def test_bash_registers_the_function_and_proposes_the_commands(tmp_path: Path) -> None:
    path = script("bash", tmp_path)
    registration, proposed = complete_bash(path, "")
    assert registration == "complete -F _outbox_relay outbox-relay"
    assert proposed == sorted(subcommands(COMMANDS[()]))
    assert complete_bash(path, "d")[1] == ["dead", "demo"]
    assert complete_bash(path, "dead", "")[1] == ["list", "retry"]


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "outbox-relay")
def test_bash_proposes_every_flag_of_every_command(tmp_path: Path, path: tuple[str, ...]) -> None:
    proposed = complete_bash(script("bash", tmp_path), *path, "-")[1]
    assert proposed == sorted(flags(COMMANDS[path]))


def test_bash_skips_option_values_and_completes_them(tmp_path: Path) -> None:
    path = script("bash", tmp_path)
    (tmp_path / "relay.toml").write_text("", encoding="utf-8")
    typed = ("--config", "relay.toml", "dead", "list", "--target", "list", "--l")
    assert complete_bash(path, *typed)[1] == ["--limit"]
    assert complete_bash(path, "enqueue", "x", "--status", "")[1] == ["FAILED", "SUCCESS"]
    assert complete_bash(path, "--config", "rel", cwd=tmp_path)[1] == ["relay.toml"]
    assert complete_bash(path, "completion", "")[1] == ["bash", "fish", "zsh"]
    assert complete_bash(path, "audit", "--target", "")[1] == []  # a name: nothing to propose


# -- zsh and fish ---------------------------------------------------------------------------
def needs(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        pytest.skip(f"{program} is not installed")
    return found


def test_zsh_script_parses_and_registers_a_function_per_command(tmp_path: Path) -> None:
    zsh = needs("zsh")
    path = script("zsh", tmp_path)
    check = subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    probe = (
        "autoload -U compinit; compinit -u -D; source $1; print -r -- $_comps[outbox-relay]; "
        "whence -w _outbox_relay_dead_list _outbox_relay_demo"
    )
    result = subprocess.run(
        [zsh, "-f", "-c", probe, "zsh", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "_outbox_relay",
        "_outbox_relay_dead_list: function",
        "_outbox_relay_demo: function",
    ]
    # Each command's function offers exactly its parser's flags to _arguments.
    text = path.read_text(encoding="utf-8")
    for command_path, parser in COMMANDS.items():
        name = "_outbox_relay" + "".join("_" + part for part in command_path)
        body = re.search(rf"^{name}\(\) {{\n(.*?)^}}", text, re.MULTILINE | re.DOTALL)
        assert body, name
        offered = set(re.findall(r"^\s+'\*?(?:\([^)]*\))?(--?[\w-]+)[=+\[]", body.group(1), re.MULTILINE))
        assert offered == flags(parser), command_path


def complete_fish(fish: str, path: Path, line: str) -> list[str]:
    result = subprocess.run(
        [fish, "--no-config", "-c", 'source $argv[1]; complete -C"$argv[2]"', str(path), line],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return sorted(candidate.partition("\t")[0] for candidate in result.stdout.splitlines())


def test_fish_script_parses_and_completes(tmp_path: Path) -> None:
    fish = needs("fish")
    path = script("fish", tmp_path)
    check = subprocess.run([fish, "--no-execute", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    assert complete_fish(fish, path, "outbox-relay ") == sorted(subcommands(COMMANDS[()]))
    assert complete_fish(fish, path, "outbox-relay dead ") == ["list", "retry"]
    long_flags = sorted(f for f in flags(COMMANDS[("dead", "list")]) if f.startswith("--"))
    assert complete_fish(fish, path, "outbox-relay --config x dead list --target list --") == long_flags
    assert complete_fish(fish, path, "outbox-relay enqueue a --status ") == ["FAILED", "SUCCESS"]


def test_an_unknown_shell_is_a_usage_error() -> None:
    result = run_cli("completion", "tcsh")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("outbox-relay: argument SHELL: invalid choice: 'tcsh'")


# -- the man page ---------------------------------------------------------------------------
def test_the_man_page_renders_and_documents_every_command_and_flag(tmp_path: Path) -> None:
    result = run_cli("man")
    assert result.returncode == 0, result.stderr
    page = tmp_path / "outbox-relay.1"
    page.write_text(result.stdout, encoding="utf-8")
    groff = needs("groff")
    lint = subprocess.run([groff, "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and lint.stderr == "", lint.stderr
    rendered = subprocess.run(
        [groff, "-man", "-Tutf8", "-P-cbou", "-rLL=200n", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.replace("\u2212", "-")
    assert rendered.startswith("OUTBOX-RELAY(1)")
    # Each command's section (and OPTIONS for the program's own) lists exactly its parser's flags.
    sections: dict[tuple[str, ...], set[str]] = {}
    current: tuple[str, ...] | None = None
    for line in rendered.splitlines():
        if line.startswith("OPTIONS"):
            current = ()
        elif line.startswith("   outbox-relay "):
            current = tuple(line.split()[1:])
        elif line and not line.startswith(" "):
            current = None  # another top-level section
        elif current is not None and line.startswith("       -"):
            found = re.findall(r"(?:^|, )(--?[\w-]+)", line.strip())
            sections.setdefault(current, set()).update(found)
    assert sections == {path: flags(parser) for path, parser in COMMANDS.items()}
