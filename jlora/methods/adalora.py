"""AdaLoRA: SVD-form adapters with adaptive rank (Zhang et al. ICLR 2023, arXiv 2303.10512).

In jlora's orientation, with the kernel viewed as ``(fan_in, fan_out)``:

    ΔK = p · diag(λ) · q · alpha / r_init,   p (fan_in, r), λ (r,), q (r, fan_out)

The divisor stays the *initial* rank after pruning (as the official code).
Init: ``λ = 0`` (the model is unchanged), ``p, q ~ N(0, 0.02²)``. Ranks are
pruned during training by ``jlora.optim.adalora`` (an Optax wrapper that scores
singular-value triplets and masks the lowest ``λ`` under a cubic budget) and
kept near-orthogonal by ``jlora.optim.adalora_orthogonality`` added to the loss.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q": {"kernel": jnp.ones((16, 16))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"q/kernel": jlora.AdaLoRA(init_rank=6, target_rank=2)}),
    ...                       key=jax.random.key(0))
    >>> node = adapted["q"]["kernel"]
    >>> node.p.shape, node.lam.shape, node.q.shape
    ((16, 6), (6,), (6, 16))
"""

from __future__ import annotations

import dataclasses
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
class AdaLoRA(Config):
    """AdaLoRA config.

    Args:
      init_rank: starting rank ``r_init`` of every matrix.
      target_rank: average rank the allocator prunes down to.
      alpha: scale numerator; ``s = alpha / init_rank`` (default ``init_rank``, s = 1).
      init_std: std of the ``p``, ``q`` init (0.02 as the official code).
      dtype, in_axes: as ``LoRA``.
    """

    init_rank: int = 12
    target_rank: int = 8
    alpha: float | None = None
    init_std: float = 0.02
    dtype: Any = None
    in_axes: tuple[int, ...] | None = None

    def __post_init__(self):
        check_positive_int("AdaLoRA", "init_rank", self.init_rank)
        if not isinstance(self.target_rank, int) or not 0 <= self.target_rank <= self.init_rank:
            raise ValueError(f"AdaLoRA: target_rank must be an int in [0, init_rank], "
                             f"got {self.target_rank!r}")
        freeze_in_axes(self)

    @property
    def scale(self) -> float:
        return (self.init_rank if self.alpha is None else self.alpha) / self.init_rank

    def build(self, key: Array, base: Array, *, path: str) -> "AdaLoRANode":
        self.check_leaf(base, path)
        in_axes = resolve_in_axes(base.shape, self.in_axes, path)
        fan_in, fan_out = to_matrix(base, in_axes).shape
        if self.init_rank > min(fan_in, fan_out):
            raise ValueError(f"{path}: init_rank {self.init_rank} exceeds min(fan_in, fan_out) = "
                             f"{min(fan_in, fan_out)} for a leaf of shape {base.shape}")
        dt = factor_dtype(base.dtype, self.dtype)
        kp, kq = jax.random.split(key)
        r = self.init_rank
        return AdaLoRANode(
            base=base, p=self.init_std * jax.random.normal(kp, (fan_in, r), dt),
            lam=jnp.zeros((r,), dt), q=self.init_std * jax.random.normal(kq, (r, fan_out), dt),
            config=self, shape=tuple(base.shape), in_axes=in_axes)


@struct.dataclass
class AdaLoRANode(AdapterNode):
    """``K = base + s·p·diag(λ)·q``; trainable ``p``, ``lam``, ``q``."""

    base: Array
    p: Array
    lam: Array
    q: Array
    config: AdaLoRA = struct.field(pytree_node=False, default=None)
    shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    in_axes: tuple[int, ...] = struct.field(pytree_node=False, default=())

    trainable = ("p", "lam", "q")
    method = "AdaLoRA"
    field_axes = {"base": "base", "p": "in_rank", "lam": "replicated", "q": "rank_out"}

    @property
    def rank(self) -> int:
        return self.config.init_rank

    @property
    def scale(self) -> float:
        return self.config.scale

    def delta(self) -> Array:
        return from_matrix(self.scale * ((self.p * self.lam) @ self.q), self.shape, self.in_axes)


    def dot(self, x: Array, op: LinearOp, **_) -> Array:
        if not leading_in_axes(self):
            return op(x, self.materialize())
        y = op(x, self.base)
        r = self.config.init_rank
        h = op(x, self.p.reshape(self.in_shape + (r,))) * (self.lam * self.scale)
        lo = jnp.tensordot(h, self.q.reshape((r,) + self.out_shape).astype(h.dtype), axes=1)
        return y + lo.astype(y.dtype)
