"""jlora.QLoRA: quantized base through jlora.apply, fast path with a custom VJP
that keeps no dequantized weight, merge, bytes per parameter."""

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import quant as Q
from jlora.methods.qlora import quantized_dot
from tests._refs import f64
from tests.quant_ref import near_midpoint, ref_quantize


def _bump(adapted, size=0.1):
    def one(n):
        if not isinstance(n, jlora.methods.QLoRANode):
            return n
        kb = jax.random.key(n.b.size)
        return n.replace(b=size * jax.random.normal(kb, n.b.shape, n.b.dtype))
    return jax.tree.map(one, adapted, is_leaf=jlora.is_node)


def test_apply_quantizes_like_bitsandbytes_reference():
    k = np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32)
    adapted = jlora.apply({"d": {"kernel": jnp.asarray(k)}},
                          jlora.Spec({"**/kernel": jlora.QLoRA(rank=4)}), key=jax.random.key(0))
    node = adapted["d"]["kernel"]
    assert node.quantized.codes.dtype == jnp.uint8 and node.quantized.codes.shape == (96, 128)
    assert node.quantized.absmax.dtype == jnp.uint8 and node.quantized.offset.shape == ()
    ref = ref_quantize(k, "nf4", 64, True)
    tie = near_midpoint(ref["scaled"], Q.NF4) | np.repeat(
        near_midpoint(ref["scaled2"], Q.DYNAMIC), 64)[: k.size]
    got = f64(node.base).T.reshape(-1)
    want = ref["deq"].T.reshape(-1)
    np.testing.assert_allclose(got[~tie], want[~tie], rtol=1e-5, atol=1e-6)
    # merge: dequantized base + s·a·b in the compute dtype
    node = _bump(adapted)["d"]["kernel"]
    merged = jlora.merge({"k": node})["k"]
    np.testing.assert_allclose(f64(merged), f64(node.base) + node.scale * f64(node.a) @ f64(node.b),
                               rtol=1e-5, atol=1e-5)
    bf = jlora.apply({"k": jnp.asarray(k)}, jlora.Spec({"k": jlora.QLoRA(
        rank=4, compute_dtype=jnp.bfloat16)}), key=jax.random.key(0))
    assert jlora.merge(bf)["k"].dtype == jnp.bfloat16


def test_bytes_per_base_parameter():
    params = {"k": jnp.ones((1024, 1024), jnp.bfloat16)}
    node = jlora.apply(params, jlora.Spec({"k": jlora.QLoRA(rank=8)}), key=jax.random.key(0))["k"]
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(node.quantized))
    assert nbytes / (1024 * 1024) <= 0.52  # 4 + 8/64 + 32/(64·256) bits ≈ 0.516 B
    no_dq = jlora.apply(params, jlora.Spec({"k": jlora.QLoRA(rank=8, double_quant=False)}),
                        key=jax.random.key(0))["k"]
    assert no_dq.base_nbytes() == 1024 * 1024 // 2 + 4 * 1024 * 1024 // 64


def test_custom_vjp_matches_plain_dequantize_then_matmul_float64():
    with jax.enable_x64(True):
        k = jnp.asarray(np.random.default_rng(1).standard_normal((128, 48)))
        q = jlora.quantize(k, "nf4", 64, True)
        x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 128)))
        g = jnp.asarray(np.random.default_rng(3).standard_normal((5, 48)))
        op = lambda x, w: x @ w
        fast = lambda x: jnp.sum(g * quantized_dot(x, q, op, jnp.float64))
        plain = lambda x: jnp.sum(g * (x @ jlora.dequantize(q, jnp.float64)))
        np.testing.assert_allclose(fast(x), plain(x), rtol=1e-12)
        np.testing.assert_allclose(jax.grad(fast)(x), jax.grad(plain)(x), rtol=1e-12)
        # and against numpy: ∂/∂x Σ g⊙(x·W) = g·Wᵀ
        w = f64(jlora.dequantize(q, jnp.float64))
        np.testing.assert_allclose(jax.grad(fast)(x), f64(g) @ w.T, rtol=1e-12)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(32)(nn.relu(nn.Dense(64)(x)))


