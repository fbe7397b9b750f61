"""The XLA:CPU attention kernel (experiments/models/_cpu_attention.cc) against float64
numpy written from the softmax-attention formulas and against ``jax.grad`` of the plain
formula in float64, and its dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import _cpu_kernel
from experiments.models._layers import key_bias, key_masked_attention

HAS_COMPILER = _cpu_kernel.compiler() is not None


def reference(q, k, v, bias, g, causal=False):
    """Output and (dq, dk, dv) for cotangent g, float64, (B, T, H, D) layout, from
    p = softmax(q k^T + bias), o = p v and the softmax Jacobian diag(p) - p p^T;
    ``causal``: scores of keys j > i are -inf."""
    q, k, v, g = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, g))
    s = q @ k.swapaxes(-1, -2) + np.asarray(bias, np.float64)[:, None, None, :]
    if causal:
        t = s.shape[-1]
        s = s + np.where(np.tril(np.ones((t, t), bool)), 0.0, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = g @ v.swapaxes(-1, -2)
    ds = p * dp - p * (p * dp).sum(-1, keepdims=True)
    back = lambda x: x.transpose(0, 2, 1, 3)
    return back(p @ v), (back(ds @ k), back(ds.swapaxes(-1, -2) @ q), back(p.swapaxes(-1, -2) @ g))


def inputs(b, t, h, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(4))
    q = q / np.float32(np.sqrt(d))   # as the models scale queries: scores of unit variance
    mask = np.ones((b, t), np.int32)
    mask[1, 2 * t // 3:] = 0          # padded sequence
    if b > 2:
        mask[2, :] = 0                # nothing to attend to: uniform weights, finite output
    return q, k, v, g, key_bias(jnp.asarray(mask))


def targets(f, *args):
    hlo = jax.jit(f).lower(*args).as_text()
    return {name for name in _cpu_kernel.TARGETS if name in hlo}


def test_kernel_is_built_wherever_a_compiler_is():
    assert _cpu_kernel.available() == HAS_COMPILER


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernel needs a C++ compiler")
@pytest.mark.parametrize("shape", [(3, 64, 2, 32), (2, 128, 3, 64), (3, 96, 1, 32)])
@pytest.mark.parametrize("padded_cotangent", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_output_and_gradients_match_float64_numpy(shape, padded_cotangent, causal):
    q, k, v, g, bias = inputs(*shape)
    if padded_cotangent:   # as a masked loss gives: padded tokens' outputs get no cotangent
        g = g.at[1, 2 * shape[1] // 3 + 1:].set(0.0).at[0, shape[1] - 5:].set(0.0)
    attend = lambda q, k, v: key_masked_attention(q, k, v, bias, causal=causal)
    loss = lambda q, k, v: (attend(q, k, v) * g).sum()
    assert targets(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == {
        "jlora_attention_forward", "jlora_attention_backward"}
    assert targets(attend, q, k, v) == {"jlora_attention_inference"}
    out_ref, grads_ref = reference(q, k, v, bias, g, causal)
    out = jax.jit(attend)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=2e-6 * np.abs(out_ref).max())
    for got, want, name in zip(grads, grads_ref, "qkv"):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=f"d{name}")
    # masked keys get no attention, so no gradient reaches their k and v rows
    cut = 2 * shape[1] // 3
    assert np.all(np.asarray(grads[1])[1, cut:] == 0) and np.all(np.asarray(grads[2])[1, cut:] == 0)


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernel needs a C++ compiler")
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_gradients_match_jax_grad_of_the_plain_formula_in_float64(causal):
    q, k, v, g, bias = inputs(2, 64, 2, 32, seed=3)
    grads = jax.jit(jax.grad(lambda q, k, v: (key_masked_attention(q, k, v, bias, causal=causal) * g).sum(),
                             argnums=(0, 1, 2)))(q, k, v)
    with jax.enable_x64(True):
        t = lambda x: jnp.asarray(np.asarray(x), jnp.float64).swapaxes(1, 2)   # (B, H, T, D)
        b64 = jnp.asarray(np.asarray(bias), jnp.float64)[:, None, None, :]
        if causal:
            b64 = b64 + jnp.where(jnp.tril(jnp.ones((64, 64), bool)), 0.0, -jnp.inf)
        plain = lambda q, k, v: (jax.nn.softmax(q @ k.swapaxes(-1, -2) + b64, axis=-1) @ v * t(g)).sum()
        want = jax.grad(plain, argnums=(0, 1, 2))(t(q), t(k), t(v))
        for got, ref, name in zip(grads, want, "qkv"):
            ref = np.asarray(ref).swapaxes(1, 2)
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_shapes_the_kernel_does_not_take_use_xla_attention_with_the_same_math(causal):
    q, k, v, g, bias = inputs(2, 20, 2, 8)   # T and head_dim not multiples of 32
    loss = lambda q, k, v: (key_masked_attention(q, k, v, bias, causal=causal) * g).sum()
    assert targets(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == set()
    out_ref, grads_ref = reference(q, k, v, bias, g, causal)
    np.testing.assert_allclose(key_masked_attention(q, k, v, bias, causal=causal), out_ref, rtol=0, atol=1e-5)
    for got, want in zip(jax.grad(loss, argnums=(0, 1, 2))(q, k, v), grads_ref):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernel needs a C++ compiler")
def test_kernel_under_vmap_equals_a_loop_in_one_call():
    q, k, v, g, bias = inputs(2, 32, 2, 32)
    stack = lambda x: jnp.stack([x, 2 * x])
    loss = lambda q, k, v: (key_masked_attention(q, k, v, bias) * g).sum()
    batched = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    hlo = jax.jit(batched).lower(stack(q), stack(k), stack(v)).as_text()
    assert "jlora_attention_forward" in hlo and "while" not in hlo   # one call, not a loop
    values, grads = batched(stack(q), stack(k), stack(v))
    for i, s in enumerate((1, 2)):
        value, grad = jax.value_and_grad(loss, argnums=(0, 1, 2))(s * q, s * k, s * v)
        np.testing.assert_allclose(values[i], value, rtol=1e-5)
        for got, want in zip(grads, grad):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernel needs a C++ compiler")
def test_decoder_lm_runs_the_causal_kernel_and_matches_its_float64_gradients():
    """The decoder LM (causal attention, no padding) takes the kernel in float32;
    its LoRA factor gradients equal the float64 model's (XLA attention there)."""
    import jlora
    from experiments.models.decoder import DecoderLM, lm_loss

    model = DecoderLM(vocab=64, d_model=64, n_layers=2, n_heads=2, max_len=64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 64)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    spec = jlora.Spec({"**/layers_*/{query,key,value,out,up,down}/kernel": jlora.LoRA(rank=2)})
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1)))
    rng = np.random.default_rng(2)   # b = 0 at init: move every factor so that all get gradients
    trainable = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape), x.dtype), trainable)

    def grad(t, f):
        loss = lambda t: lm_loss(jlora.linen.apply(model, {"params": jlora.combine(t, f)}, tokens), tokens)
        return jax.jit(jax.grad(loss))(t)

    assert targets(lambda t: grad(t, frozen), trainable) == {"jlora_attention_forward",
                                                            "jlora_attention_backward"}
    got = grad(trainable, frozen)
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), tree)
        want = grad(to64(trainable), to64(frozen))
    for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        r = np.asarray(r)
        assert np.abs(r).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-4 * np.abs(r).max(), err_msg=jax.tree_util.keystr(path))


