"""LoRA+ (jlora/optim/_lora_plus.py) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from tests._refs import f64

from ._trees import small_tree


def test_lora_plus_scales_b_side_only():
    _, adapted = small_tree(jlora.DoRA(rank=3))
    trainable, _ = jlora.split(adapted)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), trainable)
    tx = jlora.optim.lora_plus(optax.sgd, lr=0.1, ratio=16)
    upd, _ = tx.update(grads, tx.init(trainable), trainable)
    node = upd["fc"]["kernel"]
    np.testing.assert_allclose(f64(node.a), -0.2, rtol=1e-6)       # lr
    np.testing.assert_allclose(f64(node.b), -3.2, rtol=1e-6)       # lr · ratio
    np.testing.assert_allclose(f64(node.m), -3.2, rtol=1e-6)       # 1-D adapter vector: fast
    np.testing.assert_allclose(f64(upd["head"]["kernel"].value), -0.2, rtol=1e-6)
