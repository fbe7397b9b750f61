"""Beyond low-rank weights: activation adapters and sparse fine-tuning against LoRA.

all-MiniLM-L6-v2 fine-tuned on tweet sentiment through the harness of
``experiments/methods_study.py`` (same data, AdamW schedule, step count, fast
path, trained head), each method at roughly LoRA r8's trainable budget on the
query/value kernels (73,728 numbers, plus the 1,155-number head):

    LoRA r8 (query/value)            8·(384+384)·12 = 73,728
    Sparse random / Sparse SAM       1/24 of the 12 query/value kernels' entries = 73,728
    (Fu et al. AAAI 2023: random vs second-order selection from calibration gradients)

and the activation adapters, each on every transformer block
(``bert/layer_*``, a module-level rule), at a similar budget:

    AdaptFormer b16                  (384·16 + 16 + 16·384 + 384)·6 = 76,128
    LoReFT r16, first 5 + last 5 real tokens   (2·384·16 + 16)·6 = 73,824
    MeFT r16, ReFT form (reads the block output, every token, bias c)  = 73,824

MiniLM's blocks have no separate MLP module (the up/down projections are
``intermediate``/``output`` Dense layers of the block), so AdaptFormer's
bottleneck runs in parallel with the whole block: it reads the block's input
and adds to its output, rather than beside the MLP alone as in the paper.
Unlike ``methods_study.py`` the head starts from ``N(0, 0.02²)`` (BERT's
initialiser), not zero, for every method: SAM's calibration gradients of the
encoder are ``∂L/∂θ0``, which a zero head makes exactly zero.

Writes ``experiments/results/activation_study.{md,json,png}``: held-out
accuracy, trainable parameters, median step time, XLA's peak memory of the
compiled step, SAM's selection time, and the loss curves.

    python experiments/activation_study.py [--train 1024 --test 600 --calib 8] [--methods ...] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments.methods_study import QV, compile_step, prepare, run_method
from experiments.quickstart import batches, pad_batch
from experiments.report import write_study

BLOCKS = "bert/layer_*"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LORA_RANK = 8
# floor(density * 384 * 384) = 6144 = LoRA r8's 8 * (384 + 384) per kernel
DENSITY = (LORA_RANK * (384 + 384) + 0.5) / (384 * 384)


def sam_rules(model, params, data, args):
    """Fu et al.'s SAM: the query/value entries with the largest summed calibration gradient."""
    ids, mask, y = data[0]
    rng = np.random.default_rng(args.seed + 1)
    picks = [pad_batch(idx, args.batch)[0] for idx in batches(len(ids), args.batch, rng=rng)]
    calib = [(ids[i], mask[i], y[i]) for i in picks[:args.calib]]

    def loss_fn(p, batch):
        b_ids, b_mask, b_y = batch
        logits = model.apply({"params": p}, b_ids, b_mask)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b_y))

    with tqdm(total=len(calib), desc="SAM calibration", leave=False) as bar:
        t0 = time.perf_counter()
        spec = jlora.optim.sam_select(params, jlora.Spec({QV: jlora.Sparse(DENSITY, select="sam")}),
                                      loss_fn, calib, callback=lambda i: bar.update())
        seconds = time.perf_counter() - t0
    return {r.pattern: r.config for r in spec.rules}, seconds


def methods(model, params, data, args):
    """``name -> (rules, extra results)``, built lazily (SAM needs its calibration pass)."""
    table = {
        "LoRA r8": lambda: ({QV: jlora.LoRA(rank=LORA_RANK, alpha=2 * LORA_RANK)}, {}),
        "Sparse random": lambda: ({QV: jlora.Sparse(DENSITY)}, {}),
        "Sparse SAM": lambda: _with_time(*sam_rules(model, params, data, args)),
        # module-level adapters on each transformer block (see the module docstring)
        "AdaptFormer b16": lambda: ({BLOCKS: jlora.AdaptFormer(bottleneck=16)}, {}),
        "LoReFT r16 f5+l5": lambda: ({BLOCKS: jlora.LoReFT(rank=16, positions="f5+l5")},
                                     {"masked": True}),
        "MeFT r16 (ReFT form)": lambda: ({BLOCKS: jlora.MeFT(rank=16, read="output", bias=True)},
                                         {}),
    }
    return table


