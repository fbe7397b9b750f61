"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): a larger learning rate for ``b``.

``b`` factors (every factor that maps the rank to the output, ``Role.RANK_OUT``:
AdaLoRA's ``q``, which PEFT stores as ``lora_B``, GLoRA's ``a_d`` and ``b_d``) and,
as in PEFT's ``create_loraplus_optimizer``, every 1-D adapter vector (DoRA's ``m``,
VeRA's scales, AdaLoRA's ``λ``) use ``lr·ratio``; every other trainable leaf
(``a`` factors, ``Full()`` leaves) uses ``lr``.

Example::

    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
    >>> trainable, _ = jlora.split(jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}),
    ...                                        key=jax.random.key(0)))
    >>> tx = jlora.optim.lora_plus(optax.sgd, lr=0.1, ratio=16)
    >>> grads = jax.tree.map(jnp.ones_like, trainable)
    >>> updates, _ = tx.update(grads, tx.init(trainable), trainable)
    >>> round(float(updates["w"]["kernel"].a[0, 0]), 4), round(float(updates["w"]["kernel"].b[0, 0]), 4)
    (-0.1, -1.6)
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import optax

from jlora._validate import function, real
from jlora.methods.full import FullNode
from jlora.tree import Role, is_node

FAST_FIELDS = frozenset({"b"})
Label = Literal["base", "fast"]


def labels(trainable) -> object:
    """``"fast"`` for ``b``-side factors and 1-D adapter vectors, ``"base"`` for the rest
    (a tree of :data:`Label` in the shape of ``trainable``, for ``optax.partition``)."""

    def label(x) -> Any:
        if not is_node(x):
            return "base"
        adapter = not isinstance(x, FullNode)  # Full(): an ordinary weight, trained at lr
        vector = 1 + (getattr(x.config, "expert_axis", None) is not None)  # one per expert
        roles = type(x).field_axes
        return x.replace(**{
            f: ("fast" if adapter and (f in FAST_FIELDS or roles.get(f) is Role.RANK_OUT
                                       or getattr(x, f).ndim == vector)
                else "base")
            for f in x.trainable if getattr(x, f) is not None})

    return jax.tree.map(label, trainable, is_leaf=is_node)


def lora_plus(make_optimizer: Callable[[Any], optax.GradientTransformation],
              lr: float | optax.Schedule, ratio: float = 16.0) -> optax.GradientTransformation:
    """``make_optimizer(lr)`` for ``a``-side leaves, ``make_optimizer(lr·ratio)`` for ``b``-side.

    ``lr > 0`` is a number or an Optax schedule (then the ``b`` side gets
    ``step -> ratio·lr(step)``); ``ratio > 0`` (LoRA+ suggests about 16).
    """
    owner = "jlora.optim.lora_plus"
    function(owner, "make_optimizer", make_optimizer)
    real(owner, "ratio", ratio, gt=0.0)
    if callable(lr):
        fast = lambda step: ratio * lr(step)  # noqa: E731
    else:
        fast = real(owner, "lr", lr, gt=0.0) * ratio
    return optax.partition({"base": make_optimizer(lr), "fast": make_optimizer(fast)}, labels)
