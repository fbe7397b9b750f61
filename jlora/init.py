"""Data-driven LoRA initialisations: EVA, CorDA (IPM and KPM) and LoRA-GA.

Each is a pure function of a param tree, a ``jlora.Spec`` and calibration data
that returns an adapted tree, as ``jlora.apply`` does; the initialisations that
need only the weight are ``LoRA(init="mica")`` and ``LoRA(init="orthogonal")``.

* :func:`eva` (Paischer et al. 2024, "One Initialization to Rule them All:
  Fine-tuning via Explained Variance Adaptation", Sec. 3): ``a`` holds the top
  right-singular vectors of each layer's inputs (an incremental PCA over the
  batches), ``b = 0``; the total rank is redistributed between layers by
  explained variance.
* :func:`corda` (Yang et al. 2024, "CorDA: Context-Oriented Decomposition
  Adaptation", Sec. 3): the SVD of ``W·C`` with ``C`` the covariance of the
  layer's inputs; the adapter takes the largest (``mode="ipm"``) or smallest
  (``mode="kpm"``) components and the base becomes the residual.
* :func:`lora_ga` (Wang, Yu & Li 2024, "LoRA-GA: Low-Rank Adaptation with
  Gradient Approximation", Sec. 3.2): factors from the SVD of the mean
  gradient of the loss with respect to each weight; the base becomes the
  residual.

Conventions (PyTorch's ``W = K0ᵀ``, ``A = aᵀ``, ``B = bᵀ``; ``s`` the LoRA scale).
The targets are the spec's ``LoRA`` rules on two-axis ``(in, out)`` kernels of
modules called with their input as first argument (Flax ``Dense``); other
targets keep the spec's own init, as PEFT does. Layer inputs are collected
with ``flax.linen.intercept_methods`` inside one ``jit``-compiled call of
``apply_fn(params, batch)`` per batch; a layer called several times per batch
contributes each call. Only one batch's layer inputs are held at a time: EVA
keeps an incremental PCA state per layer, CorDA a covariance per layer, LoRA-GA
a gradient sum per layer. ``apply_fn`` receives the plain (unadapted) params
and must not ``jit`` itself. ``progress(step, total)`` (optional) is called
after each batch, ``total`` is ``None`` for EVA (it runs to convergence).

Where the adapter changes the base (CorDA, LoRA-GA) the node keeps the initial
factors ``a0``, ``b0`` as PiSSA does, so ``jlora.merge``, ``jlora.unmerge`` and
``jlora.peft.save`` (plain LoRA for the original weights, rank doubled) stay
exact. The math, PEFT's choices and where they differ from the papers are in
docs/inits.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import _validate as v
from jlora.core import apply as _apply
from jlora.core import merge as _merge
from jlora.methods.base import from_matrix, to_matrix
from jlora.methods.lora import LoRANode
from jlora.tree import is_node, leaves_with_paths, map_with_paths

Progress = Callable[[int, Any], None] | None

__all__ = ["corda", "eva", "lora_ga"]


# ---------------------------------------------------------------- shared


def _setup(fn: str, adapted_or_params, spec, key):
    """(plain params, adapted tree, {path: LoRANode} of the calibrated targets)."""
    has_nodes = any(is_node(x) for _, x in leaves_with_paths(adapted_or_params))
    params = _merge(adapted_or_params) if has_nodes else adapted_or_params
    adapted = _apply(params, spec, key=jax.random.key(0) if key is None else key)
    targets = {}
    for path, node in leaves_with_paths(adapted):
        if not (type(node) is LoRANode and node.config.expert_axis is None
                and len(node.shape) == 2 and node.in_axes == (0,)
                and path.rpartition("/")[2] != "embedding"):
            continue
        if node.config.init not in ("kaiming", "gaussian"):
            raise ValueError(f"jlora.init.{fn}: {path}: the spec asks LoRA(init="
                             f"{node.config.init!r}); {fn} replaces the init, so leave init "
                             "at its default")
        targets[path] = node
    if not targets:
        raise ValueError(f"jlora.init.{fn}: the spec adapts no two-axis (in, out) kernel with "
                         "LoRA; nothing to initialise from data")
    return params, adapted, targets


def _check_fn(fn: str, name: str, value, *, optional: bool = False) -> None:
    if not (callable(value) or optional and value is None):
        what = "None or callable" if optional else "callable"
        raise ValueError(f"jlora.init.{fn}: {name} must be {what}, got {value!r}")


def _batches(fn: str, batches) -> Any:
    if isinstance(batches, dict) or not isinstance(batches, Iterable):
        raise ValueError(f"jlora.init.{fn}: batches must be an iterable of batches (a list of "
                         f"them), got a {type(batches).__name__}")
    if hasattr(batches, "shape") and hasattr(batches, "dtype"):
        # iterating an array yields its rows: one batch of samples would silently
        # become many one-sample batches
        raise ValueError(f"jlora.init.{fn}: batches must be an iterable of batches, got one "
                         f"array of shape {tuple(batches.shape)}; pass a list of batches "
                         f"(wrap a single batch x as [x])")
    if iter(batches) is batches:  # a one-shot iterator: keep its batches to re-read them
        batches = list(batches)
    for _ in batches:
        return batches
    raise ValueError(f"jlora.init.{fn}: batches is empty; pass at least one calibration batch")


@functools.partial(jax.jit, static_argnames=("apply_fn", "paths", "reduce"))
def _capture(params, batch, *, apply_fn: Callable, paths: tuple[str, ...], reduce: Callable):
    """``[(index, reduce(x, batch)), ...]`` in call order, ``x`` the input of each call
    of a module owning ``paths[index]``. Jitted with the functions static, so
    repeated calibrations of one model with one ``apply_fn`` compile once."""
    index = {p: i for i, p in enumerate(paths)}
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and args:
            i = index.get("/".join(map(str, context.module.path + ("kernel",))))
            if i is not None:
                calls.append((jnp.int32(i), reduce(jnp.asarray(args[0]), batch)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn(params, batch)
    return calls


def _capturer(apply_fn: Callable, paths: tuple[str, ...], reduce: Callable):
    return functools.partial(_capture, apply_fn=apply_fn, paths=paths, reduce=reduce)


@dataclasses.dataclass(frozen=True)
class _EvaRows:
    """EVA's per-call reduction: the input rows and their 0/1 weights (hashable, so the
    jitted capture is reused across calls with the same options)."""

    mask_fn: Callable | None
    use_label_mask: bool
    label_mask_value: int

    def __call__(self, x, batch):
        rows = _rows(x)
        mask = (self.mask_fn(batch) if self.mask_fn is not None
                else _lm_mask(batch, self.use_label_mask, self.label_mask_value))
        if mask is None or tuple(jnp.shape(mask)) != tuple(x.shape[:-1]):
            return rows, jnp.ones(rows.shape[0], bool)
        return rows, jnp.asarray(mask).reshape(-1).astype(bool)


def _corda_reduce(x, batch):
    return corda_covariance(x)


def _calls(fn, run, params, batch, paths, targets, number):
    """Run batch ``number`` (1-based); ``{path: [value, ...]}`` in first-call order, every
    target reached. An error inside the user's ``apply_fn`` (a batch whose features do not
    fit the model, say) comes back as a ValueError naming the batch."""
    out: dict[str, list] = {}
    try:
        calls = run(params, batch)
    except Exception as e:  # the user's model: Flax, jax and numpy raise many types
        raise ValueError(f"jlora.init.{fn}: apply_fn(params, batch) failed on calibration "
                         f"batch #{number} ({type(e).__name__}: {e})") from e
    for i, value in calls:
        out.setdefault(paths[int(i)], []).append(value)
    missing = [p for p in paths if p not in out]
    if missing:
        raise ValueError(f"jlora.init.{fn}: {missing[0]}: apply_fn(params, batch) never called "
                         "the flax module that owns this kernel (calibration reads the input of "
                         "the module's __call__)")
    for p, values in out.items():
        fan_in = targets[p].shape[0]
        if values[0][0].shape[-1] != fan_in:
            raise ValueError(f"jlora.init.{fn}: {p}: the module's input has "
                             f"{values[0][0].shape[-1]} features, the kernel {fan_in} inputs")
    return out


def _rows(x):
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _progress(progress, step, total):
    if progress is not None:
        progress(step, total)


# ---------------------------------------------------------------- EVA


class IPCAState(collections.namedtuple("IPCAState", "mean var n components singular")):
    """Incremental PCA state of one layer's inputs (scikit-learn's ``IncrementalPCA``):
    ``mean``, ``var`` ``(in,)``, ``n`` rows seen, ``components (k, in)``, ``singular (k,)``."""


def _svd_flip(vt):
    """Rows of ``vt`` signed so that each row's largest-magnitude entry is positive."""
    idx = jnp.argmax(jnp.abs(vt), axis=1)
    return vt * jnp.sign(vt[jnp.arange(vt.shape[0]), idx])[:, None]


