"""jlora.flower: records <-> trees by path with real Flower objects, the strategy's real
aggregate_train on real reply Messages (mixed ranks), and rejection of malformed payloads."""

import io
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType,  # noqa: E402
                      Metadata, MetricRecord, RecordDict)

import jlora  # noqa: E402
import jlora.flower as jf  # noqa: E402
from tests._refs import f64, perturb  # noqa: E402

PARAMS = {"enc": {"q": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(10, 9)),
                                              jnp.float32)},
                  "v": {"kernel": jnp.ones((10, 9), jnp.float32)}},
          "head": {"kernel": jnp.zeros((9, 3), jnp.float32), "bias": jnp.zeros(3, jnp.float32)}}


def client_tree(rank, seed, alpha=None):
    spec = jlora.Spec({"enc/*/kernel": jlora.LoRA(rank=rank, alpha=alpha or 2 * rank),
                       "head/*": jlora.Full()})
    adapted = perturb(jlora.apply(PARAMS, spec, key=jax.random.key(seed)), seed=seed, size=0.3)
    return jlora.split(adapted)[0]


def instruction(node):
    """A server-to-node train message as the Grid delivers it (metadata set by the SuperLink)."""
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type=MessageType.TRAIN)
    return Message(RecordDict(), metadata=meta)


def lora_delta(node):
    return node.scale * f64(node.a) @ f64(node.b)


def test_round_trip_by_path_keeps_values_structure_and_dtypes():
    tree = client_tree(3, 1)
    rec = jf.to_records(tree)
    assert isinstance(rec, ArrayRecord)
    assert sorted(rec) == ["enc/q/kernel/a", "enc/q/kernel/b", "enc/v/kernel/a", "enc/v/kernel/b",
                           "head/bias", "head/kernel"]
    back = jf.from_records(rec, client_tree(3, 9), client=1)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # optimizer states (NamedTuples, int counts) travel the same way
    state = optax.adam(1e-3).init(tree)
    state = jax.tree.map(lambda x: x + 1, state)
    back = jf.from_records(jf.to_records(state), optax.adam(1e-3).init(tree))
    assert int(back[0].count) == 1
    np.testing.assert_array_equal(np.asarray(back[0].mu["enc"]["q"]["kernel"].b),
                                  np.asarray(state[0].mu["enc"]["q"]["kernel"].b))


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_heterogeneous_ranks_decode_against_another_rank(rank):
    tree = client_tree(rank, rank, alpha=3.0)
    cfg = jf.describe(tree)
    assert isinstance(cfg, ConfigRecord)
    assert cfg["enc/q/kernel:rank"] == rank and cfg["enc/q/kernel:alpha"] == 3.0
    back = jf.from_records(jf.to_records(tree), client_tree(4, 0), config=cfg, client="c")
    node, ref = back["enc"]["q"]["kernel"], tree["enc"]["q"]["kernel"]
    assert node.rank == rank and node.scale == pytest.approx(3.0 / rank)
    np.testing.assert_allclose(lora_delta(node), lora_delta(ref), rtol=1e-6)


def weighted_mean(trees, weights):
    p = np.asarray(weights) / np.sum(weights)
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)), *trees)


def test_strategy_aggregates_real_replies_and_steps_the_server():
    template = client_tree(4, 0)
    clients = [client_tree(4, s) for s in (1, 2, 3)]
    sizes = [10, 30, 20]
    opt = jlora.optim.fedyogi(0.1, tau=1e-2)
    st = jf.Strategy(template, rule=weighted_mean, server_optimizer=opt)
    replies = [jf.reply(instruction(node), t, num_examples=n, metrics={"loss": float(node)})
               for node, t, n in zip((11, 12, 13), clients, sizes)]
    arrays, metrics = st.aggregate_train(1, replies)
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    assert metrics["loss"] == pytest.approx((11 * 10 + 12 * 30 + 13 * 20) / 60)
    got = jf.from_records(arrays, template)
    # numpy: Reddi et al. FedYogi, one round from v = τ²
    p = np.array(sizes, float) / sum(sizes)
    for path in ("a", "b"):
        x = f64(getattr(template["enc"]["v"]["kernel"], path))
        agg = sum(w * f64(getattr(c["enc"]["v"]["kernel"], path)) for w, c in zip(p, clients))
        d = agg - x
        m, v = 0.1 * d, 1e-4 - 0.01 * d ** 2 * np.sign(1e-4 - d ** 2)
        np.testing.assert_allclose(f64(getattr(got["enc"]["v"]["kernel"], path)),
                                   x + 0.1 * m / (np.sqrt(v) + 1e-2), rtol=1e-4, atol=1e-6)


