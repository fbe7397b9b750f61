"""GLoRA's training tools (jlora/optim/_glora.py): supernet sampling, fixing a configuration,
parameter counts and the evolutionary search."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.methods.glora import ALLOWED, SUPPORTS

IN, OUT, R = 6, 5, 3


def layer(config=None, seed=0):
    rng = np.random.default_rng(seed)
    params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(IN, OUT)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=OUT), jnp.float32)}}
    return params, jlora.apply(params, jlora.Spec({"fc/kernel": config or jlora.GLoRA(rank=R)}),
                               key=jax.random.key(seed))


def test_parameter_counts_follow_the_paper():
    params, adapted = layer(jlora.GLoRA(a="lowrank:2", b="vector", c="lowrank:3", d="scalar",
                                        e="none", rank=3))
    # A: 2·(6+5); B: 5; C: 3·(6+1); D: 1; E: 0
    assert jlora.optim.glora_param_count(adapted, jlora.optim.glora_current(adapted)) == 22 + 5 + 21 + 1
    assert jlora.optim.glora_param_count(adapted, {"fc": (0, 0, 0, 0, 0)}) == 0


def test_supernet_sampling_inside_jit_without_retracing():
    params, adapted = layer()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(tree, key):
        tree = jlora.optim.glora_sample(key, tree)
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

    res = jlora.optim.glora_search(evaluate, adapted, seed=0, max_params=budget)
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
        fr = jlora.optim.glora_sample(key, frozen)
        loss, g = jax.value_and_grad(lambda t: jnp.mean(
            (jlora.linen.apply(model, {"params": jlora.combine(t, fr)}, x) - y) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    def eval_loss(t, codes):
        p = jlora.combine(t, jlora.optim.glora_fix(frozen, {"": codes}))
        return float(jnp.mean((model.apply({"params": jlora.merge(p)}, x) - y) ** 2))

    before = eval_loss(trainable, (3, 3, 3, 2, 2))
    for i in range(150):
        trainable, opt, _ = step(trainable, opt, jax.random.key(i))
    assert eval_loss(trainable, (3, 3, 3, 2, 2)) < 0.5 * before


def test_search_reports_each_generation_through_the_callback():
    _, adapted = layer()
    seen = []
    res = jlora.optim.glora_search(lambda c: float(sum(c["fc"])), adapted, seed=1, population=6,
                                   generations=4, parents=2, mutants=3, crossovers=3,
                                   callback=lambda g, best: seen.append((g, best)))
    assert seen == list(enumerate(res.history)) and len(seen) == 4


@pytest.mark.parametrize("kwargs, option", [
    (dict(population=0), "population"), (dict(generations=2.0), "generations"),
    (dict(parents=True), "parents"), (dict(mutants=-1), "mutants"),
    (dict(crossovers=None), "crossovers"), (dict(p_mutate=1.5), "p_mutate"),
    (dict(p_mutate=float("nan")), "p_mutate"), (dict(seed=-3), "seed"),
    (dict(max_params=-1), "max_params"), (dict(callback=True), "callback"),
])
def test_search_refuses_bad_options(kwargs, option):
    _, adapted = layer()
    with pytest.raises(ValueError, match=f"jlora.optim.glora_search: {option} must be"):
        jlora.optim.glora_search(lambda c: 0.0, adapted, **kwargs)
    with pytest.raises(ValueError, match="jlora.optim.glora_search: evaluate must be callable"):
        jlora.optim.glora_search(None, adapted)


@pytest.mark.parametrize("codes, what", [
    ((3, 3, 3, 2), "5 integer codes"), ((3, 3, 3, 2, 2.0), "5 integer codes"),
    ((3, 3, 1, 2, 2), "c=1 is not one of"), ((3, 3, 3, 2, 7), "e=7 is not one of"),
    ((3, -1, 3, 2, 2), "b=-1 is not one of"),
])
def test_fix_refuses_bad_codes(codes, what):
    _, adapted = layer()
    with pytest.raises(ValueError, match=f"jlora.optim.glora_fix: layer 'fc': .*{what}"):
        jlora.optim.glora_fix(adapted, {"fc": codes})
    with pytest.raises(ValueError, match="jlora.optim.glora_fix: no configuration for layer 'fc'"):
        jlora.optim.glora_fix(adapted, {})


def test_bias_free_layers_never_draw_or_count_c_d_e():
    params = {"fc": {"kernel": jnp.ones((IN, OUT))}}
    config = jlora.GLoRA(rank=R, c="none", d="none", e="none")  # the supernet of a bias-free layer
    adapted = jlora.apply(params, jlora.Spec({"fc/kernel": config}), key=jax.random.key(0))
    # c, d, e act on the bias: without one, (3, 3, 3, 2, 2) trains what (3, 3, 0, 0, 0) does
    assert jlora.optim.glora_param_count(adapted, {"fc": (3, 3, 3, 2, 2)}) == 2 * R * (IN + OUT)
    for i in range(8):
        drawn = jlora.optim.glora_sample(jax.random.key(i), adapted)
        assert tuple(int(c) for c in drawn["fc"]["kernel"].choice)[2:] == (0, 0, 0)
    res = jlora.optim.glora_search(lambda c: float(sum(c["fc"])), adapted, generations=3)
    assert res.best["fc"][2:] == (0, 0, 0) and res.best["fc"][:2] == (3, 3)
    with pytest.raises(ValueError, match="glora_param_count: no configuration for layer 'fc'"):
        jlora.optim.glora_param_count(adapted, {})
    with pytest.raises(ValueError, match=r"glora_param_count: layer 'fc': c=1 is not one of"):
        jlora.optim.glora_param_count(adapted, {"fc": (0, 0, 1, 0, 0)})


@pytest.mark.parametrize("bias_shape", [(OUT - 1,), (OUT, 1)])
def test_a_bias_of_the_wrong_shape_is_refused_at_apply(bias_shape):
    params = {"fc": {"kernel": jnp.ones((IN, OUT)), "bias": jnp.zeros(bias_shape)}}
    with pytest.raises(ValueError, match=rf"fc/bias: GLoRA needs the layer's bias of shape \({OUT},\)"):
        jlora.apply(params, jlora.Spec({"fc/kernel": jlora.GLoRA(rank=R)}), key=jax.random.key(0))
