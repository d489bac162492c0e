"""The checks every value a user gives goes through (flags, config keys, node inputs): numbers
finite and within declared bounds, text of bounded length without NUL. One home, so that an
option declares its bounds and is checked the same way wherever it is given."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Longer than any path Linux accepts (PATH_MAX 4096) or any name a user types: such a value is a
# paste gone wrong or an attack, and is refused before it reaches a file system call or a log.
MAX_TEXT_LENGTH = 4096


class ValueCheckError(ValueError):
    """A value out of its bounds, not finite, too long or holding a NUL; the message names it."""


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: low..high, each end included unless `*_open`."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        low = f"above {_number(self.low)}" if self.low_open else f"at least {_number(self.low)}"
        high = f"below {_number(self.high)}" if self.high_open else f"at most {_number(self.high)}"
        ends = [end for end, value in ((low, self.low), (high, self.high)) if math.isfinite(value)]
        return " and ".join(ends) or "finite"

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def check_number(value: Any, bounds: Bounds, what: str) -> None:
    """Raise ValueCheckError naming `what` unless `value` is a finite number within `bounds`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueCheckError(f"{what} must be a number {bounds.describe()}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueCheckError(f"{what} must be a finite number, got {_number(value)} (give one {bounds.describe()})")
    if not bounds.contains(value):
        raise ValueCheckError(f"{what} must be {bounds.describe()}, got {_number(value)}")


def check_text(value: str, what: str, max_length: int = MAX_TEXT_LENGTH) -> None:
    """Raise ValueCheckError naming `what` when `value` holds a NUL or is longer than `max_length`."""
    if "\0" in value:
        raise ValueCheckError(
            f"{what} contains a NUL character (at position {value.index(chr(0))}); "
            "retype it without the pasted control character"
        )
    if len(value) > max_length:
        raise ValueCheckError(
            f"{what} is {len(value)} characters long; at most {max_length} are accepted (it begins {value[:40]!r})"
        )
