"""Intrinsic-dimension training: ``θ = θ0 + P·θ_d`` through one shared ``θ_d``.

Li, Farkhoor, Liu & Yosinski, "Measuring the Intrinsic Dimension of Objective
Landscapes" (ICLR 2018, §2 and §S5–S7; code: uber-research/intrinsic-dimension)
train a whole network in a random ``d``-dimensional subspace of its ``D``
parameters: every targeted weight is a slice of

    θ^(D) = θ0^(D) + P · θ^(d),      θ^(d) = 0 at init,   P: (D, d) fixed and random,

and only ``θ^(d)`` is trained. ``d90`` is the smallest ``d`` whose accuracy
reaches 90% of full training's (MNIST FC 784-200-200-10: ``d90 = 750``).
Aghajanyan, Zettlemoyer & Gupta (ACL 2021, §3) apply the same Fastfood
reparameterisation to fine-tuning (RoBERTa on MRPC reaches 90% of full
fine-tuning with about 200 parameters). Their structure-aware variant (SAID,
``said=True``) gives each of the ``m`` reparameterised tensors its own
trained scale inside the same budget of ``d`` numbers:

    θ^(D)_i = θ0^(D)_i + λ_i · (P · θ^(d−m))_i,    λ ∈ R^m,   θ^(d−m) = 0 at init,

``i`` ranging over the entries of tensor ``i`` (here one "layer" is one
targeted leaf: a kernel, a bias). The paper does not state ``λ``'s start
(**unconfirmed**); it starts at 1, so SAID begins exactly where the plain
method does and ``λ`` gets a gradient from the first step on (at ``λ = 0``
both ``λ`` and ``θ^(d−m)`` would have zero gradient).

Projections (``P``'s columns have unit norm, as the paper asks, so a step on
``θ^(d)`` moves ``θ^(D)`` by the same length):

* ``"dense"``: ``P = G / ‖G‖_col`` with ``G ~ N(0, 1)^(D×d)``; ``O(D·d)``
  time and memory per use: small models only.
* ``"sparse"``: very sparse random projection (Li, Hastie & Church 2006), the
  paper's density ``1/√D``: each column holds ``k = ⌈√D⌉`` entries ``±1`` at
  rows drawn uniformly (with replacement; repeated rows add), then normalised
  exactly. ``O(d·√D)`` (a fixed count per column instead of a Bernoulli mask,
  so no ``D×d`` mask is ever drawn).
* ``"fastfood"`` (the paper's §S7, Le, Sarlós & Smola 2013): pad ``θ^(d)`` with
  zeros to ``L = 2^⌈log₂ D⌉``, apply ``H·G·Π·H·B`` (``H`` the unnormalised
  ``L×L`` Walsh–Hadamard matrix, ``B`` a diagonal of random ``±1``, ``Π`` a
  random permutation, ``G`` a diagonal of ``N(0, 1)``), keep the first ``D``
  entries and divide by ``√(L·ΣG²)·√(D/L) = √(D·ΣG²)``. Every column of
  ``H·G·Π·H·B`` has squared norm exactly ``L·ΣG²``, so keeping ``D`` of its
  ``L`` rows leaves columns of norm ≈ 1 (exactly 1 when ``D`` is a power of
  two). One block suffices because ``d ≤ D ≤ L`` (the code's layout; the
  reference implementation likewise never stacks blocks). ``O(L log L)`` time
  with the fast Walsh–Hadamard transform; ``P`` is never formed.

The projection is a function of ``key`` only: the node stores the key (a
frozen, replicated field) and ``θ_d``, never ``P``, and draws ``B, Π, G`` (or
the dense / sparse entries) inside the computation. ``D`` is the number of
entries of the module's floating leaves (those matching ``include``), laid
out in the tree's path order.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jlora.methods.subspace import fastfood, fastfood_factors
    >>> f = fastfood_factors(jax.random.key(0), 8)
    >>> cols = jnp.stack([fastfood(e, f, 8) for e in jnp.eye(3)], 1)  # P, 8 x 3
    >>> bool(jnp.allclose(jnp.linalg.norm(cols, axis=0), 1.0, atol=1e-5))  # D = L: unit columns
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from jlora import _validate as v
from jlora.methods._module import ModuleConfig, ModuleNode
from jlora.methods.base import factor_dtype, freeze_in_axes, strict_options
from jlora.tree import Array, PyTree, Role, is_node, leaves_with_paths, map_with_paths

PROJECTIONS = ("fastfood", "dense", "sparse")


# ------------------------------------------------------------------ transforms


def fwht(x: Array) -> Array:
    """Unnormalised fast Walsh–Hadamard transform along the last axis: ``x·H_L``.

    ``H_L`` is Sylvester's ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``
    (symmetric, ``H·H = L·I``); ``L`` must be a power of two. ``log₂ L``
    butterfly stages of ``O(L)`` each.

        >>> import jax.numpy as jnp
        >>> fwht(jnp.array([1.0, 0, 1, 0, 0, 1, 1, 0])).tolist()
        [4.0, 2.0, 0.0, -2.0, 0.0, 2.0, 0.0, 2.0]
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht: the last axis must have a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return x


