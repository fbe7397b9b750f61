"""Smoke test of experiments/activation_study.py (tiny sizes; the committed table is the real run).

SAM's calibration (``jlora.optim.sam_select``) is tested in tests/methods/test_sparse.py;
running it here too would compile MiniLM's gradient once more.
"""

import json

import pytest

from tests.test_experiments import needs_minilm

pytestmark = pytest.mark.experiments


@needs_minilm
def test_activation_study_runs_end_to_end(tmp_path):
    from experiments import activation_study

    results = activation_study.main(["--train", "32", "--test", "16", "--batch", "16",
                                     "--max-len", "12", "--calib", "1",
                                     "--methods", "Sparse random", "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "activation_study.json"))
    assert [r["method"] for r in out["results"]] == ["Sparse random"]
    # LoRA r8's budget: 12 query/value kernels x 8 x (384 + 384), plus the 384 x 3 + 3 head
    assert results[0]["trainable"] == 12 * 8 * 768 + 1155
    assert "| Sparse random |" in (tmp_path / "activation_study.md").read_text()
    assert (tmp_path / "activation_study.png").stat().st_size > 0
