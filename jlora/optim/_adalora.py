"""The AdaLoRA rank allocator as an Optax wrapper, and its orthogonality regulariser.

Zhang et al. ICLR 2023 (arXiv 2303.10512): importance scores §3.2, budget
scheduler §3.3, regulariser §3.1; details as the official code
(QingruZhang/AdaLoRA). See docs/methods.md. After each step of the wrapped
optimizer, for every element ``w`` of every AdaLoRA ``p``, ``λ``, ``q``:

    I = |w ⊙ ∇w|;   Ī ← β1·Ī + (1−β1)·I;   Ū ← β2·Ū + (1−β2)·|I − Ī|;   s = Ī·Ū

and triplet ``i`` of a matrix scores ``S_i = s(λ_i) + mean_j s(p[j, i]) + mean_j s(q[i, j])``.
The budget (total non-zero ``λ`` over all matrices), with ``b0`` the sum of
initial ranks, ``bT`` the sum of target ranks and ``T`` the total steps:

    b(t) = b0                                                  t ≤ t_i
    b(t) = ⌊bT + (b0 − bT)·(1 − (t − t_i)/(T − t_i − t_f))³⌋     t_i < t ≤ T − t_f  (mask every ΔT)
    b(t) = bT                                                  t > T − t_f        (mask every step,
                                                                                     scores frozen)

Masking sets the ``k = b0 − b(t)`` lowest-scoring ``λ`` (jointly over all
matrices) to zero after the update; ``p`` and ``q`` keep training, so a triplet
may come back at a later masking. jlora masks exactly ``k`` triplets (ties
broken by position), so the final count of non-zero ``λ`` is exactly ``bT``
wherever training moves every kept ``λ`` off zero.

Example::

    tx = jlora.optim.adalora(optax.adamw(1e-3), total_steps=1000, init_warmup=100,
                             final_warmup=200, delta_t=10)
    loss = task_loss + 0.1 * jlora.optim.adalora_orthogonality(trainable)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora._validate import positive_int, real, transformation
from jlora.methods.adalora import AdaLoRANode
from jlora.tree import is_node

_FIELDS = ("p", "lam", "q")


class AdaLoRAState(NamedTuple):
    inner: Any
    ipt: list  # per AdaLoRA node: (p, lam, q) EMA of importance
    unc: list  # per AdaLoRA node: (p, lam, q) EMA of uncertainty
    count: jax.Array


def _nodes(tree) -> list:
    return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if isinstance(x, AdaLoRANode)]


def budget(t, *, b0: int, b_target: int, total_steps: int, init_warmup: int, final_warmup: int):
    """``b(t)`` of the cubic schedule; ``t`` is the 1-based step (traceable)."""
    owner = "jlora.optim.budget"
    positive_int(owner, "b0", b0)
    positive_int(owner, "b_target", b_target, minimum=0)
    if b_target > b0:
        raise ValueError(f"{owner}: b_target ({b_target}) must not exceed b0 ({b0})")
    _schedule(owner, total_steps, init_warmup, final_warmup)
    span = max(total_steps - init_warmup - final_warmup, 1)
    frac = jnp.clip((t - init_warmup) / span, 0.0, 1.0)
    cubic = jnp.floor(b_target + (b0 - b_target) * (1.0 - frac) ** 3).astype(jnp.int32)
    b = jnp.where(t <= init_warmup, b0, jnp.where(t > total_steps - final_warmup, b_target, cubic))
    return b


def _schedule(owner: str, total_steps: Any, init_warmup: Any, final_warmup: Any) -> None:
    positive_int(owner, "total_steps", total_steps)
    positive_int(owner, "init_warmup", init_warmup, minimum=0)
    positive_int(owner, "final_warmup", final_warmup, minimum=0)
    if total_steps <= init_warmup + final_warmup:
        raise ValueError(f"{owner}: total_steps ({total_steps}) must exceed init_warmup + "
                         f"final_warmup ({init_warmup + final_warmup})")


def adalora(inner: optax.GradientTransformation, *, total_steps: int, init_warmup: int = 0,
            final_warmup: int = 0, delta_t: int = 1, beta1: float = 0.85,
            beta2: float = 0.85) -> optax.GradientTransformation:
    """Wrap ``inner`` with AdaLoRA's importance scoring and budgeted rank masking.

    ``update`` needs ``params`` (the trainable tree). Other adapters and plain
    leaves pass through ``inner`` untouched by the allocator.
    """
    owner = "jlora.optim.adalora"
    transformation(owner, "inner", inner)
    _schedule(owner, total_steps, init_warmup, final_warmup)
    positive_int(owner, "delta_t", delta_t)
    real(owner, "beta1", beta1, ge=0.0, lt=1.0)
    real(owner, "beta2", beta2, ge=0.0, lt=1.0)

    def init(params):
        nodes = _nodes(params)
        if not nodes:
            raise ValueError("jlora.optim.adalora: params hold no AdaLoRA adapter")
        zeros = [tuple(jnp.zeros_like(getattr(n, f)) for f in _FIELDS) for n in nodes]
        return AdaLoRAState(inner.init(params), zeros, zeros, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("jlora.optim.adalora needs params in update()")
        t = state.count + 1
        p_nodes, g_nodes = _nodes(params), _nodes(updates)
        learning = t <= total_steps - final_warmup  # scores freeze in the final phase
        ipt, unc, scores = [], [], []
        for pn, gn, i_old, u_old in zip(p_nodes, g_nodes, state.ipt, state.unc):
            i_new, u_new, s = [], [], []
            for f, io, uo in zip(_FIELDS, i_old, u_old):
                imp = jnp.abs(getattr(pn, f) * getattr(gn, f))
                ib = beta1 * io + (1 - beta1) * imp
                ub = beta2 * uo + (1 - beta2) * jnp.abs(imp - ib)
                ib, ub = jnp.where(learning, ib, io), jnp.where(learning, ub, uo)
                i_new.append(ib)
                u_new.append(ub)
                s.append(ib * ub)
            ipt.append(tuple(i_new))
            unc.append(tuple(u_new))
            sp, sl, sq = s
            # a stacked node (expert_axis=0) holds one matrix per slice: its
            # triplets compete in the one global budget like any other matrix's
            scores.append((sl + sp.mean(-2) + sq.mean(-1)).ravel())
        inner_updates, inner_state = inner.update(updates, state.inner, params)

        b0 = sum(n.lam.size for n in p_nodes)
        bt = sum(n.config.target_rank * (n.lam.size // n.config.init_rank) for n in p_nodes)
        b = budget(t, b0=b0, b_target=bt, total_steps=total_steps, init_warmup=init_warmup,
                   final_warmup=final_warmup)
        in_cubic = (t > init_warmup) & (t <= total_steps - final_warmup)
        mask_now = (t > total_steps - final_warmup) | (in_cubic & ((t - init_warmup) % delta_t == 0))
        all_scores = jnp.concatenate(scores)
        rank_of = jnp.argsort(jnp.argsort(all_scores, stable=True), stable=True)
        masked = mask_now & (rank_of < (b0 - b))

        flat, treedef = jax.tree.flatten(inner_updates, is_leaf=is_node)
        offset, k = 0, 0
        for i, leaf in enumerate(flat):
            if isinstance(leaf, AdaLoRANode):
                pn = p_nodes[k]
                r = pn.lam.size
                m = masked[offset:offset + r].reshape(pn.lam.shape)
                flat[i] = leaf.replace(lam=jnp.where(m, -pn.lam, leaf.lam))
                offset, k = offset + r, k + 1
        return jax.tree.unflatten(treedef, flat), AdaLoRAState(inner_state, ipt, unc, t)

    return optax.GradientTransformation(init, update)


def adalora_orthogonality(trainable) -> jax.Array:
    """``mean over AdaLoRA matrices of ‖pᵀp − I‖_F + ‖q·qᵀ − I‖_F`` (not squared, as the
    official code); add ``w ×`` it to the loss (``w`` = 0.1 in the README, 0.5 in PEFT)."""
    nodes = _nodes(trainable)
    if not nodes:
        raise ValueError("jlora.optim.adalora_orthogonality: the tree holds no AdaLoRA adapter")
    terms = []
    for n in nodes:  # a stacked node: one term per slice
        eye = jnp.eye(n.p.shape[-1], dtype=n.p.dtype)
        pp = jnp.swapaxes(n.p, -1, -2) @ n.p - eye
        qq = n.q @ jnp.swapaxes(n.q, -1, -2) - eye
        terms.append((jnp.linalg.norm(pp, axis=(-2, -1))
                      + jnp.linalg.norm(qq, axis=(-2, -1))).ravel())
    return jnp.mean(jnp.concatenate(terms))
