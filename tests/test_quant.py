"""jlora.quant: NF4/FP4/int8 blockwise quantization against a float64 numpy
reference of the block algorithm and against bitsandbytes itself (CPU)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jlora
from jlora import quant as Q
from tests.quant_ref import near_midpoint, ref_quantize

# bitsandbytes get_4bit_type("nf4"), as printed in the QLoRA code.
NF4_REF = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
           0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_nf4_codebook_is_bitsandbytes():
    assert Q.NF4.dtype == np.float32
    np.testing.assert_array_equal(Q.NF4, np.asarray(NF4_REF, np.float32))
    # construction (QLoRA App. E): 8 positive normal quantiles, 7 negative, exact 0
    assert (Q.NF4 > 0).sum() == 8 and (Q.NF4 < 0).sum() == 7 and (Q.NF4 == 0).sum() == 1


def test_dynamic_map_shape():
    m = Q.dynamic_map()
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[-1] == 1.0 and 0.0 in m and abs(m[0] + 0.99297) < 1e-4


@pytest.mark.parametrize("quant,shape,bs", [("nf4", (128, 96), 64), ("nf4", (130, 33), 64),
                                           ("fp4", (64, 64), 128)])
def test_quantize_matches_float64_reference(quant, shape, bs):
    k = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    qa = jlora.quantize(jnp.asarray(k), quant, bs, True)
    ref = ref_quantize(k, quant, bs, True)
    n = k.size
    q = np.asarray(Q.unpack(qa.codes, n))
    tie = near_midpoint(ref["scaled"], Q.codebook(quant))
    assert tie.mean() < 1e-3
    code = Q.codebook(quant)  # FP4 holds 0 twice: compare the values the codes stand for
    np.testing.assert_array_equal(code[q[~tie]], code[ref["q"][~tie]])
    # the scales decode from their 8-bit codes: dynamic_map[code]·absmax2 (per 256) + offset
    q2 = np.asarray(qa.absmax).reshape(-1)
    dyn = np.asarray(Q.dynamic_map(), np.float64)
    want = dyn[q2] * np.repeat(np.asarray(qa.absmax2, np.float64).reshape(-1), 256)[:q2.size]
    np.testing.assert_allclose(np.asarray(qa.scales(), np.float64).reshape(-1),
                               want + float(qa.offset), rtol=1e-6, atol=1e-12)
    # the 8-bit codes of the absmax equal the reference away from midpoints
    tie2 = near_midpoint(ref["scaled2"], Q.dynamic_map())
    np.testing.assert_array_equal(np.asarray(qa.absmax).reshape(-1)[~tie2], ref["q2"][~tie2])
    np.testing.assert_allclose(np.asarray(qa.absmax2), ref["absmax2"], rtol=1e-6)
    # dequantized values equal the reference (given the same codes)
    deq = np.asarray(jlora.dequantize(qa, jnp.float32), np.float64)
    if not tie.any() and not tie2.any():
        np.testing.assert_allclose(deq, ref["deq"], rtol=1e-5, atol=1e-6)
    # double quantization round trip of the scales: within the dynamic map's error
    am = np.asarray(qa.scales(), np.float64)
    err = np.abs(am - ref["absmax"])
    half_gap = np.max(np.diff(np.asarray(Q.dynamic_map(), np.float64))) / 2
    assert np.all(err <= half_gap * ref["absmax2"].max() * 1.0001 + 1e-6)


def test_ties_go_to_the_lower_code_and_high_nibble_first():
    mids = ((Q.NF4[:-1] + Q.NF4[1:]) / np.float32(2)).astype(np.float32)
    # a block of 64 whose absmax is 1: the midpoints themselves must land low
    block = np.zeros(64, np.float32)
    block[0] = 1.0
    block[1:16] = mids
    qa = jlora.quantize(jnp.asarray(block)[:, None], "nf4", 64, False)  # (in=64, out=1)
    q = np.asarray(Q.unpack(qa.codes, 64))
    np.testing.assert_array_equal(q[1:16], np.arange(15))
    assert int(np.asarray(qa.codes).reshape(-1)[0]) == (15 << 4) | 0


def test_int8_blockwise():
    k = np.random.default_rng(2).standard_normal((128, 40)).astype(np.float32)
    qa = jlora.quantize(k, "int8", 64, False)
    assert qa.codes.dtype == jnp.int8 and qa.codes.shape == (40, 128)
    flat = k.T.reshape(-1).astype(np.float64)
    absmax = np.abs(flat.reshape(-1, 64)).max(1)
    q = np.round(flat.reshape(-1, 64) / absmax[:, None] * 127)
    np.testing.assert_array_equal(np.asarray(qa.codes).reshape(-1), q.reshape(-1))
    np.testing.assert_allclose(np.asarray(jlora.dequantize(qa)),
                               (q / 127 * absmax[:, None]).reshape(40, 128).T, rtol=1e-6)


def test_stacked_slices_are_their_own_bnb_weights_and_bytes_per_parameter():
    k = np.random.default_rng(3).standard_normal((3, 128, 64)).astype(np.float32)
    qa = jlora.quantize(k, "nf4", 64, True, stack_axes=(0,))
    assert qa.codes.shape == (3, 64, 64) and qa.absmax.shape == (3, 64, 2)
    assert qa.offset.shape == (3,)  # one double-quantization state per slice
    deq = np.asarray(jlora.dequantize(qa))
    for e in range(3):
        one = jlora.quantize(k[e], "nf4", 64, True)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(qa)):
            np.testing.assert_array_equal(np.asarray(b[e]), np.asarray(a))
        np.testing.assert_allclose(deq[e], np.asarray(jlora.dequantize(one)), rtol=1e-6)
    # a map over the stacked axis sees one slice (as nn.scan does)
    mapped = jax.lax.map(lambda s: s.slice_view().dequantize(), qa)
    np.testing.assert_allclose(np.asarray(mapped), deq, rtol=1e-6)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="quant"):
        jlora.quantize(jnp.ones((64, 4)), "nf3")
    with pytest.raises(ValueError, match="block_size"):
        jlora.quantize(jnp.ones((64, 4)), "nf4", 0)
    with pytest.raises(ValueError, match="floating"):
        jlora.quantize(jnp.ones((64, 4), jnp.int32))
    with pytest.raises(ValueError, match="QuantizedArray"):
        jlora.dequantize(jnp.ones(3))


def test_jit_and_pytree():
    k = jnp.asarray(np.random.default_rng(4).standard_normal((64, 8)), jnp.float32)
    qa = jax.jit(lambda x: jlora.quantize(x))(k)
    leaves = jax.tree.leaves(qa)
    assert len(leaves) == 4
    eager = jlora.quantize(k)
    for a, b in zip(leaves, jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(jax.jit(jlora.dequantize)(qa)),
                               np.asarray(jlora.dequantize(eager)), rtol=1e-6)


# ------------------------------------------------------------ bitsandbytes itself

@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_matches_bitsandbytes(quant):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    np.testing.assert_array_equal(Q.codebook(quant), F.get_4bit_type(quant, "cpu").numpy())
    np.testing.assert_array_equal(Q.DYNAMIC, F.create_dynamic_map().numpy())
    k = np.random.default_rng(5).standard_normal((256, 96)).astype(np.float32)
    w = torch.tensor(k.T.copy())  # PyTorch (out, in)
    qb, st = F.quantize_4bit(w, blocksize=64, quant_type=quant, compress_statistics=False)
    qa = jlora.quantize(k, quant, 64, False)
    np.testing.assert_array_equal(np.asarray(qa.codes).reshape(-1), qb.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(qa.absmax).reshape(-1), st.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(jlora.dequantize(qa)),
                                  F.dequantize_4bit(qb, st).numpy().T)
    # double quantization: same 4-bit codes, same offset, 8-bit codes of the
    # scales equal up to bnb's native CPU search (off by a code near midpoints)
    qb2, st2 = F.quantize_4bit(w, blocksize=64, quant_type=quant, compress_statistics=True)
    qa2 = jlora.quantize(k, quant, 64, True)
    np.testing.assert_array_equal(np.asarray(qa2.codes).reshape(-1), qb2.numpy().reshape(-1))
    np.testing.assert_allclose(float(qa2.offset), float(st2.offset), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qa2.absmax2), st2.state2.absmax.numpy(), rtol=1e-6)
    assert (np.asarray(qa2.absmax).reshape(-1) != st2.absmax.numpy()).mean() < 0.01
    bnb_deq = F.dequantize_4bit(qb2, st2).numpy().T
    np.testing.assert_allclose(np.asarray(jlora.dequantize(qa2)), bnb_deq,
                               atol=0.02 * np.abs(k).max())


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_an_all_zero_block_dequantizes_to_exact_zeros(quant, double_quant):
    k = np.random.default_rng(2).standard_normal((128, 6)).astype(np.float32)
    k[:, 5] = 0.0  # one output column of zeros: two whole blocks of 64
    deq = np.asarray(jlora.dequantize(jlora.quantize(k, quant, 64, double_quant), jnp.float32))
    np.testing.assert_array_equal(deq[:, 5], 0.0)
    assert np.abs(deq[:, :5] - k[:, :5]).max() < 0.2 * np.abs(k).max()
    # a QLoRA layer at init (b = 0) gives exact zeros on that output
    adapted = jlora.apply({"w": jnp.asarray(k)}, jlora.Spec({"w": jlora.QLoRA(
        rank=2, quant=quant, double_quant=double_quant)}), key=jax.random.key(0))
    y = adapted["w"].dot(jnp.ones((3, 128)), lambda x, w: x @ w)
    np.testing.assert_array_equal(np.asarray(y)[:, 5], 0.0)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_blocks_near_float32s_largest_values_keep_their_codes(quant):
    """1/absmax is subnormal above 2¹²⁶ (and flushed on CPU): such blocks must still
    quantize like any other, i.e. like the same block scaled down by a power of two."""
    k = np.clip(np.random.default_rng(0).standard_normal((128, 2)), -2.5, 2.5).astype(np.float32)
    k[[0, 64]] = 2.5  # every block's absmax: 2.5·2¹²⁵ ≥ 2¹²⁶, still finite
    big = k * np.float32(2.0 ** 125)  # exact multiples
    q_big, q_small = (jlora.quantize(x, quant, 64, False) for x in (big, k))
    np.testing.assert_array_equal(np.asarray(q_big.codes), np.asarray(q_small.codes))
    np.testing.assert_allclose(np.asarray(jlora.dequantize(q_big), np.float64),
                               np.asarray(jlora.dequantize(q_small), np.float64) * 2.0 ** 125,
                               rtol=1e-6)


def test_an_odd_count_pads_with_the_code_of_zero_as_bitsandbytes():
    k = np.random.default_rng(3).standard_normal((33, 7)).astype(np.float32)  # 231 values
    for quant in ("nf4", "fp4"):
        codes = np.asarray(jlora.quantize(k, quant, 64, False).codes).reshape(-1)
        assert codes.size == 116
        zero = int(np.flatnonzero(Q.codebook(quant) == 0.0)[0])  # bnb quantizes the pad 0.0
        assert codes[-1] & 0xF == zero


def test_axes_options_and_dequantize_dtype_are_checked():
    k = jnp.ones((64, 4))
    q = jlora.quantize(k, in_axes=0)  # an int is one axis, as in the configs
    assert q.perm == jlora.quantize(k, in_axes=(0,)).perm
    with pytest.raises(ValueError, match="in_axes must be an int or a tuple of ints"):
        jlora.quantize(k, in_axes=(0.5,))
    with pytest.raises(ValueError, match=r"stack_axes \(0, -3\) repeat an axis"):
        jlora.quantize(jnp.ones((2, 64, 4)), stack_axes=(0, -3))
    for bad in ("foo", jnp.int32):
        with pytest.raises(ValueError, match="dequantize: dtype must be a floating dtype"):
            jlora.dequantize(q, bad)
    assert jlora.QLoRA(rank=2, in_axes=0).in_axes == (0,)
    with pytest.raises(ValueError, match=r"QLoRA: in_axes must be an int or a non-empty tuple of ints"):
        jlora.QLoRA(rank=2, in_axes=(True,))


def test_merge_onto_a_quantized_copy_says_to_dequantize_it():
    k = jnp.asarray(np.random.default_rng(0).standard_normal((64, 4)), jnp.float32)
    adapted = jlora.apply({"w": k}, jlora.Spec({"w": jlora.QLoRA(rank=2)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"params hold a tree, not one array, at adapted path\(s\) "
                                         r"\['w'\] \(a quantized weight\? dequantize it first"):
        jlora.merge(adapted, onto={"w": jlora.quantize(k)})
    served = jlora.merge(adapted, onto=jlora.quant.dequantize_tree({"w": jlora.quantize(k)}))
    assert served["w"].shape == (64, 4)
