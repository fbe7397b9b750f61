"""Orbax checkpoints: round trip, keep-N, atomic saves, exact resume, meshes, bad input."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ckpt_worker  # noqa: E402


def small():
    params = {"q": {"kernel": jnp.arange(64.0).reshape(8, 8)}, "ln": {"scale": jnp.ones(8)}}
    spec = jlora.Spec({"q/kernel": jlora.LoRA(rank=2, alpha=4), "ln/scale": jlora.Full()})
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    trainable = jax.tree.map(lambda x: x + 0.5, trainable)
    tx = optax.adam(1e-3)
    opt = tx.update(trainable, tx.init(trainable), trainable)[1]  # non-trivial moments
    return spec, trainable, frozen, opt


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_is_exact_and_base_is_not_written(tmp_path):
    spec, trainable, frozen, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=7, opt_state=opt, spec=spec)
    state = jlora.checkpoint.restore(tmp_path)
    assert state["step"] == 7 and state["spec"] == spec
    assert_trees_equal(state["trainable"], trainable)
    assert_trees_equal(state["opt_state"], opt)
    assert "frozen" not in state
    # the restored halves recombine with the frozen half
    jlora.merge(jlora.combine(state["trainable"], frozen))
    # no array of the 8x8 base weight's shape was written, only factors and moments
    assert all(x.shape != (8, 8) for x in jax.tree.leaves((state["trainable"], state["opt_state"])))
    jlora.checkpoint.save(tmp_path / "with_base", trainable, step=7, frozen=frozen)
    with_base = jlora.checkpoint.restore(tmp_path / "with_base")
    assert_trees_equal(with_base["frozen"], frozen)
    assert with_base["opt_state"] is None


def test_keep_last_n_and_every(tmp_path):
    spec, trainable, _, opt = small()
    mgr = jlora.checkpoint.Manager(tmp_path, keep=2, every=5)
    written = [s for s in range(1, 21) if mgr.save(s, trainable, opt_state=opt)]
    assert written == [5, 10, 15, 20]
    assert mgr.all_steps() == [15, 20]
    assert jlora.checkpoint.restore(tmp_path, step=15)["step"] == 15


def test_bad_directories_and_steps(tmp_path):
    spec, trainable, _, opt = small()
    with pytest.raises(ValueError, match="no checkpoint directory"):
        jlora.checkpoint.restore(tmp_path / "missing")
    jlora.checkpoint.save(tmp_path, trainable, step=1, spec=spec)
    with pytest.raises(ValueError, match=r"no checkpoint for step 2 .* have \[1\]"):
        jlora.checkpoint.restore(tmp_path, step=2)
    other = jlora.Spec({"q/kernel": jlora.LoRA(rank=3), "ln/scale": jlora.Full()})
    with pytest.raises(ValueError, match="different spec"):
        jlora.checkpoint.restore(tmp_path, spec=other)
    # damage the array data: a clear error naming the step directory
    for root, _, files in os.walk(tmp_path / "1"):
        for f in files:
            if "meta" not in root and f not in ("_CHECKPOINT_METADATA",):
                p = os.path.join(root, f)
                with open(p, "r+b") as fh:
                    fh.truncate(max(0, os.path.getsize(p) // 2))
    with pytest.raises(ValueError, match=str(tmp_path / "1")):
        jlora.checkpoint.restore(tmp_path, step=1)


def test_restore_onto_a_mesh(tmp_path):
    spec, trainable, frozen, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=3, opt_state=opt, spec=spec)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    adapted = jlora.combine(trainable, frozen)
    base = {"q": {"kernel": P("fsdp", "tensor")}, "ln": {"scale": P()}}
    t_specs, _ = jlora.split(jlora.sharding.specs(adapted, base))
    shardings = jlora.sharding.named(t_specs, mesh)
    state = jlora.checkpoint.restore(tmp_path, shardings=shardings,
                                     opt_shardings=NamedSharding(mesh, P()))
    q = state["trainable"]["q"]["kernel"]
    assert q.a.sharding.spec == P("fsdp", None) and q.b.sharding.spec == P(None, "tensor")
    assert_trees_equal(state["trainable"], trainable)


def _worker(directory, *extra):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "ckpt_worker.py"), str(directory),
                             *extra], stdout=subprocess.PIPE, text=True, env=os.environ.copy())


def test_killed_run_resumes_bit_identically(tmp_path):
    proc = _worker(tmp_path, "--steps", "1000")
    for line in proc.stdout:
        if line.strip() == "saved 4":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    done = jlora.checkpoint.Manager(tmp_path).latest_step()
    assert done is not None and 4 <= done < 1000
    resumed, resumed_loss = ckpt_worker.run(tmp_path, done + 3, out=lambda s: None)
    straight, straight_loss = ckpt_worker.run(tmp_path / "straight", done + 3, out=lambda s: None)
    assert float(resumed_loss) == float(straight_loss)
    assert_trees_equal(resumed, straight)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    proc = _worker(tmp_path, "--steps", "1000", "--ballast-mb", "256")
    saved = 0
    for line in proc.stdout:
        if line.startswith("saved"):
            saved = int(line.split()[1])
            break
    deadline = time.time() + 60
    partial = []
    while time.time() < deadline and not partial:
        partial = [n for n in os.listdir(tmp_path) if "tmp" in n]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved >= 1 and partial, "the worker was not caught in the middle of a save"
    # the interrupted save never became a checkpoint
    interrupted = int(partial[0].split(".")[0])
    assert interrupted not in jlora.checkpoint.Manager(tmp_path).all_steps()
    mgr = jlora.checkpoint.Manager(tmp_path)
    latest = mgr.latest_step()
    assert latest is not None and latest >= saved
    state = mgr.restore(latest)  # the newest complete checkpoint loads
    assert state["step"] == latest and state["trainable"] is not None


def test_existing_step_is_not_silently_replaced(tmp_path):
    spec, trainable, _, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1)
    with pytest.raises(ValueError, match="step 1 already exists"):
        jlora.checkpoint.save(tmp_path, trainable, step=1)
    bumped = jax.tree.map(lambda x: x + 1, trainable)
    jlora.checkpoint.save(tmp_path, bumped, step=1, overwrite=True)
    assert_trees_equal(jlora.checkpoint.restore(tmp_path)["trainable"], bumped)
