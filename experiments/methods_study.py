"""The method zoo on a real task: all-MiniLM-L6-v2 fine-tuned on tweet sentiment.

Every method adapts the same 12 attention query/value kernels (6 layers x 2) and
trains the same zero-initialised linear head, with the same data order, AdamW
schedule and number of steps, through jlora's fast path:

    LoRA r8 | rsLoRA r64 | LoRA r64 (alpha/r, the rsLoRA control) | PiSSA r8 |
    DoRA r8 | AdaLoRA 12->8 | GLoRA (supernet + evolutionary search) | VeRA r256

Writes ``experiments/results/methods_study.{md,json,png}``: held-out accuracy,
trainable parameters, median step time, XLA's peak memory of the compiled step,
and the training-loss curves.

    python experiments/methods_study.py [--train 3000 --test 1500 --epochs 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments.data import LABELS, load_tweets, tokenize
from experiments.memory import MIB, xla_bytes
from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir
from experiments.quickstart import accuracy, batches, pad_batch
from experiments.report import write_study

QV = "bert/**/self_attn/{query,value}/kernel"
HEAD = {"classifier/{kernel,bias}": jlora.Full()}
METHODS = {
    "LoRA r8": {QV: jlora.LoRA(rank=8, alpha=16)},
    "rsLoRA r64": {QV: jlora.LoRA(rank=64, alpha=16, rslora=True)},
    "LoRA r64 (alpha/r)": {QV: jlora.LoRA(rank=64, alpha=16)},
    "PiSSA r8": {QV: jlora.LoRA(rank=8, alpha=16, init="pissa")},
    "DoRA r8": {QV: jlora.DoRA(rank=8, alpha=16)},
    "AdaLoRA 12->8": {QV: jlora.AdaLoRA(init_rank=12, target_rank=8, alpha=24)},
    "GLoRA r4": {QV: jlora.GLoRA(rank=4)},
    "VeRA r256": {QV: jlora.VeRA(rank=256)},
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def compile_step(name, rules, model, params, data, args, *, masked=False, adapted=None):
    """One method's compiled training step and its initial state (a ``SimpleNamespace``).

    ``masked=True`` passes the attention mask to the adapters as
    ``context={"attention_mask": mask}`` (position-selecting ones need it).
    ``adapted`` (optional) is an already adapted tree (a data-driven init) to
    train instead of ``jlora.apply(params, rules + head)``.
    """
    kw = (lambda mask: {"context": {"attention_mask": mask}}) if masked else (lambda mask: {})
    tr_ids, tr_mask, tr_y = data[0]
    if adapted is None:
        spec = jlora.Spec({**rules, **HEAD})
        adapted = jlora.apply(params, spec, key=jax.random.key(args.seed))
    trainable, frozen = jlora.split(adapted)
    n_train = jlora.count_trainable(trainable)
    steps = args.epochs * -(-len(tr_ids) // args.batch)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(steps // 10, 1), steps)
    tx = optax.adamw(schedule, weight_decay=0.01)
    is_ada = name.startswith("AdaLoRA")
    is_glora = name.startswith("GLoRA")
    if is_ada:
        tx = jlora.optim.adalora(tx, total_steps=steps, init_warmup=steps // 10,
                                 final_warmup=steps // 5, delta_t=5)
    opt = tx.init(trainable)

    def loss_fn(t, fr, ids, mask, y, valid):
        logits = jlora.linen.apply(model, {"params": jlora.combine(t, fr)}, ids, mask, **kw(mask))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        loss = jnp.sum(ce * valid) / jnp.sum(valid)
        reg = 0.1 * jlora.optim.adalora_orthogonality(t) if is_ada else 0.0
        return loss + reg, loss  # curves report the task loss only

    def step(t, opt, ids, mask, y, valid, key):
        fr = jlora.optim.glora_sample(key, frozen) if is_glora else frozen
        (_, loss), g = jax.value_and_grad(loss_fn, has_aux=True)(t, fr, ids, mask, y, valid)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    b = args.batch
    example = (tr_ids[:b], tr_mask[:b], tr_y[:b], np.ones(b, bool), jax.random.key(0))
    compiled = jax.jit(step).lower(trainable, opt, *example).compile()
    peak = xla_bytes(compiled) / MIB
    return SimpleNamespace(compiled=compiled, trainable=trainable, opt=opt, frozen=frozen,
                           adapted=adapted, n_train=n_train, steps=steps, peak=peak, kw=kw,
                           is_ada=is_ada, is_glora=is_glora, example=example)


def run_method(name, rules, model, params, data, args, *, masked=False, adapted=None):
    """Train one method and evaluate it (``masked``, ``adapted``: see :func:`compile_step`)."""
    (tr_ids, tr_mask, tr_y), (te_ids, te_mask, te_y), (va_ids, va_mask, va_y) = data
    st = compile_step(name, rules, model, params, data, args, masked=masked, adapted=adapted)
    compiled, trainable, opt, frozen, adapted = (st.compiled, st.trainable, st.opt, st.frozen,
                                                 st.adapted)
    n_train, steps, peak, kw, is_ada, is_glora = (st.n_train, st.steps, st.peak, st.kw,
                                                  st.is_ada, st.is_glora)
    b = args.batch
    rng = np.random.default_rng(args.seed)
    losses, times = [], []
    bar = tqdm(total=steps, desc=name, leave=False)
    for _ in range(args.epochs):
        for idx in batches(len(tr_ids), b, rng=rng):
            full, valid = pad_batch(idx, b)
            t0 = time.perf_counter()
            trainable, opt, loss = compiled(trainable, opt, tr_ids[full], tr_mask[full],
                                            tr_y[full], valid, jax.random.key(len(losses)))
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()

    extra = {}
    if is_glora:  # evolutionary search on a validation split, inherited supernet weights
        @jax.jit
        def logits_with(choices, ids, mask):
            p = jlora.combine(trainable, jlora.optim.glora_fix(frozen, choices))
            return jlora.linen.apply(model, {"params": p}, ids, mask, **kw(mask))

        def evaluate(choices):
            c = {k: jnp.asarray(v, jnp.int32) for k, v in choices.items()}
            return accuracy(lambda i, m: logits_with(c, i, m), va_ids, va_mask, va_y, b, "val")

        with tqdm(total=args.glora_generations, desc="GLoRA evolutionary search") as sbar:
            def on_generation(generation, best):
                sbar.update()
                sbar.set_postfix(best=f"{best:.4f}")

            res = jlora.optim.glora_search(evaluate, adapted, seed=args.seed,
                                           population=args.glora_population,
                                           generations=args.glora_generations, parents=4,
                                           mutants=args.glora_population // 2,
                                           crossovers=args.glora_population // 2,
                                           callback=on_generation)
        frozen = jlora.optim.glora_fix(frozen, res.best)
        extra = {"glora_val_acc": res.fitness, "glora_params": res.params,
                 "glora_evaluations": res.evaluations}
    tuned = jlora.combine(trainable, frozen)
    logits_fn = jax.jit(lambda i, m: jlora.linen.apply(model, {"params": tuned}, i, m, **kw(m)))
    acc = accuracy(logits_fn, te_ids, te_mask, te_y, b, f"{name}: test")
    if is_ada:
        extra["adalora_nonzero_lambda"] = int(sum(
            int((n.lam != 0).sum()) for n in jax.tree.leaves(trainable, is_leaf=jlora.is_node)
            if isinstance(n, jlora.methods.AdaLoRANode)))
    return {"method": name, "accuracy": acc, "trainable": n_train,
            "step_ms": 1e3 * statistics.median(times[3:] or times), "peak_mib": peak,
            "losses": losses, **extra}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--val", type=int, default=320)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glora-population", type=int, default=8)
    ap.add_argument("--glora-generations", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    model, params, data = prepare(args)
    results = []
    for name in args.methods:
        results.append(run_method(name, METHODS[name], model, params, data, args))
        r = results[-1]
        print(f"{name:<20} acc {r['accuracy']:.3f}  trainable {r['trainable']:>9,}  "
              f"step {r['step_ms']:.0f} ms  peak {r['peak_mib']:.0f} MiB", flush=True)
    write(results, args)


def prepare(args):
    """``(model, params, data)``: MiniLM with a zero head, and the tokenized tweet splits.

    ``data`` is ``(train, test, val)``, each ``(ids, mask, labels)``; ``args``
    carries ``train``, ``test``, ``val``, ``max_len`` and ``seed``.
    """
    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (tx, ty), (vx, vy) = load_tweets(args.train + args.val, args.test, seed=args.seed)
    ids, mask = tokenize(tx, model_dir, args.max_len)
    te_ids, te_mask = tokenize(vx, model_dir, args.max_len)
    n = args.train
    data = ((ids[:n], mask[:n], ty[:n]), (te_ids, te_mask, vy), (ids[n:], mask[n:], ty[n:]))
    model = SentenceClassifier(cfg, num_classes=len(LABELS))
    params = {"bert": bert, "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                                           "bias": jnp.zeros(len(LABELS))}}
    return model, params, data


def write(results, args):
    intro = (f"all-MiniLM-L6-v2 on tweet sentiment: {args.train} train / {args.test} test tweets, "
             f"max {args.max_len} tokens, batch {args.batch}, {args.epochs} epoch(s), AdamW "
             f"{args.lr} (warm-up + cosine), seed {args.seed}")
    print(write_study(args.out, "methods_study", results, args, label="method", intro=intro,
                      columns=[("test accuracy", lambda r: f"{r['accuracy']:.3f}"),
                               ("trainable params", lambda r: f"{r['trainable']:,}"),
                               ("step (ms)", lambda r: f"{r['step_ms']:.0f}"),
                               ("peak MiB", lambda r: f"{r['peak_mib']:.0f}")],
                      title="all-MiniLM-L6-v2, tweet sentiment: query/value adapters + head"))


if __name__ == "__main__":
    main()
