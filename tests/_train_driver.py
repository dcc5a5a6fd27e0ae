"""A small training run that checkpoints, resumes, and can kill itself mid-save.

Used by `tests/test_resume_kill.py`, which SIGKILLs it at several points and checks
that the directory always holds a loadable checkpoint and that resuming reaches the
uninterrupted run's final state bitwise.

    python tests/_train_driver.py DIR [--steps 24] [--every 4] [--keep 2]

Environment:

- `EQX_RNG_DRIVER_KILL="write:8"`: SIGKILL itself in the middle of writing the
    temporary file of the checkpoint of step 8 (a partial temporary file is left);
    `"replace:8"`: after that temporary file is complete and synced, just before the
    rename that would publish it.
- `EQX_RNG_DRIVER_SLEEP`: seconds to sleep after each step (so that a kill from
    outside at a random time lands in the middle of the run).
- `EQX_RNG_DRIVER_CACHE`: a JAX persistent compilation cache directory, so that
    the runs after the first start in a fraction of the time.

Prints `resumed T` or `saved 0` at the start, then `step T` after each step and
`saved T` after each checkpoint, flushed.
"""

import argparse
import os
import signal
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import eqx_rng
from eqx_rng import _checkpoint
from eqx_rng._checkpoint import _files

SEED = 0
OPTIMIZER = optax.adam(1e-2)
_DROPOUT = eqx_rng.nn.Dropout(0.2)


def make_state() -> eqx_rng.TrainState:
    key = jr.key(SEED)
    model = eqx.nn.MLP(3, 1, 8, 2, key=eqx_rng.derive(key, "init"))
    return eqx_rng.TrainState.create(model, OPTIMIZER, key=eqx_rng.derive(key, "train"))


def loss_fn(model, state, batch, *, key):
    x, y = batch
    keys = eqx_rng.example_keys(key, jnp.arange(x.shape[0]))
    h = jax.vmap(lambda xi, k: _DROPOUT(xi, key=k))(x, keys)
    pred = jax.vmap(model)(h)
    return jnp.mean((pred - y) ** 2), (state, {})


def batch(t: int):
    x = jr.normal(eqx_rng.derive(jr.key(SEED + 1), t), (16, 3))
    return x, jnp.sin(x[:, :1]) + x[:, 1:2]


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_then_die(fd: int, pieces: list) -> None:
    """Write the first half of the bytes of `pieces`, make them durable, and die."""
    data = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
    os.write(fd, data[: max(1, len(data) // 2)])
    os.fsync(fd)
    _die()


def _install_kill(mode: str, at: int, saving: list[int]) -> None:
    os_module = _checkpoint.os
    if mode == "write":
        # Every checkpoint byte reaches the temporary file through `write_all`.
        real_write_all = _files.write_all

        def write_all(fd, pieces):
            if saving[0] == at:
                _write_half_then_die(fd, pieces)
            return real_write_all(fd, pieces)

        _files.write_all = write_all
    elif mode == "replace":
        real_replace = os_module.replace

        def replace(src, dst):
            if saving[0] == at:
                _die()
            return real_replace(src, dst)

        os_module.replace = replace
    else:
        raise ValueError(f"unknown EQX_RNG_DRIVER_KILL mode {mode!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--keep", type=int, default=2)
    args = parser.parse_args()
    keep = None if args.keep <= 0 else args.keep

    saving = [-1]
    kill = os.environ.get("EQX_RNG_DRIVER_KILL", "")
    if kill:
        mode, at = kill.split(":")
        _install_kill(mode, int(at), saving)
    sleep = float(os.environ.get("EQX_RNG_DRIVER_SLEEP", "0"))
    cache = os.environ.get("EQX_RNG_DRIVER_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def save(t, ts):
        saving[0] = t
        manager.save(t, ts)
        saving[0] = -1
        print(f"saved {t}", flush=True)

    manager = eqx_rng.CheckpointManager(args.directory, keep=keep)
    ts = eqx.filter_jit(make_state)()  # one compilation, not one per eager op
    if manager.latest() is not None:
        ts = manager.restore(ts)
        print(f"resumed {int(ts.step)}", flush=True)
    else:
        save(0, ts)
    step = eqx_rng.make_train_step(loss_fn, OPTIMIZER)
    for t in range(int(ts.step), args.steps):
        ts, _ = step(ts, batch(t))
        print(f"step {t + 1}", flush=True)
        if sleep:
            time.sleep(sleep)
        if (t + 1) % args.every == 0 or t + 1 == args.steps:
            save(t + 1, ts)


if __name__ == "__main__":
    main()
