"""PEFT ADALORA adapter files, in and out, against PEFT itself (``SVDLinear``/``SVDConv2d``).

PEFT's layout: ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r) and
``ΔW = B·(A ⊙ E)·lora_alpha / (init_r + 1e-5)``; a ``rank_pattern`` prunes the saved
tensors to the kept triplets."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
from tests._refs import f64
from tests.test_peft import (Classifier, assert_merged_equal, assert_same_adapter,
                             needs_torch, params_from_torch, randomize_peft, torch_from_params)

PRE = "base_model.model."
X = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)


class FlaxClassifier(nn.Module):
    """The Flax twin of ``Classifier.torch``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="fc1")(x)
        h = nn.relu(nn.Dense(16, name="pre_classifier")(h))
        return nn.Dense(4, name="classifier")(h)


def peft_adalora(**overrides):
    """A PEFT AdaLoRA model on ``Classifier`` with random (non-zero) A, E, B."""
    from peft import AdaLoraConfig, get_peft_model

    base = Classifier.torch()
    params = params_from_torch(base.state_dict())
    options = dict(init_r=6, target_r=2, lora_alpha=12, target_modules=["fc1", "pre_classifier"],
                   total_step=4, tfinal=1)
    model = get_peft_model(base, AdaLoraConfig(**{**options, **overrides}))
    randomize_peft(model)
    return model, params


def prune_with_rank_allocator(model):
    """Run PEFT's RankAllocator to the end of its budgeting phase: it masks E and records
    the kept triplets in the config's rank_pattern."""
    import torch

    x = torch.tensor(X)
    for step in range(1, 4):  # total_step 4, tfinal 1: step 3 forces the final mask
        model(x).pow(2).mean().backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()


def prune_by_hand(model, keep):
    """Zero E where ``keep`` (module -> bools) is false and record the rank_pattern, as
    PEFT's allocator leaves a model."""
    import torch

    with torch.no_grad():
        for module, kept in keep.items():
            e = getattr(model.base_model.model, module).lora_E["default"]
            e.masked_fill_(~torch.tensor(kept).unsqueeze(-1), 0.0)
    model.peft_config["default"].rank_pattern = {f"{m}.lora_E.default": k for m, k in keep.items()}


def reference_merged(params, tensors, config):
    """float64 W + B·(A ⊙ E)·lora_alpha / (init_r + 1e-5) per module, the file's tensors
    (pruned to the rank_pattern's kept triplets where it has one)."""
    out = {m: dict(v) for m, v in params.items()}
    for module in config["target_modules"]:
        a, e, b = (f64(tensors[f"{PRE}{module}.lora_{x}"]) for x in "AEB")
        delta = (b @ (a * e)) * config["lora_alpha"] / (config["init_r"] + 1e-5)
        out[module]["kernel"] = f64(params[module]["kernel"]) + delta.T
    return out


