"""Federated LoRA on Flower: a real ``flwr.simulation.run_simulation`` on tweet sentiment.

Each Flower ``ClientApp`` (a Ray actor) holds one client's share of the tweets
(Dirichlet label skew) as frozen all-MiniLM-L6-v2 sentence embeddings
(``--features hashed``: a hashed bag of words, no model download, for a quick
check), and trains a LoRA adapter on the hidden layer of a small MLP head plus
its classifier with Adam. The ``ServerApp`` runs :class:`jlora.flower.Strategy`:
the replies' records are decoded and checked by path, aggregated with a
``jlora.federated`` rule and stepped by a server optimizer:

* ``--rule fedavg`` (every client rank 4) with ``--server-opt fedadam|fedyogi|fedadagrad|none``;
* ``--rule flora`` (client ranks 2/4/8): exact stacking; clients merge the stacked
  factors into their base (kept in Flower's per-node ``context.state``) and
  restart from a fresh adapter, as FLoRA's rounds do;
* ``--rule flexlora`` (ranks 2/4/8): each client gets the truncated SVD of the
  exact aggregate at its own rank.

The server evaluates the global model on held-out tweets after every round
and the script prints accuracy and the bytes Flower serialised per round.

    python experiments/federated_flower.py [--rule flora --clients 4 --rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.flower as jf
from jlora import federated as fl
from experiments.data import LABELS, load_tweets

HIDDEN = 64
RANKS = (2, 4, 8)
SERVER_OPTS = {"none": None, "fedadam": lambda: jlora.optim.fedadam(1e-2, tau=1e-3),
               "fedyogi": lambda: jlora.optim.fedyogi(1e-2, tau=1e-3),
               "fedadagrad": lambda: jlora.optim.fedadagrad(1e-2, tau=1e-3)}


def hashed_features(texts, dim=256):
    """A bag of words hashed into ``dim`` buckets (crc32), L2-normalised."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.encode()) % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1.0)


def minilm_features(texts, max_len=32, batch=64):
    from experiments.data import tokenize
    from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir

    d = minilm_dir()
    cfg, bert = load_pretrained(d)
    model = SentenceClassifier(cfg, num_classes=len(LABELS))
    embed = jax.jit(lambda i, m: model.apply({"params": {"bert": bert}}, i, m,
                                             method=SentenceClassifier.embed))
    ids, mask = tokenize(texts, d, max_len)
    out = []
    for s in range(0, len(ids), batch):
        i, m = ids[s:s + batch], mask[s:s + batch]
        pad = batch - len(i)
        out.append(np.asarray(embed(np.pad(i, ((0, pad), (0, 0))),
                                    np.pad(m, ((0, pad), (0, 0)))))[:len(i)])
    return np.concatenate(out)


def base_params(dim, seed):
    rng = np.random.default_rng(seed)
    return {"hidden": {"kernel": jnp.asarray(rng.normal(size=(dim, HIDDEN)) / np.sqrt(dim),
                                             jnp.float32), "bias": jnp.zeros(HIDDEN)},
            "classifier": {"kernel": jnp.zeros((HIDDEN, len(LABELS))),
                           "bias": jnp.zeros(len(LABELS))}}


def spec(rank):
    return jlora.Spec({"hidden/kernel": jlora.LoRA(rank=rank, alpha=2.0 * rank),
                       "classifier/*": jlora.Full()})


def logits(params, x):
    h = jax.nn.gelu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def accuracy(params, x, y):
    return float((np.asarray(logits(params, x)).argmax(-1) == y).mean())


def client_rank(rule, k):
    return 4 if rule == "fedavg" else RANKS[k % len(RANKS)]


