"""LoftQ against a float64 numpy reference of the alternation (PEFT's needs bitsandbytes on GPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64
from tests.quant_ref import ref_quantize

K0 = jax.random.normal(jax.random.key(0), (128, 48)) * 0.05  # (in, out)


def ref_loftq(k, rank, n_iter):
    """float64: PyTorch-layout W = Kᵀ; Qd = NF4(res); L, R = rank-r SVD of W − Qd."""
    w = f64(k).T
    res = w.copy()
    for t in range(n_iter):
        qd = ref_quantize(res.T, "nf4", 64, False)["deq"].T  # ref_quantize reads (in, out)
        u, s, vh = np.linalg.svd(w - qd, full_matrices=False)
        lo, ro = u[:, :rank] * np.sqrt(s[:rank]), np.sqrt(s[:rank])[:, None] * vh[:rank]
        if t < n_iter - 1:
            res = w - lo @ ro
    return qd, lo, ro


def build(**kw):
    spec = jlora.Spec({"w/kernel": jlora.LoftQ(**kw)})
    return jlora.apply({"w": {"kernel": K0}}, spec, key=jax.random.key(1))["w"]["kernel"]


@pytest.mark.parametrize("n_iter", [1, 3])
def test_matches_float64_reference_at_alpha_equal_rank(n_iter):
    node = build(rank=4, loftq_iter=n_iter)
    qd, lo, ro = ref_loftq(K0, 4, n_iter)
    deq = f64(jlora.dequantize(node.quantized))
    mismatch = np.mean(np.abs(deq - qd.T) > 1e-6)
    assert mismatch < 1e-3  # bit-equal codes but for threshold ties of float32 residuals
    lr = (lo @ ro).T
    np.testing.assert_allclose(node.scale * f64(node.a) @ f64(node.b), lr, rtol=1e-3,
                               atol=1e-4 * np.abs(lr).max())
    # at alpha = rank the factors are PEFT's: a = Rᵀ, b = Lᵀ up to a paired sign
    sign = np.sign(np.sum(f64(node.a) * ro.T, axis=0))
    np.testing.assert_allclose(f64(node.a) * sign, ro.T, atol=1e-3 * np.abs(ro).max())
    np.testing.assert_allclose(f64(node.b) * sign[:, None], lo.T, atol=1e-3 * np.abs(lo).max())


def test_scale_is_handled_for_every_alpha_and_error_shrinks():
    ref = build(rank=4, loftq_iter=2)
    for kw in (dict(alpha=16.0), dict(alpha=3.0, rslora=True)):
        node = build(rank=4, loftq_iter=2, **kw)
        assert node.scale != 1.0
        np.testing.assert_allclose(f64(jlora.merge({"x": node})["x"]),
                                   f64(jlora.merge({"x": ref})["x"]), atol=1e-5)
    k = f64(K0)
    qlora = jlora.apply({"w": {"kernel": K0}}, jlora.Spec({"w/kernel": jlora.QLoRA(
        rank=4, double_quant=False)}), key=jax.random.key(1))["w"]["kernel"]
    errs = [np.linalg.norm(f64(jlora.merge({"x": qlora})["x"]) - k)]
    for n in (1, 3):
        errs.append(np.linalg.norm(f64(jlora.merge({"x": build(rank=4, loftq_iter=n)})["x"]) - k))
    assert errs[0] > errs[1] > errs[2]


def test_double_quant_base_is_what_the_factors_fit_and_fast_path():
    node = build(rank=4, loftq_iter=2, double_quant=True)
    assert node.quantized.absmax2 is not None
    x = jax.random.normal(jax.random.key(5), (3, 128))
    merged = f64(jlora.dequantize(node.quantized)) + node.scale * f64(node.a) @ f64(node.b)
    y = jlora.linen.apply(nn.Dense(48), {"params": {"kernel": node, "bias": jnp.zeros(48)}}, x)
    np.testing.assert_allclose(f64(y), f64(x) @ merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, match", [(dict(loftq_iter=0), "loftq_iter"),
                                       (dict(init="gaussian"), "init"),
                                       (dict(rank=49), "exceeds")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        build(**{"rank": 4, **kw})
