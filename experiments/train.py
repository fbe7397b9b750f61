"""LoRA training of a decoder LM on a device mesh (one GPU, a multi-GPU host, a TPU pod slice).

    python experiments/train.py --mesh data=2,fsdp=2,tensor=2 --steps 20
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/train.py --mesh data=4,tensor=2

The base model is sharded with FSDP and tensor-parallel rules (Megatron style:
query/key/value/up column-parallel, out/down row-parallel), the adapters follow
their base weights (``jlora.sharding.specs``), the batch is split over
``data`` x ``fsdp``, the optimizer state follows the factors, and the step is
jitted with donated buffers. Nothing in the model code changes. On several
hosts pass ``--multihost`` (it calls ``jax.distributed.initialize()``, which
reads the TPU pod or SLURM environment) and run the same command on every host.
``--pmap`` runs the data-parallel ``pmap`` variant instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from experiments.models.decoder import DecoderLM, lm_loss

AXES = ("data", "fsdp", "tensor")
LORA_SPEC = jlora.Spec({
    "**/layers_*/{query,key,value,out,up,down}/kernel": jlora.LoRA(rank=8, alpha=16),
})
BATCH_SPEC = P(("data", "fsdp"), None)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,tensor=4"`` -> ``{"data": 2, "fsdp": 1, "tensor": 4}``."""
    shape = dict.fromkeys(AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name not in AXES or not size.isdigit():
            raise ValueError(f"--mesh: bad entry {part!r}; use e.g. data=2,fsdp=2,tensor=2")
        shape[name] = int(size)
    return shape


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    n = math.prod(shape.values())
    if n > len(devices):
        raise ValueError(f"mesh {shape} needs {n} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:n]).reshape([shape[a] for a in AXES]), AXES)


def decoder_specs(params) -> dict:
    """FSDP + tensor-parallel PartitionSpecs for ``DecoderLM`` params."""

    def rule(path: str, leaf):
        name = path.split("/")[-2] if "/" in path else path
        if path.endswith("kernel") and name in ("query", "key", "value", "up"):
            return P("fsdp", "tensor")  # column-parallel
        if path.endswith("kernel") and name in ("out", "down"):
            return P("tensor", "fsdp")  # row-parallel
        if path.endswith("kernel") and name == "head":
            return P("fsdp", "tensor")
        if path.endswith("embedding"):
            return P(None, "fsdp")
        return P()

    return jlora.tree.map_with_paths(rule, params)


def opt_specs(tx, trainable, trainable_specs):
    """Optimizer-state specs: moments follow their parameter, scalars are replicated."""
    state_shapes = jax.eval_shape(tx.init, trainable)
    return optax.tree_map_params(
        tx, lambda _, s: s, state_shapes, trainable_specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P) or x is None)


def build(model, params, mesh: Mesh, *, lr=1e-3, full=False, key=None):
    """Shard everything and return ``(step, trainable, opt_state, frozen, batch_sharding)``.

    ``step(trainable, opt_state, frozen, tokens) -> (trainable, opt_state, loss)``
    is jitted with explicit shardings and donates ``trainable`` and ``opt_state``.
    ``full=True`` builds the full fine-tuning step of the same model instead.
    """
    key = jax.random.key(0) if key is None else key
    base_specs = decoder_specs(params)
    named = lambda tree: jlora.sharding.named(tree, mesh)
    params = jax.device_put(params, named(base_specs))
    tx = optax.adamw(lr)
    if full:
        # the step donates its trainable input: never hand it the caller's arrays
        trainable, frozen = jax.tree.map(jnp.copy, params), None
        t_specs, f_specs = base_specs, None
    else:
        adapted = jlora.sharding.apply(params, LORA_SPEC, key=key, mesh=mesh, base_specs=base_specs)
        trainable, frozen = jlora.split(adapted)
        t_specs, f_specs = jlora.split(jlora.sharding.specs(adapted, base_specs))
    o_specs = opt_specs(tx, trainable, t_specs)
    opt_state = jax.jit(tx.init, out_shardings=named(o_specs))(trainable)

    def step(trainable, opt_state, frozen, tokens):
        def loss_fn(t):
            if full:
                return lm_loss(model.apply({"params": t}, tokens), tokens)
            p = jlora.combine(t, frozen)
            return lm_loss(jlora.linen.apply(model, {"params": p}, tokens), tokens)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    batch = NamedSharding(mesh, BATCH_SPEC)
    t_sh, o_sh = named(t_specs), named(o_specs)
    f_sh = named(f_specs) if f_specs is not None else None
    jstep = jax.jit(step, in_shardings=(t_sh, o_sh, f_sh, batch),
                    out_shardings=(t_sh, o_sh, NamedSharding(mesh, P())), donate_argnums=(0, 1))
    return jstep, trainable, opt_state, frozen, batch


def build_pmap(model, params, *, lr=1e-3, key=None, devices=None):
    """Data-parallel ``pmap`` variant: replicated adapters, batch split on axis 0."""
    key = jax.random.key(0) if key is None else key
    devices = jax.devices() if devices is None else devices
    adapted = jlora.apply(params, LORA_SPEC, key=key)
    trainable, frozen = jlora.split(adapted)
    tx = optax.adamw(lr)
    opt_state = tx.init(trainable)

    def step(trainable, opt_state, frozen, tokens):
        def loss_fn(t):
            p = jlora.combine(t, frozen)
            return lm_loss(jlora.linen.apply(model, {"params": p}, tokens), tokens)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        grads, loss = jax.lax.pmean((grads, loss), "batch")
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    pstep = jax.pmap(step, axis_name="batch", devices=devices, donate_argnums=(0, 1))
    n = len(devices)
    rep = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)
    return pstep, rep(trainable), rep(opt_state), rep(frozen)


