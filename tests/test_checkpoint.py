"""Orbax checkpoints: round trip, keep-N, atomic saves, exact resume, meshes, bad input."""

import base64
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora

from tests import ckpt_worker

HERE = os.path.dirname(os.path.abspath(__file__))


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


@pytest.mark.parametrize("bad", [
    {"trainable": {"x": "not an array"}}, {"spec": "not a spec"}, {"trainable": None},
    {"trainable": {"x": jnp.zeros(2, jnp.float8_e4m3fn)}},
])
def test_a_refused_overwrite_keeps_the_old_step(tmp_path, bad):
    spec, trainable, _, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1, opt_state=opt, spec=spec)
    args = {"trainable": trainable, **bad}
    with pytest.raises(ValueError):
        jlora.checkpoint.save(tmp_path, step=1, overwrite=True, **args)
    state = jlora.checkpoint.restore(tmp_path)
    assert state["step"] == 1 and state["spec"] == spec
    assert_trees_equal(state["trainable"], trainable)
    assert_trees_equal(state["opt_state"], opt)


# ---------------------------------------------------------------- trust: no code from a file


def _rewrite_meta(step_dir, **changes):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): the file appears iff the pickle is loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_old_format_checkpoint_runs_no_code(tmp_path):
    _, trainable, _, _ = small()
    ckpt = tmp_path / "ckpt"
    jlora.checkpoint.save(ckpt, trainable, step=1)
    marker = tmp_path / "pwned"
    payload = base64.b64encode(pickle.dumps(_CreatesAFile(str(marker)))).decode()
    _rewrite_meta(ckpt / "1", format="jlora-checkpoint/1",
                  trainable={"treedef": payload, "leaves": [[[8, 2], "float32"]]})
    with pytest.raises(ValueError, match=re.escape(str(ckpt / "1")) + ".*0.1.0.*upgrade"):
        jlora.checkpoint.restore(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [
    ("node", "os.system"), ("node", "builtins.eval"), ("namedtuple", "posix.system"),
    ("namedtuple", "collections.OrderedDict"),
])
def test_crafted_types_in_the_structure_are_refused(tmp_path, field, value):
    _, trainable, _, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1, opt_state=opt)
    with open(tmp_path / "1" / "meta" / "metadata") as f:
        text = f.read()
    key = '"node": "LoRA"' if field == "node" else '"namedtuple": "optax._src.transform.ScaleByAdamState"'
    assert key in text
    with open(tmp_path / "1" / "meta" / "metadata", "w") as f:
        f.write(text.replace(key, json.dumps({field: value})[1:-1]))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "1")) + ": malformed.*unknown"):
        jlora.checkpoint.restore(tmp_path)


def _save_like_0_1_0(directory, trainable, opt_state, step):
    """What jlora 0.1.0 wrote: arrays by flattening index, structure as a pickled treedef."""
    import orbax.checkpoint as ocp

    arrays, meta = {}, {"format": "jlora-checkpoint/1", "step": step, "spec": None}
    for name, tree in (("trainable", trainable), ("opt_state", opt_state)):
        leaves, treedef = jax.tree.flatten(tree)
        arrays[name] = {str(i): x for i, x in enumerate(leaves)}
        meta[name] = {"treedef": base64.b64encode(pickle.dumps(treedef)).decode(),
                      "leaves": [[list(x.shape), str(x.dtype)] for x in leaves]}
    with ocp.CheckpointManager(os.path.abspath(directory)) as mgr:
        mgr.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                               meta=ocp.args.JsonSave(meta)))


def test_upgrade_resaves_a_0_1_0_checkpoint_without_unpickling(tmp_path):
    spec, trainable, frozen, opt = small()
    _save_like_0_1_0(tmp_path / "old", trainable, opt, step=5)
    with pytest.raises(ValueError, match="0.1.0"):
        jlora.checkpoint.restore(tmp_path / "old")
    zeros = jax.tree.map(jnp.zeros_like, (trainable, opt))
    wrong = jax.tree.map(lambda x: jnp.zeros((3,) + x.shape, x.dtype), trainable)
    with pytest.raises(ValueError, match=r"trainable array #0 is float32\[8\], the tree given has float32\[3, 8\]"):
        jlora.checkpoint.upgrade(tmp_path / "old", tmp_path / "new", trainable=wrong, opt_state=opt)
    jlora.checkpoint.upgrade(tmp_path / "old", tmp_path / "new", trainable=zeros[0], opt_state=zeros[1])
    state = jlora.checkpoint.restore(tmp_path / "new")
    assert state["step"] == 5
    assert_trees_equal(state["trainable"], trainable)
    assert_trees_equal(state["opt_state"], opt)


