"""GLoRA against float64 numpy references written from ALGORITHMS.md (official-code form)."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import f64
from jlora.methods.glora import ALLOWED, SUPPORTS

IN, OUT, R = 6, 5, 3


def layer(config=None, seed=0):
    rng = np.random.default_rng(seed)
    params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(IN, OUT)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=OUT), jnp.float32)}}
    config = config or jlora.GLoRA(rank=R)
    return params, jlora.apply(params, jlora.Spec({"fc/kernel": config}), key=jax.random.key(seed))


def randomize(adapted, seed=1):
    """Fill every support tensor (including the zero-initialised ones) with random values."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))

    def fill(x):
        if not jlora.is_node(x):
            return x
        return x.replace(**{f: jax.random.normal(next(keys), getattr(x, f).shape)
                            for f in x.trainable})

    return jax.tree.map(fill, adapted, is_leaf=jlora.is_node)


def ref(k0, b0, kn, bn, codes, ranks):
    """K' = K0 + K0⊙A + B,  b' = b0 + b0⊙D + E + C·K0, each support from its slices."""
    k0, b0 = f64(k0), f64(b0)

    def ab(form, u, d, r):
        u, d = f64(u), f64(d)
        return {0: np.zeros((IN, OUT)), 1: np.full((IN, OUT), d[0, 0]),
                2: np.broadcast_to(d[0], (IN, OUT)), 3: u[:, :r] @ d[:r]}[form]

    A = ab(codes[0], kn.a_u, kn.a_d, ranks[0])
    B = ab(codes[1], kn.b_u, kn.b_d, ranks[1])
    cd, cu = f64(bn.c_d), f64(bn.c_u)
    C = {0: np.zeros(IN), 2: cd[:, 0], 3: (cd[:, :ranks[2]] @ cu[:ranks[2]])[:, 0]}[codes[2]]
    vs = lambda form, v: {0: np.zeros(OUT), 1: np.full(OUT, f64(v)[0]), 2: f64(v)}[form]
    D, E = vs(codes[3], bn.d), vs(codes[4], bn.e)
    return k0 + k0 * A + B, b0 + b0 * D + E + C @ k0


ALL = list(itertools.product(*(ALLOWED[s] for s in SUPPORTS)))
assert len(ALL) == 432


@pytest.mark.parametrize("codes", ALL[::37] + [ALL[-1]])
def test_merged_weight_and_bias_match_reference(codes):
    params, adapted = layer()
    adapted = jlora.glora.fix(randomize(adapted), {"fc": codes})
    merged = jlora.merge(adapted)
    kn, bn = adapted["fc"]["kernel"], adapted["fc"]["bias"]
    k_ref, b_ref = ref(params["fc"]["kernel"], params["fc"]["bias"], kn, bn, codes, (R,) * 5)
    np.testing.assert_allclose(f64(merged["fc"]["kernel"]), k_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(merged["fc"]["bias"]), b_ref, rtol=1e-5, atol=1e-5)


def test_identity_at_init_for_every_configuration():
    params, adapted = layer()
    fixed = jax.jit(lambda t, c: jlora.merge(jlora.glora.fix(t, {"fc": c})))
    for codes in ALL[::7]:
        merged = fixed(adapted, codes)
        np.testing.assert_array_equal(np.asarray(merged["fc"]["kernel"]), np.asarray(params["fc"]["kernel"]))
        np.testing.assert_array_equal(np.asarray(merged["fc"]["bias"]), np.asarray(params["fc"]["bias"]))


def test_forward_fast_path_equals_merged_and_numpy():
    model = nn.Dense(OUT)
    x = jax.random.normal(jax.random.key(0), (4, IN))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = randomize(jlora.apply(params, jlora.Spec({"kernel": jlora.GLoRA(rank=R)}),
                                    key=jax.random.key(2)))
    y = jlora.linen.apply(model, {"params": adapted}, x)
    kn, bn = adapted["kernel"], adapted["bias"]
    k_ref, b_ref = ref(params["kernel"], params["bias"], kn, bn, (3, 3, 3, 2, 2), (R,) * 5)
    np.testing.assert_allclose(f64(y), f64(x) @ k_ref + b_ref, rtol=1e-5, atol=1e-5)


