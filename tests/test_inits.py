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
    """Anisotropic inputs (feature j scaled by 0.3^j) with some padded positions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        x = rng.normal(size=(batch, seq, D)) * 0.3 ** np.arange(D)
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


def saved_loads_equal(tmp_path, adapted, params, *, rtol):
    """Save ``adapted`` with jlora.peft.save, load it with PEFT onto the torch twin and
    check PEFT's outputs equal the merged jlora model's; returns PEFT's model."""
    import peft

    jlora.peft.save(str(tmp_path), adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(torch_twin(params), str(tmp_path))
    np.testing.assert_allclose(torch_out(back, X), f64(run(jlora.merge(adapted), {"x": X})),
                               rtol=rtol, atol=1e-5)
    return back


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
        back = peft.PeftModel.from_pretrained(torch_twin(params), str(tmp_path),
                                              is_trainable=True)
    assert back.peft_config["default"].init_lora_weights == "mica"  # PEFT keeps B frozen
    assert not back.base_model.model.q.lora_B.default.weight.requires_grad
    assert back.base_model.model.q.lora_A.default.weight.requires_grad
    np.testing.assert_allclose(torch_out(back, X), f64(run(jlora.merge(trained), {"x": X})),
                               rtol=1e-5, atol=1e-5)
    loaded = jlora.peft.load(str(tmp_path), params)  # and back: b frozen again in jlora
    assert loaded["q"]["kernel"].trainable == ("a",)
    np.testing.assert_allclose(loaded["q"]["kernel"].b, trained["q"]["kernel"].b, atol=1e-7)


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
    saved_loads_equal(tmp_path, adapted, params, rtol=1e-5)


# ---------------------------------------------------------------- EVA


def ipca_ref(batches_rows, k):
    """float64 scikit-learn-style incremental PCA: components after each partial fit."""
    mean = var = comps = sv = None
    n = 0
    history = []
    for x in batches_rows:
        nb = x.shape[0]
        mb = x.mean(0)
        if comps is None:
            stack, mean, var, n = x - mb, mb, x.var(0), nb
        else:
            tot = n + nb
            new_mean = (mean * n + mb * nb) / tot
            var = (var * n + ((x - mb) ** 2).sum(0) + n * nb / tot * (mean - mb) ** 2) / tot
            stack = np.vstack([sv[:, None] * comps, x - mb, np.sqrt(n * nb / tot) * (mean - mb)])
            mean, n = new_mean, tot
        _, s, vt = np.linalg.svd(stack, full_matrices=False)
        vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
        comps, sv = vt[:k], s[:k]
        history.append((comps, s[:k] ** 2 / (var * n).sum()))
    return history


def test_ipca_update_matches_float64_reference_with_masked_rows():
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=(20, 6)) * 0.6 ** np.arange(6) for _ in range(3)]
    masks = [rng.random(20) > 0.3 for _ in range(3)]
    ref = ipca_ref([r[m] for r, m in zip(rows, masks)], 3)
    state = None
    for (r, m), (comps, evr) in zip(zip(rows, masks), ref):
        state, ratio, _ = jlora.init.ipca_update(state, jnp.asarray(r, jnp.float32),
                                                 jnp.asarray(m), k=3)
        np.testing.assert_allclose(f64(state.components), comps, atol=2e-5)
        np.testing.assert_allclose(f64(ratio), evr, rtol=1e-4)


def test_eva_ranks_pool_and_swap_within_shared_group():
    evr = {"p": np.array([.5, .3, .1, .05]), "r": np.array([.45, .2, .01, .0])}
    # q shares p's PCA; budget 6 from p,q,r (each max 4 components)
    got = jlora.init.eva_ranks(evr, {"p": "p", "r": "r", "q": "p"}, 6, {"p": 4, "q": 4, "r": 4})
    assert got == {"p": 2, "r": 2, "q": 2}
    got = jlora.init.eva_ranks(evr, {"p": "p", "r": "r", "q": "p"}, 3, {"p": 4, "q": 4, "r": 4})
    assert got == {"p": 1, "r": 1, "q": 1}
    # the owner of a shared PCA takes the larger rank of its group
    got = jlora.init.eva_ranks({"p": np.array([.5, .4]), "q": np.array([.3, .2])},
                               {"p": "p", "q": "q", "s": "q"}, 3, {"p": 2, "q": 2, "s": 2})
    assert got == {"p": 2, "q": 1, "s": 0}



