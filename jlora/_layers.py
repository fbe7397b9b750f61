"""Which kernel axes a layer contracts: built-in Linen layers, einsum equations and
a registry of custom Dense-like layers; ``resolve`` writes them into a spec.

A *Dense-like* layer computes ``y = x · K (+ bias)``: the last ``len(kernel_axes)``
axes of ``x`` are contracted with the kernel axes ``kernel_axes`` and the output
axes are the kernel's remaining axes, in order. Hugging Face GPT-2's
``FlaxConv1D`` (kernel stored ``(out, in)``, ``kernel_axes=(1,)``) is known by
name, so ``transformers`` is never imported by jlora.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.spec import Spec
from jlora.tree import leaves_with_paths


class Layer(NamedTuple):
    """A registered Dense-like layer: its kernel's name and contracted axes, its bias."""

    kernel: str
    kernel_axes: tuple[int, ...]
    bias: str | None


_REGISTRY: dict[type, Layer] = {}
# Third-party layers known without importing their package: "module.QualName" -> Layer.
_BY_NAME: dict[str, Layer] = {
    "transformers.models.gpt2.modeling_flax_gpt2.FlaxConv1D": Layer("kernel", (1,), "bias"),
}


def register(layer_class: type, *, kernel_axes=(0,), kernel: str = "kernel",
             bias: str | None = "bias") -> type:
    """Put a custom Dense-like Linen layer on the factorized fast path.

    The layer must compute ``y = x · K + bias``, contracting the last
    ``len(kernel_axes)`` axes of its first argument with the kernel axes
    ``kernel_axes`` (a kernel stored PyTorch-style ``(out, in)`` has
    ``kernel_axes=(1,)``); the output axes are the kernel's other axes, in order.
    :func:`jlora.linen.resolve` then orients adapters on its kernel and
    :func:`jlora.linen.apply` computes it as ``x·K0 + s·(x·a)·b`` without forming
    the product. Returns ``layer_class`` (usable as a decorator).

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, jlora
        >>> class OutIn(nn.Module):  # kernel stored (out, in)
        ...     features: int
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         k = self.param("kernel", nn.initializers.normal(), (self.features, x.shape[-1]))
        ...         return x @ k.T
        >>> _ = jlora.linen.register(OutIn, kernel_axes=(1,), bias=None)
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, nn.Module)):
        raise ValueError(f"jlora.linen.register: layer_class must be a flax.linen.Module "
                         f"subclass, got {layer_class!r}")
    if isinstance(kernel_axes, int):
        kernel_axes = (kernel_axes,)
    axes = tuple(kernel_axes) if isinstance(kernel_axes, (tuple, list)) else None
    if (not axes or any(not isinstance(a, int) or isinstance(a, bool) or a < 0 for a in axes)
            or list(axes) != sorted(set(axes))):
        raise ValueError(f"jlora.linen.register({layer_class.__name__}): kernel_axes must be "
                         f"increasing non-negative ints, got {kernel_axes!r}")
    if not isinstance(kernel, str) or not kernel:
        raise ValueError(f"jlora.linen.register({layer_class.__name__}): kernel must be the "
                         f"parameter's name, got {kernel!r}")
    if bias is not None and not isinstance(bias, str):
        raise ValueError(f"jlora.linen.register({layer_class.__name__}): bias must be a "
                         f"parameter name or None, got {bias!r}")
    _REGISTRY[layer_class] = Layer(kernel, axes, bias)
    return layer_class


def registered(cls: type) -> Layer | None:
    """The registry entry of a layer class (exact class), or None."""
    hit = _REGISTRY.get(cls)
    if hit is None:
        hit = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return hit


# ---------------------------------------------------------------- contraction axes

_BUILTIN_KERNEL = {nn.Dense: "kernel", nn.DenseGeneral: "kernel", nn.Conv: "kernel",
                   nn.Embed: "embedding", nn.Einsum: "kernel"}


def kernel_name(cls: type) -> str | None:
    """The parameter name of the kernel of a layer jlora knows, or None."""
    if cls in _BUILTIN_KERNEL:
        return _BUILTIN_KERNEL[cls]
    hit = registered(cls)
    return None if hit is None else hit.kernel


def einsum_parts(eq: str) -> tuple[str, str, str] | None:
    """``(x_sub, k_sub, out_sub)`` of a two-operand einsum, or None (ellipsis in the kernel)."""
    eq = eq.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    lhs, out_sub = eq.split("->")
    x_sub, k_sub = lhs.split(",")
    if "." in k_sub:
        return None
    return x_sub, k_sub, out_sub


def einsum_equation(module: nn.Einsum, args, kwargs) -> str | None:
    eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    return module.einsum_str if eq is None else eq


def as_tuple(v) -> tuple:
    """A layer option that Flax takes as one int or a sequence of them, as a tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def contracted_axes(module: nn.Module, method: str, args, kwargs) -> tuple[int, ...] | None:
    """The kernel axes ``module`` contracts with its input in this call, or None."""
    cls = type(module)
    if method != "__call__":
        return None  # Embed.attend contracts the feature axis: not the table's orientation
    if cls is nn.Dense or cls is nn.Embed:
        return (0,)
    if cls is nn.DenseGeneral:
        nb = len(as_tuple(module.batch_dims))  # Flax takes one int for one batch axis
        return tuple(range(nb, nb + len(as_tuple(module.axis))))
    if cls is nn.Conv:
        window = module.kernel_size  # Flax also takes one int for a 1-D window
        ndim = (len(window) if isinstance(window, (tuple, list)) else 1) + 2  # window..., in, out
        return tuple(range(ndim - 1))
    if cls is nn.Einsum:
        eq = einsum_equation(module, args, kwargs)
        parts = None if eq is None else einsum_parts(eq)
        if parts is None:
            return None
        x_sub, k_sub, _ = parts
        return tuple(i for i, c in enumerate(k_sub) if c in x_sub)
    hit = registered(cls)
    return None if hit is None else hit.kernel_axes


