"""Mixed-adapter batches: a stacked tree equals per-example single-adapter runs."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64

N, T = 5, 4
IDS = np.array([1, -1, 0, 2, 1], np.int32)


class Net(nn.Module):
    """Every layer type the Linen fast path covers."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(20, 8)(tokens)                      # embedding (20, 8)
        h = nn.Dense(8)(h)                               # (8, 8), (N, T, 8) flattened
        h = nn.DenseGeneral((2, 4), axis=-1)(h)          # (8, 2, 4)
        h = h.reshape(h.shape[:2] + (8,))
        h = nn.Einsum((8, 6), "btd,dk->btk")(h)         # (8, 6)
        return nn.Conv(5, (3,))(jnp.tanh(h))            # (3, 6, 5)


MODEL = Net()
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 20, (N, T)), jnp.int32)
PARAMS = MODEL.init(jax.random.key(0), TOKENS)["params"]


def spec(cfg):
    return jlora.Spec({"DenseGeneral_0/kernel": type(cfg)(**{**_fields(cfg), "in_axes": (0,)}),
                       "*/{kernel,embedding}": cfg})


def _fields(cfg):
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def trained(cfg, seed):
    t = jlora.apply(PARAMS, spec(cfg), key=jax.random.key(seed))
    rng = np.random.default_rng(seed + 50)

    def bump(n):
        if not jlora.is_node(n):
            return n
        new = {f: getattr(n, f) + jnp.asarray(rng.normal(scale=0.3, size=getattr(n, f).shape),
                                              jnp.float32) for f in n.trainable}
        return n.replace(**new)

    return jax.tree.map(bump, t, is_leaf=jlora.is_node)


FAMILIES = {
    "lora": [jlora.LoRA(rank=2, alpha=4), jlora.LoRA(rank=4, alpha=8, rslora=True),
             jlora.LoRA(rank=3)],
    "dora": [jlora.DoRA(rank=2, alpha=4), jlora.DoRA(rank=3), jlora.DoRA(rank=2, alpha=1)],
    "vera": [jlora.VeRA(rank=6), jlora.VeRA(rank=6, d_initial=0.5), jlora.VeRA(rank=6)],
}


_CACHE = {}


def family(name):
    if name not in _CACHE:
        _CACHE[name] = [trained(c, i) for i, c in enumerate(FAMILIES[name])]
    return _CACHE[name]


def per_example(adapters, ids=IDS):
    """Row j from a run of the whole batch with adapter ids[j] alone (examples are independent)."""
    runs = {g: np.asarray(MODEL.apply({"params": PARAMS}, TOKENS) if g < 0 else
                          single_run(*jlora.split(adapters[g]), COT)[0])
            for g in set(ids.tolist())}
    return np.stack([runs[g][j] for j, g in enumerate(ids.tolist())])


COT = jnp.asarray(np.random.default_rng(1).normal(size=(N, T, 5)), jnp.float32)


@jax.jit
def mixed_run(trainable, frozen, ids, cot):
    """The mixed batch's output and the gradient of ``Σ y·cot`` for every stacked adapter."""
    f = lambda t: jlora.linen.apply(MODEL, {"params": jlora.combine(t, frozen)}, TOKENS,
                                    adapter_ids=ids)
    return f(trainable), jax.grad(lambda t: jnp.sum(f(t) * cot))(trainable)


@jax.jit
def single_run(tr, fr, cot):
    """One adapter on the whole batch; the gradient sums the examples ``cot`` keeps."""
    f = lambda t: jlora.linen.apply(MODEL, {"params": jlora.combine(t, fr)}, TOKENS)
    return f(tr), jax.grad(lambda t: jnp.sum(f(t) * cot))(tr)


@pytest.mark.parametrize("name,mode", [("lora", "gather"), ("lora", "onehot"), ("lora", "ragged"),
                                       ("dora", "gather"), ("vera", "onehot")])
