"""Combining adapters: exact sums, SVD, TIES, DARE, LoraHub, task switching, stacking.

Every function takes adapted trees (``jlora.apply`` outputs) over **one shared
base** (checked leaf by leaf; an error names the path where bases or structures
differ) and real weights ``w_i`` (negative allowed: task negation). With
``ΔK_i`` adapter ``i``'s delta at a layer (its scale ``s_i`` included: LoRA's
``α/r``, rsLoRA's ``α/√r``, PiSSA's ``a·b − a0·b0``):

* :func:`cat` — ``a' = [w_1 s_1 a_1 | … | w_n s_n a_n]``, ``b' = [b_1; …; b_n]``:
  ``a'·b' = Σ w_i ΔK_i`` exactly, rank ``Σ r_i``, scale 1 (an ordinary LoRA node).
* :func:`linear` — the same exact sum in its cheapest exact form (``cat``'s,
  or fewer columns when the sum's numerical rank is lower). ``peft_compat=True``
  reproduces PEFT's factor-level ``linear`` instead, which is **inexact**:
  ``(Σ v_i a_i)(Σ u_i b_i)`` with ``v_i = sgn(w_i s_i)√|w_i s_i|``,
  ``u_i = √|w_i s_i|`` carries the cross terms ``i ≠ j``.
* :func:`svd` — the best rank-``rank`` approximation (Eckart–Young) of
  ``Σ w_i ΔK_i`` without the dense matrix: QR of the stacked factors, SVD of the
  small core; all singular values go into ``b``, scale 1.
* :func:`ties` (Yadav et al. 2023, §3: trim, elect sign, disjoint mean),
  :func:`dare_linear`, :func:`dare_ties` (Yu et al. 2024, §3: keep each entry with
  probability ``density``, rescale by ``1/density``) and :func:`magnitude_prune`
  act element-wise on the dense float32 ``ΔK_i`` of each layer, exactly as
  PEFT's ``merge_utils`` helpers do per tensor (PEFT applies them to the ``A``
  and ``B`` factors separately, which is not the same thing).
  ``rank=None`` returns merged plain weights; an int returns an adapter at that rank.
* :func:`lorahub` (Huang et al. 2024, §3) — factor-level composition
  ``(Σ w_i a_i)(Σ w_i b_i)`` with ``w`` found by a gradient-free search.
* :func:`switch` — move a served, merged model from one adapter to another.
* :func:`pad`, :func:`stack` — zero-pad ranks; hold ``n`` adapters in one tree
  for mixed-adapter batches (``jlora.linen.apply(..., adapter_ids=ids)``).

DoRA and GLoRA deltas are not low-rank: the dense methods take them, ``svd``
factorizes their dense sum, ``cat``/``linear``/``lorahub`` refuse them.
Stacked (``expert_axis``) adapters are taken by :func:`lorahub`, :func:`switch`
and the element-wise merges with ``rank=None``; the other functions refuse them.
Adapters must be whole nodes, not the halves of ``jlora.split``.

Example::

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"w": {"kernel": jnp.ones((6, 5))}}
    >>> def adapter(seed, rank):
    ...     t = jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=rank, alpha=4)}),
    ...                     key=jax.random.key(seed))
    ...     n = t["w"]["kernel"]
    ...     return {"w": {"kernel": n.replace(b=jax.random.normal(jax.random.key(9), n.b.shape))}}
    >>> x, y = adapter(0, 2), adapter(1, 3)
    >>> both = jlora.compose.cat([x, y], [1.0, -0.5])
    >>> both["w"]["kernel"].rank, both["w"]["kernel"].scale
    (5, 1.0)
    >>> d = lambda t: t["w"]["kernel"].delta()
    >>> bool(jnp.allclose(d(both), d(x) - 0.5 * d(y), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora._validate import choice, function, positive_int, prng_key, real
from jlora.core import merge, path_key, unmerge
from jlora.methods.adalora import AdaLoRANode
from jlora.methods.base import lowrank_svd, to_matrix
from jlora.methods.dora import DoRANode
from jlora.methods.full import FullNode
from jlora.methods.lora import LoRA, LoRANode
from jlora.methods.stacked import original, stack_nodes
from jlora.methods.vera import VeRANode
from jlora.tree import PyTree, is_node, leaves_with_paths, map_with_paths

F32 = jnp.float32


# ------------------------------------------------------------------ checks


def _weights(fn: str, adapters, weights) -> jax.Array:
    """The weights as float32 ``(n,)``; concrete ones (numpy or jax) must be finite reals."""
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"jlora.compose.{fn}: adapters must be a non-empty list of adapted trees")
    if isinstance(weights, jax.Array):
        w = weights
        if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
            raise ValueError(f"jlora.compose.{fn}: weights must be real numbers, got dtype "
                             f"{w.dtype}")
    else:
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"jlora.compose.{fn}: weights must be real numbers, one per "
                             f"adapter, got {weights!r}") from None
    if w.shape != (len(adapters),):
        raise ValueError(f"jlora.compose.{fn}: weights must hold one number per adapter "
                         f"({len(adapters)}), got shape {w.shape}")
    # traced weights (inside jit) cannot be inspected; every concrete array is
    if _concrete(w) and not np.isfinite(np.asarray(w, np.float64)).all():
        raise ValueError(f"jlora.compose.{fn}: weights must be finite, got {np.asarray(w)!r}")
    return jnp.asarray(w, F32)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


#: PiSSA/OLoRA rebuild their original weight as ``residual + s·a0·b0``, rounded to
#: the base dtype: it matches the other adapters' base within a few of its ulps
_ROUNDING_EPS = 8


def _same(path: str, what: str, x, y, loose: bool) -> None:
    """``x`` equals ``y`` (``loose``: within ``8·eps·max|x|`` of the coarser dtype)."""
    if jnp.shape(x) != jnp.shape(y):
        raise ValueError(f"{path}: adapters do not share one base: {what} shapes "
                         f"{jnp.shape(x)} vs {jnp.shape(y)}")
    if not (_concrete(x) and _concrete(y)):
        return
    dts = [jnp.asarray(v).dtype for v in (x, y)]
    loose = loose and all(jnp.issubdtype(d, jnp.floating) for d in dts)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if loose:
        eps = max(float(jnp.finfo(d).eps) for d in dts)
        scale = max(np.abs(x).max(initial=0), np.abs(y).max(initial=0))
        ok = bool(np.all(np.abs(x - y) <= _ROUNDING_EPS * eps * scale))
    else:
        ok = np.array_equal(x, y)
    if not ok:
        raise ValueError(f"{path}: adapters do not share one base ({what} values differ)")


def _whole(fn: str, path: str, node) -> None:
    if node.half() is not None:
        raise ValueError(f"{path}: jlora.compose.{fn} needs whole adapter nodes, got the "
                         f"{node.half()} half of jlora.split; rebuild them with "
                         "jlora.combine(trainable, frozen) first")


def _no_experts(fn: str, path: str, node) -> None:
    if getattr(node.config, "expert_axis", None) is not None:
        raise ValueError(f"{path}: jlora.compose.{fn} does not combine stacked (expert_axis) "
                         "adapters; their factors hold one adapter slice per expert")


def zip_adapters(fn: str, adapters: Sequence[PyTree], *,
                 experts: bool = False) -> list[tuple[str, list]]:
    """``[(path, [leaf of each adapter])]``; raises naming the path where they disagree.

    Every node must be whole (not a half of ``jlora.split``); ``experts=False``
    refuses stacked (``expert_axis``) nodes.
    """
    flat = [leaves_with_paths(t) for t in adapters]
    paths = [p for p, _ in flat[0]]
    for i, f in enumerate(flat[1:], 1):
        other = [p for p, _ in f]
        if other != paths:
            diff = sorted(set(paths) ^ set(other)) or [p for p, q in zip(paths, other) if p != q]
            raise ValueError(f"jlora.compose.{fn}: adapter {i} has a different tree structure "
                             f"from adapter 0, first at path {diff[0]!r}")
    out = []
    for j, path in enumerate(paths):
        leaves = [f[j][1] for f in flat]
        kinds = {is_node(x) for x in leaves}
        if len(kinds) > 1:
            raise ValueError(f"{path}: adapted in some adapters and plain in others")
        first = leaves[0]
        if is_node(first):
            for x in leaves:
                _whole(fn, path, x)
                if not experts:
                    _no_experts(fn, path, x)
        for x in leaves[1:]:
            if is_node(first):
                if x.shape != first.shape or x.in_axes != first.in_axes:
                    raise ValueError(f"{path}: adapters disagree on the leaf shape or in_axes "
                                     f"({first.shape} {first.in_axes} vs {x.shape} {x.in_axes})")
                if hasattr(first, "base") and hasattr(x, "base"):
                    loose = getattr(x, "a0", None) is not None or getattr(first, "a0", None) is not None
                    _same(path, "base", original(first), original(x), loose)
            elif hasattr(first, "shape"):
                _same(path, "leaf", first, x, False)
        out.append((path, leaves))
    return out


def _group(adapters) -> list[tuple[str, list]]:
    """``zip_adapters`` without checks, adapted paths only (inside ``jit``)."""
    flat = [leaves_with_paths(t) for t in adapters]
    return [(p, [f[j][1] for f in flat]) for j, (p, x) in enumerate(flat[0]) if is_node(x)]


def _rebuild(adapters, combined: dict[str, Any]) -> PyTree:
    return map_with_paths(lambda p, x: combined.get(p, x), adapters[0])


# ------------------------------------------------------------------ factor forms


def factors(path: str, node, fn: str) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` in float32 with ``a·b = ΔK`` (matrix view); raises for non-low-rank deltas."""
    if type(node) is LoRANode:
        a, b = node.scale * node.a.astype(F32), node.b.astype(F32)
        if node.a0 is not None:  # PiSSA / OLoRA: ΔK = s·(a·b − a0·b0)
            a = jnp.concatenate([a, -node.scale * node.a0.astype(F32)], axis=1)
            b = jnp.concatenate([b, node.b0.astype(F32)], axis=0)
        return a, b
    if isinstance(node, AdaLoRANode):
        return node.scale * node.p.astype(F32) * node.lam.astype(F32), node.q.astype(F32)
    if isinstance(node, VeRANode):
        return node.a.astype(F32) * node.lambda_d, node.b.astype(F32) * node.lambda_b
    raise ValueError(
        f"{path}: jlora.compose.{fn} needs a low-rank delta (LoRA, rsLoRA, PiSSA, AdaLoRA, "
        f"VeRA); a {node.method} delta is not one. Use svd (dense fallback), ties, dare_linear, "
        f"dare_ties or magnitude_prune, which work on the dense delta")


