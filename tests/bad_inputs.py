"""Bad inputs across jlora's public API and what each gets: one case list, two uses.

``tests/test_bad_inputs.py`` runs every case (each must raise a ``ValueError``
whose message matches the case's pattern) and checks that
``docs/bad-inputs.md`` is this list rendered; ``python tests/bad_inputs.py``
rewrites that page after the list changes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable

import jax
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "bad-inputs.md")
FIXTURES = os.path.join(HERE, "fixtures", "peft")


@dataclass(frozen=True)
class Case:
    area: str
    what: str  # the bad input, in words
    match: str  # regex the ValueError's message must match
    run: Callable  # run(tmp_path) makes the bad call


CASES: list[Case] = []


def case(area: str, what: str, match: str):
    def register(fn):
        CASES.append(Case(area, what, match, fn))
        return fn
    return register


# ---------------------------------------------------------------- shared inputs


def _jl():
    import jlora

    return jlora


def params():
    import jax.numpy as jnp

    return {"fc1": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
            "fc2": {"kernel": jnp.ones((16, 4)), "bias": jnp.zeros(4)}}


def adapted(spec_rules=None):
    import jax

    jlora = _jl()
    rules = spec_rules or {"fc1/kernel": jlora.LoRA(rank=2), "fc2/bias": jlora.Full()}
    return jlora.apply(params(), jlora.Spec(rules), key=jax.random.key(0))


def fixture_params():
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    sd = load_file(os.path.join(FIXTURES, "lora", "base.safetensors"))
    return {"emb": {"embedding": jnp.asarray(sd["emb.weight"])},
            "fc1": {"kernel": jnp.asarray(sd["fc1.weight"].T), "bias": jnp.asarray(sd["fc1.bias"])},
            "fc2": {"kernel": jnp.asarray(sd["fc2.weight"].T), "bias": jnp.asarray(sd["fc2.bias"])}}


def adapter_copy(tmp, case="lora"):
    d = os.path.join(tmp, "adapter")
    shutil.copytree(os.path.join(FIXTURES, case, "adapter"), d)
    return d


def load_edited(tmp, config=None, tensors=None, raw_config=None, raw_weights=None, case="lora"):
    """Load a copy of a real PEFT adapter after editing its config and/or tensors."""
    from safetensors.numpy import load_file, save_file

    d = adapter_copy(tmp, case)
    cfg_path, w_path = os.path.join(d, "adapter_config.json"), os.path.join(d, "adapter_model.safetensors")
    if config is not None:
        cfg = json.load(open(cfg_path))
        for k, v in config.items():
            if v is _DROP:
                del cfg[k]
            else:
                cfg[k] = v
        json.dump(cfg, open(cfg_path, "w"))
    if raw_config is not None:
        _rewrite(cfg_path, raw_config)
    if tensors is not None:
        save_file(tensors(load_file(w_path)), w_path, metadata={"format": "pt"})
    if raw_weights is not None:
        _rewrite(w_path, raw_weights)
    return _jl().peft.load(d, fixture_params())


def _rewrite(path, edit):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(edit(data))


_DROP = object()
A = "base_model.model.fc1.lora_A.weight"


def _with(tensors, **changes):
    out = dict(tensors)
    for k, v in changes.items():
        name = k.replace("__", ".")
        if v is None:
            del out[name]
        else:
            out[name] = v
    return out


# ---------------------------------------------------------------- Spec / apply


@case("Spec / apply", "a `Spec` with no rules", r"Spec: no rules given")
def _(tmp):
    _jl().Spec({})


@case("Spec / apply", "a rule mapping to something that is not a method config",
      r"Spec: pattern 'a' maps to 3, which is not a jlora method config")
def _(tmp):
    _jl().Spec({"a": 3})


@case("Spec / apply", "an unbalanced `{` in a glob", r"Spec pattern 'a\{b': unbalanced")
def _(tmp):
    jlora = _jl()
    jlora.Spec({"a{b": jlora.LoRA(rank=2)})


@case("Spec / apply", "a pattern that is neither a glob nor a compiled regex",
      r"Spec: pattern 3 must be a glob string")
def _(tmp):
    jlora = _jl()
    jlora.Spec({3: jlora.LoRA(rank=2)})


@case("Spec / apply", "`Spec(\"**/kernel\")`: a pattern with no config",
      r"Spec: rules must be a mapping \{pattern: config\} or a sequence of \(pattern, config\) pairs")
def _(tmp):
    _jl().Spec("**/kernel")


@case("Spec / apply", "params where two leaves render to one path (a key holding `/`)",
      r"jlora.apply: 1 path\(s\) name more than one leaf, e.g. 'a/kernel'")
def _(tmp):
    import jax.numpy as jnp
    jlora = _jl()
    jlora.apply({"a/kernel": jnp.ones((2, 2)), "a": {"kernel": jnp.ones((2, 2))}},
                jlora.Spec({"**kernel": jlora.LoRA(rank=1)}), key=jax.random.key(0))


@case("Spec / apply", "a rule that matches no leaf", r"'nope/kernel' matches no leaf; paths look like")
def _(tmp):
    jlora = _jl()
    adapted({"nope/kernel": jlora.LoRA(rank=2)})


@case("Spec / apply", "a rank above `min(fan_in, fan_out)`",
      r"fc2/kernel: rank 8 exceeds min\(fan_in, fan_out\) = 4")
def _(tmp):
    jlora = _jl()
    adapted({"fc2/kernel": jlora.LoRA(rank=8)})


@case("Spec / apply", "a low-rank method on a 1-D leaf",
      r"fc1/bias: a low-rank adapter needs a leaf with at least 2 dimensions.*jlora.Full")
def _(tmp):
    jlora = _jl()
    adapted({"fc1/bias": jlora.LoRA(rank=1)})


@case("Spec / apply", "a rule selecting an integer leaf", r"w/kernel: LoRA needs a floating-point leaf, got dtype int32")
def _(tmp):
    import jax
    import jax.numpy as jnp

    jlora = _jl()
    jlora.apply({"w": {"kernel": jnp.ones((4, 4), jnp.int32)}},
                jlora.Spec({"w/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))


@case("Spec / apply", "`Full()` selecting a boolean leaf", r"w/mask: Full needs a floating-point leaf, got dtype bool")
def _(tmp):
    import jax
    import jax.numpy as jnp

    jlora = _jl()
    jlora.apply({"w": {"mask": jnp.ones((4,), bool)}}, jlora.Spec({"w/mask": jlora.Full()}),
                key=jax.random.key(0))


@case("Spec / apply", "applying a spec to an already adapted tree", r"fc1/kernel: already adapted \(LoRA\)")
def _(tmp):
    import jax

    jlora = _jl()
    jlora.apply(adapted(), jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))


@case("Spec / apply", "a plain dict instead of a `Spec`", r"jlora.apply: spec must be a jlora.Spec, got dict")
def _(tmp):
    import jax

    jlora = _jl()
    jlora.apply(params(), {"fc1/kernel": jlora.LoRA(rank=2)}, key=jax.random.key(0))


# ---------------------------------------------------------------- method configs


@case("method configs", "`LoRA(rank=0)`", r"LoRA: rank must be an int >= 1, got 0")
def _(tmp):
    _jl().LoRA(rank=0)


@case("method configs", "`LoRA(rank=True)` (a bool is not a rank)", r"LoRA: rank must be an int >= 1, got True")
def _(tmp):
    _jl().LoRA(rank=True)


@case("method configs", "`LoRA(rank=2.0)`", r"LoRA: rank must be an int >= 1, got 2.0")
def _(tmp):
    _jl().LoRA(rank=2.0)


@case("method configs", "`LoRA(alpha=nan)`", r"LoRA: alpha must be .*, got nan")
def _(tmp):
    _jl().LoRA(rank=2, alpha=float("nan"))


@case("method configs", "`LoRA(alpha=-1)`", r"LoRA: alpha must be .*, got -1")
def _(tmp):
    _jl().LoRA(rank=2, alpha=-1.0)


@case("method configs", "`LoRA(dropout=1.0)`", r"LoRA: dropout must be .*, got 1.0")
def _(tmp):
    _jl().LoRA(rank=2, dropout=1.0)


@case("method configs", "`LoRA(init='bogus')`", r"LoRA: .*init.*'bogus'")
def _(tmp):
    _jl().LoRA(rank=2, init="bogus")


@case("method configs", "a misspelt option, `LoRA(rs_lora=True)`", r"LoRA: unknown option\(s\) \['rs_lora'\]")
def _(tmp):
    _jl().LoRA(rank=2, rs_lora=True)


@case("method configs", "`LoRA(train_a=\"no\")` (a string is not a bool)", r"LoRA: train_a must be a bool \(True or False\), got 'no'")
def _(tmp):
    _jl().LoRA(rank=2, train_a="no")


@case("method configs", "`LoRA(rslora=1)`", r"LoRA: rslora must be a bool \(True or False\), got 1")
def _(tmp):
    _jl().LoRA(rank=2, rslora=1)


@case("method configs", "`LoRA(dtype='float99')`", r"LoRA: dtype must be None or a floating dtype, got 'float99'")
def _(tmp):
    _jl().LoRA(rank=2, dtype="float99")


@case("method configs", "`GLoRA(rank=0)`", r"GLoRA: rank must be an int >= 1, got 0")
def _(tmp):
    _jl().GLoRA(rank=0)


@case("method configs", "`DoRA(rank=0)`", r"DoRA: rank must be an int >= 1, got 0")
def _(tmp):
    _jl().DoRA(rank=0)


@case("method configs", "`VeRA(rank=0)`", r"VeRA: rank must be an int >= 1, got 0")
def _(tmp):
    _jl().VeRA(rank=0)


@case("method configs", "a positional option too many, `Full(3)`", r"Full: too many positional options")
def _(tmp):
    _jl().Full(3)


# ---------------------------------------------------------------- split / combine / merge


@case("split / combine / merge", "`combine` of halves from different trees",
      r"jlora.combine: trainable and frozen trees do not have the same structure")
def _(tmp):
    jlora = _jl()
    trainable, _ = jlora.split(adapted())
    jlora.combine(trainable, params())


@case("split / combine / merge", "`merge(onto=)` onto an integer leaf",
      r"jlora.merge: fc1/kernel: params leaf has dtype int32; a delta would be rounded into it")
def _(tmp):
    import jax.numpy as jnp
    jlora = _jl()
    p = params()
    p["fc1"]["kernel"] = jnp.ones((8, 16), jnp.int32)
    jlora.merge(adapted(), onto=p)


@case("split / combine / merge", "`merge(onto=)` params missing an adapted leaf",
      r"jlora.merge: params have no leaf at adapted path\(s\) \['fc1/kernel'\]")
def _(tmp):
    jlora = _jl()
    jlora.merge(adapted(), onto={"fc2": params()["fc2"]})


@case("split / combine / merge", "`merge(onto=)` params whose leaf has another shape",
      r"jlora.merge: fc1/kernel: params leaf has shape \(8, 4\), the adapter was built for \(8, 16\)")
def _(tmp):
    import jax.numpy as jnp

    jlora = _jl()
    jlora.merge(adapted(), onto={"fc1": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
                                 "fc2": params()["fc2"]})


@case("Spec / apply", "`key=0` (an int, not a PRNG key)",
      r"jlora.apply: key must be a PRNG key")
def _(tmp):
    jlora = _jl()
    jlora.apply(params(), jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2)}), key=0)


@case("Spec / apply", "a targeted base holding NaN",
      r"fc1/kernel: the base holds NaN or infinite values")
def _(tmp):
    import jax
    import jax.numpy as jnp

    jlora = _jl()
    bad = params()
    bad["fc1"]["kernel"] = bad["fc1"]["kernel"].at[0, 0].set(jnp.nan)
    jlora.apply(bad, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))


def _half_case(fn_name, which, call):
    case("split / combine / merge", f"`{fn_name}` of the {which} half",
         rf"jlora.{fn_name}: fc1/kernel is a node of the {which} half from jlora.split; combine the halves first")(
        lambda tmp: call(_jl(), _jl().split(adapted())[0 if which == "trainable" else 1]))


_half_case("merge", "trainable", lambda j, h: j.merge(h))
_half_case("merge", "frozen", lambda j, h: j.merge(h))
_half_case("summary", "trainable", lambda j, h: j.summary(h))
_half_case("summary", "frozen", lambda j, h: j.summary(h))


@case("sharding", "`specs` of the trainable half",
      r"jlora.sharding.specs: fc1/kernel is a node of the trainable half from jlora.split; combine the halves first")
def _(tmp):
    from jax.sharding import PartitionSpec as P

    jlora = _jl()
    jlora.sharding.specs(jlora.split(adapted())[0], {"fc1": {"kernel": P(), "bias": P()},
                                                     "fc2": {"kernel": P(), "bias": P()}})


# ---------------------------------------------------------------- linen


@case("linen", "variables without a `params` collection", r"jlora.linen.apply: variables has no 'params' collection")
def _(tmp):
    import flax.linen as nn
    import jax.numpy as jnp

    _jl().linen.apply(nn.Dense(4), {}, jnp.ones((1, 2)))


# ---------------------------------------------------------------- sharding


@case("sharding", "`base_specs` missing a leaf", r"jlora.sharding.specs: base_specs has no entry for fc1/bias")
def _(tmp):
    from jax.sharding import PartitionSpec as P

    _jl().sharding.specs(adapted(), {"fc2": {"kernel": P(), "bias": P()}})


@case("sharding", "a `PartitionSpec` longer than the leaf's rank",
      r"jlora.sharding.specs: fc1/kernel: PartitionSpec P\('a', 'b', 'c'\) has more entries than the base's 2 axes")
def _(tmp):
    from jax.sharding import PartitionSpec as P

    _jl().sharding.specs(adapted(), {"fc1": {"kernel": P("a", "b", "c"), "bias": P()},
                                     "fc2": {"kernel": P(), "bias": P()}})


# ---------------------------------------------------------------- peft.load


@case("peft.load", "a directory with no adapter", r"adapter_config.json: no such file")
def _(tmp):
    _jl().peft.load(os.path.join(tmp, "nowhere"), fixture_params())


@case("peft.load", "`adapter_config.json` not UTF-8", r"adapter_config.json: not UTF-8")
def _(tmp):
    load_edited(tmp, raw_config=lambda b: b"\xff\xfe" + b)


@case("peft.load", "`adapter_config.json` not JSON", r"adapter_config.json: not valid JSON")
def _(tmp):
    load_edited(tmp, raw_config=lambda b: b[:-5])


@case("peft.load", "`adapter_config.json` a JSON list, not an object", r"adapter_config.json: adapter config is not a JSON object")
def _(tmp):
    load_edited(tmp, raw_config=lambda b: b"[]")


@case("peft.load", "a config key given twice", r"adapter_config.json: key 'r' appears twice")
def _(tmp):
    load_edited(tmp, raw_config=lambda b: b'{"r": 4, ' + b[1:])


@case("peft.load", "`NaN` in the config", r"adapter_config.json: NaN is not a JSON value")
def _(tmp):
    load_edited(tmp, raw_config=lambda b: b.replace(b'"lora_dropout": 0.0', b'"lora_dropout": NaN'))


@case("peft.load", "another `peft_type`", r"adapter_config.json: key 'peft_type' is 'IA3'")
def _(tmp):
    load_edited(tmp, config={"peft_type": "IA3"})


@case("peft.load", "`r` as a string", r"adapter_config.json: key 'r' must be an int >= 1, got '4'")
def _(tmp):
    load_edited(tmp, config={"r": "4"})


@case("peft.load", "`r` that disagrees with the tensors", r"adapter_model.safetensors: base_model.model.emb has rank 4 but adapter_config.json says r=8")
def _(tmp):
    load_edited(tmp, config={"r": 8})


@case("peft.load", "`lora_alpha` as a bool", r"adapter_config.json: key 'lora_alpha' must be a finite number > 0, got True")
def _(tmp):
    load_edited(tmp, config={"lora_alpha": True})


@case("peft.load", "`use_rslora` as a string", r"adapter_config.json: key 'use_rslora' must be true or false, got 'yes'")
def _(tmp):
    load_edited(tmp, config={"use_rslora": "yes"})


@case("peft.load", "`lora_dropout` of 1.5", r"adapter_config.json: key 'lora_dropout' must be a number in \[0, 1\)")
def _(tmp):
    load_edited(tmp, config={"lora_dropout": 1.5})


@case("peft.load", "`rank_pattern` a list", r"adapter_config.json: key 'rank_pattern' must be an object")
def _(tmp):
    load_edited(tmp, config={"rank_pattern": ["fc1"]})


@case("peft.load", "a `rank_pattern` key that is not a regex", r"adapter_config.json: key 'rank_pattern.fc\(' holds 'fc\(', not a regular expression")
def _(tmp):
    load_edited(tmp, config={"rank_pattern": {"fc(": 2}})


@case("peft.load", "an `alpha_pattern` key that matches no adapted module",
      r"adapter_config.json: key 'alpha_pattern.\^base_model.model.fc1' matches no adapted module")
def _(tmp):
    load_edited(tmp, config={"alpha_pattern": {"^base_model.model.fc1": 2}})


@case("peft.load", "a `target_modules` entry that matches no module", r"adapter_config.json: key 'target_modules' entry 'fc9' matches no module")
def _(tmp):
    load_edited(tmp, config={"target_modules": ["fc1", "emb", "fc2", "fc9"]})


@case("peft.load", "an informational key of the wrong type", r"adapter_config.json: key 'peft_version' must be str or NoneType, got 3")
def _(tmp):
    load_edited(tmp, config={"peft_version": 3})


@case("peft.load", "an unimplemented option set (`layer_replication`)", r"adapter_config.json: key 'layer_replication' is set to .*does not implement")
def _(tmp):
    load_edited(tmp, config={"layer_replication": [[0, 1]]})


@case("peft.load", "`fan_in_fan_out` not a boolean", r"adapter_config.json: key 'fan_in_fan_out' must be true or false, got 'true'")
def _(tmp):
    load_edited(tmp, config={"fan_in_fan_out": "true"})


@case("peft.load", "`init_lora_weights: \"pissa\"` (tensors for a modified base)", r"adapter_config.json: key 'init_lora_weights' is 'pissa': that initialisation replaces the base weights")
def _(tmp):
    load_edited(tmp, config={"init_lora_weights": "pissa"})


@case("peft.load", "`init_lora_weights: \"olora\"`", r"adapter_config.json: key 'init_lora_weights' is 'olora'.*Convert the adapter")
def _(tmp):
    load_edited(tmp, config={"init_lora_weights": "olora"})


@case("peft.load", "an unknown `init_lora_weights`", r"adapter_config.json: key 'init_lora_weights' must be one of")
def _(tmp):
    load_edited(tmp, config={"init_lora_weights": "magic"})


@case("peft.load", "an empty `adapter_model.safetensors`", r"adapter_model.safetensors: 0 bytes, too short")
def _(tmp):
    load_edited(tmp, raw_weights=lambda b: b"")


@case("peft.load", "a truncated `adapter_model.safetensors`", r"adapter_model.safetensors: .*\(truncated\?\)")
def _(tmp):
    load_edited(tmp, raw_weights=lambda b: b[: len(b) // 2])


@case("peft.load", "a safetensors file with no tensors", r"adapter_model.safetensors: holds no tensors")
def _(tmp):
    load_edited(tmp, raw_weights=lambda b: (8).to_bytes(8, "little") + b"{}      ")


@case("peft.load", "a tensor name given twice in the safetensors header", r"adapter_model.safetensors \(header\): key '.*' appears twice")
def _(tmp):
    def dup(b):
        n = int.from_bytes(b[:8], "little")
        header = b[8:8 + n].rstrip()
        first = header[1:header.index(b"}") + 1]
        new = b"{" + first + b"," + header[1:]
        new += b" " * (-len(new) % 8)
        return len(new).to_bytes(8, "little") + new + b[8 + n:]
    load_edited(tmp, raw_weights=dup)


@case("peft.load", "a missing `lora_B`", r"adapter_model.safetensors: missing tensor base_model.model.fc2.lora_B.weight")
def _(tmp):
    load_edited(tmp, tensors=lambda t: _with(t, base_model__model__fc2__lora_B__weight=None))


@case("peft.load", "DoRA without its `lora_magnitude_vector`", r"adapter_model.safetensors: missing tensor base_model.model.fc1.lora_magnitude_vector")
def _(tmp):
    load_edited(tmp, case="dora", tensors=lambda t: _with(t, base_model__model__fc1__lora_magnitude_vector=None))


@case("peft.load", "a targeted module with no tensors at all", r"adapter_model.safetensors: missing tensor base_model.model.fc2.lora_A.weight of module 'fc2'")
def _(tmp):
    load_edited(tmp, tensors=lambda t: {k: v for k, v in t.items() if ".fc2." not in k})


@case("peft.load", "an unknown tensor name", r"adapter_model.safetensors: tensor 'base_model.model.fc1.lora_C.weight' is not a LoRA tensor name")
def _(tmp):
    load_edited(tmp, tensors=lambda t: {**t, "base_model.model.fc1.lora_C.weight": t[A]})


@case("peft.load", "a tensor for a module `target_modules` does not select", r"adapter_model.safetensors: unexpected tensor .*target_modules does not select module 'fc2'")
def _(tmp):
    load_edited(tmp, config={"target_modules": ["fc1", "emb"]})


@case("peft.load", "a whole-module tensor outside `modules_to_save`", r"adapter_model.safetensors: unexpected tensor 'base_model.model.fc1.bias'")
def _(tmp):
    import numpy as np

    load_edited(tmp, tensors=lambda t: {**t, "base_model.model.fc1.bias": np.zeros(16, np.float32)})


@case("peft.load", "a tensor for a module `params` lacks", r"adapter_model.safetensors: tensor 'base_model.model.fc3.lora_A.weight' targets module 'fc3', which params do not have")
def _(tmp):
    load_edited(tmp, tensors=lambda t: {**t, "base_model.model.fc3.lora_A.weight": t[A]})


@case("peft.load", "an integer tensor", r"adapter_model.safetensors: tensor '.*' has dtype I32; LoRA tensors are floating point")
def _(tmp):
    import numpy as np

    load_edited(tmp, tensors=lambda t: _with(t, **{A.replace(".", "__"): t[A].astype(np.int32)}))


@case("peft.load", "a boolean tensor", r"adapter_model.safetensors: tensor '.*' has dtype BOOL")
def _(tmp):
    load_edited(tmp, tensors=lambda t: _with(t, **{A.replace(".", "__"): t[A] > 0}))


@case("peft.load", "a tensor holding NaN", r"adapter_model.safetensors: tensor '.*lora_A.weight' holds NaN or infinite values")
def _(tmp):
    import numpy as np

    load_edited(tmp, tensors=lambda t: _with(t, **{A.replace(".", "__"): np.full_like(t[A], np.nan)}))


@case("peft.load", "factors whose shape disagrees with the base", r"adapter_model.safetensors: base_model.model.fc1.lora_A.weight/lora_B.weight have shapes \(4, 9\)/\(16, 4\)")
def _(tmp):
    import numpy as np

    load_edited(tmp, tensors=lambda t: _with(t, **{A.replace(".", "__"): np.zeros((4, 9), np.float32)}))


@case("peft.load", "a `lora_B.bias` (`lora_bias`)", r"adapter_model.safetensors: tensor '.*lora_B.bias' is a lora_bias")
def _(tmp):
    import numpy as np

    load_edited(tmp, tensors=lambda t: {**t, "base_model.model.fc1.lora_B.bias": np.zeros(16, np.float32)})


@case("peft.load", "`name_map` that is neither a function nor a dict", r"name_map must be a function or a dict, got int")
def _(tmp):
    _jl().peft.load(adapter_copy(tmp), fixture_params(), name_map=3)


@case("peft.load", "`layers_to_transform` that is not a layer index or a list of them",
      r"adapter_config.json: key 'layers_to_transform' must be a layer index or a list of them")
def _(tmp):
    load_edited(tmp, config={"layers_to_transform": ["0"]})


@case("peft.load", "an `adapter_name` that climbs out of the directory", r"adapter_name must be a plain folder name, got '\.\.'")
def _(tmp):
    _jl().peft.load(adapter_copy(tmp), fixture_params(), adapter_name="..")


# ---------------------------------------------------------------- peft.save


@case("peft.save", "the trainable half from `split`", r"jlora.peft.save: .* combine the halves first")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, jlora.split(adapted())[0])


@case("peft.save", "the frozen half from `split`", r"jlora.peft.save: .* combine the halves first")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, jlora.split(adapted())[1])


@case("peft.save", "two Flax modules mapped to one PyTorch module",
      r"jlora.peft.save: Flax modules 'fc1' and 'fc2' both map to the PyTorch module 'fc'")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, adapted(), name_map=lambda p: "fc" if p.startswith("fc") else p)


@case("peft.save", "a method PEFT's LoRA files cannot hold (VeRA)", r"fc1/kernel: VeRA adapters have no PEFT LoRA layout")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, adapted({"fc1/kernel": jlora.VeRA(rank=2)}))


@case("peft.save", "LoRA and `Full()` in one module", r"module 'fc1' has a LoRA adapter and a Full\(\) leaf")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, adapted({"fc1/kernel": jlora.LoRA(rank=2), "fc1/bias": jlora.Full()}))


@case("peft.save", "adapters mixing rsLoRA and plain LoRA", r"adapters mix use_rslora values")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, adapted({"fc1/kernel": jlora.LoRA(rank=2, rslora=True),
                                  "fc2/kernel": jlora.LoRA(rank=2)}))


@case("peft.save", "adapters mixing dropout rates", r"adapters mix lora_dropout values")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, adapted({"fc1/kernel": jlora.LoRA(rank=2, dropout=0.1),
                                  "fc2/kernel": jlora.LoRA(rank=2)}))


@case("peft.save", "a tree with no LoRA adapter", r"jlora.peft.save: the tree holds no LoRA/DoRA adapter")
def _(tmp):
    jlora = _jl()
    jlora.peft.save(tmp, adapted({"fc2/bias": jlora.Full()}))


@case("peft.save", "LoRA on a 3-D `DenseGeneral` kernel", r"w/kernel: a kernel of shape \(4, 2, 3\) with in_axes \(0,\) has no PEFT layout")
def _(tmp):
    import jax.numpy as jnp

    jlora = _jl()
    tree = jlora.apply({"w": {"kernel": jnp.ones((4, 2, 3))}},
                       jlora.Spec({"w/kernel": jlora.LoRA(rank=2, in_axes=(0,))}), key=jax.random.key(0))
    jlora.peft.save(tmp, tree)


@case("peft.save", "an adapter holding NaN", r"jlora.peft.save: fc1/kernel holds NaN or infinite values")
def _(tmp):
    import jax.numpy as jnp

    tree = adapted()
    tree["fc1"]["kernel"] = tree["fc1"]["kernel"].replace(b=jnp.full_like(tree["fc1"]["kernel"].b, jnp.nan))
    _jl().peft.save(tmp, tree)


@case("peft.save", "a target path that is a file", r"adapter: exists and is not a directory")
def _(tmp):
    path = os.path.join(tmp, "adapter")
    open(path, "w").write("x")
    _jl().peft.save(path, adapted())


@case("peft.load", "`params` that are already adapted", r"jlora.peft.load: fc1/kernel is already adapted")
def _(tmp):
    _jl().peft.load(adapter_copy(tmp), adapted())


# ---------------------------------------------------------------- checkpoint


def _saved(tmp, **kw):
    jlora = _jl()
    spec = jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2)})
    import jax

    trainable, frozen = jlora.split(jlora.apply(params(), spec, key=jax.random.key(0)))
    jlora.checkpoint.save(os.path.join(tmp, "ck"), trainable, step=1, spec=spec, **kw)
    return os.path.join(tmp, "ck"), trainable, frozen


@case("checkpoint", "`Manager(keep=0)` (would delete the checkpoint just written)", r"Manager: keep must be an int >= 1, got 0")
def _(tmp):
    _jl().checkpoint.Manager(tmp, keep=0)


@case("checkpoint", "`Manager(every=-5)`", r"Manager: every must be an int >= 1, got -5")
def _(tmp):
    _jl().checkpoint.Manager(tmp, every=-5)


@case("checkpoint", "a negative step", r"jlora.checkpoint: step must be an int >= 0, got -1")
def _(tmp):
    jlora = _jl()
    jlora.checkpoint.save(tmp, {"w": params()["fc1"]["kernel"]}, step=-1)


@case("checkpoint", "a step that already exists", r"a checkpoint for step 1 already exists \(pass overwrite=True")
def _(tmp):
    d, trainable, _ = _saved(tmp)
    _jl().checkpoint.save(d, trainable, step=1)


@case("checkpoint", "restoring `step=True`", r"jlora.checkpoint: step must be an int >= 0, got True")
def _(tmp):
    d, _, _ = _saved(tmp)
    _jl().checkpoint.restore(d, step=True)


@case("checkpoint", "saving `None` as the trainable tree", r"jlora.checkpoint: trainable must be a tree of arrays, got None")
def _(tmp):
    _jl().checkpoint.save(tmp, None, step=1)


@case("checkpoint", "a `spec` that is not a `Spec`", r"jlora.checkpoint: spec must be a jlora.Spec, got dict")
def _(tmp):
    _jl().checkpoint.save(tmp, {"w": params()["fc1"]["kernel"]}, step=1, spec={"w": 1})


@case("checkpoint", "a dict key that is not a str or int", r"\('a', 1\): checkpoint dict keys must be str or int")
def _(tmp):
    _jl().checkpoint.save(tmp, {("a", 1): params()["fc1"]["kernel"]}, step=1)


@case("checkpoint", "a file given as the checkpoint directory", r"notes.txt: not a directory, so not a jlora checkpoint")
def _(tmp):
    path = os.path.join(tmp, "notes.txt")
    open(path, "w").write("x")
    _jl().checkpoint.restore(path)


@case("checkpoint", "a directory that is not a path", r"jlora.checkpoint: directory must be a path, got 3")
def _(tmp):
    _jl().checkpoint.Manager(3)


@case("checkpoint", "restoring a missing directory", r"no checkpoint directory at")
def _(tmp):
    _jl().checkpoint.restore(os.path.join(tmp, "missing"))


@case("checkpoint", "restoring a directory that is not a checkpoint", r"is not a jlora checkpoint directory")
def _(tmp):
    open(os.path.join(tmp, "notes.txt"), "w").write("x")
    _jl().checkpoint.restore(tmp)


@case("checkpoint", "restoring one step's directory instead of the checkpoint's", r"is one step of a jlora checkpoint: restore .* with step=1")
def _(tmp):
    d, _, _ = _saved(tmp)
    _jl().checkpoint.restore(os.path.join(d, "1"))


@case("checkpoint", "a step that is not there", r"no checkpoint for step 2 in .*; have \[1\]")
def _(tmp):
    d, _, _ = _saved(tmp)
    _jl().checkpoint.restore(d, step=2)


@case("checkpoint", "a checkpoint written by jlora 0.1.0 (pickled structure)", r"written by jlora 0.1.0.*jlora.checkpoint.upgrade")
def _(tmp):
    d, _, _ = _saved(tmp)
    meta = os.path.join(d, "1", "meta", "metadata")
    m = json.load(open(meta))
    m["format"] = "jlora-checkpoint/1"
    json.dump(m, open(meta, "w"))
    _jl().checkpoint.restore(d)


@case("checkpoint", "a structure naming a type jlora does not know", r"malformed checkpoint metadata \(unknown adapter node type 'os.system'")
def _(tmp):
    d, _, _ = _saved(tmp)
    meta = os.path.join(d, "1", "meta", "metadata")
    text = open(meta).read().replace('"node": "LoRA"', '"node": "os.system"')
    open(meta, "w").write(text)
    _jl().checkpoint.restore(d)


@case("checkpoint", "restoring with a spec of another rank", r"different spec: at fc1/kernel the checkpoint holds LoRA\(rank=2")
def _(tmp):
    jlora = _jl()
    d, _, _ = _saved(tmp)
    jlora.checkpoint.restore(d, spec=jlora.Spec({"fc1/kernel": jlora.LoRA(rank=3)}))


@case("checkpoint", "restoring onto a base of another shape", r"at fc1/kernel the checkpoint has shape \(8, 16\), the tree to restore onto has \(16, 16\)")
def _(tmp):
    import jax
    import jax.numpy as jnp

    jlora = _jl()
    d, _, _ = _saved(tmp)
    other = {"fc1": {"kernel": jnp.ones((16, 16))}}
    _, frozen = jlora.split(jlora.apply(other, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2)}),
                                        key=jax.random.key(0)))
    jlora.checkpoint.restore(d, onto=frozen)


@case("checkpoint", "shardings for another tree", r"trainable shardings do not match the checkpoint at leaf #0")
def _(tmp):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    d, _, _ = _saved(tmp)
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    _jl().checkpoint.restore(d, shardings={"fc2": {"kernel": NamedSharding(mesh, P())}})


@case("checkpoint", "an optimizer state type from outside optax / jlora", r"opt: cannot store a .*Mine in a checkpoint")
def _(tmp):
    from typing import NamedTuple

    import jax.numpy as jnp

    class Mine(NamedTuple):
        x: object

    _jl().checkpoint.save(tmp, {"opt": Mine(jnp.ones(2))}, step=1)


# ---------------------------------------------------------------- optim


def _optim_case(what, match, call):
    case("optim", what, match)(lambda tmp: call(_jl().optim))


_optim_case("`lora_plus(ratio=0)`", r"jlora.optim.lora_plus: ratio must be a finite number > 0.0, got 0",
            lambda o: o.lora_plus(optax.adamw, 1e-3, ratio=0))
_optim_case("`lora_plus(ratio=nan)`", r"jlora.optim.lora_plus: ratio must be a finite number",
            lambda o: o.lora_plus(optax.adamw, 1e-3, ratio=float("nan")))
_optim_case("`lora_plus` with a negative learning rate", r"jlora.optim.lora_plus: lr must be a finite number > 0.0",
            lambda o: o.lora_plus(optax.adamw, -1e-3))
_optim_case("`lora_plus` given something that is not an optimizer factory",
            r"jlora.optim.lora_plus: make_optimizer must be callable, got 3",
            lambda o: o.lora_plus(3, 1e-3))
_optim_case("`bar(rho=-1)`", r"jlora.optim.bar: rho must be a finite number >= 0.0, got -1.0",
            lambda o: o.bar(-1.0))
_optim_case("`bar(rho=inf)`", r"jlora.optim.bar: rho must be a finite number >= 0.0, got inf",
            lambda o: o.bar(float("inf")))
_optim_case("`flora(rank=0)`", r"jlora.optim.flora: rank must be an int >= 1, got 0",
            lambda o: o.flora(rank=0))
_optim_case("`flora(beta=2)`", r"jlora.optim.flora: beta must be a finite number >= 0.0 and < 1.0",
            lambda o: o.flora(beta=2.0))
_optim_case("`flora(kappa=True)`", r"jlora.optim.flora: kappa must be an int >= 1, got True",
            lambda o: o.flora(kappa=True))
_optim_case("`flat_lora(total_steps=0)` (a division by zero before)",
            r"jlora.optim.flat_lora: total_steps must be an int >= 1, got 0",
            lambda o: o.flat_lora(adapted(), jax.random.key(0), step=0, total_steps=0))
_optim_case("`flat_lora(rho=-1)`", r"jlora.optim.flat_lora: rho must be a finite number >= 0.0",
            lambda o: o.flat_lora(adapted(), jax.random.key(0), step=0, total_steps=10,
                                  rho=-1.0))
_optim_case("`mezo_sgd(eps=0)`", r"jlora.optim.mezo_sgd: eps must be a finite number > 0.0",
            lambda o: o.mezo_sgd(lambda p: 0.0, adapted(), jax.random.key(0), lr=1e-3,
                                 eps=0.0))
_optim_case("`sam_gradient(rho=-1)`", r"jlora.optim.sam_gradient: rho must be a finite number >= 0.0",
            lambda o: o.sam_gradient(lambda p: 0.0, adapted(), rho=-1.0))
_optim_case("`balora` wrapping something that is not an Optax transformation",
            r"jlora.optim.balora: inner must be an optax.GradientTransformation",
            lambda o: o.balora(3))


# ---------------------------------------------------------------- jlora.init


def _mlp(p, x):
    """The fc1 -> fc2 model of ``params()``, as Flax Dense layers."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))

    return MLP().apply({"params": p}, x)


