"""The factorized fast path for Flax Linen models.

``jlora.linen.apply(model, variables, *args, **kwargs)`` runs ``model.apply``
under ``flax.linen.intercept_methods``. Every ``Dense``, ``DenseGeneral``,
``Conv``, ``Embed`` and ``Einsum`` whose parameter is an adapter node computes
its output itself, through the node's factorized ``dot``:

    y = x·K0 + s·(x·a)·b (+ bias)            (LoRA)

so the ``in×out`` weight is never formed and the backward pass computes no
``in×out`` weight gradient. Any adapter node the interceptor does not consume
(a custom layer, a ``nn.scan``-stacked kernel, ``Embed.attend``, axes that do
not line up with the layer's contraction) is served from ``jlora.merge``'d
weights instead, so results never silently differ. Under ``jit`` the merged
copies of consumed nodes are dead code and XLA removes them.

Dropout on the adapter branch (``LoRA(dropout=...)``) is active only when a
``dropout_key`` is passed, i.e. in training.

Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
    ...                       key=jax.random.key(1))
    >>> y = jlora.linen.apply(model, {"params": adapted}, x)
    >>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=1e-6))
    True
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.core import merge
from jlora.methods.stacked import bind_adapter_ids
from jlora.tree import is_node, leaves_with_paths, map_with_paths, path_key


def _sub_apply(module: nn.Module, kernel: jax.Array, x: jax.Array, **updates) -> jax.Array:
    """Run ``module``'s own forward (dtype promotion, precision, dot_general) on
    ``kernel`` with no bias, as an unbound clone."""
    clone = module.clone(parent=None, name=None, use_bias=False, **updates)
    return clone.apply({"params": {"kernel": kernel}}, x)


def _bias(module: nn.Module, y: jax.Array, shape: tuple[int, ...] | None = None) -> jax.Array:
    if not getattr(module, "use_bias", False):
        return y
    bias = jnp.asarray(module.get_variable("params", "bias"))
    if module.dtype is not None:
        bias = bias.astype(module.dtype)
    if shape is not None:
        bias = bias.reshape(shape)
    return y + bias.astype(y.dtype)


def _dense(module: nn.Dense, node, method, args, kwargs, key):
    (x,) = args
    if node.shape != (jnp.shape(x)[-1], module.features):
        return NotImplemented  # Flax's own path checks the declaration
    op = lambda x, k: _sub_apply(module, k, x, features=k.shape[-1])
    # XLA:CPU runs the rank-r weight-gradient contractions far faster as 2-D
    # matmuls than over several contracting axes: flatten the batch axes.
    x2 = x.reshape(-1, x.shape[-1])
    y = node.dot(x2, op, dropout_key=key)
    return _bias(module, y.reshape(x.shape[:-1] + y.shape[-1:]))


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _dense_general(module: nn.DenseGeneral, node, method, args, kwargs, key):
    (x,) = args
    axis = _as_tuple(module.axis)
    features = _as_tuple(module.features)
    if module.batch_dims or len(node.in_axes) != len(axis):
        return NotImplemented
    ndim = jnp.ndim(x)
    if node.shape != tuple(jnp.shape(x)[a % ndim] for a in axis) + features:
        return NotImplemented
    n_in = len(axis)
    op = lambda x, k: _sub_apply(module, k, x, features=tuple(k.shape[n_in:]))
    return _bias(module, node.dot(x, op, dropout_key=key))


def _conv(module: nn.Conv, node, method, args, kwargs, key):
    (x,) = args
    if module.feature_group_count != 1 or len(node.in_axes) != len(node.shape) - 1:
        return NotImplemented
    if node.shape != _as_tuple(module.kernel_size) + (jnp.shape(x)[-1], module.features):
        return NotImplemented
    op = lambda x, k: _sub_apply(module, k, x, features=k.shape[-1])
    return _bias(module, node.dot(x, op, dropout_key=key))


def _embed(module: nn.Embed, node, method, args, kwargs, key):
    if method != "__call__" or node.in_axes != (0,):
        return NotImplemented  # Embed.attend contracts the feature axis: merged path
    if node.shape != (module.num_embeddings, module.features):
        return NotImplemented
    (ids,) = args
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
        raise ValueError(f"Embed {'/'.join(module.path)}: input must be integer ids")

    def op(ids, table):
        if module.dtype is not None:
            table = table.astype(module.dtype)
        return jnp.take(table, ids, axis=0)

    return node.dot(ids, op, dropout_key=None)  # no dropout on ids (as PEFT)


def _einsum(module: nn.Einsum, node, method, args, kwargs, key):
    x = args[0]
    eq = args[1] if len(args) > 1 else kwargs.get("einsum_str", module.einsum_str)
    if not isinstance(eq, str):
        return NotImplemented
    eq = eq.replace(" ", "")
    if "." in eq or "->" not in eq or eq.count(",") != 1:
        return NotImplemented
    lhs, out_sub = eq.split("->")
    x_sub, k_sub = lhs.split(",")
    if len(k_sub) != len(node.shape) or node.shape != tuple(module.shape):
        return NotImplemented
    in_axes = tuple(i for i, c in enumerate(k_sub) if c in x_sub)
    out_letters = [c for c in k_sub if c not in x_sub]
    if node.in_axes != in_axes or any(c not in out_sub for c in out_letters):
        return NotImplemented
    in_letters = "".join(k_sub[i] for i in in_axes)
    rest = "".join(c for c in out_sub if c not in out_letters)
    unused = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]

    def op(x, k):
        tail = "".join(unused[: k.ndim - len(in_letters)])
        sub_eq = f"{x_sub},{in_letters}{tail}->{rest}{tail}"
        clone = module.clone(parent=None, name=None, use_bias=False, shape=tuple(k.shape),
                             einsum_str=None)
        return clone.apply({"params": {"kernel": k}}, x, einsum_str=sub_eq)

    y = node.dot(x, op, dropout_key=key)  # axes: rest + out_letters
    now = rest + "".join(out_letters)
    y = jnp.transpose(y, [now.index(c) for c in out_sub])
    if module.use_bias:
        # As Flax: the bias spans the output axes that come from the kernel,
        # broadcast over the others.
        bshape = [node.shape[k_sub.index(c)] if c in k_sub else 1 for c in out_sub]
        return _bias(module, y, tuple(bshape))
    return y


_HANDLERS: dict[type, tuple[str, Callable]] = {
    nn.Dense: ("kernel", _dense),
    nn.DenseGeneral: ("kernel", _dense_general),
    nn.Conv: ("kernel", _conv),
    nn.Embed: ("embedding", _embed),
    nn.Einsum: ("kernel", _einsum),
}


def apply(model: nn.Module, variables: Any, *args, dropout_key: jax.Array | None = None,
          adapter_ids: Any = None, **kwargs):
    """Run a Linen model on adapted params, each adapter computed factorized.

    ``model.apply(variables, *args, **kwargs)`` where every supported layer
    whose parameter is an adapter node computes ``op(x, W)`` through the
    node's ``dot`` (see the module docstring). (To *adapt* params, see
    ``jlora.apply``.)

    Args:
      model: a Linen module.
      variables: ``{"params": adapted, ...}``; ``adapted`` from ``jlora.apply``
        (or ``jlora.combine(trainable, frozen)``).
      *args, **kwargs: passed to ``model.apply`` (``method=``, ``rngs=``,
        ``mutable=`` included).
      dropout_key: enables adapter dropout (training); ``None`` at eval.
      adapter_ids: ``(batch,)`` ints for a tree from ``jlora.compose.stack``:
        example ``j`` runs with adapter ``adapter_ids[j]`` (``-1``: the base alone).
    """
    return _run(model, variables, args, kwargs, dropout_key=dropout_key,
                adapter_ids=adapter_ids, on_hit=None)


def _run(model: nn.Module, variables: Any, args: tuple, kwargs: dict, *,
         dropout_key: jax.Array | None, on_hit: Callable[[str], None] | None,
         adapter_ids: Any = None):
    variables = dict(variables)
    params = variables.get("params")
    if params is None:
        raise ValueError("jlora.linen.apply: variables has no 'params' collection")
    nodes = {path: node for path, node in leaves_with_paths(params) if is_node(node)}
    # stacked adapters (jlora.compose.stack) get the batch's ids; they have no merged form
    stacked = bind_adapter_ids(nodes, adapter_ids)
    variables["params"] = merge(map_with_paths(lambda p, x: x.base if p in stacked else x, params))
    busy = False  # a handler's own sub-layer calls go straight through
    hits: list[str] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        nonlocal busy
        module = context.module
        entry = _HANDLERS.get(type(module))
        if busy or entry is None:
            return next_fun(*call_args, **call_kwargs)
        name, handler = entry
        path = "/".join(map(str, module.path + (name,)))
        node = nodes.get(path)
        if (
            node is None
            or context.method_name not in ("__call__", "attend")
            or not module.has_variable("params", name)
        ):
            return next_fun(*call_args, **call_kwargs)
        key = None if dropout_key is None else path_key(dropout_key, path)
        busy = True
        try:
            y = handler(module, node, context.method_name, call_args, call_kwargs, key)
        finally:
            busy = False
        if y is NotImplemented:
            return next_fun(*call_args, **call_kwargs)
        hits.append(path)
        if on_hit is not None:
            on_hit(path)
        return y

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, *args, **kwargs)
    missed = [p for p in stacked if p not in hits]
    if missed:
        raise ValueError(f"{missed[0]}: a stacked adapter runs only on the fast path, and this "
                         "layer is not on it (jlora.linen.consumed lists what is)")
    return out


def consumed(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, list[str]]:
    """Which adapter paths the fast path computes factorized, and which it merges.

    Traces the model abstractly (``jax.eval_shape``, no FLOPs) and returns
    ``{"factorized": [...], "merged": [...]}``, so you can check your model's
    layers hit the fast path. Arguments are those of :func:`apply`.
    """
    hits: list[str] = []
    dropout_key = kwargs.pop("dropout_key", None)
    adapter_ids = kwargs.pop("adapter_ids", None)
    jax.eval_shape(lambda v: _run(model, v, args, kwargs, dropout_key=dropout_key,
                                  adapter_ids=adapter_ids, on_hit=hits.append), variables)
    nodes = [p for p, x in leaves_with_paths(variables["params"]) if is_node(x)]
    return {
        "factorized": [p for p in nodes if p in hits],
        "merged": [p for p in nodes if p not in hits],
    }