# ---------------------------------------------------------------- resolve


def trace_axes(apply_fn, variables, *, seen: dict[str, set] | None = None) -> dict[str, set]:
    """Run ``apply_fn(variables)`` abstractly; ``{kernel path: {contracted axes}}``.

    ``seen``, when given, is filled with ``{kernel path: {shape the layer sees}}``:
    one slice of the stored kernel inside ``nn.scan`` / ``nn.vmap``.
    """
    found: dict[str, set] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        name = kernel_name(type(module))
        if name is not None and module.has_variable("params", name):
            axes = contracted_axes(module, context.method_name, args, kwargs)
            if axes is not None:
                path = "/".join(map(str, module.path + (name,)))
                found.setdefault(path, set()).add(axes)
                if seen is not None:
                    seen.setdefault(path, set()).add(
                        tuple(jnp.shape(module.get_variable("params", name))))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn, variables)
    return found


def _stacked_axes(path: str, shape: tuple[int, ...], seen: set, config) -> int:
    """How many leading axes of a stored kernel of ``shape`` the layer never sees
    (``nn.scan`` / ``nn.vmap`` stacking), from the slice shapes it saw: 0 or 1
    (0 for an orientation-free config such as ``Full``, which needs no axes).

    A stack needs a config that adapts it slice by slice (``expert_axis=0``):
    as one matrix its layer axis would be taken for input features.
    """
    if not seen or seen == {shape} or config.orientation_free:
        return 0
    slices = sorted(seen)
    k = len(shape) - len(slices[0])
    if len(slices) > 1 or k < 1 or tuple(shape[k:]) != slices[0]:
        raise ValueError(f"{path}: the stored kernel has shape {shape} but its layer sees "
                         f"{' and '.join(map(str, slices))}; jlora adapts a kernel stacked "
                         "along its leading axis (scan / vmap over layers, axis 0)")
    name = type(config).__name__
    if k > 1:
        raise ValueError(f"{path}: the stored kernel {shape} stacks {k} leading axes over the "
                         f"{slices[0]} its layer sees; jlora adapts one stacked axis "
                         "(expert_axis=0): reshape the stack to one leading axis")
    if getattr(config, "expert_axis", None) is None:
        raise ValueError(f"{path}: the stored kernel {shape} is stacked along axis 0 "
                         f"(scan or vmap over layers) and its layer sees slices {slices[0]}; "
                         f"adapt it per slice with {name}(..., expert_axis=0)")
    return k


