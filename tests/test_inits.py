"""Data-driven and weight-only LoRA inits (jlora.init.eva / corda / lora_ga, LoRA(init="mica"
/ "orthogonal")): float64 numpy references of each step, identity at init, and parity with
PEFT 0.21.2 itself (CPU torch) on the same weights and calibration data, plus PEFT files."""

import importlib.util
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64, perturb

HAVE_TORCH_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH_PEFT, reason="torch and peft not installed")

D, O, R = 16, 8, 4
SPEC = jlora.Spec({"{q,k,o}/kernel": jlora.LoRA(rank=R, alpha=8)})


class Twin(nn.Module):
    """Two layers reading the same input (q, k: one shared PCA in EVA) and one after them."""

    @nn.compact
    def __call__(self, x):
        q, k = nn.Dense(D, name="q")(x), nn.Dense(D, name="k")(x)
        return nn.Dense(O, name="o")(jnp.tanh(q * k))


def twin_params(seed=0):
    return Twin().init(jax.random.key(seed), jnp.ones((1, D)))["params"]


def run(p, batch):
    return Twin().apply({"params": p}, batch["x"])


def data(n_batches=4, batch=3, seq=6, seed=0):
    """Anisotropic inputs (feature j scaled by 0.75^j) with some padded positions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        x = rng.normal(size=(batch, seq, D)) * 0.75 ** np.arange(D)
        mask = np.ones((batch, seq), np.int32)
        mask[0, seq - 2:] = 0
        out.append({"x": x.astype(np.float32), "attention_mask": mask})
    return out


def torch_twin(params):
    import torch

    class TorchTwin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
            self.o = torch.nn.Linear(D, O)

        def forward(self, x):
            return self.o(torch.tanh(self.q(x) * self.k(x)))

    m = TorchTwin()
    with torch.no_grad():
        for name in ("q", "k", "o"):
            getattr(m, name).weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            getattr(m, name).bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    return m.eval()


def torch_batches(batches):
    import torch
    return [{k: torch.tensor(v) for k, v in b.items()} for b in batches]


def peft_model(params, **config):
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(torch_twin(params), peft.LoraConfig(
            r=R, lora_alpha=8, target_modules=["q", "k", "o"], **config))


def peft_factors(pm):
    """{name: (A, B)} of a PEFT model's LoRA layers."""
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    return {n: (sd[f"base_model.model.{n}.lora_A.default.weight"],
                sd[f"base_model.model.{n}.lora_B.default.weight"])
            for n in ("q", "k", "o") if f"base_model.model.{n}.lora_A.default.weight" in sd}


def peft_weight(pm, name):
    return pm.state_dict()[f"base_model.model.{name}.base_layer.weight"].numpy()


def torch_out(pm, x):
    import torch
    with torch.no_grad():
        return pm(torch.tensor(np.asarray(x))).numpy()


def sign_match(ours, theirs, axis):
    """``ours`` with each vector along ``axis`` flipped to the sign of ``theirs``."""
    dot = np.sum(f64(ours) * f64(theirs), axis=axis, keepdims=True)
    return f64(ours) * np.where(dot < 0, -1.0, 1.0)


X = jnp.asarray(data(1, seed=9)[0]["x"])


# ---------------------------------------------------------------- MiCA


def test_mica_minor_directions_frozen_b_and_identity():
    params = twin_params()
    adapted = jlora.apply(params, jlora.Spec({"o/kernel": jlora.LoRA(rank=3, init="mica")}),
                          key=jax.random.key(0))
    node = adapted["o"]["kernel"]
    w = f64(params["o"]["kernel"]).T  # PyTorch (out, in)
    u = np.linalg.svd(w, full_matrices=False)[0]
    np.testing.assert_allclose(sign_match(node.b.T, u[:, -3:], 0), u[:, -3:], atol=1e-5)
    assert not np.asarray(node.a).any()
    np.testing.assert_array_equal(jlora.merge(adapted)["o"]["kernel"], params["o"]["kernel"])
    trainable, frozen = jlora.split(adapted)
    assert trainable["o"]["kernel"].b is None and frozen["o"]["kernel"].b is not None

    def loss(t):
        return jnp.sum(run(jlora.merge(jlora.combine(t, frozen)), {"x": X}) ** 2)

    grads = jax.grad(loss)(trainable)
    stepped = jlora.combine(jax.tree.map(lambda t, d: t - 0.1 * d, trainable, grads), frozen)
    delta = f64(jlora.merge(stepped)["o"]["kernel"]) - f64(params["o"]["kernel"])
    # Only a trains: the update lies in the row space of the frozen minor directions.
    np.testing.assert_allclose(delta, delta @ f64(node.b).T @ f64(node.b), atol=1e-6)
    assert np.abs(delta).max() > 1e-4


