"""experiments/bench/peers.py on a small decoder: jlora, qwix and PEFT start from
the same weights (equal first losses), and the report carries every column."""

import argparse
import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "peft", "qwix")),
    reason="torch, peft and qwix are in the test extra")


def test_peers_decoder_case_starts_every_library_from_the_same_loss():
    from experiments.bench import peers

    variants, extra = peers.decoder_case(64, argparse.Namespace(no_torch=False))
    assert {"jlora lora", "jlora dora", "qwix lora", "peft lora", "peft dora"} <= set(variants)
    first = {k: variants[k]() for k in ("jlora lora", "jlora dora", "qwix lora", "peft lora", "peft dora")}
    # B = 0 (and DoRA's m = column norms) on every side: the first loss is the base model's
    np.testing.assert_allclose(list(first.values()), first["jlora lora"], rtol=1e-5)
    second = {k: variants[k]() for k in first}  # one AdamW step later, every side has moved
    assert all(second[k] < first[k] for k in first), (first, second)
    merged = variants["jlora merged fwd"](), variants["torch merged fwd"]()
    np.testing.assert_allclose(merged[0], merged[1], rtol=1e-4)
    assert extra["xla_bytes"]["lora"] < extra["xla_bytes"]["full"]
    times = {k: [0.2, 0.1, 0.3] for k in variants}
    text = peers.table({"default": {"decoder d64": {"times_s": times, "median_s": {k: 0.2 for k in variants},
                                                     **extra}}}, "header")
    row = next(line for line in text.splitlines() if "decoder d64" in line and "MiB" not in line)
    assert row.count("1.00x") >= 3 and "nan" not in row.split("|")[6]  # jlora/PEFT, jlora/qwix, ...


def test_peers_table_marks_missing_variants_and_rebuilds_from_its_own_json(tmp_path):
    import json

    from experiments.bench import peers

    # per-round ratios 1.2, 1.5, 1.1: paired median 1.2; the medians' ratio is 0.3 / 0.2
    times = {"jlora lora": [0.1, 0.2, 0.3], "jlora dora": [0.12, 0.3, 0.33]}
    results = {"default": {"minilm 8x128 qv": {"times_s": times,
                                               "median_s": {"jlora lora": 0.2, "jlora dora": 0.3}}}}
    saved = {"args": {"reps": 3, "threads": 0}, "cpu": "a CPU", "load_average": 0.5, "results": results}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(saved))
    peers.main(["--from-json", str(path), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "peers.md").read_text()
    assert text.startswith("Median of 3 alternated steps") and "a CPU, " in text and "load average 0.5" in text
    cells = [c.strip() for c in next(line for line in text.splitlines() if "minilm" in line).split("|")[1:-1]]
    # allocator, case, jlora ms, PEFT ms, ratio, qwix ms, jlora/qwix, DoRA/LoRA, paired, ..., spread
    assert cells[:4] == ["default", "minilm 8x128 qv", "200.0", "n/a"]
    assert cells[7:9] == ["1.50", "1.20"] and cells[-1] == "100"
    assert cells.count("n/a") == 9 and "nan" not in text
    assert json.loads((tmp_path / "out" / "peers.json").read_text())["results"] == results
