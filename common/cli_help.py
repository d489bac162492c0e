"""`--help` that shows each flag's choices and default, for every command of the pack."""

from __future__ import annotations

import argparse


class ChoicesAndDefaultsFormatter(argparse.HelpFormatter):
    """Ends a flag's help with its choices and its default (`--device {auto,cuda,cpu}` ... `(choices: auto,
    cuda, cpu; default: auto)`), each unless the help already gives it: every choice named in the text, or
    the word "default" in it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            return action.help
        text = action.help or ""
        added = []
        if action.choices is not None and not all(str(choice) in text for choice in action.choices):
            added.append("choices: " + ", ".join(str(choice) for choice in action.choices))
        if action.nargs != 0 and "default" not in text and not _silent(action.default):
            added.append("default: " + _shown(action.default).replace("%", "%%"))
        if not added:
            return text or None
        return f"{text} ({'; '.join(added)})" if text else "; ".join(added)


def _silent(default: object) -> bool:
    """A default that says nothing: the flag left out is off or absent."""
    return default is None or default is False or default is argparse.SUPPRESS or default == []


def _shown(default: object) -> str:
    """A default as it is typed on the command line: `1e-05`, `a b` for a list."""
    if isinstance(default, list | tuple):
        return " ".join(map(_shown, default))
    return f"{default:g}" if isinstance(default, float) else str(default)