def lora_node(like, base, a, b) -> LoRANode:
    """An ordinary LoRA node of scale 1 holding ``ΔK = a·b`` over ``base``."""
    cfg = LoRA(rank=int(a.shape[1]), in_axes=tuple(like.in_axes))
    return LoRANode(base=base, a=a, b=b, config=cfg, shape=tuple(like.shape),
                    in_axes=tuple(like.in_axes))


def _truncate(u, s, vt, rank: int):
    """Rank-``rank`` factors ``(u·, diag(s)·vt)``, zero-padded when fewer values exist."""
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    pad = rank - s.shape[0]
    return (jnp.pad(u, ((0, 0), (0, pad))), jnp.pad(s[:, None] * vt, ((0, pad), (0, 0))))


def _check_rank(path, node, rank):
    fan_in = int(np.prod([node.shape[i] for i in node.in_axes]))
    fan = (fan_in, int(np.prod(node.shape)) // max(fan_in, 1))
    if rank > min(fan):
        raise ValueError(f"{path}: rank {rank} exceeds min(fan_in, fan_out) = {min(fan)}")


# ------------------------------------------------------------------ exact sums, SVD


def cat(adapters: Sequence[PyTree], weights) -> PyTree:
    """``Σ w_i ΔK_i`` exactly, as one LoRA adapter of rank ``Σ r_i`` and scale 1.

    ``a' = [w_1 s_1 a_1 | … | w_n s_n a_n]``, ``b' = [b_1; …; b_n]`` per layer
    (PiSSA/OLoRA adapters contribute ``[s a, −s a0]``, ``[b; b0]``; AdaLoRA
    ``s·p·diag(λ)``, ``q``; VeRA ``a·diag(λ_d)``, ``b·diag(λ_b)``). The result
    merges, saves (``jlora.peft``), shards and runs on the fast path like any
    LoRA adapter; its base is the shared original weight.
    """
    w = _weights("cat", adapters, weights)
    zip_adapters("cat", adapters)
    return _cat(adapters, w)


def _stack(fs, w):
    """``a = [w_i·a_i]`` side by side, ``b = [b_i]`` stacked: ``a·b = Σ w_i a_i b_i``."""
    return (jnp.concatenate([w[i] * f[0] for i, f in enumerate(fs)], axis=1),
            jnp.concatenate([f[1] for f in fs], axis=0))


@jax.jit
def _cat(adapters, w):
    out = {}
    for path, nodes in _group(adapters):
        a, b = _stack([factors(path, n, "cat") for n in nodes], w)
        out[path] = lora_node(nodes[0], original(nodes[0]), a, b)
    return _rebuild(adapters, out)


def linear(adapters: Sequence[PyTree], weights, *, peft_compat: bool = False) -> PyTree:
    """``Σ w_i ΔK_i`` exactly, in its cheapest exact factored form.

    This is :func:`cat`'s adapter, except where the sum's numerical rank ``k`` is
    below ``Σ r_i`` (adapters sharing ``a`` as LoRA-FA's do, repeated adapters,
    ``Σ r_i > min(fan_in, fan_out)``): there it is the rank-``k`` SVD form of
    :func:`svd`, dropping only singular values below float32 resolution
    (``σ ≤ σ_max · max(fan_in, fan_out) · ε``, numpy's ``matrix_rank`` rule).

    ``peft_compat=True`` reproduces PEFT's ``add_weighted_adapter(...,
    combination_type="linear")`` for equal-rank LoRA adapters:
    ``a' = Σ sgn(w_i s_i)√|w_i s_i| a_i``, ``b' = Σ √|w_i s_i| b_i``. That is
    **inexact** (``a'·b'`` has the cross terms ``i ≠ j``); use it only to match PEFT.
    rsLoRA sources enter through their ``s_i`` and the result has scale 1, as
    PEFT intends; PEFT 0.21.2 gives its result rsLoRA's scale ``√r`` instead
    (PEFT #3449), so there the two differ by that factor.
    """
    w = _weights("linear", adapters, weights)
    zip_adapters("linear", adapters)
    if peft_compat:
        return _peft_linear(adapters, w)
    summed = _cat(adapters, w)
    svds = _svds(summed)
    out = {}
    for path, node in leaves_with_paths(summed):
        if path not in svds:
            continue
        u, s, vt = svds[path]
        fan = max(to_matrix(node.base, node.in_axes).shape)
        k = max(int(jnp.sum(s > s[0] * fan * jnp.finfo(F32).eps)), 1)
        if k < node.rank:
            out[path] = lora_node(node, node.base, *_truncate(u, s, vt, k))
    return _rebuild([summed], out)


@jax.jit
def _svds(tree):
    return {p: lowrank_svd(n.a, n.b) for p, n in leaves_with_paths(tree) if is_node(n)}


@jax.jit
def _peft_linear(adapters, w):
    out = {}
    for path, nodes in _group(adapters):
        if any(type(n) is not LoRANode or n.a0 is not None for n in nodes):
            raise ValueError(f"{path}: peft_compat combines plain LoRA/rsLoRA adapters only")
        if len({n.rank for n in nodes}) > 1:
            raise ValueError(f"{path}: peft_compat needs equal ranks, got {[n.rank for n in nodes]}")
        ws = jnp.stack([w[i] * n.scale for i, n in enumerate(nodes)])
        root = jnp.sqrt(jnp.abs(ws))
        a = sum(jnp.sign(ws[i]) * root[i] * n.a.astype(F32) for i, n in enumerate(nodes))
        b = sum(root[i] * n.b.astype(F32) for i, n in enumerate(nodes))
        out[path] = lora_node(nodes[0], nodes[0].base, a, b)
    return _rebuild(adapters, out)


def svd(adapters: Sequence[PyTree], weights, rank: int) -> PyTree:
    """Best rank-``rank`` approximation of ``Σ w_i ΔK_i``, as a LoRA adapter of scale 1.

    With ``A = [w_i s_i a_i]`` and ``B = [b_i]`` stacked along rank (as in
    :func:`cat`): ``A = Q_a R_a``, ``Bᵀ = Q_b R_b``, ``R_a R_bᵀ = U S Vᵀ``; then
    ``a' = Q_a U_{:k}``, ``b' = S_{:k} (Q_b V_{:k})ᵀ``: the truncated SVD of the
    sum, at ``O((fan_in + fan_out)·(Σ r_i)²)`` instead of a dense SVD. When the sum
    has fewer than ``rank`` singular values, the factors are zero-padded (exact).
    Adapters with no low-rank form (DoRA, GLoRA kernels) fall back to the SVD of
    the dense float32 sum.
    """
    w = _weights("svd", adapters, weights)
    rank = positive_int("jlora.compose.svd", "rank", rank)
    for path, nodes in zip_adapters("svd", adapters):
        if is_node(nodes[0]):
            _dense_rank_check(path, nodes[0], rank)
    return _svd(adapters, w, rank)


@functools.partial(jax.jit, static_argnums=2)
def _svd(adapters, w, rank):
    out = {}
    for path, nodes in _group(adapters):
        try:
            fs = [factors(path, n, "svd") for n in nodes]
        except ValueError:
            out[path] = _dense_adapter(path, nodes[0], sum(
                w[i] * _delta(path, n) for i, n in enumerate(nodes)), rank)
            continue
        u, s, vt = lowrank_svd(*_stack(fs, w))
        out[path] = lora_node(nodes[0], original(nodes[0]), *_truncate(u, s, vt, rank))
    return _rebuild(adapters, out)


# ------------------------------------------------------------------ dense merges


def _delta_check(path, node, what: str = "combining") -> None:
    if not hasattr(node, "base"):
        raise ValueError(f"{path}: a {node.method} leaf has no delta against an original weight; "
                         f"drop it from the adapters before {what}")


def _delta(path, node) -> jax.Array:
    _delta_check(path, node)
    return node.delta().astype(F32)


def _dense_rank_check(path, node, rank):
    if len(node.shape) < 2:
        raise ValueError(f"{path}: rank={rank} needs a kernel; this {node.method} leaf has "
                         f"shape {node.shape} (use rank=None for merged weights)")
    _check_rank(path, node, rank)


def _dense_adapter(path, node, merged, rank):
    u, s, vt = jnp.linalg.svd(to_matrix(merged, node.in_axes), full_matrices=False)
    return lora_node(node, original(node), *_truncate(u, s, vt, rank))


def _density(fn, density, *, positive=False):
    kw = {"gt": 0.0} if positive else {"ge": 0.0}
    return float(real(f"jlora.compose.{fn}", "density", density, le=1.0, **kw))


def _topk_mask(t: jax.Array, density: float) -> jax.Array:
    """PEFT ``magnitude_based_pruning``: keep the ``int(density·numel)`` largest |t|."""
    k = int(density * t.size)
    if density >= 1:
        return jnp.ones_like(t, bool)
    if k == 0:
        return jnp.zeros_like(t, bool)
    _, idx = jax.lax.top_k(jnp.abs(t).ravel(), k)
    return jnp.zeros(t.size, bool).at[idx].set(True).reshape(t.shape)


def _elect_merge(t: jax.Array, w: jax.Array, method: str) -> jax.Array:
    """PEFT ``calculate_majority_sign_mask`` + ``disjoint_merge`` over the stacked ``t``."""
    total = t.sum(0) if method == "total" else jnp.sign(t).sum(0)
    keep = jnp.sign(t) == jnp.where(total >= 0, 1.0, -1.0)
    wt = t * w.reshape((-1,) + (1,) * (t.ndim - 1))
    return (wt * keep).sum(0) / jnp.maximum(keep.sum(0), 1)


def _dense_merge(fn, adapters, weights, density, *, rank, prune, elect, key=None,
                 scope="layer"):
    w = _weights(fn, adapters, weights)
    if rank is not None:
        rank = positive_int(f"jlora.compose.{fn}", "rank", rank)
    # the element-wise merges act on each layer's dense delta, a stacked (expert_axis)
    # one included; a rank-`rank` factorization of it would need one per expert
    for path, nodes in zip_adapters(fn, adapters, experts=rank is None):
        if is_node(nodes[0]):
            _delta_check(path, nodes[0])
            if rank is not None:
                _dense_rank_check(path, nodes[0], rank)
    return _dense(adapters, w, key, density=density, rank=rank, prune=prune, elect=elect,
                  scope=scope)


@functools.partial(jax.jit, static_argnames=("density", "rank", "prune", "elect", "scope"))
def _dense(adapters, w, key, *, density, rank, prune, elect, scope):
    zipped = _group(adapters)
    deltas = {p: jnp.stack([_delta(p, n) for n in ns]) for p, ns in zipped}
    if prune == "random":
        deltas = {p: jnp.stack([
            jnp.where(jax.random.bernoulli(jax.random.fold_in(path_key(key, p), i), density,
                                           t[i].shape), t[i] / density, 0.0)
            for i in range(t.shape[0])]) for p, t in deltas.items()}
    elif scope == "model" and density < 1:  # one threshold per adapter over all its layers
        flat = jnp.concatenate([jnp.abs(t).reshape(t.shape[0], -1) for t in deltas.values()], 1)
        k = int(density * flat.shape[1])
        thr = (jax.lax.top_k(flat, k)[0][:, -1] if k else jnp.full(flat.shape[0], jnp.inf))
        deltas = {p: jnp.where(jnp.abs(t) >= thr.reshape((-1,) + (1,) * (t.ndim - 1)), t, 0.0)
                  for p, t in deltas.items()}
    else:
        deltas = {p: jnp.stack([jnp.where(_topk_mask(x, density), x, 0.0) for x in t])
                  for p, t in deltas.items()}
    out = {}
    for path, nodes in zipped:
        t = deltas[path]
        merged = (_elect_merge(t, w, elect) if elect else
                  jnp.tensordot(w, t, axes=1))
        if rank is None:
            base = original(nodes[0])
            out[path] = (base.astype(F32) + merged).astype(base.dtype)
        else:
            out[path] = _dense_adapter(path, nodes[0], merged, rank)
    return _rebuild(adapters, out)


_SIGN = ("total", "frequency")
_DOC_RANK = """rank=None returns merged plain weights ``W0 + merged`` at the adapted
    leaves (full rank); an int returns a LoRA adapter (scale 1) holding the
    best rank-``rank`` approximation of the merged delta."""


def ties(adapters: Sequence[PyTree], weights, density: float, *, majority_sign: str = "total",
         rank: int | None = None, scope: str = "layer") -> PyTree:
    """TIES-merging of the dense deltas ``ΔK_i`` (Yadav et al. 2023, §3).

    Per layer: trim each ``ΔK_i`` to its top ``int(density·numel)`` entries by
    magnitude; elect ``γ = sgn(Σ_i ΔK̂_i)`` (``"total"``) or ``sgn(Σ_i sgn ΔK̂_i)``
    (``"frequency"``), ``+1`` on ties; merge ``Σ_i w_i ΔK̂_i [sgn ΔK̂_i = γ] /
    max(1, Σ_i [sgn ΔK̂_i = γ])`` — PEFT's ``merge_utils.ties`` on each tensor.
    ``scope="model"`` trims as the paper does instead: one threshold per adapter
    over all its adapted layers (entries equal to the threshold are kept).
    """ + _DOC_RANK
    choice("jlora.compose.ties", "majority_sign", majority_sign, _SIGN)
    choice("jlora.compose.ties", "scope", scope, ("layer", "model"))
    return _dense_merge("ties", adapters, weights, _density("ties", density), rank=rank,
                        prune="magnitude", elect=majority_sign, scope=scope)


def magnitude_prune(adapters: Sequence[PyTree], weights, density: float, *,
                    rank: int | None = None, scope: str = "layer") -> PyTree:
    """Trim each ``ΔK_i`` to its top ``density`` by magnitude, then ``Σ w_i ΔK̂_i``.

    PEFT's ``merge_utils.magnitude_prune`` per tensor (``scope="model"``: one
    threshold per adapter over all its layers).
    """ + _DOC_RANK
    choice("jlora.compose.magnitude_prune", "scope", scope, ("layer", "model"))
    return _dense_merge("magnitude_prune", adapters, weights,
                        _density("magnitude_prune", density), rank=rank, prune="magnitude",
                        elect=None, scope=scope)


def _key(fn, key):
    if key is None:
        raise ValueError(f"jlora.compose.{fn}: key (a jax.random key) is required")
    return prng_key(f"jlora.compose.{fn}", "key", key)


def dare_linear(adapters: Sequence[PyTree], weights, density: float, key: jax.Array = None, *,
                rank: int | None = None) -> PyTree:
    """DARE (Yu et al. 2024, §3) then task arithmetic: ``Σ w_i (m_i ⊙ ΔK_i) / density``.

    ``m_i ~ Bernoulli(density)`` element-wise, drawn from ``key`` folded with the
    layer's path and the adapter's index (the same key gives the same masks in
    :func:`dare_ties`). PEFT's ``merge_utils.dare_linear`` per tensor.
    """ + _DOC_RANK
    return _dense_merge("dare_linear", adapters, weights,
                        _density("dare_linear", density, positive=True), rank=rank,
                        prune="random", elect=None, key=_key("dare_linear", key))


def dare_ties(adapters: Sequence[PyTree], weights, density: float, key: jax.Array = None, *,
              majority_sign: str = "total", rank: int | None = None) -> PyTree:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean.

    PEFT's ``merge_utils.dare_ties`` per tensor; masks as in :func:`dare_linear`.
    """ + _DOC_RANK
    choice("jlora.compose.dare_ties", "majority_sign", majority_sign, _SIGN)
    return _dense_merge("dare_ties", adapters, weights,
                        _density("dare_ties", density, positive=True), rank=rank,
                        prune="random", elect=majority_sign, key=_key("dare_ties", key))


# ------------------------------------------------------------------ switch, pad, stack


def switch(served: PyTree, old: PyTree, new: PyTree) -> PyTree:
    """Move merged weights from adapter ``old`` to ``new``: ``merge(new, onto=unmerge(served, old))``.

    No copy of the base is kept; the result equals ``merge(new)`` to float32 rounding.
    ``old`` and ``new`` must share one base and tree structure (checked as the
    other functions check adapters 0 and 1), and ``served`` must have ``old``'s
    structure, with its adapted leaves' shapes.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
        >>> def task(seed):
        ...     t = jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}),
        ...                     key=jax.random.key(seed))
        ...     return jax.tree.map(lambda x: x + 0.1, t)  # "trained" factors
        >>> old, new = task(1), task(2)
        >>> served = jlora.merge(old)
        >>> moved = jlora.compose.switch(served, old, new)
        >>> bool(jnp.allclose(moved["w"]["kernel"], jlora.merge(new)["w"]["kernel"], atol=1e-5))
        True
    """
    zip_adapters("switch", [old, new], experts=True)
    paths = [p for p, _ in leaves_with_paths(old)]
    served_paths = [p for p, _ in leaves_with_paths(served)]
    if served_paths != paths:
        diff = (sorted(set(paths) ^ set(served_paths))
                or [p for p, q in zip(paths, served_paths) if p != q])
        raise ValueError(f"jlora.compose.switch: served does not have old's tree structure "
                         f"(is it merge(old)?), first at path {diff[0]!r}")
    for (path, node), (_, leaf) in zip(leaves_with_paths(old), leaves_with_paths(served)):
        if is_node(node) and tuple(jnp.shape(leaf)) != tuple(node.shape):
            raise ValueError(f"{path}: served holds shape {tuple(jnp.shape(leaf))}, old's "
                             f"adapter {tuple(node.shape)}")
    return merge(new, onto=unmerge(served, old))


def pad(tree: PyTree, rank: int) -> PyTree:
    """Zero-pad every LoRA/DoRA adapter of ``tree`` to ``rank`` (exact: ``ΔK`` is unchanged).

    The scale is folded into ``a`` and the config becomes ``rank=rank``, scale 1,
    so adapters padded to one rank have identical static structure: a jitted
    function serving one takes any other without retracing.
    """
    rank = positive_int("jlora.compose.pad", "rank", rank)

    def one(path, node):
        if not is_node(node):
            return node
        _whole("pad", path, node)
        _no_experts("pad", path, node)
        if isinstance(node, DoRANode):
            if rank < node.rank:
                raise ValueError(f"{path}: cannot pad rank {node.rank} down to {rank}")
            z = rank - node.rank
            pa = lambda a: None if a is None else jnp.pad(node.scale * a, ((0, 0), (0, z)))
            pb = lambda b: None if b is None else jnp.pad(b, ((0, z), (0, 0)))
            cfg = dataclasses.replace(node.config, rank=rank, alpha=None, rslora=False)
            return node.replace(a=pa(node.a), b=pb(node.b), a0=pa(node.a0), b0=pb(node.b0),
                                config=cfg)
        a, b = factors(path, node, "pad")
        if a.shape[1] > rank:
            raise ValueError(f"{path}: cannot pad rank {a.shape[1]} down to {rank}")
        _check_rank(path, node, rank)
        z = rank - a.shape[1]
        dt = node.a.dtype if hasattr(node, "a") else F32
        return lora_node(node, original(node), jnp.pad(a, ((0, 0), (0, z))).astype(dt),
                         jnp.pad(b, ((0, z), (0, 0))).astype(dt))

    return map_with_paths(one, tree)


def stack(adapters: Sequence[PyTree], *, mode: str = "gather") -> PyTree:
    """One tree whose adapted leaves hold all ``n`` adapters, for mixed-adapter batches.

    Run it with ``jlora.linen.apply(model, {"params": stacked}, x, adapter_ids=ids)``:
    example ``j`` uses adapter ``ids[j]`` (``-1``: the base alone). LoRA/rsLoRA
    (ranks zero-padded to the largest: exact), DoRA and VeRA adapters are
    supported. ``mode``: ``"gather"`` (default: gather each example's factors,
    batched contraction), ``"onehot"`` (one down-projection through all
    adapters, masked: cheapest for a few adapters) or ``"ragged"``
    (``jax.lax.ragged_dot`` over examples sorted by adapter, on 2-D Dense
    inputs). The stacked tree is differentiable: each adapter's factors get
    the sum of their examples' gradients, so ``n`` adapters train in one batch;
    what an adapter's own method keeps frozen (LoRA-FA's ``a``, MiCA's ``b``,
    PiSSA/OLoRA's ``a0``, ``b0``) sits in the stacked node's frozen fields and
    gets no gradient. ``ids`` holds one id per example (its length is checked
    against each stacked layer's batch). See ``jlora.methods.stacked``.
    """
    choice("jlora.compose.stack", "mode", mode, ("gather", "onehot", "ragged"))
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError("jlora.compose.stack: adapters must be a non-empty list of adapted trees")
    out = {path: stack_nodes(path, nodes, mode=mode)
           for path, nodes in zip_adapters("stack", adapters) if is_node(nodes[0])}
    return _rebuild(adapters, out)


# ------------------------------------------------------------------ LoraHub


class LoraHubResult(NamedTuple):
    weights: np.ndarray  # (n,) the best weights found
    composed: PyTree  # the adapters composed with them
    history: list  # one dict per evaluation: step, weights, loss, objective


def lorahub(adapters: Sequence[PyTree], loss_fn: Callable[[PyTree], float], *, budget: int = 40,
            key: jax.Array, bounds: tuple[float, float] = (-1.5, 1.5), l1: float = 0.05,
            callback: Callable[[int, np.ndarray, float], None] | None = None) -> LoraHubResult:
    """LoraHub (Huang et al. 2024, §3): compose same-rank LoRA adapters by a gradient-free search.

    Each layer of the composed adapter is ``a = Σ w_i a_i``, ``b = Σ w_i b_i``
    (the factors are weighted, so ``ΔK = s·(Σ w_i a_i)(Σ w_i b_i)``, not
    ``Σ w_i ΔK_i``), with the adapters' common rank and scale. ``w ∈ [lo, hi]^n``
    is searched from ``w = 0`` by nevergrad's ``NGOpt`` (as the authors do; install
    the ``lorahub`` extra) to minimise ``loss_fn(composed) + l1·mean|w|`` in
    ``budget`` evaluations, seeded from ``key``. ``callback(step, w, loss)`` is
    called after each evaluation. Returns ``(weights, composed, history)``.
    """
    n = len(adapters) if isinstance(adapters, (list, tuple)) else 0
    _weights("lorahub", adapters, np.zeros(n))
    budget = positive_int("jlora.compose.lorahub", "budget", budget)
    real("jlora.compose.lorahub", "l1", l1, ge=0.0)
    key = _key("lorahub", key)
    function("jlora.compose.lorahub", "loss_fn", loss_fn)
    if callback is not None:
        function("jlora.compose.lorahub", "callback", callback)
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) != 2:
        raise ValueError(f"jlora.compose.lorahub: bounds must be a pair (lo, hi) of finite "
                         f"numbers, got {bounds!r}")
    lo, hi = (real("jlora.compose.lorahub", "bounds", b) for b in tuple(bounds))
    if not lo <= 0.0 <= hi or lo == hi:
        raise ValueError(f"jlora.compose.lorahub: bounds must satisfy lo <= 0 <= hi, lo < hi, "
                         f"got {bounds!r}")
    stacks = {}
    # factor-level sums keep each node's layout, so stacked (expert_axis) ones compose too
    for path, nodes in zip_adapters("lorahub", adapters, experts=True):
        if not is_node(nodes[0]):
            continue
        if any(type(x) is not LoRANode or x.a0 is not None for x in nodes):
            raise ValueError(f"{path}: lorahub composes plain LoRA/rsLoRA adapters only")
        if len({(x.rank, x.scale) for x in nodes}) > 1:
            raise ValueError(f"{path}: lorahub needs one rank and scale for all adapters, got "
                             f"{[(x.rank, x.scale) for x in nodes]}")
        stacks[path] = (nodes[0], jnp.stack([x.a for x in nodes]), jnp.stack([x.b for x in nodes]))
    import nevergrad as ng  # the optional `lorahub` extra: only once the inputs are valid

    @jax.jit
    def compose(w):
        return _rebuild(adapters, {p: node.replace(a=jnp.tensordot(w, a, 1).astype(node.a.dtype),
                                                   b=jnp.tensordot(w, b, 1).astype(node.b.dtype))
                                   for p, (node, a, b) in stacks.items()})

    param = ng.p.Array(init=np.zeros(n), lower=lo, upper=hi)
    param.random_state = np.random.RandomState(
        int(jax.random.randint(key, (), 0, 2**31 - 1)))
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    history = []
    for step in range(budget):
        with warnings.catch_warnings():  # NGOpt's inner solvers warn about their own defaults
            warnings.simplefilter("ignore")
            cand = opt.ask()
        w = np.asarray(cand.value, np.float64)
        loss = float(loss_fn(compose(jnp.asarray(w, F32))))
        objective = loss + l1 * float(np.mean(np.abs(w)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.tell(cand, objective if np.isfinite(objective) else np.inf)
        history.append({"step": step, "weights": w.tolist(), "loss": loss,
                        "objective": objective})
        if callback is not None:
            callback(step, w, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = np.asarray(opt.provide_recommendation().value, np.float64)
    return LoraHubResult(weights=best, composed=compose(jnp.asarray(best, F32)), history=history)


# ------------------------------------------------------------------ conversion to LoRA


class LoRAConversion(NamedTuple):
    """What :func:`to_lora` returns: ``lora, errors = to_lora(...)``."""

    tree: PyTree  #: the input tree with each converted leaf an ordinary LoRA node (scale 1)
    errors: dict  #: path -> relative error ``‖ΔK − a·b‖_F / ‖ΔK‖_F`` (0 for a zero delta)


def _conversion_rank(rank):
    if isinstance(rank, (bool, np.bool_)):
        raise ValueError(f"jlora.compose.to_lora: rank must be an int >= 1 or a float in "
                         f"(0, 1], got {rank!r}")
    if isinstance(rank, (int, np.integer)):
        return int(positive_int("jlora.compose.to_lora", "rank", rank))
    return float(real("jlora.compose.to_lora", "rank", rank, gt=0.0, le=1.0))


def energy_rank(s: np.ndarray, threshold: float) -> int:
    """PEFT's ``_find_cutoff_index``: the smallest ``k`` with ``Σ_{i<k} s_i² >= τ·Σ s_i²`` (float32)."""
    cs = np.cumsum(np.asarray(s, np.float32) ** 2, dtype=np.float32)
    return min(int(np.searchsorted(cs, np.float32(threshold) * cs[-1], side="left")) + 1, len(cs))


