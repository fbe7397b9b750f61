"""Shared test references: float64 numpy formulas and small fixtures (`from tests._refs import ...`)."""

import jax
import numpy as np

import jlora


def f64(x):
    return np.asarray(x, dtype=np.float64)


def perturb(adapted, seed=0, size=0.1):
    """Give every LoRA factor a non-zero random value so deltas are visible."""
    counter = [seed]

    def bump(node):
        if not isinstance(node, jlora.methods.LoRANode):
            return node
        counter[0] += 1
        ka, kb = jax.random.split(jax.random.key(counter[0]))
        return node.replace(
            a=node.a + size * jax.random.normal(ka, node.a.shape, node.a.dtype),
            b=node.b + size * jax.random.normal(kb, node.b.shape, node.b.dtype),
        )

    return jax.tree.map(lambda x: bump(x) if jlora.is_node(x) else x, adapted,
                        is_leaf=jlora.is_node)


def lora_merged_ref(k0, a, b, scale, in_axes=None):
    """float64 reference of K0 + s·a·b for a kernel viewed as (fan_in, fan_out)."""
    k0 = f64(k0)
    nd = k0.ndim
    in_axes = tuple(range(nd - 1)) if in_axes is None else tuple(in_axes)
    perm = in_axes + tuple(i for i in range(nd) if i not in in_axes)
    kt = np.transpose(k0, perm)
    fan_in = int(np.prod([k0.shape[i] for i in in_axes]))
    m = kt.reshape(fan_in, -1) + scale * f64(a) @ f64(b)
    return np.transpose(m.reshape(kt.shape), np.argsort(perm))
