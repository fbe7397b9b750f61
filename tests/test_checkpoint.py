"""Orbax checkpoints: round trip, keep-N, atomic saves, exact resume, meshes, bad input."""

import base64
import contextlib
import json
import os
import pickle
import re
import resource
import shutil
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
from jlora.spec import config_to_dict

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


# ---------------------------------------------------------------- failed writes keep the old step


def _listing(directory):
    return sorted(os.listdir(directory))


def _assert_state_is(directory, step, spec, trainable, opt):
    state = jlora.checkpoint.restore(directory, step=step)
    assert state["step"] == step and state["spec"] == spec
    assert_trees_equal(state["trainable"], trainable)
    assert_trees_equal(state["opt_state"], opt)


def _noise(n, seed=0):
    """``n`` float32 numbers that zstd cannot shrink, so their file really is ``4 n`` bytes."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n,)).astype(np.float32))


def _files(directory):
    """Every file under ``directory`` with its bytes' digest."""
    import hashlib

    return {os.path.relpath(os.path.join(root, f), directory):
            hashlib.sha256(open(os.path.join(root, f), "rb").read()).hexdigest()
            for root, _, files in os.walk(directory) for f in files}


@contextlib.contextmanager
def _file_size_limit(nbytes):
    """While active, a write past ``nbytes`` in one file fails with EFBIG ("File too
    large"), as a full disk would; it binds root too."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def _fail_file_too_large(tmp_path, monkeypatch):
    return _file_size_limit(1 << 20)


@contextlib.contextmanager
def _fail_read_only_directory(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    os.chmod(tmp_path, 0o555)
    try:
        yield
    finally:
        os.chmod(tmp_path, 0o755)


@contextlib.contextmanager
def _fail_immutable_directory(tmp_path, monkeypatch):
    """A directory no one, root included, may add entries to (``chattr +i``)."""
    if subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available or not permitted here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True)


@contextlib.contextmanager
def _fail_after_the_new_step_is_written(tmp_path, monkeypatch):
    """jlora's own write returns an error once Orbax has written the new step (as a
    failing final sync would)."""
    write = jlora.checkpoint.Manager._write

    def write_then_fail(self, *args, **kwargs):
        write(self, *args, **kwargs)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(jlora.checkpoint.Manager, "_write", write_then_fail)
    yield


@contextlib.contextmanager
def _fail_moving_the_new_step_in(tmp_path, monkeypatch):
    """The rename of the new step into place fails after the old one was moved aside."""
    rename = os.rename

    def rename_or_fail(src, dst, *args, **kwargs):
        if ".jlora-overwrite" in os.fspath(src):
            raise OSError(28, "No space left on device")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename_or_fail)
    yield


@pytest.mark.parametrize("failure", [_fail_file_too_large, _fail_read_only_directory,
                                     _fail_immutable_directory,
                                     _fail_after_the_new_step_is_written,
                                     _fail_moving_the_new_step_in],
                         ids=lambda f: f.__name__.removeprefix("_fail_"))
def test_a_failed_overwrite_keeps_the_old_step(tmp_path, monkeypatch, failure):
    spec, trainable, _, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1, opt_state=opt, spec=spec)
    jlora.checkpoint.save(tmp_path, trainable, step=2, opt_state=opt, spec=spec)
    before, old_files = _listing(tmp_path), _files(tmp_path / "1")
    bigger = {"q": trainable["q"], "ln": trainable["ln"], "big": _noise(1 << 20)}  # 4 MiB
    with failure(tmp_path, monkeypatch), pytest.raises((OSError, ValueError)):
        jlora.checkpoint.save(tmp_path, bigger, step=1, opt_state=opt, spec=spec, overwrite=True)
    monkeypatch.undo()
    assert _listing(tmp_path) == before == ["1", "2"]  # nothing half-written left behind
    assert _files(tmp_path / "1") == old_files  # the old step's files, byte for byte
    _assert_state_is(tmp_path, 1, spec, trainable, opt)
    # and the overwrite goes through once the failure is gone
    jlora.checkpoint.save(tmp_path, bigger, step=1, opt_state=opt, spec=spec, overwrite=True)
    assert _listing(tmp_path) == ["1", "2"]
    assert_trees_equal(jlora.checkpoint.restore(tmp_path, step=1)["trainable"], bigger)


def test_a_failed_save_leaves_no_partial_step(tmp_path):
    spec, trainable, _, opt = small()
    mgr = jlora.checkpoint.Manager(tmp_path, keep=None)
    mgr.save(1, trainable, opt_state=opt, spec=spec)
    with _file_size_limit(1 << 20), pytest.raises(ValueError, match="File too large"):
        mgr.save(2, {"big": _noise(1 << 20)})
    assert _listing(tmp_path) == ["1"]
    assert mgr.all_steps() == jlora.checkpoint.Manager(tmp_path).all_steps() == [1]
    _assert_state_is(tmp_path, 1, spec, trainable, opt)
    mgr.save(2, trainable)
    assert mgr.all_steps() == [1, 2]


def test_overwrite_keeps_keep_and_clears_a_stale_staging_directory(tmp_path):
    _, trainable, _, _ = small()
    for s in (1, 5, 7):
        jlora.checkpoint.save(tmp_path, {"w": jnp.full(2, float(s))}, step=s)
    # what a process killed in the middle of an overwrite of step 1 leaves
    os.makedirs(tmp_path / ".jlora-overwrite-1" / "1")
    jlora.checkpoint.save(tmp_path, {"w": jnp.zeros(2)}, step=1, keep=2, overwrite=True)
    # as for any save, the step just written counts as the newest
    assert _listing(tmp_path) == ["1", "7"]
    np.testing.assert_array_equal(jlora.checkpoint.restore(tmp_path, step=1)["trainable"]["w"],
                                  np.zeros(2, np.float32))
    np.testing.assert_array_equal(jlora.checkpoint.restore(tmp_path, step=7)["trainable"]["w"],
                                  np.full(2, 7, np.float32))


def test_a_donated_array_is_refused_and_keeps_the_old_step(tmp_path):
    spec, trainable, _, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1, opt_state=opt, spec=spec)
    step = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t), donate_argnums=0)
    donated = jax.tree.map(jnp.copy, trainable)
    step(donated)
    with pytest.raises(ValueError, match=r"ln/scale/value: the array has been deleted \(donated"):
        jlora.checkpoint.save(tmp_path, donated, step=1, opt_state=opt, spec=spec,
                              overwrite=True)
    with pytest.raises(ValueError, match=r"ln/scale/value: the array has been deleted"):
        jlora.checkpoint.Manager(tmp_path).save(2, donated)
    assert _listing(tmp_path) == ["1"]
    _assert_state_is(tmp_path, 1, spec, trainable, opt)


def test_dict_keys_of_mixed_types_are_refused_at_save(tmp_path):
    # jax sorts a dict's keys to flatten it, so such a tree could never be restored
    with pytest.raises(ValueError, match=r"layer: checkpoint dict keys must be all str or all "
                                         r"int, got \[1, 'a'\]"):
        jlora.checkpoint.save(tmp_path, {"layer": {1: jnp.ones(2), "a": jnp.ones(2)}}, step=1)
    assert jlora.checkpoint.Manager(tmp_path).all_steps() == []


# ---------------------------------------------------------------- hand-edited metadata


def _entry(desc, path):
    """The description of the subtree at ``path`` ("q/kernel/a") in a tree's metadata."""
    for key in path.split("/") if path else []:
        if "dict" in desc:
            desc = dict(desc["dict"])[key]
        else:
            desc = dict(desc["fields"])[key]
    return desc


