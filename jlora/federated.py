"""Federated LoRA: aggregation rules, personal partitions and clients in parallel.

Clients ``k = 1..K`` hold adapted trees (or their ``jlora.split`` trainable
halves) and sample counts ``n_k``; every rule normalises them to
``p_k = n_k / Σ n``. With ``ΔK_k = s_k·a_k·b_k`` the exact aggregate is
``ΔK* = Σ p_k ΔK_k``:

* :func:`fedavg` (McMahan et al. 2017 on the factors): ``ā = Σ p_k a_k``,
  ``b̄ = Σ p_k b_k``. Inexact, ``ā·b̄ ≠ Σ p_k a_k·b_k`` unless all ``a`` or all
  ``b`` agree; also the rule for every other trainable leaf (heads, ``Full``).
* :func:`ffa` (FFA-LoRA, Sun et al. ICLR 2024): ``a`` frozen and shared, so
  ``a·Σ p_k b_k = ΔK*`` exactly.
* :func:`flora` (FLoRA, Wang et al. NeurIPS 2024 §3): stack along the rank
  axis, ``a = [p_1 s_1 a_1, …, p_K s_K a_K]``, ``b = [b_1; …; b_K]``, scale 1:
  exact for any mix of ranks and scales.
* :func:`flexlora` (FlexLoRA, Bai et al. NeurIPS 2024 §3.2): the truncated SVD
  of ``ΔK*`` at each client's rank, computed from the stacked factors.
* :func:`lora_fair` (LoRA-FAIR, Bian et al. ICCV 2025): ``(ā, b̄ + Δb)`` with a
  server-side correction ``Δb``.

The formulas apply at LoRA and QLoRA nodes (a delta ``s·a·b``). Stacked-expert
nodes (``LoRA(expert_axis=0)``: ``a (E, in, r)``, ``b (E, r, out)``) aggregate
expert by expert under every rule. ``Full`` and ``TrainableTokens`` nodes are
averaged as plain leaves. Any other adapter node (DoRA, PF2LoRA's and FedDPA's
shared pair, VeRA, ...) is averaged field-wise by :func:`fedavg` and is a
``ValueError`` naming its path and type under the other rules, whose formulas
do not hold for its delta. Factors aggregate in float32, or in float64 where
they are float64.

FSLoRA (sketched sub-adapters), FeDLRT (a shared low-rank basis), the
personal/shared partitions of PF2LoRA, FedDPA and pFedLoRA and
:func:`simulate` (K clients of a round in one jitted ``vmap``) follow below.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora import federated as fl
    >>> params = {"w": {"kernel": jnp.ones((6, 4))}}
    >>> clients = [jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=r)}),
    ...                        key=jax.random.key(r)) for r in (1, 2)]
    >>> clients = [jax.tree.map(lambda x: x + 0.1, c) for c in clients]  # "trained"
    >>> exact = 0.25 * jlora.merge(clients[0])["w"]["kernel"] + 0.75 * jlora.merge(
    ...     clients[1])["w"]["kernel"]
    >>> stacked = fl.flora(clients, [1, 3])
    >>> stacked["w"]["kernel"].rank
    3
    >>> bool(jnp.allclose(jlora.merge(stacked)["w"]["kernel"], exact, atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.methods._experts import is_stacked
from jlora.methods.base import lowrank_svd
from jlora.methods.full import FullNode
from jlora.methods.lora import LoRANode
from jlora.methods.qlora import QLoRANode
from jlora.methods.trainable_tokens import TrainableTokensNode
from jlora.tree import PyTree, is_node, path_str


# ---------------------------------------------------------------- zipping clients


def _is_hole_or_node(x) -> bool:
    return x is None or is_node(x)


def _flatten(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_hole_or_node)
    return [path_str(kp) for kp, _ in flat], [x for _, x in flat], treedef


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _weights(weights, n: int, who: str) -> jax.Array:
    """``p_k = n_k / Σ n``; refuses negative, all-zero, NaN and wrong-length weights."""
    if n < 1:
        raise ValueError(f"jlora.federated.{who}: no clients given")
    if weights is None:
        raise ValueError(f"jlora.federated.{who}: weights (the clients' sample counts) are required")
    if _concrete(weights):
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"jlora.federated.{who}: weights must have length {n} (one per "
                             f"client), got shape {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"jlora.federated.{who}: weights must be finite, got {w.tolist()}")
        if np.any(w < 0):
            raise ValueError(f"jlora.federated.{who}: weights must be >= 0, got {w.tolist()}")
        if not w.sum() > 0:
            raise ValueError(f"jlora.federated.{who}: weights are all zero")
        return jnp.asarray(w / w.sum())  # float64 under jax_enable_x64, float32 otherwise
    w = jnp.asarray(weights)
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    if w.shape != (n,):
        raise ValueError(f"jlora.federated.{who}: weights must have length {n}, got shape {w.shape}")
    return w / jnp.sum(w)


def _zip(clients: Sequence[PyTree], who: str):
    """``(paths, columns, treedef)``; ``columns[i]`` is leaf ``i`` of every client."""
    if isinstance(clients, (dict,)) or not isinstance(clients, Sequence) or not clients:
        raise ValueError(f"jlora.federated.{who}: clients must be a non-empty list of trees")
    paths, first, treedef = _flatten(clients[0])
    columns = [[x] for x in first]
    for k, c in enumerate(clients[1:], 1):
        pk, leaves, _ = _flatten(c)
        if pk != paths:
            diff = sorted(set(pk) ^ set(paths)) or [p for p, q in zip(paths, pk) if p != q]
            where = diff[0] if diff else "(order)"
            raise ValueError(f"jlora.federated.{who}: client {k}'s tree differs from client 0's "
                             f"at {where}: paths {len(paths)} vs {len(pk)}")
        for i, x in enumerate(leaves):
            columns[i].append(x)
    for path, col in zip(paths, columns):
        _check_column(path, col, who)
    return paths, columns, treedef


def _describe(x) -> str:
    if x is None:
        return "None"
    if is_node(x):
        return f"{type(x).__name__}(rank={x.rank})"
    return f"{type(x).__name__}{getattr(x, 'shape', '')}"


def _check_column(path: str, col: list, who: str) -> None:
    x0 = col[0]
    for k, x in enumerate(col[1:], 1):
        # plain leaves may differ in container (numpy, jax, Python scalar); nodes may not
        if ((x is None) != (x0 is None) or is_node(x) != is_node(x0)
                or (is_node(x0) and type(x) is not type(x0))):
            raise ValueError(f"{path}: clients 0 and {k} differ in kind: {_describe(x0)} vs "
                             f"{_describe(x)} (jlora.federated.{who})")
        if x is None:
            continue
        if not is_node(x):
            if np.shape(x) != np.shape(x0):
                raise ValueError(f"{path}: clients 0 and {k} differ in shape: {np.shape(x0)} vs "
                                 f"{np.shape(x)} (jlora.federated.{who})")
            continue
        if x.shape != x0.shape or x.in_axes != x0.in_axes:
            raise ValueError(f"{path}: clients 0 and {k} adapt different bases: shape "
                             f"{x0.shape} vs {x.shape} (jlora.federated.{who})")
        for f in _array_fields(x0):
            if (getattr(x0, f) is None) != (getattr(x, f) is None):
                raise ValueError(f"{path}/{f}: present in one client and not the other "
                                 f"(client 0: {_describe(getattr(x0, f))}, client {k}: "
                                 f"{_describe(getattr(x, f))}); pass trees split alike "
                                 f"(jlora.federated.{who})")


def _array_fields(node) -> list[str]:
    return [f.name for f in dataclasses.fields(node) if f.metadata.get("pytree_node", True)]


def _config_diff(c0, c1) -> str:
    if type(c0) is not type(c1) or not dataclasses.is_dataclass(c0):
        return f"{c0!r} vs {c1!r}"
    return ", ".join(f"{f.name} {getattr(c0, f.name)!r} vs {getattr(c1, f.name)!r}"
                     for f in dataclasses.fields(c0) if getattr(c0, f.name) != getattr(c1, f.name))


def _same_frozen(path: str, name: str, values: list, who: str):
    """A frozen array (or a pytree of arrays: QLoRA's quantized base) must be identical
    across clients (checked when concrete)."""
    v0 = values[0]
    leaves0, def0 = jax.tree.flatten(v0)
    for k, v in enumerate(values[1:], 1):
        if v is None:
            continue
        leaves, treedef = jax.tree.flatten(v)
        if treedef != def0:
            raise ValueError(f"{path}/{name}: clients 0 and {k} differ in this frozen value's "
                             f"structure; jlora.federated.{who} needs one shared {name}")
        for x0, x in zip(leaves0, leaves):
            if not (_concrete(x) and _concrete(x0)):
                continue
            if np.shape(x) != np.shape(x0) or not np.array_equal(np.asarray(x), np.asarray(x0)):
                d = (float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(x0, np.float64))))
                     if np.shape(x) == np.shape(x0) else "shape")
                raise ValueError(f"{path}/{name}: clients 0 and {k} differ in this frozen array "
                                 f"(max |difference| {d}; shapes {np.shape(x0)} vs "
                                 f"{np.shape(x)}); jlora.federated.{who} needs one shared {name}")
    return v0


def _acc(x) -> jnp.dtype:
    """The dtype to aggregate ``x`` in: float32 for narrower floats, float64 kept."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _wsum(p, values):
    dt = jnp.result_type(values[0])
    acc_dt = _acc(values[0])
    acc = sum(p[k].astype(acc_dt) * jnp.asarray(v).astype(acc_dt) for k, v in enumerate(values))
    return acc.astype(dt)


def _leaf_mean(path, col, p, who):
    """FedAvg of a plain leaf; identical concrete leaves pass through exactly."""
    if all(_concrete(v) for v in col) and all(
            np.array_equal(np.asarray(v), np.asarray(col[0])) for v in col[1:]):
        return col[0]
    return _wsum(p, col)


def _node_mean(path, col, p, who, *, b_factors=None):
    """Field-wise weighted mean of the trainable fields; frozen fields must agree."""
    n0 = col[0]
    for k, n in enumerate(col[1:], 1):
        if n.config != n0.config and not (_is_lora(n0) and b_factors is not None):
            raise ValueError(f"{path}: clients 0 and {k} have different configs: "
                             f"{_config_diff(n0.config, n.config)} (jlora.federated.{who})")
    train = set(n0.trainable)
    # s_k/s_0 goes into b, or into a where b is frozen and shared (MiCA): either way
    # s_0·ā·b̄ then averages s_k·a_k·b_k's factors
    fold = "b" if "b" in train else "a"
    if b_factors is not None and fold not in train and any(c != 1 for c in b_factors):
        raise ValueError(f"{path}: clients' scales differ ({[n.scale for n in col]}) and neither "
                         f"a nor b trains, so no factor can carry them (jlora.federated.{who})")
    changes = {}
    for f in _array_fields(n0):
        vals = [getattr(n, f) for n in col]
        if vals[0] is None:
            continue
        if f in train:
            if f == fold and b_factors is not None:
                vals = [v * c for v, c in zip(vals, b_factors)]
            changes[f] = _wsum(p, vals)
        else:
            changes[f] = _same_frozen(path, f, vals, who)
    return n0.replace(**changes)


def _lora_ranks_equal(path, col, who):
    for k, n in enumerate(col[1:], 1):
        if n.rank != col[0].rank:
            raise ValueError(f"{path}: clients 0 and {k} have ranks {col[0].rank} and {n.rank}; "
                             f"jlora.federated.{who} needs equal ranks (use flora or flexlora "
                             "for heterogeneous ranks)")
        if _unscaled(n.config) != _unscaled(col[0].config) or n.in_axes != col[0].in_axes:
            raise ValueError(f"{path}: clients 0 and {k} have different configs: "
                             f"{_config_diff(col[0].config, n.config)} (jlora.federated.{who})")


def _unscaled(config) -> dict:
    """A LoRA config's options other than its scale (alpha, rslora: folded into b)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("alpha", "rslora")}


def _no_initial_factors(path, col, who):
    if any(getattr(n, "a0", None) is not None for n in col):
        raise ValueError(f"{path}: jlora.federated.{who} aggregates plain LoRA deltas; this node "
                         "carries initial factors a0/b0 (PiSSA/OLoRA): merge them first")


def _check_frozen(path, col, who, skip=()):
    """Every frozen field (``base``, a frozen ``a``) must be one array shared by all clients."""
    train = set(col[0].trainable) | set(skip)
    for f in _array_fields(col[0]):
        if f not in train and getattr(col[0], f) is not None:
            _same_frozen(path, f, [getattr(n, f) for n in col], who)


def _is_lora(x) -> bool:
    """A node whose delta is ``s·a·b`` alone (LoRA, QLoRA): every rule's formula holds."""
    return type(x) in (LoRANode, QLoRANode)


#: nodes that hold a plain trainable value (a head, trainable rows): averaged as leaves
_DENSE_NODES = (FullNode, TrainableTokensNode)


def _other_node_mean(path, col, p, who, factorwise: bool):
    """A node that is not plain LoRA: averaged field-wise where that is the rule's meaning
    (FedAvg, dense nodes), an error naming the path and node type otherwise."""
    if not factorwise and not isinstance(col[0], _DENSE_NODES):
        raise ValueError(f"{path}: jlora.federated.{who} has no rule for "
                         f"{type(col[0]).__name__} nodes (it aggregates LoRA and QLoRA "
                         "deltas s·a·b); a factor-wise average of this node is "
                         "jlora.federated.fedavg")
    return _node_mean(path, col, p, who)


def _aggregate(clients, weights, who, lora_rule, *, factorwise: bool = False):
    paths, columns, treedef = _zip(clients, who)
    p = _weights(weights, len(clients), who)
    out = []
    for path, col in zip(paths, columns):
        x0 = col[0]
        if x0 is None:
            out.append(None)
        elif _is_lora(x0):
            out.append(lora_rule(path, col, p))
        elif is_node(x0):
            out.append(_other_node_mean(path, col, p, who, factorwise))
        else:
            out.append(_leaf_mean(path, col, p, who))
    return jax.tree_util.tree_unflatten(treedef, out)


def _ratios(col):
    """``s_k / s_0``: other clients' scales folded into their ``b`` factors."""
    return [n.scale / col[0].scale for n in col]


# ---------------------------------------------------------------- the rules


def fedavg(clients: Sequence[PyTree], weights) -> PyTree:
    """FedAvg of the factors: ``ā = Σ p_k a_k``, ``b̄ = Σ p_k b_k`` at every LoRA node.

    The weighted mean of every trainable field of every adapter node (heads,
    ``Full``, DoRA magnitudes alike) and of plain array leaves. The merged
    delta ``s·ā·b̄`` differs from ``Σ p_k s_k a_k b_k`` by the cross terms.
    LoRA clients must share the rank; when their scales differ, client k's
    ``s_k/s_0`` is folded into its ``b`` (into its ``a`` where ``b`` is frozen and
    shared, as MiCA's) and the result has client 0's config.
    Frozen fields (``base``, a frozen ``a``) must be identical across clients.

    Args:
      clients: adapted trees, or ``jlora.split`` trainable halves, of one structure.
      weights: the clients' sample counts (normalised inside).

    Returns:
      One tree of the same kind as the inputs.

    Raises:
      ValueError: bad weights; different structures, ranks, configs or bases
        (the message names the path and both values).

    Example::

        >>> import jax.numpy as jnp
        >>> from jlora import federated as fl
        >>> fl.fedavg([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}], [1, 3])["w"]
        Array([0.75, 0.75], dtype=float32)
    """

    def rule(path, col, p):
        _lora_ranks_equal(path, col, "fedavg")
        return _node_mean(path, col, p, "fedavg", b_factors=_ratios(col))

    return _aggregate(clients, weights, "fedavg", rule, factorwise=True)


def ffa(clients: Sequence[PyTree], weights) -> PyTree:
    """FFA-LoRA (Sun et al. ICLR 2024): one frozen ``a``, ``b = Σ p_k (s_k/s_0) b_k``.

    With ``LoRA(train_a=False)`` every client shares ``a``, so the result's
    delta ``s_0·a·b`` equals ``Σ p_k s_k a b_k`` exactly; only ``b`` travels
    (``jlora.split`` leaves only ``b`` in the trainable half). An ``a`` that
    differs between clients is an error naming the path.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora import federated as fl
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
        >>> spec = jlora.Spec({"w/kernel": jlora.LoRA(rank=2, train_a=False)})
        >>> c = jlora.apply(params, spec, key=jax.random.key(0))
        >>> halves = [jlora.split(c)[0], jlora.split(c)[0]]
        >>> fl.ffa(halves, [1, 1])["w"]["kernel"].b.shape
        (2, 4)
    """

    def rule(path, col, p):
        if any(n.rank != col[0].rank for n in col):
            raise ValueError(f"{path}: clients have ranks {[n.rank for n in col]}; FFA-LoRA needs "
                             "one shared frozen a (equal ranks)")
        _no_initial_factors(path, col, "ffa")
        _check_frozen(path, col, "ffa", skip=("a",))
        a = _same_frozen(path, "a", [n.a for n in col], "ffa") if col[0].a is not None else None
        _lora_ranks_equal(path, col, "ffa")  # then the other options (alpha, rslora may differ)
        b = _wsum(p, [n.b * c for n, c in zip(col, _ratios(col))])
        return col[0].replace(a=a, b=b)

    return _aggregate(clients, weights, "ffa", rule)


def _stack(path, col, p, who):
    """``A = [p_k s_k a_k]``, ``B = [b_k]``: ``A·B = Σ p_k s_k a_k b_k``.

    Joined along the rank axis (the last of ``a``, the second to last of ``b``),
    so stacked-expert factors ``(E, in, r)``, ``(E, r, out)`` join per expert.
    """
    _no_initial_factors(path, col, who)
    _check_frozen(path, col, who, skip=("a",))
    if any(n.a is None for n in col):
        raise ValueError(f"{path}: jlora.federated.{who} needs every client's a factor; pass full "
                         "adapted trees (a frozen a is in the frozen half of jlora.split)")
    for k, n in enumerate(col[1:], 1):
        if n.in_axes != col[0].in_axes:
            raise ValueError(f"{path}: clients 0 and {k} have in_axes {col[0].in_axes} vs {n.in_axes}")
    dt, acc = jnp.result_type(col[0].a), _acc(col[0].a)
    a = jnp.concatenate([(p[k].astype(acc) * n.scale) * n.a.astype(acc)
                         for k, n in enumerate(col)], -1)
    b = jnp.concatenate([n.b.astype(acc) for n in col], -2)
    return a.astype(dt), b.astype(dt)


def _with_rank(node, rank: int, a, b, **options):
    """``node`` with factors ``a``, ``b`` of rank ``rank`` (per expert for a stacked node)."""
    if is_stacked(node):  # the rank given is each slice's own
        options = {"rank_per_expert": "full", **options}
    config = dataclasses.replace(node.config, rank=rank, **options)
    return node.replace(a=a, b=b, config=config)


def flora(clients: Sequence[PyTree], weights) -> PyTree:
    """FLoRA (Wang et al. NeurIPS 2024, §3): stack the clients' factors along the rank axis.

    At each LoRA node ``a = [p_1 s_1 a_1, …, p_K s_K a_K]`` and
    ``b = [b_1; …; b_K]`` with rank ``R = Σ r_k`` and ``alpha = R`` (scale 1,
    exactly representable), so ``a·b = Σ p_k s_k a_k b_k``: exact for any mix
    of ranks, alphas and rsLoRA. The paper's round then folds this into the
    base and restarts every client from a fresh adapter::

        params = jlora.merge(flora(clients, n))                # full trees, or
        params = jlora.merge(flora(halves, n), onto=params)     # trainable halves
        client_k = jlora.apply(params, spec_k, key=key_k)       # fresh, any rank

    (:func:`merge_and_restart` does both for a split tree.) Other trainable
    leaves are averaged as in :func:`fedavg`. Clients' ``a`` must be present
    (full trees, or halves of ``train_a=True`` adapters).
    """

    def rule(path, col, p):
        a, b = _stack(path, col, p, "flora")
        r = a.shape[-1]
        return _with_rank(col[0], r, a, b, alpha=float(r), rslora=False)

    return _aggregate(clients, weights, "flora", rule)


def flexlora(clients: Sequence[PyTree], weights, ranks: Sequence[int] | None = None) -> list:
    """FlexLoRA (Bai et al. NeurIPS 2024, §3.2): each client gets the truncated SVD of ``ΔK*``.

    ``ΔK* = Σ p_k s_k a_k b_k = U·diag(S)·Vᵀ``; client k receives, at rank
    ``r_k = ranks[k]`` (default: its own rank), ``a_k = U[:, :r_k]`` and
    ``b_k = diag(S[:r_k])·Vᵀ[:r_k] / s_k`` (all singular values in ``b``, as the
    paper does), the best rank-``r_k`` approximation of ``ΔK*`` (Eckart–Young).
    The SVD is taken from the stacked factors (:func:`lowrank_svd`); the
    ``fan_in × fan_out`` matrix is never formed. A client rank above the rank
    of ``ΔK*`` is padded with zero components. Other trainable leaves are
    averaged as in :func:`fedavg`.

    Returns:
      A list with one tree per client, client k's LoRA nodes at rank ``r_k``.
    """
    n = len(clients) if isinstance(clients, Sequence) else 0
    if ranks is not None:
        ranks = list(ranks)
        if len(ranks) != n:
            raise ValueError(f"jlora.federated.flexlora: ranks must have one entry per client "
                             f"({n}), got {len(ranks)}")
        for k, r in enumerate(ranks):
            if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
                raise ValueError(f"jlora.federated.flexlora: ranks[{k}] must be a positive int, "
                                 f"got {r!r}")
    paths, columns, treedef = _zip(clients, "flexlora")
    p = _weights(weights, n, "flexlora")
    outs = [[] for _ in range(n)]
    for path, col in zip(paths, columns):
        x0 = col[0]
        if _is_lora(x0):
            acc = _acc(x0.a)
            svd = jax.vmap(lowrank_svd) if is_stacked(x0) else lowrank_svd  # per expert
            u, s, vt = svd(*(x.astype(acc) for x in _stack(path, col, p, "flexlora")))
            for k, node in enumerate(col):
                r = node.rank if ranks is None else int(ranks[k])
                m = min(r, s.shape[-1])
                target = _with_rank(node, r, node.a, node.b)
                a = jnp.zeros(u.shape[:-1] + (r,), acc).at[..., :m].set(u[..., :m])
                b = jnp.zeros(vt.shape[:-2] + (r, vt.shape[-1]), acc).at[..., :m, :].set(
                    s[..., :m, None] * vt[..., :m, :] / target.scale)
                dt = jnp.result_type(node.a)
                outs[k].append(_with_rank(node, r, a.astype(dt), b.astype(dt)))
        else:
            if x0 is None:
                agg = None
            elif is_node(x0):
                agg = _other_node_mean(path, col, p, "flexlora", factorwise=False)
            else:
                agg = _leaf_mean(path, col, p, "flexlora")
            for k in range(n):
                outs[k].append(agg)
    return [jax.tree_util.tree_unflatten(treedef, o) for o in outs]


def lora_fair(clients: Sequence[PyTree], weights, *, ridge: float = 1e-3) -> PyTree:
    """LoRA-FAIR (Bian et al. ICCV 2025, arXiv 2411.14961): ``(ā, b̄ + Δb)``.

    The server keeps FedAvg's ``ā = Σ p_k a_k`` and ``b̄ = Σ p_k b_k`` and
    refines ``b`` so that ``ā·(b̄ + Δb)`` approaches ``T = Σ p_k a_k b_k`` (scales
    folded into ``b`` as ``s_k/s_0``); clients start the next round from the
    refined pair (the paper's "initialization refinement"). The paper states
    the objective as a similarity between ``ΔK*`` and the refined product plus
    ``λ‖Δb‖``; jlora solves it in the Frobenius norm, which has a closed form
    (ridge least squares):

        Δb = argmin ‖T − ā(b̄ + Δb)‖²_F + λ‖Δb‖²_F = (āᵀā + λI)⁻¹·(āᵀT − āᵀā·b̄)

    with ``āᵀT = Σ p_k (āᵀa_k)·b_k`` (only ``r×r`` products: ``T`` is never
    formed) and ``λ = ridge·tr(āᵀā)/r``. ``Δb = 0`` is a candidate, so the
    residual ``‖T − ā(b̄+Δb)‖`` is never above FedAvg's, and with ``ridge → 0`` it
    is the best ``b`` for ``ā``. The rule keeps no state across rounds: the
    refined tree is the next round's start. A frozen ``a`` (absent from a
    trainable half) makes FedAvg exact and ``Δb = 0``.
    """
    from jlora._validate import real

    real("jlora.federated.lora_fair", "ridge", ridge, ge=0.0)

    def rule(path, col, p):
        _lora_ranks_equal(path, col, "lora_fair")
        _no_initial_factors(path, col, "lora_fair")
        avg = _node_mean(path, col, p, "lora_fair", b_factors=_ratios(col))
        if avg.a is None or avg.b is None or not {"a", "b"} <= set(avg.trainable):
            return avg  # one shared factor (a frozen a or b) makes the average exact
        acc = _acc(avg.a)
        a_bar, b_bar = avg.a.astype(acc), avg.b.astype(acc)
        gram = a_bar.mT @ a_bar  # (..., r, r): per expert for a stacked node
        at_t = sum(p[k].astype(acc) * c * (a_bar.mT @ n.a.astype(acc)) @ n.b.astype(acc)
                   for k, (n, c) in enumerate(zip(col, _ratios(col))))
        r = gram.shape[-1]
        # floored so that ā = 0 (nothing to fit through) solves to Δb = 0, not 0/0
        lam = jnp.maximum(ridge * jnp.trace(gram, axis1=-2, axis2=-1) / r, jnp.finfo(acc).tiny)
        db = jnp.linalg.solve(gram + lam[..., None, None] * jnp.eye(r, dtype=acc),
                              at_t - gram @ b_bar)
        return avg.replace(b=(b_bar + db).astype(avg.b.dtype))

    return _aggregate(clients, weights, "lora_fair", rule)


# ---------------------------------------------------------------- personal / shared


def _personal_matcher(paths, names, who):
    """A predicate on paths; every glob in ``paths`` must match one of ``names``."""
    if paths is None:
        return lambda path: False
    if callable(paths):
        return paths
    from jlora.spec import glob_to_regex
    import re

    if isinstance(paths, str):
        paths = [paths]
    regexes = [re.compile(glob_to_regex(p) + r"\Z") for p in paths]
    for glob, r in zip(paths, regexes):
        if not any(r.match(n) for n in names):  # a typo would leave nothing personal
            raise ValueError(f"jlora.federated.{who}: paths glob {glob!r} matches no leaf of "
                             f"the tree (paths such as {names[:3]})")
    return lambda path: any(r.match(path) for r in regexes)


def _partition(tree, paths, keep_personal: bool, who: str):
    names, leaves, treedef = _flatten(tree)
    is_personal = _personal_matcher(paths, names, who)
    out = []
    for path, x in zip(names, leaves):
        if x is None:
            out.append(None)
        elif is_personal(path):
            out.append(x if keep_personal else None)
        elif is_node(x) and getattr(type(x), "personal_fields", ()):
            fields = type(x).personal_fields
            drop = [f for f in _array_fields(x) if (f in fields) != keep_personal]
            out.append(x.replace(**{f: None for f in drop}))
        else:
            out.append(None if keep_personal else x)
    return jax.tree_util.tree_unflatten(treedef, out)


def shared(tree: PyTree, *, paths=None) -> PyTree:
    """What a client uploads: ``tree`` without its personal parts (``None`` holes there).

    Personal are the fields a node class lists in ``personal_fields``
    (PF2LoRA's and FedDPA's ``c``, ``d``) and every leaf or node whose path
    matches ``paths`` (globs as in ``jlora.Spec``, each of which must match a
    path of ``tree``, or a predicate on the path): pFedLoRA's personal block,
    e.g. ``paths=["**/local/**", "classifier/*"]``.
    ``combine(shared(t), personal(t))`` gives ``t`` back. A rule aggregates
    ``shared`` trees like any other (holes stay holes).

    Example::

        >>> import jax.numpy as jnp
        >>> from jlora import federated as fl
        >>> t = {"body": jnp.ones(2), "head": jnp.zeros(2)}
        >>> fl.shared(t, paths="head")
        {'body': Array([1., 1.], dtype=float32), 'head': None}
        >>> fl.combine(fl.shared(t, paths="head"), fl.personal(t, paths="head")) == t
        True
    """
    return _partition(tree, paths, keep_personal=False, who="shared")


def personal(tree: PyTree, *, paths=None) -> PyTree:
    """What stays on the client: the complement of :func:`shared` (same ``paths``)."""
    return _partition(tree, paths, keep_personal=True, who="personal")


def combine(first: PyTree, second: PyTree) -> PyTree:
    """Fill each ``None`` hole of one tree from the other (``shared`` + ``personal``).

    Works field by field inside adapter nodes and with whole nodes missing on
    one side; a position filled in both trees is an error naming its path.
    """
    n1, l1, treedef = _flatten(first)
    n2, l2, _ = _flatten(second)
    if n1 != n2:
        diff = sorted(set(n1) ^ set(n2))
        raise ValueError(f"jlora.federated.combine: the trees differ at {diff[:3] or '(order)'}")
    out = []
    for path, x, y in zip(n1, l1, l2):
        if x is None or y is None:
            out.append(y if x is None else x)
        elif is_node(x) and is_node(y) and type(x) is type(y):
            fill = {}
            for f in _array_fields(x):
                fx, fy = getattr(x, f), getattr(y, f)
                if fx is not None and fy is not None:
                    raise ValueError(f"{path}/{f}: set in both trees (jlora.federated.combine)")
                fill[f] = fy if fx is None else fx
            out.append(x.replace(**fill))
        else:
            raise ValueError(f"{path}: set in both trees (jlora.federated.combine)")
    return jax.tree_util.tree_unflatten(treedef, out)


def _take(tree, template, keep: bool):
    """Positions of ``tree`` set in ``template`` (keep=True) or not (keep=False)."""
    names, leaves, treedef = _flatten(tree)
    _, tmpl, _ = _flatten(template)
    out = []
    for x, t in zip(leaves, tmpl):
        if x is None:
            out.append(None)
        elif is_node(x) and is_node(t):
            out.append(x.replace(**{f: None for f in _array_fields(x)
                                    if (getattr(t, f) is not None) != keep}))
        else:
            out.append(x if (t is not None) == keep else None)
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------- stacking clients


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack client trees of one structure along a new leading client axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree, n: int | None = None) -> list:
    """The inverse of :func:`stack`: a list of ``n`` client trees."""
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0] if n is None else n
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def pad_clients(datasets: Sequence[PyTree]):
    """Pad clients' datasets (leading axis ``n_k``) to one length: ``(data, mask)``.

    ``data`` has leaves ``(K, max n_k, ...)`` (zeros past each client's end),
    ``mask`` is ``(K, max n_k)`` bool; ``mask.sum(1)`` are the sample counts
    to pass as ``weights``. Padding keeps the vmapped program static; a
    client's loss must weight examples by its mask.
    """
    if not datasets:
        raise ValueError("jlora.federated.pad_clients: no datasets given")
    sizes = [len(jax.tree.leaves(d)[0]) for d in datasets]
    n = max(sizes)

    def pad(x, size):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((n - size,) + x.shape[1:], x.dtype)])

    data = jax.tree.map(lambda *xs: np.stack([pad(x, s) for x, s in zip(xs, sizes)]), *datasets)
    mask = np.arange(n)[None, :] < np.asarray(sizes)[:, None]
    return data, mask


