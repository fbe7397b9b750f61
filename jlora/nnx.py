"""Flax NNX helpers.

NNX needs no special path: ``jlora.apply`` works directly on the ``nnx.State``
that ``nnx.split`` returns (paths read ``fc1/kernel``, without the Variable's
``value``), and the generic compute path rebuilds a plain model from merged
weights inside your jitted loss.

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
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jlora.core import merge as _merge_tree


def merge(graphdef: Any, adapted: Any, *rest: Any) -> nnx.Module:
    """``nnx.merge(graphdef, jlora.merge(adapted), *rest)``: a working plain module."""
    return nnx.merge(graphdef, _merge_tree(adapted), *rest)
