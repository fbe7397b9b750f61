"""The method protocol shared by every jlora adapter.

A method is two classes:

* a **config** (``LoRA(rank=8)``): a frozen, hashable dataclass of options that a
  ``Spec`` maps patterns to. ``config.build(key, base, path=...)`` builds a node.
* an **adapter node**: a pytree dataclass holding the frozen ``base`` array and
  the method's factors. Static options (the config, the leaf's ``shape`` and
  ``in_axes``) are pytree metadata declared once here, so ``jit``, sharding and
  Orbax only ever see arrays. A node class declares its array fields, names its
  ``trainable`` ones and their sharding roles (``field_axes``), and implements

  - ``delta()`` -> ``W - W_original`` (what ``merge``/``unmerge`` add or remove),
  - ``materialize()`` -> the full weight ``W`` (default: ``base + delta()``),
  - ``dot(x, op, *, dropout_key=None, **context)`` -> ``op(x, W)`` computed
    without forming ``W`` (the fast path; default: ``op(x, materialize())``),
    where ``op(x, kernel)`` is the host layer's linear map, applicable to any
    kernel whose leading axes are the input axes and trailing axes are outputs.
    ``context`` carries optional keywords from the caller (e.g. ``adapter_ids``);
    a method ignores the ones it does not use.

  ``core``, ``sharding``, ``checkpoint`` and ``peft`` never name a method: they
  call these hooks and ``merge_onto(leaf)``, ``unmerge_from(leaf)``,
  ``added_size()``, ``trainable`` and ``field_axes``.

Kernels of any rank are viewed as ``(fan_in, fan_out)`` matrices: ``in_axes`` are
flattened into rows, the remaining axes (in order) into columns.

Adding a method (one file; ``tests/test_new_method.py`` is a worked example):

1. A config: ``@strict_options @dataclasses.dataclass(frozen=True) class X(Config)``
   whose ``__post_init__`` checks every option with ``jlora._validate``
   (the error names the option and the value).
2. ``X.build(key, base, *, path)``: start with ``view = view_leaf(self, base, path,
   rank=...)`` (checks the dtype, resolves the axes and the rank) and return a node.
3. A node: ``class XNode(AdapterNode)`` declaring only its array fields
   (``base: Array``, factors ...), ``config_class = X``, ``trainable = (...)``
   and ``field_axes = {field: Role...}`` (every array field, one ``Role`` each).
4. ``delta()``; a factorized ``dot`` when there is one (``lowrank_dot``
   computes ``((drop(x)·a)·mid·scale)·b·out``), and ``merge_onto``/``added_size``
   only if the defaults do not fit.
5. Defining the two classes registers the method (``REGISTRY``); export it
   from ``jlora/methods/__init__.py`` if it is part of the public API.
6. Tests against a float64 numpy reference of the paper's formula, and a doctest.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora._validate import floating_dtype, int_tuple
from jlora.tree import Array, NodeBase, Role

# ``op(x, kernel) -> y``: the host layer's linear map for a kernel of shape
# ``in_shape + out_shape`` (any out_shape), output axes last.
LinearOp = Callable[[Array, Array], Array]

#: method name -> (config class, node class), filled in by defining the classes.
REGISTRY: dict[str, tuple[type, type | None]] = {}
#: config class name -> config class (every ``Config`` subclass).
CONFIGS: dict[str, type] = {}
#: node class name -> node class (every ``AdapterNode`` subclass).
NODES: dict[str, type] = {}


def _register(table: dict, name: str, cls: type) -> None:
    old = table.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"jlora method name {name!r} is taken by {old.__module__}."
                         f"{old.__qualname__}; give {cls.__module__}.{cls.__qualname__} "
                         "another class name")
    table[name] = cls


class AdapterNode(struct.PyTreeNode, NodeBase, kw_only=True):
    """Base class of adapter nodes: keyword-only pytree dataclasses.

    Subclasses declare only their array fields; ``config``, ``shape`` (the base
    leaf's shape) and ``in_axes`` are declared here as static metadata.
    """

    config: Any = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    in_axes: tuple[int, ...] = struct.field(pytree_node=False)

    #: names of the fields ``jlora.split`` puts in the trainable half
    trainable: ClassVar[tuple[str, ...]] = ()
    #: display name (``summary``); default: the config class's name
    method: ClassVar[str] = "?"
    #: the config class this node is built from (registers the method)
    config_class: ClassVar[type | None] = None
    #: sharding role of every array field (see :class:`jlora.tree.Role`)
    field_axes: ClassVar[dict[str, Role]] = {}

    def __init_subclass__(cls, **kwargs):
        kwargs.setdefault("kw_only", True)
        super().__init_subclass__(**kwargs)
        arrays = [f.name for f in dataclasses.fields(cls) if f.metadata.get("pytree_node", True)]
        roles = {}
        for name, role in cls.field_axes.items():
            if name not in arrays:
                raise ValueError(f"{cls.__name__}.field_axes names {name!r}, which is not an "
                                 f"array field of {cls.__name__} (fields: {arrays})")
            try:
                roles[name] = Role(role)
            except ValueError:
                raise ValueError(f"{cls.__name__}.field_axes[{name!r}] = {role!r} is not a "
                                 f"sharding role; use one of {[r.value for r in Role]}") from None
        missing = [f for f in arrays if f not in roles]
        if missing:
            raise ValueError(f"{cls.__name__}: array field(s) {missing} have no sharding role "
                             "in field_axes")
        cls.field_axes = roles
        if isinstance(cls.__dict__.get("trainable"), tuple):
            bad = [f for f in cls.trainable if f not in arrays]
            if bad:
                raise ValueError(f"{cls.__name__}.trainable names {bad}, which are not array "
                                 f"fields (fields: {arrays})")
        config_cls = cls.__dict__.get("config_class")
        if "method" not in cls.__dict__:
            cls.method = config_cls.__name__ if config_cls else cls.__name__.removesuffix("Node")
        _register(NODES, cls.__name__, cls)
        if config_cls is not None:
            REGISTRY[config_cls.__name__] = (config_cls, cls)

    # ------------------------------------------------------------ the math

    def delta(self) -> Array:
        """``W - W_original``: what ``merge`` adds to (and ``unmerge`` removes from) a weight."""
        raise NotImplementedError(f"{type(self).__name__} defines no delta()")

    def materialize(self) -> Array:
        """``base + delta()`` in :func:`accumulation_dtype` precision, cast back to the
        base dtype: bfloat16 factors do not round a float32 base."""
        d = self.delta()
        acc = accumulation_dtype(self.base.dtype, d.dtype)
        return (self.base.astype(acc) + d.astype(acc)).astype(self.base.dtype)

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        """``op(x, W)``; default: the layer applied to the materialized weight (always correct).

        ``dropout_key`` is for methods with adapter-branch dropout; ``context``
        holds optional keywords (e.g. ``adapter_ids``) for the methods that use them.
        """
        return op(x, self.materialize())

    # ------------------------------------------------------------ hooks

    def merge_onto(self, leaf: Array) -> Array:
        """``leaf + delta()`` (in at least float32), in ``leaf``'s dtype: ``merge(onto=...)``."""
        dt = jnp.promote_types(leaf.dtype, jnp.float32)
        return (leaf.astype(dt) + self.delta()).astype(leaf.dtype)

    def unmerge_from(self, leaf: Array) -> Array:
        """``leaf - delta()`` in ``leaf``'s dtype: the inverse of :meth:`merge_onto`."""
        dt = jnp.promote_types(leaf.dtype, jnp.float32)
        return (leaf.astype(dt) - self.delta()).astype(leaf.dtype)

    def trainable_size(self) -> int:
        """Number of trainable parameters (present trainable fields)."""
        return sum(_size(getattr(self, f)) for f in self.trainable
                   if getattr(self, f) is not None)

    def added_size(self) -> int:
        """Parameters the adapter adds to the model's count (default: the trainable ones)."""
        return self.trainable_size()

    def half(self) -> str | None:
        """``"trainable"``/``"frozen"`` if this is one half of ``jlora.split``, else ``None``."""
        train = set(self.trainable)
        arrays = [f.name for f in dataclasses.fields(self) if f.metadata.get("pytree_node", True)]
        if any(getattr(self, f) is None for f in train):
            return "frozen"
        others = [f for f in arrays if f not in train]
        if others and all(getattr(self, f) is None for f in others):
            return "trainable"
        return None

    @property
    def delta_fields(self) -> tuple[str, ...]:
        """The array fields ``delta`` reads: a trainable half holding them all
        merges onto (and unmerges from) any copy of the base on its own."""
        return tuple(self.trainable)

    @property
    def rank(self) -> int | None:
        """The config's ``rank`` (``None`` for methods without one)."""
        return getattr(self.config, "rank", None)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.shape) if i not in self.in_axes)


