"""Flax NNX helpers.

``jlora.apply`` works directly on the ``nnx.State`` that ``nnx.split`` returns
(paths read ``fc1/kernel``, without the Variable's ``value``), and the generic
compute path rebuilds a plain model from merged weights inside your jitted loss.
Module-level adapters (``jlora.AdaptFormer``) are not weights: ``merge`` refuses
the unmergeable ones and :func:`apply` runs them around their modules.

Orientation: NNX has no ``resolve``, so a config without ``in_axes`` adapts each
kernel in the default orientation, all axes but the last as input. That is the
layer's own for ``nnx.Linear`` ``(in, out)``, ``nnx.Conv`` ``(window..., in,
out)`` and ``nnx.Embed`` ``(vocab, features)``, but not for
``nnx.LinearGeneral`` with several ``out_features`` (kernel ``(4, 2, 3)``
contracts ``(0,)``, not ``(0, 1)``) nor for an ``nnx.Einsum`` whose contracted
kernel letters are not exactly all but the last (``"btd,ndh->btnh"`` contracts
``(1,)``). Give those configs ``in_axes`` yourself: the adapter otherwise still
trains, but as a low-rank update of another matrix than the layer's map.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> graphdef, state = nnx.split(model)
    >>> adapted = jlora.apply(state, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
    ...                       key=jax.random.key(1))
    >>> y = jlora.nnx.merge(graphdef, adapted)(jnp.ones((1, 4)))
    >>> y.shape
    (1, 3)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jlora.core import merge as _merge_tree
from jlora.core import module_params_applied
from jlora.methods.stacked import bind_adapter_ids
from jlora.tree import (is_node, leaves_with_paths, map_with_paths, module_nodes, path_key,
                        without_module_nodes)


def merge(graphdef: Any, adapted: Any, *rest: Any) -> nnx.Module:
    """``nnx.merge(graphdef, jlora.merge(adapted), *rest)``: a working plain module."""
    return nnx.merge(graphdef, _merge_tree(adapted), *rest)


def apply(graphdef: Any, adapted: Any, *args, adapter_ids: Any = None,
          context: dict | None = None, dropout_key: Any = None, **kwargs) -> Any:
    """Run an NNX model on adapted state, ``Linear`` and ``Embed`` adapters factorized.

    ``nnx.merge(graphdef, adapted)(*args, **kwargs)`` where each ``nnx.Linear``
    / ``nnx.Embed`` whose kernel is an adapter node computes ``node.dot(x, op)``
    with ``op`` the layer's own map (its ``dtype``, ``precision``,
    ``dot_general`` and ``preferred_element_type``); other layers, and a call
    given ``out_sharding``, use merged weights. With a tree from
    ``jlora.compose.stack``, ``adapter_ids`` gives each example its adapter
    (``-1``: the base alone), as in ``jlora.linen.apply``. ``dropout_key``
    enables adapter dropout (``LoRA(dropout=...)``) on each ``nnx.Linear``
    branch, with key ``path_key(dropout_key, path)`` as in ``jlora.linen.apply``
    (never on ``nnx.Embed`` ids); ``None`` at eval.

    Module-level adapters (``jlora.AdaptFormer``, beside their module as
    ``"mlp@adaptformer"``) run as in ``jlora.linen.apply``: the module's state is
    rewritten by the node's ``module_params`` and its ``__call__`` is wrapped by
    the node's ``intercept`` (given ``dropout_key`` and ``**context``).

        >>> import jax, jax.numpy as jnp, jlora
        >>> from flax import nnx
        >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> trees = [jlora.apply(state, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
        ...                      key=jax.random.key(i)) for i in range(2)]
        >>> y = jlora.nnx.apply(graphdef, jlora.compose.stack(trees), jnp.ones((3, 4)),
        ...                     adapter_ids=jnp.array([0, 1, -1]))
        >>> y.shape
        (3, 3)
    """
    around: dict[str, list] = {}  # module path -> [(node path, node)], applied in that order
    for npath, node in sorted(module_nodes(adapted).items()):
        around.setdefault(node.path, []).append((npath, node))
    adapted = without_module_nodes(adapted)
    nodes = {p: n for p, n in leaves_with_paths(adapted) if is_node(n)}
    stacked = bind_adapter_ids(nodes, adapter_ids)
    plain = _merge_tree(map_with_paths(lambda p, x: x.base if p in stacked else x, adapted))
    module = nnx.merge(graphdef, module_params_applied(plain, [e for v in around.values() for e in v]))
    hits = set()
    for path, sub in nnx.iter_modules(module):
        kind = type(sub)
        name = {nnx.Linear: "kernel", nnx.Embed: "embedding"}.get(kind)
        full = "/".join(map(str, path + (name,))) if name else None
        node = nodes.get(full)
        if node is not None and node.in_axes == (0,):
            key = (None if dropout_key is None or kind is not nnx.Linear
                   else path_key(dropout_key, full))
            sub.__class__ = _fast(kind, node, full, key, full in stacked)
            hits.add(full)
        mpath = "/".join(map(str, path))
        for npath, mnode in around.get(mpath, ()):  # several on one module: nested
            key = None if dropout_key is None else path_key(dropout_key, npath)
            sub.__class__ = _around(type(sub), mnode, key, dict(context or {}))
    missed = sorted(p for p in stacked if p not in hits)
    if missed:
        raise ValueError(f"{missed[0]}: a stacked adapter runs only on the fast path "
                         "(nnx.Linear and nnx.Embed)")
    return module(*args, **kwargs)


def _around(kind, node, key, context):
    """A subclass of ``kind`` whose call is the module-level node's ``intercept`` of its own."""
    def call(self, *args, **kwargs):
        return node.intercept(lambda *a, **k: kind.__call__(self, *a, **k), args, kwargs,
                              dropout_key=key, **context)
    return type(kind.__name__, (kind,), {"__call__": call})