def test_optimiser_states_round_trip(tmp_path):
    _, trainable, _, _ = small()
    for i, tx in enumerate([optax.adamw(1e-3), jlora.optim.lora_plus(optax.adamw, 1e-3),
                            optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2, momentum=0.9))]):
        state = tx.update(trainable, tx.init(trainable), trainable)[1]
        jlora.checkpoint.save(tmp_path / str(i), trainable, step=1, opt_state=state)
        assert_trees_equal(jlora.checkpoint.restore(tmp_path / str(i))["opt_state"], state)


def test_unstorable_types_are_named_at_save(tmp_path):
    class Mine(typing.NamedTuple):
        x: jax.Array

    with pytest.raises(ValueError, match=r"opt/0: cannot store a .*Mine"):
        jlora.checkpoint.save(tmp_path, {"opt": [Mine(jnp.ones(2))]}, step=1)
    with pytest.raises(ValueError, match=r"w: cannot store a object"):
        jlora.checkpoint.save(tmp_path, {"w": object()}, step=1)


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int16", "uint16", "int32",
                                   "uint32", "float16", "bfloat16", "float32", "complex64",
                                   "float8_e5m2"])
def test_storable_dtypes_round_trip_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.normal(size=(3, 4)) * 50).astype(np.float32)).astype(dtype)
    jlora.checkpoint.save(tmp_path, {"w": x}, step=0)
    back = jlora.checkpoint.restore(tmp_path)["trainable"]["w"]
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


@pytest.mark.parametrize("make,name", [
    (lambda: jnp.zeros(4, jnp.float8_e4m3fn), "float8_e4m3fn"),
    (lambda: jnp.zeros(4, jnp.int4), "int4"), (lambda: jnp.zeros(4, jnp.uint4), "uint4"),
    (lambda: np.zeros(2, jax.dtypes.float0), "float0"),
])
def test_unrestorable_dtypes_are_refused_at_save(tmp_path, make, name):
    with pytest.raises(ValueError, match=rf"layer/w: cannot store an array of dtype .*{name}"):
        jlora.checkpoint.save(tmp_path, {"layer": {"w": make(), "ok": jnp.ones(2)}}, step=3)
    assert jlora.checkpoint.Manager(tmp_path).all_steps() == []
    assert not [n for n in os.listdir(tmp_path) if not n.startswith(".")]


@pytest.mark.parametrize("damage,message", [
    ({"treedef": "x"}, "trainable has no list of leaves"),
    ({"treedef": "x", "leaves": 5}, "trainable has no list of leaves"),
    ({"treedef": "x", "leaves": [[8, 2], [[2, 8], "float32"]]}, r"trainable array #0 is \[8, 2\]"),
    ({"treedef": "x", "leaves": [[[8, 2], "evil"], [[2, 8], "float32"]]},
     r"trainable array #0 is \[\[8, 2\], 'evil'\]"),
    ({"treedef": "x", "leaves": [[[-8, 2], "float32"], [[2, 8], "float32"]]},
     r"trainable array #0 is \[\[-8, 2\]"),
    ("not a dict", "trainable has no list of leaves"),
])
def test_upgrade_of_damaged_0_1_0_metadata_names_the_file(tmp_path, damage, message):
    spec, trainable, _, opt = small()
    _save_like_0_1_0(tmp_path / "old", trainable, opt, step=5)
    _rewrite_meta(tmp_path / "old" / "5", trainable=damage)
    meta_file = re.escape(str(tmp_path / "old" / "5" / "meta" / "metadata"))
    with pytest.raises(ValueError, match=rf"{meta_file}: malformed jlora 0.1.0 metadata "
                                         rf"\({message}"):
        jlora.checkpoint.upgrade(tmp_path / "old", tmp_path / "new", trainable=trainable,
                                 opt_state=opt)
    assert not os.path.exists(tmp_path / "new")
    _save_like_0_1_0(tmp_path / "old2", trainable, opt, step=5)
    _rewrite_meta(tmp_path / "old2" / "5", step="five")
    with pytest.raises(ValueError, match=r"metadata: malformed jlora 0.1.0 metadata \(step 'five'"):
        jlora.checkpoint.upgrade(tmp_path / "old2", tmp_path / "new", trainable=trainable,
                                 opt_state=opt)


# ---------------------------------------------------------------- options, mismatches, directories


