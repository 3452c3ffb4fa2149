"""Help text that tells the truth: defaults read from the settings classes, plain metavars for flags."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from typer.core import TyperGroup


def default(section: type[BaseModel], dotted: str) -> str:
    """The default of ``section.dotted`` as help shows it (``[default: ...]``), read from the settings
    themselves so help never repeats (and drifts from) a number held there."""
    model: Any = section
    *parents, leaf = dotted.split(".")
    for name in parents:
        field = model.model_fields[name]
        model = type(field.default_factory()) if field.default_factory else type(field.default)
    field = model.model_fields[leaf]
    value = field.default_factory() if field.default_factory else field.default
    return str(value)


def _plain(command: Any) -> None:
    """Flags take no value, so help shows no ``<bool>`` type for them."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain(sub)


class PlainFlagsGroup(TyperGroup):
    """A group whose commands (and sub-groups) show no metavar for flags, ``--help`` included."""

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None:
            _plain(command)
            _plain_help(command, ctx)
        return command

    def get_params(self, ctx: Any) -> list[Any]:
        _plain_help(self, ctx)
        return list(super().get_params(ctx))


def _plain_help(command: Any, ctx: Any) -> None:
    option = command.get_help_option(ctx)
    if option is not None:
        option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub, ctx)