def _xs(n=2, rows=6):
    import jax.numpy as jnp

    return [jnp.linspace(-1.0, 1.0, rows * 8).reshape(rows, 8) * (i + 1) for i in range(n)]


def _init_spec(rank=2, **kw):
    jlora = _jl()
    return jlora.Spec({"fc{1,2}/kernel": jlora.LoRA(rank=rank, **kw)})


@case("init", "`LoRA(init=\"orthogonal\")` with an odd rank", r"LoRA: init='orthogonal' needs an even rank, got rank=3")
def _(tmp):
    _jl().LoRA(rank=3, init="orthogonal")


@case("init", "`LoRA(init=\"mica\", train_a=False)` (nothing would train)", r"LoRA: init='mica' trains only a")
def _(tmp):
    _jl().LoRA(rank=2, init="mica", train_a=False)


@case("init", "`init=\"orthogonal\"` on an embedding table", r"emb/embedding: init='orthogonal' is for linear and conv kernels")
def _(tmp):
    import jax.numpy as jnp

    jlora = _jl()
    jlora.apply({"emb": {"embedding": jnp.ones((10, 4))}},
                jlora.Spec({"emb/embedding": jlora.LoRA(rank=2, init="orthogonal")}),
                key=jax.random.key(0))


@case("init", "EVA on empty calibration data", r"jlora.init.eva: batches is empty")
def _(tmp):
    _jl().init.eva(params(), _init_spec(), [], _mlp)


