"""MeZO (jlora/optim/_mezo.py) against float64 numpy references."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64


def test_mezo_one_step_against_numpy():
    target = jnp.arange(6.0)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum(p["v"] ** 2)
    p = {"w": jnp.zeros(6), "v": jnp.ones(3)}
    key, eps, lr, wd = jax.random.key(5), 1e-2, 0.1, 0.01
    new, _ = jlora.optim.mezo_sgd(loss, p, key, eps=eps, lr=lr, weight_decay=wd)
    z = jlora.optim.perturbation(key, p)  # the same z, regenerated from the key
    L = lambda q: np.sum((f64(q["w"]) - np.arange(6.0)) ** 2) + np.sum(f64(q["v"]) ** 2)
    plus = {k: f64(p[k]) + eps * f64(z[k]) for k in p}
    minus = {k: f64(p[k]) - eps * f64(z[k]) for k in p}
    g = (L(plus) - L(minus)) / (2 * eps)
    for k in p:
        np.testing.assert_allclose(f64(new[k]), f64(p[k]) - lr * (g * f64(z[k]) + wd * f64(p[k])),
                                   rtol=1e-4, atol=1e-5)


def test_mezo_estimate_points_along_the_true_gradient():
    loss = lambda p: jnp.sum(jnp.sin(p["w"]) * jnp.arange(1.0, 9.0))
    p = {"w": jnp.linspace(-1, 1, 8)}
    est = jax.jit(jax.vmap(lambda k: jlora.optim.mezo_gradient(loss, p, k, eps=1e-3)[1]["w"]))(
        jax.random.split(jax.random.key(0), 4000)).mean(0)
    true = jax.grad(loss)(p)["w"]
    cos = float(jnp.dot(est, true) / (jnp.linalg.norm(est) * jnp.linalg.norm(true)))
    assert cos > 0.95


def test_mezo_trains_lora_adapters_without_backward():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = x[:, :4]
    params = model.init(jax.random.key(1), x)["params"]
    trainable, frozen = jlora.split(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
                                                key=jax.random.key(2)))
    loss = lambda t: jnp.mean((jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) - y) ** 2)
    step = jax.jit(lambda t, k: jlora.optim.mezo_sgd(loss, t, k, eps=1e-2, lr=2e-2))
    first = float(loss(trainable))
    for i in range(400):
        trainable, _ = step(trainable, jax.random.key(i))
    assert float(loss(trainable)) < 0.7 * first


def test_mezo_step_needs_less_memory_than_a_backprop_step():
    """Inference-level memory: no activations kept for a backward, no gradient tree."""
    ws = {f"w{i}": jnp.ones((512, 512)) * 0.01 for i in range(4)}
    x = jnp.ones((256, 512))

    def loss(p):
        h = x
        for i in range(4):
            h = jnp.tanh(h @ p[f"w{i}"])
        return jnp.mean(h ** 2)

    tx = optax.adam(1e-3)
    opt = tx.init(ws)

    def adam_step(p, opt):
        g = jax.grad(loss)(p)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(p, u), opt

    mezo = jax.jit(lambda p, k: jlora.optim.mezo_sgd(loss, p, k, lr=1e-3)[0]).lower(
        ws, jax.random.key(0)).compile().memory_analysis()
    adam = jax.jit(adam_step).lower(ws, opt).compile().memory_analysis()
    total = lambda m: m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    assert state_bytes_of(opt) == 2 * sum(w.size * 4 for w in ws.values()) + 4
    assert total(mezo) < 0.65 * total(adam)  # measured: 15.2 MB against 25.2 MB


def state_bytes_of(state):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize("kwargs, option", [
    (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(lr=-1.0), "lr"), (dict(lr=float("inf")), "lr"), (dict(lr=jnp.float32(-1.0)), "lr"),
    (dict(lr=jnp.ones(2)), "lr"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay=True), "weight_decay"),
])
def test_mezo_refuses_bad_options(kwargs, option):
    loss = lambda p: jnp.sum(p ** 2)
    with pytest.raises(ValueError, match=f"jlora.optim.mezo_sgd: {option} must be"):
        jlora.optim.mezo_sgd(loss, jnp.ones(3), jax.random.key(0), **kwargs)
    if option == "eps":
        with pytest.raises(ValueError, match="jlora.optim.mezo_gradient: eps must be"):
            jlora.optim.mezo_gradient(loss, jnp.ones(3), jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="jlora.optim.mezo_sgd: loss_fn must be callable"):
        jlora.optim.mezo_sgd(None, jnp.ones(3), jax.random.key(0))


def test_mezo_keeps_bfloat16_params_and_compiles_once():
    loss = lambda p: jnp.sum((p["w"].astype(jnp.float32) - 1.0) ** 2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, key, lr):
        return jlora.optim.mezo_sgd(loss, p, key, eps=1e-2, lr=lr)

    p = {"w": jnp.zeros(8, jnp.bfloat16)}
    for i in range(3):  # a traced (float32) lr must not promote the params
        p, _ = step(p, jax.random.key(i), jnp.float32(0.1))
        assert p["w"].dtype == jnp.bfloat16
    _, g = jlora.optim.mezo_gradient(loss, p, jax.random.key(9), eps=1e-2)
    assert g["w"].dtype == jnp.bfloat16
