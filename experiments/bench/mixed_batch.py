"""Mixed-adapter batches: one jitted batch over 8 adapters vs single-adapter batches vs PEFT.

The same MLP (``--layers`` Dense layers of width ``--width`` with tanh, LoRA
rank ``--rank`` on every kernel) and the same ``--batch x --seq`` input run as

* ``mixed``     : jlora, one batch, each example with its own adapter out of 8
                  (``jlora.compose.stack`` + ``jlora.linen.apply(..., adapter_ids=)``),
                  in each ``mode`` (gather, onehot, ragged);
* ``single``    : jlora, one batch of the same size, one adapter (the target);
* ``8 batches`` : jlora, the same examples as 8 single-adapter batches (batch/8 each);
* ``peft mixed``: PyTorch + PEFT, ``model(x, adapter_names=[...])`` (its mixed-batch
                  forward), and ``peft single``: the same with one adapter.

Variants alternate in one process after warm-up; medians of ``--reps``; ratios
against ``single``. Writes ``experiments/results/mixed_batch.{md,json}``.

    python experiments/bench/mixed_batch.py [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from experiments.bench._host import cpu_name, version

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
N_ADAPTERS = 8


class MLP(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = jnp.tanh(nn.Dense(self.width)(x))
        return x


def adapters(params, rank, n):
    out = []
    for g in range(n):
        t = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=rank, alpha=2 * rank)}),
                        key=jax.random.key(g))
        out.append(jax.tree.map(lambda nd, g=g: nd.replace(b=0.01 * jax.random.normal(
            jax.random.key(100 + g), nd.b.shape)) if jlora.is_node(nd) else nd, t,
            is_leaf=jlora.is_node))
    return out


def torch_variants(args, x_np, ids):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(args.width, args.width) for _ in range(args.layers))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                     target_modules=[f"layers.{i}" for i in range(args.layers)])
    model = get_peft_model(Net(), cfg, adapter_name="a0")
    for g in range(1, N_ADAPTERS):
        model.add_adapter(f"a{g}", cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    model.eval()
    x = torch.from_numpy(x_np)
    names = [f"a{g}" for g in ids]

    def mixed():
        with torch.no_grad():
            return model(x, adapter_names=names)

    def single():
        with torch.no_grad():
            return model(x)

    return {"peft mixed": mixed, "peft single": single}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    model = MLP(args.width, args.layers)
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(args.batch, args.seq, args.width)).astype(np.float32)
    x = jnp.asarray(x_np)
    params = model.init(jax.random.key(0), x)["params"]
    trees = adapters(params, args.rank, N_ADAPTERS)
    ids_np = rng.integers(0, N_ADAPTERS, args.batch).astype(np.int32)
    ids = jnp.asarray(ids_np)

    run_single = jax.jit(lambda t, x: jlora.linen.apply(model, {"params": t}, x))
    run_mixed = jax.jit(lambda s, x, i: jlora.linen.apply(model, {"params": s}, x, adapter_ids=i))
    per = args.batch // N_ADAPTERS
    groups = [x[g * per:(g + 1) * per] for g in range(N_ADAPTERS)]

    variants = {}
    for mode in ("gather", "onehot", "ragged"):
        stacked = jlora.compose.stack(trees, mode=mode)
        variants[f"mixed ({mode})"] = lambda s=stacked: run_mixed(s, x, ids)
    variants["single"] = lambda: run_single(trees[0], x)
    variants["8 batches"] = lambda: [run_single(trees[g], groups[g]) for g in range(N_ADAPTERS)]
    if not args.no_peft:
        variants.update(torch_variants(args, x_np, ids_np))

    # correctness spot check: the mixed batch equals per-example single-adapter runs
    y = np.asarray(variants["mixed (gather)"]())
    ref = np.stack([np.asarray(run_single(trees[g], x[j:j + 1]))[0] for j, g in
                    enumerate(ids_np[:4])])
    max_err = float(np.abs(y[:4] - ref).max())

    times = {k: [] for k in variants}
    for _ in range(3):  # warm-up (compile)
        for fn in variants.values():
            jax.block_until_ready(fn())
    for _ in range(args.reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = cpu_name()
    rows = [(k, 1e3 * med[k], med[k] / med["single"]) for k in variants]
    intro = (f"{args.layers} Dense layers of width {args.width} (tanh), LoRA rank {args.rank} "
             f"on every kernel, batch {args.batch} x {args.seq} tokens, {N_ADAPTERS} adapters; "
             f"median of {args.reps} alternated runs after warm-up; {cpu}, "
             f"{os.cpu_count()} cores; jax {jax.__version__}"
             + ("" if args.no_peft else f", torch {version('torch')}, peft {version('peft')}")
             + f". Mixed vs per-example max |error| {max_err:.1e}.")
    lines = [intro, "", "| variant | median ms | vs single |", "|---|---:|---:|"]
    lines += [f"| {k} | {ms:.1f} | {r:.2f}x |" for k, ms, r in rows]
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mixed_batch.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "mixed_batch.json"), "w") as f:
        json.dump({"args": vars(args), "cpu": cpu, "median_s": med, "times_s": times,
                   "max_err": max_err}, f, indent=1)
    print(table)
    return med


if __name__ == "__main__":
    main()