class FastfoodFactors(NamedTuple):
    """The random diagonals of one Fastfood block of size ``L = 2^⌈log₂ D⌉``."""

    b: Array      #: (L,) random ±1 (``B``)
    perm: Array   #: (L,) int32 permutation: ``(Π·v)_i = v[perm[i]]``
    g: Array      #: (L,) N(0, 1) (``G``)


def padded_size(size: int) -> int:
    """``L = 2^⌈log₂ size⌉``."""
    return 1 << max(int(size) - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnums=(1, 2))
def fastfood_factors(key: Array, size: int, dtype=jnp.float32) -> FastfoodFactors:
    """``B, Π, G`` for a Fastfood projection onto ``size = D`` entries, drawn from ``key``."""
    n = padded_size(size)
    kb, kp, kg = jax.random.split(key, 3)
    b = jnp.where(jax.random.bernoulli(kb, 0.5, (n,)), 1.0, -1.0).astype(dtype)
    # a uniformly random permutation up to ties among 32-bit keys (one sort)
    perm = jnp.argsort(jax.random.bits(kp, (n,), jnp.uint32)).astype(jnp.int32)
    g = jax.random.normal(kg, (n,), dtype)
    return FastfoodFactors(b, perm, g)


@functools.partial(jax.jit, static_argnums=2)
def fastfood(theta: Array, factors: FastfoodFactors, size: int) -> Array:
    """``P·θ`` for the Fastfood ``P`` (``(size, d)``, ``d = θ.shape[0] ≤ size``), in ``O(L log L)``.

    ``P·θ = (H·G·Π·H·B·pad_L(θ))[:size] / √(size·ΣG²)`` (Li et al. 2018, §S7).
    """
    n = factors.b.shape[0]
    d = theta.shape[0]
    if d > size or n != padded_size(size):
        raise ValueError(f"fastfood: need d <= D and factors of length {padded_size(size)}; "
                         f"got d={d}, D={size}, factors of length {n}")
    x = jnp.pad(theta.astype(factors.g.dtype), (0, n - d)) * factors.b
    x = fwht(x)[factors.perm] * factors.g
    x = fwht(x)[:size]
    return x / jnp.sqrt(size * jnp.sum(factors.g ** 2))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def dense_projection(key: Array, size: int, dim: int, dtype=jnp.float32) -> Array:
    """The dense ``P`` ``(size, dim)``: N(0, 1) entries, columns scaled to unit norm."""
    p = jax.random.normal(key, (size, dim), dtype)
    return p / jnp.linalg.norm(p, axis=0)


