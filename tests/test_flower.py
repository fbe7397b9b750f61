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
    negative = Message(RecordDict({"arrays": jf.to_records(client_tree(4, 3)),
                                   "metrics": MetricRecord({"num-examples": -1})}),
                       reply_to=instruction(9))   # a reply not built by jf.reply
    with pytest.raises(ValueError, match="client 9: num-examples must be a non-negative"):
        st.aggregate_train(1, [good, negative])
    no_metrics = Message(RecordDict({"arrays": jf.to_records(client_tree(4, 3))}),
                         reply_to=instruction(10))
    with pytest.raises(ValueError, match="client 10: reply has no MetricRecord"):
        st.aggregate_train(1, [good, no_metrics])


def test_strategy_gives_a_client_without_data_weight_zero_as_flowers_fedavg():
    from flwr.serverapp.strategy import FedAvg

    empty = jf.reply(instruction(10), client_tree(4, 1), num_examples=0)
    full = jf.reply(instruction(11), client_tree(4, 2), num_examples=3)
    ours, _ = jf.Strategy(client_tree(4, 0), rule=weighted_mean).aggregate_train(1, [empty, full])
    theirs, _ = FedAvg().aggregate_train(1, [empty, full])
    expected = jf.to_records(client_tree(4, 2))
    for name in expected:
        np.testing.assert_array_equal(ours[name].numpy(), expected[name].numpy())
        np.testing.assert_array_equal(theirs[name].numpy(), expected[name].numpy())
    with pytest.raises(ValueError, match="all zero"):  # a round where no client had data
        jf.Strategy(client_tree(4, 0)).aggregate_train(1, [empty, empty])


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


# ---------------------------------------------------------------- scales, messages, dtypes


def rs_tree(rank, seed, rslora=True, alpha=2.0):
    spec = jlora.Spec({"enc/*/kernel": jlora.LoRA(rank=rank, alpha=alpha, rslora=rslora),
                       "head/*": jlora.Full()})
    return jlora.split(perturb(jlora.apply(PARAMS, spec, key=jax.random.key(seed)), seed=seed,
                               size=0.3))[0]


def test_describe_carries_rslora_and_scale_so_every_delta_decodes_exactly():
    """FLoRA's aggregate (alpha = R, rslora off: s = 1) sent to rsLoRA clients keeps s = 1."""
    from jlora import federated
    clients, sizes = [rs_tree(2, 1), rs_tree(4, 2)], [1, 3]
    agg = federated.flora(clients, np.asarray(sizes, float))
    cfg = jf.describe(agg)
    assert cfg["enc/q/kernel:rslora"] is False and cfg["enc/q/kernel:scale"] == 1.0
    node = jf.from_records(jf.to_records(agg), rs_tree(4, 0), config=cfg)["enc"]["q"]["kernel"]
    assert (node.rank, node.config.rslora, node.scale) == (6, False, 1.0)
    # float64 reference from the clients' own factors: Σ p_k·(α/√r_k)·a_k·b_k
    q = [c["enc"]["q"]["kernel"] for c in clients]
    ref = sum(n / 4 * 2.0 / np.sqrt(r) * f64(k.a) @ f64(k.b) for k, n, r in zip(q, sizes, (2, 4)))
    np.testing.assert_allclose(lora_delta(node), ref, rtol=1e-5, atol=1e-6)
    # a plain-LoRA client read against an rsLoRA template (and back) keeps its own scale
    for sent, template in ((rs_tree(4, 3, rslora=False), rs_tree(4, 0)),
                           (rs_tree(4, 3), rs_tree(4, 0, rslora=False))):
        got = jf.from_records(jf.to_records(sent), template, config=jf.describe(sent), client=1)
        s_ref = 2.0 / (np.sqrt(4) if sent["enc"]["q"]["kernel"].config.rslora else 4)
        assert got["enc"]["q"]["kernel"].scale == s_ref
        np.testing.assert_allclose(lora_delta(got["enc"]["q"]["kernel"]),
                                   s_ref * f64(sent["enc"]["q"]["kernel"].a)
                                   @ f64(sent["enc"]["q"]["kernel"].b), rtol=1e-6)
    rec = jf.to_records(clients[0])
    for entry, match in (({"enc/q/kernel:scale": 3.0}, "enc/q/kernel:scale is 3.0 but"),
                         ({"enc/q/kernel:rslora": "yes"}, "enc/q/kernel:rslora must be a bool"),
                         ({"enc/q/kernel:scale": float("nan")},
                          "enc/q/kernel:scale must be a positive")):
        with pytest.raises(ValueError, match=f"client 5: {match}"):
            jf.from_records(rec, rs_tree(2, 0), config=ConfigRecord(entry), client=5)


