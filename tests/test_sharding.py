"""Sharded LoRA on 8 simulated CPU devices (set in conftest.py before jax is imported)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from experiments import train
from experiments.models.decoder import DecoderLM

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_specs_follow_the_base():
    params = {"q": {"kernel": jnp.ones((8, 8))}, "c": {"kernel": jnp.ones((3, 3, 4, 8))},
              "h": {"kernel": jnp.ones((8, 2))}, "n": {"scale": jnp.ones(8)}}
    spec = jlora.Spec({"{q,c}/kernel": jlora.LoRA(rank=2), "h/kernel": jlora.Full(),
                       "n/scale": jlora.Full()})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    base = {"q": {"kernel": P("fsdp", "tensor")}, "c": {"kernel": P(None, "x", "y", "z")},
            "h": {"kernel": P("fsdp")}, "n": {"scale": None}}
    s = jlora.sharding.specs(adapted, base)
    assert (s["q"]["kernel"].base, s["q"]["kernel"].a, s["q"]["kernel"].b) == (
        P("fsdp", "tensor"), P("fsdp", None), P(None, "tensor"))
    # the HWI axes fold into fan_in: sharded over both of their mesh axes, major first
    assert s["c"]["kernel"].a == P(("x", "y"), None) and s["c"]["kernel"].b == P(None, "z")
    assert s["h"]["kernel"].value == P("fsdp", None)
    assert s["n"]["scale"].value == P(None)
    with pytest.raises(ValueError, match="no entry for q/kernel"):
        jlora.sharding.specs(adapted, {"c": base["c"], "h": base["h"], "n": base["n"]})


def small_model():
    model = DecoderLM(vocab=64, d_model=64, n_layers=2, n_heads=2, max_len=16)
    tokens = train.counting_batch(jax.random.key(0), 16, 16, 64)
    params = model.init(jax.random.key(1), tokens)["params"]
    return model, params, tokens


def run_steps(model, params, tokens, mesh, n=2):
    step, t, opt, frozen, batch_sh = train.build(model, params, mesh, lr=1e-2)
    losses = []
    for i in range(n):
        t, opt, loss = step(t, opt, frozen, jax.device_put(tokens, batch_sh))
        losses.append(float(loss))
    return t, losses, step, frozen, opt, batch_sh


@pytest.fixture(scope="module")
def reference():
    model, params, tokens = small_model()
    mesh = train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    t, losses, *_ = run_steps(model, params, tokens, mesh)
    return model, params, tokens, jax.device_get(t), losses


@pytest.mark.parametrize("shape", [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 4, "fsdp": 1, "tensor": 2},
    {"data": 2, "fsdp": 1, "tensor": 4},
    {"data": 2, "fsdp": 4, "tensor": 1},  # FSDP
    {"data": 2, "fsdp": 2, "tensor": 2},
])
def test_sharded_step_equals_single_device(reference, shape):
    model, params, tokens, t_ref, loss_ref = reference
    mesh = train.make_mesh(shape)
    t, losses, step, frozen, opt, batch_sh = run_steps(model, params, tokens, mesh)
    np.testing.assert_allclose(losses, loss_ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=2e-5),
                 t, t_ref)
    # every factor is laid out as specs() promised
    adapted_specs = jlora.sharding.specs(jlora.combine(t, frozen), train.decoder_specs(params))
    want, _ = jlora.split(jlora.sharding.named(adapted_specs, mesh))
    jax.tree.map(lambda arr, sh: _assert_sharding(arr, sh), t, want)


def _assert_sharding(arr, sharding):
    assert arr.sharding.is_equivalent_to(sharding, arr.ndim), (arr.sharding, sharding)


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 1, "tensor": 4},
                                   {"data": 1, "fsdp": 1, "tensor": 8}])
def test_tensor_parallel_step_never_gathers_a_base_weight(shape):
    model, params, tokens = small_model()
    mesh = train.make_mesh(shape)
    step, t, opt, frozen, batch_sh = train.build(model, params, mesh)
    hlo = step.lower(t, opt, frozen, jax.device_put(tokens, batch_sh)).compile().as_text()
    gathered = re.findall(r"= (f32\[[\d,]+\])[^=]*? all-gather\(", hlo)
    full_shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params) if x.ndim == 2}
    assert not set(gathered) & full_shapes, set(gathered) & full_shapes


def test_sharded_apply_creates_sharded_factors():
    model, params, tokens = small_model()
    mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_specs = train.decoder_specs(params)
    placed = jax.device_put(params, jlora.sharding.named(base_specs, mesh))
    adapted = jlora.sharding.apply(placed, train.LORA_SPEC, key=jax.random.key(3), mesh=mesh,
                                   base_specs=base_specs)
    q = adapted["layers_0"]["query"]["kernel"]
    assert q.a.sharding.spec == P("fsdp", None) and q.b.sharding.spec == P(None, "tensor")
    assert q.base.sharding.spec == P("fsdp", "tensor")
    # same values as the unsharded init
    plain = jlora.apply(params, train.LORA_SPEC, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(q.a), np.asarray(plain["layers_0"]["query"]["kernel"].a))


def test_pmap_step_equals_single_device(reference):
    model, params, tokens, t_ref, loss_ref = reference
    step, t, opt, frozen = train.build_pmap(model, params, lr=1e-2)
    n = jax.local_device_count()
    for _ in range(2):
        t, opt, loss = step(t, opt, frozen, tokens.reshape(n, -1, tokens.shape[-1]))
    np.testing.assert_allclose(float(loss[0]), loss_ref[-1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a[0]), b, rtol=2e-4, atol=2e-5),
                 t, t_ref)


def test_train_script_lowers_the_loss():
    first = train.main(["--mesh", "data=2,tensor=4", "--d-model", "64", "--layers", "1",
                        "--vocab", "64", "--seq", "16", "--steps", "1"])
    last = train.main(["--mesh", "data=2,tensor=4", "--d-model", "64", "--layers", "1",
                       "--vocab", "64", "--seq", "16", "--steps", "30", "--lr", "1e-2"])
    assert last < first


def test_place_puts_factors_where_specs_say():
    model, params, tokens = small_model()
    mesh = train.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    adapted = jlora.apply(params, train.LORA_SPEC, key=jax.random.key(0))
    placed = jlora.sharding.place(adapted, mesh, train.decoder_specs(params))
    out = placed["layers_1"]["out"]["kernel"]  # row-parallel: inputs sharded over tensor
    assert out.base.sharding.spec == P("tensor", "fsdp")
    assert out.a.sharding.spec == P("tensor", None) and out.b.sharding.spec == P(None, "fsdp")
    assert len(out.a.addressable_shards) == 8 and out.a.addressable_shards[0].data.shape == (16, 8)


def test_dora_magnitude_follows_the_output_axis():
    params = {"q": {"kernel": jnp.ones((8, 8))}}
    adapted = jlora.apply(params, jlora.Spec({"q/kernel": jlora.DoRA(rank=2)}), key=jax.random.key(0))
    s = jlora.sharding.specs(adapted, {"q": {"kernel": P("fsdp", "tensor")}})
    assert s["q"]["kernel"].m == P("tensor") and s["q"]["kernel"].a == P("fsdp", None)


@pytest.mark.parametrize("variant", ["lora_plus", "bar", "flora", "mezo", "flat_lora", "adalora"])
def test_optimisers_on_a_mesh_match_single_device(variant):
    import optax

    model, params, tokens = small_model()
    spec = train.LORA_SPEC if variant != "adalora" else jlora.Spec(
        {"**/layers_*/{query,value}/kernel": jlora.AdaLoRA(init_rank=4, target_rank=2)})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    adapted = jax.tree.map(lambda x: x.replace(**{f: getattr(x, f) + 0.01 for f in x.trainable})
                           if jlora.is_node(x) else x, adapted, is_leaf=jlora.is_node)
    trainable, frozen = jlora.split(adapted)
    # SGD inside: Adam would amplify harmless reduction-order differences of near-zero grads
    tx = {"lora_plus": lambda: jlora.optim.lora_plus(optax.sgd, 1e-2),
          "bar": lambda: optax.chain(jlora.optim.bar(0.05), optax.sgd(1e-2)),
          "flora": lambda: optax.chain(jlora.optim.flora(rank=2, min_dim=8), optax.scale(-1e-2)),
          "adalora": lambda: jlora.optim.adalora(optax.sgd(1e-2), total_steps=4, final_warmup=1),
          }.get(variant, lambda: optax.sgd(1e-2))()

    def loss_fn(t, i):
        p = jlora.combine(t, frozen)
        if variant == "flat_lora":
            p = jlora.optim.flat_lora(p, jax.random.key(i), step=i + 1, total_steps=4)
        return lm_loss_of(model, p, tokens)

    def step(t, opt, i):
        if variant == "mezo":
            t, loss = jlora.optim.mezo_sgd(loss_fn, t, jax.random.key(i), i, lr=1e-2, eps=1e-2)
            return t, opt, loss
        loss, g = jax.value_and_grad(loss_fn)(t, i)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt, loss

    def run(t):
        opt = tx.init(t)
        jstep = jax.jit(step)
        for i in range(3):
            t, opt, loss = jstep(t, opt, i)
        return t, loss

    ref_t, ref_loss = run(trainable)
    mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    t_specs, _ = jlora.split(jlora.sharding.specs(adapted, train.decoder_specs(params)))
    sharded = jax.device_put(trainable, jlora.sharding.named(t_specs, mesh))
    got_t, got_loss = run(sharded)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    # MeZO divides a loss difference by 2·eps, which magnifies reduction-order rounding
    atol = 1e-4 if variant == "mezo" else 2e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                                         atol=atol), got_t, ref_t)


def lm_loss_of(model, p, tokens):
    from experiments.models.decoder import lm_loss

    return lm_loss(jlora.linen.apply(model, {"params": p}, tokens), tokens)


def test_specs_read_back_from_their_own_output():
    """A spec tree shaped like the adapted tree (what specs returns) is accepted: a QLoRA
    node's base spec comes back from its codes' (structured) or factors' (flat codes)
    specs, never from its dequantizing base property."""
    params = {"l": jnp.ones((64, 32)), "q": jnp.ones((64, 32)), "f": jnp.ones((8, 12)),
              "e": jnp.ones((2, 64, 32)), "o": jnp.ones((2, 32, 64))}
    spec = jlora.Spec({"l": jlora.LoRA(rank=2), "q": jlora.QLoRA(rank=2),
                       "f": jlora.QLoRA(rank=2),  # 8 inputs < block 64: flat codes
                       "e": jlora.QLoRA(rank=2, expert_axis=0),
                       "o": jlora.QLoRA(rank=2, expert_axis=0, in_axes=(2,))})
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    base = {"l": P("fsdp", "tensor"), "q": P("fsdp", "tensor"), "f": P(None, "tensor"),
            "e": P("expert", None, "tensor"), "o": P("expert", "tensor", "fsdp")}
    first = jlora.sharding.specs(adapted, base)
    assert first["f"].quantized.codes == P(None)  # flat: nothing to read the base from
    assert jlora.sharding.specs(adapted, first) == first


def test_quantized_codes_and_scales_fit_the_mesh():
    """A row-parallel base (input axis over 4 devices) with 64-value blocks stores 2 block
    scales a row: place and sharding.apply replicate that axis (codes stay sharded), and
    the placed node merges to what the unplaced one does."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64)),
              "e": jax.random.normal(jax.random.key(1), (4, 128, 64))}
    spec = jlora.Spec({"w": jlora.QLoRA(rank=2), "e": jlora.QLoRA(rank=2, expert_axis=0)})
    base = {"w": P("tensor", None), "e": P(None, "tensor", None)}
    adapted = jlora.apply(params, spec, key=jax.random.key(2))
    fitted = jlora.sharding.specs(adapted, base, mesh=mesh)
    assert (fitted["w"].quantized.codes, fitted["w"].quantized.absmax) == (P(None, "tensor"),
                                                                           P(None, None))
    assert fitted["e"].quantized.absmax == P(None, None, None)
    assert fitted["e"].quantized.codes == P(None, None, "tensor")
    placed = jlora.sharding.place(adapted, mesh, base)
    assert placed["w"].quantized.codes.sharding.spec == P(None, "tensor")
    made = jlora.sharding.apply(params, spec, key=jax.random.key(2), mesh=mesh, base_specs=base)
    want = jlora.merge(adapted)
    for tree in (placed, made):
        merged = jax.jit(jlora.merge)(tree)
        for k in ("w", "e"):
            np.testing.assert_allclose(np.asarray(merged[k]), np.asarray(want[k]),
                                       rtol=1e-6, atol=1e-6)