@needs_torch
@pytest.mark.parametrize("prune", ["none", "allocator", "by_hand"])
def test_jlora_loads_what_peft_saves(tmp_path, prune):
    import torch

    model, params = peft_adalora()
    if prune == "allocator":
        prune_with_rank_allocator(model)
    elif prune == "by_hand":
        prune_by_hand(model, {"fc1": [True, False, True, False, False, True],
                              "pre_classifier": [False] * 6})
    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "adapter_config.json"))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    pattern = config["rank_pattern"]
    assert config["peft_type"] == "ADALORA" and (pattern is None) == (prune == "none")
    if pattern is not None:
        assert any(not all(k) for k in pattern.values())  # the file holds pruned tensors
        assert all(tensors[f"{PRE}{m[:-len('.lora_E')]}.lora_E"].shape == (sum(k), 1)
                   for m, k in pattern.items())

    back = jlora.peft.load(tmp_path, params)
    for module in ("fc1", "pre_classifier"):
        node = back[module]["kernel"]
        assert isinstance(node, jlora.methods.AdaLoRANode)
        assert node.config.init_rank == 6 and node.config.target_rank == 2
        assert node.p.shape == (8 if module == "fc1" else 16, 6) and node.lam.shape == (6,)
        kept = (pattern or {}).get(f"{module}.lora_E", [True] * 6)
        gone = ~np.asarray(kept)
        assert not np.any(node.lam[gone]) and not np.any(node.p[:, gone]) and not np.any(node.q[gone])
        e = tensors[f"{PRE}{module}.lora_E"][:, 0]
        np.testing.assert_array_equal(node.lam[np.asarray(kept)], e)
        # PEFT's +1e-5 folded into alpha: alpha / r_init == lora_alpha / (r_init + 1e-5)
        assert node.scale == pytest.approx(12 / (6 + 1e-5), rel=1e-15)

    merged = jlora.merge(back)
    ref = reference_merged(params, tensors, config)
    for module in ref:
        for leaf in ref[module]:
            np.testing.assert_allclose(f64(merged[module][leaf]), f64(ref[module][leaf]),
                                       rtol=0, atol=1e-6, err_msg=f"{module}/{leaf}")
    assert_merged_equal(merged, params_from_torch(model.merge_and_unload().state_dict()))
    # and the adapted (unmerged) forward equals PEFT's outputs on the same file
    peft_again = _peft_from(tmp_path, params)
    with torch.no_grad():
        y_peft = peft_again(torch.tensor(X)).numpy()
    y_jlora = jlora.linen.apply(FlaxClassifier(), {"params": back}, jnp.asarray(X))
    np.testing.assert_allclose(f64(y_jlora), f64(y_peft), rtol=1e-5, atol=1e-5)


def _peft_from(folder, params):
    from peft import PeftModel

    return PeftModel.from_pretrained(torch_from_params(Classifier.torch(), params),
                                     str(folder)).eval()


