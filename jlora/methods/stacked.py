"""Stacked adapters: ``n`` adapters of one layer in one node, for mixed-adapter batches.

Example ``j`` of a batch runs with adapter ``g = ids[j]`` (``-1``: the base alone).
With the adapters' factors stacked along a leading axis and their ranks
zero-padded to the largest ``r`` (exact: the padded columns and rows add
``0·0``), in jlora's ``(fan_in, fan_out)`` view:

    LoRA / rsLoRA:  y_j = x_j·K0 + s_g·(x_j·a_g)·b_g,          a (n, fan_in, r), b (n, r, fan_out)
    DoRA:           y_j = (m_g / ‖K0 + s_g a_g b_g‖) ⊙ (x_j·K0 + s_g·(x_j·a_g)·b_g)
    VeRA:           y_j = x_j·K0 + ((x_j·a)·λ_d,g)·b ⊙ λ_b,g   (one shared frozen pair)

The example axis is the leading axis of every adapted layer's input, and
``ids`` holds one id per example: its length must equal that axis (a
``ValueError`` names both sizes otherwise). Where the fast path flattens the
example axis together with others into rows (``Dense``, registered layers,
``nnx.Linear``: ``(examples, seq, d)`` to ``(examples·seq, d)``), it passes the
unflattened example count as ``dot(..., examples=)``; each example's rows stay
contiguous.

Fields each source adapter keeps frozen stay frozen once stacked: the trainable
``a``/``b`` hold zeros for an adapter whose own factor is frozen (LoRA-FA's
``a``, MiCA's ``b``), and that factor sits in the frozen ``a_frozen``/``b_frozen``
(selected per adapter by the static ``config.frozen_a``/``frozen_b``, so no
gradient reaches the trainable slot); PiSSA/OLoRA's initial factors sit in the
frozen ``a0``/``b0`` (zero-padded to the largest such rank), contributing
``−s_g·(x_j·a0_g)·b0_g``. Shapes are static (no per-adapter
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

from jlora.methods._experts import is_stacked, stacked_product
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
    #: indices of the adapters whose ``a`` (``b``) their own method keeps frozen
    frozen_a: tuple[int, ...] = ()
    frozen_b: tuple[int, ...] = ()
    #: where the node sits in the params, for error messages (set by stacking, and
    #: again when ids are bound)
    path: str = ""


def rows_per_example(what: str, count: int | None, rows: int, examples: int | None,
                     fix: str) -> int:
    """Rows of a layer's input per example, ``rows // N``, for ``count`` per-example entries.

    ``N``, the number of examples, is ``examples`` when the layer has flattened
    the example axis together with others into its input's leading axis of
    ``rows`` rows (``jlora.linen``'s ``Dense``: ``(examples, seq, d)`` to
    ``(examples·seq, d)``), else ``rows`` itself. ``count`` must equal ``N``
    (``None``: the entries are not one vector, always refused) and ``rows`` be
    a multiple of it; otherwise a ``ValueError`` reads
    "``what`` for a batch of N examples (R rows reaching the layer, ...): ``fix``".
    """
    n_ex = rows if examples is None else examples
    if count != n_ex or rows % max(n_ex, 1):
        raise ValueError(f"{what} for a batch of {n_ex} examples ({rows} rows reaching the "
                         f"layer, the leading axis of its input): {fix}")
    return rows // max(n_ex, 1)


def _rows(x: Array, ids: Array, path: str = "", examples: int | None = None) -> int:
    """Rows of ``x`` per example: ``x.shape[0] // len(ids)`` (see :func:`rows_per_example`)."""
    if ids.ndim != 1:
        raise ValueError(f"{path}: adapter_ids must be a 1-D int array (one id per example), "
                         f"got shape {ids.shape}")
    return rows_per_example(
        f"{path}: {ids.shape[0]} adapter_ids", ids.shape[0], x.shape[0], examples,
        "pass one id per example (a model that folds its examples' tokens into that axis "
        "itself passes the ids repeated to match, e.g. jnp.repeat(ids, tokens))")


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
            raise ValueError(f"{self.config.path}: a stacked {self.config.method} node "
                             f"({self.n} adapters) needs adapter_ids: "
                             "jlora.linen.apply(model, variables, x, adapter_ids=ids)")
        ids = jnp.asarray(adapter_ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{self.config.path}: adapter_ids must be integers, got dtype "
                             f"{ids.dtype}")
        valid = (ids >= 0) & (ids < self.n)
        return jnp.where(valid, ids, 0), valid, ids

    def _lowrank(self, x, op, a, b, coef, ids, idx, valid, examples=None):
        """Low-rank term ``((x_j·a_g)·coef_g)·b_g`` per example; ``a`` (n, in, r), ``b`` (n, r, out)."""
        t = _rows(x, ids, self.config.path, examples)
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