def _set(path, key, value):
    def edit(meta):
        part, _, rest = path.partition("/")
        _entry(meta[part], rest)[key] = value
    return edit


def _drop(path, key):
    return lambda meta: _entry(meta[path.partition("/")[0]], path.partition("/")[2]).pop(key)


def _static(path, key, value):
    return lambda meta: _entry(meta["trainable"], path)["static"].__setitem__(key, value)


def _config_option(key, value):
    return lambda meta: _entry(meta["trainable"], "q/kernel")["static"]["config"][
        "config"].__setitem__(key, value)


A = "of trainable/q/kernel/a"


@pytest.mark.parametrize("edit,message", [
    # an array's description against the array Orbax stored (a dtype was cast silently)
    (_set("trainable/q/kernel/a", "dtype", "float16"),
     rf"dtype 'float16' in field 'dtype' {A}, but the stored array has dtype 'float32'"),
    (_set("trainable/q/kernel/a", "dtype", "int32"), r"dtype 'int32' in field 'dtype'"),
    (_set("trainable/q/kernel/a", "dtype", "evil"), rf"unknown dtype 'evil' in field 'dtype' {A}"),
    (_set("trainable/q/kernel/a", "dtype", 5), rf"not a dtype name: 5 in field 'dtype' {A}"),
    (_set("trainable/q/kernel/a", "shape", [8, 3]),
     rf"shape \[8, 3\] in field 'shape' {A}, but the stored array has shape \[8, 2\]"),
    (_set("trainable/q/kernel/a", "shape", [8, -2]),
     rf"sizes >= 0: \[8, -2\] in field 'shape' {A}"),
    (_set("trainable/q/kernel/a", "leaf", True),
     rf"array number True where 1 comes next in field 'leaf' {A}"),
    # an adapter node's type and static fields
    (_set("trainable/q/kernel", "node", ["LoRA"]),
     r"not a string: \['LoRA'\] in field 'node' of trainable/q/kernel"),
    (_set("trainable/q/kernel", "class", "Evil"),
     r"unknown adapter node type 'LoRA' \(class 'Evil'.* in field 'node' of trainable/q/kernel"),
    (_static("q/kernel", "shape", "8x8"),
     r"'8x8' is not a tuple\[int, ...\] in field 'static.shape' of trainable/q/kernel"),
    (_static("q/kernel", "shape", {"tuple": [8, -8]}),
     r"\(8, -8\) is not a tuple\[int, ...\] in field 'static.shape'"),
    (_static("q/kernel", "in_axes", {"tuple": ["0"]}),
     r"\('0',\) is not a tuple\[int, ...\] in field 'static.in_axes'"),
    (_static("q/kernel", "in_axes", {"eval": "0"}),
     r"unknown static value \{'eval': '0'\} in field 'static.in_axes'"),
    (_static("q/kernel", "config", 3),
     r"not a method config: 3 in field 'static.config' of trainable/q/kernel"),
    (_static("q/kernel", "cache", 1),
     r"LoRANode has no static field\(s\) \['cache'\] .* in field 'static' of trainable/q/kernel"),
    (_static("ln/scale", "path", "x"),
     r"FullNode has no static field\(s\) \['path'\] .* of trainable/ln/scale"),
    (_static("q/kernel", "config", {"config": config_to_dict(jlora.DoRA(rank=2, alpha=4))}),
     r"a DoRA config builds a DoRANode, not a LoRANode in field 'static.config' of "
     r"trainable/q/kernel"),
    (_static("q/kernel", "config", {"config": config_to_dict(jlora.VeRA(rank=2))}),
     r"a VeRA config builds a VeRANode, not a LoRANode in field 'static.config'"),
    (_config_option("rank", 0),
     r"LoRA: rank must be an int >= 1, got 0\) in field 'static.config' of trainable/q/kernel"),
    (_config_option("evil", 1),
     r"bad method config .*LoRA: unknown option\(s\) \['evil'\].* in field 'static.config'"),
    (lambda m: _entry(m["trainable"], "q/kernel").__setitem__("static", []),
     r"not an object: \[\] in field 'static' of trainable/q/kernel"),
    (_drop("trainable/q/kernel", "fields"),
     r"not a list of \[name, entry\] pairs: None in field 'fields' of trainable/q/kernel"),
    (lambda m: _entry(m["trainable"], "q/kernel")["fields"].append(["extra", None]),
     r"LoRANode array fields .* in field 'fields' of trainable/q/kernel"),
    # containers
    (lambda m: m["trainable"]["dict"][0].__setitem__(0, ["ln"]),
     r"not a list of \[name, entry\] pairs: .* in field 'dict' of trainable\)"),
    (lambda m: m["trainable"]["dict"].append(m["trainable"]["dict"][0]),
     r"repeated names \['ln'\] in field 'dict' of trainable\)"),
    (lambda m: m["opt_state"]["tuple"][0].__setitem__("fields", 3),
     r"not a list of \[name, entry\] pairs: 3 in field 'fields' of opt_state/0"),
    (lambda m: m.__setitem__("trainable", {"set": []}),
     r"unknown structure entry \{'set': \[\]\} at trainable\)"),
    (lambda m: m.__setitem__("opt_state", None),
     r"field 'opt_state' describes 0 arrays, the step holds 7"),
    (lambda m: m.__setitem__("frozen", {"leaf": 0, "shape": [], "dtype": "float32"}),
     r"field 'frozen' describes 1 arrays, the step holds 0"),
    # the top level
    (lambda m: m.__setitem__("step", 5), r"step 5 in field 'step', but the checkpoint is step 1"),
    (lambda m: m.__setitem__("step", "1"),
     r"step '1' in field 'step', but the checkpoint is step 1"),
    (lambda m: m.__setitem__("spec", {"q": "LoRA"}),
     r"a spec's JSON must be a list of rules, got dict in field 'spec'"),
    (lambda m: m["spec"][0]["config"].__setitem__("rank", "2"),
     r"LoRA: rank must be an int >= 1, got '2' in field 'spec'"),
])
def test_edited_metadata_is_a_clear_error(tmp_path, edit, message):
    spec, trainable, _, opt = small()
    jlora.checkpoint.save(tmp_path, trainable, step=1, opt_state=opt, spec=spec)
    path = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "1")) +
                       r": malformed checkpoint metadata \(.*" + message):
        jlora.checkpoint.restore(tmp_path)


