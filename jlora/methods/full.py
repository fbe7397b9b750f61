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

from flax import struct

from jlora.methods.base import AdapterNode, Array, Config, LinearOp, strict_options


@strict_options
@dataclasses.dataclass(frozen=True)
class Full(Config):
    """Leave the leaf as it is, but trainable."""

    def build(self, key: Array, base: Array, *, path: str) -> "FullNode":
        self.check_leaf(base, path)
        return FullNode(value=base, config=self, shape=tuple(base.shape),
                        in_axes=tuple(range(base.ndim - 1)))


@struct.dataclass
class FullNode(AdapterNode):
    value: Array
    config: Full = struct.field(pytree_node=False, default=None)
    shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    in_axes: tuple[int, ...] = struct.field(pytree_node=False, default=())

    trainable = ("value",)
    method = "Full"
    field_axes = {"value": "base"}

    def materialize(self) -> Array:
        return self.value

    def delta(self) -> Array:
        raise ValueError(
            "a Full() leaf has no delta against its original value: keep the "
            "trained leaf itself (it is part of the trainable tree)"
        )

    def dot(self, x: Array, op: LinearOp, **_) -> Array:
        return op(x, self.value)
