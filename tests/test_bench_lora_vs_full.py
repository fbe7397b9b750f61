"""Smoke test of experiments/bench/lora_vs_full.py (the study itself is run by hand)."""

from experiments.bench import lora_vs_full


def test_lora_vs_full_prints_every_variant(capsys):
    lora_vs_full.main(["--d-model", "32", "--layers", "1", "--batch", "2", "--seq", "8", "--vocab", "16",
                       "--reps", "1", "--remat", "block"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert {r[1] for r in rows} == {"full", "lora", "lora_merged", "floor", "full_plain"}
    mem = {r[1]: float(r[4]) for r in rows}
    assert all(m > 0 for m in mem.values())
    assert mem["lora"] < mem["full"]
