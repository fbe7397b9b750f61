"""Smoke test of the initialisation study (experiments/init_study.py) on a few tweets."""

import json

import pytest

from tests.test_experiments import needs_minilm

pytestmark = pytest.mark.experiments


@needs_minilm
def test_init_study_runs_end_to_end(tmp_path):
    from experiments import init_study

    init_study.main(["--train", "32", "--test", "16", "--batch", "16", "--max-len", "12",
                     "--calib", "1", "--loss-at", "2", "--methods", "EVA",
                     "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "init_study.json"))
    (r,) = out["results"]
    assert r["method"] == "EVA" and r["calib_s"] > 0 and r["loss_step"] == 2
    assert 0.0 <= r["accuracy"] <= 1.0
    assert "| EVA |" in (tmp_path / "init_study.md").read_text()
