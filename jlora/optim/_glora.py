"""How GLoRA trains: supernet sampling and the evolutionary configuration search.

GLoRA (Chavan et al. 2023, arXiv 2306.07967) trains one supernet, every layer's maximal support
tensors shared by all 432 configurations, drawing a fresh configuration per
layer each step with :func:`glora_sample`; then :func:`glora_search` evolves
per-layer configurations scored by your validation metric with the inherited
supernet weights, and :func:`glora_fix` bakes the winner into the tree for
merging and serving. The layer math is in :mod:`jlora.methods.glora`.

The evolution is the paper's: population 50, 20 generations, the top 10 are
parents; each generation adds 25 mutants (each layer/support choice redrawn
with probability 0.2) and 25 crossovers (each choice from either parent), fills
up with random candidates, and rejects candidates over the parameter limit.

Example::

    frozen = jlora.optim.glora_sample(step_key, frozen)   # inside the jitted train step
    ...
    def evaluate(choices):                                # after training
        return accuracy(jlora.combine(trainable, jlora.optim.glora_fix(frozen, choices)))
    result = jlora.optim.glora_search(evaluate, jlora.combine(trainable, frozen), seed=0,
                                      max_params=50_000, callback=on_generation)
    served = jlora.merge(jlora.optim.glora_fix(jlora.combine(trainable, frozen), result.best))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jlora.methods.glora import (ALLOWED, FORMS, SUPPORTS, GLoRABiasNode, GLoRANode,
                                 support_params)
from jlora._validate import positive_int, real
from jlora.tree import leaves_with_paths, map_with_paths, parent, path_key

Choices = dict  # module path -> tuple of 5 form codes (a, b, c, d, e)
Support = Literal["a", "b", "c", "d", "e"]
Form = Literal["none", "scalar", "vector", "lowrank"]


def _glora(x) -> bool:
    return isinstance(x, (GLoRANode, GLoRABiasNode))


def glora_layers(tree: Any) -> dict[str, tuple[int, int]]:
    """``{module path: (fan_in, fan_out)}`` of every GLoRA layer."""
    return {parent(p): tuple(x.shape) for p, x in leaves_with_paths(tree)
            if isinstance(x, GLoRANode)}


def _biased(tree: Any) -> set[str]:
    """Module paths whose GLoRA layer has a bias node (the c, d, e supports act there only)."""
    return {parent(p) for p, x in leaves_with_paths(tree) if isinstance(x, GLoRABiasNode)}


def _allowed(layer: str, support: str, biased: set[str]) -> tuple[int, ...]:
    """The codes a layer's support can take: only "none" for c, d, e without a bias."""
    return ALLOWED[support] if support in ("a", "b") or layer in biased else (0,)


def glora_current(tree: Any) -> Choices:
    """The configuration every GLoRA layer carries now."""
    return {parent(p): tuple(int(c) for c in np.asarray(x.choice))
            for p, x in leaves_with_paths(tree) if isinstance(x, GLoRANode)}


def glora_describe(codes) -> dict[Support, Form]:
    """``(3, 2, 0, 2, 1)`` -> ``{"a": "lowrank", "b": "vector", ...}``."""
    return {s: FORMS[int(c)] for s, c in zip(SUPPORTS, codes)}


def glora_sample(key: jax.Array, tree: Any) -> Any:
    """Draw a uniform configuration per layer (kernel and bias nodes agree); jit-safe.

    A layer without a bias leaf always draws ``c = d = e = "none"`` (those
    supports act on the bias).

    Each layer's draw comes from ``key`` folded with the layer's path, so one key
    per training step trains the supernet without retracing:

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
        >>> tree = jlora.apply(params, jlora.Spec({"fc/kernel": jlora.GLoRA(rank=2)}),
        ...                    key=jax.random.key(0))
        >>> drawn = jax.jit(jlora.optim.glora_sample)(jax.random.key(3), tree)
        >>> bool((drawn["fc"]["kernel"].choice == drawn["fc"]["bias"].choice).all())
        True
        >>> jlora.optim.glora_describe(jlora.optim.glora_current(drawn)["fc"])["c"] in (
        ...     "none", "vector", "lowrank")
        True
    """
    biased = _biased(tree)

    def draw(path, x):
        if not _glora(x):
            return x
        layer = parent(path)
        ks = jax.random.split(path_key(key, layer), len(SUPPORTS))
        options = [jnp.asarray(_allowed(layer, s, biased), jnp.int32) for s in SUPPORTS]
        choice = jnp.stack([o[jax.random.randint(kk, (), 0, o.shape[0])]
                            for o, kk in zip(options, ks)])
        return x.replace(choice=choice)

    return map_with_paths(draw, tree)


def _check_codes(layer: str, codes: Any, owner: str = "glora_fix") -> None:
    """Five integer form codes, each allowed for its support."""
    arr = np.asarray(codes)
    where = f"jlora.optim.{owner}: layer {layer!r}"
    if arr.shape != (len(SUPPORTS),) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: choices must be {len(SUPPORTS)} integer codes "
                         f"(a, b, c, d, e), got {codes!r}")
    for s, c in zip(SUPPORTS, arr.tolist()):
        if c not in ALLOWED[s]:
            allowed = {i: FORMS[i] for i in ALLOWED[s]}
            raise ValueError(f"{where}: {s}={c!r} is not one of the allowed codes {allowed}")


