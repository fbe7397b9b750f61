"""Flax NNX helpers.

``jlora.apply`` works directly on the ``nnx.State`` that ``nnx.split`` returns
(paths read ``fc1/kernel``, without the Variable's ``value``), and the generic
compute path rebuilds a plain model from merged weights inside your jitted loss
(:func:`merge`). :func:`apply` is the factorized fast path: every
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` and
``nnx.Embed`` whose kernel is an adapter node computes its output through the
node's ``dot``, with the layer's own map ``op`` (its dtype, precision,
``dot_general`` / ``einsum_op`` / ``conv_general_dilated`` and
``preferred_element_type``):

    y = op(x, K0) + s·op(drop(x), a)·b (+ bias)            (LoRA)

where ``a`` is laid out as a kernel with ``r`` output features (a Conv of
``r`` channels, an Einsum whose kernel's output letters are one rank axis) and
``·b`` maps the rank axis to the layer's output axes. A convolution and an
einsum are linear in their kernel, so this equals ``op(x, K0 + s·a·b)``; the
``in×out`` delta is never formed and the backward computes no ``in×out`` weight
gradient. Module-level adapters (``jlora.AdaptFormer``) are not weights:
``merge`` refuses the unmergeable ones and :func:`apply` runs them around their
modules.

Orientation: an adapter is a low-rank update of its kernel viewed as a
``(fan_in, fan_out)`` matrix, ``in_axes`` being the kernel axes the layer
contracts with its input. :func:`resolve` reads them from the model: all
axes but the last for ``nnx.Linear`` ``(in, out)``, ``nnx.Conv``
``(window..., in, out)`` and ``nnx.Embed`` ``(vocab, features)``; the
``in_features`` axes for ``nnx.LinearGeneral`` (kernel ``(4, 2, 3)`` with
``out_features=(2, 3)`` contracts ``(0,)``); for ``nnx.Einsum`` the kernel
letters that also index the input (``"btd,ndh->btnh"`` contracts ``(1,)``).
Without it a config lacking ``in_axes`` takes the default, all axes but the
last, which is wrong for the last two; such an adapter still trains and
:func:`apply` still computes it exactly, from merged weights, but it is a
low-rank update of another matrix than the layer's map.

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

An ``nnx.Einsum`` oriented by :func:`resolve`, run factorized:

    >>> layer = nnx.Einsum("btd,ndh->btnh", (2, 8, 4), (2, 4), rngs=nnx.Rngs(0))
    >>> graphdef, state = nnx.split(layer)
    >>> x = jnp.ones((1, 3, 8))
    >>> spec = jlora.nnx.resolve(graphdef, state, x,
    ...                          spec=jlora.Spec({"kernel": jlora.LoRA(rank=2)}))
    >>> spec.match("kernel").in_axes
    (1,)
    >>> adapted = jlora.apply(state, spec, key=jax.random.key(1))
    >>> y = jlora.nnx.apply(graphdef, adapted, x)
    >>> bool(jnp.allclose(y, jlora.nnx.merge(graphdef, adapted)(x), atol=1e-6))
    True
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import _layers
from jlora.core import merge as _merge_tree
from jlora.core import module_params_applied
from jlora.methods._experts import is_stacked
from jlora.methods.stacked import bind_adapter_ids
from jlora.spec import Spec
from jlora.tree import (is_node, leaves_with_paths, map_with_paths, module_nodes, path_key,
                        without_module_nodes)

# The layers the fast path computes factorized, and the name of each one's kernel.
_KERNELS: dict[type, str] = {nnx.Linear: "kernel", nnx.LinearGeneral: "kernel",
                             nnx.Einsum: "kernel", nnx.Conv: "kernel", nnx.Embed: "embedding"}


def merge(graphdef: Any, adapted: Any, *rest: Any) -> nnx.Module:
    """``nnx.merge(graphdef, jlora.merge(adapted), *rest)``: a working plain module."""
    return nnx.merge(graphdef, _merge_tree(adapted), *rest)


def resolve(graphdef: Any, state: Any, *args, spec: Spec, **kwargs) -> Spec:
    """``spec`` with every targeted kernel oriented as the model's layers use it.

    Runs ``nnx.merge(graphdef, state)(*args, **kwargs)`` abstractly
    (``jax.eval_shape``, no FLOPs) and records, for the kernel of each
    ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` (from the equation
    of the call, the kernel letters that also index the input), ``nnx.Conv``
    and ``nnx.Embed``, which kernel axes the layer contracts with its input.
    The returned spec carries them as each config's ``in_axes``, as
    ``jlora.linen.resolve`` does for Linen, so :func:`jlora.apply` builds
    factors ``a: (fan_in, r)``, ``b: (r, fan_out)`` in the layer's own
    orientation and :func:`apply` computes them factorized. ``state`` is the
    plain state (before ``jlora.apply``).

    Raises:
      ValueError: ``spec`` is not a ``jlora.Spec``; a targeted kernel that no
        known layer uses and whose orientation its shape does not settle
        (square, or more than 2 axes), naming the path (a non-square one is
        assumed ``(in, out)`` with a warning); a config ``in_axes`` that
        disagrees with the layer; a kernel contracted over different axes in
        different calls.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> from flax import nnx
        >>> layer = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))  # kernel (8, 2, 4)
        >>> graphdef, state = nnx.split(layer)
        >>> spec = jlora.nnx.resolve(graphdef, state, jnp.ones((1, 8)),
        ...                          spec=jlora.Spec({"kernel": jlora.LoRA(rank=2)}))
        >>> spec.match("kernel").in_axes
        (0,)
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"jlora.nnx.resolve: spec must be a jlora.Spec, got "
                         f"{type(spec).__name__}")
    found: dict[str, set] = {}
    seen: dict[str, set] = {}

    def run(state):
        module = nnx.merge(graphdef, state)
        for path, sub in nnx.iter_modules(module):
            if type(sub) in _KERNELS:
                sub.__class__ = _recording(type(sub), _kernel_path(path, type(sub)), found, seen)
        module(*args, **kwargs)

    jax.eval_shape(run, state)
    return _layers.orient_spec(spec, state, found, seen, api="jlora.nnx")


def _kernel_path(module_path: tuple, kind: type) -> str:
    return "/".join(map(str, module_path + (_KERNELS[kind],)))


def _recording(kind, path, found, seen):
    """A subclass of ``kind`` whose call records the kernel axes it contracts (and the
    kernel shape it sees: one slice of a stack under ``nnx.scan`` / ``nnx.vmap``)."""
    def call(self, *args, **kwargs):
        bound = _bound(kind, self, args, kwargs)
        axes = _contracted(kind, self, bound.get("einsum_str"))
        if axes is not None:
            found.setdefault(path, set()).add(axes)
            seen.setdefault(path, set()).add(tuple(jnp.shape(getattr(self, _KERNELS[kind])[...])))
        return kind.__call__(self, *args, **kwargs)
    return type(kind.__name__, (kind,), {"__call__": call})


def _bound(kind, module, args, kwargs) -> dict:
    """The call's arguments by name (``inputs``, ``out_sharding``, ``einsum_str``)."""
    bound = inspect.signature(kind.__call__).bind(module, *args, **kwargs)
    return dict(bound.arguments)


def _contracted(kind, module, einsum_str: str | None = None) -> tuple[int, ...] | None:
    """The kernel axes ``module`` contracts with its input (None: no such reading)."""
    if kind is nnx.Linear or kind is nnx.Embed:
        return (0,)
    if kind is nnx.LinearGeneral:
        nb = len(module.batch_axis)
        return tuple(range(nb, nb + len(module.axis)))
    if kind is nnx.Conv:
        return tuple(range(len(module.kernel_size) + 1))  # window..., in (out last)
    if kind is nnx.Einsum:
        eq = einsum_str if einsum_str is not None else module.einsum_str
        parts = None if eq is None else _layers.einsum_parts(eq)
        if parts is None:
            return None
        x_sub, k_sub, _ = parts
        return tuple(i for i, c in enumerate(k_sub) if c in x_sub)
    return None


def apply(graphdef: Any, adapted: Any, *args, adapter_ids: Any = None,
          context: dict | None = None, dropout_key: Any = None, strict: bool = False,
          **kwargs) -> Any:
    """Run an NNX model on adapted state, each layer's adapter computed factorized.

    ``nnx.merge(graphdef, adapted)(*args, **kwargs)`` where each ``nnx.Linear``,
    ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` and ``nnx.Embed``
    whose kernel is an adapter node computes ``node.dot(x, op)``, ``op`` the
    layer's own map on any kernel (see the module docstring):
    ``op(x, K0) + s·op(drop(x), a)·b`` for LoRA, ``(op(x, K0) + s·op(drop(x), a)·b) ⊙
    m/‖K0 + s·a·b‖`` for DoRA. A layer runs its own ``__call__`` on the merged
    kernel the module holds instead (exact, but not factorized) when the call
    has no factorized form: an ``out_sharding`` (it describes ``(..., out)``,
    not the rank-``r`` branch), an ``nnx.Conv`` with a ``mask`` (``(K0 +
    s·a·b) ⊙ M``) or ``feature_group_count > 1``, an ``nnx.LinearGeneral``
    with ``batch_axis``, an ``nnx.Einsum`` with an ellipsis or a kernel letter
    neither in the input nor in the output, a per-expert (``expert_axis``)
    adapter, or an adapter whose ``in_axes`` are not the axes the layer
    contracts (:func:`resolve` sets them). Other layers use merged weights.
    Every low-rank adapter served merged is named in a warning with the
    reason (a ``ValueError`` with ``strict=True``), as in ``jlora.linen.apply``;
    with a ``dropout_key`` its adapter dropout does not run. Under ``jit`` the
    check runs once, at trace time; :func:`consumed` lists the two kinds.

    With a tree from ``jlora.compose.stack``, ``adapter_ids`` gives each
    example its adapter (``-1``: the base alone), as in ``jlora.linen.apply``;
    such an adapter has no merged form, so a layer that cannot run it
    factorized is a ``ValueError`` naming its path. ``dropout_key`` enables
    adapter dropout (``LoRA(dropout=...)``) on each layer's branch, with key
    ``path_key(dropout_key, path)`` as in ``jlora.linen.apply`` (never on
    ``nnx.Embed`` ids); ``None`` at eval.

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

    A convolution, factorized: ``conv(x, K0) + s·conv(x, a)·b``, ``a`` a
    ``(3, 3, 4, r)`` kernel:

        >>> graphdef, state = nnx.split(nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0)))
        >>> adapted = jlora.apply(state, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(1))
        >>> x = jnp.ones((2, 5, 5, 4))
        >>> y = jlora.nnx.apply(graphdef, adapted, x)
        >>> bool(jnp.allclose(y, jlora.nnx.merge(graphdef, adapted)(x), atol=1e-5))
        True
    """
    from jlora._validate import boolean

    boolean("jlora.nnx.apply", "strict", strict)
    hits: set = set()
    misses: dict[str, str] = {}
    out, nodes = _run(graphdef, adapted, args, kwargs, adapter_ids=adapter_ids, context=context,
                      dropout_key=dropout_key, hits=hits, misses=misses)
    _layers.report_merged("jlora.nnx.apply", nodes, hits, misses, strict=strict,
                          dropout_key=dropout_key,
                          advice="Build the spec with jlora.nnx.resolve.", stacklevel=2)
    return out


def consumed(graphdef: Any, adapted: Any, *args, **kwargs) -> dict[str, list[str]]:
    """Which adapter paths :func:`apply` computes factorized, and which it serves merged.

    Runs the model abstractly (``jax.eval_shape``, no FLOPs) with the same
    arguments as :func:`apply` (``adapter_ids=``, ``context=``,
    ``dropout_key=`` included) and returns ``{"factorized": [...], "merged":
    [...]}``. A kernel that one call computes factorized and another serves
    merged (an ``nnx.Embed`` called and also used through ``attend``) is in
    both lists.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> from flax import nnx
        >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> adapted = jlora.apply(state, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(1))
        >>> jlora.nnx.consumed(graphdef, adapted, jnp.ones((2, 4)))
        {'factorized': ['kernel'], 'merged': []}
    """
    hits: set = set()
    misses: dict[str, str] = {}
    options = {k: kwargs.pop(k, None) for k in ("adapter_ids", "context", "dropout_key")}
    nodes = {}

    def run(adapted):
        nodes.update(_run(graphdef, adapted, args, kwargs, hits=hits, misses=misses,
                          **options)[1])

    jax.eval_shape(run, adapted)  # nodes: every adapter node by path, in the tree's order
    return {"factorized": [p for p in nodes if p in hits],
            "merged": [p for p in nodes if p not in hits or p in misses]}


def _run(graphdef, adapted, args, kwargs, *, adapter_ids, context, dropout_key, hits: set,
         misses: dict):
    """The model's output with every known layer's adapter on the fast path, and the
    adapter nodes by path; ``hits`` gets each path computed factorized, ``misses``
    each path a call served merged, with the reason."""
    around: dict[str, list] = {}  # module path -> [(node path, node)], applied in that order
    for npath, node in sorted(module_nodes(adapted).items()):
        around.setdefault(node.path, []).append((npath, node))
    adapted = without_module_nodes(adapted)
    nodes = {p: n for p, n in leaves_with_paths(adapted) if is_node(n)}
    stacked = bind_adapter_ids(nodes, adapter_ids)
    plain = _merge_tree(map_with_paths(lambda p, x: x.base if p in stacked else x, adapted))
    module = nnx.merge(graphdef,
                       module_params_applied(plain, [e for v in around.values() for e in v]))
    present = set()
    for path, sub in nnx.iter_modules(module):
        kind = type(sub)
        full = _kernel_path(path, kind) if kind in _KERNELS else None
        node = nodes.get(full)
        if node is not None:
            key = (None if dropout_key is None or kind is nnx.Embed
                   else path_key(dropout_key, full))
            sub.__class__ = _fast(kind, node, full, key, full in stacked, hits, misses)
            present.add(full)
        mpath = "/".join(map(str, path))
        for npath, mnode in around.get(mpath, ()):  # several on one module: nested
            key = None if dropout_key is None else path_key(dropout_key, npath)
            sub.__class__ = _around(type(sub), mnode, key, dict(context or {}))
    missed = sorted(p for p in stacked if p not in present)
    if missed:
        raise ValueError(f"{missed[0]}: a stacked adapter runs only on the fast path "
                         "(nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv and nnx.Embed)")
    return module(*args, **kwargs), nodes


def _around(kind, node, key, context):
    """A subclass of ``kind`` whose call is the module-level node's ``intercept`` of its own."""
    def call(self, *args, **kwargs):
        return node.intercept(lambda *a, **k: kind.__call__(self, *a, **k), args, kwargs,
                              dropout_key=key, **context)
    return type(kind.__name__, (kind,), {"__call__": call})


