"""The factorized fast path for Flax Linen models.

``jlora.linen.apply(model, variables, *args, **kwargs)`` runs ``model.apply``
under ``flax.linen.intercept_methods``. Every ``Dense``, ``DenseGeneral``,
``Conv``, ``Embed`` and ``Einsum`` whose parameter is an adapter node computes
its output itself, through the node's factorized ``dot``:

    y = x·K0 + s·(x·a)·b (+ bias)            (LoRA)

so the ``in×out`` weight is never formed and the backward pass computes no
``in×out`` weight gradient. Any adapter node the interceptor does not consume
(a custom layer, ``Embed.attend``, a masked ``Conv``, axes that do not line up
with the layer's contraction) is served from ``jlora.merge``'d weights instead,
so results never silently differ. Under ``jit`` the merged copies of consumed
nodes are dead code and XLA removes them.

A kernel stacked by ``nn.scan`` (``(layers, in, out)``) is adapted per layer with
``expert_axis=0``: its nodes travel inside the params, ``nn.scan`` hands each
iteration its slice and the layer's fast path runs on it. A stacked kernel
adapted as one matrix (no ``expert_axis``) is a ``ValueError`` naming the path.

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

import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import _layers
from jlora._layers import as_tuple, register
from jlora.methods.full import FullNode
from jlora.methods._experts import is_slice, is_stacked
from jlora.methods.stacked import bind_adapter_ids
from jlora.spec import Spec
from jlora.core import module_params_applied
from jlora.methods._module import ModuleNode
from jlora.tree import (is_module_node, is_node, leaves_with_paths, map_nodes, map_with_paths,
                        module_nodes, path_key, without_module_nodes)


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
    # matmuls than over several contracting axes: flatten the batch axes. A
    # stacked node (mixed-adapter batch) is told how many examples the rows hold.
    x2 = x.reshape(-1, x.shape[-1])
    y = node.dot(x2, op, dropout_key=key, examples=x.shape[0] if x.ndim > 1 else 1)
    return _bias(module, y.reshape(x.shape[:-1] + y.shape[-1:]))


def _dense_general(module: nn.DenseGeneral, node, method, args, kwargs, key):
    (x,) = args
    axis = as_tuple(module.axis)
    if as_tuple(module.batch_dims) or len(node.in_axes) != len(axis):
        return NotImplemented
    n_in = len(axis)
    op = lambda x, k: _sub_apply(module, k, x, features=tuple(k.shape[n_in:]))
    return _bias(module, node.dot(x, op, dropout_key=key))


def _conv(module: nn.Conv, node, method, args, kwargs, key):
    (x,) = args
    # A mask multiplies the whole kernel, (K0 + s·a·b) ⊙ M: no factorized form.
    if (module.feature_group_count != 1 or module.mask is not None
            or len(node.in_axes) != len(node.shape) - 1):
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
    eq = _layers.einsum_equation(module, args, kwargs).replace(" ", "")
    x_sub, k_sub, out_sub = _layers.einsum_parts(eq)
    if "." in eq or len(k_sub) != len(node.shape):
        return NotImplemented
    if is_stacked(node):
        return _expert_einsum(module, node, eq, x, key)
    # the node is seen with its input axes first (orientation checked by the caller)
    in_letters = "".join(c for c in k_sub if c in x_sub)
    out_letters = [c for c in k_sub if c not in x_sub]
    if any(c not in out_sub for c in out_letters):
        return NotImplemented
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
        return _bias(module, y, _bias_shape(k_sub, out_sub, tuple(module.shape)))
    return y


def _bias_shape(k_sub: str, out_sub: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """As Flax's Einsum: the bias spans the output axes that come from the kernel
    (sized by the kernel's declared shape), broadcast over the others."""
    return tuple(shape[k_sub.index(c)] if c in k_sub else 1 for c in out_sub)


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
        return _bias(module, y, _bias_shape(k_sub, out_sub, tuple(node.shape)))
    return y


def _merged_call(module: nn.Module, method: str, args, kwargs):
    """Run ``module`` on its own variables with every adapter node merged (the
    always-correct path for a node handed to a layer that cannot consume it)."""
    variables = dict(module.variables)
    variables["params"] = map_nodes(
        lambda n: (n.slice_view() if is_slice(n) else n).materialize(), variables["params"])
    clone = module.clone(parent=None, name=None)
    return clone.apply(variables, *args, method=method, **kwargs)


def _registered(module: nn.Module, node, method, args, kwargs, key):
    """A registered Dense-like layer: ``y = x·K (+ bias)`` over the node's input axes."""
    layer = _layers.registered(type(module))
    x = jnp.asarray(args[0])
    n_in = len(node.in_axes)
    if x.shape[x.ndim - n_in:] != node.in_shape:
        return NotImplemented
    dtype = getattr(module, "dtype", None)
    precision = getattr(module, "precision", None)

    def op(x, k):
        if dtype is not None:
            x, k = x.astype(dtype), k.astype(dtype)
        return jax.lax.dot_general(x, k, ((tuple(range(x.ndim - n_in, x.ndim)),
                                           tuple(range(n_in))), ((), ())), precision=precision)

    lead = x.shape[: x.ndim - n_in]
    y = node.dot(x.reshape((-1,) + node.in_shape), op, dropout_key=key,
                 examples=lead[0] if lead else 1)
    y = y.reshape(lead + y.shape[1:])
    if layer.bias is not None and module.has_variable("params", layer.bias):
        bias = jnp.asarray(module.get_variable("params", layer.bias))
        y = y + (bias if dtype is None else bias.astype(dtype)).astype(y.dtype)
    return y


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


def _declared_shape(module: nn.Module, args) -> tuple[int, ...] | None:
    """The kernel shape a built-in layer declares for this input (None: not known here).

    A node whose shape disagrees is left to the layer's own forward, which
    raises Flax's ``ScopeParamShapeError`` exactly as for a plain param.
    """
    cls, x = type(module), args[0] if args else None
    if cls is nn.Dense:
        return (jnp.shape(x)[-1], module.features)
    if cls is nn.DenseGeneral and not as_tuple(module.batch_dims):
        ndim = jnp.ndim(x)
        return (tuple(jnp.shape(x)[a % ndim] for a in as_tuple(module.axis))
                + as_tuple(module.features))
    if cls is nn.Conv and isinstance(module.kernel_size, (tuple, list)):
        groups = module.feature_group_count
        return tuple(module.kernel_size) + (jnp.shape(x)[-1] // groups, module.features)
    if cls is nn.Embed:
        return (module.num_embeddings, module.features)
    if cls is nn.Einsum:
        return tuple(module.shape)
    return None


def _call_model(model, variables, args, kwargs):
    """``model.apply(variables, ...)``; a Hugging Face Flax model is called with ``params=``."""
    if isinstance(model, nn.Module):
        return model.apply(variables, *args, **kwargs)
    if isinstance(getattr(model, "module", None), nn.Module) and callable(model):
        extra = set(variables) - {"params"}
        if extra:
            raise ValueError(f"jlora.linen: a Hugging Face model takes params only, got "
                             f"collections {sorted(extra)}")
        return model(*args, params=variables["params"], **kwargs)
    raise ValueError(f"jlora.linen: model must be a flax.linen.Module (or a Hugging Face Flax "
                     f"model), got {type(model).__name__}")


def resolve(model, variables: Any, *args, spec: Spec, **kwargs) -> Spec:
    """``spec`` with every targeted kernel oriented as the model's layers use it.

    Traces ``model.apply(variables, *args, **kwargs)`` abstractly (``jax.eval_shape``,
    no FLOPs) and records, for each kernel of a ``Dense``, ``DenseGeneral``,
    ``Conv``, ``Embed``, ``Einsum`` (from its equation: the kernel letters that
    also index the input) or :func:`register`-ed layer, which kernel axes the
    layer contracts with its input. The returned spec carries them as each
    config's ``in_axes``, so :func:`jlora.apply` builds factors ``a: (fan_in, r)``,
    ``b: (r, fan_out)`` in the layer's own orientation (GPT-2's ``(out, in)``
    ``FlaxConv1D`` kernels, Gemma's ``(heads, d_model, head_dim)`` einsum
    kernels), the fast path factorizes them and PEFT files describe them.

    ``model`` may also be a Hugging Face Flax model (called as
    ``model(*args, params=variables["params"], **kwargs)``).

    A kernel stacked by ``nn.scan`` / ``nn.vmap`` along axis 0, whose layer
    sees one slice, gets the slice's axes shifted by one (``in_axes`` of the
    whole stack, as ``expert_axis=0`` reads them); its config must adapt it per
    slice (``expert_axis=0``).

    Raises:
      ValueError: a targeted kernel that no known layer uses and whose
        orientation its shape does not settle (square, or more than 2 axes),
        naming the path (a non-square one is assumed ``(in, out)`` with a
        warning); a config ``in_axes`` that disagrees with the layer; a stacked
        kernel whose config has no ``expert_axis=0``, or that is stacked along
        more than one leading axis or another axis than the first.

    Example::

        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Einsum((2, 8, 4), "btd,ndh->btnh")  # heads, d_model, head_dim
        >>> x = jnp.ones((1, 3, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> spec = jlora.linen.resolve(model, variables, x,
        ...                            spec=jlora.Spec({"kernel": jlora.LoRA(rank=2)}))
        >>> spec.match("kernel").in_axes
        (1,)
    """
    seen: dict[str, set] = {}
    found = _layers.trace_axes(lambda v: _call_model(model, v, args, kwargs), variables,
                               seen=seen)
    return _layers.orient_spec(spec, variables["params"], found, seen)


def apply(model, variables: Any, *args, dropout_key: jax.Array | None = None,
          strict: bool = False, adapter_ids: Any = None, context: dict | None = None,
          **kwargs):
    """Run a Linen model on adapted params, each adapter computed factorized.

    ``model.apply(variables, *args, **kwargs)`` in which every supported layer
    whose parameter is an adapter node computes its output through the node's
    ``dot`` (see the module docstring). (To *adapt* params, see ``jlora.apply``.)

    Args:
      model: a Linen module (or a Hugging Face Flax model, see :func:`resolve`).
      variables: ``{"params": adapted, ...}``; ``adapted`` from ``jlora.apply``
        (or ``jlora.combine(trainable, frozen)``).
      *args, **kwargs: passed to ``model.apply`` (``method=``, ``rngs=``,
        ``mutable=`` included).
      dropout_key: enables adapter dropout (training); ``None`` at eval.
      strict: raise instead of warn when an adapter is served merged.
      adapter_ids: ``(batch,)`` ints for a tree from ``jlora.compose.stack``:
        example ``j`` runs with adapter ``adapter_ids[j]`` (``-1``: the base alone).
        One id per example: a ``ValueError`` names both sizes when the length
        differs from the leading (example) axis of a stacked layer's input.
      context: keywords for module-level adapters' ``intercept`` (e.g.
        ``{"attention_mask": mask}`` for position-selecting methods); not
        passed to the model.

    Module-level adapters (``jlora.AdaptFormer``, stored beside their module as
    ``"mlp@adaptformer"``) run around their module's ``__call__``: the module's
    params are first rewritten by the node's ``module_params``, then its output
    is the node's ``intercept(call, args, kwargs, dropout_key=, **context)``.

    Every low-rank adapter the fast path could not compute factorized (its layer
    is unknown, or contracts other axes than the adapter's ``in_axes``) is served
    from merged weights and named in a warning (a ``ValueError`` with
    ``strict=True``); under ``jit`` the check runs once, at trace time.
    """
    return _intercepted(model, variables, args, kwargs, dropout_key=dropout_key,
                        strict=strict, on_hit=None, on_miss=None, adapter_ids=adapter_ids,
                        context=context)


def _intercepted(model, variables: Any, args: tuple, kwargs: dict, *,
                 dropout_key: jax.Array | None, strict: bool,
                 on_hit: Callable[[str], None] | None,
                 on_miss: Callable[[str], None] | None = None, adapter_ids: Any = None,
                 context: dict | None = None):
    variables = dict(variables)
    params = variables.get("params")
    if params is None:
        raise ValueError("jlora.linen.apply: variables has no 'params' collection")
    nodes = {path: node for path, node in leaves_with_paths(params)
             if is_node(node) and not is_module_node(node)}
    # Module-level nodes sit beside their modules: the model never sees them; their
    # module_params rewrite the module's params and their intercept wraps its call.
    around: dict[str, list] = {}  # module path -> [(node path, node)], applied in that order
    for npath, node in sorted(module_nodes(params).items()):
        around.setdefault(node.path, []).append((npath, node))
    params = without_module_nodes(params)
    # Adapters stacked for mixed batches (jlora.compose.stack) get the batch's ids
    # and have no merged form: the fallback sees their base.
    mixed = bind_adapter_ids(nodes, adapter_ids)
    # Stacked nodes (expert_axis) travel inside the params, so that nn.scan hands
    # each iteration its slice; every other node is served merged.
    params = map_with_paths(
        lambda p, n: n if not is_node(n) else n.base if p in mixed else n if is_stacked(n)
        else n.materialize(), params)
    variables["params"] = module_params_applied(params, [e for v in around.values() for e in v])
    context = dict(context or {})
    hits: set[str] = set()
    misses: dict[str, str] = {}
    busy = False  # a handler's own sub-layer calls go straight through

    def _run_busy(fn, *args):
        nonlocal busy
        busy = True
        try:
            return fn(*args)
        finally:
            busy = False

    def interceptor(next_fun, call_args, call_kwargs, ctx):
        if busy:
            return next_fun(*call_args, **call_kwargs)
        mpath = "/".join(map(str, ctx.module.path))
        if mpath in around and ctx.method_name == "__call__":
            call = lambda *a, **k: leaf_level(next_fun, a, k, ctx)
            for npath, mnode in around[mpath]:  # several nodes on one module: nested
                call = wrapped(mnode, npath, call)
            return call(*call_args, **call_kwargs)
        return leaf_level(next_fun, call_args, call_kwargs, ctx)

    def wrapped(mnode, npath, inner):
        key = None if dropout_key is None else path_key(dropout_key, npath)

        def call(*a, **k):
            y = mnode.intercept(inner, tuple(a), dict(k), dropout_key=key, **context)
            hits.add(npath)
            if on_hit is not None:
                on_hit(npath)
            return y
        return call

    def leaf_level(next_fun, call_args, call_kwargs, context):
        module = context.module
        cls = type(module)
        entry = _HANDLERS.get(cls)
        if entry is None and _layers.registered(cls) is not None:
            entry = (_layers.registered(cls).kernel, _registered)
        method = context.method_name
        if entry is None:
            if not _holds_node(module):
                return next_fun(*call_args, **call_kwargs)
            if not getattr(cls, "jlora_nodes", False):
                return _run_busy(_merged_call, module, method, call_args, call_kwargs)
            y = next_fun(*call_args, **call_kwargs)
            # a jlora_nodes module reads its nodes itself (jlora.experts.ragged_dot, ...)
            for name, value in module.variables.get("params", {}).items():
                if is_node(value):
                    hits.add("/".join(map(str, module.path + (name,))))
                    if on_hit is not None:
                        on_hit("/".join(map(str, module.path + (name,))))
            return y
        name, handler = entry
        path = "/".join(map(str, module.path + (name,)))
        var = module.get_variable("params", name) if module.has_variable("params", name) else None
        handed = is_node(var)  # a stacked node (or its nn.scan slice) inside the params
        node = var if handed else nodes.get(path)
        fallback = ((lambda: _run_busy(_merged_call, module, method, call_args, call_kwargs))
                    if handed else (lambda: next_fun(*call_args, **call_kwargs)))
        if (node is not None and not handed and var is not None
                and tuple(jnp.shape(var)) == tuple(node.shape[1:])):
            raise ValueError(
                f"{path}: the adapted kernel has shape {tuple(node.shape)} but the layer "
                f"sees {tuple(jnp.shape(var))}: it is stacked (nn.scan or vmap) along axis "
                f"0, and its adapter treats that axis as input features; adapt it per "
                f"slice with {node.method}(..., expert_axis=0)")
        if (
            node is None
            or method not in ("__call__", "attend")
            or var is None
            or (not handed and tuple(jnp.shape(var)) != tuple(node.shape))
        ):
            return fallback()
        declared = None if handed else _declared_shape(module, call_args)
        if declared is not None and tuple(declared) != tuple(node.shape):
            return fallback()  # the layer's own forward raises Flax's shape error
        if is_slice(node):
            node = node.slice_view()
        if not is_stacked(node):
            axes = _layers.contracted_axes(module, method, call_args, call_kwargs)
            if axes != tuple(node.in_axes):
                misses[path] = (f"{cls.__name__}.{method} has no factorized form"
                                if axes is None else
                                f"{cls.__name__} contracts kernel axes {axes}, the adapter has "
                                f"in_axes {node.in_axes}")
                if on_miss is not None:
                    on_miss(path)
                return fallback()
            node = _layers.leading_view(node)
            if node is None:
                misses[path] = _layers.NO_LEADING_VIEW
                if on_miss is not None:
                    on_miss(path)
                return fallback()
        key = None if dropout_key is None else path_key(dropout_key, path)
        y = _run_busy(handler, module, node, method, call_args, call_kwargs, key)
        if y is NotImplemented:
            misses[path] = f"{cls.__name__} options the fast path does not cover"
            if on_miss is not None:
                on_miss(path)
            return fallback()
        hits.add(path)
        if on_hit is not None:
            on_hit(path)
        return y

    with nn.intercept_methods(interceptor):
        out = _call_model(model, variables, args, kwargs)
    missed = sorted(p for p in mixed if p not in hits)
    if missed:
        raise ValueError(f"{missed[0]}: a stacked adapter runs only on the fast path, and this "
                         "layer is not on it (jlora.linen.consumed lists what is)")
    _layers.report_merged("jlora.linen.apply", nodes, hits, misses, strict=strict,
                          dropout_key=dropout_key,
                          advice="Build the spec with jlora.linen.resolve, or register custom "
                                 "layers with jlora.linen.register.", stacklevel=3)
    _report_modules(around, hits, strict)
    return out


def _report_modules(around, hits, strict):
    """Module-level nodes whose module's ``__call__`` never ran had no effect on the output."""
    idle = [f"{npath} (no module at {node.path or '<root>'} was called)"
            for npath, node in sorted(e for v in around.values() for e in v)
            if npath not in hits and type(node).intercept is not ModuleNode.intercept]
    if not idle:
        return
    msg = "jlora.linen.apply: module-level adapters that did not run: " + "; ".join(idle)
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


def consumed(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, list[str]]:
    """Which adapter paths the fast path computes factorized, and which it merges.

    Traces the model abstractly (``jax.eval_shape``, no FLOPs) and returns
    ``{"factorized": [...], "merged": [...]}``, so you can check your model's
    layers hit the fast path. A kernel that one call computes factorized and
    another serves merged (a tied ``Embed``: its ``__call__`` and its
    ``attend``) is in both lists.
    """
    hits: list[str] = []
    misses: list[str] = []
    dropout_key = kwargs.pop("dropout_key", None)
    adapter_ids = kwargs.pop("adapter_ids", None)
    context = kwargs.pop("context", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jax.eval_shape(lambda v: _intercepted(model, v, args, kwargs, dropout_key=dropout_key,
                                              strict=False, on_hit=hits.append,
                                              on_miss=misses.append,
                                              adapter_ids=adapter_ids, context=context),
                       variables)
    nodes = [p for p, x in leaves_with_paths(variables["params"]) if is_node(x)]
    return {
        "factorized": [p for p in nodes if p in hits],
        "merged": [p for p in nodes if p not in hits or p in misses],
    }
