"""A small pre-LN decoder-only transformer LM in Flax Linen (benchmarks and scaling)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from experiments.models._layers import key_masked_attention, scale_queries, split_heads


class Block(nn.Module):
    d_model: int
    n_heads: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        d, heads = x.shape[-1], self.n_heads
        h = nn.LayerNorm(name="ln1", dtype=self.dtype)(x)
        dense = lambda f, name: nn.Dense(f, name=name, dtype=self.dtype, use_bias=False)
        q = split_heads(scale_queries(checkpoint_name(dense(d, "query")(h), "qkv"), d // heads), heads)
        k = split_heads(checkpoint_name(dense(d, "key")(h), "qkv"), heads)
        v = split_heads(checkpoint_name(dense(d, "value")(h), "qkv"), heads)
        no_padding = jnp.zeros(x.shape[:2], jnp.float32)
        att = key_masked_attention(q, k, v, no_padding, causal=True).reshape(x.shape)
        att = checkpoint_name(att, "attention")
        x = x + dense(d, "out")(att)
        h = nn.LayerNorm(name="ln2", dtype=self.dtype)(x)
        h = nn.gelu(checkpoint_name(dense(4 * d, "up")(h), "up"))
        return x + dense(d, "down")(h)


# What each block keeps for the backward pass under ``DecoderLM(remat=...)``:
# "block" keeps only its input and recomputes the whole block; "names" keeps the
# query/key/value and up projections and the attention output (the products whose
# recomputation would cost a GEMM) and recomputes LayerNorms, the attention
# probabilities and GELU. (jax's dots_with_no_batch_dims_saveable would keep
# both terms of every adapted projection, x·K0 and s·(x·a)·b, separately.)
REMAT_POLICIES = {
    "block": None,
    "names": jax.checkpoint_policies.save_only_these_names("qkv", "attention", "up"),
}


class DecoderLM(nn.Module):
    """``remat``: None (autodiff keeps every residual), ``"block"`` or ``"names"``
    (``REMAT_POLICIES``). On XLA:CPU, rematerialization only lowers memory when the
    step is compiled with the memory-optimized scheduler (``MEMORY_OPTIMIZED_CPU``):
    the default, concurrency-optimized one schedules the recomputation early and
    keeps as much alive as without it."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    max_len: int = 512
    dtype: jnp.dtype | None = None
    remat: str | None = None

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        x = x + nn.Embed(self.max_len, self.d_model, name="pos")(jnp.arange(t))[None]
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(f"DecoderLM: remat={self.remat!r}; expected None or one of "
                             f"{sorted(REMAT_POLICIES)}")
        block = nn.remat(Block, policy=REMAT_POLICIES[self.remat]) if self.remat else Block
        for i in range(self.n_layers):
            x = block(self.d_model, self.n_heads, self.dtype, name=f"layers_{i}")(x)
        x = nn.LayerNorm(name="ln_f", dtype=self.dtype)(x)
        return nn.Dense(self.vocab, name="head", use_bias=False, dtype=self.dtype)(x)


# compiler options for a jitted step: ``jax.jit(step, compiler_options=MEMORY_OPTIMIZED_CPU)``
MEMORY_OPTIMIZED_CPU = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def lm_loss(logits, tokens):
    """Next-token cross-entropy."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tgt = tokens[:, 1:]
    return -jnp.take_along_axis(logp, tgt[..., None], -1).mean()
