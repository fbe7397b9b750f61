"""AdaptFormer: float64 numpy references of the forward, identity at init, init, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64


class Mlp(nn.Module):
    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], name="fc2")(h)


class Block(nn.Module):
    """``y = x + mlp(x)``: the residual MLP sub-block AdaptFormer sits beside."""

    @nn.compact
    def __call__(self, x):
        return x + Mlp(name="mlp")(x)


def gelu64(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def block_ref(p, x):
    m = p["mlp"]
    h = gelu64(f64(x) @ f64(m["fc1"]["kernel"]) + f64(m["fc1"]["bias"]))
    return f64(x) + h @ f64(m["fc2"]["kernel"]) + f64(m["fc2"]["bias"])


def branch_ref(node, x, norm=False):
    x = f64(x)
    if norm:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        x = (x - mu) / np.sqrt(var + 1e-6) * f64(node.norm_scale) + f64(node.norm_bias)
    h = np.maximum(x @ f64(node.down) + f64(node.down_bias), 0.0)
    return f64(node.scale) * (h @ f64(node.up) + f64(node.up_bias))


init = jax.jit(Block().init)


def setup(config, seed=0, d=8):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((3, 5, d)), jnp.float32)
    params = init(jax.random.key(seed + 1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"mlp": config}), key=jax.random.key(seed + 2))
    return x, params, adapted


@jax.jit
def run(adapted, x, key=None):
    return jlora.linen.apply(Block(), {"params": adapted}, x, dropout_key=key, strict=True)


def trained(node, seed=3):
    """Every trainable field non-zero, so the whole branch shows in the output."""
    rng = np.random.default_rng(seed)
    draw = lambda scale, a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype)
    return node.replace(up=draw(0.3, node.up), up_bias=draw(0.1, node.up_bias),
                        down_bias=draw(0.1, node.down_bias))


@pytest.mark.parametrize("norm", [None, "layernorm"])
def test_forward_equals_the_float64_formula(norm):
    x, params, adapted = setup(jlora.AdaptFormer(bottleneck=4, scale=0.1, norm=norm))
    node = trained(adapted["mlp@adaptformer"])
    if norm:
        node = node.replace(norm_scale=node.norm_scale * 1.5, norm_bias=node.norm_bias + 0.2)
    adapted = {**adapted, "mlp@adaptformer": node}
    y = run(adapted, x)
    ref = block_ref(params, x) + branch_ref(node, x, norm=norm is not None)
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


def test_identity_at_init_and_the_init_of_the_paper_code():
    x, params, adapted = setup(jlora.AdaptFormer(bottleneck=4))
    np.testing.assert_allclose(f64(run(adapted, x)), block_ref(params, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(  # exactly: the branch is 0.1·(relu(..)·0 + 0)
        f64(adapted["mlp@adaptformer"].branch(x)), 0.0)
    mlp = {"fc1": {"kernel": jnp.zeros((256, 512)), "bias": jnp.zeros(512)},
           "fc2": {"kernel": jnp.zeros((512, 256)), "bias": jnp.zeros(256)}}
    node = jlora.AdaptFormer().build_module(jax.random.key(0), mlp, path="mlp")
    assert node.down.shape == (256, 64) and node.up.shape == (64, 256)
    assert not np.any(node.up) and not np.any(node.up_bias) and not np.any(node.down_bias)
    # kaiming_uniform(a=√5) of a 256-input Linear: U(±1/16), std 1/(16·√3)
    bound = 1 / 16
    assert np.abs(node.down).max() <= bound and np.abs(node.down).max() > 0.99 * bound
    assert abs(float(np.std(node.down)) - bound / np.sqrt(3)) < 0.02 * bound
    assert float(node.scale) == pytest.approx(0.1)


def test_learnable_scale_starts_at_one_and_trains():
    x, _, adapted = setup(jlora.AdaptFormer(bottleneck=4, learnable_scale=True))
    trainable, frozen = jlora.split(adapted)
    assert float(trainable["mlp@adaptformer"].scale) == 1.0
    assert jlora.count_trainable(trainable) == 8 * 4 + 4 + 4 * 8 + 8 + 1
    fixed = jlora.split(setup(jlora.AdaptFormer(bottleneck=4))[2])[0]["mlp@adaptformer"]
    assert fixed.scale is None  # a fixed scale is frozen


def test_dropout_acts_on_the_branch_only_with_a_key():
    x, params, adapted = setup(jlora.AdaptFormer(bottleneck=4, dropout=0.5))
    node = trained(adapted["mlp@adaptformer"])
    adapted = {**adapted, "mlp@adaptformer": node}
    no_key = run(adapted, x)
    np.testing.assert_allclose(f64(no_key), block_ref(params, x) + branch_ref(node, x),
                               rtol=1e-5, atol=1e-5)
    dropped = f64(run(adapted, x, jax.random.key(7))) - block_ref(params, x)
    # inverted dropout of relu(h) by 1/(1-p): each bottleneck unit is either 0 or doubled
    h = np.maximum(f64(x) @ f64(node.down) + f64(node.down_bias), 0.0)
    base = 0.1 * f64(node.up_bias)
    ok = [np.allclose(dropped[i, j] - base, 0.1 * (2 * h[i, j] * m) @ f64(node.up), atol=1e-5)
          for i in range(3) for j in range(5)
          for m in [_solve_mask(dropped[i, j] - base, 0.1 * 2 * h[i, j], f64(node.up))]]
    assert all(ok) and not np.allclose(dropped, f64(no_key) - block_ref(params, x), atol=1e-4)


def _solve_mask(target, h, up):
    """The 0/1 mask m with (h·m)·up = target (least squares, rounded)."""
    m, *_ = np.linalg.lstsq((h[:, None] * up).T, target, rcond=None)
    return np.round(m)


def test_options_are_checked():
    for bad, match in [(dict(bottleneck=0), "bottleneck"), (dict(dropout=1.0), "dropout"),
                       (dict(norm="rms"), "norm"), (dict(learnable_scale=1), "learnable_scale"),
                       (dict(bottlenek=4), "unknown option")]:
        with pytest.raises(ValueError, match=match):
            jlora.AdaptFormer(**bad)


class GatedMlp(nn.Module):
    """LLaMA's MLP, ``down(silu(gate(x))·up(x))``: two kernels read ``d``, one writes it."""

    @nn.compact
    def __call__(self, x):
        g = nn.Dense(16, name="gate_proj")(x)
        u = nn.Dense(16, name="up_proj")(x)
        return nn.Dense(x.shape[-1], name="down_proj")(nn.silu(g) * u)


class GatedBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + GatedMlp(name="mlp")(x)


def gated_block_ref(p, x):
    m, x = p["mlp"], f64(x)
    lin = lambda n, h: h @ f64(m[n]["kernel"]) + f64(m[n]["bias"])
    g = lin("gate_proj", x)
    return x + lin("down_proj", g / (1 + np.exp(-g)) * lin("up_proj", x))


def test_sizes_do_not_depend_on_the_order_of_the_params_keys():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 8)), jnp.float32)
    params = GatedBlock().init(jax.random.key(5), x)["params"]
    resorted = jax.tree.map(lambda a: a, params)  # jax.tree rebuilds dicts with sorted keys
    assert list(params["mlp"]) == ["gate_proj", "up_proj", "down_proj"]
    assert list(resorted["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
    spec = jlora.Spec({"mlp": jlora.AdaptFormer(bottleneck=4)})
    nodes = []
    for p in (params, resorted):
        adapted = jlora.apply(p, spec, key=jax.random.key(6))
        node = trained(adapted["mlp@adaptformer"])
        assert node.down.shape == (8, 4) and node.up.shape == (4, 8) and node.shape == (8, 8)
        assert (node.in_kernel, node.out_kernel) == ("gate_proj/kernel", "down_proj/kernel")
        y = jlora.linen.apply(GatedBlock(), {"params": {**adapted, "mlp@adaptformer": node}}, x)
        np.testing.assert_allclose(f64(y), gated_block_ref(p, x) + branch_ref(node, x),
                                   rtol=1e-5, atol=1e-5)
        nodes.append(node)
    np.testing.assert_array_equal(nodes[0].down, nodes[1].down)


def _kernel(d_in, d_out):
    return {"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros((d_out,))}


def test_sizes_of_a_chain_of_a_cycle_and_from_the_options():
    build = lambda mlp, **kw: jlora.AdaptFormer(bottleneck=2, **kw).build_module(
        jax.random.key(0), mlp, path="enc/mlp")
    # a chain 8 -> 16 -> 4: 8 only read, 4 only written (keys in either order)
    chain = {"out": _kernel(16, 4), "inp": _kernel(8, 16)}
    assert build(chain).shape == (8, 4)
    # a cycle 8 -> 32 -> 32 -> 8: the smallest size is the width
    deep = {"c": _kernel(32, 8), "a": _kernel(8, 32), "b": _kernel(32, 32)}
    assert build(deep).shape == (8, 8)
    # a module narrower inside (16 -> 4 -> 16) needs the option; one sets both in a cycle
    narrow = {"fc1": _kernel(16, 4), "fc2": _kernel(4, 16)}
    assert build(narrow).shape == (4, 4)
    assert build(narrow, in_features=16).shape == (16, 16)
    assert build(narrow, out_features=16).down.shape == (16, 2)
    assert build(chain, out_features=6).shape == (8, 6)
    # grouped-query attention: q (8, 8), k/v (8, 4), o (8, 8): 4 is written, never read
    gqa = {n: {"kernel": jnp.zeros((8, w))} for n, w in
           (("q", 8), ("k", 4), ("v", 4), ("o", 8))}
    with pytest.raises(ValueError, match=r"enc/mlp: AdaptFormer cannot tell.*k/kernel \(8, 4\)"
                                         r".*in_features=d_in, out_features=d_out"):
        build(gqa)
    node = build(gqa, in_features=8, out_features=8)
    assert node.shape == (8, 8) and (node.in_kernel, node.out_kernel) == ("k/kernel", "o/kernel")
    # DenseGeneral attention: q/k/v (8, heads, head_dim), o (heads, head_dim, 8)
    att = {"q": {"kernel": jnp.zeros((8, 2, 4))}, "o": {"kernel": jnp.zeros((2, 4, 8))}}
    with pytest.raises(ValueError, match=r"enc/mlp: AdaptFormer cannot tell.*o/kernel has shape "
                                         r"\(2, 4, 8\).*in_features=d_in, out_features=d_out"):
        build(att)
    with pytest.raises(ValueError, match=r"enc/mlp: AdaptFormer cannot tell"):
        build(att, in_features=8)
    node = build(att, in_features=8, out_features=8)
    assert node.shape == (8, 8) and (node.in_kernel, node.out_kernel) == ("q/kernel", "o/kernel")


def test_a_wrong_size_fails_at_the_forward_naming_the_options():
    x = jnp.ones((2, 8))
    params = {"mlp": {"fc1": _kernel(8, 4), "fc2": _kernel(4, 8)}}  # narrower inside
    adapted = jlora.apply(params, jlora.Spec({"mlp": jlora.AdaptFormer(bottleneck=2)}),
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"mlp: AdaptFormer was built for inputs of 4 features"
                                         r".*in_features="):
        adapted["mlp@adaptformer"].branch(x)
    fixed = jlora.apply(params, jlora.Spec({"mlp": jlora.AdaptFormer(bottleneck=2,
                                                                      in_features=8)}),
                        key=jax.random.key(0))
    assert fixed["mlp@adaptformer"].branch(x).shape == (2, 8)


@pytest.mark.parametrize("name", ["in_features", "out_features"])
def test_size_options_are_checked(name):
    for bad in (0, -3, 8.0, "8", True):
        with pytest.raises(ValueError, match=f"AdaptFormer: {name} must be an int >= 1"):
            jlora.AdaptFormer(**{name: bad})
    with pytest.raises(TypeError):  # keyword only: never taken for another option by position
        jlora.AdaptFormer(4, 0.1, 0.0, False, None, 8)
