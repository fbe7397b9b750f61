"""A method defined outside ``jlora/`` works through the whole library.

``ScaledLowRank`` (``K = K0 + (u·v)·diag(g)``, a low-rank update whose output
features are rescaled by a trained gain) is defined here, in one place, with
only the public protocol of ``jlora.methods.base``: defining the two classes
registers it, and ``apply``, ``split``, ``combine``, ``merge``, ``unmerge``,
``linen.apply`` (factorized), ``sharding.specs`` and an Orbax checkpoint round
trip all work without a single edit to the package.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora import _validate
from jlora.methods.base import (AdapterNode, Config, base_plus_lowrank, from_matrix,
                                strict_options, view_leaf)
from jlora.tree import Array, Role


@strict_options
@dataclasses.dataclass(frozen=True)
class ScaledLowRank(Config):
    """``K = K0 + (u·v)·diag(g)``; ``u, v ~ N(0, std²)``, ``g = gain``."""

    rank: int = 2
    gain: float = 0.5
    std: float = 0.1

    def __post_init__(self):
        _validate.positive_int("ScaledLowRank", "rank", self.rank)
        _validate.real("ScaledLowRank", "gain", self.gain)
        _validate.real("ScaledLowRank", "std", self.std, ge=0.0)

    def build(self, key, base, *, path):
        view = view_leaf(self, base, path, rank=self.rank)
        ku, kv = jax.random.split(key)
        return ScaledLowRankNode(
            base=base, u=self.std * jax.random.normal(ku, (view.fan_in, self.rank), view.dtype),
            v=self.std * jax.random.normal(kv, (self.rank, view.fan_out), view.dtype),
            g=jnp.full((view.fan_out,), self.gain, view.dtype),
            config=self, shape=view.shape, in_axes=view.in_axes)


class ScaledLowRankNode(AdapterNode):
    base: Array
    u: Array
    v: Array
    g: Array

    config_class = ScaledLowRank
    trainable = ("u", "v", "g")
    field_axes = {"base": Role.BASE, "u": Role.IN_RANK, "v": Role.RANK_OUT, "g": Role.OUT}

    def delta(self):
        return from_matrix((self.u @ self.v) * self.g, self.shape, self.in_axes)

    def dot(self, x, op, **context):
        return base_plus_lowrank(x, op, self, self.u, self.v, out=self.g)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8, name="fc1")(x))
        return nn.Dense(3, name="fc2")(x)


SPEC = jlora.Spec({"*/kernel": ScaledLowRank(rank=2, gain=0.5)})


def f64(x):
    return np.asarray(x, np.float64)


@pytest.fixture(scope="module")
def setup():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (5, 6))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, SPEC, key=jax.random.key(2))
    return model, x, params, adapted


def ref_kernel(node):
    """float64 numpy reference of K0 + (u·v)·diag(g)."""
    return f64(node.base) + (f64(node.u) @ f64(node.v)) * f64(node.g)


def test_defining_the_classes_registers_the_method():
    assert jlora.methods.REGISTRY["ScaledLowRank"] == (ScaledLowRank, ScaledLowRankNode)
    assert ScaledLowRankNode.method == "ScaledLowRank"
    with pytest.raises(ValueError, match="gain must be a finite number, got nan"):
        ScaledLowRank(gain=float("nan"))


def test_a_typo_in_a_role_fails_at_class_definition():
    with pytest.raises(ValueError, match="'rank_in' is not a sharding role"):
        class Typo(AdapterNode):  # noqa: F841
            base: Array
            u: Array
            field_axes = {"base": Role.BASE, "u": "rank_in"}


def test_apply_split_combine_merge_unmerge(setup):
    _, _, params, adapted = setup
    for layer in ("fc1", "fc2"):
        assert isinstance(adapted[layer]["kernel"], ScaledLowRankNode)
    trainable, frozen = jlora.split(adapted)
    assert trainable["fc1"]["kernel"].base is None and frozen["fc1"]["kernel"].u is None
    assert jlora.count_trainable(trainable) == (6 * 2 + 2 * 8 + 8) + (8 * 2 + 2 * 3 + 3)
    whole = jlora.combine(trainable, frozen)
    assert jax.tree.structure(whole) == jax.tree.structure(adapted)
    merged = jlora.merge(whole)
    for layer in ("fc1", "fc2"):
        np.testing.assert_allclose(merged[layer]["kernel"], ref_kernel(adapted[layer]["kernel"]),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(merged[layer]["bias"], params[layer]["bias"])
    back = jlora.unmerge(merged, adapted)
    for layer in ("fc1", "fc2"):
        np.testing.assert_allclose(back[layer]["kernel"], params[layer]["kernel"], atol=1e-6)
    assert "ScaledLowRank" in jlora.summary(adapted)
    with pytest.raises(ValueError, match="combine the halves first"):
        jlora.merge(trainable)


def test_linen_fast_path_is_factorized_and_exact(setup):
    model, x, _, adapted = setup
    hit = jlora.linen.consumed(model, {"params": adapted}, x)
    assert hit == {"factorized": ["fc1/kernel", "fc2/kernel"], "merged": []}
    y = jlora.linen.apply(model, {"params": adapted}, x)
    h = np.maximum(f64(x) @ ref_kernel(adapted["fc1"]["kernel"]) + f64(adapted["fc1"]["bias"]), 0)
    ref = h @ ref_kernel(adapted["fc2"]["kernel"]) + f64(adapted["fc2"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    # the factors train: a gradient step through the fast path lowers the loss
    trainable, frozen = jlora.split(adapted)

    def loss(t):
        out = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x)
        return jnp.mean((out - 1.0) ** 2)

    grads = jax.grad(loss)(trainable)
    assert grads["fc1"]["kernel"].g.shape == (8,)
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
    assert loss(stepped) < loss(trainable)


def test_sharding_specs_follow_the_roles(setup):
    _, _, params, adapted = setup
    base = jax.tree.map(lambda _: None, params)
    base["fc1"]["kernel"] = P("fsdp", "tensor")
    s = jlora.sharding.specs(adapted, base)
    node = s["fc1"]["kernel"]
    assert (node.base, node.u, node.v, node.g) == (P("fsdp", "tensor"), P("fsdp", None),
                                                   P(None, "tensor"), P("tensor"))


def test_orbax_checkpoint_round_trip(setup, tmp_path):
    _, _, _, adapted = setup
    trainable, frozen = jlora.split(adapted)
    jlora.checkpoint.save(str(tmp_path), trainable, step=3, spec=SPEC)
    state = jlora.checkpoint.restore(str(tmp_path), spec=SPEC)
    assert state["step"] == 3 and state["spec"] == SPEC
    restored = state["trainable"]
    assert jax.tree.structure(restored) == jax.tree.structure(trainable)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jlora.merge(jlora.combine(restored, frozen))["fc2"]["kernel"],
                                  jlora.merge(adapted)["fc2"]["kernel"])
