"""FLORA: momentum compressed by random projections (Hao et al. ICML 2024, arXiv 2402.03293).

For full-parameter training with low-rank optimizer *state*. For a 2-D
gradient ``G (m, n)`` only the smaller side is compressed: if ``m < n``,
``down(G) = P·G`` with ``P (τ, m)``, ``up(C) = Pᵀ·C``; else ``down(G) = G·P``
with ``P (n, τ)``, ``up(C) = C·Pᵀ``. ``P`` has ``N(0, 1/τ)`` entries drawn from
a PRNG key kept in the state (two integers), never stored itself. Each step:

    every κ steps:  key' = next key;  m̃ ← down'(up(m̃))        (resample, carry over)
    m̃ ← β·m̃ + (1−β)·down(G)
    direction = β·up(m̃) + (1−β)·G

The direction replaces the gradient: chain it with a learning rate, e.g.
``optax.chain(jlora.optim.flora(rank=8), optax.scale(-lr))``. 1-D leaves, small
matrices (min dim < ``min_dim``) and very elongated ones (aspect > ``max_aspect``)
keep ordinary momentum. Compressed state is ``τ·max(m, n)`` numbers per matrix
instead of ``m·n``. (The paper also puts Adafactor's factored second moment in
front; compose ``optax.scale_by_factored_rms()`` before ``flora`` for that.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora._validate import positive_int, real


class FloraState(NamedTuple):
    momentum: Any  # per leaf: compressed (τ, n) / (m, τ), or full for uncompressed leaves
    key: jax.Array  # raw uint32 key data of the current projection
    count: jax.Array


def compressed(shape, *, min_dim: int, max_aspect: float) -> bool:
    if len(shape) != 2:
        return False
    m, n = shape
    return min(m, n) >= min_dim and max(m, n) / min(m, n) <= max_aspect


def projection(key: jax.Array, index: int, shape, rank: int, dtype=jnp.float32) -> jax.Array:
    """``P`` for leaf ``index`` of a ``shape`` gradient: ``(τ, m)`` if ``m < n`` else ``(n, τ)``."""
    positive_int("jlora.optim.projection", "rank", rank)
    positive_int("jlora.optim.projection", "index", index, minimum=0)
    m, n = shape
    k = jax.random.fold_in(jax.random.wrap_key_data(key), index)
    p_shape = (rank, m) if m < n else (n, rank)
    return jax.random.normal(k, p_shape, dtype) / jnp.sqrt(rank).astype(dtype)


def _down(p, g):
    m, n = g.shape
    return p @ g if m < n else g @ p


def _up(p, c, shape):
    m, n = shape
    return p.T @ c if m < n else c @ p.T


def flora(rank: int = 8, *, kappa: int = 1000, beta: float = 0.9, seed: int = 0,
          min_dim: int = 128, max_aspect: float = 4.0) -> optax.GradientTransformation:
    """FLORA compressed momentum (see the module docstring).

    ``rank`` (τ >= 1) is the projection size, ``kappa >= 1`` the steps between
    projection resamples, ``0 <= beta < 1`` the momentum decay; matrices with
    ``min(m, n) < min_dim`` or aspect ``> max_aspect`` (>= 1) stay uncompressed.
    """
    owner = "jlora.optim.flora"
    positive_int(owner, "rank", rank)
    positive_int(owner, "kappa", kappa)
    real(owner, "beta", beta, ge=0.0, lt=1.0)
    positive_int(owner, "seed", seed, minimum=0)
    positive_int(owner, "min_dim", min_dim)
    real(owner, "max_aspect", max_aspect, ge=1.0)

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        mom = []
        for x in leaves:
            if compressed(x.shape, min_dim=min_dim, max_aspect=max_aspect):
                m, n = x.shape
                mom.append(jnp.zeros((rank, n) if m < n else (m, rank), x.dtype))
            else:
                mom.append(jnp.zeros_like(x))
        key = jax.random.key_data(jax.random.key(seed))
        return FloraState(jax.tree.unflatten(treedef, mom), key, jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(grads)
        moms = treedef.flatten_up_to(state.momentum)
        resample = (state.count > 0) & (state.count % kappa == 0)
        new_key = jnp.where(resample, jax.random.key_data(jax.random.split(
            jax.random.wrap_key_data(state.key))[0]), state.key)
        out, new_moms = [], []
        for i, (g, mt) in enumerate(zip(leaves, moms)):
            if compressed(g.shape, min_dim=min_dim, max_aspect=max_aspect):
                p_new = projection(new_key, i, g.shape, rank, g.dtype)
                # a branch, not a select: the old projection and the transfer
                # (two τ·m·n products) are paid once every κ steps, not every step
                mt = jax.lax.cond(
                    resample,
                    lambda m, i=i, shape=g.shape, dtype=g.dtype, p_new=p_new: _down(
                        p_new, _up(projection(state.key, i, shape, rank, dtype), m, shape)),
                    lambda m: m, mt)
                mt = beta * mt + (1 - beta) * _down(p_new, g)
                out.append(beta * _up(p_new, mt, g.shape) + (1 - beta) * g)
            else:
                mt = beta * mt + (1 - beta) * g
                out.append(beta * mt + (1 - beta) * g)
            new_moms.append(mt)
        return (jax.tree.unflatten(treedef, out),
                FloraState(jax.tree.unflatten(treedef, new_moms), new_key, state.count + 1))

    return optax.GradientTransformation(init, update)
