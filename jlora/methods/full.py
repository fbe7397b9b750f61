"""``Full()``: train a leaf in full, as PEFT's ``modules_to_save`` does.

For a new classifier head or a norm that must adapt. The leaf keeps its value;
``jlora.split`` puts it in the trainable half and ``jlora.merge`` unwraps it.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"head": {"kernel": jnp.zeros((4, 2))}, "body": {"kernel": jnp.ones((4, 4))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"head/*": jlora.Full()}), key=jax.random.key(0))
    >>> trainable, frozen = jlora.split(adapted)
    >>> trainable["body"]["kernel"] is None
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jlora.methods.base import AdapterNode, Array, Config, LinearOp, Role, strict_options


@strict_options
@dataclasses.dataclass(frozen=True)
class Full(Config):
    """Leave the leaf as it is, but trainable."""

    orientation_free = True  # the whole leaf trains: no input or output axes

    def build(self, key: Array, base: Array, *, path: str) -> "FullNode":
        self.check_leaf(base, path)
        return FullNode(value=base, config=self, shape=tuple(base.shape),
                        in_axes=tuple(range(base.ndim - 1)))


class FullNode(AdapterNode):
    """The leaf itself, trainable; ``merge`` takes its value, ``unmerge`` leaves it."""

    value: Array

    config_class = Full
    trainable = ("value",)
    field_axes = {"value": Role.BASE}

    def materialize(self) -> Array:
        return self.value

    def delta(self) -> Array:
        raise ValueError(
            "a Full() leaf has no delta against its original value: keep the "
            "trained leaf itself (it is part of the trainable tree)"
        )

    def merge_onto(self, leaf: Array) -> Array:
        return self.value

    def unmerge_from(self, leaf: Array) -> Array:
        return leaf  # no original to go back to

    def added_size(self) -> int:
        return 0  # it replaces the leaf, adds nothing

    def dot(self, x: Array, op: LinearOp, **context: Any) -> Array:
        return op(x, self.value)