class _Merged(Exception):
    """This call has no factorized form (the reason); the layer runs on the merged kernel."""


def _fast(kind, node, path, key, mixed, hits: set, misses: dict):
    """A subclass of ``kind`` whose call runs ``node.dot`` (made per layer, at trace time).

    ``key`` is the layer's adapter-dropout key (``None`` at eval, and for
    ``nnx.Embed``). A call without a factorized form runs the layer's own
    ``__call__`` on the merged kernel the module holds, and records why in
    ``misses``; a mixed-batch adapter (``mixed``, whose module holds the base
    only) has no such form and raises. ``nnx.Embed.attend`` (a tied output
    head) always reads the merged table.
    """
    def call(self, *args, **kwargs):
        try:
            y = _factorized(kind, self, node, _bound(kind, self, args, kwargs), key, mixed)
        except _Merged as why:
            if mixed:
                raise ValueError(f"{path}: a stacked adapter runs only on the fast path, "
                                 f"which this {kind.__name__} call is not on: {why}") from None
            misses[path] = str(why)
            return kind.__call__(self, *args, **kwargs)
        hits.add(path)
        return y

    methods = {"__call__": call}
    if kind is nnx.Embed:
        def attend(self, query):
            if mixed:
                raise ValueError(f"{path}: a stacked adapter runs only on the fast path, "
                                 "which nnx.Embed.attend is not on")
            misses[path] = "nnx.Embed.attend has no factorized form"
            return kind.attend(self, query)
        methods["attend"] = attend
    return type(f"Factorized{kind.__name__}", (kind,), methods)


