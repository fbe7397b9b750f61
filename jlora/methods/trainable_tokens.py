"""``TrainableTokens(indices=[...])``: train only chosen rows of a vocabulary table.

PEFT's trainable tokens (``TrainableTokensConfig``, LoRA's
``trainable_token_indices``; no paper, huggingface/peft #2376): for a table
``E`` of shape ``(vocab, dim)`` and token ids ``idx = (i_1, …, i_k)`` the node
holds the frozen ``E`` and trainable ``rows`` of shape ``(k, dim)`` (the new row
*values*, not differences), and the adapted table is

    E' = E with E'[i_j] = rows[j]        (j = 1 … k; all other rows frozen).

Only ``rows`` is trained and stored (``jlora.split``, checkpoints and PEFT
files hold ``k·dim`` numbers plus the static indices). ``init_weights=True``
(default, PEFT's) starts from ``rows = E[idx]``, so the model is unchanged at
init; ``False`` draws ``rows ~ N(0, 1)`` (PEFT's ``init_weights=False``).

Targets (``token_axis`` is the axis of the 2-D leaf that indexes tokens):

* an embedding table ``(vocab, dim)``, ``token_axis=0``: the default for a leaf
  named ``embedding`` (Flax ``Embed``). ``jlora.linen.apply`` looks ids up in
  ``E`` and overwrites the hits from ``rows`` without forming ``E'``.
* a 2-D output-head kernel ``(dim, vocab)``, ``token_axis=1``: the default for
  a leaf named ``kernel`` (Flax ``Dense``, PEFT's Linear ``lm_head`` with rows of
  its ``(vocab, dim)`` weight); logits ``x·K'`` with ``K'[:, i_j] = rows[j]``.
* a leaf of any other name (``input_embedding``, a torch-style ``weight``)
  needs ``token_axis`` given: guessing would train feature columns of a table
  whose ids happen to be below ``dim``.

**Tied embeddings.** A model whose output head reads the embedding table
itself (``Embed.attend``, or Hugging Face Flax models passing the shared
embedding to the head) stays tied with no option: there is one leaf, one node
and one set of rows; ``Embed.attend`` reads the adapted table ``E'`` (the fast
path serves it from the merged weights), so logits are ``h·E'ᵀ`` and the
gradient of ``rows`` sums both uses, as PEFT's ``tied_adapter`` does. A model
with a separate head parameter is untied: give it its own rule.

``merge`` writes the rows into the table; ``merge(adapted, onto=served)``
writes them into ``served``'s table and ``unmerge`` restores the original rows
(PEFT's merge/unmerge), so ``delta()`` is ``E' − E`` (non-zero only on ``idx``).

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"emb": {"embedding": jnp.ones((10, 4))}}
    >>> spec = jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=[7, 2])})
    >>> adapted = jlora.apply(params, spec, key=jax.random.key(0))
    >>> node = adapted["emb"]["embedding"]
    >>> node.rows.shape, jlora.count_trainable(adapted)
    ((2, 4), 8)
    >>> node = node.replace(rows=jnp.zeros((2, 4)))
    >>> jlora.merge({"e": node})["e"].sum(axis=1).tolist()
    [4.0, 4.0, 0.0, 4.0, 4.0, 4.0, 4.0, 0.0, 4.0, 4.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora import _validate as v
from jlora.methods.base import (
    AdapterNode,
    Array,
    Config,
    LinearOp,
    Role,
    factor_dtype,
    strict_options,
)


def check_indices(owner: str, name: str, indices: Any) -> tuple[int, ...]:
    """A non-empty tuple of distinct ints >= 0, or a ``ValueError`` naming the option."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise ValueError(f"{owner}: {name} must be a sequence of token ids, got {indices!r}")
    out = []
    for i in list(np.asarray(indices).reshape(-1)) if isinstance(indices, (np.ndarray, jax.Array)) \
            else list(indices):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{owner}: {name} must hold ints, got {i!r} in {indices!r}")
        if i < 0:
            raise ValueError(f"{owner}: {name} must hold token ids >= 0, got {int(i)}")
        out.append(int(i))
    if not out:
        raise ValueError(f"{owner}: {name} is empty; name at least one token id")
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise ValueError(f"{owner}: {name} lists token id(s) {dup} more than once")
    return tuple(out)


_AXIS_BY_NAME = {"embedding": 0, "kernel": 1}  # Flax Embed's table, Dense's kernel


