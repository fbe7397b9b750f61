"""Representation fine-tuning: LoReFT, NoReFT, ConsReFT and the LoRA–ReFT meta-method MeFT.

These adapters edit a module's *activations*, not its weights. A rule names a
module path (a transformer block, whose output is the residual stream) and the
node sits beside that module; the module's own parameters stay untouched.

**LoReFT** (Wu et al. 2024, "ReFT: Representation Finetuning for Language
Models", arXiv 2404.03592, eq. 2; code ``stanfordnlp/pyreft``,
``LoreftIntervention``). For a hidden state ``h ∈ ℝ^d`` (column form)

    Φ(h) = h + Rᵀ(W h + b − R h),   R ∈ ℝ^{r×d} with orthonormal rows,  W ∈ ℝ^{r×d},  b ∈ ℝ^r

applied to the module's output at the selected token positions only. In
jlora's row-vector form with ``P = Rᵀ (d, r)`` (orthonormal columns) and
``w = Wᵀ (d, r)``: ``Φ(h) = h + (f(h·w + b) − h·P)·Pᵀ`` with ``f`` linear by
default (pyreft's ``act_fn``). As in pyreft, dropout wraps the *whole* edited
output at the selected positions (``drop(Φ(h))``, the base included), only
when the fast path is given a dropout key.

*Orthonormal R: a QR parameterization.* The node stores an unconstrained
``p (d, r)`` and every forward uses ``P = qr(p).Q · sign(diag(qr(p).R))``
(sign-fixed, so ``P = p`` whenever ``p`` already has orthonormal columns, as
at init). ``R`` is orthonormal to float precision after any optimizer step,
with any Optax optimizer and through ``jlora.split``/``combine``, without an
extra optimizer transform or state; the cost is one ``O(d·r²)`` QR per forward,
small beside the block. (pyreft uses PyTorch's ``orthogonal`` parametrization,
Householder for a non-square matrix: also a parameterization.)

**NoReFT** (pyreft ``NoreftIntervention``): ``h + (f(h·w + b) − (h·w2 + b2))·w2ᵀ``
with ``w2 (d, r)`` unconstrained (``b2`` only with ``proj_bias=True``).
**ConsReFT** (pyreft ``ConsreftIntervention``): ``h + (b − h·P)·Pᵀ``, a constant
target ``b ~ U(0, 1)`` in the ``r``-dimensional subspace; no dropout.

Initialisation follows pyreft: ``P`` orthogonal (QR of a Gaussian), ``w``, ``b``,
``w2``, ``b2`` PyTorch's ``nn.Linear`` default ``U(±1/√d)``. So LoReFT and
NoReFT are *not* the identity at init (pyreft's choice); the factors are float32.

**Positions.** ``positions=None`` edits every position. ``"f7+l7"`` (pyreft's
``--position`` syntax; also ``"f7"``, ``"l7"``) or a pair ``(first, last)``
edits the first ``f`` and the last ``l`` *real* tokens of each sequence, the
real tokens being those where the ``attention_mask`` keyword given to
``jlora.linen.apply`` is non-zero (left or right padding alike; without a mask
every token is real). With ``n`` real tokens, pyreft's
``get_intervention_locations`` takes ``f' = min(f, n // 2)`` and
``l' = min(l, n // 2)``: a sequence shorter than ``f + l`` is split between
prefix and suffix and never edited twice (pyreft pads the unused slots with a
padding position, which has no effect on real tokens; here they are simply
absent). See :func:`position_mask`. ``share_weights=False`` (pyreft's default
when both ``f`` and ``l`` are positive) gives the prefix and the suffix their own
parameters, stacked on a leading axis of size 2 (prefix, suffix);
``share_weights=True`` (pyreft's ``--share_weights``) uses one set.

**MeFT, the LoRA–ReFT meta-method.** *What the paper states* (NeurIPS 2024
workshop paper "A Unified Convergence Theory for Large Language Model Efficient
Fine-tuning", OpenReview ``f0lq26eITJ``): it establishes the connection between
LoRA and ReFT and unifies them into a meta-algorithm, *model efficient
fine-tuning* (MeFT), which provably attains the best available convergence
rate and relates the low rank to the convergence error. The meta-algorithm's
exact form is not public (no arXiv version, no code). *Our derivation*: both
methods are one low-rank intervention

    h ← h + s · f(x·D + c)·U     at selected positions,   D (d_in, r),  U (r, d_out),  c (r,)

where ``x`` is what the intervention reads and ``h`` the module's output.

* LoRA: ``x`` = the module input of a ``Dense`` layer, every position, linear
  ``f``, ``c = 0``: ``h + s·x·D·U = x·(K0 + s·D·U)`` — LoRA with ``a = D``,
  ``b = U``, mergeable.
* LoReFT: ``x = h`` (the output, the residual stream), ``D = w − P``,
  ``U = Pᵀ``, ``c = b``, ``s = 1`` at the selected positions
  (``h + (h·w + b − h·P)·Pᵀ``). NoReFT and ConsReFT are the same with their
  own ``D``, ``c``, ``U`` (:meth:`ReFTNode.meft_factors`).

Position selectivity (and a nonlinear ``f``) is what makes ReFT
non-mergeable: ``merge`` of MeFT is exact and allowed only with every position,
a linear ``f`` and a ``Dense`` module (``read="input"``: ``K += s·D·U``,
``bias += s·c·U``; ``read="output"``: ``K += s·K·D·U``,
``bias += s·(bias·D + c)·U``). MeFT inits as LoRA does: ``D ~ U(±1/√d_in)``,
``U = 0``, ``c = 0``, so the model is unchanged at init.

Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return x + nn.Dense(4, name="mlp")(nn.LayerNorm(name="ln")(x))
    >>> class Model(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return Block(name="block_1")(Block(name="block_0")(x))
    >>> x, mask = jnp.ones((1, 5, 4)), jnp.array([[1, 1, 1, 1, 0]])  # right-padded
    >>> params = Model().init(jax.random.key(0), x)["params"]
    >>> spec = jlora.Spec({"block_*": jlora.LoReFT(rank=2, positions="f1+l1")})
    >>> adapted = jlora.apply(params, spec, key=jax.random.key(1))
    >>> adapted["block_0@loreft"].p.shape  # beside the block, whose params are untouched
    (4, 2)
    >>> y = jlora.linen.apply(Model(), {"params": adapted}, x, context={"attention_mask": mask})
    >>> y0 = Model().apply({"params": params}, x)
    >>> (jnp.abs(y - y0).max(-1) > 1e-6).astype(int).tolist()  # edited: tokens 0 and 3
    [[1, 0, 0, 1, 0]]
    >>> jlora.methods.reft.position_mask(mask, 1, 1).astype(int).tolist()
    [[1, 0, 0, 1, 0]]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora import _validate as v
from jlora.methods._module import ModuleConfig, ModuleNode
from jlora.methods.base import (Array, branch_dropout, factor_dtype, freeze_in_axes,
                                strict_options)
from jlora.tree import Role, leaves_with_paths

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda z: z,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

_POSITIONS = re.compile(r"^\s*(?:f(\d+))?\s*\+?\s*(?:l(\d+))?\s*$")


# ---------------------------------------------------------------- positions


def parse_positions(positions: Any, *, owner: str = "ReFT") -> tuple[int, int] | None:
    """``None`` (every position), ``"f7+l7"``/``"f7"``/``"l7"`` or ``(first, last)`` -> ``(f, l)``.

        >>> parse_positions("f7+l7"), parse_positions("l3"), parse_positions((2, 0))
        ((7, 7), (0, 3), (2, 0))
    """
    if positions is None or (isinstance(positions, str) and positions.strip() == "all"):
        return None
    what = ('None (or "all"), a string "f<first>+l<last>" (or "f<first>", "l<last>") or a pair '
            "(first, last)")
    if isinstance(positions, str):
        m = _POSITIONS.match(positions)
        if m is None or (m.group(1) is None and m.group(2) is None) or (
                "+" in positions and (m.group(1) is None or m.group(2) is None)):
            raise ValueError(f"{owner}: positions must be {what}, got {positions!r}")
        first, last = int(m.group(1) or 0), int(m.group(2) or 0)
    elif isinstance(positions, (tuple, list)) and len(positions) == 2:
        first = v.positive_int(owner, "positions[0] (first)", positions[0], minimum=0)
        last = v.positive_int(owner, "positions[1] (last)", positions[1], minimum=0)
    else:
        raise ValueError(f"{owner}: positions must be {what}, got {positions!r}")
    if first + last == 0:
        raise ValueError(f"{owner}: positions {positions!r} selects no token; use None for "
                         "every position")
    return first, last


def _real_token_ranks(attention_mask: Array):
    real = jnp.asarray(attention_mask) != 0
    n = real.sum(-1, keepdims=True)
    k = jnp.cumsum(real, -1) - 1  # index of each real token among the real tokens
    return real, n, k


def position_masks(attention_mask: Array, first: int, last: int) -> tuple[Array, Array]:
    """``(prefix, suffix)`` boolean masks of the first ``min(first, n//2)`` and the last
    ``min(last, n//2)`` real tokens (``n`` = real tokens per sequence, pyreft's rule)."""
    real, n, k = _real_token_ranks(attention_mask)
    f = jnp.minimum(first, n // 2)
    l = jnp.minimum(last, n // 2)
    return real & (k < f), real & (k >= n - l)


def position_mask(attention_mask: Array, first: int, last: int) -> Array:
    """Boolean ``(..., seq)`` mask of the token positions LoReFT edits.

    ``attention_mask (..., seq)``: non-zero at real tokens (any padding side).
    With ``n`` real tokens, the first ``min(first, n // 2)`` and the last
    ``min(last, n // 2)`` real tokens are selected (pyreft's
    ``get_intervention_locations``), so the two never overlap.
    """
    prefix, suffix = position_masks(attention_mask, first, last)
    return prefix | suffix


# ---------------------------------------------------------------- numerics


def orthonormal_columns(p: Array) -> Array:
    """``Q·sign(diag(R))`` of the thin QR ``p = Q·R``: orthonormal columns, and ``p`` itself
    when ``p`` already has orthonormal columns (the sign fix makes the map continuous)."""
    # in float32 at least: LAPACK's QR has no bfloat16/float16 kernel
    q, r = jnp.linalg.qr(p.astype(jnp.promote_types(p.dtype, jnp.float32)))
    s = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    s = jnp.where(s == 0, 1, s).astype(q.dtype)
    return (q * s[..., None, :]).astype(p.dtype)


def lowrank_edit(x: Array, down: Array, up: Array, bias: Array | None = None,
                 activation: str = "linear", scale: float = 1.0) -> Array:
    """``s · f(x·D + c)·U`` (the MeFT intervention's added term), in the factors' precision."""
    dt = jnp.promote_types(x.dtype, down.dtype)
    z = x.astype(dt) @ down.astype(dt)
    if bias is not None:
        z = z + bias.astype(dt)
    return (ACTIVATIONS[activation](z) * scale) @ up.astype(dt)


def _select(h: Array, edited: Array, mask: Array | None) -> Array:
    edited = edited.astype(h.dtype)
    if mask is None:
        return edited
    return jnp.where(mask[..., None], edited, h)


def _positions_masks(config, h: Array, attention_mask: Array | None, path: str = ""):
    """Per parameter group, the boolean ``h.shape[:-1]`` mask (``None``: every position)."""
    pos = config.positions
    if pos is None:
        return (None,)
    mask = jnp.ones(h.shape[:-1], bool) if attention_mask is None else attention_mask
    mask = jnp.asarray(mask)
    if mask.shape != h.shape[:-1]:
        try:
            mask = jnp.broadcast_to(mask, h.shape[:-1])
        except ValueError:
            raise ValueError(f"{path or '<root>'}: {type(config).__name__}: attention_mask of "
                             f"shape {mask.shape} "
                             f"does not match the edited activations' positions "
                             f"{h.shape[:-1]} (batch, seq)") from None
    prefix, suffix = position_masks(mask, *pos)
    if groups(config) == 2:
        return prefix, suffix
    return (prefix | suffix,)


def groups(config) -> int:
    """How many parameter sets a ReFT config keeps: 2 (prefix, suffix) or 1."""
    pos = getattr(config, "positions", None)
    shared = getattr(config, "share_weights", True)
    return 2 if (pos is not None and not shared and pos[0] > 0 and pos[1] > 0) else 1


# ---------------------------------------------------------------- module dims


def module_dims(module_params: Any, path: str, *, owner: str) -> tuple[int, int, bool]:
    """``(d_in, d_out, is_dense)`` of a module from its own params.

    A ``Dense`` (a direct 2-D ``kernel`` leaf): ``kernel.shape``. Otherwise a
    residual block (``d_in = d_out = d``): the size of its 1-D norm ``scale``
    leaves when they agree; else the one size that some kernel reads (first
    axis) and some kernel writes (last axis), or, when several do (an MLP
    ``d -> 4d -> d``), the smallest of them if it is also the input size of the
    first kernel and the output size of the last one in the params' own order.
    A ``ValueError`` naming ``path`` otherwise (then pass ``dim=``).
    """
    if not isinstance(module_params, dict) and not hasattr(module_params, "items"):
        raise ValueError(f"{path}: {owner} is a module-level adapter; the rule must name a "
                         f"module (a subtree of params), not a leaf of shape "
                         f"{getattr(module_params, 'shape', '?')}")
    kernel = module_params.get("kernel") if hasattr(module_params, "get") else None
    if kernel is not None and getattr(kernel, "ndim", 0) == 2:
        return int(kernel.shape[0]), int(kernel.shape[1]), True
    leaves = [(p, x) for p, x in _ordered_leaves(module_params) if hasattr(x, "shape")]
    scales = {int(x.shape[0]) for p, x in leaves
              if p.rpartition("/")[2] == "scale" and x.ndim == 1}
    if len(scales) == 1:
        d = scales.pop()
        return d, d, False
    kernels = [x for p, x in leaves if p.rpartition("/")[2] == "kernel" and x.ndim >= 2]
    # a residual block maps d -> d: d is read by some kernel and written by some kernel
    both = sorted({int(k.shape[0]) for k in kernels} & {int(k.shape[-1]) for k in kernels})
    ordered = int(kernels[0].shape[0]) if kernels and (
        kernels[0].shape[0] == kernels[-1].shape[-1]) else None
    if len(both) == 1 or (both and ordered == both[0]):
        return both[0], both[0], False
    raise ValueError(f"{path}: {owner} cannot read the module's hidden size from its params "
                     f"(no single norm scale size; sizes both read and written by its kernels: "
                     f"{both}); pass dim=")


def _ordered_leaves(tree: Any, prefix: str = ""):
    """``(path, leaf)`` in the params' own order (a Linen module creates its params in call
    order), not the sorted order of ``jax.tree`` flattening."""
    join = lambda k: f"{prefix}/{k}" if prefix else str(k)
    if isinstance(tree, Mapping):
        for k, x in tree.items():
            yield from _ordered_leaves(x, join(k))
    elif isinstance(tree, (list, tuple)):
        for i, x in enumerate(tree):
            yield from _ordered_leaves(x, join(i))
    else:
        for p, x in leaves_with_paths(tree):
            yield (join(p) if p else prefix), x


def orthogonal_init(key: Array, d: int, r: int, dtype, lead: tuple[int, ...] = ()) -> Array:
    """``(…, d, r)`` with orthonormal columns: the sign-fixed QR of a Gaussian."""
    draw = jax.random.normal(key, lead + (d, r), jnp.promote_types(dtype, jnp.float32))
    return orthonormal_columns(draw).astype(dtype)


def linear_init(key: Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
    """PyTorch ``nn.Linear``'s default weight and bias init: ``U(±1/√fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# ---------------------------------------------------------------- configs


class _InterventionConfig(ModuleConfig):
    """Option checks shared by the ReFT configs and MeFT (module-level: rules name modules)."""

    def _check_common(self):
        name = type(self).__name__
        v.positive_int(name, "rank", self.rank)
        object.__setattr__(self, "positions", parse_positions(self.positions, owner=name))
        if hasattr(self, "activation"):
            v.choice(name, "activation", self.activation, tuple(ACTIVATIONS))
        if hasattr(self, "dropout"):
            v.real(name, "dropout", self.dropout, ge=0.0, lt=1.0)
        if hasattr(self, "share_weights"):
            v.boolean(name, "share_weights", self.share_weights)
        if self.dim is not None:
            v.positive_int(name, "dim", self.dim)
        freeze_in_axes(self)  # checks dtype

    def _dims(self, module_params: Any, path: str) -> tuple[int, int, bool]:
        name = type(self).__name__
        if self.dim is not None:
            dense = hasattr(module_params, "get") and getattr(
                module_params.get("kernel"), "ndim", 0) == 2
            if dense:
                d_in, d_out = module_params["kernel"].shape
                return int(d_in), int(d_out), True
            return self.dim, self.dim, False
        return module_dims(module_params, path, owner=name)

    def _dtype(self, module_params: Any):
        leaves = [x for _, x in leaves_with_paths(module_params)
                  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
        base = leaves[0].dtype if leaves else jnp.float32
        return factor_dtype(base, self.dtype)

    def _check_rank(self, d: int, path: str):
        if self.rank > d:
            raise ValueError(f"{path}: {type(self).__name__} rank {self.rank} exceeds the "
                             f"module's hidden size {d}")


@strict_options
@dataclasses.dataclass(frozen=True)
class LoReFT(_InterventionConfig):
    """LoReFT config: ``h + (f(h·w + b) − h·P)·Pᵀ`` on the module's output (module docstring).

    Args:
      rank: ``r``, the width of the edited subspace (``<= d``).
      positions: ``None`` (every position), ``"f7+l7"``-style or ``(first, last)``:
        the first/last real tokens of each sequence (``attention_mask``).
      activation: ``f`` on the learned source: ``"linear"`` (pyreft's default),
        ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``.
      dropout: rate in ``[0, 1)`` of the dropout that wraps the edited output.
      share_weights: one parameter set for prefix and suffix (``True``) or two.
      dim: the hidden size ``d`` when it cannot be read from the module's params.
      dtype: parameter dtype; default float32 (or the module's dtype if wider).
    """

    rank: int
    positions: Any = None
    activation: str = "linear"
    dropout: float = 0.0
    share_weights: bool = True
    dim: int | None = None
    dtype: Any = None

    def __post_init__(self):
        self._check_common()

    def build_module(self, key: Array, module_params: Any, *, path: str) -> "LoReFTNode":
        _, d, _ = self._dims(module_params, path)
        self._check_rank(d, path)
        dt, lead = self._dtype(module_params), (2,) if groups(self) == 2 else ()
        kp, kw, kb = jax.random.split(key, 3)
        return LoReFTNode(p=orthogonal_init(kp, d, self.rank, dt, lead),
                          w=linear_init(kw, lead + (d, self.rank), d, dt),
                          b=linear_init(kb, lead + (self.rank,), d, dt), config=self,
                          path=path, shape=(d, d), in_axes=(0,))


@strict_options
@dataclasses.dataclass(frozen=True)
class NoReFT(_InterventionConfig):
    """NoReFT config: ``h + (f(h·w + b) − (h·w2 + b2))·w2ᵀ``, ``w2`` not orthogonal.

    Args: as :class:`LoReFT`, plus ``proj_bias``: give the projection ``h·w2`` a
    bias ``b2`` (pyreft's ``add_bias``).
    """

    rank: int
    positions: Any = None
    activation: str = "linear"
    dropout: float = 0.0
    share_weights: bool = True
    proj_bias: bool = False
    dim: int | None = None
    dtype: Any = None

    def __post_init__(self):
        self._check_common()
        v.boolean("NoReFT", "proj_bias", self.proj_bias)

    def build_module(self, key: Array, module_params: Any, *, path: str) -> "NoReFTNode":
        _, d, _ = self._dims(module_params, path)
        self._check_rank(d, path)
        dt, lead = self._dtype(module_params), (2,) if groups(self) == 2 else ()
        k2, kw, kb, kb2 = jax.random.split(key, 4)
        return NoReFTNode(
            w2=linear_init(k2, lead + (d, self.rank), d, dt),
            w=linear_init(kw, lead + (d, self.rank), d, dt),
            b=linear_init(kb, lead + (self.rank,), d, dt),
            b2=linear_init(kb2, lead + (self.rank,), d, dt) if self.proj_bias else None,
            config=self, path=path, shape=(d, d), in_axes=(0,))


@strict_options
@dataclasses.dataclass(frozen=True)
class ConsReFT(_InterventionConfig):
    """ConsReFT config: ``h + (b − h·P)·Pᵀ`` (a constant target in the subspace of ``P``).

    Args: ``rank``, ``positions``, ``share_weights``, ``dim``, ``dtype`` as :class:`LoReFT`
    (pyreft's ConsReFT has no activation and no dropout).
    """

    rank: int
    positions: Any = None
    share_weights: bool = True
    dim: int | None = None
    dtype: Any = None

    def __post_init__(self):
        self._check_common()

    def build_module(self, key: Array, module_params: Any, *, path: str) -> "ConsReFTNode":
        _, d, _ = self._dims(module_params, path)
        self._check_rank(d, path)
        dt, lead = self._dtype(module_params), (2,) if groups(self) == 2 else ()
        kp, kb = jax.random.split(key)
        return ConsReFTNode(p=orthogonal_init(kp, d, self.rank, dt, lead),
                            b=jax.random.uniform(kb, lead + (self.rank,), dt), config=self,
                            path=path, shape=(d, d), in_axes=(0,))


READS = ("input", "output")


@strict_options
@dataclasses.dataclass(frozen=True)
class MeFT(_InterventionConfig):
    """The LoRA–ReFT meta-method: ``h ← h + s·f(drop(x)·D + c)·U`` at selected positions.

    Defaults are the LoRA form (every position, linear ``f``, no ``c``, reading
    the module input), mergeable into a ``Dense`` module.

    Args:
      rank: ``r``.
      positions: as :class:`LoReFT`; ``None`` edits every position.
      activation: ``f``: ``"linear"``, ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``.
      bias: learn ``c (r,)`` (initialised to 0).
      read: ``"input"`` (the module's first positional argument: LoRA's form) or
        ``"output"`` (the module's output, the residual stream: ReFT's form).
      alpha: ``s = alpha / rank`` (default ``rank``: ``s = 1``), as LoRA.
      dropout: rate in ``[0, 1)`` on the read tensor of the branch (LoRA's dropout).
      dim: the hidden size when it cannot be read from the module's params.
      dtype: parameter dtype; default float32 (or the module's dtype if wider).
    """

    rank: int
    positions: Any = None
    activation: str = "linear"
    bias: bool = False
    read: str = "input"
    alpha: float | None = None
    dropout: float = 0.0
    dim: int | None = None
    dtype: Any = None

    def __post_init__(self):
        self._check_common()
        v.boolean("MeFT", "bias", self.bias)
        v.choice("MeFT", "read", self.read, READS)
        v.real("MeFT", "alpha", self.alpha, gt=0.0, allow_none=True)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def build_module(self, key: Array, module_params: Any, *, path: str) -> "MeFTNode":
        d_in, d_out, dense = self._dims(module_params, path)
        if self.read == "output":
            d_in = d_out
        self._check_rank(min(d_in, d_out), path)
        dt = self._dtype(module_params)
        return MeFTNode(down=linear_init(key, (d_in, self.rank), d_in, dt),
                        up=jnp.zeros((self.rank, d_out), dt),
                        c=jnp.zeros((self.rank,), dt) if self.bias else None, config=self,
                        path=path, shape=(d_in, d_out), in_axes=(0,), dense=dense,
                        module_bias=hasattr(module_params, "get")
                        and module_params.get("bias") is not None)


# ---------------------------------------------------------------- nodes


def _first_output(call, args, kwargs):
    y = call(*args, **kwargs)
    if isinstance(y, tuple):  # blocks that return (hidden, aux...): edit the hidden state
        return y[0], lambda h: (h,) + y[1:]
    return y, lambda h: h


class _ReFTNode:
    """Shared forward of the ReFT nodes: edit the module's output at the selected positions."""

    #: the edit in words, for errors
    formula = "Φ(h)"

    @property
    def unmergeable_reason(self) -> str:
        pos = self.config.positions
        where = ("at every token" if pos is None else
                 f"at the first {pos[0]} and the last {pos[1]} real tokens")
        return (f"it is an intervention on the module's output activations h "
                f"({self.formula} {where}), not a change of the module's weights")

    @property
    def rank(self) -> int:
        return self.config.rank

    def half(self) -> str | None:
        # every array field trains: a split leaves holes only in the frozen half
        return "frozen" if any(getattr(self, f) is None for f in self.trainable) else None

    def _group(self, name: str, g: int):
        x = getattr(self, name)
        return None if x is None else (x[g] if groups(self.config) == 2 else x)

    def _delta(self, h: Array, g: int) -> Array:
        raise NotImplementedError

    def edit(self, h: Array, *, dropout_key: Array | None = None,
             attention_mask: Array | None = None) -> Array:
        """``Φ(h)`` at the selected positions of ``h (..., seq, d)``, ``h`` elsewhere."""
        rate = getattr(self.config, "dropout", 0.0)
        out = h
        for g, mask in enumerate(_positions_masks(self.config, h, attention_mask, self.path)):
            new = h.astype(jnp.promote_types(h.dtype, self._dtype)) + self._delta(h, g)
            out = _select(out, branch_dropout(new, dropout_key, rate), mask)
        return out

    @property
    def _dtype(self):
        return self.b.dtype

    def intercept(self, call, args, kwargs, *, dropout_key=None, attention_mask=None,
                  **context):
        """The module's output with LoReFT's edit (positions from ``attention_mask``)."""
        h, rebuild = _first_output(call, args, kwargs)
        return rebuild(self.edit(h, dropout_key=dropout_key, attention_mask=attention_mask))



class LoReFTNode(_ReFTNode, ModuleNode):
    """``p`` (unconstrained, orthonormalised by QR each forward), ``w (d, r)``, ``b (r,)``;
    with ``share_weights=False`` each has a leading (prefix, suffix) axis of size 2."""

    p: Array
    w: Array
    b: Array

    config_class = LoReFT
    formula = "h + Rᵀ(W·h + b − R·h)"
    trainable = ("p", "w", "b")
    field_axes = {"p": Role.REPLICATED, "w": Role.REPLICATED, "b": Role.REPLICATED}

    def projection(self) -> Array:
        """``P = Rᵀ (…, d, r)`` with orthonormal columns."""
        return orthonormal_columns(self.p)

    @property
    def R(self) -> Array:  # noqa: N802 (the paper's name)
        """The paper's ``R (…, r, d)``, orthonormal rows."""
        return jnp.swapaxes(self.projection(), -1, -2)

    @property
    def W(self) -> Array:  # noqa: N802
        """The paper's ``W (…, r, d)`` (column-vector form of ``w``)."""
        return jnp.swapaxes(self.w, -1, -2)

    def meft_factors(self, g: int = 0):
        """``(D, U, c) = (w − P, Pᵀ, b)``: LoReFT as MeFT with a linear ``f``."""
        p = orthonormal_columns(self._group("p", g))
        return self._group("w", g) - p, p.T, self._group("b", g)

    def _delta(self, h, g):
        p = orthonormal_columns(self._group("p", g))
        hf = h.astype(jnp.promote_types(h.dtype, p.dtype))
        src = ACTIVATIONS[self.config.activation](hf @ self._group("w", g) + self._group("b", g))
        return (src - hf @ p) @ p.T


class NoReFTNode(_ReFTNode, ModuleNode):
    """``w2 (d, r)`` (not orthogonal), ``w (d, r)``, ``b (r,)``, optional ``b2 (r,)``."""

    w2: Array
    w: Array
    b: Array
    b2: Array | None = None

    config_class = NoReFT
    formula = "h + W2ᵀ(W·h + b − W2·h)"
    field_axes = {"w2": Role.REPLICATED, "w": Role.REPLICATED, "b": Role.REPLICATED,
                  "b2": Role.REPLICATED}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("w2", "w", "b") + (("b2",) if self.config.proj_bias else ())

    def meft_factors(self, g: int = 0):
        """``(D, U, c) = (w − w2, w2ᵀ, b − b2)``: NoReFT as MeFT with a linear ``f``."""
        b2 = self._group("b2", g)
        c = self._group("b", g) - (0 if b2 is None else b2)
        return self._group("w", g) - self._group("w2", g), self._group("w2", g).T, c

    def _delta(self, h, g):
        w2, b2 = self._group("w2", g), self._group("b2", g)
        hf = h.astype(jnp.promote_types(h.dtype, w2.dtype))
        src = ACTIVATIONS[self.config.activation](hf @ self._group("w", g) + self._group("b", g))
        proj = hf @ w2 + (0 if b2 is None else b2)
        return (src - proj) @ w2.T


class ConsReFTNode(_ReFTNode, ModuleNode):
    """``p`` (orthonormalised by QR each forward) and the constant target ``b (r,)``."""

    p: Array
    b: Array

    config_class = ConsReFT
    formula = "h + Rᵀ(b − R·h)"
    trainable = ("p", "b")
    field_axes = {"p": Role.REPLICATED, "b": Role.REPLICATED}

    def projection(self) -> Array:
        """``P = Rᵀ (…, d, r)`` with orthonormal columns."""
        return orthonormal_columns(self.p)

    @property
    def R(self) -> Array:  # noqa: N802 (the paper's name)
        """The paper's ``R (…, r, d)``, orthonormal rows."""
        return jnp.swapaxes(self.projection(), -1, -2)

    def meft_factors(self, g: int = 0):
        """``(D, U, c) = (−P, Pᵀ, b)``."""
        p = orthonormal_columns(self._group("p", g))
        return -p, p.T, self._group("b", g)

    def _delta(self, h, g):
        p = orthonormal_columns(self._group("p", g))
        hf = h.astype(jnp.promote_types(h.dtype, p.dtype))
        return (self._group("b", g) - hf @ p) @ p.T


class MeFTNode(ModuleNode):
    """``down (d_in, r)``, ``up (r, d_out)``, optional ``c (r,)``: ``h + s·f(x·D + c)·U``."""

    down: Array
    up: Array
    c: Array | None = None
    dense: bool = dataclasses.field(default=False, metadata={"pytree_node": False})
    # whether the module has a bias for ``c`` to fold into, known without its params
    module_bias: bool = dataclasses.field(default=False, metadata={"pytree_node": False})

    config_class = MeFT
    field_axes = {"down": Role.REPLICATED, "up": Role.REPLICATED, "c": Role.REPLICATED}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("down", "up") + (("c",) if self.config.bias else ())

    @property
    def rank(self) -> int:
        return self.config.rank

    def half(self) -> str | None:
        return "frozen" if any(getattr(self, f) is None for f in self.trainable) else None

    def _why_not(self, params=None) -> list[str]:
        cfg, why = self.config, []
        if cfg.positions is not None:
            why.append(f"it edits selected positions only (positions={cfg.positions})")
        if cfg.activation != "linear":
            why.append(f"its activation {cfg.activation!r} is not linear")
        kernel = params.get("kernel") if hasattr(params, "get") else None
        if not self.dense or (params is not None and getattr(kernel, "ndim", 0) != 2):
            why.append("the module is not a Dense layer with a 2-D kernel")
        elif self.c is not None and not (self.module_bias if params is None
                                         else params.get("bias") is not None):
            why.append("its bias c needs a module bias to fold into")
        return why

    @property
    def mergeable(self) -> bool:
        return not self._why_not()

    @property
    def unmergeable_reason(self) -> str:
        return "; ".join(self._why_not()) or "-"

    def edit(self, x: Array, h: Array, *, dropout_key: Array | None = None,
             attention_mask: Array | None = None) -> Array:
        """``h + s·f(drop(x)·D + c)·U`` at the selected positions of ``h``, ``h`` elsewhere."""
        cfg = self.config
        x = branch_dropout(x, dropout_key, cfg.dropout)
        new = h.astype(jnp.promote_types(h.dtype, self.up.dtype)) + lowrank_edit(
            x, self.down, self.up, self.c, cfg.activation, cfg.scale)
        (mask,) = _positions_masks(cfg, h, attention_mask, self.path)
        return _select(h, new, mask)

    def intercept(self, call, args, kwargs, *, dropout_key=None, attention_mask=None,
                  **context):
        """The module's output plus the intervention, reading its input or its output.

        ``read="input"`` reads the module's first positional argument; a call
        without one (keyword arguments only) raises a ``ValueError``.
        """
        if self.config.read == "input" and not args:
            raise ValueError(f"{self.path}: MeFT(read='input') reads the module's first "
                             f"positional argument, but it was called with keyword arguments "
                             f"only ({sorted(kwargs)}); call it with its input positionally, "
                             "or use read='output'")
        h, rebuild = _first_output(call, args, kwargs)
        x = args[0] if self.config.read == "input" else h
        return rebuild(self.edit(x, h, dropout_key=dropout_key, attention_mask=attention_mask))

    def merge_into(self, params):
        """Merged ``Dense`` params (exact) in the mergeable form; else a ``ValueError``.

        ``read="input"``: ``K + s·D·U``, ``bias + s·c·U``; ``read="output"``:
        ``K + s·K·D·U``, ``bias + s·(bias·D + c)·U``.
        """
        why = self._why_not(params)
        if why:
            raise ValueError(f"{self.path or '<root>'}: MeFT cannot be merged into the "
                             "module's weights: " + "; ".join(why) + ". Merge needs every "
                             "position, a linear activation and a Dense module (the LoRA form); "
                             "keep the adapter in the forward (jlora.linen.apply), or call "
                             "jlora.merge(adapted, residual=True)")
        cfg, kernel = self.config, params["kernel"]
        dt = jnp.promote_types(kernel.dtype, jnp.float32)
        k, s = kernel.astype(dt), cfg.scale
        du = self.down.astype(dt) @ self.up.astype(dt)
        out = dict(params)
        bias = params.get("bias")
        if cfg.read == "input":
            out["kernel"] = (k + s * du).astype(kernel.dtype)
            if self.c is not None:
                out["bias"] = (bias.astype(dt) + s * self.c.astype(dt) @ self.up.astype(dt)
                               ).astype(bias.dtype)
        else:
            out["kernel"] = (k + s * k @ du).astype(kernel.dtype)
            if bias is not None:
                add = bias.astype(dt) @ du
                if self.c is not None:
                    add = add + self.c.astype(dt) @ self.up.astype(dt)
                out["bias"] = (bias.astype(dt) + s * add).astype(bias.dtype)
        return type(params)(out) if not isinstance(params, dict) else out

    def unmerge_from(self, params):
        """The inverse of :meth:`merge_into` (``read="output"``: a solve with ``I + s·D·U``)."""
        why = self._why_not(params)
        if why:
            raise ValueError(f"{self.path or '<root>'}: MeFT cannot be unmerged from the "
                             "module's weights: " + "; ".join(why))
        cfg, kernel = self.config, params["kernel"]
        dt = jnp.promote_types(kernel.dtype, jnp.float32)
        s, up = cfg.scale, self.up.astype(dt)
        du = self.down.astype(dt) @ up
        cu = 0.0 if self.c is None else s * self.c.astype(dt) @ up
        out = dict(params)
        bias = params.get("bias")
        if cfg.read == "input":
            out["kernel"] = (kernel.astype(dt) - s * du).astype(kernel.dtype)
            if bias is not None:
                out["bias"] = (bias.astype(dt) - cu).astype(bias.dtype)
        else:
            m = jnp.eye(du.shape[0], dtype=dt) + s * du  # K' = K·m, bias' = bias·m + s·c·U
            out["kernel"] = jnp.linalg.solve(m.T, kernel.astype(dt).T).T.astype(kernel.dtype)
            if bias is not None:
                out["bias"] = jnp.linalg.solve(m.T, bias.astype(dt) - cu).astype(bias.dtype)
        return type(params)(out) if not isinstance(params, dict) else out
