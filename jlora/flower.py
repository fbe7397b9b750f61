"""Federated LoRA on Flower: records <-> trees by path, and a jlora strategy.

Flower (``pip install 'jlora[flower]'``, ``flwr>=1.41``) moves ``ArrayRecord`` /
``ConfigRecord`` objects between a ``ServerApp`` and ``ClientApp``\\ s. This
module turns a ``jlora.split`` trainable half (or any pytree of arrays, e.g. an
optimizer state) into records and back, and runs a server whose aggregation is
any :mod:`jlora.federated` rule and whose server step is any federated
optimizer of :mod:`jlora.optim` (FedAdam, FedYogi, MIME, FedLADA, ...):

* :func:`to_records` — one ``Array`` per leaf, keyed by its jlora path
  (``encoder/layer_0/query/kernel/a``); :func:`describe` — a ``ConfigRecord``
  with each adapter's ``rank``, ``alpha``, ``rslora`` and effective ``scale``
  (``"path:rank"``), so clients of different ranks and scalings (and FLoRA's
  rank-stacked aggregate, whose scale is 1) decode by path to the same
  ``scale·a·b``.
* :func:`from_records` — the inverse against a template tree. Every path,
  shape and dtype is checked on arrival (missing or unexpected paths, a shape
  or dtype other than the template's, a serialisation other than
  ``numpy.ndarray``, bytes that do not decode to what the ``Array`` declares,
  non-finite values): a ``ValueError`` naming the client and the path. Arrays
  are read with ``numpy.load(allow_pickle=False)``; nothing is unpickled.
* :class:`Strategy` — a Flower ``FedAvg`` whose ``aggregate_train`` decodes
  each reply, aggregates with ``rule(clients, weights)`` (weights: the
  replies' ``"num-examples"``) and takes a server step
  ``x ← optax.apply_updates(x, opt.update(x − agg, s, x))``; its train and
  evaluate messages carry the model's :func:`describe` entries in their
  ``ConfigRecord``.

Example (two clients of ranks 2 and 4, records built and read as Flower's
``ClientApp`` / ``ServerApp`` do)::

    >>> import jax, jax.numpy as jnp, jlora, jlora.flower as jf
    >>> params = {"dense": {"kernel": jnp.ones((6, 5))}}
    >>> def client(rank):
    ...     spec = jlora.Spec({"dense/kernel": jlora.LoRA(rank=rank, alpha=2 * rank)})
    ...     return jlora.split(jlora.apply(params, spec, key=jax.random.key(rank)))[0]
    >>> arrays, config = jf.to_records(client(4)), jf.describe(client(4))
    >>> sorted(arrays.keys()), config["dense/kernel:rank"]
    (['dense/kernel/a', 'dense/kernel/b'], 4)
    >>> back = jf.from_records(arrays, client(2), config=config, client="node 7")
    >>> back["dense"]["kernel"].a.shape, back["dense"]["kernel"].scale
    ((6, 4), 2.0)

A client reads a train or evaluate message with
``from_records(msg.content["arrays"], template, config=msg.content["config"])``:
entries that are not jlora's (Flower's ``server-round``, the user's
``train_config``) are ignored.
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.tree import PyTree, is_node, leaves_with_paths, path_str

try:  # the optional dependency: only this module needs it
    from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MetricRecord,
                          RecordDict)
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jlora.flower needs Flower: pip install 'jlora[flower]'") from e

NUMPY_STYPE = "numpy.ndarray"
_RANK_AXES = {"in_rank": -1, "rank_out": 0}
# the ConfigRecord entries describe() writes, as "path:<entry>"
_ENTRIES = ("rank", "alpha", "rslora", "scale")


def _who(client) -> str:
    return "" if client is None else f"client {client}: "


def _keyed_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(path, array)]`` over every array leaf (inside adapter nodes too); unique paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out, seen = [], set()
    for kp, leaf in flat:
        key = path_str(kp) or "."
        if key in seen:
            raise ValueError(f"jlora.flower: two leaves share the path {key!r}")
        seen.add(key)
        out.append((key, leaf))
    return out


def to_records(tree: PyTree) -> ArrayRecord:
    """An ``ArrayRecord`` with one numpy-serialised ``Array`` per array leaf, keyed by path.

    ``None`` holes of a split tree (frozen fields) are not sent; static
    metadata (ranks, configs) is not sent either: see :func:`describe`.
    """
    return ArrayRecord({k: Array(np.asarray(x)) for k, x in _keyed_leaves(tree)})


def _alpha(config) -> float:
    alpha = getattr(config, "alpha", None)
    return float(config.rank if alpha is None else alpha)


def _ranked(node) -> bool:
    config = getattr(node, "config", None)
    return (dataclasses.is_dataclass(config) and hasattr(config, "rank")
            and hasattr(config, "alpha") and any(node.field_axes.get(f) in _RANK_AXES
                                                 for f in node.field_axes))


def _has_field(config, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(config))


def _scale(node) -> float | None:
    scale = getattr(node, "scale", None)
    return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None


def describe(tree: PyTree) -> ConfigRecord:
    """``{"path:rank": r, "path:alpha": α, "path:rslora": b, "path:scale": s}`` per LoRA-like node.

    Sent next to :func:`to_records` so a receiver whose template has another
    rank or scaling (heterogeneous clients, rsLoRA templates, FLoRA's stacked
    aggregate with ``alpha = R``, ``rslora=False``, i.e. ``s = 1``) rebuilds the
    node with the sender's ``s``: :func:`from_records` sets rank, alpha and
    rslora and refuses a rebuilt node whose scale is not ``s``. ``rslora`` is
    written for configs that have the option, ``scale`` for nodes that have one.
    """
    out = {}
    for path, node in leaves_with_paths(tree):
        if is_node(node) and _ranked(node):
            out[f"{path}:rank"] = int(node.config.rank)
            out[f"{path}:alpha"] = _alpha(node.config)
            if _has_field(node.config, "rslora"):
                out[f"{path}:rslora"] = bool(node.config.rslora)
            scale = _scale(node)
            if scale is not None:
                out[f"{path}:scale"] = scale
    return ConfigRecord(out)


def _shape_rank(node, path: str, record) -> int | None:
    """The rank the arriving arrays of ``node`` declare, if all its rank fields agree."""
    ranks = set()
    for field, axis in node.field_axes.items():
        x, arr = getattr(node, field, None), record.get(f"{path}/{field}")
        if x is None or axis not in _RANK_AXES or not isinstance(arr, Array):
            continue
        want, got = list(np.shape(x)), list(arr.shape)
        i = _RANK_AXES[axis] % max(len(want), 1)
        if len(got) != len(want) or got[:i] + got[i + 1:] != want[:i] + want[i + 1:]:
            return None
        ranks.add(got[i])
    return ranks.pop() if len(ranks) == 1 else None


def _retemplate(like: PyTree, config, client, record) -> PyTree:
    """``like`` with each node's rank/alpha/rslora from ``config`` (shapes as ShapeDtypeStructs).

    Only ``"path:rank|alpha|rslora|scale"`` entries are jlora's; any other key
    (no ``":"`` or another suffix: Flower's ``server-round``, a user's
    ``train_config``) is ignored. A jlora entry for a path without a ranked
    adapter, or with a value of the wrong kind, raises. A ``scale`` entry is
    checked against the rebuilt node's scale. A node that ``config`` does not
    name takes the rank its arriving arrays declare (when all its rank axes
    agree) and keeps the template's alpha and rslora.
    """
    who = _who(client)
    known = {}
    nodes = {p: n for p, n in leaves_with_paths(like) if is_node(n) and _ranked(n)}
    for key in ([] if config is None else config.keys()):
        path, sep, what = str(key).rpartition(":")
        if not sep or what not in _ENTRIES:
            continue
        if path not in nodes:
            raise ValueError(f"{who}{key}: unexpected config entry (no adapter with a rank at "
                             f"{path!r}; adapters: {sorted(nodes)[:5]})")
        known.setdefault(path, {})[what] = config[key]
    for path, node in nodes.items():
        if "rank" not in known.get(path, {}):
            r = _shape_rank(node, path, record)
            if r is not None and r != node.config.rank:
                known.setdefault(path, {})["rank"] = r
                known[path].setdefault("alpha", _alpha(node.config) if getattr(
                    node.config, "alpha", None) is not None else float(r))

    def rebuild(path, node):
        if path not in known:
            return node
        got = known[path]
        rank, alpha = got.get("rank", node.config.rank), got.get("alpha", _alpha(node.config))
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{who}{path}:rank must be a positive int, got {rank!r}")
        if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
                or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"{who}{path}:alpha must be a positive finite number, got {alpha!r}")
        changes = {}
        if "rslora" in got:
            rslora = got["rslora"]
            if not isinstance(rslora, bool):
                raise ValueError(f"{who}{path}:rslora must be a bool, got {rslora!r}")
            if _has_field(node.config, "rslora"):
                if rslora != node.config.rslora:
                    changes["rslora"] = rslora
            elif rslora:
                raise ValueError(f"{who}{path}:rslora is True but the template's "
                                 f"{type(node.config).__name__} has no rslora option")
        if rank != node.config.rank or alpha != _alpha(node.config) or changes:
            fields = {}
            for field, axis in node.field_axes.items():
                x = getattr(node, field, None)
                if x is None or axis not in _RANK_AXES:
                    continue
                shape = list(np.shape(x))
                shape[_RANK_AXES[axis]] = rank
                fields[field] = jax.ShapeDtypeStruct(tuple(shape), x.dtype)
            config_ = dataclasses.replace(node.config, rank=rank, alpha=alpha, **changes)
            node = node.replace(config=config_, **fields)
        if "scale" in got:
            want = got["scale"]
            if (not isinstance(want, (int, float)) or isinstance(want, bool)
                    or not math.isfinite(want) or want <= 0):
                raise ValueError(f"{who}{path}:scale must be a positive finite number, "
                                 f"got {want!r}")
            have = _scale(node)
            if have is None or not math.isclose(have, want, rel_tol=1e-9):
                raise ValueError(
                    f"{who}{path}:scale is {want!r} but the template's "
                    f"{type(node.config).__name__}(rank={node.config.rank}, alpha="
                    f"{_alpha(node.config)}) rebuilt with the sent entries has scale {have!r}")
        return node

    return jax.tree_util.tree_map_with_path(
        lambda kp, x: rebuild(path_str(kp), x) if is_node(x) else x, like, is_leaf=is_node)


def _decode(array, key: str, shape, dtype, who: str) -> np.ndarray:
    if not isinstance(array, Array):
        raise ValueError(f"{who}{key}: expected a flwr Array, got {type(array).__name__}")
    if array.stype != NUMPY_STYPE:
        raise ValueError(f"{who}{key}: serialisation {array.stype!r} is not {NUMPY_STYPE!r}")
    want = np.dtype(dtype)
    if str(array.dtype) != want.name or tuple(array.shape) != tuple(shape):
        raise ValueError(f"{who}{key}: declares {array.dtype}{list(array.shape)}, "
                         f"expected {want.name}{list(shape)}")
    try:
        out = np.load(io.BytesIO(array.data), allow_pickle=False)
    except Exception as e:  # any undecodable payload is the sender's fault
        raise ValueError(f"{who}{key}: bytes are not a numpy array ({type(e).__name__}: {e})"
                         ) from None
    if (isinstance(out, np.ndarray) and want.kind == "V" and want.fields is None
            and out.dtype == np.dtype(f"V{want.itemsize}")):
        # np.save writes ml_dtypes types (bfloat16, float8_*) as raw void bytes
        out = out.view(want)
    if not isinstance(out, np.ndarray) or out.dtype != want or out.shape != tuple(shape):
        raise ValueError(f"{who}{key}: data holds {getattr(out, 'dtype', type(out).__name__)}"
                         f"{list(getattr(out, 'shape', ()))}, declared {want.name}{list(shape)}")
    if jnp.issubdtype(want, jnp.inexact) and not np.isfinite(out).all():
        raise ValueError(f"{who}{key}: non-finite values")
    return out


def from_records(record: ArrayRecord, like: PyTree, *, config: ConfigRecord | None = None,
                 client: Any = None) -> PyTree:
    """The tree ``record`` encodes, with ``like``'s structure, shapes and dtypes.

    ``config`` (from :func:`describe`, or a whole train/evaluate message's
    ``ConfigRecord``) sets the rank, alpha and rslora of the named adapters first
    and checks their ``scale``; its entries that are not ``"path:rank|alpha|
    rslora|scale"`` (Flower's ``server-round``, user keys) are ignored. Without
    an entry, an adapter whose arriving factors all declare another rank takes
    that rank with the template's ``alpha`` and ``rslora`` (alpha ``None``,
    i.e. ``alpha = rank``, stays so): send :func:`describe` whenever the
    sender's scale may differ. ``bfloat16``/``float8`` leaves round-trip
    exactly. ``client`` (a node id, a name) prefixes every error. Raises a
    ``ValueError`` naming the client and the path for a missing or unexpected
    path, a wrong shape or dtype, a non-numpy or undecodable payload,
    non-finite values, or a malformed or inconsistent jlora config entry;
    nothing is unpickled.
    """
    who = _who(client)
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{who}expected a flwr ArrayRecord, got {type(record).__name__}")
    if config is not None and not isinstance(config, ConfigRecord):
        raise ValueError(f"{who}config must be a flwr ConfigRecord, got {type(config).__name__}")
    target = _retemplate(like, config, client, record)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    keys = [path_str(kp) or "." for kp, _ in flat]
    extra = sorted(set(record.keys()) - set(keys))
    if extra:
        raise ValueError(f"{who}{extra[0]}: unexpected path (not in the template; "
                         f"{len(extra)} unexpected in all)")
    leaves = []
    for key, (_, x) in zip(keys, flat):
        if key not in record:
            raise ValueError(f"{who}{key}: missing from the record")
        leaves.append(jnp.asarray(_decode(record[key], key, np.shape(x), x.dtype, who)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _weighted_mean(trees: Sequence[PyTree], weights: np.ndarray) -> PyTree:
    p = weights / weights.sum()
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)).astype(xs[0].dtype), *trees)


def reply(message: Message, tree: PyTree, *, num_examples: int, metrics: dict | None = None,
          extra: dict[str, PyTree] | None = None, arrays_key: str = "arrays",
          config_key: str = "config") -> Message:
    """A ``ClientApp``'s reply: ``tree`` as records, its ranks, and ``num-examples``.

    ``num_examples`` is a non-negative ``int`` (the aggregation weight; a
    ``float`` or ``bool`` raises rather than being truncated). ``extra`` adds
    more trees as ArrayRecords under their own keys (FedLADA's
    ``nu_hat``/``offset``, MimeLite's ``full_gradient``), read by the
    strategy's ``server_inputs``.
    """
    if (not isinstance(num_examples, numbers.Integral) or isinstance(num_examples, bool)
            or num_examples < 0):
        raise ValueError(f"jlora.flower.reply: num_examples must be a non-negative int, "
                         f"got {num_examples!r}")
    content = RecordDict({arrays_key: to_records(tree), config_key: describe(tree),
                          "metrics": MetricRecord({"num-examples": int(num_examples),
                                                   **(metrics or {})})})
    for k, t in (extra or {}).items():
        content[k] = to_records(t)
    return Message(content, reply_to=message)


class Strategy(FedAvg):
    """A Flower strategy whose aggregation is a jlora rule and whose server step is an optimizer.

    Args:
      template: the server's initial trainable tree (structure, dtypes and the
        first global model); clients' records are decoded against it (ranks
        may differ when the reply's ConfigRecord says so).
      rule: ``rule(clients, weights) -> tree`` (or a list of per-client trees,
        as FlexLoRA returns): any :mod:`jlora.federated` rule; default
        ``jlora.federated.fedavg``.
      server_optimizer: an optax transform of the pseudo-gradient
        ``x − agg`` (``jlora.optim.fedadam(...)``, ``mime_server``,
        ``fedlada_server``); default none (the aggregate is the new model).
        Needs an aggregate with the server's structure.
      server_inputs: reply ArrayRecord keys decoded against the template,
        averaged with the reply weights and passed to the optimizer's
        ``update`` by that name (``("full_gradient",)`` for MimeLite,
        ``("nu_hat", "offset")`` for FedLADA). Needs ``server_optimizer``.
      send_state: also send the server optimizer's state (key
        ``"server-state"``): MimeLite's statistics, FedLADA's ``ν`` and ``g_a``.
        Needs ``server_optimizer``.
      **kwargs: ``flwr.serverapp.strategy.FedAvg``'s sampling and key options.

    Train and evaluate messages carry, in their ``ConfigRecord``, the
    :func:`describe` entries of the tree they send (``self.model``, or a node's
    own tree from a per-client rule), so a client decodes either with
    ``from_records(arrays, template, config=msg.content["config"])``. The
    ``ArrayRecord`` Flower hands to ``Strategy.start``'s ``evaluate_fn(round,
    arrays)`` has no ranks: evaluate ``strategy.model`` (the decoded tree)
    there, or decode ``from_records(arrays, template,
    config=describe(strategy.model))``.

    Only MimeLite, not MIME, runs through this strategy: a round is one train
    exchange, and MIME's clients need the full-batch gradient ``c`` at the
    round's model *before* they train (an extra exchange per round); MimeLite's
    clients train with the frozen server statistics and send ``c`` up with
    their model (``server_inputs=("full_gradient",)``, ``send_state=True``).
    """

    def __init__(self, template: PyTree, *, rule: Callable | None = None,
                 server_optimizer: optax.GradientTransformation | None = None,
                 server_inputs: Sequence[str] = (), send_state: bool = False, **kwargs):
        super().__init__(**kwargs)
        if rule is None:
            from jlora import federated
            rule = federated.fedavg
        if not callable(rule):
            raise ValueError(f"jlora.flower.Strategy: rule must be callable, got {rule!r}")
        if server_optimizer is None and (tuple(server_inputs) or send_state):
            raise ValueError("jlora.flower.Strategy: server_inputs="
                             f"{tuple(server_inputs)!r} and send_state={send_state!r} feed a "
                             "server optimizer; pass server_optimizer= (e.g. "
                             "jlora.optim.fedlada_server()) or drop them")
        self.template = template
        self.rule = rule
        self.server_optimizer = server_optimizer
        self.server_inputs = tuple(server_inputs)
        self.send_state = bool(send_state)
        self.model = template
        self.state = None if server_optimizer is None else server_optimizer.init(template)
        self.per_client: dict[int, PyTree] = {}

    def initial_arrays(self) -> ArrayRecord:
        """The template as the ``initial_arrays`` of ``Strategy.start``."""
        return to_records(self.template)

    def _with_model(self, messages: Iterable[Message], *, state: bool) -> list[Message]:
        """Each message with its node's tree, the tree's :func:`describe`, (opt.) the state."""
        messages = list(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            tree = self.per_client.get(node)
            content = RecordDict(dict(msg.content.items()))
            if tree is not None:
                content[self.arrayrecord_key] = to_records(tree)
            cfg = ConfigRecord(dict(msg.content[self.configrecord_key].items()))
            for k, v in describe(self.model if tree is None else tree).items():
                cfg[k] = v
            content[self.configrecord_key] = cfg
            if state and self.send_state and self.state is not None:
                content["server-state"] = to_records(self.state)
            msg.content = content
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:
        """FedAvg's sampling; each message carries the model, its ranks and (opt.) the state."""
        return self._with_model(super().configure_train(server_round, arrays, config, grid),
                                state=True)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid) -> Iterable[Message]:
        """FedAvg's sampling; each message carries the model and its ranks, as in training."""
        return self._with_model(super().configure_evaluate(server_round, arrays, config, grid),
                                state=False)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply (checked by path), aggregate with the rule, step the server."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if not valid:
            return None, None
        trees, weights, nodes, inputs = [], [], [], {k: [] for k in self.server_inputs}
        for msg in valid:
            node = msg.metadata.src_node_id
            content = msg.content
            if self.arrayrecord_key not in content.array_records:
                raise ValueError(f"client {node}: reply has no ArrayRecord {self.arrayrecord_key!r}")
            config = content.config_records.get(self.configrecord_key)
            trees.append(from_records(content.array_records[self.arrayrecord_key], self.template,
                                      config=config, client=node))
            for k in self.server_inputs:
                if k not in content.array_records:
                    raise ValueError(f"client {node}: reply has no ArrayRecord {k!r}")
                inputs[k].append(from_records(content.array_records[k], self.model, client=node))
            weights.append(self._weight(content, node))
            nodes.append(node)
        w = np.asarray(weights, np.float64)
        result = self.rule(trees, w)
        self.per_client = {}
        if isinstance(result, (list, tuple)) and self.server_optimizer is not None:
            raise ValueError("jlora.flower.Strategy: a rule returning per-client trees "
                             "(FlexLoRA) has no single aggregate for a server optimizer")
        if isinstance(result, (list, tuple)):
            self.per_client = dict(zip(nodes, result))
            model = result[0]
        elif self.server_optimizer is not None:
            from jlora.optim import server_step
            extra = {k: _weighted_mean(v, w) for k, v in inputs.items()}
            model, self.state = server_step(self.server_optimizer, self.state, self.model, result,
                                            **extra)
        else:
            model = result
        self.model = model
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return to_records(model), metrics

    def _weight(self, content: RecordDict, node) -> float:
        for record in content.metric_records.values():
            if self.weighted_by_key in record:
                w = record[self.weighted_by_key]
                if (isinstance(w, (int, float)) and not isinstance(w, bool)
                        and math.isfinite(w) and w >= 0):
                    return float(w)  # 0: a client with no local data weighs nothing (as FedAvg)
                raise ValueError(f"client {node}: {self.weighted_by_key} must be a non-negative "
                                 f"finite number, got {w!r}")
        raise ValueError(f"client {node}: reply has no MetricRecord with {self.weighted_by_key!r}")
