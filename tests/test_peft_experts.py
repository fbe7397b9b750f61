"""PEFT ``target_parameters`` adapters (LoRA on stacked MoE expert weights) both
ways, against real PEFT on a small PyTorch MoE model, and the layout against a
float64 reference of PEFT's ``ParamWrapper`` delta."""

import importlib.util
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64

needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "peft")),
    reason="torch and peft not installed")

E, D, F = 4, 8, 6


def torch_moe(seed=0):
    """A tiny MoE: a router ``proj`` (Linear), experts ``experts.w_in`` ``(E, F, D)`` and
    ``experts.w_out`` ``(E, D, F)`` in PEFT's default ``(E, out, in)`` layout, and
    ``shared.w`` ``(E, D, F)`` in the ``is_transposed`` ``(E, in, out)`` layout."""
    import torch
    import torch.nn as tnn

    class Experts(tnn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = tnn.Parameter(torch.randn(E, F, D) / 3)  # registered first
            self.w_out = tnn.Parameter(torch.randn(E, D, F) / 3)

        def forward(self, x):  # x (E, C, D) dispatched tokens
            h = torch.relu(torch.einsum("ecd,efd->ecf", x, self.w_in))
            return torch.einsum("ecf,edf->ecd", h, self.w_out)

    class Shared(tnn.Module):
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.w = tnn.Parameter(torch.randn(E, D, F) / 3)

        def forward(self, x):
            return torch.einsum("ecd,edf->ecf", x, self.w)

    class MoE(tnn.Module):
        def __init__(self):
            super().__init__()
            self.proj = tnn.Linear(D, D)
            self.experts = Experts()
            self.shared = Shared()

        def forward(self, x):
            x = self.proj(x)
            return self.experts(x), self.shared(x)

    torch.manual_seed(seed)
    return MoE()


def flax_params(model):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return {"proj": {"kernel": jnp.asarray(sd["proj.weight"].T), "bias": jnp.asarray(sd["proj.bias"])},
            "experts": {"w_in": jnp.asarray(sd["experts.w_in"].transpose(0, 2, 1)),  # (E, D, F)
                        "w_out": jnp.asarray(sd["experts.w_out"].transpose(0, 2, 1))},
            "shared": {"w": jnp.asarray(sd["shared.w"])}}


def jax_forward(p, x):
    x = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", x, p["experts"]["w_in"]))
    return jnp.einsum("ecf,efd->ecd", h, p["experts"]["w_out"]), \
        jnp.einsum("ecd,edf->ecf", x, p["shared"]["w"])


def random_factors(adapted, seed):
    """Non-zero ``b`` everywhere so the deltas are visible."""
    rng = np.random.default_rng(seed)
    def fill(x):
        if not jlora.tree.is_node(x):
            return x
        return x.replace(b=jnp.asarray(rng.normal(size=x.b.shape) / 2, x.b.dtype))
    return jax.tree.map(fill, adapted, is_leaf=jlora.tree.is_node)


SPEC = jlora.Spec({"proj/kernel": jlora.LoRA(rank=2, alpha=4),
                   "experts/w_*": jlora.LoRA(rank=2, alpha=4, expert_axis=0),
                   "shared/w": jlora.LoRA(rank=3, alpha=3, expert_axis=0)})
PRE = "base_model.model."


def check_paramwrapper_layout(folder, adapted):
    """The file's tensors against a float64 reference of PEFT's ``ParamWrapper``
    delta (A expert-major, B expert-minor), wrappers nested w_in inside w_out."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.w_in", "experts.w_out", "shared.w"]
    assert cfg["target_modules"] == ["proj"] and cfg["lora_dropout"] == 0.0
    t = load_file(folder / "adapter_model.safetensors")
    for key, (mod, leaf), r, s in ((PRE + "experts.base_layer", ("experts", "w_in"), 2, 2.0),
                                   (PRE + "experts", ("experts", "w_out"), 2, 2.0),
                                   (PRE + "shared", ("shared", "w"), 3, 1.0)):
        big_a, big_b = f64(t[key + ".lora_A.weight"]), f64(t[key + ".lora_B.weight"])
        assert big_a.shape[0] == r * E and big_b.shape[1] == r * E
        delta = np.einsum("ore,eri->eio", big_b.reshape(-1, r, E), big_a.reshape(E, r, -1)) * s
        node = adapted[mod][leaf]
        want = np.stack([s * f64(node.a[e]) @ f64(node.b[e]) for e in range(E)])
        np.testing.assert_allclose(delta, want, atol=1e-6)


@needs_torch
def test_jlora_to_peft_and_peft_to_jlora_on_a_torch_moe(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    model = torch_moe()
    params = flax_params(model)
    x = np.random.default_rng(1).normal(size=(E, 3, D)).astype(np.float32)
    # jlora -> PEFT: the layout, then PEFT's forward against jlora's merged model
    adapted = random_factors(jlora.apply(params, SPEC, key=jax.random.key(0)), 2)
    jlora.peft.save(tmp_path / "j2p", adapted, parameter_order=["w_in", "w_out"])
    check_paramwrapper_layout(tmp_path / "j2p", adapted)
    peft_model = PeftModel.from_pretrained(torch_moe(), str(tmp_path / "j2p"))
    with torch.no_grad():
        got = [t.numpy() for t in peft_model(torch.from_numpy(x))]
    for g, w in zip(got, jax_forward(jlora.merge(adapted), jnp.asarray(x))):
        np.testing.assert_allclose(f64(g), f64(w), rtol=1e-5, atol=1e-5)
    # and back into jlora: the same deltas and layouts
    back = jlora.peft.load(tmp_path / "j2p", params, parameter_order=["w_in", "w_out"])
    for mod, leaf in (("experts", "w_in"), ("experts", "w_out"), ("shared", "w")):
        assert back[mod][leaf].config.expert_axis == 0
        assert back[mod][leaf].in_axes == adapted[mod][leaf].in_axes == (1,)
        np.testing.assert_allclose(f64(back[mod][leaf].delta()),
                                   f64(adapted[mod][leaf].delta()), atol=1e-6)
    # PEFT -> jlora (random B: init_lora_weights=False), per-parameter rank
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], init_lora_weights=False,
                     target_parameters=["experts.w_in", "experts.w_out", "shared.w"],
                     rank_pattern={"shared.w": 2})
    src = get_peft_model(torch_moe(), cfg)
    src.save_pretrained(str(tmp_path / "p2j"))
    with torch.no_grad():
        want = [t.numpy() for t in src(torch.from_numpy(x))]
    # w_in (E, D, F) and w_out (E, F, D) fit either nesting: a warning, and the names' sorted
    # order, which is this module's registration order
    with pytest.warns(UserWarning, match=r"module 'experts' fit its parameters in 2"):
        back = jlora.peft.load(tmp_path / "p2j", params)
    assert back["shared"]["w"].rank == 2 and back["experts"]["w_in"].a.shape == (E, D, 3)
    for g, w in zip(jax_forward(jlora.merge(back), jnp.asarray(x)), want):
        np.testing.assert_allclose(f64(g), f64(w), rtol=1e-5, atol=1e-5)
    # the factorized einsum dispatch on a loaded expert node
    xp = jnp.asarray(x) @ jlora.merge(back)["proj"]["kernel"] + params["proj"]["bias"]
    fast = jlora.experts.einsum("ecd,edf->ecf", xp, back["shared"]["w"])
    np.testing.assert_allclose(f64(fast), f64(want[1]), rtol=1e-5, atol=1e-5)


def test_expert_adapters_peft_refusals(tmp_path):
    rng = np.random.default_rng(0)
    params = {"shared": {"w": jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32)}}
    drop = jlora.apply(params, jlora.Spec({"shared/w": jlora.LoRA(rank=2, expert_axis=0,
                                                                   dropout=0.1)}),
                       key=jax.random.key(0))
    with pytest.raises(ValueError, match="lora_dropout"):
        jlora.peft.save(tmp_path / "d", drop)
    ok = drop["shared"]["w"].replace(config=jlora.LoRA(rank=2, expert_axis=0))
    jlora.peft.save(tmp_path / "ok", {"shared": {"w": ok}})
    wrong = {"shared": {"w": jnp.zeros((E + 1, D, F))}}
    with pytest.raises(ValueError, match="module 'shared'"):
        jlora.peft.load(tmp_path / "ok", wrong)
    with pytest.raises(ValueError, match="parameter_order"):
        jlora.peft.save(tmp_path / "x", {"shared": {"w": ok}}, parameter_order="w")
    with pytest.raises(ValueError, match="in_axes"):
        jlora.peft.load(tmp_path / "ok", params, in_axes={"shared/w": (3,)})
    flat = {"fc": {"kernel": jnp.ones((D, F))}}
    jlora.peft.save(tmp_path / "flat", jlora.apply(flat, jlora.Spec({"fc/kernel": jlora.LoRA(
        rank=2)}), key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"in_axes \(2,\) for fc/kernel"):
        jlora.peft.load(tmp_path / "flat", flat, in_axes={"fc/kernel": (2,)})


@needs_torch
def test_target_parameters_that_fit_in_two_orders_need_parameter_order(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file

    class Experts(torch.nn.Module):  # gate_up (E, in, out) beside down (E, out, in): both nest
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 6, 8))
            self.down_proj = torch.nn.Parameter(torch.randn(3, 8, 6))

    torch.manual_seed(0)
    base = torch.nn.Module()
    base.experts = Experts()
    params = {"experts": {n: jnp.asarray(getattr(base.experts, n).detach().numpy())
                          for n in ("gate_up_proj", "down_proj")}}
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(str(tmp_path))
    merged = peft_model.merge_and_unload().experts
    # both nestings fit the shapes (each with the other orientation): a warning names them
    with pytest.warns(UserWarning, match=r"module 'experts' fit its parameters in 2 registration "
                      r"orders \(\['down_proj', 'gate_up_proj'\], \['gate_up_proj', 'down_proj'\]\)"):
        guessed = jlora.merge(jlora.peft.load(tmp_path, params))
    assert np.abs(f64(guessed["experts"]["down_proj"])
                  - f64(merged.down_proj.detach().numpy())).max() > 0.1  # sorted: the wrong one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = jlora.merge(jlora.peft.load(tmp_path, params,
                                           parameter_order=["gate_up_proj", "down_proj"]))
    for name in ("gate_up_proj", "down_proj"):
        np.testing.assert_allclose(f64(back["experts"][name]),
                                   f64(getattr(merged, name).detach().numpy()), atol=1e-5)
    # saving two parameters of one module without their order warns too; with it, PEFT's file
    adapted = jlora.peft.load(tmp_path, params, parameter_order=["gate_up_proj", "down_proj"])
    with pytest.warns(UserWarning, match=r"jlora.peft.save: module 'experts'.*parameter_order"):
        jlora.peft.save(tmp_path / "sorted", adapted)
    jlora.peft.save(tmp_path / "ordered", adapted, parameter_order=["gate_up_proj", "down_proj"])
    ours = load_file(tmp_path / "ordered" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_allclose(f64(ours[key]), f64(theirs[key]), atol=1e-6)
