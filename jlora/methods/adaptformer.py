"""AdaptFormer (Chen et al., NeurIPS 2022, arXiv 2205.13535): a parallel bottleneck beside a module.

AdaptFormer adds a small bottleneck MLP **in parallel** with a module (the MLP of
each transformer block, the paper's §3.2 "AdaptMLP"). In row-vector form, for
the module's input ``x``:

    out = module(x) + s · ( drop( relu(x·W_d + b_d) ) · W_u + b_u )

``W_d: (d_in, bottleneck)``, ``b_d: (bottleneck,)``, ``W_u: (bottleneck, d_out)``,
``b_u: (d_out,)``. Initialisation as the official code's ``init_option="lora"``:
``W_d`` kaiming-uniform with ``a = √5`` (PyTorch's ``nn.Linear`` default, i.e.
``U(±1/√d_in)``), ``b_d = W_u = b_u = 0``, so the adapted model equals the base
model at init. ``s = scale`` is fixed (0.1 in the paper), or with
``learnable_scale=True`` a trained scalar initialised to 1 as in the code's
``"learnable_scalar"`` option. Dropout (0.1, after the ReLU) acts only when a
``dropout_key`` is given (training).

**Input normalisation.** The official code (``ShoufaChen/AdaptFormer``,
``ffn_adapter_layernorm_option="none"``) feeds the adapter the **un-normalised**
input; the paper's equation feeds it ``LN(x)``. ``norm=None`` (the default)
follows the code: the adapter reads exactly what the targeted module receives.
``norm="layernorm"`` gives the paper's form: ``x`` is standardised over its last
axis (ε = 1e-6) and scaled by ``norm_scale`` and shifted by ``norm_bias``, two
frozen ``(d_in,)`` fields initialised to 1 and 0 (set them to the block's
LayerNorm parameters to share them as the paper does). When the targeted module
already receives normalised input (a Flax ``MlpBlock`` called on ``LN(x)``),
``norm=None`` is the paper's form too.

Dimensions come from the module's own params: ``d_in`` is the input size of
its first kernel, ``d_out`` the output size of its last one (kernels: floating
leaves with at least two axes, in the params' order). The adapter is not
mergeable (the ReLU has no linear form): ``jlora.merge`` refuses it, naming its
path, unless ``residual=True``.

Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> class Mlp(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         h = nn.relu(nn.Dense(16, name="fc1")(x))
    ...         return nn.Dense(8, name="fc2")(h)
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return x + Mlp(name="mlp")(x)
    >>> x = jnp.ones((2, 8))
    >>> params = Block().init(jax.random.key(0), x)["params"]
    >>> adapted = jlora.apply(params, jlora.Spec({"mlp": jlora.AdaptFormer(bottleneck=4)}),
    ...                       key=jax.random.key(1))
    >>> node = adapted["mlp@adaptformer"]
    >>> node.down.shape, node.up.shape
    ((8, 4), (4, 8))
    >>> y = jlora.linen.apply(Block(), {"params": adapted}, x)
    >>> bool(jnp.allclose(y, Block().apply({"params": params}, x)))  # W_u = b_u = 0 at init
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jlora import _validate as v
from jlora.methods._module import ModuleConfig, ModuleNode
from jlora.methods.base import branch_dropout, strict_options
from jlora.tree import Array, Role, leaves_with_paths

NORMS = (None, "layernorm")
_LN_EPS = 1e-6


@strict_options
@dataclasses.dataclass(frozen=True)
class AdaptFormer(ModuleConfig):
    """A parallel bottleneck adapter ``s·(drop(relu(x·W_d + b_d))·W_u + b_u)`` beside a module.

    Args:
      bottleneck: the hidden size (64 in the paper).
      scale: the fixed scale ``s`` (0.1 in the paper); ignored when
        ``learnable_scale`` (then ``s`` is trained from 1).
      dropout: dropout after the ReLU (0.1 in the code), active with a ``dropout_key``.
      learnable_scale: train ``s`` (initialised to 1, as the code's ``"learnable_scalar"``).
      norm: ``None`` (the code: un-normalised input) or ``"layernorm"`` (the paper's ``LN(x)``).
    """

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    learnable_scale: bool = False
    norm: Optional[str] = None

    def __post_init__(self):
        owner = "AdaptFormer"
        v.positive_int(owner, "bottleneck", self.bottleneck)
        v.real(owner, "scale", self.scale)
        v.real(owner, "dropout", self.dropout, ge=0.0, lt=1.0)
        v.boolean(owner, "learnable_scale", self.learnable_scale)
        v.choice(owner, "norm", self.norm, NORMS)

    def build_module(self, key: Array, module_params: Any, *, path: str) -> "AdaptFormerNode":
        kernels = _kernels(module_params)
        if not kernels:
            raise ValueError(
                f"{path}: AdaptFormer reads the module's input and output sizes from its "
                f"kernels (floating leaves with 2 or more axes), and this module has none; "
                f"target a module with weights, such as a transformer block's MLP")
        (first, k_in), (last, k_out) = kernels[0], kernels[-1]
        d_in, d_out = int(k_in.shape[0]), int(k_out.shape[-1])
        dtype = jnp.promote_types(k_in.dtype, jnp.float32)
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=√5) of a (d_in -> bottleneck) Linear
        down = jax.random.uniform(key, (d_in, self.bottleneck), dtype, -bound, bound)
        ln = self.norm == "layernorm"
        return AdaptFormerNode(
            down=down, down_bias=jnp.zeros((self.bottleneck,), dtype),
            up=jnp.zeros((self.bottleneck, d_out), dtype), up_bias=jnp.zeros((d_out,), dtype),
            scale=jnp.asarray(1.0 if self.learnable_scale else self.scale, dtype),
            norm_scale=jnp.ones((d_in,), dtype) if ln else None,
            norm_bias=jnp.zeros((d_in,), dtype) if ln else None,
            config=self, path=path, shape=(d_in, d_out), in_axes=(0,),
            in_kernel=first, out_kernel=last)


def _kernels(module_params: Any, path: str = "") -> list[tuple[str, Any]]:
    """``[(relative path, leaf)]`` of the module's floating leaves with >= 2 axes.

    In the params' own order (a Linen module creates its params in call order),
    not the sorted order of ``jax.tree`` flattening.
    """
    join = lambda k: f"{path}/{k}" if path else str(k)
    if isinstance(module_params, Mapping):
        return [kv for k, x in module_params.items() for kv in _kernels(x, join(k))]
    if isinstance(module_params, (list, tuple)):
        return [kv for i, x in enumerate(module_params) for kv in _kernels(x, join(i))]
    out = []
    for p, x in leaves_with_paths(module_params):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(x.shape) >= 2:
            out.append((join(p) if p else path, x))
    return out


class AdaptFormerNode(ModuleNode):
    """AdaptFormer's bottleneck; every field but ``scale`` (unless learnable) and the norm trains."""

    down: Array
    down_bias: Array
    up: Array
    up_bias: Array
    scale: Array
    norm_scale: Optional[Array] = None
    norm_bias: Optional[Array] = None
    in_kernel: str = dataclasses.field(default="", metadata={"pytree_node": False})
    out_kernel: str = dataclasses.field(default="", metadata={"pytree_node": False})

    config_class = AdaptFormer
    unmergeable_reason = ("its ReLU bottleneck is a nonlinear function of the input, not a "
                          "change of the module's weights")
    field_axes = {"down": Role.IN_RANK, "down_bias": Role.REPLICATED, "up": Role.RANK_OUT,
                  "up_bias": Role.OUT, "scale": Role.REPLICATED, "norm_scale": Role.IN,
                  "norm_bias": Role.IN}

    @property
    def trainable(self) -> tuple[str, ...]:
        base = ("down", "down_bias", "up", "up_bias")
        return base + ("scale",) if self.config.learnable_scale else base

    def half(self) -> str | None:
        # the norm fields are absent without norm="layernorm": not a split hole
        train = self.trainable
        if any(getattr(self, f) is None for f in train):
            return "frozen"
        others = [f for f in ("scale", "norm_scale", "norm_bias") if f not in train
                  and (f == "scale" or self.config.norm is not None)]
        if others and all(getattr(self, f) is None for f in others):
            return "trainable"
        return None

    @property
    def rank(self) -> int:
        return self.config.bottleneck

    def branch(self, x: Array, *, dropout_key: Array | None = None) -> Array:
        """``s·(drop(relu(n(x)·W_d + b_d))·W_u + b_u)``, ``n`` the optional LayerNorm."""
        d_in = self.shape[0]
        if x.shape[-1] != d_in:
            raise ValueError(f"{self.path}: AdaptFormer was built for inputs of {d_in} features "
                             f"(the module's first kernel), the module is called on shape "
                             f"{tuple(x.shape)}")
        h = x.astype(jnp.promote_types(x.dtype, self.down.dtype))
        if self.config.norm == "layernorm":
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + _LN_EPS) * self.norm_scale + self.norm_bias
        h = jax.nn.relu(h @ self.down + self.down_bias)
        h = branch_dropout(h, dropout_key, self.config.dropout)
        return self.scale * (h @ self.up + self.up_bias)

    def intercept(self, call, args, kwargs, *, dropout_key=None, **context):
        y = call(*args, **kwargs)
        z = self.branch(jnp.asarray(args[0]), dropout_key=dropout_key)
        if y.shape != z.shape:
            raise ValueError(f"{self.path}: the module returns shape {tuple(y.shape)}, "
                             f"AdaptFormer's branch {tuple(z.shape)} (built for d_out = "
                             f"{self.shape[1]} from the module's last kernel)")
        return y + z.astype(y.dtype)

    def base_spec(self, specs: dict[str, Any]) -> Any:
        first, last = specs.get(self.in_kernel), specs.get(self.out_kernel)
        lead = tuple(first)[0] if first is not None and len(tuple(first)) else None
        tail = tuple(last) if last is not None else ()
        return P(lead, tail[-1] if len(tail) >= 2 else None)
