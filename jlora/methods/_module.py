"""The module-level adapter protocol: configs and nodes that adapt a whole module.

A leaf method (LoRA, DoRA, ...) replaces one weight leaf by a node. A
*module-level* method adapts a module's computation instead: its spec rule
names a module path (``"enc/layers_*/mlp"``, a subtree of the params) and
``jlora.apply`` stores its node **beside** that module, in the parent mapping,
under the key ``"<name>@<method>"`` (``"mlp@adaptformer"``); the module's own
params are left untouched. Everything that handles nodes (``split``,
``combine``, ``count_trainable``, ``summary``, sharding, Orbax checkpoints)
handles these nodes too: they are :class:`~jlora.methods.base.AdapterNode`
subclasses with ``trainable`` fields and ``field_axes`` roles.

A method is a :class:`ModuleConfig` whose ``build_module(key, module_params,
*, path)`` reads the dimensions it needs from the module's own params (a
``ValueError`` naming ``path`` when it cannot) and returns a :class:`ModuleNode`,
whose hooks are:

- ``intercept(call, args, kwargs, *, dropout_key=None, **context)`` -> the
  module's output. ``call(*args, **kwargs)`` runs the module itself; the
  default returns just that. ``jlora.linen.apply`` and ``jlora.nnx.apply`` call
  it around the module's ``__call__``; ``context`` holds the keywords the
  caller passed as ``context={...}`` (e.g. an ``attention_mask``).
- ``module_params(params)`` -> the params the module runs with (default:
  unchanged). ``params`` is the module's subtree without module-level nodes.
- ``merge_into(params)`` -> plain module params that compute what the adapted
  module computes; ``jlora.merge`` calls it. Methods that have no such form
  keep ``mergeable = False`` and say why in ``unmergeable_reason``; the default
  raises a ``ValueError`` naming the path and the reason. ``unmerge_from(params)``
  is its inverse (default: the same refusal).
- ``base_spec(specs)`` -> the ``PartitionSpec`` of the node's ``(d_in, d_out)``
  view from ``{relative path: spec}`` of the module's leaves (default: ``None``,
  every field replicated); ``field_axes`` roles then lay out the fields.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from flax import struct

from jlora.methods.base import AdapterNode, Config
from jlora.tree import Array, PyTree


class ModuleConfig(Config):
    """Base class of module-level method configs: rules name module paths, not leaves."""

    #: ``"module"``: ``jlora.apply`` matches this config's rules against module paths
    level: ClassVar[str] = "module"

    def build(self, key: Array, base: Array, *, path: str) -> AdapterNode:
        raise ValueError(f"{path}: {type(self).__name__} adapts a module, not a leaf; name the "
                         f"module's path in the spec (e.g. {path.rpartition('/')[0]!r})")

    def build_module(self, key: Array, module_params: PyTree, *, path: str) -> "ModuleNode":
        """The node adapting the module at ``path`` whose params are ``module_params``."""
        raise NotImplementedError


class ModuleNode(AdapterNode):
    """Base class of module-level adapter nodes (see the module docstring for the hooks).

    ``path`` (static) is the adapted module's path; ``shape`` is the node's
    ``(d_in, d_out)`` view for sharding (``()`` when it has none).
    """

    path: str = struct.field(pytree_node=False, default="")
    shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    in_axes: tuple[int, ...] = struct.field(pytree_node=False, default=())

    level: ClassVar[str] = "module"
    #: whether ``merge_into`` folds the node into the module's plain params
    mergeable: ClassVar[bool] = False
    #: why not (the error of ``jlora.merge`` quotes it)
    unmergeable_reason: ClassVar[str] = "it has no form as plain weights of the module"

    def intercept(self, call: Callable[..., Any], args: tuple, kwargs: dict, *,
                  dropout_key: Array | None = None, **context: Any) -> Any:
        """The module's output; ``call(*args, **kwargs)`` runs the module itself."""
        return call(*args, **kwargs)

    def module_params(self, params: PyTree) -> PyTree:
        """The params the module runs with (default: its own, unchanged)."""
        return params

    def _refuse(self, what: str) -> ValueError:
        return ValueError(
            f"{self.path or '<root>'}: {self.method} cannot be {what} the module's weights: "
            f"{self.unmergeable_reason}. Keep it as a module (jlora.linen.apply / jlora.nnx.apply "
            f"run it), or call jlora.merge(adapted, residual=True) to fold every mergeable "
            f"adapter and get the residual module-level nodes back separately")

    def merge_into(self, params: PyTree) -> PyTree:
        """Plain module params equal in effect to the adapted module (default: refuse)."""
        raise self._refuse("merged into")

    def unmerge_from(self, params: PyTree) -> PyTree:
        """The inverse of :meth:`merge_into` (default: refuse)."""
        raise self._refuse("unmerged from")

    def delta(self) -> Array:
        raise self._refuse("expressed as a delta of")

    def materialize(self) -> Array:
        raise self._refuse("materialized as")

    def merge_onto(self, leaf: Array) -> Array:
        raise self._refuse("merged onto")

    def base_spec(self, specs: dict[str, Any]) -> Any:
        """The ``PartitionSpec`` of the ``(d_in, d_out)`` view, from the module leaves' specs."""
        return None

    def base_size(self) -> int:
        return 0
