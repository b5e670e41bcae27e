"""``outbox-relay man``: the manual page (roff), generated from the parser.

Every command and subcommand gets a section with its usage, its description and each option and
argument as ``--help`` shows them (read by :mod:`relay.cli.tree`, lazy commands included), so the
page cannot drift from the command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from relay import __version__
from relay.cli.tree import PROGRAM, Command
from relay.settings import Settings

HELP = "print the manual page (roff): outbox-relay man | man -l -"
DESCRIPTION = (
    "Print the manual page of this version's command line on stdout, in roff, generated from the\n"
    "same parser as --help.\n\n"
    "examples:\n"
    "  outbox-relay man | man -l -\n"
    "  outbox-relay man > /usr/local/share/man/man1/outbox-relay.1"
)

EXIT_STATUS = (
    ("0", "success"),
    ("1", "a runtime failure (the database or the API did not answer, a check failed)"),
    ("2", "a usage or configuration error, or a row PostgreSQL refused; one line on stderr"),
)


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``man`` to the command line (called by :mod:`relay.cli.main`)."""
    p = command("man", cmd_man, HELP, DESCRIPTION)
    p.set_defaults(needs_settings=False)


def cmd_man(args: argparse.Namespace, settings: Settings) -> int:
    from relay.cli.tree import command_tree

    print(render(command_tree()), end="")
    return 0


def _escape(text: str) -> str:
    """Text as roff reads it literally: backslashes and minus signs escaped, no line a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def _bold(text: str) -> str:
    return f"\\fB{_escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{_escape(text)}\\fR"


def _prose(text: str) -> list[str]:
    """A description as argparse shows it: paragraphs filled, indented lines kept as they are."""
    out: list[str] = []
    literal = False
    for line in text.strip("\n").split("\n"):
        indented = line.startswith("  ")
        if indented and not literal:
            out += [".RS 2", ".nf"]
        elif not indented and literal:
            out += [".fi", ".RE"]
        literal = indented
        if not line.strip():
            out.append(".PP")
        else:
            out.append(_escape(line if indented else line.strip()))
    if literal:
        out += [".fi", ".RE"]
    return out


def _section(command: Command) -> list[str]:
    out = [f'.SS "{_escape(command.name)}"']
    out += [_bold(" ".join(command.usage.split())), ".PP", *_prose(command.description)]
    for positional in command.positionals:
        out += [".TP", _italic(positional.metavar), _escape(positional.help)]
        if positional.choices:
            out[-1] += _escape(f" (one of: {', '.join(positional.choices)})")
    for option in command.options:
        flags = ", ".join(_bold(flag) for flag in option.flags)
        if option.metavar is not None:
            flags += " " + _italic(option.metavar)
        text = option.help
        if option.choices:
            text += f" (one of: {', '.join(option.choices)})"
        if option.repeatable and "repeat" not in text:
            text += " (repeatable)"
        out += [".TP", flags, _escape(text)]
    return out


def render(tree: Command) -> str:
    """The whole manual page, section 1."""
    summary, _, rest = tree.description.strip().partition("\n")
    out = [
        f'.TH OUTBOX\\-RELAY 1 "" "{PROGRAM} {__version__}" "User Commands"',
        ".nh",
        ".SH NAME",
        f"{PROGRAM} \\- {_escape(summary.rstrip('.'))}",
        ".SH SYNOPSIS",
        _bold(" ".join(tree.usage.split())),
        ".SH DESCRIPTION",
        *_prose(rest),
        ".SH OPTIONS",
    ]
    for option in tree.options:
        flags = ", ".join(_bold(flag) for flag in option.flags)
        if option.metavar is not None:
            flags += " " + _italic(option.metavar)
        out += [".TP", flags, _escape(option.help)]
    out.append(".SH COMMANDS")
    for command in tree.walk():
        if command.path:
            out += _section(command)
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        out += [".TP", _bold(code), _escape(meaning)]
    out += [
        ".SH ENVIRONMENT",
        ".TP",
        _bold("RELAY_CONFIG"),
        _escape("the TOML configuration file, when --config is not given"),
        ".TP",
        _bold("RELAY_*"),
        _escape('every setting; they override the file (README.md, "Configuration reference")'),
        ".SH SEE ALSO",
        _escape(f"{PROGRAM} COMMAND --help; README.md and docs/architecture.md in the source distribution."),
        "",
    ]
    return "\n".join(out)