def _check_axes(path, node):
    if node.in_axes != tuple(range(len(node.in_axes))):
        raise ValueError(f"{path}: stacked adapters need the input axes first (the layers' "
                         f"kernel layout), got in_axes {node.in_axes}")


class StackedLoRANode(_StackedBase):
    """``n`` LoRA/rsLoRA adapters: ``a (n, fan_in, r)``, ``b (n, r, fan_out)``, ``scale (n,)``.

    Adapter ``g``'s factors are ``a_frozen[g]`` for ``g`` in ``config.frozen_a``
    (else ``a[g]``), likewise ``b``; PiSSA/OLoRA adapters add the frozen
    ``−s_g·a0[g]·b0[g]``. Only ``a`` and ``b`` train, and ``a[g]`` (``b[g]``)
    gets no gradient for a frozen ``g``.
    """

    base: Array
    a: Array
    b: Array
    scale: Array
    ids: Array | None = None
    a_frozen: Array | None = None
    b_frozen: Array | None = None
    a0: Array | None = None
    b0: Array | None = None

    method = "StackedLoRA"
    field_axes = {"base": "base", "a": "replicated", "b": "replicated", "scale": "replicated",
                  "ids": "replicated", "a_frozen": "replicated", "b_frozen": "replicated",
                  "a0": "replicated", "b0": "replicated"}

    @property
    def trainable(self) -> tuple[str, ...]:
        cfg = self.config
        return tuple(f for f, frozen in (("a", cfg.frozen_a), ("b", cfg.frozen_b))
                     if len(frozen) < cfg.n)

    def _pick(self, train, frozen, which):
        """``frozen[g]`` for ``g`` in ``which``, else ``train[g]`` (no gradient to those slots)."""
        if not which:
            return train
        mask = np.isin(np.arange(self.n), which).reshape((-1,) + (1,) * (train.ndim - 1))
        return jnp.where(mask, frozen.astype(train.dtype), train)

    def factors(self) -> tuple[Array, Array, Array]:
        """``(a, b, sign)``: every adapter's full factors, ``a (n, in, R)``, ``b (n, R, out)``,
        with ``Σ_c sign_c·a[g, :, c]·b[g, c] = a_g·b_g − a0_g·b0_g`` (``sign (R,)``: ±1)."""
        a = self._pick(self.a, self.a_frozen, self.config.frozen_a)
        b = self._pick(self.b, self.b_frozen, self.config.frozen_b)
        sign = jnp.ones(a.shape[-1], a.dtype)
        if self.a0 is not None:
            a = jnp.concatenate([a, self.a0.astype(a.dtype)], axis=-1)
            b = jnp.concatenate([b, self.b0.astype(b.dtype)], axis=1)
            sign = jnp.concatenate([sign, -jnp.ones(self.a0.shape[-1], sign.dtype)])
        return a, b, sign

    def _coef(self, idx, valid, sign):
        s = jnp.where(valid, jnp.take(self.scale, idx), 0.0)
        return s[:, None] * sign[None, :].astype(s.dtype)

    def _base_plus_lowrank(self, x, op, dropout_key, adapter_ids, examples):
        """``(y, idx, valid, ids)``: ``x·K0 + s_g·drop(x)·a_g·b_g`` per example's adapter."""
        idx, valid, ids = self._ids(adapter_ids)
        y = op(x, self.base)
        xd = branch_dropout(x, dropout_key, self.config.dropout)
        a, b, sign = self.factors()
        lo = self._lowrank(xd, op, a, b, self._coef(idx, valid, sign), ids, idx, valid, examples)
        return y + lo.astype(y.dtype), idx, valid, ids

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            adapter_ids=None, examples: int | None = None, **_) -> Array:
        y, _, _, ids = self._base_plus_lowrank(x, op, dropout_key, adapter_ids, examples)
        return _nan_invalid(y, ids, self.n)


