"""TrainableTokens: only the chosen rows of a table train, tied heads stay tied (float64 refs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64

IDX = [7, 2, 11]


class TiedLM(nn.Module):
    """Embedding -> Dense -> logits through Embed.attend (the head reads the same table)."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(16, 6, name="emb")
        h = jnp.tanh(nn.Dense(6, name="fc")(emb(ids)))
        return emb.attend(h)


IDS = jnp.array([[7, 1, 2, 11, 3], [0, 7, 7, 15, 2]])


def setup(rules=None, seed=0):
    params = TiedLM().init(jax.random.key(seed), IDS)["params"]
    rules = rules or {"emb/embedding": jlora.TrainableTokens(indices=IDX),
                      "fc/kernel": jlora.LoRA(rank=2)}
    return params, jlora.apply(params, jlora.Spec(rules), key=jax.random.key(1))


def ref_logits(params, rows, lora=None):
    """float64: E' = E with rows at IDX; logits = tanh(E'[ids]·K + c)·E'ᵀ."""
    e = f64(params["emb"]["embedding"]).copy()
    e[IDX] = f64(rows)
    k = f64(params["fc"]["kernel"])
    if lora is not None:
        k = k + lora.scale * f64(lora.a) @ f64(lora.b)
    h = np.tanh(e[np.asarray(IDS)] @ k + f64(params["fc"]["bias"]))
    return h @ e.T


def test_identity_at_init_and_compact_storage():
    params, adapted = setup()
    node = adapted["emb"]["embedding"]
    assert node.rows.shape == (3, 6) and node.indices == tuple(IDX)
    np.testing.assert_array_equal(np.asarray(node.rows), np.asarray(params["emb"]["embedding"])[IDX])
    trainable, _ = jlora.split(adapted)
    assert trainable["emb"]["embedding"].base is None  # only the rows are in the trainable half
    y0 = TiedLM().apply({"params": params}, IDS)
    np.testing.assert_allclose(jlora.linen.apply(TiedLM(), {"params": adapted}, IDS), y0,
                               atol=1e-6)
    assert jlora.count_trainable(adapted) == 3 * 6 + 2 * 6 * 2


def test_fast_path_merge_and_tied_head_match_float64():
    params, adapted = setup()
    rows = jax.random.normal(jax.random.key(5), (3, 6))
    adapted["emb"]["embedding"] = adapted["emb"]["embedding"].replace(rows=rows)
    ref = ref_logits(params, rows)
    y_fast = jlora.linen.apply(TiedLM(), {"params": adapted}, IDS)
    y_merged = TiedLM().apply({"params": jlora.merge(adapted)}, IDS)
    np.testing.assert_allclose(f64(y_fast), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(y_merged), ref, rtol=1e-5, atol=1e-5)
    delta = f64(adapted["emb"]["embedding"].delta())
    want = np.zeros((16, 6))
    want[IDX] = f64(rows) - f64(params["emb"]["embedding"])[IDX]
    np.testing.assert_allclose(delta, want, atol=1e-6)


def test_gradient_reaches_rows_through_lookup_and_tied_head():
    """d loss / d rows = the full-table gradient at IDX (both uses of the one table)."""
    params, adapted = setup()
    trainable, frozen = jlora.split(adapted)

    def loss_adapted(t):
        return jnp.sum(jlora.linen.apply(TiedLM(), {"params": jlora.combine(t, frozen)}, IDS) ** 2)

    def loss_plain(e):
        p = dict(params, emb={"embedding": e})
        return jnp.sum(TiedLM().apply({"params": p}, IDS) ** 2)

    g_rows = jax.grad(loss_adapted)(trainable)["emb"]["embedding"].rows
    g_full = jax.grad(loss_plain)(params["emb"]["embedding"])
    np.testing.assert_allclose(g_rows, g_full[np.asarray(IDX)], rtol=1e-4, atol=1e-6)
    # the head alone (ids that are never looked up still get logits): row 11 is looked up once,
    # and every row gets head gradient, so tying matters for all of IDX
    assert np.all(np.abs(np.asarray(g_rows)).sum(axis=1) > 0)


