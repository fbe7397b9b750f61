"""Paths, traversal and the shared vocabulary of param pytrees.

A *path* is a leaf's keys joined by ``/``: ``encoder/layers_3/attn/query/kernel``.
Dict keys, list indices and attribute names render as themselves; the ``value``
attribute that ``nnx.Variable`` wraps around an array is dropped, so an NNX
``fc1/kernel`` reads the same as the Linen one.

This module is also the one home of the type aliases (``PyTree``, ``Array``),
of the per-path PRNG key (:func:`path_key`), of the parent-path helper
(:func:`parent`) and of the sharding roles (:class:`Role`) that adapter node
classes give their array fields.

    >>> from jlora.tree import parent, Role
    >>> parent("enc/q/kernel"), parent("kernel")
    ('enc/q', '')
    >>> Role("in_rank") is Role.IN_RANK
    True
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Mapping
from typing import Any, Callable

import jax

PyTree = Any
Array = jax.Array

# Attribute keys that only unwrap a container (nnx.Variable and friends) and are
# not part of the name a user sees.
_WRAPPER_ATTRS = frozenset({"value", "raw_value"})


class Role(str, enum.Enum):
    """How an adapter node's array field is laid out relative to its base weight.

    ``jlora.sharding`` derives each field's ``PartitionSpec`` from its base's
    spec by role; a node class maps every array field to one role in
    ``field_axes`` and an unknown role fails when the class is defined.
    """

    BASE = "base"              # the base's own axes
    IN_RANK = "in_rank"        # (fan_in, r): input axes, then a replicated rank axis
    RANK_OUT = "rank_out"      # (r, fan_out)
    OUT = "out"                # (fan_out,): a vector over the output features
    IN = "in"                  # (fan_in,)
    REPLICATED = "replicated"  # small arrays every device holds whole
    KERNEL = "kernel"          # a bias node's frozen copy of its sibling kernel (in, out)
    QUANTIZED = "quantized"    # a quantized base (a pytree of codes and scales), replicated

    def __str__(self) -> str:
        return self.value


class NodeBase:
    """Marker base of every adapter node (``jlora.methods.base.AdapterNode``).

    Lets traversals tell adapter nodes from plain leaves without importing
    the methods.
    """

    __slots__ = ()


def is_node(x: Any) -> bool:
    """True for an adapter node (a leaf as far as jlora's traversals go)."""
    return isinstance(x, NodeBase)


def path_key(key: Array, path: str) -> Array:
    """A PRNG key for ``path`` that depends on the path only: ``fold_in(key, crc32(path))``.

    Adding or removing a rule never reshuffles the other leaves' random draws.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def parent(path: str) -> str:
    """The module path holding a leaf: ``"enc/q/kernel"`` -> ``"enc/q"``; a root leaf -> ``""``."""
    return path.rpartition("/")[0]


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


def map_nodes(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every adapter node, leaving other leaves as they are."""
    return jax.tree.map(lambda x: fn(x) if is_node(x) else x, tree, is_leaf=is_node)


def half_error(what: str, path: str, half: str) -> ValueError:
    """The error for a node from one half of ``jlora.split`` where a whole node is needed."""
    return ValueError(f"{what}: {path or '<root>'} is a node of the {half} half from jlora.split; "
                      "combine the halves first: jlora.combine(trainable, frozen)")


def require_whole(tree: Any, what: str, *, allow_trainable: bool = False) -> None:
    """A ``ValueError`` if ``tree`` holds a node from one half of ``jlora.split``.

    ``merge``, ``summary`` and ``sharding.specs`` need whole nodes (base and
    factors); ``merge(onto=...)`` and ``unmerge`` only need each node's delta,
    which a trainable half may hold (``allow_trainable``). The error names the
    first offending node's path.
    """
    for path, x in leaves_with_paths(tree):
        half = x.half() if is_node(x) else None
        if half is not None and not (allow_trainable and half == "trainable"):
            raise half_error(what, path, half)
        if half == "trainable" and any(getattr(x, f, None) is None for f in x.delta_fields):
            missing = [f for f in x.delta_fields if getattr(x, f, None) is None]
            raise ValueError(f"{what}: {path or '<root>'} is a node of the trainable half from "
                             f"jlora.split, and its delta also needs the frozen {missing}; "
                             "combine the halves first: jlora.combine(trainable, frozen)")


# ---------------------------------------------------------------- module-level nodes

#: separator of a module-level adapter's key: ``mlp@adaptformer`` sits beside ``mlp``
MODULE_SEP = "@"


def is_module_node(x: Any) -> bool:
    """True for a module-level adapter node (``jlora.methods.ModuleNode``)."""
    return is_node(x) and getattr(x, "level", "leaf") == "module"


def module_node_key(module_path: str, method: str) -> str:
    """The key a module-level node has in its module's parent: ``"mlp@adaptformer"``.

        >>> module_node_key("enc/layers_1/mlp", "AdaptFormer")
        'mlp@adaptformer'
    """
    return f"{module_path.rpartition('/')[2]}{MODULE_SEP}{method.lower()}"


def module_node_path(module_path: str, method: str) -> str:
    """Path of the node adapting ``module_path``: ``"enc/mlp"`` -> ``"enc/mlp@adaptformer"``."""
    head = parent(module_path)
    key = module_node_key(module_path, method)
    return f"{head}/{key}" if head else key


def module_paths(tree: Any) -> list[str]:
    """Every module (subtree) path of ``tree`` in traversal order, the root ``""`` first.

    Module paths are the proper prefixes of leaf paths; adapter nodes are leaves.

        >>> module_paths({"enc": {"mlp": {"fc1": {"kernel": 0}}}})
        ['', 'enc', 'enc/mlp', 'enc/mlp/fc1']
    """
    seen = {"": None}
    for path, _ in leaves_with_paths(tree):
        parts = path.split("/")
        for i in range(1, len(parts)):
            seen.setdefault("/".join(parts[:i]), None)
    return list(seen)


def subtree(tree: Any, path: str) -> Any:
    """The subtree at ``path`` (mappings by key, lists and tuples by index); ``KeyError`` if none."""
    node = tree
    for seg in path.split("/") if path else ():
        if isinstance(node, Mapping):
            if seg in node:
                node = node[seg]
            elif seg.isdigit() and int(seg) in node:
                node = node[int(seg)]
            else:
                raise KeyError(path)
        elif isinstance(node, (list, tuple)) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        else:
            raise KeyError(path)
    return node


def _like(container: Any, items: dict) -> Any:
    """A mapping of ``container``'s type holding ``items`` (dict, FrozenDict, nnx.State, ...)."""
    return dict(items) if type(container) is dict else type(container)(items)


def rebuild_mappings(tree: Any, fn: Callable[[str, dict], dict], path: str = "") -> Any:
    """Rebuild ``tree`` bottom-up, letting ``fn(path, items) -> items`` edit every mapping.

    Mappings keep their type; lists and tuples are walked; anything else
    (arrays, adapter nodes, ``nnx.Variable``) is kept as is. This is how
    module-level nodes are inserted beside, and removed from, their modules.
    """
    join = lambda k: f"{path}/{k}" if path else str(k)
    if is_node(tree):
        return tree
    if isinstance(tree, Mapping):
        items = {k: rebuild_mappings(v, fn, join(k)) for k, v in tree.items()}
        return _like(tree, fn(path, items))
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(rebuild_mappings(v, fn, join(i)) for i, v in enumerate(tree))
    return tree


def module_nodes(tree: Any) -> dict[str, Any]:
    """``{node path: node}`` of every module-level node in ``tree``."""
    return {p: x for p, x in leaves_with_paths(tree) if is_module_node(x)}


def without_module_nodes(tree: Any) -> Any:
    """``tree`` with every module-level node removed (the plain params a model reads)."""
    return rebuild_mappings(tree, lambda _, items: {k: v for k, v in items.items()
                                                     if not is_module_node(v)})


def replace_subtrees(tree: Any, new: dict[str, Any]) -> Any:
    """``tree`` with the subtree at each path of ``new`` replaced (``""``: the whole tree)."""
    if "" in new:
        return new[""]

    def fn(path, items):
        for k in list(items):
            sub = f"{path}/{k}" if path else str(k)
            if sub in new:
                items[k] = new[sub]
        return items

    return rebuild_mappings(tree, fn)