def client_specs(specs: PyTree, axis: str = "clients") -> PyTree:
    """Prepend a client mesh axis to every ``PartitionSpec`` of a client tree.

    ``specs`` is what ``jlora.sharding.specs`` derives for one client (or its
    ``jlora.split`` trainable half); the result lays a stacked ``(K, ...)``
    tree out with clients over ``axis`` and each factor as its base says.
    """
    from jax.sharding import PartitionSpec as P

    return jax.tree.map(lambda s: None if s is None else P(axis, *s), specs,
                        is_leaf=lambda x: isinstance(x, P) or x is None)


# ---------------------------------------------------------------- simulation


class SimState(NamedTuple):
    """Where a :func:`simulate` run stands after a round."""

    round: int  # rounds completed
    trainable: PyTree  # the server's tree (broadcast to clients)
    frozen: PyTree  # shared frozen half (FLoRA's restart updates its bases)
    personal: PyTree  # stacked (K, ...) personal parts, or None
    opt_state: Any  # server optimizer state, or None
    clients: np.ndarray  # the clients sampled in the last round


_ROUNDS: dict = {}  # (local_update, aggregate, server_opt, restart, broadcast) -> jitted round


def _weighted_mean(tree, p):
    """``Σ_i p_i·tree[i]`` over the leading client axis, in each leaf's dtype."""
    return jax.tree.map(lambda v: jnp.tensordot(p.astype(v.dtype), v, axes=1), tree)


