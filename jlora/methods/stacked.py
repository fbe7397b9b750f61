"""Stacked adapters: ``n`` adapters of one layer in one node, for mixed-adapter batches.

Example ``j`` of a batch runs with adapter ``g = ids[j]`` (``-1``: the base alone).
With the adapters' factors stacked along a leading axis and their ranks
zero-padded to the largest ``r`` (exact: the padded columns and rows add
``0·0``), in jlora's ``(fan_in, fan_out)`` view:

    LoRA / rsLoRA:  y_j = x_j·K0 + s_g·(x_j·a_g)·b_g,          a (n, fan_in, r), b (n, r, fan_out)
    DoRA:           y_j = (m_g / ‖K0 + s_g a_g b_g‖) ⊙ (x_j·K0 + s_g·(x_j·a_g)·b_g)
    VeRA:           y_j = x_j·K0 + ((x_j·a)·λ_d,g)·b ⊙ λ_b,g   (one shared frozen pair)

The example axis is the leading axis of every adapted layer's input; a layer
that flattens it together with others (as ``Dense`` does with a sequence axis)
keeps each example's rows contiguous. Shapes are static (no per-adapter
sub-batches, unlike PEFT's mixed-batch forward), and the program is
differentiable: the gather's transpose is a scatter-add, so adapter ``g``
receives the sum of its examples' gradients. Three ways to compute the
low-rank term (``mode``, static):

* ``"gather"`` — gather ``a[ids]``, ``b[ids]`` per example and contract
  (``vmap`` of the layer's own linear map over examples; BGMV-like);
* ``"onehot"`` — one down-projection through all ``n·r`` columns, masked to
  each example's ``r`` (``n×`` the LoRA FLOPs in two plain GEMMs);
* ``"ragged"`` — sort rows by adapter and ``jax.lax.ragged_dot`` (SGMV-like;
  2-D ``Dense`` inputs, other layers use ``"gather"``).

A stacked node has no single merged weight: ``materialize`` raises, and
``jlora.linen.apply`` runs it on the fast path only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jlora.methods.base import AdapterNode, Array, LinearOp, branch_dropout, from_matrix, to_matrix
from jlora.methods.dora import NORM_EPS, DoRANode
from jlora.methods.lora import LoRANode
from jlora.methods.vera import VeRANode

MODES = ("gather", "onehot", "ragged")


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Static description of a stacked node: adapter count, method, compute mode."""

    n: int
    method: str
    mode: str = "gather"
    dropout: float = 0.0
    detach_norm: bool = True


def _rows(x: Array, ids: Array, path: str = "") -> int:
    if ids.ndim != 1:
        raise ValueError(f"adapter_ids must be a 1-D int array (one id per example), got "
                         f"shape {ids.shape}")
    if x.shape[0] % ids.shape[0]:
        raise ValueError(f"{path}: a layer input's leading axis ({x.shape[0]}) is not a "
                         f"multiple of the {ids.shape[0]} adapter_ids")
    return x.shape[0] // ids.shape[0]


def _per_example(v: Array, y: Array) -> Array:
    """Multiply ``y`` (rows, ..., k...) by ``v`` (examples, prod k) per example.

    Rows are contiguous per example and the trailing axes of ``y`` flatten to ``k``.
    """
    n, k = v.shape
    return (y.reshape((n, -1, k)) * v[:, None, :].astype(y.dtype)).reshape(y.shape)