def test_an_edited_quantized_layout_names_its_path(tmp_path):
    params = {"q": {"kernel": jnp.arange(64.0).reshape(8, 8) / 64}}
    spec = jlora.Spec({"q/kernel": jlora.QLoRA(rank=2)})
    trainable, frozen = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    jlora.checkpoint.save(tmp_path, trainable, step=1, frozen=frozen)
    assert_trees_equal(jlora.checkpoint.restore(tmp_path)["frozen"], frozen)
    path = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    _entry(meta["frozen"], "q/kernel/quantized")["quantized"]["quant"] = "int3"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "1")) + r": malformed "
                       r"checkpoint metadata \(malformed quantized array layout .*'int3'.* in "
                       r"field 'quantized' of frozen/q/kernel/quantized\)"):
        jlora.checkpoint.restore(tmp_path)


def test_restoring_onto_a_tree_without_a_stored_path_names_the_checkpoint(tmp_path):
    spec, trainable, frozen, _ = small()
    jlora.checkpoint.save(tmp_path, {**trainable, "head": jnp.ones(3)}, step=1, spec=spec)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "1")) + r": cannot restore onto "
                       r"the tree given \(jlora.combine: .*head is in the trainable half only"):
        jlora.checkpoint.restore(tmp_path, onto=frozen)


