"""Orbax checkpoints of the trainable adapter tree, optimizer state, step and spec.

Only ``trainable`` (the factors, from ``jlora.split``) is written, never the
frozen base weights unless you pass ``frozen=``. Each save is one Orbax step
directory, written under a temporary name and renamed when complete, so a
crash mid-save leaves the previous checkpoint intact and loadable; a save that
fails removes what it had written, and ``save(..., overwrite=True)`` writes the
new step completely before swapping it for the old one.

Everything but the arrays travels as plain JSON data: the spec's rules, and
each tree's structure (containers and their keys, ``None`` holes, each adapter
node's class, method config and static fields, optax state types, each
array's shape and dtype). A restore rebuilds the trees from that description
through the method registry (``jlora.methods``) and the optax/jlora state
types already loaded; nothing read from a checkpoint is unpickled, evaluated
or imported, so a crafted checkpoint directory cannot run code. Every field of
that description is checked on restore (its type, each node's static fields
against their declared types, each array's shape and dtype against the array
Orbax stored, the step against the step directory), and a damaged or edited
one is a ``ValueError`` naming the step directory, the tree path and the
field. Checkpoints written by jlora 0.1.0 (whose structure was a pickle) are
refused with a ``ValueError`` saying how to re-save them (:func:`upgrade`).

Example::

    >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
    >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
    >>> spec = jlora.Spec({"w/kernel": jlora.LoRA(rank=2)})
    >>> trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    >>> opt_state = optax.adam(1e-3).init(trainable)
    >>> d = tempfile.mkdtemp()
    >>> path = jlora.checkpoint.save(d, trainable, step=10, opt_state=opt_state, spec=spec)
    >>> state = jlora.checkpoint.restore(d)
    >>> state["step"], state["spec"] == spec
    (10, True)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import shutil
import types
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._validate import positive_int
from jlora.methods import AdapterNode
from jlora.spec import config_from_dict, config_to_dict
from jlora.methods.base import Config
from jlora.quant import QUANTS, QuantizedArray
from jlora.spec import Spec, spec_from_json, spec_to_json
from jlora.tree import PyTree, is_module_node, is_node, leaves_with_paths, path_str

FORMAT = "jlora-checkpoint/2"
_OLD_FORMATS = ("jlora-checkpoint/1",)
_PARTS = ("trainable", "opt_state", "frozen")
_STATE_PACKAGES = ("optax", "jlora")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ---------------------------------------------------------------- structure as data


def _subclasses(cls) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def _node_classes() -> dict[tuple[str, str], list[type]]:
    """Adapter node classes by (method, class name), derived from the classes defined so far."""
    out: dict[tuple[str, str], list[type]] = {}
    for c in _subclasses(AdapterNode):
        out.setdefault((c.method, c.__name__), []).append(c)
    return out


def _state_types() -> dict[str, type]:
    """The optax / jlora NamedTuple state types loaded in this process, by qualified name."""
    return {f"{c.__module__}.{c.__qualname__}": c for c in _subclasses(tuple)
            if hasattr(c, "_fields") and c.__module__.split(".")[0] in _STATE_PACKAGES}


def _static_to_json(value):
    if isinstance(value, Config):
        return {"config": config_to_dict(value)}
    if isinstance(value, tuple):
        return {"tuple": [_static_to_json(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a static field of type {type(value).__name__}")


def _static_from_json(value):
    """A static field's value from its JSON form; a ``ValueError`` for anything else."""
    if isinstance(value, dict):
        if set(value) == {"config"}:
            try:
                return config_from_dict(value["config"])
            except (TypeError, ValueError) as e:  # an unknown option is a TypeError
                raise ValueError(f"bad method config {_short(value['config'])} ({e})") from None
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_static_from_json(v) for v in value["tuple"])
        raise ValueError(f"unknown static value {_short(value)}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"unknown static value {_short(value)}")


def _storable(dtype) -> bool:
    """Whether arrays of ``dtype`` round-trip through a checkpoint, the one test of save and
    restore: numpy's bool, integer, floating (``float8_e5m2`` reports itself as one) and
    complex kinds, and bfloat16. Not float0, int4/uint4 or the other float8 types, which
    Orbax cannot write or restore cannot describe."""
    dtype = jnp.dtype(dtype)
    return dtype.kind in "biufc" or dtype.name == "bfloat16"


_STORABLE = "bool, integer, floating point, complex or bfloat16"


def _encode(tree: PyTree, path: str, leaves: list) -> Any:
    """Describe ``tree`` as JSON; its arrays are appended to ``leaves``."""
    join = lambda k: f"{path}/{k}" if path else str(k)
    if tree is None:
        return None
    if is_node(tree):
        fields, static = [], {}
        for f in dataclasses.fields(tree):
            v = getattr(tree, f.name)
            if f.metadata.get("pytree_node", True):
                fields.append([f.name, _encode(v, join(f.name), leaves)])
            else:
                try:
                    static[f.name] = _static_to_json(v)
                except TypeError as e:
                    raise ValueError(f"{join(f.name)}: cannot store {e} in a checkpoint") from None
        return {"node": tree.method, "class": type(tree).__name__, "static": static,
                "fields": fields}
    if isinstance(tree, QuantizedArray):  # a QLoRA base: codes, scales, layout as data
        return {"quantized": {k: _static_to_json(getattr(tree, k)) for k in _QUANT_STATIC},
                "fields": [[k, _encode(getattr(tree, k), join(k), leaves)]
                           for k in _QUANT_ARRAYS]}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        name = f"{type(tree).__module__}.{type(tree).__qualname__}"
        if name not in _state_types():
            raise ValueError(f"{path or '(root)'}: cannot store a {name} in a checkpoint (only "
                             "optax and jlora state types, dicts, lists, tuples and arrays)")
        return {"namedtuple": name,
                "fields": [[k, _encode(v, join(k), leaves)] for k, v in zip(tree._fields, tree)]}
    if isinstance(tree, (list, tuple)):
        return {type(tree).__name__: [_encode(v, join(i), leaves) for i, v in enumerate(tree)]}
    if isinstance(tree, dict):
        for k in tree:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise ValueError(f"{join(k)}: checkpoint dict keys must be str or int, got {k!r}")
        if len({type(k) for k in tree}) > 1:  # jax cannot sort them, so could not restore
            raise ValueError(f"{path or '(root)'}: checkpoint dict keys must be all str or all "
                             f"int, got {list(tree)}")
        return {"dict": [[k, _encode(v, join(k), leaves)] for k, v in tree.items()]}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
        dtype = getattr(tree, "dtype", None)
        x = jnp.asarray(tree) if dtype is None or _storable(dtype) else None
        if x is None or not _storable(x.dtype):
            raise ValueError(f"{path or '(root)'}: cannot store an array of dtype "
                             f"{dtype if x is None else x.dtype} in a checkpoint (only "
                             f"{_STORABLE} arrays)")
        if isinstance(x, jax.Array) and x.is_deleted():
            raise ValueError(f"{path or '(root)'}: the array has been deleted (donated to a "
                             "jitted call?); save the arrays that call returned")
        leaves.append(x)
        return {"leaf": len(leaves) - 1, "shape": list(x.shape), "dtype": x.dtype.name}
    if type(tree).__module__.startswith("flax.nnx"):  # a State, or a Variable inside one
        raise ValueError(f"{path or '(root)'}: cannot store a flax.nnx {type(tree).__name__} in "
                         "a checkpoint; save state.to_pure_dict() (nnx.replace_by_pure_dict(state, "
                         "restored['trainable']) puts the restored dict back)")
    raise ValueError(f"{path or '(root)'}: cannot store a {type(tree).__name__} in a checkpoint "
                     "(only adapter nodes, optax and jlora state types, dicts, lists, tuples, "
                     "None and arrays)")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bad(path: str, key: str | None, problem: str) -> ValueError:
    """A defect of the metadata: ``problem``, located by tree path and entry key."""
    if key is None:
        return ValueError(f"{problem} at {path}")
    return ValueError(f"{problem} in field {key!r} of {path}")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}"


