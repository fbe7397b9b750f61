"""The pure transforms: ``apply``, ``split``, ``combine``, ``merge``, ``unmerge``, ``summary``."""

from __future__ import annotations

import collections

import math
from collections.abc import Mapping
from dataclasses import fields

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _alloc
from jlora._validate import prng_key
from jlora.methods._module import ModuleNode
from jlora.spec import Spec
from jlora.tree import (PyTree, half_error, is_module_node, is_node, leaves_with_paths, map_nodes,
                        map_with_paths, module_node_path, module_nodes, module_paths, parent,
                        path_key, rebuild_mappings, replace_subtrees, require_whole, subtree,
                        without_module_nodes)


def apply(params: PyTree, spec: Spec, *, key: jax.Array) -> PyTree:
    """Adapt params: replace every leaf a rule of ``spec`` targets by an adapter node.

    (To *run* a Linen model on the result, see ``jlora.linen.apply``.)
    Returns a new tree of the same structure in which each targeted leaf is an
    adapter node (for LoRA: fields ``base``, ``a`` of shape ``(fan_in, rank)``,
    ``b`` of shape ``(rank, fan_out)``). ``params`` itself is never modified.
    Works on Linen ``variables["params"]``, an ``nnx.State`` and any nest of
    arrays. Each leaf's random init uses ``fold_in(key, crc32(path))``, so
    adding a rule does not reshuffle the other leaves' inits.

    Each leaf is matched against the rules once; every problem found is
    reported together in one error.

    Raises:
      ValueError: listing every rule that selects no leaf (or only leaves an
        earlier rule claims), every rank above ``min(fan_in, fan_out)``, every
        non-floating (integer, boolean) or non-array target and every already
        adapted leaf, each naming its path.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"attn": {"query": {"kernel": jnp.ones((8, 8))}}}
        >>> spec = jlora.Spec({"**/query/kernel": jlora.LoRA(rank=2)})
        >>> adapted = jlora.apply(params, spec, key=jax.random.key(0))
        >>> node = adapted["attn"]["query"]["kernel"]
        >>> node.method, node.a.shape, node.b.shape
        ('LoRA', (8, 2), (2, 8))
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"jlora.apply: spec must be a jlora.Spec, got {type(spec).__name__}")
    prng_key("jlora.apply", "key", key)
    _alloc.hint()  # once per process: glibc's default malloc slows XLA:CPU
    leaves = leaves_with_paths(params)
    by_path = dict(leaves)
    _refuse_duplicate_paths(leaves, "jlora.apply")
    problems: list[str] = []
    touched = [0] * len(spec.rules)
    won = [0] * len(spec.rules)
    claims = {}  # path -> config of the first matching rule (one pass over the leaves)
    for path, leaf in leaves:
        hits = spec.hits(path, level="leaf")
        for i in hits:
            touched[i] += 1
        if not hits:
            continue
        won[hits[0]] += 1
        if is_node(leaf):
            problems.append(f"{path}: already adapted ({leaf.method}); apply a spec once")
        elif not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            problems.append(f"{path}: not an array leaf ({type(leaf).__name__})")
        else:
            claims[path] = spec.rules[hits[0]].config
    modules = _claim_modules(params, spec, touched, won, problems)
    for i, rule in enumerate(spec.rules):
        if not touched[i]:
            problems.append(_unmatched(rule, leaves, params))
        elif not won[i]:
            what = "leaves" if rule.level == "leaf" else "modules"
            problems.append(f"Spec pattern {rule.describe(rule.pattern)} only matches {what} "
                            "that an earlier rule already claims (first match wins)")

    nodes = {}
    # Some methods adapt a layer, not one leaf (GLoRA also rewrites the bias):
    # their config names the sibling leaf it builds a companion node for.
    for path, config in claims.items():
        sibling = config.companion(path)
        if sibling is None:
            continue
        if sibling in claims:
            problems.append(f"{sibling}: adapted by the {type(config).__name__} rule of {path} "
                            "and also matched by a rule of its own")
            continue
        try:
            node = config.build_companion(path_key(key, sibling), by_path.get(sibling),
                                          by_path[path], path=sibling)
        except ValueError as e:
            problems.append(str(e))
            continue
        if node is not None:
            nodes[sibling] = node
    for path, config in claims.items():
        leaf = by_path[path]
        if not isinstance(leaf, jax.core.Tracer) and jnp.issubdtype(leaf.dtype, jnp.inexact) \
                and not bool(jnp.isfinite(leaf).all()):
            problems.append(f"{path}: the base holds NaN or infinite values")
            continue
        try:
            nodes[path] = config.build(path_key(key, path), jnp.asarray(by_path[path]), path=path)
        except ValueError as e:
            problems.append(str(e))
    beside = {}  # node path -> module-level node, stored beside its module
    for mpath, config in modules.items():
        npath = module_node_path(mpath, type(config).__name__)
        try:
            beside[npath] = config.build_module(path_key(key, npath), subtree(params, mpath),
                                                path=mpath)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"jlora.apply: {len(problems)} spec problem(s):\n  "
                         + "\n  ".join(problems))
    out = map_with_paths(lambda path, leaf: nodes.get(path, leaf), params)
    if not beside:
        return out

    def insert(path, items):
        for npath, node in beside.items():
            if parent(npath) == path:
                items[npath.rpartition("/")[2]] = node
        return items

    return rebuild_mappings(out, insert)


def _refuse_duplicate_paths(leaves, what: str) -> None:
    """Two leaves that render to one path (a key holding ``/``, such as Haiku's
    ``mlp/~/linear_0`` beside a nested ``mlp``) would share one adapter."""
    seen = collections.Counter(p for p, _ in leaves)
    twice = [p for p, n in seen.items() if n > 1]
    if twice:
        raise ValueError(f"{what}: {len(twice)} path(s) name more than one leaf, e.g. "
                         f"{twice[0]!r} (a dict key containing '/' beside a nested subtree of "
                         "the same name); rename the keys so every leaf has its own path")


def _claim_modules(params, spec, touched, won, problems) -> dict:
    """``{module path: config}`` for the module-level rules (first match wins)."""
    if not any(rule.level == "module" for rule in spec.rules):
        return {}
    claims = {}
    for mpath in module_paths(params):
        hits = spec.hits(mpath, level="module")
        for i in hits:
            touched[i] += 1
        if not hits:
            continue
        won[hits[0]] += 1
        config = spec.rules[hits[0]].config
        npath = module_node_path(mpath, type(config).__name__)
        holder = subtree(params, parent(npath)) if mpath else params
        if not isinstance(holder, Mapping):
            problems.append(f"{mpath}: {type(config).__name__} stores its node beside the module, "
                            f"in a mapping, but {parent(npath) or '<root>'} is a "
                            f"{type(holder).__name__}")
        elif any(not isinstance(k, str) for k in holder):
            # a string key among an nnx.List's int keys makes a tree jax cannot sort
            problems.append(f"{mpath}: {type(config).__name__} stores its node beside the module, "
                            f"under a string key, but {parent(npath) or '<root>'} has integer "
                            f"keys (a list of layers); adapt a submodule of {mpath} instead")
        elif npath.rpartition("/")[2] in holder:
            problems.append(f"{mpath}: already adapted ({npath} exists); apply a spec once")
        else:
            claims[mpath] = config
    return claims


def _unmatched(rule, leaves, params) -> str:
    """Why a rule selects nothing; says so when it names a module for a leaf method or back."""
    pat = rule.describe(rule.pattern)
    method = type(rule.config).__name__
    if rule.level == "module":
        near = [p for p, _ in leaves if rule.matches(p)]
        if near:
            return (f"Spec pattern {pat} names leaves (e.g. {near[0]!r}), but {method} adapts a "
                    f"module: name the module's path (e.g. {parent(near[0])!r})")
        return (f"Spec pattern {pat} matches no module; module paths look like "
                f"{[p for p in module_paths(params) if p][:3]}")
    near = [m for m in module_paths(params) if m and rule.matches(m)]
    if near:
        return (f"Spec pattern {pat} names a module ({near[0]!r}), but {method} adapts leaves: "
                f"name them (e.g. {near[0] + '/**/kernel'!r})")
    return f"Spec pattern {pat} matches no leaf; paths look like {[p for p, _ in leaves[:3]]}"


def module_params_applied(params: PyTree, nodes) -> PyTree:
    """``params`` with each module-level node's module rewritten by its ``module_params``.

    Outer modules first; a module path the params lack is a ``ValueError``.
    """
    for node in sorted((n for _, n in nodes), key=lambda n: (n.path.count("/"), bool(n.path))):
        if type(node).module_params is ModuleNode.module_params:
            continue
        try:
            sub = subtree(params, node.path)
        except KeyError:
            raise ValueError(f"{node.path}: the params hold a {node.method} node for this "
                             "module, but no module params at that path") from None
        params = replace_subtrees(params, {node.path: node.module_params(sub)})
    return params


def _none_fields(node, keep: bool):
    """The node with its trainable fields (keep=False) or the others (True) set to None."""
    train = set(node.trainable)
    changes = {
        f.name: None
        for f in fields(node)
        if f.metadata.get("pytree_node", True) and ((f.name in train) != keep)
    }
    return node.replace(**changes)


def split(adapted: PyTree) -> tuple[PyTree, PyTree]:
    """Freeze by partition: ``(trainable, frozen)``, two trees with ``None`` holes.

    ``trainable`` holds only the fields each method trains (LoRA: ``a``, ``b``;
    LoRA-FA: ``b``; ``Full``: the leaf); everything else is in ``frozen``. Take
    gradients and build optimizer state from ``trainable`` alone, so no
    full-size gradient or moment ever exists for a frozen weight.

    Example::

        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
        >>> adapted = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> trainable, frozen = jlora.split(adapted)
        >>> [x.shape for x in jax.tree.leaves(trainable)]
        [(4, 2), (2, 4)]
    """
    trainable = jax.tree.map(
        lambda x: _none_fields(x, keep=True) if is_node(x) else None, adapted, is_leaf=is_node
    )
    frozen = jax.tree.map(
        lambda x: _none_fields(x, keep=False) if is_node(x) else x, adapted, is_leaf=is_node
    )
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Rebuild the adapted tree from :func:`split`'s halves: fill each ``None`` hole from the other."""
    try:
        return jax.tree.map(
            lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
        )
    except ValueError as e:
        raise ValueError(
            "jlora.combine: trainable and frozen trees do not have the same structure "
            f"(were they split from the same adapted tree?): {_first_difference(trainable, frozen) or e}"
        ) from None


