"""GLoRA: generalized LoRA (Chavan et al. 2023, arXiv 2306.07967).

The paper writes ``f(x) = (W0 + W0·A + B)·x + C·W0 + D·b0 + E + b0``. **jlora
follows the official code** (Arnav0400/ViT-Slim ``GLoRA/``), which multiplies
``W0`` and ``A`` element-wise and turns ``C`` into a bias term. In jlora's
orientation (kernel ``K0 (in, out)``, bias ``b0 (out,)``):

    K' = K0 + K0 ⊙ A + B            b' = b0 + b0 ⊙ D + E + C·K0

Support forms (one per tensor, ``"none" | "scalar" | "vector" | "lowrank:r"``;
plain ``"lowrank"`` uses the config's ``rank``):

* ``A``, ``B``: lowrank ``u[:, :r]·d[:r]`` ``(in, out)``; vector ``d[0]`` ``(out,)``
  broadcast over rows; scalar ``d[0, 0]``; none.
* ``C``: lowrank ``cd[:, :r]·cu[:r]`` ``(in,)``; vector ``cd[:, 0]`` ``(in,)``; none.
* ``D``, ``E``: vector ``(out,)``; scalar (entry 0); none.

That is 4·4·3·3·3 = 432 configurations per layer. Every form reads a slice of
one set of maximal tensors (the supernet's weight sharing); the *down* tensors
(``a_d``, ``b_d``, ``c_d``) and ``d``, ``e`` start at zero and the up tensors
kaiming-uniform, so ``K' = K0`` and ``b' = b0`` at init. Everything is linear
in ``K0, b0``: ``merge`` gives one exact weight and bias.

A GLoRA rule on a kernel also adapts its sibling ``bias`` leaf (C, D and E live
there): the kernel node holds ``K0`` and A, B; the bias node holds ``b0``, a
frozen reference to ``K0`` and C, D, E. Both carry the layer's current choice
as a small frozen int array, so ``jlora.optim.glora_sample`` can draw a new
configuration for every step inside ``jit`` without retracing. ``⊙ A`` has no
factorized form (it touches every weight), so GLoRA layers compute with the
materialized weight, also on the fast path.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}
    >>> adapted = jlora.apply(params, jlora.Spec({"fc/kernel": jlora.GLoRA()}),
    ...                       key=jax.random.key(0))
    >>> type(adapted["fc"]["bias"]).__name__
    'GLoRABiasNode'
    >>> bool(jnp.allclose(jlora.merge(adapted)["fc"]["kernel"], 1.0))
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jlora import _validate as v
from jlora.methods.base import (AdapterNode, Array, Config, Role, factor_dtype, freeze_in_axes,
                                strict_options, view_leaf)
from jlora.tree import parent

SUPPORTS = ("a", "b", "c", "d", "e")
FORMS = ("none", "scalar", "vector", "lowrank")
ALLOWED = {"a": (0, 1, 2, 3), "b": (0, 1, 2, 3), "c": (0, 2, 3), "d": (0, 1, 2), "e": (0, 1, 2)}


def parse_form(support: str, text: str) -> tuple[int, int]:
    """``"lowrank:4"`` -> ``(3, 4)``; ``"vector"`` -> ``(2, 0)``."""
    if not isinstance(text, str):
        raise ValueError(f"GLoRA: {support} must be a form string such as 'vector', got {text!r}")
    name, _, r = text.partition(":")
    if name not in FORMS or FORMS.index(name) not in ALLOWED[support]:
        allowed = [FORMS[i] + (":r" if i == 3 else "") for i in ALLOWED[support]]
        raise ValueError(f"GLoRA: {support}={text!r} is not one of {allowed}")
    if name == "lowrank":
        if not r:
            return 3, 0  # the config's rank
        if not r.isdigit() or int(r) < 1:
            raise ValueError(f"GLoRA: {support}={text!r} needs a positive rank, e.g. 'lowrank:4'")
        return 3, int(r)
    if r:
        raise ValueError(f"GLoRA: {support}={text!r}: only lowrank takes a rank")
    return FORMS.index(name), 0


@strict_options
@dataclasses.dataclass(frozen=True)
class GLoRA(Config):
    """GLoRA config: the (initial or fixed) form of each support tensor.

    ``rank`` sizes the shared low-rank tensors (default: the largest rank
    named, else 4), so a supernet can sample lowrank for any support.
    ``expert_axis`` is refused (see the error for why): GLoRA adapts 2-D
    ``(in, out)`` kernels only.
    """

    a: str = "lowrank"
    b: str = "lowrank"
    c: str = "lowrank"
    d: str = "vector"
    e: str = "vector"
    rank: int | None = None
    dtype: Any = None
    expert_axis: int | None = None

    def __post_init__(self):
        if self.expert_axis is not None:
            raise ValueError(
                "GLoRA: expert_axis is not supported: GLoRA's search draws one configuration "
                "per layer (the node's choice) and its C, D, E terms live on the layer's bias, "
                "so a stacked kernel would need per-slice choices and stacked bias nodes; "
                "adapt stacked kernels with LoRA, DoRA, VeRA, AdaLoRA, PF2LoRA or QLoRA")
        forms = [parse_form(s, getattr(self, s)) for s in SUPPORTS]
        if self.rank is None:
            object.__setattr__(self, "rank", max([r for _, r in forms] + [0]) or 4)
        v.positive_int("GLoRA", "rank", self.rank)
        if any(r > self.rank for _, r in forms):
            raise ValueError(f"GLoRA: a lowrank form exceeds rank={self.rank}")
        freeze_in_axes(self)

    def choice(self) -> jnp.ndarray:
        """The forms as the ``(5,)`` int code array nodes carry (0 none .. 3 lowrank)."""
        return jnp.asarray([parse_form(s, getattr(self, s))[0] for s in SUPPORTS], jnp.int32)

    def ranks(self) -> tuple[int, ...]:
        """Rank used by each support when its form is lowrank."""
        return tuple(parse_form(s, getattr(self, s))[1] or self.rank for s in SUPPORTS)

    def build(self, key: Array, base: Array, *, path: str) -> "GLoRANode":
        self.check_leaf(base, path)
        if base.ndim != 2:
            raise ValueError(f"{path}: GLoRA adapts 2-D (in, out) kernels, got shape {base.shape}")
        view = view_leaf(self, base, path, rank=self.rank, rank_name="GLoRA rank")
        fan_in, fan_out, dt = view.fan_in, view.fan_out, view.dtype
        ka, kb = jax.random.split(key)
        r = self.rank
        return GLoRANode(base=base, a_u=_kaiming(ka, (fan_in, r), dt), a_d=jnp.zeros((r, fan_out), dt),
                         b_u=_kaiming(kb, (fan_in, r), dt), b_d=jnp.zeros((r, fan_out), dt),
                         choice=self.choice(), config=self, shape=tuple(base.shape), in_axes=(0,))

    # A kernel rule also adapts the layer's bias (C, D, E live there).
    def companion(self, path: str) -> str | None:
        return f"{parent(path)}/bias" if parent(path) else "bias"

    def build_companion(self, key: Array, bias: Array | None, kernel: Array, *, path: str):
        needs_bias = any(parse_form(s, getattr(self, s))[0] for s in ("c", "d", "e"))
        if bias is None:
            if needs_bias:
                raise ValueError(f"{path}: GLoRA with c/d/e forms needs the layer's bias leaf; "
                                 "use c='none', d='none', e='none' for a bias-free layer")
            return None
        self.check_leaf(bias, path)
        fan_in, fan_out = kernel.shape
        if tuple(bias.shape) != (fan_out,):
            raise ValueError(f"{path}: GLoRA needs the layer's bias of shape ({fan_out},) (the "
                             f"kernel's fan_out), got {tuple(bias.shape)}")
        dt = factor_dtype(bias.dtype, self.dtype)
        r = self.rank
        return GLoRABiasNode(base=bias, kernel=kernel, c_d=jnp.zeros((fan_in, r), dt),
                             c_u=_kaiming(key, (r, 1), dt), d=jnp.zeros((fan_out,), dt),
                             e=jnp.zeros((fan_out,), dt), choice=self.choice(), config=self,
                             shape=tuple(bias.shape), in_axes=())


def _kaiming(key, shape, dtype):
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _support(form, rank_mask, up, down, out_shape):
    """Value of a support tensor for a traced form code, reading slices of (up, down)."""
    lowrank = (up * rank_mask) @ down
    vector = jnp.broadcast_to(down[0], out_shape)
    scalar = jnp.broadcast_to(down[0, 0], out_shape)
    zero = jnp.zeros(out_shape, down.dtype)
    return jnp.select([form == 3, form == 2, form == 1], [lowrank, vector, scalar], zero)


class GLoRANode(AdapterNode):
    """``K' = K0 + K0 ⊙ A + B``; trainable ``a_u, a_d, b_u, b_d``."""

    base: Array
    a_u: Array
    a_d: Array
    b_u: Array
    b_d: Array
    choice: Array

    config_class = GLoRA
    trainable = ("a_u", "a_d", "b_u", "b_d")
    field_axes = {"base": Role.BASE, "a_u": Role.IN_RANK, "a_d": Role.RANK_OUT,
                  "b_u": Role.IN_RANK, "b_d": Role.RANK_OUT, "choice": Role.REPLICATED}

    def _ab(self):
        ra, rb = self.config.ranks()[:2]
        r = jnp.arange(self.config.rank)
        A = _support(self.choice[0], r < ra, self.a_u, self.a_d, self.shape)
        B = _support(self.choice[1], r < rb, self.b_u, self.b_d, self.shape)
        return A, B

    def delta(self) -> Array:
        A, B = self._ab()
        return self.base.astype(A.dtype) * A + B



