"""compose.to_lora: any adapter or dense delta -> LoRA by truncated SVD (float64 numpy, PEFT)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64

PARAMS = {"q": {"kernel": jax.random.normal(jax.random.key(0), (12, 10)), "bias": jnp.zeros(10)},
          "v": {"kernel": jax.random.normal(jax.random.key(1), (10, 8)), "bias": jnp.zeros(8)}}


def np_truncated(delta, k):
    """float64: best rank-k approximation and relative error of a (fan_in, fan_out) delta."""
    u, s, vt = np.linalg.svd(f64(delta), full_matrices=False)
    approx = (u[:, :k] * s[:k]) @ vt[:k]
    return approx, s, np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2))


def randomized(adapted, seed=3):
    """Non-trivial values in every array field but the base."""
    def bump(node):
        fields = {}
        for i, (name, x) in enumerate(vars(node).items()):
            if name in ("base", "config", "shape", "in_axes") or not hasattr(x, "shape") \
                    or not jnp.issubdtype(x.dtype, jnp.floating):
                continue
            fields[name] = x + 0.5 * jax.random.normal(jax.random.key(seed + i), x.shape, x.dtype)
        return node.replace(**fields)
    return jax.tree.map(lambda x: bump(x) if jlora.is_node(x) else x, adapted,
                        is_leaf=jlora.is_node)


@pytest.mark.parametrize("config", [jlora.DoRA(rank=4, alpha=8), jlora.VeRA(rank=6),
                                    jlora.AdaLoRA(init_rank=4, target_rank=2), jlora.LoRA(rank=3, init="pissa"),
                                    jlora.GLoRA(rank=2)])
def test_adapters_against_numpy_truncated_svd(config):
    adapted = randomized(jlora.apply(PARAMS, jlora.Spec({"q/kernel": config}),
                                     key=jax.random.key(2)))
    lora, errors = jlora.compose.to_lora(adapted, 3)
    for name in ("q",):
        node, new = adapted[name]["kernel"], lora[name]["kernel"]
        assert type(new) is jlora.methods.LoRANode and new.rank == 3 and new.scale == 1.0
        approx, s, err = np_truncated(node.delta(), 3)
        np.testing.assert_allclose(f64(new.delta()), approx, rtol=1e-4, atol=1e-4 * s[0])
        assert errors[f"{name}/kernel"] == pytest.approx(err, rel=1e-4, abs=1e-6)
        # S on b (PEFT's lora_B = U·S): a has orthonormal columns, b's row norms are S_k
        np.testing.assert_allclose(f64(new.a).T @ f64(new.a), np.eye(3), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(f64(new.b), axis=1), s[:3], rtol=1e-4)
        # merged on the weight the adapter's delta is measured against
        np.testing.assert_allclose(f64(jlora.merge(lora)[name]["kernel"]),
                                   f64(jlora.merge(adapted)[name]["kernel"]) - f64(node.delta())
                                   + approx, rtol=1e-4, atol=1e-4)
    assert lora["q"]["bias"] is adapted["q"]["bias"]  # plain leaves and GLoRA's bias node kept
    assert sorted(errors) == ["q/kernel"] and lora["v"]["kernel"] is adapted["v"]["kernel"]


def test_full_rank_is_exact_and_dense_delta_with_base():
    delta = {"q": {"kernel": jax.random.normal(jax.random.key(4), (12, 10))}}
    lora, errors = jlora.compose.to_lora(delta, 10, base={"q": {"kernel": PARAMS["q"]["kernel"]}})
    np.testing.assert_allclose(f64(lora["q"]["kernel"].delta()), f64(delta["q"]["kernel"]),
                               atol=1e-4)
    assert errors["q/kernel"] < 1e-6
    np.testing.assert_allclose(f64(jlora.merge(lora)["q"]["kernel"]),
                               f64(PARAMS["q"]["kernel"]) + f64(delta["q"]["kernel"]), atol=1e-4)
    lora0, _ = jlora.compose.to_lora(delta, 2)  # no base: zeros, delta still exact
    assert float(jnp.abs(lora0["q"]["kernel"].base).max()) == 0.0


def test_energy_threshold_picks_peft_rank():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(12, 8)))
    v, _ = np.linalg.qr(rng.normal(size=(10, 8)))
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    delta = {"w": {"kernel": jnp.asarray((u * s) @ v.T, jnp.float32)}}
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    for tau in (0.5, 0.9, 0.99, 1.0):
        want = int(np.argmax(energy >= tau * (1 - 1e-7))) + 1
        lora, errors = jlora.compose.to_lora(delta, tau)
        assert lora["w"]["kernel"].rank == want, tau
        assert errors["w/kernel"] == pytest.approx(np.sqrt(1 - energy[want - 1]), abs=1e-3)


@pytest.mark.parametrize("rank, match", [(0, "rank"), (1.5, "rank"), (True, "rank"),
                                         (11, "exceeds"), ("4", "rank")])
def test_bad_ranks(rank, match):
    with pytest.raises(ValueError, match=match):
        jlora.compose.to_lora({"q": {"kernel": PARAMS["q"]["kernel"]}}, rank)


def test_bad_trees():
    with pytest.raises(ValueError, match="q/bias.*shape"):
        jlora.compose.to_lora({"q": {"bias": jnp.ones(4)}}, 1)
    bottleneck = jlora.apply(PARAMS, jlora.Spec({"q": jlora.AdaptFormer(bottleneck=2)}),
                             key=jax.random.key(0))
    with pytest.raises(ValueError, match="q.*no delta"):
        jlora.compose.to_lora(bottleneck, 2)
    adapted = jlora.apply(PARAMS, jlora.Spec({"q/kernel": jlora.LoRA(rank=2)}),
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match="combine"):
        jlora.compose.to_lora(jlora.split(adapted)[0], 2)
    with pytest.raises(ValueError, match="q/kernel.*base"):
        jlora.compose.to_lora({"q": {"kernel": jnp.ones((4, 3))}}, 1, base={"v": jnp.ones(3)})


def test_matches_peft_convert_to_lora():
    """PEFT's conversion of a LoHa layer and jlora's of the same dense ΔW: S, k, B·A."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.conversion import convert_to_lora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(10, 12)

        def forward(self, x):
            return self.fc1(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoHaConfig(r=4, alpha=4, target_modules=["fc1"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hada" in n:
                p.copy_(torch.randn_like(p))
    layer = model.base_model.model.fc1
    dw = layer.get_delta_weight("default").detach().numpy()  # (out, in)
    for rank in (3, 0.8):
        cfg, sd = convert_to_lora(model, rank)
        a_t = next(v for k, v in sd.items() if "lora_A" in k).numpy()
        b_t = next(v for k, v in sd.items() if "lora_B" in k).numpy()
        lora, _ = jlora.compose.to_lora({"fc1": {"kernel": jnp.asarray(dw.T)}}, rank)
        node = lora["fc1"]["kernel"]
        assert node.rank == a_t.shape[0] and node.scale == cfg.lora_alpha / cfg.r == 1.0
        np.testing.assert_allclose(f64(node.b).T @ f64(node.a).T, f64(b_t) @ f64(a_t),
                                   rtol=1e-5, atol=1e-5 * np.abs(dw).max())
        np.testing.assert_allclose(np.linalg.norm(f64(node.b), axis=1),
                                   np.linalg.norm(f64(b_t), axis=0), rtol=1e-5)


def test_full_heads_are_kept_whole_as_peft_modules_to_save(tmp_path):
    """A Full() head (PEFT's modules_to_save) stays whole, bit for bit, beside converted
    layers; PEFT's convert_to_lora copies modules_to_save whole the same way."""
    params = {"fc1": {"kernel": PARAMS["q"]["kernel"][:10, :], "bias": jnp.zeros(10)},
              "head": {"kernel": jnp.zeros((10, 3)), "bias": jnp.zeros(3)}}
    spec = jlora.Spec({"fc1/kernel": jlora.DoRA(rank=4, alpha=8), "head/*": jlora.Full()})
    adapted = randomized(jlora.apply(params, spec, key=jax.random.key(5)))
    lora, errors = jlora.compose.to_lora(adapted, 2)
    for leaf in ("kernel", "bias"):
        kept = lora["head"][leaf]
        assert type(kept) is jlora.methods.FullNode
        np.testing.assert_array_equal(np.asarray(kept.value),
                                      np.asarray(adapted["head"][leaf].value))
        np.testing.assert_array_equal(np.asarray(jlora.merge(lora)["head"][leaf]),
                                      np.asarray(adapted["head"][leaf].value))
    assert sorted(errors) == ["fc1/kernel"]  # only converted layers are reported
    approx, s, err = np_truncated(adapted["fc1"]["kernel"].delta(), 2)
    np.testing.assert_allclose(f64(lora["fc1"]["kernel"].delta()), approx, rtol=1e-4,
                               atol=1e-4 * s[0])
    # the truncation error is the discarded singular values'
    assert errors["fc1/kernel"] == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)),
                                                 rel=1e-4)
    assert errors["fc1/kernel"] == pytest.approx(err, rel=1e-4)

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.conversion import convert_to_lora
    from safetensors.numpy import load_file

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.head = torch.nn.Linear(10, 10), torch.nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.fc1(x))

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoHaConfig(r=4, alpha=4, target_modules=["fc1"],
                                                         modules_to_save=["head"]))
    with torch.no_grad():  # the trained head: jlora's values
        wrapped = model.base_model.model.head.modules_to_save["default"]
        wrapped.weight.copy_(torch.from_numpy(np.array(adapted["head"]["kernel"].value).T))
        wrapped.bias.copy_(torch.from_numpy(np.array(adapted["head"]["bias"].value)))
    cfg, sd = convert_to_lora(model, 2)
    assert list(cfg.modules_to_save) == ["head"]
    jlora.peft.save(str(tmp_path), lora)
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, value in (("weight", lora["head"]["kernel"].value.T),
                        ("bias", lora["head"]["bias"].value)):
        theirs = next(v for k, v in sd.items() if k.endswith(f"head.{name}")).numpy()
        mine = next(v for k, v in ours.items() if k.endswith(f"head.{name}"))
        np.testing.assert_array_equal(theirs, np.asarray(value))
        np.testing.assert_array_equal(mine, theirs)
