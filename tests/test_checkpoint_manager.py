"""`CheckpointManager` under restarts: roll-back, temporary files, recorded steps,
bad arguments; old (format version 1) files; the one private JAX function used."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqx_rng
from eqx_rng._checkpoint import _files, _records

DATA = pathlib.Path(__file__).parent / "data"


def _tree(value: float) -> dict:
    return {"w": jnp.full(3, value), "key": jr.key(0)}


def _value(manager, step=None) -> float:
    return float(manager.restore(_tree(0.0), step=step)["w"][0])


# ----------------------------------------------------------------------------------
# Roll-back and pruning


def test_roll_back_removes_the_abandoned_run(tmp_path):
    run1 = eqx_rng.CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        run1.save(step, _tree(float(step)))
    assert run1.steps() == [20, 30]
    run2 = eqx_rng.CheckpointManager(tmp_path, keep=2)  # a restarted process
    assert _value(run2, step=20) == 20.0
    run2.save(21, _tree(121.0))
    assert run2.steps() == [20, 21]  # step 30 of the abandoned run is gone
    for step in (22, 23, 24):
        run2.save(step, _tree(100.0 + step))
    assert run2.steps() == [23, 24]
    assert run2.latest() == run2.path(24)
    assert _value(eqx_rng.CheckpointManager(tmp_path)) == 124.0


def test_roll_back_removes_before_writing(tmp_path, monkeypatch):
    """A crash during the first save after a roll-back leaves the restored step
    as the latest, never the abandoned run's."""
    manager = eqx_rng.CheckpointManager(tmp_path, keep=None)
    for step in (1, 2, 3):
        manager.save(step, _tree(float(step)))
    manager.restore(_tree(0.0), step=1)

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(_files.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        manager.save(2, _tree(-2.0))
    monkeypatch.undo()
    assert manager.steps() == [1]


def test_without_restore_steps_are_ordered_by_number(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path, keep=3)
    for step in (0, 10, 5, 20, 15):
        manager.save(step, _tree(float(step)))
    assert manager.steps() == [10, 15, 20]
    manager.restore(_tree(0.0))  # the newest: nothing above it to remove
    manager.save(25, _tree(25.0))
    assert manager.steps() == [15, 20, 25]


def test_restore_checks_the_recorded_step(tmp_path):
    manager = eqx_rng.CheckpointManager(tmp_path, keep=None)
    manager.save(100, _tree(100.0))
    manager.save(200, _tree(200.0))
    os.replace(manager.path(200), manager.path(100))
    with pytest.raises(eqx_rng.CheckpointError, match="records step 200, not") as e:
        manager.restore(_tree(0.0), step=100)
    assert str(manager.path(100)) in str(e.value) and "step=200" in str(e.value)
    shutil.copy(manager.path(100), manager.path(300))  # the newest, misnamed
    with pytest.raises(eqx_rng.CheckpointError, match="records step 200"):
        manager.restore(_tree(0.0))


def test_format_version_1_files_still_load(tmp_path):
    """Written by eqx_rng 0.1 (format version 1), before the version bump."""
    manager = eqx_rng.CheckpointManager(tmp_path)
    shutil.copy(DATA / "format_v1_step_12.ckpt", manager.path(12))
    like = {
        "w": jnp.zeros((2, 3)),
        "bf16": jnp.zeros(2, jnp.bfloat16),
        "key": jr.key(0),
        "keys": jr.split(jr.key(0), 3),
        "lr": jnp.asarray(0.0),
        "n": np.zeros(3, np.int64),
    }
    back = manager.restore(like, step=12)
    assert np.array_equal(back["w"], np.arange(6.0).reshape(2, 3))
    assert np.array_equal(back["bf16"], jnp.array([1.5, -2.0], jnp.bfloat16))
    assert np.array_equal(jr.key_data(back["key"]), jr.key_data(jr.key(7)))
    assert np.array_equal(
        jr.key_data(back["keys"]), jr.key_data(jr.split(jr.key(8), 3))
    )
    assert float(back["lr"]) == 0.5 and back["lr"].aval.weak_type
    assert isinstance(back["n"], np.ndarray) and back["n"].tolist() == [0, 1, 2]
    meta = eqx_rng.load_metadata(manager.path(12))
    assert meta["eqx_rng"]["format_version"] == 1 and meta["eqx_rng"]["step"] == 12
    assert manager.path(12).read_bytes()[8] == 1


def test_new_files_have_format_version_2(tmp_path):
    path = eqx_rng.save(tmp_path / "a", _tree(1.0))
    assert path.read_bytes()[8:12] == (2).to_bytes(4, "little")


def test_a_newer_format_version_is_refused(tmp_path):
    path = eqx_rng.save(tmp_path / "a", _tree(1.0))
    data = bytearray(path.read_bytes())
    data[8] = 3
    path.write_bytes(bytes(data))
    with pytest.raises(eqx_rng.CheckpointError, match="format version 3"):
        eqx_rng.load(path, _tree(0.0))


def test_make_weak_uses_a_jax_function_that_exists():
    """`make_weak` relies on JAX's private `_convert_element_type`; this fails
    loudly if a JAX release removes or changes it."""
    from jax._src.lax import lax as lax_internal

    assert callable(lax_internal._convert_element_type)
    x = _records.make_weak(jnp.arange(3.0))
    assert x.aval.weak_type and x.dtype == jnp.float32
    assert np.array_equal(x, np.arange(3.0))


def test_saved_doctor_is_a_fresh_doctor(tmp_path):
    """The library entries reuse `doctor()` per process and settings: what a file
    records is what `doctor()` says at save time, also after a setting changes."""
    before = bool(jax.threefry_partitionable.value)
    for partitionable in (before, not before):
        jax.config.update("jax_threefry_partitionable", partitionable)
        try:
            path = eqx_rng.save(tmp_path / "a", _tree(1.0))
            saved = eqx_rng.load_metadata(path)["eqx_rng"]["doctor"]
            assert saved == eqx_rng.debug.doctor()
            assert saved["threefry_partitionable"] is partitionable
        finally:
            jax.config.update("jax_threefry_partitionable", before)


# ----------------------------------------------------------------------------------
# Temporary files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tmp(directory, name, pid, host=None, token="0123456789ab"):
    host = host or _files._host()
    path = directory / f".{name}.{host}.{pid}.{token}.tmp"
    path.write_bytes(b"partial")
    return path


def test_manager_removes_only_dead_writers_temporaries(tmp_path):
    name = "step_0000000004.ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _tmp(tmp_path, name, sleeper.pid)
        dead = _tmp(tmp_path, name, _dead_pid(), token="abcdef012345")
        mine = _tmp(tmp_path, name, os.getpid(), token="aaaaaaaaaaaa")
        other_host = _tmp(
            tmp_path, name, 1, host="elsewhere-" + socket.gethostname()[:5]
        )
        old_style = tmp_path / f".{name}.0123456789ab.tmp"  # eqx_rng 0.1's name
        old_style.write_bytes(b"partial")
        foreign = tmp_path / "notes.txt"
        foreign.write_text("mine")
        eqx_rng.CheckpointManager(tmp_path)
        assert live.exists() and mine.exists() and foreign.exists()
        assert other_host.exists() and old_style.exists()  # recent: may be alive
        assert not dead.exists()
        day_ago = time.time() - _files.FOREIGN_TMP_AGE - 60
        for path in (other_host, old_style):
            os.utime(path, (day_ago, day_ago))
        eqx_rng.CheckpointManager(tmp_path)
        assert not other_host.exists() and not old_style.exists()
        assert live.exists() and foreign.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    eqx_rng.CheckpointManager(tmp_path)
    assert not live.exists()


def test_save_removes_what_killed_saves_of_its_path_left(tmp_path):
    dead = _tmp(tmp_path, "a.ckpt", _dead_pid())
    other_file = _tmp(tmp_path, "b.ckpt", _dead_pid())
    eqx_rng.save(tmp_path / "a.ckpt", _tree(1.0))
    assert not dead.exists() and other_file.exists()
    assert sorted(os.listdir(tmp_path)) == [other_file.name, "a.ckpt"]


def test_a_polling_reader_never_breaks_a_writer(tmp_path):
    """An evaluator creating managers and polling `latest()` while a trainer saves:
    every save succeeds (creating a manager once deleted live temporaries)."""
    directory = tmp_path / "run"
    writer = eqx_rng.CheckpointManager(directory, keep=2)
    tree = {"w": jnp.zeros(1 << 20)}  # 4 MB: each save takes a while
    stop = threading.Event()
    seen, errors = [], []

    def poll():
        while not stop.is_set():
            try:
                latest = eqx_rng.CheckpointManager(directory).latest()
            except OSError as e:  # pragma: no cover - the failure looked for
                errors.append(e)
                return
            if latest is not None:
                seen.append(latest.name)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for step in range(12):
            writer.save(step, tree)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert writer.steps() == [10, 11] and seen
    assert [n for n in os.listdir(directory) if n.endswith(".tmp")] == []


# ----------------------------------------------------------------------------------
# Bad arguments


def test_manager_of_a_file_says_so(tmp_path):
    path = eqx_rng.save(tmp_path / "one.ckpt", _tree(1.0))
    with pytest.raises(NotADirectoryError, match=r"CheckpointManager\(directory") as e:
        eqx_rng.CheckpointManager(path)
    assert "eqx_rng.load(" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match="empty path"):
        eqx_rng.CheckpointManager("")


