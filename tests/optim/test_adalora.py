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
    # importance is scored on the weights after the inner step (w − lr·g for SGD), as
    # PEFT's update_and_allocate and the official update_and_mask (called after optimizer.step())
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
    tree = {"k": w}
    adapted = jlora.apply(tree, jlora.Spec({"k": jlora.AdaLoRA(init_rank=3, target_rank=1)}),
                          key=jax.random.key(0))
    trainable, _ = jlora.split(adapted)
    trainable = jax.tree.map(lambda x: x + 0.3, trainable)
    grads = jax.tree.map(lambda x: jnp.cos(x * 7.0), trainable)
    tx = jlora.optim.adalora(optax.sgd(0.1), total_steps=100, init_warmup=5)
    state = tx.init(trainable)
    _, state = tx.update(grads, state, trainable)
    n, g = trainable["k"], grads["k"]
    for i, f in enumerate(("p", "lam", "q")):
        imp = np.abs((f64(getattr(n, f)) - 0.1 * f64(getattr(g, f))) * f64(getattr(g, f)))
        ib = 0.15 * imp  # from zero: (1 - β1)·I
        ub = 0.15 * np.abs(imp - ib)
        np.testing.assert_allclose(f64(state.ipt[0][i]), ib, rtol=1e-5)
        np.testing.assert_allclose(f64(state.unc[0][i]), ub, rtol=1e-5)


def test_first_mask_from_zero_lambda_ranks_by_post_step_scores():
    # defaults (init_warmup=0, delta_t=1) mask at t = 1 while λ is still 0 before the step:
    # the scores must come from λ⁺ = −lr·g (scores of the pre-step weights are all 0, and the
    # masked set would be the first k by position)
    rng = np.random.default_rng(0)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
              for i in range(3)}
    spec = jlora.Spec({"*/kernel": jlora.AdaLoRA(init_rank=4, target_rank=1)})
    trainable, _ = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    grads = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), trainable)
    # at λ = 0 a task loss has ∂L/∂p = ∂L/∂q = 0 (both are multiplied by diag λ)
    grads = jax.tree.map(lambda n: n.replace(p=0 * n.p, q=0 * n.q), grads, is_leaf=jlora.is_node)
    tx = jlora.optim.adalora(optax.sgd(0.5), total_steps=10)
    u, state = tx.update(grads, tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, u)
    score = []
    for k in sorted(params):
        n, g = trainable[k]["kernel"], grads[k]["kernel"]
        s = {}
        for f in ("p", "lam", "q"):
            imp = np.abs((f64(getattr(n, f)) - 0.5 * f64(getattr(g, f))) * f64(getattr(g, f)))
            s[f] = (0.15 * imp) * (0.15 * np.abs(imp - 0.15 * imp))
        score.append(s["lam"] + s["p"].mean(0) + s["q"].mean(1))
    want = np.sort(np.argsort(np.concatenate(score), kind="stable")[:3])
    got = np.flatnonzero(np.concatenate([f64(new[k]["kernel"].lam) for k in sorted(params)]) == 0)
    np.testing.assert_array_equal(got, want)
    assert got.tolist() != [0, 1, 2]


def test_orthogonality_regulariser_against_numpy():
    # the official compute_orth_regu / PEFT AdaLoraModel.forward: the mean of ‖·‖_F over the
    # 2n factor matrices (p and q counted separately), not over the n adapted matrices
    adapted = jlora.apply({"a": jnp.ones((8, 6)), "b": jnp.ones((5, 9))},
                          jlora.Spec({"*": jlora.AdaLoRA(init_rank=3, target_rank=1, init_std=0.5)}),
                          key=jax.random.key(0))
    terms = []
    for k in ("a", "b"):
        p, q = f64(adapted[k].p), f64(adapted[k].q)
        terms += [np.linalg.norm(p.T @ p - np.eye(3)), np.linalg.norm(q @ q.T - np.eye(3))]
    assert len(terms) == 4
    assert float(jlora.optim.adalora_orthogonality(adapted)) == pytest.approx(np.mean(terms), rel=1e-5)


def _exact_budget(t, b0, bt, T, ti, tf):
    if t <= ti:
        return b0
    if t > T - tf:
        return bt
    span = T - ti - tf
    return bt + ((b0 - bt) * (span - (t - ti)) ** 3) // span ** 3  # integer floor of the formula


@pytest.mark.parametrize("b0, bt, T, ti, tf, t, want", [
    (1152, 0, 1000, 0, 0, 750, 18),      # exactly 18: float32 gave 17
    (2304, 192, 1000, 10, 0, 334, 835),  # 835.0000661: float32 gave 834
    (4608, 0, 1000, 0, 0, 875, 9),
])
def test_budget_is_exact_where_float32_rounds_down(b0, bt, T, ti, tf, t, want):
    assert _exact_budget(t, b0, bt, T, ti, tf) == want
    for run in (lambda f: f, jax.jit):  # eagerly and traced, as inside the allocator's step
        got = run(lambda t: jlora.optim.budget(t, b0=b0, b_target=bt, total_steps=T,
                                               init_warmup=ti, final_warmup=tf))(jnp.asarray(t))
        assert int(got) == want