def _size(x) -> int:
    return int(np.prod(x.shape))


# ---------------------------------------------------------------- kernel views


def resolve_in_axes(shape: tuple[int, ...], in_axes: tuple[int, ...] | None, path: str):
    """Normalise ``in_axes`` for a leaf of ``shape``; default: all but the last axis."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{path}: a low-rank adapter needs a leaf with at least 2 dimensions, "
            f"got shape {shape}; use jlora.Full() to train it in full"
        )
    if in_axes is None:
        return tuple(range(ndim - 1))
    axes = tuple(sorted(a % ndim for a in in_axes))
    if len(set(axes)) != len(axes) or not axes or len(axes) == ndim or any(
        not -ndim <= a < ndim for a in in_axes
    ):
        raise ValueError(
            f"{path}: in_axes={in_axes} is not a proper subset of the axes of a "
            f"leaf of shape {shape}"
        )
    return axes


def _perm(ndim: int, in_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(in_axes) + tuple(i for i in range(ndim) if i not in in_axes)


def to_matrix(w: Array, in_axes: tuple[int, ...]) -> Array:
    """View a kernel as ``(fan_in, fan_out)``."""
    perm = _perm(w.ndim, in_axes)
    fan_in = math.prod(w.shape[i] for i in in_axes)
    return jnp.transpose(w, perm).reshape(fan_in, -1)


def from_matrix(m: Array, shape: tuple[int, ...], in_axes: tuple[int, ...]) -> Array:
    """Inverse of :func:`to_matrix`."""
    perm = _perm(len(shape), in_axes)
    w = m.reshape(tuple(shape[i] for i in perm))
    return jnp.transpose(w, np.argsort(perm))


def leading_in_axes(node: AdapterNode) -> bool:
    """True when the input axes come first, as layers' kernels lay them out."""
    return node.in_axes == tuple(range(len(node.in_axes)))


