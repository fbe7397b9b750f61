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


def _small_bert(packed=None):
    from experiments.models.bert import BertConfig, SentenceClassifier

    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=96, max_position_embeddings=64)
    return SentenceClassifier(cfg, 3, packed)


def _bert_batch(seed=0, lengths=(20, 32, 0, 7), t=32):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, 50, (len(lengths), t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None] < np.array(lengths)[:, None], jnp.int32)
    return ids, mask


@pytest.mark.parametrize("dtype,packed", [("float64", 59), ("float64", 96), ("float32", 64)])
def test_packed_bert_matches_padded_bert(dtype, packed):
    """``packed_tokens=C`` skips the padding, nothing else: the pooled embeddings, the
    loss and every LoRA factor's gradient equal the padded model's
    (float64: XLA attention; float32 with T = head_dim = 32: the C++ kernel). C = 59 is
    the exact token count, C = 96 carries 37 masked rows along."""
    import jlora
    from experiments.models.bert import SentenceClassifier

    with jax.enable_x64(dtype == "float64"):
        ids, mask = _bert_batch()
        plain, packed_model = _small_bert(), _small_bert(packed)
        params = jax.tree.map(lambda a: a.astype(dtype), plain.init(jax.random.key(0), ids, mask)["params"])
        embed = lambda m, p: m.apply({"params": p}, ids, mask, method=SentenceClassifier.embed)
        np.testing.assert_allclose(embed(packed_model, params), embed(plain, params),
                                   rtol=1e-10 if dtype == "float64" else 2e-5, atol=1e-12 if dtype == "float64" else 2e-6)
        spec = jlora.Spec({"**/self_attn/{query,value}/kernel": jlora.LoRA(rank=2),
                           "**/layer_*/{attn_out,intermediate,output}/kernel": jlora.LoRA(rank=2)})
        trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1)))
        leaves, treedef = jax.tree.flatten(trainable)
        rng = np.random.default_rng(2)
        trainable = jax.tree.unflatten(treedef, [x + 0.1 * rng.normal(size=x.shape).astype(dtype) for x in leaves])
        y = jnp.asarray([0, 1, 2, 1])

        def grads(model):
            def loss(t):
                logits = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, ids, mask, strict=True)
                return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()
            return jax.jit(jax.value_and_grad(loss))(trainable)

        (l_ref, g_ref), (l_ours, g_ours) = grads(plain), grads(packed_model)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == "float64" else dict(rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(l_ours, l_ref, **tol)
        for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(g_ours), jax.tree.leaves(g_ref)):
            assert a.dtype == dtype and np.abs(np.asarray(r)).max() > 0, jax.tree_util.keystr(path)
            np.testing.assert_allclose(a, r, err_msg=jax.tree_util.keystr(path), **tol)


def test_packed_bert_states_and_work():
    """Masked positions come back as zeros, unmasked ones as the padded model's; the
    compiled forward does C / (B T) of the dense work."""
    from experiments.models.bert import BertEncoder

    ids, mask = _bert_batch()
    cfg = _small_bert().cfg
    params = BertEncoder(cfg).init(jax.random.key(0), ids, mask)
    ref = BertEncoder(cfg).apply(params, ids, mask)
    ours = BertEncoder(cfg, 64).apply(params, ids, mask)
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(ours)[keep], np.asarray(ref)[keep], rtol=2e-5, atol=2e-6)
    assert not np.asarray(ours)[~keep].any()
    flops = [jax.jit(lambda i, m: BertEncoder(cfg, c).apply(params, i, m)).lower(ids, mask).compile()
             .cost_analysis()["flops"] for c in (None, 64)]
    assert 0.45 < flops[1] / flops[0] < 0.6, flops  # 64 of 128 rows; attention stays (B, T)


def test_packed_bert_never_drops_tokens_silently():
    from experiments.models.bert import BertEncoder, packed_size

    ids, mask = _bert_batch()  # 59 unmasked tokens
    cfg = _small_bert().cfg
    params = BertEncoder(cfg).init(jax.random.key(0), ids, mask)
    with pytest.raises(ValueError, match="packed_tokens=58 is less than the batch's 59"):
        BertEncoder(cfg, 58).apply(params, ids, mask)
    with pytest.raises(ValueError, match=r"packed_tokens=129 must be in \[1, B\*T = 128\]"):
        BertEncoder(cfg, 129).apply(params, ids, mask)
    under_jit = jax.jit(lambda i, m: BertEncoder(cfg, 58).apply(params, i, m))(ids, mask)
    assert np.isnan(np.asarray(under_jit)).all()
    assert packed_size(mask, multiple=32) == 64 and packed_size(mask, multiple=7) == 63
    assert packed_size(mask) == 64 and packed_size(np.ones((2, 8)), multiple=128) == 16
    with pytest.raises(ValueError, match="concrete mask"):
        jax.jit(lambda m: packed_size(m))(mask)
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        packed_size(mask, multiple=0)
