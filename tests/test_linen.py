"""The factorized fast path against float64 references and the merged path."""

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests._refs import f64, perturb


class Zoo(nn.Module):
    """One of each supported layer."""

    @nn.compact
    def __call__(self, x, ids):
        h = nn.Dense(16, name="dense")(x)                                   # (B, T, 16)
        h = nn.DenseGeneral((2, 8), name="dg")(h)                           # (B, T, 2, 8)
        h = nn.Einsum((2, 8, 6), "bthd,hdo->bto", name="ein")(h)            # (B, T, 6)
        h = h + nn.Embed(10, 6, name="emb")(ids)
        h = nn.Conv(5, (3,), name="conv")(h)                                # (B, T, 5)
        return h


SPEC = jlora.Spec({
    "dense/kernel": jlora.LoRA(rank=2, alpha=4),
    "dg/kernel": jlora.LoRA(rank=3, in_axes=(0,)),
    "ein/kernel": jlora.LoRA(rank=2, in_axes=(0, 1), rslora=True),
    "emb/embedding": jlora.LoRA(rank=2),
    "conv/kernel": jlora.LoRA(rank=2, init="gaussian"),
})


@pytest.fixture(scope="module")
def zoo():
    model = Zoo()
    x = jax.random.normal(jax.random.key(0), (2, 7, 8))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 10)
    params = model.init(jax.random.key(2), x, ids)["params"]
    adapted = perturb(jlora.apply(params, SPEC, key=jax.random.key(3)))
    return model, x, ids, params, adapted


def test_every_layer_is_consumed(zoo):
    model, x, ids, _, adapted = zoo
    report = jlora.linen.consumed(model, {"params": adapted}, x, ids)
    assert report["merged"] == []
    assert sorted(report["factorized"]) == sorted(
        ["dense/kernel", "dg/kernel", "ein/kernel", "emb/embedding", "conv/kernel"])


def test_fast_path_equals_merged_path(zoo):
    model, x, ids, _, adapted = zoo
    fast = jax.jit(lambda p: jlora.linen.apply(model, {"params": p}, x, ids))(adapted)
    slow = model.apply({"params": jlora.merge(adapted)}, x, ids)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-5)


def test_gradients_equal_merged_path(zoo):
    model, x, ids, _, adapted = zoo
    trainable, frozen = jlora.split(adapted)
    fast = jax.jit(jax.grad(lambda t: jnp.sum(jlora.linen.apply(
        model, {"params": jlora.combine(t, frozen)}, x, ids) ** 2)))(trainable)
    slow = jax.grad(lambda t: jnp.sum(model.apply(
        {"params": jlora.merge(jlora.combine(t, frozen))}, x, ids) ** 2))(trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), fast, slow)


def test_dense_forward_against_numpy():
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(0), (3, 5))
    params = model.init(jax.random.key(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": jnp.arange(6.0)}
    adapted = perturb(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=2, alpha=6)}),
                                  key=jax.random.key(2)))
    node = adapted["kernel"]
    y = jlora.linen.apply(model, {"params": adapted}, x)
    ref = f64(x) @ f64(node.base) + 3.0 * (f64(x) @ f64(node.a)) @ f64(node.b) + np.arange(6.0)
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


def test_embed_forward_against_numpy_and_attend_falls_back():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(12, 4, name="emb")
            return emb.attend(emb(ids))

    model = Tied()
    ids = jnp.array([[1, 5, 11]])
    params = model.init(jax.random.key(0), ids)["params"]
    adapted = perturb(jlora.apply(params, jlora.Spec({"emb/embedding": jlora.LoRA(rank=2)}),
                                  key=jax.random.key(1)))
    node = adapted["emb"]["embedding"]
    table = f64(node.base) + f64(node.a) @ f64(node.b)
    ref = table[np.asarray(ids)] @ table.T
    y = jlora.linen.apply(model, {"params": adapted}, ids)
    np.testing.assert_allclose(f64(y), ref, rtol=1e-4, atol=1e-4)