class LeafView(NamedTuple):
    """A leaf seen as a ``(fan_in, fan_out)`` matrix, as :func:`view_leaf` returns it."""

    in_axes: tuple[int, ...]  # normalised input axes
    fan_in: int
    fan_out: int
    dtype: Any  # the factors' dtype (``factor_dtype``)
    shape: tuple[int, ...]  # the leaf's shape


def view_leaf(config: "Config", base: Array, path: str, *, rank: int | None = None,
              rank_name: str = "rank") -> LeafView:
    """The prologue of every factorized ``build``: check the leaf, resolve its axes.

    Raises a ``ValueError`` naming ``path`` for a non-floating leaf (integer and
    boolean leaves are never adapted), a leaf of fewer than 2 axes, bad
    ``config.in_axes``, or ``rank > min(fan_in, fan_out)``.

        >>> import jax.numpy as jnp, jlora
        >>> from jlora.methods.base import view_leaf
        >>> view_leaf(jlora.LoRA(rank=2), jnp.ones((3, 4, 5)), "w").fan_in
        12
    """
    config.check_leaf(base, path)
    in_axes = resolve_in_axes(tuple(base.shape), getattr(config, "in_axes", None), path)
    fan_in = math.prod(base.shape[i] for i in in_axes)
    fan_out = math.prod(d for i, d in enumerate(base.shape) if i not in in_axes)
    if rank is not None and rank > min(fan_in, fan_out):
        raise ValueError(f"{path}: {rank_name} {rank} exceeds min(fan_in, fan_out) = "
                         f"{min(fan_in, fan_out)} for a leaf of shape {tuple(base.shape)}")
    return LeafView(in_axes, fan_in, fan_out,
                    factor_dtype(base.dtype, getattr(config, "dtype", None)), tuple(base.shape))


# ---------------------------------------------------------------- low-rank math


