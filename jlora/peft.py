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
PyTorch module name) for other models. PiSSA/OLoRA adapters are saved as the
equivalent plain LoRA on the *original* weights, as PEFT does: ``a' = [a, a0]``,
``b' = [b; −b0]``, rank and alpha doubled (alpha ×√2 with rsLoRA).

Loading is strict: a config key jlora does not implement that is set to a
non-default value, a rank that disagrees with the tensors, a target module
missing from ``params``, an unreadable file: each a ``ValueError`` naming the
file and key, and nothing is returned half-loaded.

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
import json
import math
import os
import re
import tempfile
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jlora.methods.dora import DoRA, DoRANode
from jlora.methods.full import Full, FullNode
from jlora.methods.lora import LoRA, LoRANode
from jlora.tree import is_node, leaves_with_paths, map_with_paths

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Keys jlora reads; everything else must sit at a default value.
_READ = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern",
         "alpha_pattern", "target_modules", "lora_dropout", "bias", "lora_bias",
         "fan_in_fan_out", "modules_to_save", "init_lora_weights"}
# Informational keys, and keys whose usual value is not null/false/empty but
# changes nothing for a plain LoRA adapter.
_INFO = {"base_model_name_or_path", "revision", "task_type", "peft_version", "inference_mode",
         "auto_mapping", "megatron_core", "qalora_group_size", "exclude_modules",
         "layers_pattern"}
_NON_EMPTY_DEFAULTS = {"loftq_config": {}}


NameMap = Callable[[str], str] | dict | None