@functools.partial(jax.jit, static_argnames=("k",))
def ipca_update(state: IPCAState | None, rows, weights, *, k: int):
    """One ``partial_fit`` of an incremental PCA on the rows with weight 1.

    ``rows (N, in)``, ``weights (N,)`` in {0, 1} (masked rows count as absent).
    With the batch mean ``μ_b``, ``n`` rows seen before and ``n_b`` new ones, the
    SVD is of ``[diag(S)·Vᵀ ; X − μ_b ; √(n·n_b/(n+n_b))·(μ − μ_b)]`` (the
    first batch: of ``X − μ_b``), signs fixed by :func:`_svd_flip`. Returns
    ``(state, explained_variance_ratio (k,), cosine (k,))`` where the ratio is
    ``S²/Σ(var·n_total)`` and ``cosine`` the cosine of each new component with
    the previous one (zeros on the first batch).
    """
    w = weights.astype(rows.dtype)
    n_b = w.sum()
    mean_b = (w[:, None] * rows).sum(0) / n_b
    centred = (rows - mean_b) * w[:, None]
    unnorm_b = (centred * centred).sum(0)
    if state is None:
        mean, var, n_total, stacked = mean_b, unnorm_b / n_b, n_b, centred
    else:
        n_total = state.n + n_b
        mean = (state.mean * state.n + mean_b * n_b) / n_total
        diff = state.mean - mean_b
        var = (state.var * state.n + unnorm_b + state.n * n_b / n_total * diff * diff) / n_total
        correction = jnp.sqrt(state.n * n_b / n_total) * diff
        stacked = jnp.concatenate([state.singular[:, None] * state.components, centred,
                                   correction[None]], axis=0)
    _, sv, vt = jnp.linalg.svd(stacked, full_matrices=False)
    vt = _svd_flip(vt)[:k]
    sv = sv[:k]
    evr = sv ** 2 / jnp.sum(var * n_total)
    if state is None:
        cos = jnp.zeros((k,), rows.dtype)
    else:
        norms = jnp.linalg.norm(vt, axis=1) * jnp.linalg.norm(state.components, axis=1)
        cos = jnp.sum(vt * state.components, axis=1) / jnp.maximum(norms, 1e-8)
    return IPCAState(mean, var, n_total, vt, sv), evr, cos


