"""Typed reads of a job's `spec`: defaults, types and ranges, refused up front as `invalid_config`.

A field that is absent or null takes its default; anything else must have the right type and lie
in range, or the job fails before doing any work with a message naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tunery_worker.errors import InvalidConfig


def section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A nested object of the spec (`{}` when absent)."""
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidConfig(f"{key} must be an object", param=key)
    return value


def get_int(
    spec: Mapping[str, Any],
    key: str,
    default: int,
    minimum: int | None = None,
    maximum: int | None = None,
    where: str = "",
) -> int:
    value = get_optional_int(spec, key, minimum, maximum, where)
    return default if value is None else value


def get_optional_int(
    spec: Mapping[str, Any],
    key: str,
    minimum: int | None = None,
    maximum: int | None = None,
    where: str = "",
) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    name = where + key
    # JSON has one number type: 4.0 is accepted as 4, 4.5 and true are not.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise InvalidConfig(f"{name} must be an integer, got {value!r}", param=name)
    value = int(value)
    _check_range(name, value, minimum, maximum)
    return value


def get_float(
    spec: Mapping[str, Any],
    key: str,
    default: float,
    minimum: float | None = None,
    maximum: float | None = None,
    where: str = "",
    exclusive_minimum: bool = False,
) -> float:
    value = spec.get(key)
    if value is None:
        return default
    name = where + key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfig(f"{name} must be a number, got {value!r}", param=name)
    value = float(value)
    if exclusive_minimum and minimum is not None and value <= minimum:
        raise InvalidConfig(f"{name} must be greater than {minimum}, got {value}", param=name)
    _check_range(name, value, minimum, maximum)
    return value


def get_bool(spec: Mapping[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = spec.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidConfig(f"{where + key} must be true or false, got {value!r}", param=where + key)
    return value


def get_str(
    spec: Mapping[str, Any],
    key: str,
    default: str,
    choices: Sequence[str] | None = None,
    where: str = "",
) -> str:
    value = spec.get(key)
    if value is None:
        return default
    name = where + key
    if not isinstance(value, str) or not value:
        raise InvalidConfig(f"{name} must be a non-empty string, got {value!r}", param=name)
    if choices is not None and value not in choices:
        raise InvalidConfig(f"{name} must be one of {list(choices)}, got {value!r}", param=name)
    return value


def get_str_list(spec: Mapping[str, Any], key: str, default: list[str], where: str = "") -> list[str]:
    value = spec.get(key)
    if value is None:
        return list(default)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidConfig(f"{where + key} must be a list of strings, got {value!r}", param=where + key)
    return list(value)


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise InvalidConfig(f"{name} must be at least {minimum}, got {value}", param=name)
    if maximum is not None and value > maximum:
        raise InvalidConfig(f"{name} must be at most {maximum}, got {value}", param=name)