def _round_program(local_update, aggregate, server_opt, restart, broadcast, prepare, context,
                   sharding):
    """One round as a pure function of arrays (see :func:`simulate`)."""

    def run_round(tr, fr, pers, opt_state, data, ids, p, k_clients, k_server):
        m = ids.shape[0]
        sel = jax.tree.map(lambda x: x[ids], data)
        keys = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(ids)
        pre = {}
        if prepare is not None:   # e.g. MIME's full-batch gradient at the server model
            pre = _weighted_mean(jax.vmap(prepare, in_axes=(None, None, 0, 0))(tr, fr, sel, keys),
                                 p)
        if broadcast is not None:
            starts = jax.vmap(lambda i: broadcast(tr, i))(ids)
        else:
            starts = jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + x.shape), tr)
        template = None if pers is None else jax.tree.map(lambda x: x[0], pers)
        if pers is not None:
            starts = jax.vmap(combine)(_take(starts, template, keep=False),
                                       jax.tree.map(lambda x: x[ids], pers))
        if sharding is not None:
            starts = sharding(starts)
        reports = {}
        if context is None:
            results = jax.vmap(local_update, in_axes=(0, None, 0, 0))(starts, fr, sel, keys)
        else:
            ctx = context(opt_state, tr, pre)
            results, reports = jax.vmap(local_update, in_axes=(0, None, 0, 0, None))(
                starts, fr, sel, keys, ctx)
            reports = _weighted_mean(reports, p)
        if sharding is not None:
            results = sharding(results)
        uploads = results
        if pers is not None:
            sent = results.tree if isinstance(results, FSLoRAUpload) else results
            mine = _take(sent, template, keep=True)
            pers = jax.tree.map(lambda x, y: x.at[ids].set(y), pers, mine)
            sent = _take(sent, template, keep=False)
            uploads = (results._replace(tree=sent) if isinstance(results, FSLoRAUpload)
                       else sent)
        agg = aggregate(unstack(uploads, m), p)
        if restart is not None:
            tr, fr = restart(agg, fr, k_server)
        elif server_opt is not None:
            grad = jax.tree.map(lambda x, y: (x - y).astype(x.dtype), tr, agg)
            upd, opt_state = server_opt.update(grad, opt_state, tr, **{**pre, **reports})
            tr = optax.apply_updates(tr, upd)
        else:
            tr = agg
        return tr, fr, pers, opt_state

    return run_round