def test_fast_path_forward_and_gradients_equal_merged_model():
    model, x = MLP(), jax.random.normal(jax.random.key(0), (5, 128))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = _bump(jlora.apply(params, jlora.Spec({"**/kernel": jlora.QLoRA(rank=4)}),
                                key=jax.random.key(2)))
    assert jlora.linen.consumed(model, {"params": adapted}, x)["merged"] == []
    trainable, frozen = jlora.split(adapted)

    def loss(t, f, fast):
        a = jlora.combine(t, f)
        y = (jlora.linen.apply(model, {"params": a}, x) if fast
             else model.apply({"params": jlora.merge(a)}, x))
        return jnp.sum(jnp.sin(y))

    lf = jax.jit(loss, static_argnums=2)
    np.testing.assert_allclose(lf(trainable, frozen, True), lf(trainable, frozen, False),
                               rtol=1e-5)
    g1 = jax.jit(jax.grad(loss), static_argnums=2)(trainable, frozen, True)
    g2 = jax.jit(jax.grad(loss), static_argnums=2)(trainable, frozen, False)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="quant"):
        jlora.QLoRA(rank=4, quant="nf5")
    with pytest.raises(ValueError, match="compute_dtype"):
        jlora.QLoRA(rank=4, compute_dtype=jnp.int8)
    with pytest.raises(ValueError, match="block_size"):
        jlora.QLoRA(rank=4, block_size=63)
    with pytest.raises(ValueError, match="unknown option"):
        jlora.QLoRA(rank=4, double_quantize=True)


class TorchTwin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(32, name="fc2")(nn.relu(nn.Dense(64, name="fc1")(x)))


def test_peft_save_is_a_plain_lora_adapter_that_peft_loads_on_bnb_4bit(tmp_path):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    model, x = TorchTwin(), jax.random.normal(jax.random.key(0), (3, 64))
    params = model.init(jax.random.key(1), x)["params"]
    spec = jlora.Spec({"*/kernel": jlora.QLoRA(rank=4, alpha=8, double_quant=False)})
    adapted = _bump(jlora.apply(params, spec, key=jax.random.key(2)))
    jlora.peft.save(str(tmp_path), adapted)
    # the same base as a bitsandbytes 4-bit model (bnb quantizes the float weight
    # itself: the codes equal jlora's), then PEFT's LoRA on top
    seq = torch.nn.Sequential()
    for name, (i, o) in (("fc1", (64, 64)), ("fc2", (64, 32))):
        lin = bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, compress_statistics=False,
                                quant_type="nf4")
        lin.load_state_dict({"weight": torch.tensor(np.asarray(params[name]["kernel"]).T),
                             "bias": torch.tensor(np.asarray(params[name]["bias"]))})
        seq.add_module(name, lin.to("cpu"))
        codes = np.asarray(adapted[name]["kernel"].quantized.codes).reshape(-1)
        np.testing.assert_array_equal(lin.weight.data.numpy().reshape(-1), codes)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = seq.fc1, seq.fc2

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    net = peft.PeftModel.from_pretrained(Net(), str(tmp_path)).eval()
    xt = torch.tensor(np.asarray(x))
    for name in ("fc1", "fc2"):  # PEFT's LoRA branch on the 4-bit layer is jlora's delta
        layer, node = getattr(net.base_model.model, name), adapted[name]["kernel"]
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), node.a.T)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), node.b.T)
        assert layer.scaling["default"] == node.scale
    with torch.no_grad():
        y_torch = net(xt).numpy()
    y_jax = jlora.linen.apply(model, {"params": adapted}, x)
    # bitsandbytes' CPU kernel repacks the weight after its first call and then
    # computes in reduced precision: agreement to that precision
    np.testing.assert_allclose(y_torch, y_jax, rtol=0, atol=3e-2 * float(jnp.abs(y_jax).max()))
    # and back: the PEFT adapter onto a jlora-quantized base (its codes untouched)
    qparams = jax.tree.map(lambda n: n.quantized if jlora.is_node(n) else n, adapted,
                           is_leaf=jlora.is_node)
    back = jlora.peft.load(str(tmp_path), Q.dequantize_tree(qparams))
    back = jlora.methods.qlora.from_lora(back, qparams)
    assert isinstance(back["fc1"]["kernel"], jlora.methods.QLoRANode)
    np.testing.assert_allclose(jlora.linen.apply(model, {"params": back}, x), y_jax,
                               rtol=1e-5, atol=1e-5)


def test_from_lora_keeps_nodes_that_train_one_factor_and_says_so():
    params = {n: {"kernel": jax.random.normal(jax.random.key(i), (64, 16))}
              for i, n in enumerate(("fa", "mica", "plain"))}
    spec = jlora.Spec({"fa/kernel": jlora.LoRA(rank=2, train_a=False),
                       "mica/kernel": jlora.LoRA(rank=2, init="mica"),
                       "plain/kernel": jlora.LoRA(rank=2)})
    adapted = jlora.apply(params, spec, key=jax.random.key(3))
    with pytest.warns(UserWarning, match=r"fa/kernel \(trains b only\); mica/kernel \(trains a only\)"):
        out = jlora.methods.qlora.from_lora(adapted)
    assert out["fa"]["kernel"] is adapted["fa"]["kernel"]
    assert out["mica"]["kernel"] is adapted["mica"]["kernel"]
    assert isinstance(out["plain"]["kernel"], jlora.methods.QLoRANode)
    assert jlora.count_trainable(out) == jlora.count_trainable(adapted)  # nothing unfrozen