def _lora_from_delta(path: str, delta, like, base, rank):
    """``(node, rel_error)``: the truncated SVD of one delta as a LoRA node over ``base``."""
    if len(like.shape) < 2:
        raise ValueError(f"{path}: jlora.compose.to_lora needs a kernel (2 or more axes); this "
                         f"leaf has shape {tuple(like.shape)} (merge it instead)")
    if not jnp.issubdtype(jnp.asarray(delta).dtype, jnp.floating):
        raise ValueError(f"{path}: jlora.compose.to_lora needs a floating-point delta, got "
                         f"dtype {jnp.asarray(delta).dtype}")
    m = to_matrix(jnp.asarray(delta), like.in_axes).astype(F32)
    if not bool(jnp.isfinite(m).all()):
        raise ValueError(f"{path}: the delta holds NaN or infinite values")
    # the SVD of the PyTorch-layout ΔW = ΔKᵀ, as PEFT takes it: ΔW = U·S·Vh
    u, s, vh = jnp.linalg.svd(m.T, full_matrices=False)
    k = energy_rank(np.asarray(s), rank) if isinstance(rank, float) else rank
    if k > s.shape[0]:
        raise ValueError(f"{path}: rank {k} exceeds min(fan_in, fan_out) = {s.shape[0]}")
    # PEFT: lora_B = U_k·S_k, lora_A = Vh_k; jlora a = lora_Aᵀ, b = lora_Bᵀ
    a, b = vh[:k].T, s[:k, None] * u[:, :k].T
    s64 = np.asarray(s, np.float64)
    total = float(np.sqrt(np.sum(s64 ** 2)))
    err = float(np.sqrt(np.sum(s64[k:] ** 2)) / total) if total > 0 else 0.0
    if hasattr(base, "codes"):  # a quantized base (QLoRA): the LoRA sits on its dequantized copy
        from jlora.quant import dequantize
        base = dequantize(base)
    return lora_node(like, base, a, b), err


