"""Federated optimizers against float64 numpy references written from the papers' rules.

FedAdagrad/FedAdam/FedYogi: Reddi et al. 2021, Alg. 2. MIME/MimeLite: Karimireddy et al.
2020 (fedjax semantics). FedLADA: Sun et al. 2023 (Sec. 3). FedSPS/FedDecSPS: Mukherjee,
Loizou, Stich 2024. Clients run in parallel with ``jax.vmap``; several rounds each.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64, perturb

O = jlora.optim
FAN_IN, FAN_OUT, RANK, SCALE = 6, 3, 2, 1.5
CLIENTS, STEPS, BATCH, ROUNDS = 3, 3, 5, 3


def lora_tree():
    """A trainable half with one LoRA node (a, b) and a plain (Full) head vector."""
    rng = np.random.default_rng(0)
    params = {"k": jnp.asarray(rng.normal(size=(FAN_IN, FAN_OUT)), jnp.float32),
              "h": jnp.asarray(rng.normal(size=(FAN_OUT,)), jnp.float32)}
    spec = jlora.Spec({"k": jlora.LoRA(rank=RANK, alpha=RANK * SCALE), "h": jlora.Full()})
    adapted = perturb(jlora.apply(params, spec, key=jax.random.key(0)), size=0.4)
    return jlora.split(adapted)


def to_np(t):
    return {"a": f64(t["k"].a), "b": f64(t["k"].b), "h": f64(t["h"].value)}


def from_like(t, d):
    return {"k": t["k"].replace(a=jnp.asarray(d["a"], jnp.float32), b=jnp.asarray(d["b"], jnp.float32)),
            "h": t["h"].replace(value=jnp.asarray(d["h"], jnp.float32))}


def data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROUNDS, CLIENTS, STEPS, BATCH, FAN_IN))
    y = rng.normal(size=(ROUNDS, CLIENTS, STEPS, BATCH, FAN_OUT)) + np.arange(CLIENTS)[:, None, None, None]
    return x, y


# ---- the model: pred = x·(K0 + s·a·b) + h, loss = ½·mean‖pred − y‖²


def np_loss_grad(p, k0, x, y):
    w = k0 + SCALE * p["a"] @ p["b"]
    r = x @ w + p["h"] - y
    n = x.shape[0]
    dw = x.T @ r / n
    return 0.5 * (r ** 2).sum() / n, {"a": SCALE * dw @ p["b"].T, "b": SCALE * p["a"].T @ dw,
                                      "h": r.sum(0) / n}


def jax_loss(frozen):
    def loss(t, x, y):
        merged = jlora.merge(jlora.combine(t, frozen))
        return 0.5 * jnp.mean(jnp.sum((x @ merged["k"] + merged["h"] - y) ** 2, -1))
    return loss


def np_add(p, q, s=1.0):
    return {k: p[k] + s * q[k] for k in p}


def np_mean(ps):
    return {k: np.mean([p[k] for p in ps], axis=0) for k in ps[0]}


def close(t, ref, rtol=2e-4, atol=2e-5):
    got = to_np(t)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=atol, err_msg=k)


# ---------------------------------------------------------------- FedAdagrad / FedAdam / FedYogi


@pytest.mark.parametrize("kind,b1,v0", [("adam", 0.9, None), ("yogi", 0.9, None),
                                        ("adagrad", 0.0, None), ("adagrad", 0.8, 0.0),
                                        ("yogi", 0.5, 0.0)])
def test_server_fedopt_several_rounds_vs_numpy(kind, b1, v0):
    server, _ = lora_tree()
    eta, b2, tau = 0.05, 0.97, 1e-2
    make = {"adam": O.fedadam, "yogi": O.fedyogi, "adagrad": O.fedadagrad}[kind]
    kw = {} if kind == "adagrad" else {"b2": b2}
    opt = make(eta, b1=b1, tau=tau, initial_accumulator=v0, **kw)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(
        lambda st, x, agg: O.server_step(opt, st, x, agg), n=1))
    state = opt.init(server)
    x = to_np(server)
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau ** 2 if v0 is None else v0) for k, val in x.items()}
    rng = np.random.default_rng(3)
    weights = np.array([1.0, 3.0, 2.0])
    for _ in range(ROUNDS):
        clients = [{k: val + rng.normal(size=val.shape) * 0.3 for k, val in x.items()}
                   for _ in range(CLIENTS)]
        agg = {k: sum(w * c[k] for w, c in zip(weights, clients)) / weights.sum() for k in x}
        server, state = step(state, server, from_like(server, agg))
        for k in x:   # Algorithm 2 on Δ_t = agg − x_t
            d = agg[k] - x[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            if kind == "adagrad":
                v[k] = v[k] + d ** 2
            elif kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d ** 2
            else:
                v[k] = v[k] - (1 - b2) * d ** 2 * np.sign(v[k] - d ** 2)
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        close(server, x)


def test_fedopt_on_plain_dicts_and_schedules():
    x = {"w": jnp.array([1.0, -2.0]), "v": {"u": jnp.array([[0.5]])}}
    opt = O.fedadam(optax.linear_schedule(0.1, 0.0, 2), tau=0.1)
    st = opt.init(x)
    agg = jax.tree.map(lambda a: a + 1.0, x)
    x1, st = O.server_step(opt, st, x, agg)
    # round 1: Δ = 1, m = 0.1, v = 0.99·0.01 + 0.01; lr 0.1
    ref = 0.1 * 0.1 / (np.sqrt(0.99 * 0.01 + 0.01) + 0.1)
    np.testing.assert_allclose(f64(x1["w"]) - [1.0, -2.0], ref, rtol=1e-5)
    x2, _ = O.server_step(opt, st, x1, jax.tree.map(lambda a: a + 1.0, x1))
    np.testing.assert_allclose(f64(x2["v"]["u"]) - f64(x1["v"]["u"]), 0.05 * 0.19 / (
        np.sqrt(0.99 * 0.0199 + 0.01) + 0.1), rtol=1e-5)


def test_server_optimizers_differ_from_optax_defaults():
    """optax.adam bias-corrects: after one round its step is η·sign(Δ), ours is not."""
    x, agg = {"w": jnp.zeros(3)}, {"w": jnp.array([0.1, 0.2, 0.3])}
    ours, _ = O.server_step(O.fedadam(1.0, tau=1e-3), O.fedadam(1.0, tau=1e-3).init(x), x, agg)
    theirs, _ = O.server_step(optax.adam(1.0, b2=0.99, eps=1e-3), optax.adam(1.0).init(x), x, agg)
    assert not np.allclose(f64(ours["w"]), f64(theirs["w"]), rtol=1e-2)


# ---------------------------------------------------------------- client-side methods


def run_rounds(client_fn, server_fn, state, server, frozen):
    """ROUNDS rounds: clients vmapped over their data, the server on the results."""
    xs, ys = data()
    rounds = jax.jit(jax.vmap(client_fn, in_axes=(None, None, 0, 0)))
    for r in range(ROUNDS):
        out = rounds(server, state, jnp.asarray(xs[r], jnp.float32), jnp.asarray(ys[r], jnp.float32))
        server, state = server_fn(server, state, out, xs[r], ys[r])
    return server, state


@pytest.mark.parametrize("variant", ["mime", "mimelite"])
def test_mime_several_rounds_vs_numpy(variant):
    server, frozen = lora_tree()
    k0 = f64(frozen["k"].base)
    lr, beta, eta_s = 0.05, 0.9, 0.8
    base = optax.sgd(lr, momentum=beta)
    srv = O.mime_server(base, eta_s)
    loss = jax_loss(frozen)
    grad = jax.grad(loss)

    def full_grad(x, xs, ys):
        return grad(x, jnp.asarray(xs.reshape(-1, FAN_IN), jnp.float32),
                    jnp.asarray(ys.reshape(-1, FAN_OUT), jnp.float32))

    def client(x, st, xb, yb):
        s, c = st
        tx = O.mime_client(base, s)
        cst, y = tx.init(x), x
        for k in range(STEPS):
            g = grad(y, xb[k], yb[k])
            if variant == "mime":
                g = O.mime_gradient(g, grad(x, xb[k], yb[k]), c)
            u, cst = tx.update(g, cst, y)
            y = optax.apply_updates(y, u)
        return y

    xs, ys = data()
    clients = jax.jit(jax.vmap(client, in_axes=(None, None, 0, 0)))
    s, x_j = srv.init(server), server
    for r in range(ROUNDS):
        # the control variate c: full-batch gradient at the round's x, before training
        c = full_grad(x_j, xs[r], ys[r])
        out = clients(x_j, (s, c), jnp.asarray(xs[r], jnp.float32), jnp.asarray(ys[r], jnp.float32))
        x_j, s = O.server_step(srv, s, x_j, jax.tree.map(lambda t: t.mean(0), out), full_gradient=c)

    # numpy: fedjax's Mime with SGD momentum; y ← y − lr(β·m_s + g), m_s ← β·m_s + c
    x = to_np(server)
    m_s = {k: np.zeros_like(v) for k, v in x.items()}
    for r in range(ROUNDS):
        c = np_loss_grad(x, k0, xs[r].reshape(-1, FAN_IN), ys[r].reshape(-1, FAN_OUT))[1]
        finals = []
        for i in range(CLIENTS):
            y = dict(x)
            for k in range(STEPS):
                g = np_loss_grad(y, k0, xs[r, i, k], ys[r, i, k])[1]
                if variant == "mime":
                    g = np_add(np_add(g, np_loss_grad(x, k0, xs[r, i, k], ys[r, i, k])[1], -1), c)
                y = {n: y[n] - lr * (beta * m_s[n] + g[n]) for n in y}
            finals.append(y)
        mean = np_mean(finals)
        x = {n: x[n] - eta_s * (x[n] - mean[n]) for n in x}
        m_s = {n: beta * m_s[n] + c[n] for n in x}
    close(x_j, x)
    np.testing.assert_allclose(f64(s.base[0].trace["k"].a), m_s["a"], rtol=2e-4, atol=2e-5)


def test_fedlada_several_rounds_vs_numpy():
    server, frozen = lora_tree()
    k0 = f64(frozen["k"].base)
    lr, b1, b2, alpha, eta_g, eps = 0.02, 0.9, 0.99, 0.3, 0.9, 1e-3
    srv = O.fedlada_server(eta_g, eps=eps)
    grad = jax.grad(jax_loss(frozen))

    def client(x, st, xb, yb):
        tx = O.fedlada_client(lr, st, b1=b1, b2=b2, alpha=alpha)
        cst, y = tx.init(x), x
        for k in range(STEPS):
            u, cst = tx.update(grad(y, xb[k], yb[k]), cst, y)
            y = optax.apply_updates(y, u)
        return y, cst.nu_hat, O.fedlada_offset(x, y, lr, STEPS)

    def server_fn(x, st, out, *_):
        y, nu_hat, d = jax.tree.map(lambda t: t.mean(0), out)
        return O.server_step(srv, st, x, y, nu_hat=nu_hat, offset=d)

    x_j, st_j = run_rounds(client, server_fn, srv.init(server), server, frozen)

    xs, ys = data()
    x = to_np(server)
    nu = {n: np.full_like(v, eps ** 2) for n, v in x.items()}
    ga = {n: np.zeros_like(v) for n, v in x.items()}
    for r in range(ROUNDS):
        ys_, vh_, d_ = [], [], []
        for i in range(CLIENTS):
            y, m = dict(x), {n: np.zeros_like(v) for n, v in x.items()}
            v, vh = dict(nu), dict(nu)
            for k in range(STEPS):
                g = np_loss_grad(y, k0, xs[r, i, k], ys[r, i, k])[1]
                for n in y:
                    m[n] = b1 * m[n] + (1 - b1) * g[n]
                    v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
                    vh[n] = np.maximum(vh[n], v[n])
                    y[n] = y[n] - lr * (alpha * m[n] / np.sqrt(vh[n]) + (1 - alpha) * ga[n])
            ys_.append(y), vh_.append(vh), d_.append({n: (x[n] - y[n]) / (lr * STEPS) for n in x})
        ybar = np_mean(ys_)
        x = {n: x[n] + eta_g * (ybar[n] - x[n]) for n in x}
        ga, nu = np_mean(d_), np_mean(vh_)
    close(x_j, x)
    np.testing.assert_allclose(f64(st_j.offset["k"].b), ga["b"], rtol=5e-4, atol=1e-5)
    np.testing.assert_allclose(f64(st_j.nu["h"].value), nu["h"], rtol=5e-4)


@pytest.mark.parametrize("variant", ["fedsps", "feddecsps"])
def test_sps_several_rounds_vs_numpy(variant):
    """Clients keep their FedDecSPS state across rounds (stacked per client)."""
    server, frozen = lora_tree()
    k0 = f64(frozen["k"].base)
    c, gamma_b = 0.5, 0.25
    loss = jax_loss(frozen)
    tx = O.fedsps(c, gamma_b) if variant == "fedsps" else O.feddecsps(c, gamma_b)

    def client(x, cst, xb, yb):
        y = x
        for k in range(STEPS):
            val, g = jax.value_and_grad(loss)(y, xb[k], yb[k])
            u, cst = tx.update(g, cst, y, value=val)
            y = optax.apply_updates(y, u)
        return y, cst

    xs, ys = data()
    cst = jax.vmap(lambda _: tx.init(server))(jnp.arange(CLIENTS))
    run = jax.jit(jax.vmap(client, in_axes=(None, 0, 0, 0)))
    x_j = server
    for r in range(ROUNDS):
        y, cst = run(x_j, cst, jnp.asarray(xs[r], jnp.float32), jnp.asarray(ys[r], jnp.float32))
        x_j, _ = O.server_step(optax.sgd(1.0), optax.sgd(1.0).init(x_j), x_j,
                               jax.tree.map(lambda t: t.mean(0), y))

    x = to_np(server)
    t = [0] * CLIENTS
    prev = [gamma_b] * CLIENTS
    seen_cap = seen_polyak = False
    for r in range(ROUNDS):
        finals = []
        for i in range(CLIENTS):
            y = dict(x)
            for k in range(STEPS):
                val, g = np_loss_grad(y, k0, xs[r, i, k], ys[r, i, k])
                sq = sum((g[n] ** 2).sum() for n in g)
                if variant == "fedsps":
                    gam = min(val / (c * sq), gamma_b)
                    seen_cap |= gam == gamma_b
                    seen_polyak |= gam < gamma_b
                else:
                    c_t, c_prev = c * np.sqrt(t[i] + 1), c * np.sqrt(max(t[i], 1))
                    gam = min(val / sq, c_prev * prev[i]) / c_t
                    seen_cap |= val / sq > c_prev * prev[i]
                    seen_polyak |= val / sq < c_prev * prev[i]
                    prev[i], t[i] = gam, t[i] + 1
                y = {n: y[n] - gam * g[n] for n in y}
            finals.append(y)
        x = np_mean(finals)
    assert seen_cap and seen_polyak   # both branches of the min are exercised
    close(x_j, x, rtol=1e-3, atol=1e-4)
    if variant == "feddecsps":
        np.testing.assert_array_equal(np.asarray(cst.count), [ROUNDS * STEPS] * CLIENTS)
        np.testing.assert_allclose(f64(cst.step), prev, rtol=1e-3)


# ---------------------------------------------------------------- communication and errors


def test_communication_bytes_counts_the_trees():
    server, _ = lora_tree()
    model = 4 * (FAN_IN * RANK + RANK * FAN_OUT + FAN_OUT)   # float32 a, b, head
    assert O.tree_bytes(server) == model
    for m in ("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedsps", "feddecsps"):
        assert O.communication_bytes(m, server) == (model, model)
    adam = optax.adam(1e-3)   # mu, nu and an int32 count
    assert O.communication_bytes("mimelite", server, base_optimizer=adam) == (2 * model, 3 * model + 4)
    assert O.communication_bytes("mime", server, base_optimizer=adam) == (2 * model, 4 * model + 4)
    assert O.communication_bytes("fedlada", server) == (3 * model, 3 * model)
    stacked = {"k": jnp.zeros((FAN_IN, 3 * RANK)), "k2": jnp.zeros((3 * RANK, FAN_OUT))}
    com = O.communication_bytes("fedavg", server, download=stacked)
    assert com.down == 4 * 3 * RANK * (FAN_IN + FAN_OUT) and com.total(3) == 3 * (com.up + com.down)
    # MIME's statistics are sized on the trained model, not on FLoRA's stacked download
    sgdm = optax.sgd(0.1, momentum=0.9)
    assert O.communication_bytes("mime", server, download=stacked, base_optimizer=sgdm) == (
        2 * model, com.down + 2 * model)
    shapes = jax.eval_shape(lambda t: t, server)
    assert O.communication_bytes("fedlada", shapes) == (3 * model, 3 * model)


def test_bad_inputs_name_the_option_and_path():
    with pytest.raises(ValueError, match="fedadam: tau"):
        O.fedadam(0.1, tau=0.0)
    with pytest.raises(ValueError, match="fedyogi: b2"):
        O.fedyogi(0.1, b2=1.0)
    with pytest.raises(ValueError, match="fedsps: c"):
        O.fedsps(c=-1.0)
    with pytest.raises(ValueError, match="method"):
        O.communication_bytes("scaffold", {"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="base_optimizer"):
        O.communication_bytes("mime", {"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="w/u: server has shape \\(2,\\), aggregate has shape \\(3,\\)"):
        O.pseudo_gradient({"w": {"u": jnp.zeros(2)}}, {"w": {"u": jnp.zeros(3)}})
    server, _ = lora_tree()
    other = jlora.split(jlora.apply({"k": jnp.ones((FAN_IN, FAN_OUT)), "h": jnp.ones(FAN_OUT)},
                                    jlora.Spec({"k": jlora.LoRA(rank=1), "h": jlora.Full()}),
                                    key=jax.random.key(0)))[0]
    with pytest.raises(ValueError, match="k/a"):
        O.pseudo_gradient(server, other)


def test_merged_step_fedadam_on_flora_stacked_aggregate_vs_numpy():
    """FedAdam on the merged weights with FLoRA's exact, rank-stacked aggregate (ranks 1, 3)."""
    from jlora import federated as fl

    rng = np.random.default_rng(5)
    params = {"k": jnp.asarray(rng.normal(size=(FAN_IN, FAN_OUT)), jnp.float32),
              "h": jnp.asarray(rng.normal(size=(FAN_OUT,)), jnp.float32)}

    def tree(rank, seed):
        spec = jlora.Spec({"k": jlora.LoRA(rank=rank, alpha=2.0 * rank), "h": jlora.Full()})
        return jlora.split(perturb(jlora.apply(params, spec, key=jax.random.key(seed)), seed=seed))

    spec = jlora.Spec({"k": jlora.LoRA(rank=RANK, alpha=2.0 * RANK), "h": jlora.Full()})
    server, frozen = tree(RANK, 0)                     # a server adapter with a non-zero delta
    clients = [tree(1, 1)[0], tree(3, 2)[0]]
    w = np.array([1.0, 3.0])
    opt = O.fedadam(0.1, tau=0.05)
    cur = jlora.merge(jlora.combine(server, frozen))
    new_t, new_f, _ = O.merged_step(opt, opt.init(cur), server, frozen, fl.flora(clients, w),
                                    spec=spec, key=jax.random.key(9))
    p = w / w.sum()
    k0 = f64(params["k"])
    x = {"k": k0 + 2.0 * f64(server["k"].a) @ f64(server["k"].b), "h": f64(server["h"].value)}
    agg = {"k": k0 + sum(pk * 2.0 * f64(c["k"].a) @ f64(c["k"].b) for pk, c in zip(p, clients)),
           "h": sum(pk * f64(c["h"].value) for pk, c in zip(p, clients))}
    for n in x:
        d = agg[n] - x[n]                              # Reddi et al. Alg. 2, one round
        m, v = 0.1 * d, 0.99 * 0.05 ** 2 + 0.01 * d ** 2
        want = x[n] + 0.1 * m / (np.sqrt(v) + 0.05)
        got = f64(new_f["k"].base) if n == "k" else f64(new_t["h"].value)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(new_t["k"].b).max()) == 0.0   # clients restart from a fresh adapter