class SparseColumns(NamedTuple):
    """A sparse ``P`` by columns: ``P[rows[j, i], j] += signs[j, i] * scale[j]``."""

    rows: Array   #: (d, k) int32 row of each nonzero
    signs: Array  #: (d, k) ±1
    scale: Array  #: (d,) 1 / (the column's norm), so every column has unit norm


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def sparse_projection(key: Array, size: int, dim: int, dtype=jnp.float32) -> SparseColumns:
    """A very sparse ``P`` ``(size, dim)``: ``⌈√size⌉`` entries ``±1`` per column, unit columns."""
    k = math.isqrt(size - 1) + 1 if size > 1 else 1
    kr, ks = jax.random.split(key)
    rows = jax.random.randint(kr, (dim, k), 0, size, jnp.int32)
    signs = jnp.where(jax.random.bernoulli(ks, 0.5, (dim, k)), 1.0, -1.0).astype(dtype)

    def column_norm(r, s):  # repeated rows add: sum the signs of equal rows first
        order = jnp.argsort(r)
        r, s = r[order], s[order]
        seg = jnp.cumsum(jnp.concatenate([jnp.zeros(1, jnp.int32), (r[1:] != r[:-1]).astype(jnp.int32)]))
        return jnp.sqrt(jnp.sum(jax.ops.segment_sum(s, seg, num_segments=k) ** 2))

    norm = jax.vmap(column_norm)(rows, signs)
    scale = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    return SparseColumns(rows, signs, scale.astype(dtype))


@functools.partial(jax.jit, static_argnums=2)
def sparse_project(theta: Array, cols: SparseColumns, size: int) -> Array:
    """``P·θ`` for a :class:`SparseColumns` ``P``: a scatter-add of ``d·k`` entries."""
    vals = cols.signs * (theta.astype(cols.signs.dtype) * cols.scale)[:, None]
    return jnp.zeros(size, vals.dtype).at[cols.rows.reshape(-1)].add(vals.reshape(-1))


def draw(key: Array, size: int, dim: int, projection: str = "fastfood", dtype=jnp.float32):
    """The random parts of a projection: :class:`FastfoodFactors`, the dense ``P`` or
    :class:`SparseColumns`."""
    v.choice("jlora.methods.subspace.draw", "projection", projection, PROJECTIONS)
    if projection == "fastfood":
        return fastfood_factors(key, size, dtype)
    if projection == "dense":
        return dense_projection(key, size, dim, dtype)
    return sparse_projection(key, size, dim, dtype)


def apply_drawn(theta: Array, parts: Any, size: int) -> Array:
    """``P·θ`` from the parts :func:`draw` returned."""
    if isinstance(parts, FastfoodFactors):
        return fastfood(theta, parts, size)
    if isinstance(parts, SparseColumns):
        return sparse_project(theta, parts, size)
    return parts @ theta.astype(parts.dtype)


def project(theta: Array, key: Array, size: int, projection: str = "fastfood") -> Array:
    """``P·θ`` ``(size,)`` for the ``projection`` ``P`` drawn from ``key`` (``θ``: ``(d,)``).

    Computed in at least float32, whatever ``θ``'s dtype.
    """
    dt = jnp.promote_types(theta.dtype, jnp.float32)
    return apply_drawn(theta, draw(key, size, theta.shape[0], projection, dt), size)


# ------------------------------------------------------------------ layout


def key_tuple(owner: str, key: Any) -> int | tuple[int, ...] | None:
    """``key`` as hashable, JSON-ready static data: ``None``, an int seed or a key's raw words."""
    if key is None:
        return None
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        seed = v.positive_int(owner, "key", int(key), minimum=0)
        if seed >= 2**32:  # without x64 jax.random.key keeps the low 32 bits: aliasing
            raise ValueError(f"{owner}: an int key must be a seed in [0, 2**32) (without x64, "
                             f"jax.random.key keeps only its low 32 bits), got {seed!r}")
        return seed
    if isinstance(key, (list, tuple)) and key and all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= k < 2**32
            for k in key):
        return tuple(int(k) for k in key)
    try:
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        data = np.asarray(key)
        if data.dtype != np.uint32 or data.ndim != 1 or data.size == 0:
            raise TypeError
    except (AttributeError, TypeError):
        raise ValueError(f"{owner}: key must be None, an int seed in [0, 2**32) or a jax "
                         f"PRNG key, got {key!r}") from None
    return tuple(int(k) for k in data)