class GLoRABiasNode(AdapterNode):
    """``b' = b0 + b0 ⊙ D + E + C·K0``; trainable ``c_d, c_u, d, e``; ``kernel`` is K0 (frozen)."""

    base: Array
    kernel: Array
    c_d: Array
    c_u: Array
    d: Array
    e: Array
    choice: Array

    trainable = ("c_d", "c_u", "d", "e")
    method = "GLoRA-bias"
    field_axes = {"base": Role.OUT, "kernel": Role.KERNEL, "c_d": Role.IN_RANK,
                  "c_u": Role.REPLICATED, "d": Role.OUT, "e": Role.OUT,
                  "choice": Role.REPLICATED}

    def delta(self) -> Array:
        rc = self.config.ranks()[2]
        r = jnp.arange(self.config.rank)
        fan_in = self.kernel.shape[0]
        # C reads cd[:, :r]·cu[:r] (lowrank) or cd[:, 0] (vector): an (in,) vector
        c_low = (self.c_d * (r < rc)) @ self.c_u[:, 0]
        c = jnp.select([self.choice[2] == 3, self.choice[2] == 2], [c_low, self.c_d[:, 0]],
                       jnp.zeros((fan_in,), self.c_d.dtype))
        vec_or_scalar = lambda form, v: jnp.select(
            [form == 2, form == 1], [v, jnp.broadcast_to(v[0], v.shape)], jnp.zeros_like(v))
        D = vec_or_scalar(self.choice[3], self.d)
        E = vec_or_scalar(self.choice[4], self.e)
        b0 = self.base.astype(D.dtype)
        return b0 * D + E + c @ self.kernel.astype(c.dtype)



def support_params(codes, ranks, fan_in: int, fan_out: int) -> int:
    """Parameters a configuration (form codes per support) trains for one ``(in, out)`` layer."""
    count = 0
    for s, form, r in zip(SUPPORTS, codes, ranks):
        if s in ("a", "b"):
            count += {0: 0, 1: 1, 2: fan_out, 3: r * (fan_in + fan_out)}[int(form)]
        elif s == "c":
            count += {0: 0, 2: fan_in, 3: r * (fan_in + 1)}[int(form)]
        else:
            count += {0: 0, 1: 1, 2: fan_out}[int(form)]
    return count