def jlora_adalora(modules=("fc1", "pre_classifier"), *, full_head=False, seed=0):
    """AdaLoRA on ``modules`` with random p, λ, q and some λ pruned to 0 (as
    jlora.optim.adalora leaves them), and optionally a Full() head (PEFT then also wraps
    ``pre_classifier``, whose name ends with ``classifier``)."""
    params = Classifier.params()
    rules = {f"{{{','.join(modules)}}}/kernel": jlora.AdaLoRA(init_rank=5, target_rank=2,
                                                              alpha=7.0)}
    if full_head:
        rules["classifier/{kernel,bias}"] = jlora.Full()
    adapted = jlora.apply(params, jlora.Spec(rules), key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for module, pruned in (("fc1", [1, 3]), ("pre_classifier", [0])):
        if module not in modules:
            continue
        node = adapted[module]["kernel"]
        lam = rng.normal(size=5)
        lam[pruned] = 0.0
        adapted[module]["kernel"] = node.replace(
            p=jnp.asarray(0.3 * rng.normal(size=node.p.shape), jnp.float32),
            lam=jnp.asarray(lam, jnp.float32),
            q=jnp.asarray(0.3 * rng.normal(size=node.q.shape), jnp.float32))
    if full_head:
        head = adapted["classifier"]["kernel"]
        adapted["classifier"]["kernel"] = head.replace(value=head.value + 0.5)
    return params, adapted


@needs_torch
@pytest.mark.parametrize("modules,full_head", [(("fc1", "pre_classifier"), False),
                                               (("fc1",), True)])
def test_peft_loads_what_jlora_saves(tmp_path, modules, full_head):
    import torch

    params, adapted = jlora_adalora(modules, full_head=full_head)
    jlora.peft.save(tmp_path, adapted)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 5 and config["target_r"] == 2
    assert config["rank_pattern"] is None  # full-size tensors: pruned triplets have λ = 0
    assert config["target_modules"] == list(modules)
    assert config["modules_to_save"] == (["classifier"] if full_head else None)
    assert config["lora_alpha"] == pytest.approx(7.0 * (5 + 1e-5) / 5, rel=1e-15)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors[f"{PRE}fc1.lora_A"].shape == (5, 8)
    assert tensors[f"{PRE}fc1.lora_E"].shape == (5, 1) and tensors[f"{PRE}fc1.lora_B"].shape == (16, 5)

    model = _peft_from(tmp_path, params)
    with torch.no_grad():
        y_peft = model(torch.tensor(X)).numpy()
    y_jlora = jlora.linen.apply(FlaxClassifier(), {"params": adapted}, jnp.asarray(X))
    np.testing.assert_allclose(f64(y_peft), f64(y_jlora), rtol=1e-5, atol=1e-5)
    # float64 reference of jlora's merged kernel: K0 + (alpha / r)·p·diag(λ)·q
    node = adapted["fc1"]["kernel"]
    want = f64(params["fc1"]["kernel"]) + 7.0 / 5 * (f64(node.p) * f64(node.lam)) @ f64(node.q)
    got = params_from_torch(model.merge_and_unload().state_dict())
    np.testing.assert_allclose(f64(got["fc1"]["kernel"]), want, rtol=0, atol=1e-6)
    # and back into jlora unchanged: factors bit for bit, alpha exactly
    back = jlora.peft.load(tmp_path, params)
    if full_head:  # PEFT saved pre_classifier whole too: its base values, as Full() leaves
        for leaf in ("kernel", "bias"):
            assert isinstance(back["pre_classifier"][leaf], jlora.methods.FullNode)
            np.testing.assert_array_equal(back["pre_classifier"][leaf].value,
                                          params["pre_classifier"][leaf])
            back["pre_classifier"][leaf] = params["pre_classifier"][leaf]
    assert_same_adapter(back, adapted)


@needs_torch
def test_conv_adalora_both_ways(tmp_path):
    """PEFT's SVDConv2d: lora_A (r, in·kh·kw) against jlora's p (kh·kw·in, r)."""
    import torch
    from peft import AdaLoraConfig, PeftModel, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, (3, 2))

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    base = Net()
    params = {"conv": {"kernel": jnp.asarray(base.conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
                       "bias": jnp.asarray(base.conv.bias.detach().numpy())}}
    model = get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6,
                                               target_modules=["conv"], total_step=5))
    randomize_peft(model)
    model.save_pretrained(tmp_path / "peft")
    back = jlora.peft.load(tmp_path / "peft", params)
    t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    delta = (f64(t[f"{PRE}conv.lora_B"]) @ (f64(t[f"{PRE}conv.lora_A"]) * f64(t[f"{PRE}conv.lora_E"])))
    ref = f64(params["conv"]["kernel"]) + (6 / (4 + 1e-5) * delta).reshape(5, 3, 3, 2).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(f64(jlora.merge(back)["conv"]["kernel"]), ref, rtol=0, atol=1e-6)
    peft_merged = model.merge_and_unload().conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(f64(jlora.merge(back)["conv"]["kernel"]), f64(peft_merged),
                               rtol=0, atol=1e-6)

    jlora.peft.save(tmp_path / "jlora", back)
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(Net(), str(tmp_path / "jlora")).eval()
    x = torch.tensor(np.random.default_rng(1).normal(size=(2, 3, 6, 5)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), model.eval()(x).numpy(), rtol=1e-5, atol=1e-5)


def test_dtype_and_name_map_round_trip(tmp_path):
    """bf16 factors stay bf16 in the file and back; name_map names the PyTorch modules."""
    params = {"enc": {"proj": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)),
                                                     jnp.float32)}}}
    spec = jlora.Spec({"enc/proj/kernel": jlora.AdaLoRA(init_rank=3, target_rank=1, alpha=4.0,
                                                        dtype=jnp.bfloat16)})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    node = adapted["enc"]["proj"]["kernel"]
    adapted["enc"]["proj"]["kernel"] = node.replace(lam=jnp.asarray([0.5, 0.0, -1.25], jnp.bfloat16))
    names = {"enc/proj": "encoder.layer.0.dense"}
    jlora.peft.save(tmp_path, adapted, name_map=names)
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {k: v["dtype"] for k, v in header.items() if k != "__metadata__"} == {
        f"{PRE}encoder.layer.0.dense.lora_{x}": "BF16" for x in "AEB"}
    back = jlora.peft.load(tmp_path, params, name_map=names)
    assert back["enc"]["proj"]["kernel"].p.dtype == jnp.bfloat16
    assert_same_adapter(back, adapted)