def eva_ranks(evr: dict[str, np.ndarray], shared: dict[str, str], budget: int,
              max_components: dict[str, int]) -> dict[str, int]:
    """EVA's rank redistribution (PEFT ``_get_rank_distribution``).

    ``shared`` maps every layer to the layer whose PCA it uses (itself, or the
    first layer with identical inputs), in layer order. The explained-variance
    ratios ``evr[shared[l]][:max_components[l]]`` of all layers are pooled, the
    ``budget`` largest picked (stable order on ties: earlier layers and
    components first) and each layer's rank is how many of its ratios were
    picked, so at most ``max_components[l]``; within a group of identical inputs
    the PCA's owner then swaps ranks with a member given more, unless either
    rank would exceed the other layer's ``max_components``.

        >>> eva_ranks({"p": np.array([.5, .3, .1]), "q": np.array([.4, .05, .01])},
        ...           {"p": "p", "q": "q"}, 3, {"p": 3, "q": 3})
        {'p': 2, 'q': 1}
    """
    keys, values = [], []
    for layer, owner in shared.items():
        for value in np.asarray(evr[owner])[:max_components[layer]]:
            keys.append(layer)
            values.append(float(value))
    order = np.argsort(-np.asarray(values, np.float64), kind="stable")[:budget]
    picked = collections.Counter(keys[i] for i in order)
    counts = {layer: picked.get(layer, 0) for layer in shared}
    for layer, owner in shared.items():
        if (owner != layer and counts[owner] < counts[layer]
                and counts[layer] <= max_components[owner]):
            counts[owner], counts[layer] = counts[layer], counts[owner]
    return counts


def _lm_mask(batch, use_label_mask, label_mask_value):
    """PEFT's default rows: ``attention_mask`` AND ``labels != label_mask_value``."""
    if not isinstance(batch, dict) or "input_ids" not in batch and "attention_mask" not in batch:
        return None
    mask = batch.get("attention_mask")
    mask = (jnp.ones(jnp.shape(batch["input_ids"]), bool) if mask is None
            else jnp.asarray(mask).astype(bool))
    if use_label_mask and "labels" in batch and jnp.shape(batch["labels"]) == mask.shape:
        mask = mask & (jnp.asarray(batch["labels"]) != label_mask_value)
    return mask


