"""jlora on Flax NNX state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora
from tests._refs import f64, perturb


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def test_paths_and_merge_give_a_working_model():
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    adapted = jlora.apply(state, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2, alpha=4),
                                             "fc2/kernel": jlora.Full()}), key=jax.random.key(1))
    paths = [p for p, x in jlora.tree.leaves_with_paths(adapted) if jlora.is_node(x)]
    assert paths == ["fc1/kernel", "fc2/kernel"]
    adapted = perturb(adapted)
    x = jax.random.normal(jax.random.key(2), (5, 6))
    y = jlora.nnx.merge(graphdef, adapted)(x)
    node = adapted["fc1"]["kernel"].get_value()
    w1 = f64(node.base) + 2.0 * f64(node.a) @ f64(node.b)
    b1 = f64(state["fc1"]["bias"].get_value())
    w2, b2 = f64(state["fc2"]["kernel"].get_value()), f64(state["fc2"]["bias"].get_value())
    ref = np.maximum(f64(x) @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


def test_nnx_training_lowers_the_loss():
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    adapted = jlora.apply(state, jlora.Spec({"fc{1,2}/kernel": jlora.LoRA(rank=2)}),
                          key=jax.random.key(1))
    trainable, frozen = jlora.split(adapted)
    x = jax.random.normal(jax.random.key(2), (64, 6))
    y = jnp.sin(x[:, :3])
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)

    def loss_fn(t):
        model = jlora.nnx.merge(graphdef, jlora.combine(t, frozen))
        return jnp.mean((model(x) - y) ** 2)

    @jax.jit
    def step(t, opt):
        loss, g = jax.value_and_grad(loss_fn)(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    losses = []
    for _ in range(60):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    # the base never changed
    _, frozen_after = jlora.split(jlora.combine(trainable, frozen))
    np.testing.assert_array_equal(frozen_after["fc1"]["kernel"].get_value().base,
                                  state["fc1"]["kernel"].get_value())


import pytest  # noqa: E402


@pytest.mark.parametrize("config", [
    jlora.DoRA(rank=2), jlora.VeRA(rank=8), jlora.AdaLoRA(init_rank=3, target_rank=1),
    jlora.GLoRA(rank=2), jlora.LoRA(rank=2, init="pissa"),
])
def test_every_method_on_nnx_state(config):
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(2), (5, 6))
    adapted = jlora.apply(state, jlora.Spec({"fc1/kernel": config}), key=jax.random.key(1))
    # identity at init, through nnx.merge of the merged state
    np.testing.assert_allclose(f64(jlora.nnx.merge(graphdef, adapted)(x)), f64(model(x)),
                               rtol=1e-5, atol=1e-5)
    # after moving every trainable field, the module computes with the merged weights
    trainable, frozen = jlora.split(adapted)
    moved = jlora.combine(jax.tree.map(lambda t: t + 0.05, trainable), frozen)
    merged = jlora.merge(moved)
    w1, b1 = f64(merged["fc1"]["kernel"].get_value()), f64(merged["fc1"]["bias"].get_value())
    w2, b2 = f64(state["fc2"]["kernel"].get_value()), f64(state["fc2"]["bias"].get_value())
    ref = np.maximum(f64(x) @ w1 + b1, 0) @ w2 + b2
    y = jax.jit(lambda t: jlora.nnx.merge(graphdef, jlora.combine(t, frozen))(x))(
        jax.tree.map(lambda t: t + 0.05, trainable))
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- jlora.nnx.apply fast path


class Tagged(nnx.Module):
    """A Linear and an Embed whose calls forward keyword options (``out_sharding``)."""

    def __init__(self, rngs, **linear):
        self.fc = nnx.Linear(4, 6, rngs=rngs, **linear)
        self.emb = nnx.Embed(7, 6, rngs=rngs)

    def __call__(self, x, ids=None, **kw):
        y = self.fc(x, **kw)
        return y if ids is None else y + self.emb(ids, **kw)


def _tagged(config, **linear):
    graphdef, state = nnx.split(Tagged(nnx.Rngs(0), **linear))
    spec = jlora.Spec({"fc/kernel": config, "emb/embedding": jlora.LoRA(rank=2)})
    adapted = perturb(jlora.apply(state, spec, key=jax.random.key(1)), size=0.5)
    return graphdef, state, adapted


def _tagged_ref(state, adapted, x, ids, fc_input=None):
    """float64 ``x·(K0 + s·a·b) + bias (+ E[ids] + s·a[ids]·b)``; ``fc_input`` replaces
    ``x`` on the LoRA branch only (the dropped-out input)."""
    fc, emb = adapted["fc"]["kernel"].get_value(), adapted["emb"]["embedding"].get_value()
    x = f64(x)
    branch = x if fc_input is None else fc_input
    y = (x @ f64(fc.base) + fc.scale * (branch @ f64(fc.a)) @ f64(fc.b)
         + f64(state["fc"]["bias"].get_value()))
    if ids is None:
        return y
    table = f64(emb.base) + emb.scale * f64(emb.a) @ f64(emb.b)
    return y + table[np.asarray(ids)]


def test_nnx_apply_applies_lora_dropout_with_a_key():
    graphdef, state, adapted = _tagged(jlora.LoRA(rank=2, dropout=0.5))
    x = jax.random.normal(jax.random.key(2), (6, 4))
    ids = jnp.arange(6) % 7
    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(jlora.tree.path_key(key, "fc/kernel"), 0.5, x.shape))
    dropped = np.where(keep, f64(x) / 0.5, 0.0)
    y = jlora.nnx.apply(graphdef, adapted, x, ids, dropout_key=key)
    np.testing.assert_allclose(f64(y), _tagged_ref(state, adapted, x, ids, dropped),
                               rtol=1e-5, atol=1e-5)
    # without a key (eval) the branch sees the whole input
    y0 = jlora.nnx.apply(graphdef, adapted, x, ids)
    np.testing.assert_allclose(f64(y0), _tagged_ref(state, adapted, x, ids), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(f64(y) - f64(y0))) > 0.1


def test_nnx_apply_takes_out_sharding_like_the_layers():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    graphdef, state, adapted = _tagged(jlora.LoRA(rank=2))
    x = jax.random.normal(jax.random.key(2), (4, 4))
    ids = jnp.arange(4) % 7
    want = _tagged_ref(state, adapted, x, ids)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        y = jlora.nnx.apply(graphdef, adapted, xs, ids, out_sharding=P("data", None))
        assert y.sharding.spec == P("data", None)
    np.testing.assert_allclose(f64(y), want, rtol=1e-5, atol=1e-5)


def test_nnx_apply_keeps_preferred_element_type():
    graphdef, state, adapted = _tagged(jlora.LoRA(rank=2), dtype=jnp.bfloat16,
                                       param_dtype=jnp.bfloat16,
                                       preferred_element_type=jnp.float32)
    x = jax.random.normal(jax.random.key(2), (3, 4)).astype(jnp.bfloat16)
    plain = nnx.merge(graphdef, state)(x)
    fast = jlora.nnx.apply(graphdef, adapted, x)
    assert plain.dtype == jnp.float32 and fast.dtype == jnp.float32
    np.testing.assert_allclose(f64(fast), _tagged_ref(state, adapted, x, None), rtol=3e-2,
                               atol=3e-2)