def _module_namer(name_map: NameMap) -> Callable[[str], str]:
    if name_map is None:
        return lambda p: p.replace("/", ".")
    if callable(name_map):
        return name_map
    if isinstance(name_map, dict):
        def lookup(p):
            if p not in name_map:
                raise ValueError(f"name_map has no PyTorch module name for Flax module {p!r}")
            return name_map[p]
        return lookup
    raise ValueError(f"name_map must be a function or a dict, got {type(name_map).__name__}")


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
    a, b, rank = np.asarray(node.a, np.float32), np.asarray(node.b, np.float32), cfg.rank
    if node.a0 is not None:
        if isinstance(node, DoRANode):
            raise ValueError(f"{path}: exporting a PiSSA/OLoRA-initialised DoRA adapter is not supported")
        a = np.concatenate([a, np.asarray(node.a0, np.float32)], axis=1)
        b = np.concatenate([b, -np.asarray(node.b0, np.float32)], axis=0)
        rank *= 2
        alpha = alpha * (math.sqrt(2) if cfg.rslora else 2)
    return a, b, rank, alpha


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


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def save(directory: str, adapted: Any, *, name_map: NameMap = None,
         base_model_name_or_path: str | None = None, task_type: str | None = None,
         adapter_name: str = "default") -> None:
    """Write ``adapted``'s adapters as a PEFT LoRA adapter directory.

    ``Full()`` leaves go to ``modules_to_save``. One adapter directory holds one
    ``use_rslora`` / ``use_dora`` setting (PEFT's config is global), so mixing
    them in one tree is an error. An adapter named other than ``"default"`` is
    written to ``<directory>/<adapter_name>/``, as PEFT does.
    """
    from safetensors.numpy import save_file

    namer = _module_namer(name_map)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, dict] = {}
    to_save: list[str] = []
    for path, node in leaves_with_paths(adapted):
        if not is_node(node):
            continue
        module_path = path.rsplit("/", 1)[0] if "/" in path else ""
        module = namer(module_path)
        key = PREFIX + module
        if isinstance(node, FullNode):
            suffix, value = _torch_full(path, np.asarray(node.value, np.float32))
            tensors[f"{key}.{suffix}"] = np.ascontiguousarray(value)
            if module not in to_save:
                to_save.append(module)
            continue
        if not isinstance(node, (LoRANode, DoRANode)):
            raise ValueError(f"{path}: {node.method} adapters have no PEFT LoRA layout")
        kind = _kind(path, node)
        a, b, rank, alpha = _export_factors(path, node)
        if kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = a.T
            tensors[f"{key}.lora_embedding_B"] = b.T
        elif kind in ("linear", "linear_t"):
            tensors[f"{key}.lora_A.weight"] = a.T
            tensors[f"{key}.lora_B.weight"] = b.T
        else:
            kh, kw, cin, _ = node.shape
            tensors[f"{key}.lora_A.weight"] = a.reshape(kh, kw, cin, rank).transpose(3, 2, 0, 1)
            tensors[f"{key}.lora_B.weight"] = b.T.reshape(-1, rank, 1, 1)
        if isinstance(node, DoRANode):
            if kind not in ("linear", "linear_t"):
                raise ValueError(f"{path}: jlora exports DoRA for Linear layers only")
            tensors[f"{key}.lora_magnitude_vector"] = np.asarray(node.m, np.float32)
        modules[module] = {"r": rank, "alpha": alpha, "rslora": node.config.rslora,
                           "dora": isinstance(node, DoRANode), "dropout": node.config.dropout,
                           "path": path, "transposed": kind == "linear_t"}
    if not modules:
        raise ValueError("jlora.peft.save: the tree holds no LoRA/DoRA adapter")
    for flag in ("rslora", "dora"):
        if len({m[flag] for m in modules.values()}) > 1:
            raise ValueError(f"jlora.peft.save: adapters mix use_{flag}=True and False; PEFT "
                             "stores one setting per adapter: save them as two adapters")
    r = _most_common(m["r"] for m in modules.values())
    alpha = _most_common(m["alpha"] for m in modules.values())
    first = next(iter(modules.values()))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": first["rslora"],
        "use_dora": first["dora"],
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(k): m["r"] for k, m in modules.items() if m["r"] != r},
        "alpha_pattern": {re.escape(k): m["alpha"] for k, m in modules.items()
                          if m["alpha"] != alpha},
        "lora_dropout": _most_common(m["dropout"] for m in modules.values()),
        "bias": "none",
        "lora_bias": False,
        # PEFT applies fan_in_fan_out to its Conv1D-style layers (GPT-2) and forces
        # it off for nn.Linear ones, so one flag describes a mixed model.
        "fan_in_fan_out": any(m["transposed"] for m in modules.values()),
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
    out = directory if adapter_name == "default" else os.path.join(directory, adapter_name)
    os.makedirs(out, exist_ok=True)
    # Write both files beside the target and rename into place: a crash never
    # leaves a truncated file under the final name.
    with tempfile.TemporaryDirectory(dir=out, prefix=".jlora-tmp-") as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                  os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        os.replace(os.path.join(tmp, WEIGHTS_FILE), os.path.join(out, WEIGHTS_FILE))
        os.replace(os.path.join(tmp, CONFIG_FILE), os.path.join(out, CONFIG_FILE))


def _is_default(key, value) -> bool:
    if key in _NON_EMPTY_DEFAULTS and value == _NON_EMPTY_DEFAULTS[key]:
        return True
    return value is None or value is False or value == {} or value == [] or value == ""


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (not a PEFT adapter directory?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: adapter config is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: key 'peft_type' is {config.get('peft_type')!r}; "
                         "jlora loads 'LORA' adapters only")
    for key, value in config.items():
        if key in _READ or key in _INFO or _is_default(key, value):
            continue
        raise ValueError(f"{path}: key {key!r} is set to {value!r}, which jlora does not "
                         "implement; refusing to load rather than ignore it")
    if config.get("fan_in_fan_out") not in (True, False, None):
        raise ValueError(f"{path}: key 'fan_in_fan_out' must be true or false, got "
                         f"{config['fan_in_fan_out']!r}")
    checks = {"lora_bias": False, "bias": "none"}
    for key, ok in checks.items():
        if config.get(key, ok) not in (ok, None):
            raise ValueError(f"{path}: key {key!r} = {config[key]!r} is not supported "
                             f"(only {ok!r})")
    if not isinstance(config.get("r"), int):
        raise ValueError(f"{path}: key 'r' must be an int, got {config.get('r')!r}")
    return config