def test_budget_equals_the_exact_integer_schedule_on_a_grid():
    # x64 off (the default), every step of each schedule; b0 = 12 × 96/192/384 matrices
    cases = [(b0, bt * b0 // 12, 1000, ti, tf) for b0 in (1152, 2304, 4608) for bt in (0, 1, 8)
             for ti in (0, 10) for tf in (0, 20)]
    cases.append((7, 2, 3_000_000, 5, 7))  # a long span: span³ ~ 2.7e19 overflows int64
    for b0, bt, T, ti, tf in cases:
        ts = np.unique(np.linspace(1, T, 1000).astype(int))
        got = np.asarray(jlora.optim.budget(jnp.asarray(ts), b0=b0, b_target=bt, total_steps=T,
                                            init_warmup=ti, final_warmup=tf))
        want = np.array([_exact_budget(int(t), b0, bt, T, ti, tf) for t in ts])
        np.testing.assert_array_equal(got, want, err_msg=f"b0={b0} bT={bt} T={T} ti={ti} tf={tf}")


def _zeros_per_step(T, ti, tf, dt, steps):
    """Run SGD with constant gradients; per step the number of λ the allocator zeroed."""
    rng = np.random.default_rng(3)
    params = {f"l{i}": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for i in range(2)}
    spec = jlora.Spec({"*": jlora.AdaLoRA(init_rank=4, target_rank=1, init_std=0.3)})
    trainable, _ = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    trainable = jax.tree.map(lambda v: v + 0.5, trainable)  # λ off zero
    grads = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, size=v.shape), v.dtype),
                         trainable)
    tx = jlora.optim.adalora(optax.sgd(1e-3), total_steps=T, init_warmup=ti, final_warmup=tf,
                             delta_t=dt)
    state = tx.init(trainable)
    zeros, ipts = [], []
    for _ in range(steps):
        u, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, u)
        zeros.append(sum(int(np.sum(f64(trainable[k].lam) == 0)) for k in trainable))
        ipts.append(np.concatenate([f64(x).ravel() for x in jax.tree.leaves(state.ipt)]))
    return zeros, ipts


def test_cubic_phase_masks_at_multiples_of_delta_t_and_forces_the_mask_at_t_final():
    # t_i = 2 is no multiple of ΔT = 3, and T − t_f = 15 is one; T − t_f = 16 is not
    T, ti, dt, b0, bt = 20, 2, 3, 8, 2
    for tf in (5, 4):
        zeros, _ = _zeros_per_step(T, ti, tf, dt, T)
        final = T - tf
        want_steps = [t for t in range(1, T + 1)
                      if (ti < t < final and t % dt == 0) or t >= final]
        got_steps = [t for t, z in zip(range(1, T + 1), zeros) if z]
        assert got_steps == want_steps, tf
        for t in want_steps:
            b = int(jlora.optim.budget(t, b0=b0, b_target=bt, total_steps=T, init_warmup=ti,
                                       final_warmup=tf))
            assert zeros[t - 1] == b0 - b, (tf, t)


def test_scores_freeze_from_t_final_on():
    # both peers update the importance only while t < T − t_f
    T, tf = 12, 4
    _, ipts = _zeros_per_step(T, 0, tf, 1, T)
    assert not np.array_equal(ipts[T - tf - 2], ipts[T - tf - 3])  # still learning at T − t_f − 1
    for t in range(T - tf, T + 1):
        np.testing.assert_array_equal(ipts[t - 1], ipts[T - tf - 2], err_msg=f"t={t}")


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


