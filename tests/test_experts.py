"""Stacked kernels (expert_axis=0): MoE experts and nn.scan blocks, against
per-slice float64 numpy loops; QLoRA's residuals and memory under nn.scan."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64

E, D, F = 3, 16, 12


def _bump(adapted, size=0.2):
    def one(n):
        if not jlora.is_node(n) or not hasattr(n, "b"):
            return n
        return n.replace(b=size * jax.random.normal(jax.random.key(n.b.size), n.b.shape))
    return jax.tree.map(one, adapted, is_leaf=jlora.is_node)


def _experts(cfg, seed=0):
    k = np.random.default_rng(seed).standard_normal((E, D, F)).astype(np.float32)
    node = jlora.apply({"w": jnp.asarray(k)}, jlora.Spec({"w": cfg}), key=jax.random.key(seed))
    return k, _bump(node)["w"]


def test_expert_factors_and_merge_per_slice():
    k, node = _experts(jlora.LoRA(rank=2, alpha=4, expert_axis=0))
    assert node.a.shape == (E, D, 2) and node.b.shape == (E, 2, F) and node.scale == 2.0
    assert not np.allclose(node.a[0], node.a[1])  # independent inits per expert
    merged = f64(jlora.merge({"w": node})["w"])
    for e in range(E):
        np.testing.assert_allclose(merged[e], k[e] + 2.0 * f64(node.a[e]) @ f64(node.b[e]),
                                   rtol=1e-5, atol=1e-5)
    # unmerge(merge) gives back the base
    back = jlora.unmerge(jlora.merge({"w": node}), {"w": node})["w"]
    np.testing.assert_allclose(back, k, atol=1e-5)
    _, divided = _experts(jlora.LoRA(rank=6, expert_axis=0, rank_per_expert="divide"))
    assert divided.a.shape == (E, D, 2) and divided.rank == 2 and divided.scale == 1.0
    assert jlora.count_trainable({"w": divided}) == E * 2 * (D + F)


def test_ragged_dot_fast_path_against_per_token_loop_and_gradients():
    k, node = _experts(jlora.LoRA(rank=2, expert_axis=0))
    gs = jnp.array([2, 0, 4])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, D)), jnp.float32)
    merged = f64(jlora.merge({"w": node})["w"])
    expert_of = np.repeat(np.arange(E), np.asarray(gs))
    ref = np.stack([f64(x[t]) @ merged[expert_of[t]] for t in range(6)])
    np.testing.assert_allclose(jlora.experts.ragged_dot(x, node, gs), ref, rtol=1e-5, atol=1e-5)
    trainable, frozen = jlora.split({"w": node})

    def loss(t, fast):
        n = jlora.combine(t, frozen)
        y = (jlora.experts.ragged_dot(x, n["w"], gs) if fast
             else jax.lax.ragged_dot(x, jlora.merge(n)["w"], gs))
        return jnp.sum(jnp.sin(y))

    for a, b in zip(jax.tree.leaves(jax.grad(loss)(trainable, True)),
                    jax.tree.leaves(jax.grad(loss)(trainable, False))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class EinsumMoE(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (E, capacity, D), dispatched
        router = self.param("router", nn.initializers.normal(), (D, E))
        y = nn.Einsum((E, D, F), "ecd,edf->ecf", use_bias=False, name="experts")(x)
        return y, x.mean(1) @ router


def test_einsum_dispatch_fast_path_and_router_frozen():
    model = EinsumMoE()
    x = jax.random.normal(jax.random.key(0), (E, 5, D))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = _bump(jlora.apply(params, jlora.Spec({"experts/kernel": jlora.LoRA(
        rank=2, expert_axis=0)}), key=jax.random.key(2)))
    assert jlora.linen.consumed(model, {"params": adapted}, x)["factorized"] == ["experts/kernel"]
    trainable, frozen = jlora.split(adapted)
    assert trainable["router"] is None and frozen["router"] is not None  # router frozen
    y, _ = jlora.linen.apply(model, {"params": adapted}, x)
    merged = f64(jlora.merge(adapted)["experts"]["kernel"])
    ref = np.stack([f64(x[e]) @ merged[e] for e in range(E)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(h.shape[-1], use_bias=False)(jnp.tanh(h)), None


class Scanned(nn.Module):
    layers: int = 4

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.layers)
        h, _ = stack(name="blocks")(x, None)
        return h


def _scanned(d, cfg):
    model, x = Scanned(), jax.random.normal(jax.random.key(0), (8, d))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = _bump(jlora.apply(params, jlora.Spec({"blocks/**/kernel": cfg}),
                                key=jax.random.key(2)), size=0.05)
    return model, x, params, adapted


def _loss(model, x):
    def loss(t, f, fast):
        a = jlora.combine(t, f)
        y = (jlora.linen.apply(model, {"params": a}, x) if fast
             else model.apply({"params": jlora.merge(a)}, x))
        return jnp.sum(jnp.sin(y))
    return loss


@pytest.mark.parametrize("method", [jlora.LoRA, jlora.QLoRA])
def test_scanned_blocks_adapted_per_layer_fast_path_inside_scan(method):
    model, x, params, adapted = _scanned(64, method(rank=2, expert_axis=0))
    node = adapted["blocks"]["Dense_0"]["kernel"]
    assert node.a.shape == (4, 64, 2)
    assert jlora.linen.consumed(model, {"params": adapted}, x)["factorized"] == [
        "blocks/Dense_0/kernel"]
    # per-layer numpy loop of the merged kernels
    merged = f64(jlora.merge(adapted)["blocks"]["Dense_0"]["kernel"])
    base = f64(node.base)
    h = f64(x)
    for layer in range(4):
        np.testing.assert_allclose(merged[layer], base[layer] + node.scale * f64(
            node.a[layer]) @ f64(node.b[layer]), rtol=1e-5, atol=1e-5)
        h = h + np.tanh(h) @ merged[layer]
    np.testing.assert_allclose(jlora.linen.apply(model, {"params": adapted}, x), h,
                               rtol=1e-4, atol=1e-4)
    t, f = jlora.split(adapted)
    loss = jax.jit(jax.grad(_loss(model, x)), static_argnums=2)
    for a, b in zip(jax.tree.leaves(loss(t, f, True)), jax.tree.leaves(loss(t, f, False))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scanned_kernel_adapted_as_one_matrix_is_refused():
    model, x, _, adapted = _scanned(16, jlora.LoRA(rank=2))
    with pytest.raises(ValueError, match="expert_axis=0"):
        jlora.linen.apply(model, {"params": adapted}, x)
    with pytest.raises(ValueError, match="expert_axis"):
        jlora.LoRA(rank=2, expert_axis=1)
    with pytest.raises(ValueError, match="at least 3 dims"):
        jlora.apply({"w": jnp.ones((4, 4))}, jlora.Spec({"w": jlora.LoRA(rank=2, expert_axis=0)}),
                    key=jax.random.key(0))


def _float_residuals(capsys, fn, *args):
    """Shapes of the float residuals ``jax.ad_checkpoint.print_saved_residuals`` lists."""
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
    shapes = []
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"(bf16|f16|f32|f64)\[([\d,]*)\]", line)
        if m:
            shapes.append(tuple(int(v) for v in m.group(2).split(",") if v))
    return shapes


def test_qlora_scan_keeps_codes_not_dequantized_weights(capsys):
    d = 256
    model, x, _, adapted = _scanned(d, jlora.QLoRA(rank=4, expert_axis=0))
    t, f = jlora.split(adapted)
    loss = _loss(model, x)
    # no weight-sized float array is saved for the backward pass
    fast = _float_residuals(capsys, lambda t, f: loss(t, f, True), t, f)
    assert fast and all(math.prod(s) < d * d for s in fast)
    plain = _float_residuals(capsys, lambda t, f: loss(t, f, False), t, f)
    assert (4, d, d) in plain  # what the custom VJP avoids
    dequantized_bytes = 4 * d * d * 4
    temps = {fast: jax.jit(jax.grad(loss), static_argnums=2).lower(t, f, fast).compile()
             .memory_analysis().temp_size_in_bytes for fast in (True, False)}
    assert temps[True] < dequantized_bytes < temps[False]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_expert_factors_and_quantized_codes_shard_like_their_base():
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("expert", "tensor"))
    params = {"moe": {"w": jax.random.normal(jax.random.key(0), (4, 128, 64))},
              "q": {"w": jax.random.normal(jax.random.key(1), (4, 128, 64))}}
    spec = jlora.Spec({"moe/w": jlora.LoRA(rank=2, expert_axis=0),
                       "q/w": jlora.QLoRA(rank=2, expert_axis=0)})
    base = {"moe": {"w": P("expert", None, "tensor")}, "q": {"w": P("expert", None, "tensor")}}
    adapted = _bump(jlora.apply(params, spec, key=jax.random.key(2)))
    s = jlora.sharding.specs(adapted, base)
    assert (s["moe"]["w"].a, s["moe"]["w"].b) == (P("expert", None, None),
                                                  P("expert", None, "tensor"))
    q = s["q"]["w"].quantized  # codes stored (E, out, in/2): expert and output axes sharded
    assert (q.codes, q.absmax, q.offset) == (P("expert", "tensor", None),
                                             P("expert", "tensor", None), P("expert"))
    placed = jlora.sharding.place(adapted, mesh, base)
    x = jax.random.normal(jax.random.key(3), (4, 5, 128))

    def loss(t, f):
        a = jlora.combine(t, f)
        y = sum(jlora.experts.einsum("ecd,edf->ecf", x, a[k]["w"]) for k in ("moe", "q"))
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.value_and_grad(loss))
    (l1, g1), (l2, g2) = grad(*jlora.split(placed)), grad(*jlora.split(adapted))
    # a sum of 2,560 sines that cancel to about 1: float32 rounding of the two
    # reduction orders differs by ~1e-5 absolute
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nnx_scan_blocks_adapted_per_layer_and_trained():
    """Flax NNX: blocks created with nnx.vmap and run with nnx.scan hold kernels
    (layers, in, out); expert_axis=0 adapts each layer with its own factors (NNX
    generic path), against a per-layer numpy loop, and a training step lowers the loss."""
    from flax import nnx

    layers, d = 3, 8

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(d, d, rngs=rngs)

        def __call__(self, x):
            return x + jnp.tanh(self.linear(x))

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return Block(rngs)
            self.blocks = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def forward(x, block):
                return block(x)
            return forward(x, self.blocks)

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    spec = jlora.Spec({"blocks/linear/kernel": jlora.LoRA(rank=2, alpha=4, expert_axis=0)})
    adapted = _bump(jax.jit(lambda s: jlora.apply(s, spec, key=jax.random.key(1)))(state),
                    size=0.2)
    node = adapted["blocks"]["linear"]["kernel"]
    assert node.shape == (layers, d, d) and node.a.shape == (layers, d, 2)
    x = jax.random.normal(jax.random.key(2), (5, d))
    bias = f64(adapted["blocks"]["linear"]["bias"])
    h = f64(x)
    for layer in range(layers):  # per-layer numpy loop of K0[l] + s·a[l]·b[l]
        k = f64(node.base[layer]) + 2.0 * f64(node.a[layer]) @ f64(node.b[layer])
        h = h + np.tanh(h @ k + bias[layer])
    merged_fwd = jax.jit(lambda a: jlora.nnx.merge(graphdef, a)(x))
    np.testing.assert_allclose(f64(merged_fwd(adapted)), h, rtol=1e-5, atol=1e-5)
    t, f = jlora.split(adapted)

    def loss(t):
        return jnp.mean(jlora.nnx.merge(graphdef, jlora.combine(t, f))(x) ** 2)

    vg = jax.jit(jax.value_and_grad(loss))
    l0, g = vg(t)
    ga = g["blocks"]["linear"]["kernel"].a
    assert ga.shape == (layers, d, 2) and all(float(jnp.abs(ga[i]).max()) > 0
                                              for i in range(layers))
    l1, _ = vg(jax.tree.map(lambda p, d: p - 0.05 * d, t, g))
    assert float(l1) < float(l0)


@pytest.mark.parametrize("config", [jlora.LoRA(rank=4, expert_axis=0),
                                    jlora.QLoRA(rank=4, expert_axis=0, block_size=16)])
def test_a_slice_cut_by_scan_merges_like_its_stack(config):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 64, 16)), jnp.float32)
    node = jlora.apply({"w": w}, jlora.Spec({"w": config}), key=jax.random.key(0))["w"]
    node = node.replace(b=jnp.asarray(rng.standard_normal(node.b.shape), jnp.float32))
    base = np.asarray(node.base, np.float64)  # the (dequantized) stack
    want = base + node.scale * np.einsum("eir,ero->eio", np.asarray(node.a, np.float64),
                                         np.asarray(node.b, np.float64))
    _, per_layer = jax.lax.scan(lambda c, layer: (c, jlora.merge({"w": layer})["w"]), 0, node)
    np.testing.assert_allclose(np.asarray(per_layer, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [jlora.LoRA(rank=2, in_axes=(2,), expert_axis=0),
                                    jlora.QLoRA(rank=2, in_axes=(2,), expert_axis=0, block_size=4)])
def test_stacked_out_in_layout_computes_the_merged_layer(config):
    """PEFT/HF store experts as (E, out, in): the fast path must contract the input axis."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)  # (E, out, in)
    node = jlora.apply({"w": w}, jlora.Spec({"w": config}), key=jax.random.key(0))["w"]
    node = node.replace(b=jnp.asarray(rng.standard_normal(node.b.shape), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    y = node.dot(x, lambda x, k: jnp.einsum("ecd,efd->ecf", x, k))
    merged = np.asarray(jlora.merge({"w": node})["w"], np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64),
                               np.einsum("ecd,efd->ecf", np.asarray(x, np.float64), merged),
                               rtol=1e-5, atol=1e-5)


def test_ragged_dot_checks_group_sizes():
    node = jlora.apply({"w": jnp.ones((2, 4, 3))}, jlora.Spec({"w": jlora.LoRA(
        rank=1, expert_axis=0)}), key=jax.random.key(0))["w"]
    for bad in (jnp.array([1, 1, 1]), jnp.array([1.0, 2.0])):
        with pytest.raises(ValueError, match="group_sizes must be 2 integers"):
            jlora.experts.ragged_dot(jnp.ones((3, 4)), node, bad)


# ------------------------------------------------ whole-stack fast path, layouts, dropout

def _stack(cfg, shape, seed=0):
    """A stacked node on a random kernel of ``shape`` with random ``b`` (delta visible)."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    node = jlora.apply({"w": w}, jlora.Spec({"w": cfg}), key=jax.random.key(seed))["w"]
    return node.replace(b=jnp.asarray(0.3 * rng.standard_normal(node.b.shape), jnp.float32))


def _slice_matrix(k, in_axes):
    """numpy ``(fan_in, fan_out)`` view of one slice (input axes first, row-major)."""
    perm = tuple(in_axes) + tuple(i for i in range(k.ndim) if i not in in_axes)
    fan_in = int(np.prod([k.shape[i] for i in in_axes]))
    return np.transpose(k, perm).reshape(fan_in, -1), perm


def _formula_kernels(node):
    """``K[e] = K0[e] + s·a[e]·b[e]`` in float64, in the base's layout (K0: the
    float base, or QLoRA's dequantized one)."""
    in_axes = tuple(i - 1 for i in node.in_axes)
    out = []
    for e in range(node.shape[0]):
        k0 = f64(node.base[e])
        m, perm = _slice_matrix(k0, in_axes)
        m = m + node.scale * f64(node.a[e]) @ f64(node.b[e])
        out.append(np.transpose(m.reshape([k0.shape[i] for i in perm]), np.argsort(perm)))
    return np.stack(out)


def _stack_sized(fn, *args, size):
    """Float arrays of at least ``size`` elements that the top level of ``fn``'s jaxpr makes."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [str(v.aval) for eq in jaxpr.eqns for v in eq.outvars
            if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.size >= size]


LAYOUTS = {"(E, in, out)": (1,), "(E, out, in)": (2,)}
STACKED = {"LoRA": lambda ax: jlora.LoRA(rank=2, alpha=3, in_axes=ax, expert_axis=0),
           "QLoRA": lambda ax: jlora.QLoRA(rank=2, alpha=3, in_axes=ax, expert_axis=0,
                                           block_size=4)}


@pytest.mark.parametrize("method", STACKED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d_in,d_out", [(8, 8), (8, 6)])
def test_ragged_dot_contracts_the_input_axis_of_either_layout(method, layout, d_in, d_out):
    """Square experts would silently use the transposed weight, non-square ones fail, if
    the (E, out, in) layout were contracted on axis 1; values and gradients against a
    float64 per-token loop of x·K[e] with K[e] = K0[e] + s·a[e]·b[e] (one tail row)."""
    in_axes = LAYOUTS[layout]
    shape = (E, d_in, d_out) if in_axes == (1,) else (E, d_out, d_in)
    node = _stack(STACKED[method](in_axes), shape)
    gs = jnp.array([2, 0, 3])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, d_in)), jnp.float32)
    k = _formula_kernels(node)
    if in_axes == (2,):
        k = np.swapaxes(k, 1, 2)  # (E, in, out)
    rows = np.repeat(np.arange(E), np.asarray(gs))
    ref = np.zeros((6, d_out))
    ref[:5] = np.stack([f64(x[t]) @ k[rows[t]] for t in range(5)])
    np.testing.assert_allclose(f64(jlora.experts.ragged_dot(x, node, gs)), ref,
                               rtol=1e-5, atol=1e-5)
    t, f = jlora.split({"w": node})
    g = jax.grad(lambda t: jnp.sum(jnp.sin(jlora.experts.ragged_dot(
        x, jlora.combine(t, f)["w"], gs))))(t)["w"]
    dy = np.cos(ref)
    for e in range(E):  # dL/dK[e] = X_eᵀ·G_e; dL/da = s·dK·bᵀ, dL/db = s·aᵀ·dK
        sel = rows == e
        dk = f64(x[:5][sel]).T @ dy[:5][sel]
        np.testing.assert_allclose(f64(g.a[e]), node.scale * dk @ f64(node.b[e]).T,
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f64(g.b[e]), node.scale * f64(node.a[e]).T @ dk,
                                   rtol=1e-4, atol=1e-5)


def test_ragged_dot_refuses_a_stack_with_several_input_axes():
    node = _stack(jlora.LoRA(rank=2, in_axes=(1, 2), expert_axis=0), (E, 2, 4, 5))
    with pytest.raises(ValueError, match=r"one input and one output axis.*jlora.experts.einsum"):
        jlora.experts.ragged_dot(jnp.ones((3, 8)), node, jnp.array([1, 1, 1]))


# (equation, kernel shape, in_axes, x shape): each a layout the fast path takes
EINSUMS = {
    "ecd,edf->ecf": ((E, D, F), (1,), (E, 5, D)),
    "ecd,efd->ecf": ((E, F, D), (2,), (E, 5, D)),
    "echk,ehkf->ecf": ((E, 2, 8, F), (1, 2), (E, 5, 2, 8)),
    "ecd,edfg->ecfg": ((E, D, 3, 4), (1,), (E, 5, D)),
}


@pytest.mark.parametrize("method", STACKED)
@pytest.mark.parametrize("eq", EINSUMS)
def test_whole_stack_fast_path_never_forms_the_expert_delta(method, eq):
    """The forward and backward make no array the size of the stack (the merged path
    makes five, the delta, the sum and their cotangents); values and kernel
    gradients against float64 formulas."""
    shape, in_axes, x_shape = EINSUMS[eq]
    node = _stack(STACKED[method](in_axes), shape)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(x_shape), jnp.float32)
    t, f = jlora.split({"w": node})

    def loss(t):
        return jnp.sum(jnp.sin(jlora.experts.einsum(eq, x, jlora.combine(t, f)["w"])))

    assert _stack_sized(jax.value_and_grad(loss), t, size=int(np.prod(shape))) == []
    k = _formula_kernels(node)
    ref = np.einsum(eq, f64(x), k)
    np.testing.assert_allclose(f64(jlora.experts.einsum(eq, x, node)), ref, rtol=1e-5, atol=1e-5)
    lhs, rhs = eq.split("->")[0].split(",")
    dk = np.einsum(f"{lhs},{eq.split('->')[1]}->{rhs}", f64(x), np.cos(ref))
    g = jax.grad(loss)(t)["w"]
    for e in range(E):
        m, _ = _slice_matrix(dk[e], tuple(i - 1 for i in in_axes))
        np.testing.assert_allclose(f64(g.a[e]), node.scale * m @ f64(node.b[e]).T,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(f64(g.b[e]), node.scale * f64(node.a[e]).T @ m,
                                   rtol=1e-4, atol=1e-4)


def test_whole_stack_lora_step_memory_is_the_factorized_formula():
    """Compiled temp memory of a LoRA step on (4, 256, 256) experts stays below one
    float32 stack (the merged path needs several)."""
    e, d = 4, 256
    node = _stack(jlora.LoRA(rank=4, expert_axis=0), (e, d, d))
    x, gs = jax.random.normal(jax.random.key(0), (32, d)), jnp.full((e,), 8, jnp.int32)
    t, f = jlora.split({"w": node})

    def loss(t):
        return jnp.sum(jlora.experts.ragged_dot(x, jlora.combine(t, f)["w"], gs) ** 2)

    temp = jax.jit(jax.grad(loss)).lower(t).compile().memory_analysis().temp_size_in_bytes
    assert temp < e * d * d * 4


def _dropped(x, key, rate):
    """Inverted dropout with jax's Bernoulli mask for ``key`` (the mask the node draws)."""
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, x.shape))
    return np.where(keep, f64(x) / (1.0 - rate), 0.0)


