"""LoRA initialisations on a real task: all-MiniLM-L6-v2 fine-tuned on tweet sentiment.

Every run adapts the same 12 attention query/value kernels at rank 8
(alpha 16) and trains the same linear head, with the same data order, AdamW
schedule and number of steps (the training loop of ``methods_study.py``):

    LoRA (kaiming) | PiSSA | MiCA | orthogonal          (from the weights alone)
    EVA | CorDA IPM | CorDA KPM | LoRA-GA               (from calibration batches)

The head starts from N(0, 0.02²) (as Hugging Face initialises a classifier),
not from zero: with a zero head no gradient reaches the encoder and LoRA-GA,
which reads the gradients, would have nothing to read. Calibration uses the
first ``--calib`` training batches. Reported: the training loss at step N (mean
of the steps around it), held-out accuracy, and the calibration cost: wall
time of building the adapted tree (``jlora.apply`` or ``jlora.init.*``,
compilation included) and the growth of the process's peak resident memory
while building it.

Writes ``experiments/results/init_study.{md,json,png}``.

    python experiments/init_study.py [--train 1200 --test 600 --calib 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np
import optax

import jlora
from experiments.methods_study import HEAD, QV, prepare, run_method
from experiments.report import write_study

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RANK, ALPHA = 8, 16


def lora(init="kaiming"):
    return {QV: jlora.LoRA(rank=RANK, alpha=ALPHA, init=init), **HEAD}


def _calibration(model, data, args):
    """``(batches, apply_fn, loss_fn)`` over the first ``args.calib`` training batches."""
    ids, mask, y = data[0]
    b = args.batch
    batches = [{"input_ids": ids[i * b:(i + 1) * b], "attention_mask": mask[i * b:(i + 1) * b],
                "labels_cls": y[i * b:(i + 1) * b]} for i in range(args.calib)]

    def apply_fn(p, batch):
        return model.apply({"params": p}, batch["input_ids"], batch["attention_mask"])

    def loss_fn(p, batch):
        logits = apply_fn(p, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels_cls"]).mean()

    return batches, apply_fn, loss_fn


def inits(model, data, args):
    """name -> function(params) returning the adapted tree."""
    batches, apply_fn, loss_fn = _calibration(model, data, args)
    key = jax.random.key(args.seed)
    spec = lambda init="kaiming": jlora.Spec(lora(init))
    return {
        "LoRA (kaiming)": lambda p: jlora.apply(p, spec(), key=key),
        "PiSSA": lambda p: jlora.apply(p, spec("pissa"), key=key),
        "MiCA": lambda p: jlora.apply(p, spec("mica"), key=key),
        "orthogonal": lambda p: jlora.apply(p, spec("orthogonal"), key=key),
        "EVA": lambda p: jlora.init.eva(p, spec(), batches, apply_fn, key=key,
                                        max_batches=args.eva_max_batches, tau=args.eva_tau),
        "CorDA IPM": lambda p: jlora.init.corda(p, spec(), batches, apply_fn, mode="ipm",
                                                key=key),
        "CorDA KPM": lambda p: jlora.init.corda(p, spec(), batches, apply_fn, mode="kpm",
                                                key=key),
        "LoRA-GA": lambda p: jlora.init.lora_ga(p, spec(), loss_fn, batches, key=key),
    }


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--val", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=4, help="calibration batches")
    ap.add_argument("--eva-max-batches", type=int, default=40)
    ap.add_argument("--eva-tau", type=float, default=0.99, help="EVA's convergence cosine")
    ap.add_argument("--loss-at", type=int, default=20, help="report the loss at this step")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--combine", nargs="*", default=None, metavar="JSON",
                    help="write one table from earlier runs' init_study.json files (runs of "
                         "disjoint --methods, e.g. in parallel processes) instead of running")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    model, params, data = prepare(args)
    hidden = params["classifier"]["kernel"].shape
    params["classifier"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(args.seed + 1),
                                                              hidden)
    table = inits(model, data, args)
    names = args.methods or list(table)
    results = []
    for name in names:
        before = _peak_mib()
        t0 = time.perf_counter()
        try:
            adapted = jax.block_until_ready(table[name](params))
        except ValueError as e:  # e.g. EVA not converging within --eva-max-batches
            print(f"{name:<16} init failed: {e}", flush=True)
            continue
        calib_s = time.perf_counter() - t0
        grew = max(_peak_mib() - before, 0.0)
        r = run_method(name, {}, model, params, data, args, adapted=adapted)
        n = min(args.loss_at, len(r["losses"]))
        r.update(calib_s=calib_s, calib_peak_growth_mib=grew,
                 loss_at=float(np.mean(r["losses"][max(n - 3, 0):n + 2])), loss_step=n)
        results.append(r)
        print(f"{name:<16} acc {r['accuracy']:.3f}  loss@{n} {r['loss_at']:.3f}  "
              f"calib {calib_s:.1f} s  +{grew:.0f} MiB", flush=True)
    write(results, args)


def combine(paths, out):
    """One table and plot from several runs' JSON (the first run's settings)."""
    import json
    from types import SimpleNamespace

    runs = [json.load(open(p)) for p in paths]
    args = SimpleNamespace(**{**runs[0]["args"], "out": out, "combine": None})
    write([r for run in runs for r in run["results"]], args)


def write(results, args):
    intro = (f"all-MiniLM-L6-v2 on tweet sentiment: query/value LoRA rank {RANK}, alpha {ALPHA}, "
             f"{args.train} train / {args.test} test tweets, max {args.max_len} tokens, batch "
             f"{args.batch}, {args.epochs} epoch(s), AdamW {args.lr} (warm-up + cosine), "
             f"{args.calib} calibration batches, seed {args.seed}")
    print(write_study(args.out, "init_study", results, args, label="method", intro=intro,
                      columns=[("loss at step N", lambda r: f"{r['loss_at']:.3f} (N={r['loss_step']})"),
                               ("test accuracy", lambda r: f"{r['accuracy']:.3f}"),
                               ("calibration (s)", lambda r: f"{r['calib_s']:.1f}"),
                               ("calibration peak RSS growth (MiB)",
                                lambda r: f"{r['calib_peak_growth_mib']:.0f}"),
                               ("step (ms)", lambda r: f"{r['step_ms']:.0f}")],
                      title="all-MiniLM-L6-v2, tweet sentiment: LoRA r8 initialisations"))


if __name__ == "__main__":
    main()
