"""`eqx_rng.nn`: stochastic and stateful layers acting on one example.

Stochastic layers take `__call__(x, *, key=None, inference=None)`; `BatchNorm` takes
`__call__(x, state, *, key=None, inference=None, mask=None) -> (y, state)`. All
honour `eqx.nn.inference_mode` and compose with `eqx.nn.Sequential`,
`eqx.filter_jit` and `eqx.filter_vmap`. `mc_mode` switches a model to MC dropout,
`LayerStack` scans over a stack of layers, `BayesLinear` and `kl_divergence` give
Bayes by Backprop and Flipout.
"""

from ._batch_norm import BatchNorm as BatchNorm
from ._bayes import BayesLinear as BayesLinear, kl_divergence as kl_divergence
from ._common import AbstractStochasticLayer as AbstractStochasticLayer
from ._dropout import (
    Dropout as Dropout,
    DropPath as DropPath,
    GaussianDropout as GaussianDropout,
)
from ._mc import mc_mode as mc_mode
from ._noise import GaussianNoise as GaussianNoise
from ._stack import LayerStack as LayerStack
