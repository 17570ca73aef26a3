"""Global options accepted anywhere on the command line.

``binder-control status --home H`` means the same as ``binder-control --home H status``: the group
moves ``--home`` and ``--config`` given after the command in front of it before parsing. A
command's own ``--config`` (``start-all --config P``) is the same setting, so nothing is lost.
"""

from __future__ import annotations

import re

from typer import _click  # typer ships its own click; its Context is this one
from typer.core import TyperCommand, TyperGroup

GLOBAL_OPTIONS = ("--home", "--config")


def hoist(args: list[str]) -> list[str]:
    """``args`` with every global option (and its value) moved to the front, in order."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            takes_next = "=" not in arg and i + 1 < len(args)
            front += args[i : i + 2] if takes_next else [arg]
            i += 2 if takes_next else 1
            continue
        rest.append(arg)
        i += 1
    return front + rest


class GlobalOptionsGroup(TyperGroup):
    """The top-level group: global options hoisted, then parsed as usual."""

    def parse_args(self, ctx: _click.core.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist(list(args)))


PYTHON_TYPES = re.compile(r" <(?:str|bool|int|float)>")


class PlainCommand(TyperCommand):
    """A command whose help names each value by its metavar alone: typer's plain help follows
    an argument's name with its Python type (``SERVICE <str>``), which tells an operator
    nothing. Exit condition: typer lets an argument's type label be turned off."""

    def format_help(self, ctx: _click.core.Context, formatter: _click.HelpFormatter) -> None:
        inner = ctx.make_formatter()
        super().format_help(ctx, inner)
        formatter.write(PYTHON_TYPES.sub("", inner.getvalue()))
