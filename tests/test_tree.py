"""Paths, per-path keys and the shared vocabulary (jlora/tree.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.tree import Role, leaves_with_paths, parent, path_key, path_str


def test_paths_of_dicts_lists_and_nnx_state():
    tree = {"enc": [{"k": jnp.ones(1)}, (jnp.ones(1),)]}
    assert [p for p, _ in leaves_with_paths(tree)] == ["enc/0/k", "enc/1/0"]
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    assert sorted(p for p, _ in leaves_with_paths(state)) == ["bias", "kernel"]
    keypath = (jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(2),
               jax.tree_util.GetAttrKey("value"), jax.tree_util.FlattenedIndexKey(1))
    assert path_str(keypath) == "a/2/1"  # the Variable's ``value`` is not part of the name


def test_parent_and_path_key():
    assert parent("a/b/kernel") == "a/b" and parent("kernel") == ""
    key = jax.random.key(0)
    k1, k2 = path_key(key, "a/kernel"), path_key(key, "b/kernel")
    assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    np.testing.assert_array_equal(jax.random.key_data(k1),
                                  jax.random.key_data(path_key(key, "a/kernel")))


def test_roles_are_string_valued_and_closed():
    assert Role("out") is Role.OUT and str(Role.IN_RANK) == "in_rank"
    with pytest.raises(ValueError):
        Role("in_rnak")


def test_is_node():
    node = jlora.apply({"k": jnp.ones((2, 2))}, jlora.Spec({"k": jlora.Full()}),
                       key=jax.random.key(0))["k"]
    assert jlora.is_node(node) and not jlora.is_node(jnp.ones(2))
