"""A small pre-LN decoder-only transformer LM in Flax Linen (benchmarks and scaling)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._layers import attention, causal_bias, merge_heads, scale_queries, split_heads


class Block(nn.Module):
    d_model: int
    n_heads: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        d, heads = x.shape[-1], self.n_heads
        h = nn.LayerNorm(name="ln1", dtype=self.dtype)(x)
        dense = lambda f, name: nn.Dense(f, name=name, dtype=self.dtype, use_bias=False)
        q = split_heads(scale_queries(dense(d, "query")(h), d // heads), heads)
        k = split_heads(dense(d, "key")(h), heads)
        v = split_heads(dense(d, "value")(h), heads)
        att = attention(q, k, v, causal_bias(x.shape[1]))
        x = x + dense(d, "out")(merge_heads(att))
        h = nn.LayerNorm(name="ln2", dtype=self.dtype)(x)
        h = nn.gelu(dense(4 * d, "up")(h))
        return x + dense(d, "down")(h)


class DecoderLM(nn.Module):
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    max_len: int = 512
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        x = x + nn.Embed(self.max_len, self.d_model, name="pos")(jnp.arange(t))[None]
        for i in range(self.n_layers):
            x = Block(self.d_model, self.n_heads, self.dtype, name=f"layers_{i}")(x)
        x = nn.LayerNorm(name="ln_f", dtype=self.dtype)(x)
        return nn.Dense(self.vocab, name="head", use_bias=False, dtype=self.dtype)(x)


def lm_loss(logits, tokens):
    """Next-token cross-entropy."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tgt = tokens[:, 1:]
    return -jnp.take_along_axis(logp, tgt[..., None], -1).mean()
