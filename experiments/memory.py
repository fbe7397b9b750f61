"""XLA's own memory accounting of a compiled step, shared by the studies and benchmarks."""

from __future__ import annotations

MIB = 2**20


def xla_bytes(compiled) -> float:
    """Bytes a compiled executable needs by XLA's accounting
    (``compiled.memory_analysis()``): arguments + outputs + temporaries, less the
    bytes outputs share with donated arguments. NaN where the backend gives no
    analysis.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> c = jax.jit(lambda x: x * 2).lower(jnp.ones(256, jnp.float32)).compile()
        >>> xla_bytes(c) >= 2 * 256 * 4
        True
    """
    ma = compiled.memory_analysis()
    if ma is None:
        return float("nan")
    return float(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                 - ma.alias_size_in_bytes)