def _pairs(desc: dict, key: str, path: str, names: type | tuple) -> list:
    """``desc[key]`` checked as a list of ``[name, entry]`` pairs with unique names."""
    pairs = desc.get(key)
    ok = isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], names)
        and not isinstance(p[0], bool) for p in pairs)
    if not ok:
        raise _bad(path, key, f"not a list of [name, entry] pairs: {_short(pairs)}")
    seen = [k for k, _ in pairs]
    if len(set(seen)) != len(seen):
        raise _bad(path, key, f"repeated names {sorted({k for k in seen if seen.count(k) > 1})}")
    return pairs


def _text(desc: dict, key: str, path: str) -> str:
    if not isinstance(desc.get(key), str):
        raise _bad(path, key, f"not a string: {_short(desc.get(key))}")
    return desc[key]


@functools.lru_cache(maxsize=None)
def _static_types(cls: type) -> dict[str, Any]:
    """The declared type of each static field of a node class (``Any`` where unknown)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a class annotated with names its module cannot resolve
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if not f.metadata.get("pytree_node", True)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a static value read from JSON has the declared type ``hint``: tuples,
    unions and the JSON scalars are checked; other declared types are not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_fits, value, args))
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, str, bool):
        return type(value) is hint
    if hint is float:
        return type(value) in (int, float)
    return True


def _decode(desc: Any, path: str, nodes: dict, states: dict, specs: list) -> PyTree:
    """Check a tree's description and rebuild the tree with each array's index as its leaf.

    ``path`` names the entry in errors (``trainable/q/kernel/a``); each array's
    ``{"shape", "dtype", "path"}`` is appended to ``specs`` in leaf order. Only
    adapter node classes and optax/jlora state types already defined are built;
    anything else in the description is a ``ValueError`` naming the path and field.
    """
    if desc is None:
        return None
    kinds = [k for k in _KINDS if isinstance(desc, dict) and k in desc]
    if len(kinds) != 1:
        raise _bad(path, None, f"unknown structure entry {_short(desc)}")
    kind = kinds[0]
    if kind == "leaf":
        return _decode_leaf(desc, path, specs)
    if kind == "node":
        return _decode_node(desc, path, nodes, states, specs)
    if kind == "quantized":
        return _decode_quantized(desc, path, nodes, states, specs)
    if kind == "namedtuple":
        name = _text(desc, "namedtuple", path)
        pairs = _pairs(desc, "fields", path, str)
        cls, keys = states.get(name), [k for k, _ in pairs]
        if cls is None or list(cls._fields) != keys:
            raise _bad(path, "namedtuple", f"unknown state type {name!r} with fields {keys}")
        return cls(*(_decode(v, _join(path, k), nodes, states, specs) for k, v in pairs))
    if kind == "dict":
        pairs = _pairs(desc, "dict", path, (str, int))
        if len({type(k) for k, _ in pairs}) > 1:  # jax sorts a dict's keys
            raise _bad(path, "dict", "keys mix str and int")
        return {k: _decode(v, _join(path, k), nodes, states, specs) for k, v in pairs}
    items = desc[kind]
    if not isinstance(items, list):
        raise _bad(path, kind, f"not a list: {_short(items)}")
    out = [_decode(v, _join(path, i), nodes, states, specs) for i, v in enumerate(items)]
    return out if kind == "list" else tuple(out)


_KINDS = ("leaf", "node", "quantized", "namedtuple", "dict", "list", "tuple")


def _decode_leaf(desc: dict, path: str, specs: list) -> int:
    index, shape, dtype = desc.get("leaf"), desc.get("shape"), desc.get("dtype")
    if type(index) is not int or index != len(specs):
        raise _bad(path, "leaf", f"array number {_short(index)} where {len(specs)} comes next")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise _bad(path, "shape", f"not a list of sizes >= 0: {_short(shape)}")
    if not isinstance(dtype, str):
        raise _bad(path, "dtype", f"not a dtype name: {_short(dtype)}")
    try:
        storable = _storable(dtype)
    except TypeError:
        raise _bad(path, "dtype", f"unknown dtype {_short(dtype)}") from None
    if not storable:
        raise _bad(path, "dtype", f"unsupported dtype {dtype!r} (only {_STORABLE})")
    specs.append({"shape": tuple(shape), "dtype": jnp.dtype(dtype), "path": path})
    return index


def _decode_node(desc: dict, path: str, nodes: dict, states: dict, specs: list):
    method, name = _text(desc, "node", path), _text(desc, "class", path)
    found = nodes.get((method, name), [])
    if not found:
        raise _bad(path, "node", f"unknown adapter node type {method!r} (class {name!r}; "
                                 f"known types: {sorted(m for m, _ in nodes)})")
    if len(found) > 1:
        raise _bad(path, "class", f"{len(found)} adapter node classes are called {name!r} "
                                  f"for method {method!r}")
    cls = found[0]
    types_ = _static_types(cls)
    arrays = [f.name for f in dataclasses.fields(cls) if f.name not in types_]
    static = desc.get("static")
    if not isinstance(static, dict):
        raise _bad(path, "static", f"not an object: {_short(static)}")
    unknown = sorted(set(static) - set(types_))
    if unknown:
        raise _bad(path, "static", f"{name} has no static field(s) {unknown} (it has "
                                   f"{sorted(types_)})")
    # a static field added to a node class after the checkpoint was written keeps its
    # default; an array field must be present
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name in types_
                     and f.name not in static and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise _bad(path, "static", f"{name} needs static field(s) {missing}")
    kwargs = {}
    for key, value in static.items():
        try:
            kwargs[key] = _static_from_json(value)
        except ValueError as e:
            raise _bad(path, f"static.{key}", str(e)) from None
        if not _fits(kwargs[key], types_[key]) or (
                key == "shape" and not all(n >= 0 for n in kwargs[key])):
            raise _bad(path, f"static.{key}", f"{_short(kwargs[key])} is not a "
                                              f"{_type_name(types_[key])}")
    if not isinstance(kwargs.get("config"), Config):
        raise _bad(path, "static.config", f"not a method config: {_short(kwargs.get('config'))}")
    owner = _config_owner(type(kwargs["config"]), nodes)
    if getattr(cls, "config_class", None) is not None and owner is not cls:
        # e.g. a DoRA config on a LoRANode: it would run as LoRA and look like DoRA
        raise _bad(path, "static.config",
                   f"a {type(kwargs['config']).__name__} config builds "
                   f"{'no adapter node' if owner is None else 'a ' + owner.__name__}, not a "
                   f"{name}")
    pairs = _pairs(desc, "fields", path, str)
    if sorted(k for k, _ in pairs) != sorted(arrays):
        raise _bad(path, "fields", f"{name} array fields {sorted(k for k, _ in pairs)} are "
                                   f"not {sorted(arrays)}")
    kwargs.update({k: _decode(v, _join(path, k), nodes, states, specs) for k, v in pairs})
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise _bad(path, "node", f"cannot build a {name} ({e})") from None


def _config_owner(config_type: type, nodes: dict) -> type | None:
    """The node class a config of ``config_type`` builds: the one whose ``config_class`` is
    the nearest class in ``config_type``'s MRO (a ``DoRA`` config: ``DoRANode``, though
    ``DoRA`` is a ``LoRA``); ``None`` when no node class claims any of them."""
    owners = {c.config_class: c for found in nodes.values() for c in found
              if getattr(c, "config_class", None) is not None}
    return next((owners[k] for k in config_type.__mro__ if k in owners), None)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


_QUANT_ARRAYS = ("codes", "absmax", "absmax2", "offset")
_QUANT_STATIC = ("quant", "block_size", "shape", "perm", "dtype", "n_stack")


def _decode_quantized(desc: dict, path: str, nodes: dict, states: dict,
                      specs: list) -> QuantizedArray:
    """A ``QuantizedArray`` from its description; its layout is checked, never evaluated."""
    static = desc["quantized"]
    if not isinstance(static, dict) or set(static) != set(_QUANT_STATIC):
        raise _bad(path, "quantized", f"not an object with keys {list(_QUANT_STATIC)}: "
                                      f"{_short(static)}")
    pairs = _pairs(desc, "fields", path, str)
    if [k for k, _ in pairs] != list(_QUANT_ARRAYS):
        raise _bad(path, "fields", f"quantized array fields {[k for k, _ in pairs]} are not "
                                   f"{list(_QUANT_ARRAYS)}")
    try:
        meta = {k: _static_from_json(v) for k, v in static.items()}
    except ValueError as e:
        raise _bad(path, "quantized", str(e)) from None
    shape, perm = meta["shape"], meta["perm"]
    ints = lambda t: isinstance(t, tuple) and all(type(n) is int and n >= 0 for n in t)
    if (meta["quant"] not in QUANTS or type(meta["block_size"]) is not int
            or meta["block_size"] < 2 or not ints(shape) or not ints(perm)
            or sorted(perm) != list(range(len(shape))) or type(meta["n_stack"]) is not int
            or not 0 <= meta["n_stack"] < max(len(shape), 1)
            or meta["dtype"] not in ("float32", "float16", "bfloat16", "float64")):
        raise _bad(path, "quantized", f"malformed quantized array layout {static!r}")
    return QuantizedArray(**meta, **{k: _decode(v, _join(path, k), nodes, states, specs)
                                     for k, v in pairs})


def _sharding_leaves(shardings: Any, skeleton: PyTree, n: int, name: str, where: str) -> list:
    """One sharding per array; a tree of them must have the checkpoint's array paths."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * n
    flat, _ = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    stored_flat, _ = jax.tree_util.tree_flatten_with_path(skeleton)
    given = [path_str(kp) for kp, _ in flat]
    stored = [path_str(kp) for kp, _ in stored_flat]
    if given != stored:
        first = next((i for i, (g, s) in enumerate(zip(given, stored)) if g != s),
                     min(len(given), len(stored)))
        g = given[first] if first < len(given) else "(nothing)"
        s = stored[first] if first < len(stored) else "(nothing)"
        raise ValueError(f"{where}: {name} shardings do not match the checkpoint at leaf "
                         f"#{first}: shardings have {g!r}, the checkpoint has {s!r}")
    out = [None] * n
    for (_, index), (_, sharding) in zip(stored_flat, flat):
        out[index] = sharding
    return out