class Nodes:
    """The one Grid call FedAvg's sampling makes: the connected node ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


@pytest.fixture
def serverapp_identity(monkeypatch):
    """What a ServerApp process sets before its strategy builds instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_evaluate_messages_carry_the_description_train_messages_carry(serverapp_identity):
    from jlora import federated
    template = client_tree(4, 0)
    clients, sizes = [client_tree(2, 1), client_tree(4, 2)], [1, 3]
    st = jf.Strategy(template, rule=federated.flora, min_available_nodes=2,
                     min_evaluate_nodes=2, min_train_nodes=2)
    arrays, _ = st.aggregate_train(1, replies_of(clients, sizes, first=1))
    server = st.model["enc"]["q"]["kernel"]
    assert (server.rank, server.scale) == (6, 1.0)
    for configure in (st.configure_evaluate, st.configure_train):
        messages = list(configure(2, arrays, ConfigRecord({"lr": 0.1}), Nodes([1, 2])))
        assert len(messages) == 2
        for msg in messages:
            cfg = msg.content["config"]
            assert cfg["server-round"] == 2 and cfg["lr"] == 0.1
            assert cfg["enc/q/kernel:rank"] == 6 and cfg["enc/q/kernel:scale"] == 1.0
            # the whole message config, Flower's and the user's keys included
            got = jf.from_records(msg.content["arrays"], template, config=cfg)["enc"]["q"]["kernel"]
            np.testing.assert_allclose(lora_delta(got), exact_sum(clients, sizes), rtol=2e-5,
                                       atol=1e-6)
    # a per-client rule: each node evaluates its own tree, as it trains it
    st = jf.Strategy(template, rule=federated.flexlora, min_available_nodes=2,
                     min_evaluate_nodes=2)
    arrays, _ = st.aggregate_train(1, replies_of([client_tree(2, 1), client_tree(8, 2)], sizes,
                                                 first=1))
    for msg in st.configure_evaluate(2, arrays, ConfigRecord({}), Nodes([1, 2])):
        want = st.per_client[msg.metadata.dst_node_id]["enc"]["q"]["kernel"]
        assert msg.content["config"]["enc/q/kernel:rank"] == want.rank
        got = jf.from_records(msg.content["arrays"], template, config=msg.content["config"])
        np.testing.assert_array_equal(np.asarray(got["enc"]["q"]["kernel"].a), np.asarray(want.a))


def test_config_entries_that_are_not_jloras_are_ignored_and_malformed_ones_raise():
    tree, template = client_tree(8, 8), client_tree(4, 0)
    cfg = ConfigRecord({**dict(jf.describe(tree).items()), "server-round": 3, "lr": 0.01,
                        "note": "x:y", "optimizer:momentum": 0.9})
    back = jf.from_records(jf.to_records(tree), template, config=cfg, client=2)
    assert back["enc"]["q"]["kernel"].rank == 8 and back["enc"]["q"]["kernel"].scale == 2.0
    for entry, match in (({"enc/x:rank": 2}, "enc/x:rank: unexpected config entry"),
                         ({"enc/q/kernel:rank": "8"}, "enc/q/kernel:rank must be a positive int"),
                         ({"enc/q/kernel:alpha": -1.0}, "enc/q/kernel:alpha must be a positive")):
        with pytest.raises(ValueError, match=f"client 2: {match}"):
            jf.from_records(jf.to_records(tree), template,
                            config=ConfigRecord({**dict(cfg.items()), **entry}), client=2)