@case("init", "EVA given one batch (a dict) instead of a list of batches", r"jlora.init.eva: batches must be an iterable of batches")
def _(tmp):
    _jl().init.eva(params(), _init_spec(), {"x": _xs()[0]}, _mlp)


@case("init", "EVA asking more components (rank·rho) than the layer has input features", r"jlora.init.eva: fc1/kernel: rank·rho = 12 components exceed the layer's 8 input features")
def _(tmp):
    _jl().init.eva(params(), _init_spec(rank=4), _xs(), _mlp, rho=3.0)


@case("init", "EVA with `rho < 1`", r"jlora.init.eva: rho must be a finite number >= 1.0")
def _(tmp):
    _jl().init.eva(params(), _init_spec(), _xs(), _mlp, rho=0.5)


@case("init", "EVA with batches of fewer rows than components (never converges)", r"jlora.init.eva: fc1/kernel .*did not converge .* within max_batches=3")
def _(tmp):
    _jl().init.eva(params(), _init_spec(), _xs(rows=3), _mlp, max_batches=3)


@case("init", "calibration whose `apply_fn` calls no Flax module owning a targeted kernel", r"jlora.init.corda: fc1/kernel: apply_fn\(params, batch\) never called")
def _(tmp):
    _jl().init.corda(params(), _init_spec(), _xs(), lambda p, x: x @ p["fc1"]["kernel"])


