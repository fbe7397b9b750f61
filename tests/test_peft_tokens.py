"""TrainableTokens through PEFT files both ways, against PEFT itself (CPU torch)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from tests._refs import f64
from tests.test_peft import IDS, Tiny, base_params, needs_torch, torch_tiny

IDX = [3, 11, 0, 17]


def tokens_tree(params, lora=False, seed=0):
    rules = {"emb/embedding": jlora.TrainableTokens(indices=IDX)}
    if lora:
        rules["fc1/kernel"] = jlora.LoRA(rank=2, alpha=4)
    adapted = jlora.apply(params, jlora.Spec(rules), key=jax.random.key(seed))
    node = adapted["emb"]["embedding"]
    adapted["emb"]["embedding"] = node.replace(
        rows=jax.random.normal(jax.random.key(seed + 7), node.rows.shape))
    if lora:
        n = adapted["fc1"]["kernel"]
        adapted["fc1"]["kernel"] = n.replace(b=jax.random.normal(jax.random.key(9), n.b.shape))
    return adapted


@pytest.mark.parametrize("lora", [False, True])
def test_round_trip_and_layout(tmp_path, lora):
    params = base_params()
    adapted = tokens_tree(params, lora)
    jlora.peft.save(tmp_path, adapted)
    config = json.load(open(tmp_path / "adapter_config.json"))
    if lora:
        assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == {"emb": IDX}
    else:
        assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == IDX
    back = jlora.peft.load(tmp_path, params)
    node = back["emb"]["embedding"]
    assert node.indices == tuple(IDX)
    np.testing.assert_array_equal(node.rows, adapted["emb"]["embedding"].rows)
    y = jlora.linen.apply(Tiny(), {"params": back}, IDS)
    np.testing.assert_allclose(y, jlora.linen.apply(Tiny(), {"params": adapted}, IDS), atol=1e-6)


@needs_torch
@pytest.mark.parametrize("lora", [False, True])
def test_peft_loads_what_jlora_saves_and_jlora_loads_what_peft_saves(tmp_path, lora):
    import torch
    from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model

    params = base_params()
    adapted = tokens_tree(params, lora)
    jlora.peft.save(tmp_path / "j", adapted)
    model = PeftModel.from_pretrained(torch_tiny(params), str(tmp_path / "j")).eval()
    with torch.no_grad():
        y_torch = model(torch.tensor(np.asarray(IDS))).numpy()
    y_jax = jlora.linen.apply(Tiny(), {"params": adapted}, IDS)
    np.testing.assert_allclose(f64(y_torch), f64(y_jax), rtol=1e-5, atol=1e-5)

    # PEFT -> jlora: a PEFT-made adapter with its own random rows
    torch.manual_seed(1)
    config = (LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"],
                         trainable_token_indices={"emb": IDX}) if lora
              else TrainableTokensConfig(token_indices=IDX, target_modules=["emb"]))
    pm = get_peft_model(torch_tiny(params), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "p"))
    with torch.no_grad():
        y_peft = pm.eval()(torch.tensor(np.asarray(IDS))).numpy()
    back = jlora.peft.load(tmp_path / "p", params)
    assert isinstance(back["emb"]["embedding"], jlora.methods.TrainableTokensNode)
    np.testing.assert_allclose(f64(jlora.linen.apply(Tiny(), {"params": back}, IDS)), f64(y_peft),
                               rtol=1e-5, atol=1e-5)


@needs_torch
def test_tied_gpt2_logits_and_row_gradients_match_peft(tmp_path):
    """GPT-2 ties lm_head to wte: one set of rows feeds the lookup and the read-out."""
    pytest.importorskip("transformers")
    import torch
    from peft import PeftModel

    from tests import hf_models

    model, params = hf_models.build("gpt2")
    ids = hf_models.tokens()
    idx = [int(ids[0, 1]), 5, int(ids[2, 3])]
    idx = list(dict.fromkeys(idx))
    spec = jlora.Spec({"transformer/wte/embedding": jlora.TrainableTokens(indices=idx)})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    node = adapted["transformer"]["wte"]["embedding"]
    adapted["transformer"]["wte"]["embedding"] = node.replace(
        rows=node.rows + jax.random.normal(jax.random.key(2), node.rows.shape))
    jlora.peft.save(tmp_path, adapted)
    pm = PeftModel.from_pretrained(hf_models.torch_twin("gpt2", params), str(tmp_path),
                                   is_trainable=True)
    out = pm(torch.tensor(ids, dtype=torch.long)).logits
    torch_loss = hf_models.loss_fn("gpt2", jnp.asarray(out.detach().numpy()), ids)
    out_t = torch.log_softmax(out[:, :-1], -1)
    loss_t = -torch.gather(out_t, -1, torch.tensor(ids[:, 1:, None], dtype=torch.long)).mean()
    loss_t.backward()
    delta = next(p for n, p in pm.named_parameters() if "trainable_tokens_delta" in n)

    trainable, frozen = jlora.split(adapted)
    def loss(t):
        y = hf_models.logits(model, jlora.combine(t, frozen), ids)
        return hf_models.loss_fn("gpt2", y, ids), y

    (val, y), g = jax.value_and_grad(loss, has_aux=True)(trainable)
    np.testing.assert_allclose(f64(y), f64(out.detach().numpy()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(val), float(torch_loss), rtol=1e-5)
    np.testing.assert_allclose(f64(g["transformer"]["wte"]["embedding"].rows),
                               f64(delta.grad.numpy()), rtol=1e-3, atol=1e-6)


def test_bad_token_files(tmp_path):
    params = base_params()
    jlora.peft.save(tmp_path, tokens_tree(params, lora=True))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    cfg["trainable_token_indices"] = {"emb": [3, 11, 0, 20]}
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=r"adapter_config.json.*out of range"):
        jlora.peft.load(tmp_path, params)
    cfg["trainable_token_indices"] = {"emb": [3, 3, 0, 1]}
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=r"adapter_config.json.*more than once"):
        jlora.peft.load(tmp_path, params)
    cfg["trainable_token_indices"] = {"emb": [3, 1]}
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*shape \(4, 8\)"):
        jlora.peft.load(tmp_path, params)


# ---------------------------------------------------------------- PEFT's spellings


def _peft_made(name, config, tmp_path, seed=1):
    """A tiny HF model under PEFT with random trainable weights, saved; its logits."""
    import torch
    from peft import get_peft_model

    from tests import hf_models

    model, params = hf_models.build(name)
    torch.manual_seed(seed)
    pm = get_peft_model(hf_models.torch_twin(name, params), config)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path))
    ids = hf_models.tokens()
    with torch.no_grad():
        y = pm.eval()(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    return model, params, ids, y


HF_IDX = [10, 5, 19, 39]
_LLAMA_EMB, _LLAMA_HEAD, _GPT2_WTE = ("model/embed_tokens/embedding", "lm_head/kernel",
                                      "transformer/wte/embedding")


@needs_torch
@pytest.mark.parametrize("name, kind, tokens, paths", [
    # PEFT's usual short key: it matches module names by suffix
    ("llama", "lora", {"embed_tokens": HF_IDX}, {_LLAMA_EMB: HF_IDX}),
    # a list: PEFT's input embedding, the one module whose rows the file holds
    ("llama", "lora", HF_IDX, {_LLAMA_EMB: HF_IDX}),
    ("llama", "lora", {"embed_tokens": HF_IDX, "lm_head": [1, 2]},
     {_LLAMA_EMB: HF_IDX, _LLAMA_HEAD: [1, 2]}),
    ("gpt2", "lora", HF_IDX, {_GPT2_WTE: HF_IDX}),
    # tied GPT-2, the head listed with the embedding's ids: PEFT ties it and saves no rows
    ("gpt2", "lora", {"wte": HF_IDX, "lm_head": HF_IDX}, {_GPT2_WTE: HF_IDX}),
    # PEFT's default standalone adapter on a tied model: it also writes lm_head's equal rows
    ("gpt2", "standalone", None, {_GPT2_WTE: HF_IDX}),
])
def test_jlora_loads_peft_spellings_with_peft_logits(tmp_path, name, kind, tokens, paths):
    pytest.importorskip("transformers")
    from peft import LoraConfig, TrainableTokensConfig

    from tests import hf_models

    config = (TrainableTokensConfig(token_indices=HF_IDX) if kind == "standalone" else
              LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj" if name == "llama"
                                                            else "c_attn"],
                         trainable_token_indices=tokens))
    model, params, ids, y_peft = _peft_made(name, config, tmp_path)
    back = jlora.peft.load(tmp_path, params)
    got = {p: list(n.indices) for p, n in jlora.tree.leaves_with_paths(back)
           if isinstance(n, jlora.methods.TrainableTokensNode)}
    assert got == paths
    np.testing.assert_allclose(f64(hf_models.logits(model, back, ids)), f64(y_peft),
                               rtol=1e-5, atol=1e-5)


@needs_torch
def test_a_tied_copy_that_differs_from_the_embeddings_rows_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from peft import TrainableTokensConfig
    from safetensors.numpy import save_file

    _, params, _, _ = _peft_made("gpt2", TrainableTokensConfig(token_indices=HF_IDX), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    head = "base_model.model.lm_head.trainable_tokens_delta"
    tensors[head] = tensors[head] + np.float32(1e-3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor "
                                         r"base_model\.model\.lm_head\..*these differ"):
        jlora.peft.load(tmp_path, params)


@needs_torch
def test_an_untied_head_kernel_without_bias_exports_to_peft(tmp_path):
    """Llama's lm_head has no bias: jlora's rows on it and on the embedding give PEFT's logits."""
    pytest.importorskip("transformers")
    import torch
    from peft import PeftModel

    from tests import hf_models

    model, params = hf_models.build("llama")
    ids = hf_models.tokens()
    adapted = jlora.apply(params, jlora.Spec({
        _LLAMA_EMB: jlora.TrainableTokens(indices=HF_IDX),
        _LLAMA_HEAD: jlora.TrainableTokens(indices=[1, 2]),
        "**/q_proj/kernel": jlora.LoRA(rank=2, alpha=4)}), key=jax.random.key(0))
    trainable, frozen = jlora.split(adapted)
    leaves, tdef = jax.tree.flatten(trainable)
    adapted = jlora.combine(jax.tree.unflatten(tdef, [
        x + 0.5 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]),
        frozen)
    jlora.peft.save(tmp_path, adapted)
    pm = PeftModel.from_pretrained(hf_models.torch_twin("llama", params), str(tmp_path)).eval()
    with torch.no_grad():
        y_peft = pm(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(f64(hf_models.logits(model, adapted, ids)), f64(y_peft),
                               rtol=1e-5, atol=1e-5)


def test_trainable_token_indices_keys_resolve_by_suffix_or_list(tmp_path):
    """A jlora-written LoRA + tokens file with its key respelt as PEFT allows."""
    params = base_params()
    adapted = tokens_tree(params, lora=True)
    jlora.peft.save(tmp_path, adapted)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    want = adapted["emb"]["embedding"].rows
    for spelling in (IDX, {"mb": IDX}):  # PEFT: key_name.endswith(key)
        json.dump({**cfg, "trainable_token_indices": spelling}, open(cfg_path, "w"))
        node = jlora.peft.load(tmp_path, params)["emb"]["embedding"]
        assert node.indices == tuple(IDX)
        np.testing.assert_array_equal(node.rows, want)
    for spelling, match in [
        ({"emb": IDX, "head": [1, 2]}, r"entry 'head' matches no module of params"),
        ({"emb": IDX, "fc1": [1, 2]}, r"missing tensor base_model\.model\.fc1\.token_adapter"),
        ({"emb": IDX, "b": IDX}, r"entries 'emb' and 'b' both name module 'emb'"),
        ({"emb": IDX, "head": [3, 11]}, r"entry 'head' matches no module"),
        ("emb", r"must be a list of token ids or an object"),
    ]:
        json.dump({**cfg, "trainable_token_indices": spelling}, open(cfg_path, "w"))
        with pytest.raises(ValueError, match=r"adapter_(config\.json|model\.safetensors).*"
                                             + match):
            jlora.peft.load(tmp_path, params)


def test_a_list_of_ids_with_rows_for_two_modules_is_ambiguous(tmp_path):
    params = {"a": {"embedding": jnp.ones((12, 4))}, "b": {"embedding": jnp.ones((12, 4))},
              "fc": {"kernel": jnp.ones((4, 4))}}
    adapted = jlora.apply(params, jlora.Spec({"*/embedding": jlora.TrainableTokens(indices=[1]),
                                              "fc/kernel": jlora.LoRA(rank=1)}),
                          key=jax.random.key(0))
    jlora.peft.save(tmp_path, adapted)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    json.dump({**cfg, "trainable_token_indices": [1]}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=r"adapter_config.json: key 'trainable_token_indices' is "
                                         r"a list.*holds 2 \(\['a', 'b'\]\)"):
        jlora.peft.load(tmp_path, params)


def test_save_refuses_tokens_peft_would_not_reproduce(tmp_path):
    params = base_params()
    # a head kernel with a bias: PEFT's TrainableTokensLayer computes F.linear(x, W') alone
    adapted = jlora.apply(params, jlora.Spec({"fc2/kernel": jlora.TrainableTokens(indices=[0, 2])}),
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"fc2/kernel: trainable tokens on a head kernel whose "
                                         r"module has a bias \(fc2/bias\).*F\.linear"):
        jlora.peft.save(tmp_path / "bias", adapted)
    assert not (tmp_path / "bias").exists()
    # a table PEFT cannot wrap as an nn.Embedding / nn.Linear
    table = {"embedder": {"input_embedding": jnp.ones((12, 4))}}
    adapted = jlora.apply(table, jlora.Spec({"embedder/input_embedding": jlora.TrainableTokens(
        indices=[1], token_axis=0)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"embedder/input_embedding: PEFT's trainable tokens "
                                         r"wrap an nn\.Embedding"):
        jlora.peft.save(tmp_path / "leaf", adapted)
    # PEFT's trainable_token_indices key 'emb' would also wrap module 'xemb'
    two = {"emb": {"embedding": jnp.ones((12, 4))}, "xemb": {"embedding": jnp.ones((12, 4))},
           "fc": {"kernel": jnp.ones((4, 4))}}
    adapted = jlora.apply(two, jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=[1]),
                                           "fc/kernel": jlora.LoRA(rank=1)}),
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"entry 'emb' would also wrap module 'xemb'"):
        jlora.peft.save(tmp_path / "names", adapted)
    # tokens with Full() and no LoRA: the standalone format has no modules_to_save
    adapted = jlora.apply(params, jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=[1]),
                                              "fc2/*": jlora.Full()}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"trainable tokens and Full\(\) leaves \(\['fc2'\]\).*"
                                         r"TRAINABLE_TOKENS format has no modules_to_save"):
        jlora.peft.save(tmp_path / "full", adapted)