@pytest.mark.parametrize("kwargs,message", [
    ({"keep": 0}, "keep must be an int >= 1, got 0"), ({"keep": -2}, "keep must be"),
    ({"keep": True}, "keep must be"), ({"keep": 1.5}, "keep must be"),
    ({"every": 0}, "every must be an int >= 1, got 0"), ({"every": -5}, "every must be"),
    ({"every": "10"}, "every must be"),
])
def test_manager_options_are_validated(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        jlora.checkpoint.Manager(tmp_path, **kwargs)
    assert not os.listdir(tmp_path)


def test_bad_steps_are_refused(tmp_path):
    _, trainable, _, _ = small()
    mgr = jlora.checkpoint.Manager(tmp_path)
    for step in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            mgr.save(step, trainable)
    mgr.save(2, trainable)
    mgr.delete(2)
    assert mgr.all_steps() == []
    with pytest.raises(ValueError, match="no checkpoint for step 2"):
        mgr.delete(2)


def test_restore_onto_another_spec_or_base_names_the_path(tmp_path):
    spec, trainable, frozen, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1, opt_state=opt, spec=spec)
    other = jlora.Spec({"q/kernel": jlora.LoRA(rank=3, alpha=4), "ln/scale": jlora.Full()})
    with pytest.raises(ValueError, match=r"different spec: at q/kernel the checkpoint holds LoRA\(rank=2"):
        jlora.checkpoint.restore(tmp_path, spec=other)
    state = jlora.checkpoint.restore(tmp_path, spec=spec, onto=frozen)
    assert_trees_equal(state["adapted"], jlora.combine(trainable, frozen))
    bigger = {"q": {"kernel": jnp.ones((16, 8))}, "ln": {"scale": jnp.ones(8)}}
    _, frozen16 = jlora.split(jlora.apply(bigger, spec, key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"at q/kernel the checkpoint has shape \(8, 8\), the tree "
                                         r"to restore onto has \(16, 8\)"):
        jlora.checkpoint.restore(tmp_path, onto=frozen16)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    wrong = {"q": {"kernel": NamedSharding(mesh, P())}}
    with pytest.raises(ValueError, match=r"trainable shardings do not match .* 'q/kernel'"):
        jlora.checkpoint.restore(tmp_path, shardings=wrong)


def test_directories_that_are_not_checkpoints_are_named(tmp_path):
    _, trainable, _, _ = small()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "notes")) + " is not a jlora checkpoint directory"):
        jlora.checkpoint.restore(tmp_path / "notes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint in .*empty"):
        jlora.checkpoint.restore(tmp_path / "empty")
    with pytest.raises(ValueError, match="todo.txt: not a directory"):
        jlora.checkpoint.restore(tmp_path / "notes" / "todo.txt")
    jlora.checkpoint.save(tmp_path / "ck", trainable, step=3)
    with pytest.raises(ValueError, match=r"is one step of a jlora checkpoint: restore .*ck' with step=3"):
        jlora.checkpoint.restore(tmp_path / "ck" / "3")
    _rewrite_meta(tmp_path / "ck" / "3", format="something-else/1")
    with pytest.raises(ValueError, match=r"ck/3: not a jlora checkpoint \(format 'something-else/1'\)"):
        jlora.checkpoint.restore(tmp_path / "ck")


def test_a_static_field_newer_than_the_checkpoint_keeps_its_default(tmp_path):
    """A checkpoint written before a node class gained a static field restores with the
    field's default; a missing array field is still malformed."""
    params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    adapted = jlora.apply(params, jlora.Spec({"fc": jlora.MeFT(2, bias=True)}),
                          key=jax.random.key(0))
    trainable, _ = jlora.split(adapted)
    assert trainable["fc@meft"].module_bias
    jlora.checkpoint.save(tmp_path, trainable, step=1)
    path = tmp_path / "1" / "meta" / "metadata"
    text = path.read_text()
    meta = json.loads(text)
    node = meta["trainable"]["dict"][1][1] if meta["trainable"]["dict"][0][0] != "fc@meft" \
        else meta["trainable"]["dict"][0][1]
    del node["static"]["module_bias"]
    path.write_text(json.dumps(meta))
    back = jlora.checkpoint.restore(tmp_path)["trainable"]["fc@meft"]
    assert back.module_bias is False and back.dense
    np.testing.assert_array_equal(np.asarray(back.down), np.asarray(trainable["fc@meft"].down))
    node["fields"] = [f for f in node["fields"] if f[0] != "down"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"malformed checkpoint metadata"):
        jlora.checkpoint.restore(tmp_path)
