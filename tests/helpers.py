"""Test helpers shared by the test modules."""

import math
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

REPO = Path(__file__).resolve().parent.parent


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """`eqx.tree_equal` with types matched and float tolerances."""
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def key_bits(keys):
    """The raw bits of a typed key array, for bitwise comparison."""
    return jr.key_data(keys)


def keys_equal(a, b) -> bool:
    """Whether two typed key arrays are bitwise equal."""
    return a.shape == b.shape and bool(jnp.all(key_bits(a) == key_bits(b)))


def mean_tol(sigma: float, n: int) -> float:
    """Five standard errors of a mean of `n` draws with std `sigma`."""
    return 5 * sigma / math.sqrt(n)


def var_tol(var: float, n: int) -> float:
    """Five standard errors of a Gaussian sample variance of `n` draws."""
    return 5 * var * math.sqrt(2 / (n - 1))


def xla_flags_with_devices(devices: int) -> str:
    """`XLA_FLAGS` for a subprocess with `devices` CPU devices: this process's flags
    (the suite's faster-compile flag, see conftest.py) with any device count
    replaced."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device")]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


def run_python(
    code: str,
    *,
    devices: int | None = None,
    env: dict | None = None,
    timeout: float = 300,
) -> str:
    """Run `code` in a fresh interpreter; with `devices`, as that many CPU devices.

    Returns stdout; raises `AssertionError` with stderr when the process fails.
    """
    full_env = dict(os.environ)
    full_env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        full_env["XLA_FLAGS"] = xla_flags_with_devices(devices)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


__all__ = ["jax"]
