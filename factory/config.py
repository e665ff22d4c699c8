"""Configuration helpers: frozen dataclasses built from plain dicts, where an unknown key is an error."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class FactoryError(Exception):
    """A problem with what the user asked for or gave (input, paths, options). The CLI prints its message, which is
    one line meant for the user, and exits non-zero without a traceback."""


class ConfigError(FactoryError, ValueError):
    """A configuration the user gave cannot be used."""


def error_line(error: BaseException, limit: int = 200) -> str:
    """The first non-blank line of an exception's message (at most `limit` characters), or the exception's type name
    when the message is empty (EOFError(), a bare KeyError): what a one-line FactoryError quotes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build dataclass `cls` from `values`; unknown keys raise ConfigError naming them and the known ones, and so
    does a value the dataclass's own checks (`__post_init__`) refuse."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{cls.__name__}: {error_line(error)}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The dataclass as a plain dict of builtins (safe to store in a weights_only checkpoint or JSON)."""
    return dataclasses.asdict(config)