@case("init", "a spec adapting no (in, out) kernel with LoRA", r"jlora.init.corda: the spec adapts no two-axis")
def _(tmp):
    jlora = _jl()
    _jl().init.corda(params(), jlora.Spec({"fc1/bias": jlora.Full()}), _xs(), _mlp)


@case("init", "CorDA with an unknown `mode`", r"jlora.init.corda: mode must be one of \('ipm', 'kpm'\), got 'ppm'")
def _(tmp):
    _jl().init.corda(params(), _init_spec(), _xs(), _mlp, mode="ppm")


@case("init", "CorDA on all-zero calibration inputs (covariance undefined)", r"jlora.init.corda: fc1/kernel: the input covariance is not finite")
def _(tmp):
    _jl().init.corda(params(), _init_spec(), [x * 0 for x in _xs()], _mlp)


@case("init", "LoRA-GA with `2·rank` above a layer's smaller side", r"jlora.init.lora_ga: fc2/kernel: 2·rank = 6 exceeds min\(fan_in, fan_out\) = 4")
def _(tmp):
    import jax.numpy as jnp

    _jl().init.lora_ga(params(), _init_spec(rank=3), lambda p, x: jnp.sum(_mlp(p, x)), _xs())


@case("init", "LoRA-GA whose loss does not depend on a targeted kernel", r"jlora.init.lora_ga: fc2/kernel: the loss's gradient .* is zero")
def _(tmp):
    import jax.numpy as jnp

    _jl().init.lora_ga(params(), _init_spec(), lambda p, x: jnp.sum(x @ p["fc1"]["kernel"]) ** 2,
                       _xs())


