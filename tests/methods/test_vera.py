"""VeRA against float64 numpy references written from the paper's formulas (Kopiczko et al. 2024)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64


def adapt(shape=(12, 6), rank=5, **kw):
    params = {"x": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)},
              "y": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)}}
    return params, jlora.apply(params, jlora.Spec({"*/kernel": jlora.VeRA(rank=rank, **kw)}),
                               key=jax.random.key(0))


def bump(node):
    return node.replace(lambda_d=node.lambda_d + jnp.linspace(-0.3, 0.3, node.lambda_d.shape[0]),
                        lambda_b=jnp.linspace(0.5, -0.5, node.lambda_b.shape[0]))


def test_init_identity_sharing_and_counts():
    params, adapted = adapt()
    x, y = adapted["x"]["kernel"], adapted["y"]["kernel"]
    np.testing.assert_array_equal(np.asarray(x.a), np.asarray(y.a))  # one pair per shape
    np.testing.assert_array_equal(np.asarray(x.b), np.asarray(y.b))
    np.testing.assert_allclose(f64(x.lambda_d), 0.1)
    np.testing.assert_array_equal(np.asarray(x.lambda_b), 0.0)
    np.testing.assert_array_equal(np.asarray(jlora.merge(adapted)["x"]["kernel"]),
                                  np.asarray(params["x"]["kernel"]))
    assert np.abs(f64(x.a)).max() <= 1 / math.sqrt(12) and np.abs(f64(x.b)).max() <= 1 / math.sqrt(5)
    trainable, _ = jlora.split(adapted)
    assert jlora.count_trainable(trainable) == 2 * (5 + 6)  # r + fan_out per layer
    # another seed, another pair; rank above fan_in is allowed (a projection)
    _, other = adapt(seed=3)
    assert not np.allclose(np.asarray(other["x"]["kernel"].a), np.asarray(x.a))
    adapt(rank=64)


def test_merged_weight_and_fast_path_match_reference():
    model = nn.Dense(6)
    xin = jax.random.normal(jax.random.key(0), (3, 12))
    params = model.init(jax.random.key(1), xin)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.VeRA(rank=7)}), key=jax.random.key(2))
    adapted["kernel"] = node = bump(adapted["kernel"])
    ref_k = f64(node.base) + ((f64(node.a) * f64(node.lambda_d)) @ f64(node.b)) * f64(node.lambda_b)
    np.testing.assert_allclose(f64(node.materialize()), ref_k, rtol=1e-5, atol=1e-6)
    y = jlora.linen.apply(model, {"params": adapted}, xin)
    np.testing.assert_allclose(f64(y), f64(xin) @ ref_k + f64(params["bias"]), rtol=1e-5, atol=1e-5)
    assert jlora.linen.consumed(model, {"params": adapted}, xin)["factorized"] == ["kernel"]


def test_vera_trains():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    target = x[:, :4] * 0.5
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.VeRA(rank=32)}), key=jax.random.key(2))
    trainable, frozen = jlora.split(adapted)
    tx = optax.adam(5e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt):
        loss, g = jax.value_and_grad(lambda t: jnp.mean(
            (jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) - target) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    first = float(step(trainable, opt)[2])
    for _ in range(100):
        trainable, opt, loss = step(trainable, opt)
    assert float(loss) < 0.5 * first


def test_seed_must_fit_32_bits():
    # the largest accepted seed draws its own pair; larger ones would alias a smaller seed
    _, top = adapt(seed=2**32 - 1)
    _, low = adapt(seed=2**32 - 2)
    assert not np.allclose(np.asarray(top["x"]["kernel"].a), np.asarray(low["x"]["kernel"].a))
    for bad in (2**32, 2**32 + 5, 2**63, 2**64):
        with pytest.raises(ValueError, match=r"VeRA: seed must be an int in \[0, 2\*\*32\)"):
            jlora.VeRA(rank=4, seed=bad)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="VeRA: seed must be an int >= 0"):
            jlora.VeRA(rank=4, seed=bad)
