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


def test_dtype_options_equal_their_json_round_trip_and_restore(tmp_path):
    import numpy as np

    spec = jlora.Spec({"w": jlora.LoRA(rank=2, dtype=jnp.bfloat16),
                       "v": jlora.DoRA(rank=2, dtype=np.float32)})
    assert spec.rules[0].config.dtype == "bfloat16"
    assert jlora.spec.spec_from_json(jlora.spec.spec_to_json(spec)) == spec
    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    assert trainable["w"].a.dtype == jnp.bfloat16
    jlora.checkpoint.save(tmp_path, trainable, step=1, spec=spec)
    back = jlora.checkpoint.restore(tmp_path, spec=spec, onto=frozen)
    assert back["spec"] == spec


def test_numpy_scalar_options_are_written_as_json_numbers(tmp_path):
    import json

    import numpy as np

    spec = jlora.Spec({"w": jlora.LoRA(rank=np.int64(2), alpha=np.float32(4))})
    text = json.dumps(jlora.spec.spec_to_json(spec))
    assert '"rank": 2' in text and '"alpha": 4.0' in text
    trainable, _ = jlora.split(jlora.apply({"w": jnp.ones((4, 4))}, spec, key=jax.random.key(0)))
    jlora.checkpoint.save(tmp_path, trainable, step=1, spec=spec)
    assert jlora.checkpoint.restore(tmp_path)["spec"] == spec


def test_regex_flags_survive_json_and_count_in_equality():
    flagged = jlora.Spec([(re.compile("DENSE/KERNEL", re.I), jlora.LoRA(rank=2))])
    back = jlora.spec.spec_from_json(jlora.spec.spec_to_json(flagged))
    assert back == flagged and back.match("dense/kernel") is not None
    plain = jlora.Spec([(re.compile("DENSE/KERNEL"), jlora.LoRA(rank=2))])
    assert plain != flagged and plain.match("dense/kernel") is None
    with pytest.raises(ValueError, match="spec rule #0 must be an object with 'glob' or 'regex'"):
        jlora.spec.spec_from_json([{"config": {"method": "LoRA", "rank": 2}}])


@pytest.mark.parametrize("rules", ["**/kernel", ["**/kernel"], jlora.LoRA(rank=2), 3])
def test_a_spec_of_the_wrong_kind_says_what_it_takes(rules):
    with pytest.raises(ValueError, match=r"Spec: rules must be a mapping \{pattern: config\} or a "
                                         r"sequence of \(pattern, config\) pairs"):
        jlora.Spec(rules)


def test_option_values_that_are_no_numbers_or_choices_are_value_errors():
    import numpy as np

    with pytest.raises(ValueError, match="LoRA: alpha must be a finite number"):
        jlora.LoRA(rank=2, alpha=10 ** 400)
    with pytest.raises(ValueError, match="LoRA: init must be one of"):
        jlora.LoRA(rank=2, init=np.array([1, 2]))
