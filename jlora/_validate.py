"""Option checks shared by every method config and optimiser factory.

Each check raises a ``ValueError`` that names the owner (``LoRA``,
``jlora.optim.lora_plus``), the option and the offending value, so a bad
option fails where it is given and never later as a NaN model or a traceback
from inside XLA.

    >>> from jlora._validate import positive_int, real, boolean, choice
    >>> positive_int("LoRA", "rank", 8)
    8
    >>> real("LoRA", "dropout", 0.1, ge=0.0, lt=1.0)
    0.1
    >>> boolean("LoRA", "train_a", "no")
    Traceback (most recent call last):
    ...
    ValueError: LoRA: train_a must be a bool (True or False), got 'no'
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def _fail(owner: str, name: str, what: str, value: Any) -> None:
    raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")


def positive_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """An ``int`` (not a ``bool``) ``>= minimum``."""
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or value < minimum):
        _fail(owner, name, f"an int >= {minimum}", value)
    return int(value)


def real(owner: str, name: str, value: Any, *, gt: float | None = None,
         ge: float | None = None, lt: float | None = None, le: float | None = None,
         allow_none: bool = False) -> float | None:
    """A finite real number (not a ``bool``) within the given bounds."""
    if value is None and allow_none:
        return None
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt}")
    if ge is not None:
        bounds.append(f">= {ge}")
    if lt is not None:
        bounds.append(f"< {lt}")
    if le is not None:
        bounds.append(f"<= {le}")
    what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(float(value))):
        _fail(owner, name, what, value)
    v = float(value)
    if ((gt is not None and not v > gt) or (ge is not None and not v >= ge)
            or (lt is not None and not v < lt) or (le is not None and not v <= le)):
        _fail(owner, name, what, value)
    return value


def boolean(owner: str, name: str, value: Any) -> bool:
    """A real ``bool``: ``"no"``, ``0`` and ``None`` are refused, not coerced."""
    if not isinstance(value, bool):
        _fail(owner, name, "a bool (True or False)", value)
    return value


def choice(owner: str, name: str, value: Any, options: Iterable[Any]) -> Any:
    """One of ``options`` (the error lists them)."""
    options = tuple(options)
    try:
        ok = value in options
    except TypeError:  # unhashable or uncomparable
        ok = False
    if not ok:
        _fail(owner, name, f"one of {options}", value)
    return value