def make_apps(args, parts, feats, labels, test):
    """The ClientApp and ServerApp (closures over the data: Ray ships them to the actors)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    dim = feats.shape[1]
    key = jax.random.key(args.seed)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        rank = client_rank(args.rule, k)
        x, y = feats[parts[k]], labels[parts[k]]
        params = base_params(dim, args.seed)
        if "base" in context.state:   # FLoRA: this client's merged base so far
            params = jf.from_records(context.state["base"], params, client="state")
        mine, frozen = jlora.split(jlora.apply(params, spec(rank), key=key))
        config = msg.content["config"]
        got = {k_: v for k_, v in config.items() if ":" in k_}
        received = jf.from_records(msg.content["arrays"], mine, config=ConfigRecord(got),
                                   client="server")
        if args.rule == "flora":
            params = jlora.merge(received, onto=params)
            context.state["base"] = jf.to_records(params)
            trainable, frozen = jlora.split(jlora.apply(params, spec(rank), key=key))
        elif received["hidden"]["kernel"].rank != rank:   # round 1 of FlexLoRA: own rank
            trainable = mine
        else:
            trainable = received
        tx = optax.adam(args.lr)
        opt = tx.init(trainable)

        @jax.jit
        def step(t, opt, xb, yb):
            def loss_fn(t):
                p = jlora.merge(jlora.combine(t, frozen))
                return optax.softmax_cross_entropy_with_integer_labels(logits(p, xb), yb).mean()
            loss, g = jax.value_and_grad(loss_fn)(t)
            u, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, u), opt, loss

        rng = np.random.default_rng(args.seed * 1000 + k * 100 + int(config["server-round"]))
        for _ in range(args.local_steps):
            j = rng.integers(0, len(x), args.batch)
            trainable, opt, loss = step(trainable, opt, x[j], y[j])
        return jf.reply(msg, trainable, num_examples=len(x), metrics={"train-loss": float(loss)})

    server_app = ServerApp()
    out = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        params = base_params(dim, args.seed)
        template, _ = jlora.split(jlora.apply(params, spec(4), key=key))
        make = SERVER_OPTS[args.server_opt]
        strategy = jf.Strategy(template, rule=getattr(fl, args.rule),
                               server_optimizer=None if make is None else make(),
                               fraction_evaluate=0.0, min_train_nodes=args.clients,
                               min_available_nodes=args.clients)
        server = {"params": params}

        def evaluate(rnd: int, arrays: ArrayRecord):
            model = strategy.model
            if args.rule == "flexlora" and strategy.per_client:   # the largest-rank truncation
                model = max(strategy.per_client.values(), key=lambda t: t["hidden"]["kernel"].rank)
            if args.rule == "flora":
                if rnd > 0:
                    server["params"] = jlora.merge(model, onto=server["params"])
                merged = server["params"]
            else:
                merged = jlora.merge(model, onto=params)
            acc = accuracy(merged, *test)
            out.setdefault("accuracy", []).append(acc)
            out.setdefault("down_bytes", []).append(jf.to_records(model).count_bytes())
            return MetricRecord({"accuracy": acc})

        result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(),
                                num_rounds=args.rounds, evaluate_fn=evaluate)
        out["train_loss"] = [float(m["train-loss"]) for _, m in
                             sorted(result.train_metrics_clientapp.items())]

    return client_app, server_app, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--features", choices=("minilm", "hashed"), default="minilm")
    ap.add_argument("--rule", choices=("fedavg", "flora", "flexlora"), default="flora")
    ap.add_argument("--server-opt", choices=tuple(SERVER_OPTS), default="none")
    ap.add_argument("--dirichlet", type=float, default=1.0)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.server_opt != "none" and args.rule != "fedavg":
        ap.error("--server-opt needs --rule fedavg (an aggregate with the server's structure)")
    t0 = time.time()

    from flwr.simulation import run_simulation
    from experiments.federated_optim_study import dirichlet_split

    (tx, ty), (vx, vy) = load_tweets(args.train, args.test, seed=args.seed)
    feats = (minilm_features if args.features == "minilm" else hashed_features)(list(tx) + list(vx))
    parts = dirichlet_split(ty, args.clients, args.dirichlet, seed=args.seed, min_size=4)
    client_app, server_app, out = make_apps(args, parts, feats[:len(tx)], ty,
                                            (feats[len(tx):], vy))
    # Ray's workers import this module and jlora: give them the repository on their path
    os.environ["PYTHONPATH"] = os.path.abspath(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    print(f"\nFlower simulation: {args.clients} clients, rule {args.rule}, server optimizer "
          f"{args.server_opt}, {args.features} features; {time.time() - t0:.0f}s")
    print("round  test accuracy  server->client bytes")
    for r, (a, b) in enumerate(zip(out["accuracy"], out["down_bytes"])):
        print(f"{r:>5}  {a:>13.3f}  {b:>20,}")
    return out


if __name__ == "__main__":
    main()
