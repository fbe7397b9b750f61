"""AdaLoRA: SVD-form adapters with adaptive rank (Zhang et al. ICLR 2023, arXiv 2303.10512).

In jlora's orientation, with the kernel viewed as ``(fan_in, fan_out)``:

    ΔK = p · diag(λ) · q · alpha / r_init,   p (fan_in, r), λ (r,), q (r, fan_out)

The divisor stays the *initial* rank after pruning (as the official code).
The factorized forward is ``y = x·K0 + s·((drop(x)·p)·diag(λ))·q``: dropout (PEFT's
``lora_dropout``, ``dropout=`` here, default 0) acts on the adapter branch's input only,
and only when the fast path is given a dropout key (training), as LoRA's.
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
    dropped_delta_dot,
    freeze_in_axes,
    from_matrix,
    leading_in_axes,
    strict_options,
    view_leaf,
)


@strict_options
@dataclasses.dataclass(frozen=True)
class AdaLoRA(Config):
    """AdaLoRA config.

    Args:
      init_rank: starting rank ``r_init`` of every matrix.
      target_rank: average rank the allocator prunes down to, in ``[0, init_rank]``.
      alpha: scale numerator (finite, > 0); ``s = alpha / init_rank`` (default ``init_rank``, s = 1).
        PEFT's ``SVDLinear`` scales by ``lora_alpha / (init_r + 1e-5)`` (default ``lora_alpha=8``):
        ``alpha = lora_alpha·r/(r + 1e-5)`` gives the same scale.
      init_std: std (finite, >= 0) of the ``p``, ``q`` init (0.02 as the official code).
      dtype, in_axes: as ``LoRA``.
      dropout: dropout rate in ``[0, 1)`` on the adapter branch input (fast path, training
        only), as ``LoRA``'s and PEFT's AdaLoRA ``lora_dropout``.
    """

    init_rank: int = 12
    target_rank: int = 8
    alpha: float | None = None
    init_std: float = 0.02
    dtype: Any = None
    in_axes: tuple[int, ...] | None = None
    expert_axis: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        check_stacking(self, "AdaLoRA")
        v.positive_int("AdaLoRA", "init_rank", self.init_rank)
        v.positive_int("AdaLoRA", "target_rank", self.target_rank, minimum=0)
        if self.target_rank > self.init_rank:
            raise ValueError(f"AdaLoRA: target_rank must be an int in [0, init_rank], "
                             f"got {self.target_rank!r} with init_rank={self.init_rank}")
        v.real("AdaLoRA", "alpha", self.alpha, gt=0.0, allow_none=True)
        v.real("AdaLoRA", "init_std", self.init_std, ge=0.0)
        v.real("AdaLoRA", "dropout", self.dropout, ge=0.0, lt=1.0)
        freeze_in_axes(self)

    @property
    def scale(self) -> float:
        return (self.init_rank if self.alpha is None else self.alpha) / self.init_rank

    def build(self, key: Array, base: Array, *, path: str) -> "AdaLoRANode":
        if self.expert_axis is not None:
            return stacked_build(self, key, base, path=path)
        view = view_leaf(self, base, path, rank=self.init_rank, rank_name="init_rank")
        dt, r = view.dtype, self.init_rank
        kp, kq = jax.random.split(key)
        return AdaLoRANode(
            base=base, p=self.init_std * jax.random.normal(kp, (view.fan_in, r), dt),
            lam=jnp.zeros((r,), dt), q=self.init_std * jax.random.normal(kq, (r, view.fan_out), dt),
            config=self, shape=view.shape, in_axes=view.in_axes)


@per_slice
class AdaLoRANode(AdapterNode):
    """``K = base + s·p·diag(λ)·q``; trainable ``p``, ``lam``, ``q``."""

    base: Array
    p: Array
    lam: Array
    q: Array

    config_class = AdaLoRA
    trainable = ("p", "lam", "q")
    field_axes = {"base": Role.BASE, "p": Role.IN_RANK, "lam": Role.REPLICATED,
                  "q": Role.RANK_OUT}

    @property
    def rank(self) -> int:
        return self.config.init_rank

    @property
    def scale(self) -> float:
        return self.config.scale

    def delta(self) -> Array:
        acc = accumulation_dtype(self.p.dtype, self.q.dtype)  # one rounding, at the end
        d = self.scale * ((self.p.astype(acc) * self.lam.astype(acc)) @ self.q.astype(acc))
        return from_matrix(d, self.shape, self.in_axes).astype(self.q.dtype)

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        drop = self.config.dropout
        if leading_in_axes(self):
            return base_plus_lowrank(x, op, self, self.p, self.q, mid=self.lam, scale=self.scale,
                                     dropout_key=dropout_key, dropout=drop)
        # inputs that do not lead (an (out, in) kernel): ΔK on the dropped input, as LoRA
        return dropped_delta_dot(x, op, self, self.delta, dropout_key, drop)
