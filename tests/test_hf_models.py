"""jlora on models no one on the project wrote: Hugging Face transformers Flax BERT, GPT-2
and Llama (tiny random configs) and a Gemma-style ``nn.Einsum`` block. No hand-written
``in_axes``: presets plus ``jlora.linen.resolve`` orient every adapter."""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64, perturb
from tests.hf_models import (RANK, VOCAB, FAMILIES, GemmaLM, build, full_products,
                       logits, loss_fn, tokens, torch_twin)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers not installed")
needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "peft")),
    reason="torch and peft not installed")

CONFIG = jlora.LoRA(rank=RANK, alpha=2 * RANK)
TARGETS = {"bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                    "output.dense"],
           "gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"]}
_CACHE = {}


def adapt(params, spec):
    """``jlora.apply`` with non-zero factors, compiled once (eager dispatch is slow)."""
    return jax.jit(lambda p: perturb(jlora.apply(p, spec, key=jax.random.key(1)), size=0.3))(
        params)


def adapted_model(name):
    """(model, params, ids, adapted): all-linear preset, resolved against the model."""
    if name not in _CACHE:
        model, params = build(name)
        ids = tokens()
        spec = jlora.linen.resolve(model, {"params": params}, ids,
                                   spec=jlora.presets.spec(name, "all-linear", CONFIG))
        adapted = adapt(params, spec)
        _CACHE[name] = model, params, ids, adapted
    return _CACHE[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_preset_resolve_fast_path_equals_merged_and_is_factorized(name):
    model, params, ids, adapted = adapted_model(name)
    nodes = {p: n for p, n in jlora.tree.leaves_with_paths(adapted) if jlora.is_node(n)}
    n_layers = 1
    assert len(nodes) == n_layers * {"bert": 6, "gpt2": 4, "llama": 7}[name]
    if name == "gpt2":  # FlaxConv1D stores (out, in)
        assert all(n.in_axes == (1,) for n in nodes.values())
        assert nodes["transformer/h/0/attn/c_attn/kernel"].a.shape == (16, RANK)
    else:
        assert all(n.in_axes == (0,) for n in nodes.values())
    assert not any("lm_head" in p or "classifier" in p for p in nodes)
    fast = jax.jit(lambda p: logits(model, p, ids, strict=True))(adapted)  # strict: none merged
    merged = jax.jit(lambda p: model(ids, params=jlora.merge(p)).logits)(adapted)
    np.testing.assert_allclose(f64(fast), f64(merged), rtol=1e-5, atol=1e-5)
    base = jax.jit(lambda p: model(ids, params=p).logits)(params)
    assert np.max(np.abs(f64(fast) - f64(base))) > 1e-3  # the adapters do something



@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_step_is_factorized_and_lowers_the_loss(name):
    model, params, ids, adapted = adapted_model(name)
    losses = train(lambda p: loss_fn(name, logits(model, p, ids), ids), adapted)
    assert losses[-1] < losses[0] - 0.01, losses


def train(loss, adapted, steps=6):
    """Adam on the factors through a compiled step whose HLO holds no full-size product."""
    trainable, frozen = jlora.split(adapted)
    tx = optax.adam(3e-2)

    def step(t, opt):
        value, g = jax.value_and_grad(lambda t: loss(jlora.combine(t, frozen)))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, value

    opt = tx.init(trainable)
    compiled = jax.jit(step).lower(trainable, opt).compile()
    assert full_products(compiled, adapted) == []
    losses = []
    for _ in range(steps):
        trainable, opt, value = compiled(trainable, opt)
        losses.append(float(value))
    return losses


def test_full_product_probe_sees_a_merged_weight():
    """The HLO probe finds the (in, out) products where the merged path forms them."""
    import flax.linen as nn

    model, x = nn.Dense(24), jnp.ones((15, 16))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": CONFIG}), key=jax.random.key(0))
    trainable, frozen = jlora.split(adapted)
    merged = lambda t: jnp.sum(model.apply({"params": jlora.merge(jlora.combine(t, frozen))}, x))
    fast = lambda t: jnp.sum(jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x))
    compile_grad = lambda f: jax.jit(jax.grad(f)).lower(trainable).compile()
    assert full_products(compile_grad(merged), adapted) == [("kernel", (16, 24))]
    assert full_products(compile_grad(fast), adapted) == []


def torch_logits(torch_model, ids):
    import torch

    with torch.no_grad():
        return torch_model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@needs_torch