def key_array(key: int | tuple[int, ...]) -> Array:
    """The PRNG key a :func:`key_tuple` value stands for."""
    if isinstance(key, int):
        return jax.random.key(key)
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def select(leaves: list[tuple[str, Any]], include: tuple[str, ...] | None,
           where: str = "<root>") -> list[str]:
    """Relative paths of the floating array leaves that ``include`` (globs, or all) selects.

    Each glob must select some leaf, as each rule of a ``jlora.Spec`` must: a typo would
    otherwise shrink the subspace without a word."""
    from jlora.spec import glob_to_regex

    pats = None if include is None else [re.compile(glob_to_regex(g)) for g in include]
    out, used = [], set()
    for p, leaf in leaves:
        if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        hits = [i for i, r in enumerate(pats or []) if r.fullmatch(p)]
        used.update(hits)
        if pats is None or hits:
            out.append(p)
    unused = [g for i, g in enumerate(include or ()) if i not in used]
    if out and unused:
        raise ValueError(f"{where}: Subspace include glob {unused[0]!r} matches no floating-point "
                         f"leaf of the module (its leaves: {[p for p, _ in leaves][:6]})")
    return out


# ------------------------------------------------------------------ the method


@strict_options
@dataclasses.dataclass(frozen=True)
class Subspace(ModuleConfig):
    """Train every floating leaf of a module (or of the whole tree) through one ``θ_d``.

    A module-level rule: ``Spec({"": Subspace(1000)})`` reparameterises the whole
    tree, ``Spec({"encoder": Subspace(200, include=("**/kernel",))})`` the
    kernels under ``encoder``. The node sits beside the module (``"encoder@subspace"``,
    ``"@subspace"`` for the root) and holds ``θ_d`` (trainable, zeros) and the
    projection's key (frozen); the module's own params stay the frozen ``θ0``.

    Args:
      dim: ``d``, the number of trained parameters (``1 <= d <= D``).
      projection: ``"fastfood"`` (default, ``O(D log D)``), ``"dense"`` (``O(D·d)``:
        small models) or ``"sparse"`` (density ``1/√D``).
      key: the projection's key: an int seed in ``[0, 2**32)`` or a jax PRNG key; ``None``
        (default) derives it from ``jlora.apply``'s key and the module path.
      include: globs, relative to the module, of the leaves to reparameterise
        (default: every floating leaf under it).
      dtype: dtype of ``θ_d``; default float32.
      said: SAID (Aghajanyan et al., §3): ``m`` of the ``d`` trained numbers are
        one scale ``λ_i`` per targeted leaf (starting at 1) and ``P`` maps the
        other ``d − m``: ``θ_i = θ0_i + λ_i·(P·θ_{d−m})_i``. Needs ``d > m``.
      cache: ``False`` (default): the node stores only the key and every use
        draws the projection again (no memory beyond ``θ_d``; the draw costs a
        sort of ``L`` keys for Fastfood). ``True``: ``jlora.apply`` draws it once
        and the node keeps the parts as a frozen, replicated field (Fastfood: three
        length-``L`` diagonals; sparse: ``d·⌈√D⌉`` entries; dense: ``P`` itself):
        faster steps for that memory. Either way the values are the same.
    """

    dim: int = 1000
    projection: str = "fastfood"
    key: Any = None
    include: tuple[str, ...] | None = None
    dtype: Any = None
    cache: bool = False
    said: bool = False

    def __post_init__(self):
        v.positive_int("Subspace", "dim", self.dim)
        v.boolean("Subspace", "cache", self.cache)
        v.boolean("Subspace", "said", self.said)
        v.choice("Subspace", "projection", self.projection, PROJECTIONS)
        object.__setattr__(self, "key", key_tuple("Subspace", self.key))
        inc = self.include
        if inc is not None:
            inc = (inc,) if isinstance(inc, str) else inc
            if (not isinstance(inc, (tuple, list)) or not inc
                    or not all(isinstance(g, str) and g for g in inc)):
                raise ValueError(f"Subspace: include must be None or a non-empty tuple of glob "
                                 f"strings, got {self.include!r}")
            object.__setattr__(self, "include", tuple(inc))
        freeze_in_axes(self)

    def build_module(self, key: Array, module_params: PyTree, *, path: str) -> "SubspaceNode":
        leaves = [(p, x) for p, x in leaves_with_paths(module_params) if not is_node(x)]
        where = path or "<root>"
        targets = select(leaves, self.include, where)
        if not targets:
            raise ValueError(f"{where}: Subspace finds no floating-point leaf to reparameterise"
                             + (f" matching include={list(self.include)}" if self.include else ""))
        by_path = dict(leaves)
        shapes = tuple(tuple(int(s) for s in by_path[p].shape) for p in targets)
        size = sum(math.prod(s) for s in shapes)
        if self.dim > size:
            raise ValueError(f"{where}: Subspace dim={self.dim} exceeds D={size}, the number of "
                             "parameters it reparameterises (d <= D)")
        # SAID spends m of the d numbers on one scale per targeted leaf
        m = len(targets) if self.said else 0
        if self.dim <= m:
            raise ValueError(f"{where}: Subspace(said=True) needs dim > {m}, the number of "
                             f"leaves it scales (one λ each, inside dim), got dim={self.dim}")
        k = key if self.key is None else key_array(self.key)
        dt = factor_dtype(jnp.float32, self.dtype)
        parts = (draw(k, size, self.dim - m, self.projection,
                      jnp.promote_types(dt, jnp.float32)) if self.cache else None)
        return SubspaceNode(theta=jnp.zeros((self.dim - m,), dt), key=jax.random.key_data(k),
                            parts=parts, scales=jnp.ones((m,), dt) if self.said else None,
                            config=self, path=path, targets=tuple(targets),
                            target_shapes=shapes)