def _aggregate_change(aggregate, trainable, personal, m: int) -> str | None:
    """Where ``aggregate`` would change the server tree's structure or shapes, or ``None``.

    Traced once with ``jax.eval_shape`` on ``m`` copies of the server's upload;
    an aggregate that cannot be traced on them is left to the round to report.
    """
    template = None if personal is None else jax.tree.map(lambda x: x[0], personal)
    uploads = trainable if template is None else _take(trainable, template, keep=False)
    try:
        agg = jax.eval_shape(lambda u, p: aggregate([u] * m, p), uploads,
                             jnp.full((m,), 1.0 / m, jnp.float32))
    except Exception:  # noqa: BLE001 -- the round raises its own, fuller error
        return None
    flat_t, def_t = jax.tree_util.tree_flatten_with_path(trainable)
    flat_a, def_a = jax.tree_util.tree_flatten_with_path(agg)
    shapes_t = {path_str(kp): np.shape(x) for kp, x in flat_t}
    shapes_a = {path_str(kp): tuple(x.shape) for kp, x in flat_a}
    for path, shape in shapes_t.items():
        if path not in shapes_a:
            return f"{path}: the server tree has shape {shape}, the aggregate has no value there"
        if shapes_a[path] != shape:
            return f"{path}: the server tree has shape {shape}, the aggregate has shape " \
                   f"{shapes_a[path]}"
    for path, shape in shapes_a.items():
        if path not in shapes_t:
            return f"{path}: the aggregate has shape {shape}, the server tree has no value there"
    if def_t != def_a:
        nodes_a = dict(zip(*_flatten(agg)[:2]))
        for path, x in zip(*_flatten(trainable)[:2]):
            y = nodes_a.get(path)
            if is_node(x) and is_node(y) and x.config != y.config:
                return f"{path}: the adapter config changes ({_config_diff(x.config, y.config)})"
        return "the tree structure"
    return None


