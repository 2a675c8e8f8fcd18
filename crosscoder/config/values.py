"""Checks every group's `validate` uses: a value among the allowed ones, a positive count."""

from __future__ import annotations

from crosscoder.errors import ConfigError


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")