def _first_difference(trainable: PyTree, frozen: PyTree) -> str | None:
    """The first path where two halves disagree: present in one only, or adapted
    differently (method, config, shape); None when no such path is found."""
    def entries(tree):
        out = {}
        for path, x in leaves_with_paths(tree, is_leaf=lambda y: y is None):
            out[path] = ((x.method, x.config, x.shape) if is_node(x)
                         else None if x is None else "array")
        return out

    t, f = entries(trainable), entries(frozen)
    for path in list(t) + [p for p in f if p not in t]:
        if path not in t or path not in f:
            return f"{path} is in the {'trainable' if path in t else 'frozen'} half only"
        a, b = t[path], f[path]
        if a is not None and b is not None and a != b:
            if isinstance(a, tuple) and isinstance(b, tuple):
                return (f"at {path} the trainable half holds {a[1]!r} of shape {a[2]}, "
                        f"the frozen half {b[1]!r} of shape {b[2]}")
            return f"at {path} one half holds an adapter, the other a plain array"
    return None


def merge(adapted: PyTree, *, onto: PyTree | None = None, residual: bool = False):
    """Fold every adapter into a plain array: ``W = W0 + s·a·b`` for LoRA.

    Pure and jit-friendly (inside a jitted loss it is the generic compute path
    for any model). With ``onto=params``, each adapter's delta is added to the
    leaf of ``params`` at the same path instead of to the node's own base; this
    is how a served, already merged model switches tasks together with
    :func:`unmerge`. ``Full`` leaves take their trained value either way.

    Each merged leaf keeps its base's dtype: a bfloat16 base merges to a
    bfloat16 weight (the delta is computed and added in at least float32, then
    the sum is rounded once to bfloat16). A ``split`` half is refused (combine
    the halves first), except that ``onto=`` needs only the deltas, which a
    trainable half holds when every factor trains and no frozen field enters
    the delta (PiSSA/OLoRA's initial ``a0``, ``b0`` do: combine those first).

    A module-level node (``jlora.AdaptFormer``, beside its module as
    ``"mlp@adaptformer"``) is folded by its ``merge_into`` into the module's
    params and removed. One that has no plain-weight form raises a
    ``ValueError`` naming its path and why; with ``residual=True`` the result is
    instead ``(plain, residual)``: ``plain`` holds every mergeable adapter
    folded and no node at all, ``residual`` is ``{node path: node}`` of the
    module-level nodes left out, which the model must keep running (insert
    them back beside their modules and use ``jlora.linen.apply``).

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
        >>> adapted = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> bool(jnp.allclose(jlora.merge(adapted)["w"]["kernel"], 1.0))  # b = 0 at init
        True
    """
    if onto is None:
        require_whole(adapted, "jlora.merge")
        out = map_nodes(lambda n: n if is_module_node(n) else n.materialize(), adapted)
        out = without_module_nodes(out)
    else:
        out = _zip_nodes(lambda node, leaf: node.merge_onto(leaf), adapted, onto, "merge")
    return _fold_modules(out, module_nodes(adapted), "merge_into", residual)


