"""Sparse fine-tuning: train a fixed subset of a weight's entries (Fu et al., AAAI 2023).

Fu, Yang, So, Lam, Bing, Collier, "On the Effectiveness of Parameter-Efficient
Fine-Tuning" (arXiv 2211.15583) show that PEFT methods are *sparse fine-tuned
models*

    θ = θ0 + M·Δθ,    M = diag(m),  m ∈ {0, 1}ⁿ,  ‖m‖₀ = ⌊p·n⌋

that differ in how they choose the mask (Section "Categorisation"):

* **random** approaches: a random mask (``select="random"``, keyed by the
  leaf's path, so adding a rule never reshuffles another leaf's mask);
* **rule-based** approaches: a fixed rule (BitFit, adapters, LoRA, the last
  layers, ...); here the magnitude rule of the paper's MagPruning baseline,
  which tunes the entries of largest ``|θ0|`` (the released code, ``magprun``:
  ``topk(|θ0|)``), ``select="magnitude"`` (``largest=False`` takes the
  smallest instead);
* **projection-based** approaches (DiffPruning, ChildPruning): a mask learned
  through a continuous relaxation, which jumps during training ("projection
  discontinuity"). Not offered here.

The paper's **second-order approximation method (SAM)** chooses the mask from
data without any projection: around θ0,
``L(θ0 + MΔθ) ≈ L(θ0) + gᵀMΔθ + ½(MΔθ)ᵀH(MΔθ)``; with a diagonal
``H = diag(h)`` the inner minimum is ``Δθ_i = −g_i/h_i`` and the loss drops by
``½ Σ_{i∈m} g_i²/h_i``, so the best mask keeps the ``⌊p·n⌋`` largest
``g_i²/h_i``. The released code takes ``h`` constant (the top ``|g|`` of the
gradient summed over calibration batches, per tensor).
``jlora.optim.sam_select`` computes that selection and returns a ``Spec`` of
``Sparse(density, select="sam", indices=...)`` rules; ``select="sam"`` needs
those ``indices``.

A node stores the frozen ``base``, the chosen flat ``indices`` (int32, sorted,
frozen) and the trainable ``values`` (the ``Δθ`` of the chosen entries, zero at
init): never a dense trainable copy, so gradients and optimizer state are
``⌊p·n⌋`` numbers per leaf. ``delta()`` scatters the values into a zero weight
and ``merge`` adds them to the chosen entries: exact. The fast path is the
layer applied to the merged weight (a scatter into a copy of the base).
PEFT has no file layout for it: ``jlora.peft.save`` refuses it.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
    >>> spec = jlora.Spec({"w/kernel": jlora.Sparse(0.25, select="magnitude")})
    >>> node = jlora.apply(params, spec, key=jax.random.key(0))["w"]["kernel"]
    >>> node.indices.tolist(), node.values.shape  # the 3 largest |w|
    ([9, 10, 11], (3,))
    >>> node = node.replace(values=jnp.ones(3))
    >>> jlora.merge({"k": node})["k"][2].tolist()
    [8.0, 10.0, 11.0, 12.0]
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _validate as v
from jlora.methods.base import (AdapterNode, Array, Config, Role, factor_dtype, freeze_in_axes,
                               strict_options)

SELECT = ("random", "magnitude", "sam")


class Indices(tuple):
    """A hashable, immutable tuple of flat indices whose hash is computed once.

    A ``Sparse`` config is static pytree metadata, hashed whenever ``jit``
    looks up a trace; a large selection is hashed once, from its bytes.
    """

    def __new__(cls, values):
        arr = np.asarray(values)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"Sparse: indices must be a 1-D sequence of ints, got shape "
                             f"{arr.shape} and dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        self = super().__new__(cls, arr.tolist())
        self._digest = hashlib.sha256(arr.tobytes()).digest()
        return self

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        if self is other:
            return True
        if isinstance(other, Indices):
            return self._digest == other._digest
        return tuple.__eq__(self, other)

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        if len(self) <= 8:
            return f"Indices({list(self)})"
        return f"Indices(<{len(self)} entries: {self[0]}, {self[1]}, ..., {self[-1]}>)"

    def __reduce__(self):
        return (Indices, (list(self),))


def entries(density: float, n: int) -> int:
    """``k = max(1, ⌊density·n⌋)``: the number of entries a leaf of ``n`` trains.

    ``density`` is a binary float, so ``density·n`` can land a rounding error
    below an integer the decimal it stands for reaches (``0.29 * 100`` is
    ``28.999…96``). The floor forgives an error of up to 4 units in the last
    place of ``density``'s precision, relative to ``density·n``: the rounding
    of ``density`` and of the product together are below 1, so ``0.29`` of 100
    entries is 29 (float64 or float32), while a density truly below ``0.29``
    gets 28. The released code (``runner.py``: ``int(p * numel)``) truncates
    the float product: 28 entries there, and none when ``p·n < 1``.

        >>> entries(0.29, 100), entries(2 / 3, 3), entries(0.25, 3), entries(1.0, 7)
        (29, 2, 1, 7)
    """
    x = float(density) * n
    eps = np.finfo(density.dtype if isinstance(density, np.floating) else np.float64).eps
    return max(1, min(n, math.floor(x + 4 * eps * max(x, 1.0))))


@strict_options
@dataclasses.dataclass(frozen=True)
class Sparse(Config):
    """Sparse fine-tuning config: train ``⌊density·n⌋`` chosen entries of a leaf.

    Args:
      density: the fraction ``p`` of each leaf's entries to train, in ``(0, 1]``
        (at least one entry per leaf).
      select: ``"random"`` (uniform, keyed by the leaf's path), ``"magnitude"``
        (the largest ``|θ0|``; see ``largest``) or ``"sam"`` (Fu et al.'s
        second-order selection: its ``indices`` come from
        ``jlora.optim.sam_select``).
      largest: for ``"magnitude"``: the largest ``|θ0|`` (True, the paper's
        MagPruning baseline) or the smallest (False).
      indices: the flat indices (row-major in the leaf's own shape) to train,
        as ``jlora.optim.sam_select`` writes them; they override ``select``'s
        rule (``select`` then records how they were chosen).
      dtype: dtype of the trained values; default at least float32.
    """

    density: float = 0.01
    select: str = "random"
    largest: bool = True
    indices: tuple[int, ...] | None = None
    dtype: Any = None

    def __post_init__(self):
        v.real("Sparse", "density", self.density, gt=0.0, le=1.0)
        v.choice("Sparse", "select", self.select, SELECT)
        v.boolean("Sparse", "largest", self.largest)
        if self.indices is not None:
            if isinstance(self.indices, (str, bytes)) or not hasattr(self.indices, "__len__"):
                raise ValueError(f"Sparse: indices must be a sequence of ints, "
                                 f"got {self.indices!r}")
            idx = Indices(self.indices)
            arr = np.asarray(idx, np.int64)
            if arr.size == 0 or (arr < 0).any() or (np.diff(arr) <= 0).any():
                raise ValueError("Sparse: indices must be a non-empty, strictly increasing "
                                 "sequence of ints >= 0")
            object.__setattr__(self, "indices", idx)
        freeze_in_axes(self)  # checks dtype (Sparse has no in_axes)

    def check_leaf(self, base: Array, path: str) -> None:
        """A ``ValueError`` naming ``path`` unless ``base`` is a non-empty floating leaf."""
        super().check_leaf(base, path)
        if math.prod(base.shape) == 0:
            raise ValueError(f"{path}: Sparse needs a leaf with at least one entry, got shape "
                             f"{tuple(base.shape)}")

    def choose(self, key: Array, base: Array, *, path: str) -> Array:
        """The sorted flat int32 indices this config trains in ``base``."""
        n = int(np.prod(base.shape))
        if self.indices is not None:
            if self.indices[-1] >= n:
                raise ValueError(f"{path}: Sparse indices go up to {self.indices[-1]}, but the "
                                 f"leaf of shape {tuple(base.shape)} has {n} entries")
            return jnp.asarray(np.asarray(self.indices, np.int32))
        if self.select == "sam":
            raise ValueError(f"{path}: Sparse(select='sam') needs the indices chosen from "
                             "gradients: build the spec with jlora.optim.sam_select(params, "
                             "spec, loss_fn, batches)")
        k = entries(self.density, n)
        if self.select == "random":
            idx = jax.random.choice(key, n, (k,), replace=False)
        else:
            mag = jnp.abs(base.reshape(-1)).astype(jnp.float32)
            idx = jax.lax.top_k(mag if self.largest else -mag, k)[1]
        return jnp.sort(idx).astype(jnp.int32)

    def build(self, key: Array, base: Array, *, path: str) -> "SparseNode":
        self.check_leaf(base, path)
        idx = self.choose(key, base, path=path)
        return SparseNode(base=base, indices=idx,
                          values=jnp.zeros(idx.shape, factor_dtype(base.dtype, self.dtype)),
                          config=self, shape=tuple(base.shape),
                          in_axes=tuple(range(base.ndim - 1)))


class SparseNode(AdapterNode):
    """``W = base + scatter(indices, values)``; trainable ``values`` only."""

    base: Array
    indices: Array
    values: Array

    config_class = Sparse
    trainable = ("values",)
    field_axes = {"base": Role.BASE, "indices": Role.REPLICATED, "values": Role.REPLICATED}

    def _add(self, leaf: Array, sign: float) -> Array:
        dt = jnp.promote_types(jnp.promote_types(leaf.dtype, jnp.float32), self.values.dtype)
        flat = leaf.reshape(-1).astype(dt).at[self.indices].add(sign * self.values.astype(dt))
        return flat.reshape(leaf.shape).astype(leaf.dtype)

    def delta(self) -> Array:
        return jnp.zeros((math.prod(self.shape),), self.values.dtype) \
            .at[self.indices].set(self.values).reshape(self.shape)

    def materialize(self) -> Array:
        return self._add(self.base, 1.0)

    def merge_onto(self, leaf: Array) -> Array:
        return self._add(leaf, 1.0)

    def unmerge_from(self, leaf: Array) -> Array:
        return self._add(leaf, -1.0)
