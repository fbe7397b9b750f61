"""Balancedness of LoRA factors: SAM, BAR and the exact balancing projection (BaLoRA).

The balancedness of a factor pair is ``B = ‖a‖²_F − ‖b‖²_F``. Gradient flow on
any loss of the product ``a·b`` conserves it; SAM (sharpness-aware
minimisation) drives it towards 0 (Li, Zhang, He, NeurIPS 2024, arXiv 2410.14802).

**BAR, as derived here** (the authors publish no code, so jlora derives the
explicit term from SAM's balancedness dynamics and says so; docs/methods.md). For
``L = f(a·b)`` with ``G = ∇f(a·b)``, ``∇_a = G·bᵀ``, ``∇_b = aᵀ·G``. SAM takes
the gradient at ``θ + ε``, ``ε = c·∇``, ``c = ρ/‖∇‖``. With the adapter's
scale ``s`` (``K = K0 + s·a·b``, so ``∇_a = s·G·bᵀ``, ``∇_b = s·aᵀ·G``) and the
Hessian of ``f`` taken as the identity (exact for ``½‖K0 + s·a·b − M‖²``),
``G(θ+ε) = G + s·(ε_a·b + a·ε_b + ε_a·ε_b)`` and the balancedness change of
one SGD step of size ``η`` is ``ΔB_SAM = −2η·D`` with

    D = c·(‖∇_b‖² − ‖∇_a‖²) + s²·c²·(⟨aᵀa, ∇_b∇_bᵀ⟩ − ⟨bbᵀ, ∇_aᵀ∇_a⟩)
        + s²·c³·(⟨∇_aᵀa, ∇_b∇_bᵀ⟩ − ⟨∇_aᵀ∇_a, b∇_bᵀ⟩)

(the Hessian terms linear in ``ε`` cancel between ``a`` and ``b``). The first
term alone is SAM's small-``ρ`` limit; near a minimum, where ``‖∇‖`` is small
against ``ρ``, the ``c²`` term is what keeps balancing, so BAR keeps all three.
BAR reproduces this drift with the gradients already in hand (one gradient
call, no second forward/backward): it adds ``μ·a`` to ``∇_a`` and ``−μ·b`` to
``∇_b`` with ``μ = D / (‖a‖² + ‖b‖²)``, whose own drift is
``−2ημ·(‖a‖² + ‖b‖²) = ΔB_SAM``. Every term is an ``r×r`` contraction:
``O((in + out)·r²)`` per pair, against SAM's second forward and backward.

**BaLoRA** (Castin et al. 2026): replace ``(a, b)`` after each step by the
balanced factorisation of the same product: QR of ``a`` and ``bᵀ``, SVD of
the small ``r×r`` core, ``a' = Q_a·U·√S``, ``b' = √S·Vᵀ·Q_bᵀ``, so
``a'ᵀa' = b'b'ᵀ`` and ``B = 0`` exactly, with ``a'·b' = a·b``.

Stacked-expert pairs (``expert_axis=0``: ``a (E, in, r)``, ``b (E, r, out)``)
are ``E`` pairs: each expert has its own balancedness, drift and balancing.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora._validate import function, real, transformation
from jlora.tree import is_node


def _is_pair(x) -> bool:
    """A node whose trainable ``a`` and ``b`` are both present (LoRA, DoRA)."""
    return (is_node(x) and {"a", "b"} <= set(x.trainable)
            and getattr(x, "a", None) is not None and getattr(x, "b", None) is not None)


def _pairs(tree) -> list:
    return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if _is_pair(x)]


def _sq(x):
    """``‖x‖²_F`` over the last two axes (one per expert for stacked factors)."""
    return jnp.sum(jnp.square(x), axis=(-2, -1))


def _dot(x, y):
    """``⟨x, y⟩_F`` over the last two axes."""
    return jnp.sum(x * y, axis=(-2, -1))


def balancedness(tree) -> jax.Array:
    """``‖a‖² − ‖b‖²`` of every trainable LoRA pair (one per expert of a stacked
    pair), concatenated in tree order into a ``(n_pairs,)`` vector."""
    return jnp.concatenate([jnp.ravel(_sq(n.a) - _sq(n.b)) for n in _pairs(tree)])


def _map_pairs(fn, updates, params):
    """Apply ``fn(update_node, param_node) -> update_node`` to every LoRA pair."""
    flat_u, treedef = jax.tree.flatten(updates, is_leaf=is_node)
    flat_p = jax.tree.leaves(params, is_leaf=is_node)
    out = [fn(u, p) if _is_pair(u) else u for u, p in zip(flat_u, flat_p)]
    return jax.tree.unflatten(treedef, out)


def sam_drift(a, b, ga, gb, c, scale=1.0) -> jax.Array:
    """``D`` with ``ΔB_SAM = −2η·D``: SAM's balancedness drift for one pair, ``c = ρ/‖∇‖``.

    ``scale`` is the adapter's ``s`` in ``K0 + s·a·b``. Exact for a loss
    quadratic in ``K`` with identity Hessian, a Gauss–Newton style
    approximation otherwise; every term is an ``r×r`` contraction. Factors with
    a leading expert axis give one ``D`` per expert.
    """
    first = _sq(gb) - _sq(ga)
    second = _dot(a.mT @ a, gb @ gb.mT) - _dot(b @ b.mT, ga.mT @ ga)
    third = _dot(ga.mT @ a, gb @ gb.mT) - _dot(ga.mT @ ga, b @ gb.mT)
    return c * first + scale ** 2 * (c ** 2 * second + c ** 3 * third)


def bar(rho: float = 0.05) -> optax.GradientTransformation:
    """BAR: the explicit balancedness term matching SAM's drift (put it before the optimizer).

    ``optax.chain(jlora.optim.bar(0.05), optax.sgd(lr))``; ``update`` needs ``params``.
    ``rho >= 0`` is SAM's neighbourhood radius whose drift BAR reproduces (0: no term).
    """
    real("jlora.optim.bar", "rho", rho, ge=0.0)

    def init(params):
        return optax.EmptyState()

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("jlora.optim.bar needs params in update()")
        gnorm = optax.tree.norm(grads)

        def one(g, p):
            mu = sam_drift(p.a, p.b, g.a, g.b, rho / (gnorm + 1e-12), p.scale) / (
                _sq(p.a) + _sq(p.b) + 1e-12)
            mu = mu[..., None, None]  # per expert for stacked pairs
            return g.replace(a=(g.a + mu * p.a).astype(g.a.dtype),
                             b=(g.b - mu * p.b).astype(g.b.dtype))

        return _map_pairs(one, grads, params), state

    return optax.GradientTransformation(init, update)


def sam_gradient(loss_fn: Callable, params: Any, *args, rho: float = 0.05):
    """``(loss, grads)`` of SAM: the gradient at ``θ + ρ·∇/‖∇‖`` (two gradient calls)."""
    function("jlora.optim.sam_gradient", "loss_fn", loss_fn)
    real("jlora.optim.sam_gradient", "rho", rho, ge=0.0)
    loss, g = jax.value_and_grad(loss_fn)(params, *args)
    scale = rho / (optax.tree.norm(g) + 1e-12)
    perturbed = jax.tree.map(lambda p, gg: p + scale * gg, params, g)
    return loss, jax.grad(loss_fn)(perturbed, *args)


def balance(tree) -> Any:
    """Every trainable LoRA pair replaced by the balanced factorisation of its product."""

    def one(node):
        # QR and SVD in float32 at least (XLA has no bfloat16 decompositions)
        acc = jnp.promote_types(node.a.dtype, jnp.float32)
        qa, ra = jnp.linalg.qr(node.a.astype(acc))
        qb, rb = jnp.linalg.qr(node.b.astype(acc).mT)
        u, s, vt = jnp.linalg.svd(ra @ rb.mT)
        root = jnp.sqrt(s)
        return node.replace(a=((qa @ u) * root[..., None, :]).astype(node.a.dtype),
                            b=((root[..., :, None] * vt) @ qb.mT).astype(node.b.dtype))

    return jax.tree.map(lambda x: one(x) if _is_pair(x) else x, tree,
                        is_leaf=is_node)


class _Balanced(NamedTuple):
    inner: Any


def balora(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap ``inner`` so that every step lands on the balanced factorisation (BaLoRA)."""
    transformation("jlora.optim.balora", "inner", inner)

    def init(params):
        return _Balanced(inner.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("jlora.optim.balora needs params in update()")
        updates, inner_state = inner.update(grads, state.inner, params)
        stepped = balance(optax.apply_updates(params, updates))
        return jax.tree.map(lambda new, old: new - old, stepped, params), _Balanced(inner_state)

    return optax.GradientTransformation(init, update)