def test_eva_ranks_respect_each_layers_cap():
    # n can hold 2 components (min(fan_in, fan_out) = 2): the budget's rest goes to w
    evr = {"w": np.array([.5, .2, .1, .05]), "n": np.array([.6, .4, .3, .2])}
    got = jlora.init.eva_ranks(evr, {"w": "w", "n": "n"}, 4, {"w": 4, "n": 2})
    assert got == {"w": 2, "n": 2}  # pool .6n .5w .4n .2w (.3n, .2n over n's cap)
    assert jlora.init.eva_ranks(evr, {"w": "w", "n": "n"}, 4, {"w": 4, "n": 4}) == {
        "w": 1, "n": 3}
    # a capped owner does not take a member's larger rank
    evr = {"p": np.array([.5, .4, .3, .2])}
    got = jlora.init.eva_ranks(evr, {"p": "p", "q": "p"}, 3, {"p": 1, "q": 4})
    assert got == {"p": 1, "q": 2}  # pool .5p .5q .4q: no swap past p's cap of 1


class WideNarrow(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="narrow")(nn.Dense(16, name="wide")(x))


def test_eva_never_gives_a_layer_more_rank_than_its_kernel_allows():
    model = WideNarrow()
    params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    rng = np.random.default_rng(0)
    k = np.zeros((16, 16), np.float32)
    k[:4, :4] = 5 * np.eye(4)
    params["wide"]["kernel"] = jnp.asarray(k + 0.01 * rng.normal(size=(16, 16)), jnp.float32)
    xs = [jnp.asarray(rng.normal(size=(64, 16)), jnp.float32) for _ in range(6)]
    spec = jlora.Spec({"*/kernel": jlora.LoRA(rank=2)})
    ours = jlora.init.eva(params, spec, xs, lambda p, x: model.apply({"params": p}, x),
                          rho=2.0, tau=0.9)
    ranks = {n: ours[n]["kernel"].rank if jlora.is_node(ours[n]["kernel"]) else 0
             for n in ("wide", "narrow")}
    assert ranks["narrow"] <= 2 and sum(ranks.values()) == 4  # the whole budget is used
    for n, r in ranks.items():  # a rank jlora.apply itself accepts for that kernel
        if r:
            jlora.apply(params, jlora.Spec({f"{n}/kernel": jlora.LoRA(rank=r)}),
                        key=jax.random.key(0))


def _dense():
    model = nn.Dense(6)
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    return params, lambda p, x: model.apply({"params": p}, x)


@pytest.mark.parametrize("method,kw,match", [
    ("eva", dict(progress=3), r"jlora.init.eva: progress must be None or callable, got 3"),
    ("eva", dict(mask_fn=3), r"jlora.init.eva: mask_fn must be None or callable"),
    ("eva", dict(label_mask_value="x"), r"jlora.init.eva: label_mask_value must be an int"),
    ("eva", dict(label_mask_value=-100.0), r"jlora.init.eva: label_mask_value must be an int"),
    ("eva", dict(label_mask_value=True), r"jlora.init.eva: label_mask_value must be an int"),
    ("corda", dict(progress="x"), r"jlora.init.corda: progress must be None or callable"),
    ("lora_ga", dict(progress=[]), r"jlora.init.lora_ga: progress must be None or callable"),
], ids=["eva-progress", "eva-mask_fn", "eva-label-str", "eva-label-float", "eva-label-bool",
        "corda-progress", "lora_ga-progress"])
def test_init_options_are_checked_before_any_batch_runs(method, kw, match):
    params, fwd = _dense()
    spec = jlora.Spec({"kernel": jlora.LoRA(rank=2)})
    calls = []

    def counted(p, x):
        calls.append(1)
        return fwd(p, x)

    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(3)]
    with pytest.raises(ValueError, match=match):
        if method == "lora_ga":
            jlora.init.lora_ga(params, spec, lambda p, b: jnp.mean(counted(p, b) ** 2), xs, **kw)
        else:
            getattr(jlora.init, method)(params, spec, xs, counted, **kw)
    assert not calls


@pytest.mark.parametrize("method", ["eva", "corda"])
def test_a_batch_the_model_cannot_run_is_named(method):
    params, fwd = _dense()
    xs = [jax.random.normal(jax.random.key(0), (16, 8)), jnp.ones((16, 7))]
    with pytest.raises(ValueError, match=rf"jlora.init.{method}: apply_fn\(params, batch\) "
                                         r"failed on calibration batch #2 \(ScopeParamShape"):
        getattr(jlora.init, method)(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}), xs, fwd)


