"""Ready-made specs for the model families people fine-tune.

``jlora.presets.spec(family, targets, config)`` returns a :class:`jlora.Spec`
whose globs name the projections of one family's Flax parameter tree (Hugging
Face ``transformers`` Flax models; Gemma-style ``nn.Einsum`` blocks):

==============  =====================================================================
``targets``     adapts
==============  =====================================================================
``"qv"``        the query and value projections (Hu et al. 2021, §7.1: the LoRA
                paper's default); GPT-2's fused ``c_attn`` and Gemma's fused
                ``kv_einsum`` hold key as well
``"attention"`` every attention projection: query, key, value and output
``"all-linear"`` attention plus the MLP (QLoRA, Dettmers et al. 2023, §4: adapting
                every linear layer of the blocks)
==============  =====================================================================

The patterns name each projection explicitly, so a mixture-of-experts router
(``gate``, ``router``) and the output head (``lm_head``, ``classifier``) are never
adapted; ``head=jlora.Full()`` (or any config) adds the head on purpose.

Families: ``"bert"`` (also RoBERTa, which shares BERT's layout), ``"roberta"``,
``"gpt2"``, ``"llama"`` (also Mistral), ``"mistral"``, ``"gemma"``, ``"vit"``.
:func:`detect` names the family of a parameter tree.

Configs without their own ``in_axes`` get the family's kernel layout (GPT-2's
``FlaxConv1D`` stores ``(out, in)``; Gemma's einsum kernels contract a middle
axis), so ``jlora.apply`` with a preset orients adapters right; passing the spec
through :func:`jlora.linen.resolve` reads the orientation from the model itself
and checks it.

Gemma's gated MLP kernel ``gating_einsum`` comes in two layouts: ``(2, F, D)``
(``transpose_gating_einsum=True``: Gemma 2 9B/27B, Gemma 3) and ``(2, D, F)``
(Gemma 1, Gemma 2 2B, PaliGemma), ``D`` the model width and ``F`` the MLP width.
``spec(..., params=params)`` reads which from the shapes, and
``spec(..., transpose_gating_einsum=...)`` takes it from Gemma's config flag of
that name. A config that needs the layout gets neither guessed: without one of
the two, ``"all-linear"`` on Gemma is a ``ValueError`` (a wrong guess would
train a low-rank update of another matrix than the layer's ``D -> 2F`` map). MHA
Gemma (one fused ``qkv_einsum``, no ``q_einsum``) and GQA Gemma (``q_einsum`` and
``kv_einsum``) both fit the ``"qv"`` rule.

Example::

    >>> import jlora
    >>> spec = jlora.presets.spec("llama", "attention", jlora.LoRA(rank=8, alpha=16))
    >>> spec.match("model/layers/3/self_attn/o_proj/kernel").rank
    8
    >>> spec.match("lm_head/kernel") is None and spec.match("model/layers/3/mlp/up_proj/kernel") is None
    True
    >>> jlora.presets.detect({"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": 0}}}}}})
    'gpt2'
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jlora._validate import boolean
from jlora.methods.base import Config
from jlora.methods.lora import LoRA
from jlora.spec import Spec, glob_to_regex
from jlora.tree import leaves_with_paths

TARGETS = ("qv", "attention", "all-linear")

# family -> target group -> globs. "qv" ⊂ "attention" ⊂ "all-linear" is built below.
_BERT = {
    "qv": ("**/attention/self/{query,value}/kernel",),
    "attention": ("**/attention/self/key/kernel", "**/attention/output/dense/kernel"),
    "mlp": ("**/layer/*/intermediate/dense/kernel", "**/layer/*/output/dense/kernel"),
}
_LLAMA = {
    "qv": ("**/self_attn/{q_proj,v_proj}/kernel",),
    "attention": ("**/self_attn/{k_proj,o_proj}/kernel",),
    "mlp": ("**/mlp/{gate_proj,up_proj,down_proj}/kernel",),
}
# Gemma: the gated MLP kernel (layout read by spec(params=)) and the attention einsums
# whose widths tell d_model.
_GATING = "**/mlp/gating_einsum{,/kernel,/w}"
_QKV = re.compile(glob_to_regex("**/attn/{q_einsum,kv_einsum,qkv_einsum}{,/kernel,/w}"))
_ATTN_OUT = re.compile(glob_to_regex("**/attn/attn_vec_einsum{,/kernel,/w}"))
_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": {  # FlaxConv1D: kernel stored (out, in)
        "qv": (("**/attn/c_attn/kernel", (1,)),),
        "attention": (("**/attn/c_proj/kernel", (1,)),),
        "mlp": (("**/mlp/{c_fc,c_proj}/kernel", (1,)),),
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "gemma": {  # kernels (N, D, H), (2, K, D, H), (3, N, D, H), (N, H, D), (2, F, D), (F, D)
        # q_einsum (N, D, H), kv_einsum (2, K, D, H) and MHA's qkv_einsum (3, N, D, H) all
        # contract D, their second-to-last axis: one rule matches whichever the model has
        "qv": (("**/attn/{q_einsum,kv_einsum,qkv_einsum}/{kernel,w}", (-2,)),),
        "attention": (("**/attn/attn_vec_einsum/{kernel,w}", (0, 1)),),
        # (2, F, D) without params; spec(params=) picks (1,) for a (2, D, F) kernel
        "mlp": ((_GATING, (2,)),
                ("**/mlp/linear{,/kernel,/w}", (0,))),
    },
    "vit": {
        "qv": ("**/attention/attention/{query,value}/kernel",),
        "attention": ("**/attention/attention/key/kernel", "**/attention/output/dense/kernel"),
        "mlp": ("**/layer/*/intermediate/dense/kernel", "**/layer/*/output/dense/kernel"),
    },
}
_HEADS = {
    "bert": "classifier/**",
    "roberta": "classifier/**",
    "gpt2": "lm_head/kernel",
    "llama": "lm_head/kernel",
    "mistral": "lm_head/kernel",
    "gemma": "{lm_head,head}/{kernel,w}",
    "vit": "classifier/**",
}
# The token embedding a tied read-out reuses (there is then no head leaf).
_TIED = {
    "gpt2": "transformer/wte/embedding",
    "llama": "model/embed_tokens/embedding",
    "mistral": "model/embed_tokens/embedding",
    "gemma": "embedder/input_embedding",
}
FAMILIES = tuple(_GROUPS)

# A path fragment only one family's tree holds, for detect().
_SIGNATURES = (
    ("gpt2", "/attn/c_attn/"),
    ("gemma", "_einsum"),
    ("vit", "/attention/attention/query/"),
    ("roberta", "roberta/"),
    ("bert", "/attention/self/query/"),
    ("llama", "/self_attn/q_proj/"),
)


def patterns(family: str, targets: str = "qv") -> tuple[tuple[str, tuple | None], ...]:
    """``(glob, in_axes)`` pairs :func:`spec` uses for ``family`` and ``targets``.

    ``in_axes`` is the kernel layout the family's layers use where it is not
    Flax's ``(in..., out)`` (GPT-2's ``(out, in)`` ``FlaxConv1D``, Gemma's einsum
    kernels; negative axes count from the end), else None. Gemma's
    ``gating_einsum`` is given as ``(2,)``, its ``(2, F, D)`` layout; the
    ``(2, D, F)`` layout needs ``(1,)``, which :func:`spec` picks from ``params``
    or ``transpose_gating_einsum``.
    """
    if family not in _GROUPS:
        raise ValueError(f"jlora.presets: unknown family {family!r}; choose one of {FAMILIES}")
    if targets not in TARGETS:
        raise ValueError(f"jlora.presets: unknown targets {targets!r}; choose one of {TARGETS}")
    groups = _GROUPS[family]
    names = {"qv": ("qv",), "attention": ("qv", "attention"),
             "all-linear": ("qv", "attention", "mlp")}[targets]
    return tuple(p if isinstance(p, tuple) else (p, None)
                 for name in names for p in groups[name])


def spec(family: str, targets: str = "qv", config: Config | None = None, *,
         head: Config | None = None, params=None,
         transpose_gating_einsum: bool | None = None) -> Spec:
    """A :class:`jlora.Spec` adapting ``targets`` of a ``family`` model with ``config``.

    Args:
      family: one of :data:`FAMILIES` (or the result of :func:`detect`).
      targets: ``"qv"``, ``"attention"`` or ``"all-linear"``.
      config: the method config for every target; default ``jlora.LoRA(rank=8, alpha=16)``.
      head: a config for the output head (e.g. ``jlora.Full()`` for a new
        classifier); by default the head is left frozen. ``jlora.Full()`` (or
        any config without a rank, or a module-level one) takes the whole
        BERT/RoBERTa/ViT ``classifier``, biases included; a low-rank config its
        kernels. A read-out tied to the token embedding (GPT-2 and Gemma by
        default) has no head leaf: adapt the embedding with a rule of your own.
      params: the model's parameter tree (shapes suffice, e.g. from
        ``jax.eval_shape``). Where the family's layout varies (Gemma's
        ``gating_einsum``: ``(2, F, D)`` or ``(2, D, F)``) it is read from the
        shapes; a ``head`` that matches no leaf is an error naming the tied
        embedding.
      transpose_gating_einsum: Gemma's ``gating_einsum`` layout, as the Gemma
        config flag of that name: ``True`` for ``(2, F, D)`` (Gemma 2 9B/27B,
        Gemma 3), ``False`` for ``(2, D, F)`` (Gemma 1, Gemma 2 2B, PaliGemma).
        With ``params`` too, every kernel's shapes must agree with it where
        they settle the layout. ``"all-linear"`` on Gemma with a config that
        takes ``in_axes`` needs ``params`` or this option.

    Raises:
      ValueError: an unknown family or targets, a config that is not a method
        config; Gemma ``"all-linear"`` with neither ``params`` nor
        ``transpose_gating_einsum``; ``transpose_gating_einsum`` that is not a
        bool or is given for another family; with ``params``: a
        ``gating_einsum`` kernel whose layout its shapes do not settle
        (``D == F``, neither axis is ``D``, or not 3-D) and no
        ``transpose_gating_einsum``, or whose shapes contradict it, a ``head``
        pattern that matches no leaf.
    """
    config = LoRA(rank=8, alpha=16) if config is None else config
    if not isinstance(config, Config):
        raise ValueError(f"jlora.presets.spec: config must be a jlora method config "
                         f"(e.g. jlora.LoRA(rank=8)), got {config!r}")
    if head is not None and not isinstance(head, Config):
        raise ValueError(f"jlora.presets.spec: head must be a jlora method config "
                         f"(e.g. jlora.Full()), got {head!r}")
    if transpose_gating_einsum is not None:
        boolean("jlora.presets.spec", "transpose_gating_einsum", transpose_gating_einsum)
        if family != "gemma":
            raise ValueError(f"jlora.presets.spec: transpose_gating_einsum is Gemma's MLP "
                             f"layout; family {family!r} has no gating_einsum")
    leaves = None if params is None else {p: tuple(np.shape(x))
                                          for p, x in leaves_with_paths(params)}
    rules = []
    for p, axes in patterns(family, targets):
        oriented = _oriented(config, axes)
        if p == _GATING and oriented is not config:
            rules.extend(_gating_rules(leaves, config, transpose_gating_einsum))
        else:
            rules.append((p, oriented))
    if head is not None:
        rules.append((_head_pattern(family, head, leaves), head))
    return Spec(rules)


def _oriented(config: Config, in_axes):
    """``config`` with the family's kernel layout, unless it has no or its own ``in_axes``."""
    if in_axes is None or getattr(config, "in_axes", True) is not None:
        return config
    return dataclasses.replace(config, in_axes=in_axes)


