"""FedDPA nodes: the mixing weight's precision and where per-example weights apply."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import federated as fl

IN, OUT, B, T = 6, 5, 4, 8


def f64(x):
    return np.asarray(x, np.float64)


def node(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    params = {"d": {"kernel": jnp.asarray(rng.normal(size=(IN, OUT)), dtype)}}
    n = jlora.apply(params, jlora.Spec({"d/kernel": jlora.FedDPA(2, 2, alpha=4, dtype=dtype)}),
                    key=jax.random.key(seed))["d"]["kernel"]
    rnd = lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
    return n.replace(a=rnd(n.a), b=rnd(n.b), c=rnd(n.c), d=rnd(n.d))


def ref_kernel(n, w):
    return (f64(n.base) + w * n.scale * f64(n.a) @ f64(n.b)
            + (1 - w) * n.personal_scale * f64(n.c) @ f64(n.d))


def test_weight_is_kept_in_the_factors_precision():
    with jax.enable_x64(True):
        n = node(jnp.float64)
        assert n.weight.dtype == jnp.float64
        n = fl.feddpa_set_weight({"k": n}, 0.3)["k"]
        assert n.weight.dtype == jnp.float64
        np.testing.assert_allclose(jlora.merge({"k": n})["k"], ref_kernel(n, 0.3), rtol=1e-13,
                                   atol=1e-13)
        x = np.random.default_rng(1).normal(size=(B, IN))
        w = np.array([0.1, 0.4, 0.7, 0.3])
        nw = fl.feddpa_set_weight({"k": n}, jnp.asarray(w))["k"]
        y = jlora.linen.apply(nn.Dense(OUT, use_bias=False, param_dtype=jnp.float64),
                              {"params": {"kernel": nw}}, jnp.asarray(x))
        want = np.stack([x[i] @ ref_kernel(n, w[i]) for i in range(B)])
        np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-13)


def test_per_example_weights_follow_the_batch_axis_only():
    n = node()
    w = jnp.asarray([0.1, 0.4, 0.7, 1.0])
    nw = fl.feddpa_set_weight({"k": n}, w)["k"]
    x = np.random.default_rng(2).normal(size=(B, T, IN)).astype(np.float32)
    dense = nn.Dense(OUT, use_bias=False)
    want = np.stack([f64(x[i]) @ ref_kernel(n, float(w[i])) for i in range(B)])
    y = jlora.linen.apply(dense, {"params": {"kernel": nw}}, jnp.asarray(x))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # per example under vmap (T = 8 rows, a multiple of the 4 weights): an error, not a
    # silent spread of the weights over tokens
    with pytest.raises(ValueError, match="per-example weights of shape \\(4,\\) for a batch of 8"):
        jax.vmap(lambda xi: jlora.linen.apply(dense, {"params": {"kernel": nw}}, xi))(
            jnp.asarray(x))
    # vmapping the weight along with the examples gives each example its scalar
    y2 = jax.vmap(lambda xi, wi: jlora.linen.apply(
        dense, {"params": {"kernel": nw.replace(weight=wi)}}, xi))(jnp.asarray(x), w)
    np.testing.assert_allclose(y2, want, rtol=1e-5, atol=1e-5)
    # one unbatched sequence: 1 example, 4 weights
    with pytest.raises(ValueError, match="for a batch of 1 examples"):
        jlora.linen.apply(dense, {"params": {"kernel": nw}}, jnp.asarray(x[0, 0]))
