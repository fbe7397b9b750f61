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


# ---------------------------------------------------------------- Gemma layouts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tests._refs import f64, perturb  # noqa: E402

D, F, N, H, R = 6, 10, 2, 4, 2


class GatedMLP(nn.Module):
    """Gemma's FeedForward in either layout: ``transpose=False`` stores ``gating_einsum``
    ``(2, D, F)`` (Gemma 1, Gemma 2 2B, PaliGemma), ``True`` ``(2, F, D)`` (Gemma 2 9B/27B,
    Gemma 3)."""

    transpose: bool

    @nn.compact
    def __call__(self, x):
        if self.transpose:
            g = nn.Einsum((2, F, D), "BTD,CFD->CBTF", use_bias=False, name="gating_einsum")(x)
        else:
            g = nn.Einsum((2, D, F), "BTD,CDF->CBTF", use_bias=False, name="gating_einsum")(x)
        return nn.Einsum((F, D), "BTF,FD->BTD", use_bias=False, name="linear")(
            jax.nn.gelu(g[0]) * g[1])


class GemmaBlock(nn.Module):
    transpose: bool = False
    mha: bool = False  # Gemma 1 7B: one fused qkv_einsum, no q_einsum

    @nn.compact
    def __call__(self, x):
        if self.mha:
            q, k, v = nn.Einsum((3, N, D, H), "BTD,SNDH->SBTNH", use_bias=False,
                                name="qkv_einsum")(x)
        else:
            q = nn.Einsum((N, D, H), "BTD,NDH->BTNH", use_bias=False, name="q_einsum")(x)
            k, v = nn.Einsum((2, 1, D, H), "BSD,CKDH->CBSKH", use_bias=False,
                             name="kv_einsum")(x)
            k, v = jnp.repeat(k, N, axis=2), jnp.repeat(v, N, axis=2)
        probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k), axis=-1)
        enc = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        x = x + nn.Einsum((N, H, D), "BTNH,NHD->BTD", use_bias=False,
                          name="attn_vec_einsum")(enc)
        return x + GatedMLP(self.transpose, name="mlp")(x)


class Gemma(nn.Module):
    transpose: bool = False
    mha: bool = False

    @nn.compact
    def __call__(self, x):
        return GemmaBlock(self.transpose, self.mha, name="layer_0")(x)


def _gemma(transpose=False, mha=False):
    model = Gemma(transpose, mha)
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    params = model.init(jax.random.key(1), x)["params"]
    # Gemma's own code nests attention as ``attn``: rename the einsums' parent
    block = dict(params["layer_0"])
    block["attn"] = {k: block.pop(k) for k in list(block) if k.endswith("_einsum")}
    return model, x, params, {"layer_0": block}


def _gating_map(delta, axes):
    """The gating update as the layer's map ``D -> 2F`` (rows: the contracted D axis)."""
    return np.moveaxis(delta, axes[0], 0).reshape(D, 2 * F)


@pytest.mark.parametrize("transpose,axes", [(False, (1,)), (True, (2,))])
def test_gemma_gating_orientation_is_read_from_params(transpose, axes):
    model, x, params, _ = _gemma(transpose)
    kernel = "layer_0/mlp/gating_einsum/kernel"
    spec = jlora.presets.spec("gemma", "all-linear", jlora.LoRA(rank=R), params=params)
    assert spec.match(kernel).in_axes == axes
    # or given as Gemma's config flag; never assumed
    assert jlora.presets.spec("gemma", "all-linear", jlora.LoRA(rank=R),
                              transpose_gating_einsum=transpose).match(kernel).in_axes == axes
    # the einsum layers agree (resolve checks every kernel against its layer)
    ours = jlora.Spec([(r.pattern, r.config) for r in spec.rules if "attn" not in str(r.pattern)])
    resolved = jlora.linen.resolve(model, {"params": params}, x, spec=ours)
    assert resolved.match(kernel).in_axes == axes
    adapted = perturb(jlora.apply(params, ours, key=jax.random.key(2)), size=0.5)
    node = adapted["layer_0"]["mlp"]["gating_einsum"]["kernel"]
    assert node.a.shape == (D, R) and node.b.shape == (R, 2 * F)  # LoRA of the D -> 2F map
    delta = f64(jlora.merge(adapted)["layer_0"]["mlp"]["gating_einsum"]["kernel"]) - f64(node.base)
    assert np.linalg.matrix_rank(_gating_map(delta, axes), tol=1e-6) == R
    # merged kernel = the float64 formula; the fast path computes it factorized
    k = f64(node.base) + np.moveaxis(
        (node.scale * f64(node.a) @ f64(node.b)).reshape(D, 2, F), 0, axes[0])
    merged = jlora.merge(adapted)
    np.testing.assert_allclose(f64(merged["layer_0"]["mlp"]["gating_einsum"]["kernel"]), k,
                               rtol=1e-6, atol=1e-6)
    y = jlora.linen.apply(model, {"params": adapted}, x, strict=True)
    np.testing.assert_allclose(f64(y), f64(model.apply({"params": merged}, x)),
                               rtol=1e-5, atol=1e-5)