def _factorized(kind, module, node, call: dict, key, mixed: bool):
    """``module``'s output on ``call`` through ``node.dot``; ``_Merged`` where there is none.

    A mixed-batch node (``mixed``) reads its examples on the leading axis of the
    input and of ``op``'s output: a layer contracting that axis has no such form.
    """
    if call.get("out_sharding") is not None:
        raise _Merged(f"it takes no out_sharding (got {call['out_sharding']!r}), which "
                      "describes the layer's output, not the rank-r branch")
    if is_stacked(node):
        raise _Merged("a per-expert (expert_axis) adapter")
    held = tuple(jnp.shape(getattr(module, _KERNELS[kind])[...]))
    if held != tuple(node.shape):
        raise _Merged(f"the layer holds a {held} kernel, the adapter one of {tuple(node.shape)}")
    axes = _contracted(kind, module, call.get("einsum_str"))
    if axes is None:
        raise _Merged(f"{kind.__name__} equation with an ellipsis in its kernel")
    if axes != tuple(node.in_axes):
        raise _Merged(f"{kind.__name__} contracts kernel axes {axes}, the adapter has in_axes "
                      f"{tuple(node.in_axes)} (jlora.nnx.resolve orients it)")
    node = _layers.leading_view(node)  # input axes first, as the layers' kernels
    if node is None:
        raise _Merged(_layers.NO_LEADING_VIEW)
    x = call["inputs"]
    if kind is nnx.Embed:
        return _embed(module, node, x)
    if kind is nnx.Einsum:
        return _einsum(module, node, x, call.get("einsum_str") or module.einsum_str, key, mixed)
    if kind is nnx.Conv and (module.feature_group_count != 1 or module.mask is not None):
        # grouped: a·b mixes the output channels of other groups; masked: (K0 + s·a·b) ⊙ M
        raise _Merged("a Conv with feature_group_count > 1 or a mask")
    if kind is nnx.LinearGeneral and module.batch_axis:
        raise _Merged("a LinearGeneral with batch_axis")
    if kind is nnx.LinearGeneral and mixed and 0 in [a % x.ndim for a in module.axis]:
        raise _Merged("the LinearGeneral contracts the input's leading (example) axis")
    if kind is nnx.Linear:
        op = _linear_op(module)
        y = node.dot(x.reshape(-1, x.shape[-1]), op, dropout_key=key,
                     examples=x.shape[0] if x.ndim > 1 else 1)
        y = y.reshape(x.shape[:-1] + y.shape[-1:])
    else:  # Conv, LinearGeneral: the layer's own call on any kernel (window..., in, k...)
        y = node.dot(x, lambda x, k: kind.__call__(_with_kernel(module, k), x),
                     dropout_key=key)
    return _with_bias(module, y)


