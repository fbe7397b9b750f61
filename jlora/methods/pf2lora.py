"""PF2LoRA: two-level LoRA for personalized federated fine-tuning (Hao et al. 2025, arXiv 2503.03920).

Every targeted kernel carries a shared first-level pair ``(a, b)`` and a
personal second-level pair ``(c, d)`` (eq. 2 of the paper, in jlora's
orientation):

    K = K0 + s·a·b + s̃·c·d,    a (fan_in, r), b (r, fan_out), c (fan_in, r̃), d (r̃, fan_out)

with ``s = alpha/r`` and ``s̃ = personal_alpha/r̃`` (``/√r`` with rsLoRA). The
server aggregates ``(a, b)``; ``(c, d)`` never leaves the client
(``jlora.federated.shared`` / ``personal`` split a tree accordingly). The
client's total delta ``a·b + c·d`` has a rank anywhere in ``[r − r̃, r + r̃]``:
the paper's "automatic rank learning". Init: ``a`` and ``c`` kaiming-uniform,
``b`` and ``d`` zero (the model starts at ``K0``). The fast path computes
``y = x·K0 + s·(drop₁(x)·a)·b + s̃·(drop₂(x)·c)·d`` with independent dropout
masks per branch (PEFT's per-adapter ``lora_dropout``); ``merge`` folds both
pairs in.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q": {"kernel": jnp.ones((8, 6))}}
    >>> spec = jlora.Spec({"q/kernel": jlora.PF2LoRA(4, 2, alpha=8, personal_alpha=2)})
    >>> node = jlora.apply(params, spec, key=jax.random.key(0))["q"]["kernel"]
    >>> node.a.shape, node.c.shape, node.scale, node.personal_scale
    ((8, 4), (8, 2), 2.0, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora._validate import positive_int
from jlora.methods._experts import check_stacking, per_slice, stacked_build
from jlora.methods.base import (
    AdapterNode,
    Array,
    Config,
    LinearOp,
    branch_dropout,
    freeze_in_axes,
    from_matrix,
    leading_in_axes,
    lowrank_dot,
    strict_options,
    view_leaf,
)
from jlora.methods.stacked import rows_per_example


def _scale(alpha, rank, rslora):
    alpha = rank if alpha is None else alpha
    return alpha / (math.sqrt(rank) if rslora else rank)


def _kaiming(key, fan_in, r, dt):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, (fan_in, r), dt, -bound, bound)


@strict_options
@dataclasses.dataclass(frozen=True)
class PF2LoRA(Config):
    """Two-level LoRA config (see the module docstring).

    Args:
      rank: ``r`` of the shared pair ``(a, b)``.
      personal_rank: ``r̃`` of the personal pair ``(c, d)`` (the paper tries ``r/2``, ``r/4``).
      alpha: shared scale numerator (default ``rank``).
      personal_alpha: personal scale numerator (default ``personal_rank``).
      rslora: ``α/√r`` scaling for both pairs.
      dropout: adapter-branch input dropout (fast path, training only).
      dtype: factor dtype (default float32 or the base's if wider).
      in_axes: which kernel axes are inputs (default all but the last).
    """

    rank: int
    personal_rank: int
    alpha: float | None = None
    personal_alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0
    dtype: Any = None
    in_axes: tuple[int, ...] | None = None
    expert_axis: int | None = None

    def __post_init__(self):
        check_stacking(self, "PF2LoRA")
        name = type(self).__name__
        positive_int(name, "rank", self.rank)
        positive_int(name, "personal_rank", self.personal_rank)
        for opt in ("alpha", "personal_alpha"):
            v = getattr(self, opt)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0 or not math.isfinite(v)):
                raise ValueError(f"{name}: {opt} must be a positive number, got {v!r}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"{name}: rslora must be a bool, got {self.rslora!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout!r}")
        freeze_in_axes(self)

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank, self.rslora)

    @property
    def personal_scale(self) -> float:
        return _scale(self.personal_alpha, self.personal_rank, self.rslora)

    def factors(self, key: Array, base: Array, *, path: str):
        view = view_leaf(self, base, path, rank=max(self.rank, self.personal_rank))
        fan_in, fan_out, dt, in_axes = view.fan_in, view.fan_out, view.dtype, view.in_axes
        ka, kc = jax.random.split(key)
        return dict(base=base, a=_kaiming(ka, fan_in, self.rank, dt),
                    b=jnp.zeros((self.rank, fan_out), dt),
                    c=_kaiming(kc, fan_in, self.personal_rank, dt),
                    d=jnp.zeros((self.personal_rank, fan_out), dt),
                    config=self, shape=tuple(base.shape), in_axes=in_axes)

    def build(self, key: Array, base: Array, *, path: str) -> "PF2LoRANode":
        if self.expert_axis is not None:
            return stacked_build(self, key, base, path=path)
        return PF2LoRANode(**self.factors(key, base, path=path))


@per_slice
class PF2LoRANode(AdapterNode):
    """``K = base + s·a·b + s̃·c·d``; ``(a, b)`` shared, ``(c, d)`` personal."""

    base: Array
    a: Array
    b: Array
    c: Array
    d: Array

    config_class = PF2LoRA
    trainable = ("a", "b", "c", "d")
    personal_fields = ("c", "d")
    method = "PF2LoRA"
    field_axes = {"base": "base", "a": "in_rank", "b": "rank_out", "c": "in_rank",
                  "d": "rank_out"}

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def personal_scale(self) -> float:
        return self.config.personal_scale

    def branch_weights(self):
        """Multipliers of the shared and personal branches (1 and 1 here)."""
        return 1.0, 1.0

    def _branch_deltas(self) -> tuple[Array, Array]:
        """The shared and personal updates ``w·s·a·b`` and ``w̃·s̃·c·d``, laid out like the base."""
        w_shared, w_personal = self.branch_weights()
        if getattr(w_shared, "ndim", 0):
            # Per-example weights have no single merged weight: a layer served
            # from merged weights gets NaN (loud), the fast path never reads it.
            nan = jnp.full(self.shape, jnp.nan, jnp.result_type(self.a))
            return nan, nan
        return (from_matrix((w_shared * self.scale) * (self.a @ self.b), self.shape, self.in_axes),
                from_matrix((w_personal * self.personal_scale) * (self.c @ self.d), self.shape,
                            self.in_axes))

    def delta(self) -> Array:
        shared, personal = self._branch_deltas()
        return shared + personal

    def materialize(self) -> Array:
        d = self.delta()
        return (self.base.astype(d.dtype) + d).astype(self.base.dtype)

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        drop = self.config.dropout
        # one dropout per branch, as PEFT's per-adapter lora_dropout: independent masks
        k_shared, k_own = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        if not leading_in_axes(self):  # an op the low-rank branches cannot take: dense deltas
            if dropout_key is None or drop == 0:
                return op(x, self.materialize())
            y = op(x, self.base)
            for key, delta in zip((k_shared, k_own), self._branch_deltas()):
                y = y + op(branch_dropout(x, key, drop), delta.astype(self.base.dtype)).astype(
                    y.dtype)
            return y
        y = op(x, self.base)
        shared = lowrank_dot(x, op, self, self.a, self.b, scale=self.scale,
                             dropout_key=k_shared, dropout=drop)
        own = lowrank_dot(x, op, self, self.c, self.d, scale=self.personal_scale,
                          dropout_key=k_own, dropout=drop)
        w_shared, w_personal = self.branch_weights()
        examples = context.get("examples")
        w_shared, w_personal = _rows(w_shared, y, examples), _rows(w_personal, y, examples)
        return y + (w_shared * shared + w_personal * own).astype(y.dtype)


def _rows(w, y, examples=None):
    """A per-example weight ``(N,)`` laid over ``y``'s leading rows (batch-major).

    ``examples`` is the batch size when the layer has flattened the example
    axis with others into ``y``'s leading axis (``jlora.linen``'s ``Dense``);
    ``None``: that axis is the example axis. ``N`` must equal the batch size
    (:func:`jlora.methods.stacked.rows_per_example`).
    """
    w = jnp.asarray(w)
    if w.ndim == 0:
        return w
    t = rows_per_example(
        f"per-example weights of shape {w.shape}", w.shape[0] if w.ndim == 1 else None,
        y.shape[0], examples,
        "pass one weight per example of the leading batch axis; under jax.vmap over examples, "
        "vmap the node's weight too (in_axes on it), so each example sees a scalar")
    return jnp.repeat(w, t).reshape((y.shape[0],) + (1,) * (y.ndim - 1))
