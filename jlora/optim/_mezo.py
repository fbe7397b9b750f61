"""MeZO: zero-order SPSA fine-tuning with the in-place seed trick (Malladi et al. NeurIPS 2023).

Per step, with ``z ~ N(0, I)`` drawn from ``key`` (never stored):

    L+ = L(θ + ε·z),   L- = L(θ − ε·z),   g = (L+ − L-) / (2ε)

and the update is ``θ ← θ − η·(g·z + λ·θ)`` with ``z`` regenerated from the same
key. Two forward passes, no backward, no stored perturbation: inside ``jit`` each
leaf's ``z`` is a temporary that XLA frees after use. Works on a ``jlora.split``
trainable tree (adapters) or on full params. Keep dropout off in ``loss_fn``.

* :func:`mezo_sgd` is the paper's update (SGD with decoupled weight decay).
* :func:`mezo_gradient` returns the estimate ``g·z`` as a gradient tree for any
  Optax optimizer (the tree is full-size, like any gradient).

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
    >>> p = {"w": jnp.zeros(4)}
    >>> for i in range(300):
    ...     p, _ = jlora.optim.mezo_sgd(loss, p, jax.random.key(i), eps=1e-3, lr=0.05)
    >>> bool(loss(p) < 1.0)
    True
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jlora._validate import function, real_or_traced


def perturbation(key: jax.Array, params: Any) -> Any:
    """The ``z`` tree for ``key``: one normal array per leaf (regenerable, never stored)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def _shift(params, key, scale):
    return jax.tree.map(lambda x, z: x + scale * z, params, perturbation(key, params))


def _check(owner: str, loss_fn: Any, eps: Any, **numbers: Any) -> None:
    function(owner, "loss_fn", loss_fn)
    real_or_traced(owner, "eps", eps, gt=0.0)
    for name, value in numbers.items():  # lr, weight_decay
        real_or_traced(owner, name, value, ge=0.0)


def projected_gradient(loss_fn: Callable, params: Any, key: jax.Array, *args,
                       eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """``(g, loss)``: the SPSA projected gradient along ``z(key)`` and ``(L+ + L-)/2``."""
    _check("jlora.optim.projected_gradient", loss_fn, eps)
    lp = loss_fn(_shift(params, key, eps), *args)
    lm = loss_fn(_shift(params, key, -eps), *args)
    return (lp - lm) / (2 * eps), (lp + lm) / 2


def mezo_sgd(loss_fn: Callable, params: Any, key: jax.Array, *args, eps: float = 1e-3,
             lr: float = 1e-6, weight_decay: float = 0.0) -> tuple[Any, jax.Array]:
    """One MeZO-SGD step: returns ``(new_params, loss)``.

    ``eps > 0`` is the perturbation size, ``lr >= 0`` and ``weight_decay >= 0``
    the SGD step; each may be traced (a scheduled ``lr`` inside ``jit``).
    """
    _check("jlora.optim.mezo_sgd", loss_fn, eps, lr=lr, weight_decay=weight_decay)
    g, loss = projected_gradient(loss_fn, params, key, *args, eps=eps)
    z = perturbation(key, params)
    # cast back: g and a traced lr are float32, which would promote bfloat16 params
    return jax.tree.map(lambda x, zz: (x - lr * (g * zz + weight_decay * x)).astype(x.dtype),
                        params, z), loss


def mezo_gradient(loss_fn: Callable, params: Any, key: jax.Array, *args,
                  eps: float = 1e-3) -> tuple[jax.Array, Any]:
    """``(loss, g·z)``: the zero-order gradient estimate, for an Optax update."""
    _check("jlora.optim.mezo_gradient", loss_fn, eps)
    g, loss = projected_gradient(loss_fn, params, key, *args, eps=eps)
    return loss, jax.tree.map(lambda zz: (g * zz).astype(zz.dtype), perturbation(key, params))