def _with_kernel(module, kernel):
    """A shallow copy of ``module`` holding ``kernel`` (a plain array), with no bias and no
    mask: its ``__call__`` is the layer's own linear map on that kernel."""
    view = object.__new__(type(module))
    vars(view).update(vars(module))
    vars(view).update(kernel=kernel, bias=None)
    if "mask" in vars(module):
        vars(view)["mask"] = None
    if "use_bias" in vars(module):
        vars(view)["use_bias"] = False
    return view


def _with_bias(module, y, shape=None):
    """``y + bias`` as the layer adds it (in its ``dtype`` when set, broadcast over the
    leading axes or reshaped to ``shape``)."""
    if module.bias is None:
        return y
    bias = module.bias[...]
    if module.dtype is not None:
        bias = bias.astype(module.dtype)
    return y + (bias if shape is None else bias.reshape(shape))


def _linear_op(module):
    """``nnx.Linear``'s map on any ``(in, k...)`` kernel (flattened rows, 2-D input)."""
    def op(x, k):
        x, k = module.promote_dtype((x, k), dtype=module.dtype)
        extra = ({} if module.preferred_element_type is None
                 else {"preferred_element_type": module.preferred_element_type})
        return module.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())),
                                  precision=module.precision, **extra)
    return op


def _embed(module, node, ids):
    def op(ids, table):
        (table,) = module.promote_dtype((table,), dtype=module.dtype, inexact=False)
        return jnp.take(table, ids, axis=0)
    return node.dot(ids, op)  # no dropout on ids (as PEFT)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum(module, node, x, eq: str, key, mixed: bool):
    """``nnx.Einsum`` through ``node.dot`` (``node`` seen with its input axes first).

    The kernel letters that index the input (``in``) are the node's input axes,
    the others (``out``) its output axes, and ``op(x, k) = einsum("x,in t->rest t",
    x, k)`` for a kernel ``k`` whose trailing axes ``t`` replace ``out``: the
    output's letters from the input (``rest``, the input's leading one first, as a
    mixed batch needs) then ``t``. The result is transposed to the equation's
    output order.
    """
    eq = eq.replace(" ", "")
    x_sub, k_sub, out_sub = _layers.einsum_parts(eq)
    if "." in eq:
        raise _Merged("an Einsum equation with an ellipsis")
    in_letters = "".join(c for c in k_sub if c in x_sub)
    out_letters = "".join(c for c in k_sub if c not in x_sub)
    if any(c not in out_sub for c in out_letters):
        raise _Merged(f"Einsum {eq!r} sums a kernel axis that is in neither input nor output")
    rest = [c for c in out_sub if c not in out_letters]
    if x_sub[0] in rest:
        rest.remove(x_sub[0])
        rest.insert(0, x_sub[0])
    elif mixed:
        raise _Merged(f"Einsum {eq!r} contracts the input's leading (example) axis")
    rest = "".join(rest)
    unused = [c for c in _LETTERS if c not in eq]

    def op(x, k):
        tail = "".join(unused[: k.ndim - len(in_letters)])
        return nnx.Einsum.__call__(_with_kernel(module, k), x,
                                   einsum_str=f"{x_sub},{in_letters}{tail}->{rest}{tail}")

    y = node.dot(x, op, dropout_key=key)  # axes: rest + out_letters
    now = rest + out_letters
    y = jnp.transpose(y, [now.index(c) for c in out_sub])
    # as the layer: the bias spans the output axes from the kernel, broadcast over the others
    shape = tuple(module.kernel_shape[k_sub.index(c)] if c in k_sub else 1 for c in out_sub)
    return _with_bias(module, y, shape)
