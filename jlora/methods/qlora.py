"""QLoRA: LoRA on a 4-bit quantized frozen base (Dettmers et al. 2023, arXiv 2305.14314).

The frozen kernel ``K0`` is stored as :class:`jlora.quant.QuantizedArray`: NF4
codes (two a byte, blocks of ``block_size`` along the contracting axis, the
bitsandbytes layout) with double-quantized block scales (§3). The adapter is
LoRA's, trained in float:

    y = x·deq(K0) + s·(drop(x)·a)·b,     s = alpha / rank

``deq`` runs in ``compute_dtype`` (QLoRA's ``bnb_4bit_compute_dtype``; default
the kernel's own dtype). The fast path dequantizes *inside* the matmul under a
custom VJP whose residuals are the packed codes and scales only: the backward
recomputes ``deq(K0)`` for ``∂L/∂x = g·deq(K0)ᵀ`` (as bitsandbytes'
``MatMul4Bit`` does), so no dequantized weight is kept alive between forward
and backward, also when the blocks run under ``nn.scan``. Storage is about
``4.127`` bits a base parameter (0.516 bytes) with NF4, blocks of 64 and double
quantization.

``merge`` gives ``deq(K0) + s·a·b`` in ``compute_dtype``; ``merge(onto=...)``,
``unmerge`` and PEFT export use the delta ``s·a·b`` alone, so a QLoRA adapter
is an ordinary LoRA adapter for any float copy of the base (a 4-bit copy is
served through the node itself, or merged onto its dequantized weights).

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"dense/kernel": jlora.QLoRA(rank=4)}),
    ...                       key=jax.random.key(1))
    >>> node = adapted["dense"]["kernel"]
    >>> node.quantized.codes.shape, node.a.shape, node.b.shape
    ((64, 64), (128, 4), (4, 64))
    >>> round(node.base_nbytes() / (128 * 64), 3)
    0.517
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import quant as Q
from jlora._validate import boolean, choice, floating_dtype, positive_int, real
from jlora.methods._experts import (
    check_expert_axis,
    factor_specs,
    is_slice,
    is_stacked,
    own_config,
    slice_static,
    stacked_init,
    stacked_lowrank,
    stacked_product,
)
from jlora.methods.base import (
    AdapterNode,
    Array,
    Config,
    LinearOp,
    accumulation_dtype,
    branch_dropout,
    freeze_in_axes,
    from_matrix,
    leading_in_axes,
    lowrank_dot,
    strict_options,
)
from jlora.methods.lora import LoRA


@strict_options
@dataclasses.dataclass(frozen=True)
class QLoRA(Config):
    """QLoRA config: a quantized frozen base plus LoRA factors.

    Args:
      rank: the rank ``r`` of ``a·b``.
      alpha: scale numerator (``s = alpha/rank``); default ``rank``.
      quant: ``"nf4"`` (QLoRA), ``"fp4"`` or ``"int8"`` (per-block absmax).
      block_size: values per quantization block along the contracting axis (64).
      double_quant: 8-bit codes for the block scales (QLoRA's double quantization).
      compute_dtype: dtype the base is dequantized to and the matmul runs in;
        default the kernel's own dtype.
      init: ``"kaiming"`` or ``"gaussian"`` (LoRA's; ``b = 0``).
      rslora: ``s = alpha/√rank``.
      dropout: dropout rate on the adapter branch input (fast path, training).
      dtype: factor dtype; default float32.
      in_axes: which kernel axes are inputs; default all but the last.
      expert_axis: ``0`` for stacked kernels (MoE experts, ``nn.scan`` layers):
        factors per slice and one bitsandbytes weight per slice.
      rank_per_expert: ``"full"`` or ``"divide"`` (``max(1, rank // E)``).
    """

    rank: int
    alpha: float | None = None
    quant: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: Any = None
    init: str = "kaiming"
    rslora: bool = False
    dropout: float = 0.0
    dtype: Any = None
    in_axes: tuple[int, ...] | None = None
    expert_axis: int | None = None
    rank_per_expert: str = "full"

    def __post_init__(self):
        positive_int("QLoRA", "rank", self.rank)
        check_expert_axis("QLoRA", self.expert_axis, self.rank_per_expert)
        real("QLoRA", "alpha", self.alpha, gt=0.0, allow_none=True)
        choice("QLoRA", "quant", self.quant, Q.QUANTS)
        positive_int("QLoRA", "block_size", self.block_size, minimum=2)
        if self.block_size % 2:
            raise ValueError(f"QLoRA: block_size must be even, got {self.block_size}")
        boolean("QLoRA", "double_quant", self.double_quant)
        choice("QLoRA", "init", self.init, ("kaiming", "gaussian"))
        boolean("QLoRA", "rslora", self.rslora)
        real("QLoRA", "dropout", self.dropout, ge=0.0, lt=1.0)
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype",
                               floating_dtype("QLoRA", "compute_dtype", self.compute_dtype))
        freeze_in_axes(self)

    @property
    def scale(self) -> float:
        return self.lora().scale

    def lora(self) -> LoRA:
        """The LoRA config of the adapter part (shared init and checks)."""
        return LoRA(rank=self.rank, alpha=self.alpha, init=self.init, rslora=self.rslora,
                    dropout=self.dropout, dtype=self.dtype, in_axes=self.in_axes,
                    expert_axis=self.expert_axis, rank_per_expert=self.rank_per_expert)

    def build(self, key: Array, base: Array, *, path: str) -> "QLoRANode":
        self.check_leaf(base, path)
        if self.expert_axis is not None:
            in_axes, base, a, b, _, _ = stacked_init(self.lora(), key, base, path=path)
        else:
            in_axes, base, a, b, _, _ = self.lora().init_factors(key, base, path=path)
        q = Q.quantize(base, self.quant, self.block_size, self.double_quant, in_axes=in_axes,
                       stack_axes=() if self.expert_axis is None else (0,))
        return QLoRANode(quantized=q, a=a, b=b, config=self, shape=tuple(base.shape),
                         in_axes=in_axes)


def quantized_dot(x: Array, q: Q.QuantizedArray, op: LinearOp, dtype: Any) -> Array:
    """``op(x, deq(q))`` whose backward keeps only ``q`` (codes and scales).

    ``op`` must be linear in ``x`` (a layer's matmul, einsum or convolution).
    The VJP recomputes ``deq(q)`` and transposes ``op`` in ``x``; codes and
    scales are frozen (zero cotangents), so no weight-sized array is a residual.
    """
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return op(x, q.dequantize(dtype))  # integer inputs (ids) carry no gradient
    x_aval = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    @jax.custom_vjp
    def f(x, q):
        return op(x, q.dequantize(dtype))

    def fwd(x, q):
        return op(x, q.dequantize(dtype)), q

    def bwd(q, g):
        w = q.dequantize(dtype)
        (gx,) = jax.linear_transpose(lambda x: op(x, w), x_aval)(g)
        zeros = jax.tree.map(
            lambda a: (np.zeros(a.shape, jax.dtypes.float0)
                       if not jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros_like(a)), q)
        return gx, zeros

    f.defvjp(fwd, bwd)
    return f(x, q)


class QLoRANode(AdapterNode):
    """``K = deq(quantized) + s·a·b``; trainable ``a`` and ``b``."""

    quantized: Q.QuantizedArray
    a: Array
    b: Array

    config_class = QLoRA
    method = "QLoRA"
    trainable = ("a", "b")
    field_axes = {"quantized": "quantized", "a": "in_rank", "b": "rank_out"}

    @property
    def scale(self) -> float:
        return own_config(self).scale

    @property
    def rank(self) -> int:
        return own_config(self).rank

    def partition_specs(self, entries, fold):
        """Codes and block scales shard with the base axes they store (the packed
        input axis included), per-slice double-quantization state with the
        expert axis; factors as LoRA's. ``jlora.sharding.specs(..., mesh=)``
        then keeps only the mesh axes that divide each stored length."""
        from jax.sharding import PartitionSpec as P

        q = self.quantized
        stored = [entries[p] for p in q.perm]
        lead = stored[:q.n_stack]
        structured = q.codes.ndim == len(q.shape)
        grid = P(*stored) if structured else P(*lead, None)
        qspecs = dataclasses.replace(
            q, codes=grid, absmax=grid,
            absmax2=None if q.absmax2 is None else P(*lead, None),
            offset=None if q.offset is None else P(*lead))
        return {"quantized": qspecs, **factor_specs(self, entries, fold)}

    def slice_view(self) -> "QLoRANode":
        """One slice of a stacked node whose fields ``nn.scan`` has cut."""
        return self.replace(quantized=self.quantized.slice_view(), **slice_static(self))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.config.compute_dtype or self.quantized.dtype)

    @property
    def base(self) -> Array:
        """The dequantized frozen kernel in the compute dtype."""
        if is_slice(self):  # nn.scan cut the codes: the array's static layout is the stack's
            return self.slice_view().base
        return self.quantized.dequantize(self.compute_dtype)

    def base_nbytes(self) -> int:
        """Bytes the quantized base holds (codes, scales, double-quantization state)."""
        return self.quantized.nbytes

    def _ab(self) -> Array:
        """``s·a·b`` as a kernel, in :func:`accumulation_dtype` precision."""
        acc = accumulation_dtype(self.a.dtype)
        a, b = self.a.astype(acc), self.b.astype(acc)
        if is_stacked(self):
            return stacked_product(self, a, b, self.scale)
        return from_matrix(self.scale * (a @ b), self.shape, self.in_axes)

    def delta(self) -> Array:
        if is_slice(self):
            return self.slice_view().delta()
        return self._ab().astype(self.a.dtype)

    def materialize(self) -> Array:
        if is_slice(self):
            return self.slice_view().materialize()
        # bfloat16 factors must not round a float32 compute dtype's base
        acc = accumulation_dtype(self.compute_dtype, self.a.dtype)
        return (self.base.astype(acc) + self._ab().astype(acc)).astype(self.compute_dtype)

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        if is_slice(self):
            return self.slice_view().dot(x, op, dropout_key=dropout_key, **context)
        drop = self.config.dropout
        if is_stacked(self):
            base = jax.ShapeDtypeStruct(tuple(self.shape), self.compute_dtype)
            lo = stacked_lowrank(x, op, self, self.a, self.b, self.scale, base=base,
                                 dropout_key=dropout_key, dropout=drop)
        elif leading_in_axes(self):
            lo = lowrank_dot(x, op, self, self.a, self.b, scale=self.scale,
                             dropout_key=dropout_key, dropout=drop)
        else:
            lo = None
        if lo is None and (dropout_key is None or drop == 0):
            return op(x, self.materialize())
        xc = x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        y = quantized_dot(xc, self.quantized, op, self.compute_dtype)
        if lo is None:  # an op the low-rank branch cannot take: the delta on the dropped input
            lo = op(branch_dropout(xc, dropout_key, drop), self._ab().astype(self.compute_dtype))
        return y + lo.astype(y.dtype)


def from_lora(adapted: Any, quantized: Any = None, *, quant: str = "nf4", block_size: int = 64,
              double_quant: bool = True, compute_dtype: Any = None) -> Any:
    """Turn the plain LoRA nodes of ``adapted`` into QLoRA nodes with the same factors.

    ``quantized`` (optional) is a tree with a :class:`jlora.quant.QuantizedArray`
    at each adapted path (e.g. from ``jlora.quant.quantize_tree``): its codes and
    scales become the nodes' base unchanged, which is how a PEFT adapter is put
    on a jlora-quantized model::

        adapted = jlora.peft.load(folder, jlora.quant.dequantize_tree(qparams))
        adapted = jlora.methods.qlora.from_lora(adapted, qparams)

    Without ``quantized``, each node's float base is quantized with the given
    options. Nodes with PiSSA/OLoRA's initial factors or a stacked axis keep
    their own class, and so, with a warning naming them, do nodes that train one
    factor only (LoRA-FA's ``train_a=False``, MiCA's ``init="mica"``): a QLoRA
    node trains both.
    """
    from jlora.methods.lora import LoRANode
    from jlora.tree import leaves_with_paths, map_with_paths

    given = {}
    if quantized is not None:
        given = {p: q for p, q in leaves_with_paths(
            quantized, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))
            if isinstance(q, Q.QuantizedArray)}

    one_factor = []

    def one(path, node):
        if type(node) is not LoRANode or node.a0 is not None or is_stacked(node):
            return node
        if node.trainable != ("a", "b"):
            one_factor.append(f"{path} (trains {', '.join(node.trainable)} only)")
            return node
        c = node.config
        q = given.get(path)
        if q is None:
            if quantized is not None:
                raise ValueError(f"jlora.methods.qlora.from_lora: no QuantizedArray at {path}")
            q = Q.quantize(node.base, quant, block_size, double_quant, in_axes=node.in_axes)
        elif tuple(q.shape) != tuple(node.shape):
            raise ValueError(f"{path}: quantized base has shape {q.shape}, the adapter "
                             f"{tuple(node.shape)}")
        cfg = QLoRA(rank=c.rank, alpha=c.alpha, quant=q.quant, block_size=q.block_size,
                    double_quant=q.absmax2 is not None, compute_dtype=compute_dtype,
                    rslora=c.rslora, dropout=c.dropout, dtype=c.dtype, in_axes=c.in_axes)
        return QLoRANode(quantized=q, a=node.a, b=node.b, config=cfg, shape=node.shape,
                         in_axes=node.in_axes)

    out = map_with_paths(one, adapted)
    if one_factor:
        warnings.warn("jlora.methods.qlora.from_lora: kept as LoRA nodes with a float base: "
                      f"{'; '.join(one_factor)}; a QLoRA node trains both factors", stacklevel=2)
    return out