@pytest.mark.experiments
def test_study_smoke():
    import argparse

    from experiments import qlora_study
    from experiments.models.decoder import DecoderLM

    args = argparse.Namespace(d_model=32, layers=1, vocab=16, seq=8, batch=4, steps=2, rank=2,
                              lr=1e-3, lr_full=1e-3, seed=0)
    model = DecoderLM(vocab=16, d_model=32, n_layers=1, n_heads=1, max_len=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    r = qlora_study.run_variant("qlora", params, args)
    assert r["variant"] == "qlora" and len(r["losses"]) == 2 and 0 <= r["accuracy"] <= 1
    assert 0.5 < r["base_bytes_per_param"] < 0.6


def test_checkpoint_frozen_half_holding_quantized_base_round_trips(tmp_path):
    """``jlora.checkpoint`` stores a QLoRA frozen half: codes and scales as arrays,
    the block layout as JSON data (no pickle), stacked (expert) bases included."""
    import re

    params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (128, 24))},
              "moe": {"w": jax.random.normal(jax.random.key(1), (2, 64, 16))}}
    spec = jlora.Spec({"fc/kernel": jlora.QLoRA(rank=2),
                       "moe/w": jlora.QLoRA(rank=2, quant="int8", expert_axis=0,
                                            double_quant=False)})
    t, f = jlora.split(jlora.apply(params, spec, key=jax.random.key(2)))
    jlora.checkpoint.save(str(tmp_path), t, step=3, frozen=f, spec=spec)
    got = jlora.checkpoint.restore(str(tmp_path))
    assert jax.tree.structure(got["frozen"]) == jax.tree.structure(f)
    for a, b in zip(jax.tree.leaves(got["frozen"]), jax.tree.leaves(f)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = got["frozen"]["fc"]["kernel"].quantized
    assert q.codes.dtype == jnp.uint8 and q.double_quant and q.perm == f["fc"]["kernel"].quantized.perm
    meta = tmp_path / "3" / "meta" / "metadata"
    text = meta.read_text()
    assert '"quantized"' in text
    bad, n = re.subn(r'"perm":\s*\{"tuple":\s*\[1,\s*0\]\}', '"perm": {"tuple": [0, 0]}', text)
    assert n == 1
    meta.write_text(bad)
    with pytest.raises(ValueError, match="malformed quantized array layout"):
        jlora.checkpoint.restore(str(tmp_path))


def test_dropout_on_a_kernel_whose_inputs_do_not_lead():
    """A (out, in) kernel (in_axes=(1,)) has no low-rank fast path; with a dropout key
    the branch still sees the dropped input: y = x·deq(K0)ᵀ + s·(drop(x)·a)·b."""
    k = jnp.asarray(np.random.default_rng(0).standard_normal((24, 64)), jnp.float32)
    node = jlora.apply({"w": k}, jlora.Spec({"w": jlora.QLoRA(rank=2, alpha=4, dropout=0.5,
                                                              in_axes=(1,))}),
                       key=jax.random.key(0))["w"]
    node = node.replace(b=jnp.asarray(np.random.default_rng(1).standard_normal((2, 24)),
                                      jnp.float32))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 64)), jnp.float32)
    key = jax.random.key(3)
    keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
    xd = np.where(keep, f64(x) / 0.5, 0.0)
    op = lambda x, w: x @ w.T
    want = f64(x) @ f64(node.base).T + 2.0 * (xd @ f64(node.a)) @ f64(node.b)
    np.testing.assert_allclose(f64(node.dot(x, op, dropout_key=key)), want, rtol=1e-5, atol=1e-5)
    eval_want = f64(x) @ (f64(node.base).T + 2.0 * f64(node.a) @ f64(node.b))
    np.testing.assert_allclose(f64(node.dot(x, op)), eval_want, rtol=1e-5, atol=1e-5)


def test_bf16_factors_merge_onto_the_float32_dequantized_base_without_rounding_it():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
    node = jlora.apply({"w": w}, jlora.Spec({"w": jlora.QLoRA(rank=4, dtype=jnp.bfloat16)}),
                       key=jax.random.key(0))["w"]
    assert node.compute_dtype == jnp.float32 and node.a.dtype == jnp.bfloat16
    # b = 0 at init: the merge is the dequantized base itself (7.8e-3 off when rounded to bf16)
    np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(node.base))
    node = node.replace(b=jnp.asarray(rng.normal(size=node.b.shape), jnp.bfloat16))
    want = f64(node.base) + node.scale * f64(node.a) @ f64(node.b)
    np.testing.assert_allclose(f64(node.materialize()), want, rtol=1e-6, atol=1e-5)
