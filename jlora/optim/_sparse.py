"""Fu et al.'s second-order approximation method (SAM) for choosing sparse masks.

Fu, Yang, So, Lam, Bing, Collier, "On the Effectiveness of Parameter-Efficient
Fine-Tuning", AAAI 2023 (arXiv 2211.15583), section "Second-order
Approximation Method"; code ``fuzihaofzh/AnalyzeParameterEfficientFinetune``,
``src/runner.py`` (``bsearch``). Not to be confused with sharpness-aware
minimisation (``jlora.optim.sam_gradient``).

A sparse fine-tuned model is ``θ = θ0 + M·Δθ`` with a 0/1 diagonal mask ``M``
of ``⌊p·n⌋`` ones. Around the pre-trained ``θ0``,

    L(θ0 + MΔθ) ≈ L(θ0) + gᵀ MΔθ + ½ (MΔθ)ᵀ H (MΔθ),     g = ∇L(θ0)

and with a diagonal ``H = diag(h)``, ``h > 0``, the best ``Δθ`` for a mask is
``Δθ_i = −g_i / h_i`` and lowers the loss by ``½ Σ_{i ∈ mask} g_i² / h_i``. The
mask that lowers it most keeps the entries of largest **score**

    s_i = g_i² / h_i.

``g`` is the gradient summed over the calibration batches (the released code
sums the minibatch gradients of its burn-in steps at ``θ0``, without updating
``θ0``). The curvature ``h``:

* ``None`` (default, the released code): ``h`` constant, so the mask is the top
  ``|g_i|``;
* ``"fisher"``: the empirical Fisher diagonal ``h_i = (1/T) Σ_t g_{t,i}²`` of
  the ``T`` batch gradients, a standard positive estimate of the Hessian
  diagonal for likelihood losses (an entry whose gradient is zero on every
  batch scores 0);
* a pytree shaped like ``params`` holding a positive diagonal estimate per
  targeted leaf (from any Hessian estimator).

As in the released code the top-``k`` is taken **per tensor**: each targeted
leaf trains ``k = max(1, ⌊p·n⌋)`` of its ``n`` entries (ties go to the lower
flat index; ``jlora.methods.sparse.entries``). A gradient sum (or, for
``"fisher"``, a squared-gradient sum) that is not finite is a ``ValueError``
naming the leaf: ``top_k`` would rank NaN scores first.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora._validate import function, real
from jlora.methods.sparse import Sparse, entries
from jlora.spec import Spec
from jlora.tree import PyTree, is_node, leaves_with_paths, map_with_paths

_OWNER = "jlora.optim.sam_select"
Array = jax.Array


def sam_scores(grad: Array, hessian: Array | None = None) -> Array:
    """Fu et al.'s SAM score ``g² / h`` per entry (``g²`` when ``hessian`` is None).

    Entries with ``h = 0`` score 0 (there ``g`` is 0 as well for a Fisher
    estimate); a user-supplied ``h`` must be positive.

        >>> import jax.numpy as jnp
        >>> from jlora.optim import sam_scores
        >>> sam_scores(jnp.array([1.0, -2.0, 3.0]), jnp.array([1.0, 2.0, 9.0])).tolist()
        [1.0, 2.0, 1.0]
    """
    g2 = jnp.square(grad.astype(jnp.promote_types(grad.dtype, jnp.float32)))
    if hessian is None:
        return g2
    if tuple(jnp.shape(hessian)) != tuple(jnp.shape(grad)):
        raise ValueError(f"jlora.optim.sam_scores: hessian has shape {tuple(jnp.shape(hessian))}, "
                         f"grad has {tuple(jnp.shape(grad))}; they must match")
    h = hessian.astype(g2.dtype)
    return jnp.where(h > 0, g2 / jnp.where(h > 0, h, 1), 0)



def sam_select(params: PyTree, spec: Spec, loss_fn: Callable, batches: Iterable, *,
               density: float | None = None, hessian: Any = None,
               callback: Callable[[int], Any] | None = None) -> Spec:
    """Choose each ``Sparse(select="sam")`` leaf's entries from calibration gradients.

    Args:
      params: the pre-trained parameters ``θ0`` (a plain tree, not adapted).
      spec: a ``jlora.Spec``; every leaf whose first matching rule is a
        ``jlora.Sparse(density, select="sam")`` without ``indices`` is scored.
        Other rules (e.g. a ``Full()`` head) are kept as they are.
      loss_fn: ``loss_fn(params, batch) -> scalar`` on plain parameters.
      batches: the calibration batches: an iterable of at least one batch (a
        single dict or array counts as one batch; a tuple is refused, since
        one ``(x, y)`` batch and a tuple of batches look alike: pass a list).
      density: the fraction of entries to keep per leaf, in ``(0, 1]``;
        default each rule's own ``density``.
      hessian: the curvature ``h`` of the score ``g²/h``: ``None`` (constant,
        as the released code), ``"fisher"`` (empirical Fisher diagonal) or a
        pytree like ``params`` with positive arrays at the targeted leaves.
      callback: called with the number of batches done after each batch.

    Returns:
      A ``Spec`` for ``jlora.apply``: one exact-path rule
      ``Sparse(density, select="sam", indices=...)`` per scored leaf, then the
      other rules of ``spec``.

    Example::

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": jnp.zeros((2, 3))}
        >>> target = jnp.array([[0.0, 5.0, 0.0], [1.0, 0.0, -3.0]])
        >>> loss = lambda p, batch: jnp.sum((p["w"] - target) ** 2)
        >>> spec = jlora.optim.sam_select(params, jlora.Spec({"w": jlora.Sparse(select="sam")}),
        ...                               loss, [None], density=0.34)
        >>> list(spec.match("w").indices)  # the two largest |∂L/∂w|: 5 and -3
        [1, 5]
        >>> jlora.apply(params, spec, key=jax.random.key(0))["w"].values.shape
        (2,)
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"{_OWNER}: spec must be a jlora.Spec, got {type(spec).__name__}")
    function(_OWNER, "loss_fn", loss_fn)
    if density is not None:
        real(_OWNER, "density", density, gt=0.0, le=1.0)
    if callback is not None:
        function(_OWNER, "callback", callback)
    fisher = isinstance(hessian, str)
    if fisher and hessian != "fisher":
        raise ValueError(f"{_OWNER}: hessian must be None, 'fisher' or a pytree like params, "
                         f"got {hessian!r}")

    targets: dict[str, tuple[Array, Sparse]] = {}
    for path, leaf in leaves_with_paths(params):
        rule = spec.match_rule(path)
        if rule is None or not _is_sam(rule.config):
            continue
        if is_node(leaf):
            raise ValueError(f"{_OWNER}: {path} is already adapted ({leaf.method}); "
                             "pass the plain pre-trained params")
        rule.config.check_leaf(jnp.asarray(leaf), path)
        targets[path] = (jnp.asarray(leaf), rule.config)
    if not targets:
        raise ValueError(f"{_OWNER}: no leaf's first matching rule is "
                         "jlora.Sparse(select='sam') without indices")
    curvature = None
    if hessian is not None and not fisher:
        by_path = dict(leaves_with_paths(hessian))
        curvature = {}
        for path, (leaf, _) in targets.items():
            h = by_path.get(path)
            if h is None or tuple(np.shape(h)) != tuple(leaf.shape):
                raise ValueError(f"{_OWNER}: hessian has no array of shape {tuple(leaf.shape)} "
                                 f"at {path}")
            if not bool(jnp.all(jnp.asarray(h) > 0)):
                raise ValueError(f"{_OWNER}: hessian at {path} must be > 0 everywhere (the "
                                 "second-order step -g/h needs a positive curvature)")
            curvature[path] = jnp.asarray(h)

    def loss_of_targets(tg, batch):
        return loss_fn(map_with_paths(lambda path, leaf: tg.get(path, leaf), params), batch)

    @jax.jit
    def accumulate(acc, tg, batch):
        g = jax.grad(loss_of_targets)(tg, batch)
        total, sq = acc
        total = jax.tree.map(lambda a, b: a + b.astype(a.dtype), total, g)
        if fisher:
            sq = jax.tree.map(lambda a, b: a + jnp.square(b.astype(a.dtype)), sq, g)
        return total, sq

    tg = {p: leaf for p, (leaf, _) in targets.items()}
    zeros = {p: jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32))
             for p, leaf in tg.items()}
    acc, count = (zeros, zeros if fisher else None), 0
    if isinstance(batches, (Mapping, np.ndarray, jax.Array)):
        batches = [batches]
    elif isinstance(batches, tuple):  # one (x, y) batch, or a tuple of batches?
        raise ValueError(f"{_OWNER}: batches is a tuple of {len(batches)} items, which could be "
                         f"one (x, y) batch or {len(batches)} batches; pass a list: [batch] for "
                         "one batch, list(batches) for several")
    for batch in batches:
        acc = accumulate(acc, tg, batch)
        count += 1
        if callback is not None:
            callback(count)
    if not count:
        raise ValueError(f"{_OWNER}: batches is empty; give at least one calibration batch")
    total, sq = acc
    for path in targets:  # top_k ranks NaN first: a non-finite score would pick any mask
        for what, acc_tree in (("gradient", total), ("squared gradient", sq)):
            if acc_tree is not None and not bool(jnp.isfinite(acc_tree[path]).all()):
                raise ValueError(f"{_OWNER}: the summed calibration {what} of {path} is not "
                                 "finite (NaN or inf); check loss_fn and the batches")

    rules = []
    for path, (leaf, config) in targets.items():
        h = sq[path] / count if fisher else (curvature or {}).get(path)
        score = sam_scores(total[path], h).reshape(-1)
        p = config.density if density is None else density
        k = entries(p, score.size)
        idx = np.sort(np.asarray(jax.lax.top_k(score, k)[1]))
        rules.append((re.compile(re.escape(path)),
                      Sparse(p, select="sam", indices=idx, dtype=config.dtype)))
    rules += [(r.pattern, r.config) for r in spec.rules if not _is_sam(r.config)]
    return Spec(rules)


def _is_sam(config) -> bool:
    return isinstance(config, Sparse) and config.select == "sam" and config.indices is None