@pytest.mark.parametrize("name", list(FAMILIES))
def test_peft_files_both_ways_against_torch_peft(name, tmp_path):
    import peft
    import torch

    model, params, ids, adapted = adapted_model(name)
    ours = f64(logits(model, adapted, ids, strict=True))

    # jlora -> PEFT: PyTorch with the same base weights loads our file
    jlora.peft.save(str(tmp_path / "ours"), adapted)
    config = jlora.peft._read_config(str(tmp_path / "ours" / jlora.peft.CONFIG_FILE))
    assert config["fan_in_fan_out"] is (name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about fan_in_fan_out per layer type
        pt = peft.PeftModel.from_pretrained(torch_twin(name, params), str(tmp_path / "ours"))
    np.testing.assert_allclose(torch_logits(pt, ids), ours, rtol=1e-4, atol=2e-5)
    base = f64(model(ids, params=params).logits)
    assert np.max(np.abs(ours - base)) > 1e-3

    # PEFT -> jlora: a random (non-zero) PEFT adapter made in PyTorch
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_twin(name, params), peft.LoraConfig(
            r=2, lora_alpha=5, target_modules=TARGETS[name], init_lora_weights=False,
            fan_in_fan_out=name == "gpt2"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = jlora.peft.load(str(tmp_path / "theirs"), params)
    got = f64(logits(model, loaded, ids, strict=True))
    np.testing.assert_allclose(got, torch_logits(theirs.eval(), ids), rtol=1e-4, atol=2e-5)
    assert np.max(np.abs(got - base)) > 1e-3


def test_gpt2_square_kernel_orientation_is_read_not_guessed():
    """c_proj is square: only the layer says it is (out, in); PEFT sees the difference."""
    model, params, ids, _ = adapted_model("gpt2")
    spec = jlora.Spec({"**/attn/c_proj/kernel": CONFIG})  # no preset, no in_axes
    resolved = jlora.linen.resolve(model, {"params": params}, ids, spec=spec)
    assert resolved.match("transformer/h/0/attn/c_proj/kernel").in_axes == (1,)
    guessed = adapt(params, spec)
    with pytest.raises(ValueError, match="transformer/h/0/attn/c_proj/kernel"):
        logits(model, guessed, ids, strict=True)
    with pytest.warns(UserWarning, match="contracts kernel axes \\(1,\\)"):
        logits(model, guessed, ids)


def test_unknown_square_kernel_is_an_error_naming_the_path():
    import flax.linen as nn

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("w", nn.initializers.normal(), (4, 4)).T

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Custom(name="mix")(x)

    x = jnp.ones((2, 4))
    variables = Net().init(jax.random.key(0), x)
    spec = jlora.Spec({"mix/w": CONFIG})
    with pytest.raises(ValueError, match="mix/w: no layer jlora knows"):
        jlora.linen.resolve(Net(), variables, x, spec=spec)
    jlora.linen.register(Custom, kernel_axes=(1,), kernel="w", bias=None)
    try:
        resolved = jlora.linen.resolve(Net(), variables, x, spec=spec)
        adapted = perturb(jlora.apply(variables["params"], resolved, key=jax.random.key(1)))
        node = adapted["mix"]["w"]
        y = jlora.linen.apply(Net(), {"params": adapted}, x, strict=True)
        w = f64(variables["params"]["mix"]["w"]) + node.scale * (f64(node.a) @ f64(node.b)).T
        np.testing.assert_allclose(f64(y), f64(x) @ w.T, rtol=1e-5, atol=1e-6)
    finally:
        jlora._layers._REGISTRY.pop(Custom)


# ---------------------------------------------------------------- Gemma-style block


def gemma_setup():
    model = GemmaLM()
    ids = tokens()
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    spec = jlora.presets.spec("gemma", "all-linear", CONFIG, params=params)
    return model, params, ids, spec


def test_gemma_einsum_block_presets_resolve_and_factorize():
    model, params, ids, spec = gemma_setup()
    resolved = jlora.linen.resolve(model, {"params": params}, ids, spec=spec)
    want = {"attn/q_einsum/kernel": (1,), "attn/kv_einsum/kernel": (2,),
            "attn/attn_vec_einsum/kernel": (0, 1), "mlp/gating_einsum/kernel": (2,),
            "mlp/linear/kernel": (0,)}
    adapted = adapt(params, resolved)
    got = {p: n.in_axes for p, n in jlora.tree.leaves_with_paths(adapted) if jlora.is_node(n)}
    assert got == want
    # the preset alone (no model) already carries Gemma's layouts (negative: from the end)
    ndim = {p: np.ndim(n.base) for p, n in jlora.tree.leaves_with_paths(adapted)
            if jlora.is_node(n)}
    assert {p: tuple(sorted(a % ndim[p] for a in spec.match(p).in_axes)) for p in want} == want

    fast = jax.jit(lambda p: jlora.linen.apply(model, {"params": p}, ids, strict=True))(adapted)
    merged = jax.jit(lambda p: model.apply({"params": jlora.merge(p)}, ids))(adapted)
    np.testing.assert_allclose(f64(fast), f64(merged), rtol=1e-5, atol=1e-5)
    # float64 reference of one layer: q = x·(K0 + s·a·b) with the (N, D, H) kernel
    node = adapted["attn"]["q_einsum"]["kernel"]
    k0 = f64(node.base)
    delta = (node.scale * f64(node.a) @ f64(node.b)).reshape(16, 2, 8)  # (D, N*H) -> (D, N, H)
    k = k0 + np.transpose(delta, (1, 0, 2))
    np.testing.assert_allclose(f64(jlora.merge(adapted)["attn"]["q_einsum"]["kernel"]), k,
                               rtol=1e-5, atol=1e-6)

    losses = train(lambda p: loss_fn("gemma", jlora.linen.apply(model, {"params": p}, ids),
                                     ids), adapted)
    assert losses[-1] < losses[0] - 0.05, losses


def test_gemma_block_peft_file_round_trip(tmp_path):
    """Einsum kernels have no PEFT layout unless 2-D: the 2-D MLP out-projection round-trips,
    the 3-D ones are refused by name rather than written wrongly."""
    model, params, ids, _ = gemma_setup()
    spec = jlora.linen.resolve(model, {"params": params}, ids,
                               spec=jlora.Spec({"mlp/linear/kernel": CONFIG}))
    adapted = adapt(params, spec)
    jlora.peft.save(str(tmp_path), adapted)
    back = jlora.peft.load(str(tmp_path), params)
    run = jax.jit(lambda p: jlora.linen.apply(model, {"params": p}, ids, strict=True))
    np.testing.assert_allclose(f64(run(back)), f64(run(adapted)), rtol=1e-5, atol=1e-6)
    spec3 = jlora.linen.resolve(model, {"params": params}, ids,
                                spec=jlora.presets.spec("gemma", "qv", CONFIG))
    with pytest.raises(ValueError, match="attn/kv_einsum/kernel"):
        jlora.peft.save(str(tmp_path / "3d"), jax.eval_shape(
            lambda p: jlora.apply(p, spec3, key=jax.random.key(1)), params))


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama", "mistral", "vit"])
def test_presets_match_each_hf_family(family):
    import transformers

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    make = {
        "bert": ("FlaxBertForSequenceClassification", "BertConfig",
                 dict(small, vocab_size=VOCAB, max_position_embeddings=16)),
        "roberta": ("FlaxRobertaForSequenceClassification", "RobertaConfig",
                    dict(small, vocab_size=VOCAB, max_position_embeddings=20)),
        "gpt2": ("FlaxGPT2LMHeadModel", "GPT2Config",
                 dict(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
        "llama": ("FlaxLlamaForCausalLM", "LlamaConfig",
                  dict(small, vocab_size=VOCAB, num_key_value_heads=1, max_position_embeddings=16)),
        "mistral": ("FlaxMistralForCausalLM", "MistralConfig",
                    dict(small, vocab_size=VOCAB, num_key_value_heads=1, max_position_embeddings=16)),
        "vit": ("FlaxViTForImageClassification", "ViTConfig",
                dict(small, image_size=8, patch_size=4, num_labels=3)),
    }
    cls, cfg, kw = make[family]
    # shapes are all a preset needs: no initialisation, no FLOPs
    model = getattr(transformers, cls)(getattr(transformers, cfg)(**kw), _do_init=False)
    params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), model.input_shape))
    detected = jlora.presets.detect(params)
    assert detected == family or {detected, family} <= {"llama", "mistral"}
    counts = {}
    for targets in jlora.presets.TARGETS:
        spec = jlora.presets.spec(family, targets, CONFIG)
        adapted = jax.eval_shape(lambda p: jlora.apply(p, spec, key=jax.random.key(0)), params)
        paths = [p for p, n in jlora.tree.leaves_with_paths(adapted) if jlora.is_node(n)]
        assert not any(h in p for p in paths for h in ("lm_head", "classifier", "router"))
        counts[targets] = len(paths)
    want = {"gpt2": (1, 2, 4), "llama": (2, 4, 7), "mistral": (2, 4, 7)}.get(family, (2, 4, 6))
    assert (counts["qv"], counts["attention"], counts["all-linear"]) == want
    if family == "gpt2":  # GPT-2's read-out is tied to the token embedding: no head leaf
        with pytest.raises(ValueError, match="no gpt2 leaf matches 'lm_head/kernel'.*tied.*"
                                             "'transformer/wte/embedding'"):
            jlora.presets.spec(family, "qv", CONFIG, head=jlora.Full(), params=params)
        return
    for config in (jlora.Full(), jlora.LoRA(rank=2)):
        spec = jlora.presets.spec(family, "qv", CONFIG, head=config, params=params)
        head = jax.eval_shape(lambda p: jlora.apply(p, spec, key=jax.random.key(0)), params)
        heads = {p: n for p, n in jlora.tree.leaves_with_paths(head)
                 if ("lm_head" in p or "classifier" in p) and jlora.is_node(n)}
        assert heads
        # a low-rank head adapts the classifier's kernels only, Full its biases too
        assert any(p.endswith("/bias") for p in heads) == (config == jlora.Full()
                                                           and family != "llama"
                                                           and family != "mistral")