def _fold_modules(plain: PyTree, nodes: dict, hook: str, residual: bool = False):
    """Replace each module's params by ``node.<hook>(params)`` (outermost module first)."""
    left = {}
    for npath, node in sorted(nodes.items(), key=lambda kv: kv[1].path.count("/")
                              + bool(kv[1].path)):
        if residual and not node.mergeable:
            left[npath] = node
            continue
        try:
            sub = subtree(plain, node.path)
        except KeyError:
            raise ValueError(f"jlora.{hook.split('_')[0]}: params have no module at "
                             f"{node.path!r} for {npath}") from None
        plain = replace_subtrees(plain, {node.path: getattr(node, hook)(sub)})
    return (plain, left) if residual else plain


def unmerge(params: PyTree, adapted: PyTree) -> PyTree:
    """Remove each adapter's delta from merged ``params`` (task switching).

    ``unmerge(merge(adapted), adapted)`` gives back the original weights (up to
    float rounding); ``merge(adapter2, onto=unmerge(served, adapter1))``
    switches a served model from task 1 to task 2 without keeping a second
    copy of the base. ``Full`` leaves have no original to go back to and are
    left as they are.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
        >>> adapted = jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> restored = jlora.unmerge(jlora.merge(adapted), adapted)
        >>> bool(jnp.allclose(restored["w"]["kernel"], 1.0))
        True
    """
    out = _zip_nodes(lambda node, leaf: node.unmerge_from(leaf), adapted, params, "unmerge")
    return _fold_modules(out, module_nodes(adapted), "unmerge_from")


