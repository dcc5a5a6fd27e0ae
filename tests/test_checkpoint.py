"""Tests for `save`, `load`, `load_metadata`, `CheckpointManager` and resuming."""

import json
import os
import pathlib
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqx_rng
from eqx_rng import _checkpoint
from eqx_rng._checkpoint import _files


def _bits(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jr.key_data(x))
    return np.asarray(x)


def _bits_equal(a, b) -> bool:
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    if ta != tb:
        return False
    return all(
        type(x) is type(y)
        and x.dtype == y.dtype
        and x.shape == y.shape
        and np.array_equal(_bits(x), _bits(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def _mixed_tree():
    return {
        "f32": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
        "bf16": jnp.array([1.5, -2.25, jnp.nan], jnp.bfloat16),
        "f16": jnp.array([0.1, jnp.inf], jnp.float16),
        "i8": jnp.array([-3, 4], jnp.int8),
        "u32": jnp.array([2**32 - 1], jnp.uint32),
        "bool": jnp.array([True, False, True]),
        "c64": jnp.array([1 + 2j], jnp.complex64),
        "scalar": jnp.float32(3.0),
        "empty": jnp.zeros((0, 4)),
        "key": jr.key(3),
        "keys": jr.split(jr.key(4), 5),
        "rbg": jr.key(5, impl="rbg"),
        "np": np.arange(4, dtype=np.int64),
        "np_scalar": np.float64(2.5),
        "fn": jax.nn.relu,
        "number": 7,
        "none": None,
    }


# ----------------------------------------------------------------------------------
# Round trips


def test_round_trip_mixed_tree(tmp_path):
    tree = _mixed_tree()
    path = eqx_rng.save(tmp_path / "a.ckpt", tree)
    assert path == tmp_path / "a.ckpt"
    back = eqx_rng.load(path, tree)
    assert _bits_equal(back, tree)
    assert back["fn"] is jax.nn.relu and back["number"] == 7 and back["none"] is None
    assert isinstance(back["np"], np.ndarray) and isinstance(
        back["np_scalar"], np.generic
    )
    assert isinstance(back["f32"], jax.Array)
    assert str(jr.key_impl(back["rbg"])) == "rbg"
    # Keys come back as working keys.
    assert jnp.array_equal(jr.normal(back["key"], (2,)), jr.normal(tree["key"], (2,)))


def _v2_fixture_tree():
    """The tree in `tests/data/format_v2_db9355d.ckpt`, written by `eqx_rng.save`
    at commit db9355d (format 2, payload checksummed by a thread beside the write)
    with `metadata={"note": "format 2, eqx_rng commit db9355d"}`."""
    return {
        "w": jnp.arange(12.0).reshape(3, 4),
        "b": jnp.arange(5, dtype=jnp.bfloat16),
        "i8": np.arange(3, dtype=np.int8),
        "key": jr.key(7),
        "lr": jnp.asarray(0.5),
        "step": jnp.int32(9),
    }


def test_version_2_files_of_an_earlier_release_load():
    path = pathlib.Path(__file__).parent / "data" / "format_v2_db9355d.ckpt"
    tree = _v2_fixture_tree()
    back = eqx_rng.load(path, jax.eval_shape(_v2_fixture_tree))
    for name, leaf in tree.items():
        assert back[name].dtype == leaf.dtype and back[name].shape == leaf.shape
        assert np.array_equal(_bits(back[name]), _bits(leaf))
    assert back["lr"].aval.weak_type
    meta = eqx_rng.load_metadata(path)
    assert meta["note"] == "format 2, eqx_rng commit db9355d"
    assert meta["eqx_rng"]["format_version"] == 2


def test_round_trip_with_the_checksum_beside_the_fsync(tmp_path, monkeypatch):
    # Every payload takes the path of large ones (checksum while a thread fsyncs).
    monkeypatch.setattr(_checkpoint._format, "OVERLAP_MIN", 0)
    tree = _mixed_tree()
    path = eqx_rng.save(tmp_path / "a", tree)
    assert _bits_equal(eqx_rng.load(path, tree), tree)
    eqx_rng.save(path, {**tree, "f32": tree["f32"] + 1})  # over an existing file
    assert jnp.array_equal(eqx_rng.load(path, tree)["f32"], tree["f32"] + 1)
    assert os.listdir(tmp_path) == ["a"]


def test_weak_types_round_trip(tmp_path):
    tree = {"weak": jnp.asarray(0.5), "strong": jnp.float32(0.5)}
    assert tree["weak"].aval.weak_type and not tree["strong"].aval.weak_type
    eqx_rng.save(tmp_path / "a", tree)
    back = eqx_rng.load(tmp_path / "a", jax.eval_shape(lambda: tree))
    assert back["weak"].aval.weak_type and not back["strong"].aval.weak_type


def test_loaded_arrays_are_placed_as_like_places_them(tmp_path):
    # An array JAX placed by default loads uncommitted, as a step's own outputs
    # are (a committed copy would make a jitted step compile again on its first
    # resumed call); one committed to a device with `device_put` loads committed
    # to that device.
    free = {"w": jnp.arange(3.0), "k": jr.key(0), "n": jnp.ones((), jnp.int32)}
    pinned = jax.device_put(free, jax.devices()[0])
    eqx_rng.save(tmp_path / "a.eqx", free)
    for like, committed in ((free, False), (pinned, True)):
        got = eqx_rng.load(tmp_path / "a.eqx", like)
        assert [x.committed for x in jax.tree.leaves(got)] == [committed] * 3
        assert _bits_equal(got, free)
    step = jax.jit(lambda t: jax.tree.map(lambda x: x, t))
    step(free)
    compiles = []

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(step(eqx_rng.load(tmp_path / "a.eqx", free)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_load_into_shape_dtype_structs(tmp_path):
    tree = _mixed_tree()
    eqx_rng.save(tmp_path / "a", tree)
    like = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x
        ),
        tree,
    )
    back = eqx_rng.load(tmp_path / "a", like)
    assert all(
        isinstance(back[k], jax.Array)
        for k, v in tree.items()
        if isinstance(v, jax.Array)
    )
    assert _bits_equal(back, tree)


def test_round_trip_train_state(tmp_path):
    model, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    opt = optax.adam(1e-3)
    ts = eqx_rng.TrainState.create(model, opt, key=0, state=state)
    eqx_rng.save(tmp_path / "ts", ts)
    like = eqx.filter_eval_shape(
        lambda: eqx_rng.TrainState.create(model, opt, key=1, state=state)
    )
    back = eqx_rng.load(tmp_path / "ts", like)
    assert type(back) is eqx_rng.TrainState
    assert _bits_equal(back, ts)


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "a"
    eqx_rng.save(path, {"w": jnp.zeros(2)})
    eqx_rng.save(path, {"w": jnp.ones(2)})
    assert jnp.array_equal(eqx_rng.load(path, {"w": jnp.zeros(2)})["w"], jnp.ones(2))
    assert os.listdir(tmp_path) == ["a"]


def test_save_takes_a_string_path(tmp_path):
    eqx_rng.save(str(tmp_path / "a"), {"w": jnp.zeros(2)})
    eqx_rng.load(str(tmp_path / "a"), {"w": jnp.zeros(2)})


def test_save_refuses_tracers(tmp_path):
    @jax.jit
    def f(x):
        eqx_rng.save(tmp_path / "a", {"w": x})
        return x

    with pytest.raises(TypeError, match=r"\['w'\]` is a tracer"):
        f(jnp.zeros(2))


# ----------------------------------------------------------------------------------
# Metadata


def test_metadata_round_trip(tmp_path):
    meta = {"epoch": 3, "lr": 0.1, "tags": ("a", "b"), "nested": {"x": None}}
    eqx_rng.save(tmp_path / "a", {"w": jnp.zeros(2)}, metadata=meta)
    got = eqx_rng.load_metadata(tmp_path / "a")
    assert got["epoch"] == 3 and got["lr"] == 0.1
    assert got["tags"] == ["a", "b"] and got["nested"] == {"x": None}
    lib = got["eqx_rng"]
    assert lib["format_version"] == 2
    assert lib["jax_version"] == jax.__version__
    for name in ("eqx_rng_version", "equinox_version", "jaxlib_version", "saved_at"):
        assert lib[name]
    assert lib["doctor"]["prng_impl"] == "threefry2x32"
    json.dumps(got)  # JSON-serialisable


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        eqx_rng.save(tmp_path / "a", {"w": jnp.zeros(2)}, metadata={"x": jnp.zeros(2)})
    assert os.listdir(tmp_path) == []


def test_metadata_key_eqx_rng_is_reserved(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        eqx_rng.save(tmp_path / "a", {"w": jnp.zeros(2)}, metadata={"eqx_rng": 1})


# ----------------------------------------------------------------------------------
# Errors: missing, corrupted, mismatched


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        eqx_rng.load(tmp_path / "nope", {"w": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError):
        eqx_rng.load_metadata(tmp_path / "nope")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(eqx_rng.CheckpointError, ValueError)


def _saved(tmp_path):
    tree = {"w": jnp.arange(40.0).reshape(8, 5), "key": jr.key(0), "step": jnp.int32(3)}
    path = eqx_rng.save(tmp_path / "ck", tree, metadata={"note": "x" * 50})
    return path, tree


def _layout(path):
    data = path.read_bytes()
    header_len = int.from_bytes(data[16:24], "little")
    header_end = 56 + header_len
    return data, header_end


@pytest.mark.parametrize("where", ["empty", "prefix", "header", "payload", "digest"])
def test_truncated_file(tmp_path, where):
    path, tree = _saved(tmp_path)
    data, header_end = _layout(path)
    cut = {
        "empty": 0,
        "prefix": 20,
        "header": header_end - 10,
        "payload": header_end + 30,
        "digest": len(data) - 1,
    }[where]
    path.write_bytes(data[:cut])
    with pytest.raises(eqx_rng.CheckpointError, match="truncated") as e:
        eqx_rng.load(path, tree)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("where", ["header", "payload", "digest"])
def test_flipped_byte(tmp_path, where):
    path, tree = _saved(tmp_path)
    data, header_end = _layout(path)
    pos = {"header": 70, "payload": header_end + 13, "digest": len(data) - 5}[where]
    corrupted = bytearray(data)
    corrupted[pos] ^= 0x10
    path.write_bytes(bytes(corrupted))
    with pytest.raises(eqx_rng.CheckpointError, match="checksum") as e:
        eqx_rng.load(path, tree)
    assert str(path) in str(e.value)
    with pytest.raises(eqx_rng.CheckpointError, match="checksum") as e:
        eqx_rng.load_metadata(path)
    assert str(path) in str(e.value)


def test_flipped_payload_byte_fails_load_and_load_metadata(tmp_path, monkeypatch):
    # Small chunks, so that `load_metadata` streams the payload in several reads.
    monkeypatch.setattr(_checkpoint._format, "CHUNK", 7)
    path, tree = _saved(tmp_path)
    assert eqx_rng.load_metadata(path)["note"] == "x" * 50
    data, header_end = _layout(path)
    payload_end = len(data) - 32
    for pos in (header_end, header_end + 100, payload_end - 1):
        corrupted = bytearray(data)
        corrupted[pos] ^= 0x01
        path.write_bytes(bytes(corrupted))
        for read in (
            lambda: eqx_rng.load(path, tree),
            lambda: eqx_rng.load_metadata(path),
        ):
            with pytest.raises(
                eqx_rng.CheckpointError, match="checksum of its payload"
            ) as e:
                read()
            assert str(path) in str(e.value)


def test_flipped_header_length(tmp_path):
    path, tree = _saved(tmp_path)
    corrupted = bytearray(path.read_bytes())
    corrupted[17] ^= 0x01
    path.write_bytes(bytes(corrupted))
    with pytest.raises(eqx_rng.CheckpointError, match=re.escape(str(path))):
        eqx_rng.load(path, tree)


def test_extra_bytes(tmp_path):
    path, tree = _saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(eqx_rng.CheckpointError, match="extra bytes"):
        eqx_rng.load(path, tree)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(eqx_rng.CheckpointError, match="not an eqx_rng checkpoint"):
        eqx_rng.load(path, {"w": jnp.zeros(3)})
    with pytest.raises(eqx_rng.CheckpointError, match="directory"):
        eqx_rng.load(tmp_path, {"w": jnp.zeros(3)})


def test_wrong_structure_names_the_leaves(tmp_path):
    path, tree = _saved(tmp_path)
    extra = dict(tree, bias=jnp.zeros(2))
    with pytest.raises(eqx_rng.CheckpointError, match=r"in `like` only: `\['bias'\]`"):
        eqx_rng.load(path, extra)
    fewer = {"w": tree["w"], "key": tree["key"]}
    with pytest.raises(
        eqx_rng.CheckpointError, match=r"in the file only: `\['step'\]`"
    ) as e:
        eqx_rng.load(path, fewer)
    assert str(path) in str(e.value)
    with pytest.raises(eqx_rng.CheckpointError, match="structure"):
        eqx_rng.load(path, [tree["w"], tree["key"], tree["step"]])


def test_wrong_shape_names_the_leaf_and_both_shapes(tmp_path):
    path, tree = _saved(tmp_path)
    like = dict(tree, w=jnp.zeros((5, 8)))
    with pytest.raises(
        eqx_rng.CheckpointError, match=r"\['w'\].*shape \(5, 8\).*shape \(8, 5\)"
    ) as e:
        eqx_rng.load(path, like)
    assert str(path) in str(e.value)


def test_wrong_dtype_names_the_leaf(tmp_path):
    path, tree = _saved(tmp_path)
    like = dict(tree, w=jnp.zeros((8, 5), jnp.bfloat16))
    with pytest.raises(eqx_rng.CheckpointError, match=r"\['w'\].*bfloat16.*float32"):
        eqx_rng.load(path, like)
    like = dict(tree, step=jax.ShapeDtypeStruct((), jnp.int16))
    with pytest.raises(eqx_rng.CheckpointError, match=r"\['step'\].*int16.*int32"):
        eqx_rng.load(path, like)


def test_wrong_key_implementation(tmp_path):
    path, tree = _saved(tmp_path)
    like = dict(tree, key=jr.key(0, impl="rbg"))
    with pytest.raises(eqx_rng.CheckpointError, match=r"\['key'\].*threefry2x32"):
        eqx_rng.load(path, like)


def test_key_versus_raw_data(tmp_path):
    path, tree = _saved(tmp_path)
    like = dict(tree, key=jr.key_data(tree["key"]))
    with pytest.raises(eqx_rng.CheckpointError, match=r"\['key'\]"):
        eqx_rng.load(path, like)


# ----------------------------------------------------------------------------------
# Atomic writes


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = eqx_rng.save(tmp_path / "a", {"w": jnp.zeros(2)})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(_checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        eqx_rng.save(path, {"w": jnp.ones(2)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a"]


def test_write_goes_through_a_temporary_and_a_rename(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(
            (os.path.basename(src), os.path.basename(dst), os.path.getsize(src))
        )
        return real_replace(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", spy)
    path = eqx_rng.save(tmp_path / "a.ckpt", {"w": jnp.zeros(2)})
    ((src, dst, size),) = seen
    assert src.startswith(".a.ckpt.") and src.endswith(".tmp") and dst == "a.ckpt"
    assert size == path.stat().st_size


# ----------------------------------------------------------------------------------
# CheckpointManager and latest_checkpoint


def test_manager_keeps_the_newest(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path / "run", keep=2)
    assert manager.latest() is None and manager.steps() == []
    tree = {"w": jnp.zeros(2)}
    for step in (0, 10, 5, 20):
        manager.save(step, dict(w=jnp.full(2, float(step))))
    assert manager.steps() == [10, 20]
    assert manager.latest() == tmp_path / "run" / "step_0000000020.ckpt"
    assert float(manager.restore(tree)["w"][0]) == 20.0
    assert float(manager.restore(tree, step=10)["w"][0]) == 10.0
    latest = manager.latest()
    assert latest is not None
    assert eqx_rng.load_metadata(latest)["eqx_rng"]["step"] == 20


def test_manager_keep_none_keeps_all(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path, keep=None)
    for step in range(4):
        manager.save(step, {"w": jnp.zeros(1)})
    assert manager.steps() == [0, 1, 2, 3]


def test_manager_takes_an_array_step(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path)
    manager.save(jnp.int32(7), {"w": jnp.zeros(1)})
    assert manager.steps() == [7]
    with pytest.raises(ValueError, match=">= 0"):
        manager.save(-1, {"w": jnp.zeros(1)})
    with pytest.raises(TypeError):
        manager.save(1.5, {"w": jnp.zeros(1)})


def test_manager_restore_without_checkpoints(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        manager.restore({"w": jnp.zeros(1)})


@pytest.mark.parametrize("keep", [0, -2, True])
def test_manager_keep_must_be_positive(tmp_path, keep):
    with pytest.raises((ValueError, TypeError), match="keep"):
        eqx_rng.CheckpointManager(tmp_path, keep=keep)


def test_manager_ignores_and_cleans_leftovers(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path)
    manager.save(3, {"w": jnp.zeros(1)})
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a writer that is gone
    host = _files._host()
    leftover = tmp_path / f".step_0000000004.ckpt.{host}.{proc.pid}.0123456789ab.tmp"
    leftover.write_bytes(b"partial")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    other = tmp_path / "step_12.ckpt.bak"
    other.write_text("mine")
    assert eqx_rng.latest_checkpoint(tmp_path) == tmp_path / "step_0000000003.ckpt"
    eqx_rng.CheckpointManager(tmp_path)  # a restarted run
    assert not leftover.exists() and foreign.exists() and other.exists()


def test_latest_checkpoint_of_a_missing_directory(tmp_path):
    assert eqx_rng.latest_checkpoint(tmp_path / "nothing") is None


def test_latest_checkpoint_orders_by_step_number(tmp_path):
    for name in ("step_9.ckpt", "step_10.ckpt", "step_0000000002.ckpt"):
        eqx_rng.save(tmp_path / name, {"w": jnp.zeros(1)})
    latest = eqx_rng.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_10.ckpt"


# ----------------------------------------------------------------------------------
# Resuming is bitwise identical


def _resume_setup():
    dropout = eqx_rng.nn.Dropout(0.2)

    def loss_fn(model, state, batch, *, key):
        x, y = batch
        keys = eqx_rng.example_keys(key, jnp.arange(x.shape[0]))
        h = jax.vmap(lambda xi, k: dropout(xi, key=k))(x, keys)
        pred = jax.vmap(model)(h)
        return jnp.mean((pred - y) ** 2), (state, {})

    def make():
        model = eqx.nn.MLP(3, 1, 8, 2, key=eqx_rng.derive(jr.key(0), "init"))
        return eqx_rng.TrainState.create(
            model, opt, key=eqx_rng.derive(jr.key(0), "train")
        )

    def batch(t):
        x = jr.normal(eqx_rng.derive(jr.key(1), t), (8, 3))
        return x, jnp.sin(x[:, :1])

    opt = optax.adam(1e-2)
    return make, eqx_rng.make_train_step(loss_fn, opt), batch


@pytest.mark.parametrize("k", [1, 4, 7])
def test_resume_is_bitwise_identical(tmp_path, k):
    make, step, batch = _resume_setup()
    n = 10
    straight = make()
    for t in range(n):
        straight, _ = step(straight, batch(t))

    first = make()
    for t in range(k):
        first, _ = step(first, batch(t))
    manager = eqx_rng.CheckpointManager(tmp_path, keep=1)
    manager.save(first.step, first)
    del first

    # A fresh process would build only the shapes.
    _, step_again, _ = _resume_setup()
    like = eqx.filter_eval_shape(make)
    resumed = manager.restore(like)
    assert int(resumed.step) == k
    for t in range(int(resumed.step), n):
        resumed, _ = step_again(resumed, batch(t))
    assert _bits_equal(resumed, straight)
