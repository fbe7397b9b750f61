"""FedDPA: a global and a local adapter on the same weights (Yang et al. NeurIPS 2024, arXiv 2403.19211).

Each targeted kernel carries the **global** pair ``(a, b)`` (aggregated by the
server) and the client's **local** pair ``(c, d)`` (never uploaded), mixed by a
weight ``w``:

    K = K0 + w·s·a·b + (1 − w)·s̃·c·d

``w`` is an array field (frozen, in the factors' dtype): a scalar, or one
weight per example for the paper's instance-wise dynamic weighting at test time,
``w(x) = β·(1/N)·Σ_j cos(e(x), e(x_j))`` over N of the client's training
examples (``jlora.federated.feddpa_weight``). The training phases of the
official code's FedDPA-T set ``w`` too (``jlora.federated.feddpa_set_weight``):
the local phase trains ``(c, d)`` with the global pair frozen at ``w = 0.5``,
the global phase trains ``(a, b)`` alone at ``w = 1``. Per-example weights act
on the fast path (``jlora.linen.apply``) only: they have no single merged
weight, so ``merge`` gives NaN there (a layer outside the fast path fails
loudly; ``jlora.linen.consumed`` lists which layers are factorized). They
belong to the batch's leading axis; under ``jax.vmap`` over examples, vmap
the node's weight with them.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q": {"kernel": jnp.ones((8, 6))}}
    >>> node = jlora.apply(params, jlora.Spec({"q/kernel": jlora.FedDPA(4, 4)}),
    ...                    key=jax.random.key(0))["q"]["kernel"]
    >>> float(node.weight), node.personal_fields
    (0.5, ('c', 'd'))
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jlora.methods.base import Array, strict_options
from jlora.methods.pf2lora import PF2LoRA, PF2LoRANode


@strict_options
@dataclasses.dataclass(frozen=True)
class FedDPA(PF2LoRA):
    """FedDPA config: ``rank``/``alpha`` of the global pair, ``personal_rank``/``personal_alpha``
    of the local pair, ``weight`` the initial ``w`` (the official code's ``local_weight`` 0.5)."""

    weight: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
                0.0 <= self.weight <= 1.0):
            raise ValueError(f"FedDPA: weight must be in [0, 1], got {self.weight!r}")

    def build(self, key: Array, base: Array, *, path: str) -> "FedDPANode":
        f = self.factors(key, base, path=path)
        # in the factors' dtype: a float32 w would cap a float64 adapter at float32 precision
        return FedDPANode(**f, weight=jnp.asarray(self.weight, jnp.result_type(f["a"])))


class FedDPANode(PF2LoRANode):
    """``K = base + w·s·a·b + (1 − w)·s̃·c·d``; ``(a, b)`` global, ``(c, d)`` local."""

    weight: Array

    config_class = FedDPA
    method = "FedDPA"
    field_axes = {**PF2LoRANode.field_axes, "weight": "replicated"}

    def branch_weights(self):
        return self.weight, 1.0 - self.weight
