"""Help text that tells the truth: defaults read from the settings classes, plain metavars for flags."""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup


class _SettingsDefault(str):
    """A ``show_default`` text computed when help is rendered: importing the settings (pydantic, yaml)
    at start-up would slow every command, ``--help`` included."""

    def __new__(cls, section: str, dotted: str) -> _SettingsDefault:
        text = super().__new__(cls, f"{section}.{dotted}")
        text.section, text.dotted = section, dotted  # type: ignore[attr-defined]
        return text

    def __str__(self) -> str:
        import tracegen.config

        section = getattr(tracegen.config, self.section)  # type: ignore[attr-defined]
        return _default_of(section, self.dotted)  # type: ignore[attr-defined]

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def default(section: str, dotted: str) -> str:
    """The default of setting ``dotted`` of ``tracegen.config.<section>``, for ``show_default=``: read
    from the settings themselves, so help never repeats (and drifts from) a number held there."""
    return _SettingsDefault(section, dotted)


def _default_of(section: Any, dotted: str) -> str:
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
