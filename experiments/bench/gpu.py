"""LoRA model FLOPs utilisation (MFU) of a ~1B-parameter decoder LM in bf16 on one
accelerator: jlora against PyTorch + PEFT (and qwix where installed).

The model is ``experiments/models/decoder.py`` (default d_model 2048, 16 layers,
16 heads, vocab 32000, 1024 tokens, batch 8: 0.94 B parameters) with a bf16
base and bf16 compute, rank-16 LoRA on every block kernel with float32 factors
and float32 AdamW state; PEFT's side is the same model in torch (bf16 weights,
float32 adapters via ``autocast_adapter_dtype``) on the CUDA device. The
variants alternate in one process after warm-up; the table gives the median
step time, tokens/s and MFU, where model FLOPs follow the PaLM convention
(``6·N·T`` for the N parameters of the blocks and head plus ``12·L·T·S·d`` for
attention) even though a LoRA step skips the frozen weights' gradient GEMMs, so
``4/6`` of the dense work is the ceiling a LoRA step can reach.

    python experiments/bench/gpu.py                     # on a GPU (peak from --peak-tflops)
    python experiments/bench/gpu.py --tiny --reps 2     # CPU smoke test, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from experiments.bench.peers import DEC_SPEC, DEC_TARGETS, QWIX_DEC, have, jlora_step, qwix_step, torch_step

#: dense bf16 peak TFLOP/s by device kind (vendor data sheets, no sparsity)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0}


def model_flops(d, layers, vocab, seq, tokens):
    n = layers * 12 * d * d + d * vocab
    return 6 * n * tokens + 12 * layers * tokens * seq * d


def peak_tflops(kind: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.d_model, args.layers, args.heads, args.vocab, args.seq, args.batch = 64, 2, 2, 128, 32, 2
    from experiments.models.decoder import DecoderLM, lm_loss

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind}; d_model {args.d_model}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq}, rank {args.rank}")
    kw = dict(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
              max_len=args.seq)
    model = DecoderLM(**kw, dtype=jnp.bfloat16)
    tokens_np = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    tokens = jnp.asarray(tokens_np)
    params = jax.jit(lambda k: jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                                            DecoderLM(**kw).init(k, tokens)["params"]))(jax.random.key(0))
    loss_of = lambda apply, p, tok: lm_loss(apply({"params": p}, tok), tok)
    config = jlora.LoRA(rank=args.rank, alpha=2 * args.rank)
    variants = {}
    variants["jlora lora"], _ = jlora_step(loss_of, model, params, [DEC_SPEC], config, (tokens,))
    variants["jlora dora"], _ = jlora_step(loss_of, model, params, [DEC_SPEC],
                                           jlora.DoRA(rank=args.rank, alpha=2 * args.rank), (tokens,))
    if have("qwix"):
        variants["qwix lora"] = qwix_step(loss_of, model, params, QWIX_DEC, (tokens,), (tokens,),
                                          rank=args.rank, alpha=2 * args.rank)
    if have("torch") and have("peft"):
        import torch
        from peft import LoraConfig, get_peft_model

        from experiments.bench._torch_models import decoder_from_flax, decoder_loss

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and not args.tiny:
            print("skip PEFT: torch has no CUDA device here")
        else:
            host = jax.device_get(jax.tree.map(lambda p: p.astype(jnp.float32), params))
            for dora in (False, True):
                base = decoder_from_flax(host, args.vocab, args.d_model, args.layers, args.heads,
                                         args.seq, dtype=torch.bfloat16).to(device)
                cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=DEC_TARGETS,
                                 use_dora=dora)
                m = get_peft_model(base, cfg, autocast_adapter_dtype=True)
                tt = torch.tensor(tokens_np, dtype=torch.long, device=device)
                variants["peft dora" if dora else "peft lora"] = torch_step(
                    m, lambda m, t: decoder_loss(m(t), t), (tt,))
    else:
        print("skip PEFT: torch and peft are not installed")
    if not have("qwix"):
        print("skip qwix: not installed (pip install qwix)")
    for fn in variants.values():  # compile + warm-up
        fn(), fn()
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    flops = model_flops(args.d_model, args.layers, args.vocab, args.seq, args.batch * args.seq)
    peak = peak_tflops(dev.device_kind, args.peak_tflops)
    print(f"model FLOPs/step {flops / 1e12:.2f} T; peak {peak or 'unknown (pass --peak-tflops)'} TFLOP/s")
    print(f"{'variant':<12} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    med = {}
    for k, t in times.items():
        med[k] = statistics.median(t)
        tf = flops / med[k] / 1e12
        mfu = f"{100 * tf / peak:.1f}%" if peak else "n/a"
        print(f"{k:<12} {1e3 * med[k]:>9.1f} {args.batch * args.seq / med[k]:>10.0f} {tf:>8.1f} {mfu:>6}")
    return med


if __name__ == "__main__":
    main()