def test_gemma_gating_layout_errors_and_mixed_layouts():
    z = lambda *s: np.zeros(s, np.float32)
    cfg = jlora.LoRA(rank=R)
    with pytest.raises(ValueError, match="layer_0/mlp/gating_einsum has shape .*ambiguous"):
        jlora.presets.spec("gemma", "all-linear", cfg, params={"layer_0": {"mlp": {
            "gating_einsum": z(2, D, D), "linear": z(D, D)}}})
    with pytest.raises(ValueError, match="mlp/gating_einsum: .*d_model is unknown.*"
                                         "transpose_gating_einsum=True"):
        jlora.presets.spec("gemma", "all-linear", cfg, params={"mlp": {
            "gating_einsum": z(2, D, F)}})
    with pytest.raises(ValueError, match=r"shape \(3, 2, 6, 10\), not Gemma's"):
        jlora.presets.spec("gemma", "all-linear", cfg, params={"layers": {"mlp": {
            "gating_einsum": z(3, 2, D, F), "linear": z(3, F, D)}}})
    # d_model from the attention einsums when the MLP has no linear kernel beside it
    spec = jlora.presets.spec("gemma", "all-linear", cfg, params={
        "attn": {"q_einsum": {"w": z(N, D, H)}}, "mlp": {"gating_einsum": z(2, F, D)}})
    assert spec.match("mlp/gating_einsum").in_axes == (2,)
    # the flag settles what the shapes cannot (D == F, no d_model)
    for flag, axes in ((True, (2,)), (False, (1,))):
        for tree in ({"layer_0": {"mlp": {"gating_einsum": z(2, D, D), "linear": z(D, D)}}},
                     {"mlp": {"gating_einsum": z(2, D, F)}}):
            got = jlora.presets.spec("gemma", "all-linear", cfg, params=tree,
                                     transpose_gating_einsum=flag)
            assert got.match(next(p for p, _ in jlora.tree.leaves_with_paths(tree)
                                  if "gating" in p)).in_axes == axes
    # a config's own in_axes wins; Full needs none
    own = jlora.LoRA(rank=R, in_axes=(1,))
    assert jlora.presets.spec("gemma", "all-linear", own, params={"mlp": {
        "gating_einsum": z(2, D, D)}}).match("mlp/gating_einsum") == own
    # two layouts in one tree: each kernel gets its own
    mixed = {"a": {"mlp": {"gating_einsum": z(2, D, F), "linear": z(F, D)}},
             "b": {"mlp": {"gating_einsum": z(2, F, D), "linear": z(F, D)}}}
    spec = jlora.presets.spec("gemma", "all-linear", cfg, params=mixed)
    assert spec.match("a/mlp/gating_einsum").in_axes == (1,)
    assert spec.match("b/mlp/gating_einsum").in_axes == (2,)


