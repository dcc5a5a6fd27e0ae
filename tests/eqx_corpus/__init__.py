"""A corpus of small models in the style of Equinox's own examples.

Each model follows a pattern of Equinox's documentation examples (the MNIST CNN,
the stateful BatchNorm/SpectralNorm model, the GRU scanned over time, the vision
transformer's attention block, the DCGAN pair, weights tied with `eqx.nn.Shared`, a
Module holding non-array fields), at tiny sizes. `tests/test_eqx_corpus.py` runs
each through `eqx_rng.jit` against `eqx.filter_jit`, through `eqx_rng.ensemble`
against building the chains one by one, and through `make_train_step` against a
hand-written `eqx.filter_jit` step: the fast paths on code written the way Equinox
users write it, not the way this project's own models are written.
"""

from . import _fields, _sequence, _stateful, _vision  # noqa: F401  (register)
from ._base import CASES, Case

__all__ = ["CASES", "Case"]
