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

import threading
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.methods._experts import is_slice, is_stacked
from jlora.tree import is_node, leaves_with_paths, map_nodes

_local = threading.local()


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
    op = lambda x, k: _sub_apply(module, k, x, features=k.shape[-1])
    # XLA:CPU runs the rank-r weight-gradient contractions far faster as 2-D
    # matmuls than over several contracting axes: flatten the batch axes.
    x2 = x.reshape(-1, x.shape[-1])
    y = node.dot(x2, op, dropout_key=key)
    return _bias(module, y.reshape(x.shape[:-1] + y.shape[-1:]))


def _dense_general(module: nn.DenseGeneral, node, method, args, kwargs, key):
    (x,) = args
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    if module.batch_dims or len(node.in_axes) != len(axis):
        return NotImplemented
    n_in = len(axis)
    op = lambda x, k: _sub_apply(module, k, x, features=tuple(k.shape[n_in:]))
    return _bias(module, node.dot(x, op, dropout_key=key))


def _conv(module: nn.Conv, node, method, args, kwargs, key):
    (x,) = args
    if module.feature_group_count != 1 or len(node.in_axes) != len(node.shape) - 1:
        return NotImplemented
    op = lambda x, k: _sub_apply(module, k, x, features=k.shape[-1])
    return _bias(module, node.dot(x, op, dropout_key=key))


def _embed(module: nn.Embed, node, method, args, kwargs, key):
    if method != "__call__" or node.in_axes != (0,):
        return NotImplemented  # Embed.attend contracts the feature axis: merged path
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
    eq = eq.replace(" ", "")
    lhs, out_sub = eq.split("->")
    x_sub, k_sub = lhs.split(",")
    if "." in eq or len(k_sub) != len(node.shape):
        return NotImplemented
    if is_stacked(node):
        return _expert_einsum(module, node, eq, x, key)
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
        k = jnp.zeros(node.shape, y.dtype)
        _, bshape = module._get_bias_shape(eq, x, k)
        return _bias(module, y, bshape)
    return y


def _expert_einsum(module: nn.Einsum, node, eq: str, x, key):
    """Einsum dispatch over a stacked expert kernel, e.g. ``"ecd,edf->ecf"``: the
    expert letter is kept in ``x`` and the output, the node's input axes are
    contracted and the output letters sit where the contracted ones were in ``x``."""
    lhs, out_sub = eq.split("->")
    x_sub, k_sub = lhs.split(",")
    e = k_sub[0]
    contracted = [k_sub[i] for i in node.in_axes]
    outs = [c for i, c in enumerate(k_sub) if i and i not in node.in_axes]
    if (e not in x_sub or e not in out_sub or len(contracted) != 1 or len(outs) != 1
            or any(c in out_sub or c not in x_sub for c in contracted)
            or out_sub != x_sub.replace(contracted[0], outs[0])):
        return NotImplemented

    def op(x, k):
        clone = module.clone(parent=None, name=None, use_bias=False, shape=tuple(k.shape),
                             einsum_str=None)
        return clone.apply({"params": {"kernel": k}}, x, einsum_str=eq)

    y = node.dot(x, op, dropout_key=key)
    if module.use_bias:
        _, bshape = module._get_bias_shape(eq, x, jnp.zeros(node.shape, y.dtype))
        return _bias(module, y, bshape)
    return y


def _merged_call(module: nn.Module, method: str, args, kwargs):
    """Run ``module`` on its own variables with every adapter node merged (the
    always-correct path for a node handed to a layer that cannot consume it)."""
    variables = dict(module.variables)
    variables["params"] = map_nodes(
        lambda n: (n.slice_view() if is_slice(n) else n).materialize(), variables["params"])
    clone = module.clone(parent=None, name=None)
    return clone.apply(variables, *args, method=method, **kwargs)


_HANDLERS: dict[type, tuple[str, Callable]] = {
    nn.Dense: ("kernel", _dense),
    nn.DenseGeneral: ("kernel", _dense_general),
    nn.Conv: ("kernel", _conv),
    nn.Embed: ("embedding", _embed),
    nn.Einsum: ("kernel", _einsum),
}