@pytest.mark.parametrize("loss,what", [
    (lambda out: out, r"shape \(16, 6\) and dtype float32"),
    (lambda out: jnp.sum(out > 0), r"shape \(\) and dtype int32"),
    (lambda out: jnp.mean(out ** 2)[None], r"shape \(1,\)"),
], ids=["vector", "int", "one-element"])
def test_lora_ga_loss_must_be_a_float_scalar(loss, what):
    params, fwd = _dense()
    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
    want = r"jlora.init.lora_ga: loss_fn\(params, batch\) must return the loss as a "
    with pytest.raises(ValueError, match=want + r"floating-point scalar, got " + what):
        jlora.init.lora_ga(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
                           lambda p, b: loss(fwd(p, b)), xs)


@pytest.mark.parametrize("method", ["eva", "corda", "lora_ga"])
@pytest.mark.parametrize("as_array", [jnp.asarray, np.asarray], ids=["jax", "numpy"])
def test_one_array_as_batches_is_refused(method, as_array):
    # iterating it would make each of its 3 samples a batch of its own
    params, fwd = _dense()
    x = as_array(jax.random.normal(jax.random.key(1), (3, 5, 8)))
    spec = jlora.Spec({"kernel": jlora.LoRA(rank=2)})
    with pytest.raises(ValueError, match=rf"jlora.init.{method}: batches must be an iterable of "
                                         r"batches, got one array of shape \(3, 5, 8\); pass a "
                                         r"list of batches \(wrap a single batch x as \[x\]\)"):
        if method == "lora_ga":
            jlora.init.lora_ga(params, spec, lambda p, b: jnp.mean(fwd(p, b) ** 2), x)
        else:
            getattr(jlora.init, method)(params, spec, x, fwd)

@needs_torch
def test_eva_matches_peft_ranks_factors_and_files(tmp_path):
    import peft

    params, batches = twin_params(), data()
    steps = []
    ours = jlora.init.eva(params, SPEC, batches, run, tau=0.95,
                          progress=lambda step, total: steps.append((step, total)))
    assert steps and steps[-1] == (len(steps), None)
    pm = peft_model(params, init_lora_weights="eva", eva_config=peft.EvaConfig(tau=0.95))
    peft.initialize_lora_eva_weights(  # PEFT's default rows, from the attention mask
        pm, torch_batches(batches), show_progress_bar=False, forward_fn=lambda m, b: m(b["x"]),
        prepare_model_inputs_fn=lambda b, _: b["attention_mask"].bool().nonzero())
    config = pm.peft_config["default"]
    theirs = peft_factors(pm)
    ranks = {n: (ours[n]["kernel"].rank if jlora.is_node(ours[n]["kernel"]) else 0)
             for n in ("q", "k", "o")}
    assert ranks == {n: config.rank_pattern.get(n, R) if n in theirs else 0
                     for n in ("q", "k", "o")}
    assert sum(ranks.values()) == 3 * R and len(set(ranks.values())) > 1  # redistributed
    for name, (big_a, big_b) in theirs.items():
        node = ours[name]["kernel"]
        np.testing.assert_allclose(f64(node.a).T, big_a, atol=1e-4)  # same svd_flip signs
        assert not big_b.any() and not np.asarray(node.b).any()
        assert node.scale == pytest.approx(8 / R)  # alpha_l = alpha·rank_l/r keeps s
        assert node.config.alpha == config.alpha_pattern.get(name, 8)
    np.testing.assert_array_equal(jlora.merge(ours)["q"]["kernel"], params["q"]["kernel"])
    trained = perturb(ours, size=0.2)
    saved_loads_equal(tmp_path, trained, params, rtol=1e-5)


# ---------------------------------------------------------------- CorDA


def corda_ref(w, xs, r, s, mode):
    """float64 CorDA from the formulas: covariance, damping, SVD of W·C, IPM/KPM split."""
    cov = sum((x / abs(x.max())).T @ (x / abs(x.max())) for x in xs) / len(xs)
    damp = 0.01
    while True:
        fixed = cov + np.eye(len(cov)) * np.mean(np.diag(cov)) * damp
        inv = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inv - np.eye(len(cov))) < 0.05:
            break
        damp *= 2
    u, sv, vh = np.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).T
    sl = slice(None, r) if mode == "ipm" else slice(len(sv) - r, None)
    root = np.sqrt(sv[sl] / s)
    return (v[:, sl] * root).T, u[:, sl] * root, cov  # A, B (PyTorch layout), C