@strict_options
@dataclasses.dataclass(frozen=True)
class TrainableTokens(Config):
    """Train the rows ``indices`` of an embedding table (or columns of a head kernel).

    Args:
      indices: distinct token ids ``>= 0`` and below the vocabulary size (checked
        per leaf, the error names the path); stored as a tuple.
      init_weights: ``True`` starts the rows at their current values (identity at
        init); ``False`` draws them from ``N(0, 1)`` (PEFT's ``init_weights``).
      token_axis: keyword only; the axis of the 2-D leaf that indexes tokens:
        ``0`` for a ``(vocab, dim)`` table, ``1`` for a ``(dim, vocab)`` head
        kernel. ``None`` (default) takes it from the leaf's name: ``embedding``
        is ``0``, ``kernel`` is ``1``, any other name is a ``ValueError``.
    """

    indices: tuple[int, ...]
    init_weights: bool = True
    token_axis: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "indices", check_indices(name, "indices", self.indices))
        v.boolean(name, "init_weights", self.init_weights)
        axis = self.token_axis
        if axis is not None:
            if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) \
                    or axis not in (0, 1):
                raise ValueError(f"{name}: token_axis must be None, 0 (a (vocab, dim) table) or "
                                 f"1 (a (dim, vocab) head kernel), got {axis!r}")
            object.__setattr__(self, "token_axis", int(axis))

    def axis_for(self, path: str) -> int:
        """The token axis of the leaf at ``path``: ``token_axis``, else from the leaf's name."""
        if self.token_axis is not None:
            return self.token_axis
        leaf = path.rpartition("/")[2]
        if leaf in _AXIS_BY_NAME:
            return _AXIS_BY_NAME[leaf]
        raise ValueError(f"{path}: TrainableTokens cannot tell which axis of a leaf named "
                         f"{leaf!r} indexes tokens (only 'embedding' (vocab, dim) and 'kernel' "
                         "(dim, vocab) are known): give token_axis=0 for a (vocab, dim) table "
                         "or token_axis=1 for a (dim, vocab) head kernel")

    def build(self, key: Array, base: Array, *, path: str) -> "TrainableTokensNode":
        self.check_leaf(base, path)
        if base.ndim != 2:
            raise ValueError(f"{path}: TrainableTokens needs a 2-D table (vocab, dim) or head "
                             f"kernel (dim, vocab), got shape {tuple(base.shape)}")
        axis = self.axis_for(path)
        vocab, dim = base.shape[axis], base.shape[1 - axis]
        bad = [i for i in self.indices if i >= vocab]
        if bad:
            raise ValueError(f"{path}: TrainableTokens indices {bad} are out of range for a "
                             f"vocabulary of {vocab} tokens (shape {tuple(base.shape)})")
        dt = factor_dtype(base.dtype, None)
        idx = np.asarray(self.indices)
        if self.init_weights:
            rows = (base[idx] if axis == 0 else base[:, idx].T).astype(dt)
        else:
            rows = jax.random.normal(key, (len(idx), dim), dt)
        return TrainableTokensNode(base=base, rows=rows, config=self, shape=tuple(base.shape),
                                   in_axes=(0,), token_axis=axis)


class TrainableTokensNode(AdapterNode):
    """``E' = E.at[idx].set(rows)``; trainable ``rows`` ``(k, dim)``; ``token_axis`` static."""

    base: Array
    rows: Array
    token_axis: int = struct.field(pytree_node=False, default=0)

    config_class = TrainableTokens
    trainable = ("rows",)
    field_axes = {"base": Role.BASE, "rows": Role.REPLICATED}

    @property
    def indices(self) -> tuple[int, ...]:
        return self.config.indices

    def _write(self, table: Array, rows: Array) -> Array:
        idx = np.asarray(self.indices)
        rows = rows.astype(table.dtype)
        if self.token_axis == 0:
            return table.at[idx].set(rows)
        return table.at[:, idx].set(rows.T)

    def _original_rows(self) -> Array:
        idx = np.asarray(self.indices)
        return self.base[idx] if self.token_axis == 0 else self.base[:, idx].T

    def materialize(self) -> Array:
        return self._write(self.base, self.rows)

    def delta(self) -> Array:
        dt = jnp.promote_types(self.base.dtype, self.rows.dtype)
        zero = jnp.zeros(self.shape, dt)
        return self._write(zero, self.rows.astype(dt) - self._original_rows().astype(dt))

    def merge_onto(self, leaf: Array) -> Array:
        return self._write(leaf, self.rows)  # PEFT's merge: the rows replace the table's

    def unmerge_from(self, leaf: Array) -> Array:
        return self._write(leaf, self._original_rows())  # PEFT's unmerge: the original rows

    def dot(self, x: Array, op: LinearOp, *, dropout_key: Array | None = None,
            **context: Any) -> Array:
        k = len(self.indices)
        if self.token_axis == 0:  # Embed lookup: ids -> base row, or rows[j] for id i_j
            slot = jnp.full((self.shape[0],), k, jnp.int32).at[np.asarray(self.indices)].set(
                jnp.arange(k, dtype=jnp.int32))[x]
            y = op(x, self.base)
            extra = jnp.concatenate([self.rows, jnp.zeros((1,) + self.rows.shape[1:],
                                                          self.rows.dtype)])
            hit = op(slot, extra)
            return jnp.where((slot < k)[..., None], hit.astype(y.dtype), y)
        y = op(x, self.base)  # head kernel (dim, vocab): logits of the idx columns
        cols = op(x, self.rows.T.astype(self.base.dtype))
        return y.at[..., np.asarray(self.indices)].set(cols.astype(y.dtype))
