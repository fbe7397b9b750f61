"""The method protocol shared by every jlora adapter.

A method is two things:

* a **config** (``LoRA(rank=8)``): a frozen, hashable dataclass of options that a
  ``Spec`` maps patterns to. ``config.build(key, base, path=...)`` builds a node.
* an **adapter node**: a pytree dataclass holding the frozen ``base`` array and
  the method's factors. Static options (rank, scale, axes) are pytree metadata,
  so ``jit``, sharding and Orbax only ever see arrays. A node class names its
  ``trainable`` fields and implements

  - ``materialize()`` -> the full weight ``W`` with the adapter folded in,
  - ``delta()`` -> ``W - W_original`` (what ``merge``/``unmerge`` add or remove),
  - ``dot(x, op)`` -> ``op(x, W)`` computed without forming ``W`` (the fast path),
    where ``op(x, kernel)`` is the host layer's linear map, applicable to any
    kernel whose leading axes are the input axes and trailing axes are outputs.

Kernels of any rank are viewed as ``(fan_in, fan_out)`` matrices: ``in_axes`` are
flattened into rows, the remaining axes (in order) into columns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# ``op(x, kernel) -> y``: the host layer's linear map for a kernel of shape
# ``in_shape + out_shape`` (any out_shape), output axes last.
LinearOp = Callable[[Array, Array], Array]


class AdapterNode:
    """Base class of adapter nodes. Subclasses are ``flax.struct.dataclass``es."""

    trainable: ClassVar[tuple[str, ...]] = ()
    method: ClassVar[str] = "?"
    # How each array field is laid out relative to the base weight, so that
    # sharding can derive a factor's PartitionSpec from its base's:
    # "base" (the base's own axes), "in_rank" ((fan_in, r)), "rank_out"
    # ((r, fan_out)), "out" ((fan_out,)), "in" ((fan_in,)), "replicated".
    field_axes: ClassVar[dict[str, str]] = {}

    # Every subclass defines these two static fields.
    shape: tuple[int, ...]
    in_axes: tuple[int, ...]

    def materialize(self) -> Array:
        """``base + delta()`` in the delta's precision, cast back to the base dtype."""
        d = self.delta()
        return (self.base.astype(d.dtype) + d).astype(self.base.dtype)

    def delta(self) -> Array:
        raise NotImplementedError

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None) -> Array:
        """Default: apply the layer to the materialized weight (always correct).

        ``dropout_key`` is for methods with adapter-branch dropout; others ignore it.
        """
        return op(x, self.materialize())

    @property
    def rank(self) -> int | None:
        return None

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.shape) if i not in self.in_axes)

    def trainable_size(self) -> int:
        return sum(
            int(np.prod(getattr(self, f).shape))
            for f in self.trainable
            if getattr(self, f) is not None
        )


# ---------------------------------------------------------------- kernel views


def resolve_in_axes(shape: tuple[int, ...], in_axes: tuple[int, ...] | None, path: str):
    """Normalise ``in_axes`` for a leaf of ``shape``; default: all but the last axis."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{path}: a low-rank adapter needs a leaf with at least 2 dimensions, "
            f"got shape {shape}; use jlora.Full() to train it in full"
        )
    if in_axes is None:
        return tuple(range(ndim - 1))
    axes = tuple(sorted(a % ndim for a in in_axes))
    if len(set(axes)) != len(axes) or not axes or len(axes) == ndim or any(
        not -ndim <= a < ndim for a in in_axes
    ):
        raise ValueError(
            f"{path}: in_axes={in_axes} is not a proper subset of the axes of a "
            f"leaf of shape {shape}"
        )
    return axes


def _perm(ndim: int, in_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(in_axes) + tuple(i for i in range(ndim) if i not in in_axes)


def to_matrix(w: Array, in_axes: tuple[int, ...]) -> Array:
    """View a kernel as ``(fan_in, fan_out)``."""
    perm = _perm(w.ndim, in_axes)
    fan_in = math.prod(w.shape[i] for i in in_axes)
    return jnp.transpose(w, perm).reshape(fan_in, -1)


def from_matrix(m: Array, shape: tuple[int, ...], in_axes: tuple[int, ...]) -> Array:
    """Inverse of :func:`to_matrix`."""
    perm = _perm(len(shape), in_axes)
    w = m.reshape(tuple(shape[i] for i in perm))
    return jnp.transpose(w, np.argsort(perm))


def leading_in_axes(node: AdapterNode) -> bool:
    """True when the input axes come first, as layers' kernels lay them out."""
    return node.in_axes == tuple(range(len(node.in_axes)))


# ---------------------------------------------------------------- configs


def strict_options(cls):
    """Make a config dataclass reject unknown keyword options with a ValueError.

    A misspelt option (``LoRA(rank=8, rs_lora=True)``) must never be dropped
    silently: the error names it and lists what the config accepts.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {unknown}; "
                f"known options: {names}"
            )
        if len(args) > len(names):
            raise ValueError(f"{cls.__name__}: too many positional options {args}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


class Config:
    """Base class of method configs (frozen dataclasses)."""

    def build(self, key: Array, base: Array, *, path: str) -> Any:
        raise NotImplementedError

    def check_leaf(self, base: Array, path: str) -> None:
        if not jnp.issubdtype(base.dtype, jnp.floating):
            raise ValueError(
                f"{path}: {type(self).__name__} needs a floating-point leaf, "
                f"got dtype {base.dtype}"
            )


def check_positive_int(method: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{method}: {name} must be a positive int, got {value!r}")


def freeze_in_axes(config) -> None:
    """Store a config's ``in_axes`` as a tuple (configs are hashable static metadata)."""
    if config.in_axes is not None:
        object.__setattr__(config, "in_axes", tuple(config.in_axes))


def factor_dtype(base_dtype, dtype) -> jnp.dtype:
    """Factors default to at least float32, whatever the base precision."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(base_dtype, jnp.float32)
