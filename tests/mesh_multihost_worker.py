"""The mesh trainer of experiments/train.py as one of several JAX processes.

    (launched by tests/_multiprocess.py) mesh_multihost_worker.py OUT.npz CKPT_DIR

Every process runs this same program (as on a TPU pod slice): the global mesh
spans all processes' devices, each process supplies only its own batch rows,
and the checkpoint is written and read back with Orbax's multi-host path.
Process 0 writes the losses, the gathered trained factors and the restored
ones to ``OUT.npz``. :func:`run` is the same computation on one process.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _multiprocess

    _multiprocess.initialize()

import jax
import numpy as np

import jlora
from experiments import train
from experiments.models.decoder import DecoderLM

VOCAB, SEQ, BATCH, STEPS = 32, 8, 8, 4
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def factors(trainable) -> list[np.ndarray]:
    """Every trained array, gathered to host memory (whole, on every process)."""
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(trainable)
    if jax.process_count() == 1:
        return [np.asarray(x) for x in leaves]
    return [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in leaves]


def run(devices, ckpt_dir=None):
    """``(losses, factors, restored factors or None)`` of the mesh trainer on ``devices``."""
    model = DecoderLM(vocab=VOCAB, d_model=32, n_layers=1, n_heads=2, max_len=SEQ)
    tokens = train.counting_batch(jax.random.key(0), BATCH, SEQ, VOCAB)
    params = model.init(jax.random.key(1), tokens)["params"]
    mesh = train.make_mesh(MESH, devices=devices)
    step, trainable, opt, frozen, batch_sh = train.build(model, params, mesh, lr=1e-2)
    losses = []
    for i in range(STEPS):
        batch = train.counting_batch(jax.random.key(100 + i), BATCH, SEQ, VOCAB)
        trainable, opt, loss = step(trainable, opt, frozen, train.host_batch(batch, batch_sh))
        losses.append(float(loss))
    restored = None
    if ckpt_dir is not None:
        jlora.checkpoint.save(ckpt_dir, trainable, step=STEPS, opt_state=opt,
                              spec=train.LORA_SPEC)
        shardings = jax.tree.map(lambda x: x.sharding, trainable)
        state = jlora.checkpoint.restore(ckpt_dir, spec=train.LORA_SPEC, shardings=shardings)
        assert jax.tree.map(lambda x: x.sharding, state["trainable"]) == shardings
        restored = factors(state["trainable"])
    return np.asarray(losses), factors(trainable), restored


if __name__ == "__main__":
    out, ckpt = sys.argv[1], sys.argv[2]
    print(f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} devices", flush=True)
    losses, trained, restored = run(jax.devices(), ckpt)
    if jax.process_index() == 0:
        np.savez(out, losses=losses, **{f"trained_{i}": x for i, x in enumerate(trained)},
                 **{f"restored_{i}": x for i, x in enumerate(restored)})
    print("done", flush=True)
