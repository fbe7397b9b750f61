"""TrainableTokens through PEFT files both ways, against PEFT itself (CPU torch)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