def eva(adapted_or_params: Any, spec, batches: Iterable, apply_fn: Callable, *,
        key: jax.Array | None = None, rho: float = 2.0, tau: float = 0.99,
        whiten: bool = False, adjust_scaling_factors: bool = True,
        use_label_mask: bool = True, label_mask_value: int = -100,
        mask_fn: Callable | None = None, max_batches: int = 1000,
        progress: Progress = None) -> Any:
    """EVA: ``a`` from the principal directions of each layer's inputs, ``b = 0``.

    Paischer et al. 2024 (arXiv 2410.07170), Sec. 3, as PEFT 0.21.2's
    ``get_eva_state_dict``. For each target with spec rank ``r``, an incremental
    PCA (:func:`ipca_update`, centred as scikit-learn's) of its input rows
    keeps ``k = round(r·rho)`` components; the batches are cycled (the first
    batch is read once more after it detects layers with identical inputs,
    which then share one PCA) until every layer's components ``[:rank]`` have
    cosine ``>= tau`` with the previous batch's, a layer's PCA pausing while
    it has converged. After each batch the budget ``Σ r`` is redistributed by
    :func:`eva_ranks`. The result: ``a = V[:, :rank_l]`` (the first ``rank_l``
    components as columns; ``whiten`` divides each by ``√singular value``),
    ``b = 0``, the base unchanged, ``alpha_l = alpha·rank_l/r`` when
    ``adjust_scaling_factors`` (so ``s`` is kept); a layer given rank 0 is left a
    plain array. Rows are ``attention_mask`` (and ``labels != label_mask_value``
    under ``use_label_mask``) positions when a batch is a dict holding them, or
    ``mask_fn(batch)`` (a boolean array of the layer inputs' leading shape); a
    layer whose inputs have another leading shape uses all rows.

    jlora takes an exact SVD of the stacked matrix where PEFT takes a seeded
    randomized one (``svd_lowrank`` with ``q = 2k``, exact when ``in <= 2k``),
    and breaks ties in the rank pool by layer order. A layer's rank is capped at
    ``min(fan_in, fan_out)``, the largest a LoRA of its kernel can have (and
    ``jlora.apply`` accepts): only its first that many components enter the
    pool, so the budget goes to layers that can use it, where PEFT can give a
    narrow layer (``fan_out < k``) a rank above ``fan_out``; within a group of
    identical inputs the owner keeps its rank when taking a member's would pass
    its own cap (the group's convergence check then covers the member's rank).
    Where PEFT's ranks are within the caps, they are the same. ``max_batches`` bounds
    the forward passes (PEFT cycles without limit): not converging by then is a
    ``ValueError`` naming the layers.

        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Dense(6)
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
        >>> xs = [jax.random.normal(jax.random.key(i), (32, 8)) for i in range(4)]
        >>> adapted = jlora.init.eva(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}), xs,
        ...                          lambda p, x: model.apply({"params": p}, x))
        >>> node = adapted["kernel"]
        >>> node.a.shape, bool((node.b == 0).all())
        ((8, 2), True)
    """
    v.real("jlora.init.eva", "rho", rho, ge=1.0)
    v.real("jlora.init.eva", "tau", tau, gt=0.0, le=1.0)
    v.boolean("jlora.init.eva", "whiten", whiten)
    v.boolean("jlora.init.eva", "adjust_scaling_factors", adjust_scaling_factors)
    v.boolean("jlora.init.eva", "use_label_mask", use_label_mask)
    v.positive_int("jlora.init.eva", "max_batches", max_batches)
    if not isinstance(label_mask_value, numbers.Integral) or isinstance(label_mask_value, bool):
        raise ValueError(f"jlora.init.eva: label_mask_value must be an int (the label of "
                         f"positions to leave out, -100 by default), got {label_mask_value!r}")
    _check_fn("eva", "apply_fn", apply_fn)
    _check_fn("eva", "mask_fn", mask_fn, optional=True)
    _check_fn("eva", "progress", progress, optional=True)
    batches = _batches("eva", batches)
    params, adapted, targets = _setup("eva", adapted_or_params, spec, key)
    paths = tuple(targets)
    if rho > 1000:
        biggest = max(max(jnp.shape(x)) for _, x in leaves_with_paths(params) if jnp.ndim(x))
        rho = min(rho, max(biggest // min(t.config.rank for t in targets.values()), 1))
    max_comp = {p: round(t.config.rank * rho) for p, t in targets.items()}
    for p, k in max_comp.items():
        if k > targets[p].shape[0]:
            raise ValueError(f"jlora.init.eva: {p}: rank·rho = {k} components exceed the "
                             f"layer's {targets[p].shape[0]} input features; lower rank or rho")
    budget = sum(t.config.rank for t in targets.values())

    run = _capturer(apply_fn, paths, _EvaRows(mask_fn, use_label_mask, label_mask_value))
    first = _calls("eva", run, params, next(iter(batches)), paths, targets, 1)
    # Layers with identical inputs on the first batch share one PCA (PEFT hashes them).
    order = list(first)
    selected = {p: _selected(first[p][0]) for p in order}
    shared: dict[str, str] = {}
    for i, p in enumerate(order):
        shared[p] = next((q for q in order[:i] if shared[q] == q
                          and np.array_equal(selected[q], selected[p])), p)
    owners = [p for p in order if shared[p] == p]
    for p in order:
        max_comp[shared[p]] = max(max_comp[shared[p]], max_comp[p])
    for p in order:
        max_comp[p] = max_comp[shared[p]]
    shared = {**{p: p for p in owners}, **{p: q for p, q in shared.items() if p != q}}
    del first
    # the pool offers each layer at most min(fan_in, fan_out) components: a larger
    # LoRA rank than that is one jlora.apply refuses
    pool = {p: min(max_comp[p], *targets[p].shape) for p in shared}
    group = {p: [q for q, o in shared.items() if o == p] for p in owners}

    states: dict[str, IPCAState | None] = {p: None for p in owners}
    evr: dict[str, np.ndarray] = {}
    converged = {p: np.zeros(max_comp[p], bool) for p in owners}
    done = {p: False for p in owners}
    ranks = dict(max_comp)
    step = 0
    while not all(done.values()):
        for batch in batches:
            for p in owners:
                ok = bool(converged[p][:max(ranks[q] for q in group[p])].all())
                if ok != done[p]:
                    done[p] = ok
            if all(done.values()):
                break
            if step >= max_batches:
                late = [p for p in owners if not done[p]]
                raise ValueError(f"jlora.init.eva: {late[0]} (and {len(late) - 1} other layers) "
                                 f"did not converge (cosine >= tau={tau}) within max_batches="
                                 f"{max_batches} batches; pass more or more varied batches, "
                                 "raise max_batches or lower tau")
            calls = _calls("eva", run, params, batch, paths, targets, step + 1)
            step += 1
            for p in owners:
                if done[p]:
                    continue
                for rows, mask in calls[p]:
                    if int(mask.sum()) < max_comp[p]:
                        continue  # PEFT skips a batch with fewer rows than components
                    had = states[p] is not None
                    states[p], ratio, cos = ipca_update(states[p], rows, mask, k=max_comp[p])
                    evr[p] = np.asarray(ratio)
                    if had:
                        converged[p] = np.asarray(cos) >= tau
            if all(states[p] is not None for p in owners):
                ranks = eva_ranks(evr, shared, budget, pool)
            _progress(progress, step, None)
    out = {}
    for p, owner in shared.items():
        rank, node = ranks[p], targets[p]
        state = states[owner]
        if rank and (state is None or not converged[owner][:rank].all()):
            raise ValueError(f"jlora.init.eva: {p}: never fitted (each batch had fewer than "
                             f"{max_comp[owner]} rows for it); pass larger batches")
        if rank == 0:
            out[p] = node.base
            continue
        u = state.components[:rank]
        if whiten:
            u = u / jnp.sqrt(state.singular[:rank])[:, None]
        cfg = node.config
        alpha = cfg.rank if cfg.alpha is None else cfg.alpha
        if adjust_scaling_factors:
            alpha = alpha * rank / cfg.rank
        cfg = dataclasses.replace(cfg, rank=rank, alpha=alpha)
        dt = node.a.dtype
        out[p] = LoRANode(base=node.base, a=u.T.astype(dt), b=jnp.zeros((rank, node.shape[1]), dt),
                          config=cfg, shape=node.shape, in_axes=node.in_axes)
    return map_with_paths(lambda p, x: out.get(p, x), adapted)


def _selected(call):
    rows, mask = (np.asarray(t) for t in call)
    return rows[mask]


# ---------------------------------------------------------------- CorDA


def corda_covariance(x):
    """``(Σ_i X_iᵀX_i, count)`` over the samples ``i`` of one call's input ``x``.

    ``x (batch, ..., in)``: sample ``i`` is ``X_i = x[i]`` as rows, divided by
    ``|max X_i|`` (its largest *value*, as PEFT), in float32; a two-axis input
    ``(batch, in)`` gives one row per sample. ``count`` is the number of samples.
    """
    x = x.astype(jnp.float32)
    xs = x.reshape(x.shape[0], -1, x.shape[-1])
    xs = xs / jnp.abs(jnp.max(xs, axis=(1, 2)))[:, None, None]
    return jnp.einsum("bni,bnj->ij", xs, xs), jnp.float32(x.shape[0])


def corda_factors(kernel, cov, rank: int, scale: float, *, mode: str = "ipm"):
    """CorDA's ``(a, b, residual)`` for a ``(in, out)`` kernel and input covariance.

    Damped ``C_d = C + d·mean(diag C)·I`` with ``d = 0.01`` doubled until
    ``‖C_d·C_d⁻¹ − I‖_F < 0.05``; ``U, S, Vᴴ = svd(W·C_d)`` with ``W = kernelᵀ``
    and ``V = (Vᴴ·C_d⁻¹)ᵀ``, so ``W = U·diag(S)·Vᵀ``. IPM keeps the ``rank``
    largest components, KPM the ``rank`` smallest; with ``S' = S/scale``,
    ``a = V_r·diag(√S')``, ``b = diag(√S')·U_rᵀ`` and the residual
    ``kernel − scale·a·b``.
    """
    k = jnp.asarray(kernel, jnp.float32)
    cov = jnp.asarray(cov, jnp.float32)
    eye = jnp.eye(cov.shape[0], dtype=jnp.float32)
    damp = 0.01
    for _ in range(64):
        fixed = cov + eye * jnp.mean(jnp.diag(cov)) * damp
        inv = jnp.linalg.inv(fixed)
        if float(jnp.linalg.norm(fixed @ inv - eye)) < 0.05:
            break
        damp *= 2
    else:
        raise ValueError("CorDA: the input covariance cannot be damped into an invertible "
                         "matrix (it holds no information)")
    u, sv, vh = jnp.linalg.svd(k.T @ fixed, full_matrices=False)
    vmat = (vh @ inv).T
    sl = slice(None, rank) if mode == "ipm" else slice(sv.shape[0] - rank, None)
    root = jnp.sqrt(sv[sl] / scale)
    a = vmat[:, sl] * root
    b = root[:, None] * u[:, sl].T
    return a, b, k - scale * (a @ b)


def corda(adapted_or_params: Any, spec, batches: Iterable, apply_fn: Callable, *,
          mode: str = "ipm", key: jax.Array | None = None, progress: Progress = None) -> Any:
    """CorDA: context-oriented SVD of ``W·C``; the adapter holds IPM's largest or
    KPM's smallest components and the base becomes the residual.

    Yang et al. 2024 (arXiv 2406.05223), Sec. 3, as PEFT 0.21.2's
    ``preprocess_corda`` + ``corda_init``. ``C`` is the mean over calibration
    samples of ``X_iᵀX_i / max(X_i)²`` (:func:`corda_covariance`; PEFT feeds one
    sample per forward call, jlora treats each entry of a batch's leading axis
    as one sample, which is the same at batch size 1); the factors are
    :func:`corda_factors`. ``mode="ipm"`` (instruction-previewed: calibrate on
    the task's data) keeps the principal components, ``mode="kpm"``
    (knowledge-preserved: calibrate on the knowledge to keep, e.g. QA data)
    adapts the smallest ones so the adapter avoids the directions the data uses.
    Nodes keep ``a0``, ``b0`` and the residual base, as PiSSA's.

        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Dense(6)
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
        >>> xs = [jax.random.normal(jax.random.key(i), (4, 5, 8)) for i in range(3)]
        >>> adapted = jlora.init.corda(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}), xs,
        ...                            lambda p, x: model.apply({"params": p}, x), mode="kpm")
        >>> bool(jnp.allclose(jlora.merge(adapted)["kernel"], params["kernel"], atol=1e-5))
        True
    """
    v.choice("jlora.init.corda", "mode", mode, ("ipm", "kpm"))
    _check_fn("corda", "apply_fn", apply_fn)
    _check_fn("corda", "progress", progress, optional=True)
    batches = _batches("corda", batches)
    params, adapted, targets = _setup("corda", adapted_or_params, spec, key)
    paths = tuple(targets)
    run = _capturer(apply_fn, paths, _corda_reduce)
    sums: dict[str, Any] = {}
    count: dict[str, float] = {}
    total = len(batches) if hasattr(batches, "__len__") else None
    for step, batch in enumerate(batches, 1):
        for p, values in _calls("corda", run, params, batch, paths, targets, step).items():
            for cov, n in values:
                sums[p] = cov if p not in sums else sums[p] + cov
                count[p] = count.get(p, 0.0) + float(n)
        _progress(progress, step, total)
    out = {}
    for p, node in targets.items():
        cov = sums[p] / count[p]
        if not bool(jnp.isfinite(cov).all()):
            raise ValueError(f"jlora.init.corda: {p}: the input covariance is not finite (a "
                             "sample whose largest value is 0, or inf/NaN activations)")
        try:
            a, b, _ = corda_factors(node.base, cov, node.config.rank, node.config.scale,
                                    mode=mode)
        except ValueError as e:
            raise ValueError(f"jlora.init.corda: {p}: {e}") from None
        out[p] = _residual_node(node, a, b, cast=False)
    return map_with_paths(lambda p, x: out.get(p, x), adapted)


def _residual_node(node, a, b, *, cast: bool):
    """A LoRA node over the residual ``K0 − s·a·b`` keeping ``a0 = a``, ``b0 = b`` (as PiSSA).

    ``a`` and ``b`` are first rounded to the dtypes they are stored in (with
    ``cast``, through the base dtype first, as PEFT's LoRA-GA; then the node's
    factor dtype), and the residual is taken in float32 from those stored
    values, so ``base + s·a·b`` is the original kernel to float32 rounding
    even when the factors are narrower than the base (bf16 factors on a
    float32 kernel).
    """
    dt = node.a.dtype
    if cast:
        a, b = a.astype(node.base.dtype), b.astype(node.base.dtype)
    a, b = a.astype(dt), b.astype(dt)
    k0 = to_matrix(node.base, node.in_axes).astype(jnp.float32)
    residual = k0 - node.config.scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    base = from_matrix(residual, node.shape, node.in_axes).astype(node.base.dtype)
    return LoRANode(base=base, a=a, b=b, a0=a, b0=b, config=node.config, shape=node.shape,
                    in_axes=node.in_axes)


# ---------------------------------------------------------------- LoRA-GA

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def lora_ga_factors(kernel, grad, rank: int, scale: float, *, direction: str = "ArB2r",
                    scaling: str = "stable", stable_gamma: float = 16.0,
                    key: jax.Array | None = None):
    """LoRA-GA's ``(a, b)`` from a ``(in, out)`` kernel's mean gradient ``grad``.

    With PyTorch's ``G = gradᵀ = U·diag(S)·Vᴴ`` (``S`` descending) and ``A = aᵀ``,
    ``B = bᵀ``: ``ArB2r`` ``A = Vᴴ[:r]``, ``B = U[:, r:2r]·diag(S[r:2r])``;
    ``A2rBr`` ``A = Vᴴ[r:2r]``, ``B = U[:, :r]·diag(S[:r])``; ``ArBr``
    ``A = Vᴴ[1:2r:2]``, ``B = U[:, 0:2r:2]·diag(S[0:2r:2])``; ``random`` one
    permutation ``idx`` of ``2r`` (from ``key``) for both. Then ``stable``:
    ``B ·= out^{1/4}/√stable_gamma``; ``weight_svd``: ``B ·= σ₁(W)/S_B[0]``;
    ``gd_scale``: ``A, B /= scale``; ``unit``: unchanged (PEFT's
    ``lora_ga_init``).
    """
    g = jnp.asarray(grad, jnp.float32).T  # (out, in)
    r = rank
    u, sv, vh = jnp.linalg.svd(g, full_matrices=False)
    if direction == "ArB2r":
        ia, ib = np.arange(r), np.arange(r, 2 * r)
    elif direction == "A2rBr":
        ia, ib = np.arange(r, 2 * r), np.arange(r)
    elif direction == "ArBr":
        ia, ib = np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)
    else:
        ia = ib = jax.random.permutation(key, 2 * r)[:r]
    big_a = vh[ia]
    s_b = sv[ib]
    big_b = u[:, ib] * s_b
    out = g.shape[0]
    if scaling == "stable":
        big_b = big_b * (out ** 0.25 / math.sqrt(stable_gamma))
    elif scaling == "weight_svd":
        top = jnp.linalg.svd(jnp.asarray(kernel, jnp.float32), compute_uv=False)[0]
        big_b = jnp.where(s_b[0] > 0, big_b * top / jnp.where(s_b[0] > 0, s_b[0], 1.0), big_b)
    elif scaling == "gd_scale":
        big_a, big_b = big_a / scale, big_b / scale
    return big_a.T, big_b.T


@functools.partial(jax.jit, static_argnames=("loss_fn", "paths"))
def _target_grads(params, batch, *, loss_fn: Callable, paths: tuple[str, ...]):
    """``∂ loss_fn(params, batch) / ∂ params[p]`` for ``p`` in ``paths`` only."""
    def loss(ws):
        out = loss_fn(map_with_paths(lambda p, x: ws.get(p, x), params), batch)
        dtype = getattr(out, "dtype", None)
        if jnp.shape(out) != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"jlora.init.lora_ga: loss_fn(params, batch) must return the loss "
                             f"as a floating-point scalar, got shape {tuple(jnp.shape(out))} "
                             f"and dtype {dtype}")
        return out
    return jax.grad(loss)({p: x for p, x in leaves_with_paths(params) if p in paths})