class StackedDoRANode(StackedLoRANode):
    """``n`` DoRA adapters: LoRA's stacked factors plus magnitudes ``m (n, fan_out)``."""

    m: Array

    method = "StackedDoRA"
    field_axes = {**StackedLoRANode.field_axes, "m": "replicated"}

    @property
    def trainable(self) -> tuple[str, ...]:
        return super().trainable + ("m",)

    def ratios(self) -> Array:
        """``m_g / ‖K0 + s_g a_g b_g‖`` per adapter and output column, without ``a·b``."""
        a, b, sign = self.factors()
        k0 = to_matrix(self.base, self.in_axes).astype(a.dtype)
        sa = a * (self.scale[:, None] * sign[None, :])[:, None, :]  # s_g·sign_c·a_g
        sq = (jnp.sum(k0 * k0, axis=0)[None]
              + 2 * jnp.sum(jnp.einsum("io,nir->nor", k0, sa) * jnp.swapaxes(b, 1, 2), -1)
              + jnp.sum(jnp.einsum("nir,nis,nso->nro", sa, sa, b) * b, axis=1))
        norm = jnp.sqrt(jnp.maximum(sq, 0.0) + NORM_EPS)  # finite on an all-zero column, as DoRA
        if self.config.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return self.m / norm

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            adapter_ids=None, examples: int | None = None, **_) -> Array:
        y, idx, valid, ids = self._base_plus_lowrank(x, op, dropout_key, adapter_ids, examples)
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
            adapter_ids=None, examples: int | None = None, **_) -> Array:
        idx, valid, ids = self._ids(adapter_ids)
        _rows(x, ids, self.config.path, examples)
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
        raise ValueError(f"{path}: adapter_ids must be a 1-D int array, got {ids.dtype} "
                         f"{ids.shape}")
    bad = ids[(ids < -1) | (ids >= n)]
    if bad.size:
        raise ValueError(f"{path}: adapter_ids {sorted(set(bad.tolist()))[:5]} out of range "
                         f"[-1, {n}) for a stack of {n} adapters")


def bind_adapter_ids(nodes: dict, adapter_ids) -> set[str]:
    """Give every stacked node of ``{path: node}`` the batch's ids (in place); their paths.

    Concrete ids are range-checked here; ids without a stacked node are refused.
    Each bound node records its path, which its errors name (e.g. when the ids'
    length differs from a layer's batch, checked where the layer runs).
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
        nodes[p] = nodes[p].replace(ids=jnp.asarray(adapter_ids),
                                    config=dataclasses.replace(nodes[p].config, path=p))
    return stacked


def _frozen_fields(node) -> tuple[bool, bool]:
    """Whether the adapter's own method keeps ``a`` / ``b`` frozen."""
    train = set(node.trainable)
    return "a" not in train, "b" not in train


