"""Optimisers for LoRA on a real task: all-MiniLM-L6-v2 fine-tuned on tweet sentiment.

The same rank-8 LoRA on the 12 attention query/value kernels plus a trained
zero-initialised head, the same data order and number of steps, with:

    AdamW | LoRA+ (ratio 16) | Flat-LoRA (rho 0.05) | BAR (rho 0.05) + AdamW |
    SAM (rho 0.05) + AdamW | MeZO (zero-order SGD, two forwards, no backward)

Writes ``experiments/results/optim_study.{md,json,png}``: held-out accuracy,
wall time, optimizer-state bytes (counted from the state pytree) and the
training-loss curves.

    python experiments/optim_study.py [--train 3000 --test 1500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir
from experiments.quickstart import accuracy, batches, pad_batch
from experiments.report import write_study

SPEC = jlora.Spec({"bert/**/self_attn/{query,value}/kernel": jlora.LoRA(rank=8, alpha=16),
                   "classifier/{kernel,bias}": jlora.Full()})
VARIANTS = ("AdamW", "LoRA+", "Flat-LoRA", "BAR", "SAM", "MeZO")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def state_bytes(state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                   if hasattr(x, "dtype")))


def run_variant(name, model, params, data, args):
    (tr_ids, tr_mask, tr_y), (te_ids, te_mask, te_y) = data
    trainable, frozen = jlora.split(jlora.apply(params, SPEC, key=jax.random.key(args.seed)))
    steps = args.epochs * -(-len(tr_ids) // args.batch)
    sched = lambda lr: optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps)
    adamw = lambda lr: optax.adamw(sched(lr), weight_decay=0.01)
    tx = {"LoRA+": lambda: jlora.optim.lora_plus(adamw, args.lr, ratio=16),
          "BAR": lambda: optax.chain(jlora.optim.bar(0.05), adamw(args.lr)),
          "MeZO": lambda: optax.identity()}.get(name, lambda: adamw(args.lr))()
    opt = tx.init(trainable)

    def task_loss(t, ids, mask, y, valid, key, step):
        p = jlora.combine(t, frozen)
        if name == "Flat-LoRA":
            p = jlora.optim.flat_lora(p, key, step=step, total_steps=steps, rho=0.05)
        logits = jlora.linen.apply(model, {"params": p}, ids, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * valid) / jnp.sum(valid)

    @jax.jit
    def step_fn(t, opt, ids, mask, y, valid, key, step):
        if name == "MeZO":
            lr = sched(args.mezo_lr)(step)
            t, loss = jlora.optim.mezo_sgd(task_loss, t, key, ids, mask, y, valid, key, step,
                                           eps=args.mezo_eps, lr=lr)
            return t, opt, loss
        if name == "SAM":
            loss, g = jlora.optim.sam_gradient(task_loss, t, ids, mask, y, valid, key, step, rho=0.05)
        else:
            loss, g = jax.value_and_grad(task_loss)(t, ids, mask, y, valid, key, step)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    rng = np.random.default_rng(args.seed)
    losses, times = [], []
    bar = tqdm(total=steps, desc=name, leave=False)
    b = args.batch
    for _ in range(args.epochs):
        for idx in batches(len(tr_ids), b, rng=rng):
            full, valid = pad_batch(idx, b)
            t0 = time.perf_counter()
            trainable, opt, loss = step_fn(trainable, opt, tr_ids[full], tr_mask[full], tr_y[full],
                                           valid, jax.random.key(len(losses)), len(losses))
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    tuned = jlora.combine(trainable, frozen)
    logits = jax.jit(lambda i, m: jlora.linen.apply(model, {"params": tuned}, i, m))
    acc = accuracy(logits, te_ids, te_mask, te_y, b, f"{name}: test")
    return {"variant": name, "accuracy": acc, "wall_s": float(sum(times)),
            "step_ms": 1e3 * statistics.median(times[3:] or times),
            "opt_state_bytes": state_bytes(opt), "trainable": jlora.count_trainable(trainable),
            "losses": losses}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mezo-lr", type=float, default=1e-4)
    ap.add_argument("--mezo-eps", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (tx, ty), (vx, vy) = load_tweets(args.train, args.test, seed=args.seed)
    data = ((*tokenize(tx, model_dir, args.max_len), ty), (*tokenize(vx, model_dir, args.max_len), vy))
    model = SentenceClassifier(cfg, num_classes=len(LABELS))
    params = {"bert": bert, "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                                           "bias": jnp.zeros(len(LABELS))}}
    results = []
    for name in args.variants:
        results.append(run_variant(name, model, params, data, args))
        r = results[-1]
        print(f"{name:<10} acc {r['accuracy']:.3f}  wall {r['wall_s']:.0f}s  step {r['step_ms']:.0f} ms  "
              f"opt state {r['opt_state_bytes'] / 1024:.0f} KiB", flush=True)
    write(results, args)


def write(results, args):
    intro = (f"all-MiniLM-L6-v2 on tweet sentiment, LoRA r8 (alpha 16) on query/value + head: "
             f"{args.train} train / {args.test} test tweets, max {args.max_len} tokens, batch "
             f"{args.batch}, {args.epochs} epoch(s), lr {args.lr} (MeZO {args.mezo_lr}, eps "
             f"{args.mezo_eps})")
    print(write_study(args.out, "optim_study", results, args, label="variant", intro=intro,
                      columns=[("test accuracy", lambda r: f"{r['accuracy']:.3f}"),
                               ("wall time (s)", lambda r: f"{r['wall_s']:.0f}"),
                               ("step (ms)", lambda r: f"{r['step_ms']:.0f}"),
                               ("optimizer state", lambda r: f"{r['opt_state_bytes'] / 1024:.0f} KiB")],
                      title="all-MiniLM-L6-v2, tweet sentiment: optimisers for LoRA r8"))


if __name__ == "__main__":
    main()
