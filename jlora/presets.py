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

from jlora.methods.base import Config
from jlora.methods.lora import LoRA
from jlora.spec import Spec
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
        "qv": (("**/attn/q_einsum/{kernel,w}", (1,)),
               ("**/attn/{kv_einsum,qkv_einsum}/{kernel,w}", (2,))),
        "attention": (("**/attn/attn_vec_einsum/{kernel,w}", (0, 1)),),
        "mlp": (("**/mlp/gating_einsum{,/kernel,/w}", (2,)),
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
    kernels), else None.
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
         head: Config | None = None) -> Spec:
    """A :class:`jlora.Spec` adapting ``targets`` of a ``family`` model with ``config``.

    Args:
      family: one of :data:`FAMILIES` (or the result of :func:`detect`).
      targets: ``"qv"``, ``"attention"`` or ``"all-linear"``.
      config: the method config for every target; default ``jlora.LoRA(rank=8, alpha=16)``.
      head: a config for the output head (e.g. ``jlora.Full()`` for a new
        classifier); by default the head is left frozen.
    """
    config = LoRA(rank=8, alpha=16) if config is None else config
    if not isinstance(config, Config):
        raise ValueError(f"jlora.presets.spec: config must be a jlora method config "
                         f"(e.g. jlora.LoRA(rank=8)), got {config!r}")
    rules = [(p, _oriented(config, axes)) for p, axes in patterns(family, targets)]
    if head is not None:
        rules.append((_HEADS[family], head))
    return Spec(rules)


def _oriented(config: Config, in_axes):
    """``config`` with the family's kernel layout, unless it has no or its own ``in_axes``."""
    if in_axes is None or getattr(config, "in_axes", True) is not None:
        return config
    return dataclasses.replace(config, in_axes=in_axes)


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
