"""The benchmark models' hand-written attention VJP and erf GELU against ``jax.grad``
of the plain formulas in float64, and the models built on them against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models._layers import attention, causal_bias, gelu_erf, key_bias, scale_queries


def plain_attention(q, k, v, bias):
    """softmax(q k^T + bias) v, differentiated by autodiff (the formulation the VJP replaces)."""
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) + bias, axis=-1) @ v


def qkv(shape, seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape)) for _ in range(3)]


@pytest.mark.parametrize("bias_kind", ["padding", "causal", "fully_masked_row"])
def test_attention_vjp_matches_autodiff_of_plain_formula_float64(bias_kind):
    with jax.enable_x64(True):
        b, h, t, d = 2, 3, 5, 4
        q, k, v = qkv((b, h, t, d), 0)
        if bias_kind == "causal":
            bias = causal_bias(t, jnp.float64)
        else:
            mask = np.ones((b, t), np.int32)
            mask[0, 3:] = 0
            if bias_kind == "fully_masked_row":
                mask[1, :] = 0
            bias = key_bias(jnp.asarray(mask), jnp.float64)[:, None, None, :]
        g = jnp.asarray(np.random.default_rng(1).normal(size=(b, h, t, d)))
        loss = lambda f: (lambda q, k, v: (f(q, k, v, bias) * g).sum())
        ours = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
        ref = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(attention(q, k, v, bias), plain_attention(q, k, v, bias),
                                   rtol=1e-12, atol=1e-12)
        for a, r, name in zip(ours, ref, "qkv"):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")
        # masked keys get no attention, so no gradient reaches their k and v rows
        if bias_kind == "padding":
            assert np.all(np.asarray(ours[1])[0, :, 3:] == 0) and np.all(np.asarray(ours[2])[0, :, 3:] == 0)


def test_attention_matches_numpy_softmax_reference_float64():
    with jax.enable_x64(True):
        q, k, v = qkv((1, 2, 4, 3), 2)
        bias = causal_bias(4, jnp.float64)
        qn, kn, vn = (np.asarray(x) for x in (q, k, v))
        s = qn @ kn.swapaxes(-1, -2) + np.where(np.tril(np.ones((4, 4))) > 0, 0.0, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(attention(q, k, v, bias), p @ vn, rtol=1e-12, atol=1e-12)


def test_attention_vjp_in_bfloat16_is_close_to_float32():
    q, k, v = (x.astype(jnp.float32) for x in qkv((2, 2, 8, 4), 3))
    bias = causal_bias(8)
    f = lambda q, k, v: attention(q, k, v, bias).astype(jnp.float32).sum()
    g32 = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    g16 = jax.grad(f, argnums=(0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    for a, r in zip(g16, g32):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), r, atol=0.05 * float(jnp.abs(r).max()))


def test_query_scale():
    x = jnp.arange(2 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 8)
    np.testing.assert_allclose(scale_queries(x, 4), x / 2.0)


def test_gelu_erf_value_and_gradient_float64():
    from scipy.special import erf

    with jax.enable_x64(True):
        x = jnp.linspace(-6.0, 6.0, 97, dtype=jnp.float64)
        xn = np.asarray(x)
        np.testing.assert_allclose(gelu_erf(x), 0.5 * xn * (1 + erf(xn / np.sqrt(2))), rtol=1e-13, atol=1e-15)
        d = jax.vmap(jax.grad(gelu_erf))(x)
        ref = jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, approximate=False)))(x)
        formula = 0.5 * (1 + erf(xn / np.sqrt(2))) + xn * np.exp(-xn ** 2 / 2) / np.sqrt(2 * np.pi)
        np.testing.assert_allclose(d, ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(d, formula, rtol=1e-12, atol=1e-14)


def test_decoder_gradients_match_plain_attention_float64(monkeypatch):
    """The decoder LM's parameter gradients equal those of the same model with
    autodiffed plain attention (every kernel type: query/key/value/out/up/down)."""
    import experiments.models._layers as layers
    from experiments.models.decoder import DecoderLM, lm_loss

    with jax.enable_x64(True):
        model = DecoderLM(vocab=32, d_model=16, n_layers=2, n_heads=2, max_len=8)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), tokens)["params"])
        grad = lambda: jax.grad(lambda p: lm_loss(model.apply({"params": p}, tokens), tokens))(params)
        ours = grad()
        monkeypatch.setattr(layers, "attention", plain_attention)  # float64: no kernel
        ref = grad()
        for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["block", "names"])
def test_rematerialized_decoder_lora_gradients_match_float64(remat):
    """``DecoderLM(remat=...)`` recomputes residuals, nothing else: the LoRA factor
    gradients through jlora's fast path equal those of the plain model."""
    import jlora
    from experiments.models.decoder import MEMORY_OPTIMIZED_CPU, DecoderLM, lm_loss

    with jax.enable_x64(True):
        tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 8)), jnp.int32)
        plain = DecoderLM(vocab=32, d_model=16, n_layers=2, n_heads=2, max_len=8)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), plain.init(jax.random.key(0), tokens)["params"])
        spec = jlora.Spec({"**/layers_*/{query,key,value,out,up,down}/kernel": jlora.LoRA(rank=2)})
        trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1)))
        # b = 0 at init: move every factor so that both factors get gradients
        leaves, treedef = jax.tree.flatten(trainable)
        rng = np.random.default_rng(2)
        trainable = jax.tree.unflatten(treedef, [x + 0.1 * rng.normal(size=x.shape) for x in leaves])

        def grads(model, **jit):
            loss = lambda t: lm_loss(jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, tokens,
                                                       strict=True), tokens)
            return jax.jit(jax.grad(loss), **jit)(trainable)

        ref = grads(plain)
        opts = {"compiler_options": MEMORY_OPTIMIZED_CPU} if jax.default_backend() == "cpu" else {}
        ours = grads(DecoderLM(vocab=32, d_model=16, n_layers=2, n_heads=2, max_len=8, remat=remat), **opts)
        for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
            assert a.dtype == jnp.float64
            assert np.abs(np.asarray(r)).max() > 0, jax.tree_util.keystr(path)
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-13, err_msg=jax.tree_util.keystr(path))


def test_decoder_rejects_unknown_remat_policy():
    from experiments.models.decoder import DecoderLM

    with pytest.raises(ValueError, match="remat='dots'"):
        DecoderLM(vocab=8, d_model=8, n_layers=1, n_heads=1, max_len=4, remat="dots").init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