_GATING_LAYOUT = ("pass transpose_gating_einsum=True for (2, hidden, d_model) (Gemma 2 "
                  "9B/27B, Gemma 3) or False for (2, d_model, hidden) (Gemma 1, Gemma 2 2B, "
                  "PaliGemma), as the model's Gemma config says")


def _gating_rules(leaves: dict | None, config: Config, transpose: bool | None) -> list:
    """Rules orienting each Gemma ``gating_einsum`` by which axis has the model width
    ``D``: ``(1,)`` for ``(2, D, F)``, ``(2,)`` for ``(2, F, D)``, read from ``leaves``
    (``{path: shape}``) or given by ``transpose``; never assumed. One glob rule when
    every kernel agrees."""
    given = None if transpose is None else ((2,) if transpose else (1,))
    if leaves is None:
        if given is None:
            raise ValueError(
                "jlora.presets.spec: Gemma's MLP kernel gating_einsum is stored (2, hidden, "
                "d_model) or (2, d_model, hidden) depending on the model, and an adapter in "
                "the wrong layout trains a low-rank update of another matrix; pass params= "
                "(the parameter tree; shapes suffice, e.g. from jax.eval_shape) to read it, "
                f"or {_GATING_LAYOUT}")
        return [(_GATING, dataclasses.replace(config, in_axes=given))]
    rule = re.compile(glob_to_regex(_GATING))
    found: dict[tuple, list[str]] = {}
    for path, shape in leaves.items():
        if rule.fullmatch(path):
            found.setdefault(_gating_axes(path, shape, leaves, given), []).append(path)
    if len(found) <= 1:
        axes = next(iter(found), given or (2,))  # no gating kernel in params: matches none
        return [(_GATING, dataclasses.replace(config, in_axes=axes))]
    return [(re.compile("(?:" + "|".join(map(re.escape, paths)) + ")"),
             dataclasses.replace(config, in_axes=axes)) for axes, paths in sorted(found.items())]


