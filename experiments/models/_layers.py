"""Attention and GELU for the benchmark models, written for XLA:CPU's backward pass.

``attention`` is softmax attention in the (batch, heads, tokens, head_dim) layout
with an additive mask bias and a hand-written VJP. Autodiff of the plain formula
differentiates the softmax as ``p * (dp - sum(p * dp))``, a reduction over the
(tokens x tokens) scores per head; the VJP below uses the equivalent

    sum_j p_ij dp_ij = sum_j p_ij (do_i . v_j) = do_i . o_i

(FlashAttention's ``D_i``), a reduction over head_dim instead, and keeps only
``q, k, v, p, o`` for the backward pass. On all-MiniLM-L6-v2 (batch 8 x 128) it
cuts the compiled LoRA step's temporaries from 314 to 253 MiB
(docs/performance.md). ``key_masked_attention`` is the same math in the
token-major (batch, tokens, heads, head_dim) layout with a per-key mask, which
on XLA:CPU runs as the C++ kernel of ``_cpu_attention.cc`` (``_cpu_kernel``).
``gelu_erf`` is the exact GELU through ``erf``; jax's
``gelu(approximate=False)`` goes through ``erfc``, whose XLA:CPU expansion is a
chain of selects and exponentials.

``attention`` and ``gelu_erf`` are tested against ``jax.grad`` of the plain
formulas in float64 (tests/test_model_layers.py), the kernel against float64
numpy (tests/test_cpu_attention_kernel.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from experiments.models import _cpu_kernel


def _bias(keep, dtype):
    """0 where ``keep``, a large negative number elsewhere (finite, so a fully
    masked row stays finite)."""
    return jnp.where(keep, jnp.zeros((), dtype), jnp.asarray(-0.5 * jnp.finfo(dtype).max, dtype))


def key_bias(mask, dtype=jnp.float32):
    """``(B, T)`` 0/1 key mask -> ``(B, T)`` additive bias (:func:`key_masked_attention`)."""
    return _bias(mask > 0, dtype)


def causal_bias(t: int, dtype=jnp.float32):
    """``(1, 1, T, T)`` additive bias letting token i attend to tokens j <= i."""
    return _bias(jnp.tril(jnp.ones((t, t), bool)), dtype)[None, None]


def split_heads(x, heads: int):
    """``(B, T, H*D)`` -> token-major ``(B, T, H, D)`` (:func:`key_masked_attention`'s layout)."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def scale_queries(q, head_dim: int):
    """Fold attention's ``1/sqrt(head_dim)`` into the queries (T x D, not T x T, multiplies)."""
    return q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)


def _softmax_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)  # bf16/f16 -> f32; f32/f64 unchanged


def _forward(q, k, v, bias):
    f = _softmax_dtype(q)
    s = (q @ k.swapaxes(-1, -2)).astype(f) + bias.astype(f)
    s = s - lax.stop_gradient(s.max(-1, keepdims=True))
    e = jnp.exp(s)
    p = (e / e.sum(-1, keepdims=True)).astype(v.dtype)
    o = p @ v
    return o, (q, k, v, p, o)


@jax.custom_vjp
def attention(q, k, v, bias):
    """``softmax(q k^T + bias) v`` over the last two axes of ``(B, H, T, D)`` inputs.

    ``q`` is already scaled (:func:`scale_queries`); ``bias`` broadcasts to
    ``(B, H, T, T)`` (``key_bias(mask)[:, None, None, :]``, :func:`causal_bias`) and receives no
    gradient. The softmax runs in at least float32.

    Example::

        >>> import jax.numpy as jnp
        >>> q = k = v = jnp.ones((1, 2, 3, 4))
        >>> attention(q, k, v, causal_bias(3)).shape
        (1, 2, 3, 4)
    """
    return _forward(q, k, v, bias)[0]


def _backward(res, do):
    q, k, v, p, o = res
    dv = p.swapaxes(-1, -2) @ do
    f = _softmax_dtype(q)
    dp = (do @ v.swapaxes(-1, -2)).astype(f)
    delta = (do.astype(f) * o.astype(f)).sum(-1, keepdims=True)
    ds = (p.astype(f) * (dp - delta)).astype(q.dtype)
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv, None


attention.defvjp(_forward, _backward)


def _heads_first(x):
    return x.swapaxes(1, 2)  # (B, T, H, D) <-> (B, H, T, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_attention(q, k, v, key_bias, causal):
    return _cpu_kernel.inference(q, k, v, key_bias, causal=causal)


def _kernel_forward(q, k, v, key_bias, causal):
    o, p = _cpu_kernel.forward(q, k, v, key_bias, causal=causal)
    return o, (q, k, v, p, o, key_bias)


def _kernel_backward(causal, res, do):
    q, k, v, p, o, key_bias = res
    return (*_cpu_kernel.backward(q, k, v, p, o, do, key_bias, causal=causal), None)


_kernel_attention.defvjp(_kernel_forward, _kernel_backward)


def key_masked_attention(q, k, v, key_bias, *, causal=False):
    """Self-attention on token-major ``(B, T, H, D)`` inputs with a ``(B, T)``
    additive key bias (:func:`key_bias`) and, with ``causal=True``, the causal
    mask of :func:`causal_bias` as well; returns ``(B, T, H, D)``.

    The same math and VJP as :func:`attention`. On XLA:CPU with float32
    operands whose T and head_dim are multiples of 32 it runs the C++ kernel of
    ``_cpu_attention.cc`` (:mod:`experiments.models._cpu_kernel`), which takes
    this layout directly, so no head transposes are needed, and stops its
    products after the last key whose bias is above -1e30 and, under the causal
    mask, after each 32-row block's last row (exactly: the rest get zero
    weight); elsewhere it is :func:`attention` between two transposes.

    Example::

        >>> import jax.numpy as jnp
        >>> q = k = v = jnp.ones((2, 32, 1, 32))
        >>> key_masked_attention(q, k, v, key_bias(jnp.ones((2, 32))), causal=True).shape
        (2, 32, 1, 32)
    """
    if _cpu_kernel.fits(q, k, v, key_bias):
        return _kernel_attention(q, k, v, key_bias, bool(causal))
    t = _heads_first
    bias = key_bias[:, None, None, :]
    if causal:
        bias = bias + causal_bias(q.shape[1], bias.dtype)
    return t(attention(t(q), t(k), t(v), bias))


def gelu_erf(x):
    """Exact GELU, ``x/2 * (1 + erf(x/sqrt(2)))`` (equal to ``jax.nn.gelu(x, approximate=False)``)."""
    return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))
