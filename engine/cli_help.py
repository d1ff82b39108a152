"""argparse help that shows every flag's default, for each of pdserve's commands."""

from __future__ import annotations

import argparse
import copy
import enum

_NO_DEFAULT_NOTE = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                    argparse._VersionAction, argparse._SubParsersAction)


def _default_note(action: argparse.Action) -> str:
    default = action.default
    if (isinstance(action, _NO_DEFAULT_NOTE) or action.required or not action.option_strings
            or default is None or default is argparse.SUPPRESS or default == []
            or (action.help and "default" in action.help)):
        return ""
    if isinstance(default, enum.Enum):
        default = default.value
    return f"(default: {default})".replace("%", "%%")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless it has none, says it already, or is a
    switch that is off unless given."""

    def _format_action(self, action: argparse.Action) -> str:
        note = _default_note(action)
        if note:
            action = copy.copy(action)
            action.help = f"{action.help} {note}" if action.help else note
        return super()._format_action(action)
