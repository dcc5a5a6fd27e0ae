"""SIGKILL a training run at several points; it always resumes to the same result.

`tests/_train_driver.py` trains a small model with dropout for 24 steps, saving every
4 steps with `CheckpointManager(keep=2)`. Here it is killed three times in a row:

1. in the middle of writing a checkpoint's temporary file (a partial file is left);
2. after a checkpoint's temporary file is complete, just before the rename;
3. from outside, at a seeded random moment of the run.

After every kill the directory must hold a loadable checkpoint equal, bitwise, to the
uninterrupted run's checkpoint of the same step, and a final resumed run must end
bitwise equal to the uninterrupted one.
"""

import os
import random
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from helpers import REPO

import eqx_rng

DRIVER = REPO / "tests" / "_train_driver.py"
STEPS, EVERY = 24, 4


def _driver(directory, *, keep=2, kill="", sleep=0.0, **popen):
    env = dict(os.environ)
    env["EQX_RNG_DRIVER_CACHE"] = str(directory.parent / "jax_cache")
    env["JAX_PLATFORMS"] = "cpu"
    env["EQX_RNG_DRIVER_KILL"] = kill
    env["EQX_RNG_DRIVER_SLEEP"] = str(sleep)
    cmd = [sys.executable, str(DRIVER), str(directory)]
    cmd += ["--steps", str(STEPS), "--every", str(EVERY), "--keep", str(keep)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, text=True, **popen)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _bits(x):
    if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jr.key_data(x)
    return np.asarray(x)


def _bits_equal(a, b) -> bool:
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    return len(la) == len(lb) and all(
        np.array_equal(_bits(x), _bits(y)) for x, y in zip(la, lb, strict=True)
    )


def _like():
    sys.path.insert(0, str(DRIVER.parent))
    try:
        import _train_driver
    finally:
        sys.path.pop(0)
    return eqx.filter_eval_shape(_train_driver.make_state)


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_sigkill_at_several_points_then_resume(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    like = _like()

    # The uninterrupted run (keeping every checkpoint) and the first killed run, side
    # by side. Kill 1: half way through writing the temporary file of step 8.
    ref = _driver(ref_dir, keep=0, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = _driver(
        run_dir, kill="write:8", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    code, out, err = _finish(run)
    assert code == -signal.SIGKILL, (out, err)
    code_ref, out_ref, err_ref = _finish(ref)
    assert code_ref == 0, err_ref
    assert f"saved {STEPS}" in out_ref

    def reference(step):
        return eqx_rng.load(ref_dir / f"step_{step:010d}.ckpt", like)

    def check_loadable(expected_step=None):
        latest = eqx_rng.latest_checkpoint(run_dir)
        assert latest is not None
        ts = eqx_rng.load(latest, like)
        step = int(ts.step)
        if expected_step is not None:
            assert step == expected_step
        assert _bits_equal(ts, reference(step)), f"checkpoint of step {step} differs"
        return step

    assert "saved 4" in out and "saved 8" not in out
    assert len(_leftovers(run_dir)) == 1  # the partial temporary file
    check_loadable(4)

    # Kill 2: the temporary file of step 16 is complete and synced, not yet renamed.
    run = _driver(
        run_dir, kill="replace:16", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    code, out, err = _finish(run)
    assert code == -signal.SIGKILL, (out, err)
    assert out.startswith("resumed 4") and "saved 12" in out
    assert len(_leftovers(run_dir)) == 1  # the new one; the old one was cleaned up
    check_loadable(12)

    # Kill 3: from outside, at a seeded random time once the run is under way.
    delay = random.Random(0).uniform(0.05, 0.3)
    run = _driver(
        run_dir, sleep=0.05, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert run.stdout is not None
    first = run.stdout.readline()
    assert first.startswith("resumed 12"), first
    assert run.stdout.readline().startswith("step")  # compiled and running
    time.sleep(delay)  # >= 12 steps x 0.05 s remain, so it is still running
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    killed_at = check_loadable()
    assert 12 <= killed_at < STEPS

    # Resume to the end.
    run = _driver(run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    code, out, err = _finish(run)
    assert code == 0, err
    assert out.startswith(f"resumed {killed_at}")
    assert _leftovers(run_dir) == []
    check_loadable(STEPS)
    assert eqx_rng.CheckpointManager(run_dir).steps() == [STEPS - EVERY, STEPS]
