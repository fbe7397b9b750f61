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

from jlora import _validate as v
from jlora.methods._experts import check_stacking, per_slice, stacked_build
from jlora.methods.base import (
    AdapterNode,
    Array,
    Config,
    LinearOp,
    Role,
    accumulation_dtype,
    base_plus_lowrank,
    freeze_in_axes,
    from_matrix,
    strict_options,
    view_leaf,
)


@strict_options
@dataclasses.dataclass(frozen=True)
class VeRA(Config):
    """VeRA config.

    Args:
      rank: width of the shared random projection (PEFT's default 256).
      seed: seed of the frozen pair, an int in ``[0, 2**32)`` (the same seed and shape
        give the same pair). Larger seeds are refused: without ``jax_enable_x64``,
        ``jax.random.key`` keeps only their low 32 bits (aliasing a smaller seed).
      d_initial: initial value of every ``λ_d`` entry (0.1 in the paper); finite.
      dtype: dtype of the vectors and the pair; default float32.
      in_axes: which kernel axes are inputs; default all but the last.
    """

    rank: int = 256
    seed: int = 0
    d_initial: float = 0.1
    dtype: Any = None
    in_axes: tuple[int, ...] | None = None
    expert_axis: int | None = None

    def __post_init__(self):
        check_stacking(self, "VeRA")
        v.positive_int("VeRA", "rank", self.rank)
        v.positive_int("VeRA", "seed", self.seed, minimum=0)
        if self.seed >= 2**32:
            raise ValueError(f"VeRA: seed must be an int in [0, 2**32) (without x64, "
                             f"jax.random.key keeps only its low 32 bits), got {self.seed!r}")
        v.real("VeRA", "d_initial", self.d_initial)
        freeze_in_axes(self)

    def build(self, key: Array, base: Array, *, path: str) -> "VeRANode":
        if self.expert_axis is not None:
            return stacked_build(self, key, base, path=path)
        view = view_leaf(self, base, path)  # rank may exceed the fans: a projection
        a, b = shared_pair(self.seed, view.fan_in, view.fan_out, self.rank, view.dtype)
        return VeRANode(base=base, a=a, b=b,
                        lambda_d=jnp.full((self.rank,), self.d_initial, view.dtype),
                        lambda_b=jnp.zeros((view.fan_out,), view.dtype), config=self,
                        shape=view.shape, in_axes=view.in_axes)


def shared_pair(seed: int, fan_in: int, fan_out: int, rank: int, dtype):
    """The frozen pair for one shape: a function of (seed, shape) only."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), fan_in), fan_out)
    ka, kb = jax.random.split(key)
    a = jax.random.uniform(ka, (fan_in, rank), dtype, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
    b = jax.random.uniform(kb, (rank, fan_out), dtype, -1 / math.sqrt(rank), 1 / math.sqrt(rank))
    return a, b


@per_slice
class VeRANode(AdapterNode):
    """``K = base + ((a·diag(λ_d))·b)·diag(λ_b)``; trainable ``lambda_d``, ``lambda_b``."""

    base: Array
    a: Array
    b: Array
    lambda_d: Array
    lambda_b: Array

    config_class = VeRA
    trainable = ("lambda_d", "lambda_b")
    field_axes = {"base": Role.BASE, "a": Role.IN_RANK, "b": Role.RANK_OUT,
                  "lambda_d": Role.REPLICATED, "lambda_b": Role.OUT}

    def delta(self) -> Array:
        acc = accumulation_dtype(self.a.dtype, self.lambda_d.dtype)  # one rounding, at the end
        f = lambda x: x.astype(acc)
        d = ((f(self.a) * f(self.lambda_d)) @ f(self.b)) * f(self.lambda_b)
        return from_matrix(d, self.shape, self.in_axes).astype(self.lambda_b.dtype)

    def dot(self, x: Array, op: LinearOp, **context: Any) -> Array:
        return base_plus_lowrank(x, op, self, self.a, self.b, mid=self.lambda_d,
                                 out=self.lambda_b)
