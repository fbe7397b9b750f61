"""AdaLoRA's budgeted rank allocator and orthogonality regulariser (jlora/optim/_adalora.py)
against float64 numpy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64


@pytest.mark.parametrize("t", [1, 10, 11, 15, 30, 45, 46, 60])
def test_budget_schedule(t):
    b0, bt, T, ti, tf = 24, 8, 60, 10, 15
    if t <= ti:
        want = b0
    elif t > T - tf:
        want = bt
    else:
        want = int(np.floor(bt + (b0 - bt) * (1 - (t - ti) / (T - ti - tf)) ** 3))
    got = jlora.optim.budget(jnp.asarray(t), b0=b0, b_target=bt, total_steps=T, init_warmup=ti,
                             final_warmup=tf)
    assert int(got) == want


def test_one_step_importance_ema_against_numpy():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
    tree = {"k": w}
    adapted = jlora.apply(tree, jlora.Spec({"k": jlora.AdaLoRA(init_rank=3, target_rank=1)}),
                          key=jax.random.key(0))
    trainable, _ = jlora.split(adapted)
    trainable = jax.tree.map(lambda x: x + 0.3, trainable)
    grads = jax.tree.map(lambda x: jnp.cos(x * 7.0), trainable)
    tx = jlora.optim.adalora(optax.sgd(0.1), total_steps=100)
    state = tx.init(trainable)
    _, state = tx.update(grads, state, trainable)
    n, g = trainable["k"], grads["k"]
    for i, f in enumerate(("p", "lam", "q")):
        imp = np.abs(f64(getattr(n, f)) * f64(getattr(g, f)))
        ib = 0.15 * imp  # from zero: (1 - β1)·I
        ub = 0.15 * np.abs(imp - ib)
        np.testing.assert_allclose(f64(state.ipt[0][i]), ib, rtol=1e-5)
        np.testing.assert_allclose(f64(state.unc[0][i]), ub, rtol=1e-5)


def test_orthogonality_regulariser_against_numpy():
    adapted = jlora.apply({"a": jnp.ones((8, 6)), "b": jnp.ones((5, 9))},
                          jlora.Spec({"*": jlora.AdaLoRA(init_rank=3, target_rank=1, init_std=0.5)}),
                          key=jax.random.key(0))
    terms = []
    for k in ("a", "b"):
        p, q = f64(adapted[k].p), f64(adapted[k].q)
        terms.append(np.linalg.norm(p.T @ p - np.eye(3)) + np.linalg.norm(q @ q.T - np.eye(3)))
    assert float(jlora.optim.adalora_orthogonality(adapted)) == pytest.approx(np.mean(terms), rel=1e-5)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.tanh(nn.Dense(16, name=f"fc{i}")(x))
        return nn.Dense(1, name="out")(x)


def test_budget_reaches_exactly_target_rank_times_layers():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (128, 16))
    y = jnp.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    params = model.init(jax.random.key(1), x)["params"]
    spec = jlora.Spec({"fc*/kernel": jlora.AdaLoRA(init_rank=6, target_rank=2, alpha=6)})
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(2)))
    T = 120
    tx = jlora.optim.adalora(optax.adam(1e-2), total_steps=T, init_warmup=20, final_warmup=30,
                             delta_t=5)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt):
        def loss_fn(t):
            pred = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x)
            return jnp.mean((pred - y) ** 2) + 0.1 * jlora.optim.adalora_orthogonality(t)

        loss, g = jax.value_and_grad(loss_fn)(t)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    counts, losses = [], []
    for _ in range(T):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
        counts.append(sum(int((n.lam != 0).sum()) for n in jax.tree.leaves(
            trainable, is_leaf=jlora.is_node) if jlora.is_node(n)))
    assert counts[15] == 18                 # warm-up: all 3 x 6 triplets alive
    assert counts[-1] == 2 * 3              # exactly target_rank x layers at the end
    assert all(c == 6 for c in counts[T - 30:])  # final phase: masked every step
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs, option", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.0), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(total_steps=10, init_warmup=-1), "init_warmup"),
    (dict(total_steps=10, final_warmup=1.5), "final_warmup"),
    (dict(total_steps=10, init_warmup=5, final_warmup=5), "total_steps"),
    (dict(total_steps=10, delta_t=0), "delta_t"),
    (dict(total_steps=10, beta1=1.0), "beta1"),
    (dict(total_steps=10, beta2=float("nan")), "beta2"),
    (dict(total_steps=10, beta2=-0.1), "beta2"),
])
def test_adalora_refuses_bad_options(kwargs, option):
    with pytest.raises(ValueError, match=f"jlora.optim.adalora: {option}"):
        jlora.optim.adalora(optax.sgd(0.1), **kwargs)


def test_adalora_and_budget_refuse_a_non_transformation_and_bad_budgets():
    with pytest.raises(ValueError, match="jlora.optim.adalora: inner must be an optax"):
        jlora.optim.adalora(optax.sgd, total_steps=10)
    with pytest.raises(ValueError, match="jlora.optim.budget: b_target .* must not exceed b0"):
        jlora.optim.budget(1, b0=4, b_target=8, total_steps=10, init_warmup=0, final_warmup=0)
    with pytest.raises(ValueError, match="jlora.optim.budget: b0 must be an int >= 1, got 0"):
        jlora.optim.budget(1, b0=0, b_target=0, total_steps=10, init_warmup=0, final_warmup=0)
