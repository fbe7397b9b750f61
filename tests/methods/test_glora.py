"""GLoRA's layer math against float64 numpy references written from the official-code form
(docs/methods.md); the supernet sampling and search: tests/optim/test_glora.py."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64
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
    adapted = jlora.optim.glora_fix(randomize(adapted), {"fc": codes})
    merged = jlora.merge(adapted)
    kn, bn = adapted["fc"]["kernel"], adapted["fc"]["bias"]
    k_ref, b_ref = ref(params["fc"]["kernel"], params["fc"]["bias"], kn, bn, codes, (R,) * 5)
    np.testing.assert_allclose(f64(merged["fc"]["kernel"]), k_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(merged["fc"]["bias"]), b_ref, rtol=1e-5, atol=1e-5)


def test_identity_at_init_for_every_configuration():
    params, adapted = layer()
    fixed = jax.jit(lambda t, c: jlora.merge(jlora.optim.glora_fix(t, {"fc": c})))
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


def test_config_and_apply_errors():
    with pytest.raises(ValueError, match="not one of"):
        jlora.GLoRA(d="lowrank:2")
    with pytest.raises(ValueError, match="needs the layer's bias"):
        jlora.apply({"fc": {"kernel": jnp.ones((6, 5))}}, jlora.Spec({"fc/kernel": jlora.GLoRA(rank=2)}),
                    key=jax.random.key(0))