def test_fedadam_bias_correction_vs_numpy_float64():
    """``η_t = η·√(1−β2^k)/(1−β1^k)``: k = t ("adam"), t + 1 ("flower"); t = 1, 2, …"""
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        for mode, offset in (("adam", 0), ("flower", 1)):
            opt = O.fedadam(eta, b1=b1, b2=b2, tau=tau, initial_accumulator=0.0,
                            bias_correction=mode)
            x = rng.normal(size=(3, 2))
            xj = {"w": jnp.asarray(x)}
            state = opt.init(xj)
            m, v = np.zeros_like(x), np.zeros_like(x)
            for t in range(1, 5):
                agg = x + rng.normal(size=x.shape)
                xj, state = O.server_step(opt, state, xj, {"w": jnp.asarray(agg)})
                d = agg - x
                m, v = b1 * m + (1 - b1) * d, b2 * v + (1 - b2) * d ** 2
                k = t + offset
                x = x + eta * np.sqrt(1 - b2 ** k) / (1 - b1 ** k) * m / (np.sqrt(v) + tau)
                assert xj["w"].dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(xj["w"]), x, rtol=1e-13, atol=1e-15)
    # a schedule is corrected too; no correction stays the default
    sched = O.fedadam(optax.constant_schedule(0.1), b1=0.5, b2=0.5, tau=1.0, bias_correction="adam")
    u, _ = sched.update({"w": jnp.array([-2.0])}, sched.init({"w": jnp.zeros(1)}))
    # Δ = 2: m = 1, v = 0.5·τ² + 0.5·4 = 2.5; η_1 = 0.1·√(1−0.5)/(1−0.5)
    np.testing.assert_allclose(float(u["w"][0]), 0.1 * np.sqrt(0.5) / 0.5 / (np.sqrt(2.5) + 1),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="fedadam: bias_correction must be one of"):
        O.fedadam(0.1, bias_correction=True)


