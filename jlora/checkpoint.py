"""Orbax checkpoints of the trainable adapter tree, optimizer state, step and spec.

Only ``trainable`` (the factors, from ``jlora.split``) is written, never the
frozen base weights unless you pass ``frozen=``. Each save is one Orbax step
directory, written under a temporary name and renamed when complete, so a
crash mid-save leaves the previous checkpoint intact and loadable. The spec
travels as JSON; the tree structures (adapter nodes, ``None`` holes, optax
state) travel as pickled ``PyTreeDef``s, so a restore needs no template and
no code that rebuilds the spec. Only restore checkpoints you trust: a pickled
structure can run code when loaded, as any pickle can.

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

import base64
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.spec import Spec, spec_from_json, spec_to_json

PyTree = Any
FORMAT = "jlora-checkpoint/1"
_PARTS = ("trainable", "opt_state", "frozen")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _manager(directory: str, keep: int | None, *, create: bool):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _pack(tree: PyTree):
    leaves, treedef = jax.tree.flatten(tree)
    arrays = {str(i): jnp.asarray(x) for i, x in enumerate(leaves)}
    meta = {
        "treedef": base64.b64encode(pickle.dumps(treedef)).decode("ascii"),
        "leaves": [[list(np.shape(x)), str(jnp.asarray(x).dtype)] for x in leaves],
    }
    return arrays, meta


def _unpack(arrays: dict, meta: dict) -> PyTree:
    treedef = pickle.loads(base64.b64decode(meta["treedef"]))
    return jax.tree.unflatten(treedef, [arrays[str(i)] for i in range(len(meta["leaves"]))])


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
        ``ValueError``). Orbax cannot rename over an existing step, so the old
        step is deleted before the new one is written.
    """
    mgr = Manager(directory, keep=keep)
    if step in mgr.all_steps():
        if not overwrite:
            raise ValueError(f"{mgr.directory}: a checkpoint for step {step} already exists "
                             "(pass overwrite=True to replace it)")
        mgr._mgr.delete(step)
    mgr.save(step, trainable, opt_state=opt_state, spec=spec, frozen=frozen, force=True)
    return os.path.join(os.path.abspath(directory), str(step))


def restore(directory: str, step: int | None = None, *, spec: Spec | None = None,
            shardings: Any = None, opt_shardings: Any = None) -> dict:
    """Read a checkpoint: ``{"trainable", "opt_state", "step", "spec"}`` (+ ``"frozen"``).

    Args:
      step: which step; default the latest.
      spec: if given, the checkpoint's spec must equal it (a checkpoint from a
        different spec is a ``ValueError`` naming the directory and the rules).
      shardings / opt_shardings: a ``Sharding`` for every leaf, or a tree of
        them matching ``trainable`` / ``opt_state``, to restore directly onto a
        mesh (e.g. ``jlora.sharding.named(t_specs, mesh)``).
    """
    return Manager(directory, create=False).restore(step, spec=spec, shardings=shardings,
                                                    opt_shardings=opt_shardings)


class Manager:
    """Periodic checkpoints: ``save`` every ``every`` steps, keep the newest ``keep``.

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
        if every < 1:
            raise ValueError(f"Manager: every must be >= 1, got {every}")
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise ValueError(f"no checkpoint directory at {self.directory}")
        self.every = every
        self._mgr = _manager(self.directory, keep, create=create)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, trainable: PyTree, *, opt_state: PyTree | None = None,
             spec: Spec | None = None, frozen: PyTree | None = None, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``every`` (or ``force``); True if written."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        if not force and step % self.every:
            return False
        if step in self._mgr.all_steps():
            raise ValueError(f"{self.directory}: a checkpoint for step {step} already exists")
        ocp = _ocp()
        arrays, meta = {}, {"format": FORMAT, "step": int(step),
                            "spec": None if spec is None else spec_to_json(spec)}
        for name, tree in zip(_PARTS, (trainable, opt_state, frozen)):
            if tree is not None:
                arrays[name], meta[name] = _pack(tree)
        self._mgr.save(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self._mgr.wait_until_finished()
        return True

    def restore(self, step: int | None = None, *, spec: Spec | None = None,
                shardings: Any = None, opt_shardings: Any = None) -> dict:
        ocp = _ocp()
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a damaged directory
            raise ValueError(f"{where}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{where}: not a jlora checkpoint (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
        saved_spec = None if meta.get("spec") is None else spec_from_json(meta["spec"])
        if spec is not None and (saved_spec is None or spec_to_json(spec) != meta["spec"]):
            raise ValueError(
                f"{where}: checkpoint was written for a different spec:\n"
                f"  checkpoint: {saved_spec!r}\n  expected:   {spec!r}")
        targets = {}
        for name, sh in (("trainable", shardings), ("opt_state", opt_shardings), ("frozen", None)):
            if name in meta:
                targets[name] = self._abstract(meta[name], sh, name, where)
        try:
            arrays = self._mgr.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(targets)))["arrays"]
        except Exception as e:
            raise ValueError(f"{where}: unreadable checkpoint arrays ({type(e).__name__}: {e})") from None
        out = {"step": int(meta["step"]), "spec": saved_spec,
               "trainable": None, "opt_state": None}
        for name in targets:
            out[name] = _unpack(arrays[name], meta[name])
        return out

    @staticmethod
    def _abstract(meta: dict, shardings: Any, name: str, where: str) -> dict:
        n = len(meta["leaves"])
        if shardings is None:
            flat = [None] * n
        elif isinstance(shardings, jax.sharding.Sharding):
            flat = [shardings] * n
        else:
            flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
            if len(flat) != n:
                raise ValueError(f"{where}: {name} shardings have {len(flat)} leaves, "
                                 f"the checkpoint has {n}")
        return {str(i): jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=s)
                for i, ((shape, dtype), s) in enumerate(zip(meta["leaves"], flat))}