def orient_spec(spec: Spec, params: Any, found: dict[str, set],
                seen: dict[str, set] | None = None, *, api: str = "jlora.linen") -> Spec:
    """``spec`` with every targeted kernel's ``in_axes`` set from ``found``.

    Rules become one regex rule per (original rule, orientation) listing the
    exact paths; configs without ``in_axes`` (``Full``) keep their rule as is.
    A kernel stacked along axis 0 whose layer sees one slice (``seen``, from
    :func:`trace_axes`) gets the layer's axes shifted by one, on the whole
    stack, and needs ``expert_axis=0`` in its config. ``api``: the module whose
    ``resolve`` is asking (``jlora.linen`` or ``jlora.nnx``), named in errors.
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"{api}.resolve: spec must be a jlora.Spec, got "
                         f"{type(spec).__name__}")
    groups: dict[tuple[int, Any], list[str]] = {}
    for path, leaf in leaves_with_paths(params):
        hits = spec.hits(path, level="leaf")  # as jlora.apply: module rules claim no leaf
        if not hits:
            continue
        index = hits[0]
        config = spec.rules[index].config
        shape = tuple(np.shape(leaf))
        has_axes = any(f.name == "in_axes" for f in dataclasses.fields(config))
        axes = found.get(path, set())
        if len(axes) > 1:
            raise ValueError(f"{path}: the model contracts this kernel over different axes "
                             f"{sorted(axes)} in different calls; give in_axes in its config")
        layer_axes = next(iter(axes)) if axes else None
        stacked = 0
        if layer_axes is not None:
            stacked = _stacked_axes(path, shape, (seen or {}).get(path, set()), config)
            layer_axes = tuple(a + stacked for a in layer_axes)
        if not has_axes:
            if (layer_axes is not None
                    and layer_axes != tuple(range(stacked, stacked + len(layer_axes)))
                    and not config.orientation_free):
                raise ValueError(f"{path}: {type(config).__name__} has no in_axes option but "
                                 f"the layer contracts kernel axes {layer_axes} of shape {shape}")
            groups.setdefault((index, None), []).append(path)
            continue
        given = config.in_axes
        if layer_axes is None:
            if given is None and len(shape) >= 2:
                ambiguous = len(shape) > 2 or shape[0] == shape[1]
                msg = (f"{path}: no layer jlora knows uses this kernel in the traced forward, "
                       f"so its orientation is unknown (shape {shape}); "
                       + ("register its layer with jlora.linen.register or "
                          if api == "jlora.linen" else "") + "give in_axes in its config")
                if ambiguous:
                    raise ValueError(msg)
                warnings.warn(msg + "; assuming (in, out)", stacklevel=3)
            groups.setdefault((index, given), []).append(path)
            continue
        if given is not None and tuple(sorted(a % len(shape) for a in given)) != layer_axes:
            raise ValueError(f"{path}: the config says in_axes={given} but the layer contracts "
                             f"kernel axes {layer_axes}")
        groups.setdefault((index, layer_axes), []).append(path)
    rules = []
    for i, rule in enumerate(spec.rules):
        keys = [k for k in groups if k[0] == i]
        if not keys:
            rules.append((rule.pattern, rule.config))  # let jlora.apply report it
            continue
        for key in keys:
            config = rule.config
            if key[1] is not None and key[1] != config.in_axes:
                config = dataclasses.replace(config, in_axes=key[1])
            if config is rule.config and len(keys) == 1:
                rules.append((rule.pattern, config))
            else:
                alts = "|".join(re.escape(p) for p in groups[key])
                rules.append((re.compile(f"(?:{alts})"), config))
    return Spec(rules)


# ---------------------------------------------------------------- fast-path views


#: why :func:`leading_view` has no view of a node (the fast path then serves it merged)
NO_LEADING_VIEW = ("its quantized base is packed in the kernel's layout, whose input axes do "
                   "not come first")


def leading_view(node):
    """The same adapter seen with its input axes first (as layers' kernels are).

    Array fields laid out like the base (``field_axes[...] == "base"``) are
    transposed; factors, defined on the ``(fan_in, fan_out)`` view, are unchanged.
    ``None`` where a field holds the kernel in a form that cannot be transposed (a
    quantized base, packed in the kernel's own layout): the caller serves merged
    weights, with :data:`NO_LEADING_VIEW` as the reason.
    """
    ndim = len(node.shape)
    perm = tuple(node.in_axes) + tuple(i for i in range(ndim) if i not in node.in_axes)
    if perm == tuple(range(ndim)):
        return node
    if any(role == "quantized" for role in node.field_axes.values()):
        return None
    changes = {name: jnp.transpose(getattr(node, name), perm)
               for name, role in node.field_axes.items()
               if role == "base" and getattr(node, name, None) is not None}
    return node.replace(**changes, shape=tuple(node.shape[i] for i in perm),
                        in_axes=tuple(range(len(node.in_axes))))


def report_merged(api: str, nodes: dict, hits, misses: dict, *, strict: bool,
                  dropout_key: Any, advice: str, stacklevel: int = 3) -> None:
    """Warn (``strict``: raise a ``ValueError``) naming every low-rank adapter of ``nodes``
    that the fast path served from merged weights, with the reason: ``misses[path]``, or no
    factorized call at all (no known layer uses it). Such an adapter is exact but computed
    from the dense ``K0 + ΔK``, and with a ``dropout_key`` its adapter dropout does not run."""
    from jlora.methods.full import FullNode

    merged = [p for p, n in nodes.items()
              if not isinstance(n, FullNode) and len(n.shape) >= 2
              and (p in misses or p not in hits)]
    if not merged:
        return

    def why(p):
        reason = misses.get(p, "no known layer uses it")
        if dropout_key is not None and getattr(nodes[p].config, "dropout", 0):
            reason += "; its adapter dropout does not run"
        return f"{p} ({reason})"

    msg = (f"{api}: served from merged weights, not factorized: "
           + "; ".join(why(p) for p in merged) + f". {advice}")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=stacklevel + 1)  # the caller's caller: the user's call

