"""The command line as data: every command, subcommand, option and argument, read from the parser.

The completion scripts (:mod:`relay.cli.completion`) and the man page (:mod:`relay.cli.manpage`)
are generated from this, so the argparse parser of :mod:`relay.cli.main` (what ``outbox-relay
--help`` shows) stays the one source of truth. Commands registered lazily (``demo``, ``sandbox``,
...) get their options only when their module is loaded: :func:`read` loads every one of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

PROGRAM = "outbox-relay"


@dataclass(frozen=True)
class Option:
    """One optional argument: its flags (``-h``, ``--help``) and what value it takes."""

    flags: tuple[str, ...]
    metavar: str | None  # None: a switch, taking no value
    help: str
    choices: tuple[str, ...] = ()
    repeatable: bool = False
    required: bool = False

    @property
    def value(self) -> str | None:
        """What its value is: ``choice``, ``file``, ``dir`` or ``text``; None for a switch."""
        if self.metavar is None:
            return None
        if self.choices:
            return "choice"
        if self.metavar == "FILE" or any(f.endswith("-file") for f in self.flags):
            return "file"
        if self.metavar == "DIR" or any(f.endswith("-dir") for f in self.flags):
            return "dir"
        return "text"


@dataclass(frozen=True)
class Positional:
    """One positional argument."""

    metavar: str
    help: str
    choices: tuple[str, ...] = ()
    many: bool = False  # nargs '*' or '+'
    optional: bool = False  # nargs '?' or '*'


@dataclass(frozen=True)
class Command:
    """The program (``path == ()``) or one of its (sub)commands, e.g. ``("dead", "list")``."""

    path: tuple[str, ...]
    summary: str  # the one line `--help` shows for it in its parent's list
    description: str
    usage: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    commands: tuple[Command, ...]

    @property
    def name(self) -> str:
        return " ".join((PROGRAM, *self.path))

    def walk(self) -> Iterator[Command]:
        """This command, then every command below it, depth first."""
        yield self
        for child in self.commands:
            yield from child.walk()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An action's help with ``%(default)s`` and the like filled in, as argparse shows it."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = parser.prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return text % params


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None and not action.option_strings:
        return action.dest
    return action.dest.upper() if action.option_strings else action.dest


def read(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), summary: str = "") -> Command:
    """The command ``parser`` parses, with everything below it, every lazy command loaded."""
    load = getattr(parser, "_load", None)  # relay.cli.main._Parser: a lazy command's options
    if load is not None:
        load()
    options: list[Option] = []
    positionals: list[Positional] = []
    commands: list[Command] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                commands.append(read(child, (*path, name), summaries.get(name, "")))
            continue
        choices = tuple(str(c) for c in action.choices) if action.choices is not None else ()
        if action.option_strings:
            takes_value = action.nargs != 0
            options.append(
                Option(
                    flags=tuple(action.option_strings),
                    metavar=_metavar(action) if takes_value else None,
                    help=_help(parser, action),
                    choices=choices,
                    repeatable=isinstance(action, argparse._AppendAction | argparse._CountAction),
                    required=action.required,
                )
            )
        else:
            positionals.append(
                Positional(
                    metavar=_metavar(action),
                    help=_help(parser, action),
                    choices=choices,
                    many=action.nargs in ("*", "+"),
                    optional=action.nargs in ("*", "?"),
                )
            )
    return Command(
        path=path,
        summary=summary,
        description=parser.description or summary,
        usage=parser.format_usage().removeprefix("usage: ").strip(),
        options=tuple(options),
        positionals=tuple(positionals),
        commands=tuple(commands),
    )


def command_tree() -> Command:
    """The whole command line of ``outbox-relay``, from :func:`relay.cli.main.build_parser`."""
    from relay.cli.main import build_parser

    return read(build_parser())
