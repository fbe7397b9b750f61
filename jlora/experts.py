"""Mixture-of-experts fast paths for stacked adapter nodes (``expert_axis=0``).

For expert kernels ``W (E, d, f)`` with per-expert factors ``a (E, d, r)``,
``b (E, r, f)`` (``LoRA(..., expert_axis=0)`` or ``QLoRA(..., expert_axis=0)``):

* :func:`ragged_dot` — dropless MoE, tokens sorted by expert with routing
  ``group_sizes (E,)``: ``y = ragged_dot(x, W) + s·ragged_dot(ragged_dot(drop(x), a), b)``
  reusing the same group sizes; ``ΔW`` is never formed and the extra cost is
  ``O(T·r·(d + f))``. Experts stored ``(E, out, in)`` (``in_axes=(2,)``) are
  contracted on their input axis (``jax.lax.ragged_dot_general``).
* :func:`einsum` — capacity (einsum) dispatch ``"ecd,edf->ecf"`` (or
  ``"ecd,efd->ecf"`` for ``(E, out, in)`` experts):
  ``y = einsum(x, W) + s·einsum(einsum(drop(x), a), b)``.

``drop`` is the adapter's dropout, applied when a ``dropout_key`` is passed
(training); the other methods run on their merged stack (exact; with a
``dropout_key`` and ``dropout > 0`` they raise, having no branch to drop).

Both take a plain array too (then they are ``jax.lax.ragged_dot`` /
``jnp.einsum``), so one MoE layer serves a base and an adapted model. In a
Linen module, set the class attribute ``jlora_nodes = True`` so that
``jlora.linen.apply`` hands the module its adapter nodes instead of merged
weights; the module passes its own ``dropout_key`` (e.g. from
``self.make_rng("dropout")``) to train with adapter dropout. The router is an ordinary parameter: it stays frozen unless the spec
targets it.

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> w = jax.random.normal(jax.random.key(0), (4, 16, 8))            # (E, d, f)
    >>> node = jlora.apply({"w": w}, jlora.Spec({"w": jlora.LoRA(rank=2, expert_axis=0)}),
    ...                    key=jax.random.key(1))["w"]
    >>> x, gs = jnp.ones((6, 16)), jnp.array([1, 2, 0, 3])              # sorted tokens
    >>> y = jlora.experts.ragged_dot(x, node, gs)
    >>> bool(jnp.allclose(y, jax.lax.ragged_dot(x, w, gs), atol=1e-5))  # b = 0 at init
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.methods._experts import is_slice, is_stacked
from jlora.tree import is_node

Array = jax.Array


def _check(node, what: str):
    if is_node(node) and (not is_stacked(node) or is_slice(node)):
        raise ValueError(f"jlora.experts.{what}: needs a stacked node (expert_axis=0) "
                         f"with its expert axis, got a {node.method} node of shape "
                         f"{tuple(node.shape)}")


def _ragged_op(w, group_sizes: Array, kwargs: dict):
    """The ragged dot of ``x (T, d)`` with expert kernels ``(E, d, f)``, or with a
    stacked node's ``(E, f, d)`` layout (``in_axes=(2,)``) through
    ``jax.lax.ragged_dot_general`` contracting the node's input axis."""
    if not is_node(w) or tuple(w.in_axes) == (1,):
        return lambda x, k: jax.lax.ragged_dot(x, k, group_sizes, **kwargs)
    if len(w.shape) != 3 or tuple(w.in_axes) != (2,):
        raise ValueError(f"jlora.experts.ragged_dot: needs experts (E, in, out) or (E, out, in) "
                         f"(one input and one output axis), got a {w.method} node of shape "
                         f"{tuple(w.shape)} with in_axes {tuple(w.in_axes)}; use "
                         "jlora.experts.einsum for other layouts")

    def op(x, k):
        last = jnp.ndim(x) - 1
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((last,), (2,)), ((), ())),
            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
        return jax.lax.ragged_dot_general(x, k, group_sizes, dims, **kwargs)
    return op


def ragged_dot(x: Array, w, group_sizes: Array, *, dropout_key: Array | None = None,
               **kwargs) -> Array:
    """``jax.lax.ragged_dot(x, W, group_sizes)`` with ``W`` an array or a stacked node.

    ``x (T, d)`` holds the routed tokens sorted by expert; ``group_sizes (E,)``
    how many go to each expert. A node laid out ``(E, out, in)`` (``in_axes=(2,)``,
    PEFT's expert layout) is contracted on its input axis. ``dropout_key``
    (training) drops the adapter branch's input at the node's ``dropout`` rate;
    a plain array ignores it. ``kwargs`` go to ``jax.lax.ragged_dot`` (or
    ``ragged_dot_general``).
    """
    if is_node(w):
        _check(w, "ragged_dot")
    experts = w.shape[0] if is_node(w) else jnp.shape(w)[0]
    sizes = jnp.shape(group_sizes)
    if sizes != (experts,) or not jnp.issubdtype(jnp.result_type(group_sizes), jnp.integer):
        raise ValueError(f"jlora.experts.ragged_dot: group_sizes must be {experts} integers (one "
                         f"per expert), got shape {sizes} and dtype {jnp.result_type(group_sizes)}")
    op = _ragged_op(w, group_sizes, kwargs)
    return w.dot(x, op, dropout_key=dropout_key) if is_node(w) else op(x, w)


def einsum(eq: str, x: Array, w, *, dropout_key: Array | None = None, **kwargs) -> Array:
    """``jnp.einsum(eq, x, W)`` for expert dispatch (``"ecd,edf->ecf"``), ``W`` an
    array or a stacked node whose input axis is the contracted letter.
    ``dropout_key`` (training) drops the adapter branch's input at the node's
    ``dropout`` rate; a plain array ignores it."""
    op = lambda x, k: jnp.einsum(eq, x, k, **kwargs)
    if not is_node(w):
        return op(x, w)
    _check(w, "einsum")
    return w.dot(x, op, dropout_key=dropout_key)
