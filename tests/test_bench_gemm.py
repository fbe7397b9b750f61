"""experiments/bench/gemm.py: XLA's GEMMs, with and without YNNPACK, against torch's."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import gemm


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("options", [{}, gemm.NO_YNN], ids=["default", "no-ynn"])
def test_each_xla_variant_computes_the_product_it_times(transposed, options):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 48), dtype=np.float32)
    w = rng.standard_normal((32, 48) if transposed else (48, 32), dtype=np.float32)
    f, _ = gemm.xla_gemm(jnp.asarray(x), jnp.asarray(w), transposed, options)
    ref = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
    np.testing.assert_allclose(np.asarray(f()), ref, rtol=1e-5, atol=1e-4)


def test_the_no_ynn_option_compiles_without_a_ynnpack_fusion():
    x = jnp.ones((256, 384), jnp.float32)
    w = jnp.ones((384, 384), jnp.float32)
    assert gemm.xla_gemm(x, w, False, gemm.NO_YNN)[1] is False


def test_table_reports_every_shape_with_ratios_against_torch():
    shapes = [(32, 16, 24, False), (32, 24, 16, True)]
    res = gemm.run(2, shapes=shapes)
    text = gemm.table(res)
    rows = [l for l in text.splitlines() if l.startswith("| 32 x")]
    assert len(rows) == 2 and "(Kᵀ)" in rows[1] and "(Kᵀ)" not in rows[0]
    assert all(row.endswith("x |") and row.count("x |") == 2 for row in rows)  # both ratios filled
    for r in res["rows"]:
        assert set(r["gflops"]) == {"xla", "xla no-ynn", "torch"}
        assert all(v > 0 for v in r["gflops"].values())


def test_from_json_prints_the_table_of_an_earlier_run(tmp_path, capsys):
    import json

    res = gemm.run(1, shapes=[(16, 8, 8, False)])
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps(res))
    gemm.main(["--from-json", str(path)])
    assert capsys.readouterr().out.strip() == gemm.table(res)
    with pytest.raises(ValueError, match="--reps"):
        gemm.main(["--reps", "0"])
