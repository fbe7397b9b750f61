"""Intrinsic dimension (Li et al. ICLR 2018; Aghajanyan et al. ACL 2021) measured with jlora.Subspace.

Two sweeps over ``d``, each against training the same ``D`` parameters directly:

* **digits MLP**: a 64-100-100-10 ReLU MLP trained from its random init on
  scikit-learn's 8x8 digits (1,797 images, offline; 1,437 train / 360 test),
  the whole network (``D = 17,610``) in a random subspace, Fastfood vs dense
  projection, full-batch Adam. The paper's analogue: MNIST FC 784-200-200-10,
  ``D = 199,210``, ``d90 = 750``.
* **all-MiniLM-L6-v2 on tweet sentiment** (``experiments/data.py``): fine-tuning
  the 12 attention query/value kernels plus the zero-initialised 3-way head
  (``D ≈ 1.77M``) through Fastfood. The paper's analogue: RoBERTa on MRPC
  reaches 90% of full fine-tuning with about 200 parameters (all of RoBERTa in
  the subspace, SAID, much longer training).

``d90``: the smallest tested ``d`` whose test accuracy reaches 90% of the
direct-training baseline's. Writes ``experiments/results/intrinsic_dim.{md,json,png}``.

    python experiments/intrinsic_dim.py [--skip-minilm] [--minilm-steps 90]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = ""  # the rule naming the root module: the whole tree in one subspace


class MLP(nn.Module):
    hidden: tuple[int, ...] = (100, 100)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.classes)(x)


def digits(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], a seeded stratified-free split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    n_test = int(round(test_fraction * len(x)))
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def train_mlp(d, projection, data, *, steps, lr, seed=0, hidden=(100, 100)):
    """Test accuracy of the MLP trained in a ``d``-dim subspace (``d=None``: directly)."""
    (xtr, ytr), (xte, yte) = data
    model = MLP(hidden)
    params = model.init(jax.random.key(seed), xtr[:1])["params"]
    if d is None:
        trainable, frozen = params, None
        to_params = lambda t, f: t
    else:
        spec = jlora.Spec({ROOT: jlora.Subspace(d, projection=projection, key=seed + 1,
                                                cache=True)})
        trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(seed)))
        to_params = lambda t, f: jlora.merge(jlora.combine(t, f))
    tx = optax.adam(lr)
    opt = tx.init(trainable)

    def loss_fn(t, fr):
        logits = model.apply({"params": to_params(t, fr)}, xtr)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()

    @jax.jit
    def step(t, fr, opt):  # frozen as an argument: no constant folding of the projection
        loss, g = jax.value_and_grad(loss_fn)(t, fr)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    t0 = time.perf_counter()
    times = []
    for i in range(steps):
        s = time.perf_counter()
        trainable, opt, loss = step(trainable, frozen, opt)
        if i >= 2:
            loss.block_until_ready()
            times.append(time.perf_counter() - s)
    logits = model.apply({"params": to_params(trainable, frozen)}, xte)
    acc = float((np.asarray(logits).argmax(-1) == yte).mean())
    n = sum(x.size for x in jax.tree.leaves(params))
    return {"d": d, "projection": projection or "direct", "accuracy": acc, "D": n,
            "final_loss": float(loss), "step_ms": 1e3 * statistics.median(times),
            "seconds": time.perf_counter() - t0}


def d90(rows, baseline):
    """The smallest ``d`` whose accuracy reaches 90% of ``baseline`` (``None`` if none does)."""
    ok = [r["d"] for r in rows if r["accuracy"] >= 0.9 * baseline]
    return min(ok) if ok else None


# ------------------------------------------------------------------ MiniLM


def minilm_sweep(dims, args):
    from experiments.data import LABELS, load_tweets, tokenize
    from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir
    from experiments.quickstart import accuracy, batches, pad_batch

    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (tx_, ty), (vx, vy) = load_tweets(args.minilm_train, args.minilm_test, seed=args.seed)
    ids, mask = tokenize(tx_, model_dir, args.max_len)
    te_ids, te_mask = tokenize(vx, model_dir, args.max_len)
    model = SentenceClassifier(cfg, num_classes=len(LABELS))
    params = {"bert": bert, "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                                           "bias": jnp.zeros(len(LABELS))}}
    targets = ("bert/**/self_attn/{query,value}/kernel", "classifier/{kernel,bias}")
    b = args.batch
    rows = []
    for d in [None, *dims]:
        if d is None:
            spec = jlora.Spec({t: jlora.Full() for t in targets})
            lr = args.minilm_lr
        else:
            spec = jlora.Spec({ROOT: jlora.Subspace(d, key=args.seed + 1, include=targets,
                                                    cache=True)})
            lr = args.minilm_subspace_lr
        trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(args.seed)))
        n_train = jlora.count_trainable(trainable)
        tx = optax.adam(lr)
        opt = tx.init(trainable)

        def loss_fn(t, fr, ids, mask, y, valid):
            logits = jlora.linen.apply(model, {"params": jlora.combine(t, fr)}, ids, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(ce * valid) / jnp.sum(valid)

        @jax.jit
        def step(t, fr, opt, ids, mask, y, valid):  # frozen as an argument: no constant folding
            loss, g = jax.value_and_grad(loss_fn)(t, fr, ids, mask, y, valid)
            u, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, u), opt, loss

        rng = np.random.default_rng(args.seed)
        times, losses = [], []
        name = "direct" if d is None else f"d={d}"
        bar = tqdm(total=args.minilm_steps, desc=f"MiniLM {name}", leave=False)
        while len(losses) < args.minilm_steps:
            for idx in batches(len(ids), b, rng=rng):
                if len(losses) >= args.minilm_steps:
                    break
                full, valid = pad_batch(idx, b)
                s = time.perf_counter()
                trainable, opt, loss = step(trainable, frozen, opt, ids[full], mask[full],
                                            ty[full], valid)
                losses.append(float(loss))
                times.append(time.perf_counter() - s)
                bar.update()
        bar.close()
        tuned = jlora.combine(trainable, frozen)
        run = jax.jit(lambda p, i, m: jlora.linen.apply(model, {"params": p}, i, m))
        acc = accuracy(lambda i, m: run(tuned, i, m), te_ids, te_mask, vy, b, f"MiniLM {name}: test")
        rows.append({"d": d, "projection": "direct" if d is None else "fastfood",
                     "accuracy": acc, "trainable": n_train, "lr": lr,
                     "final_loss": float(np.mean(losses[-10:])),
                     "step_ms": 1e3 * statistics.median(times[2:] or times)})
        print(f"MiniLM {name:<8} acc {acc:.3f} trainable {n_train:>9,} "
              f"step {rows[-1]['step_ms']:.0f} ms", flush=True)
    return rows


# ------------------------------------------------------------------ report


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


PAPERS = [
    ("Li et al. 2018, MNIST FC 784-200-200-10 (D = 199,210), dense/sparse/Fastfood, "
     "trained to convergence from scratch", "d90 = 750"),
    ("Li et al. 2018, MNIST LeNet (D = 44,426)", "d90 = 290"),
    ("Aghajanyan et al. 2021, RoBERTa-large on MRPC, all D = 355M parameters (SAID), "
     "fine-tuned to convergence", "90% of full fine-tuning with about 200 parameters"),
]


def write(out):
    """``intrinsic_dim.md`` and ``.png`` from the latest saved parts."""
    dig, mini = load_part(out, "digits"), load_part(out, "minilm")
    lines = ["# Intrinsic dimension with jlora.Subspace", "",
             "`d90`: the smallest tested `d` whose test accuracy reaches 90% of training the "
             "same `D` parameters directly. One seed per point; steps are few (CPU budget), so "
             "every number here is a short-training measurement, not a converged one. The "
             "2-core machine was shared with other jobs during these runs: step times are "
             "noisy, compare them within a table only.", "",
             "| published figure (for comparison) | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in PAPERS]
    summary = {}
    if dig:
        a, rows = dig["args"], dig["rows"]
        base = next(r for r in rows if r["d"] is None)
        lines += ["", f"## Digits MLP 64-{'-'.join(map(str, a['hidden']))}-10 "
                  f"(D = {base['D']:,})", "",
                  f"Hardware: {dig['hardware']}. scikit-learn digits, 1,437 train / 360 test, "
                  f"full-batch Adam, {a['steps']} steps (lr {a['lr']} direct, "
                  f"{a['subspace_lr']} in the subspace), from the random init, seed {a['seed']}; "
                  "the whole network (all kernels and biases) in the subspace; `cache=True`.",
                  "", "| d | projection | test accuracy | % of direct | step (ms) |",
                  "|---:|---|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['d'] if r['d'] is not None else 'D (direct)'} | "
                         f"{r['projection']} | {r['accuracy']:.3f} | "
                         f"{100 * r['accuracy'] / base['accuracy']:.0f}% | {r['step_ms']:.2f} |")
        for proj in ("fastfood", "dense", "sparse"):
            sub = [r for r in rows if r["projection"] == proj]
            if sub:
                summary[f"digits {proj}"] = d90(sub, base["accuracy"])
        lines += ["", f"d90 (threshold {0.9 * base['accuracy']:.3f}): " + ", ".join(
            f"{k.split()[1]} {v if v is not None else '> tested'}"
            for k, v in summary.items() if k.startswith("digits")), ""]
    if mini:
        a, rows = mini["args"], mini["rows"]
        mb = next(r for r in rows if r["d"] is None)
        lines += ["", f"## all-MiniLM-L6-v2, tweet sentiment (D = {mb['trainable']:,})", "",
                  f"Hardware: {mini['hardware']}. {a['minilm_train']} train / "
                  f"{a['minilm_test']} test tweets, max {a['max_len']} tokens, batch "
                  f"{a['batch']}, {a['minilm_steps']} Adam steps (lr {a['minilm_lr']} direct, "
                  f"{a['minilm_subspace_lr']} in the subspace), seed {a['seed']}. `D`: the 12 "
                  "attention query/value kernels and the zero-initialised 3-way head (direct: "
                  "those trained in full); Fastfood, `cache=True`.", "",
                  "| d | test accuracy | % of direct | trainable | step (ms) |",
                  "|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['d'] if r['d'] is not None else 'D (direct)'} | "
                         f"{r['accuracy']:.3f} | {100 * r['accuracy'] / mb['accuracy']:.0f}% | "
                         f"{r['trainable']:,} | {r['step_ms']:.0f} |")
        summary["minilm fastfood"] = d90([r for r in rows if r["d"] is not None], mb["accuracy"])
        lines += ["", f"d90 (threshold {0.9 * mb['accuracy']:.3f}): "
                  f"{summary['minilm fastfood'] or '> tested'}", ""]
    lines += ["## Where our setting differs from the papers", "",
              "* Digits are 8x8 (64 inputs), not MNIST's 28x28: a smaller network "
              "(D = 17,610 vs 199,210) on an easier task, so a smaller d90 is expected.",
              "* A few hundred full-batch steps, one seed, no learning-rate search per d; the "
              "papers train each d to convergence (and Li et al. average runs).",
              "* MiniLM: only the query/value kernels and the head are in the subspace "
              "(Aghajanyan et al. put all of RoBERTa's parameters in it, with SAID's per-layer "
              "scalars), a 3-way tweet task instead of MRPC, and tens of steps instead of "
              "epochs: the MiniLM numbers bound how fast the subspace learns, not d90 at "
              "convergence.", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "intrinsic_dim.md"), "w") as f:
        f.write(text)
    plot(out, dig["rows"] if dig else [], mini["rows"] if mini else [])
    return text


def plot(out, digits_rows, minilm_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(digits_rows)) + int(bool(minilm_rows))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    todo = [(rows, title) for rows, title in ((digits_rows, "digits MLP"),
                                              (minilm_rows, "MiniLM, tweets")) if rows]
    for ax, (rows, title) in zip(axes[0], todo):
        base = next(r for r in rows if r["d"] is None)["accuracy"]
        for proj, marker in (("fastfood", "o-"), ("dense", "s--"), ("sparse", "^:")):
            pts = sorted((r["d"], r["accuracy"]) for r in rows if r["projection"] == proj)
            if pts:
                ax.plot(*zip(*pts), marker, label=proj)
        ax.axhline(base, color="k", lw=1, label="direct training")
        ax.axhline(0.9 * base, color="gray", ls=":", lw=1, label="90% (d90 threshold)")
        ax.set_xscale("log")
        ds = sorted({r["d"] for r in rows if r["d"] is not None})
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.minorticks_off()
        ax.set_xlabel("subspace dimension d")
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "intrinsic_dim.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("digits", "minilm", "all"), default="all",
                    help="run one sweep; the report combines the latest results of both")
    ap.add_argument("--dims", type=int, nargs="*", default=[25, 50, 100, 200, 400, 800])
    ap.add_argument("--projections", nargs="*", default=["fastfood", "dense"])
    ap.add_argument("--hidden", type=int, nargs="*", default=[100, 100])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--subspace-lr", type=float, default=3e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minilm-dims", type=int, nargs="*", default=[30, 300, 3000])
    ap.add_argument("--minilm-train", type=int, default=1280)
    ap.add_argument("--minilm-test", type=int, default=512)
    ap.add_argument("--minilm-steps", type=int, default=40)
    ap.add_argument("--minilm-lr", type=float, default=1e-3)
    ap.add_argument("--minilm-subspace-lr", type=float, default=1e-2)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    if args.part in ("digits", "all"):
        data = digits(args.seed)
        hidden = tuple(args.hidden)
        rows = [train_mlp(None, None, data, steps=args.steps, lr=args.lr, seed=args.seed,
                          hidden=hidden)]
        grid = [(p, d) for p in args.projections for d in args.dims]
        for proj, d in tqdm(grid, desc="digits sweep"):
            rows.append(train_mlp(d, proj, data, steps=args.steps, lr=args.subspace_lr,
                                  seed=args.seed, hidden=hidden))
            r = rows[-1]
            tqdm.write(f"digits {r['projection']:<8} d={r['d']!s:<6} acc {r['accuracy']:.3f} "
                       f"step {r['step_ms']:.2f} ms")
        save_part(args.out, "digits", rows, args)
    if args.part in ("minilm", "all"):
        save_part(args.out, "minilm", minilm_sweep(args.minilm_dims, args), args)
    print(write(args.out))


def save_part(out, part, rows, args):
    with open(os.path.join(out, f"intrinsic_dim_{part}.json"), "w") as f:
        json.dump({"args": vars(args), "hardware": hardware(), "rows": rows}, f, indent=1)


def load_part(out, part):
    path = os.path.join(out, f"intrinsic_dim_{part}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