def test_strategy_with_per_client_results_and_mixed_ranks():
    """A rule that returns one tree per client (as FlexLoRA does) gets each client's rank."""
    template = client_tree(4, 0)
    clients = [client_tree(r, r) for r in (2, 4, 8)]

    def per_client(trees, weights):
        return [jax.tree.map(lambda x: 2 * x, t) for t in trees]

    st = jf.Strategy(template, rule=per_client)
    replies = [jf.reply(instruction(n), t, num_examples=5) for n, t in zip((1, 2, 3), clients)]
    arrays, _ = st.aggregate_train(1, replies)
    assert sorted(st.per_client) == [1, 2, 3]
    assert st.per_client[3]["enc"]["q"]["kernel"].rank == 8
    np.testing.assert_allclose(f64(st.per_client[1]["enc"]["q"]["kernel"].b),
                               2 * f64(clients[0]["enc"]["q"]["kernel"].b))
    assert arrays["enc/q/kernel/a"].shape == (10, 2)


def malformed(rec, key, array):
    out = ArrayRecord(dict(rec.items()))
    out[key] = array
    return out


def raw(dtype, shape, data, stype=jf.NUMPY_STYPE):
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def npy(x, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_malformed_records_are_refused_naming_client_and_path():
    template = client_tree(4, 0)
    rec = jf.to_records(client_tree(4, 1))
    key = "enc/q/kernel/b"
    good = rec[key].numpy()
    cases = [
        (ArrayRecord({k: v for k, v in rec.items() if k != key}), "missing"),
        (malformed(rec, "enc/q/kernel/evil", Array(np.zeros(2, np.float32))), "unexpected path"),
        (malformed(rec, key, Array(np.zeros((4, 6), np.float32))), r"expected float32\[4, 9\]"),
        (malformed(rec, key, Array(good.astype(np.float64))), "declares float64"),
        (malformed(rec, key, raw("float32", (4, 9), npy(good), stype="torch.pt")), "serialisation"),
        (malformed(rec, key, raw("float32", (4, 9), b"\x93NUMPY garbage")), "not a numpy array"),
        (malformed(rec, key, raw("float32", (4, 9), npy(np.zeros((2, 18), np.float32)))),
         r"data holds float32\[2, 18\]"),
        (malformed(rec, key, raw("float32", (4, 9), npy(np.array([{"x": 1}], dtype=object),
                                                        allow_pickle=True))), "not a numpy array"),
        (malformed(rec, key, raw("float32", (4, 9), pickle.dumps(good))), "not a numpy array"),
        (malformed(rec, key, Array(np.full((4, 9), np.nan, np.float32))), "non-finite"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=f"client 42: .*{match}"):
            jf.from_records(bad, template, client=42)
        if "unexpected" in match:
            continue
        assert key in _message(bad, template)
    with pytest.raises(ValueError, match="client 42: enc/q/kernel:rank must be a positive int"):
        jf.from_records(rec, template, config=ConfigRecord({"enc/q/kernel:rank": -3}), client=42)
    with pytest.raises(ValueError, match="client 42: enc/x:rank: unexpected config"):
        jf.from_records(rec, template, config=ConfigRecord({"enc/x:rank": 2}), client=42)
    with pytest.raises(ValueError, match="ArrayRecord"):
        jf.from_records({"a": 1}, template, client=42)


def _message(bad, template):
    try:
        jf.from_records(bad, template, client=42)
    except ValueError as e:
        return str(e)
    raise AssertionError("accepted")


def test_strategy_refuses_bad_replies_naming_the_client():
    template = client_tree(4, 0)
    st = jf.Strategy(template, rule=weighted_mean)
    good = jf.reply(instruction(7), client_tree(4, 1), num_examples=3)
    evil = client_tree(4, 2)
    evil["enc"]["v"]["kernel"] = evil["enc"]["v"]["kernel"].replace(
        b=jnp.zeros((4, 7), jnp.float32))
    with pytest.raises(ValueError, match="client 8: enc/v/kernel/b: declares float32"):
        st.aggregate_train(1, [good, jf.reply(instruction(8), evil, num_examples=3)])
    with pytest.raises(ValueError, match="client 9: num-examples must be a positive"):
        st.aggregate_train(1, [good, jf.reply(instruction(9), client_tree(4, 3), num_examples=-1)])
    no_metrics = Message(RecordDict({"arrays": jf.to_records(client_tree(4, 3))}),
                         reply_to=instruction(10))
    with pytest.raises(ValueError, match="client 10: reply has no MetricRecord"):
        st.aggregate_train(1, [good, no_metrics])


# ---------------------------------------------------------------- with jlora.federated's rules


def replies_of(trees, sizes, first=21):
    return [jf.reply(instruction(first + i), t, num_examples=n)
            for i, (t, n) in enumerate(zip(trees, sizes))]


def exact_sum(trees, sizes, path=("enc", "q", "kernel")):
    p = np.asarray(sizes, float) / sum(sizes)
    node = lambda t: t[path[0]][path[1]][path[2]]
    return sum(w * lora_delta(node(t)) for w, t in zip(p, trees))


def test_strategy_default_rule_is_fedavg_of_factors():
    clients, sizes = [client_tree(4, s) for s in (1, 2)], [1, 3]
    st = jf.Strategy(client_tree(4, 0))
    arrays, _ = st.aggregate_train(1, replies_of(clients, sizes))
    got = jf.from_records(arrays, client_tree(4, 0))
    ref = 0.25 * f64(clients[0]["enc"]["v"]["kernel"].a) + 0.75 * f64(clients[1]["enc"]["v"]["kernel"].a)
    np.testing.assert_allclose(f64(got["enc"]["v"]["kernel"].a), ref, rtol=1e-6)
    np.testing.assert_allclose(f64(got["head"]["bias"].value), 0.25 * f64(clients[0]["head"]["bias"].value)
                               + 0.75 * f64(clients[1]["head"]["bias"].value), rtol=1e-6, atol=1e-7)


def test_strategy_flora_mixed_ranks_is_exact():
    from jlora import federated
    clients, sizes = [client_tree(r, r, alpha=a) for r, a in ((2, 4.0), (4, 3.0), (8, 16.0))], [5, 2, 3]
    st = jf.Strategy(client_tree(4, 0), rule=federated.flora)
    arrays, _ = st.aggregate_train(1, replies_of(clients, sizes))
    assert arrays["enc/q/kernel/a"].shape == (10, 14)       # ranks stacked: 2 + 4 + 8
    got = jf.from_records(arrays, client_tree(4, 0), config=jf.describe(st.model))
    node = got["enc"]["q"]["kernel"]
    np.testing.assert_allclose(lora_delta(node), exact_sum(clients, sizes), rtol=2e-5, atol=1e-6)


def test_strategy_flexlora_mixed_ranks_sends_each_client_its_truncation():
    from jlora import federated
    ranks, sizes = (2, 4, 8), [5, 2, 3]
    clients = [client_tree(r, r, alpha=2.0 * r) for r in ranks]
    st = jf.Strategy(client_tree(4, 0), rule=federated.flexlora)
    st.aggregate_train(1, replies_of(clients, sizes))
    u, s, vt = np.linalg.svd(exact_sum(clients, sizes))
    for i, r in enumerate(ranks):
        node = st.per_client[21 + i]["enc"]["q"]["kernel"]
        assert node.rank == r
        np.testing.assert_allclose(lora_delta(node), (u[:, :r] * s[:r]) @ vt[:r], rtol=1e-4, atol=1e-5)


def test_ranks_are_read_from_the_arrays_without_a_config():
    """Records alone (no ConfigRecord): a rank-8 client decodes against a rank-4 template."""
    tree = client_tree(8, 8)          # alpha = 16
    back = jf.from_records(jf.to_records(tree), client_tree(4, 0), client=3)
    node = back["enc"]["q"]["kernel"]
    assert node.rank == 8 and node.config.alpha == 8.0      # the template's alpha (2·4) kept
    np.testing.assert_array_equal(np.asarray(node.b), np.asarray(tree["enc"]["q"]["kernel"].b))
    bad = ArrayRecord(dict(jf.to_records(tree).items()))
    bad["enc/q/kernel/b"] = Array(np.zeros((6, 9), np.float32))   # a says 8, b says 6
    with pytest.raises(ValueError, match="client 3: enc/q/kernel/"):
        jf.from_records(bad, client_tree(4, 0), client=3)