@case("init", "LoRA-GA with an unknown `direction`", r"jlora.init.lora_ga: direction must be one of")
def _(tmp):
    _jl().init.lora_ga(params(), _init_spec(), lambda p, x: 0.0, _xs(), direction="BrAr")


@case("init", "a spec asking another init for a calibrated layer", r"jlora.init.lora_ga: fc1/kernel: the spec asks LoRA\(init='pissa'\)")
def _(tmp):
    import jax.numpy as jnp

    _jl().init.lora_ga(params(), _init_spec(init="pissa"), lambda p, x: jnp.sum(_mlp(p, x)),
                       _xs())


# ---------------------------------------------------------------- module-level adapters


@case("module-level adapters", "a module rule that matches no module",
      r"Spec pattern 'enc/mlp' matches no module; module paths look like \['fc1', 'fc2'\]")
def _(tmp):
    import jax

    jlora = _jl()
    jlora.apply(params(), jlora.Spec({"enc/mlp": jlora.AdaptFormer()}), key=jax.random.key(0))


@case("module-level adapters", "a module-level method (`AdaptFormer`) on a leaf path",
      r"'fc1/kernel' names leaves \(e.g. 'fc1/kernel'\), but AdaptFormer adapts a module: "
      r"name the module's path \(e.g. 'fc1'\)")