class _StackedBase(AdapterNode):
    """Shared mixed-batch machinery; subclasses give the per-adapter factors."""

    @property
    def n(self) -> int:
        return self.config.n

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self) -> Array:
        raise ValueError(
            f"a stacked node holds {self.n} adapters and has no single merged weight: run it "
            "with jlora.linen.apply(..., adapter_ids=ids), or combine the adapters "
            "(jlora.compose.cat / svd) before merging")

    def materialize(self) -> Array:
        return self.delta()

    def _ids(self, adapter_ids):
        adapter_ids = self.ids if adapter_ids is None else adapter_ids
        if adapter_ids is None:
            raise ValueError(f"a stacked {self.config.method} node ({self.n} adapters) needs "
                             "adapter_ids: jlora.linen.apply(model, variables, x, adapter_ids=ids)")
        ids = jnp.asarray(adapter_ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"adapter_ids must be integers, got dtype {ids.dtype}")
        valid = (ids >= 0) & (ids < self.n)
        return jnp.where(valid, ids, 0), valid, ids

    def _lowrank(self, x, op, a, b, coef, ids, idx, valid):
        """Low-rank term ``((x_j·a_g)·coef_g)·b_g`` per example; ``a`` (n, in, r), ``b`` (n, r, out)."""
        t = _rows(x, ids)
        r = a.shape[-1]
        in_shape, out_shape = self.in_shape, self.out_shape
        mode = self.config.mode
        if (mode == "ragged" and x.ndim == 2 and len(in_shape) == 1
                and jnp.issubdtype(x.dtype, jnp.floating)):
            rows_id = jnp.repeat(jnp.where(valid, idx, self.n), t)  # base-only rows: group n
            order = jnp.argsort(rows_id)
            sizes = jnp.bincount(rows_id, length=self.n + 1).astype(jnp.int32)
            a_x = jnp.concatenate([a, jnp.zeros_like(a[:1])]).astype(x.dtype)
            h = jax.lax.ragged_dot(x[order], a_x, sizes)
            h = h * jnp.repeat(coef, t, axis=0)[order].astype(h.dtype)
            b_x = jnp.concatenate([b, jnp.zeros_like(b[:1])]).reshape(self.n + 1, r, -1)
            ys = jax.lax.ragged_dot(h, b_x.astype(h.dtype), sizes)
            return jnp.zeros_like(ys).at[order].set(ys).reshape(x.shape[:1] + out_shape)
        if mode == "onehot":
            a_cat = jnp.moveaxis(a, 0, -2).reshape(in_shape + (self.n * r,))
            h = op(x, a_cat)
            sel = jax.nn.one_hot(idx, self.n, dtype=h.dtype)[:, :, None] * coef[:, None, :]
            h = _per_example(sel.reshape(sel.shape[0], -1), h)
            return jnp.tensordot(h, b.reshape((self.n * r,) + out_shape).astype(h.dtype), axes=1)
        n_ex = ids.shape[0]
        h = jax.vmap(op)(x.reshape((n_ex, t) + x.shape[1:]),
                         jnp.take(a, idx, axis=0).reshape((n_ex,) + in_shape + (r,)))
        mid = h.shape[2:-1]
        h = h.reshape((n_ex, -1, r)) * coef[:, None, :].astype(h.dtype)
        lo = jnp.einsum("nmr,nro->nmo", h, jnp.take(b, idx, axis=0).reshape(n_ex, r, -1).astype(h.dtype))
        return lo.reshape((x.shape[0],) + mid + out_shape)


def _check_axes(node):
    if node.in_axes != tuple(range(len(node.in_axes))):
        raise ValueError("stacked adapters need the input axes first (the layers' kernel layout)")


class StackedLoRANode(_StackedBase):
    """``n`` LoRA/rsLoRA adapters: ``a (n, fan_in, r)``, ``b (n, r, fan_out)``, ``scale (n,)``."""

    base: Array
    a: Array
    b: Array
    scale: Array
    ids: Array | None = None

    trainable = ("a", "b")
    method = "StackedLoRA"
    field_axes = {"base": "base", "a": "replicated", "b": "replicated", "scale": "replicated",
                  "ids": "replicated"}

    def _coef(self, idx, valid):
        s = jnp.where(valid, jnp.take(self.scale, idx), 0.0)
        return jnp.broadcast_to(s[:, None], (idx.shape[0], self.rank))

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            adapter_ids=None, **_) -> Array:
        idx, valid, ids = self._ids(adapter_ids)
        y = op(x, self.base)
        xd = branch_dropout(x, dropout_key, self.config.dropout)
        lo = self._lowrank(xd, op, self.a, self.b, self._coef(idx, valid), ids, idx, valid)
        return _nan_invalid(y + lo.astype(y.dtype), ids, self.n)