@needs_torch
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_reference_and_peft(mode, tmp_path):
    import peft
    import torch
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    params = twin_params()
    samples = [{"x": b["x"][i:i + 1]} for b in data(2) for i in range(3)]  # one per call
    ours = jlora.init.corda(params, SPEC, samples, run, mode=mode)
    xs = [f64(b["x"][0]) for b in samples]
    big_a, big_b, _ = corda_ref(f64(params["q"]["kernel"]).T, xs, R, 2.0, mode)
    node = ours["q"]["kernel"]
    np.testing.assert_allclose(sign_match(node.a, big_a.T, 0), big_a.T, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(f64(node.b).T @ f64(node.a).T, big_b @ big_a, rtol=1e-3,
                               atol=1e-4)
    for name in ("q", "k", "o"):  # merged = original weights at init; base = residual
        np.testing.assert_allclose(jlora.merge(ours)[name]["kernel"], params[name]["kernel"],
                                   atol=2e-5)
    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q", "k", "o"],
                             init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    tm = torch_twin(params)

    def run_model():
        for b in samples:
            tm(torch.tensor(b["x"]))

    preprocess_corda(tm, config, run_model=run_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tm, config)
    for name, (pa, pb) in peft_factors(pm).items():
        node = ours[name]["kernel"]
        np.testing.assert_allclose(f64(node.b).T @ f64(node.a).T, f64(pb) @ f64(pa), rtol=1e-4,
                                   atol=1e-4)
        # base = W - BA on each side carries its float32 product's error, so the same
        # relative budget as the factors against the float64 reference (1e-3)
        np.testing.assert_allclose(f64(node.base).T, peft_weight(pm, name), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(torch_out(pm, X), f64(run(params, {"x": X})), atol=1e-4)
    if mode == "kpm":
        return
    trained = perturb(ours, size=0.2)  # saved as a plain LoRA for the original weights
    saved_loads_equal(tmp_path, trained, params, rtol=1e-4)


# ---------------------------------------------------------------- LoRA-GA


def mse(p, batch):
    return jnp.mean((run(p, batch) - batch["y"]) ** 2)


def ga_batches():
    out = data(3, seed=4)
    for i, b in enumerate(out):
        b["y"] = np.random.default_rng(i).normal(size=b["x"].shape[:-1] + (O,)).astype(np.float32)
        del b["attention_mask"]
    return out


def ga_grad_ref(params, batches):
    """float64 mean gradient of the MSE with respect to o's kernel, by hand."""
    g = 0.0
    for b in batches:
        x = f64(b["x"])
        h = np.tanh((x @ f64(params["q"]["kernel"]) + f64(params["q"]["bias"]))
                    * (x @ f64(params["k"]["kernel"]) + f64(params["k"]["bias"])))
        err = h @ f64(params["o"]["kernel"]) + f64(params["o"]["bias"]) - f64(b["y"])
        g = g + h.reshape(-1, D).T @ (2 * err / err.size).reshape(-1, O) / len(batches)
    return g


def test_lora_ga_factors_match_float64_reference():
    params, batches = twin_params(), ga_batches()
    u, sv, vh = np.linalg.svd(ga_grad_ref(params, batches).T, full_matrices=False)  # (out, in)
    w1 = np.linalg.svd(f64(params["o"]["kernel"]), compute_uv=False)[0]
    want = {  # (A, B) in PyTorch layout, from the formulas of each direction and scale
        ("ArB2r", "stable"): (vh[:R], u[:, R:2 * R] * sv[R:2 * R] * O ** 0.25 / 4),
        ("A2rBr", "weight_svd"): (vh[R:2 * R], u[:, :R] * sv[:R] * w1 / sv[0]),
        ("ArBr", "gd_scale"): (vh[1:2 * R:2] / 2, u[:, 0:2 * R:2] * sv[0:2 * R:2] / 2),
        ("ArBr", "unit"): (vh[1:2 * R:2], u[:, 0:2 * R:2] * sv[0:2 * R:2]),
    }
    for (direction, scale), (big_a, big_b) in want.items():
        ours = jlora.init.lora_ga(params, SPEC, mse, batches, direction=direction, scale=scale)
        node = ours["o"]["kernel"]
        np.testing.assert_allclose(np.abs(f64(node.a).T), np.abs(big_a), atol=2e-4)
        np.testing.assert_allclose(np.abs(f64(node.b).T), np.abs(big_b), rtol=1e-3,
                                   atol=1e-3 * np.abs(big_b).max())
        np.testing.assert_allclose(f64(node.base) + 2.0 * f64(node.a0) @ f64(node.b0),
                                   f64(params["o"]["kernel"]), atol=1e-6)
    rand = jlora.init.lora_ga(params, SPEC, mse, batches, direction="random",
                              key=jax.random.key(1))["o"]["kernel"]
    # random: one index set idx for both factors, so B·A = U_idx·S_idx·Vᴴ_idx·c (c = stable)
    ba = f64(rand.b).T @ f64(rand.a).T
    s_idx = np.linalg.svd(ba, compute_uv=False)[:R] / (O ** 0.25 / 4)
    assert all(np.isclose(sv[:2 * R], x, rtol=1e-3).any() for x in s_idx)


@pytest.mark.parametrize("method", ["corda", "lora_ga"])
def test_residual_base_is_taken_from_the_stored_bf16_factors(method):
    # bf16 factors on a float32 kernel: base + s·a·b must still be the kernel
    params = twin_params()
    spec = jlora.Spec({"{q,k,o}/kernel": jlora.LoRA(rank=R, alpha=8, dtype=jnp.bfloat16)})
    ours = (jlora.init.corda(params, spec, data(2), run) if method == "corda"
            else jlora.init.lora_ga(params, spec, mse, ga_batches(), scale="weight_svd"))
    for name in ("q", "k", "o"):
        node, w = ours[name]["kernel"], f64(params[name]["kernel"])
        assert node.a.dtype == node.b.dtype == jnp.bfloat16 and node.base.dtype == jnp.float32
        np.testing.assert_array_equal(f64(node.a0), f64(node.a))
        # s = alpha / rank = 2; float32 rounding of W and of the residual's product only
        np.testing.assert_allclose(f64(node.base) + 2.0 * f64(node.a) @ f64(node.b), w,
                                   rtol=0, atol=1e-6, err_msg=name)
        assert np.abs(f64(node.a) @ f64(node.b)).max() > 1e-2  # the factors are not 0
    # the adapted forward at init is the base model's (float64 reference of Twin)
    x = f64(X)
    lin = lambda n, h: h @ f64(params[n]["kernel"]) + f64(params[n]["bias"])
    want = lin("o", np.tanh(lin("q", x) * lin("k", x)))
    got = jlora.linen.apply(Twin(), {"params": ours}, X)
    np.testing.assert_allclose(f64(got), want, rtol=0, atol=1e-5)


@needs_torch
def test_lora_ga_matches_peft(tmp_path):
    import peft
    import torch
    from peft.tuners.lora.loraga import preprocess_loraga

    params, batches = twin_params(), ga_batches()
    for direction, scale in [("ArB2r", "stable"), ("ArBr", "gd_scale"), ("A2rBr", "weight_svd")]:
        ours = jlora.init.lora_ga(params, SPEC, mse, batches, direction=direction, scale=scale)
        config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q", "k", "o"],
                                 init_lora_weights="lora_ga",
                                 lora_ga_config=peft.LoraGAConfig(direction=direction,
                                                                  scale=scale))
        tm = torch_twin(params)

        def train_step():
            for b in batches:
                out = tm(torch.tensor(b["x"]))
                torch.mean((out - torch.tensor(b["y"])) ** 2).backward()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preprocess_loraga(tm, config, train_step)
            pm = peft.get_peft_model(tm, config)
        for name, (pa, pb) in peft_factors(pm).items():
            n = ours[name]["kernel"]
            np.testing.assert_allclose(np.abs(f64(n.a).T), np.abs(pa), atol=2e-4, err_msg=name)
            # weight_svd: PEFT estimates σ₁(W) by an unseeded svd_lowrank(q=r): ~0.1% noise
            tol = 1e-2 if scale == "weight_svd" else 1e-4
            np.testing.assert_allclose(np.abs(f64(n.b).T), np.abs(pb), rtol=tol,
                                       atol=tol * np.abs(pb).max(), err_msg=name)
        np.testing.assert_allclose(torch_out(pm, X), f64(run(params, {"x": X})), atol=1e-5)
    trained = perturb(ours, size=0.2)  # saved as a plain LoRA for the original weights
    back = saved_loads_equal(tmp_path, trained, params, rtol=1e-4)
    assert back.peft_config["default"].r == 2 * R
