"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

In jlora's orientation, with the kernel viewed as ``(fan_in, fan_out)``:

    V = K0 + s·a·b,    n_j = ‖V[:, j]‖₂ (per output feature),    K' = V ⊙ (m / n)

``m (fan_out,)`` starts at the column norms of the initial ``V`` (so the model is
unchanged at init) and trains together with ``a`` and ``b``.

``detach_norm=True`` (default, as the official code and PEFT) treats ``n`` as a
constant in the backward pass: gradients reach ``m`` and ``a·b`` through the
numerator only. This is the paper's memory-saving choice (section 4.3): the
backward needs no ``∂n/∂(a, b)`` path, at a negligible accuracy cost. Set it to
``False`` for the exact gradient of ``K'``.

Norms carry an epsilon: ``n_j = sqrt(‖V[:, j]‖² + 1e-24)``. PEFT (0.21) has
none, so a kernel with an all-zero output column gives ``0/0 = NaN`` there;
with the epsilon such a column starts at ``m_j = n_j = 1e-12``, a ratio of
exactly 1, and stays finite in the forward and in both gradient modes. For
any column with ``‖V[:, j]‖² ≫ 1e-24`` (every non-degenerate float32 or
float64 weight) the epsilon is below rounding and values match PEFT.

The fast path never forms the dense ``V`` (PEFT does, every forward): with
dropout on the adapter branch,

    y = (m/n) ⊙ (x·K0 + s·(drop(x)·a)·b) + bias

and the norm comes from ``n_j² = ‖K0[:, j]‖² + 2s·((K0ᵀ·a) ⊙ bᵀ).sum(-1)_j +
s²·(bᵀ·(aᵀa)·b)_jj``, which costs one ``(out, in) × (in, r)`` product and an
``r × r`` Gram matrix, where PEFT forms the dense weight every forward. With
``detach_norm=True`` the backward is hand-written (``_rescaled_sum``): it
scales the cotangent by ``r = m/n`` once and takes every product and the
magnitude's gradient from that, so the step keeps no unscaled copy of the
cotangent and writes no ``(fan_in, fan_out)`` temporary; on all-MiniLM-L6-v2
with every linear layer adapted, its temporaries are 1.03x LoRA's step's.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"dense/kernel": jlora.DoRA(rank=2)}),
    ...                       key=jax.random.key(0))
    >>> adapted["dense"]["kernel"].m.shape
    (3,)
    >>> bool(jnp.allclose(jlora.merge(adapted)["dense"]["kernel"], 1.0))  # identity at init
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _validate as v
from jlora.methods.base import (
    Array,
    LinearOp,
    Role,
    accumulation_dtype,
    from_matrix,
    leading_in_axes,
    lowrank_in,
    strict_options,
    to_matrix,
)
from jlora.methods._experts import per_slice, stacked_build
from jlora.methods.lora import LoRA, LoRANode

#: added to every squared column norm (see the module docstring)
NORM_EPS = 1e-24


