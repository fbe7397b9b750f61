"""QLoRA vs LoRA on a bf16 base vs full fine-tuning, on the project's decoder LM.

A small decoder LM (``experiments/models/decoder.py``) is first trained in full
on sequences that count upward by 1 (mod vocab); that model is then fine-tuned,
with the same data order and number of steps, to count by 3:

* ``full``       every parameter trains (float32);
* ``lora_bf16``  rank-r LoRA on every block kernel over the base cast to bf16,
                 bf16 compute, factors in float32 (jlora's fast path);
* ``qlora``      the same adapters over an NF4 base (blocks of 64, double
                 quantization), bf16 compute (QLoRA's recipe).

Reported: next-token accuracy and loss on held-out sequences of the new task,
median step time, XLA's accounting of the compiled step's memory and the bytes
per parameter of the adapted kernels' frozen storage. Writes
``experiments/results/qlora_study.{md,json,png}``.

    python experiments/qlora_study.py [--steps 300]
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
import optax
from tqdm import tqdm

import jlora
from experiments.memory import MIB, xla_bytes
from experiments.models.decoder import DecoderLM, lm_loss
from experiments.report import write_study

PATTERN = "**/layers_*/{query,key,value,out,up,down}/kernel"
VARIANTS = ("full", "lora_bf16", "qlora")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def counting(key, batch, seq, vocab, stride):
    start = jax.random.randint(key, (batch, 1), 0, vocab)
    return (start + stride * jnp.arange(seq)[None]) % vocab


def accuracy_and_loss(logits, tokens):
    pred = jnp.argmax(logits[:, :-1], -1)
    return float(jnp.mean(pred == tokens[:, 1:])), float(lm_loss(logits, tokens))


def pretrain(model, args):
    tokens = counting(jax.random.key(0), args.batch, args.seq, args.vocab, 1)
    params = model.init(jax.random.key(0), tokens)["params"]
    tx = optax.adamw(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, tokens):
        loss, g = jax.value_and_grad(lambda p: lm_loss(model.apply({"params": p}, tokens),
                                                       tokens))(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    for i in tqdm(range(args.pretrain_steps), desc="pretrain (stride 1)", leave=False):
        params, opt, _ = step(params, opt, counting(jax.random.key(10_000 + i), args.batch,
                                                    args.seq, args.vocab, 1))
    return params


def frozen_bytes_per_param(adapted) -> float:
    nbytes = n = 0
    for _, node in jlora.tree.leaves_with_paths(adapted):
        if jlora.is_node(node) and hasattr(node, "quantized"):
            n, nbytes = n + node.quantized.size, nbytes + node.base_nbytes()
        elif jlora.is_node(node) and not isinstance(node, jlora.methods.FullNode):
            n, nbytes = n + node.base.size, nbytes + node.base.size * node.base.dtype.itemsize
    return nbytes / n if n else float("nan")


def run_variant(name, params, args):
    bf16 = name != "full"
    model = DecoderLM(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=max(1, args.d_model // 64), max_len=args.seq,
                      dtype=jnp.bfloat16 if bf16 else None)
    if name == "full":
        spec, lr = jlora.Spec({"**": jlora.Full()}), args.lr_full
    else:
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        cfg = (jlora.LoRA(rank=args.rank, alpha=2 * args.rank) if name == "lora_bf16" else
               jlora.QLoRA(rank=args.rank, alpha=2 * args.rank, compute_dtype=jnp.bfloat16))
        spec, lr = jlora.Spec({PATTERN: cfg}), args.lr
    adapted = jlora.apply(params, spec, key=jax.random.key(args.seed))
    bpp = frozen_bytes_per_param(adapted)
    trainable, frozen = jlora.split(adapted)
    tx = optax.adamw(optax.warmup_constant_schedule(0.0, lr, max(args.steps // 20, 1)),
                     weight_decay=0.0)
    opt = tx.init(trainable)

    def forward(t, frozen, tokens):
        return jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, tokens)

    def step(t, opt, frozen, tokens):
        loss, g = jax.value_and_grad(lambda t: lm_loss(forward(t, frozen, tokens), tokens))(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    batch0 = counting(jax.random.key(1), args.batch, args.seq, args.vocab, 3)
    compiled = jax.jit(step).lower(trainable, opt, frozen, batch0).compile()
    mem = xla_bytes(compiled)
    losses, times = [], []
    for i in tqdm(range(args.steps), desc=name, leave=False):
        tokens = counting(jax.random.key(20_000 + i), args.batch, args.seq, args.vocab, 3)
        t0 = time.perf_counter()
        trainable, opt, loss = compiled(trainable, opt, frozen, tokens)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    test = counting(jax.random.key(999), 256, args.seq, args.vocab, 3)
    acc, test_loss = accuracy_and_loss(jax.jit(forward)(trainable, frozen, test), test)
    return {"variant": name, "accuracy": acc, "test_loss": test_loss,
            "step_ms": 1e3 * statistics.median(times[2:] or times), "step_mib": mem / MIB,
            "base_bytes_per_param": bpp, "trainable": jlora.count_trainable(adapted)
            if name != "full" else sum(x.size for x in jax.tree.leaves(params)),
            "losses": losses}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-full", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    model = DecoderLM(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=max(1, args.d_model // 64), max_len=args.seq)
    params = pretrain(model, args)
    test = counting(jax.random.key(999), 256, args.seq, args.vocab, 3)
    before = accuracy_and_loss(model.apply({"params": params}, test), test)
    results = [run_variant(name, params, args) for name in VARIANTS]
    intro = (f"Decoder LM d_model={args.d_model}, {args.layers} layers, vocab {args.vocab}, "
             f"pretrained {args.pretrain_steps} steps on count-by-1, then {args.steps} steps "
             f"on count-by-3 (batch {args.batch}, seq {args.seq}; rank {args.rank}); "
             f"accuracy before fine-tuning {before[0]:.3f}")
    table = write_study(
        args.out, "qlora_study", results, args, label="variant", intro=intro,
        title="QLoRA vs LoRA (bf16 base) vs full fine-tuning",
        columns=[("held-out accuracy", lambda r: f"{r['accuracy']:.3f}"),
                 ("held-out loss", lambda r: f"{r['test_loss']:.3f}"),
                 ("step ms", lambda r: f"{r['step_ms']:.1f}"),
                 ("step MiB (XLA)", lambda r: f"{r['step_mib']:.1f}"),
                 ("frozen kernel B/param", lambda r: "-" if r["variant"] == "full"
                  else f"{r['base_bytes_per_param']:.3f}"),
                 ("trainable", lambda r: f"{r['trainable']:,}")])
    print(table)
    return results


if __name__ == "__main__":
    main()
