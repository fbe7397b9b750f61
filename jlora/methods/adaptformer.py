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

**Dimensions.** ``in_features`` / ``out_features`` set ``d_in`` / ``d_out``
when given. Otherwise they are read from the shapes of the module's kernels
(floating leaves with at least two axes; a two-axis kernel maps its first
axis's size to its last's), independently of the order of the params' keys,
which ``jax.tree`` operations sort:

* a size that some kernel reads and no kernel writes is the module's input, a
  size written and never read its output: when there is exactly one of each,
  they are ``d_in`` and ``d_out`` (a ``d_in -> h -> d_out`` chain);
* when every size read is also written, the module maps ``d -> d`` through a
  cycle of sizes that its shapes alone cannot orient (``fc1 (d, h)``,
  ``fc2 (h, d)`` read the same as an ``h -> d -> h`` block); ``d`` is taken as the
  smallest size, the width of a transformer MLP whose hidden layers are wider
  (plain, gated ``gate/up/down`` or deeper). A module that is narrower inside
  needs ``in_features``; one of the two options alone sets both here;
* anything else is a ``ValueError`` at ``jlora.apply`` naming the module and
  asking for the two options: several candidate input or output sizes
  (grouped-query attention's narrower ``k``/``v``), or a kernel with more than
  two axes, whose input axes its shape does not tell (``DenseGeneral``
  attention's ``(d, heads, head_dim)``, a convolution's ``(kh, kw, in, out)``).

A wrong size still fails at the first forward, naming the module. The adapter
is not mergeable (the ReLU has no linear form): ``jlora.merge`` refuses it,
naming its path, unless ``residual=True``.

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
      in_features: ``d_in``, the size of the module's input's last axis (keyword
        only); default: read from the module's kernels (see the module docstring).
      out_features: ``d_out``, the size of the module's output's last axis
        (keyword only); default: read from the module's kernels.
    """

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    learnable_scale: bool = False
    norm: Optional[str] = None
    in_features: Optional[int] = dataclasses.field(default=None, kw_only=True)
    out_features: Optional[int] = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        owner = "AdaptFormer"
        v.positive_int(owner, "bottleneck", self.bottleneck)
        v.real(owner, "scale", self.scale)
        v.real(owner, "dropout", self.dropout, ge=0.0, lt=1.0)
        v.boolean(owner, "learnable_scale", self.learnable_scale)
        v.choice(owner, "norm", self.norm, NORMS)
        for name in ("in_features", "out_features"):
            if getattr(self, name) is not None:
                v.positive_int(owner, name, getattr(self, name))

    def build_module(self, key: Array, module_params: Any, *, path: str) -> "AdaptFormerNode":
        kernels = _kernels(module_params)
        if not kernels:
            raise ValueError(
                f"{path}: AdaptFormer reads the module's input and output sizes from its "
                f"kernels (floating leaves with 2 or more axes), and this module has none; "
                f"target a module with weights, such as a transformer block's MLP")
        d_in, d_out = self._sizes(kernels, path)
        # sorted paths: the same kernels whatever the order of the params' keys
        ordered = sorted(kernels, key=lambda kv: kv[0])
        first = next((p for p, k in ordered if k.shape[0] == d_in), "")
        last = next((p for p, k in ordered if k.shape[-1] == d_out), "")
        dtype = jnp.promote_types(dict(ordered).get(first, ordered[0][1]).dtype, jnp.float32)
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

    def _sizes(self, kernels: list[tuple[str, Any]], path: str) -> tuple[int, int]:
        """``(d_in, d_out)``: the options, else read from the kernels' shapes (module docstring)."""
        if self.in_features is not None and self.out_features is not None:
            return self.in_features, self.out_features
        multi = [(p, k) for p, k in sorted(kernels, key=lambda kv: kv[0]) if k.ndim > 2]
        if multi:
            raise ValueError(
                f"{path}: AdaptFormer cannot tell the module's input and output sizes from "
                f"its kernels: {multi[0][0]} has shape {tuple(multi[0][1].shape)}, whose input "
                f"axes a shape does not tell; pass them as AdaptFormer(..., in_features=d_in, "
                f"out_features=d_out)")
        read = {int(k.shape[0]) for _, k in kernels}
        written = {int(k.shape[-1]) for _, k in kernels}
        inputs, outputs = read - written, written - read
        if not inputs and not outputs:  # a d -> d cycle: d is the given or the smallest size
            d = next((x for x in (self.in_features, self.out_features) if x is not None),
                     min(read))
            return d, d
        if len(inputs) == 1 and len(outputs) == 1:
            d_in, d_out = inputs.pop(), outputs.pop()
            return (d_in if self.in_features is None else self.in_features,
                    d_out if self.out_features is None else self.out_features)
        shapes = ", ".join(f"{p} {tuple(k.shape)}"
                           for p, k in sorted(kernels, key=lambda kv: kv[0]))
        raise ValueError(
            f"{path}: AdaptFormer cannot tell the module's input and output sizes from its "
            f"kernels ({shapes}; each read as first axis -> last axis: sizes only read "
            f"{sorted(inputs)}, only written {sorted(outputs)}); pass them as "
            f"AdaptFormer(..., in_features=d_in, out_features=d_out)")


def _kernels(module_params: Any, path: str = "") -> list[tuple[str, Any]]:
    """``[(relative path, leaf)]`` of the module's floating leaves with >= 2 axes."""
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
            raise ValueError(f"{self.path}: AdaptFormer was built for inputs of {d_in} features, "
                             f"the module is called on shape {tuple(x.shape)}; set the sizes "
                             f"with AdaptFormer(..., in_features=, out_features=)")
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
                             f"{self.shape[1]}); set the sizes with AdaptFormer(..., "
                             f"in_features=, out_features=)")
        return y + z.astype(y.dtype)

    def base_spec(self, specs: dict[str, Any]) -> Any:
        first, last = specs.get(self.in_kernel), specs.get(self.out_kernel)
        lead = tuple(first)[0] if first is not None and len(tuple(first)) else None
        tail = tuple(last) if last is not None else ()
        return P(lead, tail[-1] if len(tail) >= 2 else None)