def test_restoring_the_latest_step_refuses_one_left_aside_that_is_newer(tmp_path):
    """A reader must not hand back step 1 as the latest while a killed overwrite left step 2
    aside: it names the step and how to put it back, and restores it once that is done."""
    for s in (1, 2):
        jlora.checkpoint.save(tmp_path, {"w": jnp.full(2, float(s))}, step=s)
    os.rename(tmp_path / "2", tmp_path / ".jlora-replaced-2")
    for step in (None, 2):
        with pytest.raises(ValueError, match=r"step 2 is under \.jlora-replaced-2"):
            jlora.checkpoint.restore(tmp_path, step=step)
    np.testing.assert_array_equal(jlora.checkpoint.restore(tmp_path, step=1)["trainable"]["w"],
                                  np.ones(2, np.float32))  # an older step is still readable
    jlora.checkpoint.Manager(tmp_path)
    got = jlora.checkpoint.restore(tmp_path)
    assert got["step"] == 2
    np.testing.assert_array_equal(got["trainable"]["w"], np.full(2, 2.0, np.float32))


def test_overwrite_from_several_processes(tmp_path):
    """Every process of a multi-process run calls save(overwrite=True) on one directory:
    they write the new step together and the primary process swaps it in."""
    from tests import _multiprocess

    logs = _multiprocess.launch(os.path.join("tests", "ckpt_worker.py"),
                                [tmp_path, "--overwrite-on-processes"], processes=2, devices=2)
    expected = 2 * sum(range(64))
    for log in logs:
        assert f"restored {float(expected)} ['1']" in log
    assert _listing(tmp_path) == ["1"]
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    w = jlora.checkpoint.restore(tmp_path, shardings=one_device)["trainable"]["w"]
    np.testing.assert_array_equal(np.asarray(w), 2 * np.arange(64, dtype=np.float32).reshape(16, 4))


