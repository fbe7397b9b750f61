"""Orbax checkpoints of the trainable adapter tree, optimizer state, step and spec.

Only ``trainable`` (the factors, from ``jlora.split``) is written, never the
frozen base weights unless you pass ``frozen=``. Each save is one Orbax step
directory, written under a temporary name and renamed when complete, so a
crash mid-save leaves the previous checkpoint intact and loadable.

Everything but the arrays travels as plain JSON data: the spec's rules, and
each tree's structure (containers and their keys, ``None`` holes, each adapter
node's class, method config and static fields, optax state types, each
array's shape and dtype). A restore rebuilds the trees from that description
through the method registry (``jlora.methods``) and the optax/jlora state
types already loaded; nothing read from a checkpoint is unpickled, evaluated
or imported, so a crafted checkpoint directory cannot run code. Checkpoints
written by jlora 0.1.0 (whose structure was a pickle) are refused with a
``ValueError`` saying how to re-save them (:func:`upgrade`).

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
import os
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
    if isinstance(value, dict):
        if set(value) == {"config"}:
            return config_from_dict(value["config"])
        if set(value) == {"tuple"}:
            return tuple(_static_from_json(v) for v in value["tuple"])
        raise ValueError(f"unknown static value {value!r}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"unknown static value {value!r}")


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
        return {"dict": [[k, _encode(v, join(k), leaves)] for k, v in tree.items()]}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
        dtype = getattr(tree, "dtype", None)
        x = jnp.asarray(tree) if dtype is None or _storable(dtype) else None
        if x is None or not _storable(x.dtype):
            raise ValueError(f"{path or '(root)'}: cannot store an array of dtype "
                             f"{dtype if x is None else x.dtype} in a checkpoint (only "
                             f"{_STORABLE} arrays)")
        leaves.append(x)
        return {"leaf": len(leaves) - 1, "shape": list(x.shape), "dtype": x.dtype.name}
    raise ValueError(f"{path or '(root)'}: cannot store a {type(tree).__name__} in a checkpoint "
                     "(only adapter nodes, optax and jlora state types, dicts, lists, tuples, "
                     "None and arrays)")


def _leaf_specs(desc: Any) -> list[dict]:
    """The ``{"leaf", "shape", "dtype", "path"}`` entries of a description, in order."""
    out = []

    def walk(d):
        if d is None:
            return
        if not isinstance(d, dict) or len(d) == 0:
            raise ValueError(f"malformed structure entry {d!r}")
        if "leaf" in d:
            if (not isinstance(d["leaf"], int) or d["leaf"] != len(out)
                    or not isinstance(d.get("shape"), list)
                    or not all(isinstance(n, int) and n >= 0 for n in d["shape"])):
                raise ValueError(f"malformed array entry {d!r}")
            if not isinstance(d.get("dtype"), str):
                raise ValueError(f"malformed array entry {d!r}")
            if not _storable(d["dtype"]):
                raise ValueError(f"unsupported dtype {d.get('dtype')!r}")
            out.append(d)
            return
        for key in ("dict", "namedtuple", "node", "quantized"):
            if key in d:
                for pair in d["fields" if key != "dict" else "dict"]:
                    walk(pair[1])
                return
        for key in ("list", "tuple"):
            if key in d:
                for v in d[key]:
                    walk(v)
                return
        raise ValueError(f"unknown structure entry {sorted(d)}")

    walk(desc)
    return out


def _decode(desc: Any, nodes: dict, states: dict) -> PyTree:
    """Rebuild a tree from its description with each array's index as its leaf.

    Only adapter node classes and optax/jlora state types already defined are
    built; anything else in the description is an error.
    """
    if desc is None:
        return None
    if "leaf" in desc:
        return desc["leaf"]
    if "node" in desc:
        found = nodes.get((desc["node"], desc["class"]), [])
        if not found:
            raise ValueError(f"unknown adapter node type {desc['node']!r} ({desc['class']!r}); "
                             f"known: {sorted(m for m, _ in nodes)}")
        if len(found) > 1:
            raise ValueError(f"{len(found)} adapter node classes are called {desc['class']!r} "
                             f"for method {desc['node']!r}")
        cls = found[0]
        kwargs = {k: _static_from_json(v) for k, v in desc["static"].items()}
        kwargs.update({k: _decode(v, nodes, states) for k, v in desc["fields"]})
        names = {f.name for f in dataclasses.fields(cls)}
        # a static field added to a node class after the checkpoint was written keeps its
        # default; an array field must be present
        names -= {f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                  and not f.metadata.get("pytree_node", True)
                  and f.default is not dataclasses.MISSING}
        if set(kwargs) != names:
            raise ValueError(f"{desc['node']} fields {sorted(kwargs)} are not {sorted(names)}")
        return cls(**kwargs)
    if "quantized" in desc:
        return _decode_quantized(desc, nodes, states)
    if "namedtuple" in desc:
        cls = states.get(desc["namedtuple"])
        keys = [k for k, _ in desc["fields"]]
        if cls is None or list(cls._fields) != keys:
            raise ValueError(f"unknown state type {desc['namedtuple']!r} with fields {keys}")
        return cls(*(_decode(v, nodes, states) for _, v in desc["fields"]))
    if "dict" in desc:
        return {k: _decode(v, nodes, states) for k, v in desc["dict"]}
    if "list" in desc:
        return [_decode(v, nodes, states) for v in desc["list"]]
    if "tuple" in desc:
        return tuple(_decode(v, nodes, states) for v in desc["tuple"])
    raise ValueError(f"unknown structure entry {sorted(desc)}")


_QUANT_ARRAYS = ("codes", "absmax", "absmax2", "offset")
_QUANT_STATIC = ("quant", "block_size", "shape", "perm", "dtype", "n_stack")


def _decode_quantized(desc: dict, nodes: dict, states: dict) -> QuantizedArray:
    """A ``QuantizedArray`` from its description; its layout is checked, never evaluated."""
    static, fields = desc["quantized"], desc["fields"]
    if not isinstance(static, dict) or set(static) != set(_QUANT_STATIC) or [
            k for k, _ in fields] != list(_QUANT_ARRAYS):
        raise ValueError(f"malformed quantized array entry {sorted(desc)}")
    meta = {k: _static_from_json(v) for k, v in static.items()}
    shape, perm = meta["shape"], meta["perm"]
    ints = lambda t: isinstance(t, tuple) and all(type(n) is int and n >= 0 for n in t)
    if (meta["quant"] not in QUANTS or type(meta["block_size"]) is not int
            or meta["block_size"] < 2 or not ints(shape) or not ints(perm)
            or sorted(perm) != list(range(len(shape))) or type(meta["n_stack"]) is not int
            or not 0 <= meta["n_stack"] < max(len(shape), 1)
            or meta["dtype"] not in ("float32", "float16", "bfloat16", "float64")):
        raise ValueError(f"malformed quantized array layout {static!r}")
    return QuantizedArray(**meta, **{k: _decode(v, nodes, states) for k, v in fields})


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
      trainable: the trainable half from ``jlora.split`` (or any array tree).
      step: the training step (an int; also the checkpoint's name).
      opt_state: the optax state, if any.
      spec: the ``jlora.Spec`` the adapters came from (restored as a Spec).
      frozen: also write the frozen half (base weights); off by default.
      keep: keep only the newest ``keep`` checkpoints in ``directory``.
      overwrite: replace an existing checkpoint of the same step (otherwise a
        ``ValueError``). The new trees are checked and encoded first, so input
        that is refused leaves the old step in place; Orbax cannot rename over
        an existing step, so the old step is then deleted just before the new
        one is written.
    """
    mgr = Manager(directory, keep=keep)
    exists = step in mgr.all_steps()
    if exists and not overwrite:
        raise ValueError(f"{mgr.directory}: a checkpoint for step {step} already exists "
                         "(pass overwrite=True to replace it)")
    arrays, meta = mgr._encode(step, trainable, opt_state=opt_state, spec=spec, frozen=frozen)
    if exists:
        mgr.delete(step)
    mgr._write(step, arrays, meta)
    return os.path.join(mgr.directory, str(step))


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
        ocp = _ocp()
        self._orbax.save(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self._orbax.wait_until_finished()

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
        if not steps:
            raise self._not_a_checkpoint()
        step = steps[-1] if step is None else positive_int("jlora.checkpoint", "step", step,
                                                           minimum=0)
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
            saved_spec = None if meta.get("spec") is None else spec_from_json(meta["spec"])
            parts = [n for n in _PARTS if n in meta]
            specs = {n: _leaf_specs(meta[n]) for n in parts}
            skeletons = {n: _decode(meta[n], _node_classes(), _state_types()) for n in parts}
            saved_step = positive_int("checkpoint", "step", meta["step"], minimum=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{where}: malformed checkpoint metadata ({e})") from None
        if spec is not None:
            _check_spec(skeletons.get("trainable"), saved_spec, spec, where)
        if onto is not None:
            _check_onto(skeletons.get("trainable"), onto, where)
        given = {"trainable": shardings, "opt_state": opt_shardings, "frozen": None}
        targets = {}
        for name in parts:
            flat = _sharding_leaves(given[name], skeletons[name], len(specs[name]), name, where)
            targets[name] = {str(i): jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]),
                                                          sharding=sh)
                             for i, (s, sh) in enumerate(zip(specs[name], flat))}
        try:
            arrays = self._orbax.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(targets)))["arrays"]
        except Exception as e:
            raise ValueError(f"{where}: unreadable checkpoint arrays ({type(e).__name__}: {e})") from None
        out = {"step": saved_step, "spec": saved_spec, "trainable": None, "opt_state": None}
        for name in parts:
            out[name] = jax.tree.map(lambda i, name=name: arrays[name][str(i)], skeletons[name])
        if onto is not None:
            from jlora.core import combine

            out["adapted"] = combine(out["trainable"], onto)
        return out


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