def _gating_axes(path: str, shape: tuple, leaves: dict, given: tuple | None) -> tuple[int]:
    """``(1,)`` or ``(2,)`` for one gating kernel: from its shapes, else ``given``."""
    if len(shape) != 3 or shape[0] != 2:
        raise ValueError(f"jlora.presets.spec: {path} has shape {shape}, not Gemma's "
                         f"(2, d_model, hidden) or (2, hidden, d_model)")
    d = _d_model(path, leaves)
    read = None
    if d is not None and shape[1] == d and shape[2] != d:
        read = (1,)
    elif d is not None and shape[2] == d and shape[1] != d:
        read = (2,)
    if given is not None:
        if read is not None and read != given:
            said = "(2, hidden, d_model)" if given == (2,) else "(2, d_model, hidden)"
            raise ValueError(f"jlora.presets.spec: transpose_gating_einsum={given == (2,)} "
                             f"says {said}, but {path} has shape {shape} with d_model {d}")
        return given
    if read is not None:
        return read
    if d is None:
        raise ValueError(f"jlora.presets.spec: {path}: no mlp/linear kernel beside it and no "
                         f"one width among the attention einsums, so d_model is unknown; "
                         f"{_GATING_LAYOUT}")
    raise ValueError(f"jlora.presets.spec: {path} has shape {shape} and d_model is {d}: its "
                     f"layout is ambiguous; {_GATING_LAYOUT}")