# ---------------------------------------------------------------- dropout (lora_dropout)


def test_adalora_dropout_through_linen_apply():
    """``jlora.linen.apply(..., dropout_key=)`` reaches AdaLoRA's branch with LoRA's masks."""
    model = FlaxClassifier()
    params = Classifier.params()
    x = jnp.asarray(X)
    key = jax.random.key(5)
    ada = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.AdaLoRA(
        init_rank=4, target_rank=2, alpha=4.0, dropout=0.3)}), key=jax.random.key(0))
    node = ada["fc1"]["kernel"]
    ada["fc1"]["kernel"] = node = node.replace(lam=jnp.asarray([1.0, -2.0, 0.5, 3.0]))
    lora = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=4, alpha=4.0,
                                                                    dropout=0.3)}),
                       key=jax.random.key(0))
    lora["fc1"]["kernel"] = lora["fc1"]["kernel"].replace(a=node.p * node.lam, b=node.q)
    y_ada = jlora.linen.apply(model, {"params": ada}, x, dropout_key=key)
    y_lora = jlora.linen.apply(model, {"params": lora}, x, dropout_key=key)
    np.testing.assert_allclose(f64(y_ada), f64(y_lora), rtol=1e-5, atol=1e-5)
    assert not np.allclose(f64(y_ada), f64(jlora.linen.apply(model, {"params": ada}, x)),
                           atol=1e-4)


@needs_torch
def test_lora_dropout_round_trips_through_peft(tmp_path):
    """jlora writes its AdaLoRA dropout as lora_dropout, PEFT builds its dropout from it, and
    a PEFT file's lora_dropout comes back as the nodes' dropout."""
    import torch

    params, adapted = jlora_adalora()
    for module in ("fc1", "pre_classifier"):
        node = adapted[module]["kernel"]
        adapted[module]["kernel"] = node.replace(config=dataclasses.replace(node.config,
                                                                            dropout=0.1))
    jlora.peft.save(tmp_path / "jlora", adapted)
    assert json.load(open(tmp_path / "jlora" / "adapter_config.json"))["lora_dropout"] == 0.1
    model = _peft_from(tmp_path / "jlora", params)
    assert model.peft_config["default"].lora_dropout == 0.1
    for module in ("fc1", "pre_classifier"):
        layer = getattr(model.base_model.model, module).lora_dropout["default"]
        assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.1
    with torch.no_grad():  # eval: no dropout on either side
        y_peft = model(torch.tensor(X)).numpy()
    y_jlora = jlora.linen.apply(FlaxClassifier(), {"params": adapted}, jnp.asarray(X))
    np.testing.assert_allclose(f64(y_jlora), f64(y_peft), rtol=1e-5, atol=1e-5)
    assert_same_adapter(jlora.peft.load(tmp_path / "jlora", params), adapted)

    peft_model, params = peft_adalora(lora_dropout=0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    back = jlora.peft.load(tmp_path / "peft", params)
    assert {back[m]["kernel"].config.dropout for m in ("fc1", "pre_classifier")} == {0.2}


def test_save_refuses_adalora_adapters_mixing_dropout(tmp_path):
    params = Classifier.params()
    spec = jlora.Spec({"fc1/kernel": jlora.AdaLoRA(init_rank=4, target_rank=2, dropout=0.1),
                       "pre_classifier/kernel": jlora.AdaLoRA(init_rank=4, target_rank=2)})
    with pytest.raises(ValueError, match=r"adapters mix lora_dropout values"):
        jlora.peft.save(tmp_path, jlora.apply(params, spec, key=jax.random.key(0)))
    assert not (tmp_path / "adapter_config.json").exists()


# ---------------------------------------------------------------- bad input


def test_save_refuses_adalora_mixed_with_lora(tmp_path):
    params = Classifier.params()
    spec = jlora.Spec({"fc1/kernel": jlora.AdaLoRA(init_rank=4, target_rank=2),
                       "pre_classifier/kernel": jlora.LoRA(rank=2)})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"mixes AdaLoRA \(fc1/kernel\) with LoRA "
                                         r"\(pre_classifier/kernel\)"):
        jlora.peft.save(tmp_path, adapted)
    spec = jlora.Spec({"fc1/kernel": jlora.AdaLoRA(init_rank=4, target_rank=2),
                       "pre_classifier/kernel": jlora.AdaLoRA(init_rank=6, target_rank=2)})
    with pytest.raises(ValueError, match=r"AdaLoRA adapters fc1/kernel and pre_classifier/kernel "
                                         r"differ in \(init_rank, target_rank, alpha\)"):
        jlora.peft.save(tmp_path, jlora.apply(params, spec, key=jax.random.key(0)))
    assert not (tmp_path / "adapter_config.json").exists()


