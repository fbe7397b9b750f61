"""Adapters that shard like their base weights.

``specs(adapted, base_specs)`` derives every adapter field's ``PartitionSpec``
from its base weight's: for LoRA, ``a (fan_in, r)`` takes the spec of the base's
input axes, ``b (r, fan_out)`` that of its output axes, and the rank axis is
replicated. A flattened axis that several sharded axes fold into is sharded over
all of their mesh axes (major to minor) in contiguous blocks; that equals the
layout of the reshape of the base's sharding when only the most major of the
folded axes is sharded, and otherwise differs from it by a reshard of the
(small) factor, never in value. Method vectors follow the axis they scale
(``"out"``/``"in"`` in a node class's ``field_axes``). QLoRA's packed codes and
block scales shard with the base axes they store; given a ``mesh``
(:func:`place` and :func:`apply` pass theirs), a stored axis whose length the
mesh axes do not divide (``in/2`` codes or ``in/block_size`` scales over many
devices) keeps only the major mesh axes that divide it, or is replicated. A module-level node (``jlora.AdaptFormer``) has no base
leaf: its ``base_spec`` hook derives the spec of its ``(d_in, d_out)`` view from
the specs of its module's leaves (``None``: every field replicated).

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"q": {"kernel": jnp.ones((8, 8))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"q/kernel": jlora.LoRA(rank=2)}),
    ...                       key=jax.random.key(0))
    >>> s = jlora.sharding.specs(adapted, {"q": {"kernel": P("fsdp", "tensor")}})
    >>> s["q"]["kernel"].a, s["q"]["kernel"].b
    (P('fsdp', None), P(None, 'tensor'))

Under ``jax.jit`` with ``NamedSharding`` over any ``Mesh`` this gives data,
FSDP and tensor parallelism with no change to the model code; on several hosts
call ``jax.distributed.initialize()`` first and build the mesh from
``jax.devices()`` as usual.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace as dataclass_replace
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.core import apply as _apply
from jlora.quant import QuantizedArray
from jlora.spec import Spec
from jlora.tree import (PyTree, Role, is_module_node, is_node, leaves_with_paths, map_with_paths,
                        require_whole)


def _is_spec(x) -> bool:
    return isinstance(x, P) or x is None


def _fold(entries) -> Any:
    """Mesh axes of several array axes flattened into one (major to minor)."""
    axes: list = []
    for e in entries:
        if e is None:
            continue
        axes.extend(e if isinstance(e, tuple) else (e,))
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _check_rank(spec: P | None, ndim: int, path: str | None) -> None:
    if len(tuple(spec or ())) > ndim:
        where = f"{path or '<root>'}: " if path is not None else ""
        raise ValueError(f"jlora.sharding.specs: {where}PartitionSpec {spec} has more entries "
                         f"than the base's {ndim} axes")


def node_specs(node, base_spec: P | None, *, path: str | None = None):
    """The node with each array field replaced by its ``PartitionSpec``; ``path``
    (where the node sits) is named by the error for a spec longer than the base."""
    ndim = len(node.shape)
    _check_rank(base_spec, ndim, path)
    entries = tuple(base_spec or ()) + (None,) * (ndim - len(tuple(base_spec or ())))
    own = getattr(node, "partition_specs", None)
    own = own(entries, _fold) if own is not None else None
    if own is not None:  # stacked and quantized nodes lay their fields out themselves
        return node.replace(**own)
    ins = _fold(entries[i] for i in node.in_axes)
    outs = _fold(entries[i] for i in range(ndim) if i not in node.in_axes)
    layout = {
        Role.BASE: P(*entries),
        Role.IN_RANK: P(ins, None),
        Role.RANK_OUT: P(None, outs),
        Role.OUT: P(outs),
        Role.IN: P(ins),
        Role.REPLICATED: P(),
        # a frozen copy of a sibling kernel held by a bias node: its output axis
        # is the bias's axis; its input axis is not known here, so replicated
        Role.KERNEL: P(None, outs),
        # one spec for the whole quantized pytree (a prefix of codes and scales)
        Role.QUANTIZED: P(),
    }
    changes = {}
    for f in fields(node):
        if not f.metadata.get("pytree_node", True) or getattr(node, f.name) is None:
            continue
        # every array field has a Role (checked when the node class is defined)
        changes[f.name] = layout[type(node).field_axes[f.name]]
    return node.replace(**changes)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` with each axis's mesh axes cut to the longest major prefix whose
    total size divides the axis's length (none: replicated)."""
    out = []
    for i, n in enumerate(shape):
        e = spec[i] if i < len(spec) else None
        axes = () if e is None else e if isinstance(e, tuple) else (e,)
        while axes and n % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _fit_quantized(node, node_spec, mesh: Mesh):
    """``node_spec`` with its quantized codes' and scales' specs fitted to ``mesh``."""
    q, qs = getattr(node, "quantized", None), getattr(node_spec, "quantized", None)
    if not isinstance(q, QuantizedArray) or not isinstance(qs, QuantizedArray):
        return node_spec
    fitted = {f: _fit(getattr(qs, f), tuple(getattr(q, f).shape), mesh)
              for f in ("codes", "absmax", "absmax2", "offset") if isinstance(getattr(qs, f), P)}
    return node_spec.replace(quantized=dataclass_replace(qs, **fitted))