def test_mixed_batch_equals_per_example_runs_and_gradients_add_up(name, mode):
    adapters = family(name)
    stacked = jlora.compose.stack(adapters, mode=mode)
    trainable, frozen = jlora.split(stacked)
    y, grads = mixed_run(trainable, frozen, jnp.asarray(IDS), COT)
    want_y = np.asarray(MODEL.apply({"params": PARAMS}, TOKENS))  # rows with id -1
    for g, adapter in enumerate(adapters):
        keep = (IDS == g)[:, None, None]
        y_g, ref = single_run(*jlora.split(adapter), COT * keep)
        want_y = np.where(keep, np.asarray(y_g), want_y)  # each row from its own adapter's run
        for path, node in jlora.tree.leaves_with_paths(ref):
            if not jlora.is_node(node):
                continue
            got = dict(jlora.tree.leaves_with_paths(grads))[path]
            for f in node.trainable:
                want = np.asarray(getattr(node, f))
                mine = np.asarray(getattr(got, f))[g]
                if f in ("a", "b") and want.shape != mine.shape:  # ranks padded with zeros
                    ax = 1 if f == "a" else 0
                    r = want.shape[ax]
                    pad = np.take(mine, np.arange(r, mine.shape[ax]), axis=ax)
                    np.testing.assert_allclose(pad, 0.0, atol=1e-6)
                    mine = np.take(mine, np.arange(r), axis=ax)
                np.testing.assert_allclose(mine, want, atol=1e-4 * (1 + np.abs(want).max()),
                                           err_msg=f"{name} {path}.{f} adapter {g}")
    np.testing.assert_allclose(np.asarray(y), want_y, atol=2e-5, rtol=2e-5)
    hits = jlora.linen.consumed(MODEL, {"params": stacked}, TOKENS, adapter_ids=IDS)
    assert not hits["merged"] and len(hits["factorized"]) == 5


def test_hot_swap_of_stacked_adapters_and_ids_never_retraces():
    adapters = family("lora")
    others = [trained(c, i + 10) for i, c in enumerate(FAMILIES["lora"])]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(stacked, tokens, ids):
        return jlora.linen.apply(MODEL, {"params": stacked}, tokens, adapter_ids=ids)

    for trees, ids in [(adapters, IDS), (others, IDS[::-1].copy()), (others[::-1], IDS)]:
        got = serve(jlora.compose.stack(trees), TOKENS, jnp.asarray(ids))
        np.testing.assert_allclose(np.asarray(got), per_example(trees, ids), atol=2e-5, rtol=2e-5)


def test_bad_ids_and_merging_a_stack_are_refused():
    adapters = family("lora")
    stacked = jlora.compose.stack(adapters)
    run = lambda ids, **kw: jlora.linen.apply(MODEL, {"params": stacked}, TOKENS, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"out of range \[-1, 3\)"):
        run(np.array([0, 1, 3, 0, 0]))
    with pytest.raises(ValueError, match="3 adapter_ids for a batch of 5 examples"):
        run(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="adapter_ids"):
        jlora.linen.apply(MODEL, {"params": stacked}, TOKENS)
    with pytest.raises(ValueError, match="no single merged weight"):
        jlora.merge(stacked)
    # under jit the ids are not known: an out-of-range id gives NaN rows, never a wrong answer
    y = jax.jit(lambda i: jlora.linen.apply(MODEL, {"params": stacked}, TOKENS, adapter_ids=i))(
        jnp.array([0, 7, 1, 0, 0]))
    assert np.isnan(np.asarray(y[1])).all() and np.isfinite(np.asarray(y[0])).all()
    with pytest.raises(ValueError, match="different methods"):
        jlora.compose.stack([adapters[0], trained(jlora.DoRA(rank=2), 5)])
    with pytest.raises(ValueError, match="frozen pairs"):
        jlora.compose.stack([trained(jlora.VeRA(rank=6), 0), trained(jlora.VeRA(rank=6, seed=1), 1)])