def _d_model(path: str, leaves: dict) -> int | None:
    """The model width beside a Gemma gating kernel: its MLP's ``linear`` ``(F, D)``, else the
    one width of the attention einsums (``q/kv/qkv_einsum`` ``(..., D, H)``, ``attn_vec_einsum``
    ``(N, H, D)``)."""
    mlp = path[: path.rindex("mlp/gating_einsum")] + "mlp/"
    for tail in ("linear", "linear/kernel", "linear/w"):
        shape = leaves.get(mlp + tail)
        if shape is not None and len(shape) == 2:
            return shape[-1]
    widths = set()
    for p, shape in leaves.items():
        if len(shape) >= 2 and _QKV.fullmatch(p):
            widths.add(shape[-2])
        elif len(shape) >= 2 and _ATTN_OUT.fullmatch(p):
            widths.add(shape[-1])
    return widths.pop() if len(widths) == 1 else None


def _head_pattern(family: str, head: Config, leaves: dict | None) -> str:
    """The family's head glob; a low-rank config takes the classifier's kernels only."""
    pattern = _HEADS[family]
    low_rank = getattr(head, "level", "leaf") == "leaf" and any(
        f.name in ("in_axes", "rank") for f in dataclasses.fields(head))
    if low_rank and pattern == "classifier/**":
        pattern = "classifier/**/kernel"
    if leaves is not None:
        rule = re.compile(glob_to_regex(pattern))
        if not any(rule.fullmatch(p) for p in leaves):
            tied = _TIED.get(family)
            hint = ("" if tied is None else
                    f"; a read-out tied to the token embedding has no head leaf: adapt "
                    f"{tied!r} with a rule of your own")
            raise ValueError(f"jlora.presets.spec: head={head!r}, but no {family} leaf matches "
                             f"{pattern!r} (paths look like {list(leaves)[:3]}){hint}")
    return pattern


def detect(params) -> str:
    """The family of a Flax parameter tree, from a path fragment only that family has.

    Raises:
      ValueError: no family's layout recognised.
    """
    paths = [p for p, _ in leaves_with_paths(params)]
    for family, fragment in _SIGNATURES:
        if any(fragment in "/" + p for p in paths):
            return family
    raise ValueError("jlora.presets.detect: no known family's layout in params (paths look "
                     f"like {paths[:3]}); name the family or write a jlora.Spec")