def branch_dropout(x: Array, key: Array | None, rate: float) -> Array:
    """Inverted dropout of ``x`` (identity without a key or at rate 0)."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dropped_delta_dot(x: Array, op: LinearOp, node: AdapterNode, delta: Callable[[], Array],
                      dropout_key: Array | None, rate: float) -> Array:
    """``op(x, K0) + op(drop(x), ΔK)`` for an op the low-rank branch cannot take (``delta()``:
    ``ΔK`` laid out like the base); without a key or at rate 0, ``op(x, K0 + ΔK)`` merged."""
    if dropout_key is None or rate == 0:
        return op(x, node.materialize())
    y = op(x, node.base)
    d = op(branch_dropout(x, dropout_key, rate), delta().astype(node.base.dtype))
    return y + d.astype(y.dtype)


def lowrank_in(x: Array, op: LinearOp, node: AdapterNode, a: Array, *, mid: Array | None = None,
               scale: float = 1.0, dropout_key: Array | None = None, dropout: float = 0.0) -> Array:
    """The rank-``r`` activations ``op(drop(x), a) · mid · scale``, shape ``(..., r)``."""
    x = branch_dropout(x, dropout_key, dropout)
    h = down_projection(op, x, a.reshape(node.in_shape + (a.shape[-1],)))
    return h * (scale if mid is None else mid * scale)


def _is_trailing_contraction(op: LinearOp, x: Array, kernel: Array) -> bool:
    """True when ``op(x, kernel)`` is one ``dot_general`` of ``x``'s trailing axes with
    ``kernel``'s leading ones (dtype conversions aside), as Dense-like layers compute."""
    n_in = kernel.ndim - 1
    try:
        jaxpr = jax.make_jaxpr(op)(jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)).jaxpr
    except Exception:  # an op that cannot be traced on its own: keep autodiff's VJP
        return False
    eqns = [e for e in jaxpr.eqns if e.primitive.name != "convert_element_type"]
    if len(eqns) != 1 or eqns[0].primitive.name != "dot_general":
        return False
    want = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqns[0].params["dimension_numbers"]
    got = ((tuple(lhs_c), tuple(rhs_c)), (tuple(lhs_b), tuple(rhs_b)))
    lhs, rhs = eqns[0].invars
    converted = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns
                 if e.primitive.name == "convert_element_type"}
    return (got == want and converted.get(lhs, lhs) is jaxpr.invars[0]
            and converted.get(rhs, rhs) is jaxpr.invars[1])


def down_projection(op: LinearOp, x: Array, kernel: Array) -> Array:
    """``op(x, kernel)`` for a rank-``r`` kernel ``(*in_shape, r)``; when ``op`` is a
    Dense-like contraction, with a VJP whose kernel gradient XLA:CPU computes fast.

    Autodiff writes ``dkernel = Σ_tokens x ⊗ dh`` as a ``(fan_in, r)`` product
    with the token axis contracted on both sides, which XLA:CPU runs 1.5-6x
    slower than the same product laid out ``(r, fan_in)`` (1024 tokens, rank 8:
    0.6 vs 0.25 ms at fan_in 384, 2.5 vs 0.4 ms at 1024, 8.2 vs 1.6 ms at 4096).
    The VJP computes the latter and transposes the small result; an
    ``optimization_barrier`` keeps XLA from folding the transpose back into the
    product. Other ops (convolutions, gathers, einsums with transposes) keep
    autodiff's VJP.

        >>> import jax, jax.numpy as jnp
        >>> from jlora.methods.base import down_projection
        >>> x, a = jnp.ones((4, 6)), jnp.ones((6, 2))
        >>> jax.grad(lambda a: down_projection(lambda x, k: x @ k, x, a).sum())(a).shape
        (6, 2)
    """
    if not _is_trailing_contraction(op, x, kernel):
        return op(x, kernel)

    @jax.custom_vjp
    def project(x, kernel):
        return op(x, kernel)

    def fwd(x, kernel):
        return op(x, kernel), (x, kernel)

    def bwd(res, dh):
        x, kernel = res
        dx = jax.vjp(lambda x: op(x, kernel), x)[1](dh)[0]
        lead = tuple(range(x.ndim - (kernel.ndim - 1)))
        dk = jax.lax.dot_general(dh, x.astype(dh.dtype), ((lead, lead), ((), ())))  # (r, *in)
        dk = jnp.moveaxis(jax.lax.optimization_barrier(dk), 0, -1)
        return dx, dk.astype(kernel.dtype)

    project.defvjp(fwd, bwd)
    return project(x, kernel)


def lowrank_dot(x: Array, op: LinearOp, node: AdapterNode, a: Array, b: Array, *,
                mid: Array | None = None, out: Array | None = None, scale: float = 1.0,
                dropout_key: Array | None = None, dropout: float = 0.0) -> Array:
    """The low-rank term ``((op(drop(x), a) · mid · scale) · b) · out`` of a fast path.

    ``a (fan_in, r)`` is laid out as an ``in_shape + (r,)`` kernel for ``op``,
    ``b (r, fan_out)`` is contracted with a ``tensordot``; ``mid (r,)`` scales
    the rank axis (VeRA's ``λ_d``, AdaLoRA's ``λ``), ``out (fan_out,)`` the
    output features (VeRA's ``λ_b``). LoRA is ``mid = out = None``. The result
    has the layer's output axes; the caller adds it to ``op(x, base)``.
    """
    h = lowrank_in(x, op, node, a, mid=mid, scale=scale, dropout_key=dropout_key, dropout=dropout)
    lo = jnp.tensordot(h, b.reshape((a.shape[-1],) + node.out_shape).astype(h.dtype), axes=1)
    if out is not None:
        lo = lo * out.reshape(node.out_shape)
    return lo