def test_specs_read_back_from_mesh_fitted_specs():
    """Mesh-fitted codes drop the mesh axes that do not divide the packed input axis (4
    inputs, 4-value blocks: 2 code bytes a row over tensor=4); reading the base spec back
    from such a tree takes it from the factors (whose folds name the base's axes whole),
    so a fitted spec tree given back to specs with the same mesh gives itself."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    params = {"w": jax.random.normal(jax.random.key(0), (4, 8)),
              "e": jax.random.normal(jax.random.key(1), (2, 4, 8)),
              "c": jax.random.normal(jax.random.key(2), (2, 4, 8))}
    spec = jlora.Spec({"w": jlora.QLoRA(rank=2, block_size=4),
                       "e": jlora.QLoRA(rank=2, block_size=4, expert_axis=0),
                       # two input axes fold into a's rows: the codes tell them apart
                       "c": jlora.QLoRA(rank=2, block_size=4, in_axes=(0, 1))})
    base = {"w": P("tensor", "fsdp"), "e": P(None, "tensor", "fsdp"), "c": P("fsdp", "tensor", None)}
    adapted = jlora.apply(params, spec, key=jax.random.key(3))
    once = jlora.sharding.specs(adapted, base, mesh=mesh)
    # the fitted codes lost the input axis's tensor sharding; the factors kept it
    assert once["w"].quantized.codes == P("fsdp", None) and once["w"].a == P("tensor", None)
    assert once["e"].quantized.codes == P(None, "fsdp", None)
    assert once["c"].quantized.codes == P(None, "fsdp", None)
    assert once["c"].a == P(("fsdp", "tensor"), None)
    twice = jlora.sharding.specs(adapted, once, mesh=mesh)
    assert (twice["w"].a, twice["e"].a, twice["c"].a) == (
        P("tensor", None), P(None, "tensor", None), P(("fsdp", "tensor"), None))
    assert twice == once
    assert jlora.sharding.specs(adapted, jlora.sharding.specs(adapted, base)) == (
        jlora.sharding.specs(adapted, base))


def test_specs_read_back_a_bias_node():
    """GLoRA's bias node has no base-role field: its base spec is its output-role one."""
    params = {"d": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)}}
    adapted = jlora.apply(params, jlora.Spec({"d/kernel": jlora.GLoRA()}), key=jax.random.key(0))
    first = jlora.sharding.specs(adapted, {"d": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}})
    assert first["d"]["bias"].base == P("tensor") and first["d"]["bias"].kernel == P(None, "tensor")
    assert jlora.sharding.specs(adapted, first) == first


def test_a_spec_longer_than_its_leaf_names_the_path():
    params = {"q": {"kernel": jnp.ones((8, 8))}, "n": {"scale": jnp.ones(8)}}
    adapted = jlora.apply(params, jlora.Spec({"q/kernel": jlora.LoRA(rank=2)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"specs: q/kernel: PartitionSpec P\('x', 'y', 'z'\) has "
                                         "more entries than the base's 2 axes"):
        jlora.sharding.specs(adapted, {"q": {"kernel": P("x", "y", "z")}, "n": {"scale": None}})
    with pytest.raises(ValueError, match=r"specs: n/scale: PartitionSpec P\('x', 'y'\) has more "
                                         "entries than the base's 1 axes"):
        jlora.sharding.specs(adapted, {"q": {"kernel": P("x", "y")}, "n": {"scale": P("x", "y")}})
