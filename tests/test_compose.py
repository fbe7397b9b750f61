"""jlora.compose against float64 numpy references and PEFT's own merge_utils."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils import merge_utils

import jlora
from tests._refs import f64

C = jlora.compose
SHAPES = {"d1": (12, 10), "d2": (10, 16), "conv": (3, 3, 2, 9)}
CONFIGS = [jlora.LoRA(rank=2, alpha=4), jlora.LoRA(rank=4, alpha=3, rslora=True),
           jlora.LoRA(rank=8, alpha=16)]
W = [0.7, -1.3, 0.4]


def base_params(seed=0):
    rng = np.random.default_rng(seed)
    p = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in SHAPES.items()}
    p["d1"]["bias"] = jnp.asarray(rng.normal(size=10), jnp.float32)
    return p


def trained(config, seed, params=None, pattern="*/kernel"):
    """An adapter with random (non-zero) factors, as after training."""
    params = base_params() if params is None else params
    t = jlora.apply(params, jlora.Spec({pattern: config}), key=jax.random.key(seed))
    rng = np.random.default_rng(100 + seed)

    def bump(n):
        if not jlora.is_node(n):
            return n
        new = {f: jnp.asarray(rng.normal(scale=0.5, size=getattr(n, f).shape), jnp.float32)
               for f in n.trainable}
        if "m" in new:  # DoRA magnitude: keep it positive, near the column norms
            new["m"] = n.m * (1 + 0.1 * jnp.abs(new["m"]))
        return n.replace(**new)

    return jax.tree.map(bump, t, is_leaf=jlora.is_node)


@pytest.fixture(scope="module")
def adapters():
    return [trained(c, i) for i, c in enumerate(CONFIGS)]


def nodes(tree):
    return {p: x for p, x in jlora.tree.leaves_with_paths(tree) if jlora.is_node(x)}


def scale_ref(cfg):
    alpha = cfg.rank if cfg.alpha is None else cfg.alpha
    return alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


def delta_ref(node):
    """ΔK = s·a·b in float64, kernel-shaped (input axes lead, row-major)."""
    a, b = f64(node.a), f64(node.b)
    return (scale_ref(node.config) * a @ b).reshape(node.shape)


def sum_ref(adapters, weights):
    return {p: sum(w * delta_ref(nodes(t)[p]) for w, t in zip(weights, adapters))
            for p in nodes(adapters[0])}


def merged_delta(tree, params):
    """What a combination changes in the merged model, per adapted path, float64."""
    merged = dict(jlora.tree.leaves_with_paths(jlora.merge(tree)))
    orig = dict(jlora.tree.leaves_with_paths(params))
    return {p: f64(merged[p]) - f64(orig[p]) for p in nodes(tree) or merged if p.endswith("kernel")}


def assert_close(got, want, tol=2e-5):
    for p in want:
        scale = 1 + np.abs(want[p]).max()
        np.testing.assert_allclose(got[p], want[p], atol=tol * scale, err_msg=p)


# ------------------------------------------------------------------ exact sums and SVD


def test_cat_and_linear_are_exact_for_mixed_ranks_scales_rslora(adapters):
    want = sum_ref(adapters, W)
    for fn in (C.cat, C.linear):
        out = fn(adapters, W)
        assert_close(merged_delta(out, base_params()), want)
        for p, n in nodes(out).items():
            assert n.scale == 1.0 and n.rank <= 14
    assert {n.rank for n in nodes(C.cat(adapters, W)).values()} == {14}
    # linear drops the columns a sum does not need: ranks capped by min(fan) = 9 (conv), 10, 10
    assert [n.rank for n in nodes(C.linear(adapters, W)).values()] == [9, 10, 10]
    # the same adapter twice has the rank of one
    twice = C.linear([adapters[1], adapters[1]], [1.0, 0.5])
    assert {n.rank for n in nodes(twice).values()} == {4}
    assert_close(merged_delta(twice, base_params()), sum_ref([adapters[1]], [1.5]))
    # cat's result is an ordinary adapter: the fast path runs it
    node = nodes(C.cat(adapters, W))["d1/kernel"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 12)), jnp.float32)
    np.testing.assert_allclose(node.dot(x, jnp.dot),
                               f64(x) @ (f64(base_params()["d1"]["kernel"]) + want["d1/kernel"]),
                               atol=1e-4)


def test_cat_pissa_adapter_is_measured_against_the_original_weight():
    params = base_params()
    pissa = trained(jlora.LoRA(rank=3, alpha=6, init="pissa"), 5, params, "d1/kernel")
    plain = trained(jlora.LoRA(rank=2), 6, params, "d1/kernel")
    n = nodes(pissa)["d1/kernel"]
    d_pissa = scale_ref(n.config) * (f64(n.a) @ f64(n.b) - f64(n.a0) @ f64(n.b0))
    out = C.cat([pissa, plain], [2.0, 1.0])
    want = {"d1/kernel": 2.0 * d_pissa + delta_ref(nodes(plain)["d1/kernel"])}
    assert_close(merged_delta(out, params), want, tol=1e-4)


def test_linear_peft_compat_is_peft_factor_level_formula(adapters):
    two = [trained(jlora.LoRA(rank=4, alpha=8), 1), trained(jlora.LoRA(rank=4, alpha=2), 2)]
    w = [0.8, -0.6]
    out = C.linear(two, w, peft_compat=True)
    for p, node in nodes(out).items():
        ns = [nodes(t)[p] for t in two]
        ws = [wi * scale_ref(n.config) for wi, n in zip(w, ns)]
        a = sum(np.sign(x) * np.sqrt(abs(x)) * f64(n.a) for x, n in zip(ws, ns))
        b = sum(np.sqrt(abs(x)) * f64(n.b) for x, n in zip(ws, ns))
        np.testing.assert_allclose(f64(node.delta()), (a @ b).reshape(node.shape), atol=1e-4)
        exact = sum(x * f64(n.a) @ f64(n.b) for x, n in zip(ws, ns)).reshape(node.shape)
        assert np.abs(f64(node.delta()) - exact).max() > 1e-2  # the cross terms
    with pytest.raises(ValueError, match="equal ranks"):
        C.linear(adapters, W, peft_compat=True)


@pytest.mark.parametrize("rank", [3, 9])
def test_svd_is_numpy_truncated_svd_of_the_exact_sum(adapters, rank):
    out = C.svd(adapters, W, rank)
    for p, want in sum_ref(adapters, W).items():
        node = nodes(out)[p]
        m = want.reshape(-1, want.shape[-1])
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        ref = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(f64(node.delta()).reshape(m.shape), ref,
                                   atol=2e-5 * s[0], err_msg=p)
        assert node.scale == 1.0 and node.rank == rank
        # all singular values sit in b: a has orthonormal columns
        a = f64(node.a)[:, : min(rank, m.shape[1])]
        np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=1e-4)


def test_svd_pads_when_rank_exceeds_the_sum():
    two = [trained(jlora.LoRA(rank=2), 1), trained(jlora.LoRA(rank=2, alpha=5), 2)]
    out = C.svd(two, [1.0, 1.0], 7)
    assert_close(merged_delta(out, base_params()), sum_ref(two, [1.0, 1.0]))
    assert {n.rank for n in nodes(out).values()} == {7}


# ------------------------------------------------------------------ dense merges vs PEFT


def peft_tensors(adapters, p):
    return [torch.tensor(delta_ref(nodes(t)[p]), dtype=torch.float32) for t in adapters]


@pytest.mark.parametrize("density", [0.3, 0.75])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_and_magnitude_prune_equal_peft_merge_utils(adapters, density, sign):
    w = torch.tensor(W, dtype=torch.float32)
    params = base_params()
    got_ties = merged_delta(C.ties(adapters, W, density, majority_sign=sign), params)
    got_mp = merged_delta(C.magnitude_prune(adapters, W, density), params)
    for p in nodes(adapters[0]):
        ts = peft_tensors(adapters, p)
        want = merge_utils.ties(ts, w, density, majority_sign_method=sign).double().numpy()
        np.testing.assert_allclose(got_ties[p], want, atol=1e-5 * (1 + np.abs(want).max()))
        want = merge_utils.magnitude_prune(ts, w, density).double().numpy()
        np.testing.assert_allclose(got_mp[p], want, atol=1e-5 * (1 + np.abs(want).max()))


def test_ties_rank_gives_truncated_svd_adapter(adapters):
    out = C.ties(adapters, W, 0.5, rank=4)
    for p, node in nodes(out).items():
        want = merge_utils.ties(peft_tensors(adapters, p), torch.tensor(W), 0.5).double().numpy()
        m = want.reshape(-1, want.shape[-1])
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        np.testing.assert_allclose(f64(node.delta()).reshape(m.shape),
                                   (u[:, :4] * s[:4]) @ vt[:4], atol=2e-5 * s[0])
        assert node.rank == 4 and node.scale == 1.0


def test_ties_model_scope_is_one_threshold_over_all_layers(adapters):
    density = 0.2
    got = merged_delta(C.ties(adapters, W, density, scope="model"), base_params())
    paths = list(nodes(adapters[0]))
    trimmed = {p: [] for p in paths}
    for t in adapters:
        flat = np.concatenate([np.abs(delta_ref(nodes(t)[p])).ravel() for p in paths])
        thr = np.sort(flat)[::-1][int(density * flat.size) - 1]
        for p in paths:
            d = delta_ref(nodes(t)[p])
            trimmed[p].append(np.where(np.abs(d) >= thr, d, 0.0))
    for p in paths:
        stacked = torch.tensor(np.stack(trimmed[p]))
        mask = merge_utils.calculate_majority_sign_mask(stacked, "total")
        wt = stacked * torch.tensor(W, dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
        want = merge_utils.disjoint_merge(wt, mask).numpy()
        np.testing.assert_allclose(got[p], want, atol=1e-5 * (1 + np.abs(want).max()))


def test_dare_equals_peft_merge_utils_with_the_same_mask(adapters):
    density, key, params = 0.4, jax.random.key(3), base_params()
    # each adapter's mask, read back from a one-hot weighting (masks do not depend on weights)
    masks = [merged_delta(C.dare_linear(adapters, np.eye(3)[i], density, key=key), params)
             for i in range(3)]
    lin = merged_delta(C.dare_linear(adapters, W, density, key=key), params)
    tie = merged_delta(C.dare_ties(adapters, W, density, key=key), params)
    for p in nodes(adapters[0]):
        kept = [m[p] != 0 for m in masks]
        frac = np.mean(kept)
        assert abs(frac - density) < 0.06, frac
        ts = [torch.tensor(d.numpy() * k / density) for d, k in
              zip(peft_tensors(adapters, p), kept)]  # random_pruning with this mask
        w = torch.tensor(W, dtype=torch.float32)
        want = merge_utils.task_arithmetic(ts, w).double().numpy()
        np.testing.assert_allclose(lin[p], want, atol=1e-5 * (1 + np.abs(want).max()))
        stacked = torch.stack(ts)
        mask = merge_utils.calculate_majority_sign_mask(stacked, "total")
        want = merge_utils.disjoint_merge(stacked * w.view(-1, *([1] * (stacked.dim() - 1))),
                                          mask).double().numpy()
        np.testing.assert_allclose(tie[p], want, atol=1e-5 * (1 + np.abs(want).max()))
    other = merged_delta(C.dare_linear(adapters, W, density, key=jax.random.key(4)), params)
    assert not np.allclose(other["d1/kernel"], lin["d1/kernel"])


# ------------------------------------------------------------------ other methods


def dora_delta_ref(node):
    k0 = f64(node.base)
    v = k0 + scale_ref(node.config) * f64(node.a) @ f64(node.b)
    return v * (f64(node.m) / np.linalg.norm(v, axis=0)) - k0


def test_dora_dense_merges_and_svd_work_cat_refuses():
    params = base_params()
    two = [trained(jlora.DoRA(rank=2, alpha=4), 1, params, "d2/kernel"),
           trained(jlora.DoRA(rank=3), 2, params, "d2/kernel")]
    want = sum(w * dora_delta_ref(nodes(t)["d2/kernel"]) for w, t in zip([1.0, -0.5], two))
    got = merged_delta(C.magnitude_prune(two, [1.0, -0.5], 1.0), params)["d2/kernel"]
    np.testing.assert_allclose(got, want, atol=1e-4)
    node = nodes(C.svd(two, [1.0, -0.5], 3))["d2/kernel"]
    u, s, vt = np.linalg.svd(want, full_matrices=False)
    np.testing.assert_allclose(f64(node.delta()), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
    with pytest.raises(ValueError, match="d2/kernel.*not one"):
        C.cat(two, [1.0, 1.0])
    with pytest.raises(ValueError, match="d2/kernel"):
        C.lorahub(two, lambda t: 0.0, key=jax.random.key(0), budget=2)


def test_full_leaves_are_refused_by_path():
    params = base_params()
    spec = jlora.Spec({"d1/kernel": jlora.LoRA(rank=2), "d2/kernel": jlora.Full()})
    t = jlora.apply(params, spec, key=jax.random.key(0))
    with pytest.raises(ValueError, match="d2/kernel"):
        C.ties([t, t], [1.0, 1.0], 0.5)


def test_vera_and_adalora_factor_forms_are_exact():
    params = base_params()
    vera = trained(jlora.VeRA(rank=6), 1, params, "d1/kernel")
    ada = trained(jlora.AdaLoRA(init_rank=3, target_rank=2, alpha=6), 2, params, "d1/kernel")
    nv, na = nodes(vera)["d1/kernel"], nodes(ada)["d1/kernel"]
    dv = (f64(nv.a) * f64(nv.lambda_d)) @ f64(nv.b) * f64(nv.lambda_b)
    da = 2.0 * (f64(na.p) * f64(na.lam)) @ f64(na.q)
    got = merged_delta(C.cat([vera, ada], [0.5, 2.0]), params)["d1/kernel"]
    np.testing.assert_allclose(got, 0.5 * dv + 2.0 * da, atol=1e-4)


# ------------------------------------------------------------------ switch, pad, no retrace


def test_switch_equals_merging_new_onto_the_original(adapters):
    old, new = adapters[0], adapters[2]
    moved = C.switch(jlora.merge(old), old, new)
    want = jlora.merge(new)
    for p, x in jlora.tree.leaves_with_paths(want):
        np.testing.assert_allclose(f64(dict(jlora.tree.leaves_with_paths(moved))[p]), f64(x),
                                   atol=1e-5 * (1 + np.abs(f64(x)).max()))


def test_pad_is_exact_and_swapping_padded_adapters_never_retraces(adapters):
    import flax.linen as nn

    model = nn.Dense(10)
    params = {"d1": {"kernel": base_params()["d1"]["kernel"], "bias": jnp.zeros(10)}}
    spec = lambda cfg: jlora.Spec({"kernel": cfg})
    trees = [trained(cfg, i, params["d1"], "kernel") for i, cfg in enumerate(CONFIGS)]
    padded = [C.pad(t, 8) for t in trees]
    for t, q in zip(trees, padded):
        np.testing.assert_allclose(f64(q["kernel"].delta()), delta_ref(t["kernel"]), atol=1e-5)
        assert q["kernel"].rank == 8
    x = jnp.ones((2, 12))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(tree, x):
        return jlora.linen.apply(model, {"params": tree}, x)

    for t, q in zip(trees, padded):
        np.testing.assert_allclose(serve(q, x), f64(x) @ (f64(t["kernel"].base) + delta_ref(t["kernel"]))
                                   + f64(t["bias"]), atol=1e-4)
    with pytest.raises(ValueError, match="down"):
        C.pad(trees[2], 4)
    del spec


# ------------------------------------------------------------------ LoraHub


def test_lorahub_finds_weights_and_composes_factors():
    params = base_params()
    cfg = jlora.LoRA(rank=3, alpha=6)
    hub = [trained(cfg, i, params, "d1/kernel") for i in range(3)]
    ns = [nodes(t)["d1/kernel"] for t in hub]

    def composed_ref(w):
        a = sum(wi * f64(n.a) for wi, n in zip(w, ns))
        b = sum(wi * f64(n.b) for wi, n in zip(w, ns))
        return 2.0 * a @ b

    target = composed_ref([0.6, -0.4, 0.9])
    loss = lambda t: float(jnp.mean((t["d1"]["kernel"].delta() - target) ** 2))
    seen = []
    res = C.lorahub(hub, loss, budget=40, key=jax.random.key(0),
                    callback=lambda step, w, l: seen.append((step, l)))
    weights, composed, history = res
    assert len(history) == 40 and [s for s, _ in seen] == list(range(40))
    assert np.all(np.abs(weights) <= 1.5)
    np.testing.assert_allclose(f64(composed["d1"]["kernel"].delta()), composed_ref(weights),
                               atol=1e-4)
    start = np.mean(target ** 2)  # w = 0
    assert loss(composed) < 0.5 * start
    again = C.lorahub(hub, loss, budget=40, key=jax.random.key(0))
    np.testing.assert_array_equal(again.weights, weights)


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_name_what_is_wrong(adapters):
    other = trained(CONFIGS[0], 0, base_params(seed=1))
    with pytest.raises(ValueError, match="conv/kernel"):  # first differing leaf
        C.cat([adapters[0], other], [1.0, 1.0])
    shifted = jax.tree.map(lambda n: n.replace(base=n.base + 1) if jlora.is_node(n) else n,
                           adapters[1], is_leaf=jlora.is_node)
    with pytest.raises(ValueError, match="conv/kernel.*share one base"):
        C.svd([adapters[0], shifted], [1.0, 1.0], 2)
    missing = {k: v for k, v in adapters[1].items() if k != "d2"}
    with pytest.raises(ValueError, match="d2/kernel"):
        C.linear([adapters[0], missing], [1.0, 1.0])
    with pytest.raises(ValueError, match="density"):
        C.ties(adapters, W, -0.1)
    with pytest.raises(ValueError, match="density"):
        C.dare_linear(adapters, W, 0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        C.dare_ties(adapters, W, 0.5)
    with pytest.raises(ValueError, match="one number per adapter"):
        C.cat(adapters, [1.0, 2.0])
    with pytest.raises(ValueError, match="majority_sign"):
        C.ties(adapters, W, 0.5, majority_sign="mass")
    with pytest.raises(ValueError, match="conv/kernel: rank 11 exceeds"):
        C.svd(adapters, W, 11)
    with pytest.raises(ValueError, match="finite"):
        C.cat(adapters, [1.0, np.nan, 0.0])


def test_pissa_on_a_low_precision_base_shares_the_base():
    """PiSSA rebuilds its original weight (residual + s·a0·b0) rounded to the base dtype:
    compose accepts it within a few ulps of that dtype, and still refuses another base."""
    k = jax.random.normal(jax.random.key(0), (24, 16)).astype(jnp.bfloat16)
    params = {"d": {"kernel": k}}
    lora = trained(jlora.LoRA(rank=2, alpha=4), 1, params, "d/kernel")
    pissa = trained(jlora.LoRA(rank=3, alpha=6, init="pissa"), 2, params, "d/kernel")
    n, m = nodes(pissa)["d/kernel"], nodes(lora)["d/kernel"]
    assert np.abs(f64(jlora.methods.stacked.original(n)) - f64(k)).max() > 0  # rounded
    out = C.cat([lora, pissa], [1.0, -2.0])
    want = delta_ref(m) - 2.0 * scale_ref(n.config) * (f64(n.a) @ f64(n.b) - f64(n.a0) @ f64(n.b0))
    assert_close({"d/kernel": f64(nodes(out)["d/kernel"].delta())}, {"d/kernel": want})
    assert nodes(C.stack([lora, pissa]))["d/kernel"].base.dtype == jnp.bfloat16
    ulp = float(jnp.finfo(jnp.bfloat16).eps) * float(jnp.abs(k.astype(jnp.float32)).max())
    other = {"d": {"kernel": k.at[3, 4].add(20 * ulp)}}  # one entry 20 ulps away
    with pytest.raises(ValueError, match="d/kernel: adapters do not share one base"):
        C.cat([trained(jlora.LoRA(rank=2), 3, other, "d/kernel"), pissa], [1.0, 1.0])


def _experts(seed, rank, **kw):
    w = jax.random.normal(jax.random.key(0), (3, 6, 5))
    t = jlora.apply({"w": w}, jlora.Spec({"w": jlora.LoRA(rank=rank, alpha=4.0, expert_axis=0,
                                                          **kw)}), key=jax.random.key(seed))
    n = t["w"]
    return {"w": n.replace(b=jax.random.normal(jax.random.key(seed + 10), n.b.shape))}, w


def test_expert_axis_adapters_are_refused_where_no_exact_form_exists():
    (x, w), (y, _) = _experts(1, 2), _experts(2, 3)
    for fn, call in [("cat", lambda: C.cat([x, y], [1.0, -0.5])),
                     ("linear", lambda: C.linear([x, y], [1.0, -0.5])),
                     ("linear", lambda: C.linear([x, y], [1.0, -0.5], peft_compat=True)),
                     ("svd", lambda: C.svd([x, y], [1.0, -0.5], 2)),
                     ("ties", lambda: C.ties([x, y], [1.0, -0.5], 0.5, rank=2)),
                     ("pad", lambda: C.pad(x, 4)),
                     ("stack", lambda: C.stack([x, y]))]:
        with pytest.raises(ValueError, match=rf"w: jlora.compose.{fn} does not combine stacked "
                                             r"\(expert_axis\) adapters"):
            call()
    # element-wise merges of the dense (E, in, out) delta are exact: magnitude_prune keeps
    # the int(density·numel) largest |ΔK_i| of each whole expert tensor, then Σ w_i ΔK̂_i
    per_expert = lambda n: n.scale * np.einsum("eir,ero->eio", f64(n.a), f64(n.b))
    want = f64(w)
    for wi, t in zip([1.0, -0.5], [x, y]):
        d = per_expert(t["w"])
        keep = np.argsort(-np.abs(d).ravel(), kind="stable")[:int(0.5 * d.size)]
        mask = np.zeros(d.size, bool)
        mask[keep] = True
        want = want + wi * np.where(mask.reshape(d.shape), d, 0.0)
    got = C.magnitude_prune([x, y], [1.0, -0.5], 0.5)["w"]
    np.testing.assert_allclose(f64(got), want, atol=1e-5)


def test_expert_axis_pissa_original_weight_is_per_expert():
    (x, w) = _experts(1, 2, init="pissa")
    n = x["w"]
    want = f64(n.base) + n.scale * np.einsum("eir,ero->eio", f64(n.a0), f64(n.b0))
    np.testing.assert_allclose(f64(jlora.methods.stacked.original(n)), want, atol=1e-5)
    np.testing.assert_allclose(f64(jlora.methods.stacked.original(n)), f64(w), atol=1e-5)


def test_split_halves_are_refused_by_path(adapters):
    halves = [jlora.split(t)[0] for t in adapters]
    frozen = jlora.split(adapters[0])[1]
    for fn, call in [("cat", lambda: C.cat(halves, W)), ("svd", lambda: C.svd(halves, W, 2)),
                     ("ties", lambda: C.ties(halves, W, 0.5)), ("stack", lambda: C.stack(halves)),
                     ("pad", lambda: C.pad(halves[0], 8)),
                     ("cat", lambda: C.cat([frozen, adapters[1]], [1.0, 1.0]))]:
        with pytest.raises(ValueError, match=rf"conv/kernel: jlora.compose.{fn} needs whole "
                                             "adapter nodes"):
            call()


def test_switch_refuses_trees_that_are_not_one_served_model(adapters):
    old, new = adapters[0], adapters[2]
    served = jlora.merge(old)
    other = trained(CONFIGS[2], 2, base_params(seed=1))
    with pytest.raises(ValueError, match="conv/kernel: adapters do not share one base"):
        C.switch(served, old, other)
    partial = {**old, "d2": base_params()["d2"]}
    with pytest.raises(ValueError, match="d2/kernel: adapted in some adapters and plain"):
        C.switch(served, partial, new)
    with pytest.raises(ValueError, match="switch: served does not have old's tree structure"):
        C.switch({k: v for k, v in served.items() if k != "d2"}, old, new)


def test_option_checks_come_before_the_search(adapters, monkeypatch):
    import sys

    hub = [trained(CONFIGS[0], i) for i in range(2)]
    # lorahub validates its options before importing nevergrad (None: any import fails)
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    key = jax.random.key(0)
    for kw, what in [(dict(bounds=(-1, 0, 1)), "bounds"), (dict(bounds=1.5), "bounds"),
                     (dict(bounds=(0.5, 1.0)), "bounds"), (dict(bounds=("a", 1)), "bounds"),
                     (dict(key=None), "key"), (dict(key=3), "key"),
                     (dict(budget=0), "budget"), (dict(l1=-1.0), "l1")]:
        with pytest.raises(ValueError, match=f"jlora.compose.lorahub: {what}"):
            C.lorahub(hub, lambda t: 0.0, **{"key": key, **kw})
    with pytest.raises(ValueError, match="jlora.compose.lorahub: loss_fn"):
        C.lorahub(hub, 3.0, key=key)
    with pytest.raises(ValueError, match="jlora.compose.dare_linear: key must be a PRNG key"):
        C.dare_linear(adapters, W, 0.5, key=3)
    for bad in (jnp.array([1.0, jnp.nan, 0.0]), jnp.array([1.0, 0.0, jnp.inf])):
        with pytest.raises(ValueError, match="jlora.compose.cat: weights must be finite"):
            C.cat(adapters, bad)
    with pytest.raises(ValueError, match="jlora.compose.svd: weights must be real numbers"):
        C.svd(adapters, ["a", "b", "c"], 2)
    # inside jit the weights are traced: not inspected, and the sum is still exact
    got = jax.jit(lambda w: C.cat(adapters, w))(jnp.asarray(W))
    assert_close(merged_delta(got, base_params()), sum_ref(adapters, W))


def test_stack_needs_leading_input_axes_and_names_the_path():
    params = {"d": {"kernel": jnp.ones((6, 5))}}
    t = [jlora.apply(params, jlora.Spec({"d/kernel": jlora.LoRA(rank=2, in_axes=(1,))}),
                     key=jax.random.key(i)) for i in range(2)]
    with pytest.raises(ValueError, match=r"d/kernel: stacked adapters need the input axes first"):
        C.stack(t)