# ---------------------------------------------------------------- public API


def save(directory: str, trainable: PyTree, *, step: int, opt_state: PyTree | None = None,
         spec: Spec | None = None, frozen: PyTree | None = None, keep: int | None = None,
         overwrite: bool = False) -> str:
    """Write step ``step`` under ``directory`` atomically; returns the step's path.

    Args:
      trainable: the trainable half from ``jlora.split`` (or any array tree). An
        ``nnx.State`` half is saved as its ``to_pure_dict()``, and
        ``nnx.replace_by_pure_dict(half, restored["trainable"])`` puts it back.
      step: the training step (an int; also the checkpoint's name).
      opt_state: the optax state, if any.
      spec: the ``jlora.Spec`` the adapters came from (restored as a Spec).
      frozen: also write the frozen half (base weights); off by default.
      keep: keep only the newest ``keep`` checkpoints in ``directory``.
      overwrite: replace an existing checkpoint of the same step (otherwise a
        ``ValueError``). The new step is written completely beside the old one
        and only then swapped in by renames, so a failed write (input that is
        refused, a full disk, an I/O error) leaves the old step as it was. A
        process killed between the two renames leaves the old step under
        ``.jlora-replaced-<step>``; the next ``Manager`` opened for writing
        (every ``save``) puts it back, and until then ``restore`` of that step
        (or of the latest, when it is the newest) is a ``ValueError`` saying so.
    """
    mgr = Manager(directory, keep=keep)
    exists = step in mgr.all_steps()
    if exists and not overwrite:
        raise ValueError(f"{mgr.directory}: a checkpoint for step {step} already exists "
                         "(pass overwrite=True to replace it)")
    arrays, meta = mgr._encode(step, trainable, opt_state=opt_state, spec=spec, frozen=frozen)
    if exists:
        _replace(mgr, step, arrays, meta)
        if keep is not None:  # as Orbax does for a save: the rewritten step counts as newest
            others = [s for s in mgr.all_steps() if s != step]
            for old in others[:max(len(others) - (keep - 1), 0)]:
                mgr.delete(old)
    else:
        mgr._write(step, arrays, meta)
    return os.path.join(mgr.directory, str(step))


