"""Sharded LoRA step vs sharded full fine-tuning step on a device mesh.

Step time (median of --reps after warm-up, variants round-robin in one process)
and per-device memory from XLA's accounting of the compiled step. On CPU, run
with simulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench/sharded.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax

from experiments import train
from experiments.memory import MIB, xla_bytes
from experiments.models.decoder import DecoderLM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meshes", nargs="+", default=["data=8", "data=4,tensor=2", "data=2,fsdp=4",
                                                    "data=2,fsdp=2,tensor=2"])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    model = DecoderLM(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=max(1, args.d_model // 64), max_len=args.seq)
    tokens = train.counting_batch(jax.random.key(0), args.batch, args.seq, args.vocab)
    params = model.init(jax.random.key(1), tokens)["params"]
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"d_model={args.d_model} layers={args.layers} batch={args.batch}x{args.seq}")
    print(f"{'mesh':<24} {'variant':<6} {'step ms':>9} {'vs full':>8} {'MiB/device':>11}")
    for text in args.meshes:
        mesh = train.make_mesh(train.parse_mesh(text))
        runs = {}
        for name, full in (("full", True), ("lora", False)):
            step, t, opt, frozen, batch_sh = train.build(model, params, mesh, full=full)
            x = jax.device_put(tokens, batch_sh)
            mib = xla_bytes(step.lower(t, opt, frozen, x).compile()) / MIB
            for _ in range(2):
                t, opt, loss = step(t, opt, frozen, x)
            jax.block_until_ready(loss)
            runs[name] = [step, [t, opt], frozen, x, [], mib]
        for _ in range(args.reps):
            for name, r in runs.items():
                step, state, frozen, x, times, _ = r
                t0 = time.perf_counter()
                t, opt, loss = step(*state, frozen, x)
                jax.block_until_ready(loss)
                times.append(time.perf_counter() - t0)
                r[1] = [t, opt]
        med = {n: statistics.median(r[4]) for n, r in runs.items()}
        for name in ("full", "lora"):
            print(f"{text:<24} {name:<6} {1e3 * med[name]:>9.1f} {med[name] / med['full']:>7.2f}x "
                  f"{runs[name][5]:>11.1f}")


if __name__ == "__main__":
    main()
