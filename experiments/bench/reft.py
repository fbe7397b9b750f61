"""Training-step cost of LoReFT, NoReFT and MeFT against LoRA on the same decoder LM.

Variants, all jitted Adam steps on the same model and batch, timed side by side in
one process (round-robin, after warm-up, median of --reps):

* ``lora``       rank-r LoRA on every block's query and value kernels (the 1.00x reference);
* ``meft_lora``  MeFT in its LoRA form (module rules on the same query/value Dense layers);
* ``loreft``     rank-r LoReFT on every block's output at positions f7+l7 (QR of ``p`` each step);
* ``noreft``     NoReFT at the same positions: LoReFT's edit without the QR;
* ``floor``      no adapter; only the LayerNorms train.

LoReFT-vs-NoReFT is the cost of keeping ``R`` orthonormal by the QR
parameterization. Peak memory is XLA's accounting of the compiled step.

    python experiments/bench/reft.py
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

VARIANTS = ("lora", "meft_lora", "loreft", "noreft", "floor")


def specs(rank):
    return {
        "lora": jlora.Spec({"**/layers_*/{query,value}/kernel": jlora.LoRA(rank=rank)}),
        "meft_lora": jlora.Spec({"**/layers_*/{query,value}": jlora.MeFT(rank)}),
        "loreft": jlora.Spec({"layers_*": jlora.LoReFT(rank, positions="f7+l7")}),
        "noreft": jlora.Spec({"layers_*": jlora.NoReFT(rank, positions="f7+l7")}),
        "floor": jlora.Spec({"**/ln*/*": jlora.Full()}),
    }


def bench(d_model, n_layers, batch, seq, vocab, rank, reps):
    model = DecoderLM(vocab=vocab, d_model=d_model, n_layers=n_layers,
                      n_heads=max(1, d_model // 64), max_len=seq)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, vocab)
    lengths = jnp.arange(batch) * (seq // (2 * batch)) + seq // 2  # right-padded batch
    mask = (jnp.arange(seq)[None] < lengths[:, None]).astype(jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    tx = optax.adam(1e-3)
    compiled, state, mem, counts = {}, {}, {}, {}
    for name, spec in specs(rank).items():
        trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1)))
        counts[name] = jlora.count_trainable(trainable)

        def step(t, opt, tokens, mask, frozen=frozen):
            def loss_fn(t):
                p = jlora.combine(t, frozen)
                logits = jlora.linen.apply(model, {"params": p}, tokens,
                                           context={"attention_mask": mask})
                return lm_loss(logits, tokens)

            loss, g = jax.value_and_grad(loss_fn)(t)
            upd, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, upd), opt, loss

        opt = tx.init(trainable)
        c = jax.jit(step).lower(trainable, opt, tokens, mask).compile()
        mem[name] = xla_bytes(c)
        compiled[name], state[name] = c, (trainable, opt)
        for _ in range(2):  # warm-up
            jax.block_until_ready(c(trainable, opt, tokens, mask))
    times = {n: [] for n in compiled}
    for _ in range(reps):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*state[name], tokens, mask))
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}, mem, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"d_model={args.d_model} layers={args.layers} batch={args.batch} seq={args.seq} "
          f"vocab={args.vocab} rank={args.rank}, median of {args.reps}")
    med, mem, counts = bench(args.d_model, args.layers, args.batch, args.seq, args.vocab,
                             args.rank, args.reps)
    print("| variant | trainable | step ms | vs lora | peak MiB |\n|---|---|---|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {counts[name]} | {1e3 * med[name]:.1f} | "
              f"{med[name] / med['lora']:.2f}x | {mem[name] / MIB:.1f} |")


if __name__ == "__main__":
    main()
