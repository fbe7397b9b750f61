"""DoRA against float64 numpy references written from the paper's formulas (Liu et al. 2024)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64


def dora_ref(k0, a, b, m, s):
    v = f64(k0) + s * f64(a) @ f64(b)
    return v * (f64(m) / np.linalg.norm(v, axis=0))


def bumped(node, seed=0):
    ka, kb, km = jax.random.split(jax.random.key(seed), 3)
    return node.replace(a=node.a + 0.1 * jax.random.normal(ka, node.a.shape),
                        b=node.b + 0.1 * jax.random.normal(kb, node.b.shape),
                        m=node.m * (1 + 0.1 * jax.random.normal(km, node.m.shape)))


def grad_of_unfused(fn, params):
    """``jax.grad(fn)(params)`` with DoRA's product left to autodiff: the LoRA
    product times ``m/n`` (the same dropout masks as the fast path)."""
    from jlora.methods.dora import DoRANode
    from jlora.methods.lora import LoRANode

    def unfused(self, x, op, *, dropout_key=None, **context):
        y = LoRANode.dot(self, x, op, dropout_key=dropout_key)
        return y * self._ratio().reshape(self.out_shape)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DoRANode, "dot", unfused)
        return jax.grad(fn)(params)


def make(config, shape=(12, 7), seed=0):
    w = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    adapted = jlora.apply({"l": {"kernel": w}}, jlora.Spec({"l/kernel": config}), key=jax.random.key(1))
    return w, adapted["l"]["kernel"]


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_identity_at_init_and_magnitude(init):
    w, node = make(jlora.DoRA(rank=3, alpha=6, init=init))
    np.testing.assert_allclose(f64(node.m), np.linalg.norm(f64(w), axis=0), rtol=1e-5)
    np.testing.assert_allclose(f64(node.materialize()), f64(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(node.delta()), 0.0, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weight_matches_reference(rslora):
    cfg = jlora.DoRA(rank=3, alpha=6, rslora=rslora)
    w, node = make(cfg)
    node = bumped(node)
    ref = dora_ref(node.base, node.a, node.b, node.m, cfg.scale)
    np.testing.assert_allclose(f64(node.materialize()), ref, rtol=1e-5, atol=1e-5)
    # the norm without the dense product equals the dense norm
    v = f64(node.base) + cfg.scale * f64(node.a) @ f64(node.b)
    np.testing.assert_allclose(f64(node.column_norms()), np.linalg.norm(v, axis=0), rtol=1e-5)


def test_fast_path_forward_and_grads_match_merged():
    model = nn.Dense(7)
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.DoRA(rank=3)}), key=jax.random.key(2))
    adapted["kernel"] = bumped(adapted["kernel"])
    node = adapted["kernel"]
    y = jlora.linen.apply(model, {"params": adapted}, x)
    ref = f64(x) @ dora_ref(node.base, node.a, node.b, node.m, 1.0) + f64(params["bias"])
    np.testing.assert_allclose(f64(y), ref, rtol=1e-4, atol=1e-4)
    assert jlora.linen.consumed(model, {"params": adapted}, x)["factorized"] == ["kernel"]
    trainable, frozen = jlora.split(adapted)
    assert sorted(k for k in ("a", "b", "m") if getattr(trainable["kernel"], k) is not None) == ["a", "b", "m"]
    assert jlora.count_trainable(trainable) == 3 * (12 + 7) + 7  # LoRA factors + magnitude
    loss = lambda f: lambda t: jnp.sum(f(jlora.combine(t, frozen)) ** 2)
    g_fast = jax.grad(loss(lambda p: jlora.linen.apply(model, {"params": p}, x)))(trainable)
    g_slow = jax.grad(loss(lambda p: model.apply({"params": jlora.merge(p)}, x)))(trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_fast, g_slow)


def test_detach_norm_changes_only_the_gradient():
    _, node = make(jlora.DoRA(rank=2, detach_norm=True))
    node = bumped(node)
    exact = node.replace(config=jlora.DoRA(rank=2, detach_norm=False))
    np.testing.assert_allclose(node.materialize(), exact.materialize(), atol=1e-6)
    x = jnp.ones((1, 12))
    ga = jax.grad(lambda n: jnp.sum((x @ n.materialize()) ** 2))(node)
    gb = jax.grad(lambda n: jnp.sum((x @ n.materialize()) ** 2))(exact)
    # numpy reference of the detached gradient w.r.t. m: dL/dK' · V/n summed over rows
    v = f64(node.base) + f64(node.a) @ f64(node.b)
    n = np.linalg.norm(v, axis=0)
    y = f64(x) @ (v * f64(node.m) / n)
    dk = f64(x).T @ (2 * y)
    np.testing.assert_allclose(f64(ga.m), (dk * v / n).sum(0), rtol=1e-4)
    assert not np.allclose(ga.a, gb.a, atol=1e-6)  # the norm path is really cut


def test_dora_trains():
    import optax

    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.tanh(x[:, :4] * 2.0)
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.DoRA(rank=2, alpha=4)}), key=jax.random.key(2))
    trainable, frozen = jlora.split(adapted)
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt):
        loss, g = jax.value_and_grad(lambda t: jnp.mean(
            (jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) - y) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    losses = [float(step(trainable, opt)[2])]
    for _ in range(80):
        trainable, opt, loss = step(trainable, opt)
    assert float(loss) < 0.5 * losses[0]


def test_all_zero_output_column_stays_finite():
    # PEFT gives 0/0 = NaN here; jlora's norm epsilon keeps the ratio at 1.
    model = nn.Dense(3)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    params = {**params, "kernel": params["kernel"].at[:, 1].set(0.0)}
    # the exact norm gradient (detach_norm=False) is the case a bare sqrt makes NaN
    spec = jlora.Spec({"kernel": jlora.DoRA(rank=2, detach_norm=False)})
    adapted = jlora.apply(params, spec, key=jax.random.key(2))
    node = adapted["kernel"]
    np.testing.assert_allclose(node.m[1], 1e-12, rtol=1e-6)
    np.testing.assert_array_equal(jlora.merge(adapted)["kernel"][:, 1], 0.0)
    np.testing.assert_allclose(jlora.merge(adapted)["kernel"], params["kernel"], atol=1e-6)
    trainable, frozen = jlora.split(adapted)

    def loss(t):
        y = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x)
        return jnp.mean((y - 1.0) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    assert np.isfinite(float(value))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
    merged = jlora.merge(jlora.combine(stepped, frozen))["kernel"]
    assert bool(jnp.isfinite(merged).all())


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
def test_zero_and_tiny_magnitudes_keep_exact_gradients(dtype, rtol):
    # the backward divides the scaled cotangent's reduction by m/n; a magnitude
    # of zero or below eps² must still give the gradient autodiff gives, not 0/0
    with jax.enable_x64(dtype == jnp.float64):
        model = nn.Dense(4, param_dtype=dtype, dtype=dtype)
        x = jax.random.normal(jax.random.key(0), (2, 8, 3), dtype)
        params = model.init(jax.random.key(1), x)["params"]
        adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.DoRA(rank=2)}), key=jax.random.key(2))
        node = bumped(adapted["kernel"], seed=3)
        tiny = 1e-40 if dtype == jnp.float64 else 1e-20  # below eps² of the dtype
        node = node.replace(m=node.m.at[1].set(0.0).at[2].set(tiny).at[3].set(-tiny))
        trainable, frozen = jlora.split({**adapted, "kernel": node})
        cot = jax.random.normal(jax.random.key(4), (2, 8, 4), dtype)
        loss = lambda t: jnp.sum(jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) * cot)
        grads, expected = jax.grad(loss)(trainable), grad_of_unfused(loss, trainable)
        for f in ("a", "b", "m"):
            got, want = getattr(grads["kernel"], f), getattr(expected["kernel"], f)
            assert bool(jnp.isfinite(got).all()), f
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()), err_msg=f)
        assert float(jnp.abs(grads["kernel"].m[1:]).min()) > 0  # a zero magnitude can train away from 0


class EveryLayer(nn.Module):
    """Every layer type the Linen fast path covers, in float64."""

    @nn.compact
    def __call__(self, ids):
        kw = dict(param_dtype=jnp.float64, dtype=jnp.float64)
        h = nn.Embed(11, 6, **kw)(ids)
        h = jnp.tanh(nn.Dense(9, **kw)(h))
        h = nn.DenseGeneral((3, 2), axis=-1, **kw)(h).reshape(h.shape[:-1] + (6,))
        h = jnp.tanh(nn.Einsum((6, 5), "btd,dk->btk", **kw)(h))
        return nn.Conv(4, (3,), **kw)(h)


@pytest.mark.parametrize("batch", [(1, 3), (4, 8)])  # tokens below and above every fan_in
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fast_path_vjp_matches_autodiff_of_merged_weights_float64(batch, dropout):
    """DoRA's hand-written VJP (every product and dm from the scaled cotangent)
    against jax.grad of the model on the dense merged kernel, with respect to
    the factors, the magnitude and the frozen base, on every layer type."""
    with jax.enable_x64(True):
        model = EveryLayer()
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, batch), jnp.int32)
        params = model.init(jax.random.key(0), ids)["params"]
        cfg = jlora.DoRA(rank=2, alpha=3, dropout=dropout)
        spec = jlora.Spec({"DenseGeneral_0/kernel": jlora.DoRA(rank=2, alpha=3, dropout=dropout, in_axes=(0,)),
                           "*/{kernel,embedding}": cfg})
        adapted = jlora.apply(params, spec, key=jax.random.key(1))
        adapted = jax.tree.map(lambda n: bumped(n, seed=len(n.shape)) if jlora.is_node(n) else n,
                               adapted, is_leaf=jlora.is_node)
        cot = jnp.asarray(np.random.default_rng(2).normal(size=model.apply({"params": params}, ids).shape))
        key = jax.random.key(3)

        def fast(p):
            return jnp.sum(jlora.linen.apply(model, {"params": p}, ids, rngs={"dropout": key}) * cot)

        hits = jlora.linen.consumed(model, {"params": adapted}, ids)
        assert not hits["merged"] and len(hits["factorized"]) == 5
        g_fast = jax.grad(fast)(adapted)
        if dropout == 0.0:  # the merged model is the reference
            slow = lambda p: jnp.sum(model.apply({"params": jlora.merge(p)}, ids) * cot)
            np.testing.assert_allclose(fast(adapted), slow(adapted), rtol=1e-12)
            g_slow = jax.grad(slow)(adapted)
        else:  # same dropout masks: the reference is autodiff of the unfused product
            g_slow = grad_of_unfused(fast, adapted)
        for (path, a), (_, b) in zip(jlora.tree.leaves_with_paths(g_fast),
                                     jlora.tree.leaves_with_paths(g_slow)):
            for f in ("a", "b", "m", "base") if jlora.is_node(a) else (None,):
                x, y = (a, b) if f is None else (getattr(a, f), getattr(b, f))
                assert jnp.asarray(x).dtype == jnp.float64
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12, err_msg=f"{path}.{f}")


def test_bf16_factors_on_a_float32_base_keep_the_base_and_the_delta_exact():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(24, 16)) * 3, jnp.float32)
    node = jlora.apply({"w": w}, jlora.Spec({"w": jlora.DoRA(rank=4, dtype=jnp.bfloat16)}),
                       key=jax.random.key(0))["w"]
    node = node.replace(a=jnp.asarray(0.1 * rng.normal(size=node.a.shape), jnp.bfloat16),
                        b=jnp.asarray(0.01 * rng.normal(size=node.b.shape), jnp.bfloat16))
    want = dora_ref(w, node.a, node.b, node.m, node.scale)
    # the merged kernel in float32: the base is not rounded to bf16 (2e-2 off before)
    got = node.materialize()
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(f64(got), want, rtol=0, atol=1e-5)
    # ΔW = K' − K0 is small next to K0: rounded once, to bf16, not computed in it
    delta = want - f64(w)
    np.testing.assert_allclose(f64(node.delta()), delta, rtol=0,
                               atol=2 ** -8 * np.abs(delta).max())