def test_unsupported_layers_fall_back_to_merged_weights():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(), (x.shape[-1], 3))
            return nn.Dense(3, name="d")(x) + x @ w

    model = Custom()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    spec = jlora.Spec({"w": jlora.LoRA(rank=2), "d/kernel": jlora.LoRA(rank=2)})
    adapted = perturb(jlora.apply(params, spec, key=jax.random.key(1)))
    report = jlora.linen.consumed(model, {"params": adapted}, x)
    assert report == {"factorized": ["d/kernel"], "merged": ["w"]}
    y = jlora.linen.apply(model, {"params": adapted}, x)
    m = jlora.merge(adapted)
    ref = f64(x) @ f64(m["d"]["kernel"]) + f64(m["d"]["bias"]) + f64(x) @ f64(m["w"])
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


def test_mismatched_in_axes_falls_back_and_stays_correct():
    model = nn.DenseGeneral((2, 3), name="q")
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    # default in_axes (all but last) do not match the layer's contraction (axis 0 only)
    adapted = perturb(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
                                  key=jax.random.key(1)))
    assert jlora.linen.consumed(model, {"params": adapted}, x)["merged"] == ["kernel"]
    np.testing.assert_allclose(jlora.linen.apply(model, {"params": adapted}, x),
                               model.apply({"params": jlora.merge(adapted)}, x), atol=1e-6)


def test_bf16_base_with_f32_factors():
    model = nn.Dense(8)
    x = jax.random.normal(jax.random.key(0), (4, 16))
    params = model.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    adapted = perturb(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=4)}),
                                  key=jax.random.key(2)))
    node = adapted["kernel"]
    assert node.base.dtype == jnp.bfloat16 and node.a.dtype == jnp.float32
    y = jax.jit(lambda p: jlora.linen.apply(model, {"params": p}, x))(adapted)
    ref = f64(x) @ f64(node.base) + (f64(x) @ f64(node.a)) @ f64(node.b) + f64(params["bias"])
    np.testing.assert_allclose(f64(y), ref, rtol=2e-2, atol=2e-2)
    trainable, frozen = jlora.split(adapted)
    g = jax.grad(lambda t: jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x).astype(jnp.float32).sum())(trainable)
    assert g["kernel"].a.dtype == jnp.float32 and g["kernel"].b.dtype == jnp.float32


def test_dropout_only_with_a_key():
    model = nn.Dense(8)
    x = jax.random.normal(jax.random.key(0), (64, 16))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = perturb(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=4, dropout=0.5)}),
                                  key=jax.random.key(2)))
    eval_y = jlora.linen.apply(model, {"params": adapted}, x)
    np.testing.assert_allclose(eval_y, model.apply({"params": jlora.merge(adapted)}, x), atol=1e-5)
    k1 = jlora.linen.apply(model, {"params": adapted}, x, dropout_key=jax.random.key(5))
    k1b = jlora.linen.apply(model, {"params": adapted}, x, dropout_key=jax.random.key(5))
    k2 = jlora.linen.apply(model, {"params": adapted}, x, dropout_key=jax.random.key(6))
    np.testing.assert_array_equal(k1, k1b)
    assert not np.allclose(k1, k2)
    # dropout touches the adapter branch only: with b = 0 it changes nothing
    zero_b = jax.tree.map(lambda n: n.replace(b=jnp.zeros_like(n.b)) if jlora.is_node(n) else n,
                          adapted, is_leaf=jlora.is_node)
    np.testing.assert_allclose(
        jlora.linen.apply(model, {"params": zero_b}, x, dropout_key=jax.random.key(5)),
        model.apply({"params": params}, x), atol=1e-5)
    # inverted dropout keeps the expectation: the mean over many keys approaches eval
    keys = jax.random.split(jax.random.key(7), 400)
    mean = jax.vmap(lambda k: jlora.linen.apply(model, {"params": adapted}, x, dropout_key=k))(keys).mean(0)
    lora_part = eval_y - model.apply({"params": params}, x)
    assert float(jnp.abs(mean - eval_y).mean()) < 0.15 * float(jnp.abs(lora_part).mean())


