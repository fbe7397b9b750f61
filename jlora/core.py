"""The pure transforms: ``apply``, ``split``, ``combine``, ``merge``, ``unmerge``, ``summary``."""

from __future__ import annotations

import math
import zlib
from dataclasses import fields
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.methods.full import FullNode
from jlora.spec import Spec
from jlora.tree import is_node, leaves_with_paths, map_nodes, map_with_paths

PyTree = Any


def path_key(key: jax.Array, path: str) -> jax.Array:
    """A per-leaf key that depends on the path only (stable when rules change)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def apply(params: PyTree, spec: Spec, *, key: jax.Array) -> PyTree:
    """Adapt every leaf of ``params`` that a rule of ``spec`` matches.

    Returns a new tree of the same structure in which each targeted leaf is an
    adapter node (for LoRA: fields ``base``, ``a`` of shape ``(fan_in, rank)``,
    ``b`` of shape ``(rank, fan_out)``). ``params`` itself is never modified.
    Works on Linen ``variables["params"]``, an ``nnx.State`` and any nest of
    arrays. Each leaf's random init uses ``fold_in(key, crc32(path))``, so
    adding a rule does not reshuffle the other leaves' inits.

    Raises:
      ValueError: a rule that selects no leaf, a rank above
        ``min(fan_in, fan_out)``, a non-floating target, an already adapted leaf.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"attn": {"query": {"kernel": jnp.ones((8, 8))}}}
        >>> spec = jlora.Spec({"**/query/kernel": jlora.LoRA(rank=2)})
        >>> adapted = jlora.apply(params, spec, key=jax.random.key(0))
        >>> type(adapted["attn"]["query"]["kernel"]).__name__
        'LoRANode'
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"jlora.apply: spec must be a jlora.Spec, got {type(spec).__name__}")
    leaves = leaves_with_paths(params)
    winners: dict[int, int] = {}
    touched = [0] * len(spec.rules)
    for path, leaf in leaves:
        hits = [i for i, rule in enumerate(spec.rules) if rule.matches(path)]
        for i in hits:
            touched[i] += 1
        if hits:
            winners[hits[0]] = winners.get(hits[0], 0) + 1
            if is_node(leaf):
                raise ValueError(f"{path}: already adapted ({leaf.method}); apply a spec once")
    for i, rule in enumerate(spec.rules):
        if not touched[i]:
            raise ValueError(
                f"Spec pattern {rule.describe(rule.pattern)} matches no leaf; "
                f"paths look like {[p for p, _ in leaves[:3]]}"
            )
        if not winners.get(i):
            raise ValueError(
                f"Spec pattern {rule.describe(rule.pattern)} only matches leaves "
                "that an earlier rule already claims (first match wins)"
            )

    # Some methods adapt a layer, not one leaf (GLoRA also rewrites the bias):
    # their config names the sibling leaf it builds a companion node for.
    by_path = dict(leaves)
    companions = {}
    for path, leaf in leaves:
        config = spec.match(path)
        sibling = getattr(config, "companion", lambda p: None)(path)
        if sibling is None:
            continue
        if sibling in by_path and spec.match(sibling) is not None:
            raise ValueError(f"{sibling}: adapted by the {type(config).__name__} rule of {path} "
                             "and also matched by a rule of its own")
        node = config.build_companion(path_key(key, sibling), by_path.get(sibling), leaf,
                                      path=sibling)
        if node is not None:
            companions[sibling] = node

    def adapt(path: str, leaf):
        if path in companions:
            return companions[path]
        config = spec.match(path)
        if config is None:
            return leaf
        if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            raise ValueError(f"{path}: not an array leaf ({type(leaf).__name__})")
        return config.build(path_key(key, path), jnp.asarray(leaf), path=path)

    return map_with_paths(adapt, params)


def _none_fields(node, keep: bool):
    """The node with its trainable fields (keep=False) or the others (True) set to None."""
    train = set(node.trainable)
    changes = {
        f.name: None
        for f in fields(node)
        if f.metadata.get("pytree_node", True) and ((f.name in train) != keep)
    }
    return node.replace(**changes)


