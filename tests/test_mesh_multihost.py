"""The TPU-pod path on localhost: experiments/train.py's mesh trainer over 2 real JAX
processes (``jax.distributed``, 4 CPU devices each, each process feeding only its own
batch rows) equals 1 process with 8 devices; its Orbax checkpoint is written and read
back by both processes, and restores on 1 process (onto one device) to the same factors."""

import os

import jax
import numpy as np
import pytest

from tests import _multiprocess
import jlora
from tests import mesh_multihost_worker as worker
from experiments import train


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    out, ckpt = tmp_path / "two.npz", tmp_path / "ckpt"
    logs = _multiprocess.launch(os.path.join("tests", "mesh_multihost_worker.py"), [out, ckpt],
                                processes=2, devices=4)
    for i in range(2):
        assert f"process {i} of 2: 4 local / 8 devices" in logs[i] and "done" in logs[i]
    two = np.load(out)
    losses, trained, _ = worker.run(jax.devices()[:8])
    np.testing.assert_allclose(two["losses"], losses, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]                       # it trains
    assert len(trained) == 12                           # a and b of 6 adapted kernels
    for i, ref in enumerate(trained):
        np.testing.assert_allclose(two[f"trained_{i}"], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(two[f"restored_{i}"], two[f"trained_{i}"])
    assert max(np.abs(two[f"trained_{i}"]).max() for i in range(len(trained))) > 1e-3

    # the multi-host checkpoint restores on one process, onto one device
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jlora.checkpoint.restore(str(ckpt), spec=train.LORA_SPEC, shardings=one_device,
                                     opt_shardings=one_device)
    for i, x in enumerate(jax.tree.leaves(state["trainable"])):
        np.testing.assert_array_equal(np.asarray(x), two[f"trained_{i}"])
    assert state["step"] == worker.STEPS