def _with_time(rules, seconds):
    return rules, {"select_s": seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1024)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--val", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib", type=int, default=8, help="SAM calibration batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--time-rounds", type=int, default=0,
                    help="instead of training, time the compiled steps of --methods alternated "
                         "in one process for this many rounds (writes activation_study_timing.*)")
    ap.add_argument("--append", action="store_true",
                    help="add to (or replace in) the results already in --out, run with the same "
                         "settings")
    args = ap.parse_args(argv)
    previous = load_previous(args) if args.append else []

    model, params, data = prepare(args)
    params["classifier"]["kernel"] = 0.02 * jax.random.normal(
        jax.random.key(args.seed + 7), params["classifier"]["kernel"].shape)
    table = methods(model, params, data, args)
    names = list(table) if args.methods is None else args.methods
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {list(table)}")
    if args.time_rounds > 0:
        return time_steps(model, params, data, args, table, names)
    results = []
    for name in names:
        rules, extra = table[name]()
        masked = extra.pop("masked", False)
        r = run_method(name, rules, model, params, data, args, masked=masked)
        r.update(extra)
        results.append(r)
        print(f"{name:<20} acc {r['accuracy']:.3f}  trainable {r['trainable']:>9,}  "
              f"step {r['step_ms']:.0f} ms  peak {r['peak_mib']:.0f} MiB", flush=True)
    order = list(table)
    ran = {r["method"] for r in results}
    merged = [r for r in previous if r["method"] not in ran] + results
    merged.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    write(merged, args)
    return results


def time_steps(model, params, data, args, table, names):
    """Median time of each method's compiled training step, the methods alternated.

    Every step runs on the same batch and state; a round runs each method once
    (after two warm-up calls each), so load on a shared machine falls on all
    methods alike. Writes ``activation_study_timing.{md,json}``.
    """
    states = {}
    for name in tqdm(names, desc="compiling steps", leave=False):
        rules, extra = table[name]()
        states[name] = compile_step(name, rules, model, params, data, args,
                                    masked=extra.get("masked", False))
    ids, mask, y = data[0]
    b = args.batch
    batch = (ids[:b], mask[:b], y[:b], np.ones(b, bool), jax.random.key(0))
    run = lambda st: jax.block_until_ready(st.compiled(st.trainable, st.opt, *batch))
    for st in states.values():
        run(st), run(st)
    times = {n: [] for n in names}
    for _ in tqdm(range(args.time_rounds), desc="timing rounds", leave=False):
        for name, st in states.items():
            t0 = time.perf_counter()
            run(st)
            times[name].append(time.perf_counter() - t0)
    ref = names[0]
    rows = [{"method": n, "step_ms": 1e3 * float(np.median(times[n])),
             "ratio": float(np.median(times[n]) / np.median(times[ref])),
             "peak_mib": states[n].peak, "trainable": states[n].n_train,
             "times_ms": [1e3 * t for t in times[n]]} for n in names]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "activation_study_timing.json"), "w") as f:
        json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "results": rows}, f, indent=1)
    lines = [f"Training step of all-MiniLM-L6-v2 (batch {b}, {args.max_len} tokens), the "
             f"methods alternated in one process, median of {args.time_rounds} rounds after 2 "
             f"warm-up calls; {jax.devices()[0].device_kind}, jax {jax.__version__}.", "",
             f"| method | step (ms) | vs {ref} | peak MiB | trainable params |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['step_ms']:.0f} | {r['ratio']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['trainable']:,} |" for r in rows]
    with open(os.path.join(args.out, "activation_study_timing.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


SETTINGS = ("train", "test", "max_len", "batch", "epochs", "lr", "calib", "seed")


def load_previous(args) -> list[dict]:
    """The results of an earlier run in ``args.out``; its settings must equal these."""
    path = os.path.join(args.out, "activation_study.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    differ = {k: (old["args"].get(k), getattr(args, k)) for k in SETTINGS
              if old["args"].get(k) != getattr(args, k)}
    if differ:
        raise SystemExit(f"--append: {path} was run with other settings {differ}")
    return old["results"]


def write(results, args):
    intro = (f"all-MiniLM-L6-v2 on tweet sentiment: {args.train} train / {args.test} test tweets, "
             f"max {args.max_len} tokens, batch {args.batch}, {args.epochs} epoch(s) "
             f"({-(-args.train // args.batch) * args.epochs} steps), AdamW {args.lr} "
             f"(warm-up + cosine), head N(0, 0.02²), SAM from {args.calib} calibration batches, "
             f"seed {args.seed}")
    print(write_study(args.out, "activation_study", results, args, label="method", intro=intro,
                      columns=[("test accuracy", lambda r: f"{r['accuracy']:.3f}"),
                               ("trainable params", lambda r: f"{r['trainable']:,}"),
                               ("step (ms)", lambda r: f"{r['step_ms']:.0f}"),
                               ("peak MiB", lambda r: f"{r['peak_mib']:.0f}"),
                               ("selection (s)", lambda r: f"{r['select_s']:.1f}"
                                if "select_s" in r else "-")],
                      title="all-MiniLM-L6-v2, tweet sentiment: equal-budget adapters + head"))


if __name__ == "__main__":
    main()
