"""LoRA math and inits against float64 numpy references written from the papers (Hu et al. 2021; PiSSA, Meng et al. 2024; OLoRA)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64, lora_merged_ref, perturb

RNG = np.random.default_rng(0)
K_IN, K_OUT = 24, 16


def leaf(shape=(K_IN, K_OUT), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def adapt_one(config, w=None, name="kernel", key=0):
    w = leaf() if w is None else w
    params = {"layer": {name: w}}
    out = jlora.apply(params, jlora.Spec({f"layer/{name}": config}), key=jax.random.key(key))
    return w, out["layer"][name]


@pytest.mark.parametrize("rank,alpha,rslora,expected", [
    (8, 16, False, 2.0), (8, 16, True, 16 / math.sqrt(8)), (4, None, False, 1.0),
    (16, None, True, 4.0),
])
def test_scale(rank, alpha, rslora, expected):
    assert jlora.LoRA(rank=rank, alpha=alpha, rslora=rslora).scale == pytest.approx(expected)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_reference(init, rslora):
    cfg = jlora.LoRA(rank=4, alpha=8, init=init, rslora=rslora)
    w, node = adapt_one(cfg)
    # b = 0: the model is unchanged at init
    np.testing.assert_array_equal(np.asarray(node.b), 0.0)
    np.testing.assert_allclose(np.asarray(jlora.merge(node)), f64(w), atol=0)
    node = perturb({"n": node})["n"]
    s = 8 / (math.sqrt(4) if rslora else 4)
    ref = lora_merged_ref(w, node.a, node.b, s)
    np.testing.assert_allclose(np.asarray(node.materialize()), ref, rtol=1e-5, atol=1e-5)


def test_kaiming_bound_and_gaussian_std():
    _, node = adapt_one(jlora.LoRA(rank=8, init="kaiming"), w=leaf((400, 300)))
    a = f64(node.a)
    bound = 1 / math.sqrt(400)
    assert a.max() <= bound and a.min() >= -bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform std
    _, node = adapt_one(jlora.LoRA(rank=8, init="gaussian"), w=leaf((400, 300)))
    assert f64(node.a).std() == pytest.approx(1 / 8, rel=0.05)
    assert abs(f64(node.a).mean()) < 0.01


def test_embedding_roles_are_swapped():
    _, node = adapt_one(jlora.LoRA(rank=4), w=leaf((50, 8)), name="embedding")
    np.testing.assert_array_equal(np.asarray(node.a), 0.0)
    assert f64(node.b).std() == pytest.approx(1.0, rel=0.3)


def test_pissa_matches_numpy_svd():
    w = leaf((K_IN, K_OUT))
    cfg = jlora.LoRA(rank=4, alpha=8, init="pissa")
    _, node = adapt_one(cfg, w)
    s = cfg.scale
    u, sv, vt = np.linalg.svd(f64(w), full_matrices=False)
    # top-r part of K0 lives in s·a·b, the residual in the base
    principal = (u[:, :4] * sv[:4]) @ vt[:4]
    np.testing.assert_allclose(s * f64(node.a) @ f64(node.b), principal, atol=1e-4)
    np.testing.assert_allclose(f64(node.base), f64(w) - principal, atol=1e-4)
    # a = U_r·diag(√(S_r/s)) up to the sign of each singular pair
    np.testing.assert_allclose(np.abs(f64(node.a)), np.abs(u[:, :4] * np.sqrt(sv[:4] / s)), atol=1e-4)
    np.testing.assert_allclose(np.abs(f64(node.b)), np.abs(np.sqrt(sv[:4] / s)[:, None] * vt[:4]), atol=1e-4)
    # merged weight equals the original at init; the delta against it is zero
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-5)
    np.testing.assert_allclose(f64(node.delta()), 0.0, atol=1e-6)


def test_pissa_fast_recovers_the_top_subspace():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(96, 96)))
    v, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    sv = np.concatenate([np.linspace(10, 5, 6), 0.01 * np.ones(58)])
    w = (u[:, :64] * sv) @ v.T
    _, exact = adapt_one(jlora.LoRA(rank=6, init="pissa"), jnp.asarray(w, jnp.float32))
    _, fast = adapt_one(jlora.LoRA(rank=6, init="pissa_fast", niter=4), jnp.asarray(w, jnp.float32))
    principal = (u[:, :6] * sv[:6]) @ v[:, :6].T
    for node in (exact, fast):
        np.testing.assert_allclose(f64(node.a) @ f64(node.b), principal, atol=1e-3)
        np.testing.assert_allclose(f64(node.materialize()), w, atol=1e-4)


def test_olora_matches_numpy_qr():
    w = leaf((K_IN, K_OUT))
    cfg = jlora.LoRA(rank=4, alpha=4, init="olora")
    _, node = adapt_one(cfg, w)
    q, r = np.linalg.qr(f64(w).T)  # PyTorch orientation (out, in)
    # B = Q[:, :r], A = R[:r]; in jlora a = Aᵀ, b = Bᵀ (signs are LAPACK's in both)
    np.testing.assert_allclose(f64(node.a) @ f64(node.b), (q[:, :4] @ r[:4]).T, atol=1e-4)
    np.testing.assert_allclose(f64(node.b) @ f64(node.b).T, np.eye(4), atol=1e-5)  # orthonormal
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-5)


def test_pissa_delta_is_against_the_original_weight():
    w = leaf()
    _, node = adapt_one(jlora.LoRA(rank=3, alpha=6, init="pissa"), w)
    node = perturb({"n": node})["n"]
    s = 2.0
    ref = s * (f64(node.a) @ f64(node.b) - f64(node.a0) @ f64(node.b0))
    np.testing.assert_allclose(f64(node.delta()), ref, atol=1e-5)
    np.testing.assert_allclose(f64(node.materialize()), f64(w) + ref, atol=1e-4)


def test_in_axes_for_three_dimensional_kernels():
    w = leaf((6, 4, 5))  # e.g. (features, heads, head_dim)
    cfg = jlora.LoRA(rank=3, alpha=3, in_axes=(0,))
    _, node = adapt_one(cfg, w)
    assert node.a.shape == (6, 3) and node.b.shape == (3, 20)
    node = perturb({"n": node})["n"]
    ref = lora_merged_ref(w, node.a, node.b, 1.0, in_axes=(0,))
    np.testing.assert_allclose(f64(node.materialize()), ref, atol=1e-5)
    # an output-side kernel (heads, head_dim, features) with two input axes
    cfg = jlora.LoRA(rank=3, in_axes=(0, 1))
    w2 = leaf((4, 5, 6))
    _, node = adapt_one(cfg, w2)
    assert node.a.shape == (20, 3) and node.b.shape == (3, 6)
    # non-leading input axes are allowed too
    cfg = jlora.LoRA(rank=2, in_axes=(1,))
    _, node = adapt_one(cfg, w2)
    node = perturb({"n": node})["n"]
    assert node.a.shape == (5, 2) and node.b.shape == (2, 24)
    ref = lora_merged_ref(w2, node.a, node.b, 1.0, in_axes=(1,))
    np.testing.assert_allclose(f64(node.materialize()), ref, atol=1e-5)


def test_conv_kernel_fan_in_is_hwi():
    w = leaf((3, 3, 4, 8))
    _, node = adapt_one(jlora.LoRA(rank=2), w)
    assert node.a.shape == (36, 2) and node.b.shape == (2, 8)


def test_bf16_base_keeps_f32_factors():
    w = leaf().astype(jnp.bfloat16)
    _, node = adapt_one(jlora.LoRA(rank=4), w)
    assert node.base.dtype == jnp.bfloat16
    assert node.a.dtype == jnp.float32 and node.b.dtype == jnp.float32
    assert node.materialize().dtype == jnp.bfloat16
    _, node = adapt_one(jlora.LoRA(rank=4, dtype=jnp.bfloat16), w)
    assert node.a.dtype == jnp.bfloat16


def test_lora_fa_trains_only_b():
    _, node = adapt_one(jlora.LoRA(rank=4, train_a=False))
    trainable, frozen = jlora.split({"n": node})
    assert trainable["n"].a is None and trainable["n"].b is not None
    assert frozen["n"].a is not None and frozen["n"].b is None
    assert jlora.count_trainable(trainable) == 4 * K_OUT


def test_inits_are_seeded_and_per_path():
    w = leaf()
    params = {"x": {"kernel": w}, "y": {"kernel": w}}
    spec = jlora.Spec({"**/kernel": jlora.LoRA(rank=2)})
    one = jlora.apply(params, spec, key=jax.random.key(3))
    two = jlora.apply(params, spec, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(one["x"]["kernel"].a), np.asarray(two["x"]["kernel"].a))
    assert not np.allclose(np.asarray(one["x"]["kernel"].a), np.asarray(one["y"]["kernel"].a))
    # adding a rule for another leaf does not change this leaf's init
    params["z"] = {"kernel": w}
    three = jlora.apply(params, jlora.Spec({"{x,z}/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(one["x"]["kernel"].a), np.asarray(three["x"]["kernel"].a))


def test_bf16_factors_merge_onto_a_float32_base_without_rounding_it():
    w = leaf()  # float32
    _, node = adapt_one(jlora.LoRA(rank=4, dtype=jnp.bfloat16), w)
    rng = np.random.default_rng(1)
    node = node.replace(a=jnp.asarray(rng.normal(size=node.a.shape), jnp.bfloat16),
                        b=jnp.asarray(rng.normal(size=node.b.shape), jnp.bfloat16))
    want = f64(node.base) + node.scale * f64(node.a) @ f64(node.b)
    merged = node.materialize()
    assert merged.dtype == jnp.float32
    np.testing.assert_allclose(f64(merged), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_delta_of_a_moved_initial_adapter_keeps_its_digits(init):
    """``s·(a·b − a0·b0)`` subtracts two large products: each must not round to bf16 first."""
    _, node = adapt_one(jlora.LoRA(rank=4, init=init, dtype=jnp.bfloat16))
    rng = np.random.default_rng(2)
    node = node.replace(
        a=(f64(node.a) + 0.01 * rng.normal(size=node.a.shape)).astype(jnp.bfloat16),
        b=(f64(node.b) + 0.01 * rng.normal(size=node.b.shape)).astype(jnp.bfloat16))
    want = node.scale * (f64(node.a) @ f64(node.b) - f64(node.a0) @ f64(node.b0))
    got = node.delta()
    assert got.dtype == jnp.bfloat16
    # one bf16 rounding of the result (2^-8 relative), not of the products (0.15 before)
    np.testing.assert_allclose(f64(got), want, rtol=2 ** -8, atol=2 ** -8 * np.abs(want).max())


def test_dropout_on_a_kernel_whose_inputs_do_not_lead():
    """A ``(out, in)`` kernel (in_axes=(1,)) takes the merged path; dropout still reaches the
    adapter branch: ``y = x·K0 + s·drop(x)·(a·b)`` with K0 read as ``(in, out)``."""
    from jlora.methods.base import branch_dropout

    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)  # (out, in)
    node = jlora.apply({"w": w}, jlora.Spec({"w": jlora.LoRA(rank=2, alpha=4, dropout=0.5,
                                                               in_axes=(1,))}),
                       key=jax.random.key(0))["w"]
    node = node.replace(b=jnp.asarray(rng.normal(size=node.b.shape), jnp.float32))
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    op = lambda x, k: jnp.einsum("ti,oi->to", x, k)
    key = jax.random.key(7)
    got = node.dot(x, op, dropout_key=key)
    dropped = f64(branch_dropout(x, key, 0.5))
    want = f64(x) @ f64(w).T + node.scale * dropped @ (f64(node.a) @ f64(node.b))
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f64(got), f64(node.dot(x, op)), atol=1e-3)  # the mask did act
