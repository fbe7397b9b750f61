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
