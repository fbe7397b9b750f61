"""AdaLoRA's SVD-form node vs numpy references (the allocator: tests/optim/test_adalora.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64


def test_node_math_and_identity_at_init():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(10, 7)), jnp.float32)
    cfg = jlora.AdaLoRA(init_rank=5, target_rank=2, alpha=10)
    node = jlora.apply({"k": w}, jlora.Spec({"k": cfg}), key=jax.random.key(0))["k"]
    np.testing.assert_array_equal(np.asarray(node.lam), 0.0)
    np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(w))
    assert f64(node.p).std() == pytest.approx(0.02, rel=0.3)
    node = node.replace(lam=jnp.arange(1.0, 6.0))
    ref = f64(w) + (10 / 5) * (f64(node.p) * f64(node.lam)) @ f64(node.q)
    np.testing.assert_allclose(f64(node.materialize()), ref, rtol=1e-5, atol=1e-6)
    trainable, _ = jlora.split({"k": node})
    assert jlora.count_trainable(trainable) == 10 * 5 + 5 + 5 * 7
    with pytest.raises(ValueError, match="target_rank"):
        jlora.AdaLoRA(init_rank=4, target_rank=5)


def test_fast_path_matches_merged():
    model = nn.Dense(7)
    x = jax.random.normal(jax.random.key(0), (3, 10))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.AdaLoRA(init_rank=4, target_rank=2)}),
                          key=jax.random.key(2))
    adapted["kernel"] = adapted["kernel"].replace(lam=jnp.array([1.0, -2.0, 0.5, 3.0]))
    np.testing.assert_allclose(jlora.linen.apply(model, {"params": adapted}, x),
                               model.apply({"params": jlora.merge(adapted)}, x), rtol=1e-5, atol=1e-6)