def _mesh_axes(entry) -> tuple:
    """The mesh axes of one ``PartitionSpec`` entry, major to minor."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _entry(spec: P, i: int):
    return spec[i] if len(spec) > i else None


def _held_base_spec(path: str, s) -> P | None:
    """The base's spec that a node of a spec tree holds.

    Its base-role field; for a 1-D node without input axes (a bias node) its
    output-role field. A quantized node's ``base`` is a dequantizing property:
    its spec is read back from the factors, whose sharded axes name the base's
    input and output mesh axes whole (``a`` its input axes' fold, ``b`` its
    output axes'); mesh-fitted codes may have dropped some (``_fit``). Where
    several input (output) axes fold into one factor axis, the codes' specs
    (stored axes, permuted back) tell which axis holds which mesh axes; of
    those, only the packed input axis (stored last) can have been cut by a
    mesh, and it gets back what the factor's fold holds beyond the others'.
    """
    roles = type(s).field_axes
    for name, role in roles.items():
        if role is Role.BASE:
            return getattr(s, name)
    ndim = len(s.shape)
    if ndim == 1 and not s.in_axes:  # P(outs) of a 1-D node is its base's spec
        for name, role in roles.items():
            if role is Role.OUT and isinstance(getattr(s, name), P):
                return getattr(s, name)
    q = getattr(s, "quantized", None)
    structured = (isinstance(q, QuantizedArray) and isinstance(q.codes, P)
                  and len(q.codes) == ndim)
    entries = [None] * ndim
    if structured:
        for stored, axis in enumerate(q.perm):
            entries[axis] = q.codes[stored]
    a, b = getattr(s, "a", None), getattr(s, "b", None)
    if not (isinstance(a, P) and isinstance(b, P)):
        if structured:
            return P(*entries)
        raise ValueError(f"jlora.sharding.specs: the {s.method} node at {path} in base_specs "
                         "holds no base spec to recover; pass the specs of the original params")
    lead = 1 if getattr(s.config, "expert_axis", None) is not None else 0
    if lead:
        entries[0] = _entry(a, 0)
    outs = [i for i in range(lead, ndim) if i not in s.in_axes]
    for group, folded in ((list(s.in_axes), _entry(a, lead)), (outs, _entry(b, lead + 1))):
        if len(group) == 1:
            entries[group[0]] = folded
            continue
        if not structured:
            raise ValueError(
                f"jlora.sharding.specs: the {s.method} node at {path} in base_specs folds "
                f"axes {tuple(group)} into one factor axis and its codes are flat, so their "
                "specs cannot be told apart; pass the specs of the original params")
        packed = q.perm[-1]
        if packed not in group:
            continue
        k = group.index(packed)
        full = _mesh_axes(folded)
        before = [m for i in group[:k] for m in _mesh_axes(entries[i])]
        after = [m for i in group[k + 1:] for m in _mesh_axes(entries[i])]
        middle = full[len(before):len(full) - len(after)]
        if (list(full[:len(before)]) == before and list(full[len(full) - len(after):]) == after
                and middle[:len(_mesh_axes(entries[packed]))] == _mesh_axes(entries[packed])):
            entries[packed] = _fold([middle])
    return P(*entries)


def specs(adapted: PyTree, base_specs: PyTree, *, mesh: Mesh | None = None) -> PyTree:
    """``PartitionSpec`` tree for ``adapted``, given the specs of the original params.

    ``base_specs`` has the structure of the original params (one ``PartitionSpec``
    or ``None`` per leaf); a tree with the adapted tree's structure whose nodes
    hold the bases' specs is accepted too (what ``specs`` returns, with or
    without ``mesh``: ``specs(adapted, specs(adapted, b, mesh=m), mesh=m)`` is
    ``specs(adapted, b, mesh=m)``; a QLoRA node's base spec is read back from
    its factors' specs, and from its codes' where several axes fold into one
    factor axis). Leaves that are not adapted keep their own spec. With
    ``mesh``, quantized codes and scales keep only the mesh axes that divide
    their stored lengths. A spec with more entries than its leaf has axes is a
    ``ValueError`` naming the path.
    """
    require_whole(adapted, "jlora.sharding.specs")
    by_path = {}
    for path, s in leaves_with_paths(base_specs, is_leaf=_is_spec):
        by_path[path] = (s if is_module_node(s) else _held_base_spec(path, s) if is_node(s)
                         else s)

    def one(path, leaf):
        if is_module_node(leaf):
            # beside its module: laid out from the specs of the module's own leaves
            pre = f"{leaf.path}/" if leaf.path else ""
            inside = {p[len(pre):]: (P() if s is None else s) for p, s in by_path.items()
                      if p.startswith(pre) and not is_node(s)}
            return node_specs(leaf, leaf.base_spec(inside), path=path)
        if path not in by_path:
            raise ValueError(f"jlora.sharding.specs: base_specs has no entry for {path}")
        s = P() if by_path[path] is None else by_path[path]
        if not is_node(leaf):
            shape = getattr(leaf, "shape", None)
            if shape is not None:
                _check_rank(s, len(shape), path)
            return s
        out = node_specs(leaf, s, path=path)
        return out if mesh is None else _fit_quantized(leaf, out, mesh)

    return map_with_paths(one, adapted)


def named(tree_of_specs: PyTree, mesh: Mesh) -> PyTree:
    """``PartitionSpec`` tree -> ``NamedSharding`` tree on ``mesh``.

    ``None`` entries stay ``None``: in a ``jlora.split`` half they are holes.
    """
    return jax.tree.map(lambda s: None if s is None else NamedSharding(mesh, s),
                        tree_of_specs, is_leaf=_is_spec)


def place(adapted: PyTree, mesh: Mesh, base_specs: PyTree) -> PyTree:
    """Put an adapted tree on ``mesh``, every factor sharded like its base."""
    return jax.device_put(adapted, named(specs(adapted, base_specs, mesh=mesh), mesh))


def apply(params: PyTree, spec: Spec, *, key: jax.Array, mesh: Mesh, base_specs: PyTree) -> PyTree:
    """``jlora.apply`` whose factors are created directly sharded on ``mesh``.

    Runs the init under ``jit`` with the derived output shardings, so random
    factors are generated shard by shard and no device ever holds a full-size
    gathered weight (place ``params`` on the mesh first, e.g. with
    ``jax.device_put(params, named(base_specs, mesh))``). The SVD of
    ``init="pissa"`` and the QR of ``"olora"`` are not distributed by XLA: each
    such kernel is gathered to every device for its decomposition (one kernel at
    a time inside the compiled init); use ``"pissa_fast"``, whose matmuls stay
    sharded and whose decompositions are only ``(fan, rank+8)``-sized.
    """
    shapes = jax.eval_shape(lambda p: _apply(p, spec, key=key), params)
    out = named(specs(shapes, base_specs, mesh=mesh), mesh)
    return jax.jit(lambda p, k: _apply(p, spec, key=k), out_shardings=out)(params, key)
