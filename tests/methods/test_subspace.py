"""Subspace (intrinsic dimension, Li et al. ICLR 2018) against float64 numpy references.

The Fastfood, dense and sparse projections are rebuilt here as dense matrices from
their formulas (Sylvester Hadamard via Kronecker products, explicit diagonal and
permutation matrices), from the random draws only.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora.methods import subspace as ss
from tests._refs import f64


def hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def fastfood_matrix(factors, size, dim):
    """``P = (H·G·Π·H·B)[:D, :d] / (√(L·ΣG²)·√(D/L))`` in float64 from the random diagonals."""
    b, perm, g = f64(factors.b), np.asarray(factors.perm), f64(factors.g)
    n = b.shape[0]
    h = hadamard(n)
    pi = np.eye(n)[perm]  # (Π v)_i = v[perm[i]]
    m = h @ np.diag(g) @ pi @ h @ np.diag(b)
    return m[:size, :dim] / (np.sqrt(n * np.sum(g ** 2)) * np.sqrt(size / n))


@pytest.mark.parametrize("size,dim", [(16, 16), (37, 6)])
def test_fastfood_equals_its_dense_matrix_and_columns_have_unit_norm(size, dim):
    with jax.enable_x64(True):
        factors = ss.fastfood_factors(jax.random.key(size), size, jnp.float64)
        assert factors.b.shape == (ss.padded_size(size),)
        assert sorted(np.asarray(factors.perm).tolist()) == list(range(ss.padded_size(size)))
        assert set(np.asarray(factors.b).tolist()) == {-1.0, 1.0}
        p = fastfood_matrix(factors, size, dim)
        theta = np.random.default_rng(1).normal(size=dim)
        got = ss.fastfood(jnp.asarray(theta), factors, size)
        np.testing.assert_allclose(f64(got), p @ theta, rtol=1e-10, atol=1e-12)  # H: Sylvester
        # the public entry point draws the same factors from the same key
        np.testing.assert_allclose(
            f64(ss.project(jnp.asarray(theta), jax.random.key(size), size, "fastfood")),
            p @ theta, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        ss.fwht(jnp.ones(12))
    norms = np.linalg.norm(p, axis=0)
    if size == ss.padded_size(size):  # all L rows kept: PᵀP has an exact unit diagonal
        np.testing.assert_allclose(norms, 1.0, rtol=1e-12)
    else:  # D of L rows kept: unit norm in expectation
        np.testing.assert_allclose(norms, 1.0, atol=0.35)


def test_dense_and_sparse_projections_against_numpy():
    size, dim = 50, 4
    theta = np.array([0.5, -1.0, 2.0, 0.25])
    with jax.enable_x64(True):
        g = f64(jax.random.normal(jax.random.key(3), (size, dim), jnp.float64))
        np.testing.assert_allclose(
            f64(ss.project(jnp.asarray(theta), jax.random.key(3), size, "dense")),
            (g / np.linalg.norm(g, axis=0)) @ theta, rtol=1e-12)
        cols = ss.sparse_projection(jax.random.key(4), size, dim, jnp.float64)
        got = ss.project(jnp.asarray(theta), jax.random.key(4), size, "sparse")
    k = int(np.ceil(np.sqrt(size)))
    assert cols.rows.shape == (dim, k)  # density 1/√D: ⌈√D⌉ entries per column
    p = np.zeros((size, dim))
    for j in range(dim):
        for r, s in zip(np.asarray(cols.rows[j]), f64(cols.signs[j])):
            p[r, j] += s  # repeated rows add
    p /= np.linalg.norm(p, axis=0)
    np.testing.assert_allclose(f64(got), p @ theta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(p, axis=0), 1.0)


# ------------------------------------------------------------------ the method through jlora


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(4, name="hidden")(x)))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(Mlp(name="body")(x))


X = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
SPEC = jlora.Spec({"body": jlora.Subspace(7, key=5)})


def flat_targets(params, names):
    return np.concatenate([f64(params[n[0]][n[1]]).ravel() for n in names])


def test_apply_forward_merge_unmerge_against_numpy():
    params = Net().init(jax.random.key(0), X)["params"]
    adapted = jlora.apply(params, SPEC, key=jax.random.key(1))
    node = adapted["body@subspace"]
    assert node.targets == ("hidden/bias", "hidden/kernel", "out/bias", "out/kernel")
    assert node.size == 4 + 16 + 3 + 12 and node.theta.shape == (7,)
    np.testing.assert_array_equal(np.asarray(node.theta), 0.0)
    trainable, frozen = jlora.split(adapted)
    assert jlora.count_trainable(trainable) == 7
    run = jax.jit(lambda p: jlora.linen.apply(Net(), {"params": p}, X))
    y0 = Net().apply({"params": params}, X)
    np.testing.assert_array_equal(np.asarray(run(adapted)), np.asarray(y0))  # θ_d = 0: unchanged

    p = fastfood_matrix(ss.fastfood_factors(jax.random.key(5), node.size, jnp.float32),
                        node.size, 7)
    body = params["body"]
    names = [("hidden", "bias"), ("hidden", "kernel"), ("out", "bias"), ("out", "kernel")]

    def ref_forward(theta_flat):
        parts, i = {}, 0
        for n in names:
            size = body[n[0]][n[1]].size
            parts[n] = theta_flat[i:i + size].reshape(body[n[0]][n[1]].shape)
            i += size
        h = np.maximum(f64(X) @ parts["hidden", "kernel"] + parts["hidden", "bias"], 0)
        o = h @ parts["out", "kernel"] + parts["out", "bias"]
        return o @ f64(params["head"]["kernel"]) + f64(params["head"]["bias"])

    theta0 = flat_targets(body, names)
    theta = jnp.linspace(-0.5, 0.5, 7)
    tuned = jlora.combine({**trainable, "body@subspace": trainable["body@subspace"].replace(
        theta=theta)}, frozen)
    ref = ref_forward(theta0 + p @ f64(theta))
    np.testing.assert_allclose(f64(run(tuned)), ref, rtol=1e-4, atol=1e-5)
    merged = jlora.merge(tuned)  # exact: plain weights, no node left
    assert set(merged) == {"body", "head"}
    np.testing.assert_allclose(flat_targets(merged["body"], names), theta0 + p @ f64(theta),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(Net().apply({"params": merged}, X)), ref, rtol=1e-4, atol=1e-5)
    back = jlora.unmerge(merged, tuned)
    np.testing.assert_allclose(flat_targets(back["body"], names), theta0, atol=1e-6)


def test_subspace_training_equals_training_through_the_dense_projection():
    """Adam on θ_d through Fastfood == the same Adam on θ_d through the explicit dense P."""
    params = Net().init(jax.random.key(0), X)["params"]
    adapted = jlora.apply(params, SPEC, key=jax.random.key(1))
    trainable, frozen = jlora.split(adapted)
    node = adapted["body@subspace"]
    p = jnp.asarray(fastfood_matrix(ss.fastfood_factors(jax.random.key(5), node.size,
                                                        jnp.float32), node.size, 7), jnp.float32)
    tx = optax.adam(0.05)

    def dense_params(theta):
        flat, i, body = p @ theta, 0, {}
        for name, sub in params["body"].items():
            body[name] = {}
            for leaf in sorted(sub):
                w = sub[leaf]
                body[name][leaf] = w + flat[i:i + w.size].reshape(w.shape)
                i += w.size
        return {**params, "body": body}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(t, opt):
        loss = lambda t: jnp.mean(jlora.linen.apply(Net(), {"params": jlora.combine(t, frozen)},
                                                    X) ** 2)
        g = jax.grad(loss)(t)
        u, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, u), opt

    @jax.jit
    def dense_step(theta, opt):
        g = jax.grad(lambda th: jnp.mean(Net().apply({"params": dense_params(th)}, X) ** 2))(theta)
        u, opt = tx.update(g, opt, theta)
        return optax.apply_updates(theta, u), opt

    opt, theta, dopt = tx.init(trainable), jnp.zeros(7), tx.init(jnp.zeros(7))
    for _ in range(4):
        trainable, opt = step(trainable, opt)
        theta, dopt = dense_step(theta, dopt)
    np.testing.assert_allclose(f64(trainable["body@subspace"].theta), f64(theta),
                               rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(theta).max()) > 0.1  # it moved


def test_include_projections_key_and_errors():
    params = Net().init(jax.random.key(0), X)["params"]
    spec = jlora.Spec({"": jlora.Subspace(3, projection="sparse", include=("**/kernel",))})
    adapted = jlora.apply(params, spec, key=jax.random.key(1))
    node = adapted["@subspace"]  # the root module: the whole tree in one subspace
    assert node.targets == ("body/hidden/kernel", "body/out/kernel", "head/kernel")
    # the same int seed or key gives the same projection; without one, apply's key decides
    a = jlora.Subspace(3, key=jax.random.key(9)).build_module(None, params, path="")
    np.testing.assert_array_equal(np.asarray(a.key), np.asarray(jax.random.key_data(
        jax.random.key(9))))
    assert jlora.spec.config_from_dict(jlora.spec.config_to_dict(a.config)) == a.config
    # cache=True keeps the drawn projection in the node: the same values
    for proj in ("sparse", "fastfood"):
        nodes = [jlora.Subspace(3, projection=proj, key=9, cache=c).build_module(
            None, params, path="").replace(theta=jnp.array([0.3, -1.0, 2.0])) for c in (True, False)]
        assert nodes[0].parts is not None and nodes[1].parts is None
        np.testing.assert_allclose(f64(nodes[0].offset()), f64(nodes[1].offset()), rtol=1e-6)
    assert jlora.spec.spec_from_json(jlora.spec.spec_to_json(spec)) == spec
    with pytest.raises(ValueError, match="empty pattern"):  # "" names the root for modules only
        jlora.Spec({"": jlora.LoRA(rank=1)})
    with pytest.raises(ValueError, match="body: Subspace dim=100 exceeds D=35"):
        jlora.apply(params, jlora.Spec({"body": jlora.Subspace(100)}), key=jax.random.key(0))
    # one glob of several that matches nothing is a typo, not a smaller subspace
    with pytest.raises(ValueError, match="body: Subspace include glob 'typo/\*\*' matches no"):
        jlora.apply(params, jlora.Spec({"body": jlora.Subspace(2, include=("**/kernel",
                                                                             "typo/**"))}),
                    key=jax.random.key(0))
    with pytest.raises(ValueError, match="body: Subspace finds no floating-point leaf"):
        jlora.apply(params, jlora.Spec({"body": jlora.Subspace(2, include=("nope",))}),
                    key=jax.random.key(0))
    for bad, match in [({"dim": 0}, "dim"), ({"projection": "gauss"}, "projection"),
                       ({"key": "a"}, "key"), ({"include": ()}, "include"),
                       ({"dtype": jnp.int32}, "dtype"), ({"cache": 1}, "cache")]:
        with pytest.raises(ValueError, match=f"Subspace: {match}"):
            jlora.Subspace(**{"dim": 2, **bad})



def test_an_int_key_must_fit_32_bits():
    params = Net().init(jax.random.key(0), X)["params"]
    build = lambda key: jlora.Subspace(3, key=key).build_module(None, params, path="")
    assert not np.array_equal(np.asarray(build(2**32 - 1).key), np.asarray(build(2**32 - 2).key))
    np.testing.assert_array_equal(np.asarray(build(np.int64(5)).key), np.asarray(build(5).key))
    for bad in (2**32, 2**32 + 5, np.uint64(2**40), 2**63, 2**64):
        with pytest.raises(ValueError,
                           match=r"Subspace: an int key must be a seed in \[0, 2\*\*32\)"):
            jlora.Subspace(3, key=bad)
    with pytest.raises(ValueError, match="Subspace: key must be an int >= 0"):
        jlora.Subspace(3, key=-1)

def test_shards_replicated_and_checkpoints(tmp_path):
    params = Net().init(jax.random.key(0), X)["params"]
    adapted = jlora.apply(params, SPEC, key=jax.random.key(1))
    adapted["body@subspace"] = adapted["body@subspace"].replace(theta=jnp.linspace(-1, 1, 7))
    base_specs = jax.tree.map(lambda _: P(), params)
    base_specs["body"]["hidden"]["kernel"] = P(None, "x")
    specs = jlora.sharding.specs(adapted, base_specs)
    assert (specs["body@subspace"].theta, specs["body@subspace"].key) == (P(), P())
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    placed = jlora.sharding.place(adapted, mesh, base_specs)
    merged = jax.jit(jlora.merge)
    chex.assert_trees_all_close(merged(placed), merged(adapted), rtol=1e-6, atol=1e-7)
    trainable, frozen = jlora.split(adapted)
    jlora.checkpoint.save(str(tmp_path), trainable, step=1, spec=SPEC)
    state = jlora.checkpoint.restore(str(tmp_path), spec=SPEC, onto=frozen)
    chex.assert_trees_all_equal(state["trainable"], trainable)


def test_said_scales_each_leaf_inside_the_budget_against_numpy(tmp_path):
    """SAID (Aghajanyan et al. §3): ``θ_i = θ0_i + λ_i·(P·θ_{d−m})_i``, one ``λ`` per leaf
    (m = 4 here) inside ``d = 7``; forward, merge and the gradients of ``λ`` and
    ``θ_{d−m}`` against float64 numpy (central differences of the reference)."""
    params = Net().init(jax.random.key(0), X)["params"]
    spec = jlora.Spec({"body": jlora.Subspace(7, key=5, said=True)})
    adapted = jlora.apply(params, spec, key=jax.random.key(1))
    node = adapted["body@subspace"]
    names = [("hidden", "bias"), ("hidden", "kernel"), ("out", "bias"), ("out", "kernel")]
    assert node.theta.shape == (3,) and node.scales.shape == (4,)
    np.testing.assert_array_equal(np.asarray(node.scales), 1.0)  # starts as the plain method
    trainable, frozen = jlora.split(adapted)
    assert jlora.count_trainable(trainable) == 7  # d numbers in all, λ included
    body = params["body"]
    sizes = [body[a][b].size for a, b in names]
    p = fastfood_matrix(ss.fastfood_factors(jax.random.key(5), node.size, jnp.float32),
                        node.size, 3)  # P maps the d − m = 3 projected numbers
    theta0 = flat_targets(body, names)

    def ref_flat(theta, lam):
        return theta0 + np.repeat(lam, sizes) * (p @ theta)

    def ref_loss(theta, lam):
        flat, parts, i = ref_flat(theta, lam), {}, 0
        for n in names:
            parts[n] = flat[i:i + body[n[0]][n[1]].size].reshape(body[n[0]][n[1]].shape)
            i += body[n[0]][n[1]].size
        h = np.maximum(f64(X) @ parts["hidden", "kernel"] + parts["hidden", "bias"], 0)
        o = (h @ parts["out", "kernel"] + parts["out", "bias"]) @ f64(
            params["head"]["kernel"]) + f64(params["head"]["bias"])
        return np.mean(o ** 2)

    theta, lam = np.array([0.4, -0.3, 0.2]), np.array([1.5, 0.5, -1.0, 2.0])
    tuned = {**trainable, "body@subspace": trainable["body@subspace"].replace(
        theta=jnp.asarray(theta, jnp.float32), scales=jnp.asarray(lam, jnp.float32))}
    merged = jlora.merge(jlora.combine(tuned, frozen))
    np.testing.assert_allclose(flat_targets(merged["body"], names), ref_flat(theta, lam),
                               rtol=1e-5, atol=1e-6)
    loss = lambda t: jnp.mean(jlora.linen.apply(Net(), {"params": jlora.combine(t, frozen)},
                                                X) ** 2)
    np.testing.assert_allclose(float(loss(tuned)), ref_loss(theta, lam), rtol=1e-5)
    g = jax.grad(loss)(tuned)["body@subspace"]

    def num_grad(f, x, eps=1e-6):
        return np.array([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in np.eye(len(x))])

    np.testing.assert_allclose(f64(g.theta), num_grad(lambda t: ref_loss(t, lam), theta),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(f64(g.scales), num_grad(lambda l: ref_loss(theta, l), lam),
                               rtol=1e-3, atol=1e-5)
    # cache=True and the dense projection draw P for d − m columns too
    cached = jlora.Subspace(7, key=5, said=True, cache=True).build_module(
        None, body, path="body")
    np.testing.assert_allclose(f64(cached.replace(theta=jnp.asarray(theta, jnp.float32)).offset()),
                               p @ theta, rtol=1e-5, atol=1e-6)
    jlora.checkpoint.save(str(tmp_path), tuned, step=1, spec=spec)
    back = jlora.checkpoint.restore(str(tmp_path), spec=spec, onto=frozen)["trainable"]
    chex.assert_trees_all_equal(back, tuned)
    with pytest.raises(ValueError, match=r"body: Subspace\(said=True\) needs dim > 4, the "
                                         r"number of leaves it scales .* got dim=4"):
        jlora.apply(params, jlora.Spec({"body": jlora.Subspace(4, said=True)}),
                    key=jax.random.key(0))
    with pytest.raises(ValueError, match="Subspace: said must be a bool"):
        jlora.Subspace(7, said="yes")