def accumulation_dtype(*dtypes) -> jnp.dtype:
    """The precision merges and deltas are computed in: the widest of ``dtypes`` and
    float32 (bfloat16 factors must not round a float32 base, nor cancel in a difference)."""
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def base_plus_lowrank(x: Array, op: LinearOp, node: AdapterNode, a: Array, b: Array,
                      **kwargs: Any) -> Array:
    """``op(x, base) + lowrank_dot(x, op, node, a, b, **kwargs)`` in the output's dtype.

    Falls back to ``op(x, materialize())`` when the input axes do not lead.
    """
    if not leading_in_axes(node):
        return op(x, node.materialize())
    y = op(x, node.base)
    return y + lowrank_dot(x, op, node, a, b, **kwargs).astype(y.dtype)


def lowrank_svd(a: Array, b: Array) -> tuple[Array, Array, Array]:
    """Thin SVD ``u·diag(s)·vt = a·b`` without forming the ``(fan_in, fan_out)`` product.

    QR of ``a`` and of ``bᵀ``, then the SVD of the small core ``R_a·R_bᵀ``:
    ``a·b = Q_a·(R_a·R_bᵀ)·Q_bᵀ``. Costs ``O((fan_in + fan_out)·r²)``.

        >>> import jax, jax.numpy as jnp
        >>> from jlora.methods.base import lowrank_svd
        >>> a = jax.random.normal(jax.random.key(0), (6, 2))
        >>> b = jax.random.normal(jax.random.key(1), (2, 5))
        >>> u, s, vt = lowrank_svd(a, b)
        >>> bool(jnp.allclose((u * s) @ vt, a @ b, atol=1e-5)), s.shape
        (True, (2,))
    """
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(b.T)
    u, s, vt = jnp.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, vt @ qb.T


# ---------------------------------------------------------------- configs


def strict_options(cls):
    """Make a config dataclass reject unknown keyword options with a ValueError.

    A misspelt option (``LoRA(rank=8, rs_lora=True)``) must never be dropped
    silently: the error names it and lists what the config accepts.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {unknown}; "
                f"known options: {names}"
            )
        if len(args) > len(names):
            raise ValueError(f"{cls.__name__}: too many positional options {args}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


class Config:
    """Base class of method configs (frozen dataclasses); subclasses register themselves."""

    #: whether the method's math is the same whichever kernel axes a layer contracts
    #: (``jlora.linen.resolve`` then needs no orientation for it)
    orientation_free: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(CONFIGS, cls.__name__, cls)
        REGISTRY.setdefault(cls.__name__, (cls, None))

    def build(self, key: Array, base: Array, *, path: str) -> AdapterNode:
        """The adapter node for leaf ``base`` at ``path`` (random init from ``key``)."""
        raise NotImplementedError

    def companion(self, path: str) -> str | None:
        """Path of a sibling leaf this rule also adapts (GLoRA: the bias); default none."""
        return None

    def build_companion(self, key: Array, leaf: Array | None, target: Array, *,
                        path: str) -> AdapterNode | None:
        """The node for the companion leaf ``leaf`` (``None`` if absent) of ``target``."""
        raise NotImplementedError

    def check_leaf(self, base: Array, path: str) -> None:
        """A ``ValueError`` naming ``path`` unless ``base`` is a floating-point array."""
        if not jnp.issubdtype(base.dtype, jnp.floating):
            raise ValueError(
                f"{path}: {type(self).__name__} needs a floating-point leaf, "
                f"got dtype {base.dtype} (integer and boolean leaves are never adapted)"
            )


def freeze_in_axes(config) -> None:
    """Check a config's ``in_axes`` and ``dtype`` options; store ``in_axes`` as a tuple.

    ``in_axes``: ``None`` or a sequence of ints (configs are hashable static
    metadata); ``dtype``: ``None`` or a floating dtype, stored by name
    (``jnp.bfloat16`` -> ``"bfloat16"``). Errors name the option.
    """
    owner = type(config).__name__
    if getattr(config, "in_axes", None) is not None:
        object.__setattr__(config, "in_axes", int_tuple(owner, "in_axes", config.in_axes,
                                                        nonempty=True))
    dtype = floating_dtype(owner, "dtype", getattr(config, "dtype", None), allow_none=True)
    if dtype is not None:  # by name, so the config equals its JSON round trip
        object.__setattr__(config, "dtype", dtype)


def factor_dtype(base_dtype, dtype) -> jnp.dtype:
    """Factors default to at least float32, whatever the base precision."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(base_dtype, jnp.float32)
