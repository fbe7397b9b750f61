"""DoRA against float64 numpy references written from the paper's formulas (Liu et al. 2024)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64


def dora_ref(k0, a, b, m, s):
    v = f64(k0) + s * f64(a) @ f64(b)
    return v * (f64(m) / np.linalg.norm(v, axis=0))


def bumped(node, seed=0):
    ka, kb, km = jax.random.split(jax.random.key(seed), 3)
    return node.replace(a=node.a + 0.1 * jax.random.normal(ka, node.a.shape),
                        b=node.b + 0.1 * jax.random.normal(kb, node.b.shape),
                        m=node.m * (1 + 0.1 * jax.random.normal(km, node.m.shape)))


def make(config, shape=(12, 7), seed=0):
    w = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    adapted = jlora.apply({"l": {"kernel": w}}, jlora.Spec({"l/kernel": config}), key=jax.random.key(1))
    return w, adapted["l"]["kernel"]


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_identity_at_init_and_magnitude(init):
    w, node = make(jlora.DoRA(rank=3, alpha=6, init=init))
    np.testing.assert_allclose(f64(node.m), np.linalg.norm(f64(w), axis=0), rtol=1e-5)
    np.testing.assert_allclose(f64(node.materialize()), f64(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(node.delta()), 0.0, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weight_matches_reference(rslora):
    cfg = jlora.DoRA(rank=3, alpha=6, rslora=rslora)
    w, node = make(cfg)
    node = bumped(node)
    ref = dora_ref(node.base, node.a, node.b, node.m, cfg.scale)
    np.testing.assert_allclose(f64(node.materialize()), ref, rtol=1e-5, atol=1e-5)
    # the norm without the dense product equals the dense norm
    v = f64(node.base) + cfg.scale * f64(node.a) @ f64(node.b)
    np.testing.assert_allclose(f64(node.column_norms()), np.linalg.norm(v, axis=0), rtol=1e-5)


def test_fast_path_forward_and_grads_match_merged():
    model = nn.Dense(7)
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.DoRA(rank=3)}), key=jax.random.key(2))
    adapted["kernel"] = bumped(adapted["kernel"])
    node = adapted["kernel"]
    y = jlora.linen.apply(model, {"params": adapted}, x)
    ref = f64(x) @ dora_ref(node.base, node.a, node.b, node.m, 1.0) + f64(params["bias"])
    np.testing.assert_allclose(f64(y), ref, rtol=1e-4, atol=1e-4)
    assert jlora.linen.consumed(model, {"params": adapted}, x)["factorized"] == ["kernel"]
    trainable, frozen = jlora.split(adapted)
    assert sorted(k for k in ("a", "b", "m") if getattr(trainable["kernel"], k) is not None) == ["a", "b", "m"]
    assert jlora.count_trainable(trainable) == 3 * (12 + 7) + 7  # LoRA factors + magnitude
    loss = lambda f: lambda t: jnp.sum(f(jlora.combine(t, frozen)) ** 2)
    g_fast = jax.grad(loss(lambda p: jlora.linen.apply(model, {"params": p}, x)))(trainable)
    g_slow = jax.grad(loss(lambda p: model.apply({"params": jlora.merge(p)}, x)))(trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_fast, g_slow)


def test_detach_norm_changes_only_the_gradient():
    _, node = make(jlora.DoRA(rank=2, detach_norm=True))
    node = bumped(node)
    exact = node.replace(config=jlora.DoRA(rank=2, detach_norm=False))
    np.testing.assert_allclose(node.materialize(), exact.materialize(), atol=1e-6)
    x = jnp.ones((1, 12))
    ga = jax.grad(lambda n: jnp.sum((x @ n.materialize()) ** 2))(node)
    gb = jax.grad(lambda n: jnp.sum((x @ n.materialize()) ** 2))(exact)
    # numpy reference of the detached gradient w.r.t. m: dL/dK' · V/n summed over rows
    v = f64(node.base) + f64(node.a) @ f64(node.b)
    n = np.linalg.norm(v, axis=0)
    y = f64(x) @ (v * f64(node.m) / n)
    dk = f64(x).T @ (2 * y)
    np.testing.assert_allclose(f64(ga.m), (dk * v / n).sum(0), rtol=1e-4)
    assert not np.allclose(ga.a, gb.a, atol=1e-6)  # the norm path is really cut


def test_dora_trains():
    import optax

    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.tanh(x[:, :4] * 2.0)
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.DoRA(rank=2, alpha=4)}), key=jax.random.key(2))
    trainable, frozen = jlora.split(adapted)
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt):
        loss, g = jax.value_and_grad(lambda t: jnp.mean(
            (jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) - y) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    losses = [float(step(trainable, opt)[2])]
    for _ in range(80):
        trainable, opt, loss = step(trainable, opt)
    assert float(loss) < 0.5 * losses[0]


def test_all_zero_output_column_stays_finite():
    # PEFT gives 0/0 = NaN here; jlora's norm epsilon keeps the ratio at 1.
    model = nn.Dense(3)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    params = {**params, "kernel": params["kernel"].at[:, 1].set(0.0)}
    # the exact norm gradient (detach_norm=False) is the case a bare sqrt makes NaN
    spec = jlora.Spec({"kernel": jlora.DoRA(rank=2, detach_norm=False)})
    adapted = jlora.apply(params, spec, key=jax.random.key(2))
    node = adapted["kernel"]
    np.testing.assert_allclose(node.m[1], 1e-12, rtol=1e-6)
    np.testing.assert_array_equal(jlora.merge(adapted)["kernel"][:, 1], 0.0)
    np.testing.assert_allclose(jlora.merge(adapted)["kernel"], params["kernel"], atol=1e-6)
    trainable, frozen = jlora.split(adapted)

    def loss(t):
        y = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x)
        return jnp.mean((y - 1.0) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    assert np.isfinite(float(value))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
    merged = jlora.merge(jlora.combine(stepped, frozen))["kernel"]
    assert bool(jnp.isfinite(merged).all())
