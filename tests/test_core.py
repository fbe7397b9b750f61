"""apply / split / combine / merge / unmerge / summary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64, lora_merged_ref, perturb


def make_params():
    rng = np.random.default_rng(0)
    return {
        "enc": {
            "layers_0": {"attn": {"query": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32),
                                            "bias": jnp.zeros(8)},
                                  "value": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}},
                         "ln": {"scale": jnp.ones(8)}},
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)},
    }


SPEC = jlora.Spec({
    "**/attn/{query,value}/kernel": jlora.LoRA(rank=2, alpha=4),
    "head/kernel": jlora.Full(),
})


def test_apply_is_pure_and_keeps_structure():
    params = make_params()
    before = jax.tree.map(np.asarray, params)
    adapted = jlora.apply(params, SPEC, key=jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
    node = adapted["enc"]["layers_0"]["attn"]["query"]["kernel"]
    assert node.base is params["enc"]["layers_0"]["attn"]["query"]["kernel"] or np.array_equal(node.base, before["enc"]["layers_0"]["attn"]["query"]["kernel"])
    assert node.a.shape == (8, 2) and node.b.shape == (2, 8)
    # unmatched leaves stay plain arrays
    assert isinstance(adapted["enc"]["layers_0"]["ln"]["scale"], jax.Array)
    # static config is metadata, not leaves: only arrays are visible to jax
    for leaf in jax.tree.leaves(adapted):
        assert isinstance(leaf, jax.Array)


def test_split_combine_roundtrip_and_trainable_content():
    adapted = jlora.apply(make_params(), SPEC, key=jax.random.key(0))
    trainable, frozen = jlora.split(adapted)
    shapes = sorted(x.shape for x in jax.tree.leaves(trainable))
    assert shapes == [(2, 8), (2, 8), (8, 2), (8, 2), (8, 3)]  # factors + Full head
    assert all(x.shape != (8, 8) for x in jax.tree.leaves(trainable))
    back = jlora.combine(trainable, frozen)
    assert jax.tree.structure(back, is_leaf=jlora.is_node) == jax.tree.structure(adapted, is_leaf=jlora.is_node)
    jax.tree.map(np.testing.assert_array_equal, back, adapted)


def test_optimizer_state_exists_only_for_trainable():
    adapted = jlora.apply(make_params(), SPEC, key=jax.random.key(0))
    trainable, frozen = jlora.split(adapted)
    opt_state = optax.adam(1e-3).init(trainable)
    n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert n_state == 2 * jlora.count_trainable(trainable) == 2 * (4 * 16 + 24)


def test_gradients_flow_only_to_trainable():
    params = make_params()
    adapted = perturb(jlora.apply(params, SPEC, key=jax.random.key(0)))
    trainable, frozen = jlora.split(adapted)
    x = jnp.ones((2, 8))

    def loss(t):
        p = jlora.merge(jlora.combine(t, frozen))
        h = x @ p["enc"]["layers_0"]["attn"]["query"]["kernel"] @ p["enc"]["layers_0"]["attn"]["value"]["kernel"]
        return jnp.sum((h @ p["head"]["kernel"]) ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_merge_reference_and_unmerge_roundtrip():
    params = make_params()
    adapted = perturb(jlora.apply(params, SPEC, key=jax.random.key(0)))
    merged = jlora.merge(adapted)
    q = adapted["enc"]["layers_0"]["attn"]["query"]["kernel"]
    np.testing.assert_allclose(f64(merged["enc"]["layers_0"]["attn"]["query"]["kernel"]),
                               lora_merged_ref(q.base, q.a, q.b, 2.0), atol=1e-5)
    np.testing.assert_array_equal(merged["head"]["kernel"], adapted["head"]["kernel"].value)
    restored = jlora.unmerge(merged, adapted)
    for path in ("query", "value"):
        np.testing.assert_allclose(f64(restored["enc"]["layers_0"]["attn"][path]["kernel"]),
                                   f64(params["enc"]["layers_0"]["attn"][path]["kernel"]), atol=1e-5)


def test_task_switching_on_merged_weights():
    params = make_params()
    spec = jlora.Spec({"**/attn/{query,value}/kernel": jlora.LoRA(rank=2)})
    task1 = perturb(jlora.apply(params, spec, key=jax.random.key(1)), seed=10)
    task2 = perturb(jlora.apply(params, spec, key=jax.random.key(2)), seed=20)
    served = jlora.merge(task1)
    switched = jlora.merge(task2, onto=jlora.unmerge(served, task1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), switched, jlora.merge(task2))


def test_unmerge_reports_missing_paths():
    adapted = jlora.apply(make_params(), SPEC, key=jax.random.key(0))
    with pytest.raises(ValueError, match="enc/layers_0/attn/query/kernel"):
        jlora.unmerge({"head": {"kernel": jnp.zeros((8, 3))}}, adapted)


def test_combine_mismatch_is_a_clear_error():
    a = jlora.apply(make_params(), SPEC, key=jax.random.key(0))
    t, _ = jlora.split(a)
    _, f2 = jlora.split(jlora.apply(make_params(), jlora.Spec({"head/kernel": jlora.Full()}), key=jax.random.key(0)))
    with pytest.raises(ValueError, match="same structure"):
        jlora.combine(t, f2)


def test_summary_table():
    adapted = jlora.apply(make_params(), SPEC, key=jax.random.key(0))
    text = jlora.summary(adapted)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "method", "shape", "rank", "trainable"]
    row = next(l for l in lines if l.startswith("enc/layers_0/attn/query/kernel"))
    assert row.split() == ["enc/layers_0/attn/query/kernel", "LoRA", "8x8", "2", "32"]
    assert next(l for l in lines if l.startswith("head/kernel")).split()[1:] == ["Full", "8x3", "-", "24"]
    # base: 64+8+64+8+24 = 168 plus 64 factor params
    assert lines[-1] == "trainable 88 of 232 parameters (37.93%)"


def test_jit_merge_and_no_retrace():
    import chex

    adapted = perturb(jlora.apply(make_params(), SPEC, key=jax.random.key(0)))
    trainable, frozen = jlora.split(adapted)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(t, fr):
        return jlora.merge(jlora.combine(t, fr))

    out1 = f(trainable, frozen)
    trainable2 = jax.tree.map(lambda x: x + 1.0, trainable)
    out2 = f(trainable2, frozen)  # new values, same structure: no retrace
    assert not np.allclose(out1["enc"]["layers_0"]["attn"]["query"]["kernel"],
                           out2["enc"]["layers_0"]["attn"]["query"]["kernel"])


def test_apply_reports_every_spec_problem_at_once():
    params = {"enc": {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
                      "ids": jnp.zeros((4, 4), jnp.int32), "mask": jnp.zeros((4, 4), bool)}}
    spec = jlora.Spec({
        "enc/q/kernel": jlora.LoRA(rank=5),        # rank above min(fan_in, fan_out)
        "enc/ids": jlora.LoRA(rank=1),             # integer leaf
        "enc/mask": jlora.Full(),                  # boolean leaf
        "enc/k/kernel": jlora.LoRA(rank=1),        # matches nothing
        "enc/*/kernel": jlora.LoRA(rank=1),        # shadowed by the first rule
    })
    with pytest.raises(ValueError) as err:
        jlora.apply(params, spec, key=jax.random.key(0))
    msg = str(err.value)
    assert msg.startswith("jlora.apply: 5 spec problem(s)")
    for part in ("enc/q/kernel: rank 5 exceeds min(fan_in, fan_out) = 4",
                 "enc/ids: LoRA needs a floating-point leaf, got dtype int32",
                 "enc/mask: Full needs a floating-point leaf, got dtype bool",
                 "'enc/k/kernel' matches no leaf",
                 "'enc/*/kernel' only matches leaves that an earlier rule already claims"):
        assert part in msg, msg


@pytest.mark.parametrize("which", ["trainable", "frozen"])
def test_halves_are_refused_where_a_whole_tree_is_needed(which):
    params = make_params()
    adapted = jlora.apply(params, SPEC, key=jax.random.key(0))
    half = dict(zip(("trainable", "frozen"), jlora.split(adapted)))[which]
    base_specs = jax.tree.map(lambda _: None, params)
    calls = {
        "jlora.merge": lambda: jlora.merge(half),
        "jlora.summary": lambda: jlora.summary(half),
        "jlora.sharding.specs": lambda: jlora.sharding.specs(half, base_specs),
    }
    if which == "frozen":  # no factors: no delta to add or remove
        calls["jlora.merge"] = lambda: jlora.merge(half, onto=params)
        calls["jlora.unmerge"] = lambda: jlora.unmerge(params, half)
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}: enc/layers_0/attn/query/kernel is a node "
                                             f"of the {which} half.*combine the halves first"):
            call()


def test_deltas_of_a_trainable_half_merge_onto_params():
    params = make_params()
    adapted = perturb(jlora.apply(params, SPEC, key=jax.random.key(0)))
    trainable, _ = jlora.split(adapted)
    for got, want in zip(jax.tree.leaves(jlora.merge(trainable, onto=params)),
                         jax.tree.leaves(jlora.merge(adapted))):
        np.testing.assert_array_equal(got, want)
    # LoRA-FA's trainable half lacks the frozen ``a``: its delta needs the other half
    fa = jlora.apply(params, jlora.Spec({"head/kernel": jlora.LoRA(rank=2, train_a=False)}),
                     key=jax.random.key(1))
    with pytest.raises(ValueError, match="jlora.unmerge: head/kernel is a node of the trainable "
                                         "half.*combine the halves first"):
        jlora.unmerge(params, jlora.split(fa)[0])


def test_merge_keeps_a_bf16_base_in_bf16():
    k0 = jax.random.normal(jax.random.key(0), (8, 6)).astype(jnp.bfloat16)
    adapted = perturb(jlora.apply({"k": k0}, jlora.Spec({"k": jlora.LoRA(rank=2, alpha=4)}),
                                  key=jax.random.key(1)))
    node = adapted["k"]
    merged = jlora.merge(adapted)["k"]
    onto = jlora.merge(adapted, onto={"k": k0})["k"]
    assert merged.dtype == onto.dtype == jnp.bfloat16
    ref = lora_merged_ref(k0, node.a, node.b, node.scale)
    # one rounding to bf16 of the float32 sum: within half a bf16 ulp (2**-8 relative)
    np.testing.assert_allclose(f64(merged), ref, rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(f64(onto), ref, rtol=2 ** -8, atol=1e-6)
    assert jlora.unmerge({"k": merged}, adapted)["k"].dtype == jnp.bfloat16


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_trainable_half_whose_delta_needs_frozen_factors_is_refused(init):
    rng = np.random.default_rng(0)
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}}
    adapted = jlora.apply(params, jlora.Spec({"w/kernel": jlora.LoRA(rank=2, init=init)}),
                          key=jax.random.key(0))
    node = adapted["w"]["kernel"]
    adapted["w"]["kernel"] = node.replace(a=node.a + 0.5)  # "trained"
    trainable, frozen = jlora.split(adapted)
    for call in (lambda: jlora.merge(trainable, onto=params),
                 lambda: jlora.unmerge(jlora.merge(adapted), trainable)):
        with pytest.raises(ValueError, match=r"w/kernel is a node of the trainable half .* also "
                                             r"needs the frozen \['a0', 'b0'\]"):
            call()
    # combined, the delta is s·(a·b − a0·b0) onto the original weight
    n = adapted["w"]["kernel"]
    want = (np.asarray(params["w"]["kernel"], np.float64) + n.scale * (
        np.asarray(n.a, np.float64) @ np.asarray(n.b, np.float64)
        - np.asarray(n.a0, np.float64) @ np.asarray(n.b0, np.float64)))
    np.testing.assert_allclose(jlora.merge(jlora.combine(trainable, frozen), onto=params)["w"]["kernel"],
                               want, rtol=1e-5, atol=1e-5)


def test_two_leaves_with_one_path_are_refused_not_given_one_adapter():
    params = {"a/kernel": jnp.ones((2, 2)), "a": {"kernel": 2 * jnp.ones((2, 2))}}
    spec = jlora.Spec({"**kernel": jlora.LoRA(rank=1)})
    with pytest.raises(ValueError, match=r"jlora.apply: 1 path\(s\) name more than one leaf, "
                                         r"e.g. 'a/kernel'"):
        jlora.apply(params, spec, key=jax.random.key(0))
    adapted = jlora.apply({"a": {"kernel": jnp.ones((2, 2))}}, spec, key=jax.random.key(0))
    with pytest.raises(ValueError, match="jlora.merge: 1 path"):
        jlora.merge(adapted, onto=params)


def test_a_module_adapter_beside_list_layers_is_refused_by_path():
    params = {"layers": {0: {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
                         1: {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}}
    with pytest.raises(ValueError, match=r"layers/0: AdaptFormer stores its node beside the "
                                         r"module, under a string key, but layers has integer keys"):
        jlora.apply(params, jlora.Spec({"layers/0": jlora.AdaptFormer(bottleneck=2)}),
                    key=jax.random.key(0))


def test_combine_names_the_path_where_the_halves_differ():
    params = {f"layer_{i}": {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
              for i in range(8)}
    two = jlora.Spec({"**/kernel": jlora.LoRA(rank=2)})
    three = jlora.Spec({"layer_7/q/kernel": jlora.LoRA(rank=3), "**/kernel": jlora.LoRA(rank=2)})
    _, frozen = jlora.split(jlora.apply(params, two, key=jax.random.key(0)))
    trainable, _ = jlora.split(jlora.apply(params, three, key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"at layer_7/q/kernel the trainable half holds "
                                         r"LoRA\(rank=3"):
        jlora.combine(trainable, frozen)


def test_merge_onto_an_integer_leaf_is_refused():
    adapted = jlora.apply({"w": jnp.ones((4, 4))}, jlora.Spec({"w": jlora.LoRA(rank=2)}),
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match="jlora.merge: w: params leaf has dtype int32"):
        jlora.merge(adapted, onto={"w": jnp.ones((4, 4), jnp.int32)})


@pytest.mark.parametrize("config,trainable", [
    (jlora.LoRA(rank=4), 384), (jlora.LoRA(rank=4, train_a=False), 128),
    (jlora.LoRA(rank=4, init="mica"), 256), (jlora.LoRA(rank=4, init="pissa"), 384),
], ids=["lora", "lora-fa", "mica", "pissa"])
def test_summary_counts_frozen_factors_the_model_holds(config, trainable):
    """64x32 kernel, rank 4: the model holds 2048 + 64·4 + 4·32 = 2432 parameters whatever
    trains (PEFT counts a frozen lora_A); PiSSA's a0, b0 are copies, not parameters."""
    adapted = jlora.apply({"w": jnp.ones((64, 32))}, jlora.Spec({"w": config}),
                          key=jax.random.key(0))
    assert jlora.summary(adapted).splitlines()[-1].startswith(
        f"trainable {trainable:,} of 2,432 parameters")
