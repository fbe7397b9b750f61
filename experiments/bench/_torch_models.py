"""PyTorch twins of the benchmark models, loaded with the same weights as the Flax ones.

``TorchDecoderLM`` mirrors ``experiments.models.decoder.DecoderLM`` (pre-LN, tanh
GELU, LayerNorm eps 1e-6, no Dense biases); module names (``layers.3.query``)
match the Flax paths (``layers_3/query``) so PEFT targets the same layers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchBlock(nn.Module):
    def __init__(self, d, heads, dtype=None):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6, dtype=dtype), nn.LayerNorm(d, eps=1e-6, dtype=dtype)
        for name, (fi, fo) in {"query": (d, d), "key": (d, d), "value": (d, d), "out": (d, d),
                               "up": (d, 4 * d), "down": (4 * d, d)}.items():
            setattr(self, name, nn.Linear(fi, fo, bias=False, dtype=dtype))

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        heads = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(h)),
                                           heads(self.value(h)), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class TorchDecoderLM(nn.Module):
    def __init__(self, vocab, d_model, n_layers, n_heads, max_len, dtype=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, dtype=dtype)
        self.pos = nn.Embedding(max_len, d_model, dtype=dtype)
        self.layers = nn.ModuleList(TorchBlock(d_model, n_heads, dtype) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-6, dtype=dtype)
        self.head = nn.Linear(d_model, vocab, bias=False, dtype=dtype)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))[None]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))


def decoder_from_flax(params, vocab, d_model, n_layers, n_heads, max_len, dtype=None):
    """A ``TorchDecoderLM`` holding the Flax ``DecoderLM`` params (kernels transposed)."""
    m = TorchDecoderLM(vocab, d_model, n_layers, n_heads, max_len, dtype)
    t = lambda a: torch.tensor(np.asarray(a, np.float32), dtype=dtype or torch.float32)
    sd = {"embed.weight": t(params["embed"]["embedding"]), "pos.weight": t(params["pos"]["embedding"]),
          "ln_f.weight": t(params["ln_f"]["scale"]), "ln_f.bias": t(params["ln_f"]["bias"]),
          "head.weight": t(params["head"]["kernel"]).T}
    for i in range(n_layers):
        p = params[f"layers_{i}"]
        for ln in ("ln1", "ln2"):
            sd[f"layers.{i}.{ln}.weight"] = t(p[ln]["scale"])
            sd[f"layers.{i}.{ln}.bias"] = t(p[ln]["bias"])
        for name in ("query", "key", "value", "out", "up", "down"):
            sd[f"layers.{i}.{name}.weight"] = t(p[name]["kernel"]).T.contiguous()
    m.load_state_dict(sd)
    return m


def decoder_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))
