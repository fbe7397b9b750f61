"""``jlora.federated.simulate`` with its client axis sharded over every device of the run.

Run as N processes by ``tests/_multiprocess.py`` (``python tests/fed_multihost_worker.py OUT``):
each process holds its share of the 8 clients; process 0 writes the final server tree
(gathered from all processes) to ``OUT`` as ``.npz``. Imported, :func:`run` gives the
same computation on this process's devices (the single-process reference).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CLIENTS = 8


def problem():
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora import federated as fl

    rng = np.random.default_rng(0)
    base = {"w": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}}
    adapted = jlora.apply(base, jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))
    sets = []
    for k in range(CLIENTS):
        x = rng.normal(size=(3 + k, 6)).astype(np.float32)
        sets.append({"x": x, "y": (x @ rng.normal(size=(6, 5)) + k).astype(np.float32)})
    data, mask = fl.pad_clients(sets)
    data["mask"] = mask
    return adapted, data, mask.sum(1)


def local_update(t, frozen, d, key, steps=3, lr=0.05):
    import jax
    import jax.numpy as jnp

    import jlora

    def loss(t):
        w = jlora.merge(jlora.combine(t, frozen))["w"]["kernel"]
        noise = 1.0 + 0.01 * jax.random.normal(key, ())
        err = ((d["x"] @ w - d["y"]) ** 2).sum(-1) * noise
        return jnp.sum(err * d["mask"]) / jnp.sum(d["mask"])

    for _ in range(steps):
        t = jax.tree.map(lambda p, g: p - lr * g, t, jax.grad(loss)(t))
    return t


def run(devices):
    """Three rounds, 8 clients sharded over ``devices``, FedAdam on the server; numpy leaves."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    import jlora
    from jlora import federated as fl

    adapted, data, counts = problem()
    t0, frozen = jlora.split(adapted)
    mesh = Mesh(np.array(devices), ("clients",))
    out = fl.simulate(local_update, t0, frozen, data, rounds=3, key=jax.random.key(2),
                      weights=counts, mesh=mesh, server_opt=jlora.optim.fedadam(0.05, tau=1e-2))
    leaves = jax.tree.leaves(out.trainable)
    if jax.process_count() > 1:
        leaves = multihost_utils.process_allgather(leaves, tiled=True)
    return [np.asarray(x) for x in leaves]


if __name__ == "__main__":
    import _multiprocess

    pid, n = _multiprocess.initialize()
    import jax
    import numpy as np

    assert jax.device_count() == CLIENTS and jax.local_device_count() == CLIENTS // n
    leaves = run(jax.devices())
    if pid == 0:
        np.savez(sys.argv[1], *leaves)
    print(f"process {pid} of {n}: {jax.local_device_count()} local / {jax.device_count()} devices")