def glora_fix(tree: Any, choices: Choices) -> Any:
    """Set every GLoRA layer's configuration from ``choices`` (e.g. ``glora_search(...).best``).

    Choices may be traced arrays: evaluate many configurations with one
    compiled function by passing them as jit arguments.
    """
    def put(path, x):
        if not _glora(x):
            return x
        m = parent(path)
        if m not in choices:
            raise ValueError(f"jlora.optim.glora_fix: no configuration for layer {m!r}")
        raw = choices[m]
        if not any(isinstance(c, jax.core.Tracer) for c in jax.tree.leaves(raw)):
            # traced choices (inside jit) go unchecked
            _check_codes(m, raw)
        return x.replace(choice=jnp.asarray(raw, jnp.int32))

    return map_with_paths(put, tree)


def glora_param_count(tree: Any, choices: Choices) -> int:
    """Parameters the configuration trains (what the paper's budget counts).

    A layer without a bias leaf trains no c, d or e, whatever its codes say.
    """
    biased, total = _biased(tree), 0
    for p, x in leaves_with_paths(tree):
        if not isinstance(x, GLoRANode):
            continue
        layer = parent(p)
        if layer not in choices:
            raise ValueError(f"jlora.optim.glora_param_count: no configuration for layer {layer!r}")
        _check_codes(layer, choices[layer], "glora_param_count")
        codes = [int(c) if layer in biased or s in ("a", "b") else 0
                 for s, c in zip(SUPPORTS, np.asarray(choices[layer]).tolist())]
        total += support_params(codes, x.config.ranks(), *x.shape)
    return total


@dataclass
class GLoRASearchResult:
    """What :func:`glora_search` found: the best configuration, its fitness and size."""

    best: Choices
    fitness: float
    params: int
    history: list = field(default_factory=list)  # best fitness after each generation
    evaluations: int = 0


def glora_search(evaluate: Callable[[Choices], float], tree: Any, *, seed: int = 0,
                 population: int = 50, generations: int = 20, parents: int = 10,
                 mutants: int = 25, crossovers: int = 25, p_mutate: float = 0.2,
                 max_params: int | None = None,
                 callback: Callable[[int, float], None] | None = None) -> GLoRASearchResult:
    """Evolutionary search over per-layer GLoRA configurations (higher fitness wins).

    ``evaluate(choices)`` scores one configuration (e.g. validation accuracy
    with the inherited supernet weights, via :func:`glora_fix`); each distinct
    configuration is evaluated once. ``callback(generation, best_fitness)``,
    if given, is called after each generation is ranked (e.g. to advance a
    progress bar); the library prints nothing.

        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
        >>> tree = jlora.apply(params, jlora.Spec({"fc/kernel": jlora.GLoRA(rank=2)}),
        ...                    key=jax.random.key(0))
        >>> seen = []
        >>> res = jlora.optim.glora_search(lambda c: float(c["fc"][0] == 3), tree,
        ...                                generations=3, callback=lambda g, f: seen.append(g))
        >>> res.best["fc"][0], res.fitness, seen
        (3, 1.0, [0, 1, 2])
    """
    owner = "jlora.optim.glora_search"
    if not callable(evaluate):
        raise ValueError(f"{owner}: evaluate must be callable, got {evaluate!r}")
    positive_int(owner, "seed", seed, minimum=0)
    positive_int(owner, "population", population)
    positive_int(owner, "generations", generations)
    positive_int(owner, "parents", parents)
    positive_int(owner, "mutants", mutants, minimum=0)
    positive_int(owner, "crossovers", crossovers, minimum=0)
    real(owner, "p_mutate", p_mutate, ge=0.0, le=1.0)
    if max_params is not None:
        positive_int(owner, "max_params", max_params, minimum=0)
    if callback is not None and not callable(callback):
        raise ValueError(f"{owner}: callback must be callable or None, got {callback!r}")
    names = sorted(glora_layers(tree))
    if not names:
        raise ValueError("jlora.optim.glora_search: the tree holds no GLoRA layer")
    rng = np.random.default_rng(seed)
    biased = _biased(tree)

    def random_one():
        return {m: tuple(int(rng.choice(_allowed(m, s, biased))) for s in SUPPORTS)
                for m in names}

    def ok(c):
        return max_params is None or glora_param_count(tree, c) <= max_params

    def key(c):
        return tuple(c[m] for m in names)

    def draw(make, tries=100):
        for _ in range(tries):
            c = make()
            if ok(c):
                return c
        return None

    cache: dict = {}

    def fit(c):
        k = key(c)
        if k not in cache:
            cache[k] = float(evaluate(c))
        return cache[k]

    pop = [c for c in (draw(random_one) for _ in range(population)) if c is not None]
    if not pop:
        raise ValueError(f"jlora.optim.glora_search: no random configuration fits max_params={max_params}")
    history = []
    for generation in range(generations):
        ranked = sorted(pop, key=fit, reverse=True)
        top = ranked[:parents]
        history.append(fit(top[0]))
        if callback is not None:
            callback(generation, history[-1])

        def mutate():
            p = top[rng.integers(len(top))]
            return {m: tuple(int(rng.choice(_allowed(m, s, biased))) if rng.random() < p_mutate
                             else v for s, v in zip(SUPPORTS, p[m])) for m in names}

        def cross():
            p1, p2 = top[rng.integers(len(top))], top[rng.integers(len(top))]
            return {m: tuple(a if rng.random() < 0.5 else b for a, b in zip(p1[m], p2[m]))
                    for m in names}

        children = [draw(mutate) for _ in range(mutants)] + [draw(cross) for _ in range(crossovers)]
        pop = top + [c for c in children if c is not None]
        while len(pop) < population:
            c = draw(random_one)
            if c is None:
                break
            pop.append(c)
    best = max(pop, key=fit)
    return GLoRASearchResult(best=best, fitness=fit(best),
                             params=glora_param_count(tree, best), history=history,
                             evaluations=len(cache))

