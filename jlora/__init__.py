"""jlora: LoRA-family parameter-efficient fine-tuning for JAX, as pure functions.

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"attn": {"query": {"kernel": jnp.ones((8, 8))}}}
    >>> spec = jlora.Spec({"**/query/kernel": jlora.LoRA(rank=2, alpha=4)})
    >>> adapted = jlora.apply(params, spec, key=jax.random.key(0))
    >>> trainable, frozen = jlora.split(adapted)
    >>> served = jlora.merge(jlora.combine(trainable, frozen))
"""

from jlora import _alloc

_alloc.tune()  # before anything starts XLA's CPU threads (jlora/_alloc.py, docs/performance.md)

from jlora import (checkpoint, compose, experts, federated, glora, linen, nnx, optim, peft,
                   presets, quant, sharding)
from jlora._alloc import AllocatorHint
from jlora.core import apply, combine, count_trainable, merge, split, summary, unmerge
from jlora import init
from jlora.quant import dequantize, quantize
from jlora.methods import (AdaLoRA, AdaptFormer, AdapterNode, Config, DoRA, FedDPA, Full, GLoRA,
                           LoftQ,
                           LoRA, PF2LoRA, QLoRA, Sparse, TrainableTokens, VeRA)
from jlora.methods.reft import ConsReFT, LoReFT, MeFT, NoReFT
from jlora.methods.subspace import Subspace
from jlora.spec import Spec
from jlora.tree import is_node, path_str

__version__ = "0.1.0"

__all__ = [
    "AdaLoRA",
    "AdaptFormer",
    "AllocatorHint",
    "AdapterNode",
    "checkpoint",
    "Config",
    "ConsReFT",
    "DoRA",
    "FedDPA",
    "Full",
    "GLoRA",
    "LoftQ",
    "LoRA",
    "LoReFT",
    "MeFT",
    "NoReFT",
    "PF2LoRA",
    "QLoRA",
    "Sparse",
    "Spec",
    "Subspace",
    "TrainableTokens",
    "VeRA",
    "apply",
    "combine",
    "compose",
    "count_trainable",
    "dequantize",
    "experts",
    "federated",
    "glora",
    "init",
    "is_node",
    "linen",
    "merge",
    "nnx",
    "optim",
    "path_str",
    "peft",
    "presets",
    "quant",
    "quantize",
    "sharding",
    "split",
    "summary",
    "unmerge",
]