def saved_adalora(tmp_path):
    params, adapted = jlora_adalora()
    jlora.peft.save(tmp_path, adapted)
    return params


def edit(tmp_path, **changes):
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    cfg.update(changes)
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))


@pytest.mark.parametrize("changes,message", [
    ({"rank_pattern": {"fc1.lora_E": [True, False]}},
     r"adapter_config.json: key 'rank_pattern.fc1.lora_E' must be a list of 5 \(init_r\) booleans"),
    ({"rank_pattern": {"fc1": [True] * 5}},
     r"adapter_config.json: key 'rank_pattern.fc1' is not a '<module>.lora_E' name"),
    ({"rank_pattern": {"fc1.lora_E": [True, False, True, True, True]}},
     r"adapter_model.safetensors: base_model.model.fc1.lora_A/lora_E have shapes \(5, 8\)/\(5, 1\), "
     r"but adapter_config.json says rank 4 \(rank_pattern keeps 4 of init_r=5\)"),
    ({"rank_pattern": {"classifier.lora_E": [True] * 5}},
     r"key 'rank_pattern.classifier.lora_E' names module 'classifier', for which"),
    ({"lora_dropout": 1.5}, r"adapter_config.json: key 'lora_dropout' must be a number in \[0, 1\)"),
    ({"alpha_pattern": {"fc1": 3}}, r"key 'alpha_pattern' is set to .*does not implement"),
    ({"use_rslora": True}, r"key 'use_rslora' is set to True, which jlora does not implement"),
    ({"target_r": 9}, r"key 'target_r' must be an int in \[0, init_r=5\]"),
    ({"init_r": 4}, r"base_model.model.fc1.lora_A/lora_E have shapes \(5, 8\)/\(5, 1\), but "
                    r"adapter_config.json says rank 4 \(init_r=4\)"),
    ({"total_step": None}, r"key 'total_step' must be an int >= 1"),
    ({"tinit": 3, "total_step": 3}, r"keys 'tinit', 'tfinal', 'total_step' leave no budgeting"),
    ({"lora_alpha": 0}, r"key 'lora_alpha' must be a finite number > 0"),
])
def test_bad_adalora_configs_are_refused(tmp_path, changes, message):
    params = saved_adalora(tmp_path)
    edit(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        jlora.peft.load(tmp_path, params)


def test_bad_adalora_tensors_are_refused(tmp_path):
    params = saved_adalora(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(path)
    tensors = dict(good)
    del tensors[f"{PRE}pre_classifier.lora_E"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: missing tensor "
                                         r"base_model.model.pre_classifier.lora_E"):
        jlora.peft.load(tmp_path, params)
    tensors = {**good, f"{PRE}fc1.lora_A.weight": good[f"{PRE}fc1.lora_A"]}
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.fc1.lora_A.weight' is not an "
                                         r"AdaLoRA tensor name"):
        jlora.peft.load(tmp_path, params)


def test_other_peft_types_name_the_ones_jlora_loads(tmp_path):
    params = saved_adalora(tmp_path)
    edit(tmp_path, peft_type="IA3")
    with pytest.raises(ValueError, match=r"key 'peft_type' is 'IA3'; jlora loads 'LORA', "
                                         r"'ADALORA' and 'TRAINABLE_TOKENS' adapters"):
        jlora.peft.load(tmp_path, params)
