"""BAR, SAM and BaLoRA (jlora/optim/_bar.py) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64

from ._trees import small_tree


def test_bar_one_step_against_numpy():
    params, adapted = small_tree()
    trainable, _ = jlora.split(adapted)
    grads = jax.tree.map(lambda x: jnp.sin(3 * x), trainable)
    upd, _ = jlora.optim.bar(rho=0.1).update(grads, optax.EmptyState(), trainable)
    g, p = grads["fc"]["kernel"], trainable["fc"]["kernel"]
    gnorm = np.sqrt(sum(np.sum(f64(x) ** 2) for x in jax.tree.leaves(grads)))
    a, b, ga, gb, c = f64(p.a), f64(p.b), f64(g.a), f64(g.b), 0.1 / gnorm
    s2 = p.scale ** 2
    assert s2 == 4.0  # alpha 6 at rank 3
    # D from the docstring's expansion of SAM's balancedness drift
    D = (c * (np.sum(gb ** 2) - np.sum(ga ** 2))
         + s2 * c ** 2 * (np.sum((a @ gb) ** 2) - np.sum((ga @ b) ** 2))
         + s2 * c ** 3 * (np.sum((ga @ gb) * (a @ gb)) - np.sum((ga @ gb) * (ga @ b))))
    mu = D / (np.sum(a ** 2) + np.sum(b ** 2))
    np.testing.assert_allclose(f64(upd["fc"]["kernel"].a), f64(g.a) + mu * f64(p.a), rtol=1e-5)
    np.testing.assert_allclose(f64(upd["fc"]["kernel"].b), f64(g.b) - mu * f64(p.b), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(upd["head"]["kernel"].value),
                                  np.asarray(grads["head"]["kernel"].value))


@pytest.mark.parametrize("alpha", [3.0, 12.0])  # scale 1 and 4
def test_bar_drift_equals_sams_at_any_lora_scale(alpha):
    """One small SGD step on ½‖K0 + s·a·b − M‖² (where the expansion is exact): BAR's
    balancedness change equals the one SAM's second gradient gives, in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        M = jnp.asarray(rng.normal(size=(10, 8)))
        node = jlora.apply({"k": jnp.zeros((10, 8))},
                           jlora.Spec({"k": jlora.LoRA(rank=3, alpha=alpha, dtype=jnp.float64)}),
                           key=jax.random.key(0))["k"].replace(
            a=jnp.asarray(rng.normal(size=(10, 3)) * 1.5), b=jnp.asarray(rng.normal(size=(3, 8)) * 0.3))
        t, frozen = jlora.split({"k": node})

        def loss(t):
            return 0.5 * jnp.sum((jlora.merge(jlora.combine(t, frozen))["k"] - M) ** 2)

        lr, rho = 1e-7, 0.5
        drift = {}
        g = jax.grad(loss)(t)
        for name, step in (("sgd", g), ("sam", jlora.optim.sam_gradient(loss, t, rho=rho)[1]),
                           ("bar", jlora.optim.bar(rho).update(g, optax.EmptyState(), t)[0])):
            moved = jax.tree.map(lambda x, u: x - lr * u, t, step)
            drift[name] = float(jlora.optim.balancedness(moved)[0])
        sam, bar = drift["sam"] - drift["sgd"], drift["bar"] - drift["sgd"]
        assert abs(sam) > 1e-6  # 47 and 700 times lr
        np.testing.assert_allclose(bar, sam, rtol=2e-3)


def stacked_pair(dtype=jnp.float32):
    rng = np.random.default_rng(5)
    params = {"moe": {"kernel": jnp.asarray(rng.normal(size=(3, 8, 6)), dtype)}}
    config = jlora.LoRA(rank=2, alpha=4, expert_axis=0, dtype=dtype)
    node = jlora.apply(params, jlora.Spec({"moe/kernel": config}),
                       key=jax.random.key(0))["moe"]["kernel"]
    return {"moe": {"kernel": node.replace(a=jnp.asarray(rng.normal(size=node.a.shape), node.a.dtype),
                                           b=jnp.asarray(rng.normal(size=node.b.shape), node.b.dtype))}}


def test_stacked_experts_are_balanced_expert_by_expert():
    tree = stacked_pair()
    node = tree["moe"]["kernel"]
    a, b = f64(node.a), f64(node.b)
    t, _ = jlora.split(tree)
    np.testing.assert_allclose(jlora.optim.balancedness(t),
                               [np.sum(a[e] ** 2) - np.sum(b[e] ** 2) for e in range(3)], rtol=1e-5)
    bal = jlora.optim.balance(tree)["moe"]["kernel"]
    for e in range(3):
        np.testing.assert_allclose(f64(bal.a[e]) @ f64(bal.b[e]), a[e] @ b[e], atol=1e-4)
        np.testing.assert_allclose(f64(bal.a[e]).T @ f64(bal.a[e]), f64(bal.b[e]) @ f64(bal.b[e]).T,
                                   atol=1e-4)
    # BAR: each expert's own D and μ (numpy, per expert, from the docstring's expansion)
    g = jax.tree.map(lambda x: jnp.cos(2 * x), t)
    upd = jlora.optim.bar(0.1).update(g, optax.EmptyState(), t)[0]["moe"]["kernel"]
    ga, gb = f64(g["moe"]["kernel"].a), f64(g["moe"]["kernel"].b)
    c = 0.1 / np.sqrt(np.sum(ga ** 2) + np.sum(gb ** 2))
    s2 = node.scale ** 2
    for e in range(3):
        D = (c * (np.sum(gb[e] ** 2) - np.sum(ga[e] ** 2))
             + s2 * c ** 2 * (np.sum((a[e] @ gb[e]) ** 2) - np.sum((ga[e] @ b[e]) ** 2))
             + s2 * c ** 3 * (np.sum((ga[e] @ gb[e]) * (a[e] @ gb[e]))
                              - np.sum((ga[e] @ gb[e]) * (ga[e] @ b[e]))))
        mu = D / (np.sum(a[e] ** 2) + np.sum(b[e] ** 2))
        np.testing.assert_allclose(f64(upd.a[e]), ga[e] + mu * a[e], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(f64(upd.b[e]), gb[e] - mu * b[e], rtol=1e-4, atol=1e-6)


def test_balance_and_bar_keep_bfloat16_factors():
    tree = stacked_pair(jnp.bfloat16)
    node = tree["moe"]["kernel"]
    assert node.a.dtype == jnp.bfloat16
    bal = jlora.optim.balance(tree)["moe"]["kernel"]
    assert bal.a.dtype == bal.b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.einsum("eir,ero->eio", f64(bal.a), f64(bal.b)),
                               np.einsum("eir,ero->eio", f64(node.a), f64(node.b)), rtol=0.05, atol=0.05)
    t, _ = jlora.split(tree)
    upd = jlora.optim.bar(0.1).update(jax.tree.map(jnp.ones_like, t), optax.EmptyState(), t)[0]
    assert upd["moe"]["kernel"].a.dtype == jnp.bfloat16


