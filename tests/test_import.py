"""Importing eqx_rng initialises no JAX backend (tested in fresh interpreters)."""

import os
import subprocess
import sys
import textwrap

_SUBMODULES = ("eqx_rng.nn", "eqx_rng.debug", "eqx_rng.optim")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_leaves_device_settings_open():
    # `jax_num_cpu_devices` can only change before a backend exists: JAX raises
    # `RuntimeError` otherwise. So this update succeeding, and taking effect, shows
    # that importing eqx_rng and its submodules initialised no backend.
    imports = "\n".join(f"import {m}" for m in _SUBMODULES)
    out = _run(
        imports
        + """
import jax
jax.config.update("jax_num_cpu_devices", 4)
assert jax.device_count() == 4, jax.device_count()
print("ok")
"""
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_probe_detects_an_initialised_backend():
    # The check above can fail: after any JAX operation the same update raises.
    out = _run(
        """
import jax
import jax.numpy as jnp
jnp.zeros(())
try:
    jax.config.update("jax_num_cpu_devices", 4)
except RuntimeError:
    print("raised")
"""
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised"


def test_training_works_after_changing_the_device_count():
    # The constants that the fast training step needs are built at its first call.
    out = _run(
        """
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import eqx_rng
jax.config.update("jax_num_cpu_devices", 2)

def loss_fn(model, state, batch, *, key):
    return jnp.sum(model["w"] ** 2), (state, {})

opt = optax.sgd(0.1)
ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
step = eqx_rng.make_train_step(loss_fn, opt)
for _ in range(3):
    ts, _ = step(ts, None)
assert jax.device_count() == 2 and int(ts.step) == 3
print("ok")
"""
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