def test_kernel_switch_and_a_failed_build_fall_back_with_a_warning(monkeypatch, tmp_path):
    _cpu_kernel.available.cache_clear()
    try:
        monkeypatch.setenv("JLORA_CPU_ATTENTION", "0")
        assert not _cpu_kernel.available()
        monkeypatch.delenv("JLORA_CPU_ATTENTION")
        _cpu_kernel.available.cache_clear()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("JLORA_KERNEL_CACHE", str(tmp_path / "cache"))
        with pytest.warns(RuntimeWarning, match="no-such-compiler"):
            assert not _cpu_kernel.available()
        assert not list((tmp_path / "cache").glob("*.so*"))   # nothing half-written left behind
        _cpu_kernel.available.cache_clear()
        failing = tmp_path / "failing-cxx"
        failing.write_text("#!/bin/sh\necho 'note: context' >&2\necho 'x.cc:1: error: bad' >&2\nexit 1\n")
        failing.chmod(0o755)
        monkeypatch.setenv("CXX", str(failing))
        with pytest.warns(RuntimeWarning, match="failed on _cpu_attention.cc: x.cc:1: error: bad"):
            assert not _cpu_kernel.available()
        assert not list((tmp_path / "cache").glob("*.so*"))
    finally:
        monkeypatch.undo()
        _cpu_kernel.available.cache_clear()
