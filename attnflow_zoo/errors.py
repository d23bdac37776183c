"""Exceptions a user can cause. Each message says what went wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterable


class AttnFlowError(Exception):
    """Base of every error the library raises on purpose (the CLI prints it in one line)."""


class ConfigError(AttnFlowError, ValueError):
    """An unknown preset, an unknown config key, or a value the architecture cannot take."""


class ShapeError(AttnFlowError, ValueError):
    """An input whose shape does not fit the model or layer (e.g. odd H for a squeeze)."""


class CheckpointError(AttnFlowError):
    """A checkpoint that is missing, corrupt, of another architecture, or mismatches its config."""


class DataError(AttnFlowError):
    """A dataset that cannot be found, read or used with the requested model."""


class TrainingError(AttnFlowError):
    """Training that cannot go on (e.g. repeated non-finite losses)."""


class OutputError(AttnFlowError, OSError):
    """A file or folder that cannot be written (permissions, a file in the way, a full disk)."""


def check_positive_int(name: str, value: object) -> None:
    """``ConfigError`` unless ``value`` is an int ≥ 1 (a bool is not one): the one check of a
    count, a size or a batch."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    """``ConfigError`` unless ``value`` is one of ``allowed`` (a vocabulary's one check)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
