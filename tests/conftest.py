import os
import subprocess
import sys

import jax
import jax.random as jr
import jaxlib.version
import pytest

# Tests compile many small programs and run each briefly, so XLA's compile time is
# most of the suite's time. Unless EQX_RNG_TEST_OPTIMIZE=1, XLA skips most of its
# optimisations (`jax_disable_most_optimizations`): about a third of the compile time.
# Subprocesses inherit the setting through the environment. The computations are the
# same; only the generated code is less tuned, so every claim here that two runs agree
# bitwise compares programs compiled alike. `make test-min` runs its subset with the
# optimisations on (EQX_RNG_TEST_OPTIMIZE=1), so those claims are also checked on
# optimised programs.
#
# XLA's CPU backend also compiles fused operations 2-3x faster with its older
# (non-MLIR) fusion emitters (`--xla_cpu_use_fusion_emitters=false`), again for the
# same computations: the whole suite takes about half the time. XLA aborts on a flag
# it does not know, so with a jaxlib other than the ones known to have it
# (`_FAST_EMITTER_JAXLIB`) a short subprocess asks XLA first; without the flag the
# suite is slower, not wrong. Subprocesses that keep the environment's XLA_FLAGS (the
# pytest-xdist workers among them) inherit it.
_FAST_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
_FAST_EMITTER_JAXLIB = ((0, 10),)


def _xla_accepts(flag: str) -> bool:
    version = tuple(int(p) for p in jaxlib.version.__version__.split(".")[:2])
    if version in _FAST_EMITTER_JAXLIB:
        return True
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    code = "import jax; jax.devices()"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    return probe.returncode == 0


if os.environ.get("EQX_RNG_TEST_OPTIMIZE", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)
    _flags = os.environ.get("XLA_FLAGS", "")
    if "fusion_emitters" not in _flags and _xla_accepts(_FAST_EMITTER_FLAG):
        os.environ["XLA_FLAGS"] = f"{_flags} {_FAST_EMITTER_FLAG}".strip()

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_DEFAULT_SEED = 5678


class _GetKey:
    """Returns `fold_in(base, n)` on call `n`; the seed shows in its repr."""

    def __init__(self, seed: int):
        self.seed = seed
        self.base = jr.key(seed)
        self.calls = 0

    def __call__(self):
        key = jr.fold_in(self.base, self.calls)
        self.calls += 1
        return key

    def __repr__(self):
        return f"getkey(seed={self.seed}, EQX_RNG_SEED to override)"


@pytest.fixture
def getkey():
    return _GetKey(int(os.environ.get("EQX_RNG_SEED", _DEFAULT_SEED)))
