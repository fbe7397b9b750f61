"""Stacked kernels: mixture-of-experts weights ``(E, in, out)`` and layers stacked by
``nn.scan`` / ``nnx.scan`` (``(layers, in, out)``), adapted slice by slice.

With ``expert_axis=0`` a factorized method keeps independent factors per slice,

    a: (E, in, r),  b: (E, r, out),   K[e] = K0[e] + s·a[e]·b[e]

(QLoRA's base: one bitsandbytes weight per slice). Inside ``nn.scan`` each
iteration sees one slice of every node field; a node whose factors have lost
the stacked axis is a *slice view* and computes as an ordinary 2-D adapter. On
a whole stack, the fast path takes the layer's expert-batched linear map ``op``
(an einsum ``"ecd,edf->ecf"`` or ``jax.lax.ragged_dot`` with the routing's
group sizes) and never forms the delta:

    y = op(x, K0) + s·op(op(drop(x), a), b)

``rank_per_expert="divide"`` gives each slice rank ``max(1, rank // E)`` (the
parameter budget of one dense adapter, as SkyRL and Thinking Machines do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora.methods.base import Array, branch_dropout, from_matrix, resolve_in_axes

RANK_MODES = ("full", "divide")


def check_expert_axis(owner: str, expert_axis, rank_per_expert: str) -> None:
    if expert_axis is not None and (isinstance(expert_axis, bool) or expert_axis != 0):
        raise ValueError(f"{owner}: expert_axis must be None or 0 (the leading axis, where "
                         f"MoE layers and nn.scan stack their kernels), got {expert_axis!r}; "
                         "a kernel stacked along another axis keeps that axis between its "
                         "input and output features, which no per-slice fast path can "
                         "contract: store it stacked first (jnp.moveaxis(w, axis, 0))")
    if rank_per_expert not in RANK_MODES:
        raise ValueError(f"{owner}: rank_per_expert must be one of {RANK_MODES}, "
                         f"got {rank_per_expert!r}")
    if expert_axis is None and rank_per_expert != "full":
        raise ValueError(f"{owner}: rank_per_expert={rank_per_expert!r} divides the rank "
                         "across the slices of a stacked kernel: it needs expert_axis=0")


def check_stacking(config, *supported: str) -> None:
    """Check ``config.expert_axis`` (and ``rank_per_expert`` where the config has
    it); only the config classes named in ``supported`` build stacked nodes."""
    name = type(config).__name__
    check_expert_axis(name, config.expert_axis, getattr(config, "rank_per_expert", "full"))
    if config.expert_axis is not None and name not in supported:
        raise ValueError(f"{name}: expert_axis is not supported by {name} (no per-slice "
                         f"form); it is supported by {', '.join(supported)}")


def own_config(node):
    """The config one slice of ``node`` uses (a stacked node may split its rank
    across experts); the node's own config otherwise."""
    return slice_config(node.config, node.shape[0]) if is_stacked(node) else node.config


