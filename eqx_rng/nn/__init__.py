"""`eqx_rng.nn`: stochastic and stateful layers acting on one example.

Stochastic layers take `__call__(x, *, key=None, inference=None)`; `BatchNorm` takes
`__call__(x, state, *, key=None, inference=None) -> (y, state)`. All honour
`eqx.nn.inference_mode` and compose with `eqx.nn.Sequential`, `eqx.filter_jit` and
`eqx.filter_vmap`.
"""

from ._batch_norm import BatchNorm as BatchNorm
from ._common import AbstractStochasticLayer as AbstractStochasticLayer
from ._dropout import (
    Dropout as Dropout,
    DropPath as DropPath,
    GaussianDropout as GaussianDropout,
)
from ._noise import GaussianNoise as GaussianNoise
