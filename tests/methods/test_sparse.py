"""Sparse fine-tuning and Fu et al.'s SAM selection against float64 numpy references.

Fu, Yang, So, Lam, Bing, Collier, "On the Effectiveness of Parameter-Efficient
Fine-Tuning", AAAI 2023: θ = θ0 + M·Δθ with ‖m‖₀ = ⌊p·n⌋; SAM keeps the
largest g_i²/h_i of the gradient summed over calibration batches.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from tests._refs import f64


def rng_params(shape=(6, 5), seed=0):
    r = np.random.default_rng(seed)
    return {"a": {"kernel": jnp.asarray(r.normal(size=shape), jnp.float32),
                  "bias": jnp.asarray(r.normal(size=shape[-1]), jnp.float32)},
            "b": {"kernel": jnp.asarray(r.normal(size=shape), jnp.float32)}}


def scatter_ref(base, idx, vals):
    w = f64(base).reshape(-1).copy()
    w[np.asarray(idx)] += f64(vals)
    return w.reshape(np.shape(base))


def test_random_and_magnitude_selection_follow_the_rules():
    params = rng_params((10, 7))
    n, k = 70, math.floor(0.3 * 70)
    rnd = jlora.apply(params, jlora.Spec({"*/kernel": jlora.Sparse(0.3)}), key=jax.random.key(0))
    ia, ib = (np.asarray(rnd[m]["kernel"].indices) for m in "ab")
    for idx in (ia, ib):
        assert idx.dtype == np.int32 and len(idx) == k and len(set(idx.tolist())) == k
        assert (np.diff(idx) > 0).all() and 0 <= idx.min() and idx.max() < n
    assert not np.array_equal(ia, ib)  # keyed by path
    # adding a rule for another leaf does not reshuffle this one's mask
    more = jlora.apply(params, jlora.Spec({"a/kernel": jlora.Sparse(0.3),
                                           "a/bias": jlora.Sparse(0.5)}), key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(more["a"]["kernel"].indices), ia)
    assert len(more["a"]["bias"].indices) == 3  # floor(0.5 * 7)

    w = f64(params["a"]["kernel"]).reshape(-1)
    for largest, want in ((True, np.argsort(-np.abs(w))[:k]), (False, np.argsort(np.abs(w))[:k])):
        spec = jlora.Spec({"a/kernel": jlora.Sparse(0.3, select="magnitude", largest=largest)})
        node = jlora.apply(params, spec, key=jax.random.key(0))["a"]["kernel"]
        np.testing.assert_array_equal(np.asarray(node.indices), np.sort(want))
    # density 1 trains every entry; a tiny density still trains one
    from jlora.methods.sparse import entries
    assert (entries(1.0, n), entries(1e-6, n), entries(0.3, n)) == (n, 1, k)


def test_delta_merge_fast_path_and_storage():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    params = model.init(jax.random.key(1), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"kernel": jlora.Sparse(0.2)}), key=jax.random.key(2))
    node = adapted["kernel"]
    np.testing.assert_array_equal(np.asarray(jlora.merge(adapted)["kernel"]),
                                  np.asarray(params["kernel"]))  # identity at init
    trainable, frozen = jlora.split(adapted)
    assert jlora.count_trainable(trainable) == 6  # floor(0.2 * 30): values only, no dense copy
    assert trainable["kernel"].values.shape == (6,) and trainable["kernel"].base is None
    node = node.replace(values=jnp.linspace(-1.0, 2.0, 6))
    adapted["kernel"] = node
    ref = scatter_ref(node.base, node.indices, node.values)
    np.testing.assert_allclose(f64(node.delta()), ref - f64(node.base), atol=0)
    np.testing.assert_allclose(f64(jlora.merge(adapted)["kernel"]), ref, rtol=1e-6, atol=1e-6)
    served = jlora.merge(adapted)
    np.testing.assert_allclose(f64(jlora.unmerge(served, adapted)["kernel"]),
                               f64(params["kernel"]), atol=1e-6)
    y = jlora.linen.apply(model, {"params": adapted}, x)
    np.testing.assert_allclose(f64(y), f64(x) @ ref + f64(params["bias"]), rtol=1e-5, atol=1e-5)
    # a bfloat16 base merges to bfloat16; values stay float32
    bf = {"w": params["kernel"].astype(jnp.bfloat16)}
    n16 = jlora.apply(bf, jlora.Spec({"w": jlora.Sparse(0.2)}), key=jax.random.key(0))["w"]
    assert n16.values.dtype == jnp.float32 and jlora.merge({"w": n16})["w"].dtype == jnp.bfloat16


def test_training_changes_only_the_chosen_entries():
    model = nn.Dense(3)
    x = jax.random.normal(jax.random.key(0), (32, 8))
    target = jnp.tanh(x[:, :3])
    params = model.init(jax.random.key(1), x)["params"]
    spec = jlora.Spec({"kernel": jlora.Sparse(0.25, select="magnitude")})
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(2)))
    tx = optax.adam(5e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt):
        loss, g = jax.value_and_grad(lambda t: jnp.mean((jlora.linen.apply(
            model, {"params": jlora.combine(t, frozen)}, x) - target) ** 2))(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    first = float(step(trainable, opt)[2])
    for _ in range(60):
        trainable, opt, loss = step(trainable, opt)
    assert float(loss) < 0.8 * first
    merged = f64(jlora.merge(jlora.combine(trainable, frozen))["kernel"]).reshape(-1)
    changed = np.flatnonzero(merged != f64(params["kernel"]).reshape(-1))
    assert set(changed) <= set(np.asarray(frozen["kernel"].indices).tolist()) and len(changed) > 0


def lsq_problem():
    """Least squares L_t(W) = Σ (X_t W − Y_t)², three calibration batches."""
    r = np.random.default_rng(3)
    w0 = r.normal(size=(5, 4))
    xs = [r.normal(size=(7, 5)) * r.uniform(0.2, 3.0, size=5) for _ in range(3)]
    ys = [r.normal(size=(7, 4)) for _ in range(3)]
    params = {"w": jnp.asarray(w0, jnp.float32), "c": jnp.ones(3)}
    batches = [(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) for a, b in zip(xs, ys)]

    def loss(p, batch):
        xb, yb = batch
        return jnp.sum((xb @ p["w"] - yb) ** 2) + jnp.sum(p["c"] ** 2)

    grads = [2 * a.T @ (a @ w0 - b) for a, b in zip(xs, ys)]  # float64, from the formula
    hdiag = sum(2 * (a ** 2).sum(0) for a in xs)[:, None] * np.ones((1, 4))  # ∂²L/∂w_ij²
    return params, batches, loss, grads, hdiag


def topk_ref(score, k):
    return np.sort(np.argsort(-score.reshape(-1), kind="stable")[:k])


def test_sam_selection_matches_the_papers_score():
    params, batches, loss, grads, hdiag = lsq_problem()
    G = sum(grads)
    k = math.floor(0.25 * 20)
    spec = jlora.Spec({"w": jlora.Sparse(0.25, select="sam"), "c": jlora.Full()})
    cases = {None: G ** 2,  # the released code: h constant -> top |g|
             "fisher": G ** 2 / (sum(g ** 2 for g in grads) / 3),
             "exact": G ** 2 / hdiag}  # the paper's g²/h with the true Hessian diagonal
    picks = {}
    for name, score in cases.items():
        hess = {"w": jnp.asarray(hdiag, jnp.float32), "c": None} if name == "exact" else name
        seen = []
        out = jlora.optim.sam_select(params, spec, loss, batches, hessian=hess,
                                     callback=seen.append)
        assert seen == [1, 2, 3]
        cfg = out.match("w")
        assert cfg.select == "sam" and cfg.density == 0.25 and isinstance(out.match("c"), jlora.Full)
        picks[name] = list(cfg.indices)
        np.testing.assert_array_equal(picks[name], topk_ref(score, k))
        np.testing.assert_allclose(
            f64(jlora.optim.sam_scores(jnp.asarray(G, jnp.float32),
                                       None if name is None else jnp.asarray(G ** 2 / score))),
            score, rtol=1e-5)
    assert picks["exact"] != picks[None]  # the curvature matters on this problem
    # the selection goes through apply, split and merge; values start at zero
    adapted = jlora.apply(params, out, key=jax.random.key(0))
    assert list(np.asarray(adapted["w"].indices)) == picks["exact"]
    assert jlora.count_trainable(jlora.split(adapted)[0]) == k + 3
    # a density override, and the spec survives JSON (checkpoints store it)
    out2 = jlora.optim.sam_select(params, spec, loss, batches, density=0.5)
    assert len(out2.match("w").indices) == 10
    # one dict batch is one batch, not a sequence of its keys
    one = jlora.optim.sam_select(params, spec, lambda p, b: loss(p, (b["x"], b["y"])),
                                 {"x": batches[0][0], "y": batches[0][1]})
    np.testing.assert_array_equal(list(one.match("w").indices), topk_ref(grads[0] ** 2, k))
    assert jlora.spec.spec_from_json(jlora.spec.spec_to_json(out2)) == out2


def test_sparse_sharded_equals_single_device():
    from experiments.train import make_mesh

    r = np.random.default_rng(0)
    params = {"l1": {"kernel": jnp.asarray(r.normal(size=(16, 32)), jnp.float32)},
              "l2": {"kernel": jnp.asarray(r.normal(size=(32, 8)), jnp.float32)}}
    x = jnp.asarray(r.normal(size=(8, 16)), jnp.float32)
    adapted = jlora.apply(params, jlora.Spec({"*/kernel": jlora.Sparse(0.1)}),
                          key=jax.random.key(0))
    adapted = jax.tree.map(lambda n: n.replace(values=n.values + 0.05) if jlora.is_node(n) else n,
                           adapted, is_leaf=jlora.is_node)

    def loss(t, fr):
        p = jlora.merge(jlora.combine(t, fr))
        return jnp.sum(jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"] ** 2)

    t, fr = jlora.split(adapted)
    want_l, want_g = jax.jit(jax.value_and_grad(loss))(t, fr)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    placed = jlora.sharding.place(adapted, mesh, {"l1": {"kernel": P("fsdp", "tensor")},
                                                  "l2": {"kernel": P("tensor", "fsdp")}})
    assert placed["l1"]["kernel"].base.sharding.spec == P("fsdp", "tensor")
    assert placed["l1"]["kernel"].values.sharding.spec == P()
    ts, frs = jlora.split(placed)
    got_l, got_g = jax.jit(jax.value_and_grad(loss))(ts, frs)
    np.testing.assert_allclose(float(got_l), float(want_l), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(density=float("nan")), "density"), (dict(density=True), "density"),
    (dict(select="top"), "select"), (dict(largest="yes"), "largest"),
    (dict(indices=[3, 1]), "indices"), (dict(indices=[1, 1]), "indices"),
    (dict(indices=[-1, 2]), "indices"), (dict(indices=[]), "indices"),
    (dict(indices="12"), "indices"), (dict(dtype=jnp.int32), "dtype"),
    (dict(rank=4), "rank"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jlora.Sparse(**kwargs)


def test_bad_inputs_name_the_path(tmp_path):
    params = rng_params()
    with pytest.raises(ValueError, match=re.escape("a/kernel") + ".*sam_select"):
        jlora.apply(params, jlora.Spec({"a/kernel": jlora.Sparse(select="sam")}),
                    key=jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("a/kernel") + ".*30 entries"):
        jlora.apply(params, jlora.Spec({"a/kernel": jlora.Sparse(indices=[2, 30])}),
                    key=jax.random.key(0))
    with pytest.raises(ValueError, match="ids.*floating"):
        jlora.apply({"ids": jnp.arange(4)}, jlora.Spec({"ids": jlora.Sparse(0.5)}),
                    key=jax.random.key(0))
    adapted = jlora.apply(params, jlora.Spec({"a/kernel": jlora.Sparse(0.5)}), key=jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("a/kernel") + ": Sparse adapters have no PEFT"):
        jlora.peft.save(str(tmp_path / "out"), adapted)
    assert not (tmp_path / "out").exists()

    loss = lambda p, b: jnp.sum(p["a"]["kernel"] ** 2)
    sam = jlora.Spec({"a/kernel": jlora.Sparse(0.5, select="sam")})
    sel = jlora.optim.sam_select
    for call, match in [
        (lambda: sel(params, {"a/kernel": jlora.Sparse()}, loss, [0]), "spec"),
        (lambda: sel(params, jlora.Spec({"a/kernel": jlora.Sparse()}), loss, [0]), "select='sam'"),
        (lambda: sel(params, sam, loss, []), "batches"),
        (lambda: sel(params, sam, "loss", [0]), "loss_fn"),
        (lambda: sel(params, sam, loss, [0], density=2.0), "density"),
        (lambda: sel(params, sam, loss, [0], hessian="hutchinson"), "hessian"),
        (lambda: sel(params, sam, loss, [0], hessian={"a": {"kernel": -jnp.ones((6, 5))}}),
         "a/kernel.*> 0"),
        (lambda: sel(params, sam, loss, [0], hessian={"a": {"kernel": jnp.ones(3)}}), "a/kernel"),
        (lambda: sel(adapted, sam, loss, [0]), "already adapted"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_sam_scores_refuses_a_hessian_of_another_shape():
    with pytest.raises(ValueError, match=r"sam_scores: hessian has shape \(2,\), grad has \(3,\)"):
        jlora.optim.sam_scores(jnp.ones(3), jnp.ones(2))


def test_entry_count_is_the_exact_floor_of_p_times_n():
    """k = max(1, ⌊p·n⌋) for the decimal p is written as (integer arithmetic reference)."""
    for num, den in [(29, 100), (1, 3), (2, 3), (7, 10), (57, 100), (1, 1000), (999, 1000)]:
        for n in (3, 7, 100, 1000, 12345):
            want = max(1, min(n, num * n // den))
            assert jlora.methods.sparse.entries(num / den, n) == want, (num, den, n)
    assert jlora.methods.sparse.entries(np.float32(0.29), 100) == 29
    assert jlora.methods.sparse.entries(0.2899999, 100) == 28  # truly below 0.29
    params = {"w": jnp.ones((10, 10))}
    node = jlora.apply(params, jlora.Spec({"w": jlora.Sparse(0.29)}), key=jax.random.key(0))["w"]
    assert node.values.shape == (29,)


def test_empty_leaf_non_finite_calibration_and_tuple_batches_are_named():
    with pytest.raises(ValueError, match=r"w: Sparse needs a leaf with at least one entry, got "
                                         r"shape \(0, 5\)"):
        jlora.apply({"w": jnp.zeros((0, 5))}, jlora.Spec({"w": jlora.Sparse(0.5)}),
                    key=jax.random.key(0))
    params = {"l1": {"kernel": jnp.ones((3, 4))}, "l2": {"kernel": jnp.ones((4, 2))}}
    spec = jlora.Spec({"*/kernel": jlora.Sparse(0.5, select="sam")})
    nan_l1 = lambda p, b: jnp.sum(jnp.sqrt(p["l1"]["kernel"] - 2.0)) + jnp.sum(p["l2"]["kernel"])
    with pytest.raises(ValueError, match=r"sam_select: the summed calibration gradient of "
                                         r"l1/kernel is not finite"):
        jlora.optim.sam_select(params, spec, nan_l1, [0])
    # a finite gradient whose square overflows float32: the Fisher curvature is not finite
    huge = lambda p, b: 1e30 * jnp.sum(p["l1"]["kernel"]) + jnp.sum(p["l2"]["kernel"])
    jlora.optim.sam_select(params, spec, huge, [0])
    with pytest.raises(ValueError, match=r"squared gradient of l1/kernel is not finite"):
        jlora.optim.sam_select(params, spec, huge, [0], hessian="fisher")
    xy = (jnp.ones(3), jnp.ones(3))
    loss = lambda p, b: jnp.sum(b[0] @ p["l1"]["kernel"]) * jnp.sum(b[1])
    with pytest.raises(ValueError, match=r"sam_select: batches is a tuple of 2 items.*\[batch\]"):
        jlora.optim.sam_select(params, spec, loss, xy)
    jlora.optim.sam_select(params, spec, lambda p, b: loss(p, b) + jnp.sum(p["l2"]["kernel"]),
                           [xy])