def slice_config(config, n_slices: int):
    """The per-slice config: no expert axis, in_axes relative to a slice, and
    rank ``max(1, rank // E)`` under ``rank_per_expert="divide"`` (the slice's
    own rank, so its ``rank_per_expert`` is ``"full"``)."""
    changes = {"expert_axis": None}
    if getattr(config, "rank_per_expert", "full") == "divide":
        changes.update(rank=max(1, config.rank // n_slices), rank_per_expert="full")
    if getattr(config, "in_axes", None) is not None:  # negative axes count from the end
        changes["in_axes"] = tuple(a - 1 if a >= 0 else a for a in config.in_axes)
    return dataclasses.replace(config, **changes)


def _check_stacked(config, base: Array, path: str) -> None:
    """A stacked kernel has an expert axis 0 and at least one in and one out axis."""
    if base.ndim < 3:
        raise ValueError(f"{path}: expert_axis=0 needs a stacked kernel (E, in..., out...) "
                         f"with at least 3 dims, got shape {tuple(base.shape)}")
    if config.in_axes is not None and 0 in [a % base.ndim for a in config.in_axes]:
        raise ValueError(f"{path}: in_axes {config.in_axes} include the expert axis 0")


def stacked_init(config, key: Array, base: Array, *, path: str):
    """``(in_axes, base, a, b, a0, b0)`` of a stacked kernel, each slice initialised
    by ``config``'s own ``init_factors`` with its own key (``in_axes`` of the
    whole kernel: the slice's shifted by one)."""
    _check_stacked(config, base, path)
    one = slice_config(config, base.shape[0])
    in_axes = resolve_in_axes(tuple(base.shape[1:]), one.in_axes, path)
    keys = jax.random.split(key, base.shape[0])

    def init(k, w):
        return one.init_factors(k, w, path=path)[1:]

    base, a, b, a0, b0 = jax.vmap(init)(keys, base)
    return tuple(i + 1 for i in in_axes), base, a, b, a0, b0


def stacked_build(config, key: Array, base: Array, *, path: str):
    """The node of a stacked kernel for any method: ``config``'s per-slice config
    builds one adapter per slice (its own key) under ``jax.vmap``; the node keeps
    every array field stacked along axis 0 and the whole kernel's static fields.
    The node class must be decorated with :func:`per_slice`."""
    config.check_leaf(base, path)
    _check_stacked(config, base, path)
    one = slice_config(config, base.shape[0])
    keys = jax.random.split(key, base.shape[0])
    node = jax.vmap(lambda k, w: one.build(k, w, path=path))(keys, base)
    return node.replace(config=config, shape=tuple(base.shape),
                        in_axes=tuple(i + 1 for i in node.in_axes))




def per_slice(cls):
    """Class decorator: a node class whose configs take ``expert_axis=0``.

    A stacked node (built by :func:`stacked_build`) computes ``delta`` and
    ``materialize`` slice by slice (``jax.vmap`` of the class's own hooks over
    the stacked fields), so ``merge`` gives ``K[e] = K0[e] + ΔK(slice e)``
    exactly; a node that ``nn.scan`` has cut to one slice computes as an
    ordinary adapter (its ``dot`` is the method's fast path); ``dot`` on the
    whole stack is the layer on the merged stack, which has no adapter branch
    to drop out: with a ``dropout_key`` and ``dropout > 0`` it raises a
    ``ValueError`` rather than train without dropout. ``partition_specs`` shards
    every field's expert axis like the base's and its other axes by the
    field's role within the slice.
    """
    def per_slice_hook(name):
        fn = getattr(cls, name)

        @functools.wraps(fn)
        def hook(self):
            if not is_stacked(self):
                return fn(self)
            view = self.replace(**slice_static(self))
            return fn(view) if is_slice(self) else jax.vmap(fn)(view)
        return hook

    for name in ("delta", "materialize"):
        setattr(cls, name, per_slice_hook(name))
    dot = cls.dot

    @functools.wraps(dot)
    def stacked_dot(self, x, op, *, dropout_key=None, **context):
        if not is_stacked(self):
            return dot(self, x, op, dropout_key=dropout_key, **context)
        if is_slice(self):
            return dot(self.replace(**slice_static(self)), x, op, dropout_key=dropout_key,
                       **context)
        if dropout_key is not None and getattr(self.config, "dropout", 0.0) > 0:
            raise ValueError(
                f"{self.method}(expert_axis=0, dropout={self.config.dropout}): a whole expert "
                f"stack of {self.method} runs on its merged weights, which have no adapter "
                "branch to drop out; set dropout=0, or use LoRA/QLoRA, whose expert fast "
                "path applies it (inside nn.scan every method applies it per slice)")
        return op(x, self.materialize())

    def partition_specs(self, entries, fold):
        if not is_stacked(self):
            return None
        from jax.sharding import PartitionSpec as P

        from jlora.sharding import node_specs

        one = node_specs(self.replace(**slice_static(self)), P(*entries[1:]))
        out = {}
        for f in dataclasses.fields(self):
            spec = getattr(one, f.name) if f.metadata.get("pytree_node", True) else None
            if isinstance(spec, P):
                out[f.name] = P(entries[0], *spec)
        return out

    def slice_view(self):
        """One slice of a stacked node whose fields ``nn.scan`` has cut."""
        return self.replace(**slice_static(self))

    cls.dot = stacked_dot
    cls.partition_specs = partition_specs
    cls.slice_view = slice_view
    return cls


def is_stacked(node) -> bool:
    return getattr(node.config, "expert_axis", None) is not None


def is_slice(node) -> bool:
    """A stacked node whose fields a map (``nn.scan``) has cut to one slice."""
    if not is_stacked(node):
        return False
    base = node.base if "base" in type(node).field_axes else None  # a field, not a property
    if base is not None:
        return base.ndim == len(node.shape) - 1
    return node.a.ndim == 2  # QLoRA: no float base


def slice_static(node) -> dict:
    """Static fields of one slice of a stacked node."""
    return {"shape": tuple(node.shape[1:]), "in_axes": tuple(i - 1 for i in node.in_axes),
            "config": slice_config(node.config, node.shape[0])}


def stacked_product(node, a: Array, b: Array, scale: float) -> Array:
    """``s·a[e]·b[e]`` for every slice, in the kernel's layout."""
    shape, in_axes = tuple(node.shape[1:]), tuple(i - 1 for i in node.in_axes)
    return jax.vmap(lambda a, b: from_matrix(scale * (a @ b), shape, in_axes))(a, b)


def lowrank_kernels(node, a: Array, b: Array) -> tuple[Array, Array]:
    """``a (E, fan_in, r)`` and ``b (E, r, fan_out)`` as kernels in the base's layout.

    ``A[e]`` has the slice's input axes and ``(r, 1, …)`` in place of its output
    axes; ``B[e]`` has ``(r, 1, …)`` in place of the input axes and the output
    axes. A layer's ``op`` therefore reads them as it reads the base.
    """
    shape, in_axes = tuple(node.shape[1:]), tuple(i - 1 for i in node.in_axes)
    outs = [i for i in range(len(shape)) if i not in in_axes]
    r = a.shape[-1]

    def rank_in(axes):  # the slice's shape with ``axes`` replaced by (r, 1, …)
        sub = dict(zip(axes, (r,) + (1,) * (len(axes) - 1)))
        return tuple(sub.get(i, d) for i, d in enumerate(shape))

    ka = jax.vmap(lambda m: from_matrix(m, rank_in(outs), in_axes))(a)
    kb = jax.vmap(lambda m: from_matrix(m, rank_in(in_axes), in_axes))(b)
    return ka, kb


def fits_lowrank(x: Array, op, node, base, ka: Array, kb: Array) -> bool:
    """True when ``op`` follows the layout the stacked fast path needs: it
    contracts ``x``'s trailing axes with the kernel's input axes and puts the
    kernel's output axes last, so ``op(op(x, A), B)`` has the shape of
    ``op(x, base)`` (``base``: an array or its ``ShapeDtypeStruct``)."""
    n_in, n_out = len(node.in_axes), len(node.shape) - 1 - len(node.in_axes)
    in_shape = tuple(node.shape[i] for i in node.in_axes)
    out_shape = tuple(d for i, d in enumerate(node.shape) if i and i not in node.in_axes)
    if tuple(jnp.shape(x)[jnp.ndim(x) - n_in:]) != in_shape:
        return False
    sds = jax.ShapeDtypeStruct
    aval = lambda v: sds(jnp.shape(v), jnp.result_type(v))
    r = kb.shape[node.in_axes[0]]  # B holds the rank at the first input axis
    try:
        y = jax.eval_shape(op, aval(x), aval(base))
        h = jax.eval_shape(op, aval(x), aval(ka))
        lead = h.shape[:h.ndim - n_out]
        if (y.shape[y.ndim - n_out:] != out_shape or lead != y.shape[:y.ndim - n_out]
                or h.shape[h.ndim - n_out:] != (r,) + (1,) * (n_out - 1)):
            return False
        h2 = sds(lead + (r,) + (1,) * (n_in - 1), h.dtype)
        return jax.eval_shape(op, h2, aval(kb)).shape == y.shape
    except Exception:  # an op that cannot take rank-sized kernels: the merged stack
        return False


def stacked_lowrank(x: Array, op, node, a: Array, b: Array, scale: float, *,
                    dropout_key: Array | None, dropout: float, base) -> Array | None:
    """``s·op(op(drop(x), A), B)``: the expert-batched low-rank branch, with ``A``,
    ``B`` from :func:`lowrank_kernels`; ``None`` when ``op`` does not fit
    (:func:`fits_lowrank`; ``base`` is the base kernel or its ``ShapeDtypeStruct``),
    and the caller runs the merged stack instead."""
    ka, kb = lowrank_kernels(node, a, b)
    if not fits_lowrank(x, op, node, base, ka, kb):
        return None
    r, n_out = a.shape[-1], len(node.shape) - 1 - len(node.in_axes)
    h = op(branch_dropout(x, dropout_key, dropout), ka)
    h = h.reshape(h.shape[:h.ndim - n_out] + (r,) + (1,) * (len(node.in_axes) - 1))
    return op(h * scale, kb.astype(h.dtype))


def factor_specs(node, entries, fold) -> dict:
    """PartitionSpecs of a (stacked or not) node's ``a``, ``b``, ``a0``, ``b0``:
    the expert axis keeps the base's mesh axis (expert parallelism), ``a``'s rows
    the input axes', ``b``'s columns the output axes'; the rank is replicated."""
    from jax.sharding import PartitionSpec as P

    stacked = is_stacked(node)
    lead = (entries[0],) if stacked else ()
    ins = fold(entries[i] for i in node.in_axes)
    outs = fold(entries[i] for i in range(len(node.shape))
                if i not in node.in_axes and not (stacked and i == 0))
    specs = {"a": P(*lead, ins, None), "b": P(*lead, None, outs)}
    specs.update(a0=specs["a"], b0=specs["b"])
    return {k: v for k, v in specs.items() if getattr(node, k, None) is not None}