def test_allocator_matches_peft_rank_allocator_step_by_step():
    """PEFT 0.21's AdaLoraModel (its RankAllocator and update_and_allocate) and jlora on the same
    model, init, data and SGD, in float64 with the orthogonality regulariser on: budgets, masked
    sets, λ and the importance EMA agree at every step. t_i = 2 is no multiple of ΔT = 3 and
    T − t_f = 19 is none either, so the mask phase and PEFT's forced final mask both count."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import types

    from peft import AdaLoraConfig, get_peft_model

    T, ti, tf, dt, lr, r, rt, alpha, w_orth = 24, 2, 5, 3, 0.05, 3, 1, 4.0, 0.3
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)

            def forward(self, x, y):
                out = self.fc2(torch.tanh(self.fc1(x)))
                return types.SimpleNamespace(loss=torch.mean((out - y) ** 2))

        cfg = AdaLoraConfig(init_r=r, target_r=rt, tinit=ti, tfinal=tf, deltaT=dt, total_step=T,
                            lora_alpha=alpha, target_modules=["fc1", "fc2"],
                            orth_reg_weight=w_orth, lora_dropout=0.0)
        pm = get_peft_model(Net(), cfg)
        named = dict(pm.named_parameters())
        with torch.no_grad():  # non-zero λ so every factor has a gradient from step 1
            for n, p in named.items():
                if "lora_E" in n:
                    p.copy_(torch.randn_like(p) * 0.5)
                elif "lora_A" in n or "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        init = {n: p.detach().numpy().copy() for n, p in named.items()}
        rng = np.random.default_rng(1)
        x, y = rng.normal(size=(16, 6)), rng.normal(size=(16, 4))
        xt, yt = torch.tensor(x), torch.tensor(y)
        opt = torch.optim.SGD([p for n, p in named.items() if p.requires_grad and "ranknum" not in n],
                              lr=lr)
        alloc = pm.base_model.rankallocator

        pre, mods = "base_model.model.", ("fc1", "fc2")
        with jax.enable_x64(True):
            params = {m: {"kernel": jnp.asarray(init[f"{pre}{m}.base_layer.weight"].T),
                          "bias": jnp.asarray(init[f"{pre}{m}.base_layer.bias"])} for m in mods}
            # PEFT scales by alpha / (ranknum + 1e-5): the same scale with jlora's alpha / r
            spec = jlora.Spec({"*/kernel": jlora.AdaLoRA(init_rank=r, target_rank=rt,
                                                         alpha=alpha * r / (r + 1e-5))})
            adapted = jlora.apply(params, spec, key=jax.random.key(0))
            for m in mods:
                adapted[m]["kernel"] = adapted[m]["kernel"].replace(
                    p=jnp.asarray(init[f"{pre}{m}.lora_A.default"].T),
                    lam=jnp.asarray(init[f"{pre}{m}.lora_E.default"][:, 0]),
                    q=jnp.asarray(init[f"{pre}{m}.lora_B.default"].T))
            trainable, frozen = jlora.split(adapted)
            assert trainable["fc1"]["kernel"].p.dtype == jnp.float64
            tx = jlora.optim.adalora(optax.sgd(lr), total_steps=T, init_warmup=ti,
                                     final_warmup=tf, delta_t=dt)
            state = tx.init(trainable)

            def loss_fn(tr):
                merged = jlora.merge(jlora.combine(tr, frozen))
                h = jnp.tanh(x @ merged["fc1"]["kernel"] + merged["fc1"]["bias"])
                out = h @ merged["fc2"]["kernel"] + merged["fc2"]["bias"]
                return jnp.mean((out - y) ** 2) + w_orth * jlora.optim.adalora_orthogonality(tr)

            @jax.jit
            def step(tr, st):
                u, st = tx.update(jax.grad(loss_fn)(tr), st, tr)
                return optax.apply_updates(tr, u), st

            mask_steps = []
            for t in range(1, T + 1):
                pm.base_model(xt, yt).loss.backward()  # AdaLoraModel.forward adds w·R
                opt.step()
                pm.base_model.update_and_allocate(t)
                opt.zero_grad()
                trainable, state = step(trainable, state)

                b_peft, _ = alloc.budget_schedule(t)
                b_jlora = jlora.optim.budget(t, b0=2 * r, b_target=2 * rt, total_steps=T,
                                             init_warmup=ti, final_warmup=tf)
                assert int(b_jlora) == b_peft, t
                lam_p = np.concatenate([named[f"{pre}{m}.lora_E.default"].detach().numpy()[:, 0]
                                        for m in mods])
                lam_j = np.concatenate([np.asarray(trainable[m]["kernel"].lam) for m in mods])
                np.testing.assert_array_equal(lam_j == 0, lam_p == 0, err_msg=f"masked set, t={t}")
                np.testing.assert_allclose(lam_j, lam_p, rtol=0, atol=1e-12, err_msg=f"λ, t={t}")
                if np.any(lam_p == 0):
                    mask_steps.append(t)
                    assert int(np.sum(lam_p != 0)) == b_peft, t
                if t < T - tf:  # PEFT drops its scores at T − t_f
                    for k, m in enumerate(mods):
                        for i, (f, f_peft) in enumerate((("p", "lora_A"), ("lam", "lora_E"),
                                                          ("q", "lora_B"))):
                            want = alloc.exp_avg_ipt[f"{m}.{f_peft}.default"].numpy()
                            got = np.asarray(state.ipt[k][i])
                            got = got[:, None] if f == "lam" else got.T
                            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-30,
                                                       err_msg=f"ipt {m}.{f}, t={t}")
    finally:
        torch.set_default_dtype(old_dtype)
    assert mask_steps == [3, 6, 9, 12, 15, 18] + list(range(19, T + 1))
