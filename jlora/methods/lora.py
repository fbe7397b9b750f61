"""LoRA (Hu et al. 2021), rsLoRA, PiSSA, OLoRA and LoRA-FA.

In jlora's orientation a kernel ``K0`` is viewed as ``(fan_in, fan_out)`` and

    K = K0 + s · a · b,     a: (fan_in, rank),  b: (rank, fan_out)

with ``s = alpha / rank`` (LoRA) or ``s = alpha / sqrt(rank)`` (rsLoRA,
Kalajdzievski 2023). The factorized forward is ``y = x·K0 + s·(drop(x)·a)·b``:
dropout acts on the adapter branch only, and only when the fast path is given a
dropout key (training).

Initialisations (``init=``):

* ``"kaiming"`` (default, as microsoft/LoRA and PEFT): ``a ~ U(±1/√fan_in)``
  (PyTorch's kaiming-uniform with ``a=√5``), ``b = 0``.
* ``"gaussian"`` (PEFT's ``"gaussian"``): ``a ~ N(0, 1/rank²)``, ``b = 0``.
* ``"pissa"`` (Meng et al. 2024): float32 SVD ``K0 = U·diag(S)·Vᵀ``;
  ``a = U_r·diag(√(S_r/s))``, ``b = diag(√(S_r/s))·V_rᵀ``; the base becomes the
  residual ``K0 − s·a·b`` so the merged weight equals ``K0`` at init.
* ``"pissa_fast"``: the same from a randomized SVD (Halko et al. subspace
  iteration with ``niter`` power iterations and a sketch of ``rank + 8``
  columns), for large matrices.
* ``"olora"`` (PEFT ``olora_init``): QR of the PyTorch-orientation weight
  ``W = K0ᵀ = Q·R``; ``a = R[:rank]ᵀ``, ``b = Q[:, :rank]ᵀ``; base ``K0 − s·a·b``.
* ``"mica"`` (Rüdiger & Raschka 2026, "MiCA", Sec. 3; PEFT ``mica_init``): the
  float32 SVD ``K0 = U·diag(S)·Vᵀ`` (singular values descending); ``b = V[:, -r:]ᵀ``,
  the *minor* output directions (the left singular vectors of PEFT's
  ``W = K0ᵀ`` with the smallest singular values), and ``a = 0``. ``b`` stays
  frozen: only ``a`` trains (``jlora.split`` puts ``b`` in the frozen half). The
  base is unchanged and the adapter is inactive at init. Embedding tables are
  treated alike (PEFT's ``lora_embedding_B`` from the SVD of ``Eᵀ``).
* ``"orthogonal"`` (PEFT ``orthogonal_init``, from the blog post
  datta0.github.io/posts/rethink-lora-init; rank must be even): draws
  ``X ~ N(0,1)^{r×r}``, ``G1 ~ N(0,1)^{fan_in×r/2}``, ``G2 ~ N(0,1)^{r/2×fan_out}``
  from three keys split from the leaf's key; ``Q = qr(X).Q``,
  ``a = G1·Q[0::2]/10``, ``b = Q[1::2]ᵀ·G2/10``. The rows of ``Q`` are
  orthonormal, so ``a·b = G1·Q[0::2]·Q[1::2]ᵀ·G2/100 = 0`` exactly in exact
  arithmetic (about 1e-8 in float32): the adapter is inactive at init, the base
  is unchanged, and both factors are non-zero, each of rank ``r/2``. Not for
  embedding tables (PEFT supports it on linear layers only).

For embedding tables (a leaf named ``embedding``, Flax ``Embed``) the zero
factor is swapped, as loralib and PEFT do: ``a = 0``, ``b ~ N(0, 1)``.

``train_a=False`` is LoRA-FA / FFA-LoRA: ``a`` stays frozen at its random init
and only ``b`` trains (``jlora.split`` puts ``a`` in the frozen half).

PiSSA and OLoRA nodes keep their initial factors ``a0``, ``b0`` (frozen) so that
``delta()`` is measured against the *original* weight: ``merge`` gives
``K0 + s·(a·b − a0·b0)`` and an adapter can be exported for an unmodified base.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> spec = jlora.Spec({"dense/kernel": jlora.LoRA(rank=2, alpha=4)})
    >>> adapted = jlora.apply(params, spec, key=jax.random.key(0))
    >>> adapted["dense"]["kernel"].a.shape, adapted["dense"]["kernel"].scale
    ((4, 2), 2.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

from jlora import _validate as v
from jlora.methods._experts import (
    check_stacking,
    factor_specs,
    is_slice,
    is_stacked,
    own_config,
    slice_static,
    stacked_init,
    stacked_lowrank,
    stacked_product,
)
from jlora.methods.base import (
    AdapterNode,
    Array,
    Config,
    LinearOp,
    Role,
    accumulation_dtype,
    base_plus_lowrank,
    dropped_delta_dot,
    freeze_in_axes,
    from_matrix,
    leading_in_axes,
    strict_options,
    to_matrix,
    view_leaf,
)

Init = Literal["kaiming", "gaussian", "pissa", "pissa_fast", "olora", "mica", "orthogonal"]
INITS: tuple[str, ...] = get_args(Init)
_SKETCH_OVERSAMPLE = 8


@strict_options
@dataclasses.dataclass(frozen=True)
class LoRA(Config):
    """Low-rank adapter config. See the module docstring for the math.

    Args:
      rank: the rank ``r`` of ``a·b``; at most ``min(fan_in, fan_out)``.
      alpha: scale numerator (finite, > 0); default ``rank`` (so ``s = 1`` for plain LoRA).
      init: ``"kaiming"``, ``"gaussian"``, ``"pissa"``, ``"pissa_fast"``, ``"olora"``,
        ``"mica"`` (``a = 0``, frozen ``b`` from the minor singular directions),
        ``"orthogonal"`` (even rank; non-zero factors with ``a·b = 0``). The
        data-driven inits (EVA, CorDA, LoRA-GA) are functions of ``jlora.init``.
      rslora: use ``s = alpha/√rank`` instead of ``alpha/rank``.
      train_a: ``False`` freezes ``a`` (LoRA-FA / FFA-LoRA).
      dropout: dropout rate in ``[0, 1)`` on the adapter branch input (fast path, training only).
      dtype: factor dtype; default float32 (or the base dtype if wider).
      niter: power iterations (>= 0) for ``"pissa_fast"``.
      in_axes: which kernel axes are inputs; default all but the last.
      expert_axis: ``0`` for stacked kernels ``(E, in, out)`` (MoE experts, layers
        under ``nn.scan``): independent factors per slice, ``a (E, in, r)``,
        ``b (E, r, out)``; see ``jlora.methods._experts``.
      rank_per_expert: ``"full"`` (rank ``r`` per slice) or ``"divide"``
        (``max(1, r // E)`` per slice).
    """

    rank: int
    alpha: float | None = None
    init: Init = "kaiming"
    rslora: bool = False
    train_a: bool = True
    dropout: float = 0.0
    dtype: Any = None
    niter: int = 4
    in_axes: tuple[int, ...] | None = None
    expert_axis: int | None = None
    rank_per_expert: str = "full"

    def __post_init__(self):
        check_stacking(self, "LoRA", "DoRA")
        name = type(self).__name__
        v.positive_int(name, "rank", self.rank)
        v.real(name, "alpha", self.alpha, gt=0.0, allow_none=True)
        v.choice(name, "init", self.init, INITS)
        v.boolean(name, "rslora", self.rslora)
        v.boolean(name, "train_a", self.train_a)
        v.real(name, "dropout", self.dropout, ge=0.0, lt=1.0)
        v.positive_int(name, "niter", self.niter, minimum=0)
        if self.init == "mica" and (type(self) is not LoRA or not self.train_a):
            raise ValueError(f"{name}: init='mica' trains only a (b is frozen): it is supported "
                             "by plain LoRA with train_a=True (PEFT: no DoRA or other variants)")
        if self.init == "orthogonal" and self.rank % 2:
            raise ValueError(f"{name}: init='orthogonal' needs an even rank, got rank="
                             f"{self.rank!r}")
        freeze_in_axes(self)

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def init_factors(self, key: Array, base: Array, *, path: str):
        """Return ``(in_axes, base, a, b, a0, b0)`` for a leaf; shared with DoRA."""
        view = view_leaf(self, base, path, rank=self.rank)
        fan_in, fan_out, dt = view.fan_in, view.fan_out, view.dtype
        r, s = self.rank, self.scale
        a0 = b0 = None
        if self.init in ("kaiming", "gaussian"):
            if self.init == "kaiming":
                bound = 1.0 / math.sqrt(fan_in)
                rand = jax.random.uniform(key, (fan_in, r), dt, -bound, bound)
            else:
                rand = jax.random.normal(key, (fan_in, r), dt) / r
            if path.rpartition("/")[2] == "embedding" and self.train_a:
                a = jnp.zeros((fan_in, r), dt)
                b = jax.random.normal(key, (r, fan_out), dt)
            else:
                a, b = rand, jnp.zeros((r, fan_out), dt)
        elif self.init == "orthogonal":
            if path.rpartition("/")[2] == "embedding":
                raise ValueError(f"{path}: init='orthogonal' is for linear and conv kernels, "
                                 "not embedding tables (as PEFT)")
            kx, k1, k2 = jax.random.split(key, 3)
            a, b = orthogonal_factors(jax.random.normal(kx, (r, r), jnp.float32),
                                      jax.random.normal(k1, (fan_in, r // 2), jnp.float32),
                                      jax.random.normal(k2, (r // 2, fan_out), jnp.float32))
            a, b = a.astype(base.dtype).astype(dt), b.astype(base.dtype).astype(dt)
        elif self.init == "mica":
            m = to_matrix(base, view.in_axes).astype(jnp.float32)
            vt = jnp.linalg.svd(m, full_matrices=False)[2]
            a = jnp.zeros((fan_in, r), dt)
            b = vt[-r:].astype(base.dtype).astype(dt)
        else:
            m = to_matrix(base, view.in_axes).astype(jnp.float32)
            if self.init == "pissa":
                u, sv, vt = jnp.linalg.svd(m, full_matrices=False)
                u, sv, vt = u[:, :r], sv[:r], vt[:r]
            elif self.init == "pissa_fast":
                u, sv, vt = randomized_svd(key, m, r, niter=self.niter)
            if self.init in ("pissa", "pissa_fast"):
                root = jnp.sqrt(sv / s)
                a, b = u * root, root[:, None] * vt
            else:  # olora: QR of the (out, in) PyTorch weight
                q, rr = jnp.linalg.qr(m.T)
                a, b = rr[:r].T, q[:, :r].T
            a, b = a.astype(dt), b.astype(dt)
            base = from_matrix(m - s * (a.astype(jnp.float32) @ b.astype(jnp.float32)),
                               base.shape, view.in_axes).astype(base.dtype)
            a0, b0 = a, b
        return view.in_axes, base, a, b, a0, b0

    def build(self, key: Array, base: Array, *, path: str) -> "LoRANode":
        if self.expert_axis is not None:
            self.check_leaf(base, path)
            in_axes, base, a, b, a0, b0 = stacked_init(self, key, base, path=path)
        else:
            in_axes, base, a, b, a0, b0 = self.init_factors(key, base, path=path)
        return LoRANode(base=base, a=a, b=b, a0=a0, b0=b0, config=self,
                        shape=tuple(base.shape), in_axes=in_axes)


def orthogonal_factors(x: Array, g1: Array, g2: Array) -> tuple[Array, Array]:
    """``(a, b)`` of ``init="orthogonal"`` from its three Gaussian draws.

    ``x: (r, r)``, ``g1: (fan_in, r/2)``, ``g2: (r/2, fan_out)``; ``Q = qr(x).Q``,
    ``a = g1·Q[0::2]/10``, ``b = Q[1::2]ᵀ·g2/10`` (PEFT's ``A = aᵀ``, ``B = bᵀ``
    from the same draws), so ``a·b = 0``.

        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.split(jax.random.key(0), 3)
        >>> a, b = orthogonal_factors(jax.random.normal(k[0], (4, 4)),
        ...                           jax.random.normal(k[1], (6, 2)),
        ...                           jax.random.normal(k[2], (2, 5)))
        >>> a.shape, b.shape, bool(jnp.abs(a @ b).max() < 1e-6)
        ((6, 4), (4, 5), True)
    """
    q = jnp.linalg.qr(x)[0]
    return g1 @ q[0::2] / 10.0, q[1::2].T @ g2 / 10.0


def randomized_svd(key: Array, m: Array, rank: int, *, niter: int):
    """Top-``rank`` SVD of ``m`` by randomized subspace iteration (Halko et al. 2011)."""
    q = min(rank + _SKETCH_OVERSAMPLE, *m.shape)
    omega = jax.random.normal(key, (m.shape[1], q), m.dtype)
    basis, _ = jnp.linalg.qr(m @ omega)
    for _ in range(niter):
        basis, _ = jnp.linalg.qr(m.T @ basis)
        basis, _ = jnp.linalg.qr(m @ basis)
    u_small, sv, vt = jnp.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u_small)[:, :rank], sv[:rank], vt[:rank]


class LoRANode(AdapterNode):
    """``K = base + s·a·b``; trainable ``a`` and ``b`` (only ``b`` under LoRA-FA)."""

    base: Array
    a: Array
    b: Array
    a0: Array | None = None
    b0: Array | None = None

    config_class = LoRA
    field_axes = {"base": Role.BASE, "a": Role.IN_RANK, "b": Role.RANK_OUT,
                  "a0": Role.IN_RANK, "b0": Role.RANK_OUT}

    @property
    def trainable(self) -> tuple[str, ...]:
        if self.config.init == "mica":
            return ("a",)
        return ("a", "b") if self.config.train_a else ("b",)

    def added_size(self) -> int:
        """``a`` and ``b`` whether they train or not (LoRA-FA's frozen ``a``, MiCA's frozen
        ``b`` are held by the model, as PEFT counts them); PiSSA/OLoRA's ``a0``, ``b0`` are
        copies of the base's principal part, not new parameters."""
        frozen = [f for f in ("a", "b") if f not in self.trainable and getattr(self, f) is not None]
        return self.trainable_size() + sum(math.prod(jnp.shape(getattr(self, f))) for f in frozen)

    @property
    def scale(self) -> float:
        return own_config(self).scale

    @property
    def rank(self) -> int:
        return own_config(self).rank

    def partition_specs(self, entries, fold):
        """Stacked nodes: the expert axis shards like the base's (see ``jlora.sharding``)."""
        if not is_stacked(self):
            return None
        from jax.sharding import PartitionSpec as P
        return {"base": P(*entries), **factor_specs(self, entries, fold)}

    def slice_view(self) -> "LoRANode":
        """One slice of a stacked node whose fields ``nn.scan`` has cut."""
        return self.replace(**slice_static(self))

    @property
    def delta_fields(self) -> tuple[str, ...]:
        """``a``, ``b`` and, for PiSSA/OLoRA, the frozen initial ``a0``, ``b0``."""
        initial = self.config.init in ("pissa", "pissa_fast", "olora")
        return ("a", "b") + (("a0", "b0") if initial else ())

    def _product(self, a, b) -> Array:
        if is_slice(self):  # nn.scan cut the fields to one slice
            return self.slice_view()._product(a, b)
        if is_stacked(self):
            return stacked_product(self, a, b, self.scale)
        return from_matrix(self.scale * (a @ b), self.shape, self.in_axes)

    def _ab(self) -> Array:
        """``s·a·b`` as a kernel, in :func:`accumulation_dtype` precision."""
        acc = accumulation_dtype(self.a.dtype)
        return self._product(self.a.astype(acc), self.b.astype(acc))

    def materialize(self) -> Array:
        acc = accumulation_dtype(self.base.dtype, self.a.dtype)
        return (self.base.astype(acc) + self._ab().astype(acc)).astype(self.base.dtype)

    def delta(self) -> Array:
        # PiSSA/OLoRA's difference of two products keeps its digits
        d = self._ab()
        if self.a0 is not None:
            d = d - self._product(self.a0.astype(d.dtype), self.b0.astype(d.dtype))
        return d.astype(self.a.dtype)

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        if is_slice(self):
            return self.slice_view().dot(x, op, dropout_key=dropout_key, **context)
        drop = self.config.dropout
        if not is_stacked(self) and leading_in_axes(self):
            return base_plus_lowrank(x, op, self, self.a, self.b, scale=self.scale,
                                     dropout_key=dropout_key, dropout=drop)
        lo = (stacked_lowrank(x, op, self, self.a, self.b, self.scale, base=self.base,
                              dropout_key=dropout_key, dropout=drop)
              if is_stacked(self) else None)
        if lo is None:  # an op the low-rank branch cannot take: ΔK on the dropped input
            return dropped_delta_dot(x, op, self, self._ab, dropout_key, drop)
        y = op(x, self.base)
        return y + lo.astype(y.dtype)