@strict_options
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA config: every ``LoRA`` option, plus ``detach_norm`` (default True)."""

    detach_norm: bool = True

    def __post_init__(self):
        super().__post_init__()
        v.boolean("DoRA", "detach_norm", self.detach_norm)

    def build(self, key: Array, base: Array, *, path: str) -> "DoRANode":
        if self.expert_axis is not None:  # one DoRA per slice: its own m and column norms
            return stacked_build(self, key, base, path=path)
        in_axes, base, a, b, a0, b0 = self.init_factors(key, base, path=path)
        node = DoRANode(base=base, a=a, b=b, m=jnp.zeros(()), a0=a0, b0=b0, config=self,
                        shape=tuple(base.shape), in_axes=in_axes)
        return node.replace(m=node.column_norms())


@per_slice
class DoRANode(LoRANode):
    """``K' = (base + s·a·b) ⊙ m / ‖base + s·a·b‖``; trainable ``a``, ``b``, ``m``.

    Shares LoRANode's fields (``base``, ``a``, ``b``, ``a0``, ``b0``) and adds
    the magnitude ``m (fan_out,)``.
    """

    m: Array

    config_class = DoRA
    field_axes = {**LoRANode.field_axes, "m": Role.OUT}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("a", "b", "m") if self.config.train_a else ("b", "m")

    def _acc(self) -> jnp.dtype:
        """The precision of norms and merges: bfloat16 factors on a float32 base neither
        round the base nor sum squares in bfloat16."""
        return accumulation_dtype(self.base.dtype, self.a.dtype)

    def column_norms(self) -> Array:
        """``sqrt(‖(K0 + s·a·b)[:, j]‖² + NORM_EPS)`` per output feature, without forming ``a·b``."""
        acc = self._acc()
        k0 = to_matrix(self.base, self.in_axes)
        a, b, s = self.a, self.b.astype(acc), self.scale
        # aᵀ·K0, not K0ᵀ·a: XLA:CPU contracts K0 over its rows as a fast GEMM (the layout
        # of x·K0) but sends K0ᵀ·a to a slow generic dot. Factors as narrow as K0 leave it
        # as it is: the product accumulates in float32 without a float32 copy of K0
        ak0 = jnp.matmul(a.T, k0, preferred_element_type=acc)
        af = a.astype(acc)
        sq = (jnp.sum(jnp.square(k0.astype(acc)), axis=0)
              + 2 * s * jnp.sum(ak0 * b, axis=0)
              + s * s * jnp.sum(((af.T @ af) @ b) * b, axis=0))
        return jnp.sqrt(jnp.maximum(sq, 0.0) + NORM_EPS)

    def _ratio(self) -> Array:
        n = self.column_norms()
        if self.config.detach_norm:
            n = jax.lax.stop_gradient(n)
        return self.m / n

    def _merged(self) -> Array:
        """``(K0 + s·a·b) ⊙ m/‖·‖`` as a matrix, in :meth:`_acc` precision."""
        acc = self._acc()
        vm = to_matrix(self.base, self.in_axes).astype(acc) + self.scale * (
            self.a.astype(acc) @ self.b.astype(acc))
        return vm * self._ratio().astype(acc)

    def materialize(self) -> Array:
        return from_matrix(self._merged(), self.shape, self.in_axes).astype(self.base.dtype)

    def delta(self) -> Array:
        acc = self._acc()
        original = to_matrix(self.base, self.in_axes).astype(acc)
        if self.a0 is not None:
            original = original + self.scale * (self.a0.astype(acc) @ self.b0.astype(acc))
        return from_matrix(self._merged() - original, self.shape, self.in_axes).astype(self.a.dtype)

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        if not leading_in_axes(self):
            return op(x, self.materialize())
        if not self.config.detach_norm:  # ∂n/∂(a, b) flows: leave the whole product to autodiff
            y = LoRANode.dot(self, x, op, dropout_key=dropout_key)
            return (y * self._ratio().reshape(self.out_shape).astype(y.dtype)).astype(y.dtype)
        h = lowrank_in(x, op, self, self.a, scale=self.scale, dropout_key=dropout_key,
                       dropout=self.config.dropout)
        b = self.b.reshape((self.b.shape[0],) + self.out_shape)
        return _rescaled_sum(op, x, self.base, h, b, self._ratio().reshape(self.out_shape))


def _rescaled_sum(op: LinearOp, x: Array, kernel: Array, h: Array, b: Array,
                  ratio: Array) -> Array:
    """``(op(x, kernel) + h·b) ⊙ ratio`` over the output axes, with a hand-written VJP.

    The backward scales the incoming cotangent once, ``g = dy ⊙ ratio``, and
    takes every product from it: ``dx = g·kernelᵀ``, ``dh = g·bᵀ``,
    ``db = hᵀ·g``, as LoRA's backward does from ``dy``. The magnitude's
    gradient comes from ``g`` too, ``dratio = Σ_tokens g ⊙ pre / ratio`` with
    ``pre = op(x, kernel) + h·b`` the one ``(tokens, fan_out)`` buffer saved by
    the forward, so ``dy`` itself has a single consumer and XLA folds the
    scaling into the fusion that produces it. Autodiff would keep ``dy`` and
    ``dy ⊙ ratio`` both; scaling the kernel instead would write a
    ``(fan_in, fan_out)`` temporary per layer.

    Dividing by the ratio needs it nonzero: a column with ``|ratio_j| < ε``
    (``ε = eps(dtype)²``: ``1.4e-14`` in float32, ``4.9e-32`` in float64; for
    instance a magnitude ``m_j = 0``) is scaled by ``±ε`` in the backward
    instead. Its ``dratio_j`` stays exact, and its share of ``dx``, ``dh`` and
    ``db`` is off by at most ``2ε·|dy|``, far below the dtype's rounding.
    """
    n_out = ratio.ndim

    def fwd(x, kernel, h, b, ratio):
        y0 = op(x, kernel)
        pre = y0 + jnp.tensordot(h, b.astype(h.dtype), axes=1).astype(y0.dtype)
        return pre * ratio.astype(y0.dtype), (x, kernel, h, b, ratio, pre)

    @jax.custom_vjp
    def rescaled(x, kernel, h, b, ratio):
        return fwd(x, kernel, h, b, ratio)[0]

    def bwd(res, dy):
        x, kernel, h, b, ratio, pre = res
        r = ratio.astype(dy.dtype)
        tiny = jnp.finfo(dy.dtype).eps ** 2
        r = jnp.where(jnp.abs(r) < tiny, jnp.copysign(tiny, r), r)
        lead = tuple(range(dy.ndim - n_out))
        g = dy * r
        dratio = jnp.sum(g * pre, axis=lead) / r
        # XLA drops dkernel when the kernel is frozen (jlora.split)
        dx, dkernel = jax.vjp(op, x, kernel)[1](g)
        gh = g.astype(h.dtype)
        dh = jnp.tensordot(gh, b.astype(h.dtype),
                           axes=(tuple(range(len(lead), dy.ndim)), tuple(range(1, b.ndim))))
        db = jnp.tensordot(h, gh, axes=(lead, lead))
        return dx, dkernel, dh, db.astype(b.dtype), dratio.astype(ratio.dtype)

    rescaled.defvjp(fwd, bwd)
    return rescaled(x, kernel, h, b, ratio)