_OVERWRITES = itertools.count()


def _left_aside(directory: str) -> list[int]:
    """The steps an overwrite renamed to ``.jlora-replaced-<step>`` (sorted)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    cut = len(".jlora-replaced-")
    return sorted(int(n[cut:]) for n in names
                  if n.startswith(".jlora-replaced-") and n[cut:].isdigit())


def _recover_replaced(directory: str) -> None:
    """Tidy what a process killed mid-overwrite left: an old step it had renamed aside
    (``.jlora-replaced-<step>``) goes back when ``<step>`` is missing (killed between
    ``_replace``'s two renames) and is deleted when the new step is in place; a staging
    directory (``.jlora-overwrite-<step>``, killed while writing) is deleted."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".jlora-overwrite-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".jlora-replaced-") and name[len(".jlora-replaced-"):].isdigit():
            final = os.path.join(directory, name[len(".jlora-replaced-"):])
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, final)


def _replace(mgr: "Manager", step: int, arrays: dict, meta: dict) -> None:
    """Replace the existing ``step`` of ``mgr`` without a moment where a failure loses it.

    Every process writes the new step through Orbax into a hidden staging
    directory beside the old one (same file system, so renames are atomic);
    then the primary process renames the old step aside, the new one into its
    place, and deletes the old one. A failure before the second rename leaves
    the old step in place and no staging directory behind.
    """
    multihost = _ocp().multihost
    primary = multihost.is_primary_host(0)
    final = os.path.join(mgr.directory, str(step))
    staging = os.path.join(mgr.directory, f".jlora-overwrite-{step}")
    aside = os.path.join(mgr.directory, f".jlora-replaced-{step}")
    # (what a killed overwrite left was tidied when the Manager opened for writing)
    # barrier names must be unique; every process overwrites in the same order
    call = next(_OVERWRITES)
    multihost.sync_global_processes(f"jlora_overwrite_start_{step}_{call}")
    swap_error = None
    try:
        Manager(staging, keep=None)._write(step, arrays, meta)
        if primary:
            try:
                _swap(final, os.path.join(staging, str(step)), aside)
            except BaseException as e:  # raised below, once every process knows
                swap_error = e
    finally:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
    # the other processes learn whether the primary swapped the new step in, rather than
    # waiting at the barrier below for a process that has already raised
    failed = swap_error is not None
    if multihost.process_count() > 1:
        failed = bool(multihost.broadcast_one_to_all(np.int32(failed)))
    multihost.sync_global_processes(f"jlora_overwrite_done_{step}_{call}")
    if swap_error is not None:
        raise swap_error
    if failed:
        raise OSError(f"{final}: the primary process could not swap the rewritten step in "
                      "(its own error says why); the old step is in place")