class StackedDoRANode(StackedLoRANode):
    """``n`` DoRA adapters: LoRA's stacked factors plus magnitudes ``m (n, fan_out)``."""

    m: Array

    trainable = ("a", "b", "m")
    method = "StackedDoRA"
    field_axes = {**StackedLoRANode.field_axes, "m": "replicated"}

    def ratios(self) -> Array:
        """``m_g / ‖K0 + s_g a_g b_g‖`` per adapter and output column, without ``a·b``."""
        k0 = to_matrix(self.base, self.in_axes).astype(self.a.dtype)
        a, b, s = self.a, self.b, self.scale[:, None]
        sq = (jnp.sum(k0 * k0, axis=0)[None]
              + 2 * s * jnp.sum(jnp.einsum("io,nir->nor", k0, a) * jnp.swapaxes(b, 1, 2), -1)
              + s * s * jnp.sum(jnp.einsum("nir,nis,nso->nro", a, a, b) * b, axis=1))
        norm = jnp.sqrt(jnp.maximum(sq, 0.0) + NORM_EPS)  # finite on an all-zero column, as DoRA
        if self.config.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return self.m / norm

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            adapter_ids=None, **_) -> Array:
        idx, valid, ids = self._ids(adapter_ids)
        y = op(x, self.base)
        xd = branch_dropout(x, dropout_key, self.config.dropout)
        y = y + self._lowrank(xd, op, self.a, self.b, self._coef(idx, valid), ids, idx, valid).astype(y.dtype)
        ratio = jnp.where(valid[:, None], jnp.take(self.ratios(), idx, axis=0), 1.0)
        y = _per_example(ratio, y)
        return _nan_invalid(y, ids, self.n)


class StackedVeRANode(_StackedBase):
    """``n`` VeRA adapters over one frozen pair ``a (fan_in, r)``, ``b (r, fan_out)``."""

    base: Array
    a: Array
    b: Array
    lambda_d: Array
    lambda_b: Array
    ids: Array | None = None

    trainable = ("lambda_d", "lambda_b")
    method = "StackedVeRA"
    field_axes = {"base": "base", "a": "in_rank", "b": "rank_out", "lambda_d": "replicated",
                  "lambda_b": "replicated", "ids": "replicated"}

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            adapter_ids=None, **_) -> Array:
        idx, valid, ids = self._ids(adapter_ids)
        _rows(x, ids)
        y = op(x, self.base)
        r = self.a.shape[-1]
        h = op(x, self.a.reshape(self.in_shape + (r,)))
        lam_d = jnp.where(valid[:, None], jnp.take(self.lambda_d, idx, axis=0), 0.0)
        h = _per_example(lam_d, h)
        lo = jnp.tensordot(h, self.b.reshape((r,) + self.out_shape).astype(h.dtype), axes=1)
        lam_b = jnp.take(self.lambda_b, idx, axis=0)
        lo = _per_example(lam_b, lo)
        return _nan_invalid(y + lo.astype(y.dtype), ids, self.n)


def _nan_invalid(y, ids, n):
    """Examples whose id is outside ``[-1, n)`` (only detectable under ``jit``) become NaN."""
    bad = (ids < -1) | (ids >= n)
    t = y.shape[0] // ids.shape[0]
    return jnp.where(jnp.repeat(bad, t).reshape((-1,) + (1,) * (y.ndim - 1)), jnp.nan, y)


def check_ids(adapter_ids, n: int, path: str = "") -> None:
    """Eager range check of concrete ids (``-1 ≤ id < n``)."""
    if isinstance(adapter_ids, jax.core.Tracer):
        return
    ids = np.asarray(adapter_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"adapter_ids must be a 1-D int array, got {ids.dtype} {ids.shape}")
    bad = ids[(ids < -1) | (ids >= n)]
    if bad.size:
        raise ValueError(f"{path}: adapter_ids {sorted(set(bad.tolist()))[:5]} out of range "
                         f"[-1, {n}) for a stack of {n} adapters")


def bind_adapter_ids(nodes: dict, adapter_ids) -> set[str]:
    """Give every stacked node of ``{path: node}`` the batch's ids (in place); their paths.

    Concrete ids are range-checked here; ids without a stacked node are refused.
    """
    stacked = {p for p, x in nodes.items() if isinstance(x, _StackedBase)}
    if not stacked:
        if adapter_ids is not None:
            raise ValueError("adapter_ids given, but the params hold no stacked adapter "
                             "(build one with jlora.compose.stack)")
        return stacked
    for p in sorted(stacked):
        if adapter_ids is None:
            raise ValueError(f"{p}: a stacked node of {nodes[p].n} adapters needs adapter_ids: "
                             "jlora.linen.apply(model, variables, x, adapter_ids=ids)")
        check_ids(adapter_ids, nodes[p].n, p)
        nodes[p] = nodes[p].replace(ids=jnp.asarray(adapter_ids))
    return stacked


