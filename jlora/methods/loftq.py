"""LoftQ: a quantized base and LoRA factors fitted to the quantization error.

Li et al., "LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language
Models" (ICLR 2024, arXiv 2310.08659, §3, Algorithm 1); PEFT's
``init_lora_weights="loftq"``. QLoRA quantizes ``W`` and starts the adapter at
zero, so the model at init is ``Q(W)``, off by the quantization error. LoftQ
alternates, for ``t = 1 … T`` (``loftq_iter``), in the PyTorch layout
``W = K0ᵀ`` (``out × in``) that the quantizer reads:

    Q_t   = q(W − L_{t−1}·R_{t−1})            (L_0·R_0 = 0)
    L_t, R_t = rank-r SVD of W − deq(Q_t):  L = U_r·√S_r,  R = √S_r·V_rᵀ

and keeps ``Q_T`` as the frozen base and ``L_T·R_T`` as the adapter, so the
model at init is ``deq(Q_T) + L·R ≈ W`` (the error shrinks with ``T``).

**The LoRA scale.** The adapter contributes ``s·a·b`` (``s = alpha/rank``, or
``alpha/√rank`` with rsLoRA). PEFT 0.21.2 assigns ``lora_A = R``, ``lora_B = L``
and ignores ``s``, so its init is ``deq(Q) + s·L·R``: exact only at ``s = 1``
(``alpha = rank``; PEFT's example uses ``r = alpha = 16``). jlora divides by
``s``: ``a = Rᵀ/√s``, ``b = Lᵀ/√s``, so ``s·a·b = (L·R)ᵀ`` for every alpha; at
``alpha = rank`` the factors are PEFT's.

The quantizer is the QLoRA config's (``jlora.quant.quantize``, the bitsandbytes
layout). ``LoftQ``'s defaults, NF4 with blocks of 64 and no double
quantization, are PEFT's (``Params4bit(..., compress_statistics=False)``);
``double_quant=True`` runs the alternation with double-quantized scales, so the
stored base is exactly the ``Q_T`` the factors were fitted to. The SVD is
float32 and deterministic (no random key).

The result is an ordinary :class:`jlora.methods.QLoRANode` (``config`` a
``LoftQ``): training, ``merge`` and PEFT export are QLoRA's. An exported
adapter applies to the LoftQ base ``deq(Q_T)``, not to ``W`` (as PEFT's: save
the dequantized base beside it).

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> k = jax.random.normal(jax.random.key(0), (64, 32))
    >>> spec = jlora.Spec({"w/kernel": jlora.LoftQ(rank=4, loftq_iter=2)})
    >>> node = jlora.apply({"w": {"kernel": k}}, spec, key=jax.random.key(1))["w"]["kernel"]
    >>> q_err = float(jnp.linalg.norm(jlora.dequantize(node.quantized) - k))
    >>> loftq_err = float(jnp.linalg.norm(jlora.merge({"x": node})["x"] - k))
    >>> loftq_err < q_err
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp

from jlora import quant as Q
from jlora._validate import positive_int
from jlora.methods.base import Array, from_matrix, strict_options, to_matrix, view_leaf
from jlora.methods.qlora import QLoRA, QLoRANode


def loftq_factors(kernel: Array, rank: int, *, loftq_iter: int = 1, scale: float = 1.0,
                  quantizer: Callable[[Array], Any],
                  in_axes: tuple[int, ...] | None = None):
    """LoftQ's alternation on one kernel: ``(quantized, a, b)`` with ``s·a·b ≈ K0 − deq(quantized)``.

    ``quantizer(res) -> QuantizedArray`` quantizes a kernel-shaped float32 array;
    ``scale`` is the LoRA scale ``s`` the factors are divided by (``√s`` each).
    """
    in_axes = tuple(range(kernel.ndim - 1)) if in_axes is None else tuple(in_axes)
    w = to_matrix(jnp.asarray(kernel, jnp.float32), in_axes)
    res = w
    for t in range(loftq_iter):
        q = quantizer(from_matrix(res, kernel.shape, in_axes))
        err = w - to_matrix(Q.dequantize(q, jnp.float32), in_axes)
        # ΔK = errᵀ of PyTorch's W − Qd: its SVD gives a = V_r·√S_r = Rᵀ, b = √S_r·U_rᵀ = Lᵀ
        u, sv, vt = jnp.linalg.svd(err, full_matrices=False)
        root = jnp.sqrt(sv[:rank])
        a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
        if t < loftq_iter - 1:
            res = w - a @ b
    inv = 1.0 / math.sqrt(scale)
    return q, a * inv, b * inv


@strict_options
@dataclasses.dataclass(frozen=True)
class LoftQ(QLoRA):
    """QLoRA whose base and factors come from LoftQ's alternation (see the module docstring).

    Args: QLoRA's (``rank``, ``alpha``, ``quant``, ``block_size``, ``double_quant``
    (default ``False`` here, as PEFT's LoftQ), ``compute_dtype``, ``rslora``,
    ``dropout``, ``dtype``, ``in_axes``), plus
      loftq_iter: alternation steps ``T >= 1`` (PEFT's ``LoftQConfig.loftq_iter``).
    """

    double_quant: bool = False
    loftq_iter: int = 1

    def __post_init__(self):
        super().__post_init__()
        positive_int("LoftQ", "loftq_iter", self.loftq_iter)
        if self.expert_axis is not None:
            raise ValueError("LoftQ: expert_axis is not supported (quantize stacked kernels "
                             "with QLoRA)")
        if self.init != "kaiming":
            raise ValueError(f"LoftQ: init is LoftQ's own; got init={self.init!r}")

    def build(self, key: Array, base: Array, *, path: str) -> QLoRANode:
        view = view_leaf(self, base, path, rank=self.rank)
        quantizer = lambda x: Q.quantize(x, self.quant, self.block_size, self.double_quant,
                                         in_axes=view.in_axes)
        q, a, b = loftq_factors(base, self.rank, loftq_iter=self.loftq_iter, scale=self.scale,
                                quantizer=quantizer, in_axes=view.in_axes)
        q = dataclasses.replace(q, dtype=jnp.dtype(base.dtype).name)
        return QLoRANode(quantized=q, a=a.astype(view.dtype), b=b.astype(view.dtype),
                         config=self, shape=tuple(base.shape), in_axes=view.in_axes)
