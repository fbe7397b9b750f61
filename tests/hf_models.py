"""Tiny Hugging Face transformers models (Flax and PyTorch twins with the same weights),
a Gemma-style block built from ``nn.Einsum`` with Gemma's equations and kernel
layouts, and a jaxpr probe for full-size weight products. No downloads."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora

BATCH, SEQ, VOCAB, RANK = 3, 5, 40, 3

FAMILIES = {
    # name: (preset family, flax class, torch class, config class, config kwargs)
    "bert": ("bert", "FlaxBertForSequenceClassification", "BertForSequenceClassification",
             "BertConfig", dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=24,
                                max_position_embeddings=16, num_labels=3,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "gpt2": ("gpt2", "FlaxGPT2LMHeadModel", "GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_inner=24, n_positions=16,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("llama", "FlaxLlamaForCausalLM", "LlamaForCausalLM", "LlamaConfig",
              dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=24, max_position_embeddings=16)),
}


def build(name: str, seed: int = 0):
    """``(flax_model, params)`` of a tiny random HF Flax model."""
    import transformers

    _, flax_cls, _, cfg_cls, kw = FAMILIES[name]
    config = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, flax_cls)(config, _do_init=False)
    # one compiled init instead of hundreds of eagerly dispatched ops
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(seed), model.input_shape)
    return model, params


def torch_twin(name: str, params):
    """The PyTorch model of the same family holding ``params`` (Flax -> PyTorch conversion)."""
    import torch
    import transformers
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    _, _, torch_cls, cfg_cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, torch_cls)(getattr(transformers, cfg_cls)(**kw))
    model = load_flax_weights_in_pytorch_model(model, jax.tree.map(np.asarray, params))
    return model.eval()


def tokens(seed: int = 0):
    return np.asarray(jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 1, VOCAB), np.int32)


def logits(model, params, ids, **kw):
    """Logits through jlora's fast path (``params`` may hold adapter nodes)."""
    return jlora.linen.apply(model, {"params": params}, ids, **kw).logits


def loss_fn(name: str, out_logits, ids):
    """Next-token cross-entropy (decoders) or 3-class cross-entropy on a fixed label (BERT)."""
    if name == "bert":
        labels = jnp.asarray(ids[:, 0] % 3)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out_logits), labels[:, None], 1))
    logp = jax.nn.log_softmax(out_logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1))


# ---------------------------------------------------------------- Gemma-style block

D, N, K, H, F = 16, 2, 1, 8, 24  # d_model, query heads, kv heads, head_dim, MLP hidden


class GemmaAttention(nn.Module):
    """Gemma's attention einsums (google-deepmind/gemma ``modules.Attention``), GQA form."""

    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((N, D, H), "BTD,NDH->BTNH", use_bias=False, name="q_einsum")(x)
        k, v = nn.Einsum((2, K, D, H), "BSD,CKDH->CBSKH", use_bias=False, name="kv_einsum")(x)
        k = jnp.repeat(k, N // K, axis=2)
        v = jnp.repeat(v, N // K, axis=2)
        logits = jnp.einsum("BTNH,BSNH->BNTS", q * H ** -0.5, k)
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        enc = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        return nn.Einsum((N, H, D), "BTNH,NHD->BTD", use_bias=False, name="attn_vec_einsum")(enc)


class GemmaMLP(nn.Module):
    """Gemma's gated feed-forward (``modules.FeedForward``): gating kernel ``(2, F, D)``."""

    @nn.compact
    def __call__(self, x):
        gate, up = nn.Einsum((2, F, D), "BTD,CFD->CBTF", use_bias=False, name="gating_einsum")(x)
        return nn.Einsum((F, D), "BTF,FD->BTD", use_bias=False, name="linear")(
            jax.nn.gelu(gate) * up)


class GemmaLM(nn.Module):
    """Embedding, one pre-norm Gemma block, tied read-out."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embedder")
        x = embed(ids) * D ** 0.5
        x = x + GemmaAttention(name="attn")(nn.RMSNorm(name="pre_attention_norm")(x))
        x = x + GemmaMLP(name="mlp")(nn.RMSNorm(name="pre_ffw_norm")(x))
        return embed.attend(nn.RMSNorm(name="final_norm")(x))


# ---------------------------------------------------------------- jaxpr probe


_DOT = re.compile(r"=\s*\w+\[([\d,]*)\][^=]*?\bdot\(")


def dot_shapes(compiled) -> list[tuple[int, ...]]:
    """Result shapes of every ``dot`` in a compiled step's optimized HLO (fusions included):
    what XLA really computes, after dead code (the unused merged copies) is removed."""
    return [tuple(int(d) for d in m.group(1).split(",") if d)
            for m in _DOT.finditer(compiled.as_text())]


def full_products(compiled, adapted) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, shape)`` for every adapted kernel whose full-size shape (any axis order)
    a ``dot`` of the compiled step produces: a formed weight or weight gradient."""
    kernels = {p: tuple(n.shape) for p, n in jlora.tree.leaves_with_paths(adapted)
               if jlora.is_node(n) and len(n.shape) >= 2}
    shapes = {tuple(sorted(s)) for s in dot_shapes(compiled)}
    return [(p, s) for p, s in kernels.items() if tuple(sorted(s)) in shapes]