def split(adapted: PyTree) -> tuple[PyTree, PyTree]:
    """Partition into ``(trainable, frozen)``: two trees with ``None`` holes.

    ``trainable`` holds only the fields each method trains (LoRA: ``a``, ``b``;
    LoRA-FA: ``b``; ``Full``: the leaf); everything else is in ``frozen``. Take
    gradients and build optimizer state from ``trainable`` alone, so no
    full-size gradient or moment ever exists for a frozen weight.

    Example::

        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
        >>> adapted = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> trainable, frozen = jlora.split(adapted)
        >>> [x.shape for x in jax.tree.leaves(trainable)]
        [(4, 2), (2, 4)]
    """
    trainable = jax.tree.map(
        lambda x: _none_fields(x, keep=True) if is_node(x) else None, adapted, is_leaf=is_node
    )
    frozen = jax.tree.map(
        lambda x: _none_fields(x, keep=False) if is_node(x) else x, adapted, is_leaf=is_node
    )
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`split`: fill each ``None`` hole from the other tree."""
    try:
        return jax.tree.map(
            lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
        )
    except ValueError as e:
        raise ValueError(
            "jlora.combine: trainable and frozen trees do not have the same structure "
            f"(were they split from the same adapted tree?): {e}"
        ) from None


def merge(adapted: PyTree, *, onto: PyTree | None = None) -> PyTree:
    """Fold every adapter into a plain array: ``W = W0 + s·a·b`` for LoRA.

    Pure and jit-friendly (inside a jitted loss it is the generic compute path
    for any model). With ``onto=params``, each adapter's delta is added to the
    leaf of ``params`` at the same path instead of to the node's own base; this
    is how a served, already merged model switches tasks together with
    :func:`unmerge`. ``Full`` leaves take their trained value either way.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
        >>> adapted = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> bool(jnp.allclose(jlora.merge(adapted)["w"]["kernel"], 1.0))  # b = 0 at init
        True
    """
    if onto is None:
        return map_nodes(lambda n: n.materialize(), adapted)

    def add(node, leaf):
        if not is_node(node):
            return leaf
        if isinstance(node, FullNode):
            return node.value
        return (leaf.astype(jnp.float32) + node.delta()).astype(leaf.dtype)

    return _zip_nodes(add, adapted, onto, "merge")


def unmerge(params: PyTree, adapted: PyTree) -> PyTree:
    """Remove each adapter's delta from merged ``params`` (task switching).

    ``unmerge(merge(adapted), adapted)`` gives back the original weights (up to
    float rounding); ``merge(adapter2, onto=unmerge(served, adapter1))``
    switches a served model from task 1 to task 2 without keeping a second
    copy of the base. ``Full`` leaves have no original to go back to and are
    left as they are.
    """

    def sub(node, leaf):
        if not is_node(node) or isinstance(node, FullNode):
            return leaf
        return (leaf.astype(jnp.float32) - node.delta()).astype(leaf.dtype)

    return _zip_nodes(sub, adapted, params, "unmerge")


def _zip_nodes(fn, adapted, params, what):
    adapted_leaves = dict(leaves_with_paths(adapted))
    missing = [p for p, x in adapted_leaves.items() if is_node(x)]
    out = map_with_paths(lambda path, leaf: fn(adapted_leaves.get(path), leaf), params)
    present = {p for p, _ in leaves_with_paths(params)}
    missing = [p for p in missing if p not in present]
    if missing:
        raise ValueError(f"jlora.{what}: params have no leaf at adapted path(s) {missing[:5]}")
    return out


def _size(x) -> int:
    return int(np.prod(x.shape)) if hasattr(x, "shape") else 0


def summary(adapted: PyTree) -> str:
    """A table of adapted paths: method, shape, rank, trainable count and share.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}, "b": jnp.zeros(4)}
        >>> adapted = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> print(jlora.summary(adapted).splitlines()[-1])
        trainable 16 of 36 parameters (44.44%)
    """
    rows, trainable_total, total = [], 0, 0
    for path, leaf in leaves_with_paths(adapted):
        if is_node(leaf):
            n_train = leaf.trainable_size()
            n_base = math.prod(leaf.shape)
            trainable_total += n_train
            # Parameters a model holds: the base plus whatever the adapter adds.
            extra = 0 if isinstance(leaf, FullNode) else n_train
            total += n_base + extra
            rank = "-" if leaf.rank is None else str(leaf.rank)
            rows.append((path, leaf.method, "x".join(map(str, leaf.shape)), rank,
                         f"{n_train:,}"))
        else:
            total += _size(leaf)
    header = ("path", "method", "shape", "rank", "trainable")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    share = 100.0 * trainable_total / total if total else 0.0
    lines.append(f"trainable {trainable_total:,} of {total:,} parameters ({share:.2f}%)")
    return "\n".join(lines)


def count_trainable(tree: PyTree) -> int:
    """Number of trainable parameters in an adapted tree (or its ``split`` trainable half)."""
    return sum(leaf.trainable_size() for _, leaf in leaves_with_paths(tree) if is_node(leaf))