def simulate(local_update: Callable, trainable: PyTree, frozen: PyTree, data: PyTree, *,
             rounds: int, key: jax.Array, weights=None, clients_per_round: int | None = None,
             aggregate: Callable = fedavg, server_opt: optax.GradientTransformation | None = None,
             restart: Callable | None = None, broadcast: Callable | None = None,
             personal: PyTree | None = None, mesh=None, axis: str = "clients",
             specs: PyTree | None = None, callback: Callable | None = None,
             prepare: Callable | None = None, context: Callable | None = None) -> SimState:
    """Run ``rounds`` federated rounds; each round's clients train in one jitted ``vmap``.

    Round ``t`` (``t = 0..rounds-1``), with ``k_t = fold_in(key, t)`` split in
    three (sampling, clients, server):

    1. sample ``M = clients_per_round`` of the ``K`` clients without
       replacement (all of them by default), sorted; a client of weight 0
       has no samples and is never drawn when ``M < K``;
    2. client ``i`` starts from ``broadcast(trainable, i)`` (default: the
       server's tree), with its ``personal[i]`` filled in (:func:`combine`);
    3. ``local_update(start, frozen, data[i], fold_in(k_clients, i))`` for
       every sampled client at once (``jax.vmap`` over the client axis);
       with ``context``, ``local_update(start, frozen, data[i], key_i, ctx)``
       with ``ctx = context(opt_state, trainable, pre)`` the same for every
       client, returning ``(tree, report)``; ``pre`` is the weighted mean
       ``Σ p_i·prepare(trainable, frozen, data[i], key_i)`` over the sampled
       clients (``{}`` without ``prepare``), computed in the same program
       before the local steps (MIME's full-batch gradient ``c``);
    4. the results' personal parts (positions set in ``personal``) go back to
       ``personal[i]``; the rest is aggregated with
       ``aggregate(list_of_M_trees, weights[sampled])`` (any rule of this
       module, or your own; FSLoRA: clients return :func:`fslora_upload`
       and ``aggregate=fslora_rule(normalize=...)``);
    5. the server's tree becomes the aggregate, or ``trainable −
       server_opt(trainable − aggregate)`` (FedOpt on the pseudo-gradient;
       with ``context``, ``server_opt.update(g, opt_state, trainable,
       **pre, **report)`` where ``report`` is the weighted mean of the
       clients' reports: MIME's ``full_gradient``, FedLADA's ``nu_hat`` and
       ``offset``), or ``restart(aggregate, frozen, k_server) -> (trainable, frozen)``
       (FLoRA: merge into the bases and restart from fresh adapters).

    Unequal datasets: pad with :func:`pad_clients` and weight by the mask.
    Heterogeneous ranks keep one static program by padding every client to
    the largest rank with zero components: a zero column of ``a`` and the
    matching zero row of ``b`` get zero gradients, so client ``k`` trains a
    rank-``r_k`` LoRA (at the padded config's scale ``alpha/r_max``, i.e. a
    rank-``r_k`` adapter with ``alpha·r_k/r_max``).

    Args:
      local_update: one client's pure ``(trainable, frozen, data, key) -> trainable``.
      trainable: the server's initial tree (a ``jlora.split`` trainable half).
      frozen: the frozen half shared by every client.
      data: a pytree whose leaves have a leading client axis ``K``.
      rounds: number of rounds.
      key: PRNG key; everything random derives from it.
      weights: ``(K,)`` sample counts (default: equal).
      clients_per_round: ``M ≤ K`` sampled per round (default ``K``).
      aggregate: ``(clients, weights) -> tree`` (default :func:`fedavg`).
      server_opt: an optax transform on the pseudo-gradient (FedAdam etc.); the
        aggregate must keep the server tree's shapes (checked before the first
        round: a ``ValueError`` names the path where e.g. :func:`flora` changes them).
      restart: ``(aggregate, frozen, key) -> (trainable, frozen)``.
      broadcast: ``(trainable, client_id) -> start`` (e.g. FlexLoRA's per-client truncation).
      personal: stacked ``(K, ...)`` personal parts (``stack([personal(t) ...])``).
      mesh: a ``jax.sharding.Mesh`` with an ``axis`` axis: clients are sharded over it.
      specs: the ``PartitionSpec`` tree of one client's tree (from
        ``jlora.sharding.specs``); default: replicated within a client.
      callback: called with the :class:`SimState` after every round (progress bars).
      prepare: ``(trainable, frozen, data, key) -> dict`` of trees, one
        client's statistics at the server model before training; the sampled
        clients' weighted mean is ``pre`` (needs ``context``).
      context: ``(opt_state, trainable, pre) -> ctx``, what the server sends
        every client beside its tree (MIME's frozen base-optimizer state and
        ``c``, FedLADA's ``ν`` and ``g_a``); switches ``local_update`` to
        ``(start, frozen, data, key, ctx) -> (tree, report)`` with ``report``
        a dict of trees whose weighted mean is passed to ``server_opt.update``
        as keyword arguments (:func:`jlora.optim.mime_server`,
        :func:`jlora.optim.fedlada_server`).

    Returns:
      The final :class:`SimState`.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from jlora import federated as fl
        >>> data = {"x": jnp.arange(4.0)[:, None]}          # 4 clients, one number each
        >>> step = lambda t, fr, d, k: {"w": t["w"] + 0.5 * (d["x"][0] - t["w"])}
        >>> out = fl.simulate(step, {"w": jnp.zeros(())}, None, data, rounds=2,
        ...                   key=jax.random.key(0))
        >>> float(out.trainable["w"])   # 0.75 of the way to the mean 1.5
        1.125

    MimeLite (Karimireddy et al. 2020, Alg. 1): clients take SGD-momentum steps
    with the server's momentum frozen and report their gradient at the server
    model, whose mean moves the momentum::

        >>> import optax, jlora
        >>> base = optax.sgd(0.5, momentum=0.9)
        >>> loss = lambda t, d: 0.5 * (t["w"] - d["x"][0]) ** 2
        >>> def mimelite(t, fr, d, k, ctx):
        ...     g = jax.grad(loss)(t, d)
        ...     tx = jlora.optim.mime_client(base, ctx)
        ...     u, _ = tx.update(g, tx.init(t), t)
        ...     return optax.apply_updates(t, u), {"full_gradient": g}
        >>> out = fl.simulate(mimelite, {"w": jnp.zeros(())}, None, data, rounds=2,
        ...                   key=jax.random.key(0), server_opt=jlora.optim.mime_server(base),
        ...                   context=lambda state, t, pre: state)
        >>> round(float(out.trainable["w"]), 4)   # x1 = 0.75, m = −1.5; x2 = x1 + 0.5·(1.35 + 0.75)
        1.8
    """
    from jlora._validate import positive_int

    positive_int("jlora.federated.simulate", "rounds", rounds, minimum=0)
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("jlora.federated.simulate: data has no arrays")
    n_clients = int(leaves[0].shape[0])
    for path, x in zip(*_flatten(data)[:2]):
        if x is not None and np.shape(x)[:1] != (n_clients,):
            raise ValueError(f"jlora.federated.simulate: data/{path} has leading axis "
                             f"{np.shape(x)[:1]}, expected the {n_clients} clients")
    w = np.ones(n_clients) if weights is None else np.asarray(
        _weights(weights, n_clients, "simulate"), np.float64)
    m = n_clients if clients_per_round is None else positive_int(
        "jlora.federated.simulate", "clients_per_round", clients_per_round)
    if m > n_clients:
        raise ValueError(f"jlora.federated.simulate: clients_per_round={m} exceeds the "
                         f"{n_clients} clients")
    sampled_from = np.flatnonzero(w > 0)  # a client without samples has nothing to send
    if m < n_clients and m > len(sampled_from):
        raise ValueError(f"jlora.federated.simulate: clients_per_round={m} exceeds the "
                         f"{len(sampled_from)} clients with nonzero weight")
    if restart is not None and server_opt is not None:
        raise ValueError("jlora.federated.simulate: give restart or server_opt, not both")
    if server_opt is not None:
        where = _aggregate_change(aggregate, trainable, personal, m)
        if where is not None:
            name = getattr(aggregate, "__name__", repr(aggregate))
            raise ValueError(
                f"jlora.federated.simulate: server_opt steps on the pseudo-gradient trainable − "
                f"aggregate, but aggregate={name} changes the server tree: {where}. A rule "
                "that changes the adapters' shape (flora's rank-stacked aggregate) has no "
                "factor-wise pseudo-gradient: use restart=merge_and_restart(spec) (merge into "
                "the base and restart from fresh adapters), or step the server optimizer on "
                "the merged weights with jlora.optim.merged_step")

    sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P

        if axis not in mesh.shape:
            raise ValueError(f"jlora.federated.simulate: mesh has no axis {axis!r} "
                             f"(axes {tuple(mesh.shape)})")
        if m % mesh.shape[axis]:
            raise ValueError(f"jlora.federated.simulate: {m} clients per round do not divide "
                             f"over the {mesh.shape[axis]} devices of mesh axis {axis!r}")
        lead = NamedSharding(mesh, P(axis))
        data = jax.device_put(data, lead)
        if personal is not None:
            personal = jax.device_put(personal, lead)

        def sharding(tree):
            if isinstance(tree, FSLoRAUpload):  # the sketch has no specs: split over clients
                return tree._replace(tree=sharding(tree.tree), sketch=jax.tree.map(
                    lambda x: jax.lax.with_sharding_constraint(x, lead), tree.sketch))
            if specs is None:
                return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, lead), tree)
            sh = jax.tree.map(lambda s: None if s is None else NamedSharding(mesh, s),
                              client_specs(specs, axis),
                              is_leaf=lambda x: isinstance(x, P) or x is None)
            return jax.tree.map(lambda x, s: x if s is None else
                                jax.lax.with_sharding_constraint(x, s), tree, sh)

    data = jax.tree.map(jnp.asarray, data) if mesh is None else data
    if context is None and prepare is not None:
        raise ValueError("jlora.federated.simulate: prepare needs context (its result reaches "
                         "clients only through context)")
    if (context is not None or prepare is not None) and restart is not None:
        raise ValueError("jlora.federated.simulate: context/prepare feed server_opt; give "
                         "server_opt, not restart")
    fns = (local_update, aggregate, server_opt, restart, broadcast, prepare, context)
    if sharding is None:  # the same functions reuse one compiled round
        step = _ROUNDS.pop(fns, None) or jax.jit(_round_program(*fns, None))
        _ROUNDS[fns] = step
        while len(_ROUNDS) > 16:
            _ROUNDS.pop(next(iter(_ROUNDS)))
    else:
        step = jax.jit(_round_program(*fns, sharding))
    opt_state = None if server_opt is None else server_opt.init(trainable)
    state = SimState(0, trainable, frozen, personal, opt_state, np.arange(m))
    for t in range(rounds):
        k_sample, k_clients, k_server = jax.random.split(jax.random.fold_in(key, t), 3)
        if m == n_clients:
            ids = np.arange(n_clients)
        else:
            ids = np.sort(sampled_from[np.asarray(
                jax.random.choice(k_sample, len(sampled_from), (m,), replace=False))])
        p = w[ids] / w[ids].sum()
        # float64 under jax_enable_x64 (float64 factors aggregate in float64), else float32
        tr, fr, pers, opt_state = step(state.trainable, state.frozen, state.personal,
                                       state.opt_state, data, jnp.asarray(ids),
                                       jnp.asarray(p), k_clients, k_server)
        state = SimState(t + 1, tr, fr, pers, opt_state, ids)
        if callback is not None:
            callback(state)
    return state


