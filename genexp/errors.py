"""User-facing errors: one line, naming the config key and the fix; no traceback.

Pure Python so every layer (including the pure-torch ones) can raise them.
"""

from __future__ import annotations

from typing import Any


class GenexpError(Exception):
    """An error caused by user input (config, data, checkpoint); printed as one line."""


class ConfigError(GenexpError):
    """A bad value for a constructor argument; the caller prefixes the config node (``model.``)."""

    def __init__(self, key: str, value: Any, message: str):
        self.key, self.value, self.message = key, value, message
        super().__init__(f"{key}={value!r}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise :class:`ConfigError`."""
    if not _is_int(value):
        raise ConfigError(key, value, "must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(key, value, f"must be >= {minimum}")
    return value


def check_float(
    key: str, value: Any, positive: bool = False, minimum: float | None = None, maximum: float | None = None
) -> float:
    """Return ``float(value)`` if it is a real number in range, else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "must be a number")
    if positive and not value > 0:
        raise ConfigError(key, value, "must be > 0")
    if minimum is not None and value < minimum:
        raise ConfigError(key, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, value, f"must be <= {maximum}")
    return float(value)


def check_choice(key: str, value: Any, choices) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise :class:`ConfigError` listing them."""
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(map(str, choices))}")
    return value
