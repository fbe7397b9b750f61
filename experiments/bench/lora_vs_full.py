"""One LoRA training step against one full fine-tuning step of the same decoder LM.

Variants, all jitted AdamW steps on the same model and batch, timed side by side
in one process (round-robin, after warm-up, median of --reps):

* ``full``        every parameter trains (the 1.00x reference);
* ``lora``        rank-r LoRA on every block kernel, jlora's factorized fast path
                  (``jlora.linen.apply``), gradients and Adam state for the factors only;
* ``lora_merged`` the same adapters, but ``jlora.merge`` inside the loss
                  (the generic path any model can use);
* ``floor``       frozen base with no adapter: forward and backward to the inputs,
                  only the LayerNorms train (what no LoRA implementation can beat).

Peak memory is XLA's own accounting of the compiled step
(arguments + outputs + temporaries, ``compiled.memory_analysis()``).

``--remat block`` (or ``names``) rematerializes every block of every variant
(``DecoderLM(remat=...)``) and compiles the steps with XLA:CPU's memory-optimized
scheduler, without which the recomputation saves nothing on CPU; the extra
variant ``full_plain`` is full fine-tuning of the plain model as usually compiled.

    python experiments/bench/lora_vs_full.py                    # d_model 256 and 1024
    python experiments/bench/lora_vs_full.py --d-model 1024 --remat block
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax
import optax

import jlora
from experiments.bench._host import warn_if_unoptimized
from experiments.memory import MIB, xla_bytes
from experiments.models.decoder import MEMORY_OPTIMIZED_CPU, REMAT_POLICIES, DecoderLM, lm_loss

SPEC_PATTERN = "**/layers_*/{query,key,value,out,up,down}/kernel"


def make_steps(model, params, tokens, rank):
    tx = optax.adamw(1e-4)
    steps = {}

    def full_step(p, opt, frozen, tokens):
        loss, g = jax.value_and_grad(lambda p: lm_loss(model.apply({"params": p}, tokens), tokens))(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    steps["full"] = (full_step, params, tx.init(params), {})

    spec = jlora.Spec({SPEC_PATTERN: jlora.LoRA(rank=rank, alpha=2 * rank)})
    adapted = jlora.apply(params, spec, key=jax.random.key(1))
    trainable, frozen = jlora.split(adapted)

    def lora_step(t, opt, frozen, tokens):
        def loss_fn(t):
            p = jlora.combine(t, frozen)
            return lm_loss(jlora.linen.apply(model, {"params": p}, tokens), tokens)

        loss, g = jax.value_and_grad(loss_fn)(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    def merged_step_for():
        """A step that merges adapters (or Full leaves) inside the loss: the generic path."""

        def merged_step(t, opt, frozen, tokens):
            def loss_fn(t):
                p = jlora.merge(jlora.combine(t, frozen))
                return lm_loss(model.apply({"params": p}, tokens), tokens)

            loss, g = jax.value_and_grad(loss_fn)(t)
            upd, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, upd), opt, loss

        return merged_step

    steps["lora"] = (lora_step, trainable, tx.init(trainable), frozen)
    steps["lora_merged"] = (merged_step_for(), trainable, tx.init(trainable), frozen)

    ln = jlora.apply(params, jlora.Spec({"**/ln*/*": jlora.Full()}), key=jax.random.key(2))
    ln_train, ln_frozen = jlora.split(ln)

    steps["floor"] = (merged_step_for(), ln_train, tx.init(ln_train), ln_frozen)
    return steps


def bench(d_model, n_layers, batch, seq, vocab, rank, reps, remat=None):
    model_of = lambda remat: DecoderLM(vocab=vocab, d_model=d_model, n_layers=n_layers,
                                       n_heads=max(1, d_model // 64), max_len=seq, remat=remat)
    model = model_of(remat)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, vocab)
    params = model.init(jax.random.key(0), tokens)["params"]
    steps = make_steps(model, params, tokens, rank)
    if remat is not None:
        steps["full_plain"] = make_steps(model_of(None), params, tokens, rank)["full"]
    remat_options = MEMORY_OPTIMIZED_CPU if remat is not None and jax.default_backend() == "cpu" else {}
    compiled, state, mem = {}, {}, {}
    for name, (fn, p, opt, frozen) in steps.items():
        # the frozen weights are an argument, not a closed-over constant, so that
        # XLA's accounting counts them
        options = {} if name == "full_plain" else remat_options
        c = jax.jit(fn, compiler_options=options).lower(p, opt, frozen, tokens).compile()
        mem[name] = xla_bytes(c)
        compiled[name], state[name] = c, (p, opt, frozen)
        for _ in range(2):  # warm-up
            out = c(*state[name], tokens)
            jax.block_until_ready(out)
    times = {n: [] for n in steps}
    for _ in range(reps):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*state[name], tokens))
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    return med, mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--remat", choices=["none", *REMAT_POLICIES], default="none",
                    help="rematerialize every block (DecoderLM(remat=...)) in every variant")
    args = ap.parse_args(argv)
    remat = None if args.remat == "none" else args.remat
    warn_if_unoptimized()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"layers={args.layers} batch={args.batch} seq={args.seq} vocab={args.vocab} "
          f"rank={args.rank} remat={args.remat}, median of {args.reps}")
    print(f"{'d_model':>7} {'variant':<12} {'step ms':>9} {'vs full':>8} {'peak MiB':>9}")
    for d in args.d_model:
        med, mem = bench(d, args.layers, args.batch, args.seq, args.vocab, args.rank, args.reps, remat)
        for name in med:
            print(f"{d:>7} {name:<12} {1e3 * med[name]:>9.1f} {med[name] / med['full']:>7.2f}x "
                  f"{mem[name] / MIB:>9.1f}")


if __name__ == "__main__":
    main()
