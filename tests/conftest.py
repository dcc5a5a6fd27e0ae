import os

import jax
import jax.random as jr
import pytest

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
