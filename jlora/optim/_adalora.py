"""The AdaLoRA rank allocator as an Optax wrapper, and its orthogonality regulariser.

Zhang et al. ICLR 2023 (arXiv 2303.10512): importance scores §3.2, budget
scheduler §3.3, regulariser §3.1; details as the official code
(QingruZhang/AdaLoRA) and PEFT 0.21 (``peft.tuners.adalora``), which agree on
all of them except where noted. See docs/methods.md.

At step ``t`` (1-based) the wrapped optimizer updates first; then, for every
element ``w`` of every AdaLoRA ``p``, ``λ``, ``q``, with ``w⁺ = w + Δw`` the
weight *after* that update and ``∇w`` the gradient of step ``t``:

    I = |w⁺ ⊙ ∇w|;   Ī ← β1·Ī + (1−β1)·I;   Ū ← β2·Ū + (1−β2)·|I − Ī|;   s = Ī·Ū

This is the peers' order (they score after ``optimizer.step()``); the paper's
Algorithm 1 scores the weights before the step. The scores stop updating from
``t = T − t_f`` on (both peers update only while ``t < T − t_f``).
Triplet ``i`` of a matrix scores ``S_i = s(λ_i) + mean_j s(p[j, i]) + mean_j s(q[i, j])``.
The budget (total non-zero ``λ`` over all matrices), with ``b0`` the sum of
initial ranks, ``bT`` the sum of target ranks and ``T`` the total steps, in exact
integer arithmetic:

    b(t) = b0                                                  t ≤ t_i
    b(t) = ⌊bT + (b0 − bT)·(1 − (t − t_i)/(T − t_i − t_f))³⌋     t_i < t ≤ T − t_f
    b(t) = bT                                                  t > T − t_f

Masking sets the ``k = b0 − b(t)`` lowest-scoring ``λ`` (jointly over all
matrices) to zero after the update, at the steps ``t_i < t < T − t_f`` that are
multiples of ``ΔT`` (``t % ΔT == 0``, not counted from ``t_i``), and at every
step ``t ≥ T − t_f``. The mask at ``t = T − t_f`` is forced as in PEFT (the
official code masks there only if ``ΔT`` divides ``t``); as the scores are
frozen from then on, every later step masks the same set. ``p`` and ``q`` keep
training, so a triplet masked in the cubic phase may come back at a later
masking. jlora masks exactly ``k`` triplets (ties broken by position; the peers
mask every score at or below the k-th), so the final count of non-zero ``λ`` is
exactly ``bT`` wherever training moves every kept ``λ`` off zero.

Example::

    tx = jlora.optim.adalora(optax.adamw(1e-3), total_steps=1000, init_warmup=100,
                             final_warmup=200, delta_t=10)
    loss = task_loss + 0.1 * jlora.optim.adalora_orthogonality(trainable)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
    """``b(t)`` of the cubic schedule; ``t`` is the 1-based step (traceable, any shape).

    Exact: the cubic term is counted in integers (``_cubic_steps``) because floating
    point rounds a budget whose real value is an integer to just below it, and the
    floor then loses one (float32 gives 17 for ``b0=1152, bT=0, T=1000, t=750``, not 18).
    """
    owner = "jlora.optim.budget"
    positive_int(owner, "b0", b0)
    positive_int(owner, "b_target", b_target, minimum=0)
    if b_target > b0:
        raise ValueError(f"{owner}: b_target ({b_target}) must not exceed b0 ({b0})")
    _schedule(owner, total_steps, init_warmup, final_warmup)
    span = total_steps - init_warmup - final_warmup
    t = jnp.asarray(t)
    left = span - jnp.clip(t - init_warmup, 0, span)  # span·(1 − frac), an integer
    steps = _cubic_steps(b0 - b_target, span)
    above = (jnp.searchsorted(steps, left.astype(jnp.int32), side="right")
             if steps.size else jnp.zeros(left.shape, jnp.int32))
    cubic = b_target + above.astype(jnp.int32)
    return jnp.where(t <= init_warmup, b0, jnp.where(t > total_steps - final_warmup, b_target, cubic))


@functools.lru_cache(maxsize=64)
def _cubic_steps(d: int, span: int) -> np.ndarray:
    """``m_j`` for ``j = 1..d``: the least integer ``m`` with ``d·m³ ≥ j·span³``.

    ``⌊d·(left/span)³⌋ = #{j ≥ 1 : j·span³ ≤ d·left³} = #{j : m_j ≤ left}``, so a
    sorted search of ``left`` in this table is the cubic term exactly, with a
    table no longer than the number of triplets.
    """
    out = []
    for j in range(1, d + 1):
        need = -(-j * span ** 3 // d)  # m³ ≥ ⌈j·span³/d⌉
        m = round(need ** (1 / 3))
        while m ** 3 < need:
            m += 1
        while m > 0 and (m - 1) ** 3 >= need:
            m -= 1
        out.append(m)
    table = np.asarray(out, np.int32).reshape(-1)  # m_j ≤ span < 2³¹ (total_steps is an int32 count)
    table.flags.writeable = False  # shared through the cache
    return table


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
        inner_updates, inner_state = inner.update(updates, state.inner, params)
        p_nodes, g_nodes, u_nodes = _nodes(params), _nodes(updates), _nodes(inner_updates)
        final = total_steps - final_warmup
        learning = t < final  # scores freeze from T − t_f on, as both peers
        ipt, unc, scores = [], [], []
        for pn, gn, un, i_old, u_old in zip(p_nodes, g_nodes, u_nodes, state.ipt, state.unc):
            i_new, u_new, s = [], [], []
            for f, io, uo in zip(_FIELDS, i_old, u_old):
                w = getattr(pn, f)
                w_next = (w + getattr(un, f)).astype(w.dtype)  # as optax.apply_updates
                imp = jnp.abs(w_next * getattr(gn, f)).astype(io.dtype)
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

        b0 = sum(n.lam.size for n in p_nodes)
        bt = sum(n.config.target_rank * (n.lam.size // n.config.init_rank) for n in p_nodes)
        b = budget(t, b0=b0, b_target=bt, total_steps=total_steps, init_warmup=init_warmup,
                   final_warmup=final_warmup)
        in_cubic = (t > init_warmup) & (t < final)
        mask_now = (t >= final) | (in_cubic & (t % delta_t == 0))
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
    """``R = (Σ‖pᵀp − I‖_F + Σ‖q·qᵀ − I‖_F) / (2n)`` over the ``n`` AdaLoRA matrices:
    the mean over the ``2n`` factor matrices, ``p`` and ``q`` counted separately,
    with norms not squared (the official ``compute_orth_regu`` and PEFT's
    ``AdaLoraModel.forward``; a stacked node counts one matrix per slice). Add
    ``w ×`` it to the loss (``w`` = 0.1 in the official README, 0.5 in PEFT)."""
    nodes = _nodes(trainable)
    if not nodes:
        raise ValueError("jlora.optim.adalora_orthogonality: the tree holds no AdaLoRA adapter")
    terms = []
    for n in nodes:
        eye = jnp.eye(n.p.shape[-1], dtype=n.p.dtype)
        pp = jnp.swapaxes(n.p, -1, -2) @ n.p - eye
        qq = n.q @ jnp.swapaxes(n.q, -1, -2) - eye
        terms += [jnp.linalg.norm(pp, axis=(-2, -1)).ravel(), jnp.linalg.norm(qq, axis=(-2, -1)).ravel()]
    return jnp.mean(jnp.concatenate(terms))