def _pattern_value(patterns: dict, module: str, default):
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def load(directory: str, params: Any, *, name_map: NameMap = None,
         adapter_name: str = "default", in_axes: dict | None = None) -> Any:
    """Read a PEFT LoRA adapter directory into an adapted tree over ``params``.

    Honours ``r``/``lora_alpha`` with ``rank_pattern``/``alpha_pattern``,
    ``use_rslora``, ``use_dora``, ``fan_in_fan_out`` and ``modules_to_save``.
    ``params`` is not modified; the returned tree is complete or an error is raised.

    Orientation of a 2-D kernel: PEFT's ``lora_A`` is ``(r, in)`` and ``lora_B``
    ``(out, r)``, so a non-square kernel of shape ``(in, out)`` gets
    ``in_axes=(0,)`` and one of shape ``(out, in)`` (Hugging Face Flax GPT-2's
    ``FlaxConv1D``) ``in_axes=(1,)``. A square kernel follows ``in_axes``
    (``{kernel path: in_axes}``, e.g. from ``jlora.linen.resolve(...)`` configs)
    when given, else the file's ``fan_in_fan_out`` (true: the Flax port of a
    ``Conv1D`` model, stored ``(out, in)``).
    """
    from safetensors.numpy import load_file

    folder = directory if adapter_name == "default" else os.path.join(directory, adapter_name)
    cfg_path = os.path.join(folder, CONFIG_FILE)
    config = _read_config(cfg_path)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None

    namer = _module_namer(name_map)
    leaves = dict(leaves_with_paths(params))
    by_module: dict[str, str] = {}
    for p in leaves:
        module_path = p.rsplit("/", 1)[0] if "/" in p else ""
        by_module.setdefault(namer(module_path), module_path)

    grouped: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights_path}: tensor {key!r} does not start with {PREFIX!r}")
        m = re.fullmatch(r"(.*?)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                         r"lora_embedding_B|lora_magnitude_vector|lora_B\.bias|weight|bias)",
                         key[len(PREFIX):])
        if m is None:
            raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA tensor jlora knows")
        if m.group(2) == "lora_B.bias":
            raise ValueError(f"{weights_path}: tensor {key!r} is a lora_bias, which jlora "
                             "does not implement")
        grouped[m.group(1)][m.group(2)] = value

    def flax_module(module: str, key: str) -> str:
        if module not in by_module:
            raise ValueError(f"{weights_path}: tensor {key!r} targets module {module!r}, which "
                             "params do not have (check name_map)")
        return by_module[module]

    nodes: dict[str, Any] = {}
    for module, parts in grouped.items():
        key = PREFIX + module
        mpath = flax_module(module, f"{key}.{sorted(parts)[0]}")
        join = lambda leaf: f"{mpath}/{leaf}" if mpath else leaf
        if "lora_A.weight" in parts or "lora_embedding_A" in parts:
            nodes.update(_lora_node(config, module, parts, join, leaves, weights_path, key,
                                    in_axes or {}))
        else:  # modules_to_save: whole tensors
            for suffix, value in parts.items():
                for leaf in (("kernel", "embedding", "scale") if suffix == "weight" else ("bias",)):
                    if join(leaf) in leaves:
                        break
                else:
                    raise ValueError(f"{weights_path}: {key}.{suffix} has no matching leaf under "
                                     f"{mpath!r}")
                target = leaves[join(leaf)]
                value = value.T if leaf == "kernel" and value.ndim == 2 else value
                value = value.transpose(2, 3, 1, 0) if leaf == "kernel" and value.ndim == 4 else value
                if tuple(value.shape) != tuple(np.shape(target)):
                    raise ValueError(f"{weights_path}: {key}.{suffix} has shape {value.shape}, "
                                     f"the leaf {join(leaf)} has {np.shape(target)}")
                nodes[join(leaf)] = FullNode(value=jnp.asarray(value, jnp.asarray(target).dtype),
                                             config=Full(), shape=tuple(value.shape),
                                             in_axes=tuple(range(value.ndim - 1)))
    return map_with_paths(lambda p, x: nodes.get(p, x), params)


