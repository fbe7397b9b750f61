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


def _number_text(**bounds: float | None) -> str:
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{ops[k]} {v}" for k, v in bounds.items() if v is not None]
    return "a finite number" + (" " + " and ".join(parts) if parts else "")


def real(owner: str, name: str, value: Any, *, gt: float | None = None,
         ge: float | None = None, lt: float | None = None, le: float | None = None,
         allow_none: bool = False) -> float | None:
    """A finite real number (not a ``bool``) within the given bounds."""
    if value is None and allow_none:
        return None
    what = _number_text(gt=gt, ge=ge, lt=lt, le=le)
    try:
        v = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    except OverflowError:  # an int beyond float range
        v = None
    if v is None or not math.isfinite(v):
        _fail(owner, name, what, value)
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
    except (TypeError, ValueError):  # uncomparable, or an array's ambiguous truth value
        ok = False
    if not ok:
        _fail(owner, name, f"one of {options}", value)
    return value


def real_or_traced(owner: str, name: str, value: Any, **bounds: float | None) -> Any:
    """:func:`real` for a Python, NumPy or concrete JAX scalar; a traced value
    (an argument inside ``jit``, e.g. a scheduled learning rate) passes unchecked.

        >>> import jax.numpy as jnp
        >>> real_or_traced("jlora.optim.mezo_sgd", "lr", jnp.float32(-1.0), ge=0.0)
        Traceback (most recent call last):
        ...
        ValueError: jlora.optim.mezo_sgd: lr must be a finite number >= 0.0, got Array(-1., dtype=float32)
    """
    import jax
    import numpy as np

    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (jax.Array, np.ndarray)):
        arr = np.asarray(value)
        if arr.ndim != 0 or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
            _fail(owner, name, "a finite scalar number", value)
        try:
            real(owner, name, float(arr), **bounds)
        except ValueError:
            _fail(owner, name, _number_text(**bounds), value)
        return value
    return real(owner, name, value, **bounds)


def int_tuple(owner: str, name: str, value: Any, *, nonempty: bool = False) -> tuple[int, ...]:
    """An int or a sequence of ints (not bools), as a tuple (axes, in the configs' form)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or (nonempty and not items) or any(
            not isinstance(a, numbers.Integral) or isinstance(a, bool) for a in items):
        _fail(owner, name, "an int or a " + ("non-empty " if nonempty else "") + "tuple of ints",
              value)
    return tuple(int(a) for a in items)


def prng_key(owner: str, name: str, value: Any) -> Any:
    """A PRNG key: a typed ``jax.random.key(seed)`` or a raw uint32 ``(2,)`` key."""
    import jax

    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key) and value.shape == ():
        return value
    if dtype == jax.numpy.uint32 and tuple(value.shape) == (2,):
        return value
    _fail(owner, name, "a PRNG key (jax.random.key(seed))", value)


def floating_dtype(owner: str, name: str, value: Any, *, allow_none: bool = False) -> str | None:
    """A floating dtype (``jnp.bfloat16``, ``"float32"``, ...), returned by name."""
    import jax.numpy as jnp  # the checks above need no jax

    if value is None and allow_none:
        return None
    try:
        dt = None if value is None else jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        _fail(owner, name, "None or a floating dtype" if allow_none else "a floating dtype", value)
    return dt.name


def function(owner: str, name: str, value: Any) -> Any:
    """A callable (a loss, an ``evaluate``, an optimizer factory, a callback)."""
    if not callable(value):
        _fail(owner, name, "callable", value)
    return value


def transformation(owner: str, name: str, value: Any) -> Any:
    """An Optax ``GradientTransformation`` (anything with callable ``init`` and ``update``)."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        _fail(owner, name, "an optax.GradientTransformation (init, update)", value)
    return value