def _(tmp):
    import jax

    jlora = _jl()
    jlora.apply(params(), jlora.Spec({"fc1/kernel": jlora.AdaptFormer()}), key=jax.random.key(0))


@case("module-level adapters", "a leaf method (`LoRA`) on a module path",
      r"'fc1' names a module \('fc1'\), but LoRA adapts leaves: name them \(e.g. 'fc1/\*\*/kernel'\)")
def _(tmp):
    import jax

    jlora = _jl()
    jlora.apply(params(), jlora.Spec({"fc1": jlora.LoRA(rank=2)}), key=jax.random.key(0))


@case("module-level adapters", "`AdaptFormer` on a module whose params hold no kernel",
      r"ln: AdaptFormer reads the module's input and output sizes from its kernels")
def _(tmp):
    import jax
    import jax.numpy as jnp

    jlora = _jl()
    jlora.apply({"ln": {"scale": jnp.ones(8)}, **params()},
                jlora.Spec({"ln": jlora.AdaptFormer()}), key=jax.random.key(0))


@case("module-level adapters", "applying a module rule to an already adapted tree",
      r"fc1: already adapted \(fc1@adaptformer exists\)")
def _(tmp):
    import jax

    jlora = _jl()
    spec = jlora.Spec({"fc1": jlora.AdaptFormer(bottleneck=2)})
    jlora.apply(jlora.apply(params(), spec, key=jax.random.key(0)), spec, key=jax.random.key(0))