def test_training_step_does_not_retrace():
    import optax

    model = nn.Dense(4)
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}), key=jax.random.key(1))
    trainable, frozen = jlora.split(adapted)
    tx = optax.sgd(0.1)
    opt = tx.init(trainable)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(t, opt):
        g = jax.grad(lambda t: jnp.sum(jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, x) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt

    for _ in range(3):
        trainable, opt = step(trainable, opt)


@pytest.mark.parametrize("model,x,name,bad", [
    (nn.Dense(4), jnp.ones((1, 2)), "kernel", (2, 8)),
    (nn.DenseGeneral(features=(4,), axis=-1), jnp.ones((1, 2)), "kernel", (2, 8)),
    (nn.Conv(4, kernel_size=(3,)), jnp.ones((1, 5, 2)), "kernel", (3, 2, 8)),
    (nn.Embed(5, 4), jnp.array([[1, 2]]), "embedding", (5, 8)),
    (nn.Einsum((2, 4), "bi,io->bo"), jnp.ones((1, 2)), "kernel", (2, 8)),
], ids=["Dense", "DenseGeneral", "Conv", "Embed", "Einsum"])
def test_adapted_param_must_fit_the_layer_declaration(model, x, name, bad):
    # Dense(features=4) handed an adapted (2, 8) kernel: Flax's own shape error,
    # exactly as for the same plain param, never a width-8 output.
    params = dict(model.init(jax.random.key(0), x)["params"])
    params[name] = jnp.ones(bad)
    adapted = jlora.apply(params, jlora.Spec({name: jlora.LoRA(rank=1)}), key=jax.random.key(1))
    with pytest.raises(flax.errors.ScopeParamShapeError):
        model.apply({"params": params}, x)
    with pytest.raises(flax.errors.ScopeParamShapeError):
        jlora.linen.apply(model, {"params": adapted}, x)


def test_embed_with_float_ids_names_the_layer():
    model = nn.Embed(5, 4)
    params = model.init(jax.random.key(0), jnp.array([1]))["params"]
    adapted = jlora.apply(params, jlora.Spec({"embedding": jlora.LoRA(rank=1)}),
                          key=jax.random.key(1))
    with pytest.raises(ValueError, match="Embed .*integer ids"):
        jlora.linen.apply(model, {"params": adapted}, jnp.array([1.0]))


def test_conv_with_an_int_kernel_size_runs_the_fast_path_and_resolves():
    model = nn.Conv(6, 3)  # Flax's 1-D window given as one int
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    spec = jlora.linen.resolve(model, {"params": params}, x,
                               spec=jlora.Spec({"kernel": jlora.LoRA(rank=2)}))
    adapted = perturb(jlora.apply(params, spec, key=jax.random.key(1)))
    y = jlora.linen.apply(model, {"params": adapted}, x, strict=True)
    want = model.apply({"params": jlora.merge(adapted)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_resolve_keeps_a_full_rule_on_a_kernel_contracted_off_its_first_axis():
    model = nn.Einsum((2, 8, 4), "bti,hio->btho")  # contracts kernel axis 1
    x = jnp.ones((1, 3, 8))
    params = model.init(jax.random.key(0), x)["params"]
    spec = jlora.Spec({"kernel": jlora.Full()})
    assert jlora.linen.resolve(model, {"params": params}, x, spec=spec).match("kernel") == jlora.Full()


def test_masked_conv_is_served_merged_and_matches_numpy():
    """``(K0 + s·a·b) ⊙ M`` has no factorized form: the fast path falls back."""
    mask = jnp.tril(jnp.ones((3, 4, 5)))
    model = nn.Conv(5, (3,), padding="VALID", mask=mask)
    x = jax.random.normal(jax.random.key(0), (2, 7, 4))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = perturb(jlora.apply(params, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
                                  key=jax.random.key(2)), size=0.5)
    assert jlora.linen.consumed(model, {"params": adapted}, x) == {
        "factorized": [], "merged": ["kernel"]}
    with pytest.warns(UserWarning, match="kernel .Conv options the fast path does not cover"):
        y = jlora.linen.apply(model, {"params": adapted}, x)
    node = adapted["kernel"]
    k = (f64(node.base) + node.scale * (f64(node.a) @ f64(node.b)).reshape(3, 4, 5)) * f64(mask)
    xs = f64(x)
    ref = np.stack([sum(xs[:, t + i] @ k[i] for i in range(3)) for t in range(5)], 1)
    np.testing.assert_allclose(f64(y), ref + f64(params["bias"]), rtol=1e-5, atol=1e-5)


def test_consumed_lists_a_tied_embedding_under_both():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(12, 4, name="emb")
            return emb.attend(emb(ids))

    ids = jnp.array([[1, 5, 11]])
    params = Tied().init(jax.random.key(0), ids)["params"]
    adapted = jlora.apply(params, jlora.Spec({"emb/embedding": jlora.LoRA(rank=2)}),
                          key=jax.random.key(1))
    assert jlora.linen.consumed(Tied(), {"params": adapted}, ids) == {
        "factorized": ["emb/embedding"], "merged": ["emb/embedding"]}


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(4, name="fc")(x)), None


class _Scanned(nn.Module):
    """Three Dense layers stacked by nn.scan: kernel (3, 4, 4), each layer sees (4, 4)."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
        return scan(name="layers")(x, None)[0]


def test_resolve_orients_a_scanned_kernel_per_slice_and_requires_expert_axis():
    model = _Scanned()
    x = jax.random.normal(jax.random.key(0), (2, 4))
    params = model.init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match=r"layers/fc/kernel: .*stacked along axis 0.*"
                                         r"LoRA\(\.\.\., expert_axis=0\)"):
        jlora.linen.resolve(model, {"params": params}, x,
                            spec=jlora.Spec({"**/kernel": jlora.LoRA(rank=2)}))
    spec = jlora.linen.resolve(model, {"params": params}, x,
                               spec=jlora.Spec({"**/kernel": jlora.LoRA(rank=2, expert_axis=0)}))
    assert spec.match("layers/fc/kernel").in_axes == (1,)  # the slice's input axis, on the stack
    adapted = perturb(jlora.apply(params, spec, key=jax.random.key(2)), size=0.5)
    node = adapted["layers"]["fc"]["kernel"]
    assert node.a.shape == (3, 4, 2) and node.b.shape == (3, 2, 4)
    y = jlora.linen.apply(model, {"params": adapted}, x, strict=True)
    h = f64(x)
    for i in range(3):
        k = f64(node.base[i]) + node.scale * f64(node.a[i]) @ f64(node.b[i])
        h = np.tanh(h @ k + f64(params["layers"]["fc"]["bias"][i]))
    np.testing.assert_allclose(f64(y), h, rtol=1e-5, atol=1e-5)
    # Full needs no orientation: its rule is kept as is
    full = jlora.Spec({"**/kernel": jlora.Full()})
    assert jlora.linen.resolve(model, {"params": params}, x, spec=full) == full


def test_a_jlora_nodes_module_counts_as_factorized():
    """A module that takes its adapter nodes (``jlora_nodes = True``) reads them itself:
    no 'served from merged weights' warning, and ``consumed`` lists it as factorized."""
    import warnings

    seen = []

    class MoE(nn.Module):
        jlora_nodes = True

        @nn.compact
        def __call__(self, x, group_sizes):
            w = self.param("experts", nn.initializers.normal(1.0), (3, 8, 4))
            seen.append(type(w).__name__)
            return jlora.experts.ragged_dot(x, w, group_sizes)

    x, sizes = jax.random.normal(jax.random.key(0), (6, 8)), jnp.array([2, 1, 3])
    model = MoE()
    params = model.init(jax.random.key(1), x, sizes)["params"]
    adapted = jlora.apply(params, jlora.Spec({"experts": jlora.LoRA(rank=2, expert_axis=0)}),
                          key=jax.random.key(2))
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.linen.apply(model, {"params": adapted}, x, sizes, strict=True)
    assert seen == ["LoRANode"]
    assert jlora.linen.consumed(model, {"params": adapted}, x, sizes) == {
        "factorized": ["experts"], "merged": []}


def test_resolve_leaves_leaves_to_leaf_rules_as_apply_does():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="fc")(x)
            return nn.Einsum((2, 8, 4), "btd,ndh->btnh", name="ein")(h)

    x = jnp.ones((1, 3, 8))
    model = Block()
    variables = model.init(jax.random.key(0), x)
    # "fc/**" names the module fc for AdaptFormer and, as a glob, also its leaves
    spec = jlora.Spec({"fc/**": jlora.AdaptFormer(bottleneck=2), "**/kernel": jlora.LoRA(rank=2)})
    resolved = jlora.linen.resolve(model, variables, x, spec=spec)

    def adapted(s):
        tree = jlora.apply(variables["params"], s, key=jax.random.key(1))
        return sorted(p for p, n in jlora.tree.leaves_with_paths(tree) if jlora.is_node(n))

    assert adapted(resolved) == adapted(spec) == ["ein/kernel", "fc/kernel", "fc@adaptformer"]
    assert resolved.match("ein/kernel").in_axes == (1,)  # the Einsum's orientation, read


def test_dense_general_with_an_int_batch_dims_resolves_and_serves_merged():
    x = jax.random.normal(jax.random.key(1), (2, 5, 7))
    model = nn.DenseGeneral(4, axis=-1, batch_dims=0)  # Flax reads 0 as (0,)
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].shape == (2, 7, 4)
    spec = jlora.Spec({"kernel": jlora.LoRA(rank=2, expert_axis=0)})
    resolved = jlora.linen.resolve(model, variables, x, spec=spec)
    assert resolved.match("kernel").in_axes == (1,)
    adapted = perturb(jlora.apply(variables["params"], resolved, key=jax.random.key(2)))
    with pytest.warns(UserWarning, match="merged"):  # a batch axis: no factorized form
        y = jlora.linen.apply(model, {"params": adapted}, x)
    k = f64(jlora.merge(adapted)["kernel"])
    np.testing.assert_allclose(f64(y), np.einsum("bti,bio->bto", f64(x), k)
                               + f64(variables["params"]["bias"])[:, None], rtol=1e-5, atol=1e-5)


def test_qlora_on_a_kernel_whose_input_axes_do_not_lead_is_served_merged_and_named():
    model = nn.Einsum((16, 16, 8), "btd,ndh->btnh")  # square (n == d)
    x = jax.random.normal(jax.random.key(5), (2, 3, 16))
    variables = model.init(jax.random.key(0), x)
    spec = jlora.linen.resolve(model, variables, x,
                               spec=jlora.Spec({"kernel": jlora.QLoRA(rank=2, block_size=16)}))
    adapted = jlora.apply(variables["params"], spec, key=jax.random.key(1))
    node = adapted["kernel"]
    assert node.in_axes == (1,)
    node = node.replace(b=jax.random.normal(jax.random.key(2), node.b.shape))
    adapted = {**adapted, "kernel": node}
    with pytest.raises(ValueError, match="quantized base is packed in the kernel's layout"):
        jlora.linen.apply(model, {"params": adapted}, x, strict=True)
    with pytest.warns(UserWarning, match="quantized base"):
        y = jlora.linen.apply(model, {"params": adapted}, x)
    k = f64(node.base) + node.scale * np.einsum("dr,rnh->ndh", f64(node.a),
                                                f64(node.b).reshape(2, 16, 8))
    ref = np.einsum("btd,ndh->btnh", f64(x), k) + f64(variables["params"]["bias"])
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)
