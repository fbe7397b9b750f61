"""Cross-silo JAX without Flower: ``jlora.federated.simulate`` over 2 real processes
(``jax.distributed`` on localhost, 4 CPU devices each) equals 1 process with 8 devices."""

import os

import jax
import numpy as np
import pytest

from tests import _multiprocess
from tests import fed_multihost_worker as worker


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    out = tmp_path / "two_processes.npz"
    logs = _multiprocess.launch(os.path.join("tests", "fed_multihost_worker.py"), [out],
                                processes=2, devices=4)
    assert "process 0 of 2: 4 local / 8 devices" in logs[0]
    assert "process 1 of 2: 4 local / 8 devices" in logs[1]
    two = np.load(out)
    one = worker.run(jax.devices()[:8])
    assert len(two.files) == len(one) == 2            # the LoRA factors a, b
    for i, ref in enumerate(one):
        np.testing.assert_allclose(two[f"arr_{i}"], ref, rtol=1e-5, atol=1e-6)
    assert np.abs(one[1]).max() > 1e-3                # b moved away from its zero init
