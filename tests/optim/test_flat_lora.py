"""Flat-LoRA (jlora/optim/_flat_lora.py) against float64 numpy references."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64, perturb


def test_flat_lora_noise_scale_and_statistics():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(400, 6)) * np.arange(1, 7), jnp.float32)
    adapted = perturb(jlora.apply({"k": w}, jlora.Spec({"k": jlora.LoRA(rank=2)}), key=jax.random.key(0)))
    node = adapted["k"]
    T, t, rho = 100, 30, 0.05
    merged = f64(node.materialize())
    factor = 0.5 * (1 - math.cos(math.pi * t / T))
    sigma_ref = factor * rho * np.linalg.norm(merged, axis=0) / math.sqrt(400)
    sigma = jlora.optim.noise_scale(node, step=t, total_steps=T, rho=rho)
    np.testing.assert_allclose(f64(sigma), sigma_ref, rtol=1e-5)
    out = jlora.optim.flat_lora(adapted, jax.random.key(7), step=t, total_steps=T, rho=rho)
    eps = f64(out["k"].base) - f64(node.base)
    np.testing.assert_allclose(eps.std(axis=0), sigma_ref, rtol=0.15)   # 400 draws per column
    # regenerated from the key, never stored: the same key gives the same noise
    again = jlora.optim.flat_lora(adapted, jax.random.key(7), step=t, total_steps=T, rho=rho)
    np.testing.assert_array_equal(np.asarray(again["k"].base), np.asarray(out["k"].base))
    # factors untouched; no perturbation at step 0
    np.testing.assert_array_equal(np.asarray(out["k"].a), np.asarray(node.a))
    zero = jlora.optim.flat_lora(adapted, jax.random.key(7), step=0, total_steps=T)
    np.testing.assert_array_equal(np.asarray(zero["k"].base), np.asarray(node.base))


def test_flat_lora_training_lowers_the_loss_and_only_factors_get_gradients():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = x[:, :4] * 2.0
    params = model.init(jax.random.key(1), x)["params"]
    trainable, frozen = jlora.split(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=4)}),
                                                key=jax.random.key(2)))
    tx, T = optax.adam(3e-2), 100
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt, i):
        def loss_fn(t):
            p = jlora.optim.flat_lora(jlora.combine(t, frozen), jax.random.key(i), step=i,
                                      total_steps=T)
            return jnp.mean((jlora.linen.apply(model, {"params": p}, x) - y) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(t)
        assert jax.tree.structure(g) == jax.tree.structure(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    first = None
    for i in range(T):
        trainable, opt, loss = step(trainable, opt, i)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.5 * first


def test_full_leaves_and_plain_leaves_are_not_perturbed():
    params = {"fc": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)}, "head": jnp.ones((4, 2))}
    adapted = jlora.apply(params, jlora.Spec({"fc/kernel": jlora.LoRA(rank=2), "head": jlora.Full()}),
                          key=jax.random.key(0))
    out = jlora.optim.flat_lora(adapted, jax.random.key(1), step=5, total_steps=10, rho=0.5)
    np.testing.assert_array_equal(np.asarray(out["head"].value), np.asarray(adapted["head"].value))
    np.testing.assert_array_equal(np.asarray(out["fc"]["bias"]), np.asarray(params["fc"]["bias"]))
    assert not np.array_equal(np.asarray(out["fc"]["kernel"].base), np.asarray(params["fc"]["kernel"]))


@pytest.mark.parametrize("kwargs, option", [
    (dict(step=1, total_steps=0), "total_steps"),
    (dict(step=1, total_steps=10.5), "total_steps"),
    (dict(step=1, total_steps=10, rho=-1.0), "rho"),
    (dict(step=1, total_steps=10, rho=float("nan")), "rho"),
    (dict(step=-1, total_steps=10), "step"),
    (dict(step=11, total_steps=10), "step"),
    (dict(step=True, total_steps=10), "step"),
    (dict(step=jnp.float32(float("nan")), total_steps=10), "step"),
])
def test_flat_lora_refuses_bad_options(kwargs, option):
    adapted = jlora.apply({"k": jnp.ones((4, 3))}, jlora.Spec({"k": jlora.LoRA(rank=1)}),
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match=f"jlora.optim.flat_lora: {option} must be"):
        jlora.optim.flat_lora(adapted, jax.random.key(1), **kwargs)
    with pytest.raises(ValueError, match=f"jlora.optim.noise_scale: {option} must be"):
        jlora.optim.noise_scale(adapted["k"], **{"rho": 0.05, **kwargs})


def test_flat_lora_refuses_a_quantized_base_naming_the_path():
    params = {"q": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.float32)}}
    adapted = jlora.apply(params, jlora.Spec({"q/kernel": jlora.QLoRA(rank=2)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"q/kernel: jlora.optim.flat_lora perturbs a dense frozen "
                                         r"base; this QLoRANode's base is stored"):
        jlora.optim.flat_lora(adapted, jax.random.key(1), step=1, total_steps=10)