def _zip_nodes(fn, adapted, params, what):
    """``fn(node, leaf)`` at every path where ``adapted`` holds a node; other leaves kept.

    Only each node's delta is needed, so a trainable half of ``split`` works
    when it holds every factor the delta reads; a frozen half never does.
    """
    require_whole(adapted, f"jlora.{what}", allow_trainable=True)
    _refuse_duplicate_paths(leaves_with_paths(params), f"jlora.{what}")
    adapted_leaves = {p: x for p, x in leaves_with_paths(adapted) if not is_module_node(x)}
    missing = [p for p, x in adapted_leaves.items() if is_node(x)]

    def one(path, leaf):
        node = adapted_leaves.get(path)
        if not is_node(node):
            return leaf
        if tuple(getattr(leaf, "shape", ())) != tuple(node.shape):
            raise ValueError(f"jlora.{what}: {path}: params leaf has shape "
                             f"{tuple(getattr(leaf, 'shape', ()))}, the adapter was built for "
                             f"{tuple(node.shape)}")
        dtype = getattr(leaf, "dtype", None)  # (a frozen half's node has none of its own)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"jlora.{what}: {path}: params leaf has dtype {dtype}; a delta "
                             "would be rounded into it")
        try:
            return fn(node, leaf)
        except (AttributeError, TypeError):
            if node.half() is None:
                raise
            raise half_error(f"jlora.{what}", path, node.half()) from None

    out = map_with_paths(one, params)
    present = {p for p, _ in leaves_with_paths(params)}
    missing = [p for p in missing if p not in present]
    nested = [p for p in missing if any(q.startswith(p + "/") for q in present)]
    if nested:  # e.g. a jlora.quant.QuantizedArray, a pytree of codes and scales
        raise ValueError(f"jlora.{what}: params hold a tree, not one array, at adapted path(s) "
                         f"{nested[:5]} (a quantized weight? dequantize it first, e.g. with "
                         "jlora.quant.dequantize_tree)")
    if missing:
        raise ValueError(f"jlora.{what}: params have no leaf at adapted path(s) {missing[:5]}")
    return out


def _size(x) -> int:
    return int(np.prod(x.shape)) if hasattr(x, "shape") else 0


def summary(adapted: PyTree) -> str:
    """A table of adapted paths: method, shape, rank, trainable count and share.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": {"kernel": jnp.ones((4, 4))}, "b": jnp.zeros(4)}
        >>> adapted = jlora.apply(params, jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}),
        ...                       key=jax.random.key(0))
        >>> print(jlora.summary(adapted).splitlines()[-1])
        trainable 16 of 36 parameters (44.44%)
    """
    require_whole(adapted, "jlora.summary")
    rows, trainable_total, total = [], 0, 0
    for path, leaf in leaves_with_paths(adapted):
        if is_node(leaf):
            n_train = leaf.trainable_size()
            trainable_total += n_train
            # Parameters a model holds: the base plus whatever the adapter adds.
            total += (0 if is_module_node(leaf) else math.prod(leaf.shape)) + leaf.added_size()
            rank = "-" if leaf.rank is None else str(leaf.rank)
            rows.append((path, leaf.method, "x".join(map(str, leaf.shape)) or "-", rank,
                         f"{n_train:,}"))
        else:
            total += _size(leaf)
    header = ("path", "method", "shape", "rank", "trainable")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    share = 100.0 * trainable_total / total if total else 0.0
    lines.append(f"trainable {trainable_total:,} of {total:,} parameters ({share:.2f}%)")
    return "\n".join(lines)


def count_trainable(tree: PyTree) -> int:
    """Number of trainable parameters in an adapted tree (or its ``split`` trainable half)."""
    return sum(leaf.trainable_size() for _, leaf in leaves_with_paths(tree) if is_node(leaf))