def test_fedlada_offset_refuses_steps_and_rates_that_poison_the_average():
    x, y = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
    for steps in (0, -1, 2.5, True, jnp.array(0), np.array([2, 3]), jnp.array(2.0)):
        with pytest.raises(ValueError, match="fedlada_offset: steps must be an int >= 1"):
            O.fedlada_offset(x, y, 0.1, steps)
    for lr in (-1.0, 0.0, float("inf"), jnp.float32(-0.1)):
        with pytest.raises(ValueError, match="fedlada_offset: learning_rate must be"):
            O.fedlada_offset(x, y, lr, 2)
    np.testing.assert_allclose(np.asarray(O.fedlada_offset(x, y, 0.1, 4)["w"]), [2.5, 2.5])
    # per-client step counts under vmap (traced integers) stay allowed
    per = jax.vmap(lambda k: O.fedlada_offset(x, y, 0.5, k))(jnp.array([1, 4]))
    np.testing.assert_allclose(np.asarray(per["w"]), [[2.0, 2.0], [0.5, 0.5]])


def test_feddecsps_keeps_its_step_size_in_the_params_float_dtype():
    c0, gamma_b = 0.5, 0.1
    g = np.array([30.0, 10.0])
    with jax.enable_x64(True):
        tx = O.feddecsps(c0, gamma_b)
        x = {"w": jnp.array([1.0, -2.0], jnp.float64)}
        st = tx.init(x)
        assert st.step.dtype == jnp.float64
        prev, ref = gamma_b, np.array([1.0, -2.0])
        for t in range(6):
            loss = 1e6 if t % 2 else 0.7    # both branches of the min
            u, st = tx.update({"w": jnp.asarray(g)}, st, x, value=loss)
            x = optax.apply_updates(x, u)
            c_t, c_prev = c0 * np.sqrt(t + 1), c0 * np.sqrt(max(t, 1))
            prev = min(loss / (g @ g), c_prev * prev) / c_t
            ref = ref - prev * g
            assert st.step.dtype == jnp.float64
            np.testing.assert_allclose(float(st.step), prev, rtol=1e-14)
        np.testing.assert_allclose(np.asarray(x["w"]), ref, rtol=1e-14)
    for dtype in (jnp.float32, jnp.bfloat16):
        assert O.feddecsps(c0, gamma_b).init({"w": jnp.ones(2, dtype)}).step.dtype == jnp.float32