def test_training_changes_only_the_chosen_rows_and_merge_unmerge():
    params, adapted = setup()
    trainable, frozen = jlora.split(adapted)
    opt = optax.adam(1e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        loss = lambda t: -jnp.mean(jax.nn.log_softmax(
            jlora.linen.apply(TiedLM(), {"params": jlora.combine(t, frozen)}, IDS))[..., 3])
        g = jax.grad(loss)(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s

    for _ in range(3):
        trainable, state = step(trainable, state)
    trained = jlora.combine(trainable, frozen)
    e0 = np.asarray(params["emb"]["embedding"])
    e1 = np.asarray(jlora.merge(trained)["emb"]["embedding"])
    changed = np.flatnonzero(np.abs(e1 - e0).sum(axis=1) > 0)
    assert sorted(changed.tolist()) == sorted(IDX)
    served = jlora.merge(trained, onto=params)
    np.testing.assert_array_equal(served["emb"]["embedding"], e1)
    back = jlora.unmerge(served, trained)
    np.testing.assert_allclose(back["emb"]["embedding"], e0, atol=1e-6)


def test_head_kernel_columns():
    """A (dim, vocab) head kernel: the token axis is the last; fast path = merged = float64."""
    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="head")(x)

    x = jax.random.normal(jax.random.key(3), (4, 6))
    params = Head().init(jax.random.key(0), x)["params"]
    spec = jlora.Spec({"head/kernel": jlora.TrainableTokens(indices=IDX)})
    adapted = jlora.apply(params, spec, key=jax.random.key(1))
    node = adapted["head"]["kernel"]
    np.testing.assert_array_equal(node.rows, np.asarray(params["head"]["kernel"])[:, IDX].T)
    rows = jax.random.normal(jax.random.key(4), node.rows.shape)
    adapted["head"]["kernel"] = node.replace(rows=rows)
    k = f64(params["head"]["kernel"]).copy()
    k[:, IDX] = f64(rows).T
    ref = f64(x) @ k + f64(params["head"]["bias"])
    np.testing.assert_allclose(f64(jlora.linen.apply(Head(), {"params": adapted}, x)), ref,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(Head().apply({"params": jlora.merge(adapted)}, x)), ref,
                               rtol=1e-5, atol=1e-5)


def test_random_init_option_and_checkpoint_json():
    params, adapted = setup({"emb/embedding": jlora.TrainableTokens(indices=IDX,
                                                                    init_weights=False)})
    rows = np.asarray(adapted["emb"]["embedding"].rows)
    assert not np.allclose(rows, np.asarray(params["emb"]["embedding"])[IDX])
    spec = jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=np.array(IDX))})
    from jlora.spec import spec_from_json, spec_to_json
    assert spec_from_json(spec_to_json(spec)) == spec


@pytest.mark.parametrize("indices, match", [
    ([], "empty"), ([3, 3], "more than once"), ([-1], ">= 0"), ([1.5], "ints"),
    ("12", "sequence"), ([True], "ints"),
])
def test_bad_indices(indices, match):
    with pytest.raises(ValueError, match=f"TrainableTokens: indices.*{match}|{match}"):
        jlora.TrainableTokens(indices=indices)


def test_out_of_range_names_the_path():
    params = {"emb": {"embedding": jnp.zeros((16, 6))}}
    with pytest.raises(ValueError, match=r"emb/embedding.*\[16, 20\].*out of range"):
        jlora.apply(params, jlora.Spec({"emb/embedding": jlora.TrainableTokens(indices=[1, 16, 20])}),
                    key=jax.random.key(0))


def test_token_axis_option_and_unknown_leaf_names():
    """A (vocab, dim) table not named 'embedding' needs token_axis; with it, rows are rows."""
    r = np.random.default_rng(0)
    table = jnp.asarray(r.normal(size=(50, 8)), jnp.float32)  # vocab 50, dim 8
    params = {"embedder": {"input_embedding": table}}
    with pytest.raises(ValueError, match=r"embedder/input_embedding: TrainableTokens cannot tell "
                                         r"which axis of a leaf named 'input_embedding'.*token_axis"):
        jlora.apply(params, jlora.Spec({"embedder/input_embedding":
                                        jlora.TrainableTokens(indices=[3])}), key=jax.random.key(0))
    spec = jlora.Spec({"embedder/input_embedding": jlora.TrainableTokens(indices=[3, 40],
                                                                         token_axis=0)})
    node = jlora.apply(params, spec, key=jax.random.key(0))["embedder"]["input_embedding"]
    assert node.rows.shape == (2, 8) and node.token_axis == 0
    np.testing.assert_array_equal(node.rows, np.asarray(table)[[3, 40]])
    rows = jnp.asarray(r.normal(size=(2, 8)), jnp.float32)
    ref = f64(table).copy()
    ref[[3, 40]] = f64(rows)
    np.testing.assert_array_equal(f64(jlora.merge({"e": node.replace(rows=rows)})["e"]), ref)
    # a (dim, vocab) torch-style weight read as a head: the columns of the chosen ids
    head = {"out": {"weight": table.T}}
    node = jlora.apply(head, jlora.Spec({"out/weight": jlora.TrainableTokens(
        indices=[3], token_axis=1)}), key=jax.random.key(0))["out"]["weight"]
    np.testing.assert_array_equal(node.rows, np.asarray(table)[[3]])
    # the option is checked and survives JSON
    for bad in (2, -1, True, 0.0, "0"):
        with pytest.raises(ValueError, match=r"TrainableTokens: token_axis must be None, 0"):
            jlora.TrainableTokens(indices=[1], token_axis=bad)
    from jlora.spec import spec_from_json, spec_to_json
    assert spec_from_json(spec_to_json(spec)) == spec
