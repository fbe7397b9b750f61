"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454).

A frozen random pair ``a (fan_in, r)``, ``b (r, fan_out)`` and two trained
scaling vectors per layer:

    ΔK = (a · diag(λ_d) · b) · diag(λ_b),     λ_d (r,) = 0.1 at init,  λ_b (fan_out,) = 0

so the model is unchanged at init and a layer trains only ``r + fan_out``
numbers. ``a`` and ``b`` come from ``seed`` alone (PyTorch's kaiming-uniform
bounds, as PEFT: ``a ~ U(±1/√fan_in)``, ``b ~ U(±1/√r)``): every layer of the
same ``(fan_in, fan_out)`` shape gets the *same* pair, which is VeRA's sharing.
(PEFT draws one pair of the largest shape and slices it per layer; jlora draws
one pair per shape, so layer shapes never depend on which other layers exist.)
The pair is frozen: ``jlora.split`` puts it in the frozen half, so checkpoints
hold only the vectors. ``rank`` may exceed ``fan_in``/``fan_out``: the pair is
a random projection, not a factorisation.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((8, 4))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"*/kernel": jlora.VeRA(rank=16)}),
    ...                       key=jax.random.key(0))
    >>> bool((adapted["a"]["kernel"].a == adapted["b"]["kernel"].a).all())  # shared pair
    True
    >>> jlora.count_trainable(adapted)  # (16 + 4) per layer
    40
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jlora.methods.base import (
    AdapterNode,
    Array,
    Config,
    LinearOp,
    check_positive_int,
    factor_dtype,
    freeze_in_axes,
    from_matrix,
    leading_in_axes,
    resolve_in_axes,
    strict_options,
    to_matrix,
)


@strict_options
@dataclasses.dataclass(frozen=True)
class VeRA(Config):
    """VeRA config.

    Args:
      rank: width of the shared random projection (PEFT's default 256).
      seed: seed of the frozen pair (the same seed and shape give the same pair).
      d_initial: initial value of every ``λ_d`` entry (0.1 in the paper).
      dtype: dtype of the vectors and the pair; default float32.
      in_axes: which kernel axes are inputs; default all but the last.
    """

    rank: int = 256
    seed: int = 0
    d_initial: float = 0.1
    dtype: Any = None
    in_axes: tuple[int, ...] | None = None

    def __post_init__(self):
        check_positive_int("VeRA", "rank", self.rank)
        freeze_in_axes(self)

    def build(self, key: Array, base: Array, *, path: str) -> "VeRANode":
        self.check_leaf(base, path)
        in_axes = resolve_in_axes(base.shape, self.in_axes, path)
        fan_in, fan_out = to_matrix(base, in_axes).shape
        dt = factor_dtype(base.dtype, self.dtype)
        a, b = shared_pair(self.seed, fan_in, fan_out, self.rank, dt)
        return VeRANode(base=base, a=a, b=b,
                        lambda_d=jnp.full((self.rank,), self.d_initial, dt),
                        lambda_b=jnp.zeros((fan_out,), dt), config=self,
                        shape=tuple(base.shape), in_axes=in_axes)


def shared_pair(seed: int, fan_in: int, fan_out: int, rank: int, dtype):
    """The frozen pair for one shape: a function of (seed, shape) only."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), fan_in), fan_out)
    ka, kb = jax.random.split(key)
    a = jax.random.uniform(ka, (fan_in, rank), dtype, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
    b = jax.random.uniform(kb, (rank, fan_out), dtype, -1 / math.sqrt(rank), 1 / math.sqrt(rank))
    return a, b


@struct.dataclass
class VeRANode(AdapterNode):
    """``K = base + ((a·diag(λ_d))·b)·diag(λ_b)``; trainable ``lambda_d``, ``lambda_b``."""

    base: Array
    a: Array
    b: Array
    lambda_d: Array
    lambda_b: Array
    config: VeRA = struct.field(pytree_node=False, default=None)
    shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    in_axes: tuple[int, ...] = struct.field(pytree_node=False, default=())

    trainable = ("lambda_d", "lambda_b")
    method = "VeRA"
    field_axes = {"base": "base", "a": "in_rank", "b": "rank_out", "lambda_d": "replicated",
                  "lambda_b": "out"}

    @property
    def rank(self) -> int:
        return self.config.rank

    def delta(self) -> Array:
        return from_matrix(((self.a * self.lambda_d) @ self.b) * self.lambda_b,
                           self.shape, self.in_axes)


    def dot(self, x: Array, op: LinearOp, **_) -> Array:
        if not leading_in_axes(self):
            return op(x, self.materialize())
        y = op(x, self.base)
        r = self.config.rank
        h = op(x, self.a.reshape(self.in_shape + (r,))) * self.lambda_d
        lo = jnp.tensordot(h, self.b.reshape((r,) + self.out_shape).astype(h.dtype), axes=1)
        return y + (lo * self.lambda_b.reshape(self.out_shape)).astype(y.dtype)
