"""Federated optimizers as Optax transforms: server adaptivity, MIME, FedLADA, FedSPS.

Notation. ``x`` is the server model (any pytree: a ``jlora.split`` trainable
half of adapter nodes, a plain dict, merged weights), clients ``i`` start a
round from ``x`` and end at ``x_i``; ``agg`` is what an aggregation rule of
:mod:`jlora.federated` (FedAvg of factors, FFA, LoRA-FAIR, ...) makes of the
``x_i``. Every server optimizer consumes the **pseudo-gradient**

    g = x − agg(x_1, …, x_M)            (:func:`pseudo_gradient`)

which is minus the paper's ``Δ_t``, so a server optimizer is an ordinary
``optax`` transform of a gradient-like tree and the new server model is
``optax.apply_updates(x, updates)`` (:func:`server_step` does both). Client
sides are ``optax`` transforms the user's local step chains as usual.

Methods (state is always a ``NamedTuple``; everything is pure, jits, and vmaps
over a leading client axis):

* **FedAdagrad / FedAdam / FedYogi** (Reddi et al., *Adaptive Federated
  Optimization*, ICLR 2021, Algorithm 2) on ``Δ = −g``::

      m_t = β1·m_{t−1} + (1−β1)·Δ_t
      v_t = v_{t−1} + Δ_t²                                   (FedAdagrad)
      v_t = β2·v_{t−1} + (1−β2)·Δ_t²                         (FedAdam)
      v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²)        (FedYogi)
      x_{t+1} = x_t + η·m_t / (√v_t + τ)

  no bias correction (``fedadam(bias_correction=...)`` adds it), ``m_{−1} = 0``,
  ``v_{−1} = τ²`` (the paper asks ``v_{−1} ≥ τ²``; ``initial_accumulator=0``
  is Flower's choice). The moment
  EMAs are optax's own ``optax.tree.update_moment`` /
  ``update_moment_per_elem_norm`` and the sign and step size come from
  ``optax.scale_by_learning_rate``. ``optax.adam``/``yogi``/``adagrad`` are
  *not* these rules: Adam and Yogi add bias correction, Yogi starts ``v`` at
  ``1e-6``, Adagrad starts at ``0.1``, has no momentum and puts ``ε`` inside
  the root (``g/√(v+ε)`` rather than ``g/(√v+τ)``). Flower's ``FedAdam``
  strategy bias-corrects its step (``fedadam(..., initial_accumulator=0.0,
  bias_correction="flower")``); its ``FedYogi`` and ``FedAdagrad`` equal these
  with ``initial_accumulator=0`` (``fedadagrad`` with ``b1=0``).
* **MIME / MimeLite** (Karimireddy et al. 2020, arXiv 2008.03606, Alg. 1; as
  fedjax's ``mime.py``/``mime_lite.py``): the server keeps a base optimizer's
  state ``s``; clients apply ``base.update(g, s, y)`` with ``s`` **frozen**
  (:func:`mime_client`); MIME's client gradient is the SVRG-style
  ``∇f_i(y;ζ) − ∇f_i(x;ζ) + c`` (:func:`mime_gradient`) with ``c`` the
  full-batch gradient at ``x``; the server steps ``x ← x − η_s·g`` and updates
  ``s`` with ``c`` only (:func:`mime_server`).
* **FedLADA** (Sun et al. 2023, arXiv 2308.00522, Sec. 3, third algorithm):
  AMSGrad-type clients starting from the server's averaged second moment and
  amending their direction with the previous round's global offset ``g_a``
  (:func:`fedlada_client`); the server averages ``v̂_i`` and the offsets
  ``d_i = (x − x_i)/(η_l·K)`` (:func:`fedlada_offset`, :func:`fedlada_server`).
* **FedSPS / FedDecSPS** (Mukherjee, Loizou, Stich, TMLR 2024, arXiv
  2307.06306): per-client stochastic Polyak steps
  ``γ = min{(F−ℓ*)/(c‖∇F‖²), γ_b}`` (:func:`fedsps`) and the decreasing
  ``γ_t = min{(F−ℓ*)/‖∇F‖², c_{t−1}γ_{t−1}}/c_t``, ``c_t = c_0√(t+1)``
  (:func:`feddecsps`); the server plainly averages.

What each method communicates is computed from the trees, by
:func:`communication_bytes`.

Example (FedAdam over two clients' LoRA factors, FedAvg aggregation)::

    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"w": {"kernel": jnp.ones((4, 4))}}
    >>> adapted = jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}),
    ...                       key=jax.random.key(0))
    >>> server, frozen = jlora.split(adapted)
    >>> clients = [jax.tree.map(lambda x: x + d, server) for d in (0.1, 0.3)]
    >>> agg = jax.tree.map(lambda *x: sum(x) / len(x), *clients)   # FedAvg of factors
    >>> opt = jlora.optim.fedadam(learning_rate=0.1, tau=1e-3)
    >>> server2, state = jlora.optim.server_step(opt, opt.init(server), server, agg)
    >>> round(float(server2["w"]["kernel"].b[0, 0]), 4)   # −0.1·m/(√v+τ), m = −0.02, v = 0.99τ² + 0.01·0.04
    0.0951
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._validate import choice, positive_int, real, real_or_traced
from jlora.tree import PyTree, path_str


_OWNER = "jlora.optim"


# ---------------------------------------------------------------- tree helpers


def _check_same(a: PyTree, b: PyTree, what: str, names=("server", "aggregate")) -> None:
    """Same structure, shapes (and static metadata) or a ValueError naming the path."""
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta == tb and all(np.shape(x) == np.shape(y) for (_, x), (_, y) in zip(fa, fb)):
        return
    pa = {path_str(k): np.shape(x) for k, x in fa}
    pb = {path_str(k): np.shape(x) for k, x in fb}
    for p in sorted(set(pa) | set(pb)):
        if pa.get(p) != pb.get(p):
            raise ValueError(f"{what}: {p}: {names[0]} has "
                             f"{'no leaf' if p not in pa else 'shape ' + str(pa[p])}, "
                             f"{names[1]} has {'no leaf' if p not in pb else 'shape ' + str(pb[p])}")
    raise ValueError(f"{what}: {names[0]} and {names[1]} trees differ in structure or static "
                     f"metadata (e.g. adapter ranks or configs): {ta} vs {tb}")


def _map(fn, *trees):
    return jax.tree.map(lambda *x: None if x[0] is None else fn(*x), *trees,
                        is_leaf=lambda x: x is None)


def pseudo_gradient(server: PyTree, aggregate: PyTree) -> PyTree:
    """``g = server − aggregate`` leaf by leaf (``None`` holes of split trees kept).

    ``aggregate`` is the output of a :mod:`jlora.federated` rule for the same
    trees as ``server`` (equal structure, shapes and adapter configs; for FLoRA's
    rank-stacked result use the merged weights on both sides). Raises a
    ``ValueError`` naming the first differing path.

        >>> import jax.numpy as jnp, jlora
        >>> jlora.optim.pseudo_gradient({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})["w"].tolist()
        [1.0, 1.0]
    """
    _check_same(server, aggregate, "jlora.optim.pseudo_gradient")
    return _map(lambda s, a: (jnp.asarray(s) - jnp.asarray(a)).astype(jnp.result_type(s)),
                server, aggregate)


def server_step(optimizer, state, server: PyTree, aggregate: PyTree, **extra):
    """One server round: ``g = server − aggregate``, ``u, s' = optimizer.update(g, s, server)``.

    Returns ``(optax.apply_updates(server, u), s')``. ``extra`` goes to
    ``update`` (``full_gradient=`` for :func:`mime_server`, ``nu_hat=``,
    ``offset=`` for :func:`fedlada_server`). With ``optax.sgd(1.0)`` the
    server takes the aggregate itself (FedAvg).
    """
    g = pseudo_gradient(server, aggregate)
    updates, state = optimizer.update(g, state, server, **extra)
    return optax.apply_updates(server, updates), state


def merged_step(optimizer, state, trainable: PyTree, frozen: PyTree, aggregate: PyTree, *,
                spec, key: jax.Array, **extra):
    """A server step on the merged weights, for rules that change the adapter's structure.

    FLoRA's rank-stacked aggregate (and any other rule's) has no factor-wise
    difference with the server's tree, but its merged weights do: with
    ``W = merge(combine(trainable, frozen))`` and ``W_agg`` the aggregate
    merged onto the same bases (``jlora.merge(aggregate, onto=unmerge(W))``),
    the pseudo-gradient ``g = W − W_agg`` is minus the aggregated delta on
    adapted leaves (and ``x − agg`` on ``Full`` leaves); ``W' =
    apply_updates(W, optimizer.update(g, s, W))`` and the clients restart from
    fresh adapters ``split(jlora.apply(W', spec, key=key))``, as FLoRA's rounds
    do. ``state`` is ``optimizer.init(W)``: dense, as is what the server sends
    (the update is full rank). Returns ``(trainable, frozen, state)``.
    """
    from jlora import core

    adapted = core.combine(trainable, frozen)
    cur = core.merge(adapted)
    agg = core.merge(aggregate, onto=core.unmerge(cur, adapted))
    updates, state = optimizer.update(pseudo_gradient(cur, agg), state, cur, **extra)
    new = optax.apply_updates(cur, updates)
    trainable, frozen = core.split(core.apply(new, spec, key=key))
    return trainable, frozen, state


def tree_bytes(tree: PyTree) -> int:
    """Bytes of the arrays (or ``ShapeDtypeStruct``s) in ``tree``; ``None`` holes count 0."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def _zeros(tree):
    return _map(jnp.zeros_like, tree)


def _full(tree, value):
    return _map(lambda x: jnp.full_like(x, value), tree)


# ---------------------------------------------------------------- FedOpt (Reddi et al.)


class ScaleByFedOptState(NamedTuple):
    """State of :func:`scale_by_fedopt`: first moment ``mu`` and second moment ``nu``."""

    mu: PyTree
    nu: PyTree


FEDOPT_KINDS = ("adagrad", "adam", "yogi")


def scale_by_fedopt(kind: str, *, b1: float, b2: float = 0.99, tau: float = 1e-3,
                    initial_accumulator: float | None = None) -> optax.GradientTransformation:
    """``m_t/(√v_t + τ)`` with Reddi et al.'s moment rules for ``kind`` (no bias correction).

    Its input is the pseudo-gradient ``g = −Δ_t``; ``m`` follows ``g`` (so
    ``m_g = −m_Δ``) and ``v`` only sees ``g² = Δ²``, so ``−η·m_g/(√v+τ)``
    (after :func:`optax.scale_by_learning_rate`) is the paper's step.
    ``initial_accumulator`` is ``v_{−1}`` (default ``τ²``).
    """
    choice(_OWNER + ".scale_by_fedopt", "kind", kind, FEDOPT_KINDS)
    owner = f"{_OWNER}.fed{kind}"
    real(owner, "b1", b1, ge=0.0, lt=1.0)
    real(owner, "b2", b2, ge=0.0, lt=1.0)
    real(owner, "tau", tau, gt=0.0)
    real(owner, "initial_accumulator", initial_accumulator, ge=0.0, allow_none=True)
    v0 = tau ** 2 if initial_accumulator is None else initial_accumulator

    def init(params):
        return ScaleByFedOptState(mu=_zeros(params), nu=_full(params, v0))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        if kind == "adagrad":
            nu = _map(lambda g, v: v + g * g, updates, state.nu)
        elif kind == "adam":
            nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        else:  # yogi
            nu = _map(lambda g, v: v - (1 - b2) * g * g * jnp.sign(v - g * g), updates, state.nu)
        out = _map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
        return out, ScaleByFedOptState(mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


BIAS_CORRECTIONS = (None, "adam", "flower")


def _bias_corrected(learning_rate, b1: float, b2: float, offset: int):
    """The schedule ``η_t·√(1−β2^(t+offset))/(1−β1^(t+offset))``, ``t = count + 1``."""
    def schedule(count):
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        t = jnp.asarray(count).astype(jnp.result_type(float)) + (1 + offset)
        return lr * jnp.sqrt(1 - jnp.power(b2, t)) / (1 - jnp.power(b1, t))
    return schedule


def _fedopt(kind, learning_rate, b1, b2, tau, initial_accumulator, bias_correction=None):
    if not callable(learning_rate):
        real(f"{_OWNER}.fed{kind}", "learning_rate", learning_rate, gt=0.0)
    transform = scale_by_fedopt(kind, b1=b1, b2=b2, tau=tau,
                                initial_accumulator=initial_accumulator)
    choice(f"{_OWNER}.fed{kind}", "bias_correction", bias_correction, BIAS_CORRECTIONS)
    if bias_correction is not None:
        learning_rate = _bias_corrected(learning_rate, b1, b2,
                                        1 if bias_correction == "flower" else 0)
    return optax.chain(transform, optax.scale_by_learning_rate(learning_rate))


def fedadam(learning_rate=1e-2, *, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
            initial_accumulator: float | None = None, bias_correction: str | None = None
            ) -> optax.GradientTransformation:
    """FedAdam server optimizer (Reddi et al. 2021, Alg. 2): ``v_t = β2·v + (1−β2)·Δ²``.

    Update: ``x ← x + η·m_t/(√v_t + τ)`` with ``Δ = −g``; no bias correction by
    default. ``learning_rate`` (``η``) may be an optax schedule of the round.
    ``bias_correction="adam"`` steps with ``η_t = η·√(1−β2^t)/(1−β1^t)``
    (``t = 1, 2, …`` the server step; Kingma & Ba's form, ``τ`` not rescaled);
    ``"flower"`` uses ``β^(t+1)``, as Flower's ``FedAdam`` strategy does with
    its round numbers starting at 1: ``fedadam(η, b1=, b2=, tau=,
    initial_accumulator=0.0, bias_correction="flower")`` is that strategy.

        >>> import jax.numpy as jnp, jlora
        >>> opt = jlora.optim.fedadam(0.1, tau=0.5)
        >>> u, _ = opt.update({"w": jnp.array([2.0])}, opt.init({"w": jnp.zeros(1)}))
        >>> round(float(u["w"][0]), 5)   # −0.1·(0.1·2)/(√(0.25·0.99 + 0.01·4) + 0.5)
        -0.0193
    """
    return _fedopt("adam", learning_rate, b1, b2, tau, initial_accumulator, bias_correction)


def fedyogi(learning_rate=1e-2, *, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
            initial_accumulator: float | None = None) -> optax.GradientTransformation:
    """FedYogi server optimizer (Reddi et al. 2021, Alg. 2).

    ``v_t = v_{t−1} − (1−β2)·Δ²·sign(v_{t−1} − Δ²)``, ``x ← x + η·m_t/(√v_t + τ)``.

        >>> import jax.numpy as jnp, jlora
        >>> opt = jlora.optim.fedyogi(0.1, tau=0.5)
        >>> u, _ = opt.update({"w": jnp.array([2.0])}, opt.init({"w": jnp.zeros(1)}))
        >>> round(float(u["w"][0]), 5)   # v = 0.25 + 0.01·4 = 0.29
        -0.01926
    """
    return _fedopt("yogi", learning_rate, b1, b2, tau, initial_accumulator)


def fedadagrad(learning_rate=1e-2, *, b1: float = 0.0, tau: float = 1e-3,
               initial_accumulator: float | None = None) -> optax.GradientTransformation:
    """FedAdagrad server optimizer (Reddi et al. 2021, Alg. 2): ``v_t = v_{t−1} + Δ²``.

    ``x ← x + η·m_t/(√v_t + τ)``. Algorithm 2 writes the momentum ``m_t`` for
    all three methods; ``b1=0`` (the default) is Adagrad without momentum, as
    Flower's ``FedAdagrad`` strategy runs it.

        >>> import jax.numpy as jnp, jlora
        >>> opt = jlora.optim.fedadagrad(0.1, tau=0.5)
        >>> u, _ = opt.update({"w": jnp.array([2.0])}, opt.init({"w": jnp.zeros(1)}))
        >>> round(float(u["w"][0]), 5)   # −0.1·2/(√(0.25 + 4) + 0.5)
        -0.07808
    """
    return _fedopt("adagrad", learning_rate, b1, 0.0, tau, initial_accumulator)


# ---------------------------------------------------------------- MIME / MimeLite


class MimeState(NamedTuple):
    """Server statistics of a base optimizer: on clients they stay frozen."""

    base: Any


def mime_client(base_optimizer: optax.GradientTransformation, server_state: MimeState | Any
                ) -> optax.GradientTransformation:
    """MIME/MimeLite local step: ``base_optimizer.update(g, s, y)`` with the server's ``s`` frozen.

    Every local step uses the round's server statistics ``s`` (e.g. SGD with
    momentum: ``y ← y − η(β·m + g)`` with the server's ``m``); the state the
    base optimizer returns is discarded, as fedjax's ``mime_lite.py`` does
    (Karimireddy et al. 2020, Alg. 1 "Mime"/"MimeLite"). For MIME feed it the
    corrected gradient of :func:`mime_gradient`; for MimeLite the plain one.

        >>> import jax.numpy as jnp, optax, jlora
        >>> base = optax.sgd(0.1, momentum=0.9)
        >>> server = jlora.optim.mime_server(base)
        >>> s = server.init({"w": jnp.zeros(1)})
        >>> s = jlora.optim.MimeState(base.update({"w": jnp.ones(1)}, s.base)[1])  # m = 1
        >>> tx = jlora.optim.mime_client(base, s)
        >>> u, st = tx.update({"w": jnp.array([2.0])}, tx.init({"w": jnp.zeros(1)}))
        >>> round(float(u["w"][0]), 4), st is not None   # −0.1·(0.9·1 + 2)
        (-0.29, True)
    """
    frozen = server_state.base if isinstance(server_state, MimeState) else server_state

    def init(params):
        del params
        return MimeState(frozen)

    def update(updates, state, params=None):
        out, _ = base_optimizer.update(updates, state.base, params)
        return out, state

    return optax.GradientTransformation(init, update)


def mime_gradient(grad_local: PyTree, grad_server: PyTree, full_gradient: PyTree) -> PyTree:
    """MIME's SVRG-style corrected gradient ``∇f_i(y;ζ) − ∇f_i(x;ζ) + c``.

    ``grad_local`` at the client's iterate ``y`` and ``grad_server`` at the
    round's server model ``x``, on the same batch (and dropout key); ``c`` is the
    full-batch gradient at ``x`` over the sampled clients (example-weighted).

        >>> import jax.numpy as jnp, jlora
        >>> jlora.optim.mime_gradient({"w": jnp.ones(1)}, {"w": jnp.ones(1) * 3},
        ...                           {"w": jnp.ones(1) * 5})["w"].tolist()
        [3.0]
    """
    return _map(lambda gy, gx, c: gy - gx + c, grad_local, grad_server, full_gradient)


def mime_server(base_optimizer: optax.GradientTransformation, learning_rate: float = 1.0
                ) -> optax.GradientTransformationExtraArgs:
    """MIME/MimeLite server: ``x ← x − η_s·g`` and ``s ← base.update(c, s, x)`` (state only).

    ``update(g, state, params, *, full_gradient)``: ``g`` is the pseudo-gradient
    (``x − agg(y_i)``, fedjax averages the ``y_i`` by example counts) and
    ``full_gradient`` is ``c``, the full-batch gradient at the round's ``x``; the
    statistics move with ``c``, never with the client deltas.
    """
    real(_OWNER + ".mime_server", "learning_rate", learning_rate, gt=0.0)

    def init(params):
        return MimeState(base_optimizer.init(params))

    def update(updates, state, params=None, *, full_gradient, **extra):
        del extra
        _, base = base_optimizer.update(full_gradient, state.base, params)
        return _map(lambda g: -learning_rate * g, updates), MimeState(base)

    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------- FedLADA


class FedLADAServerState(NamedTuple):
    """Averaged client second moment ``nu`` (init ``ε²``) and global offset ``g_a`` (init 0)."""

    nu: PyTree
    offset: PyTree


class FedLADAState(NamedTuple):
    """A FedLADA client: moments ``mu``, ``nu``, AMSGrad max ``nu_hat``, frozen ``offset``."""

    mu: PyTree
    nu: PyTree
    nu_hat: PyTree
    offset: PyTree


def fedlada_client(learning_rate: float, server_state: FedLADAServerState, *, b1: float = 0.9,
                   b2: float = 0.99, alpha: float = 0.1) -> optax.GradientTransformation:
    """FedLADA's amended local AMSGrad step (Sun et al. 2023, Sec. 3).

    Starting from ``m = 0``, ``v = v̂ = ν`` (the server's averaged moment), each
    local step with gradient ``g``::

        m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²;   v̂ ← max(v̂, v)
        y ← y − η_l·(α·m/√v̂ + (1−α)·g_a)

    with the server's global offset ``g_a`` fixed over the round (no ``ε`` in
    the root: ``ν ≥ ε²`` by construction). After ``K`` steps the client returns
    ``y``, ``v̂`` and :func:`fedlada_offset`. Rules as the third-party port
    ``DadrasAli/fedbrew``; the paper's own code is not public.

        >>> import jax.numpy as jnp, jlora
        >>> server = jlora.optim.fedlada_server()
        >>> s = server.init({"w": jnp.zeros(1)})
        >>> tx = jlora.optim.fedlada_client(0.1, s, alpha=0.5)
        >>> u, st = tx.update({"w": jnp.array([2.0])}, tx.init({"w": jnp.zeros(1)}))
        >>> round(float(u["w"][0]), 4)   # −0.1·0.5·0.2/√(0.01·4)
        -0.05
    """
    owner = _OWNER + ".fedlada_client"
    real(owner, "learning_rate", learning_rate, gt=0.0)
    real(owner, "b1", b1, ge=0.0, lt=1.0)
    real(owner, "b2", b2, ge=0.0, lt=1.0)
    real(owner, "alpha", alpha, ge=0.0, le=1.0)

    def init(params):
        del params
        return FedLADAState(mu=_zeros(server_state.nu), nu=server_state.nu,
                            nu_hat=server_state.nu, offset=server_state.offset)

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu_hat = _map(jnp.maximum, state.nu_hat, nu)
        out = _map(lambda m, vh, ga: -learning_rate * (alpha * m / jnp.sqrt(vh) + (1 - alpha) * ga),
                   mu, nu_hat, state.offset)
        return out, FedLADAState(mu=mu, nu=nu, nu_hat=nu_hat, offset=state.offset)

    return optax.GradientTransformation(init, update)


def _local_steps(owner: str, steps):
    """An int ``K >= 1``; an integer JAX/NumPy scalar (traced under ``vmap``: unchecked)."""
    if isinstance(steps, jax.core.Tracer):
        if not jnp.issubdtype(steps.dtype, jnp.integer) or steps.ndim:
            raise ValueError(f"{owner}: steps must be an int >= 1 (or an integer scalar array), "
                             f"got a traced {steps.dtype}{list(steps.shape)}")
        return steps
    if isinstance(steps, (jax.Array, np.ndarray)):
        arr = np.asarray(steps)
        if arr.ndim or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 1:
            raise ValueError(f"{owner}: steps must be an int >= 1, got {steps!r}")
        return steps
    return positive_int(owner, "steps", steps)


def fedlada_offset(start: PyTree, end: PyTree, learning_rate: float, steps) -> PyTree:
    """A FedLADA client's offset ``d_i = (x − y_i)/(η_l·K_i)`` (its mean local direction).

    ``learning_rate`` ``η_l > 0`` and ``steps`` ``K_i``, an int ``>= 1`` (an
    integer array under ``jit``/``vmap``); anything else raises a ``ValueError``
    rather than sending ``nan``/``inf`` offsets that every client would apply.
    """
    owner = _OWNER + ".fedlada_offset"
    real_or_traced(owner, "learning_rate", learning_rate, gt=0.0)
    steps = _local_steps(owner, steps)
    return _map(lambda x, y: (x - y) / (learning_rate * steps), start, end)


def fedlada_server(learning_rate: float = 1.0, *, eps: float = 1e-8
                   ) -> optax.GradientTransformationExtraArgs:
    """FedLADA server: ``x ← x − η_g·g``, ``ν ← mean v̂_i``, ``g_a ← mean d_i``.

    ``update(g, state, params, *, nu_hat, offset)`` takes the clients' ``v̂_i``
    and :func:`fedlada_offset` already averaged (the port averages uniformly;
    any weighted mean, e.g. ``jlora.federated.fedavg``, fits). ``init`` sets
    ``ν = ε²`` and ``g_a = 0``.
    """
    owner = _OWNER + ".fedlada_server"
    real(owner, "learning_rate", learning_rate, gt=0.0)
    real(owner, "eps", eps, gt=0.0)

    def init(params):
        return FedLADAServerState(nu=_full(params, eps ** 2), offset=_zeros(params))

    def update(updates, state, params=None, *, nu_hat, offset, **extra):
        del params, extra, state
        return (_map(lambda g: -learning_rate * g, updates),
                FedLADAServerState(nu=nu_hat, offset=offset))

    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------- FedSPS / FedDecSPS


def fedsps(c: float = 0.5, max_step: float = 1.0, *, f_min: float = 0.0, eps: float = 0.0
           ) -> optax.GradientTransformationExtraArgs:
    """FedSPS local step (Mukherjee, Loizou, Stich 2024, eq. SPS_max): ``−γ·g``,

    ``γ = min{(F(y;ξ) − ℓ*)/(c·(‖g‖² + eps)), γ_b}``, the batch loss passed as
    ``update(g, state, params, value=loss)``; ``max_step`` is ``γ_b``,
    ``f_min`` is ``ℓ*``. Built exactly from optax:
    ``chain(scale_by_polyak(ℓ*, c·γ_b, eps, "sps+"), scale(−1/c))`` (a negative
    gap counts as 0; a zero gradient gives a zero step). The server plainly
    averages; step sizes are never sent.

        >>> import jax.numpy as jnp, jlora
        >>> tx = jlora.optim.fedsps(c=0.5, max_step=10.0)
        >>> u, _ = tx.update({"w": jnp.array([2.0])}, tx.init({"w": jnp.zeros(1)}), value=1.0)
        >>> float(u["w"][0])   # −min(1/(0.5·4), 10)·2
        -1.0
    """
    owner = _OWNER + ".fedsps"
    real(owner, "c", c, gt=0.0)
    real(owner, "max_step", max_step, gt=0.0)
    real(owner, "f_min", f_min)
    real(owner, "eps", eps, ge=0.0)
    return optax.chain(optax.scale_by_polyak(f_min=f_min, max_learning_rate=c * max_step,
                                             eps=eps, variant="sps+"),
                       optax.scale(-1.0 / c))


class FedDecSPSState(NamedTuple):
    """Local step count ``t`` and the previous step size ``γ_{t−1}`` (``γ_{−1} = γ_b``)."""

    count: jax.Array
    step: jax.Array


def feddecsps(c0: float = 0.5, max_step: float = 1.0, *, f_min: float = 0.0, eps: float = 0.0
              ) -> optax.GradientTransformationExtraArgs:
    """FedDecSPS local step (Mukherjee et al. 2024; DecSPS of Orvieto et al. 2022): ``−γ_t·g``,

    ``γ_t = min{(F − ℓ*)/(‖g‖² + eps), c_{t−1}·γ_{t−1}} / c_t`` with
    ``c_t = c0·√(t+1)``, ``c_{−1} = c0`` and ``γ_{−1} = γ_b`` (``max_step``).
    ``γ`` is kept in the params' float dtype (float64 under x64, float32 for
    narrower params). The loss comes as ``update(..., value=loss)``. ``t`` counts this client's
    local steps; a client that keeps its state across rounds (as the paper's)
    passes it on, one that restarts gets ``init`` again.

        >>> import jax.numpy as jnp, jlora
        >>> tx = jlora.optim.feddecsps(c0=1.0, max_step=0.1)
        >>> u, st = tx.update({"w": jnp.array([2.0])}, tx.init({"w": jnp.zeros(1)}), value=1.0)
        >>> round(float(u["w"][0]), 6), int(st.count)   # γ_0 = min(1/4, 1·0.1)/1
        (-0.2, 1)
    """
    owner = _OWNER + ".feddecsps"
    real(owner, "c0", c0, gt=0.0)
    real(owner, "max_step", max_step, gt=0.0)
    real(owner, "f_min", f_min)
    real(owner, "eps", eps, ge=0.0)

    def init(params):
        floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x),
                                                                        jnp.floating)]
        dtype = jnp.promote_types(jnp.result_type(*floats), jnp.float32) if floats else jnp.float32
        return FedDecSPSState(count=jnp.zeros((), jnp.int32), step=jnp.asarray(max_step, dtype))

    def update(updates, state, params=None, *, value, **extra):
        del params, extra
        sq = optax.tree.norm(updates, squared=True) + eps
        gap = jnp.maximum(jnp.asarray(value, sq.dtype) - f_min, 0.0)
        t = state.count.astype(sq.dtype)
        c_t = c0 * jnp.sqrt(t + 1.0)
        c_prev = c0 * jnp.sqrt(jnp.maximum(t, 1.0))
        polyak = jnp.where(sq > jnp.finfo(sq.dtype).tiny, gap / jnp.where(sq > 0, sq, 1.0), jnp.inf)
        step = jnp.minimum(polyak, c_prev * state.step.astype(sq.dtype)) / c_t
        return (_map(lambda g: (-step * g).astype(g.dtype), updates),
                FedDecSPSState(count=state.count + 1, step=step.astype(state.step.dtype)))

    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------- communication


