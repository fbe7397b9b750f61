"""Flat-LoRA (Li et al. ICML 2025, arXiv 2409.14396): random weight perturbation in the
full weight space.

The objective is the expected loss under random perturbations of the merged
weight, ``E_ε L(K0 + s·a·b + ε)``. Each training step, for every adapted
kernel with merged weight ``K'`` (viewed as ``(fan_in, fan_out)``):

    factor(t) = ½·(1 − cos(π·t/T)),   σ_j = factor(t)·ρ·‖K'[:, j]‖ / √fan_in,   ε_ij ~ N(0, σ_j²)

``ε`` is drawn from the step's key (regenerate it from the key; it is never
stored between steps) and added to the *frozen* base for the forward and the
backward, so gradients reach only the factors, evaluated at the perturbed
point; ``σ`` is computed from ``K'`` under ``stop_gradient``, as the authors'
code computes it outside autograd. Use it in training only: evaluate and
serve the unperturbed tree.

Example::

    def loss_fn(t, key, step):
        p = jlora.optim.flat_lora(jlora.combine(t, frozen), key, step=step, total_steps=T)
        return task_loss(jlora.linen.apply(model, {"params": p}, x), y)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.methods.base import from_matrix, to_matrix
from jlora._validate import positive_int, real, real_or_traced
from jlora.tree import is_node, map_with_paths, path_key


def _check(owner: str, step: Any, total_steps: Any, rho: Any) -> None:
    positive_int(owner, "total_steps", total_steps)
    real(owner, "rho", rho, ge=0.0)
    real_or_traced(owner, "step", step, ge=0, le=total_steps)


def noise_scale(node, *, step, total_steps: int, rho: float) -> jax.Array:
    """``σ_j`` per output feature of the node's merged kernel (a ``(fan_out,)`` vector)."""
    _check("jlora.optim.noise_scale", step, total_steps, rho)
    merged = to_matrix(jax.lax.stop_gradient(node.materialize()), node.in_axes)
    factor = 0.5 * (1.0 - jnp.cos(jnp.pi * step / total_steps))
    return factor * rho * jnp.linalg.norm(merged.astype(jnp.float32), axis=0) / math.sqrt(
        merged.shape[0])


def flat_lora(adapted: Any, key: jax.Array, *, step, total_steps: int, rho: float = 0.05) -> Any:
    """The adapted tree with every adapted kernel's frozen base perturbed for this step.

    ``step`` (``0 <= step <= total_steps``; traced inside ``jit``) sets the cosine
    ramp of the noise; ``rho >= 0`` its relative size (0: no perturbation).
    """
    _check("jlora.optim.flat_lora", step, total_steps, rho)

    def perturb(path, x):
        if is_node(x) and isinstance(getattr(type(x), "base", None), property):  # derived base
            raise ValueError(f"{path}: jlora.optim.flat_lora perturbs a dense frozen base; this "
                             f"{type(x).__name__}'s base is stored in another form (quantized), "
                             "so there is no weight to add the noise to")
        if not is_node(x) or getattr(x, "base", None) is None \
                or tuple(x.base.shape) != tuple(x.shape) or len(x.shape) < 2:
            return x
        sigma = noise_scale(x, step=step, total_steps=total_steps, rho=rho)
        k = path_key(key, path)
        fan_in = math.prod(x.shape[i] for i in x.in_axes)
        eps = jax.random.normal(k, (fan_in, sigma.shape[0]), jnp.float32) * sigma
        base = x.base.astype(jnp.float32) + from_matrix(eps, x.shape, x.in_axes)
        return x.replace(base=base.astype(x.base.dtype))

    return map_with_paths(perturb, adapted)