def _holds_node(module: nn.Module) -> bool:
    """Whether one of ``module``'s own params (not a child's) is an adapter node."""
    if module.scope is None:
        return False
    return any(is_node(v) for v in module.variables.get("params", {}).values())


def _run_busy(fn, *args):
    _local.busy = True
    try:
        return fn(*args)
    finally:
        _local.busy = False


def apply(model: nn.Module, variables: Any, *args, dropout_key: jax.Array | None = None,
          _consumed: list | None = None, **kwargs):
    """``model.apply(variables, *args, **kwargs)`` with adapters computed factorized.

    Args:
      model: a Linen module.
      variables: ``{"params": adapted, ...}``; ``adapted`` from ``jlora.apply``
        (or ``jlora.combine(trainable, frozen)``).
      *args, **kwargs: passed to ``model.apply`` (``method=``, ``rngs=``,
        ``mutable=`` included).
      dropout_key: enables adapter dropout (training); ``None`` at eval.
    """
    variables = dict(variables)
    params = variables.get("params")
    if params is None:
        raise ValueError("jlora.linen.apply: variables has no 'params' collection")
    nodes = {path: node for path, node in leaves_with_paths(params) if is_node(node)}
    # Stacked nodes (expert_axis) travel inside the params, so that nn.scan hands
    # each iteration its slice; every other node is served merged.
    variables["params"] = map_nodes(lambda n: n if is_stacked(n) else n.materialize(), params)

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        entry = _HANDLERS.get(type(module))
        if getattr(_local, "busy", False):
            return next_fun(*call_args, **call_kwargs)
        if entry is None:
            if not getattr(type(module), "jlora_nodes", False) and _holds_node(module):
                return _run_busy(_merged_call, module, context.method_name, call_args,
                                 call_kwargs)
            return next_fun(*call_args, **call_kwargs)
        name, handler = entry
        path = "/".join(map(str, module.path + (name,)))
        var = module.get_variable("params", name) if module.has_variable("params", name) else None
        node = var if is_node(var) else nodes.get(path)
        if is_node(var) and context.method_name not in ("__call__", "attend"):
            return _run_busy(_merged_call, module, context.method_name, call_args, call_kwargs)
        if (node is not None and not is_node(var) and var is not None
                and tuple(jnp.shape(var)) == tuple(node.shape[1:])):
            raise ValueError(
                f"{path}: the adapted kernel has shape {tuple(node.shape)} but the layer "
                f"sees {tuple(jnp.shape(var))}: it is stacked (nn.scan or vmap) along axis "
                f"0, and its adapter treats that axis as input features; adapt it per "
                f"slice with {node.method}(..., expert_axis=0)")
        if (
            node is None
            or context.method_name not in ("__call__", "attend")
            or var is None
            or (not is_node(var) and tuple(jnp.shape(var)) != tuple(node.shape))
        ):
            return next_fun(*call_args, **call_kwargs)
        key = None
        if dropout_key is not None:
            key = jax.random.fold_in(dropout_key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        _local.busy = True
        try:
            y = handler(module, node, context.method_name, call_args, call_kwargs, key)
        finally:
            _local.busy = False
        if y is NotImplemented:
            if is_node(var):
                return _run_busy(_merged_call, module, context.method_name, call_args,
                                 call_kwargs)
            return next_fun(*call_args, **call_kwargs)
        if _consumed is not None:
            _consumed.append(path)
        return y

    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, **kwargs)


def consumed(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, list[str]]:
    """Which adapter paths the fast path computes factorized, and which it merges.

    Traces the model abstractly (``jax.eval_shape``, no FLOPs) and returns
    ``{"factorized": [...], "merged": [...]}``, so you can check your model's
    layers hit the fast path.
    """
    hits: list[str] = []
    jax.eval_shape(lambda v: apply(model, v, *args, _consumed=hits, **kwargs), variables)
    nodes = [p for p, x in leaves_with_paths(variables["params"]) if is_node(x)]
    return {
        "factorized": [p for p in nodes if p in hits],
        "merged": [p for p in nodes if p not in hits],
    }
