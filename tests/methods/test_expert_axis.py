"""``expert_axis=0`` on every factorized method: independent per-slice adapters on a
stacked kernel ``(E, in, out)`` with an exact merge, checked slice by slice against
float64 numpy formulas; the nn.scan fast path; sharding on an expert mesh axis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64

E, DIN, DOUT = 3, 6, 5


def randomize(node, seed):
    """Every trainable field random, so each slice's delta is visible."""
    rng = np.random.default_rng(seed)
    return node.replace(**{f: jnp.asarray(rng.normal(size=getattr(node, f).shape) * 0.3,
                                          getattr(node, f).dtype) for f in node.trainable})


def dora_ref(n, e):
    v = f64(n.base[e]) + n.config.scale * f64(n.a[e]) @ f64(n.b[e])
    return v * f64(n.m[e]) / np.linalg.norm(v, axis=0)


def vera_ref(n, e):
    return f64(n.base[e]) + (f64(n.a[e]) * f64(n.lambda_d[e])) @ f64(n.b[e]) * f64(n.lambda_b[e])


def adalora_ref(n, e):
    return f64(n.base[e]) + n.config.scale * (f64(n.p[e]) * f64(n.lam[e])) @ f64(n.q[e])


def pf2_ref(n, e):
    c = n.config
    return (f64(n.base[e]) + c.scale * f64(n.a[e]) @ f64(n.b[e])
            + c.personal_scale * f64(n.c[e]) @ f64(n.d[e]))


def lora_ref(scale):
    def ref(n, e):  # PiSSA/OLoRA: base is the residual K0 − s·a0·b0
        return f64(n.base[e]) + scale * f64(n.a[e]) @ f64(n.b[e])
    return ref


CASES = {
    "DoRA": (jlora.DoRA(rank=2, alpha=3, expert_axis=0), dora_ref),
    "VeRA": (jlora.VeRA(rank=4, expert_axis=0), vera_ref),
    "AdaLoRA": (jlora.AdaLoRA(init_rank=3, target_rank=2, alpha=6, expert_axis=0), adalora_ref),
    "PF2LoRA": (jlora.PF2LoRA(2, 1, alpha=4, personal_alpha=3, expert_axis=0), pf2_ref),
    "rsLoRA": (jlora.LoRA(rank=2, alpha=4, rslora=True, expert_axis=0), lora_ref(4 / 2 ** 0.5)),
    "LoRA-FA": (jlora.LoRA(rank=2, train_a=False, expert_axis=0), lora_ref(1.0)),
    "PiSSA": (jlora.LoRA(rank=2, init="pissa", expert_axis=0), lora_ref(1.0)),
    "OLoRA": (jlora.LoRA(rank=2, init="olora", expert_axis=0), lora_ref(1.0)),
    "DoRA-divide": (jlora.DoRA(rank=6, expert_axis=0, rank_per_expert="divide",
                               in_axes=(-2,)), dora_ref),
}


def build(cfg, w, key):
    return jlora.apply({"w": w}, jlora.Spec({"w": cfg}), key=key)["w"]


def merge(node):
    return jlora.merge({"w": node})["w"]


