"""Library messages in the CLI's words: the library names an argument in backticks
(`batch_size`, `out_dir`); the command that ran has a flag for it (--batch-size, --out). The one
translation, made where ``main`` catches a library error and for the library's notes
(``progress.word_notes``) while a command runs (STYLE.md rule 9)."""

from __future__ import annotations

import re

import click

#: The library's argument names that its messages name (in backticks), each with the name of
#: the commands' parameter that sets it where that differs.
ARGUMENTS = {
    "allow_changes": "override", "batch_size": None, "compile": None, "conditional": None,
    "dataset": None, "device": None, "dry_run": None, "fullscale": None, "grad_clip": None,
    "guidance": None, "image_size": None, "in_channels": None, "inception_weights": None,
    "keep_checkpoints": "keep_last", "limit": None, "lr": None, "metrics": None,
    "minutes": None, "model": None, "out_dir": "out", "paths": "image",
    "precision": None, "repo_id": "repo", "resume": None, "settings": None, "split": None,
    "steps": None, "until": None, "validation": None, "which": "label",
}
_NAMED = re.compile(r"`([a-z][a-z0-9_]*)`")


def _flags(command: click.Command | None) -> dict[str, str]:
    """Each parameter of ``command`` -> its long flag (the first one it has)."""
    found = {}
    for param in getattr(command, "params", ()):
        long = [opt for opt in param.opts if opt.startswith("--")]
        if long and param.name:
            found[param.name] = long[0].split("/")[0]
    return found


def command_of(group: click.Group, argv: list[str]) -> click.Command | None:
    """The subcommand of ``group`` that ``argv`` runs (None for the group itself)."""
    first = next((word for word in argv if not word.startswith("-")), "")
    return group.commands.get(first)


def in_flags(message: str, command: click.Command | None) -> str:
    """``message`` with every `argument` the command has a flag for written as that flag; the
    others keep their library name."""
    flags = _flags(command)

    def swap(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in ARGUMENTS:  # a column, a function, a command: not an argument
            return match.group(0)
        return flags.get(ARGUMENTS[name] or name, match.group(0))

    return _NAMED.sub(swap, message)
