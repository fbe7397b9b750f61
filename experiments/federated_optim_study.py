"""Federated optimizers for LoRA on non-IID tweets: FedAvg, FedAdam, MIME/MimeLite, FedLADA, FedSPS.

all-MiniLM-L6-v2 on tweet sentiment split over ``--clients`` clients by a
Dirichlet label skew (``--dirichlet`` 0.1: most clients see one or two
classes). To fit a 2-core CPU, the first five encoder layers are frozen and
their output cached once; rank-8 LoRA adapts the last layer's query/value
kernels and a zero-initialised head is trained in full. Every method runs
the same rounds, clients, local steps and batches, with two aggregations:

* ``fedavg``: FedAvg of the factors (``jlora.federated.fedavg``), server state
  in factor space;
* ``flora``: FLoRA's exact stacking (``jlora.federated.flora``) merged into the
  base, clients restarting from the same fresh adapter every round
  (``merge_and_restart``); FedAdam then steps the merged weights
  (``jlora.optim.merged_step``: its pseudo-gradient is minus the exact
  aggregated delta), MIME/FedLADA keep
  their statistics in the fresh adapter's coordinates.

Clients (one jitted ``vmap`` per round): FedAvg/FedAdam local SGD with
momentum; MIME/MimeLite the same SGDm with the server's momentum frozen (MIME
adds the SVRG correction; its "full-batch" gradient is each client's gradient
on ``--full-batch`` examples at the round's model, example-weighted); FedLADA
its amended AMSGrad; FedSPS/FedDecSPS Polyak steps (FedDecSPS keeps each
client's state across rounds). Writes ``experiments/results/
federated_optim_study.{md,json,png}``: test accuracy per round and bytes
exchanged per round (``jlora.optim.communication_bytes``).

    python experiments/federated_optim_study.py [--rounds 8 --clients 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora
from jlora import federated as fl
from jlora.optim import _fedopt as fo
from jlora.tree import leaves_with_paths
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models._layers import key_bias
from experiments.models.bert import BertEncoder, Layer, load_pretrained, minilm_dir

METHODS = ("FedAvg", "FedAdam", "MimeLite", "MIME", "FedLADA", "FedSPS", "FedDecSPS")
AGGREGATIONS = ("fedavg", "flora")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAST = "layer_5"
SPEC = jlora.Spec({f"{LAST}/self_attn/{{query,value}}/kernel": jlora.LoRA(rank=8, alpha=16),
                   "classifier/{kernel,bias}": jlora.Full()})


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, *, seed: int = 0,
                    min_size: int = 8) -> list[np.ndarray]:
    """Label-skewed client index sets: class ``c``'s examples split by ``Dir(alpha)`` shares.

    Redrawn until every client holds at least ``min_size`` examples (the
    usual protocol of Hsu et al. 2019); seeded.
    """
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(alpha * np.ones(clients))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(map(len, parts)) >= min_size:
            return [np.sort(np.asarray(p, np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gives {clients} clients >= {min_size} examples")


class Top(nn.Module):
    """The last encoder layer, mean pooling and the classifier, on cached hidden states."""

    cfg: object

    @nn.compact
    def __call__(self, h, mask):
        x = Layer(self.cfg, name=LAST)(h, key_bias(mask, h.dtype))
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return nn.Dense(len(LABELS), name="classifier")(pooled)


def cache_hidden(cfg, bert, ids, mask, batch=64):
    # embeddings and the frozen layers under the adapted one, run once to cache
    below = BertEncoder(dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers - 1))
    params = {k: v for k, v in bert.items() if k != LAST}
    fwd = jax.jit(lambda i, m: below.apply({"params": params}, i, m))
    out = []
    for s in tqdm(range(0, len(ids), batch), desc="cache frozen layers", leave=False):
        i, m = ids[s:s + batch], mask[s:s + batch]
        pad = batch - len(i)
        hb = fwd(np.pad(i, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0))))
        out.append(np.asarray(hb[:len(i)], np.float32))
    return np.concatenate(out)


NAMES = {"FedAvg": "fedavg", "FedAdam": "fedadam", "MimeLite": "mimelite", "MIME": "mime",
         "FedLADA": "fedlada", "FedSPS": "fedsps", "FedDecSPS": "feddecsps"}


def round_bytes(method, aggregation, x0, frozen0, clients):
    """Bytes per client per round, from the trees each side sends (shapes only)."""
    shapes = jax.eval_shape(lambda t: t, x0)
    if aggregation == "fedavg":
        down = shapes
    elif method == "FedAdam":   # the merged weights' change: dense adapted kernels + head
        down = jax.eval_shape(lambda t, f: [n.delta() if n.rank else n.value for _, n in
                                            leaves_with_paths(jlora.combine(t, f))
                                            if jlora.is_node(n)], x0, frozen0)
    else:   # FLoRA's stacked factors of all clients
        down = jax.eval_shape(lambda t: fl.flora([t] * clients, jnp.ones(clients) / clients), x0)
    return fo.communication_bytes(NAMES[method], shapes, download=down,
                                  base_optimizer=optax.sgd(0.1, momentum=0.9))


def run(method, aggregation, setup, args):
    model, params, pool, table, counts, test = setup
    h_pool, m_pool, y_pool = pool
    K, S, B = args.clients, args.local_steps, args.batch
    weights = jnp.asarray(counts / counts.sum(), jnp.float32)
    restart_key = jax.random.key(args.seed + 1)
    x0, frozen0 = jlora.split(jlora.apply(params, SPEC, key=restart_key))

    def loss_fn(t, frozen, h, m, y):
        logits = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, h, m)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    sgdm = optax.sgd(args.lr, momentum=0.9)
    server_opt = {"FedAdam": fo.fedadam(args.server_lr, tau=args.tau),
                  "MimeLite": fo.mime_server(sgdm), "MIME": fo.mime_server(sgdm),
                  "FedLADA": fo.fedlada_server(eps=1e-8)}.get(method)
    mime = method in ("MIME", "MimeLite")
    dense = aggregation == "flora" and method == "FedAdam"   # FedAdam steps the merged weights

    def client_tx(server_state):
        if mime:
            return fo.mime_client(sgdm, server_state)
        if method == "FedLADA":
            return fo.fedlada_client(args.lada_lr, server_state, alpha=args.lada_alpha)
        if method == "FedSPS":
            return fo.fedsps(c=args.sps_c, max_step=args.sps_max)
        if method == "FedDecSPS":
            return fo.feddecsps(c0=args.sps_c, max_step=args.sps_max)
        return sgdm

    def batch_of(row, count, key, size):
        j = jax.random.randint(key, (size,), 0, count)
        ids = row[j]
        return h_pool[ids], m_pool[ids], y_pool[ids]

    def client(x, frozen, server_state, c, cstate, row, count, key):
        tx = client_tx(server_state)
        st = tx.init(x) if method != "FedDecSPS" else cstate
        y = x

        def body(s, carry):
            y, st = carry
            h, m, lab = batch_of(row, count, jax.random.fold_in(key, s), B)
            loss, g = jax.value_and_grad(loss_fn)(y, frozen, h, m, lab)
            if method == "MIME":
                g = fo.mime_gradient(g, jax.grad(loss_fn)(x, frozen, h, m, lab), c)
            u, st = tx.update(g, st, y, value=loss) if "SPS" in method else tx.update(g, st, y)
            return optax.apply_updates(y, u), st

        y, st = jax.lax.fori_loop(0, S, body, (y, st))
        extra = ()
        if method == "FedLADA":
            extra = (st.nu_hat, fo.fedlada_offset(x, y, args.lada_lr, S))
        full = ()
        if method == "MimeLite":   # the client's gradient at x on --full-batch examples (for c)
            h, m, lab = batch_of(row, count, jax.random.fold_in(key, 10_000), args.full_batch)
            full = jax.grad(loss_fn)(x, frozen, h, m, lab)
        return y, extra, full, (st if method == "FedDecSPS" else cstate)

    def wmean(tree):
        return jax.tree.map(lambda v: jnp.tensordot(weights, v, axes=1).astype(v.dtype), tree)

    @jax.jit
    def round_fn(x, frozen, sstate, cstates, c, key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(K))
        ys, extra, full, cstates = jax.vmap(client, in_axes=(None, None, None, None, 0, 0, 0, 0))(
            x, frozen, sstate if (mime or method == "FedLADA") else None, c, cstates,
            table, counts_j, keys)
        clients = fl.unstack(ys, K)
        kw = {}
        if method == "FedLADA":
            kw = {"nu_hat": wmean(extra[0]), "offset": wmean(extra[1])}
        if mime:   # MIME's c was computed before training; MimeLite's comes with the results
            kw = {"full_gradient": c if method == "MIME" else wmean(full)}
        if aggregation == "fedavg":
            agg = fl.fedavg(clients, weights)
            if server_opt is None:
                return agg, frozen, sstate, cstates
            x, sstate = fo.server_step(server_opt, sstate, x, agg, **kw)
            return x, frozen, sstate, cstates
        stacked = fl.flora(clients, weights)
        if dense:   # FedAdam on the merged weights: g = −(exact Σ p_k ΔK_k), then restart
            x, frozen, sstate = fo.merged_step(server_opt, sstate, x, frozen, stacked, spec=SPEC,
                                               key=restart_key)
            return x, frozen, sstate, cstates
        bases = jax.tree.map(lambda n: n.base if jlora.is_node(n) and hasattr(n, "base") else n,
                             frozen, is_leaf=jlora.is_node)
        merged = jlora.merge(stacked, onto=bases)          # base + exact Σ p_k ΔK_k, head mean
        if server_opt is not None:   # statistics only: the FLoRA merge is the model step
            _, sstate = server_opt.update(jax.tree.map(jnp.zeros_like, x), sstate, x, **kw)
        x, frozen = jlora.split(jlora.apply(merged, SPEC, key=restart_key))
        return x, frozen, sstate, cstates

    counts_j = jnp.asarray(counts, jnp.int32)
    if dense:
        sstate = server_opt.init(jlora.merge(jlora.combine(x0, frozen0)))
    elif server_opt is not None:
        sstate = server_opt.init(x0)
    else:
        sstate = None
    if method == "FedDecSPS":
        cstates = jax.vmap(lambda _: fo.feddecsps(c0=args.sps_c, max_step=args.sps_max).init(x0))(
            jnp.arange(K))
    else:
        cstates = jnp.zeros(K)

    @jax.jit
    def control_variate(x, frozen, key):
        """MIME's c: each client's gradient at x on --full-batch examples, weighted."""
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(K))
        g = jax.vmap(lambda row, count, k: jax.grad(loss_fn)(
            x, frozen, *batch_of(row, count, jax.random.fold_in(k, 10_000), args.full_batch)))(
            table, counts_j, keys)
        return wmean(g)

    h_te, m_te, y_te = test
    evaluate = jax.jit(lambda t, frozen, h, m: jnp.argmax(
        jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, h, m), -1))

    def accuracy(x, frozen):
        preds = [np.asarray(evaluate(x, frozen, h_te[s:s + 200], m_te[s:s + 200]))
                 for s in range(0, len(y_te), 200)]
        return float((np.concatenate(preds) == y_te).mean())

    com = round_bytes(method, aggregation, x0, frozen0, K)

    x, frozen = x0, frozen0
    accs = [accuracy(x, frozen)]
    c = jax.tree.map(jnp.zeros_like, x0)
    t0 = time.perf_counter()
    bar = tqdm(range(args.rounds), desc=f"{method}/{aggregation}", leave=False)
    for r in bar:
        key = jax.random.fold_in(jax.random.key(args.seed), r)
        if method == "MIME":   # the control variate is needed before training: one more exchange
            c = control_variate(x, frozen, key)
        x, frozen, sstate, cstates = round_fn(x, frozen, sstate, cstates, c, key)
        accs.append(accuracy(x, frozen))
        bar.set_postfix(acc=f"{accs[-1]:.3f}")
    wall = time.perf_counter() - t0
    return {"run": f"{method} + {aggregation}", "method": method, "aggregation": aggregation,
            "accuracy": accs[-1], "best": max(accs), "accuracy_per_round": accs,
            "up_bytes": com.up, "down_bytes": com.down, "round_bytes": com.total(K), "wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--dirichlet", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--full-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05, help="client SGD(momentum 0.9) lr")
    ap.add_argument("--server-lr", type=float, default=0.01, help="FedAdam eta")
    ap.add_argument("--tau", type=float, default=1e-3, help="FedAdam adaptivity")
    ap.add_argument("--lada-lr", type=float, default=5e-3)
    ap.add_argument("--lada-alpha", type=float, default=0.5)
    ap.add_argument("--sps-c", type=float, default=0.5)
    ap.add_argument("--sps-max", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--aggregations", nargs="*", default=list(AGGREGATIONS))
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.time()

    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (tx, ty), (vx, vy) = load_tweets(args.train, args.test, seed=args.seed)
    ids, mask = tokenize(list(tx) + list(vx), model_dir, args.max_len)
    hidden = cache_hidden(cfg, bert, ids, mask)
    n = len(tx)
    parts = dirichlet_split(ty, args.clients, args.dirichlet, seed=args.seed)
    counts = np.array([len(p) for p in parts])
    table = np.zeros((args.clients, counts.max()), np.int32)
    for k, p in enumerate(parts):
        table[k, :len(p)] = p
    model = Top(cfg)
    params = {LAST: bert[LAST], "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                                               "bias": jnp.zeros(len(LABELS))}}
    setup = (model, params, (jnp.asarray(hidden[:n]), jnp.asarray(mask[:n]), jnp.asarray(ty)),
             jnp.asarray(table), counts, (hidden[n:], mask[n:], vy))
    skew = [np.bincount(ty[p], minlength=3).tolist() for p in parts]
    print(f"{args.clients} clients, Dirichlet({args.dirichlet}) label counts: {skew}", flush=True)

    results = []
    for aggregation in args.aggregations:
        for method in args.methods:
            r = run(method, aggregation, setup, args)
            results.append(r)
            print(f"{r['run']:<22} acc {r['accuracy']:.3f} (best {r['best']:.3f})  "
                  f"{r['round_bytes'] / 2**20:.2f} MiB/round  {r['wall_s']:.0f}s", flush=True)
    write(results, args, skew, time.time() - t_start)
    return results


def write(results, args, skew, total_s):
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "federated_optim_study")
    env = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "device": env, "label_counts": skew,
                   "total_s": total_s, "results": results}, f, indent=1)
    lines = [f"all-MiniLM-L6-v2 (layers 0-4 frozen and cached), LoRA r8 (alpha 16) on "
             f"{LAST} query/value + head; {args.train} train tweets over {args.clients} clients "
             f"(Dirichlet {args.dirichlet} label skew), {args.test} test, {args.rounds} rounds x "
             f"{args.local_steps} local steps x batch {args.batch}; {env}; total "
             f"{total_s / 60:.1f} min.", "",
             "| method + aggregation | test acc. (final) | best round | up / client / round | "
             "down / client / round | all clients / round | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['accuracy']:.3f} | {r['best']:.3f} | "
                     f"{r['up_bytes'] / 1024:.0f} KiB | {r['down_bytes'] / 1024:.0f} KiB | "
                     f"{r['round_bytes'] / 2**20:.2f} MiB | {r['wall_s']:.0f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, aggregation in zip(axes, AGGREGATIONS):
        for r in results:
            if r["aggregation"] == aggregation:
                ax.plot(r["accuracy_per_round"], marker=".", label=r["method"])
        ax.set_title(f"aggregation: {aggregation}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