def test_save_to_an_empty_path_or_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"`eqx_rng.save\(path=...\)` got an empty"):
        eqx_rng.save("", _tree(1.0))
    with pytest.raises(IsADirectoryError, match="names the directory") as e:
        eqx_rng.save(tmp_path, _tree(1.0))
    assert "CheckpointManager" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        eqx_rng.save(tmp_path / "missing" / "a.ckpt", _tree(1.0))
    assert os.listdir(tmp_path) == []


def test_shard_and_chain_mesh_refuse_repeated_axis_names():
    mesh = eqx_rng.chain_mesh()
    with pytest.raises(ValueError, match="uses the mesh axis 'chains' more than once"):
        eqx_rng.shard(jnp.ones((1, 1)), mesh, ("chains", "chains"))
    with pytest.raises(ValueError, match="repeats the axis name 'a'"):
        eqx_rng.chain_mesh((1, 1), ("a", "a"))
    assert jax.device_count() >= 1


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_save_drops_the_cache_of_the_checkpoint_it_will_prune(tmp_path, monkeypatch):
    manager = eqx_rng.CheckpointManager(tmp_path, keep=2)
    manager.save(1, {"w": jnp.zeros(3)})
    manager.save(2, {"w": jnp.ones(3)})
    oldest = manager.path(1).stat().st_ino
    real_fadvise = os.posix_fadvise
    advised = []

    def fadvise(fd, offset, length, advice):
        # Dropped while the file is still there, before the new one is written.
        advised.append((os.fstat(fd).st_ino, manager.path(3).exists()))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(_files.os, "posix_fadvise", fadvise)
    manager.save(3, {"w": jnp.full(3, 2.0)})
    assert advised == [(oldest, False)]
    assert manager.steps() == [2, 3]