def merge_and_restart(spec) -> Callable:
    """A ``restart`` for :func:`simulate` that runs FLoRA's rounds (Wang et al. 2024, §3).

    Returns ``(aggregate, frozen, key) -> (trainable, frozen)``: the
    aggregate's delta (e.g. :func:`flora`'s stacked, exact one) is added to
    every base with ``jlora.merge(aggregate, onto=bases)``, ``Full`` leaves take
    their aggregated value, and ``spec`` (a ``jlora.Spec``) builds fresh
    adapters on the new bases with ``key``; the new tree is split again.
    """
    from jlora import core

    def restart(agg, frozen, key):
        bases = jax.tree.map(lambda n: n.base if is_node(n) and hasattr(n, "base") else n,
                             frozen, is_leaf=is_node)
        params = core.merge(agg, onto=bases)
        return core.split(core.apply(params, spec, key=key))

    return restart


# ---------------------------------------------------------------- FSLoRA


def _sketchable(path: str, x) -> bool:
    """Whether FSLoRA sketches ``x``: a node with rank factors ``a``, ``b`` (LoRA, DoRA,
    QLoRA). Plain leaves and dense nodes (``Full``, ``TrainableTokens``) are not;
    any other adapter node is an error naming its path."""
    if isinstance(x, (LoRANode, QLoRANode)):
        return True
    if is_node(x) and not isinstance(x, _DENSE_NODES):
        raise ValueError(f"{path}: FSLoRA does not support {type(x).__name__} nodes (it "
                         "sketches the rank components of LoRA, DoRA and QLoRA adapters)")
    return False


