"""QLoRA against LoRA on a bf16 base: memory and step time of one training step.

The project's decoder LM (``experiments/models/decoder.py``) with bf16
activations; every block kernel (query, key, value, out, up, down) adapted with
rank-r factors in float32; embeddings, head and LayerNorms frozen in bf16.
Variants, jitted AdamW steps on the same model and batch, timed side by side in
one process (round-robin after warm-up, median of ``--reps``):

* ``lora_bf16``    LoRA over the bf16 base, factorized fast path (the reference);
* ``qlora``        QLoRA: NF4 base, blocks of 64, double-quantized scales, bf16
                   compute, fast path with the custom VJP (codes saved, not weights);
* ``qlora_plain``  the same QLoRA adapters served by ``jlora.merge`` inside the
                   loss: plain autodiff of dequantize-then-matmul, which keeps every
                   dequantized kernel alive for the backward pass.

Memory is XLA's own accounting of the compiled step (``memory_analysis()``):
arguments + outputs + temporaries − aliased, and the temporaries alone; "base
B/param" counts the bytes of the adapted kernels' frozen storage per parameter.

    python experiments/bench/qlora.py                    # d_model 1024 and 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax
import jax.numpy as jnp
import optax

import jlora
from experiments.memory import MIB, xla_bytes
from experiments.models.decoder import DecoderLM, lm_loss

SPEC_PATTERN = "**/layers_*/{query,key,value,out,up,down}/kernel"
VARIANTS = ("lora_bf16", "qlora", "qlora_plain")


def base_bytes_per_param(adapted) -> float:
    """Frozen storage of the adapted kernels, bytes per base parameter."""
    nbytes = n = 0
    for _, node in jlora.tree.leaves_with_paths(adapted):
        if jlora.is_node(node):
            n += node.base.size if not hasattr(node, "quantized") else node.quantized.size
            nbytes += (node.base_nbytes() if hasattr(node, "base_nbytes")
                       else node.base.size * node.base.dtype.itemsize)
    return nbytes / n


def make_steps(model, params, rank, dtype):
    tx = optax.adamw(1e-4)
    steps = {}

    def step_for(fast):
        def step(t, opt, tokens, frozen):
            def loss_fn(t):
                p = jlora.combine(t, frozen)
                logits = (jlora.linen.apply(model, {"params": p}, tokens) if fast
                          else model.apply({"params": jlora.merge(p)}, tokens))
                return lm_loss(logits, tokens)

            loss, g = jax.value_and_grad(loss_fn)(t)
            upd, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, upd), opt, loss
        return step

    bf16 = jax.tree.map(lambda x: x.astype(dtype), params)
    configs = {
        "lora_bf16": jlora.LoRA(rank=rank, alpha=2 * rank),
        "qlora": jlora.QLoRA(rank=rank, alpha=2 * rank, compute_dtype=dtype),
    }
    bpp = {}
    for name, cfg in configs.items():
        adapted = jlora.apply(bf16, jlora.Spec({SPEC_PATTERN: cfg}), key=jax.random.key(1))
        bpp[name] = base_bytes_per_param(adapted)
        trainable, frozen = jlora.split(adapted)
        steps[name] = (step_for(True), trainable, tx.init(trainable), frozen)
        if name == "qlora":
            steps["qlora_plain"] = (step_for(False), trainable, tx.init(trainable), frozen)
            bpp["qlora_plain"] = bpp[name]
    return steps, bpp


def bench(d_model, n_layers, batch, seq, vocab, rank, reps, dtype=jnp.bfloat16, warmup=2):
    model = DecoderLM(vocab=vocab, d_model=d_model, n_layers=n_layers,
                      n_heads=max(1, d_model // 64), max_len=seq, dtype=dtype)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, vocab)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    params = jax.tree.map(lambda s: jax.random.normal(jax.random.key(0), s.shape, s.dtype)
                          * 0.02, params)
    steps, bpp = make_steps(model, params, rank, dtype)
    compiled, state, mem, temp = {}, {}, {}, {}
    for name, (fn, t, opt, frozen) in steps.items():
        # the frozen tree is an argument (not a jit constant), as in real training
        c = jax.jit(fn).lower(t, opt, tokens, frozen).compile()
        ma = c.memory_analysis()
        mem[name] = xla_bytes(c)
        temp[name] = ma.temp_size_in_bytes
        compiled[name], state[name] = c, (t, opt, tokens, frozen)
        for _ in range(warmup if reps else 0):  # warm-up
            jax.block_until_ready(c(*state[name]))
    times = {n: [] for n in steps}
    for _ in range(reps):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*state[name]))
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) if t else float("nan") for n, t in times.items()}
    return med, mem, temp, bpp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5,
                    help="timed steps per variant; 0: XLA's memory accounting only")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="base and compute dtype (XLA:CPU upcasts bf16 matmuls to float32, "
                         "so bf16 temporaries on CPU hold float32 weight copies)")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"layers={args.layers} batch={args.batch} seq={args.seq} vocab={args.vocab} "
          f"rank={args.rank} dtype={args.dtype}, median of {args.reps}")
    print("| d_model | variant | step ms | vs lora_bf16 | step MiB | temps MiB | base B/param |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for d in args.d_model:
        med, mem, temp, bpp = bench(d, args.layers, args.batch, args.seq, args.vocab,
                                    args.rank, args.reps, jnp.dtype(args.dtype), args.warmup)
        for name in VARIANTS:
            timed = med[name] == med[name]  # not NaN (--reps 0: memory only)
            ms = f"{1e3 * med[name]:.1f}" if timed else "-"
            ratio = f"{med[name] / med['lora_bf16']:.2f}x" if timed else "-"
            row = (f"| {d} | {name} | {ms} | {ratio} | {mem[name] / MIB:.1f} | "
                   f"{temp[name] / MIB:.1f} | {bpp[name]:.3f} |")
            rows.append(row)
            print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