def test_bfloat16_adapters_round_trip_exactly():
    params = {"d": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)),
                                          jnp.bfloat16)}}
    spec = jlora.Spec({"d/kernel": jlora.LoRA(rank=2, dtype=jnp.bfloat16)})
    tree = jlora.split(perturb(jlora.apply(params, spec, key=jax.random.key(0)), size=0.5))[0]
    rec = jf.to_records(tree)
    assert rec["d/kernel/b"].dtype == "bfloat16"
    back = jf.from_records(rec, tree, config=jf.describe(tree), client=1)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    bad = malformed(rec, "d/kernel/a", Array(np.full((6, 2), np.nan, jnp.bfloat16)))
    with pytest.raises(ValueError, match="client 1: d/kernel/a: non-finite"):
        jf.from_records(bad, tree, client=1)


def test_reply_and_strategy_refuse_silent_inputs():
    tree = client_tree(4, 1)
    for n in (2.7, True, 0.4, -1, "3", None):
        with pytest.raises(ValueError, match="reply: num_examples must be a non-negative int"):
            jf.reply(instruction(3), tree, num_examples=n)
    for n in (0, 5, np.int64(7)):
        sent = jf.reply(instruction(3), tree, num_examples=n).content["metrics"]
        assert sent["num-examples"] == n
    for kw in ({"server_inputs": ("nu_hat",)}, {"send_state": True}):
        with pytest.raises(ValueError, match="Strategy: server_inputs=.* pass server_optimizer"):
            jf.Strategy(tree, **kw)


# ---------------------------------------------------------------- against Flower's own strategies


def flower_reply(node, arrays, n):
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": n})}),
                   reply_to=instruction(node))


@pytest.mark.parametrize("kind", ["adagrad", "yogi", "adam"])
def test_strategy_server_optimizers_equal_flowers_strategies(kind, serverapp_identity):
    """float64, 5 rounds; each strategy runs its own configure_train; the same replies."""
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-2
    if kind == "adagrad":
        flower = FedAdagrad(eta=eta, tau=tau)
        ours = jlora.optim.fedadagrad(eta, b1=0.0, tau=tau, initial_accumulator=0.0)
    elif kind == "yogi":
        flower = FedYogi(eta=eta, beta_1=b1, beta_2=b2, tau=tau)
        ours = jlora.optim.fedyogi(eta, b1=b1, b2=b2, tau=tau, initial_accumulator=0.0)
    else:   # Flower's FedAdam bias-corrects with β^(round + 1)
        flower = FedAdam(eta=eta, beta_1=b1, beta_2=b2, tau=tau)
        ours = jlora.optim.fedadam(eta, b1=b1, b2=b2, tau=tau, initial_accumulator=0.0,
                                   bias_correction="flower")
    rng = np.random.default_rng(0)
    x0 = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    with jax.enable_x64(True):
        st = jf.Strategy({k: jnp.asarray(v) for k, v in x0.items()}, rule=weighted_mean,
                         server_optimizer=ours, min_available_nodes=3, min_train_nodes=3)
        arrays_f = arrays_j = ArrayRecord({k: Array(v) for k, v in x0.items()})
        for rnd in range(1, 6):
            list(flower.configure_train(rnd, arrays_f, ConfigRecord({}), Nodes([10, 11, 12])))
            list(st.configure_train(rnd, arrays_j, ConfigRecord({}), Nodes([10, 11, 12])))
            x = {k: arrays_f[k].numpy() for k in x0}
            clients = [{k: v + rng.normal(size=v.shape) * 0.3 for k, v in x.items()}
                       for _ in range(3)]
            replies = [flower_reply(10 + i, c, n)
                       for i, (c, n) in enumerate(zip(clients, [1, 3, 2]))]
            arrays_f, _ = flower.aggregate_train(rnd, replies)
            arrays_j, _ = st.aggregate_train(rnd, replies)
            for k in x0:
                assert arrays_j[k].dtype == "float64"
                moved = np.abs(arrays_f[k].numpy() - x[k]).max()
                assert moved > 1e-3     # the step is not trivially zero
                np.testing.assert_allclose(arrays_j[k].numpy(), arrays_f[k].numpy(),
                                           rtol=1e-13, atol=1e-15)