def balancedness_runs(steps=600, lr=0.005, rho=0.5):
    """Stochastic matrix factorisation f(a·b) = ½‖a·b − (M + noise_t)‖² from an
    unbalanced start, small steps (the same noise sequence for every method)."""
    rng = np.random.default_rng(0)
    M = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
    a0 = jnp.asarray(rng.normal(size=(10, 3)) * 1.5, jnp.float32)
    b0 = jnp.asarray(rng.normal(size=(3, 8)) * 0.3, jnp.float32)
    node = jlora.apply({"k": jnp.zeros((10, 8))}, jlora.Spec({"k": jlora.LoRA(rank=3, alpha=3)}),
                       key=jax.random.key(0))["k"].replace(a=a0, b=b0)
    t0, frozen = jlora.split({"k": node})
    def loss(t, key=None):
        target = M if key is None else M + jax.random.normal(key, M.shape)
        return 0.5 * jnp.sum((jlora.merge(jlora.combine(t, frozen))["k"] - target) ** 2)

    out = {}
    for name in ("sgd", "sam", "bar"):
        tx = optax.chain(jlora.optim.bar(rho), optax.sgd(lr)) if name == "bar" else optax.sgd(lr)

        @jax.jit
        def step(t, opt, key):
            g = (jlora.optim.sam_gradient(loss, t, key, rho=rho)[1] if name == "sam"
                 else jax.grad(loss)(t, key))
            u, opt = tx.update(g, opt, t)
            t = optax.apply_updates(t, u)
            return t, opt, jlora.optim.balancedness(t)[0]

        t, opt, traj = t0, tx.init(t0), []
        for i in range(steps):
            t, opt, bal = step(t, opt, jax.random.key(i))
            traj.append(float(bal))
        out[name] = (np.asarray(traj), float(loss(t)))
    return out


def test_bar_tracks_sam_balancedness_where_sgd_does_not():
    runs = balancedness_runs()
    sgd, sam, bar = (runs[k][0] for k in ("sgd", "sam", "bar"))
    start = abs(sgd[0])
    assert abs(sam[-1]) < 0.25 * start                    # SAM balances the factors
    assert abs(sgd[-1]) > 0.8 * start                     # SGD leaves them unbalanced
    moved = np.max(np.abs(sam - sgd))
    assert np.max(np.abs(bar - sam)) < 0.1 * moved        # BAR follows SAM's trajectory
    assert runs["bar"][1] < runs["sgd"][1]                # and fits the clean target as well


def test_balance_is_exact():
    _, adapted = small_tree()
    node = adapted["fc"]["kernel"]
    bal = jlora.optim.balance(adapted)["fc"]["kernel"]
    np.testing.assert_allclose(f64(bal.a) @ f64(bal.b), f64(node.a) @ f64(node.b), atol=1e-4)
    np.testing.assert_allclose(f64(bal.a).T @ f64(bal.a), f64(bal.b) @ f64(bal.b).T, atol=1e-4)
    assert abs(float(jlora.optim.balancedness(jlora.split({"x": bal})[0])[0])) < 1e-3
    tx = jlora.optim.balora(optax.sgd(0.01))
    t, _ = jlora.split(adapted)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, t), tx.init(t), t)
    stepped = optax.apply_updates(t, u)
    assert abs(float(jlora.optim.balancedness(stepped)[0])) < 1e-3


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), "0.05", True, None])
def test_bar_and_sam_refuse_a_bad_rho(rho):
    with pytest.raises(ValueError, match=r"jlora.optim.bar: rho must be a finite number >= 0"):
        jlora.optim.bar(rho)
    with pytest.raises(ValueError, match=r"jlora.optim.sam_gradient: rho must be a finite number"):
        jlora.optim.sam_gradient(lambda p: jnp.sum(p ** 2), jnp.ones(3), rho=rho)


def test_sam_and_balora_refuse_what_is_not_a_loss_or_a_transformation():
    with pytest.raises(ValueError, match="jlora.optim.sam_gradient: loss_fn must be callable"):
        jlora.optim.sam_gradient(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="jlora.optim.balora: inner must be an optax"):
        jlora.optim.balora(optax.sgd)