def _swap(final: str, new: str, aside: str) -> None:
    """Rename ``final`` aside, ``new`` into its place, then delete the old step; if the second
    rename fails, put the old step back (or leave it aside for the next writer to restore)."""
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except BaseException:
        try:
            os.rename(aside, final)
        except OSError:  # put back by the next Manager opened for writing
            pass
        raise
    shutil.rmtree(aside, ignore_errors=True)


def restore(directory: str, step: int | None = None, *, spec: Spec | None = None,
            onto: PyTree | None = None, shardings: Any = None,
            opt_shardings: Any = None) -> dict:
    """Read a checkpoint: ``{"trainable", "opt_state", "step", "spec"}`` (+ ``"frozen"``).

    Args:
      step: which step; default the latest.
      spec: if given, the checkpoint's spec must equal it (a checkpoint from a
        different spec is a ``ValueError`` naming the first adapted path whose
        method config differs).
      onto: the frozen half (``jlora.split(jlora.apply(params, spec, ...))[1]``)
        to restore onto: every stored adapter must find a node of the same
        method, config and base shape at its path (else a ``ValueError``
        naming the first mismatching path), and the result gains
        ``"adapted"`` = ``jlora.combine(trainable, onto)``. The frozen
        fields a method draws from ``apply``'s key (LoRA-FA's ``a``, a random
        ``Sparse`` mask's indices) come from ``onto``, not from the
        checkpoint: build ``onto`` with the key of the run that saved, or save
        with ``frozen=`` to carry them.
      shardings / opt_shardings: a ``Sharding`` for every leaf, or a tree of
        them matching ``trainable`` / ``opt_state``, to restore directly onto a
        mesh (e.g. ``jlora.sharding.named(t_specs, mesh)``).
    """
    return Manager(directory, create=False).restore(step, spec=spec, onto=onto,
                                                    shardings=shardings,
                                                    opt_shardings=opt_shardings)


