"""XLA:CPU's float32 GEMMs against PyTorch's at the shapes of the benchmarked steps.

On the frozen-model cases of ``peers.py`` (adapters on query and value only) most
of a training step is the frozen projections' GEMMs, forward and input gradient,
so a library's step can be no faster than its GEMMs. This script times one GEMM
per shape, ``y = x·K`` and the input gradient ``dx = dy·Kᵀ`` (``Kᵀ`` read in
place, as both autodiff and PyTorch do), three ways:

* ``xla``        : a jitted ``lax.dot_general`` with XLA's default choice of GEMM
                   (on jax 0.10 a YNNPACK fusion where XLA:CPU picks one);
* ``xla no-ynn`` : the same with ``compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}``
                   (XLA's own dot emitter);
* ``torch``      : ``torch.matmul`` (MKL or oneDNN), when torch is installed.

Every round runs each (variant, shape) once in a fresh seeded order, so no variant
always follows another (PyTorch's OpenMP threads keep spinning after a GEMM and
slow whatever runs next); medians over rounds after warm-up, as GFLOP/s and as the
ratio of XLA's time to torch's.

    python experiments/bench/gemm.py [--reps 30] [--json out.json]
    python experiments/bench/gemm.py --from-json experiments/results/gemm_xeon.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench._host import cpu_name, version, warn_if_unoptimized

# (rows, contracted, out, transposed): a (rows, contracted) operand times a
# (contracted, out) one, stored as (out, contracted) and read transposed where
# transposed is set (an input gradient dy·Kᵀ). all-MiniLM-L6-v2's projections at
# 1024 tokens (a batch of 8 x 128) and the decoder LM's at d1024.
SHAPES = [
    (1024, 384, 384, False), (1024, 384, 384, True),
    (1024, 384, 1536, False), (1024, 1536, 384, True),
    (1024, 1536, 384, False), (1024, 384, 1536, True),
    (1024, 1024, 1024, False), (1024, 1024, 4096, False), (1024, 4096, 1024, True),
]

NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def name(shape) -> str:
    t, k, n, transposed = shape
    return f"{t} x {k} · {k} x {n}" + (" (Kᵀ)" if transposed else "")


def xla_gemm(x, w, transposed: bool, options: dict):
    """A compiled ``x·w`` (or ``x·wᵀ``) and whether XLA made it a YNNPACK fusion."""
    dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims)).lower(x, w).compile(options)
    return (lambda: f(x, w).block_until_ready()), "ynn_fusion" in f.as_text()


def variants(shapes, rng, *, torch_too: bool):
    """``{(variant, shape): run}`` and ``{shape: whether XLA chose YNNPACK}``."""
    out, ynn = {}, {}
    for shape in shapes:
        t, k, n, transposed = shape
        x = rng.standard_normal((t, k), dtype=np.float32)
        w = rng.standard_normal((n, k) if transposed else (k, n), dtype=np.float32)
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        out["xla", shape], ynn[shape] = xla_gemm(jx, jw, transposed, {})
        out["xla no-ynn", shape], _ = xla_gemm(jx, jw, transposed, NO_YNN)
        if torch_too:
            import torch

            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            out["torch", shape] = (lambda tx=tx, tw=tw: tx @ tw.t()) if transposed else \
                (lambda tx=tx, tw=tw: tx @ tw)
    return out, ynn


def run(reps: int, *, shapes=SHAPES, seed: int = 0) -> dict:
    torch_too = importlib.util.find_spec("torch") is not None
    if not torch_too:
        print("skip torch: not installed (pip install torch==2.13.0)")
    rng = np.random.default_rng(seed)
    fns, ynn = variants(shapes, rng, torch_too=torch_too)
    keys = list(fns)
    for f in fns.values():
        f(), f()
    times = {k: [] for k in keys}
    for _ in range(reps):
        for i in rng.permutation(len(keys)):
            start = time.perf_counter()
            fns[keys[i]]()
            times[keys[i]].append(time.perf_counter() - start)
    rows = []
    for shape in shapes:
        flops = 2 * shape[0] * shape[1] * shape[2]
        med = {v: statistics.median(times[v, shape]) for v in ("xla", "xla no-ynn", "torch") if (v, shape) in times}
        rows.append({"shape": name(shape), "ynn": ynn[shape],
                     "gflops": {v: flops / s / 1e9 for v, s in med.items()},
                     "seconds": med})
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "reps": reps,
            "jax": version("jax"), "torch": version("torch"), "rows": rows}


def table(res: dict) -> str:
    lines = [f"Median of {res['reps']} rounds (each variant and shape once per round, in a fresh "
             f"seeded order); {res['cpu']}, {res['cores']} cores; jax {res['jax']}, torch {res['torch']}. "
             "GFLOP/s, and XLA's time over torch's (lower is better).", "",
             "| GEMM | XLA (YNNPACK?) | XLA no-ynn | torch | XLA / torch | no-ynn / torch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        g, s = r["gflops"], r["seconds"]
        ratio = lambda v: f"{s[v] / s['torch']:.2f}x" if "torch" in s else "n/a"
        lines.append(f"| {r['shape']} | {g['xla']:.0f} ({'yes' if r['ynn'] else 'no'}) | "
                     f"{g['xla no-ynn']:.0f} | {g.get('torch', float('nan')):.0f} | "
                     f"{ratio('xla')} | {ratio('xla no-ynn')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--from-json", help="only print the table of a --json file of an earlier run")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            print(table(json.load(f)))
        return
    if args.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {args.reps}")
    warn_if_unoptimized()
    res = run(args.reps)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