def stack_nodes(path: str, nodes, *, mode: str = "gather"):
    """Stack one layer's adapter nodes (same base, same method) into one stacked node.

    What each adapter's method keeps frozen (LoRA-FA's ``a``, MiCA's ``b``,
    PiSSA/OLoRA's ``a0``, ``b0``) goes to the stacked node's frozen fields.
    """
    kinds = {type(x) for x in nodes}
    if len(kinds) > 1:
        raise ValueError(f"{path}: cannot stack different methods {sorted(k.__name__ for k in kinds)}")
    first = nodes[0]
    _check_axes(path, first)
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
                               config=Stacked(n=n, method="VeRA", mode=mode, path=path),
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
    frozen = [_frozen_fields(x) for x in nodes]
    frozen_a = tuple(i for i, (fa, _) in enumerate(frozen) if fa)
    frozen_b = tuple(i for i, (_, fb) in enumerate(frozen) if fb)
    r = max(x.a.shape[1] for x in nodes)
    r0 = max((x.a0.shape[1] for x in nodes if x.a0 is not None), default=0)
    dt = jnp.result_type(*[x.a.dtype for x in nodes])
    pad_a = lambda a, k: jnp.pad(a, ((0, 0), (0, k - a.shape[1]))).astype(dt)
    pad_b = lambda b, k: jnp.pad(b, ((0, k - b.shape[0]), (0, 0))).astype(dt)
    zero_a, zero_b = (jnp.zeros_like(pad_a(first.a, r)), jnp.zeros_like(pad_b(first.b, r)))
    # a frozen factor's trainable slot holds zeros: it receives no gradient (the
    # forward reads the frozen copy), so no optimizer (weight decay included) moves it
    a = jnp.stack([zero_a if fa else pad_a(x.a, r) for x, (fa, _) in zip(nodes, frozen)])
    b = jnp.stack([zero_b if fb else pad_b(x.b, r) for x, (_, fb) in zip(nodes, frozen)])
    kw = {}
    if frozen_a:
        kw["a_frozen"] = jnp.stack([pad_a(x.a, r) if fa else zero_a
                                    for x, (fa, _) in zip(nodes, frozen)])
    if frozen_b:
        kw["b_frozen"] = jnp.stack([pad_b(x.b, r) if fb else zero_b
                                    for x, (_, fb) in zip(nodes, frozen)])
    if r0:
        kw["a0"] = jnp.stack([jnp.zeros((x.a.shape[0], r0), dt) if x.a0 is None
                              else pad_a(x.a0, r0) for x in nodes])
        kw["b0"] = jnp.stack([jnp.zeros((r0, x.b.shape[1]), dt) if x.b0 is None
                              else pad_b(x.b0, r0) for x in nodes])
    # PiSSA/OLoRA nodes hold a residual base; stacking measures all against the original
    base = original(first)
    cfg = Stacked(n=n, method=first.method, mode=mode, dropout=first.config.dropout,
                  detach_norm=getattr(first.config, "detach_norm", True),
                  frozen_a=frozen_a, frozen_b=frozen_b, path=path)
    kw.update(base=base, a=a, b=b, scale=jnp.asarray([x.scale for x in nodes], dt), config=cfg,
              shape=first.shape, in_axes=first.in_axes)
    if is_dora:
        return StackedDoRANode(m=jnp.stack([x.m for x in nodes]), **kw)
    return StackedLoRANode(**kw)


def original(node) -> Array:
    """The weight an adapter's delta is measured against (PiSSA/OLoRA: ``base + s·a0·b0``)."""
    if getattr(node, "a0", None) is None:
        return node.base
    a0, b0 = node.a0.astype(jnp.float32), node.b0.astype(jnp.float32)
    if is_stacked(node):  # expert_axis: one (a0, b0) pair per slice
        k = node.base.astype(jnp.float32) + stacked_product(node, a0, b0, node.scale)
        return k.astype(node.base.dtype)
    k = to_matrix(node.base, node.in_axes).astype(jnp.float32) + node.scale * (a0 @ b0)
    return from_matrix(k, node.shape, node.in_axes).astype(node.base.dtype)