@pytest.mark.parametrize("name", list(CASES))
def test_stacked_merge_equals_per_slice_formula(name):
    cfg, ref = CASES[name]
    w = jax.random.normal(jax.random.key(0), (E, DIN, DOUT))
    node = build(cfg, w, jax.random.key(1))
    np.testing.assert_allclose(f64(merge(node)), f64(w), atol=2e-5)  # init
    if name in ("PiSSA", "OLoRA"):  # each slice's own factorization of its own weight
        for e in range(E):
            np.testing.assert_allclose(f64(node.base[e]) + f64(node.a0[e]) @ f64(node.b0[e]),
                                       f64(w[e]), atol=2e-5)
        u, s, vt = np.linalg.svd(f64(w[1]))
        if name == "PiSSA":
            np.testing.assert_allclose(f64(node.a0[1]) @ f64(node.b0[1]),
                                       (u[:, :2] * s[:2]) @ vt[:2], atol=2e-5)
    node = randomize(node, 2)
    if name == "LoRA-FA":
        assert node.trainable == ("b",) and jlora.split({"w": node})[0]["w"].a is None
    merged = f64(merge(node))
    slices = [ref(node, e) for e in range(E)]
    np.testing.assert_allclose(merged, np.stack(slices), rtol=1e-5, atol=1e-5)
    # slices are independent: each slice's delta depends on its own factors only
    assert not np.allclose(slices[0] - f64(w[0]), slices[1] - f64(w[1]))
    # the expert dispatch (einsum) and merge / unmerge
    x = jax.random.normal(jax.random.key(3), (E, 4, DIN))
    np.testing.assert_allclose(f64(jlora.experts.einsum("ecd,edf->ecf", x, node)),
                               np.einsum("ecd,edf->ecf", f64(x), merged), rtol=1e-4, atol=1e-4)
    back = jlora.unmerge({"w": jnp.asarray(merged, jnp.float32)}, {"w": node})["w"]
    np.testing.assert_allclose(f64(back), f64(node.base) if name not in ("PiSSA", "OLoRA")
                               else f64(w), atol=1e-4)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(DIN, use_bias=False,
                            kernel_init=nn.initializers.normal(0.3))(jnp.tanh(h)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=E)(name="blocks")(x, None)
        return h


@pytest.mark.parametrize("name", ["DoRA"])
def test_stacked_method_fast_path_inside_nn_scan_and_training(name):
    """Each nn.scan iteration gets its layer's slice of the node and runs the
    method's own fast path; against the per-layer numpy loop, gradients against
    the merged model's, and one SGD step lowers the loss."""
    cfg, ref = CASES[name]
    model, x = Scanned(), jax.random.normal(jax.random.key(0), (4, DIN))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"blocks/**/kernel": cfg}), key=jax.random.key(2))
    node = randomize(adapted["blocks"]["Dense_0"]["kernel"], 5)
    adapted = {"blocks": {"Dense_0": {"kernel": node}}}
    assert jlora.linen.consumed(model, {"params": adapted}, x)["factorized"] == [
        "blocks/Dense_0/kernel"]
    h = f64(x)
    for e in range(E):
        h = h + np.tanh(h) @ ref(node, e)
    np.testing.assert_allclose(f64(jlora.linen.apply(model, {"params": adapted}, x)), h,
                               rtol=1e-4, atol=1e-4)
    t, f = jlora.split(adapted)

    def loss(t, fast):
        a = jlora.combine(t, f)
        y = (jlora.linen.apply(model, {"params": a}, x) if fast
             else model.apply({"params": jlora.merge(a)}, x))
        return jnp.mean(y ** 2)

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l0, g), (_, g_ref) = vg(t, True), vg(t, False)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    l1, _ = vg(jax.tree.map(lambda p, d: p - 1e-3 * d, t, g), True)
    assert float(l1) < float(l0)