@pytest.mark.parametrize("method", ["LoRA", "QLoRA"])
def test_expert_dropout_reaches_the_adapter_branch(method):
    """y = x·K0[e] + s·(drop(x)·a[e])·b[e] with dropout_key, for ragged_dot, einsum on
    (E, out, in) experts, and an op the batched branch cannot take (output axes first)."""
    rate, key = 0.5, jax.random.key(7)
    cfg = {"LoRA": jlora.LoRA, "QLoRA": functools.partial(jlora.QLoRA, block_size=4)}[method]
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, D)), jnp.float32)
    xd = _dropped(x, key, rate)

    def branch(node, e, xd_rows):  # s·(drop(x)·a[e])·b[e] in float64
        return node.scale * (xd_rows @ f64(node.a[e])) @ f64(node.b[e])

    node = _stack(cfg(rank=2, alpha=4, dropout=rate, expert_axis=0), (E, D, F))
    gs = jnp.array([2, 1, 3])
    rows = np.repeat(np.arange(E), np.asarray(gs))
    ref = np.stack([f64(x[t]) @ f64(node.base[rows[t]]) + branch(node, rows[t], xd[t])
                    for t in range(6)])
    train = jlora.experts.ragged_dot(x, node, gs, dropout_key=key)
    np.testing.assert_allclose(f64(train), ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(train - jlora.experts.ragged_dot(x, node, gs)).max()) > 0.1

    out_in = _stack(cfg(rank=2, alpha=4, dropout=rate, in_axes=(2,), expert_axis=0), (E, F, D))
    xe = x[None].repeat(E, 0)  # (E, c, d): every token to every expert
    xde = _dropped(xe, key, rate)
    want = np.stack([f64(xe[e]) @ f64(out_in.base[e]).T + branch(out_in, e, xde[e])
                     for e in range(E)])
    np.testing.assert_allclose(f64(jlora.experts.einsum("ecd,efd->ecf", xe, out_in,
                                                        dropout_key=key)),
                               want, rtol=1e-5, atol=1e-5)
    # output axes before the token axis: no batched branch, the delta on the dropped input
    np.testing.assert_allclose(f64(jlora.experts.einsum("ecd,efd->efc", xe, out_in,
                                                        dropout_key=key)),
                               np.swapaxes(want, 1, 2), rtol=1e-5, atol=1e-5)


def test_whole_stack_dropout_without_a_batched_branch_is_refused():
    """DoRA on a whole stack runs merged: a dropout_key with dropout > 0 is an error,
    not a training run without dropout; without a key it runs."""
    node = _stack(jlora.DoRA(rank=2, dropout=0.1, expert_axis=0), (E, D, F))
    x, gs = jnp.ones((4, D)), jnp.array([1, 1, 2])
    with pytest.raises(ValueError, match=r"DoRA\(expert_axis=0, dropout=0.1\).*dropout=0"):
        jlora.experts.ragged_dot(x, node, gs, dropout_key=jax.random.key(0))
    merged = f64(jlora.merge({"w": node})["w"])
    rows = np.repeat(np.arange(E), np.asarray(gs))
    np.testing.assert_allclose(f64(jlora.experts.ragged_dot(x, node, gs)),
                               np.stack([f64(x[t]) @ merged[rows[t]] for t in range(4)]),
                               rtol=1e-5, atol=1e-5)