class SubspaceNode(ModuleNode):
    """``θ_d`` and the projection key of a :class:`Subspace` module: ``θ = θ0 + P·θ_d``
    (SAID: ``θ_i = θ0_i + λ_i·(P·θ_{d−m})_i``, ``λ`` the ``scales``)."""

    theta: Array
    key: Array
    parts: Any = None  # the drawn projection when ``cache=True`` (see :func:`draw`)
    scales: Array | None = None  # SAID's λ, one per target (``said=True``)
    targets: tuple[str, ...] = struct.field(pytree_node=False, default=())
    target_shapes: tuple[tuple[int, ...], ...] = struct.field(pytree_node=False, default=())

    config_class = Subspace
    field_axes = {"theta": Role.REPLICATED, "key": Role.REPLICATED, "parts": Role.REPLICATED,
                  "scales": Role.REPLICATED}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("theta",) if self.scales is None else ("theta", "scales")
    mergeable = True

    @property
    def size(self) -> int:
        """``D``: the number of reparameterised entries."""
        return sum(math.prod(s) for s in self.target_shapes)

    def offset(self) -> Array:
        """``P·θ_d`` ``(D,)``, the targets' flattened offsets in path order (at least float32)."""
        if self.parts is not None:
            return apply_drawn(self.theta, self.parts, self.size)
        key = jax.random.wrap_key_data(self.key)
        return project(self.theta, key, self.size, self.config.projection)

    def _shifted(self, params: PyTree, sign: float) -> PyTree:
        flat = {p: x for p, x in leaves_with_paths(params) if not is_node(x)}
        delta = self.offset()
        new, start = {}, 0
        for i, (p, shape) in enumerate(zip(self.targets, self.target_shapes)):
            leaf = flat.get(p)
            if leaf is None or tuple(leaf.shape) != shape:
                got = "no such leaf" if leaf is None else f"shape {tuple(leaf.shape)}"
                raise ValueError(f"{self.path or '<root>'}: Subspace was built for {p!r} of shape "
                                 f"{shape}, the module params have {got}")
            n = math.prod(shape)
            dt = jnp.promote_types(leaf.dtype, delta.dtype)
            step = delta[start:start + n].reshape(shape)
            if self.scales is not None:
                step = step * self.scales[i].astype(step.dtype)
            new[p] = (leaf.astype(dt) + sign * step).astype(leaf.dtype)
            start += n
        return map_with_paths(lambda p, x: new.get(p, x), params)

    def module_params(self, params: PyTree) -> PyTree:
        """``θ0 + P·θ_d`` for the targeted leaves; every other leaf unchanged."""
        return self._shifted(params, 1.0)

    def merge_into(self, params: PyTree) -> PyTree:
        """The same weights as plain arrays: exact, it is the computation the module runs."""
        return self._shifted(params, 1.0)

    def unmerge_from(self, params: PyTree) -> PyTree:
        return self._shifted(params, -1.0)