def test_nnx_mixed_batch_equals_per_example_runs():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.fc = nnx.Linear(8, 5, rngs=rngs)

        def __call__(self, tokens):
            return self.fc(jnp.tanh(self.embed(tokens)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    trees = [jlora.apply(state, jlora.Spec({"*/{kernel,embedding}": c}), key=jax.random.key(i))
             for i, c in enumerate(FAMILIES["lora"])]
    trees = [jax.tree.map(lambda n, i=i: n.replace(b=n.b + 0.3 * jax.random.normal(
        jax.random.key(i), n.b.shape), a=n.a + 0.1) if jlora.is_node(n) else n, t,
        is_leaf=jlora.is_node) for i, t in enumerate(trees)]
    run = jax.jit(lambda s, i: jlora.nnx.apply(graphdef, s, TOKENS, adapter_ids=i))
    got = np.asarray(run(jlora.compose.stack(trees), jnp.asarray(IDS)))
    for j, g in enumerate(IDS):
        want = (nnx.merge(graphdef, state) if g < 0 else jlora.nnx.merge(graphdef, trees[g]))(
            TOKENS[j:j + 1])
        np.testing.assert_allclose(got[j], np.asarray(want)[0], atol=2e-5, rtol=2e-5)


def _dense_adapters():
    """A Dense(7 -> 5) and four adapters whose methods freeze different factors."""
    model = nn.Dense(5)
    params = model.init(jax.random.key(0), jnp.ones((1, 7)))["params"]
    rng = np.random.default_rng(7)
    cfgs = [jlora.LoRA(rank=2, alpha=4, train_a=False),   # LoRA-FA: a frozen
            jlora.LoRA(rank=3, alpha=6, init="pissa"),    # a0, b0 frozen
            jlora.LoRA(rank=2, init="mica"),              # b frozen
            jlora.LoRA(rank=4, alpha=2, rslora=True)]     # a, b both train
    out = []
    for i, cfg in enumerate(cfgs):
        n = jlora.apply(params, jlora.Spec({"kernel": cfg}), key=jax.random.key(i))["kernel"]
        n = n.replace(a=n.a + jnp.asarray(rng.normal(scale=0.3, size=n.a.shape), jnp.float32),
                      b=n.b + jnp.asarray(rng.normal(scale=0.3, size=n.b.shape), jnp.float32))
        out.append({"kernel": n, "bias": params["bias"]})
    return model, params, out


def _delta64(n):
    """s·(a·b − a0·b0) in float64, the adapter's change to the original kernel."""
    d = n.scale * f64(n.a) @ f64(n.b)
    return d if n.a0 is None else d - n.scale * f64(n.a0) @ f64(n.b0)


@pytest.mark.parametrize("mode", ["gather", "onehot", "ragged"])
def test_stacked_factors_frozen_by_their_method_get_no_gradient_and_never_move(mode):
    model, params, ads = _dense_adapters()
    ids = np.array([3, 0, 1, -1, 2, 0, 1, 3], np.int32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(len(ids), 7)), jnp.float32)
    cot = np.random.default_rng(2).normal(size=(len(ids), 5))
    stacked = jlora.compose.stack(ads, mode=mode)
    node = stacked["kernel"]
    assert node.config.frozen_a == (0,) and node.config.frozen_b == (2,)
    trainable, frozen = jlora.split(stacked)
    t = trainable["kernel"]
    assert t.a_frozen is None and t.b_frozen is None and t.a0 is None and t.b0 is None

    def run(tr):
        return jlora.linen.apply(model, {"params": jlora.combine(tr, frozen)}, x,
                                 adapter_ids=jnp.asarray(ids))

    # forward: x_j·K0 + s_g·x_j·(a_g·b_g − a0_g·b0_g) + bias, float64, against the original K0
    k0, bias = f64(params["kernel"]), f64(params["bias"])
    want = np.stack([f64(x[j]) @ (k0 + (_delta64(ads[g]["kernel"]) if g >= 0 else 0)) + bias
                     for j, g in enumerate(ids)])
    np.testing.assert_allclose(f64(jax.jit(run)(trainable)), want, atol=2e-5, rtol=2e-5)

    grads = jax.jit(jax.grad(lambda tr: jnp.sum(run(tr) * cot)))(trainable)["kernel"]
    np.testing.assert_array_equal(np.asarray(grads.a[0]), 0.0)  # LoRA-FA's a
    np.testing.assert_array_equal(np.asarray(grads.b[2]), 0.0)  # MiCA's b
    for g, ad in enumerate(ads):  # dL/da = s·Xᵀ·G·bᵀ, dL/db = s·aᵀ·Xᵀ·G over g's rows
        n = ad["kernel"]
        xg, gg = f64(x)[ids == g], cot[ids == g]
        r = n.a.shape[1]
        if g != 0:
            np.testing.assert_allclose(f64(grads.a[g][:, :r]), n.scale * xg.T @ gg @ f64(n.b).T,
                                       atol=1e-4, err_msg=f"adapter {g} a")
        if g != 2:
            np.testing.assert_allclose(f64(grads.b[g][:r]), n.scale * f64(n.a).T @ xg.T @ gg,
                                       atol=1e-4, err_msg=f"adapter {g} b")

    # an AdamW step with weight decay moves only what the adapters' own methods train
    opt = optax.adamw(0.1, weight_decay=0.5)
    upd, _ = opt.update(jax.grad(lambda tr: jnp.sum(run(tr) * cot))(trainable),
                        opt.init(trainable), trainable)
    after = jlora.combine(optax.apply_updates(trainable, upd), frozen)["kernel"]
    a_eff, b_eff, sign = after.factors()
    np.testing.assert_array_equal(np.asarray(a_eff[0, :, :2]), np.asarray(ads[0]["kernel"].a))
    np.testing.assert_array_equal(np.asarray(b_eff[2, :2]), np.asarray(ads[2]["kernel"].b))
    p = ads[1]["kernel"]
    np.testing.assert_array_equal(np.asarray(after.a0[1]), np.asarray(p.a0))
    np.testing.assert_array_equal(np.asarray(after.b0[1]), np.asarray(p.b0))
    np.testing.assert_array_equal(np.asarray(sign), [1.0] * 4 + [-1.0] * 3)
    assert not np.allclose(np.asarray(a_eff[3, :, :4]), np.asarray(ads[3]["kernel"].a))


def test_adapter_ids_must_hold_one_id_per_example():
    model, params, ads = _dense_adapters()
    stacked = jlora.compose.stack([ads[3], ads[3]])
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 7)), jnp.float32)
    run = lambda x, ids: jlora.linen.apply(model, {"params": stacked}, x,
                                           adapter_ids=np.asarray(ids, np.int32))
    for ids in ([0, 1], [1]):  # divides the batch of 4, but is not one id per example
        with pytest.raises(ValueError, match=f"kernel: {len(ids)} adapter_ids for a batch of "
                                             "4 examples"):
            run(x, ids)
    with pytest.raises(ValueError, match="kernel: 2 adapter_ids for a batch of 4"):
        jax.jit(lambda x, ids: jlora.linen.apply(model, {"params": stacked}, x, adapter_ids=ids))(
            x, jnp.array([0, 1]))  # the lengths are static: refused under jit too
    # Dense flattens (examples, seq, d) into rows: one id per example, not per row
    x3 = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 7)), jnp.float32)
    with pytest.raises(ValueError, match="kernel: 6 adapter_ids for a batch of 2 examples"):
        run(x3, [0] * 6)
    n = ads[3]["kernel"]
    want = f64(x3) @ (f64(params["kernel"]) + _delta64(n)) + f64(params["bias"])
    got = f64(run(x3, [1, -1]))
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)
    np.testing.assert_allclose(got[1], f64(x3[1]) @ f64(params["kernel"]) + f64(params["bias"]),
                               atol=2e-5)
    # layers that see the example axis directly (Embed, DenseGeneral, Einsum, Conv)
    with pytest.raises(ValueError, match="1 adapter_ids for a batch of 5 examples"):
        jlora.linen.apply(MODEL, {"params": jlora.compose.stack(family("lora"))}, TOKENS,
                          adapter_ids=np.array([0], np.int32))
    from flax import nnx

    graphdef, state = nnx.split(nnx.Linear(7, 5, rngs=nnx.Rngs(0)))
    trees = [jlora.apply(state, jlora.Spec({"kernel": jlora.LoRA(rank=2)}), key=jax.random.key(i))
             for i in range(2)]
    with pytest.raises(ValueError, match="kernel: 2 adapter_ids for a batch of 4 examples"):
        jlora.nnx.apply(graphdef, jlora.compose.stack(trees), x, adapter_ids=jnp.array([0, 1]))


def test_rows_per_example_lays_per_example_entries_over_the_rows():
    """The one check behind stacked adapters' ids and PF2LoRA/FedDPA's per-example weights:
    N entries for N examples, whose rows are the input's leading axis or, flattened, a
    multiple of N; anything else names what was given and both sizes."""
    from jlora.methods.stacked import rows_per_example

    assert rows_per_example("ids", 4, 4, None, "fix") == 1
    assert rows_per_example("ids", 4, 24, 4, "fix") == 6  # (4, 6, d) flattened to (24, d)
    for count, rows, examples in ((3, 4, None), (4, 24, 3), (None, 4, None), (4, 10, 4)):
        n_ex = rows if examples is None else examples
        with pytest.raises(ValueError, match=rf"^ids for a batch of {n_ex} examples \({rows} rows "
                                             r"reaching the layer, .*\): fix$"):
            rows_per_example("ids", count, rows, examples, "fix")