def test_stacked_adalora_allocator_and_orthogonality_per_slice():
    w = jax.random.normal(jax.random.key(0), (E, DIN, DOUT))
    node = randomize(build(CASES["AdaLoRA"][0], w, jax.random.key(1)), 4)
    t, f = jlora.split({"w": node})
    # the mean over the 2E factor matrices (p and q of every slice counted separately)
    want = np.mean([np.linalg.norm(f64(node.p[e]).T @ f64(node.p[e]) - np.eye(3))
                    for e in range(E)] + [np.linalg.norm(f64(node.q[e]) @ f64(node.q[e]).T
                                                         - np.eye(3)) for e in range(E)])
    np.testing.assert_allclose(float(jlora.optim.adalora_orthogonality(t)), want, rtol=1e-5)
    # the allocator on the stack equals the allocator on E separate matrices
    flat = {f"w{e}": jax.tree.map(lambda v: v[e], t["w"]).replace(
        config=jlora.AdaLoRA(init_rank=3, target_rank=2, alpha=6), shape=(DIN, DOUT),
        in_axes=(0,)) for e in range(E)}
    rng = np.random.default_rng(7)
    grads = [jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), t)
             for _ in range(4)]

    def run(params, to_tree):
        opt = jlora.optim.adalora(optax.sgd(1e-2), total_steps=4, init_warmup=1,
                                  final_warmup=1, delta_t=1)
        state = opt.init(params)
        for g in grads:
            u, state = opt.update(to_tree(g), state, params)
            params = optax.apply_updates(params, u)
        return params

    stacked = jax.jit(run, static_argnums=1)(t, lambda g: g)["w"]
    split = jax.jit(run, static_argnums=1)(flat, lambda g: {
        f"w{e}": jax.tree.map(lambda v: v[e], g["w"]).replace(
            config=flat["w0"].config, shape=(DIN, DOUT), in_axes=(0,)) for e in range(E)})
    kept = np.stack([f64(split[f"w{e}"].lam) for e in range(E)])
    assert 0 < int(np.sum(kept == 0)) and int(np.sum(f64(stacked.lam) == 0)) == int(np.sum(kept == 0))
    np.testing.assert_allclose(f64(stacked.lam), kept, rtol=1e-5, atol=1e-6)


def test_stacked_refusals_name_the_reason():
    with pytest.raises(ValueError, match="GLoRA: expert_axis"):
        jlora.GLoRA(expert_axis=0)
    with pytest.raises(ValueError, match="FedDPA"):
        jlora.FedDPA(2, 1, expert_axis=0)
    with pytest.raises(ValueError, match="moveaxis"):
        jlora.VeRA(expert_axis=-1)
    with pytest.raises(ValueError, match="include the expert axis"):
        jlora.apply({"w": jnp.ones((E, DIN, DOUT))},
                    jlora.Spec({"w": jlora.DoRA(rank=2, expert_axis=0, in_axes=(0,))}),
                    key=jax.random.key(0))


def test_stacked_factors_shard_on_the_expert_axis_and_equal_single_device():
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("expert", "tensor"))
    w = jax.random.normal(jax.random.key(0), (4, 16, 8))
    spec = jlora.Spec({"dora/w": jlora.DoRA(rank=2, expert_axis=0),
                       "vera/w": jlora.VeRA(rank=4, expert_axis=0)})
    params = {k: {"w": w + i} for i, k in enumerate(("dora", "vera"))}
    adapted = jax.jit(lambda p: jlora.apply(p, spec, key=jax.random.key(1)))(params)
    adapted = jax.tree.map(lambda n: randomize(n, 1) if jlora.is_node(n) else n, adapted,
                           is_leaf=jlora.is_node)
    base = {k: {"w": P("expert", None, "tensor")} for k in params}
    s = jlora.sharding.specs(adapted, base)
    assert (s["dora"]["w"].a, s["dora"]["w"].b, s["dora"]["w"].m) == (
        P("expert", None, None), P("expert", None, "tensor"), P("expert", "tensor"))
    assert s["vera"]["w"].lambda_d == P("expert") and s["vera"]["w"].lambda_b == P(
        "expert", "tensor")
    placed = jlora.sharding.place(adapted, mesh, base)
    assert placed["dora"]["w"].a.sharding.spec == P("expert", None, None)
    x = jax.random.normal(jax.random.key(3), (4, 5, 16))

    def loss(t, f):
        a = jlora.combine(t, f)
        return sum(jnp.sum(jnp.sin(jlora.experts.einsum("ecd,edf->ecf", x, a[k]["w"])))
                   for k in params)

    grad = jax.jit(jax.value_and_grad(loss))
    (l1, g1), (l2, g2) = grad(*jlora.split(placed)), grad(*jlora.split(adapted))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [jlora.LoRA, jlora.DoRA, jlora.QLoRA])
def test_divided_rank_needs_an_expert_axis(config):
    with pytest.raises(ValueError, match=r"rank_per_expert='divide'.*expert_axis=0"):
        config(rank=8, rank_per_expert="divide")
    assert config(rank=8, rank_per_expert="divide", expert_axis=0).rank_per_expert == "divide"