class Communication(NamedTuple):
    """Bytes one client exchanges in one round: ``up`` (to the server) and ``down``."""

    up: int
    down: int

    def total(self, num_clients: int) -> int:
        """Bytes over the network in a round of ``num_clients`` clients."""
        return num_clients * (self.up + self.down)


METHODS = ("fedavg", "fedadagrad", "fedadam", "fedyogi", "fedsps", "feddecsps",
           "mimelite", "mime", "fedlada")


def communication_bytes(method: str, upload: PyTree, *, download: PyTree | None = None,
                        base_optimizer: optax.GradientTransformation | None = None
                        ) -> Communication:
    """What one client sends and receives per round under ``method``, in bytes.

    ``upload`` is the model tree a client sends (its trainable half, arrays or
    ``jax.ShapeDtypeStruct``s; ``None`` holes and frozen fields count 0);
    ``download`` the model the server sends (default: same as ``upload``; FLoRA
    sends the rank-stacked factors, a dense server step sends dense weights).
    Extra payloads are sized from the trees themselves:

    * FedAvg, FedAdagrad/FedAdam/FedYogi (server-only state), FedSPS/FedDecSPS
      (step sizes never leave the client): model up, model down;
    * MimeLite: down model + base-optimizer state ``s`` (``base_optimizer.init``
      of ``upload``, so SGDm adds one copy, Adam two plus a count); up the
      model delta and the full-batch gradient at ``x``;
    * MIME: MimeLite plus the control variate ``c`` sent down (gradients are
      collected before training: one more exchange);
    * FedLADA: down ``x, ν, g_a``; up ``y_i, v̂_i, d_i`` (3× each way).

        >>> import jax.numpy as jnp, optax, jlora
        >>> tree = {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 8))}       # 128 bytes
        >>> jlora.optim.communication_bytes("fedlada", tree)
        Communication(up=384, down=384)
        >>> jlora.optim.communication_bytes("mime", tree, base_optimizer=optax.sgd(0.1, momentum=0.9))
        Communication(up=256, down=384)
    """
    choice(_OWNER + ".communication_bytes", "method", method, METHODS)
    up = tree_bytes(upload)
    down = up if download is None else tree_bytes(download)
    if method in ("mime", "mimelite"):
        if base_optimizer is None:
            raise ValueError(f"{_OWNER}.communication_bytes: method {method!r} needs "
                             "base_optimizer= (its state is sent to clients)")
        # the statistics live in the coordinates clients train (the upload's), even when
        # the model goes down in another form (FLoRA's stacked factors)
        state = tree_bytes(jax.eval_shape(base_optimizer.init, jax.eval_shape(lambda t: t, upload)))
        extra_down = state + (tree_bytes(upload) if method == "mime" else 0)
        return Communication(up=2 * up, down=down + extra_down)
    if method == "fedlada":
        return Communication(up=3 * up, down=down + 2 * up)
    return Communication(up=up, down=down)
