"""Sizes and durations as people write them in configs and on the command
line: ``256MiB``, ``1.5 GB``, ``4096``, ``30s``, ``5m``."""
from __future__ import annotations

import re

from smirror.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*\Z")


def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string with an optional unit (KiB = 1024, KB = 1000).
    ``what`` names the setting in the error message."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 256MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            number = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
            return int(number * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(f"{what}: expected a size like 4096, 256MiB or 1.5GB, got {value!r}")


def parse_duration(value, what: str = "duration") -> float:
    """Seconds from a number or a string like ``250ms``, ``30s``, ``5m``, ``2h``, ``7d``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like 30s, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}: a duration cannot be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m and m.group(2).lower() in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ConfigError(f"{what}: expected a duration like 30s, 5m or 250ms, got {value!r}")


def format_size(n: float) -> str:
    """Short human form, binary units: 0 B, 512 B, 1.5 KiB, 256 MiB (also
    for rates: a float is rounded the same way)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 10 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")