def _lora_parts(path, node):
    """``(a, b)`` of a LoRA node over its original weight (PiSSA/OLoRA: ``[a, a0]``, ``[b; −b0]``)."""
    if node.a0 is None:
        return node.a, node.b
    return (jnp.concatenate([node.a, node.a0], axis=1),
            jnp.concatenate([node.b, -node.b0], axis=0))


def stack_nodes(path: str, nodes, *, mode: str = "gather"):
    """Stack one layer's adapter nodes (same base, same method) into one stacked node."""
    kinds = {type(x) for x in nodes}
    if len(kinds) > 1:
        raise ValueError(f"{path}: cannot stack different methods {sorted(k.__name__ for k in kinds)}")
    first = nodes[0]
    _check_axes(first)
    n = len(nodes)
    if type(first) is VeRANode:
        for x in nodes[1:]:
            if x.a.shape != first.a.shape or not (np.array_equal(x.a, first.a)
                                                  and np.array_equal(x.b, first.b)):
                raise ValueError(f"{path}: VeRA adapters with different frozen pairs (seed or "
                                 "rank) cannot share one stacked pair")
        return StackedVeRANode(base=first.base, a=first.a, b=first.b,
                               lambda_d=jnp.stack([x.lambda_d for x in nodes]),
                               lambda_b=jnp.stack([x.lambda_b for x in nodes]),
                               config=Stacked(n=n, method="VeRA", mode=mode),
                               shape=first.shape, in_axes=first.in_axes)
    if type(first) not in (LoRANode, DoRANode):
        raise ValueError(f"{path}: stacking supports LoRA, rsLoRA, DoRA and VeRA adapters, "
                         f"got {first.method} (jlora.compose.cat([tree], [1.0]) turns a "
                         "low-rank adapter into a LoRA one)")
    is_dora = type(first) is DoRANode
    if is_dora and any(x.a0 is not None for x in nodes):
        raise ValueError(f"{path}: stacking PiSSA/OLoRA-initialised DoRA adapters is not supported")
    if len({x.config.dropout for x in nodes}) > 1 or (
            is_dora and len({x.config.detach_norm for x in nodes}) > 1):
        raise ValueError(f"{path}: stacked adapters must share dropout (and DoRA's detach_norm)")
    parts = [_lora_parts(path, x) for x in nodes]
    r = max(a.shape[1] for a, _ in parts)
    dt = jnp.result_type(*[a.dtype for a, _ in parts])
    a = jnp.stack([jnp.pad(a, ((0, 0), (0, r - a.shape[1]))).astype(dt) for a, _ in parts])
    b = jnp.stack([jnp.pad(b, ((0, r - b.shape[0]), (0, 0))).astype(dt) for _, b in parts])
    # PiSSA/OLoRA nodes hold a residual base; stacking measures all against the original
    base = original(first)
    cfg = Stacked(n=n, method=first.method, mode=mode, dropout=first.config.dropout,
                  detach_norm=getattr(first.config, "detach_norm", True))
    kw = dict(base=base, a=a, b=b, scale=jnp.asarray([x.scale for x in nodes], dt), config=cfg,
              shape=first.shape, in_axes=first.in_axes)
    if is_dora:
        return StackedDoRANode(m=jnp.stack([x.m for x in nodes]), **kw)
    return StackedLoRANode(**kw)


def original(node) -> Array:
    """The weight an adapter's delta is measured against (PiSSA/OLoRA: ``base + s·a0·b0``)."""
    if getattr(node, "a0", None) is None:
        return node.base
    k = (to_matrix(node.base, node.in_axes).astype(jnp.float32)
         + node.scale * (node.a0 @ node.b0).astype(jnp.float32))
    return from_matrix(k, node.shape, node.in_axes).astype(node.base.dtype)
