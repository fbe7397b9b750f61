"""Module-level adapters: spec rules naming modules, nodes beside them, and every tool on them.

A small two-layer Flax transformer encoder; AdaptFormer beside each MLP next to
LoRA on the attention queries, through apply -> split/combine -> jitted training
step -> merge (refused, or with the residual), Orbax, sharding on 8 simulated
devices and NNX; plus a test-defined *mergeable* module-level method that
exercises ``module_params``, ``merge_into``/``unmerge_from`` and ``context``.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

import jlora
from jlora.methods import ModuleConfig, ModuleNode
from jlora.tree import Role, leaves_with_paths
from tests._refs import f64

D = 16


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc2")(nn.relu(nn.Dense(2 * D, name="fc1")(x)))


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(D, name=n)(h) for n in ("query", "key", "value"))
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(D), axis=-1)
        x = x + nn.Dense(D, name="out")(att @ v)
        return x + Mlp(name="mlp")(nn.LayerNorm(name="ln2")(x))


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = Layer(name=f"layers_{i}")(x)
        return x


SPEC = jlora.Spec({"layers_*/mlp": jlora.AdaptFormer(bottleneck=4, dropout=0.0),
                   "**/query/kernel": jlora.LoRA(rank=2, alpha=4)})


@pytest.fixture(scope="module")
def setup():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, D)), jnp.float32)
    params = jax.jit(Encoder().init)(jax.random.key(1), x)["params"]
    adapted = jax.jit(lambda p: jlora.apply(p, SPEC, key=jax.random.key(2)))(params)
    return x, params, adapted


@jax.jit
def bumped(adapted):
    """Every trainable array moved off its init, so every adapter shows in the output."""
    trainable, frozen = jlora.split(adapted)
    leaves, tdef = jax.tree.flatten(trainable)
    leaves = [x + 0.2 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) * 1.3 + i)
              for i, x in enumerate(leaves)]
    return jlora.combine(jax.tree.unflatten(tdef, leaves), frozen)


def run(adapted, x, **kw):
    return jlora.linen.apply(Encoder(), {"params": adapted}, x, strict=True, **kw)


run_jit = jax.jit(run)


def test_apply_stores_the_node_beside_its_module(setup):
    x, params, adapted = setup
    for i in range(2):
        layer = adapted[f"layers_{i}"]
        node = layer["mlp@adaptformer"]
        assert node.path == f"layers_{i}/mlp" and node.shape == (D, D)
        assert (node.down.shape, node.up.shape) == ((D, 4), (4, D))
        assert jax.tree.map(np.asarray, layer["mlp"]) is not None
        chex.assert_trees_all_equal(layer["mlp"], params[f"layers_{i}"]["mlp"])
        assert jlora.is_node(layer["query"]["kernel"])
    per_layer = (D * 4 + 4 + 4 * D + D) + (D * 2 + 2 * D)
    assert jlora.count_trainable(adapted) == 2 * per_layer
    assert "layers_1/mlp@adaptformer  AdaptFormer" in jlora.summary(adapted)
    # identity at init (W_u = b_u = 0 and LoRA's b = 0)
    np.testing.assert_allclose(run_jit(adapted, x), jax.jit(Encoder().apply)({"params": params}, x),
                               rtol=1e-6, atol=1e-6)


def test_jitted_training_step_trains_only_the_adapters(setup):
    x, params, adapted = setup
    trainable, frozen = jlora.split(adapted)
    target = jnp.sin(x)
    tx = optax.adam(1e-2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(t, opt):
        loss, g = jax.value_and_grad(
            lambda t: jnp.mean((run(jlora.combine(t, frozen), x) - target) ** 2))(t)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    opt = tx.init(trainable)
    losses = []
    for _ in range(4):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    node = trainable["layers_0"]["mlp@adaptformer"]
    assert float(jnp.abs(node.up).max()) > 0 and node.scale is None
    assert jax.tree.leaves(trainable["layers_0"]["mlp"]) == []


def test_merge_refuses_adaptformer_naming_the_path_or_returns_the_residual(setup):
    x, params, adapted = setup
    adapted = bumped(adapted)
    with pytest.raises(ValueError, match=r"layers_0/mlp: AdaptFormer cannot be merged.*ReLU"):
        jlora.merge(adapted)
    plain, residual = jax.jit(lambda a: jlora.merge(a, residual=True))(adapted)
    assert sorted(residual) == ["layers_0/mlp@adaptformer", "layers_1/mlp@adaptformer"]
    assert not any(jlora.is_node(v) for _, v in leaves_with_paths(plain))
    q = adapted["layers_0"]["query"]["kernel"]
    np.testing.assert_allclose(f64(plain["layers_0"]["query"]["kernel"]),
                               f64(q.base) + 2.0 * f64(q.a) @ f64(q.b), rtol=1e-5, atol=1e-6)
    # plain params plus the residual nodes put back beside their modules run the same model
    back = {k: dict(v) for k, v in plain.items()}
    for path, node in residual.items():
        layer, key = path.split("/")
        back[layer][key] = node
    np.testing.assert_allclose(run_jit(back, x), run_jit(adapted, x), rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(setup, tmp_path):
    x, params, adapted = setup
    trainable, frozen = jlora.split(bumped(adapted))
    jlora.checkpoint.save(str(tmp_path), trainable, step=3, spec=SPEC)
    state = jlora.checkpoint.restore(str(tmp_path), spec=SPEC, onto=frozen)
    chex.assert_trees_all_equal(state["trainable"], trainable)
    np.testing.assert_array_equal(run_jit(state["adapted"], x),
                                  run_jit(jlora.combine(trainable, frozen), x))
    other = jlora.Spec({"layers_*/mlp": jlora.AdaptFormer(bottleneck=4),
                        "**/query/kernel": jlora.LoRA(rank=2, alpha=4)})
    with pytest.raises(ValueError, match="layers_0/mlp@adaptformer.*different spec|different spec"):
        jlora.checkpoint.restore(str(tmp_path), spec=other)


BASE_SPECS = {"mlp": {"fc1": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
                      "fc2": {"kernel": P("tensor", "fsdp"), "bias": P("fsdp")}}}


def test_sharding_specs_follow_the_module_and_8_devices_equal_1(setup):
    x, params, adapted = setup
    specs = {k: {**jax.tree.map(lambda _: P(), v), **BASE_SPECS} for k, v in params.items()}
    s = jlora.sharding.specs(adapted, specs)
    n = s["layers_0"]["mlp@adaptformer"]
    assert (n.down, n.down_bias, n.up, n.up_bias, n.scale) == (
        P("fsdp", None), P(), P(None, "fsdp"), P("fsdp"), P())
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    adapted = bumped(adapted)
    placed = jlora.sharding.place(adapted, mesh, specs)
    assert placed["layers_0"]["mlp@adaptformer"].down.sharding.spec == P("fsdp", None)
    loss = lambda t, fr: jnp.mean(run(jlora.combine(t, fr), x) ** 2)
    f = jax.jit(jax.value_and_grad(loss))
    (l8, g8), (l1, g1) = f(*jlora.split(placed)), f(*jlora.split(adapted))
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    chex.assert_trees_all_close(g8, g1, rtol=1e-4, atol=1e-6)


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.mlp = NnxMlp(rngs)

    def __call__(self, x):
        return x + self.mlp(x)


def test_nnx_runs_module_level_adapters():
    graphdef, state = nnx.split(NnxBlock(nnx.Rngs(0)))
    adapted = jax.jit(lambda s: jlora.apply(s, jlora.Spec({"mlp": jlora.AdaptFormer(bottleneck=4)}),
                                            key=jax.random.key(1)))(state)
    adapted = bumped(adapted)
    node = adapted["mlp@adaptformer"]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, D)), jnp.float32)
    y = jax.jit(lambda a: jlora.nnx.apply(graphdef, a, x))(adapted)
    h = np.maximum(f64(x) @ f64(node.down) + f64(node.down_bias), 0)
    branch = 0.1 * (h @ f64(node.up) + f64(node.up_bias))
    plain = jax.jit(lambda s: nnx.merge(graphdef, s)(x))(state)
    np.testing.assert_allclose(f64(y), f64(plain) + branch, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mlp: AdaptFormer cannot be merged"):
        jlora.nnx.merge(graphdef, adapted)
    trainable, frozen = jlora.split(adapted)
    g = jax.jit(jax.grad(lambda t: jnp.sum(jlora.nnx.apply(graphdef, jlora.combine(t, frozen),
                                                           x))))(trainable)
    assert float(jnp.abs(g["mlp@adaptformer"].up).sum()) > 0


# ------------------------------------------------------------ a mergeable module-level method


@dataclasses.dataclass(frozen=True)
class OutScale(ModuleConfig):
    """Scales a module's output features by ``1 + g`` through its last Dense layer's params."""

    def build_module(self, key, module_params, *, path):
        kernels = [p for p, x in leaves_with_paths(module_params) if p.endswith("kernel")]
        if not kernels:
            raise ValueError(f"{path}: no kernel")
        last = kernels[-1]
        d = leaves_with_paths(module_params)[[p for p, _ in
                                              leaves_with_paths(module_params)].index(last)][1]
        return OutScaleNode(g=jnp.zeros(d.shape[-1]), config=self, path=path,
                            target=last.rpartition("/")[0])


class OutScaleNode(ModuleNode):
    g: jax.Array
    target: str = struct.field(pytree_node=False, default="")
    config_class = OutScale
    trainable = ("g",)
    field_axes = {"g": Role.REPLICATED}
    mergeable = True

    def _scaled(self, params, f):
        layer = dict(params[self.target])
        layer["kernel"], layer["bias"] = layer["kernel"] * f, layer["bias"] * f
        return {**params, self.target: layer}

    def module_params(self, params):
        return self._scaled(params, 1 + self.g)

    def merge_into(self, params):
        return self._scaled(params, 1 + self.g)

    def unmerge_from(self, params):
        return self._scaled(params, 1 / (1 + self.g))

    def intercept(self, call, args, kwargs, *, dropout_key=None, gate=None, **context):
        y = call(*args, **kwargs)
        return y if gate is None else y * gate


def test_a_mergeable_module_method_rewrites_params_merges_and_gets_context(setup):
    x, params, _ = setup
    spec = jlora.Spec({"layers_1/mlp": OutScale(), "**/query/kernel": jlora.LoRA(rank=2)})
    adapted = bumped(jax.jit(lambda p: jlora.apply(p, spec, key=jax.random.key(3)))(params))
    g = adapted["layers_1"]["mlp@outscale"].g
    y = run_jit(adapted, x)
    merged = jax.jit(jlora.merge)(adapted)
    np.testing.assert_allclose(f64(merged["layers_1"]["mlp"]["fc2"]["kernel"]),
                               f64(params["layers_1"]["mlp"]["fc2"]["kernel"]) * (1 + f64(g)),
                               rtol=1e-6)
    np.testing.assert_allclose(jax.jit(Encoder().apply)({"params": merged}, x), y,
                               rtol=1e-5, atol=1e-5)
    back = jlora.unmerge(merged, adapted)
    chex.assert_trees_all_close(back, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jlora.merge(adapted, onto=params), merged, rtol=1e-6)
    # a second module-level node on the same module: both run (AdaptFormer is 0 at init)
    both = jlora.apply(adapted, jlora.Spec({"layers_1/mlp": jlora.AdaptFormer(bottleneck=2)}),
                       key=jax.random.key(4))
    np.testing.assert_allclose(run_jit(both, x), y, rtol=1e-6, atol=1e-6)
    plain, residual = jlora.merge(both, residual=True)
    assert list(residual) == ["layers_1/mlp@adaptformer"]
    chex.assert_trees_all_close(plain, merged, rtol=1e-6)
    # context keywords reach intercept (and not the model): the output is linear in the gate
    gated = jax.jit(lambda a, g: run(a, x, context={"gate": g}))
    g0, half = gated(adapted, 0.0), gated(adapted, 0.5)
    np.testing.assert_allclose(half, (g0 + y) / 2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(g0, y, atol=1e-3)


def test_module_nodes_that_never_run_are_reported(setup):
    x, params, adapted = setup
    moved = {**adapted, "layers_0": {**adapted["layers_0"]}}
    node = moved["layers_0"].pop("mlp@adaptformer")
    moved["layers_0"]["ln1@adaptformer"] = node.replace(path="layers_0/absent")
    with pytest.raises(ValueError, match="layers_0/ln1@adaptformer.*no module at layers_0/absent"):
        run_jit(moved, x)  # raised while tracing: nothing compiles