def test_a_failed_swap_on_the_primary_process_is_an_error_on_every_process(tmp_path):
    """Process 0 cannot rename the old step aside (``chattr +i``): it raises its own error
    and the other process an OSError, both promptly (not a barrier timeout), and step 1
    keeps its old values."""
    from tests import _multiprocess

    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available or not permitted here")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    directory = tmp_path / "ckpt"
    logs = _multiprocess.launch(os.path.join("tests", "ckpt_worker.py"),
                                [directory, "--overwrite-fails-on-primary"], processes=2,
                                devices=2, timeout=120)
    assert "overwrite failed PermissionError" in logs[0]
    assert "overwrite failed OSError" in logs[1]
    for log in logs:
        assert f"restored {float(sum(range(64)))} ['1']" in log


def test_a_step_left_aside_by_a_killed_overwrite_comes_back(tmp_path):
    """A process killed between the overwrite's two renames leaves the old step whole under
    ``.jlora-replaced-<step>`` and no ``<step>``: opening the directory puts it back."""
    for s in (1, 2):
        jlora.checkpoint.save(tmp_path, {"w": jnp.full(2, float(s))}, step=s)
    os.rename(tmp_path / "1", tmp_path / ".jlora-replaced-1")
    os.makedirs(tmp_path / ".jlora-overwrite-1" / "1")
    shutil.copytree(tmp_path / "2", tmp_path / ".jlora-replaced-2")  # killed after the swap
    jlora.checkpoint.restore(tmp_path, step=2)  # a reader changes nothing
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + r": step 1 is under "
                       r"\.jlora-replaced-1, where an overwrite killed .* puts it back"):
        jlora.checkpoint.restore(tmp_path, step=1)  # says where the step is, not "no step 1"
    assert ".jlora-replaced-1" in _listing(tmp_path)
    assert jlora.checkpoint.Manager(tmp_path).all_steps() == [1, 2]
    assert _listing(tmp_path) == ["1", "2"]  # what was left aside is back or gone
    np.testing.assert_array_equal(jlora.checkpoint.restore(tmp_path, step=1)["trainable"]["w"],
                                  np.ones(2, np.float32))
    jlora.checkpoint.save(tmp_path, {"w": jnp.zeros(2)}, step=1, overwrite=True)
    assert _listing(tmp_path) == ["1", "2"]
    np.testing.assert_array_equal(jlora.checkpoint.restore(tmp_path, step=1)["trainable"]["w"],
                                  np.zeros(2, np.float32))


def test_nnx_state_halves_are_saved_as_pure_dicts_and_named_when_not(tmp_path):
    from flax import nnx

    _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    spec = jlora.Spec({"kernel": jlora.LoRA(rank=2)})
    trainable, frozen = jlora.split(jlora.apply(state, spec, key=jax.random.key(1)))
    with pytest.raises(ValueError, match=r"flax.nnx State.*to_pure_dict\(\)"):
        jlora.checkpoint.save(str(tmp_path / "raw"), trainable, step=0, spec=spec)
    assert not (tmp_path / "raw" / "0").exists()
    node = trainable["kernel"].get_value()
    trainable["kernel"].set_value(node.replace(b=node.b + 1.5))  # a trained b
    jlora.checkpoint.save(str(tmp_path / "pure"), trainable.to_pure_dict(), step=3, spec=spec)
    back, _ = jlora.split(jlora.apply(state, spec, key=jax.random.key(1)))
    nnx.replace_by_pure_dict(back, jlora.checkpoint.restore(str(tmp_path / "pure"),
                                                            spec=spec)["trainable"])
    np.testing.assert_array_equal(np.asarray(back["kernel"].get_value().b),
                                  np.asarray(node.b + 1.5))
    np.testing.assert_array_equal(np.asarray(back["kernel"].get_value().a), np.asarray(node.a))