def test_gemma_gating_layout_is_never_assumed():
    """Without params the (2, D, F) layout of Gemma 1 / Gemma 2 2B / PaliGemma used to get
    the (2, F, D) in_axes silently: a rank-R update of another matrix than D -> 2F."""
    model, x, params, _ = _gemma(transpose=False)  # (2, D, F)
    cfg = jlora.LoRA(rank=R)
    with pytest.raises(ValueError, match="gating_einsum is stored .*pass params=.*"
                                         "transpose_gating_einsum=True for .*False for"):
        jlora.presets.spec("gemma", "all-linear", cfg)
    # the flag gives the layer's D -> 2F map a rank-R update (float64 reference)
    spec = jlora.presets.spec("gemma", "all-linear", cfg, transpose_gating_einsum=False)
    ours = jlora.Spec([(r.pattern, r.config) for r in spec.rules if "attn" not in str(r.pattern)])
    adapted = perturb(jlora.apply(params, ours, key=jax.random.key(2)), size=0.5)
    node = adapted["layer_0"]["mlp"]["gating_einsum"]["kernel"]
    assert node.in_axes == (1,) and node.a.shape == (D, R) and node.b.shape == (R, 2 * F)
    k = f64(node.base) + np.moveaxis(
        (node.scale * f64(node.a) @ f64(node.b)).reshape(D, 2, F), 0, 1)
    merged = f64(jlora.merge(adapted)["layer_0"]["mlp"]["gating_einsum"]["kernel"])
    np.testing.assert_allclose(merged, k, rtol=1e-6, atol=1e-6)
    assert np.linalg.matrix_rank(_gating_map(merged - f64(node.base), (1,)), tol=1e-6) == R
    # params and a contradicting flag: an error naming the kernel
    with pytest.raises(ValueError, match=r"transpose_gating_einsum=True says \(2, hidden, "
                                         r"d_model\), but layer_0/mlp/gating_einsum/kernel"):
        jlora.presets.spec("gemma", "all-linear", cfg, params=params, transpose_gating_einsum=True)
    # nothing to orient, or no gating kernel targeted: no layout needed
    assert jlora.presets.spec("gemma", "all-linear", jlora.Full()).match(
        "layer_0/mlp/gating_einsum") == jlora.Full()
    assert jlora.presets.spec("gemma", "all-linear", jlora.LoRA(rank=R, in_axes=(1,))).match(
        "layer_0/mlp/gating_einsum").in_axes == (1,)
    assert jlora.presets.spec("gemma", "attention", cfg).match("mlp/gating_einsum") is None
    with pytest.raises(ValueError, match="transpose_gating_einsum must be a bool"):
        jlora.presets.spec("gemma", "all-linear", cfg, transpose_gating_einsum=1)
    with pytest.raises(ValueError, match="transpose_gating_einsum is Gemma's .*'llama'"):
        jlora.presets.spec("llama", "all-linear", cfg, transpose_gating_einsum=True)


@pytest.mark.parametrize("targets", ["qv", "attention"])
def test_gemma_preset_fits_mha_and_gqa_attention(targets):
    for mha, want in [(True, {"qkv_einsum": (2,)}),
                      (False, {"q_einsum": (1,), "kv_einsum": (2,)})]:
        if targets == "attention":
            want = dict(want, attn_vec_einsum=(0, 1))
        model, x, params, named = _gemma(mha=mha)
        spec = jlora.presets.spec("gemma", targets, jlora.LoRA(rank=R))
        adapted = jlora.apply(named, spec, key=jax.random.key(2))
        got = {p.split("/")[2]: n.in_axes for p, n in jlora.tree.leaves_with_paths(adapted)
               if jlora.is_node(n)}
        assert got == want
        # the same axes as the layers contract (model paths: no "attn/" level)
        plain = jlora.Spec([(r.pattern.replace("/attn/", "/"), r.config) for r in spec.rules])
        resolved = jlora.linen.resolve(model, {"params": params}, x, spec=plain)
        assert {name: resolved.match(f"layer_0/{name}/kernel").in_axes for name in want} == want


# ---------------------------------------------------------------- heads


def test_head_configs_take_the_kernels_they_can_adapt():
    z = lambda *s: np.zeros(s, np.float32)
    params = {"bert": {"encoder": {"layer": {"0": {"attention": {"self": {
        "query": {"kernel": z(8, 8)}, "value": {"kernel": z(8, 8)}}}}}}},
        "classifier": {"kernel": z(8, 3), "bias": z(3)}}
    lora = jlora.apply(params, jlora.presets.spec("bert", "qv", jlora.LoRA(rank=2),
                                                  head=jlora.LoRA(rank=2)), key=jax.random.key(0))
    assert jlora.is_node(lora["classifier"]["kernel"])
    assert not jlora.is_node(lora["classifier"]["bias"])
    full = jlora.apply(params, jlora.presets.spec("bert", "qv", head=jlora.Full()),
                       key=jax.random.key(0))
    assert jlora.is_node(full["classifier"]["bias"]) and jlora.is_node(full["classifier"]["kernel"])
    tied = {"transformer": {"wte": {"embedding": z(40, 8)}, "h": {"0": {"attn": {
        "c_attn": {"kernel": z(24, 8)}}}}}}
    with pytest.raises(ValueError, match="no gpt2 leaf matches 'lm_head/kernel'.*"
                                         "'transformer/wte/embedding'"):
        jlora.presets.spec("gpt2", "qv", head=jlora.Full(), params=tied)
    with pytest.raises(ValueError, match="head must be a jlora method config"):
        jlora.presets.spec("gpt2", "qv", head={"rank": 2})
