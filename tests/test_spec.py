import re

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora.spec import glob_to_regex


def full(pattern, path):
    return re.fullmatch(glob_to_regex(pattern), path) is not None


@pytest.mark.parametrize(
    "pattern,path,hit",
    [
        ("**/attn/{query,value}/kernel", "encoder/layers_3/attn/query/kernel", True),
        ("**/attn/{query,value}/kernel", "attn/value/kernel", True),  # ** may be empty
        ("**/attn/{query,value}/kernel", "encoder/attn/key/kernel", False),
        ("*/kernel", "a/b/kernel", False),  # * stays inside one segment
        ("**/kernel", "a/b/kernel", True),
        ("layers_?/kernel", "layers_3/kernel", True),
        ("layers_?/kernel", "layers_13/kernel", False),
        ("enc/**", "enc/a/b", True),
        ("enc/**", "encoder/a", False),
        ("{mlp/{up,down},attn/out}/kernel", "mlp/down/kernel", True),
        ("{mlp/{up,down},attn/out}/kernel", "attn/out/kernel", True),
        ("{mlp/{up,down},attn/out}/kernel", "mlp/gate/kernel", False),
        ("a.b/kernel", "axb/kernel", False),  # dots are literal
        ("kernel", "dense/kernel", False),  # patterns match the whole path
    ],
)
def test_glob_semantics(pattern, path, hit):
    assert full(pattern, path) is hit


def test_first_match_wins_and_regex_rules():
    a, b = jlora.LoRA(rank=2), jlora.LoRA(rank=4)
    spec = jlora.Spec([(re.compile(r".*query/kernel"), a), ("**/kernel", b)])
    assert spec.match("x/query/kernel") is a
    assert spec.match("x/key/kernel") is b
    assert spec.match("x/key/bias") is None
    # regex rules match in full, not as a search
    assert jlora.Spec({re.compile("query"): a}).match("x/query/kernel") is None


@pytest.mark.parametrize("bad", ["{a,b", "a}b"])
def test_unbalanced_braces(bad):
    with pytest.raises(ValueError, match="unbalanced"):
        jlora.Spec({bad: jlora.LoRA(rank=1)})


def test_bad_rule_values():
    with pytest.raises(ValueError, match="not a jlora method config"):
        jlora.Spec({"**/kernel": {"rank": 8}})
    with pytest.raises(ValueError, match="must be a glob string"):
        jlora.Spec({3: jlora.LoRA(rank=1)})
    with pytest.raises(ValueError, match="no rules"):
        jlora.Spec({})


def test_spec_equality_and_hash():
    s1 = jlora.Spec({"**/kernel": jlora.LoRA(rank=2)})
    s2 = jlora.Spec({"**/kernel": jlora.LoRA(rank=2)})
    s3 = jlora.Spec({"**/kernel": jlora.LoRA(rank=3)})
    assert s1 == s2 and hash(s1) == hash(s2)
    assert s1 != s3


PARAMS = {
    "enc": {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
            "ids": jnp.arange(4)},
}


def test_pattern_matching_nothing_is_an_error_naming_it():
    spec = jlora.Spec({"**/query/kernel": jlora.LoRA(rank=2)})
    with pytest.raises(ValueError, match=r"'\*\*/query/kernel' matches no leaf"):
        jlora.apply(PARAMS, spec, key=jax.random.key(0))


def test_shadowed_rule_is_an_error():
    spec = jlora.Spec({"**/kernel": jlora.LoRA(rank=2), "enc/q/kernel": jlora.LoRA(rank=1)})
    with pytest.raises(ValueError, match="earlier rule"):
        jlora.apply(PARAMS, spec, key=jax.random.key(0))


def test_rank_too_large_names_the_path():
    spec = jlora.Spec({"**/kernel": jlora.LoRA(rank=5)})
    with pytest.raises(ValueError, match=r"enc/q/kernel: rank 5 exceeds min\(fan_in, fan_out\) = 4"):
        jlora.apply(PARAMS, spec, key=jax.random.key(0))


def test_non_floating_target_names_the_path():
    spec = jlora.Spec({"enc/ids": jlora.Full()})
    with pytest.raises(ValueError, match="enc/ids: Full needs a floating-point leaf"):
        jlora.apply(PARAMS, spec, key=jax.random.key(0))


def test_one_dimensional_target_is_an_error():
    spec = jlora.Spec({"enc/q/bias": jlora.LoRA(rank=1)})
    with pytest.raises(ValueError, match="enc/q/bias: a low-rank adapter needs"):
        jlora.apply(PARAMS, spec, key=jax.random.key(0))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"rank": 2, "rs_lora": True}, r"unknown option\(s\) \['rs_lora'\]"),
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"rank": 2, "init": "svd"}, "init must be one of .*got 'svd'"),
        ({"rank": 2, "dropout": 1.0}, "dropout"),
        ({"rank": 2, "alpha": -1}, "alpha must be a finite number > 0"),
    ],
)
def test_bad_options_are_value_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        jlora.LoRA(**kwargs)


def test_bad_in_axes():
    spec = jlora.Spec({"enc/q/kernel": jlora.LoRA(rank=1, in_axes=(0, 1))})
    with pytest.raises(ValueError, match="enc/q/kernel: in_axes"):
        jlora.apply(PARAMS, spec, key=jax.random.key(0))


def test_applying_twice_is_an_error():
    spec = jlora.Spec({"enc/q/kernel": jlora.LoRA(rank=1)})
    adapted = jlora.apply(PARAMS, spec, key=jax.random.key(0))
    with pytest.raises(ValueError, match="enc/q/kernel: already adapted"):
        jlora.apply(adapted, spec, key=jax.random.key(0))