@case("module-level adapters", "`merge` of a non-mergeable module-level adapter",
      r"fc1: AdaptFormer cannot be merged into the module's weights: its ReLU bottleneck")
def _(tmp):
    jlora = _jl()
    jlora.merge(adapted({"fc1": jlora.AdaptFormer(bottleneck=2)}))


@case("module-level adapters", "`AdaptFormer(bottleneck=0)`",
      r"AdaptFormer: bottleneck must be an int >= 1, got 0")
def _(tmp):
    _jl().AdaptFormer(bottleneck=0)


@case("module-level adapters", "`AdaptFormer(norm='rms')`",
      r"AdaptFormer: norm must be one of \(None, 'layernorm'\), got 'rms'")
def _(tmp):
    _jl().AdaptFormer(norm="rms")


# ---------------------------------------------------------------- trainable tokens, to_lora, LoftQ


@case("trainable tokens, to_lora, LoftQ", "`TrainableTokens(indices=[3, 3])` (a duplicate id)",
      r"TrainableTokens: indices lists token id\(s\) \[3\] more than once")
def _(tmp):
    _jl().TrainableTokens(indices=[3, 3])


@case("trainable tokens, to_lora, LoftQ", "`TrainableTokens(indices=[])`",
      r"TrainableTokens: indices is empty")