@pytest.mark.parametrize("bad", [dict(init="mica", train_a=False), dict(init="orthogonal")])
def test_weight_only_inits_refuse_bad_options(bad):
    with pytest.raises(ValueError, match="init='(mica|orthogonal)'"):
        jlora.LoRA(rank=3, **bad)
    with pytest.raises(ValueError, match="mica"):
        jlora.DoRA(rank=2, init="mica")


@needs_torch
def test_mica_matches_peft_and_saves_to_peft(tmp_path):
    import peft

    params = twin_params()
    pm = peft_model(params, init_lora_weights="mica")
    adapted = jlora.apply(params, jlora.Spec({"{q,k,o}/kernel": jlora.LoRA(
        rank=R, alpha=8, init="mica")}), key=jax.random.key(0))
    for name, (big_a, big_b) in peft_factors(pm).items():
        node = adapted[name]["kernel"]
        np.testing.assert_allclose(sign_match(node.b.T, big_b, 0), big_b, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(node.a).T, big_a)
        assert not pm.base_model.model.get_submodule(name).lora_B.default.weight.requires_grad
    trained = perturb(adapted, size=0.2)
    jlora.peft.save(str(tmp_path), trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(torch_twin(params), str(tmp_path))
    np.testing.assert_allclose(torch_out(back, X), f64(run(jlora.merge(trained), {"x": X})),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- orthogonal


def test_orthogonal_factors_reference_and_identity():
    rng = np.random.default_rng(0)
    x, g1, g2 = rng.normal(size=(6, 6)), rng.normal(size=(10, 3)), rng.normal(size=(3, 7))
    a, b = jlora.methods.lora.orthogonal_factors(jnp.asarray(x, jnp.float32),
                                                 jnp.asarray(g1, jnp.float32),
                                                 jnp.asarray(g2, jnp.float32))
    q = np.linalg.qr(x)[0]
    np.testing.assert_allclose(f64(a), g1 @ q[0::2] / 10, atol=1e-5)
    np.testing.assert_allclose(f64(b), q[1::2].T @ g2 / 10, atol=1e-5)
    params = twin_params()
    adapted = jlora.apply(params, jlora.Spec({"q/kernel": jlora.LoRA(rank=6, init="orthogonal")}),
                          key=jax.random.key(3))
    node = adapted["q"]["kernel"]
    assert np.abs(f64(node.a) @ f64(node.b)).max() < 1e-6
    assert np.linalg.matrix_rank(f64(node.a), tol=1e-5) == 3
    assert np.linalg.matrix_rank(f64(node.b), tol=1e-5) == 3
    assert 0.05 < float(jnp.std(node.a)) < 0.2  # entries ~ N(0, 1/200): std 1/√200 ≈ 0.07
    np.testing.assert_allclose(f64(run(jlora.merge(adapted), {"x": X})),
                               f64(run(params, {"x": X})), atol=1e-6)
    with pytest.raises(ValueError, match="emb/embedding"):
        jlora.apply({"emb": {"embedding": jnp.ones((10, 4))}},
                    jlora.Spec({"emb/embedding": jlora.LoRA(rank=2, init="orthogonal")}),
                    key=jax.random.key(0))


@needs_torch
def test_orthogonal_matches_peft_on_its_draws(tmp_path):
    import peft
    import torch

    params = twin_params()
    pm = peft_model(params, init_lora_weights="orthogonal")
    layer = pm.base_model.model.q
    torch.manual_seed(7)
    layer.orthogonal_init("default")  # PEFT's own init, from the global torch RNG
    torch.manual_seed(7)  # the same three draws, in PEFT's order
    x, g1, g2 = torch.randn(R, R), torch.randn(D, R // 2), torch.randn(R // 2, D)
    a, b = jlora.methods.lora.orthogonal_factors(*(jnp.asarray(t.numpy()) for t in (x, g1, g2)))
    np.testing.assert_allclose(f64(a).T, layer.lora_A.default.weight.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(f64(b).T, layer.lora_B.default.weight.detach().numpy(), atol=1e-6)
    adapted = perturb(jlora.apply(params, jlora.Spec({"{q,k,o}/kernel": jlora.LoRA(
        rank=R, alpha=8, init="orthogonal")}), key=jax.random.key(0)), size=0.1)
    jlora.peft.save(str(tmp_path), adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(torch_twin(params), str(tmp_path))
    np.testing.assert_allclose(torch_out(back, X), f64(run(jlora.merge(adapted), {"x": X})),
                               rtol=1e-5, atol=1e-5)
