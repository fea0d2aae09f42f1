"""Config checks shared by the config (configuration_dpsnr.py) and the kinds (kinds.py): each raises
`ValueError` naming the field, so a bad value is reported where the config is built."""

from __future__ import annotations

import math


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_nonneg_int(name: str, value) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def check_positive_float(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def check_rate(name: str, value) -> None:
    """An EMA rate or momentum in (0, 1]."""
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")


__all__ = ["check_choice", "check_nonneg_int", "check_positive_float", "check_positive_int", "check_rate", "is_int"]