def _(tmp):
    _jl().TrainableTokens(indices=[])


@case("trainable tokens, to_lora, LoftQ", "a token id beyond the vocabulary of the table",
      r"emb/embedding: TrainableTokens indices \[20\] are out of range for a vocabulary of 16")
def _(tmp):
    import jax.numpy as jnp
    jlora = _jl()
    jlora.apply({"emb": {"embedding": jnp.zeros((16, 4))}},
                jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=[1, 20])}),
                key=jax.random.key(0))


@case("trainable tokens, to_lora, LoftQ",
      "a PEFT file whose `trainable_token_indices` lists an id beyond the vocabulary",
      r"adapter_config.json: key 'trainable_token_indices'.*out of range")
def _(tmp):
    jlora = _jl()
    p = fixture_params()
    adapted = jlora.apply(p, jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=[1, 2]),
                                         "fc1/kernel": jlora.LoRA(rank=2)}),
                          key=jax.random.key(0))
    jlora.peft.save(tmp, adapted)
    path = os.path.join(tmp, "adapter_config.json")
    config = json.load(open(path))
    config["trainable_token_indices"] = {"emb": [1, 99]}
    json.dump(config, open(path, "w"))
    jlora.peft.load(tmp, p)


@case("trainable tokens, to_lora, LoftQ", "`TrainableTokens` on a table leaf not named "
      "`embedding` or `kernel`, without `token_axis`", r"table/input_embedding: .*token_axis")
def _(tmp):
    import jax.numpy as jnp
    jlora = _jl()
    jlora.apply({"table": {"input_embedding": jnp.zeros((16, 4))}},
                jlora.Spec({"table/input_embedding": jlora.TrainableTokens(indices=[1])}),
                key=jax.random.key(0))


@case("trainable tokens, to_lora, LoftQ", "`compose.to_lora` at a rank above min(fan_in, fan_out)",
      r"w/kernel: rank 5 exceeds min\(fan_in, fan_out\) = 3")
def _(tmp):
    import jax.numpy as jnp
    _jl().compose.to_lora({"w": {"kernel": jnp.ones((4, 3))}}, 5)


@case("trainable tokens, to_lora, LoftQ", "`compose.to_lora` with an energy threshold above 1",
      r"jlora.compose.to_lora: rank must be")
def _(tmp):
    import jax.numpy as jnp
    _jl().compose.to_lora({"w": {"kernel": jnp.ones((4, 3))}}, 1.5)


@case("trainable tokens, to_lora, LoftQ", "`LoftQ(rank=4, loftq_iter=0)`",
      r"LoftQ: loftq_iter must be")
def _(tmp):
    _jl().LoftQ(rank=4, loftq_iter=0)


# ---------------------------------------------------------------- the page


def render() -> str:
    areas: dict[str, list[Case]] = {}
    for c in CASES:
        areas.setdefault(c.area, []).append(c)
    lines = [
        "# Bad inputs and what each gets",
        "",
        "Every row is a test: `tests/test_bad_inputs.py` makes the call and checks that it raises",
        "a `ValueError` whose message matches the pattern shown (the page is rendered from the same",
        "case list, `tests/bad_inputs.py`; `python tests/bad_inputs.py` rewrites it). Errors name",
        "the path, option, key or file at fault; nothing is half-written or half-loaded.",
        "",
        "| area | cases |",
        "|---|---:|",
        *(f"| {a} | {len(cs)} |" for a, cs in areas.items()),
        f"| **total** | **{len(CASES)}** |",
        "",
    ]
    for area, cs in areas.items():
        lines += [f"## {area}", "", "| bad input | `ValueError` matching |", "|---|---|"]
        lines += [f"| {c.what} | `{c.match.replace('|', chr(92) + '|')}` |" for c in cs]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    with open(DOC, "w") as f:
        f.write(render())
    print(f"wrote {DOC}: {len(CASES)} cases")