class Manager:
    """Periodic checkpoints: ``save`` every ``every`` steps, keep the newest ``keep``.

    ``keep=None`` keeps every checkpoint; ``keep`` and ``every`` must be
    integers ``>= 1``.

    Example::

        mgr = jlora.checkpoint.Manager("runs/ckpt", keep=3, every=100)
        start = mgr.latest_step() or 0
        if start:
            state = mgr.restore()
            trainable, opt_state = state["trainable"], state["opt_state"]
        for step in range(start + 1, total + 1):
            trainable, opt_state, loss = train_step(trainable, opt_state, batch)
            mgr.save(step, trainable, opt_state=opt_state, spec=spec)
    """

    def __init__(self, directory: str, *, keep: int | None = 3, every: int = 1,
                 create: bool = True):
        if keep is not None:
            positive_int("jlora.checkpoint.Manager", "keep", keep)
        self.every = positive_int("jlora.checkpoint.Manager", "every", every)
        try:
            self.directory = os.path.abspath(os.fspath(directory))
        except TypeError:
            raise ValueError(f"jlora.checkpoint: directory must be a path, got {directory!r}") from None
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"{self.directory}: not a directory, so not a jlora checkpoint")
        if not create and not os.path.isdir(self.directory):
            raise ValueError(f"no checkpoint directory at {self.directory}")
        ocp = _ocp()
        if create and ocp.multihost.is_primary_host(0):
            # a writer tidies a killed overwrite; Orbax's own barrier (create=True) follows
            _recover_replaced(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=False)
        self._orbax = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._orbax.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` (a ``ValueError`` if there is none)."""
        if step not in self.all_steps():
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; "
                             f"have {self.all_steps()}")
        self._orbax.delete(step)

    def save(self, step: int, trainable: PyTree, *, opt_state: PyTree | None = None,
             spec: Spec | None = None, frozen: PyTree | None = None, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``every`` (or ``force``); True if written."""
        positive_int("jlora.checkpoint", "step", step, minimum=0)
        if trainable is None:
            raise ValueError("jlora.checkpoint: trainable must be a tree of arrays, got None")
        if spec is not None and not isinstance(spec, Spec):
            raise ValueError(f"jlora.checkpoint: spec must be a jlora.Spec, got {type(spec).__name__}")
        if not force and step % self.every:
            return False
        if step in self._orbax.all_steps():
            raise ValueError(f"{self.directory}: a checkpoint for step {step} already exists")
        self._write(step, *self._encode(step, trainable, opt_state=opt_state, spec=spec,
                                        frozen=frozen))
        return True

    def _encode(self, step: int, trainable: PyTree, *, opt_state: PyTree | None,
                spec: Spec | None, frozen: PyTree | None) -> tuple[dict, dict]:
        """Check the inputs and describe them: ``(arrays, metadata)``; writes nothing."""
        positive_int("jlora.checkpoint", "step", step, minimum=0)
        if trainable is None:
            raise ValueError("jlora.checkpoint: trainable must be a tree of arrays, got None")
        if spec is not None and not isinstance(spec, Spec):
            raise ValueError(f"jlora.checkpoint: spec must be a jlora.Spec, got {type(spec).__name__}")
        arrays, meta = {}, {"format": FORMAT, "step": int(step),
                            "spec": None if spec is None else spec_to_json(spec)}
        for name, tree in zip(_PARTS, (trainable, opt_state, frozen)):
            if tree is not None:
                leaves: list = []
                meta[name] = _encode(tree, "", leaves)
                arrays[name] = {str(i): x for i, x in enumerate(leaves)}
        return arrays, meta

    def _meta(self, step: int, where: str) -> Any:
        """The JSON metadata of ``step``; a ValueError naming ``where`` if unreadable."""
        ocp = _ocp()
        try:
            return self._orbax.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a damaged directory
            raise ValueError(f"{where}: not a jlora checkpoint or unreadable metadata "
                             f"({type(e).__name__}: {e})") from None

    def _write(self, step: int, arrays: dict, meta: dict) -> None:
        """Write one step; if that fails, remove what Orbax had written of it and re-raise."""
        ocp = _ocp()
        try:
            self._orbax.save(int(step), args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
            self._orbax.wait_until_finished()
        except BaseException:
            # Orbax writes under "<step>.orbax-checkpoint-tmp..." and renames when complete
            partial = f"{int(step)}.orbax-checkpoint-tmp"
            try:  # tidying must not hide the error being raised
                names = os.listdir(self.directory) if ocp.multihost.is_primary_host(0) else []
            except OSError:
                names = []
            for name in names:
                if name.startswith(partial):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            raise

    def _not_a_checkpoint(self) -> ValueError:
        entries = sorted(os.listdir(self.directory))
        if not entries:
            return ValueError(f"no checkpoint in {self.directory} (the directory is empty)")
        if "meta" in entries and "arrays" in entries:
            parent, name = os.path.split(self.directory)
            return ValueError(f"{self.directory} is one step of a jlora checkpoint: restore "
                              f"{parent!r} with step={name}")
        return ValueError(f"{self.directory} is not a jlora checkpoint directory (no step "
                          f"written by jlora.checkpoint; it holds {entries[:5]})")

    def restore(self, step: int | None = None, *, spec: Spec | None = None,
                onto: PyTree | None = None, shardings: Any = None,
                opt_shardings: Any = None) -> dict:
        """Read one step (default the latest); see :func:`restore`."""
        ocp = _ocp()
        steps = self.all_steps()
        if step is not None:
            positive_int("jlora.checkpoint", "step", step, minimum=0)
        # a reader never renames (a writer may be between its two renames): it says so
        aside = [s for s in _left_aside(self.directory) if s not in steps]
        missing = step if step in aside else (
            aside[-1] if step is None and aside and (not steps or aside[-1] > steps[-1])
            else None)
        if missing is not None:
            raise ValueError(
                f"{self.directory}: step {missing} is under .jlora-replaced-{missing}, where an "
                "overwrite killed between its two renames left it; opening the directory for "
                f"writing (jlora.checkpoint.Manager({self.directory!r}), as every save does) "
                "puts it back")
        if not steps:
            raise self._not_a_checkpoint()
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        where = os.path.join(self.directory, str(step))
        meta = self._meta(step, where)
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt in _OLD_FORMATS:
            raise ValueError(
                f"{where}: written by jlora 0.1.0, which stored its tree structure as a pickle; "
                "jlora never unpickles checkpoint files (a crafted one could run code). Re-save "
                "it with jlora.checkpoint.upgrade(old_directory, new_directory, trainable=..., "
                "opt_state=...), given trees of the same structure (e.g. from jlora.split("
                "jlora.apply(params, spec, key=...)) and tx.init), and only if you trust it")
        if fmt != FORMAT:
            raise ValueError(f"{where}: not a jlora checkpoint (format {fmt!r})")
        try:
            saved_spec, specs, skeletons = _read_meta(meta, step)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{where}: malformed checkpoint metadata ({e})") from None
        _check_stored(self._stored(where), specs, where)
        parts = list(specs)
        if spec is not None:
            _check_spec(skeletons.get("trainable"), saved_spec, spec, where)
        if onto is not None:
            _check_onto(skeletons.get("trainable"), onto, where)
        given = {"trainable": shardings, "opt_state": opt_shardings, "frozen": None}
        targets = {}
        for name in parts:
            flat = _sharding_leaves(given[name], skeletons[name], len(specs[name]), name, where)
            targets[name] = {str(i): jax.ShapeDtypeStruct(s["shape"], s["dtype"], sharding=sh)
                             for i, (s, sh) in enumerate(zip(specs[name], flat))}
        try:
            arrays = self._orbax.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(targets)))["arrays"]
        except Exception as e:
            raise ValueError(f"{where}: unreadable checkpoint arrays ({type(e).__name__}: {e})") from None
        out = {"step": step, "spec": saved_spec, "trainable": None, "opt_state": None}
        for name in parts:
            out[name] = jax.tree.map(lambda i, name=name: arrays[name][str(i)], skeletons[name])
        if onto is not None:
            from jlora.core import combine

            try:
                out["adapted"] = combine(out["trainable"], onto)
            except ValueError as e:
                raise ValueError(f"{where}: cannot restore onto the tree given ({e})") from None
        return out

    def _stored(self, where: str) -> dict:
        """``{part: {index: (shape, dtype)}}`` of the arrays Orbax wrote in step ``where``."""
        ocp = _ocp()
        from etils import epath

        try:
            tree = ocp.StandardCheckpointHandler().metadata(epath.Path(where) / "arrays")
            tree = getattr(tree, "tree", tree)
            return {name: {str(i): (getattr(x, "shape", None), getattr(x, "dtype", None))
                           for i, x in dict(part).items()}
                    for name, part in dict(tree).items()}
        except Exception as e:  # orbax raises many types for a damaged directory
            raise ValueError(f"{where}: unreadable checkpoint arrays ({type(e).__name__}: "
                             f"{e})") from None


def _read_meta(meta: dict, step: int) -> tuple[Spec | None, dict, dict]:
    """Check jlora's metadata of ``step``: ``(spec, {part: leaf specs}, {part: skeleton})``.

    Every field read is checked; a ``ValueError`` names the field (and, inside a
    tree, its path). Nothing is evaluated or unpickled.
    """
    if type(meta.get("step")) is not int or meta["step"] != step:
        raise ValueError(f"step {_short(meta.get('step'))} in field 'step', but the checkpoint "
                         f"is step {step}")
    try:
        spec = None if meta.get("spec") is None else spec_from_json(meta["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{e} in field 'spec'") from None
    nodes, states = _node_classes(), _state_types()
    specs, skeletons = {}, {}
    for name in _PARTS:
        if name in meta:
            specs[name] = []
            skeletons[name] = _decode(meta[name], name, nodes, states, specs[name])
    return spec, specs, skeletons


def _check_stored(stored: dict, specs: dict, where: str) -> None:
    """The arrays jlora's metadata describes must be the arrays Orbax stored: same count,
    shapes and dtypes (Orbax would otherwise cast a dtype edited in the metadata)."""
    for name in _PARTS:
        have, want = stored.get(name, {}), specs.get(name, [])
        if set(have) != {str(i) for i in range(len(want))}:
            raise ValueError(f"{where}: malformed checkpoint metadata (field {name!r} "
                             f"describes {len(want)} arrays, the step holds {len(have)})")
        for i, s in enumerate(want):
            shape, dtype = have[str(i)]  # None where Orbax does not say
            if shape is not None and s["shape"] != tuple(shape):
                raise ValueError(f"{where}: malformed checkpoint metadata (shape "
                                 f"{list(s['shape'])} in field 'shape' of {s['path']}, but the "
                                 f"stored array has shape {list(shape)})")
            if dtype is not None and s["dtype"] != jnp.dtype(dtype):
                raise ValueError(f"{where}: malformed checkpoint metadata (dtype "
                                 f"{s['dtype'].name!r} in field 'dtype' of {s['path']}, but the "
                                 f"stored array has dtype {jnp.dtype(dtype).name!r})")


def _nodes(tree: PyTree) -> dict:
    return {p: x for p, x in leaves_with_paths(tree) if is_node(x)}


def _check_spec(trainable: PyTree, saved: Spec | None, spec: Spec, where: str) -> None:
    if not isinstance(spec, Spec):
        raise ValueError(f"jlora.checkpoint.restore: spec must be a jlora.Spec, got {type(spec).__name__}")
    for path, node in _nodes(trainable).items():
        # a module-level node is matched by its module's path, beside which it sits
        where_, level = (node.path, "module") if is_module_node(node) else (path, "leaf")
        if spec.match(where_, level=level) != node.config:
            raise ValueError(f"{where}: checkpoint was written for a different spec: at {path} "
                             f"the checkpoint holds {node.config!r}, the spec gives "
                             f"{spec.match(where_, level=level)!r}")
    if saved is None or saved != spec:
        raise ValueError(f"{where}: checkpoint was written for a different spec:\n"
                         f"  checkpoint: {saved!r}\n  expected:   {spec!r}")


def _check_onto(trainable: PyTree, onto: PyTree, where: str) -> None:
    have = _nodes(onto)
    for path, node in _nodes(trainable).items():
        other = have.get(path)
        if other is None:
            raise ValueError(f"{where}: the checkpoint adapts {path}, which the tree to restore "
                             "onto has no adapter node for")
        for what in ("method", "config", "shape"):
            if getattr(node, what) != getattr(other, what):
                raise ValueError(f"{where}: at {path} the checkpoint has {what} "
                                 f"{getattr(node, what)!r}, the tree to restore onto has "
                                 f"{getattr(other, what)!r}")


def _old_leaves(part: Any, name: str, where: str) -> list[tuple[list[int], str]]:
    """The ``[shape, dtype]`` list of one tree in jlora 0.1.0 metadata, checked."""
    stored = part.get("leaves") if isinstance(part, dict) else None
    if not isinstance(stored, list):
        raise ValueError(f"{where}: malformed jlora 0.1.0 metadata ({name} has no list of "
                         "leaves)")
    for i, entry in enumerate(stored):
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
              and all(type(n) is int and n >= 0 for n in entry[0])
              and isinstance(entry[1], str))
        try:
            ok = ok and _storable(entry[1])
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{where}: malformed jlora 0.1.0 metadata ({name} array #{i} is "
                             f"{entry!r}, not [shape, dtype] of a {_STORABLE} dtype)")
    return stored


def upgrade(old_directory: str, new_directory: str, *, trainable: PyTree,
            opt_state: PyTree | None = None, frozen: PyTree | None = None,
            step: int | None = None) -> str:
    """Re-save a jlora 0.1.0 checkpoint in this version's format, without unpickling it.

    0.1.0 stored each tree's arrays in flattening order next to a pickled
    structure. ``upgrade`` ignores the pickle and pours the arrays into the
    structures of the trees you pass (``trainable`` / ``opt_state`` /
    ``frozen``: any trees of the same structure, e.g. from ``jlora.split(
    jlora.apply(params, spec, key=...))`` and ``tx.init``); every array's
    count, shape and dtype must agree. Writes step ``step`` (default the
    latest) to ``new_directory`` and returns its path.
    """
    ocp = _ocp()
    old = Manager(old_directory, create=False)
    steps = old.all_steps()
    if not steps:
        raise old._not_a_checkpoint()
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {old.directory}; have {steps}")
    where = os.path.join(old.directory, str(step))
    meta = old._meta(step, where)
    if not isinstance(meta, dict) or meta.get("format") not in _OLD_FORMATS:
        raise ValueError(f"{where}: not a jlora 0.1.0 checkpoint")
    meta_file = os.path.join(where, "meta", "metadata")
    if type(meta.get("step")) is not int or meta["step"] < 0:
        raise ValueError(f"{meta_file}: malformed jlora 0.1.0 metadata (step "
                         f"{meta.get('step')!r})")
    given = {"trainable": trainable, "opt_state": opt_state, "frozen": frozen}
    targets, treedefs = {}, {}
    for name in _PARTS:
        if name not in meta:
            continue
        if given[name] is None:
            raise ValueError(f"{where}: holds {name}; pass {name}= a tree of its structure")
        leaves, treedefs[name] = jax.tree.flatten(given[name])
        stored = _old_leaves(meta[name], name, meta_file)
        if len(leaves) != len(stored):
            raise ValueError(f"{where}: {name} has {len(stored)} arrays, the tree given has "
                             f"{len(leaves)}")
        for i, ((shape, dtype), x) in enumerate(zip(stored, leaves)):
            if tuple(shape) != tuple(np.shape(x)) or jnp.dtype(dtype) != jnp.asarray(x).dtype:
                raise ValueError(f"{where}: {name} array #{i} is {dtype}{list(shape)}, the tree "
                                 f"given has {jnp.asarray(x).dtype}{list(np.shape(x))} there")
        targets[name] = {str(i): jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d))
                         for i, (s, d) in enumerate(stored)}
    try:
        spec = None if meta.get("spec") is None else spec_from_json(meta["spec"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{meta_file}: malformed jlora 0.1.0 metadata (spec: {e})") from None
    _check_stored(old._stored(where), {
        n: [{"shape": t.shape, "dtype": t.dtype, "path": f"{n} array #{i}"}
            for i, t in enumerate(targets[n].values())] for n in targets}, where)
    try:
        arrays = old._orbax.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(targets)))["arrays"]
    except Exception as e:
        raise ValueError(f"{where}: unreadable checkpoint arrays ({type(e).__name__}: "
                         f"{e})") from None
    trees = {n: jax.tree.unflatten(treedefs[n], [arrays[n][str(i)] for i in range(len(targets[n]))])
             for n in targets}
    return save(new_directory, trees["trainable"], step=int(meta["step"]), spec=spec,
                opt_state=trees.get("opt_state"), frozen=trees.get("frozen"))
