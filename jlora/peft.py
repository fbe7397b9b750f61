"""Hugging Face PEFT adapter files in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

``save(directory, adapted)`` writes what ``peft.PeftModel.from_pretrained``
loads; ``load(directory, params)`` reads such a directory back into an adapted
tree over ``params``. Layouts (PyTorch ``(out, in)`` against Flax ``(in, out)``):

=======================  ===============================  ==========================
PEFT tensor              shape                            jlora
=======================  ===============================  ==========================
``lora_A.weight``        ``(r, in)`` / conv ``(r,in,kh,kw)``  ``a`` transposed
``lora_B.weight``        ``(out, r)`` / conv ``(out,r,1,1)``  ``b`` transposed
``lora_embedding_A``     ``(r, num_embeddings)``          ``a`` transposed
``lora_embedding_B``     ``(dim, r)``                     ``b`` transposed
``lora_magnitude_vector`` ``(out,)``                      DoRA ``m``
``<module>.weight/bias`` as the module                    ``Full()`` leaves (``modules_to_save``)
=======================  ===============================  ==========================

Module names: by default the Flax path ``a/b/c/kernel`` is the PyTorch module
``a.b.c``; pass ``name_map`` (a function or a dict from Flax module path to
PyTorch module name) for other models. PiSSA/OLoRA adapters (and CorDA and
LoRA-GA ones from ``jlora.init``, any node holding ``a0``/``b0``) are saved as the
equivalent plain LoRA on the *original* weights, as PEFT does: ``a' = [a, a0]``,
``b' = [b; −b0]``, rank and alpha doubled (alpha ×√2 with rsLoRA).

AdaLoRA adapters go to and from PEFT's ``ADALORA`` adapters (``SVDLinear``,
``SVDConv2d``): ``<module>.lora_A`` ``(r, in)`` (Conv2d ``(r, in·kh·kw)``) is ``p``
transposed, ``<module>.lora_E`` ``(r, 1)`` is ``λ``, ``<module>.lora_B`` ``(out, r)`` is
``q`` transposed, with ``r = init_r``. PEFT scales by ``lora_alpha / (init_r + 1e-5)``,
so jlora's ``alpha = lora_alpha · init_r / (init_r + 1e-5)`` both ways and the two
compute the same ``ΔW``. A tree with AdaLoRA holds AdaLoRA (and ``Full()``) adapters
only: PEFT's file has one ``peft_type``.

Loading is strict and exact: every module ``target_modules`` selects in
``params`` must have every tensor it needs (``lora_A``, ``lora_B``, DoRA's
``lora_magnitude_vector``, AdaLoRA's ``lora_E``) and every tensor must belong to a
selected module;
a config key jlora does not implement set to a non-default value, a value of
the wrong type, a rank or shape that disagrees with the tensors or the base,
an integer, boolean or non-finite tensor, an adapter whose
``init_lora_weights`` changed the base weights (PiSSA, OLoRA, CorDA,
LoRA-GA, LoftQ, unless PEFT converted it back to plain LoRA), an unreadable
or truncated file: each a ``ValueError`` naming the file
(``adapter_config.json`` / ``adapter_model.safetensors``) and the key. The
caller's trees are never modified and nothing is returned half-loaded.

Saving refuses what it cannot write faithfully (a trainable or frozen half,
two Flax paths that map to one PyTorch name, a method or a mix of settings
PEFT's config cannot express) and replaces both files at once: the new
adapter is written to a temporary directory beside the target and swapped in
with one atomic rename, so a crash mid-save leaves the previous adapter
loadable.

Example::

    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"fc1": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)}}
    >>> adapted = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=4, alpha=8)}),
    ...                       key=jax.random.key(0))
    >>> d = tempfile.mkdtemp()
    >>> jlora.peft.save(d, adapted)
    >>> back = jlora.peft.load(d, params)
    >>> back["fc1"]["kernel"].a.shape, back["fc1"]["kernel"].scale
    ((8, 4), 2.0)
"""

from __future__ import annotations

import collections
import ctypes
import json
import math
import os
import re
import shutil
import stat
import tempfile
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.methods.adalora import AdaLoRA, AdaLoRANode
from jlora.methods.dora import DoRA, DoRANode
from jlora.methods._experts import is_stacked
from jlora.methods.base import factor_dtype
from jlora.methods.full import Full, FullNode
from jlora.methods.lora import LoRA, LoRANode
from jlora.methods.qlora import QLoRANode
from jlora.methods.trainable_tokens import TrainableTokens, TrainableTokensNode, check_indices
from jlora.tree import is_node, leaves_with_paths, map_with_paths, parent, require_whole

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Keys jlora reads; everything else must sit at a default value.
_READ = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern",
         "alpha_pattern", "target_modules", "exclude_modules", "lora_dropout", "bias",
         "lora_bias", "fan_in_fan_out", "modules_to_save", "init_lora_weights",
         "trainable_token_indices", "target_parameters", "layers_to_transform",
         "layers_pattern"}
# Informational keys (and keys whose usual value changes nothing for a plain LoRA
# adapter) with the JSON types they may hold.
_INFO = {"base_model_name_or_path": (str, type(None)), "revision": (str, type(None)),
         "task_type": (str, type(None)), "peft_version": (str, type(None)),
         "inference_mode": (bool,), "auto_mapping": (dict, type(None)),
         "megatron_core": (str, type(None)), "qalora_group_size": (int,)}
_NON_EMPTY_DEFAULTS = {"loftq_config": {}, "runtime_config": {"ephemeral_gpu_offload": False}}
# init_lora_weights values after which the saved tensors apply to the base as it was.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# Inits that replace the base weight (PiSSA: W_res = W - s·B0·A0, ...): such a file's
# tensors apply to a base we are not given.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# safetensors dtype names -> numpy dtypes (little endian).
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": jnp.dtype(jnp.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"),
           "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
           "BOOL": np.dtype("?")}
_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
             "lora_magnitude_vector", "lora_B.bias", "weight", "bias")

NameMap = Callable[[str], str] | dict | None


