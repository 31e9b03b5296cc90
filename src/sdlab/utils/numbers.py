"""Numbers read from text (a flag, a config value, a grid axis): the parse that refuses NaN and infinities."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["finite_float"]


def finite_float(text: str, error: Callable[[str], Exception], not_a_number: str, not_finite: str) -> float:
    """`float(text)`; `error(not_a_number)` for text that is no number, `error(not_finite)` for NaN, an infinity or
    a number past a float's range ('1e400', which float() reads as inf)."""
    try:
        number = float(text)
    except ValueError:
        raise error(not_a_number) from None
    if not math.isfinite(number):
        raise error(not_finite)
    return number
