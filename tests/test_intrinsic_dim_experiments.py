"""Smoke test of experiments/intrinsic_dim.py: a tiny digits sweep writes its report."""

import json
import os

import pytest

pytestmark = pytest.mark.experiments


def test_digits_sweep_writes_report(tmp_path):
    from experiments import intrinsic_dim

    intrinsic_dim.main(["--part", "digits", "--dims", "4", "--projections", "fastfood",
                        "--hidden", "8", "--steps", "3", "--out", str(tmp_path)])
    with open(os.path.join(tmp_path, "intrinsic_dim_digits.json")) as f:
        rows = json.load(f)["rows"]
    assert [(r["projection"], r["d"]) for r in rows] == [("direct", None), ("fastfood", 4)]
    assert rows[0]["D"] == 64 * 8 + 8 + 8 * 10 + 10
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    text = open(os.path.join(tmp_path, "intrinsic_dim.md")).read()
    assert "d90 (threshold" in text and "d90 = 750" in text  # ours beside the paper's
    assert os.path.exists(os.path.join(tmp_path, "intrinsic_dim.png"))