def test_parameter_counts_follow_the_paper():
    params, adapted = layer(jlora.GLoRA(a="lowrank:2", b="vector", c="lowrank:3", d="scalar",
                                        e="none", rank=3))
    # A: 2·(6+5); B: 5; C: 3·(6+1); D: 1; E: 0
    assert jlora.glora.param_count(adapted, jlora.glora.current(adapted)) == 22 + 5 + 21 + 1
    assert jlora.glora.param_count(adapted, {"fc": (0, 0, 0, 0, 0)}) == 0
    with pytest.raises(ValueError, match="not one of"):
        jlora.GLoRA(d="lowrank:2")
    with pytest.raises(ValueError, match="needs the layer's bias"):
        jlora.apply({"fc": {"kernel": jnp.ones((6, 5))}}, jlora.Spec({"fc/kernel": jlora.GLoRA(rank=2)}),
                    key=jax.random.key(0))


def test_supernet_sampling_inside_jit_without_retracing():
    params, adapted = layer()
    adapted = randomize(adapted)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(tree, key):
        tree = jlora.glora.sample(key, tree)
        return jlora.merge(tree), tree["fc"]["kernel"].choice, tree["fc"]["bias"].choice

    seen = set()
    for i in range(12):
        _, ck, cb = forward(adapted, jax.random.key(i))
        np.testing.assert_array_equal(ck, cb)  # kernel and bias agree on the layer's choice
        assert all(int(c) in ALLOWED[s] for s, c in zip(SUPPORTS, ck))
        seen.add(tuple(int(c) for c in ck))
    assert len(seen) > 6


def test_search_finds_the_best_configuration_under_a_budget():
    params = {f"l{i}": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)} for i in range(3)}
    adapted = jlora.apply(params, jlora.Spec({"*/kernel": jlora.GLoRA(rank=2)}), key=jax.random.key(0))
    budget = 3 * (2 * 16 + 8)  # room for lowrank A and a vector E in every layer, not more

    def evaluate(choices):  # a known optimum: A lowrank and E vector everywhere, the rest none
        score = 0.0
        for c in choices.values():
            score += (c[0] == 3) + (c[4] == 2) - 0.1 * sum(x != 0 for x in c[1:4])
        return score

    res = jlora.glora.search(evaluate, adapted, seed=0, progress=False, max_params=budget)
    assert res.best == {f"l{i}": (3, 0, 0, 0, 2) for i in range(3)}
    assert res.fitness == pytest.approx(6.0) and res.params <= budget
    assert res.history == sorted(res.history) and len(res.history) == 20


def test_supernet_training_lowers_the_loss():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = x[:, :4] * 1.5 + 0.3
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.GLoRA(rank=2)}), key=jax.random.key(2))
    trainable, frozen = jlora.split(adapted)
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt, key):
        fr = jlora.glora.sample(key, frozen)
        loss, g = jax.value_and_grad(lambda t: jnp.mean(
            (jlora.linen.apply(model, {"params": jlora.combine(t, fr)}, x) - y) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    def eval_loss(t, codes):
        p = jlora.combine(t, jlora.glora.fix(frozen, {"": codes}))
        return float(jnp.mean((model.apply({"params": jlora.merge(p)}, x) - y) ** 2))

    before = eval_loss(trainable, (3, 3, 3, 2, 2))
    for i in range(150):
        trainable, opt, _ = step(trainable, opt, jax.random.key(i))
    assert eval_loss(trainable, (3, 3, 3, 2, 2)) < 0.5 * before
