"""A training run that checkpoints every step; tests kill it (SIGKILL) mid-way.

    python tests/ckpt_worker.py DIR --steps N [--ballast-mb M]

Prints ``saved <step>`` after each completed checkpoint. ``--ballast-mb`` adds a
large frozen tree to every save so a save takes long enough to be interrupted.

    (launched by tests/_multiprocess.py) ckpt_worker.py DIR --overwrite-on-processes

Every process saves one array sharded over all processes' devices as step 1,
overwrites step 1 with twice the values, restores it and prints
``restored <sum> <listing of DIR>``.

    (launched by tests/_multiprocess.py) ckpt_worker.py DIR --overwrite-fails-on-primary

As above, but process 0 first makes step 1 immutable (``chattr +i``), so its rename
of the old step fails: every process prints ``overwrite failed <error type>``, then
``restored <sum> <listing>`` of the old step once the flag is cleared.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

import jlora
from experiments.models.decoder import DecoderLM, lm_loss

SPEC = jlora.Spec({"**/layers_*/{query,value}/kernel": jlora.LoRA(rank=4, alpha=8)})


def setup():
    model = DecoderLM(vocab=32, d_model=32, n_layers=1, n_heads=2, max_len=16)
    tokens = (jax.random.randint(jax.random.key(0), (8, 1), 0, 32) + jnp.arange(16)) % 32
    params = model.init(jax.random.key(1), tokens)["params"]
    trainable, frozen = jlora.split(jlora.apply(params, SPEC, key=jax.random.key(2)))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(t, opt, i):
        batch = (tokens + i) % 32
        loss, g = jax.value_and_grad(lambda t: lm_loss(
            jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, batch), batch))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    return trainable, tx.init(trainable), step


def run(directory, steps, ballast_mb=0, out=print):
    trainable, opt, step = setup()
    mgr = jlora.checkpoint.Manager(directory, keep=3, every=1)
    start = mgr.latest_step() or 0
    if start:
        state = mgr.restore(spec=SPEC)
        trainable, opt = state["trainable"], state["opt_state"]
    ballast = {"x": jnp.ones((ballast_mb * 2**18,), jnp.float32)} if ballast_mb else None
    loss = None
    for i in range(start + 1, steps + 1):
        trainable, opt, loss = step(trainable, opt, i)
        mgr.save(i, trainable, opt_state=opt, spec=SPEC, frozen=ballast)
        out(f"saved {i}")
    return trainable, loss


def overwrite_on_processes(directory, fail_on_primary=False):
    """``save(..., overwrite=True)`` from every JAX process of a multi-process run."""
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tests import _multiprocess

    _multiprocess.initialize()
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("x",)), P("x"))
    values = np.arange(64, dtype=np.float32).reshape(16, 4)
    tree = lambda scale: {"w": jax.make_array_from_callback(
        values.shape, sharding, lambda index: values[index] * scale)}
    jlora.checkpoint.save(directory, tree(1.0), step=1)
    if fail_on_primary:
        import subprocess

        if jax.process_index() == 0:
            subprocess.run(["chattr", "+i", os.path.join(directory, "1")], check=True)
        multihost_utils.sync_global_devices("step 1 immutable")
        try:
            jlora.checkpoint.save(directory, tree(2.0), step=1, overwrite=True)
        except Exception as e:
            print("overwrite failed", type(e).__name__, flush=True)
        multihost_utils.sync_global_devices("overwrite tried")
        if jax.process_index() == 0:
            subprocess.run(["chattr", "-i", os.path.join(directory, "1")], check=True)
        multihost_utils.sync_global_devices("step 1 mutable")
    else:
        jlora.checkpoint.save(directory, tree(2.0), step=1, overwrite=True)
    w = jlora.checkpoint.restore(directory, shardings=sharding)["trainable"]["w"]
    total = float(np.asarray(multihost_utils.process_allgather(w, tiled=True)).sum())
    print("restored", total, sorted(os.listdir(directory)), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ballast-mb", type=int, default=0)
    ap.add_argument("--overwrite-on-processes", action="store_true")
    ap.add_argument("--overwrite-fails-on-primary", action="store_true")
    a = ap.parse_args()
    if a.overwrite_on_processes or a.overwrite_fails_on_primary:
        overwrite_on_processes(a.directory, fail_on_primary=a.overwrite_fails_on_primary)
    else:
        run(a.directory, a.steps, a.ballast_mb, out=lambda s: print(s, flush=True))
