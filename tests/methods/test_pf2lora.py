"""PF2LoRA and FedDPA nodes, their partitions and client steps, against float64 numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import federated as fl

IN, OUT = 10, 7


def f64(x):
    return np.asarray(x, np.float64)


def adapted(config, seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(IN, OUT)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=OUT), jnp.float32)}}
    tree = jlora.apply(params, jlora.Spec({"dense/kernel": config}), key=jax.random.key(seed))
    node = tree["dense"]["kernel"]
    rnd = lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32)
    tree["dense"]["kernel"] = node.replace(a=rnd(node.a), b=rnd(node.b), c=rnd(node.c),
                                           d=rnd(node.d))
    return tree


def ref_kernel(node, w=1.0, w_personal=1.0):
    return (f64(node.base) + w * node.scale * f64(node.a) @ f64(node.b)
            + w_personal * node.personal_scale * f64(node.c) @ f64(node.d))


def test_pf2lora_config_and_init():
    cfg = jlora.PF2LoRA(6, 2, alpha=12, personal_alpha=4)
    assert (cfg.scale, cfg.personal_scale) == (2.0, 2.0)
    assert jlora.PF2LoRA(4, 2, rslora=True, alpha=4).scale == pytest.approx(2.0)
    p = {"dense": {"kernel": jnp.ones((IN, OUT))}}
    node = jlora.apply(p, jlora.Spec({"dense/kernel": cfg}), key=jax.random.key(0))["dense"]["kernel"]
    assert node.a.shape == (IN, 6) and node.c.shape == (IN, 2)
    assert float(jnp.abs(node.b).max()) == 0 == float(jnp.abs(node.d).max())
    assert 0 < float(jnp.abs(node.a).max()) <= 1 / np.sqrt(IN)
    np.testing.assert_array_equal(jlora.merge({"k": node})["k"], p["dense"]["kernel"])
    for bad in (dict(rank=0, personal_rank=1), dict(rank=2, personal_rank=1, alpha=-1),
                dict(rank=2, personal_rank=1, bogus=1)):
        with pytest.raises(ValueError):
            jlora.PF2LoRA(**bad)
    with pytest.raises(ValueError, match="rank 12 exceeds"):
        jlora.apply(p, jlora.Spec({"dense/kernel": jlora.PF2LoRA(2, 12)}), key=jax.random.key(0))


def test_pf2lora_forward_and_merge_match_the_formula():
    tree = adapted(jlora.PF2LoRA(4, 2, alpha=8, personal_alpha=1))
    node = tree["dense"]["kernel"]
    k = ref_kernel(node)
    np.testing.assert_allclose(jlora.merge(tree)["dense"]["kernel"], k, rtol=1e-5, atol=1e-5)
    x = np.random.default_rng(1).normal(size=(3, 5, IN)).astype(np.float32)
    y = jlora.linen.apply(nn.Dense(OUT), {"params": tree["dense"]}, jnp.asarray(x))
    np.testing.assert_allclose(y, f64(x) @ k + f64(tree["dense"]["bias"]), rtol=1e-4, atol=1e-4)
    # unmerge round trip
    back = jlora.unmerge(jlora.merge(tree), tree)["dense"]["kernel"]
    np.testing.assert_allclose(back, node.base, atol=1e-5)


def test_shared_personal_partition_round_trip():
    tree = adapted(jlora.PF2LoRA(4, 2))
    t, frozen = jlora.split(tree)
    sh, pe = fl.shared(t), fl.personal(t)
    n_sh, n_pe = sh["dense"]["kernel"], pe["dense"]["kernel"]
    assert n_sh.c is None and n_sh.d is None and n_sh.a is not None
    assert n_pe.a is None and n_pe.b is None and n_pe.c is not None
    jax.tree.map(np.testing.assert_array_equal, fl.combine(sh, pe), t)
    # the server averages only the shared pair
    other = adapted(jlora.PF2LoRA(4, 2), seed=0)
    other["dense"]["kernel"] = other["dense"]["kernel"].replace(
        a=other["dense"]["kernel"].a + 1.0)
    agg = fl.fedavg([sh, fl.shared(jlora.split(other)[0])], [1, 3])["dense"]["kernel"]
    np.testing.assert_allclose(agg.a, f64(n_sh.a) + 0.75, rtol=1e-6, atol=1e-6)
    assert agg.c is None
    # a head named by path stays personal too
    sh2 = fl.shared(jlora.split(jlora.apply({"h": {"kernel": jnp.ones((3, 2))}},
                                            jlora.Spec({"h/kernel": jlora.Full()}),
                                            key=jax.random.key(0)))[0], paths="h/*")
    assert sh2["h"]["kernel"] is None


def test_pf2lora_client_step_is_first_order_bilevel():
    """SGD steps on (c, d), then one shared-optimizer step on (a, b), against numpy."""
    tree = adapted(jlora.PF2LoRA(3, 2, alpha=6, personal_alpha=2))
    t, frozen = jlora.split(tree)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, IN)).astype(np.float32)
    y = rng.normal(size=(6, OUT)).astype(np.float32)

    def loss(t, x, y):
        k = jlora.merge(jlora.combine(t, frozen))["dense"]["kernel"]
        return jnp.mean(jnp.sum((x @ k - y) ** 2, -1))

    init, step = fl.pf2lora_client(loss, personal_steps=2, personal_lr=0.05,
                                   shared_opt=optax.sgd(0.1))
    new, _, _ = jax.jit(step)(t, init(t), x, y)

    n = tree["dense"]["kernel"]
    a, b, c, d = (f64(getattr(n, f)) for f in "abcd")
    s, st = n.scale, n.personal_scale
    dk = lambda a, b, c, d: 2 * f64(x).T @ (f64(x) @ (f64(n.base) + s * a @ b + st * c @ d)
                                             - f64(y)) / len(x)
    for _ in range(2):
        g = dk(a, b, c, d)
        c, d = c - 0.05 * st * g @ d.T, d - 0.05 * st * c.T @ g
    g = dk(a, b, c, d)
    a, b = a - 0.1 * s * g @ b.T, b - 0.1 * s * a.T @ g
    got = new["dense"]["kernel"]
    for name, want in zip("abcd", (a, b, c, d)):
        np.testing.assert_allclose(getattr(got, name), want, rtol=1e-4, atol=1e-5)


def test_feddpa_weighting_forward_and_phases():
    tree = adapted(jlora.FedDPA(4, 2, alpha=8, personal_alpha=2))
    node = tree["dense"]["kernel"]
    assert float(node.weight) == 0.5
    np.testing.assert_allclose(jlora.merge(tree)["dense"]["kernel"], ref_kernel(node, 0.5, 0.5),
                               rtol=1e-5, atol=1e-5)
    # the global phase: w = 1, the local pair drops out
    g = fl.feddpa_set_weight(tree, 1.0)
    np.testing.assert_allclose(jlora.merge(g)["dense"]["kernel"], ref_kernel(node, 1.0, 0.0),
                               rtol=1e-5, atol=1e-5)
    # instance-wise weights: w(x) = β·mean_j cos(e(x), e(x_j))
    rng = np.random.default_rng(3)
    emb, ref = rng.normal(size=(4, 6)), rng.normal(size=(5, 6))
    w = fl.feddpa_weight(jnp.asarray(emb, jnp.float32), jnp.asarray(ref, jnp.float32), beta=0.5)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        ref / np.linalg.norm(ref, axis=1, keepdims=True)).T
    np.testing.assert_allclose(w, 0.5 * cos.mean(1), rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(4, 3, IN)).astype(np.float32)
    for branch, wg in (("global", f64(w)), ("local", 1 - f64(w))):
        t = fl.feddpa_set_weight(tree, w, branch=branch)
        y = jlora.linen.apply(nn.Dense(OUT), {"params": t["dense"]}, jnp.asarray(x))
        want = np.stack([f64(x[i]) @ ref_kernel(node, wg[i], 1 - wg[i]) for i in range(4)])
        np.testing.assert_allclose(y, want + f64(tree["dense"]["bias"]), rtol=1e-4, atol=1e-4)
    assert np.isnan(jlora.merge(fl.feddpa_set_weight(tree, w))["dense"]["kernel"]).all()
    with pytest.raises(ValueError, match="branch"):
        fl.feddpa_set_weight(tree, 0.5, branch="both")


def test_pfedlora_phase_partition():
    params = {"enc": {"kernel": jnp.ones((6, 6))}, "mine": {"kernel": jnp.ones((6, 6))},
              "head": {"kernel": jnp.zeros((6, 2))}}
    spec = jlora.Spec({"{enc,mine}/kernel": jlora.LoRA(rank=2), "head/kernel": jlora.Full()})
    t, _ = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    train, hold = fl.pfedlora_phase(t, "personal", paths=["mine/*", "head/*"])
    assert train["enc"]["kernel"] is None and train["head"]["kernel"] is not None
    assert hold["mine"]["kernel"] is None and hold["enc"]["kernel"] is not None
    train2, hold2 = fl.pfedlora_phase(t, "shared", paths=["mine/*", "head/*"])
    jax.tree.map(np.testing.assert_array_equal, train2, hold)
    jax.tree.map(np.testing.assert_array_equal, fl.combine(train, hold), t)
    with pytest.raises(ValueError, match="phase"):
        fl.pfedlora_phase(t, "both", paths="head/*")


def test_branches_draw_independent_dropout_masks():
    """Each branch has its own dropout mask (PEFT's per-adapter lora_dropout)."""
    n_feat = 4
    params = {"dense": {"kernel": jnp.zeros((n_feat, n_feat))}}
    spec = jlora.Spec({"dense/kernel": jlora.PF2LoRA(n_feat, n_feat, dropout=0.5)})
    node = jlora.apply(params, spec, key=jax.random.key(0))["dense"]["kernel"]
    eye = jnp.eye(n_feat)
    node = node.replace(a=eye, b=eye, c=eye, d=2 * eye)  # scales 1: y = m₁/(1−p) + 2·m₂/(1−p)
    x = jnp.ones((2000, n_feat))
    y = jlora.linen.apply(nn.Dense(n_feat, use_bias=False), {"params": {"kernel": node}}, x,
                          dropout_key=jax.random.key(3))
    code = np.asarray(y) * 0.5  # m₁ + 2·m₂ per element
    values, counts = np.unique(np.round(code, 5), return_counts=True)
    np.testing.assert_array_equal(values, [0, 1, 2, 3])
    np.testing.assert_allclose(counts / code.size, 0.25, atol=0.02)  # independent, p = 0.5


def test_per_example_weights_are_one_vector_over_the_examples():
    """A branch weight is a scalar or one weight per example, repeated over each
    example's rows; a weight matrix or a wrong count is refused naming its shape."""
    from jlora.methods.pf2lora import _rows

    y = jnp.zeros((6, 3))  # 2 examples of 3 rows each, flattened
    got = _rows(jnp.asarray([0.25, 0.75]), y, examples=2)
    np.testing.assert_array_equal(np.asarray(got)[:, 0], [0.25] * 3 + [0.75] * 3)
    assert got.shape == (6, 1)
    assert float(_rows(0.5, y)) == 0.5
    with pytest.raises(ValueError, match=r"per-example weights of shape \(2, 1\) for a batch of 2"):
        _rows(jnp.ones((2, 1)), y, examples=2)
    with pytest.raises(ValueError, match=r"per-example weights of shape \(3,\) for a batch of 6"):
        _rows(jnp.ones(3), y)


def test_branches_keep_their_dropout_on_kernels_whose_input_axes_are_not_first():
    """An op the low-rank branches cannot take (``in_axes=(1,)``) still drops each
    branch's input with its own mask, as the leading-axes path does."""
    n_feat, rate = 4, 0.5
    params = {"dense": {"kernel": jnp.zeros((n_feat, n_feat))}}  # (out, in)
    spec = jlora.Spec({"dense/kernel": jlora.PF2LoRA(n_feat, n_feat, dropout=rate,
                                                     in_axes=(1,))})
    node = jlora.apply(params, spec, key=jax.random.key(0))["dense"]["kernel"]
    eye = jnp.eye(n_feat)
    node = node.replace(a=eye, b=eye, c=eye, d=2 * eye)  # ΔK = I + 2·I, scales 1
    x = jnp.ones((2000, n_feat))
    op = lambda x, k: jnp.einsum("ti,oi->to", x, k)
    y = node.dot(x, op, dropout_key=jax.random.key(3))
    code = np.asarray(y, np.float64) * (1 - rate)  # m₁ + 2·m₂ per element
    values, counts = np.unique(np.round(code, 5), return_counts=True)
    np.testing.assert_array_equal(values, [0, 1, 2, 3])
    np.testing.assert_allclose(counts / code.size, 0.25, atol=0.02)  # independent, p = 0.5
    np.testing.assert_allclose(node.dot(x, op), 3.0)  # no key: the merged kernel, no dropout