def _module_namer(name_map: NameMap) -> Callable[[str], str]:
    if name_map is None:
        return lambda p: p.replace("/", ".")
    if isinstance(name_map, dict):
        def lookup(p):
            if p not in name_map:
                raise ValueError(f"name_map has no PyTorch module name for Flax module {p!r}")
            return name_map[p]
        table = lookup
    elif callable(name_map):
        table = name_map
    else:
        raise ValueError(f"name_map must be a function or a dict, got {type(name_map).__name__}")

    def name(p):
        try:
            out = table(p)
        except ValueError:
            raise
        except Exception as e:  # a user's function: say which module it failed on
            raise ValueError(f"name_map failed for Flax module {p!r} "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(out, str):
            raise ValueError(f"name_map gave {out!r} for Flax module {p!r}; expected a str")
        return out
    return name


def _torch_modules(tree: Any, name_map: NameMap, what: str) -> dict[str, str]:
    """PyTorch module name -> Flax module path, for every module of ``tree``.

    ``name_map`` may leave modules out (a dict without them, a function that
    fails on them): they cannot be addressed. Two Flax modules that map to one
    PyTorch name are an error.
    """
    namer = _module_namer(name_map)
    out: dict[str, str] = {}
    for path, _ in leaves_with_paths(tree):
        flax = parent(path)
        try:
            torch = namer(flax)
        except ValueError:
            continue
        if out.setdefault(torch, flax) != flax:
            raise ValueError(f"{what}: Flax modules {out[torch]!r} and {flax!r} both map to "
                             f"the PyTorch module {torch!r}")
    return out


# ---------------------------------------------------------------- PEFT's matching rules


def _selects(rule, module: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` test for one module name."""
    if rule is None:
        return False
    if rule == "all-linear":  # PEFT: every Linear but the output head; the tensors tell which
        return True
    if isinstance(rule, str):
        return re.fullmatch(rule, module) is not None
    return any(module == t or module.endswith("." + t) for t in rule)


def _pattern_hit(key: str, module: str) -> bool:
    """PEFT's ``get_pattern_key`` test: ``re.match(rf"(.*\\.)?({key})$", module)``."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def _pattern_value(patterns: dict, module: str, default):
    """The value of the first ``rank_pattern``/``alpha_pattern`` key that hits ``module``."""
    for k, v in (patterns or {}).items():
        if _pattern_hit(k, module):
            return v
    return default


def _rank_alpha(config: dict, module: str) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    return r, _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))


def _wrapped(rule, module: str) -> bool:
    """PEFT's ``modules_to_save`` test (``_set_trainable``): a bare ``module.endswith(entry)``,
    with no dot boundary, so ``["classifier"]`` also wraps ``pre_classifier``."""
    return bool(rule) and any(module.endswith(m) for m in rule)


def _saved_whole(rule, module: str) -> bool:
    """Whether ``module`` lies in a module PEFT wraps for ``modules_to_save`` (itself or one
    above it): its tensors are then saved whole, as the wrapper's copy holds them."""
    parts = module.split(".")
    return any(_wrapped(rule, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _lora_excluded(rule, module: str) -> bool:
    r"""PEFT's guard that keeps LoRA off ``modules_to_save`` modules and their children:
    ``re.match(rf"(^|.*\.){m}($|\..*)", module)`` (the entry is used as a regex)."""
    return bool(rule) and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in rule)


def _in_layers(config: dict, module: str) -> bool:
    """PEFT's ``layers_to_transform`` test (``check_target_module_exists``) for a module a
    ``target_modules`` list selects by suffix: the first numbered segment after a
    ``layers_pattern`` entry (any segment when there is none) must be a listed layer index.
    A module named exactly in the list, or a ``target_modules`` regex, is not restricted."""
    layers = config.get("layers_to_transform")
    rule = config.get("target_modules")
    if layers is None or layers == [] or not isinstance(rule, list) or module in rule:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = next((m for m in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                                  for p in patterns) if m), None)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _targeted(config: dict, module: str) -> bool:
    return (_selects(config.get("target_modules"), module)
            and _in_layers(config, module)
            and not _selects(config.get("exclude_modules"), module)
            and not _lora_excluded(config.get("modules_to_save"), module))


# ---------------------------------------------------------------- save


def _kind(path: str, node) -> str:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "embedding" and len(node.shape) == 2:
        return "embedding"
    if len(node.shape) == 2 and node.in_axes == (0,):
        return "linear"
    if len(node.shape) == 2 and node.in_axes == (1,):
        return "linear_t"  # kernel stored (out, in): PEFT's fan_in_fan_out layers
    if len(node.shape) == 4 and node.in_axes == (0, 1, 2):
        return "conv"
    raise ValueError(
        f"{path}: a kernel of shape {node.shape} with in_axes {node.in_axes} has no PEFT "
        "layout (PEFT holds Linear, Conv2d and Embedding LoRA)")


def _export_factors(path, node):
    """(a, b, rank, alpha) on the original base; PiSSA/OLoRA folded back to plain LoRA."""
    cfg = node.config
    alpha = cfg.rank if cfg.alpha is None else cfg.alpha
    a, b, rank = np.asarray(node.a), np.asarray(node.b), cfg.rank
    if getattr(node, "a0", None) is not None:
        if isinstance(node, DoRANode):
            raise ValueError(f"{path}: exporting a PiSSA/OLoRA-initialised DoRA adapter is not supported")
        a = np.concatenate([a, np.asarray(node.a0, a.dtype)], axis=1)
        b = np.concatenate([b, -np.asarray(node.b0, b.dtype)], axis=0)
        rank *= 2
        alpha = alpha * (math.sqrt(2) if cfg.rslora else 2)
    return a, b, rank, alpha


def _conv_lora_a(a: np.ndarray, shape: tuple[int, ...], rank: int) -> np.ndarray:
    """PEFT's Conv2d ``lora_A`` ``(r, in, kh, kw)`` (PyTorch's weight order) from jlora's
    ``a`` ``(kh·kw·in, r)`` of a ``(kh, kw, in, out)`` kernel."""
    kh, kw, cin, _ = shape
    return a.reshape(kh, kw, cin, rank).transpose(3, 2, 0, 1)


def _torch_full(path: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel" and value.ndim == 2:
        return "weight", value.T
    if leaf == "kernel" and value.ndim == 4:
        return "weight", value.transpose(3, 2, 0, 1)
    if leaf in ("embedding", "scale"):
        return "weight", value
    if leaf == "bias":
        return "bias", value
    raise ValueError(f"{path}: no PyTorch name for a Full() leaf called {leaf!r}")


def _one_setting(name: str, values: list) -> None:
    """The adapters share one value of the config key ``name``, or a ``ValueError``."""
    if len(set(values)) > 1:
        raise ValueError(f"jlora.peft.save: adapters mix {name} values; PEFT stores one "
                         "setting per adapter: save them as separate adapters")


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _exchange(new: str, old: str) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0


def _link_tree(src: str, dst: str, skip: set) -> None:
    """Hard-link (or copy) ``src``'s entries into ``dst``, except the names in ``skip``."""
    for name in os.listdir(src):
        if name in skip:
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s):
            os.mkdir(d)
            _link_tree(s, d, set())
        else:
            try:
                os.link(s, d, follow_symlinks=False)
            except OSError:
                shutil.copy2(s, d, follow_symlinks=False)


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore it, the only portable way to read it
    os.umask(mask)
    return mask


def _write_atomically(out: str, files: dict[str, Callable[[str], None]]) -> None:
    """Write ``files`` (name -> writer(path)) into ``out`` as one all-or-nothing change.

    The new directory is built beside ``out`` (other entries of ``out`` are
    linked into it) and swapped in with one atomic rename, so a reader sees the
    old adapter or the new one, never a mix or a partial file. A symlinked
    ``out`` (or parent) is followed: the directory it points to is replaced
    and the link is kept. The directory keeps the mode of the one it replaces;
    a new one gets ``0o777`` less the umask, as ``os.mkdir`` gives.
    """
    out = os.path.realpath(out)
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.jlora-tmp-")
    try:
        for name, write in files.items():
            write(os.path.join(tmp, name))
        # mkdtemp makes the directory 0700, private to its owner
        os.chmod(tmp, stat.S_IMODE(os.stat(out).st_mode) if os.path.isdir(out)
                 else 0o777 & ~_umask())
        if not os.path.exists(out):
            os.rename(tmp, out)
            return
        if not os.path.isdir(out):
            raise ValueError(f"{out}: exists and is not a directory")
        _link_tree(out, tmp, set(files))
        if not _exchange(tmp, out):  # no renameat2: replace file by file, config last
            for name in files:
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _full_modules(adapted: Any, namer) -> list[str]:
    """The PyTorch modules holding ``Full()`` leaves, in tree order: ``modules_to_save``."""
    out: list[str] = []
    for path, node in leaves_with_paths(adapted):
        if isinstance(node, FullNode) and namer(parent(path)) not in out:
            out.append(namer(parent(path)))
    return out


def _put_whole_modules(adapted, namer, modules, to_save, put, adapter: str) -> None:
    """Write the ``modules_to_save`` modules whole; none of them may also be adapted."""
    both = sorted(set(modules) & set(to_save))
    if both:
        raise ValueError(f"jlora.peft.save: module {both[0]!r} has {adapter} adapter and a "
                         "Full() leaf; PEFT cannot adapt a module and also save it whole "
                         "(modules_to_save)")
    _put_saved_modules(adapted, namer, to_save, put)


def _target_names(modules, all_modules):
    """``target_modules`` naming exactly ``modules``: their names, or, when a name would
    also suffix-match another module of the model, a regex of the exact names (PEFT
    fullmatches a string)."""
    target = sorted(modules)
    if any(_selects(target, m) for m in all_modules if m not in modules):
        return "|".join(re.escape(m) for m in target)
    return target


def _config_tail(fan_in_fan_out: bool, to_save: list, base_model_name_or_path, task_type) -> dict:
    """The ``adapter_config.json`` entries a LoRA and an AdaLoRA file share."""
    return {
        "bias": "none",
        "lora_bias": False,
        # PEFT applies fan_in_fan_out to its Conv1D-style layers (GPT-2) and turns it
        # off for nn.Linear ones, so one flag describes a mixed model.
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def _module_nodes_as_lora(adapted: Any) -> Any:
    """``adapted`` with each module-level adapter in LoRA's form written as the LoRA it is.

    ``MeFT`` reading the module input, at every position, with a linear activation,
    no ``c`` and a ``Dense`` module is ``y = x·K + s·(drop(x)·D)·U``: PEFT's LoRA with
    ``lora_A = Dᵀ``, ``lora_B = Uᵀ``, ``r`` and ``lora_alpha`` as configured, exactly,
    dropout included. Any other module-level adapter is a ``ValueError`` naming it.
    """
    from jlora.methods.reft import MeFTNode
    from jlora.tree import module_nodes, without_module_nodes

    found = module_nodes(adapted)
    if not found:
        return adapted
    kernels = {}
    for npath, node in sorted(found.items()):
        why = (node._why_not() if isinstance(node, MeFTNode) else
               ["it is a module-level adapter (it acts on a module's call, not on a weight)"])
        if isinstance(node, MeFTNode):
            if node.config.read != "input":
                why.append("it reads the module's output (ReFT's form), not its input")
            if node.c is not None:
                why.append("its bias c has no place in a PEFT LoRA")
        if why:
            raise ValueError(f"jlora.peft.save: {npath}: {node.method} has no PEFT LoRA "
                             f"layout: {'; '.join(why)}")
        kernels[f"{node.path}/kernel" if node.path else "kernel"] = node
    leaves = dict(leaves_with_paths(adapted))

    def as_lora(path, leaf):
        node = kernels.get(path)
        if node is None:
            return leaf
        if is_node(leaf):
            raise ValueError(f"jlora.peft.save: {path} carries a {leaf.method} adapter and its "
                             f"module a MeFT one; a PEFT LoRA holds one adapter per module")
        cfg = node.config
        lora = LoRA(rank=cfg.rank, alpha=cfg.rank if cfg.alpha is None else cfg.alpha,
                    dropout=cfg.dropout, in_axes=(0,))
        return lora.build(jax.random.key(0), leaf, path=path).replace(a=node.down, b=node.up)

    missing = sorted(p for p in kernels if p not in leaves)
    if missing:
        raise ValueError(f"jlora.peft.save: {missing[0]}: no such kernel for the MeFT adapter "
                         "of its module")
    return map_with_paths(as_lora, without_module_nodes(adapted))


def save(directory: str, adapted: Any, *, name_map: NameMap = None,
         base_model_name_or_path: str | None = None, task_type: str | None = None,
         adapter_name: str = "default", parameter_order=None) -> None:
    """Write ``adapted``'s adapters as a PEFT LoRA (or AdaLoRA) adapter directory.

    ``MeFT`` in LoRA's form (reading a ``Dense`` module's input at every position,
    linear, no ``c``) is written as the LoRA it is on that module's kernel
    (``lora_A = Dᵀ``, ``lora_B = Uᵀ``; it loads back as a ``LoRA`` node); other
    module-level adapters have no PEFT LoRA layout and are refused.

    ``Full()`` leaves go to ``modules_to_save``. PEFT wraps every module whose
    name ends with such an entry (a bare suffix: ``classifier`` also wraps
    ``pre_classifier``) and needs all its tensors, so every leaf of a wrapped
    module is written, the ones without ``Full()`` with their base values
    (exact: PEFT's wrapper starts as a copy of the module); a wrapped leaf
    with another adapter is refused. Each tensor is written in its own
    floating dtype (float16, bfloat16, float32, float64). One adapter directory holds one
    ``use_rslora`` / ``use_dora`` / ``lora_dropout`` setting (PEFT's config is
    global), so mixing them in one tree is an error. An adapter named other
    than ``"default"`` is written to ``<directory>/<adapter_name>/``, as PEFT
    does. The written config is checked against PEFT's matching rules: every
    adapted module gets exactly its rank and alpha and no other module is
    targeted, or the save is refused.

    Stacked kernels (``expert_axis=0``: a mixture-of-experts layer's ``(E, in,
    out)`` expert weights) are written as PEFT ``target_parameters`` adapters
    (``lora.ParamWrapper``) on the PyTorch parameter ``<module>.<leaf name>``.
    Several of them on one module nest in PyTorch's parameter registration
    order, which the Flax tree does not record: ``parameter_order`` lists the
    parameter names in that order (e.g. ``["gate_up_proj", "down_proj"]``);
    names it leaves out follow, sorted, with a warning where two or more are
    left out on one module.

    A tree of AdaLoRA adapters (``AdaLoRA`` on Linear-style or Conv kernels, with
    ``Full()`` leaves as ``modules_to_save``) is written as a PEFT ``ADALORA`` adapter;
    mixing AdaLoRA with another adapter kind in one tree is an error. All its AdaLoRA
    nodes share one ``init_rank``, ``target_rank``, ``alpha`` and ``dropout``
    (``init_r``, ``target_r``, ``lora_alpha = alpha · (init_r + 1e-5) / init_r``, see the
    module docstring, and ``lora_dropout``). The tensors are written full size with no
    ``rank_pattern``: a triplet the allocator pruned is one with ``λ = 0``, which PEFT
    loads to the same outputs, and its ``p``, ``q`` (which keep training, so the triplet
    can come back) are kept. The file carries
    the adapters, not the allocator's schedule: ``tinit``, ``tfinal``, ``deltaT``,
    ``beta1``, ``beta2``, ``orth_reg_weight`` get PEFT's defaults and ``total_step`` 1,
    values that let PEFT build its config; set them in PEFT before training there.
    """
    require_whole(adapted, "jlora.peft.save")
    adapted = _module_nodes_as_lora(adapted)
    out = _adapter_folder(directory, adapter_name)
    namer = _module_namer(name_map)
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}  # torch tensor name -> Flax path
    modules: dict[str, dict] = {}
    tokens: dict[str, tuple[str, Any]] = {}  # module -> (path, TrainableTokensNode)
    all_modules = _torch_modules(adapted, name_map, "jlora.peft.save")
    stacked: dict[str, Any] = {}  # Flax path -> stacked node (target_parameters)

    def put(name, value, path):
        if name in owner:
            raise ValueError(f"jlora.peft.save: Flax paths {owner[name]} and {path} both map to "
                             f"the PyTorch tensor {name!r} (check name_map)")
        owner[name] = path
        tensors[name] = _file_tensor(value)
        if not np.isfinite(tensors[name].astype(np.float64)).all():
            raise ValueError(f"jlora.peft.save: {path} holds NaN or infinite values (for "
                             f"{name!r}); refusing to write a corrupt adapter")

    to_save = _full_modules(adapted, namer)  # written whole, with the rest of each module
    if any(isinstance(n, AdaLoRANode) for _, n in leaves_with_paths(adapted)):
        return _save_adalora(out, adapted, namer, all_modules, to_save, put, tensors,
                             base_model_name_or_path=base_model_name_or_path,
                             task_type=task_type)
    for path, node in leaves_with_paths(adapted):
        if not is_node(node) or isinstance(node, FullNode):
            continue
        module = namer(parent(path))
        key = PREFIX + module
        if isinstance(node, TrainableTokensNode):
            _check_token_export(path, node, adapted)
            tokens[module] = (path, node)
            continue
        if is_stacked(node):
            stacked[path] = node
            continue
        if not isinstance(node, (LoRANode, DoRANode, QLoRANode)):  # QLoRA: its delta alone
            raise ValueError(f"{path}: {node.method} adapters have no PEFT LoRA layout; "
                             "jlora.compose.to_lora(tree, rank=k) converts them to a LoRA "
                             "(truncated SVD of each delta, exact when k reaches the "
                             "delta's rank) that jlora.peft.save writes")
        kind = _kind(path, node)
        a, b, rank, alpha = _export_factors(path, node)
        if kind == "embedding":
            put(f"{key}.lora_embedding_A", a.T, path)
            put(f"{key}.lora_embedding_B", b.T, path)
        elif kind in ("linear", "linear_t"):
            put(f"{key}.lora_A.weight", a.T, path)
            put(f"{key}.lora_B.weight", b.T, path)
        else:
            put(f"{key}.lora_A.weight", _conv_lora_a(a, node.shape, rank), path)
            put(f"{key}.lora_B.weight", b.T.reshape(-1, rank, 1, 1), path)
        if isinstance(node, DoRANode):
            if kind not in ("linear", "linear_t"):
                raise ValueError(f"{path}: jlora exports DoRA for Linear layers only")
            put(f"{key}.lora_magnitude_vector", np.asarray(node.m), path)
        modules[module] = {"r": rank, "alpha": alpha, "rslora": node.config.rslora,
                           "dora": isinstance(node, DoRANode), "dropout": node.config.dropout,
                           "path": path, "transposed": kind == "linear_t"}
    experts = _save_experts(stacked, namer, parameter_order, put) if stacked else {}
    if not modules and not experts and tokens and not to_save:
        _check_token_names(tokens, all_modules, standalone=True)
        return _save_tokens_only(out, tokens, put, tensors, base_model_name_or_path, task_type)
    if not modules and not experts and tokens:
        raise ValueError("jlora.peft.save: the tree holds trainable tokens and Full() leaves "
                         f"({sorted(to_save)}) but no LoRA/DoRA adapter: PEFT's standalone "
                         "TRAINABLE_TOKENS format has no modules_to_save, so trainable tokens "
                         "with Full() need at least one LoRA leaf (a LoRA adapter carries both)")
    if not modules and not experts:
        raise ValueError("jlora.peft.save: the tree holds no LoRA/DoRA adapter")
    _put_whole_modules(adapted, namer, modules, to_save, put, "a LoRA")
    every = {**modules, **experts}
    for flag, name in (("rslora", "use_rslora"), ("dora", "use_dora"),
                       ("dropout", "lora_dropout")):
        _one_setting(name, [m[flag] for m in every.values()])
    if experts and any(m["transposed"] or m["dora"] for m in modules.values()):
        raise ValueError("jlora.peft.save: PEFT's target_parameters adapters (stacked kernels) "
                         "cannot share an adapter with fan_in_fan_out or DoRA modules: save "
                         "them as separate adapters")
    r = _most_common(m["r"] for m in every.values())
    alpha = _most_common(m["alpha"] for m in every.values())
    first = next(iter(every.values()))
    target = _target_names(modules, all_modules)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": first["rslora"],
        "use_dora": first["dora"],
        "target_modules": target,
        "rank_pattern": {re.escape(k): m["r"] for k, m in every.items() if m["r"] != r},
        "alpha_pattern": {re.escape(k): m["alpha"] for k, m in every.items()
                          if m["alpha"] != alpha},
        "lora_dropout": first["dropout"],
        **_config_tail(any(m["transposed"] for m in modules.values()), to_save,
                       base_model_name_or_path, task_type),
    }
    if experts:
        config["target_parameters"] = sorted(experts)
        _check_expert_config(config, experts, adapted, name_map)
    _check_token_names(tokens, all_modules, standalone=False)
    _put_token_rows(config, tokens, put)
    config["init_lora_weights"] = _saved_init(adapted, config["init_lora_weights"])
    for module in all_modules:  # what PEFT will do with this config, module by module
        if _targeted(config, module) != (module in modules) or (
                module in modules and _rank_alpha(config, module) != (modules[module]["r"],
                                                                      modules[module]["alpha"])):
            raise ValueError(f"jlora.peft.save: PEFT's name matching cannot give module "
                             f"{module!r} exactly its adapter (rank_pattern/alpha_pattern keys "
                             "match by suffix); rename modules with name_map")
    _write_adapter(out, tensors, config)


def _file_tensor(value) -> np.ndarray:
    """``value`` as a contiguous array in its own floating dtype (safetensors F16, BF16, F32,
    F64, all of which PEFT reads); any other dtype as float32."""
    x = np.asarray(value)
    if x.dtype not in (np.float16, np.float32, np.float64, jnp.dtype(jnp.bfloat16)):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def _put_saved_modules(adapted: Any, namer, to_save: list, put) -> None:
    """Write every leaf of every module PEFT's ``modules_to_save`` wraps.

    PEFT wraps each module whose name ends with an entry (a bare suffix: the
    entry ``classifier`` also wraps ``pre_classifier``) together with the
    modules inside it, and its loader needs every parameter of each wrapped
    module. ``Full()`` leaves are written with their values; the other leaves
    of those modules with their base values, which is exact since PEFT's
    wrapper starts as a copy of the module. A wrapped leaf with another
    adapter is refused.
    """
    for entry in to_save:
        try:
            re.compile(rf"(^|.*\.){entry}($|\..*)")
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"jlora.peft.save: PEFT matches the modules_to_save entry "
                             f"{entry!r} (a Full() module's name) as a regular expression, "
                             f"and it is not one ({e}); rename it with name_map") from None
    for path, node in leaves_with_paths(adapted):
        try:
            module = namer(parent(path))
        except ValueError:
            continue
        if not _saved_whole(to_save, module):
            continue
        if is_node(node) and not isinstance(node, FullNode):
            raise ValueError(f"jlora.peft.save: {path} has a {node.method} adapter, but PEFT "
                             f"saves its module {module!r} whole (modules_to_save entries "
                             f"{to_save} match module names by bare suffix); rename modules "
                             "with name_map")
        value = node.value if is_node(node) else node
        suffix, value = _torch_full(path, np.asarray(value))
        put(f"{PREFIX}{module}.{suffix}", value, path)


def _saved_init(adapted: Any, default):
    """``"mica"`` when every LoRA adapter of the tree is ``LoRA(init="mica")``: PEFT then
    keeps ``lora_B`` frozen when it loads the file for training (``MiCALinearVariant``)."""
    inits = {n.config.init for _, n in leaves_with_paths(adapted) if type(n) is LoRANode}
    return "mica" if inits == {"mica"} else default


def _write_adapter(out: str, tensors: dict[str, np.ndarray], config: dict) -> None:
    """Write ``tensors`` and ``config`` as the adapter directory ``out``, both files at once."""
    from safetensors.numpy import save_file

    _write_atomically(out, {
        WEIGHTS_FILE: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
        CONFIG_FILE: lambda p: _write_json(p, config),
    })


def _write_json(path: str, config: dict) -> None:
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _adapter_folder(directory, adapter_name) -> str:
    try:
        directory = os.fspath(directory)
    except TypeError:
        raise ValueError(f"jlora.peft: directory must be a path, got {directory!r}") from None
    if (not isinstance(adapter_name, str) or not adapter_name or adapter_name in (".", "..")
            or "/" in adapter_name or os.sep in adapter_name):
        raise ValueError(f"jlora.peft: adapter_name must be a plain folder name, got {adapter_name!r}")
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


# ---------------------------------------------------------------- load


def _no_duplicates(where: str):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"{where}: key {k!r} appears twice")
            seen[k] = v
        return seen
    return hook


def _refuse_constant(where: str):
    def hook(name):
        raise ValueError(f"{where}: {name} is not a JSON value")
    return hook


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where),
                          parse_constant=_refuse_constant(where))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (not a PEFT adapter directory?)") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def _is_default(key, value) -> bool:
    if key in _NON_EMPTY_DEFAULTS and value == _NON_EMPTY_DEFAULTS[key]:
        return True
    return value is None or value is False or value == {} or value == [] or value == ""


def _bad(path, key, what, value):
    raise ValueError(f"{path}: key {key!r} must be {what}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_regex(path, key, pattern):
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{path}: key {key!r} holds {pattern!r}, not a regular expression "
                         f"({e})") from None


def _check_known_keys(path: str, config: dict, read: set) -> None:
    """Informational keys hold their JSON types; a key outside ``read`` sits at its default."""
    for key, value in config.items():
        if key in _INFO:
            if not isinstance(value, _INFO[key]) or isinstance(value, bool) and bool not in _INFO[key]:
                _bad(path, key, " or ".join(t.__name__ for t in _INFO[key]), value)
        elif key not in read and not _is_default(key, value):
            raise ValueError(f"{path}: key {key!r} is set to {value!r}, which jlora does not "
                             "implement; refusing to load rather than ignore it")


def _check_no_bias(path: str, config: dict) -> None:
    if type(config.get("fan_in_fan_out", False)) is not bool:
        _bad(path, "fan_in_fan_out", "true or false", config["fan_in_fan_out"])
    for key, ok in {"lora_bias": False, "bias": "none"}.items():
        if config.get(key, ok) != ok or type(config.get(key, ok)) is not type(ok):
            raise ValueError(f"{path}: key {key!r} = {config[key]!r} is not supported "
                             f"(only {ok!r})")


def _check_dropout(path: str, config: dict) -> None:
    dropout = config.get("lora_dropout", 0.0)
    if not _is_real(dropout) or not 0 <= dropout < 1:
        _bad(path, "lora_dropout", "a number in [0, 1)", dropout)


def _check_module_keys(path: str, config: dict) -> None:
    """``target_modules``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``
    and ``layers_pattern`` hold what PEFT accepts."""
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(key)
        if isinstance(value, str) and key != "modules_to_save":
            _check_regex(path, key, value)
        elif value is not None and not (isinstance(value, list) and all(
                isinstance(t, str) and t for t in value)):
            _bad(path, key, "a list of module names" + ("" if key == "modules_to_save"
                                                       else ", a regular expression"), value)
        elif key == "modules_to_save":  # PEFT puts each entry into a regex
            for entry in value or []:
                try:
                    re.compile(rf"(^|.*\.){entry}($|\..*)")
                except (re.error, RecursionError, OverflowError) as e:
                    raise ValueError(f"{path}: key 'modules_to_save' entry {entry!r} is not a "
                                     f"regular expression, which PEFT matches it as ({e})") from None
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is not None and not (_is_int(layers) and layers >= 0 or isinstance(layers, list)
                                   and all(_is_int(i) and i >= 0 for i in layers)):
        _bad(path, "layers_to_transform", "a layer index or a list of them", layers)
    if pattern is not None and not (isinstance(pattern, str) or isinstance(pattern, list)
                                    and all(isinstance(p, str) for p in pattern)):
        _bad(path, "layers_pattern", "a name or a list of names", pattern)
    for entry in [pattern] if isinstance(pattern, str) else pattern or []:
        _check_regex(path, "layers_pattern", entry)
    if layers is not None and isinstance(config.get("target_modules"), str):
        raise ValueError(f"{path}: key 'layers_to_transform' is set with a regular expression "
                         "for 'target_modules', which PEFT refuses")


def _read_config(path: str) -> dict:
    config = _parse_json(_read_bytes(path), path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: adapter config is not a JSON object")
    if config.get("peft_type") == "ADALORA":
        return _read_adalora_config(path, config)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: key 'peft_type' is {config.get('peft_type')!r}; jlora loads "
                         "'LORA', 'ADALORA' and 'TRAINABLE_TOKENS' adapters")
    _check_known_keys(path, config, _READ)
    _check_no_bias(path, config)
    config.setdefault("r", 8)  # LoraConfig's default rank
    if not _is_int(config["r"]) or config["r"] < 1:
        _bad(path, "r", "an int >= 1", config["r"])
    if not _is_real(config.get("lora_alpha", 8)) or config.get("lora_alpha", 8) <= 0:
        _bad(path, "lora_alpha", "a finite number > 0", config.get("lora_alpha"))
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            _bad(path, key, "true or false", config[key])
    _check_dropout(path, config)
    for key, ok, what in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "int >= 1"),
                          ("alpha_pattern", lambda v: _is_real(v) and v > 0, "number > 0")):
        patterns = config.get(key, {})
        if not isinstance(patterns, dict):
            _bad(path, key, "an object of pattern: value", patterns)
        for k, v in patterns.items():
            _check_regex(path, f"{key}.{k}", k)
            if not ok(v):
                _bad(path, f"{key}.{k}", f"an {what}" if what[0] == "i" else f"a {what}", v)
    _check_module_keys(path, config)
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS or type(init) not in (bool, str):
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(
                f"{path}: key 'init_lora_weights' is {init!r}: that initialisation replaces the "
                "base weights, so these tensors apply to a modified base, not to params. "
                "Convert the adapter to plain LoRA in PEFT (save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...)) and load that instead")
        _bad(path, "init_lora_weights", f"one of {list(_PLAIN_INITS)}", init)
    return config


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A strict safetensors reader: every error a ValueError naming the file and key."""
    data = _read_bytes(path)
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{path}: header of {n} bytes does not fit in the file of "
                         f"{len(data)} bytes (truncated?)")
    header = _parse_json(data[8:8 + n], f"{path} (header)")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: '__metadata__' must map names to strings, got {meta!r}")
    body = len(data) - 8 - n
    spans, out = [], {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor {key!r} entry must hold exactly dtype, shape and "
                             f"data_offsets, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {key!r} has a malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise ValueError(f"{path}: tensor {key!r} has data_offsets {offsets!r} outside the "
                             f"{body} data bytes (truncated?)")
        size = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != size:
            raise ValueError(f"{path}: tensor {key!r} of {dtype}{shape} needs {size} bytes, its "
                             f"data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
        if _DTYPES[dtype].kind not in "fV":
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}; LoRA tensors are "
                             "floating point")
        out[key] = np.frombuffer(data, _DTYPES[dtype], math.prod(shape),
                                 8 + n + offsets[0]).reshape(shape)
        if not np.isfinite(out[key].astype(np.float64)).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise ValueError(f"{path}: tensor {key!r} data does not follow the previous tensor's "
                             f"(offset {begin}, expected {end}): overlapping or with gaps")
        end = stop
    if end != body:
        raise ValueError(f"{path}: {body - end} bytes after the last tensor's data")
    if not out:
        raise ValueError(f"{path}: holds no tensors")
    return out


def load(directory: str, params: Any, *, name_map: NameMap = None,
         adapter_name: str = "default", in_axes: dict | None = None,
         parameter_order=None) -> Any:
    """Read a PEFT LoRA (or AdaLoRA) adapter directory into an adapted tree over ``params``.

    Honours ``r``/``lora_alpha`` with ``rank_pattern``/``alpha_pattern``,
    ``use_rslora``, ``use_dora``, ``fan_in_fan_out``, ``target_modules`` (with
    ``layers_to_transform``/``layers_pattern``), ``exclude_modules`` and
    ``modules_to_save``, with PEFT's defaults (``r`` 8,
    ``lora_alpha`` 8) for keys the config leaves out. ``params`` is not modified;
    the returned tree is complete or a ``ValueError`` names the file and key at
    fault.

    ``modules_to_save`` is matched as PEFT does: each module whose name ends
    with an entry (no dot needed) comes back whole, as ``Full()`` leaves, with
    the modules inside it; an entry that matches no module is allowed (PEFT's
    sequence-classification adapters always list ``classifier`` and
    ``score``). Every ``target_modules`` entry must match a module.

    Factors keep the file's dtype; the config's ``dtype`` records it where it
    is not the default for the base (float32, or the base dtype if wider).

    Orientation of a 2-D kernel: PEFT's ``lora_A`` is ``(r, in)`` and ``lora_B``
    ``(out, r)``, so a non-square kernel of shape ``(in, out)`` gets
    ``in_axes=(0,)`` and one of shape ``(out, in)`` (Hugging Face Flax GPT-2's
    ``FlaxConv1D``) ``in_axes=(1,)``. A square kernel follows ``in_axes``
    (``{kernel path: (0,) or (1,)}``, e.g. read off the configs of a
    ``jlora.linen.resolve``-d spec) when given, else the file's
    ``fan_in_fan_out`` (true: the Flax port of a ``Conv1D`` model, stored
    ``(out, in)``).

    ``target_parameters`` adapters (PEFT's LoRA on raw 3-D parameters, e.g.
    stacked MoE experts) become stacked LoRA nodes (``expert_axis=0``) on the
    leaf ``<module path>/<parameter name>``: ``(E, in, out)`` kernels get
    ``in_axes=(1,)``, ``(E, out, in)`` ones ``(2,)`` (a square one: ``in_axes``
    given for its path, else ``(1,)``). Wrappers nested on one module are
    matched in ``parameter_order`` (see :func:`save`); without it, in the order the
    tensors' shapes fit. Where more than one fits (an expert MLP's ``(E, D, F)`` and
    ``(E, F, D)`` projections on one module), it warns and takes the names' sorted
    order if that fits: pass ``parameter_order`` unless that is the module's order.

    ``peft_type: "ADALORA"`` adapters become AdaLoRA nodes with ``init_rank = init_r``,
    ``target_rank = target_r``, ``dropout = lora_dropout`` and
    ``alpha = lora_alpha · init_r / (init_r + 1e-5)``: PEFT's ``SVDLinear`` divides by
    ``ranknum + 1e-5``, so this ``alpha`` gives exactly PEFT's outputs (see the module
    docstring for the layout). A ``rank_pattern`` (``{"<module>.lora_E": [kept, ...]}``)
    means the file holds only the kept triplets: they go to their positions and the
    others get ``λ = 0`` and zeros in ``p``, ``q``.
    ``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``fan_in_fan_out``
    and ``modules_to_save`` work as for LoRA. The schedule keys (``tinit``, ``tfinal``,
    ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``, ``total_step``) are checked
    as PEFT checks them and not used (jlora's allocator takes its schedule from
    ``jlora.optim.adalora``); ``use_rslora``, an ``alpha_pattern`` and the other keys
    PEFT's AdaLoRA ignores or jlora lacks are refused.
    """
    given = {} if in_axes is None else in_axes
    if not isinstance(given, dict) or any(
            not isinstance(k, str) or not isinstance(v, (tuple, list))
            or tuple(v) not in ((0,), (1,), (2,)) for k, v in given.items()):
        raise ValueError(f"jlora.peft.load: in_axes must map kernel paths to (0,) or (1,) "
                         f"(or (2,) for a stacked (E, out, in) kernel), "
                         f"got {in_axes!r}")
    folder = _adapter_folder(directory, adapter_name)
    by_module = _torch_modules(params, name_map, "jlora.peft.load")
    cfg_path = os.path.join(folder, CONFIG_FILE)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if _is_tokens_only(cfg_path):
        return _load_tokens_only(cfg_path, weights_path, params, by_module)
    config = _read_config(cfg_path)
    if config["peft_type"] == "ADALORA":
        return _load_adalora(config, cfg_path, weights_path, params, by_module, given)
    tensors = _read_safetensors(weights_path)
    tensors, token_rows = _token_tensors(tensors)

    leaves = _plain_leaves(params)
    nodes: dict[str, Any] = _load_experts(config, cfg_path, weights_path, tensors, leaves,
                                          name_map, given, parameter_order)
    grouped = _group_tensors(config, weights_path, tensors, by_module, _SUFFIXES,
                             f"a LoRA tensor name jlora knows ({PREFIX}<module>.lora_A.weight, "
                             "...)")
    namer = _module_namer(name_map)
    _check_targets(config, cfg_path, weights_path, by_module, leaves, grouped,
                   [f"{namer(parent(p))}.{p.rsplit('/', 1)[-1]}" for p in nodes])
    nodes.update(_module_nodes(
        grouped, by_module, leaves, weights_path,
        lambda module, parts, join, key: _lora_node(config, module, parts, join, leaves,
                                                    weights_path, key, given)))
    nodes.update(_token_nodes(config.get("trainable_token_indices"), token_rows, by_module,
                              leaves, cfg_path, weights_path, nodes))
    return map_with_paths(lambda p, x: nodes.get(p, x), params)


def _joiner(mpath: str) -> Callable[[str], str]:
    """The path of a leaf of the Flax module ``mpath`` (``""``: the root of the tree)."""
    return lambda leaf: f"{mpath}/{leaf}" if mpath else leaf


def _plain_leaves(params: Any) -> dict[str, Any]:
    """``params``' leaves by path, none of them adapted, or a ``ValueError``."""
    leaves = dict(leaves_with_paths(params))
    for p, x in leaves.items():
        if is_node(x):
            raise ValueError(f"jlora.peft.load: {p} is already adapted; pass plain params")
    return leaves


def _group_tensors(config, weights_path, tensors, by_module, suffixes,
                   known: str) -> dict[str, dict[str, np.ndarray]]:
    """The file's tensors as ``{module: {suffix: tensor}}``, each named
    ``<PREFIX><module>.<suffix>`` with a suffix of ``suffixes`` (else a ``ValueError``
    saying it is not ``known``) and placed as the config says
    (:func:`_check_tensor_module`)."""
    name = re.compile(r"(.+?)\.(" + "|".join(map(re.escape, suffixes)) + ")")
    grouped: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        m = name.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if m is None or re.search(r"(^|\.)lora_", m.group(1)):
            raise ValueError(f"{weights_path}: tensor {key!r} is not {known}")
        module, suffix = m.groups()
        if suffix == "lora_B.bias":  # a LoRA file's lora_bias: named, but not implemented
            raise ValueError(f"{weights_path}: tensor {key!r} is a lora_bias, which jlora "
                             "does not implement")
        _check_tensor_module(config, weights_path, key, module, suffix in ("weight", "bias"),
                             by_module)
        grouped[module][suffix] = value
    return grouped


def _module_nodes(grouped, by_module, leaves, weights_path, adapter_node) -> dict[str, Any]:
    """The nodes of the file's modules by path: ``adapter_node(module, parts, join, key)``
    for a module with adapter (``lora_*``) tensors, ``Full()`` leaves for a module
    ``modules_to_save`` saved whole."""
    nodes = {}
    for module, parts in grouped.items():
        join, key = _joiner(by_module[module]), PREFIX + module
        if any(s.startswith("lora_") for s in parts):
            nodes.update(adapter_node(module, parts, join, key))
        else:
            nodes.update(_full_nodes(parts, join, leaves, weights_path, key))
    return nodes


def _check_tensor_module(config, weights_path, key, module, whole, by_module) -> None:
    """Tensor ``key`` of ``module`` (a whole-module ``weight``/``bias`` when ``whole``, else
    an adapter factor) belongs where the config puts it, or a ``ValueError``."""
    if module not in by_module:
        raise ValueError(f"{weights_path}: tensor {key!r} targets module {module!r}, which "
                         "params do not have (check name_map)")
    saved = _saved_whole(config.get("modules_to_save"), module)
    if whole and not saved:
        raise ValueError(f"{weights_path}: unexpected tensor {key!r}: module {module!r} is "
                         f"not in (or inside) a module {CONFIG_FILE}'s modules_to_save "
                         "selects")
    if not whole and saved:
        raise ValueError(f"{weights_path}: tensor {key!r} puts LoRA on module {module!r}, "
                         f"which {CONFIG_FILE}'s modules_to_save also wraps (PEFT matches "
                         "its entries by bare name suffix); jlora adapts a module one way")
    if not whole and config.get("target_modules") is not None and not _targeted(config, module):
        raise ValueError(f"{weights_path}: unexpected tensor {key!r}: {CONFIG_FILE}'s "
                         f"target_modules does not select module {module!r}")


def _check_targets(config, cfg_path, weights_path, by_module, leaves, grouped,
                   parameters=()) -> None:
    """Every module the config selects has its tensors; every ``target_modules`` entry
    selects a module. ``modules_to_save`` entries may match nothing, as in PEFT (whose
    sequence-classification adapters always list both ``classifier`` and ``score``)."""
    _check_target_entries(config, cfg_path, by_module)
    adapted = [m for m, parts in grouped.items() if any(s.startswith("lora_") for s in parts)]
    adapted += parameters  # target_parameters: their patterns match parameter names
    for key in ("rank_pattern", "alpha_pattern"):
        for k in config.get(key) or {}:
            if not any(_pattern_hit(k, m) for m in adapted):
                raise ValueError(f"{cfg_path}: key '{key}.{k}' matches no adapted module "
                                 f"(adapted: {sorted(adapted)[:5]})")
    _check_selected(config, weights_path, by_module, leaves, grouped,
                    lambda join: _lora_needs(config, leaves, join))


def _lora_needs(config, leaves, join) -> list[str] | None:
    """The LoRA tensors of the module whose leaves ``join`` names (``None``: it has no
    ``kernel`` or ``embedding`` for LoRA to adapt)."""
    embedding = join("embedding") in leaves
    if not embedding and join("kernel") not in leaves:
        return None
    needed = (["lora_embedding_A", "lora_embedding_B"] if embedding
              else ["lora_A.weight", "lora_B.weight"])
    if config.get("use_dora") and not embedding:
        needed.append("lora_magnitude_vector")
    return needed


def _check_selected(config, weights_path, by_module, leaves, grouped, needed_for) -> None:
    """Every module of ``params`` that ``target_modules`` selects has each tensor
    ``needed_for(join)`` names (``join``: the module's leaf paths; ``None``: none needed),
    and every module ``modules_to_save`` wraps a tensor for each of its leaves. With no
    ``target_modules`` or ``"all-linear"`` the tensors say which modules are adapted."""
    target = config.get("target_modules")
    for module, mpath in by_module.items():
        if _saved_whole(config.get("modules_to_save"), module):
            _check_saved_tensors(weights_path, module, mpath, leaves, grouped)
            continue
        if target is None or target == "all-linear" or not _targeted(config, module):
            continue
        for suffix in needed_for(_joiner(mpath)) or ():
            if suffix not in grouped.get(module, {}):
                raise ValueError(f"{weights_path}: missing tensor {PREFIX}{module}.{suffix} of "
                                 f"module {module!r} (selected by target_modules)")


def _check_target_entries(config, cfg_path, by_module) -> None:
    """Every ``target_modules`` entry (or its regex) selects a module of ``params``."""
    rule = config.get("target_modules")
    if isinstance(rule, list):
        for entry in rule:
            if not any(_selects([entry], m) for m in by_module):
                raise ValueError(f"{cfg_path}: key 'target_modules' entry {entry!r} matches no "
                                 "module of params (check name_map)")
    elif isinstance(rule, str) and rule != "all-linear" and not any(
            _selects(rule, m) for m in by_module):
        raise ValueError(f"{cfg_path}: key 'target_modules' = {rule!r} matches no module of "
                         "params")


def _check_saved_tensors(weights_path, module, mpath, leaves, grouped) -> None:
    """A module PEFT's ``modules_to_save`` wraps has a tensor for each of its leaves."""
    for p in leaves:
        if parent(p) == mpath:
            suffix = "bias" if p.endswith("bias") else "weight"
            if suffix not in grouped.get(module, {}):
                raise ValueError(f"{weights_path}: missing tensor {PREFIX}{module}.{suffix} "
                                 f"of module {module!r} (PEFT's modules_to_save wraps it)")


def _full_nodes(parts, join, leaves, weights_path, key) -> dict:
    nodes = {}
    for suffix, value in parts.items():
        for leaf in (("kernel", "embedding", "scale") if suffix == "weight" else ("bias",)):
            if join(leaf) in leaves:
                break
        else:
            raise ValueError(f"{weights_path}: {key}.{suffix} has no matching leaf "
                             f"{join('kernel')!r} or the like in params")
        target = leaves[join(leaf)]
        value = value.T if leaf == "kernel" and value.ndim == 2 else value
        value = value.transpose(2, 3, 1, 0) if leaf == "kernel" and value.ndim == 4 else value
        if tuple(value.shape) != tuple(np.shape(target)):
            raise ValueError(f"{weights_path}: {key}.{suffix} has shape {value.shape}, "
                             f"the leaf {join(leaf)} has {np.shape(target)}")
        nodes[join(leaf)] = FullNode(value=jnp.asarray(value, jnp.asarray(target).dtype),
                                     config=Full(), shape=tuple(value.shape),
                                     in_axes=tuple(range(value.ndim - 1)))
    return nodes


def _linear_in_axes(path, shape, r, a_t, b_t, config, given) -> tuple[int, ...]:
    """``(0,)`` for an ``(in, out)`` kernel, ``(1,)`` for ``(out, in)``; see :func:`load`."""
    if path in given:
        return tuple(given[path])
    rows, cols = shape
    if rows != cols:
        flipped = (tuple(a_t.shape), tuple(b_t.shape)) == ((r, cols), (rows, r))
        return (1,) if flipped else (0,)
    return (1,) if config.get("fan_in_fan_out") else (0,)


def _loaded_dtype(base_dtype, *file_dtypes):
    """The loaded factors' dtype, the file's (so a saved adapter comes back in its own
    precision), and the config's ``dtype`` for it: ``None`` where it is the default
    for ``base_dtype``."""
    dt = jax.dtypes.canonicalize_dtype(jnp.result_type(*file_dtypes))
    return dt, None if dt == factor_dtype(base_dtype, None) else dt


def _file_factors(path, base, r, a_t, b_t, config, given, where, names, what, *,
                  embedding=False, flat_conv=False):
    """``(a (fan_in, r), b (r, fan_out), in_axes)`` from PEFT's ``lora_A (r, in)`` and
    ``lora_B (out, r)`` for the leaf ``base``: a Linear (either orientation, see
    :func:`_linear_in_axes`), an Embedding, or a Conv2d, whose ``(r, in, kh, kw)`` /
    ``(out, r, 1, 1)`` tensors (``(r, in·kh·kw)`` / ``(out, r)`` with ``flat_conv``)
    become factors of the ``(kh, kw, in, out)`` kernel. Shapes are checked first."""
    if base.ndim == 4:  # conv (kh, kw, in, out)
        kh, kw, cin, cout = base.shape
        want = (((r, cin * kh * kw), (cout, r)) if flat_conv
                else ((r, cin, kh, kw), (cout, r, 1, 1)))
        in_axes = (0, 1, 2)
    elif base.ndim == 2:
        rows, cols = base.shape
        in_axes = (0,) if embedding else _linear_in_axes(path, (rows, cols), r, a_t, b_t,
                                                         config, given)
        if in_axes == (1,):
            rows, cols = cols, rows
        want = ((r, rows), (cols, r))
    else:
        raise ValueError(f"{where} adapts {path} of shape {base.shape}, which has no PEFT "
                         f"{what} layout")
    if (tuple(a_t.shape), tuple(b_t.shape)) != want:
        raise ValueError(f"{where}.{names[0]}/{names[1]} have shapes {tuple(a_t.shape)}/"
                         f"{tuple(b_t.shape)}, {path} of shape {base.shape} needs "
                         f"{want[0]}/{want[1]}")
    if base.ndim == 4:  # PyTorch's (in, kh, kw) columns -> jlora's (kh·kw·in) rows
        a = a_t.reshape(r, cin, kh, kw).transpose(2, 3, 1, 0).reshape(kh * kw * cin, r)
        return a, b_t.reshape(cout, r).T, in_axes
    return a_t.T, b_t.T, in_axes


def _module_base(parts, required, allowed, leaf, path, weights_path, key):
    """One module's tensors checked (every ``required`` one there, none outside
    ``allowed``); returns the floating base leaf they adapt."""
    for suffix in parts:
        if suffix not in allowed:
            raise ValueError(f"{weights_path}: unexpected tensor {key}.{suffix} beside "
                             f"{key}.{required[0]}")
    for suffix in required:
        if suffix not in parts:
            raise ValueError(f"{weights_path}: missing tensor {key}.{suffix}")
    base = jnp.asarray(leaf)
    if not jnp.issubdtype(base.dtype, jnp.floating):
        raise ValueError(f"{weights_path}: {key} adapts {path}, which has dtype {base.dtype}")
    return base


def _lora_node(config, module, parts, join, leaves, weights_path, key, given):
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    path = join("embedding" if embedding else "kernel")
    if path not in leaves:
        raise ValueError(f"{weights_path}: {key} has LoRA tensors but params have no {path}")
    base = _module_base(parts, names, (*names, "lora_magnitude_vector"), leaves[path], path,
                        weights_path, key)
    a_t, b_t = parts[names[0]], parts[names[1]]
    r_file = a_t.shape[0] if a_t.ndim else 0
    r_cfg, alpha = _rank_alpha(config, module)
    if r_file != r_cfg:
        raise ValueError(f"{weights_path}: {key} has rank {r_file} but "
                         f"{CONFIG_FILE} says r={r_cfg} for it")
    a, b, in_axes = _file_factors(path, base, r_file, a_t, b_t, config, given,
                                  f"{weights_path}: {key}", names, "LoRA", embedding=embedding)
    fan_out = b.shape[1]
    dt, cfg_dtype = _loaded_dtype(base.dtype, a_t.dtype, b_t.dtype)
    opts = dict(rank=r_file, alpha=alpha, rslora=config.get("use_rslora", False),
                dropout=float(config.get("lora_dropout", 0.0)), in_axes=in_axes,
                dtype=cfg_dtype)
    common = dict(base=base, a=jnp.asarray(a, dt), b=jnp.asarray(b, dt),
                  shape=tuple(base.shape), in_axes=in_axes)
    m = parts.get("lora_magnitude_vector")
    if config.get("use_dora"):
        if embedding or base.ndim != 2:
            raise ValueError(f"{weights_path}: {key}: jlora loads DoRA for Linear layers only")
        if m is None or tuple(m.shape) != (fan_out,):
            raise ValueError(f"{weights_path}: use_dora is set but {key}.lora_magnitude_vector "
                             f"is missing or not of shape ({fan_out},)")
        return {path: DoRANode(**common, m=jnp.asarray(m, dt), config=DoRA(**opts))}
    if m is not None:
        raise ValueError(f"{weights_path}: unexpected tensor {key}.lora_magnitude_vector: "
                         f"{CONFIG_FILE} has use_dora false")
    if str(config.get("init_lora_weights")).lower() == "mica":  # B stays frozen (MiCA)
        opts["init"] = "mica"
    return {path: LoRANode(**common, config=LoRA(**opts))}


# ---------------------------------------------------------------- AdaLoRA
# PEFT's ``ADALORA`` layout (``SVDLinear``/``SVDConv2d``): ``<module>.lora_A`` ``(r, in)``
# (a Conv2d's ``(r, in·kh·kw)``), ``<module>.lora_E`` ``(r, 1)``, ``<module>.lora_B``
# ``(out, r)``, and ``ΔW = B·(A ⊙ E)·lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` the
# initial rank ``init_r``, kept after a ``rank_pattern`` resize. So ``p = Aᵀ``, ``λ = E[:, 0]``,
# ``q = Bᵀ`` and jlora's ``alpha / r`` is PEFT's ``lora_alpha / (r + 1e-5)``. A
# ``rank_pattern`` (``{"<module>.lora_E": [kept, ...]}``, one bool per initial triplet) means
# the file's tensors hold only the kept triplets, in order.

_ADALORA_EPS = 1e-5  # PEFT's ``ranknum + 1e-5``
# Keys of PEFT's AdaLoraConfig schedule (training only) with their defaults and checks.
_ADALORA_SCHEDULE = {"tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                     "orth_reg_weight": 0.5, "total_step": 1}
_ADALORA_READ = {"peft_type", "init_r", "target_r", "lora_alpha", "r", "rank_pattern",
                 "target_modules", "exclude_modules", "lora_dropout", "bias", "lora_bias",
                 "fan_in_fan_out", "modules_to_save", "init_lora_weights",
                 "layers_to_transform", "layers_pattern", *_ADALORA_SCHEDULE}
_ADALORA_PARTS = ("lora_A", "lora_E", "lora_B")


def _adalora_file_alpha(alpha: float, r: int) -> float:
    """PEFT's ``lora_alpha`` for jlora's ``alpha``: ``alpha / r = lora_alpha / (r + 1e-5)``."""
    return alpha * ((r + _ADALORA_EPS) / r)


def _adalora_alpha(lora_alpha: float, r: int) -> float:
    """jlora's ``alpha`` for PEFT's ``lora_alpha``: ``lora_alpha · r/(r + 1e-5)``, to the last
    bit the float within 4 ulps of it that :func:`_adalora_file_alpha` writes as
    ``lora_alpha`` where there is one, so a saved adapter loads with its own ``alpha``."""
    x = lora_alpha * (r / (r + _ADALORA_EPS))
    near = [x]
    for direction in (math.inf, -math.inf):
        y = x
        for _ in range(4):
            y = math.nextafter(y, direction)
            near.append(y)
    return next((c for c in sorted(near, key=lambda c: abs(c - x))
                 if _adalora_file_alpha(c, r) == lora_alpha), x)


def _read_adalora_config(path: str, config: dict) -> dict:
    """An ``ADALORA`` config checked as :func:`load` reads it, PEFT's defaults filled in."""
    _check_known_keys(path, config, _ADALORA_READ)
    _check_no_bias(path, config)
    config.setdefault("init_r", 12)  # AdaLoraConfig's defaults
    config.setdefault("target_r", 8)
    init_r, target_r = config["init_r"], config["target_r"]
    if not _is_int(init_r) or init_r < 1:
        _bad(path, "init_r", "an int >= 1", init_r)
    if not _is_int(target_r) or not 0 <= target_r <= init_r:
        _bad(path, "target_r", f"an int in [0, init_r={init_r}] (jlora's AdaLoRA target_rank)",
             target_r)
    if not _is_int(config.get("r", 8)) or config.get("r", 8) < 0:  # PEFT's AdaLoRA ignores r
        _bad(path, "r", "an int >= 0", config["r"])
    if not _is_real(config.get("lora_alpha", 8)) or config.get("lora_alpha", 8) <= 0:
        _bad(path, "lora_alpha", "a finite number > 0", config.get("lora_alpha"))
    _check_dropout(path, config)
    if type(config.get("init_lora_weights", True)) is not bool:
        _bad(path, "init_lora_weights", "true or false", config["init_lora_weights"])
    for key in ("tinit", "tfinal", "deltaT", "total_step"):
        low = 1 if key in ("deltaT", "total_step") else 0
        value = config.get(key, _ADALORA_SCHEDULE[key] if key != "total_step" else None)
        if not _is_int(value) or value < low:
            _bad(path, key, f"an int >= {low} (PEFT's AdaLoraConfig requires it)", value)
    if config.get("tinit", 0) >= config["total_step"] - config.get("tfinal", 0):
        raise ValueError(f"{path}: keys 'tinit', 'tfinal', 'total_step' leave no budgeting "
                         "phase (PEFT's AdaLoraConfig needs tinit < total_step - tfinal)")
    for key in ("beta1", "beta2", "orth_reg_weight"):
        value = config.get(key, _ADALORA_SCHEDULE[key])
        if not _is_real(value) or key == "orth_reg_weight" and value < 0:
            _bad(path, key, "a finite number" + (" >= 0" if key == "orth_reg_weight" else ""),
                 value)
    pattern = config.get("rank_pattern")
    if pattern is not None and not isinstance(pattern, dict):
        _bad(path, "rank_pattern", "an object of '<module>.lora_E': [kept, ...]", pattern)
    for k, kept in (pattern or {}).items():
        if not k.endswith(".lora_E") or k == ".lora_E":
            raise ValueError(f"{path}: key 'rank_pattern.{k}' is not a '<module>.lora_E' name, "
                             "as PEFT saves its rank pattern")
        if not (isinstance(kept, list) and len(kept) == init_r
                and all(type(b) is bool for b in kept)):
            _bad(path, f"rank_pattern.{k}", f"a list of {init_r} (init_r) booleans", kept)
    _check_module_keys(path, config)
    return config


def _save_adalora(out, adapted, namer, all_modules, to_save, put, tensors, *,
                  base_model_name_or_path, task_type) -> None:
    """Write a tree of AdaLoRA adapters (and ``Full()`` leaves, whose modules are
    ``to_save``) as a PEFT ``ADALORA`` adapter."""
    modules: dict[str, bool] = {}  # torch module -> stored (out, in) (fan_in_fan_out)
    first = None  # (path, (init_rank, target_rank, alpha)) of the first AdaLoRA node
    dropouts: list[float] = []
    for path, node in leaves_with_paths(adapted):
        if not is_node(node) or isinstance(node, FullNode):
            continue
        module = namer(parent(path))
        if not isinstance(node, AdaLoRANode):
            ada = next(p for p, n in leaves_with_paths(adapted) if isinstance(n, AdaLoRANode))
            raise ValueError(f"jlora.peft.save: the tree mixes AdaLoRA ({ada}) with "
                             f"{node.method} ({path}); a PEFT adapter has one peft_type "
                             "(ADALORA holds AdaLoRA adapters and Full() modules_to_save "
                             "only): save them as separate adapters")
        if is_stacked(node):
            raise ValueError(f"{path}: PEFT's AdaLoRA has no layout for stacked kernels "
                             "(expert_axis)")
        kind = _kind(path, node)
        if kind == "embedding":
            raise ValueError(f"{path}: PEFT's AdaLoRA adapts Linear, Conv1D and Conv2d "
                             "layers, not embeddings")
        cfg = node.config
        r = cfg.init_rank
        settings = (r, cfg.target_rank, r if cfg.alpha is None else cfg.alpha)
        if first is None:
            first = (path, settings)
        elif settings != first[1]:
            raise ValueError(f"jlora.peft.save: AdaLoRA adapters {first[0]} and {path} differ "
                             f"in (init_rank, target_rank, alpha): {first[1]} and {settings}; "
                             "PEFT's ADALORA config holds one init_r, target_r and lora_alpha: "
                             "save them as separate adapters")
        p, lam, q = np.asarray(node.p), np.asarray(node.lam), np.asarray(node.q)
        # PEFT's SVDConv2d keeps lora_A flat: (r, in·kh·kw)
        a = _conv_lora_a(p, node.shape, r).reshape(r, -1) if kind == "conv" else p.T
        key = PREFIX + module
        put(f"{key}.lora_A", a, path)
        put(f"{key}.lora_E", lam[:, None], path)
        put(f"{key}.lora_B", q.T, path)
        modules[module] = kind == "linear_t"
        dropouts.append(cfg.dropout)
    _one_setting("lora_dropout", dropouts)
    _put_whole_modules(adapted, namer, modules, to_save, put, "an AdaLoRA")
    r, target_r, alpha = first[1]
    target = _target_names(modules, all_modules)
    config = {
        "peft_type": "ADALORA",
        "init_r": r,
        "target_r": target_r,
        "lora_alpha": _adalora_file_alpha(alpha, r),
        "r": 8,  # LoraConfig's default; PEFT's AdaLoRA ignores it (and warns at others)
        "rank_pattern": None,  # tensors full size: pruned triplets are those with λ = 0
        "alpha_pattern": {},
        "target_modules": target,
        "lora_dropout": dropouts[0],
        "use_rslora": False,
        "use_dora": False,
        **_config_tail(any(modules.values()), to_save, base_model_name_or_path, task_type),
        **_ADALORA_SCHEDULE,
    }
    for module in all_modules:
        if _targeted(config, module) != (module in modules):
            raise ValueError(f"jlora.peft.save: PEFT's name matching cannot give module "
                             f"{module!r} exactly its adapter; rename modules with name_map")
    _write_adapter(out, tensors, config)


def _load_adalora(config, cfg_path, weights_path, params, by_module, given) -> Any:
    """A PEFT ``ADALORA`` adapter (``config`` read by :func:`_read_config`) over ``params``."""
    _only_stacked_axes({}, given)
    tensors = _read_safetensors(weights_path)
    leaves = _plain_leaves(params)
    grouped = _group_tensors(config, weights_path, tensors, by_module,
                             (*_ADALORA_PARTS, "weight", "bias"),
                             f"an AdaLoRA tensor name jlora knows ({PREFIX}<module>.lora_A, "
                             ".lora_E, .lora_B, or a modules_to_save module's .weight/.bias)")
    _check_target_entries(config, cfg_path, by_module)
    kept = {}
    for k, mask in (config.get("rank_pattern") or {}).items():
        module = k[:-len(".lora_E")]
        if not any(s.startswith("lora_") for s in grouped.get(module, {})):
            raise ValueError(f"{cfg_path}: key 'rank_pattern.{k}' names module {module!r}, "
                             f"for which {WEIGHTS_FILE} holds no AdaLoRA tensors")
        kept[module] = mask
    _check_selected(config, weights_path, by_module, leaves, grouped,
                    lambda join: _ADALORA_PARTS if join("kernel") in leaves else None)
    nodes = _module_nodes(
        grouped, by_module, leaves, weights_path,
        lambda module, parts, join, key: _adalora_node(config, parts, join, leaves, weights_path,
                                                       key, given, kept.get(module)))
    return map_with_paths(lambda p, x: nodes.get(p, x), params)


def _adalora_node(config, parts, join, leaves, weights_path, key, given, kept) -> dict:
    """The AdaLoRANode of one module: ``init_r`` triplets, the file's at the positions
    ``kept`` (its rank_pattern entry) marks, zeros (``λ = 0``) at the others."""
    path = join("kernel")
    if path not in leaves:
        why = (" (PEFT's AdaLoRA adapts Linear, Conv1D and Conv2d layers, not embeddings)"
               if join("embedding") in leaves else "")
        raise ValueError(f"{weights_path}: {key} has AdaLoRA tensors but params have no "
                         f"{path}{why}")
    base = _module_base(parts, _ADALORA_PARTS, _ADALORA_PARTS, leaves[path], path,
                        weights_path, key)
    a_t, e_t, b_t = (parts[s] for s in _ADALORA_PARTS)
    r_init = config["init_r"]
    r = r_init if kept is None else sum(kept)
    said = f"init_r={r_init}" if kept is None else f"rank_pattern keeps {r} of init_r={r_init}"
    if a_t.ndim != 2 or a_t.shape[0] != r or tuple(e_t.shape) != (r, 1):
        raise ValueError(f"{weights_path}: {key}.lora_A/lora_E have shapes "
                         f"{tuple(a_t.shape)}/{tuple(e_t.shape)}, but {CONFIG_FILE} says "
                         f"rank {r} ({said}) for it")
    # PEFT's SVDConv2d keeps lora_A flat, (r, in·kh·kw), and lora_B as (out, r)
    p_file, q_file, in_axes = _file_factors(path, base, r, a_t, b_t, config, given,
                                            f"{weights_path}: {key}", ("lora_A", "lora_B"),
                                            "AdaLoRA", flat_conv=True)
    dt, cfg_dtype = _loaded_dtype(base.dtype, a_t.dtype, e_t.dtype, b_t.dtype)
    at = np.arange(r_init) if kept is None else np.flatnonzero(kept)
    p = np.zeros((p_file.shape[0], r_init), dt)
    lam = np.zeros((r_init,), dt)
    q = np.zeros((r_init, q_file.shape[1]), dt)
    p[:, at], lam[at], q[at, :] = p_file, e_t[:, 0], q_file
    cfg = AdaLoRA(init_rank=r_init, target_rank=config["target_r"],
                  alpha=_adalora_alpha(config.get("lora_alpha", 8), r_init), dtype=cfg_dtype,
                  in_axes=None if in_axes == tuple(range(base.ndim - 1)) else in_axes,
                  dropout=float(config.get("lora_dropout", 0.0)))
    return {path: AdaLoRANode(base=base, p=jnp.asarray(p), lam=jnp.asarray(lam),
                              q=jnp.asarray(q), config=cfg, shape=tuple(base.shape),
                              in_axes=in_axes)}


# ---------------------------------------------------------------- expert parameters
# PEFT's ``target_parameters`` (``lora.ParamWrapper``): LoRA on a raw 3-D
# ``nn.Parameter`` ``(E, d1, d2)`` such as a mixture-of-experts layer's stacked
# expert weights. ``lora_A.weight`` is ``(r·E, in)`` expert-major and
# ``lora_B.weight`` ``(out, r·E)`` expert-minor, so that
# ``ΔW[e] = s · B.reshape(out, r, E)[:, :, e] · A.reshape(E, r, in)[e]``: with
# jlora's per-slice factors ``a[e] = A.reshape(E, r, in)[e]ᵀ`` and
# ``b[e] = B.reshape(out, r, E)[:, :, e]ᵀ``. Several targeted parameters of one
# module nest their wrappers in the module's parameter registration order, the
# first registered innermost: its tensors are named
# ``<module>.base_layer.<...>.lora_A.weight`` with one ``base_layer`` per
# wrapper around it.


def _check_parameter_order(parameter_order) -> tuple[str, ...]:
    if parameter_order is None:
        return ()
    if isinstance(parameter_order, str) or not all(
            isinstance(n, str) and n for n in parameter_order):
        raise ValueError(f"jlora.peft: parameter_order must be a sequence of parameter names, "
                         f"got {parameter_order!r}")
    return tuple(parameter_order)


def _registration_order(names, parameter_order: tuple[str, ...]) -> list[str]:
    """``names`` (parameter names of one module) in PyTorch registration order:
    ``parameter_order`` first, in its order, then the rest sorted by name."""
    rank = {n: i for i, n in enumerate(parameter_order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _wrapper_keys(params_of_module: dict[str, list[str]], parameter_order) -> dict[str, str]:
    """PyTorch parameter name -> the tensor key prefix of its ``ParamWrapper``."""
    keys = {}
    for module, names in params_of_module.items():
        ordered = _registration_order(names, parameter_order)
        for i, name in enumerate(ordered):
            keys[f"{module}.{name}"] = PREFIX + module + ".base_layer" * (len(ordered) - 1 - i)
    return keys


def _expert_export(path: str, node):
    """``(A, B, rank, alpha)`` in PEFT's ``ParamWrapper`` layout for a stacked node."""
    from jlora.methods._experts import own_config

    if isinstance(node, DoRANode) or not isinstance(node, (LoRANode, QLoRANode)):
        raise ValueError(f"{path}: PEFT's target_parameters hold plain LoRA only, not "
                         f"{node.method} on stacked kernels")
    if len(node.shape) != 3 or node.in_axes not in ((1,), (2,)):
        raise ValueError(f"{path}: PEFT's target_parameters need a 3-D stacked kernel "
                         f"(E, in, out) or (E, out, in), got shape {node.shape} with "
                         f"in_axes {node.in_axes}")
    one = own_config(node)
    rank, alpha = one.rank, one.rank if one.alpha is None else one.alpha
    a, b = np.asarray(node.a), np.asarray(node.b)  # (E,in,r), (E,r,out)
    if getattr(node, "a0", None) is not None:  # PiSSA/OLoRA: plain LoRA on the original weight
        a = np.concatenate([a, np.asarray(node.a0, a.dtype)], axis=-1)
        b = np.concatenate([b, -np.asarray(node.b0, b.dtype)], axis=-2)
        rank *= 2
        alpha = alpha * (math.sqrt(2) if one.rslora else 2)
    e = node.shape[0]
    big_a = a.transpose(0, 2, 1).reshape(e * rank, a.shape[1])  # expert-major rows
    big_b = b.transpose(2, 1, 0).reshape(b.shape[2], rank * e)  # expert-minor columns
    return big_a, big_b, rank, alpha


def _save_experts(stacked: dict, namer, parameter_order, put) -> dict[str, dict]:
    """Write the stacked nodes' tensors with ``put``; return PyTorch parameter name ->
    its adapter's settings (as ``save`` keeps them per module)."""
    order = _check_parameter_order(parameter_order)
    names: dict[str, str] = {}  # torch parameter name -> Flax path
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for path in stacked:
        module, leaf = namer(parent(path)), path.rsplit("/", 1)[-1]
        names[f"{module}.{leaf}"] = path
        by_module[module].append(leaf)
    keys = _wrapper_keys(by_module, order)
    for module, leaves_of in by_module.items():
        unordered = sorted(set(leaves_of) - set(order))
        if len(leaves_of) > 1 and len(unordered) > 1:
            warnings.warn(f"jlora.peft.save: module {module!r} has target_parameters adapters on "
                          f"{sorted(leaves_of)}; PEFT nests them in the PyTorch module's parameter "
                          f"order, which the Flax tree does not record, so the file takes "
                          f"{_registration_order(leaves_of, order)}. Pass parameter_order= unless "
                          "that is the module's order", stacklevel=3)
    out = {}
    for name, path in names.items():
        node = stacked[path]
        big_a, big_b, rank, alpha = _expert_export(path, node)
        if node.config.dropout:
            raise ValueError(f"{path}: PEFT's target_parameters adapters cannot have "
                             f"lora_dropout (got {node.config.dropout}); use dropout=0")
        put(f"{keys[name]}.lora_A.weight", big_a, path)
        put(f"{keys[name]}.lora_B.weight", big_b, path)
        out[name] = {"r": rank, "alpha": alpha, "rslora": node.config.rslora, "dora": False,
                     "dropout": node.config.dropout, "path": path, "transposed": False}
    return out


def _expert_axes(base_shape, a_t, b_t, r: int, given) -> tuple[int, ...] | None:
    """The stacked kernel's in_axes, ``(1,)`` for ``(E, in, out)`` or ``(2,)`` for
    ``(E, out, in)``, that the tensors fit (``given`` decides a square kernel;
    ``(1,)`` otherwise), else ``None``."""
    if len(base_shape) != 3 or a_t.ndim != 2 or b_t.ndim != 2:
        return None
    e, d1, d2 = base_shape
    if a_t.shape[0] != r * e or b_t.shape[1] != r * e:
        return None
    io = (a_t.shape[1], b_t.shape[0])
    fit = [axes for axes, shape in (((1,), (d1, d2)), ((2,), (d2, d1))) if io == shape]
    if given is not None:
        return tuple(given) if tuple(given) in fit else None
    return fit[0] if fit else None


def _load_experts(config: dict, cfg_path: str, weights_path: str, tensors: dict,
                  leaves: dict, name_map, given: dict, parameter_order) -> dict:
    """Nodes for ``config["target_parameters"]``; consumes their tensors from ``tensors``."""
    import itertools

    targets = config.get("target_parameters")
    if targets is None or targets == []:
        return _only_stacked_axes({}, given)
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        _bad(cfg_path, "target_parameters", "a list of parameter names", targets)
    order = _check_parameter_order(parameter_order)
    namer = _module_namer(name_map)
    names: dict[str, str] = {}  # torch parameter name -> Flax path
    for path in leaves:
        try:
            module = namer(parent(path))
        except ValueError:
            continue
        names[f"{module}.{path.rsplit('/', 1)[-1]}"] = path
    hit = {n: p for n, p in names.items() if any(n == t or n.endswith("." + t) for t in targets)}
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in hit):
            raise ValueError(f"{cfg_path}: key 'target_parameters' entry {t!r} matches no "
                             "parameter of params (check name_map)")
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for n in hit:
        module, _, leaf = n.rpartition(".")
        by_module[module].append(leaf)
    nodes = {}
    for module, leaves_of in by_module.items():
        ordered = _registration_order(leaves_of, order)
        prefixes = [PREFIX + module + ".base_layer" * (len(ordered) - 1 - i)
                    for i in range(len(ordered))]
        parts = []
        for pre in prefixes:
            got = [tensors.get(f"{pre}.lora_{x}.weight") for x in "AB"]
            if any(t is None for t in got):
                raise ValueError(f"{weights_path}: missing tensor {pre}.lora_"
                                 f"{'A' if got[0] is None else 'B'}.weight (target_parameters "
                                 f"of module {module!r})")
            parts.append(got)

        def fits(perm):
            out = []
            for leaf, (a_t, b_t) in zip(perm, parts):
                name, path = f"{module}.{leaf}", names[f"{module}.{leaf}"]
                axes = _expert_axes(np.shape(leaves[path]), a_t, b_t,
                                    _rank_alpha(config, name)[0], given.get(path))
                if axes is None:
                    return None
                out.append(axes)
            return perm, out

        found = fits(tuple(ordered))
        if found is None or not order:  # the orders the shapes fit: is the default the only one?
            every = [f for p in itertools.islice(itertools.permutations(ordered), 720)
                     if (f := fits(p)) is not None]
            if len(every) > 1 and not order:
                found = found or every[0]
                warnings.warn(
                    f"jlora.peft.load: {weights_path}: the target_parameters tensors of module "
                    f"{module!r} fit its parameters in {len(every)} registration orders "
                    f"({', '.join(str(list(f[0])) for f in every)}), each a different adapter; "
                    f"took {list(found[0])}. Pass parameter_order= with the PyTorch module's "
                    "parameter order to choose", stacklevel=4)
            elif found is None:
                found = every[0] if len(every) == 1 else None
        if found is None:
            shapes = {leaf: tuple(np.shape(leaves[names[f"{module}.{leaf}"]])) for leaf in ordered}
            raise ValueError(
                f"{weights_path}: the target_parameters tensors of module {module!r} do not fit "
                f"its parameters {shapes} in registration order {ordered} (rank, expert count "
                "or shape); pass parameter_order= with the PyTorch module's parameter order")
        for leaf, axes, pre in zip(found[0], found[1], prefixes):
            name, path = f"{module}.{leaf}", names[f"{module}.{leaf}"]
            a_t, b_t = tensors.pop(f"{pre}.lora_A.weight"), tensors.pop(f"{pre}.lora_B.weight")
            base = jnp.asarray(leaves[path])
            if not jnp.issubdtype(base.dtype, jnp.floating):
                raise ValueError(f"{weights_path}: {pre} adapts {path}, which has dtype "
                                 f"{base.dtype}")
            r, alpha = _rank_alpha(config, name)
            e = base.shape[0]
            a = a_t.reshape(e, r, -1).transpose(0, 2, 1)  # (E, in, r)
            b = b_t.reshape(-1, r, e).transpose(2, 1, 0)  # (E, r, out)
            dt, cfg_dtype = _loaded_dtype(base.dtype, a_t.dtype, b_t.dtype)
            cfg = LoRA(rank=r, alpha=alpha, rslora=config.get("use_rslora", False),
                       dropout=float(config.get("lora_dropout", 0.0)), dtype=cfg_dtype,
                       in_axes=None if axes == (1,) else axes, expert_axis=0)
            nodes[path] = LoRANode(base=base, a=jnp.asarray(a, dt), b=jnp.asarray(b, dt),
                                   config=cfg, shape=tuple(base.shape), in_axes=axes)
    return _only_stacked_axes(nodes, given)


def _only_stacked_axes(nodes: dict, given: dict) -> dict:
    """``in_axes`` (2,) is for stacked ``(E, out, in)`` kernels only."""
    for path, axes in given.items():
        if tuple(axes) == (2,) and path not in nodes:
            raise ValueError(f"jlora.peft.load: in_axes (2,) for {path} is for a stacked "
                             "(E, out, in) kernel adapted by target_parameters")
    return nodes


def _check_expert_config(config: dict, experts: dict, adapted, name_map) -> None:
    """PEFT gives each targeted parameter exactly its rank and alpha, and no other."""
    namer = _module_namer(name_map)
    for path, _ in leaves_with_paths(adapted):
        try:
            name = f"{namer(parent(path))}.{path.rsplit('/', 1)[-1]}"
        except ValueError:
            continue
        hit = any(name == t or name.endswith("." + t) for t in config["target_parameters"])
        if hit != (name in experts) or hit and _rank_alpha(config, name) != (
                experts[name]["r"], experts[name]["alpha"]):
            raise ValueError(f"jlora.peft.save: PEFT's name matching cannot give parameter "
                             f"{name!r} exactly its adapter; rename modules with name_map")


# ---------------------------------------------------------------- trainable tokens
# PEFT's layouts: LoRA + ``trainable_token_indices = {module suffix: [ids]}`` (or a list of
# ids: the input embedding) keeps the rows at the full module name's
# ``<module>.token_adapter.trainable_tokens_delta``; a standalone ``TRAINABLE_TOKENS``
# adapter (``token_indices``, ``target_modules``) at ``<module>.trainable_tokens_delta``.
# The tensor is ``(k, dim)``: the new row values, in the order of the indices.

_TOKEN_SUFFIXES = ("token_adapter.trainable_tokens_delta", "trainable_tokens_delta")
_TOKENS_KEYS = {"peft_type", "token_indices", "target_modules", "init_weights"}


def _put_token_rows(config: dict, tokens: dict, put, suffix: str = _TOKEN_SUFFIXES[0]) -> None:
    """Write each TrainableTokens node's rows and its indices (LoRA's ``trainable_token_indices``)."""
    if not tokens:
        return
    for module, (path, node) in tokens.items():
        put(f"{PREFIX}{module}.{suffix}", np.asarray(node.rows), path)
    config["trainable_token_indices"] = {m: list(n.indices) for m, (_, n) in tokens.items()}


def _save_tokens_only(out, tokens, put, tensors, base_model_name_or_path, task_type) -> None:
    indices = {n.indices for _, n in tokens.values()}
    if len(indices) > 1:
        raise ValueError("jlora.peft.save: TrainableTokens nodes with different indices "
                         f"({sorted(p for p, _ in tokens.values())}) do not fit one PEFT "
                         "TRAINABLE_TOKENS config (one token_indices list); save them apart")
    config = {"peft_type": "TRAINABLE_TOKENS", "target_modules": sorted(tokens),
              "init_weights": True, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
              "revision": None}
    _put_token_rows(config, tokens, put, suffix=_TOKEN_SUFFIXES[1])
    config["token_indices"] = list(indices.pop())
    del config["trainable_token_indices"]
    _write_adapter(out, tensors, config)


def _token_tensors(tensors: dict) -> tuple[dict, dict]:
    """Split off ``…token_adapter.trainable_tokens_delta`` tensors: (others, {module: rows})."""
    rest, rows = {}, {}
    for key, value in tensors.items():
        tail = "." + _TOKEN_SUFFIXES[0]
        if key.startswith(PREFIX) and key.endswith(tail):
            rows[key[len(PREFIX):-len(tail)]] = value
        else:
            rest[key] = value
    return rest, rows


def _check_token_export(path: str, node, adapted) -> None:
    """PEFT gives ``node``'s rows the outputs jlora gives them, or a ``ValueError`` naming ``path``.

    PEFT's ``TrainableTokensLayer`` wraps an ``nn.Embedding`` (a Flax ``embedding`` leaf,
    token axis 0) or an ``nn.Linear`` (a ``kernel`` leaf, token axis 1). On a Linear it
    computes ``F.linear(x, W')`` with no bias term, so a head whose module has a bias would
    lose the whole bias under PEFT; jlora keeps it.
    """
    leaf = path.rpartition("/")[2]
    if (leaf, node.token_axis) not in (("embedding", 0), ("kernel", 1)):
        raise ValueError(f"jlora.peft.save: {path}: PEFT's trainable tokens wrap an "
                         "nn.Embedding (a Flax 'embedding' leaf, token axis 0) or an nn.Linear "
                         f"(a 'kernel' leaf, token axis 1), not a {leaf!r} leaf with token axis "
                         f"{node.token_axis}")
    bias = f"{parent(path)}/bias" if parent(path) else "bias"
    if node.token_axis == 1 and any(p == bias for p, _ in leaves_with_paths(adapted)):
        raise ValueError(f"jlora.peft.save: {path}: trainable tokens on a head kernel whose "
                         f"module has a bias ({bias}): PEFT's TrainableTokensLayer computes "
                         "F.linear(x, W') without the bias, so under PEFT the layer would lose "
                         "its whole bias (jlora keeps it); train that head with Full() "
                         "(modules_to_save) instead")


def _check_token_names(tokens: dict, all_modules, *, standalone: bool) -> None:
    """PEFT wraps exactly the modules that hold trainable tokens, or a ``ValueError``.

    The standalone adapter's ``target_modules`` list matches a whole name or a suffix after
    a dot; LoRA's ``trainable_token_indices`` keys match any name that ends with them
    (``_set_trainable``: ``key.endswith(target_key)``), so a key can also wrap another module.
    """
    for module in all_modules:
        keys = [k for k in tokens if (module == k or module.endswith("." + k) if standalone
                                      else module.endswith(k))]
        if keys != ([module] if module in tokens else []):
            other = next(k for k in keys if k != module)
            raise ValueError(f"jlora.peft.save: PEFT matches trainable-token module names by "
                             f"suffix, so the entry {other!r} would also wrap module {module!r} "
                             "(rename modules with name_map)")


def _token_leaf(module, by_module, leaves) -> str | None:
    """The path of ``module``'s ``embedding`` or ``kernel`` leaf, or None."""
    if module not in by_module:
        return None
    join = _joiner(by_module[module])
    return next((join(x) for x in ("embedding", "kernel") if join(x) in leaves), None)


def _token_node(module, indices, rows, by_module, leaves, where, weights_path, key):
    """A TrainableTokensNode for ``module``'s table from the file's indices and rows."""
    if module not in by_module:
        raise ValueError(f"{where}: trainable tokens of module {module!r}, which params do "
                         "not have (check name_map)")
    path = _token_leaf(module, by_module, leaves)
    if path is None:
        raise ValueError(f"{where}: module {module!r} has no 'embedding' or 'kernel' leaf for "
                         "its trainable tokens")
    try:
        config = TrainableTokens(indices=check_indices(where, f"token indices of {module!r}",
                                                       indices))
        node = config.build(None, jnp.asarray(leaves[path]), path=path)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if rows is None:
        raise ValueError(f"{weights_path}: missing tensor {key}")
    if tuple(rows.shape) != tuple(node.rows.shape):
        raise ValueError(f"{weights_path}: tensor {key} has shape {tuple(rows.shape)}; "
                         f"{len(config.indices)} tokens of {path} need {node.rows.shape}")
    return {path: node.replace(rows=jnp.asarray(rows, node.rows.dtype))}


def _token_entries(spec, token_rows, by_module, cfg_path, weights_path) -> tuple[dict, list]:
    """LoRA's ``trainable_token_indices`` resolved to ``({module: ids}, [tied entries])``.

    PEFT (``_set_trainable``) wraps every module whose full name ends with a key of
    ``{key: [ids]}`` and saves each wrapped module's rows under its full name, so a key
    names the one module whose name ends with it and whose rows the file holds. A list of
    ids means PEFT's input embedding: the one module with rows in the file. On a tied model
    PEFT does not wrap a tied head listed with the embedding's ids, and saves nothing for
    it: such a key (no rows, no module in params, whose tied head reads the embedding) is
    returned as a tied entry ``(key, ids)``.
    """
    where = f"{cfg_path}: key 'trainable_token_indices'"
    suffix = _TOKEN_SUFFIXES[0]
    if isinstance(spec, list):
        if len(token_rows) != 1:
            raise ValueError(f"{where} is a list of token ids (PEFT: the input embedding); "
                             f"jlora takes its module from the file's {PREFIX}<module>.{suffix} "
                             f"tensor, and {weights_path} holds {len(token_rows)} "
                             f"({sorted(token_rows)})")
        return {next(iter(token_rows)): spec}, []
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a list of token ids or an object "
                         f"{{module: [token ids]}}, got {spec!r}")
    entries, owner, tied = {}, {}, []
    for name, indices in spec.items():
        hits = [m for m in token_rows if m.endswith(name)]  # PEFT: key.endswith(target_key)
        if len(hits) > 1:
            raise ValueError(f"{where}: entry {name!r} matches the rows of modules "
                             f"{sorted(hits)} in {weights_path}; jlora needs it to name one")
        if not hits:
            named = sorted(m for m in by_module if m.endswith(name))
            if named:
                raise ValueError(f"{weights_path}: missing tensor {PREFIX}{named[0]}.{suffix} "
                                 f"(trainable_token_indices entry {name!r})")
            tied.append((name, indices))
            continue
        if hits[0] in owner:
            raise ValueError(f"{where}: entries {owner[hits[0]]!r} and {name!r} both name "
                             f"module {hits[0]!r}")
        owner[hits[0]] = name
        entries[hits[0]] = indices
    return entries, tied


def _token_nodes(spec, token_rows, by_module, leaves, cfg_path, weights_path, nodes) -> dict:
    """The nodes of LoRA's ``trainable_token_indices`` (see :func:`_token_entries`)."""
    if spec is None:
        if token_rows:
            raise ValueError(f"{weights_path}: tensor {PREFIX}{next(iter(token_rows))}."
                             f"{_TOKEN_SUFFIXES[0]} but {CONFIG_FILE} has no "
                             "trainable_token_indices")
        return {}
    where = f"{cfg_path}: key 'trainable_token_indices'"
    entries, tied = _token_entries(spec, token_rows, by_module, cfg_path, weights_path)
    out = {}
    for module, indices in entries.items():
        key = f"{PREFIX}{module}.{_TOKEN_SUFFIXES[0]}"
        got = _token_node(module, indices, token_rows.pop(module), by_module, leaves, where,
                          weights_path, key)
        if set(got) & set(nodes):
            raise ValueError(f"{cfg_path}: {next(iter(got))} has a LoRA adapter and trainable "
                             "tokens; jlora adapts a leaf with one method")
        out.update(got)
    loaded = {n.indices for n in out.values()}
    for name, indices in tied:
        ids = check_indices(where, f"token indices of {name!r}", indices)
        if ids not in loaded:
            raise ValueError(f"{where}: entry {name!r} matches no module of params and "
                             f"{weights_path} holds no rows for it (check name_map); PEFT "
                             "saves no rows only for a head tied to the embedding and listed "
                             "with the embedding's ids")
    if token_rows:
        raise ValueError(f"{weights_path}: tensor {PREFIX}{next(iter(token_rows))}."
                         f"{_TOKEN_SUFFIXES[0]} belongs to no trainable_token_indices entry")
    return out


def _is_tokens_only(cfg_path: str) -> bool:
    config = _parse_json(_read_bytes(cfg_path), cfg_path)
    return isinstance(config, dict) and config.get("peft_type") == "TRAINABLE_TOKENS"


def _load_tokens_only(cfg_path, weights_path, params, by_module) -> Any:
    """A standalone PEFT ``TRAINABLE_TOKENS`` adapter over ``params``."""
    config = _parse_json(_read_bytes(cfg_path), cfg_path)
    _check_known_keys(cfg_path, config, _TOKENS_KEYS)
    if config.get("init_weights", True) not in (True, False):
        _bad(cfg_path, "init_weights", "true or false", config["init_weights"])
    target = config.get("target_modules")
    if isinstance(target, str):
        _check_regex(cfg_path, "target_modules", target)
    elif not (isinstance(target, list) and target and all(isinstance(t, str) for t in target)):
        _bad(cfg_path, "target_modules", "a list of module names or a regular expression "
             "(jlora needs the embedding named)", target)
    leaves = _plain_leaves(params)
    tensors = _read_safetensors(weights_path)
    rows = {}
    for key, value in tensors.items():
        tail = "." + _TOKEN_SUFFIXES[1]
        if not (key.startswith(PREFIX) and key.endswith(tail)) or key.endswith(_TOKEN_SUFFIXES[0]):
            raise ValueError(f"{weights_path}: tensor {key!r} is not a trainable tokens tensor "
                             f"({PREFIX}<module>.{_TOKEN_SUFFIXES[1]})")
        rows[key[len(PREFIX):-len(tail)]] = value
    modules = [m for m in by_module if _selects(target, m)]
    if not modules:
        raise ValueError(f"{cfg_path}: key 'target_modules' = {target!r} matches no module of "
                         "params")
    nodes, used = {}, {}
    for module in modules:
        key = f"{PREFIX}{module}.{_TOKEN_SUFFIXES[1]}"
        used[module] = rows.pop(module, None)
        nodes.update(_token_node(module, config.get("token_indices"), used[module],
                                 by_module, leaves, f"{cfg_path}: key 'token_indices'",
                                 weights_path, key))
    for module, value in rows.items():
        _check_tied_copy(module, value, used, by_module, leaves, weights_path)
    return map_with_paths(lambda p, x: nodes.get(p, x), params)


def _check_tied_copy(module, value, used, by_module, leaves, weights_path) -> None:
    """A standalone adapter's rows for a module ``target_modules`` does not select are
    accepted only as a tied head's copy: PEFT wraps a head tied to the selected embedding
    with the same ids and saves its rows too (equal to the embedding's), and tied Flax params
    have no leaf for that head. Anything else is a ``ValueError`` naming the tensor."""
    key = f"{PREFIX}{module}.{_TOKEN_SUFFIXES[1]}"
    if _token_leaf(module, by_module, leaves) is not None:
        raise ValueError(f"{weights_path}: tensor {key} targets module {module!r}, which "
                         "target_modules does not select")
    value = np.asarray(value)
    if not any(np.array_equal(value, np.asarray(v)) for v in used.values() if v is not None):
        raise ValueError(f"{weights_path}: tensor {key} targets module {module!r}, which "
                         "target_modules does not select and params do not have; PEFT writes "
                         "such rows for a head tied to the embedding, equal to its rows "
                         f"({sorted(used)}), and these differ")