def _fast(kind, node, path, key, mixed):
    """A subclass of ``kind`` whose call runs ``node.dot`` (made per layer, at trace time).

    ``key`` is the layer's adapter-dropout key (``nnx.Linear``; ``None`` at eval).
    A call given ``out_sharding`` runs the layer's own ``__call__`` on the merged
    kernel the module holds (an output sharding describes ``(..., out)``, not the
    factorized branch's rank-``r`` intermediate); a mixed-batch adapter
    (``mixed``, whose module holds the base only) has no such form and raises.
    """
    def own_call(self, x, out_sharding):
        if mixed:
            raise ValueError(f"{path}: a stacked adapter runs only on the fast path, which "
                             f"takes no out_sharding (got {out_sharding!r})")
        return kind.__call__(self, x, out_sharding=out_sharding)

    if kind is nnx.Linear:
        def call(self, x, out_sharding=None):
            if out_sharding is not None:
                return own_call(self, x, out_sharding)

            def op(x, k):
                x, k = self.promote_dtype((x, k), dtype=self.dtype)
                extra = ({} if self.preferred_element_type is None
                         else {"preferred_element_type": self.preferred_element_type})
                return self.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())),
                                        precision=self.precision, **extra)
            y = node.dot(x.reshape(-1, x.shape[-1]), op, dropout_key=key,
                         examples=x.shape[0] if x.ndim > 1 else 1)
            y = y.reshape(x.shape[:-1] + y.shape[-1:])
            if self.bias is not None:
                y = y + self.bias[...].astype(y.dtype)
            return y
    else:
        def call(self, ids, out_sharding=None):
            if out_sharding is not None:
                return own_call(self, ids, out_sharding)

            def op(ids, table):
                (table,) = self.promote_dtype((table,), dtype=self.dtype, inexact=False)
                return jnp.take(table, ids, axis=0)
            return node.dot(ids, op)  # no dropout on ids (as PEFT)
    return type(f"Factorized{kind.__name__}", (kind,), {"__call__": call})
