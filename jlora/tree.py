"""Paths and traversal over param pytrees (Linen dicts, ``nnx.State``, plain nests).

A *path* is a leaf's keys joined by ``/``: ``encoder/layers_3/attn/query/kernel``.
Dict keys, list indices and attribute names render as themselves; the ``value``
attribute that ``nnx.Variable`` wraps around an array is dropped, so an NNX
``fc1/kernel`` reads the same as the Linen one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jlora.methods.base import AdapterNode

# Attribute keys that only unwrap a container (nnx.Variable and friends) and are
# not part of the name a user sees.
_WRAPPER_ATTRS = frozenset({"value", "raw_value"})


def is_node(x: Any) -> bool:
    """True for an adapter node (a leaf as far as jlora's traversals go)."""
    return isinstance(x, AdapterNode)


def _key_str(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name in _WRAPPER_ATTRS else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: tuple) -> str:
    """Render a JAX key path as jlora's ``/``-joined path."""
    parts = (_key_str(k) for k in keypath)
    return "/".join(p for p in parts if p is not None)


def leaves_with_paths(tree: Any, *, is_leaf: Callable[[Any], bool] | None = None
                      ) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` in traversal order; adapter nodes (and ``is_leaf`` hits) are leaves."""
    stop = is_node if is_leaf is None else (lambda x: is_node(x) or is_leaf(x))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
    """``tree_map`` whose function also gets the jlora path; nodes are leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *r: fn(path_str(kp), x, *r), tree, *rest, is_leaf=is_node
    )


def map_nodes(fn: Callable[[AdapterNode], Any], tree: Any) -> Any:
    """Apply ``fn`` to every adapter node, leaving other leaves as they are."""
    return jax.tree.map(lambda x: fn(x) if is_node(x) else x, tree, is_leaf=is_node)
