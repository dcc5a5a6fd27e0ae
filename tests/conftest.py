import os

import jax
import jax.random as jr
import pytest

# Tests compile many small programs and run each briefly, so XLA's compile time is
# most of the suite's time. Unless EQX_RNG_TEST_OPTIMIZE=1, XLA skips most of its
# optimisations (`jax_disable_most_optimizations`): about a third of the compile time.
# Subprocesses inherit the setting through the environment. The computations are the
# same; only the generated code is less tuned, so every claim here that two runs agree
# bitwise compares programs compiled alike. `make test-min` runs its subset with the
# optimisations on (EQX_RNG_TEST_OPTIMIZE=1), so those claims are also checked on
# optimised programs.
if os.environ.get("EQX_RNG_TEST_OPTIMIZE", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)

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