def _linear_in_axes(path, shape, a_t, b_t, config, given, where):
    """``(0,)`` for an ``(in, out)`` kernel, ``(1,)`` for ``(out, in)``; see :func:`load`."""
    fan_in, fan_out = a_t.shape[1], b_t.shape[0]
    if path in given:
        axes = tuple(given[path])
        if axes not in ((0,), (1,)):
            raise ValueError(f"jlora.peft.load: in_axes[{path!r}] = {given[path]!r}; a 2-D "
                             "kernel takes (0,) or (1,)")
        return axes
    if fan_in != fan_out:
        if shape == (fan_in, fan_out):
            return (0,)
        if shape == (fan_out, fan_in):
            return (1,)
        raise ValueError(f"{where}: factors {a_t.shape}/{b_t.shape} do not fit {path} of "
                         f"shape {shape}")
    return (1,) if config.get("fan_in_fan_out") else (0,)


def _lora_node(config, module, parts, join, leaves, weights_path, key, given):
    embedding = "lora_embedding_A" in parts
    leaf_name = "embedding" if embedding else "kernel"
    path = join(leaf_name)
    if path not in leaves:
        raise ValueError(f"{weights_path}: {key} has LoRA tensors but params have no {path}")
    base = jnp.asarray(leaves[path])
    a_t = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_t = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a_t is None or b_t is None:
        raise ValueError(f"{weights_path}: {key} has only one of its two LoRA factors")
    r_file = a_t.shape[0]
    r_cfg = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if r_file != r_cfg:
        raise ValueError(f"{weights_path}: {key} has rank {r_file} but "
                         f"{CONFIG_FILE} says r={r_cfg} for it")
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if base.ndim == 4:  # conv (kh, kw, in, out)
        kh, kw, cin, cout = base.shape
        a = a_t.transpose(2, 3, 1, 0).reshape(kh * kw * cin, r_file)
        b = b_t.reshape(cout, r_file).T
        in_axes = (0, 1, 2)
    elif base.ndim == 2 and not embedding:
        a, b = a_t.T, b_t.T
        in_axes = _linear_in_axes(path, tuple(base.shape), a_t, b_t, config, given,
                                  f"{weights_path}: {key}")
    else:
        a, b, in_axes = a_t.T, b_t.T, (0,)
    fan_in = math.prod(base.shape[i] for i in in_axes)
    fan_out = base.size // fan_in
    if a.shape != (fan_in, r_file) or b.shape != (r_file, fan_out):
        raise ValueError(f"{weights_path}: {key} factors {a_t.shape}/{b_t.shape} do not fit "
                         f"{path} of shape {base.shape}")
    opts = dict(rank=r_file, alpha=alpha, rslora=bool(config.get("use_rslora")),
                dropout=float(config.get("lora_dropout") or 0.0), in_axes=in_axes)
    dt = jnp.promote_types(base.dtype, jnp.float32)
    common = dict(base=base, a=jnp.asarray(a, dt), b=jnp.asarray(b, dt),
                  shape=tuple(base.shape), in_axes=in_axes)
    if config.get("use_dora"):
        m = parts.get("lora_magnitude_vector")
        if m is None or m.shape != (fan_out,):
            raise ValueError(f"{weights_path}: use_dora is set but {key}.lora_magnitude_vector "
                             f"is missing or not of shape ({fan_out},)")
        return {path: DoRANode(**common, m=jnp.asarray(m, dt), config=DoRA(**opts))}
    if "lora_magnitude_vector" in parts:
        raise ValueError(f"{weights_path}: {key}.lora_magnitude_vector present but use_dora is false")
    return {path: LoRANode(**common, config=LoRA(**opts))}
