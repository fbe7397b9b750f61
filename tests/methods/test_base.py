"""The node protocol (jlora/methods/base.py): registry, roles, shared math, option checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.methods.base import (LeafView, _is_trailing_contraction, down_projection, lowrank_dot,
                               lowrank_svd, view_leaf)
from jlora.tree import Role
from tests._refs import f64

NAN, INF = float("nan"), float("inf")


def test_registry_is_derived_from_the_classes():
    reg = jlora.methods.REGISTRY
    for name in ("LoRA", "DoRA", "Full", "VeRA", "AdaLoRA", "GLoRA"):
        config_cls, node_cls = reg[name]
        assert config_cls is getattr(jlora, name)
        assert node_cls is getattr(jlora.methods, name + "Node")
        assert node_cls.method == name
    assert jlora.methods.GLoRABiasNode.method == "GLoRA-bias"


def test_roles_are_typed_at_class_definition():
    assert jlora.methods.LoRANode.field_axes["a"] is Role.IN_RANK
    with pytest.raises(ValueError, match="no sharding role"):
        class NoRole(jlora.AdapterNode):  # noqa: F841
            base: jax.Array
            extra: jax.Array
            field_axes = {"base": Role.BASE}
    with pytest.raises(ValueError, match="names 'c', which is not an array field"):
        class Stray(jlora.AdapterNode):  # noqa: F841
            base: jax.Array
            field_axes = {"base": Role.BASE, "c": Role.OUT}


def test_nodes_are_keyword_only():
    with pytest.raises(TypeError):
        jlora.methods.FullNode(jnp.ones(2), None, (2,), ())


def test_view_leaf_resolves_axes_and_checks_the_rank():
    view = view_leaf(jlora.LoRA(rank=3, in_axes=(0, 2)), jnp.ones((2, 5, 3), jnp.bfloat16), "w")
    assert isinstance(view, LeafView)
    assert (view.in_axes, view.fan_in, view.fan_out, view.shape) == ((0, 2), 6, 5, (2, 5, 3))
    assert view.dtype == jnp.dtype(jnp.float32)  # factors are at least float32
    with pytest.raises(ValueError, match="w: rank 6 exceeds min"):
        view_leaf(jlora.LoRA(rank=6), jnp.ones((5, 8)), "w", rank=6)
    for dtype in (jnp.int32, jnp.bool_):
        with pytest.raises(ValueError, match="layer/w: LoRA needs a floating-point leaf"):
            view_leaf(jlora.LoRA(rank=1), jnp.zeros((4, 4), dtype), "layer/w")


def test_lowrank_svd_against_numpy():
    a = jax.random.normal(jax.random.key(0), (9, 3), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (3, 7), jnp.float32)
    u, s, vt = lowrank_svd(a, b)
    s_ref = np.linalg.svd(f64(a) @ f64(b), compute_uv=False)[:3]
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    np.testing.assert_allclose(f64(u) * f64(s) @ f64(vt), f64(a) @ f64(b), atol=1e-4)
    np.testing.assert_allclose(f64(u).T @ f64(u), np.eye(3), atol=1e-5)
    np.testing.assert_allclose(f64(vt) @ f64(vt).T, np.eye(3), atol=1e-5)


def _ops():
    """Linear ops as jlora's layer handlers build them, and ones that are not plain contractions."""
    import flax.linen as nn
    from flax import nnx

    from jlora.linen import _sub_apply

    dense, dense16 = nn.Dense(3), nn.Dense(3, dtype=jnp.bfloat16)
    general = nn.DenseGeneral(3, axis=(-2, -1))
    lin = nnx.Linear(6, 3, rngs=nnx.Rngs(0))

    def nnx_op(x, k):
        x, k = lin.promote_dtype((x, k), dtype=lin.dtype)
        return lin.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=lin.precision)

    conv = nn.Conv(3, (2,))
    return {
        "linen Dense": (lambda x, k: _sub_apply(dense, k, x, features=3), (7, 6), (6, 3), True),
        "linen Dense bf16": (lambda x, k: _sub_apply(dense16, k, x, features=3), (7, 6), (6, 3), True),
        "linen DenseGeneral 2 in-axes": (lambda x, k: _sub_apply(general, k, x, features=(3,)),
                                         (2, 5, 2, 3), (2, 3, 3), True),
        "nnx Linear": (nnx_op, (7, 6), (6, 3), True),
        "matmul": (lambda x, k: x @ k, (4, 5, 6), (6, 3), True),
        "contraction of leading x axis": (lambda x, k: jnp.einsum("ib,ir->br", x, k), (6, 7), (6, 3), False),
        "scaled": (lambda x, k: 2.0 * (x @ k), (7, 6), (6, 3), False),
        "conv": (lambda x, k: _sub_apply(conv, k, x, features=3), (1, 7, 6), (2, 6, 3), False),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_down_projection_vjp_matches_autodiff_float64(name):
    """The hand-written VJP of the rank-r product (kernel gradient laid out (r, fan_in),
    then transposed) against jax.grad of the plain op, and the op detection."""
    op, x_shape, k_shape, contraction = _ops()[name]
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=x_shape))
        k = jnp.asarray(rng.normal(size=k_shape))
        assert _is_trailing_contraction(op, x, k) is contraction
        cot = jnp.asarray(rng.normal(size=op(x, k).shape))
        ours = jax.grad(lambda x, k: jnp.sum(down_projection(op, x, k) * cot), argnums=(0, 1))(x, k)
        ref = jax.grad(lambda x, k: jnp.sum(op(x, k) * cot), argnums=(0, 1))(x, k)
        np.testing.assert_allclose(down_projection(op, x, k), op(x, k), rtol=1e-12)
        for a, b in zip(ours, ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            tol = 1e-2 if "bf16" in name else 1e-12
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_lora_step_has_no_fan_in_by_rank_gradient_product():
    """XLA:CPU runs Σ_tokens x ⊗ dh laid out (fan_in, r) 1.5-6x slower than (r, fan_in):
    the compiled LoRA gradient computes only the latter (it fails with autodiff's VJP)."""
    import flax.linen as nn
    import re

    model = nn.Dense(256)
    x = jnp.ones((512, 128))
    params = model.init(jax.random.key(0), x)["params"]
    trainable, frozen = jlora.split(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=8)}),
                                                key=jax.random.key(1)))
    loss = lambda t: jnp.sum(jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(trainable).compile().as_text()
    dots = re.findall(r"= (f32\[[\d,]+\]\{[\d,]+\}) dot\(", hlo)
    # da may be emitted as a (128, 8) result in column-major layout: physically (8, 128)
    assert "f32[128,8]{1,0}" not in dots and ("f32[128,8]{0,1}" in dots or "f32[8,128]{1,0}" in dots), dots


def test_lowrank_dot_against_numpy():
    node = jlora.apply({"k": jnp.ones((4, 2, 3))}, jlora.Spec({"k": jlora.LoRA(rank=2, in_axes=(0,))}),
                       key=jax.random.key(0))["k"]
    x = jax.random.normal(jax.random.key(1), (5, 4))
    a = jax.random.normal(jax.random.key(2), (4, 2))
    b = jax.random.normal(jax.random.key(3), (2, 6))
    mid, out = jnp.array([0.5, -2.0]), jnp.arange(6.0)
    op = lambda x, k: jnp.tensordot(x, k, axes=1)
    got = lowrank_dot(x, op, node, a, b, mid=mid, out=out, scale=3.0)
    ref = ((f64(x) @ f64(a)) * f64(mid) * 3.0) @ f64(b) * f64(out)
    np.testing.assert_allclose(got, ref.reshape(5, 2, 3), rtol=1e-5, atol=1e-5)


# (config class, options, the option the error must name)
BAD = [
    (jlora.LoRA, dict(rank=True), "rank"),
    (jlora.LoRA, dict(rank=2.0), "rank"),
    (jlora.LoRA, dict(rank=0), "rank"),
    (jlora.LoRA, dict(rank=2, alpha=NAN), "alpha"),
    (jlora.LoRA, dict(rank=2, alpha=INF), "alpha"),
    (jlora.LoRA, dict(rank=2, alpha=0), "alpha"),
    (jlora.LoRA, dict(rank=2, init="svd"), "init"),
    (jlora.LoRA, dict(rank=2, rslora="no"), "rslora"),
    (jlora.LoRA, dict(rank=2, train_a="no"), "train_a"),
    (jlora.LoRA, dict(rank=2, train_a=1), "train_a"),
    (jlora.LoRA, dict(rank=2, dropout=1.0), "dropout"),
    (jlora.LoRA, dict(rank=2, dropout=NAN), "dropout"),
    (jlora.LoRA, dict(rank=2, dropout=-0.1), "dropout"),
    (jlora.LoRA, dict(rank=2, niter=-1), "niter"),
    (jlora.LoRA, dict(rank=2, dtype="int32"), "dtype"),
    (jlora.LoRA, dict(rank=2, dtype="nope"), "dtype"),
    (jlora.LoRA, dict(rank=2, in_axes=("a",)), "in_axes"),
    (jlora.LoRA, dict(rank=2, in_axes=(True,)), "in_axes"),
    (jlora.DoRA, dict(rank=2, detach_norm="yes"), "detach_norm"),
    (jlora.DoRA, dict(rank=-1), "rank"),
    (jlora.AdaLoRA, dict(init_rank=0), "init_rank"),
    (jlora.AdaLoRA, dict(init_rank=4, target_rank=5), "target_rank"),
    (jlora.AdaLoRA, dict(target_rank=-1), "target_rank"),
    (jlora.AdaLoRA, dict(alpha=NAN), "alpha"),
    (jlora.AdaLoRA, dict(init_std=NAN), "init_std"),
    (jlora.AdaLoRA, dict(init_std=INF), "init_std"),
    (jlora.AdaLoRA, dict(init_std=-1.0), "init_std"),
    (jlora.VeRA, dict(rank=0), "rank"),
    (jlora.VeRA, dict(seed=-1), "seed"),
    (jlora.VeRA, dict(seed=1.5), "seed"),
    (jlora.VeRA, dict(d_initial=NAN), "d_initial"),
    (jlora.VeRA, dict(d_initial=INF), "d_initial"),
    (jlora.VeRA, dict(dtype="int8"), "dtype"),
    (jlora.GLoRA, dict(a="matrix"), "a"),
    (jlora.GLoRA, dict(a=3), "a"),
    (jlora.GLoRA, dict(d="lowrank"), "d"),
    (jlora.GLoRA, dict(rank=0), "rank"),
    (jlora.GLoRA, dict(rank=NAN), "rank"),
]


@pytest.mark.parametrize("cls,kwargs,option", BAD,
                         ids=[f"{c.__name__}-{o}-{i}" for i, (c, _, o) in enumerate(BAD)])
def test_every_bad_option_is_a_value_error_naming_option_and_value(cls, kwargs, option):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    msg = str(err.value)
    assert msg.startswith(cls.__name__) and option in msg, msg
    value = kwargs[option]
    shown = repr(value)
    assert shown in msg or (isinstance(value, float) and math.isnan(value) and "nan" in msg), msg


def test_unknown_options_are_named():
    with pytest.raises(ValueError, match=r"Full: unknown option\(s\) \['value'\]"):
        jlora.Full(value=1)


@pytest.mark.parametrize("config", [
    jlora.LoRA(rank=4, dtype=jnp.bfloat16), jlora.VeRA(rank=8, dtype=jnp.bfloat16),
    jlora.AdaLoRA(init_rank=4, target_rank=2, dtype=jnp.bfloat16),
    jlora.GLoRA(rank=4, dtype=jnp.bfloat16)], ids=lambda c: type(c).__name__)
def test_bfloat16_factors_do_not_round_a_float32_base_when_merged(config):
    k0 = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    node = config.build(jax.random.key(1), k0, path="kernel")
    assert np.array_equal(np.asarray(node.materialize()), np.asarray(k0))  # ΔK = 0 at init
    # random factors: K0 + ΔK with ΔK rounded once to bfloat16, K0 itself not rounded
    rng = np.random.default_rng(2)
    node = node.replace(**{f: jnp.asarray(rng.normal(size=getattr(node, f).shape) * 0.1,
                                          getattr(node, f).dtype) for f in node.trainable})
    delta = f64(node.delta())
    tol = 2.0 ** -8 * np.abs(delta).max() + 1e-6  # ΔK within bfloat16 rounding
    np.testing.assert_allclose(f64(node.materialize()), f64(k0) + delta, rtol=0, atol=tol)
    assert np.abs(f64(k0) - f64(k0.astype(jnp.bfloat16))).max() > 3 * tol  # what rounding K0 costs
