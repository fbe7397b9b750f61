"""GLoRA's per-layer configuration search: supernet sampling and evolution.

Train one supernet (every layer's maximal support tensors, shared by all 432
configurations), drawing a fresh configuration per layer each step with
:func:`sample`; then :func:`search` evolves per-layer configurations scored by
your validation metric with the inherited supernet weights, and :func:`fix`
bakes the winner into the tree for merging and serving.

The evolution is the paper's: population 50, 20 generations, the top 10 are
parents; each generation adds 25 mutants (each layer/support choice redrawn
with probability 0.2) and 25 crossovers (each choice from either parent), fills
up with random candidates, and rejects candidates over the parameter limit.

Example::

    frozen = jlora.glora.sample(step_key, frozen)        # inside the jitted train step
    ...
    def evaluate(choices):                               # after training
        return accuracy(jlora.combine(trainable, jlora.glora.fix(frozen, choices)))
    result = jlora.glora.search(evaluate, jlora.combine(trainable, frozen), seed=0,
                                max_params=50_000)
    served = jlora.merge(jlora.glora.fix(jlora.combine(trainable, frozen), result.best))
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.methods.glora import (ALLOWED, FORMS, SUPPORTS, GLoRABiasNode, GLoRANode,
                                 support_params)
from jlora.tree import leaves_with_paths, map_with_paths

Choices = dict  # module path -> tuple of 5 form codes (a, b, c, d, e)


def _module(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _glora(x) -> bool:
    return isinstance(x, (GLoRANode, GLoRABiasNode))


def layers(tree: Any) -> dict[str, tuple[int, int]]:
    """``{module path: (fan_in, fan_out)}`` of every GLoRA layer."""
    return {_module(p): tuple(x.shape) for p, x in leaves_with_paths(tree)
            if isinstance(x, GLoRANode)}


def current(tree: Any) -> Choices:
    """The configuration every GLoRA layer carries now."""
    return {_module(p): tuple(int(c) for c in np.asarray(x.choice))
            for p, x in leaves_with_paths(tree) if isinstance(x, GLoRANode)}


def describe(codes) -> dict[str, str]:
    """``(3, 2, 0, 2, 1)`` -> ``{"a": "lowrank", "b": "vector", ...}``."""
    return {s: FORMS[int(c)] for s, c in zip(SUPPORTS, codes)}


def sample(key: jax.Array, tree: Any) -> Any:
    """Draw a uniform configuration per layer (kernel and bias nodes agree); jit-safe."""
    options = [jnp.asarray(ALLOWED[s], jnp.int32) for s in SUPPORTS]

    def draw(path, x):
        if not _glora(x):
            return x
        k = jax.random.fold_in(key, zlib.crc32(_module(path).encode()) & 0x7FFFFFFF)
        ks = jax.random.split(k, len(SUPPORTS))
        choice = jnp.stack([o[jax.random.randint(kk, (), 0, o.shape[0])]
                            for o, kk in zip(options, ks)])
        return x.replace(choice=choice)

    return map_with_paths(draw, tree)


def fix(tree: Any, choices: Choices) -> Any:
    """Set every GLoRA layer's configuration from ``choices`` (e.g. ``search(...).best``).

    Choices may be traced arrays: evaluate many configurations with one
    compiled function by passing them as jit arguments.
    """
    def put(path, x):
        if not _glora(x):
            return x
        m = _module(path)
        if m not in choices:
            raise ValueError(f"glora.fix: no configuration for layer {m!r}")
        codes = jnp.asarray(choices[m], jnp.int32)
        if not isinstance(codes, jax.core.Tracer):  # traced choices (inside jit) go unchecked
            for s, c in zip(SUPPORTS, np.asarray(codes).tolist()):
                if c not in ALLOWED[s]:
                    raise ValueError(f"glora.fix: layer {m!r}: {s}={FORMS[c]} is not allowed")
        return x.replace(choice=codes)

    return map_with_paths(put, tree)


def param_count(tree: Any, choices: Choices) -> int:
    """Parameters the configuration trains (what the paper's budget counts)."""
    return sum(support_params(choices[_module(p)], x.config.ranks(), *x.shape)
               for p, x in leaves_with_paths(tree) if isinstance(x, GLoRANode))


@dataclass
class SearchResult:
    best: Choices
    fitness: float
    params: int
    history: list = field(default_factory=list)  # best fitness after each generation
    evaluations: int = 0


def search(evaluate: Callable[[Choices], float], tree: Any, *, seed: int = 0,
           population: int = 50, generations: int = 20, parents: int = 10, mutants: int = 25,
           crossovers: int = 25, p_mutate: float = 0.2, max_params: int | None = None,
           progress: bool = True) -> SearchResult:
    """Evolutionary search over per-layer GLoRA configurations (higher fitness wins)."""
    names = sorted(layers(tree))
    if not names:
        raise ValueError("glora.search: the tree holds no GLoRA layer")
    rng = np.random.default_rng(seed)

    def random_one():
        return {m: tuple(int(rng.choice(ALLOWED[s])) for s in SUPPORTS) for m in names}

    def ok(c):
        return max_params is None or param_count(tree, c) <= max_params

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
        raise ValueError(f"glora.search: no random configuration fits max_params={max_params}")
    bar = _bar(generations, progress)
    history = []
    for _ in range(generations):
        ranked = sorted(pop, key=fit, reverse=True)
        top = ranked[:parents]
        history.append(fit(top[0]))
        bar(history[-1])

        def mutate():
            p = top[rng.integers(len(top))]
            return {m: tuple(int(rng.choice(ALLOWED[s])) if rng.random() < p_mutate else v
                             for s, v in zip(SUPPORTS, p[m])) for m in names}

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
    return SearchResult(best=best, fitness=fit(best), params=param_count(tree, best),
                        history=history, evaluations=len(cache))


def _bar(total: int, enabled: bool):
    if not enabled:
        return lambda best: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library
        return lambda best: print(f"glora.search: best fitness {best:.4f}")
    bar = tqdm(total=total, desc="GLoRA evolutionary search")

    def update(best):
        bar.update()
        bar.set_postfix(best=f"{best:.4f}")
        if bar.n >= total:
            bar.close()

    return update
