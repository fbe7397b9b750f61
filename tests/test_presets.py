"""jlora.presets and jlora.linen.register without any third-party model: patterns,
orientation carried by configs, and bad options named."""

import flax.linen as nn
import pytest

import jlora


def test_targets_nest_and_never_name_the_head():
    for family in jlora.presets.FAMILIES:
        qv, att, all_ = (set(jlora.presets.patterns(family, t)) for t in jlora.presets.TARGETS)
        assert qv < att < all_
        assert not any("head" in p or "classifier" in p or "router" in p for p, _ in all_)


def test_preset_configs_carry_the_family_layout_unless_given():
    spec = jlora.presets.spec("gpt2", "all-linear", jlora.LoRA(rank=4))
    assert spec.match("transformer/h/0/mlp/c_fc/kernel").in_axes == (1,)
    own = jlora.presets.spec("gpt2", "qv", jlora.LoRA(rank=4, in_axes=(0,)))
    assert own.match("transformer/h/0/attn/c_attn/kernel").in_axes == (0,)
    gemma = jlora.presets.spec("gemma", "attention", jlora.LoRA(rank=4))
    assert gemma.match("layer_0/attn/attn_vec_einsum/w").in_axes == (0, 1)
    assert jlora.presets.spec("llama", "qv").match("m/self_attn/q_proj/kernel").rank == 8
    full = jlora.presets.spec("gemma", "all-linear", jlora.Full())  # no in_axes option
    assert full.match("layer_0/mlp/gating_einsum") == jlora.Full()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown family 'gpt3'"):
        jlora.presets.spec("gpt3")
    with pytest.raises(ValueError, match="unknown targets 'mlp'"):
        jlora.presets.spec("bert", "mlp")
    with pytest.raises(ValueError, match="config must be a jlora method config"):
        jlora.presets.spec("bert", "qv", {"rank": 8})
    with pytest.raises(ValueError, match="no known family"):
        jlora.presets.detect({"encoder": {"w": 0}})
    with pytest.raises(ValueError, match="flax.linen.Module subclass"):
        jlora.linen.register(object)
    with pytest.raises(ValueError, match="kernel_axes must be increasing"):
        jlora.linen.register(nn.Dense, kernel_axes=(1, 0))
    with pytest.raises(ValueError, match="kernel must be the parameter's name"):
        jlora.linen.register(nn.Dense, kernel="")
