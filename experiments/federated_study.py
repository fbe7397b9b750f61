"""Federated LoRA on a real task: all-MiniLM-L6-v2 on tweet sentiment over 10 clients.

Ten federated methods, each run on three splits of the same tweets over ``K``
clients (IID, Dirichlet label skew α = 1.0 and α = 0.1), ``M`` clients sampled
per round, all of a round's clients trained in one jitted ``vmap``
(``jlora.federated.simulate``; FeDLRT's three exchanges per round are three
vmapped programs of their own):

    FedAvg-LoRA | FFA-LoRA | FlexLoRA (ranks 2/4/8) | FLoRA (ranks 2/4/8) | LoRA-FAIR |
    FSLoRA (sketch ratios 1/4, 1/2, 1) | FeDLRT | PF2LoRA | pFedLoRA | FedDPA

To fit a 2-core CPU, the first five encoder layers are frozen and run once
(their outputs are cached); adapters sit on the last layer's attention query
and value kernels, with a zero-initialised 3-way head trained alongside.
Reported: global test accuracy per round, the personalized accuracy (each
client's own model on its own test split, which follows its label mix) and the
bytes sent per round (both directions, all sampled clients).

Writes ``experiments/results/federated_study.{md,json,png}``.

    python experiments/federated_study.py [--rounds 8 --clients 10 --per-round 5]
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
from experiments.data import LABELS, load_tweets, tokenize
from experiments.models._layers import key_bias
from experiments.models.bert import BertEncoder, Layer, load_pretrained, minilm_dir

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QV = "layer_5/self_attn/{query,value}/kernel"
HEAD = "classifier/{kernel,bias}"
METHODS = ["FedAvg-LoRA", "FFA-LoRA", "FlexLoRA", "FLoRA", "LoRA-FAIR", "FSLoRA", "FeDLRT",
           "PF2LoRA", "pFedLoRA", "FedDPA"]
SPLITS = {"IID": None, "Dir(1.0)": 1.0, "Dir(0.1)": 0.1}
RANKS = (2, 4, 8)  # heterogeneous client ranks (FlexLoRA, FLoRA), padded to 8
RATIOS = (0.25, 0.5, 1.0)  # FSLoRA sketching ratios
R = 8  # LoRA rank everywhere else


# ---------------------------------------------------------------- model


class Top(nn.Module):
    """The last encoder layer, mean pooling and the classifier."""

    cfg: object

    @nn.compact
    def __call__(self, h, mask):
        return self.head(self.embed(h, mask))

    @nn.compact
    def head(self, pooled):
        return nn.Dense(len(LABELS), name="classifier")(pooled)

    @nn.compact
    def embed(self, h, mask):
        h = Layer(self.cfg, name="layer_5")(h, key_bias(mask, h.dtype))
        m = mask[..., None].astype(h.dtype)
        return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


# ---------------------------------------------------------------- data


def split_clients(labels, test_labels, k, alpha, rng):
    """Client index lists for train and test; Dirichlet(α) label skew shared by both."""
    train, test = [[] for _ in range(k)], [[] for _ in range(k)]
    if alpha is None:
        for idx, lab, out in ((np.arange(len(labels)), labels, train),
                              (np.arange(len(test_labels)), test_labels, test)):
            for c, part in enumerate(np.array_split(rng.permutation(idx), k)):
                out[c].extend(part.tolist())
        return train, test
    for cls in range(len(LABELS)):
        share = rng.dirichlet(alpha * np.ones(k))
        for lab, out in ((labels, train), (test_labels, test)):
            idx = rng.permutation(np.flatnonzero(lab == cls))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for c, part in enumerate(np.split(idx, cuts)):
                out[c].extend(part.tolist())
    for c in range(k):  # every client keeps at least 2 examples
        if len(train[c]) < 2:
            train[c].extend(rng.choice(len(labels), 2 - len(train[c]), replace=False).tolist())
    return train, test


def client_table(lists, n_max):
    """``(K, n_max)`` index table (padded by repetition) and counts."""
    idx = np.zeros((len(lists), n_max), np.int32)
    for c, lst in enumerate(lists):
        lst = np.asarray(lst, np.int32)
        idx[c] = np.resize(lst, n_max) if len(lst) else 0
    return idx, np.array([len(x) for x in lists], np.int32)


# ---------------------------------------------------------------- training pieces


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def rank_mask(t, rank):
    """Zero the LoRA components past ``rank`` (a rank-``rank`` client padded to 8)."""
    def one(n):
        if not isinstance(n, jlora.methods.LoRANode):
            return n
        on = (jnp.arange(n.a.shape[1] if n.a is not None else n.b.shape[0]) < rank)
        return n.replace(a=None if n.a is None else n.a * on[None], b=n.b * on[:, None])
    return jax.tree.map(lambda n: one(n) if jlora.is_node(n) else n, t, is_leaf=jlora.is_node)


class Study:
    def __init__(self, args, cfg, params, hidden, masks, labels, te_hidden, te_masks, te_labels):
        self.args, self.cfg, self.params = args, cfg, params
        self.model = Top(cfg)
        self.hidden, self.masks, self.labels = hidden, masks, labels
        self.te = (te_hidden, te_masks, te_labels)
        self.tx = optax.adam(args.lr)
        self.fns = {}  # per-method functions, made once so every split reuses the compiled round
        self._pred = jax.jit(lambda p, h, m: self.logits(p, h, m).argmax(-1))
        self.embed = jax.jit(lambda p, h, m: jlora.linen.apply(self.model, {"params": p}, h, m,
                                                               method=Top.embed))

    # --- one client's local training: ``steps`` Adam steps on random batches
    def batch(self, shared, d, key):
        j = jax.random.randint(key, (self.args.batch,), 0, d["n"])
        i = d["idx"][j]
        return shared["hidden"][i], shared["mask"][i], shared["labels"][i]

    def loss(self, t, frozen, h, m, y, view=lambda p: p):
        params = view(jlora.combine(t, frozen))
        logits = jlora.linen.apply(self.model, {"params": params}, h, m)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train(self, t, frozen, shared, d, key, *, steps=None, view=lambda p: p, part=None):
        """Adam on ``t`` (or on ``part(t) -> (train, hold)``'s first half)."""
        steps = self.args.local_steps if steps is None else steps
        if part is None:
            part = lambda t: (t, jax.tree.map(lambda _: None, t))
        train, hold = part(t)
        opt = self.tx.init(train)
        for s in range(steps):
            h, m, y = self.batch(shared, d, jax.random.fold_in(key, s))
            g = jax.grad(lambda q: self.loss(fl.combine(q, hold), frozen, h, m, y, view))(train)
            u, opt = self.tx.update(g, opt, train)
            train = optax.apply_updates(train, u)
        return fl.combine(train, hold)

    def logits(self, params, h, m):
        return jlora.linen.apply(self.model, {"params": params}, h, m)

    def accuracy(self, params_fn, idx=None):
        h, m, y = self.te
        if idx is not None:
            h, m, y = h[idx], m[idx], y[idx]
        p = params_fn()
        return float((self.predict(p, h, m) == y).mean()) if len(y) else float("nan"), len(y)

    def predict(self, p, h, m, fn=None, chunk=128):
        """Predictions in fixed-size chunks (one compiled shape; the last chunk padded)."""
        fn = fn or self._pred
        out = []
        for i in range(0, len(h), chunk):
            hh, mm = np.asarray(h[i:i + chunk]), np.asarray(m[i:i + chunk])
            n = len(hh)
            pad = lambda x: np.concatenate([x, np.repeat(x[-1:], chunk - n, 0)])
            out.append(np.asarray(fn(p, pad(hh), pad(mm)))[:n])
        return np.concatenate(out) if out else np.zeros(0, int)


# ---------------------------------------------------------------- methods


def spec_for(name):
    head = {HEAD: jlora.Full()}
    if name == "FFA-LoRA":
        return jlora.Spec({QV: jlora.LoRA(rank=R, alpha=2 * R, train_a=False), **head})
    if name == "PF2LoRA":
        return jlora.Spec({QV: jlora.PF2LoRA(R, R // 2, alpha=2 * R, personal_alpha=R), **head})
    if name == "FedDPA":
        return jlora.Spec({QV: jlora.FedDPA(R, R, alpha=2 * R, personal_alpha=2 * R), **head})
    if name == "pFedLoRA":
        return jlora.Spec({QV: jlora.LoRA(rank=R, alpha=2 * R),
                           "layer_5/attn_out/kernel": jlora.LoRA(rank=R // 2, alpha=R), **head})
    return jlora.Spec({QV: jlora.LoRA(rank=R, alpha=2 * R), **head})


def run(study, name, split, train_lists, test_lists, key, bar):
    args = study.args
    k = args.clients
    spec = spec_for(name)
    adapted = jlora.apply(study.params, spec, key=key)
    t0, fr0 = jlora.split(adapted)
    idx, counts = client_table(train_lists, args.train)  # one shape for every split
    ranks = np.array([RANKS[c % 3] for c in range(k)], np.int32)
    ratios = np.array([RATIOS[c % 3] for c in range(k)], np.float32)
    data = {"idx": idx, "n": counts, "rank": ranks, "ratio": ratios}
    frozen = {"params": fr0, "hidden": study.hidden, "mask": study.masks,
              "labels": study.labels}
    acc_curve, comm = [], []
    m = args.per_round

    def on_round(state):
        acc_curve.append(study.accuracy(lambda: global_params(state))[0])
        bar.update()
        bar.set_postfix(method=name, split=split, acc=f"{acc_curve[-1]:.3f}")

    lora_bytes = nbytes(t0)
    head_bytes = nbytes(jax.tree.map(lambda n: n if isinstance(n, jlora.methods.FullNode) else None,
                                     t0, is_leaf=jlora.is_node))
    fac_bytes_r8 = lora_bytes - head_bytes  # a and b of the adapted kernels at rank 8
    fac = lambda r: fac_bytes_r8 * r // R

    def global_params(state):  # fl.combine also joins a stacked (FlexLoRA) aggregate
        return fl.combine(state.trainable, state.frozen["params"])

    kw = dict(rounds=args.rounds, key=jax.random.fold_in(key, 1), weights=counts,
              clients_per_round=m, callback=on_round)
    personal_acc = None
    memo = lambda what, fn: study.fns.setdefault((name, what), fn)

    if name in ("FedAvg-LoRA", "LoRA-FAIR", "FFA-LoRA"):
        agg = {"FedAvg-LoRA": fl.fedavg, "LoRA-FAIR": fl.lora_fair, "FFA-LoRA": fl.ffa}[name]
        upd = memo("update", lambda t, fr, d, kk: study.train(t, fr["params"], fr, d, kk))
        state = fl.simulate(upd, t0, frozen, data, aggregate=agg, **kw)
        comm = [2 * m * nbytes(t0)] * args.rounds
    elif name == "FLoRA":
        restart_spec = spec

        def restart(agg, fr, kk):
            t, f = fl.merge_and_restart(restart_spec)(agg, fr["params"], kk)
            return t, {**fr, "params": f}

        def flora_upd(t, fr, d, kk):
            return study.train(rank_mask(t, d["rank"]), fr["params"], fr, d, kk)

        restart, flora_upd = memo("restart", restart), memo("update", flora_upd)

        state = fl.simulate(flora_upd, t0, frozen, data, aggregate=fl.flora, restart=restart, **kw)
        # up: each client's rank-r_k factors; down: the stacked rank Σ r_k modules (+ heads)
        comm = []
        for r_ in range(args.rounds):
            ids = sampled(kw["key"], r_, k, m)
            stacked = sum(fac(ranks[i]) for i in ids)
            comm.append(sum(fac(ranks[i]) + head_bytes for i in ids) + m * (stacked + head_bytes))
    elif name == "FlexLoRA":
        def flex_broadcast(g, i):
            return truncate_padded(g, t0, jnp.asarray(ranks)[i])

        stacked0 = fl.flora([t0] * m, [1.0] * m)
        flex_upd = memo("update", lambda t, fr, d, kk: study.train(rank_mask(t, d["rank"]),
                                                                   fr["params"], fr, d, kk))
        state = fl.simulate(flex_upd, stacked0, frozen, data, aggregate=fl.flora,
                            broadcast=memo("broadcast", flex_broadcast), **kw)
        comm = [sum(2 * (fac(ranks[i]) + head_bytes)
                    for i in sampled(kw["key"], r_, k, m)) for r_ in range(args.rounds)]
        # the served global model: the exact (stacked) aggregate
    elif name == "FSLoRA":
        def fs_upd(t, fr, d, kk):
            sk = fl.fslora_sketch(jax.random.fold_in(kk, 7), t, d["ratio"])
            view = lambda p: fl.fslora_apply(p, sk)
            trained = study.train(t, fr["params"], fr, d, kk, view=view)
            return fl.fslora_upload(t, trained, sk)

        # the released code's averaging over the sampled clients (normalize=False)
        state = fl.simulate(memo("update", fs_upd), t0, frozen, data, aggregate=fl.fslora_rule(),
                            **kw)
        comm = [sum(2 * (fac(R * ratios[i]) + head_bytes) for i in sampled(kw["key"], r_, k, m))
                for r_ in range(args.rounds)]
    elif name in ("PF2LoRA", "FedDPA", "pFedLoRA"):
        paths = {"pFedLoRA": ["layer_5/attn_out/**", "classifier/**"]}.get(name)
        pers0 = fl.stack([fl.personal(t0, paths=paths)] * k)
        if name == "PF2LoRA":
            init, step = fl.pf2lora_client(
                lambda t, fr, h, mm, y: study.loss(t, fr, h, mm, y), personal_steps=1,
                personal_lr=args.personal_lr, shared_opt=optax.adam(args.lr))

            def p_upd(t, fr, d, kk):
                opt = init(t)
                for s in range(args.local_steps):
                    h, mm, y = study.batch(fr, d, jax.random.fold_in(kk, s))
                    t, opt, _ = step(t, opt, fr["params"], h, mm, y)
                return t
        elif name == "pFedLoRA":
            def p_upd(t, fr, d, kk):
                t = study.train(t, fr["params"], fr, d, jax.random.fold_in(kk, 1),
                                part=lambda t: fl.pfedlora_phase(t, "personal", paths=paths),
                                steps=max(1, args.local_steps // 2))
                return study.train(t, fr["params"], fr, d, jax.random.fold_in(kk, 2),
                                   part=lambda t: fl.pfedlora_phase(t, "shared", paths=paths))
        else:  # FedDPA-T: local phase (w = 0.5, global frozen), then global phase (w = 1)
            def p_upd(t, fr, d, kk):
                local = lambda p: fl.feddpa_set_weight(p, 0.5)
                t = study.train(t, fr["params"], fr, d, jax.random.fold_in(kk, 1), view=local,
                                part=lambda t: (fl.personal(t), fl.shared(t)),
                                steps=max(1, args.local_steps // 2))
                glob = lambda p: fl.feddpa_set_weight(p, 1.0)
                return study.train(t, fr["params"], fr, d, jax.random.fold_in(kk, 2), view=glob,
                                   part=lambda t: (fl.shared(t), fl.personal(t)))

        pers0_first = jax.tree.map(lambda x: x[0], pers0)
        if name == "FedDPA":  # global model: the global adapter alone (w = 1)
            global_params = lambda s: fl.feddpa_set_weight(
                jlora.combine(fl.combine(s.trainable, jax.tree.map(
                    jnp.zeros_like, pers0_first)), s.frozen["params"]), 1.0)
        elif name == "PF2LoRA":  # global model: the shared pair only (c, d = 0)
            global_params = lambda s: jlora.combine(fl.combine(s.trainable, jax.tree.map(
                jnp.zeros_like, pers0_first)), s.frozen["params"])
        elif name == "pFedLoRA":  # global model: shared adapter + the mean personal block
            global_params = lambda s: jlora.combine(fl.combine(s.trainable, jax.tree.map(
                lambda x: x.mean(0), s.personal)), s.frozen["params"])
        state = fl.simulate(memo("update", p_upd), fl.shared(t0, paths=paths), frozen, data,
                            personal=pers0,
                            aggregate=fl.fedavg, **kw)
        comm = [2 * m * nbytes(fl.shared(t0, paths=paths))] * args.rounds

        def client_params(c):
            mine = jax.tree.map(lambda x: x[c], state.personal)
            p = jlora.combine(fl.combine(state.trainable, mine), state.frozen["params"])
            if name == "FedDPA":  # instance-wise weights from 5 of the client's examples
                return p, mine
            return p, None

        personal_acc = personalized(study, client_params, test_lists, train_lists, name, key)
    elif name == "FeDLRT":
        global_params = lambda s: s.global_params
        state, comm = run_fedlrt(study, t0, frozen, data, counts, kw, on_round, head_bytes)
    if personal_acc is None:  # the global model is every client's model
        personal_acc = personalized(study, lambda c: (global_params(state), None), test_lists,
                                    train_lists, name, key)
    return {"method": name, "split": split, "accuracy": acc_curve[-1], "curve": acc_curve,
            "personal_accuracy": personal_acc, "bytes_per_round": float(np.mean(comm))}


def sampled(key, r, k, m):
    if m == k:
        return np.arange(k)
    k_sample = jax.random.split(jax.random.fold_in(key, r), 3)[0]
    return np.sort(np.asarray(jax.random.choice(k_sample, k, (m,), replace=False)))


def truncate_padded(g, template, rank):
    """FlexLoRA broadcast: client's rank-``rank`` truncated SVD of the stacked aggregate, padded to 8."""
    def one(gn, tn):
        if not isinstance(gn, jlora.methods.LoRANode):
            return gn
        u, s, vt = fl.lowrank_svd(gn.scale * gn.a, gn.b)
        on = (jnp.arange(R) < rank).astype(jnp.float32)
        a = u[:, :R] * on[None]
        b = (s[:R, None] * vt[:R]) * on[:, None] / tn.scale
        return tn.replace(a=a, b=b)
    return jax.tree.map(one, g, template, is_leaf=jlora.is_node)


def personalized(study, client_params, test_lists, train_lists, name, key):
    """Mean over clients (weighted by test size) of each client's model on its own test split."""
    total, n = 0.0, 0
    emb = study.embed
    for c, idx in enumerate(test_lists):
        if not idx:
            continue
        params, _ = client_params(c)
        if name == "FedDPA":
            h, m, _ = study.te
            ref = np.asarray(train_lists[c][:5])
            local_only = fl.feddpa_set_weight(params, 0.0)
            e_ref = emb(local_only, study.hidden[ref], study.masks[ref])
            hx, mx = h[np.asarray(idx)], m[np.asarray(idx)]
            e_x = study.predict(local_only, hx, mx, fn=emb)
            w = np.asarray(fl.feddpa_weight(jnp.asarray(e_x), e_ref, beta=0.5))
            pred = []
            for i in range(0, len(hx), 128):  # chunks of 128 (one compiled shape)
                size = min(128, len(hx) - i)
                pad = lambda x: np.concatenate([x[i:i + size],
                                                np.repeat(x[i + size - 1:i + size], 128 - size, 0)])
                p = fl.feddpa_set_weight(params, pad(w))
                pred.append(np.asarray(study._pred(p, pad(hx), pad(mx)))[:size])
            pred = np.concatenate(pred)
            acc = float((pred == study.te[2][np.asarray(idx)]).mean())
        else:
            acc, _ = study.accuracy(lambda: params, np.asarray(idx))
        total += acc * len(idx)
        n += len(idx)
    return total / n


#: FeDLRT's initial coefficients ``S = εI``: invertible, so the first round's basis
#: gradients ``G_U = ∇W·V·Sᵀ``, ``G_V = ∇Wᵀ·U·S`` follow the data (``S = 0`` zeroes
#: them and the first augmentation would not depend on the data), and small, so
#: ``W = K0 + U S Vᵀ`` starts near ``K0``.
FEDLRT_S0 = 1e-2


def fedlrt_start(paths, dim: int, rank: int, rng) -> dict:
    """Each kernel's starting ``{u, s, v}``: random orthonormal ``U``, ``V`` and ``S = εI``."""

    def orth(n):
        return jnp.asarray(np.linalg.qr(rng.normal(size=(n, rank)))[0], jnp.float32)

    return {p: {"u": orth(dim), "s": FEDLRT_S0 * jnp.eye(rank, dtype=jnp.float32),
                "v": orth(dim)} for p in paths}


def run_fedlrt(study, t0, frozen, data, counts, kw, on_round, head_bytes):
    """FeDLRT (Schotthöfer & Laiu 2024): K = K0 + U S Vᵀ with a shared basis per kernel.

    Per round: (1) clients send basis gradients at the broadcast point, the
    server augments the bases; (2) clients send coefficient gradients at the
    augmented point, the server returns each client's variance correction;
    (3) clients train ``S̃`` (and the head) with the correction, the server
    averages and truncates (tolerance ``tol``, rank at most 8). Bases start
    random and orthonormal with ``S = εI`` (:func:`fedlrt_start`).
    """
    args = study.args
    paths = [p for p, n in jlora.tree.leaves_with_paths(frozen["params"])
             if isinstance(n, jlora.methods.LoRANode)]
    rng = np.random.default_rng(args.seed)
    dim = study.cfg.hidden_size
    g = {"usv": fedlrt_start(paths, dim, R, rng),
         "head": jax.tree.map(lambda n: n if isinstance(n, jlora.methods.FullNode) else None,
                              t0, is_leaf=jlora.is_node),
         "rank": {p: jnp.asarray(R) for p in paths}}
    big = jlora.LoRA(rank=2 * R, alpha=2 * R)  # scale 1: a = Ū, b = S̃ V̄ᵀ

    def params_of(usv, head, fr):
        t = dict(jlora.tree.leaves_with_paths(head))

        def node(path, n):
            if path in usv:
                u, s, v = usv[path]["u"], usv[path]["s"], usv[path]["v"]
                r = u.shape[1]
                cfg = jlora.LoRA(rank=r, alpha=r)
                return n.replace(a=u, b=s @ v.T, config=cfg)
            if isinstance(n, jlora.methods.FullNode):
                return t[path]
            return n
        return jlora.tree.map_with_paths(node, fr)

    del big

    def loss(usv, head, fr, h, m, y):
        params = params_of(usv, head, fr["params"])
        logits = jlora.linen.apply(study.model, {"params": params}, h, m)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def basis_grads(g, fr, d, kk):
        h, m, y = study.batch(fr, d, kk)
        gr = jax.grad(loss)(g["usv"], g["head"], fr, h, m, y)
        return {p: {"u": gr[p]["u"], "v": gr[p]["v"]} for p in paths}

    def coef_grads(aug, head, fr, d, kk):
        h, m, y = study.batch(fr, d, kk)
        gr = jax.grad(loss)(aug, head, fr, h, m, y)
        return {p: gr[p]["s"] for p in paths}

    def local(aug, head, corr, fr, d, kk):
        tx = optax.sgd(args.fedlrt_lr)
        train = {"s": {p: aug[p]["s"] for p in paths}, "head": head}
        opt = tx.init(train)
        for s in range(args.local_steps):
            h, m, y = study.batch(fr, d, jax.random.fold_in(kk, s))

            def lf(q):
                usv = {p: {"u": aug[p]["u"], "s": q["s"][p], "v": aug[p]["v"]} for p in paths}
                return loss(usv, q["head"], fr, h, m, y)
            gr = jax.grad(lf)(train)
            gr["s"] = {p: gr["s"][p] + corr[p] for p in paths}
            u, opt = tx.update(gr, opt, train)
            train = optax.apply_updates(train, u)
        return train

    def round_fn(g, fr, data, ids, p, kk):
        sel = jax.tree.map(lambda x: x[ids], data)
        keys = jax.vmap(lambda i: jax.random.fold_in(kk, i))(ids)
        bg = jax.vmap(basis_grads, in_axes=(None, None, 0, 0))(g, fr, sel, keys)
        aug = {}
        for path in paths:
            gu = jnp.tensordot(p, bg[path]["u"], 1)
            gv = jnp.tensordot(p, bg[path]["v"], 1)
            u, v = fl.fedlrt_augment(g["usv"][path]["u"], g["usv"][path]["v"], gu, gv,
                                     rank=g["rank"][path])
            aug[path] = {"u": u, "s": fl.fedlrt_augment_coefficients(g["usv"][path]["s"]),
                         "v": v}
        keys2 = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(kk, 1), i))(ids)
        cg = jax.vmap(coef_grads, in_axes=(None, None, None, 0, 0))(aug, g["head"], fr, sel, keys2)
        corr = fl.fedlrt_correction(cg, p)
        keys3 = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(kk, 2), i))(ids)
        res = jax.vmap(local, in_axes=(None, None, 0, None, 0, 0))(aug, g["head"], corr, fr, sel,
                                                                  keys3)
        s_star = {path: jnp.tensordot(p, res["s"][path], 1) for path in paths}
        head = fl.fedavg(fl.unstack(res["head"], len(p)), p)
        new = {"usv": {}, "head": head, "rank": {}}
        for path in paths:
            u, s, v, r1 = fl.fedlrt_truncate(s_star[path], aug[path]["u"], aug[path]["v"],
                                             tol=args.fedlrt_tol, max_rank=R)
            new["usv"][path] = {"u": u, "s": s, "v": v}
            new["rank"][path] = r1
        return new

    step = study.fns.setdefault(("FeDLRT", "round"), jax.jit(round_fn))
    key, m, k = kw["key"], kw["clients_per_round"], len(counts)
    w = counts / counts.sum()
    comm = []
    n_in = n_out = study.cfg.hidden_size

    class S:
        pass

    for r_ in range(args.rounds):
        ids = sampled(key, r_, k, m)
        kk = jax.random.split(jax.random.fold_in(key, r_), 3)[1]
        ranks_before = [int(g["rank"][p]) for p in paths]
        g = step(g, frozen, data, jnp.asarray(ids), jnp.asarray(w[ids] / w[ids].sum()), kk)
        # bytes: down U,S,V + new basis + corrections; up basis grads, coef grads, coefficients
        # down: U, S, V, the new basis columns, the correction; up: basis gradients,
        # coefficient gradients, the trained coefficients (float32)
        per_client = sum(4 * (3 * (n_in + n_out) * r0 + r0 * r0 + 3 * (2 * r0) ** 2)
                         for r0 in ranks_before) + 2 * head_bytes
        comm.append(m * per_client)
        st = S()
        st.global_params = params_of(g["usv"], g["head"], frozen["params"])
        on_round(st)
    st.fedlrt_ranks = [int(g["rank"][p]) for p in paths]
    return st, comm


# ---------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--personal-lr", type=float, default=0.05)
    ap.add_argument("--fedlrt-lr", type=float, default=0.5)
    ap.add_argument("--fedlrt-tol", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--splits", nargs="*", default=list(SPLITS))
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.time()

    model_dir = minilm_dir()
    cfg, bert = load_pretrained(model_dir)
    (tx, ty), (vx, vy) = load_tweets(args.train, args.test, seed=args.seed)
    ids, mask = tokenize(tx, model_dir, args.max_len)
    te_ids, te_mask = tokenize(vx, model_dir, args.max_len)
    lower_params = {k: v for k, v in bert.items() if k != "layer_5"}
    # the embeddings and layers 0-4, frozen: run once to cache their output
    lower_model = BertEncoder(dataclasses.replace(cfg, num_hidden_layers=5))
    lower = jax.jit(lambda i, m: lower_model.apply({"params": lower_params}, i, m))
    cache = lambda i, m: np.concatenate([np.asarray(lower(i[j:j + 128], m[j:j + 128]))
                                         for j in range(0, len(i), 128)])
    hidden, te_hidden = cache(ids, mask), cache(te_ids, te_mask)
    params = {"layer_5": bert["layer_5"],
              "classifier": {"kernel": jnp.zeros((cfg.hidden_size, len(LABELS))),
                             "bias": jnp.zeros(len(LABELS))}}
    study = Study(args, cfg, params, jnp.asarray(hidden), jnp.asarray(mask), jnp.asarray(ty),
                  te_hidden, te_mask, vy)
    print(f"all-MiniLM-L6-v2, {args.train} train / {args.test} test tweets (max {args.max_len} "
          f"tokens), {args.clients} clients, {args.per_round} per round, {args.rounds} rounds; "
          f"lower 5 layers cached in {time.time() - t_start:.0f}s", flush=True)

    results = []
    bar = tqdm(total=len(args.methods) * len(args.splits) * args.rounds, desc="federated rounds")
    for split in args.splits:
        rng = np.random.default_rng(args.seed)
        train_lists, test_lists = split_clients(ty, vy, args.clients, SPLITS[split], rng)
        for name in args.methods:
            t0 = time.time()
            r = run(study, name, split, train_lists, test_lists, jax.random.key(args.seed), bar)
            r["seconds"] = time.time() - t0
            results.append(r)
            tqdm.write(f"{split:<9} {name:<12} acc {r['accuracy']:.3f}  personal "
                       f"{r['personal_accuracy']:.3f}  {r['bytes_per_round'] / 1e6:.2f} MB/round "
                       f"({r['seconds']:.0f}s)")
    bar.close()
    write(results, args, time.time() - t_start)
    return results


def write(results, args, seconds):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "federated_study.json"), "w") as f:
        json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "seconds": seconds, "results": results}, f, indent=1)
    lines = [f"all-MiniLM-L6-v2 on tweet sentiment, {args.clients} clients ({args.per_round} per "
             f"round), {args.rounds} rounds of {args.local_steps} local steps (batch "
             f"{args.batch}), {args.train} train / {args.test} test tweets of at most "
             f"{args.max_len} tokens; adapters on the last layer's query/value, head trained; "
             f"{jax.devices()[0].device_kind}, jax {jax.__version__}; full run {seconds / 60:.1f} "
             "min.", "",
             "| method | " + " | ".join(f"{s} global | {s} personal" for s in args.splits)
             + " | bytes/round |",
             "|---|" + "---:|---:|" * len(args.splits) + "---:|"]
    by = {(r["method"], r["split"]): r for r in results}
    for name in args.methods:
        cells = []
        for s in args.splits:
            r = by.get((name, s))
            cells += ["-", "-"] if r is None else [f"{r['accuracy']:.3f}",
                                                    f"{r['personal_accuracy']:.3f}"]
        b = np.mean([by[(name, s)]["bytes_per_round"] for s in args.splits if (name, s) in by])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {b / 1e6:.2f} MB |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "federated_study.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.splits), figsize=(5 * len(args.splits), 4.5),
                             sharey=True, squeeze=False)
    for ax, s in zip(axes[0], args.splits):
        for name in args.methods:
            r = by.get((name, s))
            if r:
                ax.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], marker=".", label=name)
        ax.set_title(s)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("global test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "federated_study.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