def host_batch(batch, sharding):
    """Put a global batch on the mesh, each process contributing only its own rows.

    On a pod slice every host runs this with the same global ``batch`` shape; host
    ``i`` supplies rows ``i·B/n ... (i+1)·B/n`` (with a real dataset it reads only
    those), and ``jax.make_array_from_process_local_data`` assembles the global,
    ``sharding``-ed array. On one process this is ``jax.device_put``.
    """
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return jax.device_put(batch, sharding)
    batch = np.asarray(batch)
    rows = batch.reshape(n, -1, *batch.shape[1:])[i]
    return jax.make_array_from_process_local_data(sharding, rows, batch.shape)


def counting_batch(key, batch, seq, vocab):
    """A learnable synthetic task: each row counts upward mod vocab."""
    start = jax.random.randint(key, (batch, 1), 0, vocab)
    return (start + jnp.arange(seq)[None]) % vocab


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="data=1", help="e.g. data=2,fsdp=2,tensor=2")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--pmap", action="store_true", help="pmap data parallelism over all devices")
    ap.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize()")
    ap.add_argument("--coordinator", help="host:port of process 0 (off a TPU pod or SLURM)")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args(argv)
    if args.multihost:
        # On a TPU pod slice (or under SLURM) JAX finds its peers by itself.
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)

    model = DecoderLM(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=max(1, args.d_model // 64), max_len=args.seq)
    tokens = counting_batch(jax.random.key(0), args.batch, args.seq, args.vocab)
    params = model.init(jax.random.key(1), tokens)["params"]
    if args.pmap:
        n = jax.local_device_count()
        step, trainable, opt, frozen = build_pmap(model, params, lr=args.lr)
        shard = lambda t: t.reshape(n, -1, t.shape[-1])
        desc = f"pmap over {n} devices"
    else:
        mesh = make_mesh(parse_mesh(args.mesh))
        step, trainable, opt, frozen, batch_sh = build(model, params, mesh, lr=args.lr, full=args.full)
        shard = lambda t: host_batch(t, batch_sh)
        desc = f"mesh {dict(mesh.shape)}"
    print(f"{'full fine-tuning' if args.full else 'LoRA'} on {desc}, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices")
    t0 = time.perf_counter()
    for i in range(args.steps):
        batch = counting_batch(jax.random.key(100 + i), args.batch, args.seq, args.vocab)
        trainable, opt, loss = step(trainable, opt, frozen, shard(batch))
        loss = float(np.mean(loss))
        if i == 0 or (i + 1) % 5 == 0:
            print(f"step {i + 1:>4}  loss {loss:.4f}  ({time.perf_counter() - t0:.1f}s)")
    return loss


if __name__ == "__main__":
    main()