class _DenseLeaf(NamedTuple):
    shape: tuple
    in_axes: tuple


def to_lora(tree_or_delta: PyTree, rank, *, base: PyTree | None = None) -> LoRAConversion:
    """Convert any adapter, or a dense weight delta, to LoRA by truncated SVD (PEFT's ``convert_to_lora``).

    For each layer's delta ``ΔK`` (``node.delta()``: DoRA's ``m·V/‖V‖ − K0``,
    VeRA's ``Λ_b``-scaled product, AdaLoRA's ``P·Λ·Q``, GLoRA's weight terms,
    PiSSA's ``s(a·b − a0·b0)``, ...; or a plain array of a dense delta such as a
    full fine-tune's ``K_ft − K0``) the SVD of the PyTorch-layout
    ``ΔW = ΔKᵀ = U·diag(S)·Vh`` is taken in float32 and truncated to ``k``
    values. As PEFT places them, the singular values go on ``B``:
    ``lora_B = U_k·diag(S_k)``, ``lora_A = Vh_k``; in jlora's orientation
    ``a = Vh_kᵀ`` ``(fan_in, k)``, ``b = diag(S_k)·U_kᵀ`` ``(k, fan_out)``,
    ``rank = alpha = k`` (scale 1). By Eckart–Young, ``a·b`` is the best rank-``k``
    approximation of ``ΔK``, with relative error
    ``‖ΔK − a·b‖_F/‖ΔK‖_F = √(Σ_{i>k} S_i²)/√(Σ S_i²)``, reported per layer.

    Args:
      tree_or_delta: an adapted tree (every adapter node of a kernel is converted;
        plain leaves, adapters of vectors such as GLoRA's bias term, and
        ``Full()`` leaves are kept as they are) or, when it holds no node, a tree
        of dense deltas (every
        leaf is converted, viewed as ``(fan_in, fan_out)`` with all but the last
        axis as inputs, as Flax kernels are).
      rank: an int ``k >= 1`` (at most ``min(fan_in, fan_out)``), or a float
        ``τ ∈ (0, 1]``: per layer the smallest ``k`` with
        ``Σ_{i<=k} S_i² >= τ·Σ S_i²`` (PEFT's energy threshold; ranks differ by layer).
      base: for dense deltas, a tree holding the base weight at each delta's path
        (e.g. the pre-trained params); default zeros, so the nodes' ``delta()``
        and ``merge(lora, onto=params)`` are still exact. Ignored for nodes, whose
        LoRA sits on the weight their delta is measured against (PiSSA: the
        original weight; QLoRA: the dequantized base).

    Returns:
      ``LoRAConversion(tree, errors)``; ``errors`` maps each converted path to its
      relative Frobenius error. ``jlora.peft.save(dir, tree)`` writes the PEFT
      LoRA that ``peft``'s ``save_as_lora`` would (``r = lora_alpha = k``).

    ``Full()`` leaves (a classifier head trained whole) stay ``Full()`` nodes,
    bit for bit, and are not in ``errors``: PEFT's ``convert_to_lora`` copies
    ``modules_to_save`` whole into the LoRA it writes, and ``jlora.peft.save``
    writes ``Full()`` leaves as ``modules_to_save``. A head is often new (its
    "base" a random initialisation), so a truncated SVD of ``K_ft − K0`` would
    not be the head a user trained; for a low-rank head, pass
    ``merge(tree)[head] − K0`` as a dense delta.

    PEFT 0.21.2 reads ``get_delta_weight``, which for a DoRA layer is ``s·B·A``
    without the magnitude rescaling, so PEFT's conversion of a DoRA adapter
    approximates only its LoRA part; this function converts DoRA's whole weight
    change.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> k0 = jax.random.normal(jax.random.key(0), (6, 5))
        >>> delta = {"w": {"kernel": jnp.outer(jnp.arange(6.0), jnp.ones(5))}}
        >>> lora, errors = jlora.compose.to_lora(delta, 2, base={"w": {"kernel": k0}})
        >>> lora["w"]["kernel"].rank, errors["w/kernel"] < 1e-6
        (2, True)
        >>> bool(jnp.allclose(lora["w"]["kernel"].delta(), delta["w"]["kernel"], atol=1e-5))
        True
    """
    rank = _conversion_rank(rank)
    flat = leaves_with_paths(tree_or_delta)
    nodes = [(p, x) for p, x in flat if is_node(x)]
    out, errors = {}, {}
    if nodes:
        for path, node in nodes:
            if node.half() is not None:
                raise ValueError(f"{path}: jlora.compose.to_lora needs whole adapter nodes; "
                                 "combine the trainable and frozen halves first")
            if getattr(node.config, "expert_axis", None) is not None:
                raise ValueError(f"{path}: jlora.compose.to_lora does not convert stacked "
                                 "(expert_axis) adapters")
            if len(node.shape) < 2:
                continue  # a vector's adapter (GLoRA's bias term) has no low-rank form: kept
            if isinstance(node, FullNode):
                continue  # a whole trained leaf (a head): kept as PEFT keeps modules_to_save
            _delta_check(path, node, "converting them to LoRA (to_lora keeps weight "
                         "deltas only; merge or save such a node on its own)")
            out[path], errors[path] = _lora_from_delta(path, node.delta(), node, original(node),
                                                       rank)
    else:
        bases = {} if base is None else dict(leaves_with_paths(base))
        if not flat:
            raise ValueError("jlora.compose.to_lora: the tree holds no adapter and no delta")
        for path, d in flat:
            d = jnp.asarray(d)
            like = _DenseLeaf(tuple(d.shape), tuple(range(d.ndim - 1)))
            if base is not None and path not in bases:
                raise ValueError(f"{path}: base has no leaf at this delta's path")
            b0 = bases.get(path)
            if b0 is None:
                b0 = jnp.zeros(d.shape, d.dtype if jnp.issubdtype(d.dtype, jnp.floating) else F32)
            elif tuple(jnp.shape(b0)) != tuple(d.shape):
                raise ValueError(f"{path}: base has shape {tuple(jnp.shape(b0))}, the delta "
                                 f"{tuple(d.shape)}")
            out[path], errors[path] = _lora_from_delta(path, d, like, jnp.asarray(b0), rank)
    return LoRAConversion(map_with_paths(lambda p, x: out.get(p, x), tree_or_delta), errors)