def _fslora_map(fn, tree, *rest, other=lambda x, *r: x):
    """``fn(node, *rest_nodes)`` at every sketchable node, ``other`` elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *r: fn(x, *r) if _sketchable(path_str(kp), x) else other(x, *r),
        tree, *rest, is_leaf=_is_hole_or_node)


def _check_ratio(ratio) -> None:
    if _concrete(ratio):
        r = np.asarray(ratio, np.float64)
        if not np.all((r > 0) & (r <= 1)):  # NaN fails too
            raise ValueError(f"jlora.federated.fslora_sketch: ratio must be in (0, 1] (the "
                             f"fraction of rank components a client trains), got {r.tolist()}")


def fslora_sketch(key: jax.Array, tree: PyTree, ratio) -> PyTree:
    """FSLoRA's sketch (Fang et al. 2025, arXiv 2501.19389, §3) for every LoRA node.

    At a node of rank ``r``, ``k = max(1, round(ratio·r))`` rank components
    ``I`` are drawn uniformly without replacement and the sketch is the
    diagonal ``S = (r/k)·Σ_{j∈I} e_j e_jᵀ`` (``E[S] = I``), returned as its
    ``(r,)`` diagonal in the factors' precision (float32, float64 for float64
    factors). ``0 < ratio ≤ 1``. Each node draws from ``fold_in(key,
    crc32(path))``; seed ``key`` per client and round (``simulate`` hands
    every client its own key). ``ratio`` may be a traced per-client value (a
    static shape either way).

    Sketched nodes are those with rank factors ``a``, ``b``: LoRA, DoRA and
    QLoRA (the paper's 4-bit setup). Plain leaves, ``Full`` and
    ``TrainableTokens`` nodes get ``None`` (every client trains and sends them
    whole); any other adapter node is a ``ValueError`` naming its path.
    """
    from jlora.core import path_key

    _check_ratio(ratio)
    names, leaves, treedef = _flatten(tree)
    out = []
    for path, x in zip(names, leaves):
        if not _sketchable(path, x):
            out.append(None)
            continue
        r = x.rank
        factor = x.b if x.b is not None else x.a
        dt = jnp.float32 if factor is None else _acc(factor)
        k = jnp.clip(jnp.round(jnp.asarray(ratio, jnp.float32) * r), 1, r)
        order = jnp.argsort(jax.random.permutation(path_key(key, path), r))
        out.append(jnp.where(order < k, r / k.astype(dt), 0.0).astype(dt))
    return jax.tree_util.tree_unflatten(treedef, out)


def _sketched(node, s):
    if node.b is not None:
        return node.replace(b=(s[:, None] * node.b).astype(node.b.dtype))
    return node.replace(a=(node.a * s).astype(node.a.dtype))  # b frozen (MiCA): a·S


def fslora_apply(tree: PyTree, sketch: PyTree) -> PyTree:
    """The sketched local model: ``K0 + s·a·S·b = K0 + s·(r/k)·a[:, I]·b[I]``.

    Use it inside the client's loss (``loss(combine(fslora_apply(t, S), frozen))``)
    and differentiate with respect to the unsketched ``t``: the gradients are
    the paper's ``∇_a = s·G·(S b)ᵀ``, ``∇_b = s·(a S)ᵀ·G``, zero outside ``I``.
    ``S`` scales ``b`` (``a`` where ``b`` is frozen and absent from a trainable
    half). A DoRA node becomes DoRA on the sketched low-rank update,
    ``m ⊙ (K0 + s·a·S·b) / ‖K0 + s·a·S·b‖`` (its column norms those of the
    sketched weight); its magnitude ``m`` is a dense vector that every client
    trains and sends whole, as a head.
    """
    return _fslora_map(_sketched, tree, sketch)


def _component_mask(node, s):
    on = (s > 0).astype(jnp.float32)
    changes = {"b": on[:, None]}
    if node.a is not None:
        changes["a"] = on[None, :]
    return changes


def fslora_mask(global_tree: PyTree, client_tree: PyTree, sketch: PyTree) -> PyTree:
    """A client's upload: its values on the sketched components, the global ones elsewhere.

    ``g + (c − g)⊙m`` with ``m`` the sketch's support (columns of ``a``, rows of
    ``b``): what the paper's clients send, and exactly the global value where
    a local optimizer's weight decay touched an unsketched component. Leaves
    outside the sketch (heads, DoRA's magnitude) are the client's own.
    """

    def one(c, g, s):
        m = _component_mask(c, s)
        return c.replace(**{f: jnp.where(mk > 0, getattr(c, f), getattr(g, f))
                            for f, mk in m.items() if getattr(c, f) is not None})

    return _fslora_map(one, client_tree, global_tree, sketch)


def fslora_aggregate(global_tree: PyTree, clients: Sequence[PyTree], sketches: Sequence[PyTree],
                     weights, *, normalize: bool = False) -> PyTree:
    """FSLoRA's server step with plain averaging, per rank component.

    For component ``j`` of a sketched node (column ``j`` of ``a``, row ``j`` of
    ``b``): ``x_j ← x_j + Σ_i p_i m_ij (x_ij − x_j)``, ``m_ij = 1`` when client
    ``i``'s sketch selected ``j`` (the released code's averaging over the
    sampled clients; equal ``weights`` give its ``1/M``). ``normalize=True``
    divides by ``Σ_i p_i m_ij`` instead (each component averaged over the
    clients that trained it). Other leaves, and DoRA's magnitude, are
    averaged as in :func:`fedavg`. With a server optimizer, feed ``global −
    fslora_aggregate(...)`` to it as the pseudo-gradient
    (``simulate(..., server_opt=optax.adamw(3e-4))`` does so; the paper's code
    uses AdamW, ``optax.sgd(1.0)`` is this averaging). In :func:`simulate`
    this is ``aggregate=fslora_rule(normalize=...)`` with clients returning
    :func:`fslora_upload`.
    """
    n = len(clients)
    _weights(weights, n, "fslora_aggregate")
    if len(sketches) != n:
        raise ValueError(f"jlora.federated.fslora_aggregate: {len(sketches)} sketches for {n} "
                         "clients (one sketch per client, in the same order)")
    from jlora._validate import boolean

    boolean("jlora.federated.fslora_aggregate", "normalize", normalize)
    # each client's values on its sketch and the global ones elsewhere: then the weighted
    # mean is x_j + Σ_i p_i m_ij (x_ij − x_j), fslora_rule's average of the uploads
    uploads = [fslora_upload(global_tree, c, s) for c, s in zip(clients, sketches)]
    return _FSLORA_RULES[normalize](uploads, weights)


class FSLoRAUpload(NamedTuple):
    """One client's FSLoRA upload for :func:`simulate`: :func:`fslora_upload`'s result."""

    tree: PyTree  #: :func:`fslora_mask`'s masked tree (the global values off the sketch)
    sketch: PyTree  #: the sketch the client trained under (:func:`fslora_sketch`)


def fslora_upload(global_tree: PyTree, client_tree: PyTree, sketch: PyTree) -> FSLoRAUpload:
    """What an FSLoRA client returns from ``simulate``'s ``local_update``.

    ``FSLoRAUpload(fslora_mask(global_tree, client_tree, sketch), sketch)``:
    the masked tree and the sketch, so that :func:`fslora_rule` can average
    each rank component over the clients that trained it.
    """
    return FSLoRAUpload(fslora_mask(global_tree, client_tree, sketch), sketch)


def _fslora_rule(normalize: bool) -> Callable:
    who = "fslora_rule"

    def aggregate(uploads: Sequence[FSLoRAUpload], weights) -> PyTree:
        if (isinstance(uploads, dict) or not isinstance(uploads, Sequence) or not uploads
                or not all(isinstance(u, FSLoRAUpload) for u in uploads)):
            kinds = sorted({type(u).__name__ for u in uploads}) if isinstance(
                uploads, Sequence) else [type(uploads).__name__]
            raise ValueError(f"jlora.federated.{who}: each client's upload must be an "
                             f"FSLoRAUpload (return fslora_upload(start, trained, sketch) from "
                             f"local_update), got {kinds}")
        trees, sketches = [u.tree for u in uploads], [u.sketch for u in uploads]
        # off its sketch an upload holds the global value, so the plain weighted mean is
        # x_j + Σ_i p_i m_ij (x_ij − x_j): fslora_aggregate without normalize
        mean = fedavg(trees, weights)
        if not normalize:
            return mean
        n = len(trees)
        p = _weights(weights, n, who)

        def one(r, *cs_and_ss):
            cs, ss = cs_and_ss[:n], cs_and_ss[n:]
            masks = [_component_mask(c, s) for c, s in zip(cs, ss)]
            changes = {}
            for f in ("a", "b"):
                if getattr(r, f) is None:
                    continue
                acc = _acc(getattr(r, f))
                den = sum(p[i].astype(acc) * masks[i][f] for i in range(n))
                num = sum(p[i].astype(acc) * masks[i][f] * getattr(c, f).astype(acc)
                          for i, c in enumerate(cs))
                # Σ_i p_i m_ij x_ij / Σ_i p_i m_ij; a component no client trained keeps
                # the global value, which every upload holds there
                val = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), getattr(r, f))
                changes[f] = val.astype(getattr(r, f).dtype)
            return r.replace(**changes)

        return _fslora_map(one, mean, *trees, *sketches, other=lambda r, *_: r)

    aggregate.__name__ = aggregate.__qualname__ = f"fslora_rule(normalize={normalize})"
    return aggregate


_FSLORA_RULES = {flag: _fslora_rule(flag) for flag in (False, True)}


def fslora_rule(*, normalize: bool = False) -> Callable:
    """FSLoRA's server averaging as a :func:`simulate` ``aggregate``.

    Clients return :func:`fslora_upload` (their masked tree and their sketch);
    the aggregate is :func:`fslora_aggregate` of the round's start, the
    clients and their sketches: component ``j`` (column ``j`` of ``a``, row
    ``j`` of ``b``) becomes ``x_j + Σ_i p_i m_ij (x_ij − x_j)``, or with
    ``normalize=True`` ``x_j + Σ_i p_i m_ij (x_ij − x_j) / Σ_i p_i m_ij`` (the
    weighted mean over the clients that trained ``j``; ``x_j`` where none
    did). Heads and DoRA's magnitude are averaged as in :func:`fedavg`. With
    ``server_opt`` the server steps on ``trainable − aggregate``.

    The same ``normalize`` gives the same function, so repeated ``simulate``
    calls reuse one compiled round::

        def local_update(start, frozen, data, key):
            sketch = fl.fslora_sketch(key, start, ratio)
            trained = train(start, frozen, data, view=lambda t: fl.fslora_apply(t, sketch))
            return fl.fslora_upload(start, trained, sketch)

        fl.simulate(local_update, t0, frozen, data, rounds=..., key=key,
                    aggregate=fl.fslora_rule(normalize=True))
    """
    from jlora._validate import boolean

    return _FSLORA_RULES[boolean("jlora.federated.fslora_rule", "normalize", normalize)]


# ---------------------------------------------------------------- FeDLRT


def fedlrt_augment(u: jax.Array, v: jax.Array, grad_u: jax.Array, grad_v: jax.Array,
                   rank=None):
    """FeDLRT's basis augmentation (Schotthöfer & Laiu 2024, arXiv 2406.17887, Alg. 1).

    ``Ū = [U | Ũ]``, ``Ũ = orth((I − U Uᵀ) G_U)`` (QR), the same for ``V̄``, where
    ``G_U = ∇_U L``, ``G_V = ∇_V L`` are the clients' averaged basis gradients
    of ``W = U S Vᵀ``. With ``S̃ = [[S, 0], [0, 0]]``, ``Ū S̃ V̄ᵀ = U S Vᵀ``.
    Shapes are static: ``U (n, r_max)`` may carry zero columns past ``rank``;
    the new columns past ``rank`` are zeroed too, so they stay inert.

    ``G_U = ∇_W L·V·Sᵀ`` and ``G_V = ∇_W Lᵀ·U·S`` vanish with ``S``: from
    ``S = 0`` (or a singular ``S``) the new columns do not follow the data.
    Start from an invertible ``S`` (DLRT starts from a random ``U S Vᵀ``; a
    small ``S = εI`` keeps the model near ``K0``), or pass the K- and L-step
    gradients ``∇_W L·V`` and ``∇_W Lᵀ·U`` instead, which span the same
    columns when ``S`` is invertible.
    """

    def aug(b, g):
        proj = g - b @ (b.T @ g)
        q, _ = jnp.linalg.qr(proj)
        q = q - b @ (b.T @ q)  # re-orthogonalise against the old basis (rounding)
        q, _ = jnp.linalg.qr(q)
        if rank is not None:
            q = q * (jnp.arange(q.shape[1]) < rank)
        return jnp.concatenate([b, q], axis=1)

    return aug(u, grad_u), aug(v, grad_v)


def fedlrt_augment_coefficients(s: jax.Array) -> jax.Array:
    """``S̃ = [[S, 0], [0, 0]]`` of twice the size."""
    r = s.shape[0]
    return jnp.zeros((2 * r, 2 * r), s.dtype).at[:r, :r].set(s)


def fedlrt_truncate(s: jax.Array, u: jax.Array, v: jax.Array, *, tol: float, max_rank: int):
    """FeDLRT's truncation: SVD ``S̃* = P Σ Qᵀ``, keep the smallest ``r₁`` with tail ≤ ϑ.

    ``r₁`` is the smallest rank with ``‖(σ_{r₁+1}, …)‖₂ ≤ ϑ = tol·‖σ‖₂``
    (``tol ≥ 0``), capped at ``max_rank`` (and at least 1); ``U ← Ū P[:, :r₁]``,
    ``V ← V̄ Q[:, :r₁]``, ``S ← diag(σ[:r₁])``. Returns ``(U, S, V, r₁)``
    padded with zeros to ``max_rank`` columns (static shapes under ``jit``),
    also where ``max_rank`` exceeds the size of ``S̃``.
    """
    from jlora._validate import positive_int

    max_rank = positive_int("jlora.federated.fedlrt_truncate", "max_rank", max_rank)
    if _concrete(tol):
        t = np.asarray(tol, np.float64)
        if t.shape != () or not (np.isfinite(t) and t >= 0):
            raise ValueError(f"jlora.federated.fedlrt_truncate: tol must be a finite number "
                             f">= 0, got {tol!r}")
    p, sig, qt = jnp.linalg.svd(s)
    tails = jnp.sqrt(jnp.cumsum((sig ** 2)[::-1])[::-1])  # tails[j] = ‖σ[j:]‖
    tails = jnp.concatenate([tails, jnp.zeros(1, tails.dtype)])
    ok = tails <= tol * jnp.sqrt(jnp.sum(sig ** 2))
    r1 = jnp.clip(jnp.argmax(ok), 1, max_rank)
    extra = max(0, max_rank - sig.shape[0])  # components past S̃'s size: zero
    p = jnp.pad(p, ((0, 0), (0, extra)))[:, :max_rank]
    q = jnp.pad(qt.T, ((0, 0), (0, extra)))[:, :max_rank]
    sig = jnp.pad(sig, (0, extra))[:max_rank]
    keep = (jnp.arange(max_rank) < r1).astype(s.dtype)
    return (u @ p) * keep, jnp.diag(sig * keep), (v @ q) * keep, r1


def fedlrt_correction(grads: PyTree, weights) -> PyTree:
    """FeDLRT's variance correction ``V_c = Σ_j p_j g_j − g_c`` (stacked ``(K, ...)`` grads).

    ``g_c = ∇_S̃ L_c`` at the round's common start; clients then step
    ``S̃ ← S̃ − λ(∇_S̃ L_c(S̃) + V_c)``, so the first local step follows the
    global gradient.
    """
    leaves = jax.tree.leaves(grads)
    p = _weights(weights, leaves[0].shape[0], "fedlrt_correction")
    return jax.tree.map(lambda g: jnp.tensordot(p, g, axes=1)[None] - g, grads)


# ---------------------------------------------------------------- personalized clients


def pf2lora_client(loss: Callable, *, personal_steps: int = 1, personal_lr: float = 1e-2,
                   shared_opt: optax.GradientTransformation, paths=None):
    """PF2LoRA's client update (Hao et al. 2025, Alg. 1) as a first-order bilevel step.

    The paper's bilevel problem: ``min_{a,b} Σ_k p_k f_k(a, b, c_k*(a,b), d_k*(a,b))``
    with ``(c_k*, d_k*) = argmin_{c,d} f_k(a, b, c, d)``; its algorithm runs SGD on
    the lower level and AdamW on the upper. jlora's step is the first-order
    approximation (the second-order terms of the hypergradient dropped):
    ``personal_steps`` SGD steps on the personal partition at fixed shared
    factors, then one ``shared_opt`` step on the shared partition at the updated
    personal point. The partition is :func:`personal` / :func:`shared` (with
    ``paths`` for whole personal leaves such as a head).

    Returns ``(init, step)``: ``init(trainable) -> opt_state`` and
    ``step(trainable, opt_state, *args) -> (trainable, opt_state, loss)`` with
    ``loss(trainable, *args) -> scalar``; both pure and jit-friendly.
    """
    from jlora._validate import positive_int, real

    positive_int("jlora.federated.pf2lora_client", "personal_steps", personal_steps)
    real("jlora.federated.pf2lora_client", "personal_lr", personal_lr, gt=0.0)

    def init(trainable):
        return shared_opt.init(shared(trainable, paths=paths))

    def step(trainable, opt_state, *args):
        sh, pe = shared(trainable, paths=paths), personal(trainable, paths=paths)
        for _ in range(personal_steps):
            g = jax.grad(lambda q: loss(combine(sh, q), *args))(pe)
            pe = jax.tree.map(lambda x, gx: x - personal_lr * gx, pe, g)
        value, g = jax.value_and_grad(lambda q: loss(combine(q, pe), *args))(sh)
        upd, opt_state = shared_opt.update(g, opt_state, sh)
        return combine(optax.apply_updates(sh, upd), pe), opt_state, value

    return init, step


def pfedlora_phase(trainable: PyTree, phase: str, *, paths) -> tuple[PyTree, PyTree]:
    """pFedLoRA's alternating phases (Yi et al. 2023, arXiv 2310.13283) as a partition.

    ``phase="personal"`` returns ``(train, hold) = (personal(t), shared(t))``:
    train the client's personal block (its own LoRA and head, named by
    ``paths``) with the shared adapter frozen; ``phase="shared"`` swaps them.
    Train ``train`` with any optimizer, ``combine(train, hold)`` after; only
    ``shared(t)`` is uploaded and averaged (:func:`fedavg`).
    """
    from jlora._validate import choice

    choice("jlora.federated.pfedlora_phase", "phase", phase, ("personal", "shared"))
    sh, pe = shared(trainable, paths=paths), personal(trainable, paths=paths)
    return (pe, sh) if phase == "personal" else (sh, pe)


def feddpa_weight(emb: jax.Array, reference: jax.Array, *, beta: float = 0.5) -> jax.Array:
    """FedDPA's instance-wise weight ``w(x) = β·(1/N)·Σ_j cos(e(x), e(x_j))``.

    ``emb (B, D)``: the test inputs' embeddings; ``reference (N, D)``: those of
    N of the client's training instances (the official code embeds both with
    the base model plus the local adapter, N = 5, β = 0.5); ``β > 0``. Returns
    ``(B,)`` in ``[−β, β]``. The official code multiplies the *global* adapter
    by ``w(x)``; pass ``branch=`` to :func:`feddpa_set_weight` to choose.
    """
    from jlora._validate import real_or_traced

    real_or_traced("jlora.federated.feddpa_weight", "beta", beta, gt=0.0)
    unit = lambda e: e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return beta * jnp.mean(unit(emb) @ unit(reference).T, axis=-1)


def feddpa_set_weight(tree: PyTree, weight, *, branch: str = "global") -> PyTree:
    """Set every FedDPA node's mixing weight: ``w`` on the global branch (``1 − w`` on the
    local one) with ``branch="global"``, the reverse with ``branch="local"``.

    ``weight`` is a scalar in ``[0, 1]`` (training phases: 0.5 local phase, 1.0
    global phase) or ``(B,)`` finite per-example weights from
    :func:`feddpa_weight`; it is stored in each node's weight dtype (the
    factors'). The weight is frozen: set it on a full tree or on the frozen
    half of ``jlora.split``; a trainable half has no weight (a ``ValueError``
    naming the path), so the weight never becomes a trained, uploaded leaf.
    """
    from jlora._validate import choice
    from jlora.methods.feddpa import FedDPANode

    who = "jlora.federated.feddpa_set_weight"
    choice(who, "branch", branch, ("global", "local"))
    if _concrete(weight):
        v = np.asarray(weight, np.float64)
        if v.ndim > 1 or not np.all(np.isfinite(v)):
            raise ValueError(f"{who}: weight must be a finite scalar or (B,) per-example "
                             f"weights, got shape {v.shape} with values {v.ravel()[:4].tolist()}")
        if v.ndim == 0 and not 0.0 <= v <= 1.0:
            raise ValueError(f"{who}: a scalar weight must be in [0, 1] (the global branch's "
                             f"share), got {float(v)}")
    w = jnp.asarray(weight)

    def one(path, n):
        if not isinstance(n, FedDPANode):
            return n
        if n.weight is None:
            raise ValueError(f"{path}: a jlora.split trainable half has no FedDPA weight; set it "
                             f"on the frozen half or on the combined tree ({who})")
        wn = w.astype(jnp.result_type(n.weight))
        return n.replace(weight=wn if branch == "global" else 1 - wn)

    return jax.tree_util.tree_map_with_path(lambda kp, n: one(path_str(kp), n), tree,
                                            is_leaf=_is_hole_or_node)