def lora_ga(adapted_or_params: Any, spec, loss_fn: Callable, batches: Iterable, *,
            direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16.0,
            key: jax.Array | None = None, progress: Progress = None) -> Any:
    """LoRA-GA: factors aligned with the mean gradient; the base becomes the residual.

    Wang, Yu & Li 2024 (arXiv 2407.05000), Sec. 3.2, as PEFT 0.21.2's
    ``preprocess_loraga`` + ``lora_ga_init``. ``G`` is the mean over ``batches``
    of ``∂ loss_fn(params, batch) / ∂ W`` for each target (jitted, one batch at
    a time; ``loss_fn`` applies its own dropout if it wants PEFT's train-mode
    estimate); the factors are :func:`lora_ga_factors` (``direction`` and
    ``scale`` as PEFT's ``LoraGAConfig``, ``key`` draws ``random``'s indices),
    rounded to the base dtype, and the base becomes ``K0 − s·a·b``. Needs
    ``2·rank <= min(fan_in, fan_out)``. jlora takes the exact SVD of ``G`` where
    PEFT takes an unseeded randomized one (``svd_lowrank(q = 4r)``), and the
    exact ``σ₁(W)`` for ``weight_svd``. PEFT's choices differ from the authors'
    code (unit singular vectors, both factors scaled): see docs/inits.md.

        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Dense(6)
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
        >>> data = [(jax.random.normal(jax.random.key(i), (4, 8)), jnp.ones((4, 6)))
        ...         for i in range(2)]
        >>> loss = lambda p, b: jnp.mean((model.apply({"params": p}, b[0]) - b[1]) ** 2)
        >>> adapted = jlora.init.lora_ga(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
        ...                              loss, data)
        >>> bool(jnp.allclose(jlora.merge(adapted)["kernel"], params["kernel"], atol=1e-5))
        True
    """
    v.choice("jlora.init.lora_ga", "direction", direction, DIRECTIONS)
    v.choice("jlora.init.lora_ga", "scale", scale, SCALES)
    v.real("jlora.init.lora_ga", "stable_gamma", stable_gamma, gt=0.0)
    _check_fn("lora_ga", "loss_fn", loss_fn)
    _check_fn("lora_ga", "progress", progress, optional=True)
    batches = _batches("lora_ga", batches)
    params, adapted, targets = _setup("lora_ga", adapted_or_params, spec, key)
    for p, node in targets.items():
        if 2 * node.config.rank > min(node.shape):
            raise ValueError(f"jlora.init.lora_ga: {p}: 2·rank = {2 * node.config.rank} exceeds "
                             f"min(fan_in, fan_out) = {min(node.shape)}; LoRA-GA splits the "
                             "gradient's top 2·rank singular triplets between a and b")

    grad = functools.partial(_target_grads, loss_fn=loss_fn, paths=tuple(targets))
    sums: dict[str, Any] = {}
    total = len(batches) if hasattr(batches, "__len__") else None
    n = 0
    for n, batch in enumerate(batches, 1):
        g = grad(params, batch)
        sums = g if not sums else jax.tree.map(jnp.add, sums, g)
        _progress(progress, n, total)
    keys = {}
    if direction == "random":
        base_key = jax.random.key(0) if key is None else key
        keys = {p: jax.random.fold_in(base_key, i) for i, p in enumerate(targets)}
    out = {}
    for p, node in targets.items():
        g = sums[p].astype(jnp.float32) / n
        if not bool(jnp.any(g != 0)):
            raise ValueError(f"jlora.init.lora_ga: {p}: the loss's gradient with respect to this "
                             "kernel is zero on every batch (the loss does not use it)")
        k0 = to_matrix(node.base, node.in_axes).astype(jnp.float32)
        a, b = lora_ga_factors(k0, g, node.config.rank, node.config.scale, direction=direction,
                               scaling=scale, stable_gamma=stable_gamma, key=keys.get(p))
        out[p] = _residual_node(node, a, b, cast=True)
    return map_with_paths(lambda p, x: out.get(p, x), adapted)
