"""AdaLoRA's SVD-form node vs numpy references (the allocator: tests/optim/test_adalora.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64


def test_node_math_and_identity_at_init():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(10, 7)), jnp.float32)
    cfg = jlora.AdaLoRA(init_rank=5, target_rank=2, alpha=10)
    node = jlora.apply({"k": w}, jlora.Spec({"k": cfg}), key=jax.random.key(0))["k"]
    np.testing.assert_array_equal(np.asarray(node.lam), 0.0)
    np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(w))
    assert f64(node.p).std() == pytest.approx(0.02, rel=0.3)
    node = node.replace(lam=jnp.arange(1.0, 6.0))
    ref = f64(w) + (10 / 5) * (f64(node.p) * f64(node.lam)) @ f64(node.q)
    np.testing.assert_allclose(f64(node.materialize()), ref, rtol=1e-5, atol=1e-6)
    trainable, _ = jlora.split({"k": node})
    assert jlora.count_trainable(trainable) == 10 * 5 + 5 + 5 * 7
    with pytest.raises(ValueError, match="target_rank"):
        jlora.AdaLoRA(init_rank=4, target_rank=5)


def test_fast_path_matches_merged():
    model = nn.Dense(7)
    x = jax.random.normal(jax.random.key(0), (3, 10))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.AdaLoRA(init_rank=4, target_rank=2)}),
                          key=jax.random.key(2))
    adapted["kernel"] = adapted["kernel"].replace(lam=jnp.array([1.0, -2.0, 0.5, 3.0]))
    np.testing.assert_allclose(jlora.linen.apply(model, {"params": adapted}, x),
                               model.apply({"params": jlora.merge(adapted)}, x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- dropout


def _dropped(x, key, rate):
    """float64 inverted dropout of ``x`` with the mask of LoRA's formula:
    ``keep ~ Bernoulli(1 − rate)`` drawn by ``jax.random.bernoulli(key, 1 − rate, x.shape)``."""
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, x.shape))
    return np.where(keep, f64(x) / (1.0 - rate), 0.0)


def _adalora_node(w, *, seed, **options):
    node = jlora.apply({"w": w}, jlora.Spec({"w": jlora.AdaLoRA(**options)}),
                       key=jax.random.key(seed))["w"]
    rng = np.random.default_rng(seed)
    return node.replace(lam=jnp.asarray(rng.normal(size=node.lam.shape), jnp.float32),
                        p=jnp.asarray(0.5 * rng.normal(size=node.p.shape), jnp.float32),
                        q=jnp.asarray(0.5 * rng.normal(size=node.q.shape), jnp.float32))


def test_adalora_dropout_on_the_fast_path():
    """``y = x·K0 + s·((drop(x)·p)·diag(λ))·q``: dropout only with a key and a rate > 0."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    op = lambda x, k: x @ k
    key = jax.random.key(11)
    options = dict(init_rank=4, target_rank=2, alpha=6.0)
    plain = _adalora_node(w, seed=0, **options)
    drop = _adalora_node(w, seed=0, dropout=0.5, **options)
    assert plain.config.dropout == 0.0
    s = 6.0 / 4
    ref = lambda xin: f64(x) @ f64(w) + s * ((xin @ f64(plain.p)) * f64(plain.lam)) @ f64(plain.q)
    # no key, or rate 0: the key-free path, unchanged
    np.testing.assert_allclose(f64(plain.dot(x, op)), ref(f64(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(plain.dot(x, op, dropout_key=key), plain.dot(x, op))
    np.testing.assert_array_equal(drop.dot(x, op), plain.dot(x, op))
    # with a key: the adapter branch sees drop(x), the base x
    got = f64(drop.dot(x, op, dropout_key=key))
    np.testing.assert_allclose(got, ref(_dropped(x, key, 0.5)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, ref(f64(x)), atol=1e-3)  # the mask did act
    # the same mask as LoRA's dropout: LoRA with a = p·diag(λ), b = q gives the same output
    lora = jlora.apply({"w": w}, jlora.Spec({"w": jlora.LoRA(rank=4, alpha=6.0, dropout=0.5)}),
                       key=jax.random.key(0))["w"]
    lora = lora.replace(a=drop.p * drop.lam, b=drop.q)
    np.testing.assert_allclose(got, f64(lora.dot(x, op, dropout_key=key)), rtol=1e-5, atol=1e-5)


def test_adalora_dropout_on_a_kernel_whose_inputs_do_not_lead():
    """An ``(out, in)`` kernel (``in_axes=(1,)``, PEFT's fan_in_fan_out) runs the merged path
    without a key and ``x·K0 + drop(x)·ΔK`` with one."""
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)  # (out, in)
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    op = lambda x, k: jnp.einsum("ti,oi->to", x, k)
    key = jax.random.key(7)
    node = _adalora_node(w, seed=1, init_rank=3, target_rank=1, alpha=2.0, dropout=0.25,
                         in_axes=(1,))
    delta = 2.0 / 3 * (f64(node.p) * f64(node.lam)) @ f64(node.q)  # (in, out)
    np.testing.assert_allclose(f64(node.dot(x, op)), f64(x) @ (f64(w).T + delta),
                               rtol=1e-5, atol=1e-5)
    want = f64(x) @ f64(w).T + _dropped(x, key, 0.25) @ delta
    np.testing.assert_allclose(f64(node.dot(x, op, dropout_key=key)), want, rtol=1e-5, atol=1e-5)


def test_adalora_dropout_option_is_checked():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"AdaLoRA: dropout must be"):
            jlora.AdaLoRA(init_rank=4, target_rank=2, dropout=bad)
