"""Small adapted trees shared by the optimiser tests."""

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from tests._refs import perturb


def small_tree(config=None):
    """A LoRA (or ``config``) kernel with non-zero factors next to a ``Full()`` head."""
    rng = np.random.default_rng(0)
    params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
                     "bias": jnp.zeros(8)}, "head": {"kernel": jnp.ones((8, 2))}}
    spec = jlora.Spec({"fc/kernel": config or jlora.LoRA(rank=3, alpha=6), "head/kernel": jlora.Full()})
    return params, perturb(jlora.apply(params, spec, key=jax.random.key(1)), size=0.5)
